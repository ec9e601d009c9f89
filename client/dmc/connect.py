"""Channels to the CA, its addresses, and the credential files the commands present to it.

The CA's serving SVID carries its listen host as an IP or DNS SAN (SPEC §6), so a plain
TLS channel with the trust bundle as roots verifies it by host name, as Python gRPC
insists (DEPENDENCIES.md). Renew, Delegate and Admin add the caller's SVID as the client
certificate (mTLS); Bootstrap goes to its own server-authenticated listener (SPEC §4).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dmc.errors import InvalidArgument, InvalidPem
from dmc.pem import (
    certificates_to_pem,
    load_certificates_file,
    load_private_key_file,
    private_key_to_pem,
)

__all__ = [
    "BUNDLE_FILE",
    "Credential",
    "bootstrap_address",
    "ca_channel",
    "check_bundle",
    "is_ca_certificate",
    "join_host_port",
    "load_bundle_file",
    "load_credential",
    "load_credential_dir",
    "split_host_port",
]

BUNDLE_FILE = "bundle.pem"
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class Credential:
    """An SVID to present to the CA: its chain (leaf first), private key and trust bundle.

    The ``*_pem`` properties give each part as gRPC's channel credentials take it.
    """

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]

    @property
    def chain_pem(self) -> bytes:
        """The chain as PEM, leaf first."""
        return certificates_to_pem(self.chain)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS #8 PEM."""
        return private_key_to_pem(self.key)

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle as PEM."""
        return certificates_to_pem(self.bundle)


def ca_channel(
    address: str,
    bundle_pem: bytes,
    cert_chain_pem: bytes | None = None,
    key_pem: bytes | None = None,
) -> grpc.Channel:
    """A TLS channel to the CA at ``address`` (``HOST:PORT``) trusting ``bundle_pem``.

    With ``cert_chain_pem`` and ``key_pem``, the channel presents that client certificate.
    """
    if (cert_chain_pem is None) != (key_pem is None):
        raise InvalidArgument("a client certificate needs both its chain and its private key")
    split_host_port(address)

    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem, private_key=key_pem, certificate_chain=cert_chain_pem
    )
    return grpc.secure_channel(address, credentials)


def split_host_port(address: str) -> tuple[str, int]:
    """``("127.0.0.1", 8443)`` from ``127.0.0.1:8443``; IPv6 hosts come in brackets."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise InvalidArgument(f"address {address!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _check_ipv6(host, address)
    elif ":" in host:
        raise InvalidArgument(f"address {address!r}: put an IPv6 host in brackets, [{host}]")
    port = int(port_text)
    if not 0 < port <= _MAX_PORT:
        raise InvalidArgument(f"address {address!r}: port {port} is outside 1..{_MAX_PORT}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The inverse of `split_host_port`: ``[::1]:8444`` for an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bootstrap_address(ca_address: str) -> str:
    """The default bootstrap listener for the CA at ``ca_address``: same host, port + 1.

    SPEC §4: Bootstrap is served on a listener of its own, by default the mTLS listener's
    host and port + 1.
    """
    host, port = split_host_port(ca_address)
    if port == _MAX_PORT:
        raise InvalidArgument(
            f"the CA port is {port}, so there is no port + 1 for Bootstrap; "
            "give the bootstrap address"
        )
    return join_host_port(host, port + 1)


def load_bundle_file(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The trust bundle at ``path`` (any formatting `dmc.pem` reads); authorities only."""
    return check_bundle(load_certificates_file(path), os.fspath(path))


def check_bundle(certificates: list[x509.Certificate], source: str) -> list[x509.Certificate]:
    """Return ``certificates`` if each is an authority; a trust bundle holds nothing else."""
    for number, certificate in enumerate(certificates, start=1):
        if not is_ca_certificate(certificate):
            raise InvalidPem(
                f"{source}: certificate {number} is not a CA certificate; "
                "a trust bundle holds authorities only"
            )
    return certificates


def load_credential(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    bundle_path: str | os.PathLike[str],
) -> Credential:
    """Read an SVID chain, its private key and a trust bundle, each through `dmc.pem`.

    Raises `InvalidPem` naming the file that is missing or unreadable, and `InvalidArgument`
    if the key does not belong to the chain's first certificate.
    """
    chain = load_certificates_file(cert_path)
    key = load_private_key_file(key_path)
    bundle = load_bundle_file(bundle_path)

    if key.public_key() != chain[0].public_key():
        raise InvalidArgument(
            f"{os.fspath(key_path)} is not the private key of the certificate in "
            f"{os.fspath(cert_path)}"
        )
    return Credential(chain=tuple(chain), key=key, bundle=tuple(bundle))


def load_credential_dir(directory: str | os.PathLike[str], name: str = "svid") -> Credential:
    """Read ``NAME.pem``, ``NAME.key`` and ``bundle.pem`` from ``directory`` (SPEC §6)."""
    folder = Path(directory)
    return load_credential(folder / f"{name}.pem", folder / f"{name}.key", folder / BUNDLE_FILE)


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` asserts ``basicConstraints CA:TRUE``."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_ipv6(host: str, address: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidArgument(f"address {address!r}: {host!r} is not an IPv6 address") from None
