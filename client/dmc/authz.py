"""Server-side authorization of each call from the peer's verified certificate (SPEC §7).

The TLS handshake has already verified the client's chain against the trust bundle; what
it cannot check is left to :class:`Authorizer`, in this order:

1. the leaf is a valid X.509-SVID of the server's own trust domain, and not expired
   (``UNAUTHENTICATED`` otherwise, e.g. "certificate has 2 URI SANs");
2. it is not revoked (SPEC §3; ``PERMISSION_DENIED`` naming the revocation);
3. the server's own SPIFFE ID is among the scope's audiences, and the scope's
   permissions cover the full method name (``PERMISSION_DENIED`` naming what is missing).

A gRPC server interceptor sees the method and metadata but not the peer, so
:class:`AuthorizingInterceptor` (sync ``grpc``) and :class:`AioAuthorizingInterceptor`
(``grpc.aio``) wrap the method handler: its behaviour authorizes first, then runs the
servicer with the verified :class:`Peer` in :func:`current_peer`. Parsed certificates are
cached by their PEM bytes, so a call on a known connection parses no X.509.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, Self, TypeAlias, cast

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dmc.errors import DmcError, InvalidSvid, PermissionDenied, Unauthenticated, status_code_of
from dmc.scope import DelegationScope, permits_audience, permits_method
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid, parse_svid

__all__ = [
    "DEFAULT_EXEMPT_METHODS",
    "AioAuthorizingInterceptor",
    "Authorizer",
    "AuthorizingInterceptor",
    "IdentitySnapshot",
    "Peer",
    "RevocationChecker",
    "SvidSource",
    "current_peer",
]

_logger = logging.getLogger(__name__)

DEFAULT_EXEMPT_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
)
"""Methods any peer that passed the TLS handshake may call: health probes."""

_DEFAULT_CACHE_SIZE = 4096
# Bounds the handler cache when a generic handler answers arbitrary method names.
_HANDLER_CACHE_LIMIT = 1024

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Behaviour: TypeAlias = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Peer:
    """The verified caller of the current RPC: its SPIFFE ID, scope and certificate."""

    spiffe_id: SpiffeId
    scope: DelegationScope
    delegators: tuple[SpiffeId, ...]
    """The delegation chain, origin first (SPEC §3); empty for a root SVID."""
    serial: int
    not_after: datetime
    svid: Svid = field(repr=False, compare=False)

    @property
    def serial_hex(self) -> str:
        """The serial as SPEC §5 writes it: lower-case hex without separators."""
        return format(self.serial, "x")


_current: contextvars.ContextVar[Peer] = contextvars.ContextVar("dmc_authz_peer")


def current_peer() -> Peer:
    """The verified peer of the RPC being served, inside a behaviour the interceptor wraps.

    Raises ``LookupError`` outside such a behaviour (and in exempt methods).
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError(
            "no authorized peer: this code does not run inside an RPC authorized by "
            "dmc's AuthorizingInterceptor (or the method is exempt)"
        ) from None


class RevocationChecker(Protocol):
    """Anything that says whether an SVID is revoked: a ``RevocationSet`` or a follower."""

    def check(self, svid: Svid, /) -> None:
        """Raise ``PermissionDenied`` naming the revocation if ``svid`` is revoked."""


class IdentitySnapshot(Protocol):
    """What :meth:`AuthorizingInterceptor.from_source` reads from a source's snapshot."""

    @property
    def svid(self) -> Svid:
        """The current SVID of the server."""

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The server's own chain, leaf first (its intermediates sign peers too)."""

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """The trust bundle's roots."""


class SvidSource(Protocol):
    """An identity source as far as the interceptors need it (`dmc.IdentitySource` is one)."""

    def current(self) -> IdentitySnapshot:
        """The current snapshot of the identity."""

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(snapshot)`` after every change."""


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A peer certificate read once: the peer, or why it is refused."""

    peer: Peer | None
    refusal: tuple[type[DmcError], str] | None
    expires: float
    audience_denial: str | None
    methods: dict[str, str | None] = field(default_factory=dict)


class Authorizer:
    """The checks of SPEC §7 for one server, without gRPC: PEM bytes and method in, peer out.

    ``own_id`` is the server's SPIFFE ID, matched against the scope's audiences;
    ``trust_domain`` (by default ``own_id``'s) is the only one whose peers are accepted;
    ``revocations`` is consulted on every call (``None``: no revocation checking).
    """

    def __init__(
        self,
        own_id: SpiffeId | str,
        *,
        trust_domain: str | None = None,
        revocations: RevocationChecker | None = None,
        exempt_methods: Collection[str] = DEFAULT_EXEMPT_METHODS,
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        self.own_id = own_id if isinstance(own_id, SpiffeId) else SpiffeId.parse(own_id)
        self.trust_domain = trust_domain or self.own_id.trust_domain
        self.revocations = revocations
        self.exempt_methods = frozenset(exempt_methods)
        self._parsed = functools.lru_cache(maxsize=cache_size)(self._parse)
        self._cache_size = cache_size
        # None: only the TLS handshake vouches for the signer (see trust_signers).
        self._signers: tuple[x509.Certificate, ...] | None = None
        self._signed: dict[bytes, bool] = {}

    def trust_signers(self, signers: Sequence[x509.Certificate]) -> None:
        """Accept only peers whose certificate one of ``signers`` issued directly.

        ``signers`` are the trust bundle's roots and the server's own intermediates, given
        again on every bundle change. The handshake checks a connection's chain once, when
        it opens; this check lets a forced retirement (SPEC §5: everything the retired
        authority signed stops verifying) reach connections opened before it.
        """
        self._signers = tuple(signers)
        self._signed = {}

    def authorize(self, leaf_pem: bytes | None, method: str) -> Peer:
        """The verified peer behind ``leaf_pem`` if it may call ``method``; raises otherwise.

        Raises ``Unauthenticated`` (``InvalidSvid``) or ``PermissionDenied``; a revocation
        checker may raise ``Unavailable`` while it does not know the revocations yet.
        """
        try:
            return self._authorize(leaf_pem, method)
        except DmcError as exc:
            # STYLE: an expected denial is INFO, not ERROR.
            _logger.info("refused a call to %s (%s): %s", method, status_code_of(exc).name, exc)
            raise

    def _authorize(self, leaf_pem: bytes | None, method: str) -> Peer:
        if not leaf_pem:
            raise Unauthenticated("a client certificate is required (mTLS)")
        parsed = self._parsed(leaf_pem)
        if parsed.peer is None:
            assert parsed.refusal is not None
            error_type, message = parsed.refusal
            raise error_type(message)
        peer = parsed.peer
        if self._signers is not None:
            self._check_signer(leaf_pem, peer)
        # The handshake checked validity when the connection opened; a connection may
        # outlive the certificate.
        if time.time() > parsed.expires:
            raise Unauthenticated(
                f"certificate of {peer.spiffe_id} expired at {peer.not_after.isoformat()}"
            )

        if self.revocations is not None:
            self.revocations.check(peer.svid)
        if parsed.audience_denial is not None:
            raise PermissionDenied(parsed.audience_denial)
        try:
            method_denial = parsed.methods[method]
        except KeyError:
            method_denial = parsed.methods[method] = _method_denial(peer, method)
        if method_denial is not None:
            raise PermissionDenied(method_denial)
        return peer

    def _check_signer(self, leaf_pem: bytes, peer: Peer) -> None:
        signed = self._signed
        issued = signed.get(leaf_pem)
        if issued is None:
            issued = any(_issued_by(peer.svid.certificate, s) for s in self._signers or ())
            if len(signed) >= self._cache_size:
                signed.clear()
            signed[leaf_pem] = issued
        if not issued:
            raise Unauthenticated(
                f"certificate of {peer.spiffe_id} was not issued by an authority of the "
                "current trust bundle"
            )

    def _parse(self, leaf_pem: bytes) -> _Parsed:
        try:
            peer = self._read_peer(leaf_pem)
        except DmcError as exc:
            return _Parsed(None, (type(exc), str(exc)), 0.0, None)
        return _Parsed(
            peer=peer,
            refusal=None,
            expires=peer.not_after.timestamp(),
            audience_denial=self._audience_denial(peer),
        )

    def _read_peer(self, leaf_pem: bytes) -> Peer:
        try:
            certificate = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError as exc:
            raise InvalidSvid(f"peer certificate cannot be read: {exc}") from None
        svid = parse_svid(certificate)
        # X.509-SVID §5.2: a validator accepts SVIDs of the trust domain whose bundle
        # verified them; a root imported for this domain must not vouch for another.
        if svid.spiffe_id.trust_domain != self.trust_domain:
            raise Unauthenticated(
                f"peer {svid.spiffe_id} is not in trust domain {self.trust_domain}"
            )
        return Peer(
            spiffe_id=svid.spiffe_id,
            scope=svid.scope,
            delegators=tuple(SpiffeId.parse(d) for d in svid.scope.delegators),
            serial=svid.serial,
            not_after=svid.not_after,
            svid=svid,
        )

    def _audience_denial(self, peer: Peer) -> str | None:
        # SPEC §3: the scope's audiences name the servers that may accept the holder's calls.
        if permits_audience(peer.scope, self.own_id):
            return None
        audiences = ", ".join(peer.scope.audiences) or "none"
        return (
            f"{self.own_id} is not among the audiences of {peer.spiffe_id} "
            f"(its scope admits: {audiences})"
        )


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _method_denial(peer: Peer, method: str) -> str | None:
    # SPEC §3 and §7: the scope's permissions are matched against the full method name.
    if permits_method(peer.scope, method):
        return None
    permissions = ", ".join(peer.scope.permissions) or "none"
    return (
        f"method {method} is not covered by the scope of {peer.spiffe_id} "
        f"(its scope permits: {permissions})"
    )


def _leaf_pem(auth_context: Mapping[str, Iterable[bytes]]) -> bytes | None:
    # gRPC puts the verified leaf (PEM) under x509_pem_cert (DEPENDENCIES.md).
    for pem in auth_context.get("x509_pem_cert", ()):
        return pem
    return None


class _Interceptor:
    """What the sync and aio interceptors share: configuration and the handler cache."""

    def __init__(
        self,
        own_id: SpiffeId | str,
        *,
        trust_domain: str | None = None,
        revocations: RevocationChecker | None = None,
        exempt_methods: Collection[str] = DEFAULT_EXEMPT_METHODS,
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        self.authorizer = Authorizer(
            own_id,
            trust_domain=trust_domain,
            revocations=revocations,
            exempt_methods=exempt_methods,
            cache_size=cache_size,
        )
        self._handlers: dict[str, tuple[_Handler, _Handler]] = {}

    @classmethod
    def from_source(
        cls,
        source: SvidSource,
        *,
        revocations: RevocationChecker | None = None,
        exempt_methods: Collection[str] = DEFAULT_EXEMPT_METHODS,
    ) -> Self:
        """An interceptor for the server whose identity ``source`` keeps.

        The own ID is the source's SVID's; renewals keep the ID, so it is read once. The
        signers it trusts follow the source's bundle (see `Authorizer.trust_signers`).
        """
        interceptor = cls(
            source.current().svid.spiffe_id,
            revocations=revocations,
            exempt_methods=exempt_methods,
        )
        authorizer = interceptor.authorizer

        def follow(snapshot: IdentitySnapshot) -> None:
            authorizer.trust_signers((*snapshot.bundle, *snapshot.chain[1:]))

        follow(source.current())
        source.subscribe(follow)
        return interceptor

    @property
    def own_id(self) -> SpiffeId:
        """The server's SPIFFE ID, matched against each peer's audiences."""
        return self.authorizer.own_id

    def _wrapped(
        self, handler: _Handler | None, method: str, wrap: Callable[[_Handler, str], _Handler]
    ) -> _Handler | None:
        if handler is None or method in self.authorizer.exempt_methods:
            return handler
        # Registered handlers are the same object on every call: wrap each once.
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(handler, method)
        if len(self._handlers) >= _HANDLER_CACHE_LIMIT:
            self._handlers.clear()
        self._handlers[method] = (handler, wrapped)
        return wrapped


class AuthorizingInterceptor(_Interceptor, grpc.ServerInterceptor):
    """A ``grpc.server`` interceptor that authorizes every call (SPEC §7).

    ``AuthorizingInterceptor(own_id, trust_domain=None, revocations=None,
    exempt_methods=DEFAULT_EXEMPT_METHODS)``, or :meth:`from_source`. Refusals abort the
    RPC with ``UNAUTHENTICATED`` or ``PERMISSION_DENIED`` and the reason.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        return self._wrapped(handler, handler_call_details.method, self._wrap)

    def _wrap(self, handler: _Handler, method: str) -> _Handler:
        return _wrap_handler(handler, _sync_behaviour(self.authorizer, method, handler))


class AioAuthorizingInterceptor(_Interceptor, grpc.aio.ServerInterceptor):
    """The ``grpc.aio.server`` twin of :class:`AuthorizingInterceptor`.

    Coroutine, async-generator and sync (thread pool) behaviours are all wrapped in kind.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        return self._wrapped(handler, handler_call_details.method, self._wrap)

    def _wrap(self, handler: _Handler, method: str) -> _Handler:
        return _wrap_handler(handler, _aio_behaviour(self.authorizer, method, handler))


def _wrap_handler(handler: _Handler, behaviour: _Behaviour) -> _Handler:
    """A handler like ``handler`` (same kind and serializers) running ``behaviour``."""
    factory: Callable[..., _Handler]
    if handler.request_streaming and handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner_behaviour(handler: _Handler) -> _Behaviour:
    behaviour = (
        handler.stream_stream
        or handler.stream_unary
        or handler.unary_stream
        or handler.unary_unary
    )
    if behaviour is None:
        raise TypeError("a gRPC method handler without a behaviour")
    return cast(_Behaviour, behaviour)


# -- sync behaviours ------------------------------------------------------------------------


def _sync_behaviour(authorizer: Authorizer, method: str, handler: _Handler) -> _Behaviour:
    inner = _inner_behaviour(handler)

    def authorize(context: grpc.ServicerContext) -> Peer:
        auth_context = cast(Mapping[str, Iterable[bytes]], context.auth_context())
        try:
            return authorizer.authorize(_leaf_pem(auth_context), method)
        except DmcError as exc:
            context.abort(status_code_of(exc), str(exc))

    if not handler.response_streaming:

        def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
            peer = authorize(context)
            token = _current.set(peer)
            try:
                return inner(request, context)
            finally:
                _current.reset(token)

        return unary_response

    def stream_response(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # A generator, so that the check runs where the responses are taken: gRPC's aio
        # server calls a sync streaming behaviour on its event loop, where abort() of the
        # sync context would block, and iterates it in the thread pool.
        peer = authorize(context)
        scoped = contextvars.copy_context()
        scoped.run(_current.set, peer)
        responses = iter(scoped.run(inner, request, context))
        try:
            while True:
                try:
                    response = scoped.run(next, responses)
                except StopIteration:
                    return
                yield response
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                scoped.run(close)

    return stream_response


# -- aio behaviours -------------------------------------------------------------------------


def _aio_behaviour(authorizer: Authorizer, method: str, handler: _Handler) -> _Behaviour:
    inner = _inner_behaviour(handler)
    # gRPC's aio server runs a behaviour that is neither a coroutine nor an async generator
    # function in its thread pool with a sync context: wrap those as the sync server would.
    if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
        return _sync_behaviour(authorizer, method, handler)

    async def authorize(context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
        try:
            return authorizer.authorize(_leaf_pem(context.auth_context()), method)
        except DmcError as exc:
            await context.abort(status_code_of(exc), str(exc))

    if inspect.iscoroutinefunction(inner):

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            peer = await authorize(context)
            token = _current.set(peer)
            try:
                return await inner(request, context)
            finally:
                _current.reset(token)

        return coroutine

    async def async_generator(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        peer = await authorize(context)
        responses = cast(AsyncIterator[Any], inner(request, context))
        try:
            while True:
                # Set around each step only, so no token is held across a yield (the
                # generator may be closed from another task's context).
                token = _current.set(peer)
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                finally:
                    _current.reset(token)
                yield response
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    return async_generator
