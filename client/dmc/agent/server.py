"""The agent's server: SDS and the Workload API on one Unix socket, fed by one identity.

`AgentServer` serves an identity source that something else keeps renewed; `run_agent`
is what ``dmc agent`` does: open the identity source for a credential folder, serve it
until SIGTERM or SIGINT, then stop. While the CA cannot be reached the source keeps its
SVID, and the agent keeps serving it (SPEC §8).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from dmc.agent import sds, workload_api
from dmc.agent.feed import IdentityFeed, IdentitySourceLike
from dmc.agent.socket import SocketClaim, claim_socket
from dmc.connect import split_host_port
from dmc.source import IdentitySource

__all__ = ["AgentConfig", "AgentServer", "run_agent"]

_log = logging.getLogger(__name__)

# Seconds that open streams get to finish when the agent stops.
_STOP_GRACE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """``dmc agent``'s settings: the CA, the credential folder, the socket (SPEC §6)."""

    ca_address: str
    credential_dir: Path
    socket_path: Path

    def __post_init__(self) -> None:
        split_host_port(self.ca_address)


class AgentServer:
    """SDS and the SPIFFE Workload API for ``source`` on the Unix socket ``socket_path``."""

    def __init__(self, source: IdentitySourceLike, socket_path: str | os.PathLike[str]) -> None:
        self._source = source
        self._socket_path = socket_path
        self._claim: SocketClaim | None = None
        self._feed: IdentityFeed | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def socket_path(self) -> Path:
        """The socket's absolute path (after `start`)."""
        assert self._claim is not None, "start the agent first"
        return self._claim.path

    async def start(self) -> None:
        """Claim the socket, bind it, and serve; raise if the socket cannot be had."""
        claim = claim_socket(self._socket_path)
        try:
            feed = IdentityFeed(self._source)
            server = grpc.aio.server()
            sds.add_to_server(sds.SecretDiscoveryService(feed), server)
            workload_api.add_to_server(workload_api.WorkloadApiService(feed), server)
            # Workload Endpoint standard §7: reflection tells clients what else is served.
            reflection.enable_server_reflection(
                (sds.SERVICE_NAME, workload_api.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            server.add_insecure_port(claim.target)
            await server.start()
            claim.bound()
        except BaseException:
            claim.release()
            raise

        self._claim, self._feed, self._server = claim, feed, server
        snapshot = feed.current
        _log.info(
            "agent serving %s serial %x (not after %s) on %s: SDS and SPIFFE Workload API",
            snapshot.svid.spiffe_id,
            snapshot.svid.serial,
            snapshot.svid.not_after.isoformat(),
            claim.path,
        )

    async def stop(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """End the streams, stop serving, and remove the socket."""
        if self._feed is not None:
            self._feed.close()
        if self._server is not None:
            await self._server.stop(grace)
        if self._claim is not None:
            self._claim.release()
            _log.info("agent stopped; removed %s", self._claim.path)
        self._feed = self._server = self._claim = None


async def run_agent(
    config: AgentConfig,
    open_source: Callable[[AgentConfig], IdentitySourceLike] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``config``'s identity until SIGTERM or SIGINT (or until ``stop`` is set).

    ``open_source`` builds the identity source (default: the client library's, renewing
    the SVID of ``config.credential_dir`` at ``config.ca_address``).
    """
    source = (open_source or _open_identity_source)(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = AgentServer(source, config.socket_path)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # Joins the source's threads, which may be finishing a call to the CA.
        await asyncio.to_thread(source.close)


def _open_identity_source(config: AgentConfig) -> IdentitySource:
    return IdentitySource.from_directory(config.credential_dir, ca=config.ca_address)
