"""The CA when etcd, the CA itself or the network misbehave (SPEC §4, §5).

Renew and Delegate are served from the in-memory view, so they outlive etcd; writes then
fail as UNAVAILABLE and come back with etcd. A restarted CA keeps its trust domain,
authority and entries; replicas on one etcd see each other's writes through the watch; a
client certificate the CA does not trust fails the TLS handshake, and the ``dmc`` command
says so in one line.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ca_harness import CaHarness, ImportedCa
from certgen import make_leaf, make_root, new_key
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess

TIMEOUT = 15
PREFIX = "/dmc/"
TD = "spiffe://example.org"
DMC = Path(sys.executable).with_name("dmc")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

_T = TypeVar("_T")


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Workload:
    """An SVID chain and the private key it belongs to."""

    key: PrivateKeyTypes
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def spiffe_id(self) -> str:
        san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])

    def channel(self, ca: CaHarness) -> grpc.Channel:
        return ca.channel(certificates_to_pem(self.chain), private_key_to_pem(self.key))

    @classmethod
    def of(cls, key: PrivateKeyTypes, response: ca_pb2.SVIDResponse) -> Workload:
        chain = tuple(x509.load_der_x509_certificate(d) for d in response.certificate_chain)
        return cls(key, chain)


def make_csr(key: Any, spiffe_id: str) -> bytes:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.add_extension(san, critical=False).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def ca_stub(channel: grpc.Channel) -> ca_pb2_grpc.CertificateAuthorityStub:
    return ca_pb2_grpc.CertificateAuthorityStub(channel)


def bootstrap_with(ca: CaHarness, token: str, spiffe_id: str) -> Workload:
    key = new_key()
    request = ca_pb2.BootstrapRequest(join_token=token, csr=make_csr(key, spiffe_id))
    with ca.bootstrap_channel() as channel:
        return Workload.of(key, ca_stub(channel).Bootstrap(request, timeout=TIMEOUT))


def bootstrap(ca: CaHarness, spiffe_id: str) -> Workload:
    return bootstrap_with(ca, ca.join_token(spiffe_id), spiffe_id)


def renew(ca: CaHarness, caller: Workload) -> Workload:
    key = new_key()
    request = ca_pb2.RenewRequest(csr=make_csr(key, caller.spiffe_id))
    with caller.channel(ca) as channel:
        return Workload.of(key, ca_stub(channel).Renew(request, timeout=TIMEOUT))


def delegate(ca: CaHarness, caller: Workload, spiffe_id: str) -> Workload:
    key = new_key()
    request = ca_pb2.DelegateRequest(
        csr=make_csr(key, spiffe_id),
        spiffe_id=spiffe_id,
        permissions=["/demo.Echo/*"],
        audiences=["*"],
        max_depth=0,
        ttl_seconds=600,
    )
    with caller.channel(ca) as channel:
        return Workload.of(key, ca_stub(channel).Delegate(request, timeout=TIMEOUT))


def failure(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details() or ""


def eventually(call: Callable[[], _T], seconds: float = 15.0) -> _T:
    """``call()``'s result once it stops failing with UNAVAILABLE, within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
            if code != UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def entry_request(path: str) -> admin_pb2.CreateEntryRequest:
    return admin_pb2.CreateEntryRequest(
        entry=admin_pb2.Entry(
            spiffe_id=f"{TD}{path}", permissions=["*"], audiences=["*"], max_depth=1
        )
    )


def trust_bundle(ca: CaHarness) -> ca_pb2.TrustBundle:
    with ca.bootstrap_channel() as channel:
        return ca_stub(channel).GetTrustBundle(ca_pb2.GetTrustBundleRequest(), timeout=TIMEOUT)


def entry_ids(ca: CaHarness) -> list[str]:
    with ca.admin_channel() as channel:
        listed = admin_pb2_grpc.AdminStub(channel).ListEntries(
            admin_pb2.ListEntriesRequest(), timeout=TIMEOUT
        )
    return sorted(entry.spiffe_id for entry in listed.entries)


@pytest.fixture
def harnesses() -> Iterator[list[CaHarness]]:
    """CA replicas a test starts; each is stopped at the end, whatever happened."""
    started: list[CaHarness] = []
    yield started
    for harness in reversed(started):
        harness.stop()


def start(harnesses: list[CaHarness], *args: Any, **kwargs: Any) -> CaHarness:
    harness = CaHarness(*args, **kwargs)
    harnesses.append(harness)
    return harness.start()


# ---------------------------------------------------------------- etcd down


def test_renew_and_delegate_are_served_from_the_view_while_etcd_is_stopped(
    private_etcd: EtcdProcess, harnesses: list[CaHarness], tmp_path: Path
) -> None:
    ca = start(harnesses, private_etcd.endpoint, PREFIX, tmp_path / "ca")
    web = bootstrap(ca, ca.create_entry("/web", max_depth=1))

    private_etcd.stop()

    renewed = renew(ca, web)
    child = delegate(ca, renewed, f"{TD}/web/job")
    renewed_child = renew(ca, child)
    assert (renewed.spiffe_id, renewed_child.spiffe_id) == (f"{TD}/web", f"{TD}/web/job")
    # Admin reads come from the view too.
    assert f"{TD}/web" in entry_ids(ca)


def test_writes_fail_as_unavailable_naming_etcd_and_work_again_after_it_restarts(
    private_etcd: EtcdProcess, harnesses: list[CaHarness], tmp_path: Path
) -> None:
    ca = start(harnesses, private_etcd.endpoint, PREFIX, tmp_path / "ca")
    web = ca.create_entry("/web")
    pending = ca.join_token(web)

    private_etcd.stop()

    with ca.admin_channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for call in (
            lambda: admin.CreateEntry(entry_request("/db"), timeout=TIMEOUT),
            lambda: admin.CreateJoinToken(
                admin_pb2.CreateJoinTokenRequest(spiffe_id=web, ttl_seconds=600),
                timeout=TIMEOUT,
            ),
            lambda: admin.DeleteEntry(
                admin_pb2.DeleteEntryRequest(spiffe_id=web), timeout=TIMEOUT
            ),
        ):
            code, details = failure(call)
            assert code == UNAVAILABLE, details
            assert "etcd" in details
    # Bootstrap must spend its token in etcd, so it cannot be served either.
    code, details = failure(lambda: bootstrap_with(ca, pending, web))
    assert code == UNAVAILABLE, details
    assert "etcd" in details

    private_etcd.start()

    with ca.admin_channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        created = eventually(lambda: admin.CreateEntry(entry_request("/db"), timeout=TIMEOUT))
    assert created.spiffe_id == f"{TD}/db"
    # The token the failed Bootstrap presented is still unspent.
    assert bootstrap_with(ca, pending, web).spiffe_id == web
    assert bootstrap(ca, f"{TD}/db").spiffe_id == f"{TD}/db"


# ---------------------------------------------------------------- restarts and replicas


def test_restart_on_the_same_data_keeps_trust_domain_authority_and_entries(
    private_etcd: EtcdProcess, harnesses: list[CaHarness], tmp_path: Path
) -> None:
    first = start(harnesses, private_etcd.endpoint, PREFIX, tmp_path / "ca")
    web = bootstrap(first, first.create_entry("/web"))
    first.create_entry("/db", dns_names=("db.example.org",))
    bundle, entries = trust_bundle(first), entry_ids(first)
    first.stop()
    private_etcd.stop()

    private_etcd.start()
    second = start(harnesses, private_etcd.endpoint, PREFIX, tmp_path / "ca")

    assert trust_bundle(second) == bundle
    assert bundle.trust_domain == "example.org"
    assert entry_ids(second) == entries
    assert {f"{TD}/web", f"{TD}/db", f"{TD}/dmc/admin"} <= set(entries)
    # An SVID issued before the restart still authenticates and renews.
    renewed = renew(second, web)
    (root,) = (x509.load_der_x509_certificate(a.certificate) for a in bundle.authorities)
    renewed.leaf.verify_directly_issued_by(root)
    assert renewed.spiffe_id == f"{TD}/web"


def test_entry_created_through_one_replica_bootstraps_through_another(
    etcd: EtcdProcess, etcd_prefix: str, harnesses: list[CaHarness], tmp_path: Path
) -> None:
    a = start(harnesses, etcd.endpoint, etcd_prefix, tmp_path / "a")
    # Replicas share etcd and the key-encryption key, never the KEK through etcd.
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "kek", tmp_path / "b" / "kek")
    b = start(harnesses, etcd.endpoint, etcd_prefix, tmp_path / "b")

    web = a.create_entry("/web", max_depth=1)
    token = a.join_token(web)
    assert b.store is not None
    deadline = time.monotonic() + 5
    while not any(str(e) == web for e in b.store.view.entries):
        assert time.monotonic() < deadline, "the watch did not bring the entry to replica B"
        time.sleep(0.02)

    workload = bootstrap_with(b, token, web)

    assert trust_bundle(a) == trust_bundle(b)
    assert renew(a, workload).spiffe_id == web
    child = delegate(b, workload, f"{web}/job")
    assert renew(a, child).spiffe_id == f"{web}/job"
    # The token was spent through B, so A refuses it.
    code, _ = failure(lambda: bootstrap_with(a, token, web))
    assert code == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- refused at the handshake


def write_credential(folder: Path, chain: list[x509.Certificate], key: Any, bundle: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "svid.pem").write_bytes(certificates_to_pem(chain))
    (folder / "svid.key").write_bytes(private_key_to_pem(key))
    (folder / "bundle.pem").write_bytes(bundle)
    return folder


def dmc(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed ``dmc`` command, with no DMC_* or GRPC_* settings from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    return subprocess.run(
        [str(DMC), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error: …`` line of a failed command (no traceback, no gRPC noise)."""
    assert result.returncode != 0, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr.rstrip("\n")


def test_caller_chaining_to_an_unknown_ca_is_refused_at_the_handshake(
    ca: CaHarness, tmp_path: Path
) -> None:
    stranger = make_leaf(make_root("example.org"), uris=[f"{TD}/web"])
    chain_pem = certificates_to_pem([stranger.certificate])
    request = ca_pb2.RenewRequest(csr=make_csr(new_key(), f"{TD}/web"))

    with ca.channel(chain_pem, private_key_to_pem(stranger.key)) as channel:
        code, details = failure(lambda: ca_stub(channel).Renew(request, timeout=TIMEOUT))

    assert code == UNAVAILABLE, details
    folder = write_credential(
        tmp_path / "web", [stranger.certificate], stranger.key, ca.bundle_pem
    )
    line = error_line(dmc("renew", "--ca", ca.address, "--dir", folder))
    assert line.startswith(f"error: UNAVAILABLE: the CA at {ca.address} refused the certificate")
    assert (folder / "svid.pem").read_bytes() == chain_pem


def test_caller_without_a_certificate_is_refused_at_the_handshake(ca: CaHarness) -> None:
    request = ca_pb2.RenewRequest(csr=make_csr(new_key(), f"{TD}/web"))

    with ca.channel() as channel:
        code, details = failure(lambda: ca_stub(channel).Renew(request, timeout=TIMEOUT))

    assert code == UNAVAILABLE, details


@pytest.mark.parametrize("window", ["expired", "not yet valid"])
def test_caller_whose_certificate_is_outside_its_validity_is_refused_at_the_handshake(
    etcd: EtcdProcess, etcd_prefix: str, harnesses: list[CaHarness], tmp_path: Path, window: str
) -> None:
    # An imported root lets the test sign leaves of the CA's own trust with any dates.
    root = make_root("example.org")
    imported = ImportedCa(certificates_to_pem([root.certificate]), private_key_to_pem(root.key))
    ca = start(harnesses, etcd.endpoint, etcd_prefix, tmp_path / "ca", imported=imported)
    now = datetime.now(UTC)
    issued_at = now - timedelta(hours=2) if window == "expired" else now + timedelta(hours=2)
    leaf = make_leaf(root, uris=[f"{TD}/web"], issued_at=issued_at, ttl=timedelta(minutes=30))
    request = ca_pb2.RenewRequest(csr=make_csr(new_key(), f"{TD}/web"))

    with ca.channel(
        certificates_to_pem([leaf.certificate]), private_key_to_pem(leaf.key)
    ) as channel:
        code, details = failure(lambda: ca_stub(channel).Renew(request, timeout=TIMEOUT))

    assert code == UNAVAILABLE, details
    folder = write_credential(tmp_path / "web", [leaf.certificate], leaf.key, ca.bundle_pem)
    line = error_line(dmc("renew", "--ca", ca.address, "--dir", folder))
    assert line.startswith(f"error: UNAVAILABLE: the CA at {ca.address} refused the certificate")


def test_renew_command_to_an_unreachable_address_says_unreachable(
    ca: CaHarness, tmp_path: Path
) -> None:
    workload = bootstrap(ca, ca.create_entry("/web"))
    folder = write_credential(tmp_path / "web", list(workload.chain), workload.key, ca.bundle_pem)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"

    line = error_line(dmc("renew", "--ca", closed, "--dir", folder))

    assert line.startswith(f"error: UNAVAILABLE: the CA at {closed} is unreachable")
    # The same credential renews at the CA itself, so only the address was wrong.
    result = dmc("renew", "--ca", ca.address, "--dir", folder)
    assert result.returncode == 0, result.stderr
