"""dmc.revocation: the revocation rule of SPEC §3, serial spelling (§5), proto and JSON forms."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from certgen import make_leaf, make_root
from dmc.errors import InvalidArgument, InvalidSpiffeId, PermissionDenied
from dmc.revocation import (
    Revocation,
    RevocationKind,
    RevocationSet,
    normalize_serial,
    revocation_from_proto,
    revocation_to_proto,
)
from dmc.scope import DelegationScope
from dmc.svid import Svid, parse_svid
from dmc.v1 import ca_pb2
from dmc_ca import model

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
WEB = "spiffe://example.org/web"
JOB = "spiffe://example.org/web/job"
ROOT = make_root("example.org")


def svid(
    spiffe_id: str = WEB,
    *,
    serial: int = 0x1A2B,
    issued_at: datetime = NOW,
    delegators: tuple[str, ...] = (),
) -> Svid:
    scope = DelegationScope(permissions=("*",), audiences=("*",), delegators=delegators)
    leaf = make_leaf(
        ROOT, uris=[spiffe_id], scope=scope, serial_number=serial, issued_at=issued_at
    )
    return parse_svid(leaf.certificate)


def by_id(spiffe_id: str, revoked_at: datetime, reason: str = "compromised") -> Revocation:
    return Revocation(RevocationKind.ID, spiffe_id, reason, revoked_at, revoked_at + timedelta(1))


def by_serial(serial: str, reason: str = "key lost") -> Revocation:
    return Revocation(RevocationKind.SERIAL, serial, reason, NOW, NOW + timedelta(days=1))


# -- serial spelling (SPEC §5) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1a2b", "1a2b"),
        ("1A2B", "1a2b"),
        ("1a:2B", "1a2b"),
        ("00:8F:01", "8f01"),
        ("0a1b2c", "a1b2c"),
    ],
)
def test_normalize_serial_accepts_any_case_and_colons(text: str, expected: str) -> None:
    assert normalize_serial(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not hexadecimal"),
        ("::", "not hexadecimal"),
        ("0x1a", "not hexadecimal"),
        ("1a-2b", "not hexadecimal"),
        ("xyz", "not hexadecimal"),
        ("00", "zero"),
        ("1" * 41, "longer than 20 octets"),
    ],
)
def test_normalize_serial_refuses_what_is_no_serial(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        normalize_serial(text)


def test_revocation_keeps_a_serial_in_the_spelling_of_spec_5() -> None:
    assert by_serial("00:1A:2B").value == "1a2b"


def test_revocation_refuses_an_invalid_spiffe_id_without_normalising_it() -> None:
    with pytest.raises(InvalidSpiffeId):
        by_id("spiffe://Example.org/web", NOW)


def test_revocation_refuses_naive_times() -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Revocation(RevocationKind.ID, WEB, "r", NOW.replace(tzinfo=None), NOW)


def test_ca_model_revocation_is_the_shared_class() -> None:
    assert model.Revocation is Revocation


# -- the rule of SPEC §3 ---------------------------------------------------------------------


def test_revoked_serial_catches_that_certificate() -> None:
    revocations = RevocationSet.of([by_serial("1a2b", "key lost")], revision=7)

    with pytest.raises(
        PermissionDenied, match=r"^certificate serial 1a2b was revoked at .*: key lost"
    ):
        revocations.check(svid(serial=0x1A2B))


def test_revoked_serial_of_an_older_certificate_does_not_touch_a_newer_one() -> None:
    revocations = RevocationSet.of([by_serial("1a2b")], revision=7)

    revocations.check(svid(serial=0x1A2C, issued_at=NOW + timedelta(minutes=30)))


def test_revoked_id_catches_certificates_issued_before_or_at_the_revocation() -> None:
    revocations = RevocationSet.of([by_id(WEB, NOW, "stolen")], revision=3)

    for issued_at in (NOW - timedelta(hours=1), NOW):
        with pytest.raises(
            PermissionDenied,
            match=rf"^{re.escape(WEB)} was revoked at 2026-12-04T12:00:00Z: stolen$",
        ):
            revocations.check(svid(issued_at=issued_at))


def test_reenrolment_after_an_id_revocation_is_not_caught() -> None:
    revocations = RevocationSet.of([by_id(WEB, NOW)], revision=3)

    revocations.check(svid(issued_at=NOW + timedelta(seconds=1)))


def test_revoked_delegator_catches_its_delegates_naming_the_delegator() -> None:
    revocations = RevocationSet.of([by_id(WEB, NOW, "breach")], revision=3)
    delegate = svid(JOB, delegators=(WEB,), issued_at=NOW - timedelta(minutes=5))

    with pytest.raises(
        PermissionDenied,
        match=rf"^{re.escape(WEB)} was revoked at .* \(delegator of {re.escape(JOB)}\): breach$",
    ):
        revocations.check(delegate)


def test_revoked_origin_reaches_every_delegate_down_the_chain() -> None:
    origin = "spiffe://example.org/web"
    middle = "spiffe://example.org/web/a"
    revocations = RevocationSet.of([by_id(origin, NOW)], revision=3)

    with pytest.raises(PermissionDenied, match=re.escape("delegator of " + origin + "/a/b")):
        revocations.check(svid("spiffe://example.org/web/a/b", delegators=(origin, middle)))


def test_delegate_issued_after_its_delegator_was_revoked_is_not_caught() -> None:
    revocations = RevocationSet.of([by_id(WEB, NOW)], revision=3)

    revocations.check(svid(JOB, delegators=(WEB,), issued_at=NOW + timedelta(seconds=5)))


def test_revoking_a_delegate_does_not_touch_its_delegator() -> None:
    revocations = RevocationSet.of([by_id(JOB, NOW)], revision=3)

    revocations.check(svid(WEB, issued_at=NOW - timedelta(minutes=5)))


def test_id_revocation_is_compared_by_whole_id_not_by_prefix() -> None:
    revocations = RevocationSet.of([by_id(WEB, NOW)], revision=3)

    revocations.check(svid("spiffe://example.org/webserver", issued_at=NOW - timedelta(1)))
    revocations.check(svid(JOB, issued_at=NOW - timedelta(1)))


def test_empty_set_revokes_nothing() -> None:
    RevocationSet.empty().check(svid())
    assert len(RevocationSet.empty()) == 0


# -- changes ---------------------------------------------------------------------------------


def test_with_changes_removes_then_adds_and_keeps_the_revision() -> None:
    first = by_id(WEB, NOW, "first")
    again = by_id(WEB, NOW + timedelta(minutes=1), "again")
    serial = by_serial("ff")
    revocations = RevocationSet.of([first, serial], revision=3)

    changed = revocations.with_changes(added=[again], removed=[first, serial], revision=9)

    assert changed.revision == 9
    assert list(changed) == [again]
    assert first in revocations and first not in changed
    assert len(revocations) == 2, "a set never changes"


def test_with_event_applies_a_snapshot_then_changes() -> None:
    first = by_id(WEB, NOW)
    serial = by_serial("ff")
    snapshot = ca_pb2.RevocationEvent(
        revision=5, snapshot=True, added=[revocation_to_proto(first), revocation_to_proto(serial)]
    )
    change = ca_pb2.RevocationEvent(revision=6, removed=[revocation_to_proto(serial)])

    stale = RevocationSet.of([by_id(JOB, NOW)], revision=1)
    after_snapshot = stale.with_event(snapshot)
    after_change = after_snapshot.with_event(change)

    assert (after_snapshot.revision, set(after_snapshot)) == (5, {first, serial})
    assert (after_change.revision, list(after_change)) == (6, [first])


# -- forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("revocation", [by_serial("1a2b"), by_id(WEB, NOW)])
def test_revocation_round_trips_through_proto_and_json(revocation: Revocation) -> None:
    assert revocation_from_proto(revocation_to_proto(revocation)) == revocation
    assert Revocation.from_json(revocation.to_json()) == revocation


def test_revocation_from_proto_refuses_a_message_naming_nothing() -> None:
    message = revocation_to_proto(by_serial("1a2b"))
    message.ClearField("target")

    with pytest.raises(InvalidArgument, match="neither a serial nor a SPIFFE ID"):
        revocation_from_proto(message)


def test_revocation_from_json_refuses_an_unknown_kind() -> None:
    data = by_serial("1a2b").to_json().replace(b'"serial"', b'"name"')

    with pytest.raises(InvalidArgument, match="kind 'name'"):
        Revocation.from_json(data)
