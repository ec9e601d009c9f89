"""Revocation at a real CA replica, real etcd and real gRPC (SPEC §3, §4, §5, §6).

Revoke by serial and by SPIFFE ID through the Admin service and through ``dmc-admin``; a
revoked caller is refused Renew, Delegate and Admin with PERMISSION_DENIED naming the
revocation; the etcd keys carry leases; WatchRevocations streams a snapshot then changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from etcd3aio import Etcd3Client

from ca_harness import CaHarness
from certgen import new_key
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.revocation import Revocation, RevocationKind, revocation_from_proto
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc

TIMEOUT = 15
DMC_ADMIN = Path(sys.executable).with_name("dmc-admin")
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Workload:
    """An SVID the CA issued and its private key."""

    spiffe_id: str
    key: PrivateKeyTypes
    response: ca_pb2.SVIDResponse

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.response.certificate_chain[0])

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    def channel(self, ca: CaHarness) -> grpc.Channel:
        chain = [x509.load_der_x509_certificate(d) for d in self.response.certificate_chain]
        return ca.channel(certificates_to_pem(chain), private_key_to_pem(self.key))


def make_csr(key: PrivateKeyTypes, spiffe_id: str) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def bootstrap(ca: CaHarness, spiffe_id: str) -> Workload:
    key = new_key()
    request = ca_pb2.BootstrapRequest(
        join_token=ca.join_token(spiffe_id), csr=make_csr(key, spiffe_id)
    )
    with ca.bootstrap_channel() as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            request, timeout=TIMEOUT
        )
    return Workload(spiffe_id, key, response)


def renew(ca: CaHarness, caller: Workload) -> Workload:
    key = new_key()
    with caller.channel(ca) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=make_csr(key, caller.spiffe_id)), timeout=TIMEOUT
        )
    return Workload(caller.spiffe_id, key, response)


def delegate(ca: CaHarness, caller: Workload, spiffe_id: str) -> Workload:
    key = new_key()
    request = ca_pb2.DelegateRequest(
        csr=make_csr(key, spiffe_id),
        spiffe_id=spiffe_id,
        permissions=["/demo.Echo/*"],
        audiences=["*"],
        max_depth=0,
        ttl_seconds=600,
    )
    with caller.channel(ca) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Delegate(request, timeout=TIMEOUT)
    return Workload(spiffe_id, key, response)


def admin(ca: CaHarness, channel: grpc.Channel | None = None) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel or ca.admin_channel())


def revoke(ca: CaHarness, reason: str = "key compromise", **target: str) -> ca_pb2.Revocation:
    with ca.admin_channel() as channel:
        return admin(ca, channel).Revoke(
            admin_pb2.RevokeRequest(reason=reason, **target), timeout=TIMEOUT
        )


def list_revocations(ca: CaHarness) -> list[Revocation]:
    with ca.admin_channel() as channel:
        listed = admin(ca, channel).ListRevocations(
            admin_pb2.ListRevocationsRequest(), timeout=TIMEOUT
        )
    return [revocation_from_proto(r) for r in listed.revocations]


def refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details() or ""


def dmc_admin(ca: CaHarness, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    return subprocess.run(
        [
            str(DMC_ADMIN),
            "--ca",
            ca.address,
            "--cert",
            str(ca.data_dir / "admin.pem"),
            "--key",
            str(ca.data_dir / "admin.key"),
            "--bundle",
            str(ca.data_dir / "bundle.pem"),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )


def etcd_key_and_lease(ca: CaHarness, key: str) -> tuple[bytes, int, int]:
    """The value, lease TTL left and granted TTL of ``key``, read from etcd itself."""

    async def read() -> tuple[bytes, int, int]:
        client = Etcd3Client([ca.etcd_endpoint])
        await client.connect()
        try:
            assert client.kv is not None and client.lease is not None
            response = await client.kv.get(key)
            assert response.kvs, f"etcd has no key {key}"
            kv = response.kvs[0]
            assert kv.lease, f"{key} has no lease"
            lease = await client.lease.time_to_live(kv.lease)
            return kv.value, int(lease.TTL), int(lease.grantedTTL)
        finally:
            await client.close()

    return ca.run(read())


class EventReader:
    """Reads a WatchRevocations stream in a thread, so a test can wait with a deadline."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._events: list[ca_pb2.RevocationEvent] = []
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                with self._condition:
                    self._events.append(event)
                    self._condition.notify_all()
        except grpc.RpcError:
            pass

    def next(self, timeout: float) -> ca_pb2.RevocationEvent:
        with self._condition:
            if not self._condition.wait_for(lambda: bool(self._events), timeout):
                raise AssertionError(f"no WatchRevocations event within {timeout} s")
            return self._events.pop(0)

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5)


@pytest.fixture
def ops(ca: CaHarness) -> Iterator[Workload]:
    """A workload whose scope permits everything, the Admin service included."""
    spiffe_id = ca.create_entry("/ops", permissions=("*",), audiences=("*",), max_depth=2)
    yield bootstrap(ca, spiffe_id)


# ---------------------------------------------------------------- Revoke and its effects


def test_revoke_by_serial_refuses_that_certificate_and_not_a_newer_one(ca: CaHarness) -> None:
    web = bootstrap(ca, ca.create_entry("/web"))
    newer = renew(ca, web)

    answer = revoke(ca, reason="laptop stolen", serial=web.serial.upper())

    assert (answer.WhichOneof("target"), answer.serial) == ("serial", web.serial)
    code, details = refusal(lambda: renew(ca, web))
    assert code == PERMISSION_DENIED
    assert details.startswith(f"certificate serial {web.serial} was revoked at ")
    assert details.endswith(": laptop stolen")
    renew(ca, newer)


def test_revoked_id_is_refused_renew_delegate_and_admin_naming_the_revocation(
    ca: CaHarness, ops: Workload
) -> None:
    revoke(ca, reason="operator left", spiffe_id=ops.spiffe_id)

    for call in (
        lambda: renew(ca, ops),
        lambda: delegate(ca, ops, ops.spiffe_id + "/job"),
        lambda: admin(ca, ops.channel(ca)).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=TIMEOUT
        ),
        lambda: admin(ca, ops.channel(ca)).ListRevocations(
            admin_pb2.ListRevocationsRequest(), timeout=TIMEOUT
        ),
    ):
        code, details = refusal(call)
        assert code == PERMISSION_DENIED
        assert details.startswith(f"{ops.spiffe_id} was revoked at ")
        assert details.endswith(": operator left")


def test_revoking_a_delegator_refuses_the_delegates_renewal(ca: CaHarness, ops: Workload) -> None:
    job = delegate(ca, ops, ops.spiffe_id + "/job")
    renew(ca, job)

    revoke(ca, reason="breach", spiffe_id=ops.spiffe_id)

    code, details = refusal(lambda: renew(ca, job))
    assert code == PERMISSION_DENIED
    assert f"(delegator of {job.spiffe_id}): breach" in details


def test_revoking_a_delegate_leaves_its_delegator_working(ca: CaHarness, ops: Workload) -> None:
    job = delegate(ca, ops, ops.spiffe_id + "/job")

    revoke(ca, spiffe_id=job.spiffe_id)

    assert refusal(lambda: renew(ca, job))[0] == PERMISSION_DENIED
    renew(ca, ops)


def test_bootstrap_again_after_an_id_revocation_gives_a_working_svid(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    old = bootstrap(ca, spiffe_id)

    revoke(ca, spiffe_id=spiffe_id)
    # Within the same second as the revocation: the CA must not issue a born-revoked SVID.
    again = bootstrap(ca, spiffe_id)

    renew(ca, renew(ca, again))
    assert refusal(lambda: renew(ca, old))[0] == PERMISSION_DENIED


def test_revoking_an_id_again_keeps_one_record_with_the_new_reason(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")

    first = revocation_from_proto(revoke(ca, reason="first", spiffe_id=spiffe_id))
    second = revocation_from_proto(revoke(ca, reason="second", spiffe_id=spiffe_id))

    assert list_revocations(ca) == [second]
    assert second.revoked_at >= first.revoked_at
    assert second.expires_at >= first.expires_at


def test_list_revocations_shows_serials_and_ids(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    by_serial = revocation_from_proto(revoke(ca, serial="00:AB:CD"))
    by_id = revocation_from_proto(revoke(ca, spiffe_id=spiffe_id))

    assert list_revocations(ca) == [by_serial, by_id]
    assert by_serial.value == "abcd"
    assert by_id.kind is RevocationKind.ID


# ---------------------------------------------------------------- etcd layout (SPEC §5)


def test_revocations_are_etcd_keys_with_leases_outliving_the_longest_svid(
    ca: CaHarness,
) -> None:
    longest = 3 * 24 * 3600  # longer than the admin entry's 24 h, so it is the largest
    spiffe_id = ca.create_entry("/team/web", ttl_seconds=longest)
    before = datetime.now(UTC)

    revoke(ca, serial="1A:2B")
    revoke(ca, spiffe_id=spiffe_id)

    base = f"{ca.prefix}{ca.trust_domain}/revocations/"
    for key, kind, value in (
        (base + "serial/1a2b", RevocationKind.SERIAL, "1a2b"),
        (base + "id/team/web", RevocationKind.ID, spiffe_id),
    ):
        data, ttl_left, granted = etcd_key_and_lease(ca, key)
        record = Revocation.from_json(data)
        assert (record.kind, record.value) == (kind, value)
        # SPEC §5: the lease ends after the last certificate the revocation could affect
        # has expired: one issued just before it, living the longest SVID TTL.
        assert ttl_left > longest
        assert granted <= longest + 600, "a lease far beyond any certificate's life"
        assert record.expires_at >= before + timedelta(seconds=longest)


# ---------------------------------------------------------------- WatchRevocations


def test_watch_revocations_sends_a_snapshot_then_changes_and_lease_expiries(
    ca: CaHarness, ops: Workload
) -> None:
    kept = revocation_from_proto(revoke(ca, serial="aa"))
    stream = ca_pb2_grpc.CertificateAuthorityStub(ops.channel(ca)).WatchRevocations(
        ca_pb2.WatchRevocationsRequest(), timeout=60
    )
    events = EventReader(stream)
    try:
        snapshot = events.next(TIMEOUT)
        assert snapshot.snapshot
        assert [revocation_from_proto(r) for r in snapshot.added] == [kept]
        assert snapshot.revision >= 1

        added = revocation_from_proto(revoke(ca, spiffe_id=ca.create_entry("/web")))
        change = events.next(TIMEOUT)
        assert not change.snapshot
        assert [revocation_from_proto(r) for r in change.added] == [added]
        assert not change.removed
        assert change.revision > snapshot.revision

        # A revocation whose lease runs out two seconds from now: etcd deletes it, and
        # the stream says so.
        now = datetime.now(UTC)
        short = Revocation(RevocationKind.SERIAL, "bb", "short", now, now + timedelta(seconds=2))
        assert ca.store is not None
        ca.run(ca.store.put_revocation(short))
        assert [revocation_from_proto(r) for r in events.next(TIMEOUT).added] == [short]
        expiry = events.next(TIMEOUT)
        assert [revocation_from_proto(r) for r in expiry.removed] == [short]
        assert not expiry.added
        assert set(list_revocations(ca)) == {kept, added}
    finally:
        events.close()


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        ({"reason": "r"}, "serial or a SPIFFE ID"),
        ({"serial": "", "reason": "r"}, "not hexadecimal"),
        ({"serial": "xyz", "reason": "r"}, "not hexadecimal"),
        ({"serial": "00", "reason": "r"}, "zero"),
        ({"serial": "1" * 41, "reason": "r"}, "20 octets"),
        ({"spiffe_id": "spiffe://example.org/a/../b", "reason": "r"}, "segment '..'"),
        ({"spiffe_id": "spiffe://other.org/web", "reason": "r"}, "not in trust domain"),
        ({"spiffe_id": "spiffe://example.org", "reason": "r"}, "trust domain"),
        ({"serial": "1a"}, "needs a reason"),
        ({"spiffe_id": "spiffe://example.org/web", "reason": "  "}, "needs a reason"),
        ({"serial": "1a", "reason": "two\nlines"}, "control character"),
        ({"serial": "1a", "reason": "x" * 1025}, "longer than 1024"),
    ],
)
def test_malformed_revoke_is_invalid_argument_and_stores_nothing(
    ca: CaHarness, request_fields: dict[str, str], words: str
) -> None:
    with ca.admin_channel() as channel:
        code, details = refusal(
            lambda: admin(ca, channel).Revoke(
                admin_pb2.RevokeRequest(**request_fields), timeout=TIMEOUT
            )
        )

    assert code == INVALID_ARGUMENT
    assert words in details
    assert list_revocations(ca) == []


def test_revoke_needs_the_revoke_permission(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/reader", permissions=("/dmc.v1.Admin/ListRevocations",))
    reader = bootstrap(ca, spiffe_id)

    with reader.channel(ca) as channel:
        code, _ = refusal(
            lambda: admin(ca, channel).Revoke(
                admin_pb2.RevokeRequest(serial="1a", reason="r"), timeout=TIMEOUT
            )
        )
        admin(ca, channel).ListRevocations(admin_pb2.ListRevocationsRequest(), timeout=TIMEOUT)

    assert code == PERMISSION_DENIED


# ---------------------------------------------------------------- dmc-admin (SPEC §6)


def test_dmc_admin_revokes_by_serial_and_id_and_lists_them(ca: CaHarness) -> None:
    web = bootstrap(ca, ca.create_entry("/web"))
    colons = ":".join(web.serial.upper()[i : i + 2] for i in range(0, len(web.serial), 2))

    by_serial = dmc_admin(ca, "revoke", "--serial", colons, "--reason", "lost", "--output", "json")
    by_id = dmc_admin(ca, "revoke", "--spiffe-id", web.spiffe_id, "--reason", "gone")
    listed = dmc_admin(ca, "revocations", "list", "--output", "json")
    text = dmc_admin(ca, "revocations", "list")

    assert by_serial.returncode == 0, by_serial.stderr
    assert json.loads(by_serial.stdout)["serial"] == web.serial
    assert by_id.returncode == 0, by_id.stderr
    assert "gone" in by_id.stdout
    data = json.loads(listed.stdout)["revocations"]
    assert [(r["kind"], r.get("serial") or r.get("spiffe_id"), r["reason"]) for r in data] == [
        ("serial", web.serial, "lost"),
        ("id", web.spiffe_id, "gone"),
    ]
    assert all(r["revoked_at"].endswith("Z") and r["expires_at"].endswith("Z") for r in data)
    assert web.serial in text.stdout and web.spiffe_id in text.stdout
    assert refusal(lambda: renew(ca, web))[0] == PERMISSION_DENIED


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--serial", "1a", "--spiffe-id", "spiffe://example.org/web"], "exactly one of"),
        ([], "exactly one of"),
        (["--serial", "xyz"], "not hexadecimal"),
        (["--spiffe-id", "spiffe://example.org/a/../b"], "segment '..'"),
    ],
)
def test_dmc_admin_revoke_refuses_bad_targets_in_one_line(
    ca: CaHarness, args: list[str], words: str
) -> None:
    result = dmc_admin(ca, "revoke", *args, "--reason", "r")

    assert result.returncode != 0
    assert result.stderr.startswith("error: INVALID_ARGUMENT: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr
    assert list_revocations(ca) == []


def test_dmc_admin_revoke_by_a_caller_it_refuses_prints_the_status(
    ca: CaHarness, tmp_path: Path
) -> None:
    reader = bootstrap(ca, ca.create_entry("/reader", permissions=("/other.Svc/*",)))
    (tmp_path / "r.pem").write_bytes(certificates_to_pem([reader.leaf]))
    (tmp_path / "r.key").write_bytes(private_key_to_pem(reader.key))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    result = subprocess.run(
        [
            str(DMC_ADMIN),
            "--ca",
            ca.address,
            "--cert",
            str(tmp_path / "r.pem"),
            "--key",
            str(tmp_path / "r.key"),
            "--bundle",
            str(ca.data_dir / "bundle.pem"),
            "revoke",
            "--serial",
            "1a",
            "--reason",
            "r",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )

    assert result.stderr.startswith("error: PERMISSION_DENIED: "), result.stderr
    assert list_revocations(ca) == []
