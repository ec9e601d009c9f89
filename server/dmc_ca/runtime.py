"""What `dmc-ca init`, `serve` and `dev` do, without their argument parsing.

`init` creates (or imports) the first authority and the admin identity; `serve` runs one CA
replica against etcd; `dev` runs a local etcd, initialises on first run, and serves
(SPEC §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from dmc.errors import FailedPrecondition
from dmc.files import write_atomic
from dmc.pem import certificates_to_pem
from dmc_ca.authorities import new_authority
from dmc_ca.ca import CertificateAuthority, admin_entry
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.keys import KeyType, generate_private_key
from dmc_ca.model import AuthorityState
from dmc_ca.sealing import generate_kek_file, load_kek
from dmc_ca.server import CaServer, ListenAddress
from dmc_ca.store import Store

__all__ = [
    "DEFAULT_ADMIN_TTL_SECONDS",
    "CaSettings",
    "CredentialPaths",
    "initialise",
    "run_dev",
    "run_serve",
    "write_admin_credential",
]

_log = logging.getLogger(__name__)

DEFAULT_ADMIN_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class CaSettings:
    """Everything one CA replica needs, validated by the command that builds it."""

    trust_domain: str
    etcd_endpoints: tuple[str, ...]
    etcd_prefix: str
    kek_file: Path
    listen: ListenAddress
    bootstrap_listen: ListenAddress | None = None
    dns_names: tuple[str, ...] = ()
    ip_sans: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CredentialPaths:
    """Where the operator credential and the bundle were written."""

    certificate: Path
    key: Path
    bundle: Path


def etcd_endpoints(url_list: str) -> tuple[str, ...]:
    """``http://127.0.0.1:2379,127.0.0.1:2380`` → ``("127.0.0.1:2379", "127.0.0.1:2380")``."""
    endpoints = []
    for url in url_list.split(","):
        host_port = url.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if host_port:
            endpoints.append(host_port)
    return tuple(endpoints)


def write_admin_credential(
    ca: CertificateAuthority, out_dir: Path, ttl_seconds: int
) -> CredentialPaths:
    """Issue the admin SVID afresh and write it with the bundle, atomically (SPEC §6)."""
    entry = ca.get_entry(f"spiffe://{ca.trust_domain}/dmc/admin")
    key = generate_private_key(KeyType.EC_P256)
    issued = ca.issue(key.public_key(), entry.spiffe_id, ca.entry_scope(entry), ttl_seconds)
    paths = CredentialPaths(out_dir / "admin.pem", out_dir / "admin.key", out_dir / "bundle.pem")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a crash between the two writes leaves an old certificate with a key
    # it does not match, which the next start replaces, never a certificate without a key.
    write_atomic(paths.key, key_pem, 0o600)
    write_atomic(paths.certificate, certificates_to_pem(list(issued.chain)), 0o644)
    write_atomic(paths.bundle, issued.bundle.to_pem(), 0o644)
    return paths


async def initialise(
    store: Store,
    kek: bytes,
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.EC_P256,
    ca_chain_pem: bytes | None = None,
    ca_key_pem: bytes | None = None,
    admin_ttl_seconds: int = DEFAULT_ADMIN_TTL_SECONDS,
) -> CertificateAuthority:
    """Create the first authority and the admin entry; refuse a trust domain that has one."""
    if store.view.authorities:
        raise FailedPrecondition(
            f"trust domain {trust_domain} is initialised already in this etcd"
        )
    now = datetime.now(UTC)
    # Every check on an imported CA runs inside new_authority, before anything is written.
    record, _signing = new_authority(
        trust_domain,
        kek,
        now,
        state=AuthorityState.ACTIVE,
        key_type=key_type,
        imported_chain_pem=ca_chain_pem,
        imported_key_pem=ca_key_pem,
    )
    # Each write returns once this replica's view shows it.
    await store.put_authority(record)
    await store.create_entry(admin_entry(trust_domain, admin_ttl_seconds, now))
    _log.info("initialised trust domain %s with authority %s", trust_domain, record.id)
    return CertificateAuthority(store, kek, trust_domain)


# Ctrl-C, a service manager's stop, and a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process: two `dev` runs on one folder would share etcd's."""
    with (data_dir / "dev.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(
                f"another dmc-ca dev is running on {data_dir}; stop it or give --data-dir"
            ) from None
        yield


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM, with the handlers held for the whole block.

    Installed before anything is started and kept until everything has stopped, so a
    signal during start-up or a second one during shutdown still lets `dev` stop its etcd.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _serve_until(
    server: CaServer, stop: asyncio.Event, on_ready: Callable[[CaServer], None]
) -> None:
    if stop.is_set():
        return
    await server.start()
    try:
        on_ready(server)
        await stop.wait()
    finally:
        await server.stop()


async def run_serve(settings: CaSettings, on_ready: Callable[[CaServer], None]) -> None:
    """Serve one replica until SIGINT or SIGTERM."""
    kek = load_kek(settings.kek_file)
    with _stop_on_signals() as stop:
        await _serve_replica(settings, kek, stop, on_ready)


async def _serve_replica(
    settings: CaSettings, kek: bytes, stop: asyncio.Event, on_ready: Callable[[CaServer], None]
) -> None:
    store = await Store.open(
        list(settings.etcd_endpoints), settings.etcd_prefix, settings.trust_domain
    )
    try:
        ca = CertificateAuthority(store, kek, settings.trust_domain)
        ca.signing_authority()
        server = CaServer(
            ca,
            store,
            settings.listen,
            settings.bootstrap_listen,
            settings.dns_names,
            settings.ip_sans,
        )
        await _serve_until(server, stop, on_ready)
    finally:
        await store.close()


@dataclass(frozen=True, slots=True)
class DevReady:
    """What `dmc-ca dev` prints once it serves."""

    server: CaServer
    credential: CredentialPaths
    etcd_endpoint: str
    first_run: bool


async def run_dev(
    data_dir: Path,
    trust_domain: str,
    listen: ListenAddress,
    bootstrap_listen: ListenAddress | None,
    on_ready: Callable[[DevReady], None],
    etcd_prefix: str = "/dmc/",
) -> None:
    """Run etcd under ``data_dir``, initialise on first run, write the admin credential, serve."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    with _data_dir_lock(data_dir), _stop_on_signals() as stop:
        kek_file = data_dir / "kek"
        if not kek_file.exists():
            generate_kek_file(kek_file)
        kek = load_kek(kek_file)
        etcd = EtcdProcess(data_dir / "etcd", log_path=data_dir / "etcd.log")
        etcd.start()
        try:
            store = await Store.open([etcd.endpoint], etcd_prefix, trust_domain)
            try:
                first_run = not store.view.authorities
                if first_run:
                    ca = await initialise(store, kek, trust_domain)
                else:
                    ca = CertificateAuthority(store, kek, trust_domain)
                credential = write_admin_credential(ca, data_dir, DEFAULT_ADMIN_TTL_SECONDS)
                server = CaServer(ca, store, listen, bootstrap_listen)

                def ready(started: CaServer) -> None:
                    on_ready(DevReady(started, credential, etcd.endpoint, first_run))

                await _serve_until(server, stop, ready)
            finally:
                await store.close()
        finally:
            etcd.stop()
