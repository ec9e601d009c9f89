"""The delegation scope extension of SPEC §3: its value, its DER form and the subset rule.

Every SVID dmc issues carries one non-critical extension under :data:`SCOPE_OID`::

    DelegationScope ::= SEQUENCE {
      version      INTEGER { v1(1) },
      permissions  SEQUENCE OF UTF8String,
      audiences    SEQUENCE OF UTF8String,
      maxDepth     INTEGER (0..16),
      delegators   SEQUENCE OF UTF8String,
      notAfter     GeneralizedTime OPTIONAL
    }

Permission patterns are ``*``, ``/pkg.Service/*`` or ``/pkg.Service/Method``; audience
patterns are ``*``, ``spiffe://td/path/*`` or one exact SPIFFE ID.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, constraint, namedtype, namedval, univ, useful
from pyasn1.type.error import ValueConstraintError

from dmc.errors import (
    InvalidArgument,
    InvalidScope,
    InvalidSpiffeId,
    PermissionDenied,
    ScopeWidening,
    shown,
)
from dmc.spiffe_id import SpiffeId

__all__ = [
    "ANY",
    "EMPTY_SCOPE",
    "MAX_DEPTH",
    "MAX_PERMISSION_CHARS",
    "SCOPE_OID",
    "DelegationScope",
    "audience_covers",
    "decode_scope",
    "derive_delegated_scope",
    "encode_scope",
    "permission_covers",
    "permits_audience",
    "permits_method",
    "scope_extension",
    "validate_audience",
    "validate_permission",
]

# SPEC §3: under the enterprise number RFC 5612 sets aside for documentation. Every arc
# stays below 2^28 so that Go, RustCrypto and older cryptography can read it.
SCOPE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.32473.4.1")

ANY = "*"
MAX_DEPTH = 16
MAX_PERMISSION_CHARS = 512
_VERSION_V1 = 1
_WILDCARD_SUFFIX = "/*"
_GENERALIZED_TIME_FORMAT = "%Y%m%d%H%M%SZ"

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_SERVICE = rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*"
_PERMISSION = re.compile(rf"/{_SERVICE}/(?:\*|{_IDENTIFIER})")
_GENERALIZED_TIME = re.compile(r"[0-9]{14}Z")


@dataclass(frozen=True, slots=True)
class DelegationScope:
    """What the holder of an SVID may do (SPEC §3); ``not_after`` is UTC, whole seconds."""

    permissions: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    max_depth: int = 0
    delegators: tuple[str, ...] = ()
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        for field in ("permissions", "audiences", "delegators"):
            if not isinstance(getattr(self, field), tuple):
                raise TypeError(f"DelegationScope.{field} must be a tuple of str")
        for permission in self.permissions:
            validate_permission(permission)
        for audience in self.audiences:
            _parse_audience(audience)
        for delegator in self.delegators:
            _parse_delegator(delegator)
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int):
            raise TypeError("DelegationScope.max_depth must be an int")
        if not 0 <= self.max_depth <= MAX_DEPTH:
            raise InvalidScope(f"max_depth {self.max_depth} is outside 0..{MAX_DEPTH}")
        if self.not_after is not None:
            _check_utc_whole_seconds(self.not_after)


EMPTY_SCOPE = DelegationScope()
"""The scope of an SVID without the extension: no permissions, no audiences, depth 0."""


class _Utf8Strings(univ.SequenceOf):  # type: ignore[misc]
    componentType = char.UTF8String()


class _DelegationScopeAsn1(univ.Sequence):  # type: ignore[misc]
    componentType = namedtype.NamedTypes(
        namedtype.NamedType(
            "version", univ.Integer(namedValues=namedval.NamedValues(("v1", _VERSION_V1)))
        ),
        namedtype.NamedType("permissions", _Utf8Strings()),
        namedtype.NamedType("audiences", _Utf8Strings()),
        namedtype.NamedType(
            "maxDepth",
            univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(0, MAX_DEPTH)),
        ),
        namedtype.NamedType("delegators", _Utf8Strings()),
        namedtype.OptionalNamedType("notAfter", useful.GeneralizedTime()),
    )


# Every renewal of a workload encodes the same scope again, and pyasn1's encoder was a
# third of the time of an issuance (bench/issuance.py); scopes are frozen and hashable.
@functools.lru_cache(maxsize=4096)
def encode_scope(scope: DelegationScope) -> bytes:
    """The DER encoding of ``scope`` (the extension's value)."""
    value = _DelegationScopeAsn1()
    value["version"] = _VERSION_V1
    for field, strings in (
        ("permissions", scope.permissions),
        ("audiences", scope.audiences),
        ("delegators", scope.delegators),
    ):
        sequence = _Utf8Strings()
        sequence.extend(strings)
        value[field] = sequence
    value["maxDepth"] = scope.max_depth
    if scope.not_after is not None:
        # RFC 5280 §4.1.2.5.2: GeneralizedTime in UTC, "YYYYMMDDHHMMSSZ", no fractions.
        value["notAfter"] = scope.not_after.astimezone(UTC).strftime(_GENERALIZED_TIME_FORMAT)
    der: bytes = der_encoder.encode(value)
    return der


def decode_scope(der: bytes) -> DelegationScope:
    """Read a DER-encoded scope; anything but exactly one v1 ``DelegationScope`` is refused."""
    if not der:
        raise InvalidScope("scope extension is empty")
    try:
        value, rest = der_decoder.decode(der, asn1Spec=_DelegationScopeAsn1())
    except ValueConstraintError as exc:
        # The only constrained field is maxDepth INTEGER (0..16).
        raise InvalidScope(f"scope extension maxDepth is outside 0..{MAX_DEPTH}") from exc
    except PyAsn1Error as exc:
        raise InvalidScope(
            f"scope extension is not a DER DelegationScope: {_first_words(exc)}"
        ) from exc
    if rest:
        raise InvalidScope(f"scope extension has {len(rest)} trailing bytes after the value")

    version = int(value["version"])
    if version != _VERSION_V1:
        raise InvalidScope(f"scope extension version {version} is not v1 ({_VERSION_V1})")
    not_after = None
    if value["notAfter"].isValue:
        not_after = _parse_generalized_time(str(value["notAfter"]))

    try:
        scope = DelegationScope(
            permissions=tuple(str(p) for p in value["permissions"]),
            audiences=tuple(str(a) for a in value["audiences"]),
            max_depth=int(value["maxDepth"]),
            delegators=tuple(str(d) for d in value["delegators"]),
            not_after=not_after,
        )
    except InvalidArgument as exc:
        raise InvalidScope(f"scope extension holds an invalid value: {exc}") from exc

    # DER has one encoding per value; a lax (BER) or padded form is not what dmc wrote.
    if encode_scope(scope) != der:
        raise InvalidScope("scope extension is not in canonical DER form")
    return scope


def scope_extension(scope: DelegationScope) -> x509.UnrecognizedExtension:
    """The certificate extension carrying ``scope``; SPEC §3 adds it non-critical."""
    return x509.UnrecognizedExtension(SCOPE_OID, encode_scope(scope))


def validate_permission(permission: str) -> str:
    """Return ``permission`` if it is ``*``, ``/pkg.Service/*`` or ``/pkg.Service/Method``."""
    if not isinstance(permission, str):
        raise TypeError(f"a permission is a str, not {type(permission).__name__}")
    if len(permission) > MAX_PERMISSION_CHARS:
        # Every pattern travels in every certificate of its holder; a gRPC method name this
        # long is a mistake or an attack.
        raise InvalidScope(
            f"permission {shown(permission)} is longer than {MAX_PERMISSION_CHARS} characters"
        )
    if permission == ANY or _PERMISSION.fullmatch(permission):
        return permission
    raise InvalidScope(
        f"permission {shown(permission)} is not '*', '/pkg.Service/*' or '/pkg.Service/Method' "
        "(a service is dotted identifiers, a method an identifier)"
    )


def validate_audience(audience: str, trust_domain: str) -> str:
    """Return ``audience`` if it is a valid pattern naming only ``trust_domain``."""
    base = _parse_audience(audience)
    if base is not None and base.trust_domain != trust_domain:
        raise InvalidScope(
            f"audience {shown(audience)} is in trust domain '{base.trust_domain}', "
            f"not in '{trust_domain}'"
        )
    return audience


def permission_covers(parent: str, child: str) -> bool:
    """Whether permission pattern ``parent`` grants everything ``child`` grants."""
    if parent in (ANY, child):
        return True
    if parent.endswith(_WILDCARD_SUFFIX) and child != ANY:
        # "/a.S/*" covers "/a.S/*" and "/a.S/M"; the service name must match exactly.
        return child.startswith(parent[:-1])
    return False


def audience_covers(parent: str, child: str) -> bool:
    """Whether audience pattern ``parent`` admits every ID that ``child`` admits."""
    if parent in (ANY, child):
        return True
    if child == ANY or not parent.endswith(_WILDCARD_SUFFIX):
        return False
    parent_base, child_base = _parse_audience(parent), _parse_audience(child)
    if parent_base is None or child_base is None:
        return False
    # By segments: "spiffe://td/x/*" covers "spiffe://td/x/y", never "spiffe://td/xy".
    return child_base.is_same_or_below(parent_base)


def permits_method(scope: DelegationScope, method: str) -> bool:
    """Whether ``scope`` allows calling the full gRPC ``method`` (``/pkg.Service/Method``)."""
    return any(permission_covers(p, method) for p in scope.permissions)


def permits_audience(scope: DelegationScope, spiffe_id: SpiffeId) -> bool:
    """Whether ``scope`` lets its holder call the server ``spiffe_id``.

    ``*`` admits any ID: the caller checks that ``spiffe_id`` is in the holder's trust
    domain (a peer that chains to the bundle is).
    """
    return any(audience_covers(a, str(spiffe_id)) for a in scope.audiences)


def derive_delegated_scope(
    parent_id: SpiffeId,
    parent_scope: DelegationScope,
    child_id: SpiffeId,
    permissions: Sequence[str],
    audiences: Sequence[str],
    max_depth: int,
    ttl_seconds: int,
    now: datetime,
) -> DelegationScope:
    """The scope of a delegation from ``parent_id`` to ``child_id`` under SPEC §3.

    Malformed requests raise :class:`InvalidArgument` (or a subclass); every widening of
    the parent's scope raises :class:`ScopeWidening` naming the pattern or field.
    """
    if ttl_seconds <= 0:
        raise InvalidArgument(f"ttl_seconds must be positive, not {ttl_seconds}")
    _check_aware(now)
    for permission in permissions:
        validate_permission(permission)
    for audience in audiences:
        validate_audience(audience, parent_id.trust_domain)
    if not 0 <= max_depth <= MAX_DEPTH:
        raise InvalidScope(f"max_depth {max_depth} is outside 0..{MAX_DEPTH}")

    # SPEC §3: C.maxDepth <= P.maxDepth - 1, so P must have a hop left.
    if parent_scope.max_depth == 0:
        raise ScopeWidening("delegation depth exhausted: the caller's scope has max_depth 0")
    if max_depth > parent_scope.max_depth - 1:
        raise ScopeWidening(
            f"max_depth {max_depth} is not covered by the caller's scope "
            f"(at most {parent_scope.max_depth - 1})"
        )
    # SPEC §3: C's ID is P's ID or below it, by path segments, in the same trust domain.
    if child_id.trust_domain != parent_id.trust_domain:
        raise ScopeWidening(
            f"SPIFFE ID '{child_id}' is not in the caller's trust domain "
            f"'{parent_id.trust_domain}'"
        )
    if not child_id.is_same_or_below(parent_id):
        raise ScopeWidening(f"SPIFFE ID '{child_id}' is not '{parent_id}' or below it")
    for permission in permissions:
        if not any(permission_covers(p, permission) for p in parent_scope.permissions):
            raise ScopeWidening(
                f"permission {shown(permission)} is not covered by the caller's scope"
            )
    for audience in audiences:
        if not any(audience_covers(a, audience) for a in parent_scope.audiences):
            raise ScopeWidening(f"audience {shown(audience)} is not covered by the caller's scope")

    # SPEC §3: the delegation ends at now + ttl, shortened (not refused) to P's notAfter.
    not_after = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=ttl_seconds)
    if parent_scope.not_after is not None:
        if parent_scope.not_after <= now:
            raise PermissionDenied(
                f"the caller's delegation ended at {parent_scope.not_after.isoformat()}"
            )
        not_after = min(not_after, parent_scope.not_after)

    return DelegationScope(
        permissions=tuple(permissions),
        audiences=tuple(audiences),
        max_depth=max_depth,
        delegators=(*parent_scope.delegators, str(parent_id)),
        not_after=not_after,
    )


def _parse_audience(audience: str) -> SpiffeId | None:
    """The ID an audience pattern names (``None`` for ``*``), or raise."""
    if not isinstance(audience, str):
        raise TypeError(f"an audience is a str, not {type(audience).__name__}")
    if audience == ANY:
        return None
    text = audience.removesuffix(_WILDCARD_SUFFIX)
    try:
        return SpiffeId.parse(text)
    except InvalidSpiffeId as exc:
        raise InvalidSpiffeId(f"audience {shown(audience)}: {exc}") from exc


def _parse_delegator(delegator: str) -> SpiffeId:
    try:
        return SpiffeId.parse(delegator)
    except InvalidSpiffeId as exc:
        raise InvalidSpiffeId(f"delegator: {exc}") from exc


def _parse_generalized_time(text: str) -> datetime:
    if not _GENERALIZED_TIME.fullmatch(text):
        raise InvalidScope(f"scope extension notAfter '{text}' is not 'YYYYMMDDHHMMSSZ'")
    try:
        return datetime.strptime(text, _GENERALIZED_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidScope(f"scope extension notAfter '{text}' is not a valid time") from exc


def _first_words(exc: Exception) -> str:
    """pyasn1 messages can repeat the whole schema; keep the start."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def _check_aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment!r} has no time zone; dmc works in aware UTC datetimes")


def _check_utc_whole_seconds(moment: datetime) -> None:
    _check_aware(moment)
    if moment.utcoffset() != timedelta(0):
        raise InvalidScope(f"not_after {moment.isoformat()} is not in UTC")
    if moment.microsecond:
        raise InvalidScope(f"not_after {moment.isoformat()} is not a whole second")
