"""Shared fixtures: a real etcd for the session, and a store on a prefix of its own per test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client

from ca_harness import CaHarness
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.store import Store

TRUST_DOMAIN = "example.org"

_prefix_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for the whole session, with the fast test flags of DEPENDENCIES.md."""
    with EtcdProcess(tmp_path_factory.mktemp("etcd-session") / "etcd", fast=True) as process:
        yield process


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of the test's own, for tests that stop, kill or compact it."""
    process = EtcdProcess(tmp_path / "etcd", fast=True)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests on the shared etcd never see each other."""
    return f"/test-{next(_prefix_numbers)}/"


@pytest.fixture
async def store(etcd: EtcdProcess, etcd_prefix: str) -> AsyncIterator[Store]:
    """A store for trust domain example.org on the session etcd, under a fresh prefix."""
    opened = await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def etcd_client(etcd: EtcdProcess) -> AsyncIterator[Etcd3Client]:
    """A raw etcd client on the session etcd, for checking keys behind the store's back."""
    client = Etcd3Client([etcd.endpoint])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


class TcpProxy:
    """A loopback TCP relay that a test can cut and restore, as a network fault would."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        # Every relay from the moment its connection is accepted, so that a cut reaches the
        # ones still opening their upstream side too.
        self._relays: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after a cut) and relay to the target."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and abort every relayed connection; return once all are gone."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        relays = dict(self._relays)
        for task, writer in relays.items():
            writer.transport.abort()
            task.cancel()
        if relays:
            await asyncio.gather(*relays, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._server is None:
            # Accepted just before a cut, started just after it.
            writer.transport.abort()
            return
        self._relays[task] = writer
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self._target_port
            )
            pair = (writer, upstream_writer)
            self._open.add(pair)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except OSError:
            pass
        finally:
            # Closed here, whatever ended the relay: a transport left to the garbage
            # collector fails whichever test is running then.
            writer.transport.abort()
            if upstream_writer is not None:
                upstream_writer.transport.abort()
                self._open.discard((writer, upstream_writer))
            self._relays.pop(task, None)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while not writer.transport.is_closing() and (data := await reader.read(65536)):
            writer.write(data)
            await writer.drain()
    if not writer.transport.is_closing():
        writer.transport.abort()


@pytest.fixture
async def etcd_proxy(private_etcd: EtcdProcess) -> AsyncIterator[TcpProxy]:
    """A relay in front of the private etcd; ``cut()`` it to make etcd unreachable."""
    port = int(private_etcd.endpoint.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


@pytest.fixture(scope="session")
def dev_ca(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaHarness]:
    """One CA replica for the session on the session etcd (entries made by tests differ)."""
    harness = CaHarness(
        etcd.endpoint,
        "/dmc-session/",
        tmp_path_factory.mktemp("dev-ca"),
        trust_domain=TRUST_DOMAIN,
    )
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture
def ca(etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> Iterator[CaHarness]:
    """A CA replica of the test's own (its own prefix and data folder) on the session etcd."""
    harness = CaHarness(etcd.endpoint, etcd_prefix, tmp_path / "ca", trust_domain=TRUST_DOMAIN)
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()
