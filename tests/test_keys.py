"""dmc_ca.keys: the key types of SPEC §2 and the check every public key passes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from dmc.errors import InvalidArgument, InvalidCsr
from dmc_ca.keys import (
    ALLOWED_KEYS,
    KeyType,
    check_public_key,
    generate_private_key,
    signature_hash,
)


@pytest.mark.parametrize(
    ("key_type", "curve", "rsa_bits"),
    [
        (KeyType.EC_P256, "secp256r1", None),
        (KeyType.EC_P384, "secp384r1", None),
        (KeyType.RSA_2048, None, 2048),
        (KeyType.RSA_3072, None, 3072),
        (KeyType.RSA_4096, None, 4096),
    ],
)
def test_generate_private_key_makes_the_named_type(
    key_type: KeyType, curve: str | None, rsa_bits: int | None
) -> None:
    key = generate_private_key(key_type)

    if curve is not None:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == curve
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == rsa_bits
        assert key.public_key().public_numbers().e == 65537
    assert check_public_key(key.public_key()) == key.public_key()


def test_default_key_type_is_ec_p256() -> None:
    key = generate_private_key()

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_key_type_values_are_the_cli_names() -> None:
    assert [member.value for member in KeyType] == [
        "ec-p256",
        "ec-p384",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
    ]
    assert KeyType.parse("rsa-3072") is KeyType.RSA_3072


def test_key_type_parse_lists_the_choices() -> None:
    with pytest.raises(
        InvalidArgument, match=r"unknown key type 'ed25519'; choose one of ec-p256"
    ):
        KeyType.parse("ed25519")


def _rsa_public(bits: int) -> PublicKeyTypes:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()


@pytest.mark.parametrize(
    ("make_key", "words"),
    [
        (lambda: _rsa_public(1024), "RSA key of 1024 bits; minimum is 2048"),
        (lambda: _rsa_public(2047), "RSA key of 2047 bits; minimum is 2048"),
        (
            # OpenSSL rounds generated sizes to whole bytes; a modulus from numbers does not.
            lambda: rsa.RSAPublicNumbers(65537, (1 << 2056) + 12345).public_key(),
            "RSA key of 2057 bits; the size must be a whole number",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP256K1()).public_key(),
            "EC key on curve secp256k1 (256 bits)",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP192R1()).public_key(),
            "EC key on curve secp192r1 (192 bits)",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP521R1()).public_key(),
            "EC key on curve secp521r1 (521 bits)",
        ),
        (
            lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
            "Ed25519 keys are not allowed: gRPC's TLS cannot use them",
        ),
        (lambda: ed448.Ed448PrivateKey.generate().public_key(), "Ed448 keys are not allowed"),
        (
            lambda: dsa.generate_private_key(key_size=2048).public_key(),
            "DSA key of 2048 bits is not allowed",
        ),
    ],
    ids=[
        "rsa-1024",
        "rsa-2047",
        "rsa-2057",
        "secp256k1",
        "p192",
        "p521",
        "ed25519",
        "ed448",
        "dsa",
    ],
)
def test_check_public_key_refuses_naming_type_size_and_allowed_set(
    make_key: Callable[[], PublicKeyTypes], words: str
) -> None:
    with pytest.raises(InvalidCsr) as caught:
        check_public_key(make_key())

    assert words in str(caught.value)
    assert str(caught.value).endswith(f"allowed: {ALLOWED_KEYS}")
    assert ALLOWED_KEYS == "ECDSA P-256, ECDSA P-384, RSA >= 2048 bits"


def test_check_public_key_raises_the_error_class_asked_for() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()

    with pytest.raises(InvalidArgument) as caught:
        check_public_key(key, InvalidArgument)

    assert type(caught.value) is InvalidArgument


def test_check_public_key_accepts_rsa_sizes_between_the_usual_ones() -> None:
    key = _rsa_public(2304)

    assert check_public_key(key) is key


def test_signature_hash_matches_the_key_strength() -> None:
    assert isinstance(signature_hash(generate_private_key(KeyType.EC_P256)), hashes.SHA256)
    assert isinstance(signature_hash(generate_private_key(KeyType.EC_P384)), hashes.SHA384)
    assert isinstance(signature_hash(generate_private_key(KeyType.RSA_2048)), hashes.SHA256)
