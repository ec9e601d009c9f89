"""What dmc's authorizing server interceptor costs on unary calls over mTLS.

Run from the repository with its venv::

    .venv/bin/python bench/interceptors.py                 # about 35 s
    .venv/bin/python bench/interceptors.py --quick         # about 10 s, a smoke run
    .venv/bin/python bench/interceptors.py --output json

``dmc-ca dev`` runs as a subprocess on 127.0.0.1 (see ``issuance.py``'s `DevCa`). The
script registers a server (DNS name ``bench-server.example.org``) and a client whose scope
permits exactly ``/bench.Echo/Unary`` with the server as its one audience, and bootstraps
an identity source for each. Three set-ups then serve the same method with the same
certificates, in this process, each on its own port:

- **plain**: ``grpc.server`` with ``grpc.ssl_server_credentials`` (client certificates
  required) and no interceptor, called through ``grpc.secure_channel`` with the client's
  SVID: the baseline;
- **interceptor**: the same server and channel, plus ``dmc.authz.AuthorizingInterceptor``
  following the CA's revocations (``RevocationFollower``);
- **dmc**: the whole library: ``dmc.server_credentials(source)`` and the interceptor on the
  server, ``dmc.secure_channel(target, source)`` on the client.

Client threads call for ``--seconds`` per round, the set-ups taking turns for ``--rounds``
rounds so that drift in the machine's load spreads over all of them. Reported per set-up:
calls/s, p50 and p99 latency (nearest rank), this process's CPU time per call (client and
server together), errors; and each rate ÷ the plain rate (target ≥ 0.85). Client and
servers share this process and its GIL, as a service calling its neighbours would. On a
loaded machine the rates swing by ±10 % from round to round; the CPU time per call is the
steadier figure of what the interceptor adds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import grpc
from issuance import CaEndpoints, DevCa, percentile

from dmc.authz import AuthorizingInterceptor
from dmc.channel import secure_channel
from dmc.credentials import server_credentials
from dmc.revocations_follower import RevocationFollower
from dmc.source import IdentitySource
from dmc.v1 import admin_pb2, admin_pb2_grpc

TRUST_DOMAIN = "example.org"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/bench/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/bench/client"
SERVER_DNS = "bench-server.example.org"
METHOD = "/bench.Echo/Unary"
PAYLOAD = b"x" * 64
DEFAULT_SECONDS = 2.0
DEFAULT_ROUNDS = 5
QUICK_SECONDS = 0.5
QUICK_ROUNDS = 1
DEFAULT_THREADS = 4
WARMUP_CALLS = 50
SERVER_WORKERS = 8
RPC_TIMEOUT_SECONDS = 10.0
TARGET_RATIO = 0.85
SETUPS = ("plain", "interceptor", "dmc")


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetupResult:
    """One set-up over all its rounds."""

    name: str
    calls: int
    seconds: float
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_call: float
    errors: int
    first_error: str | None
    ratio_to_plain: float


@dataclass(frozen=True, slots=True)
class Report:
    cpus: int | None
    load_average_1m: float | None
    python: str
    grpcio: str
    client_threads: int
    seconds_per_round: float
    rounds: int
    setups: tuple[SetupResult, ...]
    target_ratio: float


# -- the service ----------------------------------------------------------------------------


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(_echo)}
    )


@contextmanager
def _server(
    credentials: grpc.ServerCredentials, interceptors: Sequence[grpc.ServerInterceptor]
) -> Iterator[str]:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=SERVER_WORKERS),
        interceptors=list(interceptors),
        handlers=[_handler()],
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


# -- identities -----------------------------------------------------------------------------


def _register(ca: CaEndpoints) -> dict[str, str]:
    """Entries for the server and the client through the Admin service; a token for each."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.bundle_pem,
        private_key=ca.admin_key_pem,
        certificate_chain=ca.admin_chain_pem,
    )
    entries = {
        SERVER_ID: admin_pb2.Entry(spiffe_id=SERVER_ID, dns_names=[SERVER_DNS]),
        CLIENT_ID: admin_pb2.Entry(
            spiffe_id=CLIENT_ID, permissions=[METHOD], audiences=[SERVER_ID]
        ),
    }
    tokens = {}
    with grpc.secure_channel(ca.address, credentials) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for spiffe_id, entry in entries.items():
            admin.CreateEntry(
                admin_pb2.CreateEntryRequest(entry=entry), timeout=RPC_TIMEOUT_SECONDS
            )
            tokens[spiffe_id] = admin.CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600),
                timeout=RPC_TIMEOUT_SECONDS,
            ).token
    return tokens


def _bootstrap(ca: CaEndpoints, token: str, directory: Path) -> IdentitySource:
    return IdentitySource.bootstrap(
        directory,
        ca=ca.address,
        bundle=ca.bundle_pem,
        token=token,
        bootstrap_addr=ca.bootstrap_address,
    )


# -- measuring ------------------------------------------------------------------------------


@dataclass
class _Tally:
    latencies: list[float]
    cpu_seconds: float = 0.0
    errors: int = 0
    first_error: str | None = None


def _measure(call: Callable[[bytes], bytes], threads: int, seconds: float, tally: _Tally) -> float:
    """Call from ``threads`` threads for ``seconds``; add to ``tally``; return the time."""
    start = threading.Barrier(threads + 1)
    lock = threading.Lock()

    def work() -> None:
        local: list[float] = []
        errors = 0
        first: str | None = None
        start.wait()
        deadline = time.perf_counter() + seconds
        while (now := time.perf_counter()) < deadline:
            try:
                call(PAYLOAD)
            except grpc.RpcError as exc:
                errors += 1
                first = first or str(exc)
                continue
            local.append(time.perf_counter() - now)
        with lock:
            tally.latencies.extend(local)
            tally.errors += errors
            tally.first_error = tally.first_error or first

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began, cpu_began = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.join()
    tally.cpu_seconds += time.process_time() - cpu_began
    return time.perf_counter() - began


def run(seconds: float, rounds: int, threads: int) -> Report:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dmc-bench-")))
        dev_ca = DevCa(folder / "ca", folder / "ca.log")
        stack.callback(dev_ca.stop)
        ca = dev_ca.start()

        tokens = _register(ca)
        server_source = stack.enter_context(_bootstrap(ca, tokens[SERVER_ID], folder / "server"))
        client_source = stack.enter_context(_bootstrap(ca, tokens[CLIENT_ID], folder / "client"))
        server_identity = server_source.current()
        client_identity = client_source.current()

        ca_channel = stack.enter_context(secure_channel(ca.address, server_source))
        follower = stack.enter_context(RevocationFollower(ca_channel))

        def interceptor() -> AuthorizingInterceptor:
            return AuthorizingInterceptor.from_source(server_source, revocations=follower)

        plain_credentials = grpc.ssl_server_credentials(
            [(server_identity.key_pem, server_identity.chain_pem)],
            root_certificates=server_identity.bundle_pem,
            require_client_auth=True,
        )
        addresses = {
            "plain": stack.enter_context(_server(plain_credentials, [])),
            "interceptor": stack.enter_context(_server(plain_credentials, [interceptor()])),
            "dmc": stack.enter_context(
                _server(server_credentials(server_source), [interceptor()])
            ),
        }

        name_override = [("grpc.ssl_target_name_override", SERVER_DNS)]
        client_credentials = grpc.ssl_channel_credentials(
            root_certificates=client_identity.bundle_pem,
            private_key=client_identity.key_pem,
            certificate_chain=client_identity.chain_pem,
        )
        channels: dict[str, grpc.Channel] = {
            name: stack.enter_context(
                grpc.secure_channel(addresses[name], client_credentials, options=name_override)
            )
            for name in ("plain", "interceptor")
        }
        channels["dmc"] = stack.enter_context(
            secure_channel(addresses["dmc"], client_source, server_name=SERVER_DNS)
        )
        calls = {name: channel.unary_unary(METHOD) for name, channel in channels.items()}

        for call in calls.values():
            for _ in range(WARMUP_CALLS):
                call(PAYLOAD, timeout=RPC_TIMEOUT_SECONDS)

        tallies = {name: _Tally([]) for name in SETUPS}
        elapsed = dict.fromkeys(SETUPS, 0.0)
        for _ in range(rounds):
            for name in SETUPS:
                call = calls[name]
                elapsed[name] += _measure(
                    lambda p, c=call: c(p, timeout=RPC_TIMEOUT_SECONDS),
                    threads,
                    seconds,
                    tallies[name],
                )

    plain_rate = len(tallies["plain"].latencies) / elapsed["plain"]
    results = []
    for name in SETUPS:
        tally = tallies[name]
        ordered = sorted(tally.latencies)
        rate = len(ordered) / elapsed[name]
        results.append(
            SetupResult(
                name=name,
                calls=len(ordered),
                seconds=round(elapsed[name], 3),
                calls_per_second=round(rate, 1),
                p50_ms=round(percentile(ordered, 0.50) * 1000, 3),
                p99_ms=round(percentile(ordered, 0.99) * 1000, 3),
                cpu_us_per_call=round(tally.cpu_seconds / max(len(ordered), 1) * 1e6, 1),
                errors=tally.errors,
                first_error=tally.first_error,
                ratio_to_plain=round(rate / plain_rate, 3) if plain_rate else math.nan,
            )
        )
    return Report(
        cpus=os.cpu_count(),
        load_average_1m=load,
        python=platform.python_version(),
        grpcio=version("grpcio"),
        client_threads=threads,
        seconds_per_round=seconds,
        rounds=rounds,
        setups=tuple(results),
        target_ratio=TARGET_RATIO,
    )


def format_report(report: Report) -> str:
    lines = [
        f"machine: {report.cpus} CPUs, load {report.load_average_1m}, "
        f"Python {report.python}, grpcio {report.grpcio}",
        f"unary {METHOD}, {len(PAYLOAD)}-byte payload, {report.client_threads} client "
        f"threads, {report.rounds} x {report.seconds_per_round:g} s per set-up",
        "",
        f"{'set-up':<12} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/call':>12} "
        f"{'errors':>7} {'÷ plain':>8}",
    ]
    for result in report.setups:
        lines.append(
            f"{result.name:<12} {result.calls_per_second:>9.1f} {result.p50_ms:>8.3f} "
            f"{result.p99_ms:>8.3f} {result.cpu_us_per_call:>12.1f} {result.errors:>7} "
            f"{result.ratio_to_plain:>8.3f}"
        )
    for result in report.setups:
        if result.first_error:
            lines.append(f"first error ({result.name}): {result.first_error}")
    lines.append(f"target: every ratio >= {report.target_ratio}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, help=f"per round (default {DEFAULT_SECONDS})")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="client threads")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if seconds <= 0 or rounds <= 0 or args.threads <= 0:
        print("error: --seconds, --rounds and --threads must be positive", file=sys.stderr)
        return 2
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    try:
        report = run(seconds, rounds, args.threads)
    except (RuntimeError, grpc.RpcError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopped the CA and the servers", file=sys.stderr)
        return 130

    if args.output == "json":
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
