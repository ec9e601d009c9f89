"""The etcd records: JSON round trips, and refusal of malformed JSON and values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dmc.errors import InvalidArgument, InvalidSpiffeId
from dmc.spiffe_id import SpiffeId
from dmc_ca.model import (
    DEFAULT_SVID_TTL_SECONDS,
    AuthorityRecord,
    AuthorityState,
    Entry,
    JoinToken,
    Revocation,
)

NOW = datetime(2026, 12, 4, 15, 46, 0, tzinfo=UTC)
WEB = SpiffeId.parse("spiffe://example.org/web/mid")


def _entry(**changes: object) -> Entry:
    fields: dict[str, object] = {
        "spiffe_id": WEB,
        "permissions": ("/pkg.Svc/*",),
        "audiences": ("spiffe://example.org/db",),
        "max_depth": 2,
        "svid_ttl_seconds": 600,
        "dns_names": ("web.example.org",),
        "created_at": NOW,
    }
    fields.update(changes)
    return Entry(**fields)  # type: ignore[arg-type]


def test_entry_round_trips_through_json() -> None:
    entry = _entry()

    assert Entry.from_json(entry.to_json()) == entry


def test_entry_json_is_readable_and_names_the_id() -> None:
    obj = json.loads(_entry().to_json())

    assert obj["spiffe_id"] == "spiffe://example.org/web/mid"
    assert obj["created_at"] == "2026-12-04T15:46:00Z"


def test_entry_defaults_ttl_and_dns_names_when_absent() -> None:
    obj = json.loads(_entry().to_json())
    del obj["svid_ttl_seconds"], obj["dns_names"]

    entry = Entry.from_json(json.dumps(obj).encode())

    assert entry.svid_ttl_seconds == DEFAULT_SVID_TTL_SECONDS
    assert entry.dns_names == ()


def test_entry_ignores_unknown_fields() -> None:
    obj = json.loads(_entry().to_json())
    obj["added_later"] = True

    assert Entry.from_json(json.dumps(obj).encode()) == _entry()


def test_times_in_other_zones_are_read_as_utc() -> None:
    entry = _entry(created_at=NOW.astimezone(timezone(timedelta(hours=2))))

    assert Entry.from_json(entry.to_json()).created_at == NOW


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "entry JSON is malformed"),
        (b"\xff\xfe", "entry JSON is malformed"),
        (b"[]", "entry JSON is not an object"),
        (b"{}", "lacks the field 'spiffe_id'"),
    ],
)
def test_entry_from_malformed_json_raises_invalid_argument(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Entry.from_json(data)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_depth", "2", "'max_depth' is not an integer"),
        ("max_depth", True, "'max_depth' is not an integer"),
        ("permissions", "*", "'permissions' is not a list of strings"),
        ("created_at", "yesterday", "'created_at' is not an ISO 8601 time"),
        ("created_at", "2026-12-04T15:46:00", "'created_at' has no time zone"),
        ("max_depth", 17, "outside 0..16"),
        ("svid_ttl_seconds", 0, "must be positive"),
        ("dns_names", ["web_1.example.org"], "label 'web_1'"),
    ],
)
def test_entry_from_json_names_the_bad_field(field: str, value: object, message: str) -> None:
    obj = json.loads(_entry().to_json())
    obj[field] = value

    with pytest.raises(InvalidArgument, match=message):
        Entry.from_json(json.dumps(obj).encode())


def test_entry_from_json_refuses_an_invalid_spiffe_id() -> None:
    obj = json.loads(_entry().to_json())
    obj["spiffe_id"] = "spiffe://example.org/a/../admin"

    with pytest.raises(InvalidSpiffeId):
        Entry.from_json(json.dumps(obj).encode())


def test_entry_refuses_the_same_dns_name_twice_in_any_case() -> None:
    with pytest.raises(InvalidArgument, match="DNS name twice"):
        _entry(dns_names=("web.example.org", "WEB.example.org"))


def test_entry_refuses_a_naive_time() -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        _entry(created_at=datetime(2026, 1, 1))


def test_join_token_round_trips_through_json() -> None:
    token = JoinToken(spiffe_id=WEB, expires_at=NOW + timedelta(minutes=5))

    assert JoinToken.from_json(token.to_json()) == token


def test_join_token_from_json_refuses_a_missing_expiry() -> None:
    with pytest.raises(InvalidArgument, match="lacks the field 'expires_at'"):
        JoinToken.from_json(b'{"spiffe_id": "spiffe://example.org/web"}')


def test_authority_round_trips_with_its_sealed_key() -> None:
    record = AuthorityRecord(
        id="a1b2c3",
        state=AuthorityState.ACTIVE,
        certificate_chain_pem=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        sealed_key=bytes(range(256)),
        created_at=NOW,
    )

    assert AuthorityRecord.from_json(record.to_json()) == record
    assert record.with_state(AuthorityState.PREVIOUS).state is AuthorityState.PREVIOUS


def test_authority_from_json_refuses_an_unknown_state() -> None:
    obj = {
        "id": "a1",
        "state": "RETIRED",
        "certificate_chain_pem": "",
        "sealed_key": "",
        "created_at": "2026-12-04T15:46:00Z",
    }

    with pytest.raises(InvalidArgument, match="state 'RETIRED' is not one of"):
        AuthorityRecord.from_json(json.dumps(obj).encode())


def test_authority_from_json_refuses_a_sealed_key_that_is_not_base64() -> None:
    obj = {
        "id": "a1",
        "state": "ACTIVE",
        "certificate_chain_pem": "",
        "sealed_key": "not base64!",
        "created_at": "2026-12-04T15:46:00Z",
    }

    with pytest.raises(InvalidArgument, match="sealed_key is not base64"):
        AuthorityRecord.from_json(json.dumps(obj).encode())


def test_authority_refuses_an_id_that_is_not_one_key_segment() -> None:
    with pytest.raises(InvalidArgument, match="authority id 'a/b'"):
        AuthorityRecord(
            id="a/b",
            state=AuthorityState.ACTIVE,
            certificate_chain_pem=b"",
            sealed_key=b"",
            created_at=NOW,
        )


def test_revocation_round_trips_through_json() -> None:
    revocation = Revocation(
        kind="serial",
        value="0a1b2c",
        reason="key compromise",
        revoked_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )

    assert Revocation.from_json(revocation.to_json()) == revocation


def test_revocation_refuses_an_unknown_kind() -> None:
    with pytest.raises(InvalidArgument, match="kind 'name'"):
        Revocation(kind="name", value="x", reason="", revoked_at=NOW, expires_at=NOW)  # type: ignore[arg-type]
