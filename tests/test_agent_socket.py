"""The agent's socket (SPEC §8): private folder, mode 0600, stale replaced, live kept."""

from __future__ import annotations

import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent_support import AgentProcess, FakeSource, bootstrap_workload, can_connect
from ca_harness import CaHarness
from dmc.agent import AgentServer
from dmc.errors import FailedPrecondition, InvalidArgument


async def fetch_secrets(path: Path) -> list[str]:
    """The names of the secrets the agent on ``path`` answers FetchSecrets with."""
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        response = await sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=["default"]), timeout=5
        )
    return [resource.type_url for resource in response.resources]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[AgentServer]:
    agent = AgentServer(FakeSource(), tmp_path / "run" / "agent.sock")
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(0)


async def test_agent_makes_its_folder_0700_and_socket_0600(running: AgentServer) -> None:
    path = running.socket_path

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert await fetch_secrets(path) == [
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    ]


async def test_agent_refuses_a_folder_others_can_enter(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o755)

    with pytest.raises(FailedPrecondition, match=r"mode 0755\) is open to other users"):
        await AgentServer(FakeSource(), folder / "agent.sock").start()

    assert not (folder / "agent.sock").exists()


async def test_agent_replaces_a_stale_socket(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    # A socket file nobody listens on any more, as a crashed server leaves it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.exists() and not can_connect(path)

    agent = AgentServer(FakeSource(), path)
    await agent.start()
    try:
        assert len(await fetch_secrets(path)) == 1
    finally:
        await agent.stop(0)


async def test_agent_does_not_steal_a_live_socket(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        inode = path.lstat().st_ino

        with pytest.raises(FailedPrecondition, match="not replacing a live socket"):
            await AgentServer(FakeSource(), path).start()

        assert path.lstat().st_ino == inode
        assert can_connect(path)


async def test_second_agent_does_not_steal_the_first_ones_socket(
    running: AgentServer,
) -> None:
    with pytest.raises(FailedPrecondition, match="another dmc agent"):
        await AgentServer(FakeSource(), running.socket_path).start()

    assert len(await fetch_secrets(running.socket_path)) == 1


async def test_agent_never_replaces_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    path.write_text("precious")

    with pytest.raises(FailedPrecondition, match="not a socket"):
        await AgentServer(FakeSource(), path).start()

    assert path.read_text() == "precious"


async def test_agent_refuses_a_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "agent.sock"

    with pytest.raises(InvalidArgument, match="longer than 107 bytes"):
        await AgentServer(FakeSource(), path).start()


async def test_stop_removes_the_socket_and_unsubscribes(tmp_path: Path) -> None:
    source = FakeSource()
    agent = AgentServer(source, tmp_path / "run" / "agent.sock")
    await agent.start()
    path = agent.socket_path
    assert source.subscriber_count == 1

    await agent.stop(0)

    assert not path.exists()
    assert source.subscriber_count == 0


def test_dmc_agent_replaces_the_socket_of_a_crashed_agent(
    dev_ca: CaHarness, tmp_path: Path
) -> None:
    credentials = tmp_path / "web"
    bootstrap_workload(dev_ca, credentials)
    path = tmp_path / "run" / "agent.sock"
    crashed = AgentProcess(dev_ca.address, credentials, path).wait_serving()
    crashed.kill()
    assert path.exists() and not can_connect(path)

    agent = AgentProcess(dev_ca.address, credentials, path).wait_serving()
    try:
        assert "removed stale socket" in agent.log()
        assert can_connect(path)
    finally:
        assert agent.stop() == 0
    assert not path.exists()


def test_dmc_agent_exits_with_one_line_when_the_socket_is_live(
    dev_ca: CaHarness, tmp_path: Path
) -> None:
    credentials = tmp_path / "web"
    bootstrap_workload(dev_ca, credentials)
    path = tmp_path / "run" / "agent.sock"
    first = AgentProcess(dev_ca.address, credentials, path).wait_serving()
    try:
        second = AgentProcess(dev_ca.address, credentials, path)
        assert second.wait() == 1
        assert (
            second.log()
            .strip()
            .splitlines()[-1]
            .startswith("error: FAILED_PRECONDITION: another dmc agent holds")
        )
        assert can_connect(path)
    finally:
        assert first.stop() == 0


async def test_agent_refuses_a_folder_its_group_can_enter(tmp_path: Path) -> None:
    folder = tmp_path / "group"
    folder.mkdir()
    folder.chmod(0o710)

    with pytest.raises(FailedPrecondition, match="mode 0710"):
        await AgentServer(FakeSource(), folder / "agent.sock").start()

    assert list(folder.iterdir()) == []
