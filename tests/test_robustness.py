"""Robustness: hangs, leaks and failures of the client library and the agent under abuse.

Each test asserts the correct behaviour; a failing test shows a defect. Everything runs on
loopback servers and temporary folders the tests set up themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

import dmc.aio
from agent_support import BIN, FakeSource, bootstrap_workload
from ca_harness import CaHarness
from conftest import TcpProxy
from dmc.agent import AgentServer
from dmc.agent._proto import workload_pb2, workload_pb2_grpc
from dmc.channel import secure_channel
from dmc.connect import load_credential
from dmc.revocations_follower import RevocationFollower
from dmc.source import IdentitySource, RenewalPolicy
from dmc.v1 import admin_pb2, admin_pb2_grpc
from source_helpers import COUNT, SAY, SerialLog, bootstrap_source, start_echo_server, wait_until

SERVER_NAME_PREFIX = "echo"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
HEADER = (("workload.spiffe.io", "true"),)
FAST = RenewalPolicy(retry_initial_seconds=0.2, retry_max_seconds=1.0, retry_min_seconds=0.1)


def _unique(name: str) -> str:
    return f"/{name}-{uuid.uuid4().hex[:8]}"


def _dmc_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("dmc-")}


class Echo:
    """A server source (long TTL, a DNS name) and an echo server that follows it."""

    def __init__(self, ca: CaHarness, folder: Path) -> None:
        self.name = f"{SERVER_NAME_PREFIX}-{uuid.uuid4().hex[:8]}.example.org"
        self.source = bootstrap_source(
            ca, folder, _unique("echo"), ttl_seconds=3600, dns_names=(self.name,)
        )
        self.seen: set[bytes] = set()
        self.server, self.port = start_echo_server(self.source, self.seen)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(None).wait(5)
        self.source.close()


@pytest.fixture
def echo(dev_ca: CaHarness, tmp_path: Path) -> Iterator[Echo]:
    server = Echo(dev_ca, tmp_path / "echo")
    try:
        yield server
    finally:
        server.close()


def _run_with_deadline(function: Any, seconds: float) -> bool:
    """Run ``function`` on a daemon thread; return whether it finished within ``seconds``."""
    done = threading.Event()

    def target() -> None:
        try:
            function()
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="robustness-deadline").start()
    return done.wait(seconds)


# -- sync channel ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_channel_close_from_a_done_callback_does_not_deadlock(
    dev_ca: CaHarness, tmp_path: Path, echo: Echo
) -> None:
    """Closing the channel from a future's done-callback (a gRPC thread) must return."""
    with bootstrap_source(dev_ca, tmp_path / "client", _unique("client")) as source:
        channel = secure_channel(echo.target, source, server_name=echo.name)
        assert channel.unary_unary(SAY)(b"x", timeout=10)
        closed = threading.Event()

        def close_in_callback(_: Any) -> None:
            channel.close()
            closed.set()

        future = channel.unary_unary(SAY).future(b"x", timeout=10)
        future.add_done_callback(close_in_callback)
        assert closed.wait(10), "SecureChannel.close() from a done-callback never returned"


@pytest.mark.timeout(30)
def test_channel_close_with_streams_in_flight_cancels_them_promptly(
    dev_ca: CaHarness, tmp_path: Path, echo: Echo
) -> None:
    with bootstrap_source(dev_ca, tmp_path / "client", _unique("client")) as source:
        channel = secure_channel(echo.target, source, server_name=echo.name)
        streams = [channel.unary_stream(COUNT)(b"1000") for _ in range(5)]
        for stream in streams:
            next(stream)
        futures = [channel.unary_unary(SAY).future(b"x") for _ in range(5)]
        assert _run_with_deadline(channel.close, 5), "close() hung with calls in flight"
        for stream in streams:
            with pytest.raises(grpc.RpcError) as raised:
                for _ in range(2000):
                    next(stream)
            assert raised.value.code() == grpc.StatusCode.CANCELLED
        for future in futures:
            assert future.done() or _run_with_deadline(lambda f=future: f.exception(), 5)
        with pytest.raises(ValueError, match="closed channel"):
            channel.unary_unary(SAY)(b"x")


@pytest.mark.timeout(30)
def test_source_closed_twice_and_channel_used_after_the_source_closed(
    dev_ca: CaHarness, tmp_path: Path, echo: Echo
) -> None:
    source = bootstrap_source(dev_ca, tmp_path / "client", _unique("client"))
    channel = secure_channel(echo.target, source, server_name=echo.name)
    assert channel.unary_unary(SAY)(b"x", timeout=10)
    source.close()
    source.close()
    assert _run_with_deadline(source.close, 5)
    # The last identity stays in use: the channel still works, and closes cleanly.
    assert channel.unary_unary(SAY)(b"x", timeout=10)
    assert _run_with_deadline(channel.close, 5)
    assert _run_with_deadline(channel.close, 5)
    source.renew_now()  # on a closed source: no thread left to act, nothing raised


@pytest.mark.timeout(40)
def test_source_close_from_a_subscriber_callback_returns(
    dev_ca: CaHarness, tmp_path: Path
) -> None:
    """close() inside a subscriber (the only place a user learns of a change) must not hang.

    The renewal is asked for at once, so the bundle watcher's first message tends to arrive
    while the renewal's publish holds the publish lock; a few attempts make that likely.
    """
    for attempt in range(4):
        source = bootstrap_source(
            dev_ca, tmp_path / f"client{attempt}", _unique("client"), policy=FAST
        )
        closed = threading.Event()

        def on_change(
            _: Any, source: IdentitySource = source, closed: threading.Event = closed
        ) -> None:
            time.sleep(0.3)
            source.close()
            closed.set()

        source.subscribe(on_change)
        source.renew_now()
        assert closed.wait(6), f"attempt {attempt}: close() from a subscriber never returned"


@pytest.mark.timeout(40)
def test_rapid_renewals_with_open_streams_fail_no_call_and_leak_no_thread(
    dev_ca: CaHarness, tmp_path: Path, echo: Echo
) -> None:
    """A 2 s TTL: about a renewal a second for ~10 s while streams and calls are open."""
    before = _dmc_threads()
    source = bootstrap_source(
        dev_ca, tmp_path / "client", _unique("client"), ttl_seconds=2, policy=FAST
    )
    log = SerialLog(source)
    channel = secure_channel(echo.target, source, server_name=echo.name)
    failures: list[str] = []
    stop = threading.Event()

    def streamer() -> None:
        while not stop.is_set():
            try:
                assert len(list(channel.unary_stream(COUNT)(b"8", timeout=10))) == 8
            except grpc.RpcError as exc:
                failures.append(f"stream: {exc.code().name}: {exc.details()}")

    def caller() -> None:
        while not stop.is_set():
            try:
                channel.unary_unary(SAY)(b"x", timeout=10)
            except grpc.RpcError as exc:
                failures.append(f"unary: {exc.code().name}: {exc.details()}")
            time.sleep(0.02)

    workers = [threading.Thread(target=streamer) for _ in range(3)]
    workers += [threading.Thread(target=caller) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: log.renewals >= 6, 20)
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
    renewals = log.renewals
    assert _run_with_deadline(channel.close, 10), "channel close hung"
    assert _run_with_deadline(source.close, 10), "source close hung"
    assert renewals >= 6, f"only {renewals} renewals"
    assert failures == []
    assert len(echo.seen) >= 3
    assert wait_until(lambda: _dmc_threads() <= before, 5), _dmc_threads() - before


@pytest.mark.timeout(30)
def test_identity_source_close_leaves_no_thread_behind(dev_ca: CaHarness, tmp_path: Path) -> None:
    # Warm gRPC up once, so its process-wide threads are there before counting.
    bootstrap_source(dev_ca, tmp_path / "warm", _unique("warm")).close()
    time.sleep(0.5)
    before = set(threading.enumerate())
    for number in range(5):
        source = bootstrap_source(dev_ca, tmp_path / f"s{number}", _unique("leak"))
        source.renew_now()
        time.sleep(0.2)
        source.close()
    gc.collect()
    assert wait_until(lambda: set(threading.enumerate()) <= before, 5), [
        t.name for t in set(threading.enumerate()) - before
    ]


# -- aio channel ----------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_aio_calls_never_fail_through_rapid_renewals_and_no_task_is_left(
    dev_ca: CaHarness, tmp_path: Path, echo: Echo
) -> None:
    source = await asyncio.to_thread(
        bootstrap_source,
        dev_ca,
        tmp_path / "client",
        _unique("client"),
        ttl_seconds=2,
        policy=FAST,
    )
    log = SerialLog(source)
    tasks_before = asyncio.all_tasks()
    channel = dmc.aio.secure_channel(echo.target, source, server_name=echo.name)
    failures: list[str] = []
    deadline = time.monotonic() + 20

    async def unary() -> None:
        while log.renewals < 6 and time.monotonic() < deadline:
            try:
                await channel.unary_unary(SAY)(b"x", timeout=10)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"unary: {exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.01)

    async def stream() -> None:
        while log.renewals < 6 and time.monotonic() < deadline:
            try:
                got = [r async for r in channel.unary_stream(COUNT)(b"6", timeout=10)]
                assert len(got) == 6
            except grpc.aio.AioRpcError as exc:
                failures.append(f"stream: {exc.code().name}: {exc.details()}")

    try:
        await asyncio.gather(*(unary() for _ in range(4)), *(stream() for _ in range(2)))
    finally:
        await asyncio.wait_for(channel.close(), 10)
        await asyncio.to_thread(source.close)
    assert log.renewals >= 6
    assert failures == []
    await asyncio.sleep(0.2)
    left = {t for t in asyncio.all_tasks() - tasks_before if not t.done()}
    left.discard(asyncio.current_task())  # type: ignore[arg-type]
    assert left == set(), left


# -- the agent ------------------------------------------------------------------------------


@pytest.fixture
def credential_dir(dev_ca: CaHarness, tmp_path: Path) -> Path:
    out = tmp_path / "cred"
    bootstrap_workload(dev_ca, out)
    return out


def _run_agent(dev_ca: CaHarness, credential_dir: Path, socket_path: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            str(BIN / "dmc"),
            "agent",
            "--ca",
            dev_ca.address,
            "--dir",
            str(credential_dir),
            "--socket",
            socket_path,
        ],
        capture_output=True,
        text=True,
        timeout=25,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        check=False,
    )
    return result.returncode, result.stderr


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_clear_error(status: int, stderr: str, *words: str) -> None:
    assert status == 1, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.timeout(30)
def test_agent_refuses_a_socket_path_too_long_for_af_unix(
    dev_ca: CaHarness, credential_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "s"
    name = "a" * (108 - len(os.fsencode(folder)) - 1)  # 108 bytes in all
    status, stderr = _run_agent(dev_ca, credential_dir, str(folder / name))
    _assert_one_clear_error(status, stderr, "longer than 107 bytes")


@pytest.mark.timeout(30)
def test_agent_refuses_a_socket_folder_owned_by_someone_else(
    dev_ca: CaHarness, credential_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    status, stderr = _run_agent(dev_ca, credential_dir, str(folder / "agent.sock"))
    _assert_one_clear_error(status, stderr, str(folder), "uid")
    assert not (folder / "agent.sock").exists()


@pytest.mark.timeout(30)
def test_agent_on_a_read_only_folder_says_so_in_one_line(
    dev_ca: CaHarness, credential_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        # Root ignores mode bits; without a read-only mount there is nothing to test.
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr!r}")
    try:
        status, stderr = _run_agent(dev_ca, credential_dir, str(folder / "agent.sock"))
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    _assert_one_clear_error(status, stderr, "Read-only")


@pytest.fixture
async def agent(tmp_path: Path) -> Any:
    source = FakeSource()
    server = AgentServer(source, tmp_path / "run" / "agent.sock")
    await server.start()
    try:
        yield server, source
    finally:
        await server.stop(0)


def _request(*names: str, nonce: str = "", version: str = "", error: str | None = None) -> Any:
    request = discovery_pb2.DiscoveryRequest(
        resource_names=names, type_url=SECRET_TYPE, response_nonce=nonce, version_info=version
    )
    request.node.id = "envoy-robust"
    if error is not None:
        request.error_detail.code = 3
        request.error_detail.message = error
    return request


@pytest.mark.timeout(30)
async def test_sds_client_that_nacks_forever_gets_no_resends_and_agent_lives_on(
    agent: Any,
) -> None:
    server, source = agent
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        call = stub.StreamSecrets()
        await call.write(_request("default"))
        first = await asyncio.wait_for(call.read(), 5)
        for _ in range(300):
            await call.write(_request("default", nonce=first.nonce, error="no thanks"))
        # Still answering, and a renewal is still pushed on the same stream.
        await asyncio.to_thread(source.renew)
        pushed = await asyncio.wait_for(call.read(), 5)
        assert pushed.nonce != first.nonce
        assert pushed.version_info != first.version_info
        call.cancel()
        fetched = await asyncio.wait_for(stub.FetchSecrets(_request("ROOTCA")), 5)
        assert len(fetched.resources) == 1


@pytest.mark.timeout(30)
async def test_sds_garbage_request_ends_the_call_with_an_error_status(agent: Any) -> None:
    server, _ = agent
    path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        for garbage in (b"\xff" * 64, os.urandom(4096), b"\x0a\xff\xff\xff\xff\x0f"):
            raw = channel.stream_stream(path)  # bytes in, bytes out
            call = raw()
            await call.write(garbage)
            await call.done_writing()
            responses = []
            with contextlib.suppress(grpc.aio.AioRpcError):  # reading ends in the error
                responses = [r async for r in call]
            # An undecodable request is an error, not a stream that ended well.
            assert responses == []
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage[:8]
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        good = stub.StreamSecrets()
        await good.write(_request())
        response = await asyncio.wait_for(good.read(), 5)
        assert len(response.resources) == 2
        good.cancel()


@pytest.mark.timeout(30)
async def test_workload_api_clients_that_disconnect_mid_stream_leave_nothing_behind(
    agent: Any,
) -> None:
    server, source = agent
    tasks_before = len(asyncio.all_tasks())
    for _ in range(60):
        async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            svid = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
            bundles = stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
            await asyncio.wait_for(svid.read(), 5)
            await asyncio.wait_for(bundles.read(), 5)
            # leaving the block closes the channel under the open streams
    for _ in range(30):
        sds = grpc.aio.insecure_channel(f"unix:{server.socket_path}")
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(sds).StreamSecrets()
        await call.write(_request())
        await asyncio.wait_for(call.read(), 5)
        await sds.close()
    feed = server._feed
    assert await asyncio.to_thread(wait_until, lambda: len(feed._listeners) == 0, 5), len(
        feed._listeners
    )
    assert source.subscriber_count == 1
    assert len(asyncio.all_tasks()) <= tasks_before + 2


# -- the revocation follower ----------------------------------------------------------------


@pytest.mark.timeout(45)
def test_revocation_follower_survives_the_ca_going_away_and_recovers(
    ca: CaHarness, tmp_path: Path
) -> None:
    """Default back-off: a 6 s outage keeps the last set in force, then the follower recovers."""
    victim = ca.create_entry(_unique("victim"))
    proxy = TcpProxy(int(ca.address.rsplit(":", 1)[1]))
    ca.run(proxy.start())
    admin = load_credential(
        ca.data_dir / "admin.pem", ca.data_dir / "admin.key", ca.data_dir / "bundle.pem"
    )
    credentials = grpc.ssl_channel_credentials(ca.bundle_pem, admin.key_pem, admin.chain_pem)
    try:
        with (
            grpc.secure_channel(proxy.endpoint, credentials) as channel,
            RevocationFollower(channel) as follower,
        ):
            before = follower.revocations
            assert before is not None
            ca.run(proxy.cut())
            with ca.admin_channel() as admin_channel:
                admin_pb2_grpc.AdminStub(admin_channel).Revoke(
                    admin_pb2.RevokeRequest(spiffe_id=victim, reason="while away"), timeout=10
                )
            time.sleep(6)
            # Away: the last known set stays in force (no refusal turns into UNAVAILABLE).
            assert follower.revocations is before
            ca.run(proxy.start())
            recovered = wait_until(
                lambda: any(r.value == victim for r in (follower.revocations or ())), 25
            )
    finally:
        ca.run(proxy.cut())
    assert recovered, "the follower did not take the CA's snapshot again within 25 s"
