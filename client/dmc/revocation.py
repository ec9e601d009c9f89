"""Revocations: what was revoked, and whether a certificate is caught by it (SPEC §3).

A certificate is revoked if its serial is revoked, or if its SPIFFE ID or any of its
delegators' IDs was revoked at or after the moment the certificate was issued (its
``notBefore`` plus the 30 s back-dating of SPEC §2). Revoking a delegator's ID therefore
reaches every delegate below it, and an identity enrolled again after a revocation is not
caught by it.

:class:`RevocationSet` answers that question with dictionary lookups only, so the CA and
the server interceptor can ask it on every call.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Self

from google.protobuf.timestamp_pb2 import Timestamp

from dmc.errors import InvalidArgument, PermissionDenied
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid
from dmc.v1 import ca_pb2

__all__ = [
    "Revocation",
    "RevocationKind",
    "RevocationSet",
    "normalize_serial",
    "revocation_from_proto",
    "revocation_to_proto",
    "serial_hex",
]

# RFC 5280 §4.1.2.2: a serial number is a positive integer of at most 20 octets.
_MAX_SERIAL_OCTETS = 20
_HEX = re.compile(r"[0-9A-Fa-f]+")


class RevocationKind(enum.StrEnum):
    """What a revocation names: one certificate's serial, or a SPIFFE ID."""

    SERIAL = "serial"
    ID = "id"


def serial_hex(serial: int) -> str:
    """A serial as SPEC §5 writes it: lower-case hex without separators or leading zeros."""
    return format(serial, "x")


def normalize_serial(text: str) -> str:
    """Read a serial in any case, with or without colons, as SPEC §5's lower-case hex.

    Leading zeros are dropped (``00:8f`` is ``8f``), since tools print a serial whose top
    bit is set with a leading zero octet. Raises ``InvalidArgument`` for anything else.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"a serial is text, not {type(text).__name__}")
    digits = text.strip().replace(":", "")
    if not _HEX.fullmatch(digits):
        raise InvalidArgument(
            f"serial {text[:80]!r} is not hexadecimal (digits 0-9 and a-f, colons allowed)"
        )
    value = int(digits, 16)
    # RFC 5280 §4.1.2.2: positive, at most 20 octets.
    if value == 0:
        raise InvalidArgument(f"serial {text[:80]!r} is zero; a certificate serial is positive")
    if value.bit_length() > 8 * _MAX_SERIAL_OCTETS:
        raise InvalidArgument(
            f"serial {text[:80]!r} is longer than {_MAX_SERIAL_OCTETS} octets (RFC 5280 §4.1.2.2)"
        )
    return serial_hex(value)


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked serial (lower-case hex) or SPIFFE ID, with its reason and lifetime.

    ``expires_at`` is when the last certificate the revocation could affect has expired;
    etcd drops the record then (SPEC §5). Times are UTC.
    """

    kind: RevocationKind
    value: str
    reason: str
    revoked_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        try:
            kind = RevocationKind(self.kind)
        except ValueError:
            raise InvalidArgument(
                f"revocation kind {self.kind!r} is not 'serial' or 'id'"
            ) from None
        if not isinstance(self.value, str):
            raise InvalidArgument("revocation value must be a str")
        if kind is RevocationKind.SERIAL:
            # SPEC §5: a serial is kept as lower-case hex without separators; any other
            # spelling of the same number is rewritten, so lookups by serial find it.
            object.__setattr__(self, "value", normalize_serial(self.value))
        else:
            # SPEC §2: an ID is checked, never normalised.
            SpiffeId.parse(self.value)
        if not isinstance(self.reason, str):
            raise InvalidArgument("revocation reason must be a str")
        for name in ("revoked_at", "expires_at"):
            moment = getattr(self, name)
            if not isinstance(moment, datetime) or moment.tzinfo is None:
                raise InvalidArgument(f"revocation {name} must be a timezone-aware datetime")
        # The stored form is canonical: the enum member and UTC times, whatever was given.
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "revoked_at", self.revoked_at.astimezone(UTC))
        object.__setattr__(self, "expires_at", self.expires_at.astimezone(UTC))

    @property
    def key(self) -> tuple[RevocationKind, str]:
        """What the revocation names; at most one revocation per key is in force."""
        return (self.kind, self.value)

    def describe(self) -> str:
        """``certificate serial 1a2b`` or the SPIFFE ID."""
        if self.kind is RevocationKind.SERIAL:
            return f"certificate serial {self.value}"
        return self.value

    def to_json(self) -> bytes:
        """The revocation as etcd stores it (compact JSON, sorted keys)."""
        data = {
            "kind": self.kind.value,
            "value": self.value,
            "reason": self.reason,
            "revoked_at": _format_time(self.revoked_at),
            "expires_at": _format_time(self.expires_at),
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """Read a revocation written by :meth:`to_json`; ``InvalidArgument`` otherwise."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise InvalidArgument(f"revocation JSON is malformed: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidArgument("revocation JSON is not an object")
        kind = _json_string(obj, "kind")
        if kind not in {k.value for k in RevocationKind}:
            raise InvalidArgument(f"revocation JSON: kind {kind!r} is not 'serial' or 'id'")
        return cls(
            kind=RevocationKind(kind),
            value=_json_string(obj, "value"),
            reason=_json_string(obj, "reason"),
            revoked_at=_json_time(obj, "revoked_at"),
            expires_at=_json_time(obj, "expires_at"),
        )


@dataclass(frozen=True, slots=True)
class RevocationSet:
    """The revocations in force at an etcd ``revision``, indexed for lookups.

    Build it with :meth:`empty`, :meth:`of` or :meth:`with_changes`; it never changes.
    """

    revision: int
    by_serial: Mapping[str, Revocation]
    by_id: Mapping[str, Revocation]

    @classmethod
    def empty(cls, revision: int = 0) -> RevocationSet:
        """No revocation at all."""
        return cls(revision, MappingProxyType({}), MappingProxyType({}))

    @classmethod
    def of(cls, revocations: Iterable[Revocation], revision: int) -> RevocationSet:
        """Exactly ``revocations``; of two with the same key, the later one counts."""
        return cls.empty().with_changes(revocations, (), revision)

    def with_changes(
        self,
        added: Iterable[Revocation],
        removed: Iterable[Revocation],
        revision: int,
    ) -> RevocationSet:
        """A new set at ``revision``: ``removed`` taken out (by key), then ``added`` put in.

        Removal goes first, so a revocation replaced under the same key (an ID revoked
        again) arrives as the old one removed and the new one added.
        """
        serials = dict(self.by_serial)
        ids = dict(self.by_id)
        for revocation in removed:
            table = serials if revocation.kind is RevocationKind.SERIAL else ids
            table.pop(revocation.value, None)
        for revocation in added:
            table = serials if revocation.kind is RevocationKind.SERIAL else ids
            table[revocation.value] = revocation
        return RevocationSet(revision, MappingProxyType(serials), MappingProxyType(ids))

    def with_event(self, event: ca_pb2.RevocationEvent) -> RevocationSet:
        """Apply one ``WatchRevocations`` message: a snapshot replaces the whole set."""
        added = [revocation_from_proto(r) for r in event.added]
        if event.snapshot:
            return RevocationSet.of(added, event.revision)
        removed = [revocation_from_proto(r) for r in event.removed]
        return self.with_changes(added, removed, event.revision)

    def __len__(self) -> int:
        return len(self.by_serial) + len(self.by_id)

    def __iter__(self) -> Iterator[Revocation]:
        """Every revocation, serials first, each kind ordered by value."""
        for table in (self.by_serial, self.by_id):
            for value in sorted(table):
                yield table[value]

    def __contains__(self, revocation: object) -> bool:
        if not isinstance(revocation, Revocation):
            return False
        table = self.by_serial if revocation.kind is RevocationKind.SERIAL else self.by_id
        return table.get(revocation.value) == revocation

    def find(self, svid: Svid) -> tuple[Revocation, str] | None:
        """The revocation that catches ``svid`` and the text that names it, or ``None``."""
        # SPEC §3: a revoked serial catches that one certificate, whenever it was issued.
        revocation = self.by_serial.get(serial_hex(svid.serial))
        if revocation is not None:
            return revocation, _denial(revocation, "")
        if not self.by_id:
            return None

        # SPEC §3: an ID revocation catches certificates issued up to the moment it was
        # made; issued_at is notBefore + 30 s (SPEC §2). Whole-second certificate times
        # make a certificate issued in the second of the revocation count as caught.
        issued_at = svid.issued_at
        spiffe_id = str(svid.spiffe_id)
        revocation = self.by_id.get(spiffe_id)
        if revocation is not None and revocation.revoked_at >= issued_at:
            return revocation, _denial(revocation, "")
        for delegator in svid.scope.delegators:
            revocation = self.by_id.get(delegator)
            if revocation is not None and revocation.revoked_at >= issued_at:
                return revocation, _denial(revocation, f" (delegator of {spiffe_id})")
        return None

    def check(self, svid: Svid) -> None:
        """Raise ``PermissionDenied`` naming the revocation if ``svid`` is revoked."""
        found = self.find(svid)
        if found is not None:
            raise PermissionDenied(found[1])


def revocation_from_proto(message: ca_pb2.Revocation) -> Revocation:
    """Read a ``dmc.v1.Revocation``; ``InvalidArgument`` if it names nothing valid."""
    target = message.WhichOneof("target")
    if target is None:
        raise InvalidArgument("revocation names neither a serial nor a SPIFFE ID")
    if not message.HasField("revoked_at") or not message.HasField("expires_at"):
        raise InvalidArgument("revocation lacks revoked_at or expires_at")
    if target == "serial":
        kind, value = RevocationKind.SERIAL, normalize_serial(message.serial)
    else:
        kind, value = RevocationKind.ID, str(SpiffeId.parse(message.spiffe_id))
    return Revocation(
        kind=kind,
        value=value,
        reason=message.reason,
        revoked_at=message.revoked_at.ToDatetime(tzinfo=UTC),
        expires_at=message.expires_at.ToDatetime(tzinfo=UTC),
    )


def revocation_to_proto(revocation: Revocation) -> ca_pb2.Revocation:
    """The revocation as a ``dmc.v1.Revocation`` message."""
    message = ca_pb2.Revocation(
        reason=revocation.reason,
        revoked_at=_timestamp(revocation.revoked_at),
        expires_at=_timestamp(revocation.expires_at),
    )
    if revocation.kind is RevocationKind.SERIAL:
        message.serial = revocation.value
    else:
        message.spiffe_id = revocation.value
    return message


def _denial(revocation: Revocation, relation: str) -> str:
    reason = revocation.reason or "no reason given"
    when = _format_time(revocation.revoked_at)
    return f"{revocation.describe()} was revoked at {when}{relation}: {reason}"


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_string(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise InvalidArgument(f"revocation JSON: '{name}' is missing or not a string")
    return value


def _json_time(obj: Mapping[str, Any], name: str) -> datetime:
    text = _json_string(obj, name)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"revocation JSON: '{name}' is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise InvalidArgument(f"revocation JSON: '{name}' has no time zone")
    return moment.astimezone(UTC)
