"""The agent's view of its identity: the source's current SVID, delivered on one event loop.

The identity source renews in the background and calls its subscribers from whatever
thread did the work; `IdentityFeed` hops each change onto the agent's asyncio loop, drops
notifications that changed nothing (same chain, key and bundle), and tells every open
stream. The streams never see a half-made change: they read one immutable snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dmc.svid import Svid

__all__ = ["IdentityFeed", "IdentitySnapshot", "IdentitySourceLike"]

_log = logging.getLogger(__name__)


class IdentitySnapshot(Protocol):
    """What the agent serves: one SVID with its chain, private key and trust bundle."""

    @property
    def svid(self) -> Svid: ...

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        """The SVID's chain, leaf first."""
        ...

    @property
    def key(self) -> PrivateKeyTypes: ...

    @property
    def bundle(self) -> Sequence[x509.Certificate]:
        """The trust domain's roots."""
        ...


class IdentitySourceLike(Protocol):
    """The part of the client library's identity source (SPEC §7) that the agent uses."""

    def current(self) -> IdentitySnapshot: ...

    def subscribe(self, callback: Callable[..., None]) -> Callable[[], None]:
        """Call ``callback`` after each renewal or bundle change; return the unsubscriber."""
        ...

    def close(self) -> None:
        """Stop renewing."""
        ...


class IdentityFeed:
    """The latest snapshot of an identity source, and a wake-up on each change.

    Build it on the loop that serves the streams; `close` it on the same loop.
    """

    def __init__(self, source: IdentitySourceLike) -> None:
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._current = source.current()
        self._fingerprint = _fingerprint(self._current)
        self._listeners: set[Callable[[], None]] = set()
        self._closed = False
        self._unsubscribe = source.subscribe(self._notified)

    @property
    def current(self) -> IdentitySnapshot:
        """The snapshot to serve now."""
        return self._current

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` on the loop after each change; return the function that stops it."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    async def snapshots(self) -> AsyncIterator[IdentitySnapshot]:
        """The current snapshot, then each new one, until the feed closes."""
        changed = asyncio.Event()
        stop = self.listen(changed.set)
        try:
            while not self._closed:
                changed.clear()
                yield self._current
                await changed.wait()
        finally:
            stop()

    def close(self) -> None:
        """Stop following the source and end every `snapshots` iteration."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._wake()

    def _notified(self, *_: object) -> None:
        # The source may call from its renewal thread; the state is the loop's alone.
        if not self._closed:
            self._loop.call_soon_threadsafe(self._refresh)

    def _refresh(self) -> None:
        if self._closed:
            return
        snapshot = self._source.current()
        fingerprint = _fingerprint(snapshot)
        if fingerprint == self._fingerprint:
            _log.debug("identity source notified without a change")
            return

        self._current, self._fingerprint = snapshot, fingerprint
        _log.info(
            "serving %s serial %x (not after %s) with %d trust bundle root(s)",
            snapshot.svid.spiffe_id,
            snapshot.svid.serial,
            snapshot.svid.not_after.isoformat(),
            len(snapshot.bundle),
        )
        self._wake()

    def _wake(self) -> None:
        for listener in list(self._listeners):
            listener()


def _fingerprint(snapshot: IdentitySnapshot) -> tuple[bytes, ...]:
    """Everything the agent serves from a snapshot, to tell a change from a repeat."""
    der = serialization.Encoding.DER
    return (
        *(certificate.public_bytes(der) for certificate in snapshot.chain),
        b"",
        *(certificate.public_bytes(der) for certificate in snapshot.bundle),
    )
