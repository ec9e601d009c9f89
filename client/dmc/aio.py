"""The `grpc.aio` counterpart of `dmc.channel` (SPEC §7: both sync and aio are served).

`secure_channel` returns a `grpc.aio.Channel` that sends each call through a current
``grpc.aio`` TLS channel built from the identity source's snapshot. The source announces
changes on its own thread; the channel hands them to its event loop
(``loop.call_soon_threadsafe``), where the new inner channel is built and swapped in, so
all of the channel's state is touched by the loop alone. Calls in flight finish on the
old inner channel, which is closed when the last of them is done. Create the channel in a
coroutine, on the loop that will use it.

The server is pinned by ``server_name`` as in `dmc.channel`; a handshake refused because
the name does not match raises `ServerNameMismatch`, a `grpc.aio.AioRpcError` with the
original status code and details that say so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from dmc.channel import (
    channel_options,
    expected_name,
    identity_credentials,
    is_name_mismatch,
    mismatch_details,
)
from dmc.source import Identity, IdentitySource

__all__ = ["AioSecureChannel", "ServerNameMismatch", "secure_channel"]

_log = logging.getLogger(__name__)

_Option = tuple[str, Any]


class ServerNameMismatch(grpc.aio.AioRpcError):
    """A call refused at the handshake: the server's certificate is for another name."""

    def __init__(self, error: grpc.aio.AioRpcError, expected: str) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),
            details=mismatch_details(expected, error.details()),
            debug_error_string=error.debug_error_string(),
        )
        self.expected_name = expected


def _translate(error: grpc.aio.AioRpcError, expected: str) -> grpc.aio.AioRpcError:
    if is_name_mismatch(error.code(), error.details()):
        return ServerNameMismatch(error, expected)
    return error


class _Inner:
    """One aio TLS channel built from one identity, and the calls it carries."""

    __slots__ = ("channel", "in_flight", "retired")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.in_flight = 0
        self.retired = False


class AioSecureChannel(grpc.aio.Channel):
    """A `grpc.aio.Channel` over mTLS whose TLS channel follows an `IdentitySource`."""

    def __init__(
        self,
        target: str,
        source: IdentitySource,
        *,
        server_name: str | None = None,
        options: Sequence[_Option] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._target = target
        self._options = channel_options(server_name, options)
        self._interceptors = list(interceptors) if interceptors is not None else None
        self.expected_name = expected_name(target, server_name)
        self._closed = False
        self._retired: set[_Inner] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._inner = self._build(source.current())
        self._unsubscribe = source.subscribe(self._on_identity)

    # -- inner channels (all on the event loop) -------------------------------------------

    def _build(self, identity: Identity) -> _Inner:
        return _Inner(
            grpc.aio.secure_channel(
                self._target,
                identity_credentials(identity),
                options=self._options,
                interceptors=self._interceptors,
            )
        )

    def _on_identity(self, identity: Identity) -> None:
        # Runs on the source's thread: hand the change to the loop.
        try:
            self._loop.call_soon_threadsafe(self._swap, identity)
        except RuntimeError:
            _log.debug("event loop of the channel to %s is closed; change ignored", self._target)

    def _swap(self, identity: Identity) -> None:
        if self._closed:
            return
        old, self._inner = self._inner, self._build(identity)
        old.retired = True
        if old.in_flight == 0:
            self._close_later(old)
        else:
            self._retired.add(old)
        _log.debug(
            "channel to %s now uses SVID serial %x (%d calls finishing on the old one)",
            self._target,
            identity.svid.serial,
            old.in_flight,
        )

    def _close_later(self, inner: _Inner) -> None:
        task = self._loop.create_task(inner.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _acquire(self) -> _Inner:
        if self._closed:
            raise grpc.aio.UsageError("Cannot invoke RPC on closed channel!")
        self._inner.in_flight += 1
        return self._inner

    def _release(self, inner: _Inner) -> None:
        inner.in_flight -= 1
        if inner.retired and inner.in_flight == 0 and inner in self._retired:
            self._retired.discard(inner)
            if not self._closed:
                self._close_later(inner)

    # -- grpc.aio.Channel -----------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(
            self, "unary_stream", method, request_serializer, response_deserializer
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(
            self, "stream_unary", method, request_serializer, response_deserializer
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The connectivity of the current inner channel."""
        return self._inner.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait for the current inner channel to leave ``last_observed_state``."""
        await self._inner.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until the current inner channel is ready."""
        await self._inner.channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Stop following the source; close every inner channel, with ``grace`` for calls."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        inners = [self._inner, *self._retired]
        self._retired.clear()
        await asyncio.gather(
            *(inner.channel.close(grace) for inner in inners), *list(self._closing)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def secure_channel(
    target: str,
    source: IdentitySource,
    *,
    server_name: str | None = None,
    options: Sequence[_Option] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> AioSecureChannel:
    """A `grpc.aio.Channel` to ``target`` over mTLS as ``source``'s SVID, following it.

    Call it from a coroutine. ``server_name`` is the DNS name the server's certificate must
    carry (by default the host of ``target``); ``interceptors`` go on every inner channel.
    """
    return AioSecureChannel(
        target, source, server_name=server_name, options=options, interceptors=interceptors
    )


# -- multicallables -------------------------------------------------------------------------


class _Bound:
    """Calls one method, each call on the channel's current inner channel."""

    def __init__(
        self,
        channel: AioSecureChannel,
        kind: str,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._request_serializer = request_serializer
        self._response_deserializer = response_deserializer
        self._cache: tuple[_Inner, Any] | None = None

    def _start(self, *args: Any, **kwargs: Any) -> _Call:
        inner = self._channel._acquire()
        try:
            cached = self._cache
            if cached is None or cached[0] is not inner:
                factory = getattr(inner.channel, self._kind)
                cached = self._cache = (
                    inner,
                    factory(
                        self._method,
                        request_serializer=self._request_serializer,
                        response_deserializer=self._response_deserializer,
                    ),
                )
            call = cached[1](*args, **kwargs)
        except BaseException:
            self._channel._release(inner)
            raise
        # Released once, on the loop, when the call is done: finished, failed or cancelled.
        call.add_done_callback(lambda _: self._channel._release(inner))
        return _Call(call, self._channel.expected_name)


class _UnaryUnary(_Bound, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._start(request, *args, **kwargs)


class _UnaryStream(_Bound, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._start(request, *args, **kwargs)


class _StreamUnary(_Bound, grpc.aio.StreamUnaryMultiCallable[Any, Any]):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._start(*args, **kwargs)


class _StreamStream(_Bound, grpc.aio.StreamStreamMultiCallable[Any, Any]):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._start(*args, **kwargs)


class _Call(
    grpc.aio.UnaryUnaryCall[Any, Any],
    grpc.aio.UnaryStreamCall[Any, Any],
    grpc.aio.StreamUnaryCall[Any, Any],
    grpc.aio.StreamStreamCall[Any, Any],
):
    """A call of any kind whose name-mismatch errors read clearly; the rest is delegated."""

    def __init__(self, call: Any, expected: str) -> None:
        self._call = call
        self._expected = expected

    def _error(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        return _translate(error, self._expected)

    # grpc.aio.RpcContext and grpc.aio.Call
    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def done(self) -> bool:
        return bool(self._call.done())

    def time_remaining(self) -> float | None:
        remaining: float | None = self._call.time_remaining()
        return remaining

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        details: str = await self._call.details()
        if is_name_mismatch(await self._call.code(), details):
            return mismatch_details(self._expected, details)
        return details

    async def wait_for_connection(self) -> None:
        try:
            await self._call.wait_for_connection()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error

    # unary responses
    def __await__(self) -> Generator[Any, None, Any]:
        try:
            response = yield from self._call.__await__()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return response

    # response streams
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        try:
            async for response in self._call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error

    # request streams
    async def write(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
