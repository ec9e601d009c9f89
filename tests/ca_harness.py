"""A real CA replica for tests: real etcd, real gRPC listeners on port 0, in a thread.

The CA runs on an event loop of its own in a background thread, so that tests may call it
with plain synchronous gRPC stubs (or start subprocesses) without blocking it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from dmc.connect import load_credential
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2_grpc
from dmc_ca.ca import CertificateAuthority
from dmc_ca.keys import KeyType
from dmc_ca.runtime import DEFAULT_ADMIN_TTL_SECONDS, initialise, write_admin_credential
from dmc_ca.sealing import generate_kek_file, load_kek
from dmc_ca.server import CaServer, ListenAddress
from dmc_ca.store import Store

_T = TypeVar("_T")


@dataclass(frozen=True)
class ImportedCa:
    """An existing CA to import at init: PEM chain (signing certificate first) and key."""

    chain_pem: bytes
    key_pem: bytes


class CaHarness:
    """One CA replica on 127.0.0.1 ports chosen by the OS.

    ``data_dir`` holds ``admin.pem``, ``admin.key``, ``bundle.pem`` and ``kek`` after
    `start`, as `dmc-ca dev` leaves them.
    """

    def __init__(
        self,
        etcd_endpoint: str,
        prefix: str,
        data_dir: Path,
        *,
        trust_domain: str = "example.org",
        key_type: KeyType = KeyType.EC_P256,
        imported: ImportedCa | None = None,
    ) -> None:
        self.etcd_endpoint = etcd_endpoint
        self.prefix = prefix
        self.data_dir = data_dir
        self.trust_domain = trust_domain
        self._key_type = key_type
        self._imported = imported
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.store: Store | None = None
        self.ca: CertificateAuthority | None = None
        self.server: CaServer | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        """Run ``coroutine`` on the CA's loop and wait for its result."""
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    def start(self) -> CaHarness:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        kek_file = self.data_dir / "kek"
        if not kek_file.exists():
            generate_kek_file(kek_file)
        kek = load_kek(kek_file)
        self.store = await Store.open([self.etcd_endpoint], self.prefix, self.trust_domain)
        if self.store.view.authorities:
            self.ca = CertificateAuthority(self.store, kek, self.trust_domain)
        else:
            self.ca = await initialise(
                self.store,
                kek,
                self.trust_domain,
                key_type=self._key_type,
                ca_chain_pem=self._imported.chain_pem if self._imported else None,
                ca_key_pem=self._imported.key_pem if self._imported else None,
            )
        write_admin_credential(self.ca, self.data_dir, DEFAULT_ADMIN_TTL_SECONDS)
        self.server = CaServer(self.ca, self.store, ListenAddress("127.0.0.1", 0))
        await self.server.start()

    def stop(self) -> None:
        """Stop the listeners and the store, then the loop and its thread."""
        if self._thread.is_alive():
            self.run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)
        if self.store is not None:
            await self.store.close()
        # Whatever else a test left on this loop (a relay, a stream) ends here, so that
        # closing the loop destroys no pending task and leaves no transport to the GC.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- addresses and credentials ------------------------------------------------------------

    @property
    def address(self) -> str:
        assert self.server is not None
        return str(self.server.address)

    @property
    def bootstrap_address(self) -> str:
        assert self.server is not None
        return str(self.server.bootstrap_address)

    @property
    def bundle_pem(self) -> bytes:
        return (self.data_dir / "bundle.pem").read_bytes()

    def id(self, path: str) -> str:
        """``spiffe://<trust domain><path>``."""
        return f"spiffe://{self.trust_domain}{path}"

    def channel(
        self, cert_chain_pem: bytes | None = None, key_pem: bytes | None = None
    ) -> grpc.Channel:
        """A TLS channel to the mTLS listener, with a client certificate when given."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.bundle_pem,
            private_key=key_pem,
            certificate_chain=cert_chain_pem,
        )
        return grpc.secure_channel(self.address, credentials)

    def bootstrap_channel(self) -> grpc.Channel:
        """A server-authenticated TLS channel to the bootstrap listener."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.bundle_pem)
        return grpc.secure_channel(self.bootstrap_address, credentials)

    def admin_channel(self) -> grpc.Channel:
        """The mTLS channel of the admin credential."""
        credential = load_credential(
            self.data_dir / "admin.pem", self.data_dir / "admin.key", self.data_dir / "bundle.pem"
        )
        return self.channel(credential.chain_pem, credential.key_pem)

    # -- admin shortcuts ----------------------------------------------------------------------

    def create_entry(
        self,
        path: str,
        permissions: tuple[str, ...] = ("*",),
        audiences: tuple[str, ...] = ("*",),
        max_depth: int = 2,
        ttl_seconds: int = 0,
        dns_names: tuple[str, ...] = (),
    ) -> str:
        """Register ``spiffe://<td><path>`` through the Admin service; return the ID."""
        spiffe_id = self.id(path)
        with self.admin_channel() as channel:
            admin_pb2_grpc.AdminStub(channel).CreateEntry(
                admin_pb2.CreateEntryRequest(
                    entry=admin_pb2.Entry(
                        spiffe_id=spiffe_id,
                        permissions=permissions,
                        audiences=audiences,
                        max_depth=max_depth,
                        max_ttl_seconds=ttl_seconds,
                        dns_names=dns_names,
                    )
                ),
                timeout=10,
            )
        return spiffe_id

    def join_token(self, spiffe_id: str, ttl_seconds: int = 600) -> str:
        """A join token for an existing entry, through the Admin service."""
        with self.admin_channel() as channel:
            response = admin_pb2_grpc.AdminStub(channel).CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds),
                timeout=10,
            )
        return response.token

    def ca_stub(self, channel: grpc.Channel) -> ca_pb2_grpc.CertificateAuthorityStub:
        return ca_pb2_grpc.CertificateAuthorityStub(channel)
