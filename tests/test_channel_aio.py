"""dmc.aio.secure_channel: calls through renewals of both ends, in-flight calls, pinning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from ca_harness import CaHarness
from dmc.aio import AioSecureChannel, ServerNameMismatch, secure_channel
from dmc.credentials import server_credentials
from dmc.source import IdentitySource
from source_helpers import COUNT, SAY, SERVICE, SerialLog, bootstrap_source, peer_serial

SERVER_NAME = "echo-aio.example.org"


@pytest.fixture
def server_source(ca: CaHarness, tmp_path: Path) -> Iterator[IdentitySource]:
    with bootstrap_source(
        ca, tmp_path / "server", "/echo", ttl_seconds=10, dns_names=(SERVER_NAME,)
    ) as source:
        yield source


@pytest.fixture
def client_source(ca: CaHarness, tmp_path: Path) -> Iterator[IdentitySource]:
    with bootstrap_source(ca, tmp_path / "client", "/client", ttl_seconds=10) as source:
        yield source


@pytest.fixture
async def echo(server_source: IdentitySource) -> AsyncIterator[tuple[int, set[bytes]]]:
    seen: set[bytes] = set()

    async def say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        serial = peer_serial(context)  # type: ignore[arg-type]
        seen.add(serial)
        return serial

    async def count(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        for number in range(int(request.decode())):
            await asyncio.sleep(0.1)
            yield str(number).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Say": grpc.unary_unary_rpc_method_handler(say),
                    "Count": grpc.unary_stream_rpc_method_handler(count),
                },
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials(server_source))
    await server.start()
    try:
        yield port, seen
    finally:
        await server.stop(None)


async def test_calls_never_fail_through_three_renewals_of_client_and_server(
    client_source: IdentitySource,
    server_source: IdentitySource,
    echo: tuple[int, set[bytes]],
) -> None:
    port, seen = echo
    client_serials, server_serials = SerialLog(client_source), SerialLog(server_source)
    failures: list[str] = []
    calls = 0

    async with secure_channel(
        f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME
    ) as channel:
        say = channel.unary_unary(SAY)
        count = channel.unary_stream(COUNT)

        async def call_forever(stop: asyncio.Event) -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    await say(b"hi", timeout=5)
                    if calls % 25 == 0:
                        numbers = [int(n) async for n in count(b"3", timeout=5)]
                        assert numbers == [0, 1, 2]
                except Exception as exc:  # every kind of failure counts
                    failures.append(repr(exc))
                calls += 1
                await asyncio.sleep(0.01)

        stop = asyncio.Event()
        callers = [asyncio.create_task(call_forever(stop)) for _ in range(3)]
        try:
            renewed = await _wait_until(
                lambda: client_serials.renewals >= 3 and server_serials.renewals >= 3, 30
            )
        finally:
            stop.set()
            await asyncio.gather(*callers)
        latest = f"{client_source.current().svid.serial:x}".encode()
        # The swap reaches the loop through call_soon_threadsafe: wait for it.
        assert await _wait_until_async(lambda: say(b"after", timeout=5), latest, 5)

    assert renewed, (client_serials.serials, server_serials.serials)
    assert failures == []
    assert calls > 100
    assert {f"{serial:x}".encode() for serial in client_serials.serials} <= seen


async def test_stream_in_flight_finishes_on_old_channel_which_is_then_closed(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    async with secure_channel(
        f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME
    ) as channel:
        first = await channel.unary_unary(SAY)(b"", timeout=5)
        stream = channel.unary_stream(COUNT)(b"20", timeout=10)
        responses = aiter(stream)
        assert await anext(responses) == b"0"

        client_source.renew_now()
        assert await _wait_until(lambda: len(channel._retired) == 1, 10)
        second = await channel.unary_unary(SAY)(b"", timeout=5)
        rest = [int(n) async for n in responses]
        assert await _wait_until(lambda: not channel._retired and not channel._closing, 5)

    assert rest == list(range(1, 20))
    assert first != second


async def test_server_name_mismatch_fails_with_clear_message(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    async with secure_channel(
        f"127.0.0.1:{port}", client_source, server_name="other.example.org"
    ) as channel:
        with pytest.raises(ServerNameMismatch) as unary:
            await channel.unary_unary(SAY)(b"", timeout=5)
        with pytest.raises(ServerNameMismatch) as streaming:
            [n async for n in channel.unary_stream(COUNT)(b"2", timeout=5)]

    for error in (unary.value, streaming.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not match the expected name 'other.example.org'" in str(error.details())


async def test_closed_channel_refuses_calls_and_ignores_later_changes(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    channel: AioSecureChannel = secure_channel(
        f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME
    )
    say = channel.unary_unary(SAY)
    await say(b"", timeout=5)
    await channel.close()

    with pytest.raises(grpc.aio.UsageError, match="closed channel"):
        await say(b"", timeout=5)
    serial = client_source.current().svid.serial
    client_source.renew_now()
    assert await _wait_until(lambda: client_source.current().svid.serial != serial, 10)
    await asyncio.sleep(0.1)
    assert not channel._retired


async def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def _wait_until_async(
    call: Callable[[], grpc.aio.UnaryUnaryCall[bytes, bytes]], expected: bytes, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await call() == expected:
            return True
        await asyncio.sleep(0.05)
    return False
