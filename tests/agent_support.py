"""Helpers for the agent's tests: a hand-driven identity source, and ``dmc agent`` processes.

`FakeSource` stands where the client library's identity source would, so a test decides
when a renewal or a bundle change happens; `AgentProcess` runs the real command against a
real CA. Never import the ``spiffe`` package here: its Workload API proto clashes with the
agent's (DEPENDENCIES.md); tests run it in a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ca_harness import CaHarness
from certgen import CertAndKey, make_leaf, make_root
from dmc.cli import main as dmc_main
from dmc.svid import Svid, parse_svid

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True)
class FakeIdentity:
    svid: Svid
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]


class FakeSource:
    """An identity source whose renewals and bundle changes the test makes happen."""

    def __init__(self, spiffe_id: str = "spiffe://example.org/web") -> None:
        self.spiffe_id = spiffe_id
        self.root = make_root("example.org")
        self._roots: tuple[CertAndKey, ...] = (self.root,)
        self._current = self._issue()
        self._subscribers: dict[object, Callable[..., None]] = {}
        self.closed = False

    def current(self) -> FakeIdentity:
        return self._current

    def subscribe(self, callback: Callable[..., None]) -> Callable[[], None]:
        token = object()
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def close(self) -> None:
        self.closed = True

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def renew(self) -> FakeIdentity:
        """A new leaf and key, announced from another thread as the real source does."""
        self._current = self._issue()
        self.notify()
        return self._current

    def add_root(self) -> FakeIdentity:
        """A bundle change: a second root joins the bundle; the SVID stays."""
        self._roots = (*self._roots, make_root("example.org", common_name="next"))
        current = self._current
        self._current = FakeIdentity(
            current.svid, current.chain, current.key, tuple(r.certificate for r in self._roots)
        )
        self.notify()
        return self._current

    def notify(self) -> None:
        """Call every subscriber from a thread of the source's own, and wait for it."""
        thread = threading.Thread(
            target=lambda: [
                callback(self._current) for callback in list(self._subscribers.values())
            ]
        )
        thread.start()
        thread.join()

    def _issue(self) -> FakeIdentity:
        leaf = make_leaf(self.root, uris=[self.spiffe_id])
        return FakeIdentity(
            parse_svid(leaf.certificate),
            (leaf.certificate,),
            leaf.key,
            tuple(r.certificate for r in self._roots),
        )


# -- real agents on a real CA ----------------------------------------------------------------


def bootstrap_workload(ca: CaHarness, out: Path, ttl_seconds: int = 0, name: str = "web") -> str:
    """Register a fresh ID under ``/NAME-<random>`` and bootstrap its SVID into ``out``."""
    spiffe_id = ca.create_entry(f"/{name}-{uuid.uuid4().hex[:8]}", ttl_seconds=ttl_seconds)
    token = ca.join_token(spiffe_id)
    bundle = out.parent / f"{out.name}-ca-bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    status = dmc_main(
        [
            "bootstrap",
            "--ca",
            ca.address,
            "--bootstrap-addr",
            ca.bootstrap_address,
            "--bundle",
            str(bundle),
            "--token",
            token,
            "--out",
            str(out),
        ]
    )
    assert status == 0, "dmc bootstrap failed"
    return spiffe_id


def can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class AgentProcess:
    """``dmc agent`` as a user runs it, with its log in a file."""

    def __init__(self, ca_address: str, credential_dir: Path, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = credential_dir.parent / f"agent-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(BIN / "dmc"),
                "agent",
                "--ca",
                ca_address,
                "--dir",
                str(credential_dir),
                "--socket",
                str(socket_path),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )

    def wait_serving(self, timeout: float = 15.0) -> AgentProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dmc agent exited {self.process.returncode}:\n{self.log()}")
            if "agent serving" in self.log() and can_connect(self.socket_path):
                return self
            time.sleep(0.05)
        raise AssertionError(f"dmc agent did not start serving:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to clean up, as in a crash."""
        self.process.kill()
        self.process.wait(10)
        self._log.close()

    def wait(self, timeout: float = 15.0) -> int:
        """The exit status of an agent that ends by itself."""
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode
