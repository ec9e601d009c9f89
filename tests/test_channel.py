"""dmc.secure_channel (sync): calls through renewals of both ends, in-flight calls, pinning."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ca_harness import CaHarness
from dmc.channel import SecureChannel, ServerNameMismatch, secure_channel
from dmc.source import IdentitySource
from source_helpers import (
    COUNT,
    SAY,
    SerialLog,
    bootstrap_source,
    start_echo_server,
    wait_until,
)

SERVER_NAME = "echo.example.org"


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
def echo(server_source: IdentitySource) -> Iterator[tuple[int, set[bytes]]]:
    seen: set[bytes] = set()
    server, port = start_echo_server(server_source, seen)
    try:
        yield port, seen
    finally:
        server.stop(None)


def test_calls_never_fail_through_three_renewals_of_client_and_server(
    client_source: IdentitySource,
    server_source: IdentitySource,
    echo: tuple[int, set[bytes]],
) -> None:
    port, seen = echo
    client_serials, server_serials = SerialLog(client_source), SerialLog(server_source)
    failures: list[str] = []
    calls = 0
    stop = threading.Event()

    with secure_channel(f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME) as channel:
        say = channel.unary_unary(SAY)
        count = channel.unary_stream(COUNT)

        def call_forever() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    say(b"hi", timeout=5)
                    if calls % 25 == 0:
                        assert [int(n) for n in count(b"3", timeout=5)] == [0, 1, 2]
                except Exception as exc:  # every kind of failure counts
                    failures.append(repr(exc))
                calls += 1
                time.sleep(0.01)

        caller = threading.Thread(target=call_forever)
        caller.start()
        try:
            renewed = wait_until(
                lambda: client_serials.renewals >= 3 and server_serials.renewals >= 3, 30
            )
        finally:
            stop.set()
            caller.join()
        # The subscribers of the last change may still be running: wait for the channel.
        latest = f"{client_source.current().svid.serial:x}".encode()
        assert wait_until(lambda: say(b"after", timeout=5) == latest, 5)

    assert renewed, (client_serials.serials, server_serials.serials)
    assert failures == []
    assert calls > 100
    # Every client certificate reached the server: each renewal moved calls to a new channel.
    assert {f"{serial:x}".encode() for serial in client_serials.serials} <= seen


def test_stream_in_flight_finishes_on_old_channel_which_is_then_closed(
    ca: CaHarness, tmp_path: Path
) -> None:
    seen: set[bytes] = set()
    with (
        bootstrap_source(ca, tmp_path / "s", "/srv", dns_names=(SERVER_NAME,)) as server_source,
        bootstrap_source(ca, tmp_path / "c", "/cli") as client_source,
    ):
        server, port = start_echo_server(server_source, seen)
        try:
            channel = secure_channel(f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME)
            with channel:
                first = channel.unary_unary(SAY)(b"", timeout=5)
                stream = channel.unary_stream(COUNT)(b"20", timeout=10)
                assert next(stream) == b"0"

                client_source.renew_now()
                assert wait_until(lambda: len(_retired(channel)) == 1, 10)
                second = channel.unary_unary(SAY)(b"", timeout=5)

                assert [int(n) for n in stream] == list(range(1, 20))
                assert wait_until(lambda: not _retired(channel), 5)
        finally:
            server.stop(None)

    assert first != second
    assert {first, second} <= seen


def test_server_name_mismatch_fails_with_clear_message(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    with secure_channel(
        f"127.0.0.1:{port}", client_source, server_name="other.example.org"
    ) as channel:
        with pytest.raises(ServerNameMismatch) as blocking:
            channel.unary_unary(SAY)(b"", timeout=5)
        with pytest.raises(grpc.RpcError) as streaming:
            list(channel.unary_stream(COUNT)(b"2", timeout=5))

    for error in (blocking.value, streaming.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not match the expected name 'other.example.org'" in str(error.details())


def test_future_and_with_call_go_through_the_current_channel(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    with secure_channel(f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME) as channel:
        say = channel.unary_unary(SAY)
        future = say.future(b"", timeout=5)
        response, call = say.with_call(b"", timeout=5)

        assert future.result() == response
        assert call.code() == grpc.StatusCode.OK
        assert response == f"{client_source.current().svid.serial:x}".encode()


def test_closed_channel_refuses_calls_and_stops_following_the_source(
    client_source: IdentitySource, echo: tuple[int, set[bytes]]
) -> None:
    port, _ = echo
    channel = secure_channel(f"127.0.0.1:{port}", client_source, server_name=SERVER_NAME)
    say = channel.unary_unary(SAY)
    say(b"", timeout=5)
    channel.close()

    with pytest.raises(ValueError, match="closed channel"):
        say(b"", timeout=5)
    serial = client_source.current().svid.serial
    client_source.renew_now()
    assert wait_until(lambda: client_source.current().svid.serial != serial, 10)
    assert not _retired(channel)


def _retired(channel: SecureChannel) -> set[object]:
    """The inner channels still open for calls in flight (white-box)."""
    with channel._lock:
        return set(channel._retired)
