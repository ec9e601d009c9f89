"""Revocation at the callee (SPEC §3, §7): ``RevocationFollower`` and the interceptors.

A real CA replica revokes through its Admin service; the callee follows
``WatchRevocations`` over mTLS with its own SVID and refuses what is revoked. Times are
measured from the moment the Revoke call is made.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import grpc.aio
import pytest

from ca_harness import CaHarness
from conftest import TcpProxy
from dmc.authz import AuthorizingInterceptor
from dmc.errors import Unavailable
from dmc.revocations_follower import RevocationFollower
from test_authz import (
    SERVER_STREAM,
    UNARY,
    Identity,
    Scenario,
    as_caller,
    call,
    callee_server,
    code_and_details,
    make_scenario,
    renew,
    revoke,
    serve,
)
from test_authz_aio import AioCallee, aio_call, aio_channel

_logger = logging.getLogger(__name__)

REFUSAL_DEADLINE_SECONDS = 2.0
POLL_SECONDS = 0.02


@pytest.fixture
def scenario(ca: CaHarness) -> Scenario:
    """A callee, a root caller ``web`` and its delegate ``web/job`` on a CA of the test's own."""
    return make_scenario(ca)


@contextmanager
def following(ca: CaHarness, identity: Identity, **backoff: float) -> Iterator[RevocationFollower]:
    """A started follower of the CA's revocations, over mTLS with ``identity``."""
    with (
        ca.channel(identity.chain_pem, identity.key_pem) as channel,
        RevocationFollower(channel, **backoff) as follower,
    ):
        yield follower


def poll_until_refused(
    attempt: Callable[[], object], limit_seconds: float = 10.0
) -> tuple[float, grpc.StatusCode, str]:
    """Call ``attempt`` until it raises an RPC error; return the time taken and the status."""
    started = time.monotonic()
    while True:
        try:
            attempt()
        except grpc.RpcError as error:
            code, details = code_and_details(error)
            return time.monotonic() - started, code, details
        if time.monotonic() - started > limit_seconds:
            pytest.fail(f"still admitted after {limit_seconds} s")
        time.sleep(POLL_SECONDS)


def test_revoking_the_delegators_id_refuses_the_delegate_within_two_seconds(
    scenario: Scenario,
) -> None:
    with (
        following(scenario.ca, scenario.callee) as follower,
        callee_server(scenario, follower) as address,
        as_caller(scenario, address, scenario.job) as channel,
    ):
        call(channel, UNARY)
        started = time.monotonic()
        revoke(scenario.ca, spiffe_id=scenario.web.spiffe_id, reason="web's key leaked")
        _, code, details = poll_until_refused(lambda: call(channel, UNARY))
        elapsed = time.monotonic() - started

    _logger.info("delegate refused %.3f s after the Revoke call", elapsed)
    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert f"{scenario.web.spiffe_id} was revoked" in details
    assert f"delegator of {scenario.job.spiffe_id}" in details
    assert "web's key leaked" in details
    assert elapsed < REFUSAL_DEADLINE_SECONDS


def test_revoking_a_serial_spares_a_newer_certificate_of_the_same_id(scenario: Scenario) -> None:
    older = scenario.web
    newer = renew(scenario.ca, older)
    assert newer.spiffe_id == older.spiffe_id
    assert newer.svid.serial != older.svid.serial

    with (
        following(scenario.ca, scenario.callee) as follower,
        callee_server(scenario, follower) as address,
        as_caller(scenario, address, older) as old_channel,
        as_caller(scenario, address, newer) as new_channel,
    ):
        revoke(scenario.ca, serial=format(older.svid.serial, "x"), reason="superseded")
        _, code, details = poll_until_refused(lambda: call(old_channel, UNARY))
        newer_responses = call(new_channel, SERVER_STREAM)

    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert f"certificate serial {older.svid.serial:x} was revoked" in details
    assert newer_responses == [f"{newer.spiffe_id}|".encode()] * 2


def test_a_restarted_callee_enforces_revocations_from_the_snapshot(scenario: Scenario) -> None:
    revoke(scenario.ca, spiffe_id=scenario.web.spiffe_id, reason="decommissioned")

    outcomes = []
    for _restart in range(2):
        with (
            following(scenario.ca, scenario.callee) as follower,
            callee_server(scenario, follower) as address,
            as_caller(scenario, address, scenario.job) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            # The first call after start: no polling, the snapshot must already be in force.
            call(channel, UNARY)
        outcomes.append(code_and_details(caught.value))

    for code, details in outcomes:
        assert code is grpc.StatusCode.PERMISSION_DENIED, details
        assert "decommissioned" in details


def test_a_callee_refuses_with_unavailable_until_it_knows_the_revocations(
    scenario: Scenario,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
    credentials = grpc.ssl_channel_credentials(scenario.ca.bundle_pem)

    with grpc.secure_channel(nowhere, credentials) as channel:
        with pytest.raises(Unavailable, match="no WatchRevocations snapshot"):
            RevocationFollower(channel).start(wait_seconds=0.3)

        follower = RevocationFollower(channel, initial_backoff_seconds=0.05).start(None)
        try:
            with (
                callee_server(scenario, follower) as address,
                as_caller(scenario, address, scenario.job) as caller,
                pytest.raises(grpc.RpcError) as caught,
            ):
                call(caller, UNARY)
        finally:
            follower.close()

    code, details = code_and_details(caught.value)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "not known yet" in details


def test_follower_reconnects_after_a_broken_stream_and_takes_a_fresh_snapshot(
    scenario: Scenario,
) -> None:
    ca = scenario.ca
    proxy = TcpProxy(int(ca.address.rsplit(":", 1)[1]))
    ca.run(proxy.start())
    credentials = grpc.ssl_channel_credentials(
        ca.bundle_pem, scenario.callee.key_pem, scenario.callee.chain_pem
    )
    try:
        with (
            grpc.secure_channel(proxy.endpoint, credentials) as channel,
            RevocationFollower(
                channel, initial_backoff_seconds=0.05, max_backoff_seconds=0.2
            ) as follower,
            callee_server(scenario, follower) as address,
            as_caller(scenario, address, scenario.job) as caller,
        ):
            call(caller, UNARY)
            before = follower.revocations
            assert before is not None

            ca.run(proxy.cut())
            revoke(ca, spiffe_id=scenario.web.spiffe_id, reason="revoked while cut off")
            time.sleep(0.3)
            # Cut off, the callee keeps the last set it knew.
            assert call(caller, UNARY)
            ca.run(proxy.start())

            _, code, details = poll_until_refused(lambda: call(caller, UNARY))
            after = follower.revocations
    finally:
        ca.run(proxy.cut())

    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert "revoked while cut off" in details
    assert after is not None
    assert after.revision > before.revision


def test_closing_the_follower_leaves_no_thread_behind(scenario: Scenario) -> None:
    with following(scenario.ca, scenario.callee) as follower:
        thread = follower._thread
        assert thread.is_alive()

    assert not thread.is_alive()


async def test_aio_callee_refuses_the_delegate_of_a_revoked_id_within_two_seconds(
    scenario: Scenario,
) -> None:
    ca = scenario.ca
    with following(ca, scenario.callee) as follower:
        callee = AioCallee(scenario.callee, ca.bundle_pem, scenario.callee.spiffe_id, follower)
        async with (
            callee,
            aio_channel(callee.address, scenario.job, ca.bundle_pem, scenario.callee_dns) as ch,
        ):
            await aio_call(ch, UNARY)
            started = time.monotonic()
            await asyncio.to_thread(
                revoke, ca, spiffe_id=scenario.web.spiffe_id, reason="aio revocation"
            )
            while True:
                try:
                    await aio_call(ch, UNARY)
                except grpc.aio.AioRpcError as error:
                    code, details = error.code(), error.details() or ""
                    break
                assert time.monotonic() - started < 10.0
                await asyncio.sleep(POLL_SECONDS)
            elapsed = time.monotonic() - started

    _logger.info("aio: delegate refused %.3f s after the Revoke call", elapsed)
    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert "aio revocation" in details
    assert elapsed < REFUSAL_DEADLINE_SECONDS


def test_interceptor_without_revocations_admits_a_revoked_delegate(scenario: Scenario) -> None:
    # The contrast: the refusals above come from the follower, not from the CA or TLS.
    revoke(scenario.ca, spiffe_id=scenario.web.spiffe_id, reason="not followed")

    interceptor = AuthorizingInterceptor(scenario.callee.spiffe_id)
    with (
        serve(scenario.callee, scenario.ca.bundle_pem, interceptor) as address,
        as_caller(scenario, address, scenario.job) as channel,
    ):
        assert call(channel, UNARY)
