"""dmc_ca.csr: the CSR policy of SPEC §4, driven by cases/001-004, 006 and 008."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from dmc.errors import InvalidArgument, InvalidCsr, PermissionDenied
from dmc.spiffe_id import SpiffeId
from dmc_ca.csr import MAX_CSR_BYTES, check_csr
from dmc_ca.keys import ALLOWED_KEYS

CASES = Path(__file__).parent / "cases"
CASE_ID = SpiffeId.parse("spiffe://example.org/workload/api")
OTHER_ID = SpiffeId.parse("spiffe://example.org/workload/other")


def _case_der(relative: str) -> bytes:
    pem = (CASES / relative).read_bytes()
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _csr(
    names: list[x509.GeneralName] | None = None,
    *,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
    subject: x509.Name | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


def _key_usage(*, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# -- the case files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    [
        "001-csr-signature-mismatch/csr-ok.pem",
        "002-csr-requests-ca-powers/csr-ca-false-ok.pem",
        "003-csr-extra-subject-alt-names/csr-one-uri-ok.pem",
        "004-csr-weak-or-unsupported-key/csr-accept-ec-p256.pem",
        "004-csr-weak-or-unsupported-key/csr-accept-ec-p384.pem",
        "004-csr-weak-or-unsupported-key/csr-accept-rsa-2048.pem",
        "008-empty-subject-san-not-critical/csr-empty-subject.pem",
    ],
)
def test_check_csr_accepts_sound_case_csrs_and_returns_their_key(relative: str) -> None:
    der = _case_der(relative)

    public_key = check_csr(der, CASE_ID)

    assert public_key == x509.load_der_x509_csr(der).public_key()


@pytest.mark.parametrize(
    "name",
    ["csr-signature-bit-flipped.pem", "csr-key-swapped.pem", "csr-algorithm-relabelled.pem"],
)
def test_check_csr_refuses_case_001_signatures_that_do_not_verify(name: str) -> None:
    der = _case_der(f"001-csr-signature-mismatch/{name}")

    with pytest.raises(InvalidCsr, match="CSR signature does not verify"):
        check_csr(der, CASE_ID)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("csr-ca-true.pem", ["CA:TRUE", "keyCertSign", "cRLSign"]),
        ("csr-leaf-with-keycertsign.pem", ["keyCertSign"]),
        ("csr-crlsign.pem", ["cRLSign"]),
    ],
)
def test_check_csr_refuses_case_002_ca_powers_naming_them(name: str, words: list[str]) -> None:
    der = _case_der(f"002-csr-requests-ca-powers/{name}")

    with pytest.raises(InvalidCsr, match="requests CA powers") as caught:
        check_csr(der, CASE_ID)

    for word in words:
        assert word in str(caught.value)
    if name != "csr-ca-true.pem":
        assert "CA:TRUE" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("csr-two-spiffe-ids.pem", ["URI spiffe://example.org/admin"]),
        ("csr-https-uri-first.pem", ["URI https://inventory.example.org/host/42"]),
        ("csr-uri-plus-dns.pem", ["DNS name api.internal.example.org"]),
        (
            "csr-uri-plus-ip-and-email.pem",
            ["IP address 10.0.0.7", "e-mail address ops@example.org"],
        ),
    ],
)
def test_check_csr_refuses_case_003_extra_names_by_type_and_value(
    name: str, words: list[str]
) -> None:
    der = _case_der(f"003-csr-extra-subject-alt-names/{name}")

    with pytest.raises(InvalidCsr) as caught:
        check_csr(der, CASE_ID)

    message = str(caught.value)
    for word in words:
        assert word in message
    # The caller's own ID is the kept one, not named as the extra.
    assert "besides spiffe://example.org/workload/api" in message


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("csr-reject-rsa-1024.pem", "RSA key of 1024 bits; minimum is 2048"),
        ("csr-reject-rsa-2047.pem", "RSA key of 2047 bits; minimum is 2048"),
        ("csr-reject-ec-secp256k1.pem", "EC key on curve secp256k1 (256 bits)"),
        ("csr-reject-ec-p192.pem", "EC key on curve secp192r1 (192 bits)"),
        ("csr-reject-ed25519.pem", "Ed25519 keys are not allowed: gRPC's TLS cannot use them"),
        ("csr-reject-ed448.pem", "Ed448 keys are not allowed"),
        ("csr-reject-dsa-2048.pem", "DSA key of 2048 bits is not allowed"),
    ],
)
def test_check_csr_refuses_case_004_keys_naming_type_size_and_allowed_set(
    name: str, words: str
) -> None:
    der = _case_der(f"004-csr-weak-or-unsupported-key/{name}")

    with pytest.raises(InvalidCsr) as caught:
        check_csr(der, CASE_ID)

    assert words in str(caught.value)
    assert ALLOWED_KEYS in str(caught.value)


def test_check_csr_refuses_case_006_dot_dot_segment() -> None:
    der = _case_der("006-spiffe-id-path-grammar/csr-uri-dot-dot-segment.pem")
    # Were the path normalised, this would be the ID the CSR smuggles in.
    admin = SpiffeId.parse("spiffe://example.org/admin")

    for target in (CASE_ID, admin):
        with pytest.raises(InvalidCsr, match=re.escape("segment '..'")) as caught:
            check_csr(der, target)
        assert "spiffe://example.org/workload/../admin" in str(caught.value)


def _id_table() -> list[tuple[str, str, str]]:
    table = CASES / "006-spiffe-id-path-grammar" / "spiffe-ids.txt"
    rows = []
    for line in table.read_text(encoding="utf-8").splitlines():
        if line.strip():
            verdict, text, *part = line.split("\t")
            rows.append((verdict, text, part[0] if part else ""))
    return rows


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) < 50 else text[:40] + "..."


@pytest.mark.parametrize("text", [row[1] for row in _id_table() if row[0] == "valid"], ids=_short)
def test_check_csr_accepts_every_valid_table_id_as_uri_san(text: str) -> None:
    spiffe_id = SpiffeId.parse(text)

    check_csr(_csr([_uri(text)]), spiffe_id)

    with pytest.raises(PermissionDenied):
        check_csr(_csr([_uri(text)]), OTHER_ID)


@pytest.mark.parametrize(
    ("text", "part"),
    [(row[1], row[2]) for row in _id_table() if row[0] == "invalid"],
    ids=_short,
)
def test_check_csr_refuses_every_invalid_table_id_naming_the_part(text: str, part: str) -> None:
    with pytest.raises(InvalidCsr, match="is not a valid SPIFFE ID") as caught:
        check_csr(_csr([_uri(text)]), CASE_ID)

    message = str(caught.value)
    assert any(alternative in message for alternative in part.split(" / "))
    # A hostile value is echoed, but never at full length.
    assert len(message) < 600


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("der", "words"),
    [
        (b"", "the CSR is empty"),
        (b"\x00\x01garbage\xff" * 8, "does not parse as DER"),
        (b"0\x82\x01\x00abc", "does not parse as DER"),
    ],
    ids=["empty", "garbage", "truncated-sequence"],
)
def test_check_csr_refuses_bytes_that_are_no_der_csr(der: bytes, words: str) -> None:
    with pytest.raises(InvalidCsr, match=words):
        check_csr(der, CASE_ID)


def test_check_csr_refuses_pem_saying_der_was_expected() -> None:
    pem = (CASES / "001-csr-signature-mismatch/csr-ok.pem").read_bytes()

    with pytest.raises(InvalidCsr, match="the CSR is PEM; expected DER"):
        check_csr(pem, CASE_ID)


def test_check_csr_refuses_trailing_bytes_after_the_der() -> None:
    der = _csr([_uri(str(CASE_ID))])

    with pytest.raises(InvalidCsr, match="does not parse as DER"):
        check_csr(der + b"\x00", CASE_ID)


def test_check_csr_refuses_a_cut_off_der() -> None:
    der = _csr([_uri(str(CASE_ID))])

    with pytest.raises(InvalidCsr, match="does not parse as DER"):
        check_csr(der[:-10], CASE_ID)


# -- the SAN ----------------------------------------------------------------------------------


def test_check_csr_accepts_no_san_and_an_empty_subject() -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    assert check_csr(_csr(None, key=key), CASE_ID) == key.public_key()


def test_check_csr_ignores_the_subject() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin.example.org")])

    check_csr(_csr([_uri(str(CASE_ID))], subject=subject), CASE_ID)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (x509.DNSName("api.example.org"), "DNS name api.example.org"),
        (x509.IPAddress(ipaddress.ip_address("2001:db8::1")), "IP address 2001:db8::1"),
        (x509.RFC822Name("ops@example.org"), "e-mail address ops@example.org"),
        (x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01a"), "other name"),
        (
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])),
            "directory name CN=x",
        ),
        (x509.RegisteredID(ObjectIdentifier("1.2.3.4")), "registered ID 1.2.3.4"),
        (_uri("spiffe://example.org/admin"), "URI spiffe://example.org/admin"),
    ],
    ids=["dns", "ip", "email", "other", "directory", "registered", "second-uri"],
)
@pytest.mark.parametrize("position", ["before", "after"])
def test_check_csr_refuses_any_extra_name_wherever_it_sits(
    extra: x509.GeneralName, words: str, position: str
) -> None:
    own = _uri(str(CASE_ID))
    names = [extra, own] if position == "before" else [own, extra]

    with pytest.raises(InvalidCsr) as caught:
        check_csr(_csr(names), CASE_ID)

    assert words in str(caught.value)
    assert f"besides {CASE_ID}" in str(caught.value)


def test_check_csr_refuses_names_without_any_uri() -> None:
    with pytest.raises(InvalidCsr, match=re.escape("it holds DNS name api.example.org")):
        check_csr(_csr([x509.DNSName("api.example.org")]), CASE_ID)


def test_check_csr_refuses_a_lone_uri_that_is_no_spiffe_id() -> None:
    with pytest.raises(
        InvalidCsr, match=re.escape("https://example.org/x is not a valid SPIFFE ID")
    ):
        check_csr(_csr([_uri("https://example.org/x")]), CASE_ID)


def test_check_csr_escapes_control_characters_in_names() -> None:
    with pytest.raises(InvalidCsr) as caught:
        check_csr(_csr([_uri(str(CASE_ID)), x509.DNSName("a\nb.example.org")]), CASE_ID)

    assert "\n" not in str(caught.value)
    assert "a\\nb.example.org" in str(caught.value)


# -- other extensions -------------------------------------------------------------------------


def test_check_csr_ignores_extension_requests_other_than_ca_powers() -> None:
    extensions: list[x509.ExtensionType] = [
        x509.BasicConstraints(ca=False, path_length=None),
        _key_usage(),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
        x509.OCSPNoCheck(),
    ]

    check_csr(_csr([_uri(str(CASE_ID))], extensions=extensions), CASE_ID)


# -- the identity -----------------------------------------------------------------------------


def test_check_csr_for_another_id_is_permission_denied_naming_both() -> None:
    der = _case_der("003-csr-extra-subject-alt-names/csr-one-uri-ok.pem")

    with pytest.raises(PermissionDenied) as caught:
        check_csr(der, OTHER_ID)

    assert str(CASE_ID) in str(caught.value)
    assert str(OTHER_ID) in str(caught.value)
    assert not isinstance(caught.value, InvalidArgument)


def test_check_csr_for_another_trust_domain_is_permission_denied() -> None:
    der = _csr([_uri("spiffe://other.org/workload/api")])

    with pytest.raises(PermissionDenied, match=re.escape("spiffe://other.org/workload/api")):
        check_csr(der, CASE_ID)


def test_check_csr_compares_ids_exactly_without_normalising() -> None:
    der = _csr([_uri("spiffe://example.org/Workload/api")])

    with pytest.raises(PermissionDenied):
        check_csr(der, CASE_ID)


# -- the order of SPEC §4 ----------------------------------------------------------------------


def _bit_flipped(der: bytes) -> bytes:
    flipped = bytearray(der)
    flipped[-1] ^= 0x01
    return bytes(flipped)


def test_check_csr_checks_the_signature_before_anything_else() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = _csr(
        [_uri("spiffe://example.org/admin"), x509.DNSName("api.example.org")],
        key=weak,
        extensions=[x509.BasicConstraints(ca=True, path_length=None)],
    )

    with pytest.raises(InvalidCsr, match="signature does not verify"):
        check_csr(_bit_flipped(der), CASE_ID)


def test_check_csr_checks_the_key_before_the_san() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = _csr([_uri("spiffe://example.org/a/../b")], key=weak)

    with pytest.raises(InvalidCsr, match="RSA key of 1024 bits"):
        check_csr(der, CASE_ID)


def test_check_csr_checks_the_san_before_ca_powers() -> None:
    der = _csr(
        [_uri(str(CASE_ID)), x509.DNSName("api.example.org")],
        extensions=[x509.BasicConstraints(ca=True, path_length=None)],
    )

    with pytest.raises(InvalidCsr, match=re.escape("DNS name api.example.org")):
        check_csr(der, CASE_ID)


def test_check_csr_checks_ca_powers_before_the_identity() -> None:
    der = _csr(
        [_uri(str(OTHER_ID))],
        extensions=[_key_usage(key_cert_sign=True)],
    )

    with pytest.raises(InvalidCsr, match="keyCertSign"):
        check_csr(der, CASE_ID)


def test_check_csr_refuses_an_invalid_id_as_malformed_not_as_another_identity() -> None:
    der = _csr([_uri("spiffe://example.org/workload//api")])

    with pytest.raises(InvalidCsr, match="empty segment"):
        check_csr(der, CASE_ID)


def test_oversized_csr_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidCsr, match="at most 16384 are accepted"):
        check_csr(b"\x30" + b"\x00" * (MAX_CSR_BYTES + 1), CASE_ID)
