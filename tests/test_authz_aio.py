"""The ``grpc.aio`` authorizing interceptor (SPEC §7) on a real aio server with mTLS.

The aio server dispatches on the kind of a behaviour (coroutine, async generator, or a
sync function run in its thread pool), so each kind is served and checked here: the
permitted delegate is admitted and its handler sees the peer, anything outside its scope
is refused. Identities and the scenario come from ``test_authz``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import pytest

from ca_harness import CaHarness
from dmc.authz import AioAuthorizingInterceptor, RevocationChecker
from test_authz import (
    SERVICE,
    Identity,
    Scenario,
    client_channel,
    code_and_details,
    issue,
    make_scenario,
    server_credentials,
    unique_dns_name,
    who,
)

UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI_STREAM = f"/{SERVICE}/BidiStream"
WRITER_STREAM = f"/{SERVICE}/WriterStream"
SYNC_UNARY = f"/{SERVICE}/SyncUnary"
SYNC_STREAM = f"/{SERVICE}/SyncStream"
METHODS = (
    UNARY,
    SERVER_STREAM,
    CLIENT_STREAM,
    BIDI_STREAM,
    WRITER_STREAM,
    SYNC_UNARY,
    SYNC_STREAM,
)
RPC_TIMEOUT = 10.0


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return who()


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield who()
    yield who()


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
    return who() + b"#" + str(count).encode()


async def _bidi_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield who()


async def _writer_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.write(who())
    await context.write(who())


def _sync_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return who()


def _sync_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield who()
    yield who()


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),  # type: ignore[arg-type]
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),  # type: ignore[arg-type]
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),  # type: ignore[arg-type]
            "BidiStream": grpc.stream_stream_rpc_method_handler(_bidi_stream),  # type: ignore[arg-type]
            "WriterStream": grpc.unary_stream_rpc_method_handler(_writer_stream),  # type: ignore[arg-type]
            "SyncUnary": grpc.unary_unary_rpc_method_handler(_sync_unary),
            "SyncStream": grpc.unary_stream_rpc_method_handler(_sync_stream),
        },
    )


class AioCallee:
    """An aio server of the test service with the aio interceptor, on 127.0.0.1 port 0."""

    def __init__(
        self,
        identity: Identity,
        bundle_pem: bytes,
        own_id: str,
        revocations: RevocationChecker | None = None,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4)
        self.server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=[AioAuthorizingInterceptor(own_id, revocations=revocations)],
            handlers=[_echo_handler()],
        )
        port = self.server.add_secure_port("127.0.0.1:0", server_credentials(identity, bundle_pem))
        self.address = f"127.0.0.1:{port}"

    async def __aenter__(self) -> AioCallee:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)
        # A sync behaviour in the pool may still wait on this loop (its abort() runs here).
        await asyncio.to_thread(self._pool.shutdown, wait=True)


def aio_channel(
    address: str, identity: Identity, bundle_pem: bytes, server_name: str
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.chain_pem,
    )
    return grpc.aio.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )


async def _requests() -> AsyncIterator[bytes]:
    yield b"a"
    yield b"b"


async def aio_call(channel: grpc.aio.Channel, method: str) -> list[bytes]:
    """Call ``method`` in its kind; return every response."""
    if method in (UNARY, SYNC_UNARY):
        return [await channel.unary_unary(method)(b"one", timeout=RPC_TIMEOUT)]
    if method in (SERVER_STREAM, WRITER_STREAM, SYNC_STREAM):
        return [r async for r in channel.unary_stream(method)(b"one", timeout=RPC_TIMEOUT)]
    if method == CLIENT_STREAM:
        return [await channel.stream_unary(method)(_requests(), timeout=RPC_TIMEOUT)]
    assert method == BIDI_STREAM
    return [r async for r in channel.stream_stream(method)(_requests(), timeout=RPC_TIMEOUT)]


def _sync_call(channel: grpc.Channel, method: str) -> None:
    if method in (UNARY, SYNC_UNARY):
        channel.unary_unary(method)(b"one", timeout=RPC_TIMEOUT)
    elif method in (SERVER_STREAM, WRITER_STREAM, SYNC_STREAM):
        list(channel.unary_stream(method)(b"one", timeout=RPC_TIMEOUT))
    elif method == CLIENT_STREAM:
        channel.stream_unary(method)(iter([b"a", b"b"]), timeout=RPC_TIMEOUT)
    else:
        list(channel.stream_stream(method)(iter([b"a", b"b"]), timeout=RPC_TIMEOUT))


async def refusal_of(
    address: str, identity: Identity, bundle_pem: bytes, server_name: str, method: str
) -> tuple[grpc.StatusCode, str]:
    """The status of a refused call, made by a sync client in a thread.

    The aio client reports INTERNAL ("Internal error from Core") instead of the server's
    status when a request write loses the race with the server's early end
    (https://github.com/grpc/grpc/issues/36066); the sync client reports the status.
    """

    def refused() -> tuple[grpc.StatusCode, str]:
        with (
            client_channel(address, identity, bundle_pem, server_name) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            _sync_call(channel, method)
        return code_and_details(caught.value)

    return await asyncio.to_thread(refused)


def callee_of(scenario: Scenario, revocations: RevocationChecker | None = None) -> AioCallee:
    return AioCallee(
        scenario.callee, scenario.ca.bundle_pem, scenario.callee.spiffe_id, revocations
    )


def caller_channel(scenario: Scenario, callee: AioCallee, identity: Identity) -> grpc.aio.Channel:
    return aio_channel(callee.address, identity, scenario.ca.bundle_pem, scenario.callee_dns)


async def test_aio_every_behaviour_kind_is_authorized_and_sees_the_peer(ca: CaHarness) -> None:
    scenario = make_scenario(ca, job_permissions=(f"/{SERVICE}/*",))
    expected = f"{scenario.job.spiffe_id}|{scenario.web.spiffe_id}".encode()

    async with (
        callee_of(scenario) as callee,
        caller_channel(scenario, callee, scenario.job) as channel,
    ):
        results = {method: await aio_call(channel, method) for method in METHODS}

    assert results[UNARY] == [expected]
    assert results[SERVER_STREAM] == [expected, expected]
    assert results[CLIENT_STREAM] == [expected + b"#2"]
    assert results[BIDI_STREAM] == [expected, expected]
    assert results[WRITER_STREAM] == [expected, expected]
    assert results[SYNC_UNARY] == [expected]
    assert results[SYNC_STREAM] == [expected, expected]


@pytest.mark.parametrize("method", METHODS)
async def test_aio_every_behaviour_kind_is_refused_outside_the_scope(
    ca: CaHarness, method: str
) -> None:
    scenario = make_scenario(ca, job_permissions=("/test.Other/*",))

    async with callee_of(scenario) as callee:
        code, details = await refusal_of(
            callee.address, scenario.job, ca.bundle_pem, scenario.callee_dns, method
        )

    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert method in details


async def test_aio_delegate_calls_its_permitted_method_only(ca: CaHarness) -> None:
    scenario = make_scenario(ca)

    async with (
        callee_of(scenario) as callee,
        caller_channel(scenario, callee, scenario.job) as channel,
    ):
        allowed = await aio_call(channel, UNARY)
        refused = await refusal_of(
            callee.address, scenario.job, ca.bundle_pem, scenario.callee_dns, SERVER_STREAM
        )

    assert allowed == [f"{scenario.job.spiffe_id}|{scenario.web.spiffe_id}".encode()]
    assert refused[0] is grpc.StatusCode.PERMISSION_DENIED


async def test_aio_delegate_is_refused_by_a_server_outside_its_audiences(ca: CaHarness) -> None:
    scenario = make_scenario(ca)
    other_dns = unique_dns_name("other")
    other = issue(ca, "/other", dns_names=(other_dns,))

    async with AioCallee(other, ca.bundle_pem, other.spiffe_id) as callee:
        code, details = await refusal_of(
            callee.address, scenario.job, ca.bundle_pem, other_dns, UNARY
        )

    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert "audiences" in details
    assert other.spiffe_id in details
