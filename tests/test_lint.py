"""Every certificate the profile issues passes pkilint's RFC 5280 linters.

The linters are built exactly as pkilint's ``lint_pkix_cert`` and
``lint_pkix_signer_signee_cert_chain`` commands build them, and run in-process on the DER.
Every finding, down to INFO, fails the test unless the allow-list below names it and why.
"""

from __future__ import annotations

import functools
import ipaddress
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from pkilint import loader, validation
from pkilint.bin import lint_pkix_signer_signee_cert_chain as chain_linter
from pkilint.pkix import certificate, extension, name

from dmc.scope import DelegationScope
from dmc.spiffe_id import SpiffeId
from dmc_ca.keys import AllowedPrivateKey, KeyType, generate_private_key
from dmc_ca.profile import SigningAuthority, check_imported_authority, create_authority, issue_svid

WORKLOAD = SpiffeId.parse("spiffe://example.org/workload/api")
YEAR = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    code: str
    node_path: str
    message: str


@dataclass(frozen=True, slots=True)
class Tolerated:
    """A finding the profile accepts on purpose, and the reason."""

    code: str
    severity: str
    message_prefix: str
    reason: str

    def covers(self, finding: Finding) -> bool:
        return (
            finding.code == self.code
            and finding.severity == self.severity
            and finding.message.startswith(self.message_prefix)
        )


ALLOW_LIST = (
    Tolerated(
        code="pkix.invalid_uri_syntax",
        severity="ERROR",
        # Only SPIFFE IDs: any other URI with this finding still fails.
        message_prefix='Invalid URI syntax: "spiffe://',
        reason=(
            "pkilint's URI grammar refuses every spiffe:// URI, although SPIFFE IDs are valid"
            " RFC 3986 URIs (DEPENDENCIES.md); X.509-SVID §2 requires one as the URI SAN"
        ),
    ),
    Tolerated(
        code="pkix.subject_key_identifier_method_1_identified",
        severity="INFO",
        message_prefix="",
        reason=(
            "a note, not a defect: the subject key identifier is the SHA-1 of the key as in"
            " RFC 5280 §4.2.1.2 method 1, which is what the profile means to do"
        ),
    ),
)


@functools.cache
def _certificate_linter() -> validation.ValidatorContainer:
    """pkilint's RFC 5280 certificate linter, as ``lint_pkix_cert`` builds it."""
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def _findings(results: list[validation.ValidationResult]) -> list[Finding]:
    return [
        Finding(
            severity=description.finding.severity.name,
            code=description.finding.code,
            node_path=result.node.path,
            message=description.message or "",
        )
        for result in results
        for description in result.finding_descriptions
    ]


def _lint(cert: x509.Certificate) -> list[Finding]:
    der = cert.public_bytes(serialization.Encoding.DER)
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    return _findings(_certificate_linter().validate(document.root))


def _lint_pair(issuer: x509.Certificate, subject: x509.Certificate) -> list[Finding]:
    """pkilint's issuer/subject linter: name chaining, key identifiers, the signature."""
    documents: dict[str, object] = {}
    load = loader.RFC5280CertificateDocumentLoader().load_der_document
    for role, cert in (("issuer", issuer), ("subject", subject)):
        der = cert.public_bytes(serialization.Encoding.DER)
        documents[role] = load(der, role, role, documents)
    issuer_root = documents["issuer"].root  # type: ignore[attr-defined]
    subject_root = documents["subject"].root  # type: ignore[attr-defined]

    decoding = chain_linter.create_decoder_validation_container()
    results = decoding.validate(issuer_root) + decoding.validate(subject_root)
    results += chain_linter.create_issuer_validation_container().validate(issuer_root)
    results += chain_linter.create_subject_validation_container().validate(subject_root)
    return _findings(results)


def _untolerated(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not any(allowed.covers(f) for allowed in ALLOW_LIST)]


@functools.cache
def _authority(key_type: KeyType) -> SigningAuthority:
    certificate, key = create_authority("example.org", key_type, YEAR, datetime.now(UTC))
    return SigningAuthority(private_key=key, certificate=certificate, chain=(certificate,))


@functools.cache
def _leaf_key(key_type: KeyType) -> AllowedPrivateKey:
    return generate_private_key(key_type)


def _issue(authority: SigningAuthority, leaf_type: KeyType, with_dns: bool) -> x509.Certificate:
    now = datetime.now(UTC)
    scope = DelegationScope(
        permissions=("/pkg.Service/*",),
        audiences=("spiffe://example.org/backend/*",),
        max_depth=1,
        delegators=("spiffe://example.org/workload",),
        not_after=(now + timedelta(hours=2)).replace(microsecond=0),
    )
    return issue_svid(
        authority,
        _leaf_key(leaf_type).public_key(),
        WORKLOAD,
        scope,
        3600,
        now,
        dns_names=("api.example.org", "api.internal.example.org") if with_dns else (),
        ip_addresses=(ipaddress.ip_address("127.0.0.1"),) if with_dns else (),
    )


# -- the profile lints clean -----------------------------------------------------------------


@pytest.mark.parametrize("with_dns", [False, True], ids=["uri-only", "with-dns-and-ip"])
@pytest.mark.parametrize("leaf_type", list(KeyType), ids=str)
@pytest.mark.parametrize("authority_type", list(KeyType), ids=str)
def test_issued_leaf_lints_clean(
    authority_type: KeyType, leaf_type: KeyType, with_dns: bool
) -> None:
    authority = _authority(authority_type)
    leaf = _issue(authority, leaf_type, with_dns)

    assert _untolerated(_lint(leaf)) == []
    assert _untolerated(_lint_pair(authority.certificate, leaf)) == []


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_created_authority_lints_clean(key_type: KeyType) -> None:
    authority = _authority(key_type).certificate

    assert _untolerated(_lint(authority)) == []
    assert _untolerated(_lint_pair(authority, authority)) == []


def test_created_authority_for_a_long_trust_domain_lints_clean() -> None:
    authority, _ = create_authority(
        "a" * 60 + ".example.org", KeyType.EC_P256, YEAR, datetime.now(UTC)
    )

    assert _untolerated(_lint(authority)) == []


def _operator_ca(
    common_name: str,
    key: AllowedPrivateKey,
    issuer_name: str,
    issuer_key: AllowedPrivateKey,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate of an operator's own PKI, for import."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if key is not issuer_key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA384())


def test_leaf_of_an_imported_intermediate_lints_clean() -> None:
    root_key = generate_private_key(KeyType.EC_P384)
    root = _operator_ca("Example Root", root_key, "Example Root", root_key, None)
    key = generate_private_key(KeyType.RSA_2048)
    intermediate = _operator_ca("Example Issuing CA", key, "Example Root", root_key, 0)
    authority = check_imported_authority([intermediate, root], key, datetime.now(UTC))

    leaf = _issue(authority, KeyType.EC_P256, with_dns=True)

    assert _untolerated(_lint(leaf)) == []
    assert _untolerated(_lint_pair(intermediate, leaf)) == []


# -- the lint and the allow-list can fail ----------------------------------------------------


def test_lint_reports_the_case_008_non_critical_san_through_the_allow_list(tmp_path: Path) -> None:
    gen = Path(__file__).parent / "cases" / "008-empty-subject-san-not-critical" / "gen.py"
    subprocess.run([sys.executable, str(gen), "--out", str(tmp_path)], check=True)
    pem = (tmp_path / "leaf-empty-subject-san-noncritical.pem").read_bytes()

    codes = {finding.code for finding in _untolerated(_lint(x509.load_pem_x509_certificate(pem)))}

    assert "pkix.san_extension_not_critical_empty_subject" in codes
    assert "pkix.authority_key_identifier_extension_absent" in codes


def test_allow_list_tolerates_spiffe_uris_only() -> None:
    spiffe = Finding("ERROR", "pkix.invalid_uri_syntax", "x", 'Invalid URI syntax: "spiffe://a/b"')
    other = Finding("ERROR", "pkix.invalid_uri_syntax", "x", 'Invalid URI syntax: "http//x"')

    assert _untolerated([spiffe, other]) == [other]


def test_pair_lint_reports_a_leaf_that_names_another_issuer() -> None:
    authority = _authority(KeyType.EC_P256)
    stranger = _authority(KeyType.EC_P384)
    leaf = _issue(stranger, KeyType.EC_P256, with_dns=False)

    findings = _untolerated(_lint_pair(authority.certificate, leaf))

    assert findings != []
