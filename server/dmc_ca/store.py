"""The etcd store: the only module that speaks to etcd (SPEC §5).

Keys live under ``<prefix><trust domain>/``; an ID in a key is written as its path::

    authorities/<id>             AuthorityRecord JSON (the key sealed)
    bundle/sequence              decimal counter, bumped with every authority change
    entries/<id path>            Entry JSON, e.g. /dmc/example.org/entries/web/mid
    tokens/<sha256 hex>          JoinToken JSON, under a lease of the token's TTL
    revocations/serial/<hex>     Revocation JSON, under a lease (SPEC §5)
    revocations/id/<id path>     Revocation JSON, under a lease (SPEC §5)
    dnsnames/<dns name>          the SPIFFE ID holding that DNS name (lower-cased)

``dnsnames/`` goes beyond SPEC §5: it is an index written in the same transaction as its
entry, with a create-only compare, so two replicas cannot hand one DNS name to two IDs
(SPEC §4: a DNS name belongs to one SPIFFE ID at a time).

Reads come from :attr:`Store.view`, an immutable snapshot loaded by one range read of
the prefix and kept current by one prefix watch; a compacted or broken watch makes the
store reload from a fresh range read (SPEC §5). Every write is an etcd transaction; any
etcd failure on a write raises :class:`~dmc.errors.Unavailable`. Writes that change the
view return once this replica's view shows them, so a write followed by a read on the
same replica sees the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

# etcd3aio builds compares on value, version and create revision only; a compare on the
# mod revision (the compare-and-swap of spend_token) needs the message itself, and the
# watch (see Store.__init__) needs the raw stub.
from etcd3aio._protobuf import Compare, WatchCreateRequest, WatchRequest, WatchStub
from etcd3aio.kv import KVService

from dmc.errors import (
    AlreadyExists,
    DmcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from dmc.revocation import Revocation, RevocationKind, RevocationSet
from dmc.spiffe_id import SpiffeId, validate_trust_domain
from dmc_ca.model import AuthorityRecord, AuthorityState, Entry, JoinToken, validate_authority_id

__all__ = ["Store", "StoreView", "ViewSubscription", "hash_token"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_DEFAULT_TIMEOUT_SECONDS = 5.0
# Compare-and-swap loops (the bundle sequence) give up after this many lost races.
_CAS_ATTEMPTS = 20
_RELOAD_FIRST_DELAY_SECONDS = 0.1
_RELOAD_MAX_DELAY_SECONDS = 2.0
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE
_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    """The SHA-256 hex of a join token: the only form of it that etcd holds (SPEC §4, §5)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class StoreView:
    """One consistent snapshot of the trust domain's records at an etcd revision."""

    revision: int
    entries: Mapping[SpiffeId, Entry]
    authorities: Mapping[str, AuthorityRecord]
    bundle_sequence: int
    # The same object from view to view until a revocation changes, so a follower of
    # revocations can skip views by identity.
    revocations: RevocationSet = field(default_factory=RevocationSet.empty)


@dataclass(slots=True)
class _ViewBuilder:
    """The mutable state the watch applies events to; frozen into a StoreView on change."""

    base: str
    trust_domain: str
    entries: dict[SpiffeId, Entry] = field(default_factory=dict)
    authorities: dict[str, AuthorityRecord] = field(default_factory=dict)
    bundle_sequence: int = 0
    # Revocations by the rest of their key (``serial/<hex>``, ``id/<path>``), and the
    # frozen set built from them, rebuilt only after a change.
    revocations: dict[str, Revocation] = field(default_factory=dict)
    revocation_set: RevocationSet | None = None
    revocations_changed_at: int = 0

    def put(self, key: bytes, value: bytes, revision: int = 0) -> None:
        kind, name = self._split(key)
        try:
            if kind == "entries":
                entry = Entry.from_json(value)
                self.entries[self._entry_id(name)] = entry
            elif kind == "authorities":
                record = AuthorityRecord.from_json(value)
                self.authorities[record.id] = record
            elif kind == "bundle" and name == "sequence":
                self.bundle_sequence = int(value)
            elif kind == "revocations":
                revocation = Revocation.from_json(value)
                if name != self.revocation_name(revocation):
                    raise InvalidArgument(f"it holds the revocation of {revocation.describe()}")
                self.revocations[name] = revocation
                self._revocations_changed(revision)
        except (DmcError, ValueError) as exc:
            # A record this version cannot read must not stop the watch; it stays out of
            # the view, and the CA serves the rest.
            _log.error("ignoring unreadable etcd key %r: %s", key, exc)

    def delete(self, key: bytes, revision: int = 0) -> None:
        kind, name = self._split(key)
        try:
            if kind == "entries":
                self.entries.pop(self._entry_id(name), None)
            elif kind == "authorities":
                self.authorities.pop(name, None)
            elif kind == "bundle" and name == "sequence":
                self.bundle_sequence = 0
            elif kind == "revocations" and self.revocations.pop(name, None) is not None:
                self._revocations_changed(revision)
        except DmcError as exc:
            _log.error("ignoring deletion of unreadable etcd key %r: %s", key, exc)

    def freeze(self, revision: int) -> StoreView:
        if self.revocation_set is None:
            self.revocation_set = RevocationSet.of(
                self.revocations.values(), self.revocations_changed_at or revision
            )
        return StoreView(
            revision=revision,
            entries=MappingProxyType(dict(self.entries)),
            authorities=MappingProxyType(dict(self.authorities)),
            bundle_sequence=self.bundle_sequence,
            revocations=self.revocation_set,
        )

    def revocation_name(self, revocation: Revocation) -> str:
        """The key of ``revocation`` below ``revocations/`` (SPEC §5)."""
        if revocation.kind is RevocationKind.SERIAL:
            return f"serial/{revocation.value}"
        spiffe_id = SpiffeId.parse(revocation.value)
        if spiffe_id.trust_domain != self.trust_domain or spiffe_id.is_trust_domain_id:
            raise InvalidArgument(
                f"a revoked ID needs a path in trust domain {self.trust_domain!r}: {spiffe_id}"
            )
        return f"id{spiffe_id.path}"

    def _revocations_changed(self, revision: int) -> None:
        self.revocation_set = None
        self.revocations_changed_at = max(self.revocations_changed_at, revision)

    def _split(self, key: bytes) -> tuple[str, str]:
        rest = key.decode("utf-8", "replace")[len(self.base) :]
        kind, _, name = rest.partition("/")
        return kind, name

    def _entry_id(self, name: str) -> SpiffeId:
        return SpiffeId(self.trust_domain, "/" + name)


class ViewSubscription:
    """New views as they come: the current one first, then each change.

    Views are whole snapshots, so a slow reader skips the ones it missed and gets the
    newest. Iteration ends when the subscription or the store is closed.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._latest: StoreView | None = store.view
        self._changed = asyncio.Event()
        self._changed.set()
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StoreView:
        while True:
            if self._latest is not None:
                view, self._latest = self._latest, None
                return view
            if self._closed:
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """Stop the subscription; an iteration in progress ends."""
        self._closed = True
        self._changed.set()
        self._store._subscriptions.discard(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _offer(self, view: StoreView) -> None:
        self._latest = view
        self._changed.set()


class Store:
    """The trust domain's records in etcd, with an in-memory view kept current by a watch.

    Open it with :meth:`open`; close it with :meth:`close` (or ``async with``).
    """

    def __init__(
        self,
        client: Etcd3Client,
        endpoints: Sequence[str],
        prefix: str,
        trust_domain: str,
        timeout_seconds: float,
    ) -> None:
        if client.kv is None or client.lease is None or client.watch is None:
            raise FailedPrecondition("the etcd client is not connected")
        self._client = client
        self._kv = client.kv
        self._lease = client.lease
        # etcd3aio's own watch leaves a task pending forever after a broken stream (its
        # request generator never ends, and grpc does not cancel the consumer of a finished
        # call), so the store runs the Watch RPC itself in grpc's reader/writer style.
        self._watch_stub = WatchStub(client._channel)
        self._watching = False
        self._endpoints = ",".join(endpoints)
        self.trust_domain = trust_domain
        self.prefix = prefix
        self._base = f"{prefix}{trust_domain}/"
        self._timeout_seconds = timeout_seconds
        self._builder = _ViewBuilder(self._base, trust_domain)
        self._view = self._builder.freeze(0)
        self._waiters: list[tuple[int, asyncio.Future[StoreView]]] = []
        self._subscriptions: set[ViewSubscription] = set()
        self._follower: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        endpoints: Sequence[str],
        prefix: str,
        trust_domain: str,
        *,
        timeout_seconds: float = _DEFAULT_TIMEOUT_SECONDS,
    ) -> Store:
        """Connect to etcd, load the view and start following changes.

        ``prefix`` is the key prefix of SPEC §5 (``/dmc/`` by default in the commands);
        it must end with ``/``. Raises ``Unavailable`` when etcd cannot be read.
        """
        validate_trust_domain(trust_domain)
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise InvalidArgument(f"etcd prefix {prefix!r} must start and end with '/'")
        if not endpoints:
            raise InvalidArgument("no etcd endpoint given")

        client = Etcd3Client(list(endpoints))
        # gRPC backs off up to two minutes between reconnects by default; a CA whose etcd
        # comes back should follow it again within a second. etcd3aio has no parameter
        # for channel options, so they are added to its connection manager's list.
        client._manager.grpc_options.extend(_CHANNEL_OPTIONS)
        await client.connect()
        store = cls(client, endpoints, prefix, trust_domain, timeout_seconds)
        try:
            store._builder, view = await store._read_all()
        except BaseException:
            await client.close()
            raise
        store._publish(view)
        store._follower = asyncio.create_task(store._follow(), name=f"dmc-store-{store._base}")
        _log.info(
            "store open on etcd %s under %s at revision %d",
            store._endpoints,
            store._base,
            view.revision,
        )
        return store

    @property
    def view(self) -> StoreView:
        """The latest snapshot; reading it never needs etcd."""
        return self._view

    async def close(self) -> None:
        """Stop following etcd, end subscriptions and close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        for subscription in list(self._subscriptions):
            subscription.close()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(FailedPrecondition("the store was closed"))
        self._waiters.clear()
        await self._client.close()
        _log.info("store on etcd %s closed", self._endpoints)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def subscribe(self) -> ViewSubscription:
        """Iterate over views as they change, starting with the current one."""
        subscription = ViewSubscription(self)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    async def wait_for_revision(
        self, revision: int, timeout_seconds: float | None = None
    ) -> StoreView:
        """Return the view once it has reached ``revision``; ``Unavailable`` on timeout."""
        if self._view.revision >= revision:
            return self._view
        if self._closed:
            raise FailedPrecondition("the store is closed")

        waiter: asyncio.Future[StoreView] = asyncio.get_running_loop().create_future()
        entry = (revision, waiter)
        self._waiters.append(entry)
        timeout = self._timeout_seconds if timeout_seconds is None else timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise Unavailable(
                f"the view of etcd {self._endpoints} did not reach revision {revision} "
                f"within {timeout:g} s (it is at {self._view.revision})"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    # Entries (SPEC §4, Admin).

    def get_entry(self, spiffe_id: SpiffeId) -> Entry:
        """The entry for ``spiffe_id`` from the view; ``NotFound`` if there is none."""
        entry = self._view.entries.get(spiffe_id)
        if entry is None:
            raise NotFound(f"no entry for {spiffe_id}")
        return entry

    def list_entries(self) -> tuple[Entry, ...]:
        """All entries from the view, ordered by SPIFFE ID."""
        return tuple(sorted(self._view.entries.values(), key=lambda e: str(e.spiffe_id)))

    async def create_entry(self, entry: Entry) -> int:
        """Create ``entry`` in one transaction; return the etcd revision of the write.

        Refuses an ID that has an entry (``AlreadyExists``) and a DNS name that another
        SPIFFE ID holds (``AlreadyExists`` naming the name and its holder, SPEC §4).
        """
        key = self._entry_key(entry.spiffe_id)
        names = [(name, self._dns_key(name)) for name in entry.dns_names]
        compares = [KVService.txn_compare_create_revision(key, 0)]
        compares += [KVService.txn_compare_create_revision(k, 0) for _, k in names]
        success = [KVService.txn_op_put(key, entry.to_json())]
        success += [KVService.txn_op_put(k, str(entry.spiffe_id)) for _, k in names]
        failure = [KVService.txn_op_get(key)] + [KVService.txn_op_get(k) for _, k in names]

        response = await self._txn("create an entry", compares, success, failure)

        if not response.succeeded:
            if response.responses[0].response_range.kvs:
                raise AlreadyExists(f"an entry for {entry.spiffe_id} exists already")
            for (name, _), result in zip(names, response.responses[1:], strict=True):
                if result.response_range.kvs:
                    holder = result.response_range.kvs[0].value.decode("utf-8", "replace")
                    raise AlreadyExists(f"DNS name {name!r} is held by {holder}")
            raise FailedPrecondition(f"the entry for {entry.spiffe_id} could not be created")
        _log.debug("entry %s created at revision %d", entry.spiffe_id, response.header.revision)
        return await self._settle(response.header.revision)

    async def claim_dns_names(self, spiffe_id: SpiffeId, names: Sequence[str]) -> None:
        """Hold ``names`` for ``spiffe_id`` (the CA's own serving names) in the DNS index.

        A name this ID holds already is fine; one another ID holds raises ``AlreadyExists``.
        The claim outlives this replica on purpose: replicas come and go under one name.
        """
        for name in names:
            key = self._dns_key(name)
            compares = [KVService.txn_compare_create_revision(key, 0)]
            success = [KVService.txn_op_put(key, str(spiffe_id))]
            failure = [KVService.txn_op_get(key)]
            response = await self._txn("claim a DNS name", compares, success, failure)
            if response.succeeded:
                continue
            kvs = response.responses[0].response_range.kvs
            holder = kvs[0].value.decode("utf-8", "replace") if kvs else "?"
            if holder != str(spiffe_id):
                raise AlreadyExists(f"DNS name {name!r} is held by {holder}")

    async def delete_entry(self, spiffe_id: SpiffeId) -> int:
        """Delete the entry and its DNS names; ``NotFound`` if there is none."""
        key = self._entry_key(spiffe_id)
        for _ in range(_CAS_ATTEMPTS):
            current = await self._call("read an entry", self._kv.get(key))
            if not current.kvs:
                raise NotFound(f"no entry for {spiffe_id}")
            kv = current.kvs[0]
            try:
                dns_names = Entry.from_json(kv.value).dns_names
            except DmcError:
                _log.error("deleting unreadable entry %s; its DNS names stay claimed", key)
                dns_names = ()

            compares = [_compare_mod_revision(key, kv.mod_revision)]
            success = [KVService.txn_op_delete(key)]
            success += [KVService.txn_op_delete(self._dns_key(n)) for n in dns_names]
            response = await self._txn("delete an entry", compares, success)
            if response.succeeded:
                _log.debug("entry %s deleted at revision %d", spiffe_id, response.header.revision)
                return await self._settle(response.header.revision)
        raise Unavailable(f"etcd: the entry for {spiffe_id} kept changing; try again")

    # Join tokens (SPEC §4, Bootstrap and CreateJoinToken).

    async def create_token(self, token_hash: str, token: JoinToken, ttl_seconds: int) -> None:
        """Store a token under its hash with a lease of ``ttl_seconds``: etcd drops it after."""
        key = self._token_key(token_hash)
        if ttl_seconds <= 0:
            raise InvalidArgument(f"a join token's TTL must be positive, not {ttl_seconds} s")

        lease = await self._call("grant a lease", self._lease.grant(ttl_seconds))
        response = await self._txn(
            "create a join token",
            [KVService.txn_compare_create_revision(key, 0)],
            [KVService.txn_op_put(key, token.to_json(), lease=lease.ID)],
        )
        if not response.succeeded:
            with contextlib.suppress(EtcdError, grpc.aio.AioRpcError):
                await self._lease.revoke(lease.ID, timeout=self._timeout_seconds)
            raise AlreadyExists("a join token with this hash exists already")
        _log.debug("join token for %s stored for %d s", token.spiffe_id, ttl_seconds)

    async def get_token(self, token_hash: str) -> tuple[JoinToken, int]:
        """Read a token from etcd (never the view): the record and its mod revision.

        Unknown, spent and expired tokens all raise ``Unauthenticated``.
        """
        key = self._token_key(token_hash)
        response = await self._call("read a join token", self._kv.get(key))
        if not response.kvs:
            raise Unauthenticated("join token is unknown, expired or already used")
        kv = response.kvs[0]
        token = JoinToken.from_json(kv.value)
        # The lease removes the key only within about a second of its end; the recorded
        # expiry is the exact one.
        if token.expires_at <= _now():
            raise Unauthenticated("join token expired")
        return token, int(kv.mod_revision)

    async def spend_token(self, token_hash: str, mod_revision: int) -> None:
        """Delete the token if it is unchanged since read; only one spender ever wins.

        The transaction compares the key's mod revision with ``mod_revision``; every
        spender after the first finds the key gone and gets ``Unauthenticated``.
        """
        key = self._token_key(token_hash)
        response = await self._txn(
            "spend a join token",
            [_compare_mod_revision(key, mod_revision)],
            [KVService.txn_op_delete(key)],
        )
        if not response.succeeded:
            raise Unauthenticated("join token already used")

    # Revocations (SPEC §3, §5).

    def list_revocations(self) -> tuple[Revocation, ...]:
        """Every revocation in force, from the view: serials, then IDs, each in order."""
        return tuple(self._view.revocations)

    async def put_revocation(self, revocation: Revocation) -> int:
        """Store ``revocation`` with a lease that ends at its ``expires_at``.

        A revocation under the same key (an ID revoked again) is replaced. Returns the etcd
        revision of the write, once this replica's view shows it.
        """
        key = self._base + "revocations/" + self._builder.revocation_name(revocation)
        ttl_seconds = math.ceil((revocation.expires_at - _now()).total_seconds())
        if ttl_seconds <= 0:
            raise InvalidArgument(
                f"the revocation of {revocation.describe()} would have expired already"
            )

        lease = await self._call("grant a lease", self._lease.grant(ttl_seconds))
        try:
            response = await self._txn(
                "store a revocation",
                [],
                [KVService.txn_op_put(key, revocation.to_json(), lease=lease.ID)],
            )
        except Unavailable:
            with contextlib.suppress(EtcdError, grpc.aio.AioRpcError):
                await self._lease.revoke(lease.ID, timeout=self._timeout_seconds)
            raise
        _log.debug(
            "revocation of %s stored at revision %d for %d s",
            revocation.describe(),
            response.header.revision,
            ttl_seconds,
        )
        return await self._settle(response.header.revision)

    # Authorities and the bundle sequence (SPEC §4, §5).

    async def put_authority(self, record: AuthorityRecord) -> int:
        """Create an authority, bumping ``bundle/sequence`` in the same transaction."""
        key = self._authority_key(record.id)
        for _ in range(_CAS_ATTEMPTS):
            sequence_compare, sequence_put = await self._next_sequence()
            response = await self._txn(
                "store an authority",
                [sequence_compare, KVService.txn_compare_create_revision(key, 0)],
                [KVService.txn_op_put(key, record.to_json()), sequence_put],
                [KVService.txn_op_get(key)],
            )
            if response.succeeded:
                _log.debug("authority %s stored as %s", record.id, record.state)
                return await self._settle(response.header.revision)
            if response.responses[0].response_range.kvs:
                raise AlreadyExists(f"authority {record.id} exists already")
        raise Unavailable("etcd: the bundle sequence kept changing; try again")

    async def set_authority_states(
        self,
        states: Mapping[str, AuthorityState],
        delete: Collection[str] = (),
    ) -> int:
        """Change authority states and delete authorities in one transaction.

        ``bundle/sequence`` is bumped in the same transaction. ``NotFound`` names an id
        that has no authority.
        """
        both = set(states) & set(delete)
        if both:
            raise InvalidArgument(f"authorities both changed and deleted: {sorted(both)}")
        for authority_id in [*states, *delete]:
            validate_authority_id(authority_id)

        for _ in range(_CAS_ATTEMPTS):
            compares: list[Any] = []
            operations: list[Any] = []
            for authority_id in [*states, *delete]:
                key = self._authority_key(authority_id)
                current = await self._call("read an authority", self._kv.get(key))
                if not current.kvs:
                    raise NotFound(f"no authority {authority_id}")
                kv = current.kvs[0]
                compares.append(_compare_mod_revision(key, kv.mod_revision))
                if authority_id in states:
                    record = AuthorityRecord.from_json(kv.value).with_state(states[authority_id])
                    operations.append(KVService.txn_op_put(key, record.to_json()))
                else:
                    operations.append(KVService.txn_op_delete(key))

            sequence_compare, sequence_put = await self._next_sequence()
            response = await self._txn(
                "change authorities",
                [sequence_compare, *compares],
                [*operations, sequence_put],
            )
            if response.succeeded:
                _log.debug("authorities changed: %s, deleted: %s", dict(states), list(delete))
                return await self._settle(response.header.revision)
        raise Unavailable("etcd: the authorities kept changing; try again")

    # Keys (SPEC §5).

    def _entry_key(self, spiffe_id: SpiffeId) -> str:
        if spiffe_id.trust_domain != self.trust_domain:
            raise InvalidArgument(
                f"{spiffe_id} is not in trust domain {self.trust_domain!r} of this store"
            )
        if spiffe_id.is_trust_domain_id:
            raise InvalidArgument(f"an entry needs a path below the trust domain: {spiffe_id}")
        return f"{self._base}entries{spiffe_id.path}"

    def _dns_key(self, name: str) -> str:
        # RFC 4343: DNS names compare without regard to case, so the index does too.
        return f"{self._base}dnsnames/{name.lower()}"

    def _token_key(self, token_hash: str) -> str:
        if not isinstance(token_hash, str) or not _TOKEN_HASH.fullmatch(token_hash):
            raise InvalidArgument("a token hash is 64 lower-case hex digits (SHA-256)")
        return f"{self._base}tokens/{token_hash}"

    def _authority_key(self, authority_id: str) -> str:
        return f"{self._base}authorities/{validate_authority_id(authority_id)}"

    @property
    def _sequence_key(self) -> str:
        return f"{self._base}bundle/sequence"

    # etcd calls.

    async def _call(self, action: str, call: Awaitable[_T]) -> _T:
        """Await one etcd call; any failure of etcd becomes ``Unavailable``."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await call
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise Unavailable(f"etcd at {self._endpoints} failed to {action}: {detail}") from exc

    async def _txn(
        self,
        action: str,
        compares: Sequence[Any],
        success: Sequence[Any],
        failure: Sequence[Any] = (),
    ) -> Any:
        # One attempt only: a transaction retried after it was applied would fail its
        # compares and report a conflict that did not happen.
        return await self._call(
            action,
            self._kv.txn(
                compares, success, failure, timeout=self._timeout_seconds, max_attempts=1
            ),
        )

    async def _next_sequence(self) -> tuple[Any, Any]:
        """The compare and the put that bump ``bundle/sequence`` if nobody else has."""
        key = self._sequence_key
        current = await self._call("read the bundle sequence", self._kv.get(key))
        if not current.kvs:
            return KVService.txn_compare_create_revision(key, 0), KVService.txn_op_put(key, "1")
        kv = current.kvs[0]
        compare = _compare_mod_revision(key, kv.mod_revision)
        return compare, KVService.txn_op_put(key, str(int(kv.value) + 1))

    async def _read_all(self) -> tuple[_ViewBuilder, StoreView]:
        response = await self._call(
            "read the store",
            self._kv.get(self._base, range_end=prefix_range_end(self._base)),
        )
        builder = _ViewBuilder(self._base, self.trust_domain)
        for kv in response.kvs:
            builder.put(kv.key, kv.value, int(kv.mod_revision))
        return builder, builder.freeze(int(response.header.revision))

    async def _settle(self, revision: int) -> int:
        """Wait until this replica's view shows ``revision``; the write stands regardless."""
        try:
            await self.wait_for_revision(revision)
        except Unavailable as exc:
            _log.warning("write at revision %d done, but %s", revision, exc)
        return revision

    # Following etcd.

    def _publish(self, view: StoreView) -> None:
        self._view = view
        ready = [(r, w) for r, w in self._waiters if r <= view.revision]
        for entry in ready:
            self._waiters.remove(entry)
            if not entry[1].done():
                entry[1].set_result(view)
        for subscription in self._subscriptions:
            subscription._offer(view)

    async def _follow(self) -> None:
        """Follow etcd for the store's life: resume a broken watch, reload a cancelled one."""
        delay = _RELOAD_FIRST_DELAY_SECONDS
        lost = False
        while True:
            try:
                must_reload = await self._watch_once()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                if self._watching:
                    delay, lost = _RELOAD_FIRST_DELAY_SECONDS, False
                if not lost:
                    _log.warning(
                        "etcd watch of %s lost (%s); resuming from revision %d",
                        self._base,
                        _rpc_error_text(exc),
                        self._view.revision + 1,
                    )
                lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RELOAD_MAX_DELAY_SECONDS)
                continue
            if must_reload:
                await self._reload()
            delay, lost = _RELOAD_FIRST_DELAY_SECONDS, False

    async def _watch_once(self) -> bool:
        """Run one Watch RPC from the view's next revision, applying its events.

        Returns ``True`` when etcd cancelled the watch (a compacted start revision), which
        calls for a reload, and ``False`` when the stream ended; a broken stream raises.
        """
        self._watching = False
        call = self._watch_stub.Watch()
        try:
            await call.write(
                WatchRequest(
                    create_request=WatchCreateRequest(
                        key=self._base.encode("utf-8"),
                        range_end=prefix_range_end(self._base),
                        start_revision=self._view.revision + 1,
                    )
                )
            )
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return False
                if response.canceled or response.compact_revision:
                    # SPEC §5: a watch whose start revision was compacted is cancelled by
                    # etcd; only a fresh range read can bring the view up to date.
                    _log.info(
                        "etcd watch of %s cancelled (compacted at %d: %s); reloading",
                        self._base,
                        response.compact_revision,
                        response.cancel_reason or "no reason given",
                    )
                    return True
                if response.created:
                    self._watching = True
                    _log.debug("watching %s from %d", self._base, self._view.revision + 1)
                if response.events:
                    self._apply(response.events)
        finally:
            # The reader/writer style leaves no task behind once the call is cancelled.
            call.cancel()

    def _apply(self, events: Sequence[Any]) -> None:
        for event in events:
            # A delete event's kv carries the revision of the deletion (a lease expiry too).
            if event.type == _EVENT_DELETE:
                self._builder.delete(event.kv.key, int(event.kv.mod_revision))
            else:
                self._builder.put(event.kv.key, event.kv.value, int(event.kv.mod_revision))
        revision = max(int(event.kv.mod_revision) for event in events)
        self._publish(self._builder.freeze(max(revision, self._view.revision)))
        _log.debug("view of %s at revision %d", self._base, revision)

    async def _reload(self) -> None:
        """Replace the view from a fresh range read, retrying until etcd answers."""
        delay = _RELOAD_FIRST_DELAY_SECONDS
        while True:
            try:
                self._builder, view = await self._read_all()
            except Unavailable as exc:
                _log.warning("reloading %s from etcd failed: %s", self._base, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RELOAD_MAX_DELAY_SECONDS)
                continue
            self._publish(view)
            _log.info("view of %s reloaded at revision %d", self._base, view.revision)
            return


def _compare_mod_revision(key: str, mod_revision: int) -> Any:
    return Compare(
        result=Compare.EQUAL,
        target=Compare.MOD,
        key=key.encode("utf-8"),
        mod_revision=mod_revision,
    )


def _rpc_error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _now() -> datetime:
    return datetime.now(UTC)
