"""Envoy's Secret Discovery Service: the workload's SVID and trust bundle as TLS secrets.

SPEC §8: secret ``default`` is the workload's ``tls_certificate`` (chain, leaf first, and
private key); secret ``ROOTCA`` is a ``validation_context`` whose trusted CAs are the
trust bundle. The messages are the generated Envoy API types of ``xds-protos``.

``StreamSecrets`` follows the state-of-the-world xDS protocol
(https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol): every response
carries a version and a nonce; a request that echoes the latest nonce acknowledges it
(ACK) or, with ``error_detail``, rejects it (NACK, logged, not resent); a request with an
older nonce is stale and ignored. A response goes out on the first request, when the
requested names change, and whenever the content of the requested secrets changes, that
is on every renewal (``default``) and every bundle change (``ROOTCA``). The version is a
digest of that content, so it names the same secrets across agent restarts. Names the
agent does not serve are left out of the answer and logged; the stream stays open.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from dmc.agent.feed import IdentityFeed, IdentitySnapshot
from dmc.pem import certificates_to_pem, private_key_to_pem

__all__ = [
    "SECRET_TYPE_URL",
    "SERVICE_NAME",
    "TLS_CERTIFICATE_NAME",
    "VALIDATION_CONTEXT_NAME",
    "SecretDiscoveryService",
    "add_to_server",
    "secrets_of",
]

_log = logging.getLogger(__name__)

TLS_CERTIFICATE_NAME = "default"
VALIDATION_CONTEXT_NAME = "ROOTCA"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 (a type URL)
SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"

# Envoy's DiscoveryRequest and DiscoveryResponse; xds-protos ships no type stubs.
_Request = Any
_Response = Any


def secrets_of(snapshot: IdentitySnapshot) -> dict[str, Any]:
    """The secrets the agent serves for ``snapshot``, by name (SPEC §8)."""
    certificate = secret_pb2.Secret(
        name=TLS_CERTIFICATE_NAME,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(
                inline_bytes=certificates_to_pem(snapshot.chain)
            ),
            private_key=base_pb2.DataSource(inline_bytes=private_key_to_pem(snapshot.key)),
        ),
    )
    validation = secret_pb2.Secret(
        name=VALIDATION_CONTEXT_NAME,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=certificates_to_pem(snapshot.bundle)),
        ),
    )
    return {TLS_CERTIFICATE_NAME: certificate, VALIDATION_CONTEXT_NAME: validation}


class SecretDiscoveryService:
    """The servicer of ``envoy.service.secret.v3.SecretDiscoveryService`` on a feed."""

    def __init__(self, feed: IdentityFeed) -> None:
        self._feed = feed

    async def StreamSecrets(
        self, requests: AsyncIterator[_Request], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Response]:
        """One xDS stream: answer requests and push changes until the client leaves."""
        events: asyncio.Queue[Any] = asyncio.Queue()
        stop_listening = self._feed.listen(lambda: events.put_nowait(_CHANGED))
        reader = asyncio.create_task(_read_requests(requests, events))
        stream = _Stream(peer=context.peer())
        try:
            while (event := await events.get()) is not _END:
                if isinstance(event, _Unreadable):
                    # xDS: a request that is not a DiscoveryRequest ends the stream with an
                    # error the client can see, not with OK as if it had hung up.
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the SDS request stream carried an unreadable request ({event.reason})",
                    )
                if event is _CHANGED:
                    response = stream.on_change(self._feed.current)
                else:
                    await _refuse_other_types(event, context)
                    response = stream.on_request(event, self._feed.current)
                if response is not None:
                    yield response
        finally:
            stop_listening()
            reader.cancel()

    async def FetchSecrets(
        self, request: _Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Response:
        """The requested secrets once, with the version they would have on a stream."""
        await _refuse_other_types(request, context)
        names = _requested_names(request)
        response = _response(names, self._feed.current)
        _log_answer(f"fetch by {_node(request)}", context.peer(), names, response, None)
        return response

    async def DeltaSecrets(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        """Incremental xDS is not served; Envoy's SDS uses ``StreamSecrets``."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "dmc agent serves state-of-the-world SDS (StreamSecrets), not DeltaSecrets",
        )
        yield  # pragma: no cover - abort raises; this makes the method a stream handler


def add_to_server(service: SecretDiscoveryService, server: grpc.aio.Server) -> None:
    """Register ``service`` on ``server``."""
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)


# -- one stream ----------------------------------------------------------------------------

_END: Any = object()
"""Queued after the client's last request."""


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """Queued when the request stream failed: the client sent what cannot be read."""

    reason: str


_CHANGED: Any = object()
"""Queued after each change of the identity."""


@dataclass(slots=True)
class _Stream:
    """The xDS state of one ``StreamSecrets`` call."""

    peer: str
    node: str = "?"
    names: tuple[str, ...] | None = None
    nonce: str = ""
    version: str = ""

    def on_request(self, request: _Request, snapshot: IdentitySnapshot) -> _Response | None:
        """Handle a request: the first, an ACK, a NACK, or a change of names."""
        self.node = _node(request, self.node)
        if self.nonce and request.response_nonce != self.nonce:
            # xDS protocol: a request whose nonce is not the latest one sent is stale.
            _log.debug(
                "SDS %s: ignored a stale request (nonce %r)", self.node, request.response_nonce
            )
            return None
        if self.nonce:
            self._acknowledge(request)

        names = _requested_names(request)
        if self.names is not None and set(names) == set(self.names):
            return None
        self.names = names
        return self._send(snapshot)

    def on_change(self, snapshot: IdentitySnapshot) -> _Response | None:
        """A renewal or bundle change: push if the requested secrets changed."""
        if self.names is None or _version(_resources(self.names, snapshot)) == self.version:
            return None
        return self._send(snapshot)

    def _acknowledge(self, request: _Request) -> None:
        if request.HasField("error_detail"):
            _log.warning(
                "SDS %s rejected version %s of %s (keeps version %r): %s",
                self.node,
                self.version,
                ", ".join(self.names or ()),
                request.version_info,
                request.error_detail.message,
            )
        else:
            _log.debug("SDS %s acknowledged version %s", self.node, request.version_info)

    def _send(self, snapshot: IdentitySnapshot) -> _Response:
        assert self.names is not None
        response = _response(self.names, snapshot)
        self.nonce, self.version = response.nonce, response.version_info
        _log_answer(f"push to {self.node}", self.peer, self.names, response, snapshot)
        return response


# -- responses -----------------------------------------------------------------------------


def _requested_names(request: _Request) -> tuple[str, ...]:
    """The names asked for; none means all (the xDS wildcard subscription)."""
    names = tuple(dict.fromkeys(name for name in request.resource_names if name))
    return names or _SERVED


def _resources(names: Iterable[str], snapshot: IdentitySnapshot) -> list[Any]:
    available = secrets_of(snapshot)
    return [available[name] for name in names if name in available]


def _response(names: tuple[str, ...], snapshot: IdentitySnapshot) -> _Response:
    resources = _resources(names, snapshot)
    response = discovery_pb2.DiscoveryResponse(
        version_info=_version(resources),
        type_url=SECRET_TYPE_URL,
        nonce=secrets.token_hex(8),
    )
    for resource in resources:
        response.resources.add().Pack(resource)
    return response


def _version(resources: Iterable[Any]) -> str:
    """A digest of the secrets' content: equal content, equal version."""
    digest = hashlib.sha256()
    for resource in resources:
        digest.update(resource.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def _node(request: _Request, default: str = "?") -> str:
    """The Envoy node that sent ``request``, as ``cluster/id``, for the log."""
    node = request.node
    return f"{node.cluster}/{node.id}" if node.id else default


async def _refuse_other_types(
    request: _Request, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    if request.type_url and request.type_url != SECRET_TYPE_URL:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"this is the Secret Discovery Service: type_url must be {SECRET_TYPE_URL}, "
            f"not {request.type_url[:200]}",
        )


def _log_answer(
    what: str,
    peer: str,
    names: tuple[str, ...],
    response: _Response,
    snapshot: IdentitySnapshot | None,
) -> None:
    unknown = [name for name in names if name not in _SERVED]
    if unknown:
        _log.warning(
            "SDS %s (%s) asked for secrets this agent does not serve: %s (it serves %s)",
            what,
            peer,
            ", ".join(unknown),
            ", ".join(_SERVED),
        )
    served = [name for name in names if name in _SERVED]
    detail = ""
    if snapshot is not None and TLS_CERTIFICATE_NAME in served:
        detail = f", serial {snapshot.svid.serial:x} not after {snapshot.svid.not_after}"
    _log.info(
        "SDS %s: %s version %s nonce %s%s",
        what,
        ", ".join(served) or "no secrets",
        response.version_info,
        response.nonce,
        detail,
    )


_SERVED = (TLS_CERTIFICATE_NAME, VALIDATION_CONTEXT_NAME)


async def _read_requests(requests: AsyncIterator[_Request], events: asyncio.Queue[Any]) -> None:
    try:
        async for request in requests:
            events.put_nowait(request)
    except Exception as exc:
        # A client that goes away cancels the call (CancelledError, not caught here); what
        # arrives here is a request that could not be read.
        _log.info("SDS request stream refused: %r", exc)
        events.put_nowait(_Unreadable(type(exc).__name__))
    finally:
        events.put_nowait(_END)
