"""Server credentials that follow an identity source (SPEC §7).

`server_credentials` gives `grpc.dynamic_ssl_server_credentials` that present the source's
current SVID, trust the source's current bundle, and require a client certificate. gRPC
asks the fetcher on every new connection (DEPENDENCIES.md); it answers with the new
configuration once after each change of the source, and ``None`` ("no change") otherwise.
Connections already open keep their handshake. Works for ``grpc.server`` and
``grpc.aio.server`` alike.
"""

from __future__ import annotations

import logging
import threading

import grpc

from dmc.source import Identity, IdentitySource

__all__ = ["server_credentials"]

_log = logging.getLogger(__name__)


class _Fetcher:
    """The configuration gRPC fetches: each new one handed out exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def update(self, identity: Identity) -> None:
        configuration = _configuration(identity)
        with self._lock:
            self._pending = configuration
        _log.debug("server credentials now present SVID serial %x", identity.svid.serial)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def _configuration(identity: Identity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.key_pem, identity.chain_pem)], root_certificates=identity.bundle_pem
    )


def server_credentials(source: IdentitySource) -> grpc.ServerCredentials:
    """mTLS server credentials presenting ``source``'s SVID and trusting its bundle.

    Clients must present a certificate that chains to the bundle; which SVIDs may call
    which methods is the server interceptor's decision. The credentials follow the source
    until it is closed.
    """
    fetcher = _Fetcher()
    # Subscribed first, so that no change between the two steps is missed.
    source.subscribe(fetcher.update)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(source.current()),
        fetcher.fetch,  # type: ignore[arg-type]  # None means "no change" to gRPC
        require_client_authentication=True,
    )
