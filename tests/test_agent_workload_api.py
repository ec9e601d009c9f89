"""The agent's SPIFFE Workload API (SPEC §8), to its own stubs and to the spiffe package."""

from __future__ import annotations

import asyncio
import json
import selectors
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_support import AgentProcess, FakeSource, bootstrap_workload
from ca_harness import CaHarness
from dmc.agent import AgentServer
from dmc.agent._proto import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def workload_api(
    source: FakeSource, tmp_path: Path
) -> AsyncIterator[workload_pb2_grpc.SpiffeWorkloadAPIAsyncStub]:
    agent = AgentServer(source, tmp_path / "run" / "agent.sock")
    await agent.start()
    channel = grpc.aio.insecure_channel(f"unix:{agent.socket_path}")
    try:
        yield workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    finally:
        await channel.close()
        await agent.stop(0)


def der_certificates(data: bytes) -> list[bytes]:
    """Split concatenated DER certificates."""
    certificates = []
    while data:
        # A DER SEQUENCE with a two-byte long-form length: 0x30 0x82 HI LO.
        assert data[:2] == b"\x30\x82"
        end = 4 + int.from_bytes(data[2:4], "big")
        certificates.append(data[:end])
        data = data[end:]
    return certificates


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


async def test_fetch_x509_svid_serves_the_svid_key_and_bundle(
    workload_api: Any, source: FakeSource
) -> None:
    call = workload_api.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    response = await asyncio.wait_for(call.read(), 5)
    call.cancel()

    (svid,) = response.svids
    identity = source.current()
    assert svid.spiffe_id == "spiffe://example.org/web"
    assert der_certificates(svid.x509_svid) == [der(c) for c in identity.chain]
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    assert key.public_key() == identity.key.public_key()
    assert der_certificates(svid.bundle) == [der(source.root.certificate)]


async def test_fetch_x509_svid_pushes_renewals_and_bundle_changes(
    workload_api: Any, source: FakeSource
) -> None:
    call = workload_api.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    try:
        first = await asyncio.wait_for(call.read(), 5)
        renewed = source.renew()
        second = await asyncio.wait_for(call.read(), 5)
        changed = source.add_root()
        third = await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()

    assert first.svids[0].x509_svid != second.svids[0].x509_svid
    assert der_certificates(second.svids[0].x509_svid) == [der(renewed.chain[0])]
    assert der_certificates(third.svids[0].bundle) == [der(c) for c in changed.bundle]


async def test_fetch_x509_bundles_is_keyed_by_trust_domain_and_follows_changes(
    workload_api: Any, source: FakeSource
) -> None:
    call = workload_api.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
    try:
        first = await asyncio.wait_for(call.read(), 5)
        source.renew()  # the bundle did not change: nothing to push
        changed = source.add_root()
        second = await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()

    assert list(first.bundles) == ["spiffe://example.org"]
    assert der_certificates(first.bundles["spiffe://example.org"]) == [
        der(source.root.certificate)
    ]
    assert der_certificates(second.bundles["spiffe://example.org"]) == [
        der(c) for c in changed.bundle
    ]


@pytest.mark.parametrize(
    "metadata",
    [(), (("workload.spiffe.io", "false"),), (("workload.spiffe.io", "True"),)],
    ids=["missing", "false", "wrong-case"],
)
@pytest.mark.parametrize("method", ["FetchX509SVID", "FetchX509Bundles"])
async def test_call_without_security_header_is_invalid_argument(
    workload_api: Any, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    request = (
        workload_pb2.X509SVIDRequest()
        if method == "FetchX509SVID"
        else workload_pb2.X509BundlesRequest()
    )
    call = getattr(workload_api, method)(request, metadata=metadata)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in (caught.value.details() or "")


async def test_jwt_profile_is_unimplemented(workload_api: Any) -> None:
    calls = [
        workload_api.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER),
        workload_api.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="y"), metadata=HEADER
        ),
    ]
    codes = []
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        codes.append(caught.value.code())
    bundles = workload_api.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(bundles.read(), 5)
    codes.append(caught.value.code())

    assert codes == [grpc.StatusCode.UNIMPLEMENTED] * 3


async def test_jwt_call_without_security_header_is_invalid_argument(workload_api: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await workload_api.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the spiffe package, in a process of its own ---------------------------------------------

# The spiffe package registers its own workload.proto, which clashes with the agent's stubs
# (DEPENDENCIES.md), so its client runs in a subprocess that prints one JSON line per
# X.509 context it receives and a first line from the one-shot fetches.
SPIFFE_CLIENT = r"""
import json, sys
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

def describe(svid, bundles):
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "chain": len(svid.cert_chain),
        "key_matches": svid.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == svid.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "roots": sorted(
            format(a.serial_number, "x") for a in (bundle.x509_authorities if bundle else ())
        ),
    }

client = WorkloadApiClient(socket_path=sys.argv[1])
print(json.dumps(describe(client.fetch_x509_svid(), client.fetch_x509_bundles())), flush=True)
handle = client.stream_x509_contexts(
    on_success=lambda c: print(
        json.dumps(describe(c.default_svid, c.x509_bundle_set)), flush=True
    ),
    on_error=lambda e: print(json.dumps({"error": repr(e)}), flush=True),
)
sys.stdin.read()
handle.cancel()
client.close()
"""


class SpiffeClient:
    """The spiffe package's Workload API client in a subprocess, read line by line."""

    def __init__(self, socket_path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SPIFFE_CLIENT, f"unix://{socket_path}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def next(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(0.1):
                    line = self.process.stdout.readline()
                    assert line, f"spiffe client ended: {self.stderr()}"
                    message: dict[str, Any] = json.loads(line)
                    assert "error" not in message, message["error"]
                    return message
        raise AssertionError("no message from the spiffe client in time")

    def stderr(self) -> str:
        self.process.kill()
        _, err = self.process.communicate(timeout=10)
        return err

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def agent_on_ca(dev_ca: CaHarness, tmp_path: Path) -> Iterator[tuple[str, AgentProcess]]:
    """``dmc agent`` for a fresh workload whose SVIDs live 4 s, so it renews every ~2 s."""
    credentials = tmp_path / "web"
    spiffe_id = bootstrap_workload(dev_ca, credentials, ttl_seconds=4)
    agent = AgentProcess(dev_ca.address, credentials, tmp_path / "run" / "agent.sock")
    try:
        yield spiffe_id, agent.wait_serving()
    finally:
        assert agent.stop() == 0, agent.log()


def test_spiffe_package_fetches_the_svid_and_sees_renewals(
    agent_on_ca: tuple[str, AgentProcess], dev_ca: CaHarness
) -> None:
    spiffe_id, agent = agent_on_ca
    client = SpiffeClient(agent.socket_path)
    try:
        fetched = client.next()
        streamed = client.next()
        renewed = streamed
        while renewed["serial"] == fetched["serial"]:
            renewed = client.next()
    finally:
        client.close()

    bundle = x509.load_pem_x509_certificates(dev_ca.bundle_pem)
    assert fetched["spiffe_id"] == spiffe_id
    assert fetched["key_matches"] and fetched["chain"] >= 1
    assert fetched["roots"] == sorted(format(c.serial_number, "x") for c in bundle)
    assert renewed["spiffe_id"] == spiffe_id and renewed["key_matches"]
    assert "Workload API push to" in agent.log()


def fetch_serial(socket_path: Path) -> int:
    """The leaf serial the agent serves now, through the agent's own Workload API stubs."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5
        )
        response = next(call)
        call.cancel()
    leaf = der_certificates(response.svids[0].x509_svid)[0]
    return x509.load_der_x509_certificate(leaf).serial_number


def test_agent_keeps_serving_its_valid_svid_while_the_ca_is_down(
    ca: CaHarness, tmp_path: Path
) -> None:
    credentials = tmp_path / "web"
    spiffe_id = bootstrap_workload(ca, credentials, ttl_seconds=8)
    agent = AgentProcess(ca.address, credentials, tmp_path / "run" / "agent.sock")
    try:
        agent.wait_serving()
        before = fetch_serial(agent.socket_path)
        ca.stop()

        # Renewal is due after about half of the 8 s; wait for the failed attempt.
        deadline = time.monotonic() + 15
        while "renewal of" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)

        assert f"renewal of {spiffe_id} failed" in agent.log()
        assert agent.process.poll() is None
        assert fetch_serial(agent.socket_path) == before
    finally:
        assert agent.stop() == 0, agent.log()
