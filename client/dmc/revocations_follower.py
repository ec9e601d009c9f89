"""Keeping the revocations current from the CA's ``WatchRevocations`` stream (SPEC §4, §7).

:class:`RevocationFollower` runs one thread that reads the stream: the first message is a
snapshot of every revocation in force with its etcd revision, later ones are changes.
When the stream breaks it reconnects with exponential back-off and jitter, and the CA
sends a fresh snapshot, which replaces the set whole. The set it holds is immutable and
swapped in one assignment, so the sync and the aio interceptor may read it from any
thread or event loop without locks.

Until the first snapshot has arrived, :meth:`RevocationFollower.check` refuses with
``Unavailable``: a server that has not heard which certificates are revoked cannot tell
(after a restart, too, SPEC §7 asks the snapshot to be enforced again). After that a
broken stream leaves the last known set in force while it reconnects.
"""

from __future__ import annotations

import logging
import random
import threading
from types import TracebackType
from typing import Self

import grpc

from dmc.errors import DmcError, Unavailable
from dmc.revocation import RevocationSet
from dmc.svid import Svid
from dmc.v1 import ca_pb2, ca_pb2_grpc

__all__ = ["RevocationFollower"]

_logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_SECONDS = 10.0


class RevocationFollower:
    """A client of ``WatchRevocations`` that keeps a :class:`RevocationSet` current.

    ``channel`` is an mTLS channel to the CA (the CA serves ``WatchRevocations`` on its
    mTLS listener only), for instance ``dmc.secure_channel`` of the server's identity; the
    follower never closes it. Use it as a context manager, or call :meth:`start` and
    :meth:`close`; pass it as ``revocations=`` to an authorizing interceptor.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        initial_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        if not 0 < initial_backoff_seconds <= max_backoff_seconds:
            raise ValueError("back-off needs 0 < initial_backoff_seconds <= max_backoff_seconds")
        self._stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        self._initial_backoff = initial_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._revocations: RevocationSet | None = None
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._call: grpc.Call | None = None
        self._thread = threading.Thread(
            target=self._run, name="dmc-revocation-follower", daemon=True
        )

    # -- life cycle -----------------------------------------------------------------------

    def start(self, wait_seconds: float | None = 10.0) -> Self:
        """Start following; with ``wait_seconds``, wait that long for the first snapshot.

        Raises ``Unavailable`` (after closing again) if no snapshot came in time.
        """
        self._thread.start()
        if wait_seconds is not None:
            try:
                self.wait_for_revision(0, wait_seconds)
            except Unavailable:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Stop following: cancel the stream and join the thread. Idempotent."""
        self._closing.set()
        with self._changed:
            call = self._call
            self._changed.notify_all()
        if call is not None:
            call.cancel()
        if self._thread.is_alive():
            self._thread.join(_JOIN_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what it knows --------------------------------------------------------------------

    @property
    def revocations(self) -> RevocationSet | None:
        """The revocations in force as last heard, or ``None`` before the first snapshot."""
        return self._revocations

    def check(self, svid: Svid) -> None:
        """Raise ``PermissionDenied`` if ``svid`` is revoked, ``Unavailable`` if unknown yet."""
        revocations = self._revocations
        if revocations is None:
            raise Unavailable(
                "the revocations are not known yet: no WatchRevocations snapshot from the CA"
            )
        revocations.check(svid)

    def wait_for_revision(self, revision: int, timeout_seconds: float) -> RevocationSet:
        """Wait until the set has reached etcd ``revision`` (0: any snapshot) and return it.

        Raises ``Unavailable`` if it has not within ``timeout_seconds``.
        """
        with self._changed:
            reached = self._changed.wait_for(
                lambda: self._reached(revision) or self._closing.is_set(), timeout_seconds
            )
            revocations = self._revocations
        if not reached or revocations is None or revocations.revision < revision:
            raise Unavailable(
                f"no WatchRevocations snapshot at revision {revision} or later "
                f"within {timeout_seconds:g} s"
            )
        return revocations

    def _reached(self, revision: int) -> bool:
        return self._revocations is not None and self._revocations.revision >= revision

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._initial_backoff
        while not self._closing.is_set():
            if self._follow():
                delay = self._initial_backoff
            if self._closing.is_set():
                break
            # Full jitter over [delay/2, delay], so that servers restarted together do not
            # reconnect to the CA in step.
            pause = random.uniform(delay / 2, delay)  # noqa: S311 - not a secret
            _logger.info("reconnecting to WatchRevocations in %.1f s", pause)
            self._closing.wait(pause)
            delay = min(delay * 2, self._max_backoff)
        _logger.debug("revocation follower stopped")

    def _follow(self) -> bool:
        """Read one stream until it ends; return whether it delivered a snapshot."""
        call = self._stub.WatchRevocations(ca_pb2.WatchRevocationsRequest())
        with self._changed:
            self._call = call
        if self._closing.is_set():
            call.cancel()
        got_snapshot = False
        try:
            for event in call:
                self._apply(event)
                got_snapshot = got_snapshot or event.snapshot
        except grpc.RpcError as exc:
            if not self._closing.is_set():
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                _logger.warning(
                    "WatchRevocations broke (%s: %s); the last known revocations stay in force",
                    code.name if code is not None else "error",
                    details,
                )
        except DmcError as exc:
            # A message that does not read as revocations: start over from a snapshot.
            _logger.warning("WatchRevocations sent an unreadable event: %s", exc)
            call.cancel()
        else:
            if not self._closing.is_set():
                _logger.warning("WatchRevocations ended; the last known revocations stay in force")
        with self._changed:
            self._call = None
        return got_snapshot

    def _apply(self, event: ca_pb2.RevocationEvent) -> None:
        current = self._revocations
        if not event.snapshot and current is None:
            raise Unavailable("WatchRevocations sent a change before its snapshot")
        base = current if current is not None else RevocationSet.empty()
        updated = base.with_event(event)
        with self._changed:
            self._revocations = updated
            self._changed.notify_all()

        if event.snapshot:
            _logger.info(
                "revocations: snapshot of %d at revision %d", len(updated), updated.revision
            )
        for message in event.added if not event.snapshot else ():
            _logger.info(
                "revocation in force: %s (%s)",
                message.serial or message.spiffe_id,
                message.reason or "no reason given",
            )
        _logger.debug("revocations at revision %d", updated.revision)
