"""The records etcd holds (SPEC §5), each a frozen value with a JSON form.

``Revocation`` is :class:`dmc.revocation.Revocation`, shared with the client library.

``to_json()`` writes compact JSON with sorted keys; ``from_json()`` reads it back and
raises :class:`~dmc.errors.InvalidArgument` naming the record and the field when the
bytes are not such a record. Unknown fields are ignored, so a newer replica may add
fields without breaking an older one. Times are timezone-aware and travel as ISO 8601
UTC text (``2026-12-04T15:46:00Z``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from dmc.errors import InvalidArgument
from dmc.revocation import Revocation, RevocationKind
from dmc.spiffe_id import SpiffeId

__all__ = [
    "DEFAULT_SVID_TTL_SECONDS",
    "MAX_DEPTH_LIMIT",
    "AuthorityRecord",
    "AuthorityState",
    "Entry",
    "JoinToken",
    "Revocation",
    "RevocationKind",
    "validate_authority_id",
    "validate_dns_name",
]

DEFAULT_SVID_TTL_SECONDS = 3600
# SPEC §3: maxDepth is INTEGER (0..16).
MAX_DEPTH_LIMIT = 16

# RFC 1123 §2.1 host names: letters, digits and hyphens, labels of 1 to 63 characters
# that neither start nor end with a hyphen, at most 253 characters in all.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS_NAME_MAX = 253
# An authority id is one etcd key segment (SPEC §5, ``authorities/<id>``).
_AUTHORITY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_dns_name(name: str) -> str:
    """Return ``name`` unchanged if it is an RFC 1123 host name; raise ``InvalidArgument``."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("DNS name is empty")
    if _looks_like_an_address(name):
        # A client dialling an IP address accepts a DNS SAN that spells it (gRPC's host-name
        # check compares the text), so such a name would let an entry pass as any server
        # at that address, the CA included.
        raise InvalidArgument(f"DNS name {name!r} is an IP address, not a host name")
    if len(name) > _DNS_NAME_MAX:
        raise InvalidArgument(f"DNS name '{name[:40]}...' is longer than {_DNS_NAME_MAX} bytes")
    for label in name.split("."):
        if not _DNS_LABEL.fullmatch(label):
            raise InvalidArgument(
                f"DNS name {name!r}: label {label!r} is not a host name label "
                "(letters, digits and '-', 1 to 63 characters, no '-' at either end)"
            )
    return name


def _looks_like_an_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        # RFC 3696 §2: a top-level label is never all digits, so "10.0.0.300" is no host.
        return name.rsplit(".", 1)[-1].isdigit()
    return True


def validate_authority_id(authority_id: str) -> str:
    """Return ``authority_id`` unchanged if it can be one etcd key segment."""
    if not isinstance(authority_id, str) or not _AUTHORITY_ID.fullmatch(authority_id):
        raise InvalidArgument(
            f"authority id {authority_id!r} must be 1 to 128 of A-Z, a-z, 0-9, '.', '-', '_'"
        )
    return authority_id


class AuthorityState(enum.StrEnum):
    """Where an authority is in its rotation (SPEC §4, ``TrustBundle``)."""

    PREPARED = "PREPARED"
    ACTIVE = "ACTIVE"
    PREVIOUS = "PREVIOUS"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A registration entry: who may hold an SVID, and the scope it gets (SPEC §4)."""

    spiffe_id: SpiffeId
    permissions: tuple[str, ...]
    audiences: tuple[str, ...]
    max_depth: int
    svid_ttl_seconds: int = DEFAULT_SVID_TTL_SECONDS
    dns_names: tuple[str, ...] = ()
    created_at: datetime

    def __post_init__(self) -> None:
        _check_type("entry", "spiffe_id", self.spiffe_id, SpiffeId)
        _check_strings("entry", "permissions", self.permissions)
        _check_strings("entry", "audiences", self.audiences)
        _check_int("entry", "max_depth", self.max_depth)
        if not 0 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise InvalidArgument(
                f"entry max_depth {self.max_depth} is outside 0..{MAX_DEPTH_LIMIT}"
            )
        _check_int("entry", "svid_ttl_seconds", self.svid_ttl_seconds)
        if self.svid_ttl_seconds <= 0:
            raise InvalidArgument(
                f"entry svid_ttl_seconds must be positive, not {self.svid_ttl_seconds}"
            )
        _check_strings("entry", "dns_names", self.dns_names)
        for name in self.dns_names:
            validate_dns_name(name)
        lowered = [name.lower() for name in self.dns_names]
        if len(set(lowered)) != len(lowered):
            raise InvalidArgument(f"entry lists a DNS name twice: {list(self.dns_names)}")
        _check_time("entry", "created_at", self.created_at)

    def to_json(self) -> bytes:
        """The entry as etcd stores it."""
        return _dump(
            {
                "spiffe_id": str(self.spiffe_id),
                "permissions": list(self.permissions),
                "audiences": list(self.audiences),
                "max_depth": self.max_depth,
                "svid_ttl_seconds": self.svid_ttl_seconds,
                "dns_names": list(self.dns_names),
                "created_at": _format_time(self.created_at),
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """Read an entry written by :meth:`to_json`."""
        obj = _load("entry", data)
        return cls(
            spiffe_id=_spiffe_id("entry", obj),
            permissions=_string_tuple("entry", obj, "permissions"),
            audiences=_string_tuple("entry", obj, "audiences"),
            max_depth=_integer("entry", obj, "max_depth"),
            svid_ttl_seconds=_integer(
                "entry", obj, "svid_ttl_seconds", default=DEFAULT_SVID_TTL_SECONDS
            ),
            dns_names=_string_tuple("entry", obj, "dns_names", default=()),
            created_at=_time("entry", obj, "created_at"),
        )


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A single-use join token, bound to one entry's SPIFFE ID (SPEC §4, Bootstrap).

    etcd holds it under the SHA-256 of the token, never the token itself.
    """

    spiffe_id: SpiffeId
    expires_at: datetime

    def __post_init__(self) -> None:
        _check_type("join token", "spiffe_id", self.spiffe_id, SpiffeId)
        _check_time("join token", "expires_at", self.expires_at)

    def to_json(self) -> bytes:
        """The token record as etcd stores it."""
        return _dump(
            {"spiffe_id": str(self.spiffe_id), "expires_at": _format_time(self.expires_at)}
        )

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """Read a token record written by :meth:`to_json`."""
        obj = _load("join token", data)
        return cls(
            spiffe_id=_spiffe_id("join token", obj),
            expires_at=_time("join token", obj, "expires_at"),
        )


@dataclass(frozen=True, slots=True)
class AuthorityRecord:
    """A signing authority as etcd holds it; the key is sealed (SPEC §5).

    ``certificate_chain_pem`` starts with the signing certificate and ends with the root.
    ``state_since`` is when it entered its state (``None``: at ``created_at``); for a
    PREVIOUS authority that is when it stopped signing, which retirement counts from.
    """

    id: str
    state: AuthorityState
    certificate_chain_pem: bytes
    sealed_key: bytes
    created_at: datetime
    state_since: datetime | None = None

    def __post_init__(self) -> None:
        validate_authority_id(self.id)
        _check_type("authority", "state", self.state, AuthorityState)
        _check_type("authority", "certificate_chain_pem", self.certificate_chain_pem, bytes)
        if not self.certificate_chain_pem.isascii():
            raise InvalidArgument(f"authority {self.id}: certificate_chain_pem is not PEM text")
        _check_type("authority", "sealed_key", self.sealed_key, bytes)
        _check_time("authority", "created_at", self.created_at)
        if self.state_since is not None:
            _check_time("authority", "state_since", self.state_since)

    def to_json(self) -> bytes:
        """The authority as etcd stores it; the sealed key as base64."""
        obj = {
            "id": self.id,
            "state": self.state.value,
            "certificate_chain_pem": self.certificate_chain_pem.decode("ascii"),
            "sealed_key": base64.b64encode(self.sealed_key).decode("ascii"),
            "created_at": _format_time(self.created_at),
        }
        if self.state_since is not None:
            obj["state_since"] = _format_time(self.state_since)
        return _dump(obj)

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """Read an authority written by :meth:`to_json`."""
        obj = _load("authority", data)
        state_text = _string("authority", obj, "state")
        try:
            state = AuthorityState(state_text)
        except ValueError:
            raise InvalidArgument(
                f"authority JSON: state {state_text!r} is not one of "
                f"{[s.value for s in AuthorityState]}"
            ) from None
        try:
            sealed_key = base64.b64decode(_string("authority", obj, "sealed_key"), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("authority JSON: sealed_key is not base64") from None
        return cls(
            id=_string("authority", obj, "id"),
            state=state,
            certificate_chain_pem=_string("authority", obj, "certificate_chain_pem").encode(),
            sealed_key=sealed_key,
            created_at=_time("authority", obj, "created_at"),
            state_since=_time("authority", obj, "state_since") if "state_since" in obj else None,
        )

    def with_state(self, state: AuthorityState, at: datetime | None = None) -> AuthorityRecord:
        """The same authority in another state, entered ``at`` (now by default)."""
        if state is self.state:
            return self
        return AuthorityRecord(
            id=self.id,
            state=state,
            certificate_chain_pem=self.certificate_chain_pem,
            sealed_key=self.sealed_key,
            created_at=self.created_at,
            state_since=(at or datetime.now(UTC)).replace(microsecond=0),
        )


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _load(record: str, data: bytes) -> Mapping[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise InvalidArgument(f"{record} JSON is malformed: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{record} JSON is not an object")
    return obj


def _field(record: str, obj: Mapping[str, Any], name: str) -> Any:
    if name not in obj:
        raise InvalidArgument(f"{record} JSON lacks the field '{name}'")
    return obj[name]


def _string(record: str, obj: Mapping[str, Any], name: str) -> str:
    value = _field(record, obj, name)
    if not isinstance(value, str):
        raise InvalidArgument(f"{record} JSON: '{name}' is not a string")
    return value


def _integer(record: str, obj: Mapping[str, Any], name: str, *, default: int | None = None) -> int:
    if default is not None and name not in obj:
        return default
    value = _field(record, obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{record} JSON: '{name}' is not an integer")
    return value


def _string_tuple(
    record: str,
    obj: Mapping[str, Any],
    name: str,
    *,
    default: tuple[str, ...] | None = None,
) -> tuple[str, ...]:
    if default is not None and name not in obj:
        return default
    value = _field(record, obj, name)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{record} JSON: '{name}' is not a list of strings")
    return tuple(value)


def _spiffe_id(record: str, obj: Mapping[str, Any]) -> SpiffeId:
    return SpiffeId.parse(_string(record, obj, "spiffe_id"))


def _time(record: str, obj: Mapping[str, Any], name: str) -> datetime:
    text = _string(record, obj, name)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"{record} JSON: '{name}' is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise InvalidArgument(f"{record} JSON: '{name}' has no time zone")
    return value.astimezone(UTC)


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_type(record: str, name: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise InvalidArgument(f"{record} {name} must be a {kind.__name__}")


def _check_int(record: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{record} {name} must be an integer")


def _check_strings(record: str, name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{record} {name} must be a tuple of strings")


def _check_time(record: str, name: str, value: object) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidArgument(f"{record} {name} must be a timezone-aware datetime")
