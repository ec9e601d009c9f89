"""dmc_ca.profile: X.509-SVID leaves and authorities, field by field against SPEC §2."""

from __future__ import annotations

import functools
import ipaddress
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from dmc.errors import FailedPrecondition, InvalidArgument, InvalidSpiffeId, PermissionDenied
from dmc.scope import EMPTY_SCOPE, SCOPE_OID, DelegationScope, decode_scope
from dmc.spiffe_id import SpiffeId
from dmc_ca.keys import AllowedPrivateKey, KeyType, generate_private_key
from dmc_ca.profile import (
    BACKDATE,
    SigningAuthority,
    check_imported_authority,
    create_authority,
    issue_svid,
)

TRUST_DOMAIN = "example.org"
WORKLOAD = SpiffeId.parse("spiffe://example.org/workload/api")
NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
SCOPE = DelegationScope(
    permissions=("/pkg.Service/*",),
    audiences=("spiffe://example.org/backend/*",),
    max_depth=2,
)
LEAF_EXTENSIONS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    SCOPE_OID,
}
CURVES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}


@functools.cache
def _authority(key_type: KeyType) -> SigningAuthority:
    """A self-signed authority per key type, valid around NOW and around the real now."""
    certificate, key = create_authority(
        TRUST_DOMAIN, key_type, YEAR, datetime.now(UTC) - timedelta(days=30)
    )
    return SigningAuthority(private_key=key, certificate=certificate, chain=(certificate,))


@functools.cache
def _leaf_key(key_type: KeyType) -> AllowedPrivateKey:
    return generate_private_key(key_type)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _ca_certificate(
    subject: str,
    key: AllowedPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: AllowedPrivateKey,
    *,
    ca: bool = True,
    key_cert_sign: bool = True,
    path_length: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A CA certificate as an operator's PKI might hand one over for import."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + YEAR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _openssl_verify(
    tmp_path: Path,
    root: x509.Certificate,
    untrusted: list[x509.Certificate],
    leaf: x509.Certificate,
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "root.pem").write_bytes(_pem([root]))
    (tmp_path / "leaf.pem").write_bytes(_pem([leaf]))
    command = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem")]
    if untrusted:
        (tmp_path / "chain.pem").write_bytes(_pem(untrusted))
        command += ["-untrusted", str(tmp_path / "chain.pem")]
    return subprocess.run(
        [*command, str(tmp_path / "leaf.pem")], capture_output=True, text=True, check=False
    )


def _extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[Any]:
    return certificate.extensions.get_extension_for_oid(oid)


# -- leaves: SPEC §2 field by field --------------------------------------------------------


@pytest.mark.parametrize("leaf_type", list(KeyType), ids=str)
@pytest.mark.parametrize("authority_type", list(KeyType), ids=str)
def test_issue_svid_follows_spec_2_field_by_field(
    authority_type: KeyType, leaf_type: KeyType, tmp_path: Path
) -> None:
    authority = _authority(authority_type)
    leaf_key = _leaf_key(leaf_type)
    now = _now()

    leaf = issue_svid(authority, leaf_key.public_key(), WORKLOAD, SCOPE, 3600, now)

    assert leaf.version is x509.Version.v3
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == authority.certificate.subject
    assert leaf.public_key() == leaf_key.public_key()
    assert leaf.serial_number > 0
    assert leaf.serial_number.bit_length() > 64
    assert leaf.not_valid_before_utc == now - timedelta(seconds=30)
    assert leaf.not_valid_after_utc == now + timedelta(seconds=3600)
    assert {extension.oid for extension in leaf.extensions} == LEAF_EXTENSIONS
    assert len(leaf.extensions) == len(LEAF_EXTENSIONS)

    # X.509-SVID §2 and RFC 5280 §4.1.2.6: one URI SAN, critical as the subject is empty.
    san = _extension(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WORKLOAD))]

    constraints = _extension(leaf, ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)

    usage = _extension(leaf, ExtensionOID.KEY_USAGE)
    assert usage.critical
    is_rsa = isinstance(leaf_key, rsa.RSAPrivateKey)
    assert usage.value == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )

    eku = _extension(leaf, ExtensionOID.EXTENDED_KEY_USAGE)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    ski = _extension(leaf, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())

    aki = _extension(leaf, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    authority_ski = _extension(authority.certificate, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert not aki.critical
    assert aki.value.key_identifier == authority_ski.value.digest
    assert aki.value.authority_cert_issuer is None

    scope = _extension(leaf, SCOPE_OID)
    assert not scope.critical
    assert decode_scope(scope.value.value) == SCOPE

    leaf.verify_directly_issued_by(authority.certificate)
    expected_hash = hashes.SHA384 if authority_type is KeyType.EC_P384 else hashes.SHA256
    assert isinstance(leaf.signature_hash_algorithm, expected_hash)

    result = _openssl_verify(tmp_path, authority.certificate, [], leaf)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("leaf.pem: OK")


def test_issue_svid_serials_are_random_and_distinct() -> None:
    authority = _authority(KeyType.EC_P256)
    key = _leaf_key(KeyType.EC_P256).public_key()

    serials = [
        issue_svid(authority, key, WORKLOAD, EMPTY_SCOPE, 60, NOW).serial_number for _ in range(64)
    ]

    assert len(set(serials)) == len(serials)
    assert all(serial.bit_length() > 64 for serial in serials)


def test_issue_svid_backdates_exactly_30_seconds_and_drops_microseconds() -> None:
    authority = _authority(KeyType.EC_P256)
    now = datetime(2026, 12, 4, 12, 0, 0, 987654, tzinfo=UTC)

    leaf = issue_svid(
        authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, EMPTY_SCOPE, 60, now
    )

    assert timedelta(seconds=30) == BACKDATE
    assert leaf.not_valid_before_utc == datetime(2026, 12, 4, 11, 59, 30, tzinfo=UTC)
    assert leaf.not_valid_after_utc == datetime(2026, 12, 4, 12, 1, 0, tzinfo=UTC)


def test_issue_svid_adds_dns_and_ip_sans_after_the_one_uri() -> None:
    authority = _authority(KeyType.EC_P256)
    addresses = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

    leaf = issue_svid(
        authority,
        _leaf_key(KeyType.EC_P256).public_key(),
        WORKLOAD,
        SCOPE,
        60,
        NOW,
        dns_names=("api.example.org", "*.api.example.org"),
        ip_addresses=addresses,
    )

    san = _extension(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert list(san.value) == [
        x509.UniformResourceIdentifier(str(WORKLOAD)),
        x509.DNSName("api.example.org"),
        x509.DNSName("*.api.example.org"),
        x509.IPAddress(addresses[0]),
        x509.IPAddress(addresses[1]),
    ]
    assert len(san.value.get_values_for_type(x509.UniformResourceIdentifier)) == 1


@pytest.mark.parametrize(
    "name", ["API.example.org", "api..example.org", "-api.example.org", "a b.org", "a.*.org", ""]
)
def test_issue_svid_refuses_a_malformed_dns_name(name: str) -> None:
    authority = _authority(KeyType.EC_P256)

    with pytest.raises(InvalidArgument, match="is not a lower-case host name"):
        issue_svid(
            authority,
            _leaf_key(KeyType.EC_P256).public_key(),
            WORKLOAD,
            SCOPE,
            60,
            NOW,
            dns_names=(name,),
        )


def test_issue_svid_cuts_not_after_at_the_scope_end() -> None:
    authority = _authority(KeyType.EC_P256)
    end = NOW + timedelta(minutes=10)
    scope = DelegationScope(permissions=("*",), delegators=(str(WORKLOAD),), not_after=end)

    leaf = issue_svid(
        authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, scope, 3600, NOW
    )

    assert leaf.not_valid_after_utc == end


def test_issue_svid_refuses_once_the_delegation_has_ended() -> None:
    authority = _authority(KeyType.EC_P256)
    scope = DelegationScope(not_after=NOW)

    with pytest.raises(PermissionDenied, match="the delegation ended"):
        issue_svid(authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, scope, 60, NOW)


def test_issue_svid_cuts_not_after_at_the_authority_end() -> None:
    authority = _authority(KeyType.EC_P256)
    end = authority.certificate.not_valid_after_utc
    now = end - timedelta(minutes=5)

    leaf = issue_svid(
        authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, EMPTY_SCOPE, 3600, now
    )

    assert leaf.not_valid_after_utc == end


def test_issue_svid_cuts_not_after_at_the_end_of_an_imported_chain() -> None:
    root_key = generate_private_key(KeyType.EC_P256)
    root_end = _now() + timedelta(hours=2)
    root = _ca_certificate("root", root_key, None, root_key, not_after=root_end)
    key = generate_private_key(KeyType.EC_P256)
    intermediate = _ca_certificate("intermediate", key, root, root_key)
    authority = check_imported_authority([intermediate, root], key, _now())

    leaf = issue_svid(
        authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, EMPTY_SCOPE, 86400, _now()
    )

    assert leaf.not_valid_after_utc == root_end.replace(microsecond=0)


def test_issue_svid_refuses_with_an_expired_authority() -> None:
    authority = _authority(KeyType.EC_P256)
    later = authority.certificate.not_valid_after_utc + timedelta(seconds=1)

    with pytest.raises(FailedPrecondition, match="the signing authority expired"):
        issue_svid(
            authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, EMPTY_SCOPE, 60, later
        )


@pytest.mark.parametrize("ttl_seconds", [0, -1])
def test_issue_svid_refuses_a_ttl_that_is_not_positive(ttl_seconds: int) -> None:
    with pytest.raises(InvalidArgument, match="TTL must be positive"):
        issue_svid(
            _authority(KeyType.EC_P256),
            _leaf_key(KeyType.EC_P256).public_key(),
            WORKLOAD,
            EMPTY_SCOPE,
            ttl_seconds,
            NOW,
        )


def test_issue_svid_refuses_a_key_type_spec_2_does_not_allow() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()

    with pytest.raises(InvalidArgument, match="Ed25519 keys are not allowed"):
        issue_svid(_authority(KeyType.EC_P256), key, WORKLOAD, EMPTY_SCOPE, 60, NOW)


def test_issue_svid_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_svid(
            _authority(KeyType.EC_P256),
            _leaf_key(KeyType.EC_P256).public_key(),
            WORKLOAD,
            EMPTY_SCOPE,
            60,
            datetime(2026, 12, 4, 12, 0, 0),
        )


def test_issue_svid_through_an_intermediate_verifies_with_openssl(tmp_path: Path) -> None:
    root_key = generate_private_key(KeyType.RSA_3072)
    root = _ca_certificate("Example Root", root_key, None, root_key)
    key = generate_private_key(KeyType.EC_P384)
    intermediate = _ca_certificate("Example Intermediate", key, root, root_key, path_length=0)
    authority = check_imported_authority([intermediate, root], key, _now())

    leaf = issue_svid(
        authority, _leaf_key(KeyType.EC_P256).public_key(), WORKLOAD, SCOPE, 3600, _now()
    )

    chain = authority.svid_chain(leaf)
    assert chain == (leaf, intermediate)
    assert authority.root == root
    result = _openssl_verify(tmp_path, root, list(chain[1:]), leaf)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the intermediate the leaf does not chain: the test can fail.
    alone = _openssl_verify(tmp_path, root, [], leaf)
    assert alone.returncode != 0


# -- RFC 5280 §4.1.2.6 and cases/008 --------------------------------------------------------


def _empty_subject_san_conforms(certificate: x509.Certificate) -> bool:
    """RFC 5280 §4.1.2.6: with an empty subject the SAN extension must be critical."""
    san = _extension(certificate, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return len(certificate.subject) > 0 or san.critical


def test_san_criticality_check_flags_the_case_008_reference_leaves(tmp_path: Path) -> None:
    # The reference leaves are rebuilt by the case's own generator.
    gen = Path(__file__).parent / "cases" / "008-empty-subject-san-not-critical" / "gen.py"
    subprocess.run([sys.executable, str(gen), "--out", str(tmp_path)], check=True)

    def load(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((tmp_path / name).read_bytes())

    assert not _empty_subject_san_conforms(load("leaf-empty-subject-san-noncritical.pem"))
    assert _empty_subject_san_conforms(load("leaf-empty-subject-san-critical.pem"))


@pytest.mark.parametrize("authority_type", [KeyType.EC_P256, KeyType.RSA_2048], ids=str)
def test_every_issued_leaf_marks_its_san_critical(authority_type: KeyType) -> None:
    leaf = issue_svid(
        _authority(authority_type),
        _leaf_key(KeyType.EC_P256).public_key(),
        WORKLOAD,
        EMPTY_SCOPE,
        60,
        NOW,
        dns_names=("api.example.org",),
    )

    assert leaf.subject == x509.Name([])
    assert _empty_subject_san_conforms(leaf)


# -- authorities dmc creates ---------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_create_authority_follows_spec_2(key_type: KeyType, tmp_path: Path) -> None:
    certificate, key = create_authority(TRUST_DOMAIN, key_type, YEAR, NOW)

    assert certificate.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmc"),
            x509.NameAttribute(NameOID.COMMON_NAME, TRUST_DOMAIN),
        ]
    )
    assert certificate.issuer == certificate.subject
    assert certificate.public_key() == key.public_key()
    assert certificate.serial_number.bit_length() > 64
    assert certificate.not_valid_before_utc == NOW - timedelta(seconds=30)
    assert certificate.not_valid_after_utc == NOW + YEAR
    if key_type in CURVES:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == CURVES[key_type]
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == int(key_type.value.removeprefix("rsa-"))

    constraints = _extension(certificate, ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical
    assert constraints.value.ca
    usage = _extension(certificate, ExtensionOID.KEY_USAGE)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    san = _extension(certificate, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://example.org")]
    ski = _extension(certificate, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = _extension(certificate, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    assert aki.value.key_identifier == ski.value.digest
    assert len(certificate.extensions) == 5
    certificate.verify_directly_issued_by(certificate)


def test_create_authority_leaves_out_a_common_name_longer_than_64() -> None:
    trust_domain = "a" * 60 + ".example.org"

    certificate, _ = create_authority(trust_domain, KeyType.EC_P256, YEAR, NOW)

    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmc")])
    san = _extension(certificate, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert list(san.value) == [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]


@pytest.mark.parametrize("trust_domain", ["Example.org", "example.org:443", ""])
def test_create_authority_refuses_an_invalid_trust_domain(trust_domain: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        create_authority(trust_domain, KeyType.EC_P256, YEAR, NOW)


def test_create_authority_refuses_a_ttl_that_is_not_positive() -> None:
    with pytest.raises(InvalidArgument, match="TTL must be positive"):
        create_authority(TRUST_DOMAIN, KeyType.EC_P256, timedelta(0), NOW)


def test_signing_authority_chain_starts_with_its_certificate() -> None:
    authority = _authority(KeyType.EC_P256)
    other = _authority(KeyType.EC_P384)

    with pytest.raises(InvalidArgument, match="must start with its own certificate"):
        SigningAuthority(authority.private_key, authority.certificate, (other.certificate,))
    with pytest.raises(InvalidArgument):
        SigningAuthority(authority.private_key, authority.certificate, ())


# -- imported authorities ------------------------------------------------------------------


def test_check_imported_authority_accepts_a_created_root() -> None:
    certificate, key = create_authority(TRUST_DOMAIN, KeyType.EC_P256, YEAR, _now())

    authority = check_imported_authority([certificate], key, _now())

    assert authority.chain == (certificate,)
    assert authority.svid_chain(certificate) == (certificate,)


def _imported(
    **intermediate_options: Any,
) -> tuple[x509.Certificate, x509.Certificate, AllowedPrivateKey, AllowedPrivateKey]:
    root_key = generate_private_key(KeyType.EC_P256)
    root = _ca_certificate("Example Root", root_key, None, root_key)
    key = generate_private_key(KeyType.EC_P256)
    intermediate = _ca_certificate(
        "Example Intermediate",
        key,
        root,
        root_key,
        **intermediate_options,
    )
    return intermediate, root, key, root_key


def test_check_imported_authority_accepts_an_intermediate_with_its_root() -> None:
    intermediate, root, key, _ = _imported()

    authority = check_imported_authority([intermediate, root], key, _now())

    assert authority.certificate == intermediate
    assert authority.chain == (intermediate, root)
    assert authority.root == root


def test_check_imported_authority_refuses_a_key_that_does_not_match() -> None:
    intermediate, root, _, root_key = _imported()

    with pytest.raises(InvalidArgument, match="key does not match the CA certificate"):
        check_imported_authority([intermediate, root], root_key, _now())


def test_check_imported_authority_refuses_an_expired_certificate() -> None:
    now = _now()
    intermediate, root, key, _ = _imported(
        not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )

    with pytest.raises(InvalidArgument, match="Example Intermediate' expired at"):
        check_imported_authority([intermediate, root], key, now)


def test_check_imported_authority_refuses_a_certificate_not_yet_valid() -> None:
    now = _now()
    intermediate, root, key, _ = _imported(not_before=now + timedelta(days=1))

    with pytest.raises(InvalidArgument, match="is not valid before"):
        check_imported_authority([intermediate, root], key, now)


def test_check_imported_authority_refuses_a_certificate_without_key_cert_sign() -> None:
    intermediate, root, key, _ = _imported(key_cert_sign=False)

    with pytest.raises(InvalidArgument, match="no keyCertSign"):
        check_imported_authority([intermediate, root], key, _now())


def test_check_imported_authority_refuses_a_certificate_that_is_no_ca() -> None:
    intermediate, root, key, _ = _imported(ca=False)

    with pytest.raises(InvalidArgument, match="is not a CA"):
        check_imported_authority([intermediate, root], key, _now())


def test_check_imported_authority_refuses_a_chain_without_its_root() -> None:
    intermediate, _, key, _ = _imported()

    with pytest.raises(InvalidArgument, match="must end in a self-signed root"):
        check_imported_authority([intermediate], key, _now())


def test_check_imported_authority_refuses_a_link_that_does_not_verify() -> None:
    intermediate, _, key, _ = _imported()
    # Another root with the same name: the names chain, the signature does not.
    stranger_key = generate_private_key(KeyType.EC_P256)
    stranger = _ca_certificate("Example Root", stranger_key, None, stranger_key)

    with pytest.raises(InvalidArgument, match="the imported chain is broken"):
        check_imported_authority([intermediate, stranger], key, _now())


def test_check_imported_authority_refuses_a_root_that_forbids_intermediates() -> None:
    root_key = generate_private_key(KeyType.EC_P256)
    root = _ca_certificate("Example Root", root_key, None, root_key, path_length=0)
    middle_key = generate_private_key(KeyType.EC_P256)
    middle = _ca_certificate("Middle", middle_key, root, root_key)
    key = generate_private_key(KeyType.EC_P256)
    signing = _ca_certificate("Signing", key, middle, middle_key)

    with pytest.raises(InvalidArgument, match="allows 0 CA certificates below it"):
        check_imported_authority([signing, middle, root], key, _now())


def test_check_imported_authority_refuses_a_key_type_spec_2_does_not_allow() -> None:
    intermediate, root, _, _ = _imported()

    with pytest.raises(InvalidArgument, match="Ed25519 keys are not allowed"):
        check_imported_authority(
            [intermediate, root], ed25519.Ed25519PrivateKey.generate(), _now()
        )


def test_check_imported_authority_refuses_an_empty_chain() -> None:
    with pytest.raises(InvalidArgument, match="holds no certificate"):
        check_imported_authority([], generate_private_key(KeyType.EC_P256), _now())
