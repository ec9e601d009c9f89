"""The SPIFFE Workload API's X.509-SVID profile, for SPIFFE clients on the agent's socket.

https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Workload_API.md

``FetchX509SVID`` streams the workload's one SVID (DER chain, leaf first; DER PKCS #8 key;
DER roots of its trust domain), ``FetchX509Bundles`` the trust bundle keyed by the trust
domain's SPIFFE ID. Each stream sends the current state at once and a complete new
message whenever it changes: on every renewal, and on every bundle change (standard §4.3).
The JWT-SVID profile answers ``UNIMPLEMENTED``: dmc issues no JWT-SVIDs.

Every call must carry the ``workload.spiffe.io: true`` metadata, or it is refused with
``INVALID_ARGUMENT`` (Workload Endpoint standard §3 and §6): the header keeps a server-side
request forgery from reaching the socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dmc.agent._proto import workload_pb2, workload_pb2_grpc
from dmc.agent.feed import IdentityFeed, IdentitySnapshot
from dmc.spiffe_id import SpiffeId

__all__ = ["SECURITY_HEADER", "SERVICE_NAME", "WorkloadApiService", "add_to_server"]

_log = logging.getLogger(__name__)

SECURITY_HEADER = ("workload.spiffe.io", "true")
SERVICE_NAME = "SpiffeWorkloadAPI"

_Context = grpc.aio.ServicerContext[Any, Any]
_M = TypeVar("_M", workload_pb2.X509SVIDResponse, workload_pb2.X509BundlesResponse)


class WorkloadApiService(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The servicer of ``SpiffeWorkloadAPI`` on a feed."""

    def __init__(self, feed: IdentityFeed) -> None:
        self._feed = feed

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        """The X.509-SVID now, then again after every renewal or bundle change."""
        await _require_security_header(context)
        async for snapshot, response in _changes(self._feed, _x509_svid_response):
            _log_push("X.509-SVID", context, snapshot)
            yield response

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        """The trust bundle now, then again after every change."""
        await _require_security_header(context)
        async for snapshot, response in _changes(self._feed, _x509_bundles_response):
            _log_push("X.509 bundles", context, snapshot)
            yield response

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: _Context
    ) -> workload_pb2.JWTSVIDResponse:
        await _refuse_jwt(context)
        raise AssertionError("unreachable: abort raises")

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await _refuse_jwt(context)
        yield workload_pb2.JWTBundlesResponse()  # pragma: no cover - abort raises

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: _Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _refuse_jwt(context)
        raise AssertionError("unreachable: abort raises")


def add_to_server(service: WorkloadApiService, server: grpc.aio.Server) -> None:
    """Register ``service`` on ``server``."""
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(service, server)


async def _require_security_header(context: _Context) -> None:
    key, value = SECURITY_HEADER
    # Workload Endpoint standard §3: the value is case sensitive; §6: refuse with
    # INVALID_ARGUMENT, which tells the client not to retry.
    if (key, value) not in (context.invocation_metadata() or ()):
        _log.warning("Workload API call from %s without the security header", context.peer())
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"security header missing: send '{key}: {value}'"
        )


async def _refuse_jwt(context: _Context) -> None:
    await _require_security_header(context)
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED, "dmc agent serves X.509-SVIDs only, not JWT-SVIDs"
    )


async def _changes(
    feed: IdentityFeed, build: Callable[[IdentitySnapshot], _M]
) -> AsyncIterator[tuple[IdentitySnapshot, _M]]:
    """A response for the current snapshot, then one for each snapshot that changes it."""
    last = b""
    async for snapshot in feed.snapshots():
        response = build(snapshot)
        encoded = response.SerializeToString(deterministic=True)
        if encoded != last:
            last = encoded
            yield snapshot, response


def _x509_svid_response(snapshot: IdentitySnapshot) -> workload_pb2.X509SVIDResponse:
    key = snapshot.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    svid = workload_pb2.X509SVID(
        spiffe_id=str(snapshot.svid.spiffe_id),
        x509_svid=_der(snapshot.chain),
        x509_svid_key=key,
        bundle=_der(snapshot.bundle),
    )
    return workload_pb2.X509SVIDResponse(svids=[svid])


def _x509_bundles_response(snapshot: IdentitySnapshot) -> workload_pb2.X509BundlesResponse:
    trust_domain = SpiffeId.for_trust_domain(snapshot.svid.spiffe_id.trust_domain)
    return workload_pb2.X509BundlesResponse(bundles={str(trust_domain): _der(snapshot.bundle)})


def _der(certificates: Iterable[x509.Certificate]) -> bytes:
    """Concatenated DER, as the Workload API carries chains and bundles."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certificates)


def _log_push(what: str, context: _Context, snapshot: IdentitySnapshot) -> None:
    _log.info(
        "Workload API push to %s: %s of %s serial %x (not after %s), %d bundle root(s)",
        context.peer(),
        what,
        snapshot.svid.spiffe_id,
        snapshot.svid.serial,
        snapshot.svid.not_after.isoformat(),
        len(snapshot.bundle),
    )
