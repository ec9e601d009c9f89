"""The agent's Secret Discovery Service, spoken to as Envoy speaks xDS (SPEC §8)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent_support import FakeIdentity, FakeSource
from dmc.agent import AgentServer

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
QUIET_SECONDS = 0.3


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def sds(source: FakeSource, tmp_path: Path) -> AsyncIterator[Any]:
    agent = AgentServer(source, tmp_path / "run" / "agent.sock")
    await agent.start()
    channel = grpc.aio.insecure_channel(f"unix:{agent.socket_path}")
    try:
        yield sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    finally:
        await channel.close()
        await agent.stop(0)


class Envoy:
    """One StreamSecrets call, driven step by step as Envoy's SDS client drives it."""

    def __init__(self, stub: Any) -> None:
        self.call = stub.StreamSecrets()
        # Cancelling a read cancels the whole call, so one task reads and tests wait on a queue.
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self._responses.put_nowait(response)

    async def request(
        self, *names: str, nonce: str = "", version: str = "", error: str | None = None
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            resource_names=names,
            type_url=SECRET_TYPE,
            response_nonce=nonce,
            version_info=version,
        )
        request.node.id = "envoy-a"
        request.node.cluster = "web"
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        await self.call.write(request)

    async def response(self) -> Any:
        return await asyncio.wait_for(self._responses.get(), 5)

    async def ack(self, response: Any, *names: str) -> None:
        await self.request(*names, nonce=response.nonce, version=response.version_info)

    async def nothing_more(self) -> bool:
        """True if no response arrives for a while."""
        try:
            await asyncio.wait_for(self._responses.get(), QUIET_SECONDS)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


@pytest.fixture
async def envoy(sds: Any) -> AsyncIterator[Envoy]:
    stream = Envoy(sds)
    try:
        yield stream
    finally:
        stream.close()


def secrets(response: Any) -> dict[str, Any]:
    assert response.type_url == SECRET_TYPE
    unpacked = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        unpacked[secret.name] = secret
    return unpacked


def serial_of(secret: Any) -> int:
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    return chain[0].serial_number


def roots_of(secret: Any) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)


def assert_serves(secret: Any, identity: FakeIdentity) -> None:
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    key = serialization.load_pem_private_key(secret.tls_certificate.private_key.inline_bytes, None)
    assert chain == list(identity.chain)
    assert key.public_key() == identity.key.public_key()


async def test_default_is_the_tls_certificate_and_rootca_the_bundle(
    envoy: Envoy, source: FakeSource
) -> None:
    await envoy.request("default", "ROOTCA")
    response = await envoy.response()

    served = secrets(response)
    assert sorted(served) == ["ROOTCA", "default"]
    assert_serves(served["default"], source.current())
    assert roots_of(served["ROOTCA"]) == [source.root.certificate]
    assert response.version_info and response.nonce


async def test_ack_is_not_answered_and_a_renewal_is_pushed(
    envoy: Envoy, source: FakeSource
) -> None:
    await envoy.request("default")
    first = await envoy.response()
    await envoy.ack(first, "default")
    assert await envoy.nothing_more()

    renewed = source.renew()
    pushed = await envoy.response()

    assert_serves(secrets(pushed)["default"], renewed)
    assert pushed.version_info != first.version_info
    assert pushed.nonce != first.nonce


async def test_bundle_change_is_pushed_to_rootca(envoy: Envoy, source: FakeSource) -> None:
    await envoy.request("ROOTCA")
    first = await envoy.response()
    await envoy.ack(first, "ROOTCA")

    changed = source.add_root()
    pushed = await envoy.response()

    assert roots_of(secrets(pushed)["ROOTCA"]) == list(changed.bundle)
    assert len(changed.bundle) == 2
    assert pushed.version_info != first.version_info


async def test_renewal_is_not_pushed_to_a_stream_that_only_wants_rootca(
    envoy: Envoy, source: FakeSource
) -> None:
    await envoy.request("ROOTCA")
    await envoy.ack(await envoy.response(), "ROOTCA")

    source.renew()

    assert await envoy.nothing_more()


async def test_nack_is_logged_not_resent_and_the_next_change_is_pushed(
    envoy: Envoy, source: FakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    await envoy.request("default")
    first = await envoy.response()

    await envoy.request("default", nonce=first.nonce, version="", error="bad key")

    assert await envoy.nothing_more()
    assert "rejected version" in caplog.text and "bad key" in caplog.text
    renewed = source.renew()
    assert_serves(secrets(await envoy.response())["default"], renewed)


async def test_stale_nonce_is_ignored(envoy: Envoy, source: FakeSource) -> None:
    await envoy.request("default")
    first = await envoy.response()
    source.renew()
    second = await envoy.response()

    # A request that echoes the older nonce asks for ROOTCA too; it is stale, so ignored.
    await envoy.request("default", "ROOTCA", nonce=first.nonce, version=first.version_info)
    assert await envoy.nothing_more()

    await envoy.request("default", "ROOTCA", nonce=second.nonce, version=second.version_info)
    assert sorted(secrets(await envoy.response())) == ["ROOTCA", "default"]


async def test_unknown_names_are_left_out_and_the_stream_lives_on(
    envoy: Envoy, source: FakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    await envoy.request("default", "spiffe://example.org/other")
    response = await envoy.response()

    assert list(secrets(response)) == ["default"]
    assert "does not serve: spiffe://example.org/other" in caplog.text
    await envoy.ack(response, "default", "spiffe://example.org/other")
    renewed = source.renew()
    assert_serves(secrets(await envoy.response())["default"], renewed)


async def test_only_unknown_names_get_an_empty_answer(envoy: Envoy) -> None:
    await envoy.request("nothing-here")
    response = await envoy.response()

    assert secrets(response) == {}
    assert response.version_info and response.nonce


async def test_new_names_on_the_stream_are_answered(envoy: Envoy) -> None:
    await envoy.request("default")
    first = await envoy.response()

    await envoy.request("default", "ROOTCA", nonce=first.nonce, version=first.version_info)

    assert sorted(secrets(await envoy.response())) == ["ROOTCA", "default"]


async def test_notification_without_change_pushes_nothing(
    envoy: Envoy, source: FakeSource
) -> None:
    await envoy.request("default", "ROOTCA")
    await envoy.ack(await envoy.response(), "default", "ROOTCA")

    source.notify()

    assert await envoy.nothing_more()


async def test_version_names_the_content(sds: Any, source: FakeSource) -> None:
    one, two = Envoy(sds), Envoy(sds)
    try:
        await one.request("default")
        await two.request("default")
        first, second = await one.response(), await two.response()
    finally:
        one.close()
        two.close()

    assert first.version_info == second.version_info
    assert first.nonce != second.nonce


async def test_fetch_secrets_answers_once(sds: Any, source: FakeSource) -> None:
    response = await sds.FetchSecrets(
        discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"], type_url=SECRET_TYPE),
        timeout=5,
    )

    assert list(secrets(response)) == ["ROOTCA"]
    assert roots_of(secrets(response)["ROOTCA"]) == [source.root.certificate]


async def test_wildcard_request_gets_both_secrets(sds: Any) -> None:
    response = await sds.FetchSecrets(discovery_pb2.DiscoveryRequest(), timeout=5)

    assert sorted(secrets(response)) == ["ROOTCA", "default"]


async def test_other_resource_type_is_invalid_argument(sds: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sds.FetchSecrets(
            discovery_pb2.DiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
            ),
            timeout=5,
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "envoy.config.cluster.v3.Cluster" in (caught.value.details() or "")


async def test_delta_secrets_is_unimplemented(sds: Any) -> None:
    call = sds.DeltaSecrets()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 5)

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_each_push_is_logged_with_the_serial(
    envoy: Envoy, source: FakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dmc.agent")
    await envoy.request("default")
    await envoy.ack(await envoy.response(), "default")

    renewed = source.renew()
    await envoy.response()

    pushes = [
        r.getMessage() for r in caplog.records if "SDS push to web/envoy-a" in r.getMessage()
    ]
    assert len(pushes) == 2
    assert f"serial {renewed.svid.serial:x}" in pushes[-1]
