"""Two real Envoys take their mTLS identities from two ``dmc agent`` processes over SDS.

client --HTTP--> Envoy A --mTLS--> Envoy B --HTTP--> upstream

Envoy A presents workload A's SVID and accepts only B's SPIFFE ID; Envoy B requires a
client certificate and accepts only A's ID (``match_typed_subject_alt_names``, URI SAN).
Both fetch ``default`` and ``ROOTCA`` from their agent's socket. The SVIDs live a few
seconds, so the agents renew during the test: Envoy's admin ``/certs`` shows the new
serial with the same Envoy process, and requests keep passing (SPEC §8).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent_support import BIN, AgentProcess, bootstrap_workload
from ca_harness import CaHarness

ENVOY = BIN / "envoy"
# Short enough that each agent renews within the test (at about half of it).
SVID_TTL_SECONDS = 6
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _envoy_runs() -> str | None:
    """Why Envoy cannot run here, or None if it can."""
    try:
        result = subprocess.run(
            [str(ENVOY), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{ENVOY} cannot run here: {exc}"
    if result.returncode != 0:
        return f"{ENVOY} --version exited {result.returncode}: {result.stderr.strip()[:200]}"
    return None


pytestmark = pytest.mark.skipif(
    (reason := _envoy_runs()) is not None, reason=reason or "envoy runs"
)


# -- the upstream ------------------------------------------------------------------------------


class _EchoHeaders(BaseHTTPRequestHandler):
    """Answers every GET with the request's headers as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- Envoy configuration ---------------------------------------------------------------------

_SDS = {
    "resource_api_version": "V3",
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds"}}],
    },
}


def _common_tls(peer_id: str) -> dict[str, Any]:
    """Our SVID and the trust bundle from SDS; the peer must present ``peer_id``."""
    return {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": _SDS}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer_id}}
                ]
            },
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": _SDS},
        },
    }


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(
    name: str, port: int, transport_socket: dict[str, Any] | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _sds_cluster(socket_path: Path) -> dict[str, Any]:
    return {
        "name": "sds",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "sds",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}
            ],
        },
    }


def _http_listener(routes: list[dict[str, Any]], **manager: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router."
                        "v3.Router"
                    },
                }
            ],
            **manager,
        },
    }


def _bootstrap(node: str, listener: dict[str, Any], clusters: list[dict[str, Any]]) -> Any:
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": _address(0)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def front_envoy_config(socket_path: Path, back_port: int, back_id: str) -> Any:
    """Envoy A: plain HTTP in, mTLS out to Envoy B, which must be ``back_id``."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": _common_tls(back_id),
        },
    }
    wrong_tls = json.loads(json.dumps(tls))
    wrong_tls["typed_config"]["common_tls_context"] = _common_tls(back_id + "-impostor")
    routes = [
        {"match": {"prefix": "/wrong-id"}, "route": {"cluster": "back_wrong_id"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "back"}},
    ]
    listener = {
        "name": "ingress",
        "address": _address(0),
        "filter_chains": [{"filters": [_http_listener(routes)]}],
    }
    clusters = [
        _sds_cluster(socket_path),
        _cluster("back", back_port, tls),
        _cluster("back_wrong_id", back_port, wrong_tls),
    ]
    return _bootstrap("envoy-a", listener, clusters)


def back_envoy_config(socket_path: Path, upstream_port: int, front_id: str) -> Any:
    """Envoy B: mTLS in (client must be ``front_id``), plain HTTP to the upstream."""
    listener = {
        "name": "ingress",
        "address": _address(0),
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls."
                        "v3.DownstreamTlsContext",
                        "common_tls_context": _common_tls(front_id),
                        "require_client_certificate": True,
                    },
                },
                "filters": [
                    _http_listener(
                        [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                        # The upstream sees who called through B: the client's URI SAN.
                        forward_client_cert_details="SANITIZE_SET",
                        set_current_client_cert_details={"uri": True},
                    )
                ],
            }
        ],
    }
    return _bootstrap(
        "envoy-b", listener, [_sds_cluster(socket_path), _cluster("upstream", upstream_port)]
    )


# -- Envoy processes -------------------------------------------------------------------------


class Envoy:
    """An Envoy process with admin and listener on 127.0.0.1, on ports the OS chose."""

    def __init__(self, name: str, config: Any, folder: Path) -> None:
        self.name = name
        config_path = folder / f"{name}.json"
        config_path.write_text(json.dumps(config))
        self._admin_path = folder / f"{name}.admin"
        self.log_path = folder / f"{name}.log"
        self.process = subprocess.Popen(
            [
                str(ENVOY),
                "--config-path",
                str(config_path),
                "--admin-address-path",
                str(self._admin_path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
                "--log-path",
                str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.admin = ""

    def wait_ready(self, timeout: float = 20.0) -> Envoy:
        """Wait until the admin endpoint says LIVE: the SDS secrets have arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if not self.admin and self._admin_path.exists():
                self.admin = self._admin_path.read_text().strip()
            if self.admin and self._get("/ready") == (200, "LIVE\n"):
                return self
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout} s:\n{self.log()}")

    @property
    def listener_port(self) -> int:
        status, body = self._get("/listeners?format=json")
        assert status == 200, body
        (listener,) = json.loads(body)["listener_statuses"]
        return int(listener["local_address"]["socket_address"]["port_value"])

    def certificate_serials(self) -> set[int]:
        """Serials of the leaf certificates Envoy holds now, from admin ``/certs``."""
        status, body = self._get("/certs")
        assert status == 200, body
        return {
            int(chain[0]["serial_number"], 16)
            for context in json.loads(body)["certificates"]
            if (chain := context.get("cert_chain"))
        }

    def stat(self, name: str) -> int:
        """One counter from the admin ``/stats`` endpoint."""
        status, body = self._get(f"/stats?filter=^{name}$&format=json")
        assert status == 200, body
        (entry,) = json.loads(body)["stats"]
        return int(entry["value"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.process.returncode}:\n{self.log()}")

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with _NO_PROXY.open(f"http://{self.admin}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)


def get(url: str) -> tuple[int, str]:
    try:
        with _NO_PROXY.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def pushed_serials(agent: AgentProcess, node: str) -> set[int]:
    """The SVID serials the agent's log says it pushed to Envoy ``node`` over SDS."""
    pushes = re.findall(
        rf"SDS push to {node}/{node}: default .*, serial ([0-9a-f]+) ", agent.log()
    )
    return {int(serial, 16) for serial in pushes}


@pytest.fixture
def mesh(ca: CaHarness, upstream: int, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two workloads, their agents, and Envoy B then Envoy A, all started and ready."""
    started: list[AgentProcess | Envoy] = []
    try:
        front_dir, back_dir = tmp_path / "front", tmp_path / "back"
        front_id = bootstrap_workload(ca, front_dir, SVID_TTL_SECONDS, name="front")
        back_id = bootstrap_workload(ca, back_dir, SVID_TTL_SECONDS, name="back")
        front_agent = AgentProcess(ca.address, front_dir, tmp_path / "run-a" / "agent.sock")
        started.append(front_agent)
        back_agent = AgentProcess(ca.address, back_dir, tmp_path / "run-b" / "agent.sock")
        started.append(back_agent)
        front_agent.wait_serving()
        back_agent.wait_serving()

        back = Envoy(
            "envoy-b", back_envoy_config(back_agent.socket_path, upstream, front_id), tmp_path
        )
        started.append(back)
        back.wait_ready()
        front = Envoy(
            "envoy-a",
            front_envoy_config(front_agent.socket_path, back.listener_port, back_id),
            tmp_path,
        )
        started.append(front)
        front.wait_ready()
        yield {
            "front": front,
            "back": back,
            "front_id": front_id,
            "back_id": back_id,
            "front_dir": front_dir,
            "back_dir": back_dir,
            "front_agent": front_agent,
            "back_agent": back_agent,
            "url": f"http://127.0.0.1:{front.listener_port}/hello",
        }
    finally:
        for process in reversed(started):
            process.stop()


def test_request_crosses_two_envoys_over_mtls_with_spiffe_ids(mesh: dict[str, Any]) -> None:
    status, body = get(mesh["url"])

    assert status == 200, body
    # Envoy B tells the upstream whom it accepted: workload A's SPIFFE ID, from A's SVID.
    assert f"URI={mesh['front_id']}" in json.loads(body)["x-forwarded-client-cert"]


def test_envoy_refuses_a_peer_with_another_spiffe_id(mesh: dict[str, Any]) -> None:
    status, body = get(mesh["url"].replace("/hello", "/wrong-id"))

    assert status == 503, body
    assert mesh["front"].stat("cluster.back_wrong_id.ssl.fail_verify_san") >= 1
    assert mesh["front"].stat("cluster.back.ssl.fail_verify_san") == 0
    assert get(mesh["url"])[0] == 200


def test_envoy_picks_up_renewed_svids_without_restart(mesh: dict[str, Any]) -> None:
    front, back = mesh["front"], mesh["back"]
    pids = (front.process.pid, back.process.pid)
    first_front, first_back = front.certificate_serials(), back.certificate_serials()
    assert len(first_front) == 1 and len(first_back) == 1
    assert first_front <= pushed_serials(mesh["front_agent"], "envoy-a")
    assert first_back <= pushed_serials(mesh["back_agent"], "envoy-b")

    # Both agents renew at about half the SVID lifetime; keep sending requests meanwhile.
    deadline = time.monotonic() + 4 * SVID_TTL_SECONDS
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(get(mesh["url"])[0])
        now_front, now_back = front.certificate_serials(), back.certificate_serials()
        if now_front.isdisjoint(first_front) and now_back.isdisjoint(first_back):
            break
        time.sleep(0.2)

    assert now_front.isdisjoint(first_front), "Envoy A still holds its first certificate"
    assert now_back.isdisjoint(first_back), "Envoy B still holds its first certificate"
    # What Envoy holds now is a renewed SVID that its agent pushed over SDS.
    assert now_front <= pushed_serials(mesh["front_agent"], "envoy-a")
    assert now_back <= pushed_serials(mesh["back_agent"], "envoy-b")
    assert (front.process.pid, back.process.pid) == pids
    assert front.process.poll() is None and back.process.poll() is None
    assert set(statuses) == {200}, statuses
    status, body = get(mesh["url"])
    assert status == 200, body
