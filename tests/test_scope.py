"""The delegation scope extension and the subset rule of SPEC §3."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dmc.errors import (
    InvalidArgument,
    InvalidScope,
    InvalidSpiffeId,
    PermissionDenied,
    ScopeWidening,
    shown,
)
from dmc.scope import (
    EMPTY_SCOPE,
    SCOPE_OID,
    DelegationScope,
    audience_covers,
    decode_scope,
    derive_delegated_scope,
    encode_scope,
    permission_covers,
    permits_audience,
    permits_method,
    scope_extension,
    validate_audience,
    validate_permission,
)
from dmc.spiffe_id import SpiffeId

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
TD = "example.org"


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


# ---------------------------------------------------------------- DER form


# DelegationScope { version 1, permissions {"/a.S/*"}, audiences {"*"}, maxDepth 1,
#                   delegators {"spiffe://td/p"}, notAfter "20300102030405Z" }
VECTOR_HEX = "".join(
    [
        "3037",  # SEQUENCE, 55 bytes
        "020101",  # version INTEGER 1
        "3008" + "0c06" + "2f612e532f2a",  # permissions: UTF8String "/a.S/*"
        "3003" + "0c01" + "2a",  # audiences: UTF8String "*"
        "020101",  # maxDepth INTEGER 1
        "300f" + "0c0d" + "7370696666653a2f2f74642f70",  # delegators: "spiffe://td/p"
        "180f" + "32303330303130323033303430355a",  # notAfter GeneralizedTime
    ]
)
VECTOR_SCOPE = DelegationScope(
    permissions=("/a.S/*",),
    audiences=("*",),
    max_depth=1,
    delegators=("spiffe://td/p",),
    not_after=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
)
# The empty scope: version 1, three empty sequences, maxDepth 0, no notAfter.
EMPTY_HEX = "300c" + "020101" + "3000" + "3000" + "020100" + "3000"


def test_scope_oid_is_the_documentation_arc_of_spec() -> None:
    assert SCOPE_OID.dotted_string == "1.3.6.1.4.1.32473.4.1"


def test_encode_gives_the_fixed_der_vector() -> None:
    assert encode_scope(VECTOR_SCOPE).hex() == VECTOR_HEX


def test_decode_of_the_fixed_der_vector_round_trips() -> None:
    assert decode_scope(bytes.fromhex(VECTOR_HEX)) == VECTOR_SCOPE


def test_empty_scope_encodes_without_not_after() -> None:
    assert encode_scope(EMPTY_SCOPE).hex() == EMPTY_HEX
    assert decode_scope(bytes.fromhex(EMPTY_HEX)) == EMPTY_SCOPE


def test_round_trip_of_a_full_scope_keeps_order_and_unicode_free_values() -> None:
    scope = DelegationScope(
        permissions=("/dmc.v1.Admin/*", "/grpc.health.v1.Health/Check", "*"),
        audiences=("spiffe://example.org/web/*", "spiffe://example.org/db", "*"),
        max_depth=16,
        delegators=("spiffe://example.org/origin", "spiffe://example.org/origin/mid"),
        not_after=datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC),
    )

    assert decode_scope(encode_scope(scope)) == scope


def test_not_after_in_another_zone_is_refused_not_converted() -> None:
    with pytest.raises(InvalidScope, match="not in UTC"):
        DelegationScope(not_after=datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=1))))


def test_not_after_must_be_whole_seconds_and_aware() -> None:
    with pytest.raises(InvalidScope, match="whole second"):
        DelegationScope(not_after=datetime(2030, 1, 1, 0, 0, 0, 5, tzinfo=UTC))
    with pytest.raises(ValueError, match="time zone"):
        DelegationScope(not_after=datetime(2030, 1, 1))


def _der(*, version: str = "020101", depth: str = "020100", tail: str = "") -> bytes:
    body = version + "3000" + "3000" + depth + "3000" + tail
    return bytes.fromhex(f"30{len(body) // 2:02x}" + body)


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (bytes.fromhex(EMPTY_HEX) + b"\x00", "trailing bytes"),
        (bytes.fromhex(VECTOR_HEX) + bytes.fromhex(EMPTY_HEX), "trailing bytes"),
        (_der(version="020102"), "version 2 is not v1"),
        (_der(version="020100"), "version 0 is not v1"),
        (_der(depth="020111"), "maxDepth is outside 0..16"),
        (_der(depth="0201ff"), "maxDepth is outside 0..16"),
        (b"", "empty"),
        (b"\x00", "not a DER DelegationScope"),
        (b"\x30\x03\x02\x01", "not a DER DelegationScope"),  # cut short
        (bytes.fromhex(VECTOR_HEX)[:-1], "not a DER DelegationScope"),
        (bytes.fromhex("04050102030405"), "not a DER DelegationScope"),  # OCTET STRING
        (bytes.fromhex("3080020101300030000201003000" + "0000"), "not a DER"),  # BER
        (bytes.fromhex("30810c" + EMPTY_HEX[4:]), "canonical DER"),  # long-form length
        (_der(depth="02020000"), "canonical DER"),  # non-minimal INTEGER
        (_der(tail="180d" + "3230333030313032303330345a"), "YYYYMMDDHHMMSSZ"),  # no seconds
        (_der(tail="1811" + "32303330303130323033303430352e355a"), "YYYYMMDDHHMMSSZ"),
        (_der(tail="180e" + "3230333030313032303330343035"), "YYYYMMDDHHMMSSZ"),  # no Z
        (_der(tail="180f" + "32303330313330323033303430355a"), "not a valid time"),  # month 13
        (_der(tail="020101"), "not a DER DelegationScope"),  # extra INTEGER field
    ],
)
def test_decode_refuses_malformed_input(der: bytes, message: str) -> None:
    with pytest.raises(InvalidScope) as caught:
        decode_scope(der)

    assert message in str(caught.value)


def test_decode_refuses_invalid_utf8_and_invalid_patterns() -> None:
    bad_utf8 = bytes.fromhex("300f020101" + "30030c01ff" + "3000" + "020100" + "3000")
    bad_permission = bytes.fromhex("3010020101" + "30040c022f2a" + "3000" + "020100" + "3000")
    bad_audience = bytes.fromhex("300f020101" + "3000" + "30030c0178" + "020100" + "3000")

    for der in (bad_utf8, bad_permission, bad_audience):
        with pytest.raises(InvalidScope):
            decode_scope(der)


def test_scope_extension_carries_the_encoded_scope() -> None:
    extension = scope_extension(VECTOR_SCOPE)

    assert extension.oid == SCOPE_OID
    assert extension.value == bytes.fromhex(VECTOR_HEX)


def test_scope_constructor_checks_its_fields() -> None:
    with pytest.raises(InvalidScope, match="max_depth 17"):
        DelegationScope(max_depth=17)
    with pytest.raises(InvalidScope, match="max_depth -1"):
        DelegationScope(max_depth=-1)
    with pytest.raises(TypeError):
        DelegationScope(permissions=["*"])  # type: ignore[arg-type]
    with pytest.raises(InvalidScope, match="permission 'x'"):
        DelegationScope(permissions=("x",))
    with pytest.raises(InvalidSpiffeId, match="delegator"):
        DelegationScope(delegators=("spiffe://td/a/../b",))


# ---------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "permission",
    [
        "*",
        "/pkg.Service/*",
        "/pkg.Service/Method",
        "/Svc/M",
        "/dmc.v1.Admin/CreateEntry",
        "/grpc.health.v1.Health/Check",
        "/_a._b/_c9",
    ],
)
def test_validate_permission_accepts(permission: str) -> None:
    assert validate_permission(permission) == permission


@pytest.mark.parametrize(
    "permission",
    [
        "",
        "**",
        "/*",
        "/pkg.Service",
        "/pkg.Service/",
        "pkg.Service/Method",
        "/pkg..Service/M",
        "/.pkg/M",
        "/pkg./M",
        "/pkg.Service/M/extra",
        "/pkg.Service/M*",
        "/pkg.Service/*/M",
        "/9pkg.S/M",
        "/pkg.S/9M",
        "/pkg-x.S/M",
        "/pkg.S/M ",
        "/pkg.S/M\n",
        "/pkg.Sérvice/M",
    ],
)
def test_validate_permission_refuses_naming_it(permission: str) -> None:
    with pytest.raises(InvalidScope) as caught:
        validate_permission(permission)

    # Named as shown in a one-line message: control characters escaped.
    assert f"permission {shown(permission)}" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "audience",
    [
        "*",
        "spiffe://example.org/web/*",
        "spiffe://example.org/*",
        "spiffe://example.org/web",
        "spiffe://example.org",
    ],
)
def test_validate_audience_accepts(audience: str) -> None:
    assert validate_audience(audience, TD) == audience


@pytest.mark.parametrize(
    ("audience", "error", "part"),
    [
        ("spiffe://other.org/web", InvalidScope, "trust domain 'other.org'"),
        ("spiffe://other.org/web/*", InvalidScope, "trust domain 'other.org'"),
        ("spiffe://example.org/a/../b", InvalidSpiffeId, "segment '..'"),
        ("spiffe://example.org/web/", InvalidSpiffeId, "trailing '/'"),
        ("spiffe://example.org/web*", InvalidSpiffeId, "character '*'"),
        ("spiffe://example.org/web/**", InvalidSpiffeId, "character '*'"),
        ("spiffe://example.org/*/x", InvalidSpiffeId, "character '*'"),
        ("spiffe://Example.org/web", InvalidSpiffeId, "trust domain character 'E'"),
        ("web", InvalidSpiffeId, "scheme"),
        ("", InvalidSpiffeId, "scheme"),
    ],
)
def test_validate_audience_refuses(audience: str, error: type[Exception], part: str) -> None:
    with pytest.raises(error) as caught:
        validate_audience(audience, TD)

    assert part in str(caught.value)
    assert f"audience '{audience}'" in str(caught.value)


@pytest.mark.parametrize(
    ("parent", "child", "expected"),
    [
        ("*", "*", True),
        ("*", "/a.S/*", True),
        ("*", "/a.S/M", True),
        ("/a.S/*", "/a.S/*", True),
        ("/a.S/*", "/a.S/M", True),
        ("/a.S/*", "*", False),
        ("/a.S/*", "/a.Sx/M", False),
        ("/a.S/*", "/a.S.x/M", False),
        ("/a.S/*", "/b.S/*", False),
        ("/a.S/M", "/a.S/M", True),
        ("/a.S/M", "/a.S/*", False),
        ("/a.S/M", "/a.S/N", False),
        ("/a.S/M", "/a.S/Mx", False),
        ("/a.S/M", "*", False),
    ],
)
def test_permission_covers(parent: str, child: str, expected: bool) -> None:
    assert permission_covers(parent, child) is expected


@pytest.mark.parametrize(
    ("parent", "child", "expected"),
    [
        ("*", "*", True),
        ("*", "spiffe://td/x", True),
        ("*", "spiffe://td/x/*", True),
        ("spiffe://td/x/*", "spiffe://td/x/*", True),
        ("spiffe://td/x/*", "spiffe://td/x", True),
        ("spiffe://td/x/*", "spiffe://td/x/y", True),
        ("spiffe://td/x/*", "spiffe://td/x/y/*", True),
        ("spiffe://td/x/*", "spiffe://td/xy", False),
        ("spiffe://td/x/*", "spiffe://td/xy/*", False),
        ("spiffe://td/x/*", "spiffe://td", False),
        ("spiffe://td/x/*", "*", False),
        ("spiffe://td/x/*", "spiffe://other/x/y", False),
        ("spiffe://td/*", "spiffe://td/anything/below", True),
        ("spiffe://td/x", "spiffe://td/x", True),
        ("spiffe://td/x", "spiffe://td/x/y", False),
        ("spiffe://td/x", "spiffe://td/x/*", False),
        ("spiffe://td/x", "*", False),
    ],
)
def test_audience_covers(parent: str, child: str, expected: bool) -> None:
    assert audience_covers(parent, child) is expected


def test_permits_method_matches_the_full_method_name() -> None:
    scope = DelegationScope(permissions=("/a.S/*", "/b.T/Get"))

    assert permits_method(scope, "/a.S/Anything")
    assert permits_method(scope, "/b.T/Get")
    assert not permits_method(scope, "/b.T/Put")
    assert not permits_method(scope, "/a.Sx/Get")
    assert not permits_method(EMPTY_SCOPE, "/a.S/Anything")
    assert permits_method(DelegationScope(permissions=("*",)), "/z.Z/Z")


def test_permits_audience_by_segments() -> None:
    scope = DelegationScope(audiences=("spiffe://td/web/*", "spiffe://td/db"))

    assert permits_audience(scope, sid("spiffe://td/web"))
    assert permits_audience(scope, sid("spiffe://td/web/fe"))
    assert permits_audience(scope, sid("spiffe://td/db"))
    assert not permits_audience(scope, sid("spiffe://td/web-evil"))
    assert not permits_audience(scope, sid("spiffe://td/db/replica"))
    assert not permits_audience(EMPTY_SCOPE, sid("spiffe://td/web"))
    assert permits_audience(DelegationScope(audiences=("*",)), sid("spiffe://td/any"))


# ---------------------------------------------------------------- subset rule

PARENT_ID = sid("spiffe://example.org/web")
PARENT = DelegationScope(
    permissions=("/inv.Stock/*", "/inv.Price/Get"),
    audiences=("spiffe://example.org/db/*", "spiffe://example.org/cache"),
    max_depth=2,
    delegators=("spiffe://example.org/origin",),
    not_after=None,
)


def derive(
    *,
    parent_id: SpiffeId = PARENT_ID,
    parent: DelegationScope = PARENT,
    child_id: str = "spiffe://example.org/web/job",
    permissions: tuple[str, ...] = ("/inv.Stock/List",),
    audiences: tuple[str, ...] = ("spiffe://example.org/db/main",),
    max_depth: int = 1,
    ttl_seconds: int = 600,
    now: datetime = NOW,
) -> DelegationScope:
    return derive_delegated_scope(
        parent_id,
        parent,
        sid(child_id),
        permissions=permissions,
        audiences=audiences,
        max_depth=max_depth,
        ttl_seconds=ttl_seconds,
        now=now,
    )


def test_derive_grants_a_covered_subset() -> None:
    child = derive()

    assert child == DelegationScope(
        permissions=("/inv.Stock/List",),
        audiences=("spiffe://example.org/db/main",),
        max_depth=1,
        delegators=("spiffe://example.org/origin", "spiffe://example.org/web"),
        not_after=NOW + timedelta(seconds=600),
    )


def test_derive_allows_equal_patterns_and_the_parent_id_itself() -> None:
    child = derive(
        child_id="spiffe://example.org/web",
        permissions=("/inv.Stock/*", "/inv.Price/Get"),
        audiences=("spiffe://example.org/db/*", "spiffe://example.org/cache"),
    )

    assert child.permissions == PARENT.permissions
    assert child.audiences == PARENT.audiences


def test_derive_allows_an_empty_scope() -> None:
    child = derive(permissions=(), audiences=(), max_depth=0)

    assert (child.permissions, child.audiences, child.max_depth) == ((), (), 0)


def test_first_delegation_starts_the_delegator_list() -> None:
    root = DelegationScope(permissions=("*",), audiences=("*",), max_depth=3)

    child = derive(parent=root)

    assert child.delegators == ("spiffe://example.org/web",)


def test_wildcard_parent_covers_everything_in_the_trust_domain() -> None:
    root = DelegationScope(permissions=("*",), audiences=("*",), max_depth=1)

    child = derive(
        parent=root,
        permissions=("*", "/x.Y/*"),
        audiences=("*", "spiffe://example.org/anything/*"),
        max_depth=0,
    )

    assert child.permissions == ("*", "/x.Y/*")


@pytest.mark.parametrize(
    "permission", ["/other.Svc/*", "*", "/inv.Price/*", "/inv.Price/Put", "/inv.Stockx/List"]
)
def test_derive_refuses_an_uncovered_permission_naming_it(permission: str) -> None:
    with pytest.raises(ScopeWidening) as caught:
        derive(permissions=("/inv.Stock/List", permission))

    assert str(caught.value) == f"permission '{permission}' is not covered by the caller's scope"


@pytest.mark.parametrize(
    "audience",
    [
        "*",
        "spiffe://example.org/dbx",
        "spiffe://example.org/db-evil/*",
        "spiffe://example.org/cache/*",
        "spiffe://example.org/cache/replica",
        "spiffe://example.org",
    ],
)
def test_derive_refuses_an_uncovered_audience_naming_it(audience: str) -> None:
    with pytest.raises(ScopeWidening) as caught:
        derive(audiences=(audience,))

    assert str(caught.value) == f"audience '{audience}' is not covered by the caller's scope"


def test_derive_refuses_an_audience_in_another_trust_domain_as_malformed() -> None:
    with pytest.raises(InvalidScope, match=re.escape("trust domain 'other.org'")):
        derive(audiences=("spiffe://other.org/db/main",))


def test_derive_refuses_malformed_patterns_before_checking_coverage() -> None:
    with pytest.raises(InvalidScope, match=re.escape("permission '/inv.Stock'")):
        derive(permissions=("/inv.Stock",))
    with pytest.raises(InvalidSpiffeId, match=re.escape("segment '..'")):
        derive(audiences=("spiffe://example.org/db/../admin",))


def test_derive_refuses_when_parent_depth_is_exhausted() -> None:
    parent = DelegationScope(permissions=("*",), audiences=("*",), max_depth=0)

    with pytest.raises(ScopeWidening, match="delegation depth exhausted"):
        derive(parent=parent, max_depth=0)


@pytest.mark.parametrize("max_depth", [2, 3, 16])
def test_derive_refuses_depth_not_below_the_parents(max_depth: int) -> None:
    with pytest.raises(ScopeWidening, match=f"max_depth {max_depth} is not covered"):
        derive(max_depth=max_depth)


@pytest.mark.parametrize("max_depth", [-1, 17])
def test_derive_refuses_depth_outside_the_asn1_range(max_depth: int) -> None:
    with pytest.raises(InvalidScope, match=re.escape("outside 0..16")):
        derive(max_depth=max_depth)


@pytest.mark.parametrize(
    "child_id",
    [
        "spiffe://example.org/web-evil",
        "spiffe://example.org/webjob",
        "spiffe://example.org/api",
        "spiffe://example.org/db/main",
    ],
)
def test_derive_refuses_a_child_id_not_below_the_parent(child_id: str) -> None:
    with pytest.raises(ScopeWidening) as caught:
        derive(child_id=child_id)

    assert f"'{child_id}' is not 'spiffe://example.org/web' or below it" in str(caught.value)


def test_derive_refuses_a_child_id_in_another_trust_domain() -> None:
    with pytest.raises(
        ScopeWidening, match=re.escape("not in the caller's trust domain 'example.org'")
    ):
        derive(child_id="spiffe://other.org/web/job")


@pytest.mark.parametrize("ttl_seconds", [0, -5])
def test_derive_refuses_a_non_positive_ttl(ttl_seconds: int) -> None:
    with pytest.raises(InvalidArgument, match="ttl_seconds must be positive") as caught:
        derive(ttl_seconds=ttl_seconds)

    assert not isinstance(caught.value, PermissionDenied)


def test_derive_shortens_not_after_to_the_parents() -> None:
    parent_end = NOW + timedelta(minutes=5)
    parent = DelegationScope(
        permissions=PARENT.permissions,
        audiences=PARENT.audiences,
        max_depth=2,
        not_after=parent_end,
    )

    assert derive(parent=parent, ttl_seconds=3600).not_after == parent_end
    assert derive(parent=parent, ttl_seconds=60).not_after == NOW + timedelta(seconds=60)


def test_derive_truncates_now_to_whole_seconds() -> None:
    child = derive(now=NOW + timedelta(microseconds=999_999), ttl_seconds=10)

    assert child.not_after == NOW + timedelta(seconds=10)


def test_derive_refuses_after_the_parents_delegation_ended() -> None:
    parent = DelegationScope(
        permissions=PARENT.permissions,
        audiences=PARENT.audiences,
        max_depth=2,
        not_after=NOW - timedelta(seconds=1),
    )

    with pytest.raises(PermissionDenied, match="delegation ended"):
        derive(parent=parent)


def test_derive_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="time zone"):
        derive(now=datetime(2030, 1, 1))


def test_derived_scope_survives_der() -> None:
    child = derive()

    assert decode_scope(encode_scope(child)) == child


def test_overlong_permission_is_refused() -> None:
    with pytest.raises(InvalidScope, match="longer than 512 characters"):
        validate_permission("/pkg.Service/" + "M" * 600)
    assert validate_permission("/pkg.Service/" + "M" * 400)
