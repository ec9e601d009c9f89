"""The gRPC servicers: they translate between protobuf and the CA's domain, nothing more.

Errors become status codes in one place, :func:`_map_errors`, through
:func:`dmc.errors.status_code_of`; anything that is not a ``DmcError`` is a bug, answered
``INTERNAL`` with a fixed message and logged with its traceback (SPEC §4: nothing leaks as
``UNKNOWN``, no stack trace or key material reaches the caller).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from dmc.errors import (
    DmcError,
    InvalidArgument,
    Unauthenticated,
    Unimplemented,
    shown,
    status_code_of,
)
from dmc.revocation import RevocationSet, revocation_to_proto
from dmc.svid import Svid
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.authorities import BundleAuthority, TrustBundle
from dmc_ca.ca import CertificateAuthority, IssuedSvid
from dmc_ca.keys import KeyType
from dmc_ca.model import AuthorityState, Entry
from dmc_ca.store import Store

__all__ = [
    "AdminService",
    "CertificateAuthorityService",
    "RequestDecoder",
    "authority_to_proto",
    "bundle_to_proto",
]

_log = logging.getLogger(__name__)

# How often a bundle consumer should refetch when it cannot watch (SPEC §4 refresh hint).
REFRESH_HINT_SECONDS = 300
# A last bound on what a status trailer carries; messages cut long values themselves.
_DETAILS_MAX = 1024

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Context = grpc.aio.ServicerContext[Any, Any]
_Handler = Callable[[Any, _Request, _Context], Awaitable[_Response]]


def _map_errors(method: _Handler[_Request, _Response]) -> _Handler[_Request, _Response]:
    """Answer a unary RPC's failure with the status of SPEC §4."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: _Request, context: _Context) -> _Response:
        try:
            return await method(self, request, context)
        except DmcError as error:
            code = status_code_of(error)
            # Expected denials are routine for a CA: INFO, not ERROR (STYLE.md).
            _log.info("%s refused: %s: %s", method.__name__, code.name, error)
            await context.abort(code, shown(str(error), limit=_DETAILS_MAX, quote=False))
        except Exception:
            _log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the CA's log")
        raise AssertionError("unreachable: abort raises")

    return wrapper


class RequestDecoder(grpc.aio.ServerInterceptor):
    """Answer bytes that are not the request message with INVALID_ARGUMENT.

    gRPC decodes a request before any servicer code runs and reports a failure as UNKNOWN;
    this takes the decoding over for every RPC with a single request message (SPEC §4:
    malformed input is INVALID_ARGUMENT, nothing leaks as UNKNOWN).
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        decode = handler.request_deserializer

        async def request_of(raw: bytes, context: _Context) -> Any:
            try:
                return decode(raw)
            except Exception:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request to {method} is not a valid protobuf message of its type",
                )

        if handler.unary_unary is not None:
            # Typed for sync servers; on an aio server the behaviours are coroutines.
            unary: Any = handler.unary_unary

            async def unary_behaviour(raw: bytes, context: _Context) -> Any:
                return await unary(await request_of(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_behaviour, response_serializer=handler.response_serializer
            )

        streaming: Any = handler.unary_stream
        if streaming is None:
            return handler
        if inspect.isasyncgenfunction(streaming):

            async def stream_behaviour(raw: bytes, context: _Context) -> AsyncIterator[Any]:
                async for response in streaming(await request_of(raw, context), context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                stream_behaviour, response_serializer=handler.response_serializer
            )

        async def writing_behaviour(raw: bytes, context: _Context) -> Any:
            # A servicer that writes with context.write() instead of yielding.
            return await streaming(await request_of(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(
            writing_behaviour, response_serializer=handler.response_serializer
        )


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


_STATE = {
    AuthorityState.PREPARED: ca_pb2.PREPARED,
    AuthorityState.ACTIVE: ca_pb2.ACTIVE,
    AuthorityState.PREVIOUS: ca_pb2.PREVIOUS,
}


def bundle_to_proto(bundle: TrustBundle) -> ca_pb2.TrustBundle:
    """The bundle as SPEC §4's ``TrustBundle`` message."""
    return ca_pb2.TrustBundle(
        trust_domain=bundle.trust_domain,
        sequence=bundle.sequence,
        refresh_hint_seconds=REFRESH_HINT_SECONDS,
        authorities=[authority_to_proto(a) for a in bundle.authorities],
    )


def authority_to_proto(authority: BundleAuthority) -> ca_pb2.Authority:
    """One authority of the bundle as SPEC §4's ``Authority`` message."""
    message = ca_pb2.Authority(
        id=authority.id,
        certificate=_der(authority.root),
        state=_STATE[authority.state],
        not_after=_timestamp(authority.signing_certificate.not_valid_after_utc),
        created_at=_timestamp(authority.created_at),
        state_since=_timestamp(authority.state_since),
    )
    if authority.retirable_at is not None:
        message.retirable_at.CopyFrom(_timestamp(authority.retirable_at))
    return message


def _svid_response(issued: IssuedSvid) -> ca_pb2.SVIDResponse:
    return ca_pb2.SVIDResponse(
        certificate_chain=[_der(c) for c in issued.chain],
        bundle=bundle_to_proto(issued.bundle),
        expires_at=_timestamp(issued.leaf.not_valid_after_utc),
        spiffe_id=str(_leaf_id(issued.leaf)),
    )


def _leaf_id(leaf: x509.Certificate) -> str:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _entry_to_proto(entry: Entry) -> admin_pb2.Entry:
    return admin_pb2.Entry(
        spiffe_id=str(entry.spiffe_id),
        permissions=list(entry.permissions),
        audiences=list(entry.audiences),
        max_depth=entry.max_depth,
        max_ttl_seconds=entry.svid_ttl_seconds,
        dns_names=list(entry.dns_names),
        created_at=_timestamp(entry.created_at),
    )


def caller_of(ca: CertificateAuthority, context: _Context) -> Svid:
    """The verified SVID of the peer, from the certificate the TLS handshake checked."""
    certificates = list(context.auth_context().get("x509_pem_cert", ()))
    if not certificates:
        raise Unauthenticated("a client certificate is required (mTLS)")
    return ca.authenticate(certificates[0])


class CertificateAuthorityService(ca_pb2_grpc.CertificateAuthorityServicer):
    """``CertificateAuthority`` as one listener serves it.

    On the bootstrap listener (server-authenticated TLS) only Bootstrap and GetTrustBundle
    answer; every call that needs a client certificate is refused there. On the mTLS
    listener everything but Bootstrap answers (SPEC §4).
    """

    def __init__(
        self, ca: CertificateAuthority, store: Store, *, bootstrap_listener: bool
    ) -> None:
        self._ca = ca
        self._store = store
        self._bootstrap_listener = bootstrap_listener

    def _caller(self, context: _Context, method: str) -> Svid:
        if self._bootstrap_listener:
            raise Unauthenticated(f"{method} needs mTLS: call the CA's mTLS listener with an SVID")
        return caller_of(self._ca, context)

    @_map_errors
    async def Bootstrap(
        self, request: ca_pb2.BootstrapRequest, context: _Context
    ) -> ca_pb2.SVIDResponse:
        if not self._bootstrap_listener:
            raise Unimplemented("Bootstrap is served on the CA's bootstrap listener (port + 1)")
        return _svid_response(await self._ca.bootstrap(request.join_token, request.csr))

    @_map_errors
    async def Renew(self, request: ca_pb2.RenewRequest, context: _Context) -> ca_pb2.SVIDResponse:
        caller = self._caller(context, "Renew")
        return _svid_response(self._ca.renew(caller, request.csr))

    @_map_errors
    async def Delegate(
        self, request: ca_pb2.DelegateRequest, context: _Context
    ) -> ca_pb2.SVIDResponse:
        caller = self._caller(context, "Delegate")
        issued = self._ca.delegate(
            caller,
            request.csr,
            request.spiffe_id,
            list(request.permissions),
            list(request.audiences),
            request.max_depth,
            request.ttl_seconds,
        )
        return _svid_response(issued)

    @_map_errors
    async def GetTrustBundle(
        self, request: ca_pb2.GetTrustBundleRequest, context: _Context
    ) -> ca_pb2.TrustBundle:
        return bundle_to_proto(self._ca.bundle())

    async def WatchTrustBundle(
        self, request: ca_pb2.WatchTrustBundleRequest, context: _Context
    ) -> AsyncIterator[ca_pb2.TrustBundle]:
        try:
            self._caller(context, "WatchTrustBundle")
        except DmcError as error:
            await context.abort(status_code_of(error), str(error))
        last = -1
        # Closed when the call ends (a client going away cancels this generator), so no
        # subscription outlives its stream.
        with contextlib.closing(self._store.subscribe()) as views:
            async for _view in views:
                bundle = self._ca.bundle()
                if bundle.sequence != last:
                    last = bundle.sequence
                    yield bundle_to_proto(bundle)

    async def WatchRevocations(
        self, request: ca_pb2.WatchRevocationsRequest, context: _Context
    ) -> AsyncIterator[ca_pb2.RevocationEvent]:
        """SPEC §4: the whole set with its etcd revision, then each change as it comes."""
        try:
            self._caller(context, "WatchRevocations")
        except DmcError as error:
            await context.abort(status_code_of(error), str(error))
        sent: RevocationSet | None = None
        with contextlib.closing(self._store.subscribe()) as views:
            async for view in views:
                current = view.revocations
                if sent is None:
                    yield ca_pb2.RevocationEvent(
                        revision=view.revision,
                        snapshot=True,
                        added=[revocation_to_proto(r) for r in current],
                    )
                elif current is not sent:
                    # Views are whole snapshots and a slow reader may skip some, so changes are
                    # the difference between the last set sent and this one; a revocation
                    # replaced under its key comes as the old one removed, the new one added.
                    added = [revocation_to_proto(r) for r in current if r not in sent]
                    removed = [revocation_to_proto(r) for r in sent if r not in current]
                    if added or removed:
                        yield ca_pb2.RevocationEvent(
                            revision=view.revision, added=added, removed=removed
                        )
                sent = current


class AdminService(admin_pb2_grpc.AdminServicer):
    """The Admin service: the caller's scope must permit each method (SPEC §4)."""

    def __init__(self, ca: CertificateAuthority, store: Store, replica: str) -> None:
        self._ca = ca
        self._store = store
        self._replica = replica

    def _authorize(self, context: _Context, method: str) -> Svid:
        caller = caller_of(self._ca, context)
        self._ca.authorize_admin(caller, f"/dmc.v1.Admin/{method}")
        return caller

    @_map_errors
    async def CreateEntry(
        self, request: admin_pb2.CreateEntryRequest, context: _Context
    ) -> admin_pb2.Entry:
        caller = self._authorize(context, "CreateEntry")
        given = request.entry
        entry = await self._ca.create_entry(
            caller.scope,
            given.spiffe_id,
            list(given.permissions),
            list(given.audiences),
            given.max_depth,
            given.max_ttl_seconds,
            list(given.dns_names),
        )
        return _entry_to_proto(entry)

    @_map_errors
    async def GetEntry(
        self, request: admin_pb2.GetEntryRequest, context: _Context
    ) -> admin_pb2.Entry:
        self._authorize(context, "GetEntry")
        return _entry_to_proto(self._ca.get_entry(request.spiffe_id))

    @_map_errors
    async def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: _Context
    ) -> admin_pb2.ListEntriesResponse:
        self._authorize(context, "ListEntries")
        return admin_pb2.ListEntriesResponse(
            entries=[_entry_to_proto(e) for e in self._ca.list_entries()]
        )

    @_map_errors
    async def DeleteEntry(
        self, request: admin_pb2.DeleteEntryRequest, context: _Context
    ) -> admin_pb2.DeleteEntryResponse:
        self._authorize(context, "DeleteEntry")
        await self._ca.delete_entry(request.spiffe_id)
        return admin_pb2.DeleteEntryResponse()

    @_map_errors
    async def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: _Context
    ) -> admin_pb2.CreateJoinTokenResponse:
        caller = self._authorize(context, "CreateJoinToken")
        token, record = await self._ca.create_join_token(
            caller.scope, request.spiffe_id, request.ttl_seconds
        )
        return admin_pb2.CreateJoinTokenResponse(
            token=token,
            expires_at=_timestamp(record.expires_at),
            spiffe_id=str(record.spiffe_id),
        )

    @_map_errors
    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: _Context
    ) -> admin_pb2.Status:
        caller = self._authorize(context, "GetStatus")
        view = self._store.view
        return admin_pb2.Status(
            trust_domain=self._ca.trust_domain,
            version=_version(),
            bundle=bundle_to_proto(self._ca.bundle()),
            entries=len(view.entries),
            etcd_revision=view.revision,
            caller_spiffe_id=str(caller.spiffe_id),
            replica=self._replica,
        )

    @_map_errors
    async def Revoke(
        self, request: admin_pb2.RevokeRequest, context: _Context
    ) -> ca_pb2.Revocation:
        self._authorize(context, "Revoke")
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument("Revoke needs a serial or a SPIFFE ID")
        revocation = await self._ca.revoke(
            request.serial if target == "serial" else None,
            request.spiffe_id if target == "spiffe_id" else None,
            request.reason,
        )
        return revocation_to_proto(revocation)

    @_map_errors
    async def ListRevocations(
        self, request: admin_pb2.ListRevocationsRequest, context: _Context
    ) -> admin_pb2.ListRevocationsResponse:
        self._authorize(context, "ListRevocations")
        return admin_pb2.ListRevocationsResponse(
            revocations=[revocation_to_proto(r) for r in self._ca.list_revocations()]
        )

    @_map_errors
    async def PrepareAuthority(
        self, request: admin_pb2.PrepareAuthorityRequest, context: _Context
    ) -> ca_pb2.Authority:
        self._authorize(context, "PrepareAuthority")
        imported = bool(request.ca_certificate_chain_pem or request.ca_private_key_pem)
        if imported and request.key_type:
            raise InvalidArgument("key_type applies to a created authority, not an imported one")
        authority = await self._ca.prepare_authority(
            _key_type(request.key_type),
            request.ca_certificate_chain_pem if imported else None,
            request.ca_private_key_pem if imported else None,
        )
        return authority_to_proto(authority)

    @_map_errors
    async def ActivateAuthority(
        self, request: admin_pb2.ActivateAuthorityRequest, context: _Context
    ) -> ca_pb2.Authority:
        self._authorize(context, "ActivateAuthority")
        return authority_to_proto(await self._ca.activate_authority(request.id))

    @_map_errors
    async def RetireAuthority(
        self, request: admin_pb2.RetireAuthorityRequest, context: _Context
    ) -> ca_pb2.Authority:
        self._authorize(context, "RetireAuthority")
        retired = await self._ca.retire_authority(request.id, force=request.force)
        return authority_to_proto(retired)


def _key_type(text: str) -> KeyType:
    if not text:
        return KeyType.EC_P256
    try:
        return KeyType(text)
    except ValueError:
        allowed = ", ".join(k.value for k in KeyType)
        raise InvalidArgument(f"key type {text[:40]!r} is not one of {allowed}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmc")
    except PackageNotFoundError:
        return "unknown"
