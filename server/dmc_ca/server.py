"""The CA's two listeners and its own serving SVID.

Python gRPC servers either require a client certificate or never ask for one
(DEPENDENCIES.md), so Bootstrap has a server-authenticated listener of its own and every
other RPC is on the mTLS listener (SPEC §4). Both serve GetTrustBundle, health and
reflection. The serving SVID carries the listen host as an IP or DNS SAN, since Python gRPC
clients check the server's host name; it is renewed at half its life and whenever the
bundle changes, and dynamic server credentials hand it to the next handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dmc.errors import AlreadyExists, FailedPrecondition
from dmc.pem import certificates_to_pem
from dmc.scope import EMPTY_SCOPE
from dmc.spiffe_id import SpiffeId
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.ca import CA_PATH, CertificateAuthority
from dmc_ca.keys import KeyType, generate_private_key
from dmc_ca.service import AdminService, CertificateAuthorityService, RequestDecoder
from dmc_ca.store import Store

__all__ = ["CaServer", "ListenAddress", "serving_names"]

_log = logging.getLogger(__name__)

SERVING_SVID_TTL_SECONDS = 3600
_RETRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A host and port to bind; port 0 picks a free one."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"invalid listen address {text!r}: want HOST:PORT")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def serving_names(
    host: str, dns_names: Sequence[str], ip_sans: Sequence[str]
) -> tuple[tuple[str, ...], tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]:
    """The DNS and IP SANs of the serving SVID: the listen host unless names are given."""
    dns = list(dns_names)
    ips = [ipaddress.ip_address(ip) for ip in ip_sans]
    if not dns and not ips:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            dns.append(host)
        else:
            # A wildcard bind answers on loopback too; a client there checks 127.0.0.1.
            ips.append(ipaddress.ip_address("127.0.0.1") if address.is_unspecified else address)
    return tuple(dns), tuple(ips)


@dataclass
class _Credential:
    """The serving certificate as gRPC's dynamic credentials want it, for one listener."""

    config: grpc.ServerCertificateConfiguration
    version: int
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on every new connection; answering None keeps the current one.
        with self.lock:
            if self.seen == self.version:
                return None
            self.seen = self.version
            return self.config


class CaServer:
    """Serves one CA replica on an mTLS listener and a bootstrap listener."""

    def __init__(
        self,
        ca: CertificateAuthority,
        store: Store,
        listen: ListenAddress,
        bootstrap_listen: ListenAddress | None = None,
        dns_names: Sequence[str] = (),
        ip_sans: Sequence[str] = (),
    ) -> None:
        self._ca = ca
        self._store = store
        self._listen = listen
        self._bootstrap_listen = bootstrap_listen or ListenAddress(
            listen.host, listen.port + 1 if listen.port else 0
        )
        self._dns_names, self._ip_addresses = serving_names(listen.host, dns_names, ip_sans)
        self._servers: list[grpc.aio.Server] = []
        self._credentials: list[_Credential] = []
        self._task: asyncio.Task[None] | None = None
        self._renew_after = datetime.now(UTC)
        self._bundle_sequence = -1
        self._version = 0
        self.address = listen
        self.bootstrap_address = self._bootstrap_listen

    @property
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId.parse(f"spiffe://{self._ca.trust_domain}{CA_PATH}")

    def _issue_serving_config(self, with_roots: bool) -> grpc.ServerCertificateConfiguration:
        key = generate_private_key(KeyType.EC_P256)
        issued = self._ca.issue(
            key.public_key(),
            self.spiffe_id,
            EMPTY_SCOPE,
            SERVING_SVID_TTL_SECONDS,
            self._dns_names,
            self._ip_addresses,
        )
        leaf = issued.leaf
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self._renew_after = leaf.not_valid_before_utc + lifetime / 2
        self._bundle_sequence = issued.bundle.sequence
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._last = (key_pem, certificates_to_pem(list(issued.chain)), issued.bundle.to_pem())
        _log.info("serving SVID %s serial %x", self.spiffe_id, leaf.serial_number)
        return self._config(with_roots)

    def _config(self, with_roots: bool) -> grpc.ServerCertificateConfiguration:
        key_pem, chain_pem, roots_pem = self._last
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=roots_pem if with_roots else None
        )

    def _refresh(self) -> None:
        self._issue_serving_config(with_roots=True)
        self._version += 1
        for index, credential in enumerate(self._credentials):
            with credential.lock:
                credential.config = self._config(with_roots=index == 0)
                credential.version = self._version

    async def start(self) -> None:
        """Bind both listeners and start serving; ports chosen by the OS are then known."""
        # SPEC §4: a DNS name belongs to one SPIFFE ID, which is how clients pin a server by
        # name; the CA's own names are held for it, so no entry can pass as the CA.
        try:
            await self._store.claim_dns_names(self.spiffe_id, self._dns_names)
        except AlreadyExists as error:
            raise FailedPrecondition(f"the CA cannot serve under its DNS name: {error}") from None
        self._issue_serving_config(with_roots=True)
        health_servicer = health.aio.HealthServicer()
        # gRPC shares ports (SO_REUSEPORT) by default: a second CA on a taken port would
        # start and take half the connections. Binding must fail instead.
        options = (("grpc.so_reuseport", 0),)
        mtls = grpc.aio.server(interceptors=[RequestDecoder()], options=options)
        boot = grpc.aio.server(interceptors=[RequestDecoder()], options=options)

        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
            CertificateAuthorityService(self._ca, self._store, bootstrap_listener=False), mtls
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self._ca, self._store, replica=str(self._listen)), mtls
        )
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
            CertificateAuthorityService(self._ca, self._store, bootstrap_listener=True), boot
        )
        names = (
            ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        for server in (mtls, boot):
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(names, server)

        for index, (server, address) in enumerate(
            ((mtls, self._listen), (boot, self._bootstrap_listen))
        ):
            credential = _Credential(config=self._config(with_roots=index == 0), version=0)
            self._credentials.append(credential)
            credentials = grpc.dynamic_ssl_server_credentials(
                credential.config,
                credential.fetch,  # type: ignore[arg-type]  # None means "no change"
                require_client_authentication=index == 0,
            )
            try:
                port = server.add_secure_port(str(address), credentials)
            except RuntimeError:
                raise FailedPrecondition(
                    f"cannot listen on {address}: the address is in use or not local"
                ) from None
            bound = ListenAddress(address.host, port)
            if index == 0:
                self.address = bound
            else:
                self.bootstrap_address = bound

        for server in (mtls, boot):
            await server.start()
            self._servers.append(server)
        for service in ("", "dmc.v1.CertificateAuthority"):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._task = asyncio.create_task(self._keep_serving_svid(), name="dmc-serving-svid")
        _log.info("serving mTLS on %s, bootstrap on %s", self.address, self.bootstrap_address)

    async def _keep_serving_svid(self) -> None:
        # Woken by every new view of etcd (a bundle change reissues at once, so the next
        # handshake trusts a prepared authority) and by the renewal deadline.
        subscription = self._store.subscribe()
        views = aiter(subscription)
        try:
            while True:
                wait = (self._renew_after - datetime.now(UTC)).total_seconds()
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        await anext(views)
                except TimeoutError:
                    pass
                except StopAsyncIteration:
                    return
                try:
                    due = datetime.now(UTC) >= self._renew_after
                    if due or self._ca.bundle().sequence != self._bundle_sequence:
                        self._refresh()
                except Exception:
                    # A CA that cannot renew its own certificate keeps serving the current
                    # one and tries again a little later.
                    _log.exception("could not renew the serving SVID")
                    self._renew_after = datetime.now(UTC) + timedelta(seconds=_RETRY_SECONDS)
        finally:
            subscription.close()

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Stop both listeners, letting calls in flight finish within the grace period."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(s.stop(grace_seconds) for s in self._servers))
        self._servers.clear()

    async def wait(self) -> None:
        """Block until the servers stop."""
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))
