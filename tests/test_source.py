"""The identity source: renewal timing, back-off through a CA outage, bundle watch,
persistence layout, loaders (case 007), and a clean close."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from ca_harness import CaHarness
from certgen import make_leaf, make_root
from conftest import TcpProxy
from dmc.connect import load_credential_dir
from dmc.errors import InvalidPem, InvalidSvid, Unauthenticated
from dmc.pem import certificates_to_pem, load_certificates_file, private_key_to_pem
from dmc.source import (
    Identity,
    IdentitySource,
    RenewalPolicy,
    _read_roots,
    load_identity,
    persist_identity,
)
from dmc.svid import parse_svid
from dmc.v1 import admin_pb2, admin_pb2_grpc
from source_helpers import SerialLog, bootstrap_source, wait_until

CASE_007 = Path(__file__).parent / "cases" / "007-pem-bundle-formatting"
READABLE = [
    "bundle-clean.pem",
    "bundle-trailing-blank-lines.pem",
    "bundle-leading-and-between-blank-lines.pem",
    "bundle-crlf.pem",
    "bundle-explanatory-text.pem",
]
_RETRY = re.compile(r"retrying in ([0-9.]+) s")
BROKEN = ["bundle-second-block-truncated.pem", "bundle-second-block-bad-char.pem"]


# -- timing -----------------------------------------------------------------------------------


def test_renewal_is_due_at_half_the_lifetime_from_issuance_with_jitter() -> None:
    issued_at = datetime(2030, 1, 1, tzinfo=UTC)
    leaf = make_leaf(make_root(), issued_at=issued_at, ttl=timedelta(seconds=1000))
    svid = parse_svid(leaf.certificate)
    policy = RenewalPolicy()

    offsets = [policy.renewal_due(svid) - issued_at.timestamp() for _ in range(200)]

    # SPEC §2: measured from notBefore + 30 s, not from notBefore.
    assert all(450 <= offset <= 550 for offset in offsets)
    assert max(offsets) - min(offsets) > 50  # jittered, not fixed


def test_retry_delay_doubles_up_to_the_cap_and_shortens_near_expiry() -> None:
    policy = RenewalPolicy(jitter=0, retry_initial_seconds=1, retry_max_seconds=8)

    far = [policy.retry_delay(n, seconds_left=3600) for n in range(1, 7)]
    near = policy.retry_delay(5, seconds_left=6)
    last = policy.retry_delay(9, seconds_left=0.2)

    assert far == [1, 2, 4, 8, 8, 8]
    assert near == 3  # half the time left, so a CA back before expiry is seen in time
    assert last == policy.retry_min_seconds


# -- renewal against a real CA ----------------------------------------------------------------


def test_renewal_uses_a_new_key_persists_it_and_logs_one_info_line(
    ca: CaHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "id"
    with bootstrap_source(ca, folder, "/web") as source:
        before = source.current()
        with caplog.at_level(logging.INFO, logger="dmc.source"):
            source.renew_now()
            assert wait_until(lambda: source.current().svid.serial != before.svid.serial, 10)
        after = source.current()

    assert after.key.public_key() != before.key.public_key()
    assert after.spiffe_id == before.spiffe_id
    on_disk = load_identity(folder)
    assert on_disk.chain_pem == after.chain_pem and on_disk.key_pem == after.key_pem
    assert stat.S_IMODE((folder / "svid.key").stat().st_mode) == 0o600
    renewed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("renewed")]
    assert renewed == [
        f"renewed SVID {after.spiffe_id} serial {after.svid.serial:x}, "
        f"expires {after.svid.not_after.isoformat()}"
    ]


# The test's TcpProxy (tests/conftest.py) accepts on the CA harness's loop while it is cut
# and restored; about one run in six an accepted socket of the proxy itself is collected
# unclosed. The product's sockets are gRPC's, not asyncio's, so this names only the proxy.
# TODO: find the accept path in TcpProxy that escapes cut() and drop this filter.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_svid_never_lapses_while_the_ca_is_away_and_renewal_resumes_with_back_off(
    ca: CaHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(int(ca.address.rsplit(":", 1)[1]))
    ca.run(proxy.start())
    lapsed: list[datetime] = []
    stop = threading.Event()

    def watch_validity(source: IdentitySource) -> None:
        while not stop.is_set():
            now = datetime.now(UTC)
            if source.current().svid.not_after <= now:
                lapsed.append(now)
            time.sleep(0.05)

    try:
        with (
            caplog.at_level(logging.WARNING, logger="dmc.source"),
            bootstrap_source(
                ca, tmp_path / "id", "/outage", ttl_seconds=15, ca_address=proxy.endpoint
            ) as source,
        ):
            first = source.current().svid
            ca.run(proxy.cut())
            checker = threading.Thread(target=watch_validity, args=(source,))
            checker.start()
            # Renewal is due ~7.5 s after issuance; the CA stays away until ~11 s.
            time.sleep(
                max(0.0, (first.issued_at + timedelta(seconds=11) - _now()).total_seconds())
            )
            away = [r.getMessage() for r in caplog.records if "renewal of" in r.getMessage()]
            ca.run(proxy.start())
            resumed = wait_until(lambda: source.current().svid.serial != first.serial, 5)
            renewed_at = _now()
            stop.set()
            checker.join()
    finally:
        ca.run(proxy.cut())
        # Collect here, under this test's filter, what the proxy may have dropped.
        gc.collect()

    assert resumed and renewed_at < first.not_after
    assert lapsed == []
    assert len(away) >= 2
    assert all("UNAVAILABLE" in line and "the current SVID expires in" in line for line in away)
    delays = [float(match[1]) for line in away if (match := _RETRY.search(line))]
    assert len(delays) == len(away)
    assert delays[1] > delays[0] * 1.5  # exponential: ~1 s, then ~2 s


def test_bundle_change_reaches_subscribers_and_the_bundle_file(
    ca: CaHarness, tmp_path: Path
) -> None:
    folder = tmp_path / "id"
    seen: list[Identity] = []
    with bootstrap_source(ca, folder, "/bundle-watcher") as source:
        source.subscribe(seen.append)
        time.sleep(0.5)  # let the watch stream open
        with ca.admin_channel() as channel:
            admin_pb2_grpc.AdminStub(channel).PrepareAuthority(
                admin_pb2.PrepareAuthorityRequest(), timeout=10
            )
        assert wait_until(lambda: len(source.current().bundle) == 2, 10)

    assert seen and len(seen[-1].bundle) == 2
    assert len(load_certificates_file(folder / "bundle.pem")) == 2


def test_close_stops_and_joins_every_thread(ca: CaHarness, tmp_path: Path) -> None:
    source = bootstrap_source(ca, tmp_path / "id", "/closer")
    names = {thread.name for thread in threading.enumerate()}
    assert {"dmc-renew svid", "dmc-bundle svid"} <= names

    started = time.monotonic()
    source.close()
    source.close()

    assert time.monotonic() - started < 2
    assert not [t for t in threading.enumerate() if t.name.startswith(("dmc-renew", "dmc-bundle"))]


def test_failing_subscriber_is_logged_and_others_still_hear(
    ca: CaHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[int] = []

    def broken(identity: Identity) -> None:
        raise RuntimeError("subscriber bug")

    with bootstrap_source(ca, tmp_path / "id", "/subscribers") as source:
        source.subscribe(broken)
        unsubscribe = source.subscribe(lambda identity: heard.append(identity.svid.serial))
        source.renew_now()
        assert wait_until(lambda: len(heard) == 1, 10)
        unsubscribe()
        source.renew_now()
        log = SerialLog(source)
        assert wait_until(lambda: log.renewals == 1, 10)

    assert len(heard) == 1
    assert "an identity subscriber failed" in caplog.text


# -- loading and persistence ------------------------------------------------------------------


def test_from_directory_reads_plain_files_and_switches_to_links_on_renewal(
    ca: CaHarness, tmp_path: Path
) -> None:
    folder = tmp_path / "id"
    bootstrap_source(ca, tmp_path / "first", "/plain").close()
    # What `dmc bootstrap` leaves: three plain files.
    folder.mkdir()
    for name in ("svid.pem", "svid.key", "bundle.pem"):
        (folder / name).write_bytes((tmp_path / "first" / name).read_bytes())

    with IdentitySource.from_directory(folder, ca=ca.address) as source:
        loaded = source.current()
        source.renew_now()
        assert wait_until(lambda: source.current().svid.serial != loaded.svid.serial, 10)
        current = source.current()

    assert os.readlink(folder / "svid.pem") == ".svid.data/svid.pem"
    assert os.readlink(folder / "svid.key") == ".svid.data/svid.key"
    assert load_credential_dir(folder).chain_pem == current.chain_pem
    versions = [p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    assert versions == [os.readlink(folder / ".svid.data")]


def test_from_directory_refuses_an_expired_svid(tmp_path: Path) -> None:
    root = make_root()
    leaf = make_leaf(
        root, issued_at=datetime.now(UTC) - timedelta(hours=2), ttl=timedelta(hours=1)
    )
    (tmp_path / "svid.pem").write_bytes(certificates_to_pem([leaf.certificate]))
    (tmp_path / "svid.key").write_bytes(private_key_to_pem(leaf.key))
    (tmp_path / "bundle.pem").write_bytes(certificates_to_pem([root.certificate]))

    with pytest.raises(Unauthenticated, match="expired"):
        IdentitySource.from_directory(tmp_path, ca="127.0.0.1:1")


def test_persist_replaces_key_and_chain_together(tmp_path: Path) -> None:
    root = make_root()
    identities = [_identity(root) for _ in range(3)]

    for identity in identities:
        persist_identity(tmp_path, identity)
        assert load_identity(tmp_path).key_pem == identity.key_pem

    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(hidden) == 2  # the data link and the one version folder it names


@pytest.mark.parametrize("name", READABLE)
def test_bundle_loader_reads_case_007_formatting(name: str) -> None:
    clean = load_certificates_file(CASE_007 / "bundle-clean.pem")

    assert _read_roots(CASE_007 / name) == clean
    assert _read_roots((CASE_007 / name).read_bytes()) == clean


@pytest.mark.parametrize("name", BROKEN)
def test_bundle_loader_refuses_case_007_broken_blocks(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidPem, match=rf"{re.escape(name)}: certificate block 2"):
        _read_roots(CASE_007 / name)
    # The same file as the bundle of a persisted identity stops the source from loading.
    persist_identity(tmp_path, _identity(make_root()))
    shutil.copy(CASE_007 / name, tmp_path / "bundle.pem")
    with pytest.raises(InvalidPem, match=r"bundle\.pem: certificate block 2"):
        IdentitySource.from_directory(tmp_path, ca="127.0.0.1:1")


def _identity(root: object) -> Identity:
    leaf = make_leaf(root)  # type: ignore[arg-type]
    certificate: x509.Certificate = leaf.certificate
    return Identity.create(
        parse_svid(certificate),
        [certificate],
        leaf.key,
        [root.certificate],  # type: ignore[attr-defined]
    )


def _now() -> datetime:
    return datetime.now(UTC)


CASE_005 = Path(__file__).parent / "cases" / "005-svid-with-several-uri-sans"


@pytest.mark.parametrize(
    ("leaf", "words"),
    [("svid-two-spiffe-ids", "2 URI SANs"), ("svid-https-uri-then-spiffe-id", "2 URI SANs")],
)
def test_loaders_refuse_a_leaf_with_several_uri_sans(
    tmp_path: Path, leaf: str, words: str
) -> None:
    # Case 005 at the library's loaders: no SPIFFE ID is taken from such a leaf.
    folder = tmp_path / "id"
    folder.mkdir()
    shutil.copy(CASE_005 / f"{leaf}.pem", folder / "svid.pem")
    shutil.copy(CASE_005 / f"{leaf}.key", folder / "svid.key")
    shutil.copy(CASE_005 / "bundle.pem", folder / "bundle.pem")

    with pytest.raises(InvalidSvid, match=words):
        load_identity(folder)
    with pytest.raises(InvalidSvid, match=words):
        IdentitySource.from_directory(folder, ca="127.0.0.1:1")


def test_loader_accepts_the_one_uri_leaf_of_case_005(tmp_path: Path) -> None:
    folder = tmp_path / "id"
    folder.mkdir()
    shutil.copy(CASE_005 / "svid-one-uri-ok.pem", folder / "svid.pem")
    shutil.copy(CASE_005 / "svid-one-uri-ok.key", folder / "svid.key")
    shutil.copy(CASE_005 / "bundle.pem", folder / "bundle.pem")

    assert load_identity(folder).svid.spiffe_id.path == "/workload/api"
