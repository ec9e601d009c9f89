"""The identity source: an X.509-SVID that stays valid on its own (SPEC §7).

An `IdentitySource` loads an SVID from a folder (`IdentitySource.from_directory`) or trades
a join token for one (`IdentitySource.bootstrap`), then keeps it current with two
background threads:

- the *renewer* asks the CA for a new certificate, with a new key each time, over mTLS
  with the current SVID, at about half the lifetime measured from issuance (``notBefore``
  + 30 s, SPEC §2), give or take 10 % jitter. A failed attempt is logged as one WARNING
  line with its reason and retried with exponential back-off (capped, jittered, and
  shortened as expiry nears so that a CA back before expiry is always tried again in
  time). The current SVID is never dropped while a retry is pending.
- the *bundle watcher* follows ``WatchTrustBundle`` on its own mTLS stream, reconnecting
  with back-off, so that trust bundle changes reach subscribers without a renewal. If the
  current SVID no longer verifies against a new bundle, a renewal is started at once.

Every change is persisted first, then made `current`, then announced to subscribers, in
that order and one change at a time. `close` stops both threads and joins them; a source
is also a context manager. Persistence: see `persist_identity`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dmc._issuance import csr_for, new_key, new_key_like, read_svid_response
from dmc.connect import (
    BUNDLE_FILE,
    bootstrap_address,
    ca_channel,
    check_bundle,
    load_bundle_file,
    load_credential_dir,
)
from dmc.errors import DmcError, InvalidArgument, Unavailable, error_for_status
from dmc.files import fsync_folder, write_atomic
from dmc.pem import certificates_to_pem, load_certificates, private_key_to_pem
from dmc.spiffe_id import SpiffeId
from dmc.svid import Svid, verify_chain
from dmc.v1 import ca_pb2, ca_pb2_grpc

__all__ = [
    "Identity",
    "IdentitySource",
    "RenewalPolicy",
    "load_identity",
    "persist_identity",
]

_log = logging.getLogger(__name__)

_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_FOLDER_MODE = 0o700
_UNKNOWN_SEQUENCE = -1
# A reader may catch the key and the chain from two sides of a swap; it reads again.
_LOAD_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Identity:
    """One consistent state of a source: an SVID, its key, and the trust bundle.

    The PEM forms are made once, as gRPC's credentials take them. ``bundle_sequence`` is
    the CA's bundle sequence number (SPEC §4), or -1 when the bundle came from a file.
    """

    svid: Svid
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes = field(repr=False)
    bundle: tuple[x509.Certificate, ...]
    bundle_sequence: int
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = field(repr=False)

    @classmethod
    def create(
        cls,
        svid: Svid,
        chain: Sequence[x509.Certificate],
        key: PrivateKeyTypes,
        bundle: Sequence[x509.Certificate],
        bundle_sequence: int = _UNKNOWN_SEQUENCE,
    ) -> Identity:
        """An identity for ``svid`` (the leaf of ``chain``), with the PEM forms filled in."""
        return cls(
            svid=svid,
            chain=tuple(chain),
            key=key,
            bundle=tuple(bundle),
            bundle_sequence=bundle_sequence,
            chain_pem=certificates_to_pem(chain),
            key_pem=private_key_to_pem(key),
            bundle_pem=certificates_to_pem(bundle),
        )

    @property
    def spiffe_id(self) -> SpiffeId:
        """The SPIFFE ID of the SVID."""
        return self.svid.spiffe_id

    def with_bundle(self, bundle: Sequence[x509.Certificate], sequence: int) -> Identity:
        """The same SVID and key with another trust bundle."""
        return replace(
            self,
            bundle=tuple(bundle),
            bundle_sequence=sequence,
            bundle_pem=certificates_to_pem(bundle),
        )


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """When to renew and how to retry.

    A renewal is due at ``renew_fraction`` of the lifetime after issuance, moved by up to
    ``jitter`` of that span either way. A failed attempt waits ``retry_initial_seconds``,
    doubling up to ``retry_max_seconds``, each wait jittered by ``jitter`` and never longer
    than half the time the SVID has left (but at least ``retry_min_seconds``), so that a
    CA back before expiry is tried again before expiry.
    """

    renew_fraction: float = 0.5
    jitter: float = 0.1
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    retry_min_seconds: float = 0.5
    call_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise InvalidArgument(f"renew_fraction {self.renew_fraction} is outside (0, 1)")
        if not 0 <= self.jitter < 1:
            raise InvalidArgument(f"jitter {self.jitter} is outside [0, 1)")
        if not 0 < self.retry_min_seconds <= self.retry_initial_seconds <= self.retry_max_seconds:
            raise InvalidArgument(
                "retry times must satisfy 0 < retry_min_seconds <= retry_initial_seconds "
                "<= retry_max_seconds"
            )

    def renewal_due(self, svid: Svid) -> float:
        """When to renew ``svid``, as a `time.time` value."""
        # SPEC §2: renewal times are measured from issuance, notBefore + 30 s.
        start = svid.issued_at.timestamp()
        lifetime = max(0.0, svid.not_after.timestamp() - start)
        offset = lifetime * self.renew_fraction
        return start + offset * self._jittered()

    def retry_delay(self, failures: int, seconds_left: float) -> float:
        """How long to wait after the ``failures``-th failure in a row."""
        delay = min(self.retry_max_seconds, math.ldexp(self.retry_initial_seconds, failures - 1))
        if seconds_left > 0:
            # Near expiry, try more often: a CA that comes back in time must be seen in time.
            delay = min(delay, max(self.retry_min_seconds, seconds_left / 2))
        return delay * self._jittered()

    def _jittered(self) -> float:
        # Jitter spreads the renewals of many workloads; it guards no secret.
        return random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311


Subscriber = Callable[[Identity], None]


class IdentitySource:
    """An SVID kept valid in the background; thread-safe.

    Build one with `from_directory` or `bootstrap`; call `close` (or use ``with``) to stop
    its threads. ``ca`` is the CA's mTLS address ``HOST:PORT``.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        ca: str,
        directory: str | os.PathLike[str],
        name: str = "svid",
        policy: RenewalPolicy | None = None,
    ) -> None:
        """Start keeping ``identity`` current; it is taken as already persisted."""
        self._ca = ca
        self._directory = Path(directory)
        self._name = name
        self._policy = policy or RenewalPolicy()
        self._lock = threading.Lock()  # guards the fields below
        self._publish_lock = threading.Lock()  # one change at a time, persisted in order
        self._current = identity
        self._subscribers: dict[object, Subscriber] = {}
        self._next_attempt = self._policy.renewal_due(identity.svid)
        self._channels: set[grpc.Channel] = set()
        self._closed = False
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads = [
            threading.Thread(target=self._renew_loop, name=f"dmc-renew {name}", daemon=True),
            threading.Thread(target=self._watch_loop, name=f"dmc-bundle {name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike[str],
        *,
        ca: str,
        name: str = "svid",
        policy: RenewalPolicy | None = None,
    ) -> Self:
        """Load ``NAME.pem``, ``NAME.key`` and ``bundle.pem`` from ``directory`` and renew them.

        Raises `InvalidPem`/`InvalidArgument` for files that cannot be read or do not
        belong together, and `Unauthenticated` for an SVID that has expired or does not
        verify against the bundle (such an SVID can never renew: bootstrap again).
        """
        identity = load_identity(directory, name)
        _log.info(
            "loaded SVID %s serial %x from %s, expires %s",
            identity.spiffe_id,
            identity.svid.serial,
            os.fspath(directory),
            identity.svid.not_after.isoformat(),
        )
        return cls(identity, ca=ca, directory=directory, name=name, policy=policy)

    @classmethod
    def bootstrap(
        cls,
        directory: str | os.PathLike[str],
        *,
        ca: str,
        bundle: bytes | str | os.PathLike[str],
        token: str,
        bootstrap_addr: str | None = None,
        name: str = "svid",
        key_type: str = "ec-p256",
        policy: RenewalPolicy | None = None,
    ) -> Self:
        """Trade ``token`` for a first SVID, persist it in ``directory``, and renew it.

        ``bundle`` is the CA's trust bundle: PEM bytes, or the path of a file. Bootstrap
        goes to ``bootstrap_addr``, by default the CA's port + 1 (SPEC §4). A refused call
        raises the `DmcError` of its status (e.g. `Unauthenticated` for a spent token).
        """
        roots = _read_roots(bundle)
        target = bootstrap_addr or bootstrap_address(ca)
        key = new_key(key_type)
        # The CA binds the SPIFFE ID from the token's entry; the CSR only proves the key.
        request = ca_pb2.BootstrapRequest(join_token=token, csr=csr_for(key, None))
        timeout = (policy or RenewalPolicy()).call_timeout_seconds

        with ca_channel(target, certificates_to_pem(roots)) as channel:
            try:
                response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
                    request, timeout=timeout
                )
            except grpc.RpcError as exc:
                raise _error_of(exc, f"bootstrap at {target}") from exc
        issued = read_svid_response(response, key, roots)

        identity = Identity.create(
            issued.svid, issued.chain, key, issued.bundle, response.bundle.sequence
        )
        persist_identity(directory, identity, name)
        _log.info(
            "bootstrapped SVID %s serial %x, expires %s",
            identity.spiffe_id,
            identity.svid.serial,
            identity.svid.not_after.isoformat(),
        )
        return cls(identity, ca=ca, directory=directory, name=name, policy=policy)

    # -- public interface -----------------------------------------------------------------

    @property
    def spiffe_id(self) -> SpiffeId:
        """The SPIFFE ID this source holds."""
        return self.current().spiffe_id

    def current(self) -> Identity:
        """The current SVID, key and bundle, as one consistent snapshot."""
        with self._lock:
            return self._current

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(identity)`` after every change; return a function that unsubscribes.

        Callbacks run on the source's threads, one change at a time and in order; one that
        raises is logged and does not stop the others. A callback may call `close`; it then
        returns without waiting for the source's threads, which end right after.
        """
        token = object()
        with self._lock:
            self._subscribers[token] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(token, None)

        return unsubscribe

    def renew_now(self) -> None:
        """Start a renewal at once instead of at the planned time."""
        with self._lock:
            self._next_attempt = time.time()
        self._wake.set()

    def close(self) -> None:
        """Stop renewing and watching; wait for both threads to end. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            channels = list(self._channels)
        # Closing a channel cancels its calls: a Renew in flight or the bundle stream.
        for channel in channels:
            channel.close()
        self._wake.set()
        # From one of the source's own threads (a subscriber callback), waiting for the
        # other could deadlock: that thread may be waiting for the publication this one is
        # in. Both are told to stop and end by themselves once the callback returns.
        if threading.current_thread() not in self._threads:
            for thread in self._threads:
                thread.join()
        self._subscribers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- changes --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _channel_to_ca(self, identity: Identity) -> Iterator[grpc.Channel]:
        """An mTLS channel to the CA as ``identity``, which `close` closes if still open."""
        channel = ca_channel(self._ca, identity.bundle_pem, identity.chain_pem, identity.key_pem)
        with self._lock:
            if self._closed:
                channel.close()
                raise Unavailable("the identity source is closed")
            self._channels.add(channel)
        try:
            yield channel
        finally:
            with self._lock:
                self._channels.discard(channel)
            channel.close()

    def _publish(self, update: Callable[[Identity], Identity | None], what: str) -> bool:
        """Apply ``update`` to the current identity: persist, install, notify. True if changed.

        Updates run one at a time, so files, `current` and subscribers all see the same order.
        """
        with self._publish_lock:
            candidate = update(self.current())
            if candidate is None:
                return False
            try:
                persist_identity(self._directory, candidate, self._name, what=what)
            except OSError as exc:
                # The new state is valid; failing to write it must not keep it from use.
                _log.warning(
                    "could not persist the %s of %s in %s: %s; using it from memory",
                    what,
                    candidate.spiffe_id,
                    os.fspath(self._directory),
                    exc,
                )
            with self._lock:
                self._current = candidate
                subscribers = list(self._subscribers.values())
            for callback in subscribers:
                try:
                    callback(candidate)
                except Exception:
                    _log.exception("an identity subscriber failed")
        return True

    # -- renewal --------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._lock:
                wait = self._next_attempt - time.time()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue

            try:
                renewed = self._renew_once()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                failures += 1
                self._after_failure(failures, exc)
                continue
            failures = 0
            self._after_renewal(renewed)

    def _renew_once(self) -> Identity:
        current = self.current()
        key = new_key_like(current.key)
        request = ca_pb2.RenewRequest(csr=csr_for(key, current.spiffe_id))

        with self._channel_to_ca(current) as channel:
            response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
                request, timeout=self._policy.call_timeout_seconds
            )
        issued = read_svid_response(response, key, current.bundle, current.spiffe_id)
        renewed = Identity.create(
            issued.svid, issued.chain, key, issued.bundle, response.bundle.sequence
        )

        def install(latest: Identity) -> Identity:
            # A bundle the watcher installed meanwhile may be newer than the CA's answer.
            if latest.bundle_sequence > renewed.bundle_sequence:
                return renewed.with_bundle(latest.bundle, latest.bundle_sequence)
            return renewed

        self._publish(install, "renewed SVID")
        return renewed

    def _after_renewal(self, renewed: Identity) -> None:
        svid = renewed.svid
        _log.info(
            "renewed SVID %s serial %x, expires %s",
            svid.spiffe_id,
            svid.serial,
            svid.not_after.isoformat(),
        )
        due = self._policy.renewal_due(svid)
        scope_end = svid.scope.not_after
        if scope_end is not None and svid.not_after >= scope_end:
            # SPEC §3: renewals of a delegated SVID stop at the delegation's notAfter.
            _log.info(
                "SVID %s reaches the end of its delegation at %s; no further renewal",
                svid.spiffe_id,
                scope_end.isoformat(),
            )
            due = math.inf
        with self._lock:
            self._next_attempt = due

    def _after_failure(self, failures: int, exc: Exception) -> None:
        svid = self.current().svid
        seconds_left = svid.not_after.timestamp() - time.time()
        delay = self._policy.retry_delay(failures, seconds_left)
        validity = (
            f"the current SVID expires in {seconds_left:.0f} s"
            if seconds_left > 0
            else f"the current SVID expired at {svid.not_after.isoformat()}"
        )
        _log.warning(
            "renewal of %s failed (attempt %d): %s; %s; retrying in %.1f s",
            svid.spiffe_id,
            failures,
            _describe(exc),
            validity,
            delay,
        )
        with self._lock:
            self._next_attempt = time.time() + delay

    # -- trust bundle ---------------------------------------------------------------------

    def _watch_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            current = self.current()
            try:
                with self._channel_to_ca(current) as channel:
                    stream = ca_pb2_grpc.CertificateAuthorityStub(channel).WatchTrustBundle(
                        ca_pb2.WatchTrustBundleRequest()
                    )
                    for message in stream:
                        failures = 0
                        self._take_bundle(message)
                reason = "the CA ended the stream"
            except Exception as exc:
                reason = _describe(exc)
            if self._stopping.is_set():
                return

            failures += 1
            delay = self._policy.retry_delay(failures, seconds_left=0)
            _log.warning(
                "trust bundle watch for %s stopped (attempt %d): %s; reconnecting in %.1f s",
                current.spiffe_id,
                failures,
                reason,
                delay,
            )
            self._stopping.wait(delay)

    def _take_bundle(self, message: ca_pb2.TrustBundle) -> None:
        bundle = tuple(
            x509.load_der_x509_certificate(authority.certificate)
            for authority in message.authorities
        )
        if not bundle:
            raise InvalidArgument("the CA sent a trust bundle without any authority")

        def install(latest: Identity) -> Identity | None:
            if message.sequence < latest.bundle_sequence or _same(bundle, latest.bundle):
                return None
            return latest.with_bundle(bundle, message.sequence)

        if not self._publish(install, "trust bundle"):
            return
        _log.info(
            "trust bundle for %s changed: sequence %d, %d authorities",
            self.current().spiffe_id,
            message.sequence,
            len(bundle),
        )
        try:
            verify_chain(self.current().chain, bundle, datetime.now(UTC))
        except DmcError as exc:
            _log.warning(
                "the SVID no longer verifies against the new trust bundle (%s); renewing now",
                exc,
            )
            self.renew_now()


# -- persistence ----------------------------------------------------------------------------


def persist_identity(
    directory: str | os.PathLike[str],
    identity: Identity,
    name: str = "svid",
    *,
    what: str = "SVID",
) -> None:
    """Write ``identity`` to ``directory`` so that a crash never leaves a torn or unmatched pair.

    ``NAME.key`` (mode 0600) and ``NAME.pem`` (the chain, leaf first) are symbolic links
    into ``.NAME.data``, itself a link to a folder ``.NAME.<random>`` that holds the two
    files. A new SVID is written into a fresh folder (key first, then chain, each synced),
    and one atomic rename of the ``.NAME.data`` link switches both files at once, as
    Kubernetes' atomic writer does and Envoy's watched directories expect. ``bundle.pem``
    is then replaced on its own with `write_atomic`. A folder holding plain files (as
    ``dmc bootstrap`` writes them) is converted without a moment in which key and chain
    disagree. ``what`` says what changed, for the DEBUG log.
    """
    folder = Path(directory)
    folder.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
    data_link = folder / f".{name}.data"
    current_target = _readlink(data_link)
    current_files = (
        _read_pair(folder / current_target, name) if current_target is not None else None
    )

    if not _links_in_place(folder, name):
        _adopt_plain_files(folder, name)
        current_files = None
    if current_files != (identity.key_pem, identity.chain_pem):
        _switch_pair(folder, name, identity.key_pem, identity.chain_pem)
    if _read_or_none(folder / BUNDLE_FILE) != identity.bundle_pem:
        write_atomic(folder / BUNDLE_FILE, identity.bundle_pem, _PUBLIC_MODE)
    _remove_stale_folders(folder, name)
    _log.debug("persisted %s of %s in %s", what, identity.spiffe_id, os.fspath(folder))


def load_identity(directory: str | os.PathLike[str], name: str = "svid") -> Identity:
    """Read and verify the identity persisted in ``directory`` (see `persist_identity`)."""
    for attempt in range(_LOAD_ATTEMPTS):
        try:
            credential = load_credential_dir(directory, name)
            break
        except InvalidArgument:
            # Key and chain read from two sides of a swap; the next read sees one side.
            if attempt == _LOAD_ATTEMPTS - 1:
                raise
    svid = verify_chain(credential.chain, credential.bundle, datetime.now(UTC))
    return Identity.create(svid, credential.chain, credential.key, credential.bundle)


def _switch_pair(folder: Path, name: str, key_pem: bytes, chain_pem: bytes) -> None:
    version = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    write_atomic(version / f"{name}.key", key_pem, _KEY_MODE)
    write_atomic(version / f"{name}.pem", chain_pem, _PUBLIC_MODE)
    _replace_link(folder / f".{name}.data", version.name)


def _links_in_place(folder: Path, name: str) -> bool:
    return (
        all(
            _readlink(folder / f"{name}.{suffix}") == f".{name}.data/{name}.{suffix}"
            for suffix in ("key", "pem")
        )
        and _readlink(folder / f".{name}.data") is not None
    )


def _adopt_plain_files(folder: Path, name: str) -> None:
    """Turn plain ``NAME.key``/``NAME.pem`` into links, with the same content throughout."""
    key = _read_or_none(folder / f"{name}.key")
    chain = _read_or_none(folder / f"{name}.pem")
    if key is not None and chain is not None:
        # The links first point at a copy of what readers see now, so they see no change.
        _switch_pair(folder, name, key, chain)
    elif _readlink(folder / f".{name}.data") is None:
        # Nothing whole to keep: an empty folder, which the next switch replaces.
        version = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
        _replace_link(folder / f".{name}.data", version.name)
    for suffix in ("key", "pem"):
        link, target = folder / f"{name}.{suffix}", f".{name}.data/{name}.{suffix}"
        if _readlink(link) != target:
            _replace_link(link, target)


def _replace_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` with one rename, then sync the folder."""
    # A dot-name starting like the version folders, so a crash's leftover is cleaned up.
    hidden = link.name if link.name.startswith(".") else f".{link.name}"
    temporary = link.with_name(f"{hidden}.{os.urandom(6).hex()}.tmp")
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_folder(link.parent)


def _remove_stale_folders(folder: Path, name: str) -> None:
    """Remove version folders and link temporaries that no link points at any more."""
    current = _readlink(folder / f".{name}.data")
    prefix = f".{name}."
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix) or entry.name == current:
            continue
        if entry.is_symlink() and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_pair(version: Path, name: str) -> tuple[bytes, bytes] | None:
    key = _read_or_none(version / f"{name}.key")
    chain = _read_or_none(version / f"{name}.pem")
    return (key, chain) if key is not None and chain is not None else None


# -- helpers --------------------------------------------------------------------------------


def _read_roots(bundle: bytes | str | os.PathLike[str]) -> list[x509.Certificate]:
    if not isinstance(bundle, bytes):
        return load_bundle_file(bundle)
    return check_bundle(load_certificates(bundle, "the trust bundle"), "the trust bundle")


def _same(a: Sequence[x509.Certificate], b: Sequence[x509.Certificate]) -> bool:
    encoding = serialization.Encoding.DER
    return {c.public_bytes(encoding) for c in a} == {c.public_bytes(encoding) for c in b}


def _error_of(exc: grpc.RpcError, what: str) -> DmcError:
    code = exc.code()
    return error_for_status(code, f"{what}: {code.name}: {exc.details()}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, DmcError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
