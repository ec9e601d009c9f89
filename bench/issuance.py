"""How fast dmc issues SVIDs: the in-process limit, and the CA's Renew rate over mTLS.

Run from the repository with its venv::

    .venv/bin/python bench/issuance.py                 # about 25 s
    .venv/bin/python bench/issuance.py --quick         # a few seconds, a smoke run
    .venv/bin/python bench/issuance.py --output json

Figures (see bench/README.md):

- in-process limit: `dmc_ca.csr.check_csr` plus `dmc_ca.profile.issue_svid` in a loop on
  one core, no network, as SVIDs per second;
- end-to-end: ``dmc-ca dev`` runs as a subprocess on 127.0.0.1; client processes each
  bootstrap an SVID of their own, then renew in a loop, each renewal on a new TLS
  connection presenting the certificate the previous renewal returned; renewals per
  second across all clients, with p50 and p99 latency;
- the ratio of the two, and the machine (core count, Python, cryptography, grpcio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import queue
import select
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dmc.scope import DelegationScope
from dmc.spiffe_id import SpiffeId
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.csr import check_csr
from dmc_ca.keys import KeyType
from dmc_ca.profile import SigningAuthority, create_authority, issue_svid

TRUST_DOMAIN = "example.org"
DEFAULT_SECONDS = 10.0
DEFAULT_CLIENTS = 3
QUICK_SECONDS = 1.0
QUICK_CLIENTS = 2
# Distinct keys a client cycles through; made before timing, so no key is generated then.
CSR_POOL = 32
WARMUP_RENEWALS = 2
RPC_TIMEOUT_SECONDS = 10.0
CA_START_TIMEOUT_SECONDS = 60.0
CLIENT_READY_TIMEOUT_SECONDS = 60.0
# The CA's own entry point, run with this interpreter so that it is this checkout's dmc.
_DEV_CA = "import sys; from dmc_ca.cli.ca import main; sys.exit(main())"
# A channel of its own subchannel pool never shares a connection with another channel, so
# every renewal opens a new TCP connection and does a full TLS handshake.
_NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InProcessResult:
    """CSR check plus SVID build and sign, in a loop on one core."""

    svids_per_second: float
    iterations: int
    seconds: float


@dataclass(frozen=True, slots=True)
class EndToEndResult:
    """Renewals over mTLS against a CA subprocess, a new TLS connection each."""

    renewals_per_second: float
    clients: int
    renewals: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ca_cpu_percent: float | None
    ca_cpu_ms_per_renewal: float | None
    first_error: str | None


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one run prints."""

    cpu_count: int | None
    load_average: float | None
    python: str
    cryptography: str
    grpcio: str
    in_process: InProcessResult
    end_to_end: EndToEndResult
    ratio: float


# -- in-process limit -----------------------------------------------------------------------


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> bytes:
    """A DER CSR with an empty subject and ``spiffe_id`` as its one URI SAN, as dmc makes."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def measure_in_process(seconds: float) -> InProcessResult:
    """Check a CSR and issue a full SVID in a loop for ``seconds``, after a warm-up."""
    now = datetime.now(UTC)
    certificate, key = create_authority(TRUST_DOMAIN, KeyType.EC_P256, timedelta(days=1), now)
    authority = SigningAuthority(private_key=key, certificate=certificate, chain=(certificate,))
    spiffe_id = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/bench/in-process")
    scope = DelegationScope(permissions=("*",), audiences=("*",), max_depth=2)
    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1()), spiffe_id) for _ in range(CSR_POOL)]

    def issue(number: int) -> None:
        public_key = check_csr(csrs[number % CSR_POOL], spiffe_id)
        issue_svid(authority, public_key, spiffe_id, scope, 3600, datetime.now(UTC))

    warmup_end = time.perf_counter() + min(0.5, seconds / 4)
    while time.perf_counter() < warmup_end:
        issue(0)

    iterations = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        issue(iterations)
        iterations += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return InProcessResult(iterations / elapsed, iterations, elapsed)


# -- the CA subprocess ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaEndpoints:
    """Where the dev CA listens, and the credentials it wrote."""

    address: str
    bootstrap_address: str
    bundle_pem: bytes
    admin_chain_pem: bytes
    admin_key_pem: bytes


class DevCa:
    """``dmc-ca dev`` as a subprocess on 127.0.0.1 ports the OS picks; `stop` ends it and etcd."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self._data_dir = data_dir
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> CaEndpoints:
        """Start the CA and read its addresses from the JSON it prints once it serves."""
        command = [
            sys.executable,
            "-c",
            _DEV_CA,
            "dev",
            "--data-dir",
            str(self._data_dir),
            "--listen",
            "127.0.0.1:0",
            "--output",
            "json",
        ]
        # A session of its own: Ctrl-C in the terminal reaches only this script, which
        # then stops the CA with one SIGTERM; a second signal could cut its shutdown short.
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, start_new_session=True
            )
        ready = self._read_ready()
        return CaEndpoints(
            address=ready["listen"],
            bootstrap_address=ready["bootstrap_listen"],
            bundle_pem=Path(ready["bundle"]).read_bytes(),
            admin_chain_pem=Path(ready["admin_cert"]).read_bytes(),
            admin_key_pem=Path(ready["admin_key"]).read_bytes(),
        )

    def _read_ready(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        decoder = json.JSONDecoder()
        text = ""
        deadline = time.monotonic() + CA_START_TIMEOUT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"dmc-ca dev did not report its addresses: {self._log_tail()}")
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                continue
            # os.read, not readline: a buffered reader would hide data from select.
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"dmc-ca dev exited: {self._log_tail()}")
            text += chunk.decode()
            with contextlib.suppress(json.JSONDecodeError):
                ready, _ = decoder.raw_decode(text.strip())
                if isinstance(ready, dict):
                    return ready

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the CA process so far (Linux ``/proc``), else None."""
        if self._process is None:
            return None
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # proc(5): utime and stime are fields 14 and 15, the 12th and 13th after the name.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM (the CA stops its etcd too, SPEC §6), SIGKILL if it lingers.

        A CA that dies before it has stopped its etcd (killed, or signalled while starting)
        leaves that etcd behind; the processes it started under our data folder are then
        stopped here, by their ids.
        """
        process, self._process = self._process, None
        if process is None:
            return
        children = self._children(process.pid)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        for pid in children:
            self._stop_leftover(pid)

    def _children(self, parent: int) -> list[int]:
        """Processes whose parent is ``parent`` and whose command names our data folder."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and self._is_ours(int(stat.parent.name)):
                children.append(int(stat.parent.name))
        return children

    def _is_ours(self, pid: int) -> bool:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self._data_dir).encode() in command

    def _stop_leftover(self, pid: int) -> None:
        for signum, wait_seconds in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self._is_ours(pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            deadline = time.monotonic() + wait_seconds
            while self._is_ours(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _log_tail(self) -> str:
        lines = self._log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) or "(no output)"


def _create_clients(ca: CaEndpoints, count: int) -> list[tuple[str, str]]:
    """Register ``count`` workloads through the Admin service; a join token for each."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.bundle_pem,
        private_key=ca.admin_key_pem,
        certificate_chain=ca.admin_chain_pem,
    )
    clients: list[tuple[str, str]] = []
    with grpc.secure_channel(ca.address, credentials) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for number in range(count):
            spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/client-{number}"
            admin.CreateEntry(
                admin_pb2.CreateEntryRequest(entry=admin_pb2.Entry(spiffe_id=spiffe_id)),
                timeout=RPC_TIMEOUT_SECONDS,
            )
            token = admin.CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600),
                timeout=RPC_TIMEOUT_SECONDS,
            ).token
            clients.append((spiffe_id, token))
    return clients


# -- client processes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientJob:
    """What one client process needs: the CA, its identity and token, how long to run."""

    number: int
    address: str
    bootstrap_address: str
    bundle_pem: bytes
    spiffe_id: str
    token: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ClientResult:
    """One client's renewals: latencies in seconds, its own elapsed time, failures."""

    number: int
    latencies: tuple[float, ...]
    seconds: float
    errors: int
    first_error: str | None


def _pem_chain(ders: Sequence[bytes]) -> bytes:
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders).encode()


def _call_on_new_connection(
    address: str, bundle_pem: bytes, chain_pem: bytes | None, key_pem: bytes | None
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    return grpc.secure_channel(address, credentials, options=_NEW_CONNECTION)


def _renew(job: ClientJob, chain_pem: bytes, key_pem: bytes, csr: bytes) -> bytes:
    """One Renew on a fresh TLS connection; the new chain as PEM."""
    channel = _call_on_new_connection(job.address, job.bundle_pem, chain_pem, key_pem)
    try:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=csr), timeout=RPC_TIMEOUT_SECONDS
        )
    finally:
        channel.close()
    return _pem_chain(response.certificate_chain)


def _client_main(job: ClientJob, events: Queue[tuple[Any, ...]], go: Event) -> None:
    """A client process: bootstrap, make the CSRs, say ready, renew until the time is up."""
    # The parent decides when to stop; Ctrl-C in the terminal must not kill us mid-report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        events.put(("done", _run_client(job, events, go)))
    except Exception as exc:
        events.put(("failed", job.number, f"{type(exc).__name__}: {exc}"))


def _run_client(job: ClientJob, events: Queue[tuple[Any, ...]], go: Event) -> ClientResult:
    spiffe_id = SpiffeId.parse(job.spiffe_id)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(CSR_POOL + 1)]
    key_pems = [
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys
    ]
    # SPEC §4: a Renew's CSR names the caller's own ID (or none).
    csrs = [make_csr(key, spiffe_id) for key in keys]

    channel = _call_on_new_connection(job.bootstrap_address, job.bundle_pem, None, None)
    try:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(join_token=job.token, csr=csrs[-1]),
            timeout=RPC_TIMEOUT_SECONDS,
        )
    finally:
        channel.close()
    chain_pem, key_pem = _pem_chain(response.certificate_chain), key_pems[-1]

    # Each renewal presents the certificate the previous one returned, as a workload does,
    # so the CA sees a new client certificate every time.
    for number in range(WARMUP_RENEWALS):
        chain_pem = _renew(job, chain_pem, key_pem, csrs[number % CSR_POOL])
        key_pem = key_pems[number % CSR_POOL]
    events.put(("ready", job.number))
    if not go.wait(CLIENT_READY_TIMEOUT_SECONDS):
        raise RuntimeError("no start signal from the parent")

    latencies: list[float] = []
    errors, first_error = 0, None
    number = WARMUP_RENEWALS
    start = time.perf_counter()
    deadline = start + job.seconds
    while time.perf_counter() < deadline:
        slot = number % CSR_POOL
        began = time.perf_counter()
        try:
            chain_pem = _renew(job, chain_pem, key_pem, csrs[slot])
        except grpc.RpcError as exc:
            errors += 1
            first_error = first_error or f"{exc.code().name}: {exc.details()}"
        else:
            latencies.append(time.perf_counter() - began)
            key_pem = key_pems[slot]
        number += 1
    elapsed = time.perf_counter() - start
    return ClientResult(job.number, tuple(latencies), elapsed, errors, first_error)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@contextlib.contextmanager
def _client_processes(jobs: Sequence[ClientJob]) -> Iterator[tuple[Queue[Any], Event]]:
    """Start one process per job; on leaving, end any that still run."""
    # spawn, not fork: the parent has gRPC threads, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    events: Queue[tuple[Any, ...]] = context.Queue()
    go = context.Event()
    processes = [
        context.Process(target=_client_main, args=(job, events, go), daemon=True) for job in jobs
    ]
    started = []
    try:
        for process in processes:
            process.start()
            started.append(process)
        yield events, go
    finally:
        # After a normal run every client has reported and is exiting; after a failure or
        # Ctrl-C they may still be renewing: end them either way.
        for client in started:
            if client.is_alive():
                client.terminate()
        for client in started:
            client.join(5)
        events.close()
        events.join_thread()


def measure_end_to_end(
    ca: DevCa, endpoints: CaEndpoints, clients: int, seconds: float
) -> EndToEndResult:
    """Renew over mTLS from ``clients`` processes for ``seconds``; rate and latencies."""
    identities = _create_clients(endpoints, clients)
    jobs = [
        ClientJob(
            number=number,
            address=endpoints.address,
            bootstrap_address=endpoints.bootstrap_address,
            bundle_pem=endpoints.bundle_pem,
            spiffe_id=spiffe_id,
            token=token,
            seconds=seconds,
        )
        for number, (spiffe_id, token) in enumerate(identities)
    ]

    results: list[ClientResult] = []
    with _client_processes(jobs) as (events, go):
        _wait_for(events, "ready", clients, CLIENT_READY_TIMEOUT_SECONDS)
        cpu_before, wall_before = ca.cpu_seconds(), time.perf_counter()
        go.set()
        for event in _wait_for(events, "done", clients, seconds + 4 * RPC_TIMEOUT_SECONDS):
            results.append(event[1])
        cpu_after, wall = ca.cpu_seconds(), time.perf_counter() - wall_before

    latencies = sorted(latency for result in results for latency in result.latencies)
    if not latencies:
        first = next((r.first_error for r in results if r.first_error), "no renewal finished")
        raise RuntimeError(f"every renewal failed: {first}")
    rate = sum(len(r.latencies) / r.seconds for r in results)
    ca_cpu = ca_cpu_per_renewal = None
    if cpu_before is not None and cpu_after is not None:
        ca_cpu = 100 * (cpu_after - cpu_before) / wall
        ca_cpu_per_renewal = 1000 * (cpu_after - cpu_before) / len(latencies)
    return EndToEndResult(
        renewals_per_second=rate,
        clients=clients,
        renewals=len(latencies),
        errors=sum(r.errors for r in results),
        seconds=max(r.seconds for r in results),
        p50_ms=1000 * percentile(latencies, 0.50),
        p99_ms=1000 * percentile(latencies, 0.99),
        ca_cpu_percent=ca_cpu,
        ca_cpu_ms_per_renewal=ca_cpu_per_renewal,
        first_error=next((r.first_error for r in results if r.first_error), None),
    )


def _wait_for(
    events: Queue[tuple[Any, ...]], kind: str, count: int, timeout_seconds: float
) -> list[tuple[Any, ...]]:
    """``count`` events of ``kind`` from the clients; a client's failure ends the wait."""
    received: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout_seconds
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"only {len(received)} of {count} clients reported {kind!r}")
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if event[0] == "failed":
            raise RuntimeError(f"client {event[1]} failed: {event[2]}")
        if event[0] == kind:
            received.append(event)
    return received


# -- the command ----------------------------------------------------------------------------


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(seconds: float, clients: int) -> Report:
    """Measure both figures on this machine."""
    # Other work on the machine takes cores from both figures; the report shows how much.
    load_average = _load_average()
    in_process = measure_in_process(seconds)

    with tempfile.TemporaryDirectory(prefix="dmc-bench-") as folder:
        ca = DevCa(Path(folder) / "ca", Path(folder) / "ca.log")
        try:
            endpoints = ca.start()
            end_to_end = measure_end_to_end(ca, endpoints, clients, seconds)
        finally:
            ca.stop()

    return Report(
        cpu_count=os.cpu_count(),
        load_average=load_average,
        python=platform.python_version(),
        cryptography=version("cryptography"),
        grpcio=version("grpcio"),
        in_process=in_process,
        end_to_end=end_to_end,
        ratio=end_to_end.renewals_per_second / in_process.svids_per_second,
    )


def format_report(report: Report) -> str:
    """The short human table."""
    inp, e2e = report.in_process, report.end_to_end
    load = "-" if report.load_average is None else f"{report.load_average:.2f}"
    cpu = "-"
    if e2e.ca_cpu_percent is not None and e2e.ca_cpu_ms_per_renewal is not None:
        cpu = (
            f"{e2e.ca_cpu_percent:.0f} % of one core, {e2e.ca_cpu_ms_per_renewal:.2f} ms per"
            f" renewal (in-process: {1000 / inp.svids_per_second:.2f} ms per SVID)"
        )
    rows = [
        (
            "machine",
            f"{report.cpu_count} cores, load average {load} at start, Python {report.python}",
        ),
        ("libraries", f"cryptography {report.cryptography}, grpcio {report.grpcio}"),
        (
            "in-process limit",
            f"{inp.svids_per_second:,.0f} SVIDs/s  (check_csr + issue_svid, one core,"
            f" {inp.iterations:,} in {inp.seconds:.1f} s)",
        ),
        (
            "end-to-end Renew",
            f"{e2e.renewals_per_second:,.0f} renewals/s  ({_client_processes_text(e2e.clients)},"
            f" new mTLS connection each, {e2e.renewals:,} in {e2e.seconds:.1f} s)",
        ),
        ("  latency", f"p50 {e2e.p50_ms:.1f} ms, p99 {e2e.p99_ms:.1f} ms"),
        ("  CA process CPU", cpu),
        ("  errors", f"{e2e.errors}" + (f" (first: {e2e.first_error})" if e2e.errors else "")),
        ("ratio", f"{report.ratio:.1%} of the in-process limit"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _client_processes_text(count: int) -> str:
    return f"{count} client process" + ("" if count == 1 else "es")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/issuance.py",
        description="Measure dmc's SVID issuance: in-process limit and Renew over mTLS.",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"length of each measurement (default {DEFAULT_SECONDS:g}, {QUICK_SECONDS:g}"
        " with --quick)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        help=f"client processes for Renew (default {DEFAULT_CLIENTS}, {QUICK_CLIENTS} with"
        " --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    return parser


# Set on Ctrl-C or SIGTERM. cryptography can swallow a KeyboardInterrupt raised while it
# runs (a CSR check then reports a bad signature); the flag tells such a failure apart.
_interrupted = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = args.seconds
    if seconds is None:
        seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    clients = args.clients
    if clients is None:
        clients = QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS
    if seconds <= 0 or clients <= 0:
        print("error: --seconds and --clients must be positive", file=sys.stderr)
        return 2
    # Read by grpc at import: reaches the CA and the client processes, which start later.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # SIGTERM unwinds like Ctrl-C, so the CA, its etcd and the clients are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)

    try:
        report = run(seconds, clients)
    except Exception as exc:
        if not _interrupted.is_set():
            if isinstance(exc, RuntimeError | grpc.RpcError):
                print(f"error: {exc}", file=sys.stderr)
                return 1
            raise
        print("interrupted; stopped the CA and the clients", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; stopped the CA and the clients", file=sys.stderr)
        return 130

    if args.output == "json":
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
