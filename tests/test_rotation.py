"""Trust bundle rotation: PrepareAuthority, ActivateAuthority, RetireAuthority and the
`dmc-admin bundle` walk (SPEC §4, §5, §6), against a real CA replica and a real etcd.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.timestamp_pb2 import Timestamp

from ca_harness import CaHarness
from certgen import make_root
from dmc._issuance import Issued, csr_for, new_key, read_svid_response
from dmc.errors import FailedPrecondition, NotFound, Unauthenticated
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.spiffe_id import SpiffeId
from dmc.svid import verify_chain
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.authorities import VIEW_LAG_ALLOWANCE, plan_activation, plan_retirement
from dmc_ca.cli.bundle import ProgressPrinter
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.keys import KeyType
from dmc_ca.model import AuthorityRecord, AuthorityState
from dmc_ca.rotation import Progress, Step, next_step, rotate
from dmc_ca.runtime import initialise
from dmc_ca.sealing import generate_kek_file, load_kek
from dmc_ca.service import bundle_to_proto
from dmc_ca.store import Store

TIMEOUT = 15
DMC_ADMIN = Path(sys.executable).with_name("dmc-admin")
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------- helpers


def current_bundle(ca: CaHarness) -> ca_pb2.TrustBundle:
    """The bundle straight from the replica's view (no TLS needed)."""
    assert ca.ca is not None
    return bundle_to_proto(ca.ca.bundle())


def roots_pem(bundle: ca_pb2.TrustBundle) -> bytes:
    return certificates_to_pem(
        [x509.load_der_x509_certificate(a.certificate) for a in bundle.authorities]
    )


def channel_to(ca: CaHarness, roots: bytes, chain: bytes, key: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(ca.address, credentials)


def admin(ca: CaHarness) -> admin_pb2_grpc.AdminStub:
    """An Admin stub over a channel that trusts every authority of the current bundle."""
    chain = (ca.data_dir / "admin.pem").read_bytes()
    key = (ca.data_dir / "admin.key").read_bytes()
    return admin_pb2_grpc.AdminStub(channel_to(ca, roots_pem(current_bundle(ca)), chain, key))


@dataclass
class Workload:
    issued: Issued

    @property
    def chain_pem(self) -> bytes:
        return certificates_to_pem(self.issued.chain)

    @property
    def key_pem(self) -> bytes:
        return private_key_to_pem(self.issued.key)


def bootstrap(ca: CaHarness, path: str, ttl_seconds: int = 0) -> Workload:
    spiffe_id = ca.create_entry(path, ttl_seconds=ttl_seconds)
    token = ca.join_token(spiffe_id)
    key = new_key("ec-p256")
    bundle = current_bundle(ca)
    credentials = grpc.ssl_channel_credentials(root_certificates=roots_pem(bundle))
    with grpc.secure_channel(ca.bootstrap_address, credentials) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(join_token=token, csr=csr_for(key, SpiffeId.parse(spiffe_id))),
            timeout=TIMEOUT,
        )
    return Workload(read_svid_response(response, key, ()))


def renew(ca: CaHarness, workload: Workload) -> ca_pb2.SVIDResponse:
    key = new_key("ec-p256")
    roots = roots_pem(current_bundle(ca))
    with channel_to(ca, roots, workload.chain_pem, workload.key_pem) as channel:
        return ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=csr_for(key, workload.issued.svid.spiffe_id)),
            timeout=TIMEOUT,
        )


def root_of(bundle: ca_pb2.TrustBundle, state: int) -> x509.Certificate:
    (authority,) = [a for a in bundle.authorities if a.state == state]
    return x509.load_der_x509_certificate(authority.certificate)


def ids_by_state(bundle: ca_pb2.TrustBundle) -> dict[str, list[str]]:
    names = {ca_pb2.PREPARED: "PREPARED", ca_pb2.ACTIVE: "ACTIVE", ca_pb2.PREVIOUS: "PREVIOUS"}
    result: dict[str, list[str]] = {}
    for authority in bundle.authorities:
        result.setdefault(names[authority.state], []).append(authority.id)
    return result


def refused(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# ---------------------------------------------------------------- the RPCs


def test_prepare_publishes_a_new_root_that_signs_nothing_yet(ca: CaHarness) -> None:
    before = current_bundle(ca)

    prepared = admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)

    after = current_bundle(ca)
    assert prepared.state == ca_pb2.PREPARED
    assert after.sequence == before.sequence + 1
    assert ids_by_state(after)["PREPARED"] == [prepared.id]
    # Issuance still uses the ACTIVE authority.
    workload = bootstrap(ca, "/web")
    verify_chain(workload.issued.chain, [root_of(after, ca_pb2.ACTIVE)], datetime.now(UTC))


@pytest.mark.parametrize(
    ("key_type", "key_class", "size"),
    [
        ("ec-p256", ec.EllipticCurvePublicKey, 256),
        ("ec-p384", ec.EllipticCurvePublicKey, 384),
        ("rsa-2048", rsa.RSAPublicKey, 2048),
    ],
)
def test_prepare_generates_the_requested_key_type(
    ca: CaHarness, key_type: str, key_class: type, size: int
) -> None:
    prepared = admin(ca).PrepareAuthority(
        admin_pb2.PrepareAuthorityRequest(key_type=key_type), timeout=TIMEOUT
    )

    key = x509.load_der_x509_certificate(prepared.certificate).public_key()
    assert isinstance(key, key_class)
    assert key.key_size == size  # type: ignore[attr-defined]


def test_prepare_refuses_an_unknown_key_type_and_writes_nothing(ca: CaHarness) -> None:
    before = current_bundle(ca)

    error = refused(
        lambda: admin(ca).PrepareAuthority(
            admin_pb2.PrepareAuthorityRequest(key_type="ed25519"), timeout=TIMEOUT
        )
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key type 'ed25519'" in (error.details() or "")
    assert current_bundle(ca) == before


def test_activate_switches_issuance_and_keeps_the_old_root_as_previous(ca: CaHarness) -> None:
    old_root = root_of(current_bundle(ca), ca_pb2.ACTIVE)
    workload = bootstrap(ca, "/web")
    prepared = admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)
    sequence = current_bundle(ca).sequence

    activated = admin(ca).ActivateAuthority(admin_pb2.ActivateAuthorityRequest(), timeout=TIMEOUT)

    bundle = current_bundle(ca)
    assert activated.id == prepared.id and activated.state == ca_pb2.ACTIVE
    assert bundle.sequence == sequence + 1
    assert root_of(bundle, ca_pb2.PREVIOUS) == old_root
    (previous,) = [a for a in bundle.authorities if a.state == ca_pb2.PREVIOUS]
    assert previous.HasField("retirable_at")
    # The old SVID still authenticates; its renewal chains to the new authority only.
    response = renew(ca, workload)
    chain = [x509.load_der_x509_certificate(d) for d in response.certificate_chain]
    new_root = x509.load_der_x509_certificate(prepared.certificate)
    verify_chain(chain, [new_root], datetime.now(UTC))
    with pytest.raises(Unauthenticated):
        verify_chain(chain, [old_root], datetime.now(UTC))


def test_ca_serving_certificate_follows_activation_without_restart(ca: CaHarness) -> None:
    prepared = admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)
    admin(ca).ActivateAuthority(
        admin_pb2.ActivateAuthorityRequest(id=prepared.id), timeout=TIMEOUT
    )
    new_root_only = certificates_to_pem([x509.load_der_x509_certificate(prepared.certificate)])

    # A client that trusts only the new root reaches the CA: its serving SVID is reissued
    # on the bundle change (by the server's own task, so within moments of the RPC).
    credentials = grpc.ssl_channel_credentials(root_certificates=new_root_only)
    deadline = time.monotonic() + 5
    while True:
        try:
            with grpc.secure_channel(ca.bootstrap_address, credentials) as channel:
                bundle = ca_pb2_grpc.CertificateAuthorityStub(channel).GetTrustBundle(
                    ca_pb2.GetTrustBundleRequest(), timeout=TIMEOUT
                )
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert ids_by_state(bundle)["ACTIVE"] == [prepared.id]


def test_activate_refuses_an_authority_that_is_not_prepared(ca: CaHarness) -> None:
    active_id = ids_by_state(current_bundle(ca))["ACTIVE"][0]

    error = refused(
        lambda: admin(ca).ActivateAuthority(
            admin_pb2.ActivateAuthorityRequest(id=active_id), timeout=TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a PREPARED authority" in (error.details() or "")

    error = refused(
        lambda: admin(ca).ActivateAuthority(admin_pb2.ActivateAuthorityRequest(), timeout=TIMEOUT)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no PREPARED authority" in (error.details() or "")

    error = refused(
        lambda: admin(ca).ActivateAuthority(
            admin_pb2.ActivateAuthorityRequest(id="nosuch"), timeout=TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_retire_is_refused_while_an_svid_of_the_previous_authority_can_be_valid(
    ca: CaHarness,
) -> None:
    admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)
    admin(ca).ActivateAuthority(admin_pb2.ActivateAuthorityRequest(), timeout=TIMEOUT)
    before = current_bundle(ca)

    error = refused(
        lambda: admin(ca).RetireAuthority(admin_pb2.RetireAuthorityRequest(), timeout=TIMEOUT)
    )

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "can be valid until" in (error.details() or "")
    assert current_bundle(ca) == before


def test_retire_refuses_the_active_authority_even_with_force(ca: CaHarness) -> None:
    active_id = ids_by_state(current_bundle(ca))["ACTIVE"][0]

    error = refused(
        lambda: admin(ca).RetireAuthority(
            admin_pb2.RetireAuthorityRequest(id=active_id, force=True), timeout=TIMEOUT
        )
    )

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is ACTIVE" in (error.details() or "")


def test_retire_removes_a_prepared_authority_at_once(ca: CaHarness) -> None:
    prepared = admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)

    admin(ca).RetireAuthority(admin_pb2.RetireAuthorityRequest(id=prepared.id), timeout=TIMEOUT)

    assert "PREPARED" not in ids_by_state(current_bundle(ca))


def test_forced_retirement_refuses_every_certificate_of_the_old_authority(
    ca: CaHarness,
) -> None:
    old = bootstrap(ca, "/web")
    admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)
    admin(ca).ActivateAuthority(admin_pb2.ActivateAuthorityRequest(), timeout=TIMEOUT)
    # A connection opened before the retirement stays open across it.
    open_channel = channel_to(ca, roots_pem(current_bundle(ca)), old.chain_pem, old.key_pem)
    stub = ca_pb2_grpc.CertificateAuthorityStub(open_channel)
    stub.GetTrustBundle(ca_pb2.GetTrustBundleRequest(), timeout=TIMEOUT)
    # The admin credential is signed by the old authority too: renew it under the new one.
    admin_key = new_key("ec-p256")
    with channel_to(
        ca,
        roots_pem(current_bundle(ca)),
        (ca.data_dir / "admin.pem").read_bytes(),
        (ca.data_dir / "admin.key").read_bytes(),
    ) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=csr_for(admin_key, SpiffeId.parse(ca.id("/dmc/admin")))),
            timeout=TIMEOUT,
        )
    new_admin = read_svid_response(response, admin_key, ())
    (ca.data_dir / "admin.pem").write_bytes(certificates_to_pem(new_admin.chain))
    (ca.data_dir / "admin.key").write_bytes(private_key_to_pem(admin_key))

    retired = admin(ca).RetireAuthority(
        admin_pb2.RetireAuthorityRequest(force=True), timeout=TIMEOUT
    )

    bundle = current_bundle(ca)
    assert retired.id not in [a.id for a in bundle.authorities]
    # On the open connection the CA refuses the caller...
    error = refused(
        lambda: stub.Renew(
            ca_pb2.RenewRequest(csr=csr_for(new_key("ec-p256"), old.issued.svid.spiffe_id)),
            timeout=TIMEOUT,
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not signed by an authority of the bundle" in (error.details() or "")
    open_channel.close()
    # ...and a new connection fails its handshake.
    error = refused(lambda: renew(ca, old))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_every_change_reaches_watch_trust_bundle(ca: CaHarness) -> None:
    chain = (ca.data_dir / "admin.pem").read_bytes()
    key = (ca.data_dir / "admin.key").read_bytes()
    seen: list[ca_pb2.TrustBundle] = []
    first = threading.Event()
    enough = threading.Event()
    channel = channel_to(ca, roots_pem(current_bundle(ca)), chain, key)
    stream = ca_pb2_grpc.CertificateAuthorityStub(channel).WatchTrustBundle(
        ca_pb2.WatchTrustBundleRequest()
    )

    def watch() -> None:
        try:
            for bundle in stream:
                seen.append(bundle)
                first.set()
                if len(seen) == 4:
                    enough.set()
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert first.wait(TIMEOUT)
    prepared = admin(ca).PrepareAuthority(admin_pb2.PrepareAuthorityRequest(), timeout=TIMEOUT)
    admin(ca).ActivateAuthority(admin_pb2.ActivateAuthorityRequest(), timeout=TIMEOUT)
    admin(ca).RetireAuthority(admin_pb2.RetireAuthorityRequest(force=True), timeout=TIMEOUT)

    assert enough.wait(TIMEOUT), [ids_by_state(b) for b in seen]
    stream.cancel()
    channel.close()
    sequences = [b.sequence for b in seen]
    assert sequences == sorted(set(sequences)) and len(sequences) == 4
    assert ids_by_state(seen[1])["PREPARED"] == [prepared.id]
    assert ids_by_state(seen[2])["ACTIVE"] == [prepared.id] and "PREVIOUS" in ids_by_state(seen[2])
    assert ids_by_state(seen[3]) == {"ACTIVE": [prepared.id]}


# ---------------------------------------------------------------- the retirement rule


def record(
    authority_id: str,
    state: AuthorityState,
    *,
    created: datetime = NOW - timedelta(days=1),
    since: datetime | None = None,
) -> AuthorityRecord:
    root = make_root(now=NOW).certificate
    return AuthorityRecord(
        id=authority_id,
        state=state,
        certificate_chain_pem=certificates_to_pem([root]),
        sealed_key=b"sealed",
        created_at=created,
        state_since=since,
    )


def test_retirement_waits_for_the_longest_svid_ttl_after_the_authority_stopped_signing() -> None:
    stopped = NOW - timedelta(minutes=30)
    records = {"old": record("old", AuthorityState.PREVIOUS, since=stopped)}
    ttl = timedelta(hours=1)

    with pytest.raises(FailedPrecondition, match="can be valid until"):
        plan_retirement(records, "", now=NOW, longest_svid_ttl=ttl, force=False)
    just_before = stopped + ttl + VIEW_LAG_ALLOWANCE - timedelta(seconds=1)
    with pytest.raises(FailedPrecondition):
        plan_retirement(records, "old", now=just_before, longest_svid_ttl=ttl, force=False)

    at = stopped + ttl + VIEW_LAG_ALLOWANCE
    assert plan_retirement(records, "", now=at, longest_svid_ttl=ttl, force=False).id == "old"
    assert plan_retirement(records, "old", now=NOW, longest_svid_ttl=ttl, force=True).id == "old"


def test_retirement_without_a_previous_authority_is_refused() -> None:
    records = {"a": record("a", AuthorityState.ACTIVE)}

    with pytest.raises(FailedPrecondition, match="no PREVIOUS authority"):
        plan_retirement(records, "", now=NOW, longest_svid_ttl=timedelta(hours=1), force=True)
    with pytest.raises(NotFound):
        plan_retirement(records, "b", now=NOW, longest_svid_ttl=timedelta(hours=1), force=True)


def test_activation_makes_every_active_authority_previous() -> None:
    records = {
        "a": record("a", AuthorityState.ACTIVE),
        "p1": record("p1", AuthorityState.PREPARED, created=NOW - timedelta(hours=2)),
        "p2": record("p2", AuthorityState.PREPARED, created=NOW - timedelta(hours=1)),
    }

    target, states = plan_activation(records)

    assert target.id == "p2"
    assert states == {"a": AuthorityState.PREVIOUS, "p2": AuthorityState.ACTIVE}


# ---------------------------------------------------------------- the rotate walk


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


class FakeCa:
    """The CA as the walk sees it, with authority states and a clock of its own."""

    def __init__(self, now: datetime, retire_wait: timedelta) -> None:
        self.now = now
        self.retire_wait = retire_wait
        self.authorities: list[ca_pb2.Authority] = [
            ca_pb2.Authority(
                id="a0",
                state=ca_pb2.ACTIVE,
                created_at=stamp(now - timedelta(days=1)),
                state_since=stamp(now - timedelta(days=1)),
            )
        ]
        self.calls: list[str] = []
        self.interrupt_after: str | None = None

    def bundle(self) -> ca_pb2.TrustBundle:
        return ca_pb2.TrustBundle(sequence=len(self.calls), authorities=self.authorities)

    def _act(self, name: str) -> None:
        self.calls.append(name)
        if name == self.interrupt_after:
            raise KeyboardInterrupt

    def prepare(self) -> ca_pb2.Authority:
        new = ca_pb2.Authority(
            id=f"a{len(self.authorities)}",
            state=ca_pb2.PREPARED,
            created_at=stamp(self.now),
            state_since=stamp(self.now),
        )
        self.authorities.append(new)
        self._act("prepare")
        return new

    def activate(self, authority_id: str) -> ca_pb2.Authority:
        for authority in self.authorities:
            if authority.state == ca_pb2.ACTIVE:
                authority.state = ca_pb2.PREVIOUS
                authority.state_since.CopyFrom(stamp(self.now))
                authority.retirable_at.CopyFrom(stamp(self.now + self.retire_wait))
        (target,) = [a for a in self.authorities if a.id == authority_id]
        target.state = ca_pb2.ACTIVE
        self._act("activate")
        return target

    def retire(self, authority_id: str) -> ca_pb2.Authority:
        (target,) = [a for a in self.authorities if a.id == authority_id]
        assert self.now >= target.retirable_at.ToDatetime(tzinfo=UTC)
        self.authorities.remove(target)
        self._act("retire")
        return target

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def run_walk(fake: FakeCa, progress: list[Progress]) -> list[str]:
    return rotate(
        fake,
        propagation=timedelta(seconds=30),
        overlap=timedelta(seconds=10),
        on_progress=progress.append,
        clock=lambda: fake.now,
        sleep=fake.sleep,
    )


def test_rotate_walks_prepare_wait_activate_wait_retire() -> None:
    fake = FakeCa(NOW, retire_wait=timedelta(seconds=60))
    progress: list[Progress] = []

    actions = run_walk(fake, progress)

    assert fake.calls == ["prepare", "activate", "retire"]
    assert actions == ["prepared authority a1", "activated authority a1", "retired authority a0"]
    assert [a.id for a in fake.authorities] == ["a1"]
    # Waited out the propagation, then the CA's retirement bound (longer than the overlap).
    assert fake.now >= NOW + timedelta(seconds=30 + 60)
    waits = [p for p in progress if p.remaining is not None]
    assert {p.step for p in waits} == {Step.WAIT_PROPAGATION, Step.WAIT_OVERLAP}
    lefts = [p.remaining for p in waits if p.step is Step.WAIT_PROPAGATION]
    assert lefts == sorted(lefts, reverse=True) and lefts[-1] == timedelta(0)
    assert progress[-1].step is Step.DONE


@pytest.mark.parametrize("interrupted_after", ["prepare", "activate"])
def test_rotate_interrupted_continues_from_the_bundle_states(interrupted_after: str) -> None:
    fake = FakeCa(NOW, retire_wait=timedelta(seconds=5))
    fake.interrupt_after = interrupted_after
    with pytest.raises(KeyboardInterrupt):
        run_walk(fake, [])
    fake.interrupt_after = None

    run_walk(fake, [])

    assert fake.calls == ["prepare", "activate", "retire"]
    assert [a.id for a in fake.authorities] == ["a1"]


def test_next_step_from_states() -> None:
    fake = FakeCa(NOW, retire_wait=timedelta(seconds=5))
    kwargs = {"propagation": timedelta(seconds=30), "overlap": timedelta(seconds=10)}

    assert next_step(fake.bundle(), now=NOW, acted=False, **kwargs).step is Step.PREPARE
    assert next_step(fake.bundle(), now=NOW, acted=True, **kwargs).step is Step.DONE
    fake.prepare()
    waiting = next_step(fake.bundle(), now=NOW, acted=False, **kwargs)
    assert waiting.step is Step.WAIT_PROPAGATION and waiting.until == NOW + timedelta(seconds=30)
    later = NOW + timedelta(seconds=30)
    assert next_step(fake.bundle(), now=later, acted=False, **kwargs).step is Step.ACTIVATE


# ---------------------------------------------------------------- the command


@pytest.fixture
def short_lived_ca(etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> Iterator[CaHarness]:
    """A CA whose admin entry (the only entry) gives 3 s SVIDs, so retirement comes soon."""
    data_dir = tmp_path / "ca"
    data_dir.mkdir()
    generate_kek_file(data_dir / "kek")

    async def init() -> None:
        store = await Store.open([etcd.endpoint], etcd_prefix, "example.org")
        try:
            await initialise(store, load_kek(data_dir / "kek"), "example.org", admin_ttl_seconds=3)
        finally:
            await store.close()

    asyncio.run(init())
    harness = CaHarness(etcd.endpoint, etcd_prefix, data_dir, key_type=KeyType.EC_P256)
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def dmc_admin(ca: CaHarness, *args: str) -> subprocess.CompletedProcess[str]:
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
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bundle_rotate_command_ends_with_the_new_authority_only(
    short_lived_ca: CaHarness,
) -> None:
    ca = short_lived_ca
    old_id = ids_by_state(current_bundle(ca))["ACTIVE"][0]

    result = dmc_admin(ca, "bundle", "rotate", "--propagation", "1s", "--overlap", "1s")

    assert result.returncode == 0, result.stderr
    bundle = current_bundle(ca)
    (new_id,) = ids_by_state(bundle)["ACTIVE"]
    assert ids_by_state(bundle) == {"ACTIVE": [new_id]} and new_id != old_id
    assert f"retired authority {old_id}" in result.stdout
    # Without a terminal, progress is plain lines with the time left.
    assert "bundle rotate: wait for propagation" in result.stderr
    assert " left" in result.stderr and "\r" not in result.stderr
    # The operator's files followed: the next command works with them as they are.
    assert x509.load_pem_x509_certificates((ca.data_dir / "bundle.pem").read_bytes()) == [
        root_of(bundle, ca_pb2.ACTIVE)
    ]
    status = dmc_admin(ca, "status", "--output", "json")
    assert status.returncode == 0, status.stderr


def test_bundle_retire_too_early_prints_one_error_line(ca: CaHarness) -> None:
    assert dmc_admin(ca, "bundle", "prepare").returncode == 0
    assert dmc_admin(ca, "bundle", "activate").returncode == 0

    result = dmc_admin(ca, "bundle", "retire")

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: FAILED_PRECONDITION: authority ")
    assert "can be valid until" in lines[0]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    waits = [
        Progress(Step.WAIT_PROPAGATION, "a1", timedelta(seconds=s), timedelta(seconds=30))
        for s in (30, 29, 15, 0)
    ]
    terminal, plain = io.StringIO(), io.StringIO()

    for printer in (ProgressPrinter(terminal, True), ProgressPrinter(plain, False)):
        printer(Progress(Step.PREPARE, ""))
        for progress in waits:
            printer(progress)

    assert (
        "\r[" + "#" * 15 + "-" * 15 + "] wait for propagation a1: 15s left" in terminal.getvalue()
    )
    assert plain.getvalue().splitlines() == [
        "bundle rotate: prepare",
        "bundle rotate: wait for propagation a1: 30s left",
        "bundle rotate: wait for propagation a1: 15s left",
        "bundle rotate: wait for propagation a1: 0s left",
    ]
