"""The CA's watch streams hold a store subscription only while the call lasts."""

from __future__ import annotations

import time

from ca_harness import CaHarness
from dmc.v1 import ca_pb2, ca_pb2_grpc


def _subscriptions(ca: CaHarness) -> int:
    assert ca.store is not None
    return len(ca.store._subscriptions)


def _eventually(check: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_cancelled_watch_streams_release_their_subscriptions(ca: CaHarness) -> None:
    baseline = _subscriptions(ca)
    with ca.admin_channel() as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        for _ in range(5):
            bundles = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest(), timeout=10)
            revocations = stub.WatchRevocations(ca_pb2.WatchRevocationsRequest(), timeout=10)
            assert next(bundles).sequence >= 1
            assert next(revocations).snapshot
            assert _subscriptions(ca) >= baseline + 2
            bundles.cancel()
            revocations.cancel()

    assert _eventually(lambda: _subscriptions(ca) == baseline), _subscriptions(ca)
