"""The SPIFFE bundle format: a trust domain's X.509 authorities as a JWK set, for federation.

SPIFFE Trust Domain and Bundle §4: the bundle is a JWK set (RFC 7517) with ``keys``, an
optional ``spiffe_sequence`` and an optional ``spiffe_refresh_hint`` (seconds). Each X.509
authority is one JWK with ``use: x509-svid``, the public key parameters of RFC 7518 §6, and
an ``x5c`` holding exactly that one certificate (standard base64 DER, RFC 7517 §4.7). dmc
publishes roots only (SPEC §2), one JWK per root.

`write_spiffe_bundle` makes the document; `parse_spiffe_bundle` reads one, from dmc or from
another SPIFFE implementation, and raises `InvalidArgument` naming the key that is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dmc.errors import InvalidArgument

__all__ = [
    "X509_SVID_USE",
    "SpiffeBundle",
    "parse_spiffe_bundle",
    "write_spiffe_bundle",
]

_log = logging.getLogger(__name__)

# SPIFFE Trust Domain and Bundle §4.2.1: the `use` of a key that verifies X.509-SVIDs.
X509_SVID_USE = "x509-svid"
# §4.2.2: JWT-SVID keys may share the set; an X.509 reader passes over them.
_JWT_SVID_USE = "jwt-svid"
# RFC 7518 §6.2.1.1: the curve names of JWK, and each coordinate's length in bytes.
_CURVES: Mapping[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}


@dataclass(frozen=True, slots=True)
class SpiffeBundle:
    """The X.509 authorities of one trust domain, with the set's sequence and refresh hint."""

    x509_authorities: tuple[x509.Certificate, ...]
    sequence: int | None = None
    refresh_hint_seconds: int | None = None


def write_spiffe_bundle(bundle: SpiffeBundle) -> bytes:
    """The bundle as a SPIFFE bundle document (JSON, UTF-8, one trailing newline).

    A certificate listed twice is written once.
    """
    keys: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    for certificate in bundle.x509_authorities:
        der = certificate.public_bytes(serialization.Encoding.DER)
        if der in seen:
            continue
        seen.add(der)
        keys.append(
            {
                **_public_jwk(certificate),
                "use": X509_SVID_USE,
                "x5c": [base64.b64encode(der).decode("ascii")],
            }
        )
    document: dict[str, Any] = {"keys": keys}
    if bundle.sequence is not None:
        document["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint_seconds is not None:
        document["spiffe_refresh_hint"] = bundle.refresh_hint_seconds
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def parse_spiffe_bundle(data: bytes | str, source: str = "SPIFFE bundle") -> SpiffeBundle:
    """Read a SPIFFE bundle document; ``source`` names it in error messages.

    Keys whose ``use`` is ``jwt-svid`` or unknown are passed over, as the format lets it
    grow; an ``x509-svid`` key must carry exactly one certificate whose public key is the
    key's own, or the whole document is refused.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{source} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{source} is not a JSON object (a JWK set)")
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise InvalidArgument(f"{source} has no 'keys' list (SPIFFE bundle §4.1)")
    sequence = _optional_count(document, "spiffe_sequence", source)
    refresh_hint = _optional_count(document, "spiffe_refresh_hint", source)

    authorities: list[x509.Certificate] = []
    for number, key in enumerate(keys, start=1):
        where = f"{source}: key {number}"
        if not isinstance(key, dict):
            raise InvalidArgument(f"{where} is not a JSON object")
        use = key.get("use")
        if not isinstance(use, str):
            raise InvalidArgument(f"{where} has no 'use' (SPIFFE bundle §4.2.1 requires it)")
        if use != X509_SVID_USE:
            if use != _JWT_SVID_USE:
                _log.debug("%s: passing over a key with use %r", where, use)
            continue
        authorities.append(_x509_authority(key, where))
    return SpiffeBundle(
        x509_authorities=tuple(authorities),
        sequence=sequence,
        refresh_hint_seconds=refresh_hint,
    )


def _x509_authority(key: Mapping[str, Any], where: str) -> x509.Certificate:
    """The one certificate of an ``x509-svid`` key, checked against the key's parameters."""
    chain = key.get("x5c")
    # SPIFFE bundle §4.2.1: the x5c parameter holds exactly one certificate.
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        count = len(chain) if isinstance(chain, list) else "no"
        raise InvalidArgument(
            f"{where}: an x509-svid key needs 'x5c' with exactly one certificate, it has {count}"
        )
    try:
        # RFC 7517 §4.7: standard base64 (not base64url) of the DER certificate.
        der = base64.b64decode(chain[0], validate=True)
        certificate = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"{where}: 'x5c' is not a base64 DER certificate: {exc}") from None

    # RFC 7517 §4.7: the certificate's key must be the key the JWK's own parameters give.
    expected = _public_jwk(certificate)
    for name, value in expected.items():
        if key.get(name) != value:
            raise InvalidArgument(
                f"{where}: '{name}' does not match the public key of its certificate "
                f"({certificate.subject.rfc4514_string() or 'empty subject'})"
            )
    return certificate


def _public_jwk(certificate: x509.Certificate) -> dict[str, str]:
    """RFC 7518 §6: the JWK members of a certificate's public key (kty and its parameters)."""
    public_key = certificate.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for name, (curve, size) in _CURVES.items():
            if isinstance(public_key.curve, curve):
                numbers = public_key.public_numbers()
                return {
                    "kty": "EC",
                    "crv": name,
                    "x": _b64url(numbers.x.to_bytes(size, "big")),
                    "y": _b64url(numbers.y.to_bytes(size, "big")),
                }
        raise InvalidArgument(f"curve {public_key.curve.name} has no JWK name (RFC 7518 §6.2)")
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers_rsa = public_key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(_unsigned(numbers_rsa.n)),
            "e": _b64url(_unsigned(numbers_rsa.e)),
        }
    raise InvalidArgument(f"a {type(public_key).__name__} has no place in a SPIFFE bundle")


def _unsigned(value: int) -> bytes:
    # RFC 7518 §6.3.1: the shortest big-endian unsigned form.
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _b64url(raw: bytes) -> str:
    # RFC 7515 §2: base64url without padding.
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _optional_count(document: Mapping[str, Any], name: str, source: str) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{source}: '{name}' is not a whole number ≥ 0: {value!r}")
    return value
