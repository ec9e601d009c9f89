"""Join tokens through the real Bootstrap RPC: single use, expiry, storage (SPEC §4, §5).

A token is bound to one registration entry, works once even when many clients present it
at the same moment, and etcd holds only its SHA-256 under a lease.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from etcd3aio import Etcd3Client, prefix_range_end

from ca_harness import CaHarness
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc

TIMEOUT = 15
CLIENTS = 50
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

EtcdKeys = dict[bytes, tuple[int, int, bytes]]


def etcd_keys(ca: CaHarness) -> EtcdKeys:
    """Every key under the replica's prefix: (mod revision, lease, value), read from etcd."""

    async def read() -> EtcdKeys:
        client = Etcd3Client([ca.etcd_endpoint])
        await client.connect()
        try:
            assert client.kv is not None
            response = await client.kv.get(ca.prefix, range_end=prefix_range_end(ca.prefix))
        finally:
            await client.close()
        return {kv.key: (int(kv.mod_revision), int(kv.lease), kv.value) for kv in response.kvs}

    return ca.run(read())


def make_csr(spiffe_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.add_extension(san, critical=False).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def bootstrap(ca: CaHarness, token: str, spiffe_id: str) -> ca_pb2.SVIDResponse:
    request = ca_pb2.BootstrapRequest(join_token=token, csr=make_csr(spiffe_id))
    with ca.bootstrap_channel() as channel:
        return ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(request, timeout=TIMEOUT)


def refused_bootstrap(ca: CaHarness, token: str, spiffe_id: str) -> tuple[grpc.StatusCode, str]:
    """A Bootstrap that must fail and leave etcd as it was; its code and details."""
    before = etcd_keys(ca)
    assert before, f"nothing under {ca.prefix}: the comparison would prove nothing"
    with pytest.raises(grpc.RpcError) as info:
        bootstrap(ca, token, spiffe_id)
    assert etcd_keys(ca) == before, "a refused Bootstrap changed etcd"
    error: Any = info.value
    return error.code(), error.details() or ""


def test_token_works_once_and_then_is_unauthenticated(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    token = ca.join_token(spiffe_id)

    first = bootstrap(ca, token, spiffe_id)
    code, details = refused_bootstrap(ca, token, spiffe_id)

    assert first.spiffe_id == spiffe_id
    assert code == UNAUTHENTICATED, details
    assert token not in details


def test_expired_token_is_unauthenticated(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    token = ca.join_token(spiffe_id, ttl_seconds=1)

    time.sleep(1.5)
    code, details = refused_bootstrap(ca, token, spiffe_id)

    assert code == UNAUTHENTICATED, details
    assert "expired" in details


@pytest.mark.parametrize(
    "token", ["", "not-a-token", "A" * 43, "x" * 5000, "\u00e9t\u00e9", "../../entries/web"]
)
def test_unknown_or_empty_token_is_unauthenticated(ca: CaHarness, token: str) -> None:
    spiffe_id = ca.create_entry("/web")
    ca.join_token(spiffe_id)

    code, details = refused_bootstrap(ca, token, spiffe_id)

    assert code == UNAUTHENTICATED, details


def test_token_of_an_entry_deleted_after_it_was_made_is_unauthenticated(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    token = ca.join_token(spiffe_id)
    with ca.admin_channel() as channel:
        admin_pb2_grpc.AdminStub(channel).DeleteEntry(
            admin_pb2.DeleteEntryRequest(spiffe_id=spiffe_id), timeout=TIMEOUT
        )

    code, details = refused_bootstrap(ca, token, spiffe_id)

    assert code == UNAUTHENTICATED, details
    assert spiffe_id in details


def test_token_is_bound_to_its_entry(ca: CaHarness) -> None:
    web = ca.create_entry("/web")
    db = ca.create_entry("/db")
    token = ca.join_token(web)

    code, details = refused_bootstrap(ca, token, db)

    # A CSR for another ID than the token's entry names both (SPEC §4).
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert web in details and db in details
    assert bootstrap(ca, token, web).spiffe_id == web


def test_token_for_an_id_without_entry_is_not_made(ca: CaHarness) -> None:
    request = admin_pb2.CreateJoinTokenRequest(spiffe_id=ca.id("/nobody"), ttl_seconds=600)
    before = etcd_keys(ca)

    with ca.admin_channel() as channel, pytest.raises(grpc.RpcError) as info:
        admin_pb2_grpc.AdminStub(channel).CreateJoinToken(request, timeout=TIMEOUT)

    error: Any = info.value
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert etcd_keys(ca) == before


def test_one_token_presented_by_fifty_clients_at_once_issues_one_svid(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    token = ca.join_token(spiffe_id)
    csrs = [make_csr(spiffe_id) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def present(csr: bytes) -> grpc.StatusCode:
        with ca.bootstrap_channel() as channel:
            # Connect first, so that the calls leave together when the barrier opens.
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            start.wait(timeout=TIMEOUT)
            try:
                stub.Bootstrap(ca_pb2.BootstrapRequest(join_token=token, csr=csr), timeout=TIMEOUT)
            except grpc.RpcError as error:
                code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
                return code
            return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        codes = list(pool.map(present, csrs))

    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert codes.count(UNAUTHENTICATED) == CLIENTS - 1, codes
    tokens = [key for key in etcd_keys(ca) if b"/tokens/" in key]
    assert tokens == []


def test_token_is_stored_only_as_its_sha256_under_a_lease(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    before = set(etcd_keys(ca))

    token = ca.join_token(spiffe_id, ttl_seconds=600)

    keys = etcd_keys(ca)
    added = set(keys) - before
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    assert added == {f"{ca.prefix}{ca.trust_domain}/tokens/{digest}".encode()}
    (key,) = added
    _, lease, _ = keys[key]
    assert lease != 0
    for stored_key, (_, _, value) in keys.items():
        assert token.encode() not in stored_key
        assert token.encode() not in value
    # Spending it deletes it.
    bootstrap(ca, token, spiffe_id)
    assert key not in etcd_keys(ca)


def test_tokens_never_start_like_a_command_line_flag(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/flaglike")

    tokens = [ca.join_token(spiffe_id) for _ in range(40)]

    assert all(token.startswith("dmcjt_") for token in tokens)
    assert len(set(tokens)) == len(tokens)
