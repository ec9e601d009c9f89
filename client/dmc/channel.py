"""A gRPC channel that keeps mTLS working across renewals and bundle changes (SPEC §7).

`secure_channel` returns a `grpc.Channel` that sends each call through a current TLS
channel built from the identity source's snapshot (client certificate, key, and the trust
bundle as roots). When the source changes, a new inner channel is built for the calls that
follow; calls in flight finish on the old one, which is closed when the last of them ends.
A call counts as in flight from its invocation until it ends: a blocking call until it
returns, a future or a stream until it is done (a stream left unread and never cancelled
keeps its channel open). So no call fails because a certificate rotated.

Python gRPC gives a client no view of the server's certificate, so the server is pinned by
a DNS name in its SVID (``server_name``, sent as ``grpc.ssl_target_name_override``); the
CA gives a DNS name to one SPIFFE ID only, which makes that a pin on the SPIFFE ID. A
handshake that fails because the name does not match raises `ServerNameMismatch`, an
`grpc.RpcError` with the original status code and a details text that says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from dmc.source import Identity, IdentitySource

__all__ = ["SecureChannel", "ServerNameMismatch", "secure_channel"]

_log = logging.getLogger(__name__)

_Option = tuple[str, Any]
_Metadata = Any

# grpc's runtime classes are not generic; only its type stubs are.
if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
    _FutureBase = grpc.Future[Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable
    _FutureBase = grpc.Future

# What BoringSSL's verifier reports, through gRPC, when no SAN matches the expected name
# (measured with grpcio 1.85: UNAVAILABLE "... Hostname Verification Check failed.").
HOSTNAME_CHECK_FAILED = "Hostname Verification Check failed"
NAME_OVERRIDE_OPTION = "grpc.ssl_target_name_override"


def mismatch_details(expected: str, details: str | None) -> str:
    """The details text for a handshake refused because the server's name did not match."""
    return (
        f"the server's certificate did not match the expected name '{expected}' "
        f"(SPEC §7: a server is pinned by the DNS name in its SVID): {details}"
    )


def is_name_mismatch(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a status is gRPC's report of a server certificate for another name."""
    return code == grpc.StatusCode.UNAVAILABLE and HOSTNAME_CHECK_FAILED in (details or "")


def channel_options(
    server_name: str | None, options: Sequence[_Option]
) -> tuple[tuple[str, Any], ...]:
    """``options`` with ``server_name`` as the name override, when given."""
    if server_name is None:
        return tuple(options)
    return (
        *(o for o in options if o[0] != NAME_OVERRIDE_OPTION),
        (NAME_OVERRIDE_OPTION, server_name),
    )


def expected_name(target: str, server_name: str | None) -> str:
    """The name the server's certificate must carry: ``server_name``, else the target host."""
    if server_name is not None:
        return server_name
    address = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        address = address.removeprefix(scheme)
    host, separator, port = address.rpartition(":")
    if separator and port.isdigit() and (host.endswith("]") or ":" not in host):
        address = host
    return address.strip("[]")


def identity_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """mTLS channel credentials: the SVID as client certificate, the bundle as roots."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.bundle_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.chain_pem,
    )


class ServerNameMismatch(grpc.RpcError, grpc.Call):
    """A call refused at the handshake: the server's certificate is for another name.

    ``code()`` is the original status (``UNAVAILABLE``); ``details()`` says which name was
    expected, followed by gRPC's own text. The original error is ``__cause__``.
    """

    def __init__(self, error: grpc.RpcError, expected: str) -> None:
        super().__init__(mismatch_details(expected, error.details()))
        self._error = error
        self._details = mismatch_details(expected, error.details())
        self.expected_name = expected

    def code(self) -> grpc.StatusCode:
        return self._error.code()

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> _Metadata:
        getter = getattr(self._error, "initial_metadata", None)
        return getter() if getter is not None else ()

    def trailing_metadata(self) -> _Metadata:
        return self._error.trailing_metadata()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def __str__(self) -> str:
        return f"{self.code().name}: {self._details}"


class _Inner:
    """One TLS channel built from one identity, and the calls it carries."""

    __slots__ = ("channel", "closed", "in_flight", "retired", "serial")

    def __init__(self, channel: grpc.Channel, serial: int) -> None:
        self.channel = channel
        self.serial = serial
        self.in_flight = 0
        self.retired = False
        self.closed = False


class SecureChannel(grpc.Channel):
    """A `grpc.Channel` over mTLS whose TLS channel follows an `IdentitySource`."""

    def __init__(
        self,
        target: str,
        source: IdentitySource,
        *,
        server_name: str | None = None,
        options: Sequence[_Option] = (),
    ) -> None:
        self._target = target
        self._options = channel_options(server_name, options)
        self._expected_name = expected_name(target, server_name)
        self._lock = threading.Lock()
        self._closed = False
        self._connectivity: list[tuple[Callable[[grpc.ChannelConnectivity], None], bool]] = []
        self._retired: set[_Inner] = set()
        self._closers: list[threading.Thread] = []
        self._inner = self._build(source.current())
        self._unsubscribe = source.subscribe(self._on_identity)

    # -- inner channels -------------------------------------------------------------------

    def _build(self, identity: Identity) -> _Inner:
        channel = grpc.secure_channel(
            self._target, identity_credentials(identity), options=self._options
        )
        return _Inner(channel, identity.svid.serial)

    def _on_identity(self, identity: Identity) -> None:
        new = self._build(identity)
        with self._lock:
            if self._closed:
                new.channel.close()
                return
            old, self._inner = self._inner, new
            old.retired = True
            close_old = old.in_flight == 0
            if close_old:
                old.closed = True
            else:
                self._retired.add(old)
            watchers = list(self._connectivity)
        for callback, try_to_connect in watchers:
            old.channel.unsubscribe(callback)
            new.channel.subscribe(callback, try_to_connect)
        if close_old:
            old.channel.close()
        _log.debug(
            "channel to %s now uses SVID serial %x (%d calls finishing on the old one)",
            self._target,
            identity.svid.serial,
            old.in_flight,
        )

    def _acquire(self) -> _Inner:
        with self._lock:
            if self._closed:
                # As grpc's own channel says when a call is made after close().
                raise ValueError("Cannot invoke RPC on closed channel!")
            inner = self._inner
            inner.in_flight += 1
            return inner

    def _release(self, inner: _Inner) -> None:
        with self._lock:
            inner.in_flight -= 1
            close = inner.retired and inner.in_flight == 0 and not inner.closed
            if close:
                inner.closed = True
                self._retired.discard(inner)
        if close:
            # The last call's done-callback runs on the channel's own gRPC thread, and
            # closing a channel from that thread waits for the thread itself: a deadlock
            # seen under load. The close runs on a short-lived thread of its own instead.
            closer = threading.Thread(
                target=inner.channel.close, name="dmc-channel-close", daemon=True
            )
            closer.start()
            with self._lock:
                self._closers = [t for t in self._closers if t.is_alive()]
                self._closers.append(closer)

    def _translate(self, error: grpc.RpcError) -> grpc.RpcError:
        if is_name_mismatch(error.code(), error.details()):
            return ServerNameMismatch(error, self._expected_name)
        return error

    # -- grpc.Channel ---------------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(
            self, _Method(method, request_serializer, response_deserializer, _registered_method)
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(
            self, _Method(method, request_serializer, response_deserializer, _registered_method)
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(
            self, _Method(method, request_serializer, response_deserializer, _registered_method)
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self, _Method(method, request_serializer, response_deserializer, _registered_method)
        )

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Watch the connectivity of the current inner channel, and of each one after it."""
        with self._lock:
            self._connectivity.append((callback, try_to_connect))
            inner = self._inner
        inner.channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._connectivity = [(c, t) for c, t in self._connectivity if c != callback]
            inner = self._inner
        inner.channel.unsubscribe(callback)

    def close(self) -> None:
        """Stop following the source and close every inner channel (cancelling their calls)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inners = [self._inner, *self._retired]
            self._retired.clear()
        self._unsubscribe()
        for inner in inners:
            inner.closed = True
            inner.channel.close()
        with self._lock:
            closers, self._closers = self._closers, []
        for closer in closers:
            closer.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def secure_channel(
    target: str,
    source: IdentitySource,
    *,
    server_name: str | None = None,
    options: Sequence[_Option] = (),
) -> SecureChannel:
    """A `grpc.Channel` to ``target`` over mTLS as ``source``'s SVID, following its changes.

    ``server_name`` is the DNS name in the server's SVID that the server's certificate must
    carry (by default the host of ``target``). ``options`` are gRPC channel options.
    """
    return SecureChannel(target, source, server_name=server_name, options=options)


# -- multicallables -------------------------------------------------------------------------


class _Method:
    """A method of the channel and how to get its multicallable on an inner channel."""

    __slots__ = ("name", "registered", "request_serializer", "response_deserializer")

    def __init__(
        self,
        name: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        registered: bool | None,
    ) -> None:
        self.name = name
        self.request_serializer = request_serializer
        self.response_deserializer = response_deserializer
        self.registered = bool(registered)


class _Bound:
    """Calls one method, each call on the channel's current inner channel."""

    def __init__(self, channel: SecureChannel, method: _Method) -> None:
        self._channel = channel
        self._method = method
        self._cache: tuple[_Inner, Any] | None = None

    def _callable(self, inner: _Inner, kind: str) -> Any:
        cached = self._cache
        if cached is not None and cached[0] is inner:
            return cached[1]
        factory = getattr(inner.channel, kind)
        multicallable = factory(
            self._method.name,
            request_serializer=self._method.request_serializer,
            response_deserializer=self._method.response_deserializer,
            _registered_method=self._method.registered,
        )
        self._cache = (inner, multicallable)
        return multicallable

    def _blocking(self, kind: str, attribute: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel._acquire()
        try:
            return getattr(self._callable(inner, kind), attribute)(*args, **kwargs)
        except grpc.RpcError as error:
            translated = self._channel._translate(error)
            if translated is error:
                raise
            raise translated from error
        finally:
            self._channel._release(inner)

    def _started(self, kind: str, attribute: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel._acquire()
        try:
            call = getattr(self._callable(inner, kind), attribute)(*args, **kwargs)
        except BaseException:
            self._channel._release(inner)
            raise
        # Released once, when the call is done: finished, failed or cancelled.
        call.add_done_callback(lambda _: self._channel._release(inner))
        return _Call(call, self._channel._translate, self._channel._expected_name)


class _UnaryUnary(_Bound, _UnaryUnaryBase):
    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("unary_unary", "__call__", request, *args, **kwargs)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("unary_unary", "with_call", request, *args, **kwargs)

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._started("unary_unary", "future", request, *args, **kwargs)


class _UnaryStream(_Bound, _UnaryStreamBase):
    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._started("unary_stream", "__call__", request, *args, **kwargs)


class _StreamUnary(_Bound, _StreamUnaryBase):
    def __call__(self, request_iterator: Iterator[Any], *args: Any, **kwargs: Any) -> Any:
        return self._blocking("stream_unary", "__call__", request_iterator, *args, **kwargs)

    def with_call(self, request_iterator: Iterator[Any], *args: Any, **kwargs: Any) -> Any:
        return self._blocking("stream_unary", "with_call", request_iterator, *args, **kwargs)

    def future(self, request_iterator: Iterator[Any], *args: Any, **kwargs: Any) -> Any:
        return self._started("stream_unary", "future", request_iterator, *args, **kwargs)


class _StreamStream(_Bound, _StreamStreamBase):
    def __call__(self, request_iterator: Iterator[Any], *args: Any, **kwargs: Any) -> Any:
        return self._started("stream_stream", "__call__", request_iterator, *args, **kwargs)


class _Call(grpc.Call, _FutureBase):
    """A started call (future or response stream) whose name-mismatch errors read clearly."""

    def __init__(
        self, call: Any, translate: Callable[[grpc.RpcError], grpc.RpcError], expected: str
    ) -> None:
        self._call = call
        self._translate = translate
        self._expected = expected

    def _raise(self, error: grpc.RpcError) -> Any:
        translated = self._translate(error)
        if translated is error:
            raise error
        raise translated from error

    # grpc.RpcContext and grpc.Call
    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._call.add_callback(callback))

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def is_active(self) -> bool:
        return bool(self._call.is_active())

    def time_remaining(self) -> float:
        return float(self._call.time_remaining() or 0.0)

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._call.code()
        return code

    def details(self) -> str:
        details: str = self._call.details()
        if is_name_mismatch(self._call.code(), details):
            return mismatch_details(self._expected, details)
        return details

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    # grpc.Future
    def add_done_callback(self, fn: Callable[[grpc.Future[Any]], None]) -> None:
        self._call.add_done_callback(lambda _: fn(self))

    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def done(self) -> bool:
        return bool(self._call.done())

    def running(self) -> bool:
        return bool(self._call.running())

    def exception(self, timeout: float | None = None) -> Exception | None:
        error: Exception | None = self._call.exception(timeout)
        if isinstance(error, grpc.RpcError):
            return self._translate(error)
        return error

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._call.result(timeout)
        except grpc.RpcError as error:
            return self._raise(error)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    # response streams
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            return self._raise(error)
