"""Helpers for the identity source and channel tests: sources bootstrapped from a real CA,
and a small echo service that reports which client certificate it saw."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509

from ca_harness import CaHarness
from dmc.credentials import server_credentials
from dmc.source import IdentitySource, RenewalPolicy

SERVICE = "dmc.test.Echo"
SAY = f"/{SERVICE}/Say"
COUNT = f"/{SERVICE}/Count"


def bootstrap_source(
    ca: CaHarness,
    directory: Path,
    path: str,
    *,
    ttl_seconds: int = 0,
    dns_names: tuple[str, ...] = (),
    ca_address: str | None = None,
    policy: RenewalPolicy | None = None,
) -> IdentitySource:
    """Register ``path`` on ``ca`` and bootstrap a source for it into ``directory``."""
    spiffe_id = ca.create_entry(path, ttl_seconds=ttl_seconds, dns_names=dns_names)
    return IdentitySource.bootstrap(
        directory,
        ca=ca_address or ca.address,
        bundle=ca.bundle_pem,
        token=ca.join_token(spiffe_id),
        bootstrap_addr=ca.bootstrap_address,
        policy=policy,
    )


class SerialLog:
    """The distinct SVID serials a source has had, collected through `subscribe`."""

    def __init__(self, source: IdentitySource) -> None:
        self._lock = threading.Lock()
        self.serials = [source.current().svid.serial]
        self.unsubscribe = source.subscribe(self._seen)

    def _seen(self, identity: object) -> None:
        serial = identity.svid.serial  # type: ignore[attr-defined]
        with self._lock:
            if serial != self.serials[-1]:
                self.serials.append(serial)

    @property
    def renewals(self) -> int:
        with self._lock:
            return len(self.serials) - 1


def peer_serial(context: grpc.ServicerContext) -> bytes:
    """The serial of the client certificate of this call, as hex text."""
    # The stubs type the auth context's values as bytes; gRPC gives a list of them.
    pem = cast(Sequence[bytes], context.auth_context()["x509_pem_cert"])[0]
    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}".encode()


def echo_handlers(
    seen: set[bytes], stream_interval_seconds: float = 0.1
) -> grpc.GenericRpcHandler:
    """``Say`` answers with the caller's certificate serial; ``Count`` streams N numbers."""

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        serial = peer_serial(context)
        seen.add(serial)
        return serial

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for number in range(int(request.decode())):
            time.sleep(stream_interval_seconds)
            yield str(number).encode()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


def start_echo_server(source: IdentitySource, seen: set[bytes]) -> tuple[grpc.Server, int]:
    """A sync gRPC server on 127.0.0.1 with credentials that follow ``source``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((echo_handlers(seen),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
    server.start()
    return server, port


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
