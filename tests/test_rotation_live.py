"""A full `dmc-admin bundle rotate` under live traffic: two services call each other through
the client library (sync and aio) while the trust bundle rotates, and no call fails.

Timings are shortened: every SVID lives 6 s (the admin entry's too), so the CA accepts
the old authority's retirement 6 s + its view-lag allowance after activation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from ca_harness import CaHarness
from dmc.aio import secure_channel as aio_secure_channel
from dmc.authz import AioAuthorizingInterceptor, AuthorizingInterceptor
from dmc.channel import secure_channel
from dmc.credentials import server_credentials
from dmc.errors import DmcError
from dmc.source import IdentitySource
from dmc.svid import verify_chain
from dmc.v1 import ca_pb2
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.runtime import initialise
from dmc_ca.sealing import generate_kek_file, load_kek
from dmc_ca.service import bundle_to_proto
from dmc_ca.store import Store

DMC_ADMIN = Path(sys.executable).with_name("dmc-admin")
SVID_TTL_SECONDS = 6
SERVICE = "dmc.test.Ping"
PING = f"/{SERVICE}/Ping"


@pytest.fixture
def rotating_ca(etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> Iterator[CaHarness]:
    """A CA whose admin entry gives short SVIDs, so the rotation can finish in seconds."""
    data_dir = tmp_path / "ca"
    data_dir.mkdir()
    generate_kek_file(data_dir / "kek")

    async def init() -> None:
        store = await Store.open([etcd.endpoint], etcd_prefix, "example.org")
        try:
            await initialise(
                store,
                load_kek(data_dir / "kek"),
                "example.org",
                admin_ttl_seconds=SVID_TTL_SECONDS,
            )
        finally:
            await store.close()

    asyncio.run(init())
    harness = CaHarness(etcd.endpoint, etcd_prefix, data_dir).start()
    try:
        yield harness
    finally:
        harness.stop()


def source_for(ca: CaHarness, folder: Path, path: str, dns_name: str) -> IdentitySource:
    spiffe_id = ca.create_entry(path, ttl_seconds=SVID_TTL_SECONDS, dns_names=(dns_name,))
    return IdentitySource.bootstrap(
        folder,
        ca=ca.address,
        bundle=ca.bundle_pem,
        token=ca.join_token(spiffe_id),
        bootstrap_addr=ca.bootstrap_address,
    )


def ping_handlers() -> grpc.GenericRpcHandler:
    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )


class Traffic:
    """Calls counted and failures kept, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def record(self, error: BaseException | None) -> None:
        with self.lock:
            self.calls += 1
            if error is not None:
                self.failures.append(repr(error))


def sync_pair(
    ca: CaHarness, folder: Path, traffic: Traffic, stack: ExitStack
) -> list[IdentitySource]:
    """Two sync services, each calling the other through `dmc.secure_channel`."""
    sources, ports = [], []
    for name in ("alpha", "beta"):
        source = stack.enter_context(
            source_for(ca, folder / name, f"/sync/{name}", f"{name}.sync.example.org")
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[AuthorizingInterceptor.from_source(source)],
        )
        server.add_generic_rpc_handlers((ping_handlers(),))
        ports.append(server.add_secure_port("127.0.0.1:0", server_credentials(source)))
        server.start()
        stack.callback(server.stop, None)
        sources.append(source)

    def call_forever(source: IdentitySource, port: int, peer: str) -> None:
        with secure_channel(
            f"127.0.0.1:{port}", source, server_name=f"{peer}.sync.example.org"
        ) as channel:
            ping = channel.unary_unary(PING)
            while not traffic.stop.is_set():
                try:
                    assert ping(b"x", timeout=5) == b"x"
                    traffic.record(None)
                except Exception as error:  # every kind of failure counts
                    traffic.record(error)
                time.sleep(0.02)

    for source, peer_port, peer in (
        (sources[0], ports[1], "beta"),
        (sources[1], ports[0], "alpha"),
    ):
        thread = threading.Thread(target=call_forever, args=(source, peer_port, peer))
        thread.start()
        stack.callback(thread.join)
    return sources


def aio_pair(
    ca: CaHarness, folder: Path, traffic: Traffic, stack: ExitStack
) -> list[IdentitySource]:
    """Two grpc.aio services, each calling the other through `dmc.aio.secure_channel`."""
    sources = [
        stack.enter_context(
            source_for(ca, folder / name, f"/aio/{name}", f"{name}.aio.example.org")
        )
        for name in ("gamma", "delta")
    ]
    ready = threading.Event()

    async def ping(request: bytes, context: object) -> bytes:
        return request

    async def serve_and_call() -> None:
        servers, ports = [], []
        for source in sources:
            server = grpc.aio.server(interceptors=[AioAuthorizingInterceptor.from_source(source)])
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
                    ),
                )
            )
            ports.append(server.add_secure_port("127.0.0.1:0", server_credentials(source)))
            await server.start()
            servers.append(server)
        ready.set()

        async def call_forever(source: IdentitySource, port: int, peer: str) -> None:
            channel = aio_secure_channel(
                f"127.0.0.1:{port}", source, server_name=f"{peer}.aio.example.org"
            )
            try:
                call = channel.unary_unary(PING)
                while not traffic.stop.is_set():
                    try:
                        assert await call(b"y", timeout=5) == b"y"
                        traffic.record(None)
                    except Exception as error:  # every kind of failure counts
                        traffic.record(error)
                    await asyncio.sleep(0.02)
            finally:
                await channel.close()

        try:
            await asyncio.gather(
                call_forever(sources[0], ports[1], "delta"),
                call_forever(sources[1], ports[0], "gamma"),
            )
        finally:
            for server in servers:
                await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve_and_call(),))
    thread.start()
    stack.callback(thread.join)
    assert ready.wait(15)
    return sources


def chains_to(chain: tuple[x509.Certificate, ...], root: x509.Certificate) -> bool:
    try:
        verify_chain(chain, [root], datetime.now(UTC))
    except DmcError:
        return False
    return True


def test_full_rotation_under_live_traffic_fails_no_call_sync_or_aio(
    rotating_ca: CaHarness, tmp_path: Path
) -> None:
    ca = rotating_ca
    assert ca.ca is not None
    old_root = x509.load_pem_x509_certificate(ca.bundle_pem)
    traffic = Traffic()

    with ExitStack() as stack:
        sources = sync_pair(ca, tmp_path, traffic, stack) + aio_pair(ca, tmp_path, traffic, stack)
        # Callbacks run last-in first-out: the callers stop, then their threads are joined.
        stack.callback(traffic.stop.set)
        time.sleep(1)
        assert traffic.calls > 0 and traffic.failures == []

        rotation = subprocess.run(
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
                "bundle",
                "rotate",
                "--propagation",
                "2s",
                "--overlap",
                "1s",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # Traffic goes on after the retirement, on the new authority alone.
        time.sleep(3)
        traffic.stop.set()
        live = [source.current() for source in sources]

    assert rotation.returncode == 0, rotation.stderr
    bundle = bundle_to_proto(ca.ca.bundle())
    (authority,) = bundle.authorities
    assert authority.state == ca_pb2.ACTIVE
    new_root = x509.load_der_x509_certificate(authority.certificate)
    assert new_root != old_root
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.calls > 200
    for identity in live:
        assert chains_to(identity.chain, new_root), identity.spiffe_id
        assert not chains_to(identity.chain, old_root), identity.spiffe_id
        assert list(identity.bundle) == [new_root], identity.spiffe_id
