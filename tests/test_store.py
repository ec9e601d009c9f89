"""Store against a real etcd: keys, transactions, the watched view and etcd failures."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from etcd3aio import Etcd3Client

from conftest import TRUST_DOMAIN, TcpProxy
from dmc.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from dmc.spiffe_id import SpiffeId
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.model import AuthorityRecord, AuthorityState, Entry, JoinToken
from dmc_ca.store import Store, StoreView, hash_token

NOW = datetime.now(UTC).replace(microsecond=0)


def _id(path: str) -> SpiffeId:
    return SpiffeId(TRUST_DOMAIN, path)


def _entry(path: str, *dns_names: str) -> Entry:
    return Entry(
        spiffe_id=_id(path),
        permissions=("/pkg.Svc/*",),
        audiences=("*",),
        max_depth=1,
        dns_names=dns_names,
        created_at=NOW,
    )


def _authority(
    authority_id: str, state: AuthorityState = AuthorityState.ACTIVE
) -> AuthorityRecord:
    return AuthorityRecord(
        id=authority_id,
        state=state,
        certificate_chain_pem=b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        sealed_key=b"sealed " + authority_id.encode(),
        created_at=NOW,
    )


def _token(ttl_seconds: int = 60) -> JoinToken:
    # From the real now: the suite may run for minutes after this module was imported.
    expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=ttl_seconds)
    return JoinToken(spiffe_id=_id("/web"), expires_at=expires_at)


async def _eventually(
    store: Store, check: Callable[[StoreView], bool], timeout_seconds: float = 5.0
) -> StoreView:
    """The first view within the timeout that passes ``check``."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if check(store.view):
            return store.view
        await asyncio.sleep(0.02)
    raise AssertionError(f"the view never passed the check; it is {store.view}")


# Keys (SPEC §5).


async def test_keys_follow_the_spec_layout(
    store: Store, etcd_client: Etcd3Client, etcd_prefix: str
) -> None:
    assert etcd_client.kv is not None
    token_hash = hash_token("secret-token")

    await store.create_entry(_entry("/web/mid", "web.example.org"))
    await store.create_token(token_hash, _token(), 60)
    await store.put_authority(_authority("a1"))

    response = await etcd_client.kv.get(etcd_prefix, range_end=etcd_prefix[:-1] + "0")
    keys = {kv.key.decode(): kv.value for kv in response.kvs}
    base = f"{etcd_prefix}example.org/"
    assert set(keys) == {
        f"{base}entries/web/mid",
        f"{base}dnsnames/web.example.org",
        f"{base}tokens/{token_hash}",
        f"{base}authorities/a1",
        f"{base}bundle/sequence",
    }
    assert keys[f"{base}bundle/sequence"] == b"1"
    assert keys[f"{base}dnsnames/web.example.org"] == b"spiffe://example.org/web/mid"
    assert b"secret-token" not in b"".join([*map(str.encode, keys), *keys.values()])


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


async def test_open_refuses_a_prefix_without_slashes(etcd: EtcdProcess) -> None:
    with pytest.raises(InvalidArgument, match="must start and end with '/'"):
        await Store.open([etcd.endpoint], "/dmc", TRUST_DOMAIN)


async def test_open_raises_unavailable_when_etcd_is_unreachable(tmp_path: object) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with pytest.raises(Unavailable, match=re.escape("etcd at 127.0.0.1")):
        await Store.open([f"127.0.0.1:{port}"], "/dmc/", TRUST_DOMAIN, timeout_seconds=2)


# Entries.


async def test_entry_round_trips_through_the_store(store: Store) -> None:
    entry = _entry("/web/mid", "web.example.org")

    revision = await store.create_entry(entry)

    assert store.view.revision >= revision
    assert store.get_entry(entry.spiffe_id) == entry
    assert store.list_entries() == (entry,)

    await store.delete_entry(entry.spiffe_id)

    with pytest.raises(NotFound, match=re.escape("no entry for spiffe://example.org/web/mid")):
        store.get_entry(entry.spiffe_id)
    assert store.list_entries() == ()


async def test_list_entries_is_ordered_by_spiffe_id(store: Store) -> None:
    for path in ("/b", "/a/z", "/a"):
        await store.create_entry(_entry(path))

    assert [str(e.spiffe_id) for e in store.list_entries()] == [
        "spiffe://example.org/a",
        "spiffe://example.org/a/z",
        "spiffe://example.org/b",
    ]


async def test_create_entry_refuses_an_existing_id(store: Store) -> None:
    await store.create_entry(_entry("/web"))

    with pytest.raises(
        AlreadyExists, match=re.escape("entry for spiffe://example.org/web exists")
    ):
        await store.create_entry(_entry("/web", "web.example.org"))
    assert store.get_entry(_id("/web")).dns_names == ()


async def test_create_entry_refuses_a_dns_name_held_by_another_id(store: Store) -> None:
    await store.create_entry(_entry("/web", "web.example.org"))

    with pytest.raises(
        AlreadyExists,
        match=re.escape("DNS name 'WEB.example.org' is held by spiffe://example.org/web") + "$",
    ):
        await store.create_entry(_entry("/other", "api.example.org", "WEB.example.org"))

    assert _id("/other") not in store.view.entries
    # Nothing of the refused entry was written: its other name is still free.
    await store.create_entry(_entry("/third", "api.example.org"))


async def test_deleting_an_entry_frees_its_dns_names(store: Store) -> None:
    await store.create_entry(_entry("/web", "web.example.org"))
    await store.delete_entry(_id("/web"))

    await store.create_entry(_entry("/other", "web.example.org"))

    assert store.get_entry(_id("/other")).dns_names == ("web.example.org",)


async def test_concurrent_replicas_claiming_one_dns_name_let_exactly_one_win(
    store: Store, etcd: EtcdProcess, etcd_prefix: str
) -> None:
    async with await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN) as replica:
        attempts = [
            (store if n % 2 else replica).create_entry(_entry(f"/svc{n}", "shared.example.org"))
            for n in range(20)
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)

    winners = [r for r in results if isinstance(r, int)]
    losers = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(winners) == 1
    assert len(losers) == 19
    assert len(store.view.entries) == 1


async def test_delete_entry_of_an_unknown_id_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match=re.escape("no entry for spiffe://example.org/nobody")):
        await store.delete_entry(_id("/nobody"))


async def test_create_entry_refuses_another_trust_domain(store: Store) -> None:
    entry = Entry(
        spiffe_id=SpiffeId("other.org", "/web"),
        permissions=(),
        audiences=(),
        max_depth=0,
        created_at=NOW,
    )

    with pytest.raises(InvalidArgument, match=re.escape("not in trust domain 'example.org'")):
        await store.create_entry(entry)


# Join tokens.


async def test_fifty_concurrent_spends_of_one_token_let_exactly_one_win(store: Store) -> None:
    token_hash = hash_token("one-use")
    token = _token()
    await store.create_token(token_hash, token, 60)
    record, mod_revision = await store.get_token(token_hash)
    assert record == token

    results = await asyncio.gather(
        *(store.spend_token(token_hash, mod_revision) for _ in range(50)),
        return_exceptions=True,
    )

    assert results.count(None) == 1
    refused = [r for r in results if r is not None]
    assert len(refused) == 49
    assert all(isinstance(r, Unauthenticated) for r in refused)
    assert {str(r) for r in refused} == {"join token already used"}
    with pytest.raises(Unauthenticated):
        await store.get_token(token_hash)


async def test_get_token_of_an_unknown_token_raises_unauthenticated(store: Store) -> None:
    with pytest.raises(Unauthenticated, match="unknown, expired or already used"):
        await store.get_token(hash_token("never issued"))


async def test_token_is_gone_when_its_lease_ends(
    store: Store, etcd_client: Etcd3Client, etcd_prefix: str
) -> None:
    assert etcd_client.kv is not None
    token_hash = hash_token("short-lived")
    await store.create_token(token_hash, _token(ttl_seconds=1), 1)
    key = f"{etcd_prefix}example.org/tokens/{token_hash}"
    assert (await etcd_client.kv.get(key)).kvs

    deadline = time.monotonic() + 10
    while (await etcd_client.kv.get(key)).kvs:
        assert time.monotonic() < deadline, "the lease did not remove the token"
        await asyncio.sleep(0.1)

    with pytest.raises(Unauthenticated):
        await store.get_token(token_hash)


async def test_get_token_refuses_a_token_past_its_expiry_before_the_lease_ends(
    store: Store,
) -> None:
    token_hash = hash_token("expired")
    expired = JoinToken(spiffe_id=_id("/web"), expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await store.create_token(token_hash, expired, 60)

    with pytest.raises(Unauthenticated, match="join token expired"):
        await store.get_token(token_hash)


async def test_create_token_refuses_a_malformed_hash(store: Store) -> None:
    with pytest.raises(InvalidArgument, match="64 lower-case hex"):
        await store.create_token("ABC", _token(), 60)


# Authorities and the bundle sequence.


async def test_put_authority_bumps_the_bundle_sequence(store: Store) -> None:
    assert store.view.bundle_sequence == 0

    await store.put_authority(_authority("a1"))
    await store.put_authority(_authority("a2", AuthorityState.PREPARED))

    assert store.view.bundle_sequence == 2
    assert store.view.authorities["a1"] == _authority("a1")
    assert store.view.authorities["a2"].state is AuthorityState.PREPARED


async def test_put_authority_refuses_an_existing_id(store: Store) -> None:
    await store.put_authority(_authority("a1"))

    with pytest.raises(AlreadyExists, match="authority a1 exists"):
        await store.put_authority(_authority("a1", AuthorityState.PREPARED))
    assert store.view.bundle_sequence == 1


async def test_set_authority_states_changes_and_deletes_in_one_step(store: Store) -> None:
    await store.put_authority(_authority("old", AuthorityState.PREVIOUS))
    await store.put_authority(_authority("cur", AuthorityState.ACTIVE))
    await store.put_authority(_authority("new", AuthorityState.PREPARED))

    await store.set_authority_states(
        {"cur": AuthorityState.PREVIOUS, "new": AuthorityState.ACTIVE}, delete=["old"]
    )

    view = store.view
    assert view.bundle_sequence == 4
    assert {i: r.state for i, r in view.authorities.items()} == {
        "cur": AuthorityState.PREVIOUS,
        "new": AuthorityState.ACTIVE,
    }
    assert view.authorities["new"].sealed_key == b"sealed new"


async def test_set_authority_states_of_an_unknown_id_changes_nothing(store: Store) -> None:
    await store.put_authority(_authority("a1"))

    with pytest.raises(NotFound, match="no authority ghost"):
        await store.set_authority_states({"a1": AuthorityState.PREVIOUS}, delete=["ghost"])

    assert store.view.authorities["a1"].state is AuthorityState.ACTIVE
    assert store.view.bundle_sequence == 1


async def test_concurrent_authority_changes_each_bump_the_sequence(
    store: Store, etcd: EtcdProcess, etcd_prefix: str
) -> None:
    async with await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN) as replica:
        await asyncio.gather(
            *((store if n % 2 else replica).put_authority(_authority(f"a{n}")) for n in range(10))
        )
        await replica.wait_for_revision(store.view.revision)

    assert store.view.bundle_sequence == 10


# The view.


async def test_view_follows_writes_of_another_replica(
    store: Store, etcd: EtcdProcess, etcd_prefix: str
) -> None:
    async with await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN) as replica:
        revision = await replica.create_entry(_entry("/from-replica"))
        await replica.put_authority(_authority("a1"))

        view = await store.wait_for_revision(revision, timeout_seconds=5)
        assert _id("/from-replica") in view.entries
        await _eventually(store, lambda v: v.bundle_sequence == 1)

        await replica.delete_entry(_id("/from-replica"))
        await _eventually(store, lambda v: _id("/from-replica") not in v.entries)


async def test_subscription_yields_the_current_view_then_each_change(store: Store) -> None:
    async with store.subscribe() as views:
        first = await anext(views)
        assert first.bundle_sequence == 0

        await store.put_authority(_authority("a1"))

        second = await asyncio.wait_for(anext(views), 5)
        assert second.bundle_sequence == 1
        assert "a1" in second.authorities


async def test_subscription_ends_when_the_store_closes(
    etcd: EtcdProcess, etcd_prefix: str
) -> None:
    store = await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN)
    views = store.subscribe()
    await anext(views)

    await store.close()

    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(views), 5)


async def test_wait_for_revision_times_out_with_unavailable(store: Store) -> None:
    with pytest.raises(Unavailable, match="did not reach revision"):
        await store.wait_for_revision(store.view.revision + 1000, timeout_seconds=0.2)


async def test_close_ends_a_pending_wait_for_revision(etcd: EtcdProcess, etcd_prefix: str) -> None:
    store = await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN)
    waiting = asyncio.create_task(store.wait_for_revision(store.view.revision + 1000, 30))
    await asyncio.sleep(0.05)

    await store.close()

    with pytest.raises(FailedPrecondition, match="closed"):
        await asyncio.wait_for(waiting, 5)


async def test_close_leaves_no_task_behind(etcd: EtcdProcess, etcd_prefix: str) -> None:
    store = await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN)
    assert any(t.get_name().startswith("dmc-store-") for t in asyncio.all_tasks())

    await store.close()
    await store.close()

    assert not any(t.get_name().startswith("dmc-store-") for t in asyncio.all_tasks())


async def test_reopened_store_keeps_the_data(etcd: EtcdProcess, etcd_prefix: str) -> None:
    async with await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN) as first:
        await first.create_entry(_entry("/web", "web.example.org"))
        await first.put_authority(_authority("a1"))

    async with await Store.open([etcd.endpoint], etcd_prefix, TRUST_DOMAIN) as second:
        assert second.get_entry(_id("/web")) == _entry("/web", "web.example.org")
        assert second.view.authorities["a1"] == _authority("a1")
        assert second.view.bundle_sequence == 1


async def test_another_trust_domain_under_the_same_prefix_is_not_seen(
    store: Store, etcd: EtcdProcess, etcd_prefix: str
) -> None:
    async with await Store.open([etcd.endpoint], etcd_prefix, "example.org.other") as other:
        await other.put_authority(_authority("elsewhere"))
        await store.put_authority(_authority("here"))

    assert set(store.view.authorities) == {"here"}


# etcd failures.


async def test_view_reloads_after_its_watch_was_compacted(
    private_etcd: EtcdProcess, etcd_proxy: TcpProxy
) -> None:
    async with await Store.open([etcd_proxy.endpoint], "/dmc/", TRUST_DOMAIN) as store:
        await store.create_entry(_entry("/before"))
        watched_from = store.view.revision

        # While the store cannot reach etcd, another replica writes and etcd compacts past
        # the revision the store's watch will resume from.
        await etcd_proxy.cut()
        async with await Store.open([private_etcd.endpoint], "/dmc/", TRUST_DOMAIN) as replica:
            await replica.delete_entry(_id("/before"))
            await replica.create_entry(_entry("/during"))
            revision = await replica.put_authority(_authority("a1"))
            client = Etcd3Client([private_etcd.endpoint])
            await client.connect()
            assert client.kv is not None
            await client.kv.compact(revision, physical=True)
            await client.close()
        assert revision > watched_from + 1
        await etcd_proxy.start()

        view = await store.wait_for_revision(revision, timeout_seconds=10)
        assert set(view.entries) == {_id("/during")}
        assert view.bundle_sequence == 1

        # And the view keeps following after the reload.
        after = await store.create_entry(_entry("/after"))
        assert _id("/after") in (await store.wait_for_revision(after)).entries


async def test_view_answers_reads_while_etcd_is_down_and_writes_raise_unavailable(
    private_etcd: EtcdProcess,
) -> None:
    async with await Store.open(
        [private_etcd.endpoint], "/dmc/", TRUST_DOMAIN, timeout_seconds=2
    ) as store:
        await store.create_entry(_entry("/web"))
        await store.put_authority(_authority("a1"))

        private_etcd.stop()

        assert store.get_entry(_id("/web")) == _entry("/web")
        assert store.view.bundle_sequence == 1
        with pytest.raises(Unavailable, match=r"^etcd at 127\.0\.0\.1:[0-9]+ failed to create"):
            await store.create_entry(_entry("/other"))
        with pytest.raises(Unavailable, match="etcd"):
            await store.spend_token(hash_token("t"), 1)
        with pytest.raises(Unavailable, match="etcd"):
            await store.put_authority(_authority("a2"))

        # etcd comes back with the same data folder: the view follows again.
        private_etcd.start()
        async with await Store.open([private_etcd.endpoint], "/dmc/", TRUST_DOMAIN) as replica:
            revision = await replica.create_entry(_entry("/after-restart"))
        view = await store.wait_for_revision(revision, timeout_seconds=10)
        assert set(view.entries) == {_id("/web"), _id("/after-restart")}

        await store.create_entry(_entry("/written-again"))
        assert _id("/written-again") in store.view.entries


async def test_store_keeps_its_data_across_an_etcd_kill(private_etcd: EtcdProcess) -> None:
    async with await Store.open([private_etcd.endpoint], "/dmc/", TRUST_DOMAIN) as store:
        await store.create_entry(_entry("/web", "web.example.org"))

    private_etcd.kill()
    private_etcd.start()

    async with await Store.open([private_etcd.endpoint], "/dmc/", TRUST_DOMAIN) as store:
        assert store.get_entry(_id("/web")).dns_names == ("web.example.org",)
        with pytest.raises(AlreadyExists, match=re.escape("held by spiffe://example.org/web")):
            await store.create_entry(_entry("/other", "web.example.org"))
