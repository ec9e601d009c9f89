"""Key types dmc issues for and signs with, and the check every public key passes (SPEC §2).

Workloads and authorities use ECDSA P-256 (the default), ECDSA P-384 or RSA of 2048 bits
and more. Ed25519 is refused although it is a sound key: gRPC's TLS stack fails the
handshake with an Ed25519 client or server certificate, so its holder could never renew.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from dmc.errors import InvalidArgument, InvalidCsr

__all__ = [
    "ALLOWED_KEYS",
    "AllowedPrivateKey",
    "AllowedPublicKey",
    "KeyType",
    "check_public_key",
    "generate_private_key",
    "signature_hash",
]

AllowedPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
AllowedPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# The words every refusal ends with, so that the caller learns what would be accepted.
ALLOWED_KEYS = "ECDSA P-256, ECDSA P-384, RSA >= 2048 bits"

_RSA_MIN_BITS = 2048
# BoringSSL (gRPC, Envoy) refuses RSA moduli above 16384 bits.
_RSA_MAX_BITS = 16384
_CURVES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384"}


class KeyType(enum.StrEnum):
    """A key type that ``dmc-ca init --key-type`` and the workloads may choose."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Return the key type named ``text``; `InvalidArgument` lists the choices."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise InvalidArgument(f"unknown key type {text!r}; choose one of {choices}") from None


DEFAULT_KEY_TYPE = KeyType.EC_P256


def generate_private_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> AllowedPrivateKey:
    """Generate a fresh private key of ``key_type``."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048 | KeyType.RSA_3072 | KeyType.RSA_4096:
            bits = int(key_type.value.removeprefix("rsa-"))
            return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def check_public_key(
    key: PublicKeyTypes, error: type[InvalidArgument] = InvalidCsr
) -> AllowedPublicKey:
    """Return ``key`` if SPEC §2 allows its type and size; raise ``error`` naming both if not.

    The message names the key's type and size and the allowed set, for example
    "RSA key of 1024 bits; minimum is 2048; allowed: ...". CSR checks raise `InvalidCsr`
    (the default); other callers pass the `InvalidArgument` class that fits them.
    """
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < _RSA_MIN_BITS:
            raise error(
                f"RSA key of {bits} bits; minimum is {_RSA_MIN_BITS}; allowed: {ALLOWED_KEYS}"
            )
        if bits > _RSA_MAX_BITS:
            raise error(
                f"RSA key of {bits} bits; maximum is {_RSA_MAX_BITS}, the most BoringSSL accepts;"
                f" allowed: {ALLOWED_KEYS}"
            )
        if bits % 8:
            raise error(
                f"RSA key of {bits} bits; the size must be a whole number of bytes;"
                f" allowed: {ALLOWED_KEYS}"
            )
        return key

    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in _CURVES:
            return key
        raise error(
            f"EC key on curve {key.curve.name} ({key.curve.key_size} bits);"
            f" allowed: {ALLOWED_KEYS}"
        )

    raise error(f"{_describe_other(key)} not allowed{_reason(key)}; allowed: {ALLOWED_KEYS}")


def signature_hash(key: AllowedPrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The hash to sign with ``key``: SHA-384 for P-384, SHA-256 otherwise (RFC 5480 §4)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _describe_other(key: PublicKeyTypes) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519 keys are"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448 keys are"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA key of {key.key_size} bits is"
    if isinstance(key, x25519.X25519PublicKey):
        return "X25519 keys are"
    if isinstance(key, x448.X448PublicKey):
        return "X448 keys are"
    return f"{type(key).__name__} keys are"


def _reason(key: PublicKeyTypes) -> str:
    # DEPENDENCIES.md: an Ed25519 client or server certificate fails gRPC's TLS handshake.
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ": gRPC's TLS cannot use them"
    return ""
