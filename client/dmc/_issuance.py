"""The workload's half of an issuance: a new key, its CSR, and checking what the CA sent.

Shared by the ``dmc`` command (bootstrap, renew, delegate) and the identity source, so a
certificate is never written or used before it verifies and belongs to the key made here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dmc.errors import DmcError, InvalidArgument
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid, verify_chain
from dmc.v1 import ca_pb2

__all__ = [
    "KEY_TYPES",
    "BadIssuance",
    "Issued",
    "WorkloadKey",
    "csr_for",
    "new_key",
    "new_key_like",
    "read_svid_response",
]

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")

WorkloadKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class BadIssuance(DmcError):
    """The CA answered with something other than a valid SVID for our key (``INTERNAL``)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate the CA issued for a key made here, with the bundle it sent."""

    svid: Svid
    chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]
    key: WorkloadKey


def new_key(key_type: str) -> WorkloadKey:
    """A fresh private key of ``key_type`` (one of `KEY_TYPES`)."""
    match key_type:
        case "ec-p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "ec-p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "rsa-2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise InvalidArgument(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def new_key_like(key: PrivateKeyTypes) -> WorkloadKey:
    """A fresh key of the same type and size as ``key``: every renewal changes the key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(key.curve)
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    # SPEC §2: ECDSA and RSA only; Ed25519 certificates fail gRPC's handshake.
    raise InvalidArgument(f"the current key is {type(key).__name__}; dmc uses ECDSA or RSA keys")


def csr_for(key: WorkloadKey, spiffe_id: SpiffeId | None) -> bytes:
    """A DER CSR with an empty subject, and the SPIFFE ID as its one URI SAN when known."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        # RFC 5280 §4.1.2.6: with an empty subject the SAN extension is critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
    # A P-384 key signs with SHA-384, to match its strength; the others with SHA-256.
    large_curve = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256
    digest = hashes.SHA384() if large_curve else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def read_svid_response(
    response: ca_pb2.SVIDResponse,
    key: WorkloadKey,
    roots: Sequence[x509.Certificate],
    expected_id: SpiffeId | None = None,
    now: datetime | None = None,
) -> Issued:
    """Check what the CA sent before anything is written or used: a valid SVID for ``key``.

    The chain must verify against the bundle in the response (or ``roots`` when the response
    carries none), hold ``key``'s public key, and name ``expected_id`` when given.
    """
    if not response.certificate_chain:
        raise BadIssuance("the CA answered without a certificate")
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in response.certificate_chain)
        bundle = tuple(
            x509.load_der_x509_certificate(authority.certificate)
            for authority in response.bundle.authorities
        ) or tuple(roots)
    except ValueError as exc:
        raise BadIssuance(f"the CA answered with an unreadable certificate: {exc}") from exc

    svid = verify_chain(chain, bundle, now or datetime.now(UTC))
    if chain[0].public_key() != key.public_key():
        raise BadIssuance("the CA issued a certificate for another public key")
    if expected_id is not None and svid.spiffe_id != expected_id:
        raise BadIssuance(
            f"the CA issued a certificate for {svid.spiffe_id}, not for {expected_id}"
        )
    return Issued(svid=svid, chain=chain, bundle=bundle, key=key)
