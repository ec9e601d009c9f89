"""X.509-SVID leaf rules and chain verification, driven by cases/005 and 008."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from certgen import CertAndKey, make_intermediate, make_leaf, make_root
from dmc.errors import InvalidSvid, Unauthenticated
from dmc.scope import EMPTY_SCOPE, SCOPE_OID, DelegationScope
from dmc.spiffe_id import SpiffeId
from dmc.svid import NOT_BEFORE_BACKDATE, Svid, parse_svid, verify_chain

CASES = Path(__file__).parent / "cases"
CASE_005 = CASES / "005-svid-with-several-uri-sans"
CASE_008 = CASES / "008-empty-subject-san-not-critical"
# Reset before each test (see _fresh_now): leaves made during a test are issued "now", and a
# time taken when the module was imported may lie more than the 30 s back-dating before it.
NOW = datetime.now(UTC).replace(microsecond=0)
WORKLOAD = "spiffe://example.org/workload"


def _pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    global NOW  # noqa: PLW0603 - the module-wide "now" of the leaves under test
    NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def root() -> CertAndKey:
    return make_root("example.org", now=NOW)


def _refused_as_peer(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str:
    """Verify, expecting exactly Unauthenticated (a chain failure), and return the message."""
    with pytest.raises(Unauthenticated) as caught:
        verify_chain(chain, roots, NOW)
    assert type(caught.value) is Unauthenticated
    return str(caught.value)


# ---------------------------------------------------------------- cases/005


@pytest.mark.parametrize("name", ["svid-https-uri-then-spiffe-id.pem", "svid-two-spiffe-ids.pem"])
def test_leaf_with_two_uri_sans_is_refused_giving_the_count(name: str) -> None:
    leaf, bundle = _pem(CASE_005 / name), [_pem(CASE_005 / "bundle.pem")]

    with pytest.raises(InvalidSvid, match="certificate has 2 URI SANs") as caught:
        verify_chain([leaf], bundle, NOW)
    assert isinstance(caught.value, Unauthenticated)
    with pytest.raises(InvalidSvid, match="2 URI SANs"):
        parse_svid(leaf)


def test_case_005_one_uri_leaf_authenticates_with_an_empty_scope() -> None:
    leaf = _pem(CASE_005 / "svid-one-uri-ok.pem")

    svid = verify_chain([leaf], [_pem(CASE_005 / "bundle.pem")], NOW)

    assert svid.spiffe_id == SpiffeId.parse("spiffe://example.org/workload/api")
    assert svid.scope == EMPTY_SCOPE
    assert svid.certificate == leaf
    assert svid.serial == leaf.serial_number


def test_case_005_leaves_do_not_verify_under_another_root() -> None:
    leaf = _pem(CASE_005 / "svid-one-uri-ok.pem")

    message = _refused_as_peer([leaf], [make_root().certificate])

    assert "does not verify against the trust bundle" in message


# ---------------------------------------------------------------- cases/008


def test_case_008_critical_san_with_empty_subject_is_accepted() -> None:
    leaf = _pem(CASE_008 / "leaf-empty-subject-san-critical.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and len(leaf.subject) == 0

    svid = verify_chain([leaf], [_pem(CASE_008 / "bundle.pem")], NOW)

    assert str(svid.spiffe_id) == "spiffe://example.org/workload/api"
    assert svid.scope == EMPTY_SCOPE


def test_case_008_non_critical_san_is_tolerated_when_reading() -> None:
    # RFC 5280 §4.1.2.6 binds the issuer (dmc's profile marks the SAN critical); a reader
    # that refused this leaf would lock out peers of CAs that copy the CSR's flag.
    leaf = _pem(CASE_008 / "leaf-empty-subject-san-noncritical.pem")

    assert verify_chain([leaf], [_pem(CASE_008 / "bundle.pem")], NOW).spiffe_id.path == (
        "/workload/api"
    )


# ---------------------------------------------------------------- leaf rules


def test_well_formed_leaf_gives_its_id_scope_times_and_dns_names(root: CertAndKey) -> None:
    scope = DelegationScope(
        permissions=("/inv.Stock/*",),
        audiences=("spiffe://example.org/db/*",),
        max_depth=1,
        delegators=("spiffe://example.org/origin",),
        not_after=NOW + timedelta(hours=2),
    )
    leaf = make_leaf(
        root,
        uris=[WORKLOAD],
        dns_names=["api.example.org", "api.internal"],
        ip_addresses=["127.0.0.1"],
        scope=scope,
        issued_at=NOW,
        serial_number=0x1234_5678_9ABC_DEF0_11,
    ).certificate

    svid = verify_chain([leaf], [root.certificate], NOW)

    assert svid == Svid(
        spiffe_id=SpiffeId.parse(WORKLOAD),
        scope=scope,
        serial=0x1234_5678_9ABC_DEF0_11,
        not_before=NOW - timedelta(seconds=30),
        not_after=NOW + timedelta(hours=1),
        dns_names=("api.example.org", "api.internal"),
        certificate=leaf,
    )
    assert svid.issued_at == NOW
    assert timedelta(seconds=30) == NOT_BEFORE_BACKDATE


def test_svid_is_immutable(root: CertAndKey) -> None:
    svid = parse_svid(make_leaf(root).certificate)

    with pytest.raises(dataclasses.FrozenInstanceError):
        svid.serial = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ca": True, "usages": ("digital_signature",)}, "is a CA (basicConstraints CA:TRUE)"),
        ({"ca": True, "usages": ("key_cert_sign",)}, "is a CA"),
        ({"usages": ("digital_signature", "key_cert_sign")}, "keyUsage keyCertSign"),
        ({"usages": ("digital_signature", "crl_sign")}, "keyUsage cRLSign"),
        ({"uris": ()}, "certificate has 0 URI SANs"),
        ({"uris": (), "dns_names": ("api.example.org",)}, "certificate has 0 URI SANs"),
        ({"uris": (WORKLOAD, WORKLOAD)}, "certificate has 2 URI SANs"),
        ({"uris": (WORKLOAD, "spiffe://example.org/b", "urn:x")}, "has 3 URI SANs"),
        ({"uris": ("spiffe://example.org/workload/../admin",)}, "segment '..'"),
        ({"uris": ("spiffe://Example.org/workload",)}, "trust domain character 'E'"),
        ({"uris": ("https://example.org/workload",)}, "scheme 'https'"),
        ({"uris": ("spiffe://example.org/a/",)}, "trailing '/'"),
        ({"uris": ("spiffe://example.org",)}, "has no path"),
    ],
)
def test_leaf_that_chains_but_is_no_svid_is_refused(
    root: CertAndKey, options: dict[str, object], message: str
) -> None:
    leaf = make_leaf(root, **options).certificate  # type: ignore[arg-type]

    with pytest.raises(InvalidSvid) as caught:
        verify_chain([leaf], [root.certificate], NOW)

    assert message in str(caught.value)
    with pytest.raises(InvalidSvid):
        parse_svid(leaf)


def test_invalid_spiffe_id_in_uri_san_is_named_as_such(root: CertAndKey) -> None:
    leaf = make_leaf(root, uris=["spiffe://example.org/a b"]).certificate

    with pytest.raises(InvalidSvid, match=r"URI SAN is not a valid SPIFFE ID: .*character ' '"):
        parse_svid(leaf)


def test_leaf_without_basic_constraints_or_key_usage_is_read(root: CertAndKey) -> None:
    # RFC 5280 §4.2.1.9: no basicConstraints means not a CA; imported CAs issue such.
    leaf = make_leaf(root, ca=None, usages=None, extended_usages=None).certificate

    assert verify_chain([leaf], [root.certificate], NOW).spiffe_id == SpiffeId.parse(WORKLOAD)


def test_leaf_with_rsa_key_encipherment_is_read(root: CertAndKey) -> None:
    leaf = make_leaf(root, usages=("digital_signature", "key_encipherment")).certificate

    assert parse_svid(leaf).spiffe_id == SpiffeId.parse(WORKLOAD)


def test_malformed_scope_extension_is_refused(root: CertAndKey) -> None:
    bad_scope = x509.UnrecognizedExtension(
        SCOPE_OID, bytes.fromhex("300c020102300030000201003000")
    )
    leaf = make_leaf(root, extra_extensions=[(bad_scope, False)]).certificate

    with pytest.raises(InvalidSvid, match=r"malformed scope: .*version 2 is not v1"):
        verify_chain([leaf], [root.certificate], NOW)


def test_unknown_critical_extension_is_refused(root: CertAndKey) -> None:
    unknown = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.32473.99"), b"\x05\x00"
    )
    leaf = make_leaf(root, extra_extensions=[(unknown, True)]).certificate

    with pytest.raises(InvalidSvid, match=re.escape("1.3.6.1.4.1.32473.99")):
        parse_svid(leaf)
    message = _refused_as_peer([leaf], [root.certificate])
    assert "critical" in message


# ---------------------------------------------------------------- the chain


def test_expired_leaf_is_refused(root: CertAndKey) -> None:
    leaf = make_leaf(root, issued_at=NOW - timedelta(hours=2), ttl=timedelta(hours=1))

    message = _refused_as_peer([leaf.certificate], [root.certificate])

    assert message.startswith("certificate expired at ")


def test_not_yet_valid_leaf_is_refused(root: CertAndKey) -> None:
    leaf = make_leaf(root, issued_at=NOW + timedelta(minutes=5))

    message = _refused_as_peer([leaf.certificate], [root.certificate])

    assert message.startswith("certificate is not valid before ")


def test_leaf_is_valid_from_not_before_to_not_after_inclusive(root: CertAndKey) -> None:
    leaf = make_leaf(root, issued_at=NOW).certificate

    verify_chain([leaf], [root.certificate], NOW - timedelta(seconds=30))
    verify_chain([leaf], [root.certificate], NOW + timedelta(hours=1))
    with pytest.raises(Unauthenticated):
        verify_chain([leaf], [root.certificate], NOW + timedelta(hours=1, seconds=1))


def test_leaf_signed_by_an_unknown_ca_is_refused(root: CertAndKey) -> None:
    stranger = make_root("example.org", now=NOW)  # same names, other key
    leaf = make_leaf(stranger).certificate

    message = _refused_as_peer([leaf], [root.certificate])

    assert "does not verify against the trust bundle" in message


def test_untrusted_leaf_is_refused_before_its_contents_are_judged(root: CertAndKey) -> None:
    stranger = make_root("example.org", now=NOW)
    leaf = make_leaf(stranger, uris=[WORKLOAD, "spiffe://example.org/admin"]).certificate

    _refused_as_peer([leaf], [root.certificate])


def test_self_signed_leaf_that_is_in_no_bundle_is_refused(root: CertAndKey) -> None:
    lone = make_root("example.org", now=NOW)
    leaf = make_leaf(lone).certificate

    _refused_as_peer([leaf, lone.certificate], [root.certificate])


def test_leaf_via_an_intermediate_verifies_with_the_intermediate_in_the_chain(
    root: CertAndKey,
) -> None:
    intermediate = make_intermediate(root, now=NOW)
    leaf = make_leaf(intermediate).certificate

    svid = verify_chain([leaf, intermediate.certificate], [root.certificate], NOW)

    assert svid.spiffe_id == SpiffeId.parse(WORKLOAD)
    assert _refused_as_peer([leaf], [root.certificate])


def test_any_root_of_the_bundle_may_anchor_the_chain(root: CertAndKey) -> None:
    other = make_root("example.org", now=NOW, common_name="next authority")
    leaf = make_leaf(other).certificate

    assert verify_chain([leaf], [root.certificate, other.certificate], NOW).certificate == leaf


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"ca": False}, "cA must be asserted"),
        ({"ca": None}, "basicConstraints"),
        ({"usages": ("digital_signature",)}, "keyCertSign"),
    ],
)
def test_intermediate_without_signing_powers_is_refused(
    root: CertAndKey, options: dict[str, object], reason: str
) -> None:
    intermediate = make_intermediate(root, now=NOW, **options)  # type: ignore[arg-type]
    leaf = make_leaf(intermediate).certificate

    message = _refused_as_peer([leaf, intermediate.certificate], [root.certificate])

    assert reason in message


def test_expired_intermediate_is_refused(root: CertAndKey) -> None:
    intermediate = make_intermediate(
        root, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(days=1)
    )
    leaf = make_leaf(intermediate).certificate

    _refused_as_peer([leaf, intermediate.certificate], [root.certificate])


def test_path_length_constraint_is_honoured(root: CertAndKey) -> None:
    first = make_intermediate(root, now=NOW, path_length=0, common_name="first")
    second = make_intermediate(first, now=NOW, common_name="second")
    leaf = make_leaf(second).certificate

    _refused_as_peer([leaf, second.certificate, first.certificate], [root.certificate])

    lenient = make_intermediate(root, now=NOW, path_length=1, common_name="first")
    second = make_intermediate(lenient, now=NOW, common_name="second")
    leaf = make_leaf(second).certificate
    chain = [leaf, second.certificate, lenient.certificate]
    assert verify_chain(chain, [root.certificate], NOW).certificate == leaf


def test_expired_root_is_refused() -> None:
    old = make_root(not_before=NOW - timedelta(days=3), not_after=NOW - timedelta(days=1))
    leaf = make_leaf(old, issued_at=NOW).certificate

    _refused_as_peer([leaf], [old.certificate])


def test_empty_chain_and_empty_bundle_are_refused(root: CertAndKey) -> None:
    leaf = make_leaf(root).certificate

    assert "no certificate" in _refused_as_peer([], [root.certificate])
    assert "trust bundle holds no authority" in _refused_as_peer([leaf], [])
