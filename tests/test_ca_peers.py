"""Broken peer certificates at the CA's mTLS listener (SPEC §2, §3, §4; cases 005, 006, 008).

The CA is initialised with an imported root made here, so the test holds the root's key and
can sign leaves that chain to the trust bundle (and so pass the TLS handshake) but are no
valid X.509-SVID. SPEC §4: such a peer is UNAUTHENTICATED, with details naming the reason,
at every entry point: Renew, Delegate, the Admin service and WatchTrustBundle.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_harness import CaHarness, ImportedCa
from certgen import CertAndKey, make_leaf, make_root
from dmc.scope import SCOPE_OID
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess

TRUST_DOMAIN = "example.org"
CASES = Path(__file__).parent / "cases"
CASE_005 = CASES / "005-svid-with-several-uri-sans"
CASE_006 = CASES / "006-spiffe-id-path-grammar"
WORKLOAD = f"spiffe://{TRUST_DOMAIN}/workload/api"
CALL_TIMEOUT_SECONDS = 10.0
ENTRY_POINTS = ("Renew", "Delegate", "GetStatus", "WatchTrustBundle")


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _csr(uri: str | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    csr = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Peer:
    """A client certificate to present, and the words its refusal must carry."""

    chain_pem: bytes
    key_pem: bytes
    reason: tuple[str, ...]


@dataclass
class ImportedAuthority:
    """A CA replica initialised with a root whose key the test holds."""

    ca: CaHarness
    root: CertAndKey
    case_005: Path

    def leaf(self, **options: Any) -> Peer:
        made = make_leaf(self.root, **options)
        return Peer(_pem(made.certificate), _key_pem(made.key), ())


@pytest.fixture(scope="module")
def imported(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImportedAuthority]:
    folder = tmp_path_factory.mktemp("peers")
    root = make_root(TRUST_DOMAIN)
    ca = CaHarness(
        etcd.endpoint,
        f"/peers-{uuid.uuid4().hex}/",
        folder / "ca",
        trust_domain=TRUST_DOMAIN,
        imported=ImportedCa(_pem(root.certificate), _key_pem(root.key)),
    )
    ca.start()
    try:
        (folder / "root.pem").write_bytes(_pem(root.certificate))
        (folder / "root.key").write_bytes(_key_pem(root.key))
        # Case 005's three leaves, re-signed by this CA's imported root.
        subprocess.run(
            [
                sys.executable,
                str(CASE_005 / "gen.py"),
                "--ca-cert",
                str(folder / "root.pem"),
                "--ca-key",
                str(folder / "root.key"),
                "--out",
                str(folder / "005"),
            ],
            check=True,
            timeout=60,
        )
        yield ImportedAuthority(ca, root, folder / "005")
    finally:
        ca.stop()


def _case_005(imported: ImportedAuthority, name: str, *reason: str) -> Peer:
    folder = imported.case_005
    return Peer(
        (folder / f"{name}.pem").read_bytes(), (folder / f"{name}.key").read_bytes(), reason
    )


def _invalid_ids() -> list[tuple[str, str]]:
    """Case 006's invalid lines: (ID, the offending part its refusal must name)."""
    lines = (CASE_006 / "spiffe-ids.txt").read_text().splitlines()
    found = []
    for line in lines:
        verdict, spiffe_id, *part = line.split("\t")
        if verdict == "invalid":
            # "empty segment / trailing '/'": either name is right; take the first.
            found.append((spiffe_id, part[0].split(" / ")[0]))
    return found


def _broken_peers(imported: ImportedAuthority) -> dict[str, Peer]:
    def leaf(uris: list[str], *reason: str, **options: Any) -> Peer:
        made = imported.leaf(uris=uris, **options)
        return Peer(made.chain_pem, made.key_pem, reason)

    other = f"spiffe://{TRUST_DOMAIN}/other"
    peers = {
        "005-https-uri-then-spiffe-id": _case_005(
            imported, "svid-https-uri-then-spiffe-id", "2 URI SANs"
        ),
        "005-two-spiffe-ids": _case_005(imported, "svid-two-spiffe-ids", "2 URI SANs"),
        "two-ids": leaf([WORKLOAD, other], "2 URI SANs"),
        "two-ids-other-order": leaf([other, WORKLOAD], "2 URI SANs"),
        "https-then-id": leaf(["https://example.org/x", WORKLOAD], "2 URI SANs"),
        "id-then-https": leaf([WORKLOAD, "https://example.org/x"], "2 URI SANs"),
        "three-ids": leaf([WORKLOAD, other, f"{other}/b"], "3 URI SANs"),
        "no-uri": leaf([], "0 URI SANs", dns_names=["api.example.org"]),
        "uppercase-trust-domain": leaf(
            ["spiffe://EXAMPLE.org/workload/api"], "not a valid SPIFFE ID", "character 'E'"
        ),
        "trust-domain-id": leaf([f"spiffe://{TRUST_DOMAIN}"], "no path"),
        "ca-true": leaf([WORKLOAD], "CA:TRUE", ca=True),
        "key-cert-sign": leaf(
            [WORKLOAD], "keyCertSign", usages=("digital_signature", "key_cert_sign")
        ),
        "crl-sign": leaf([WORKLOAD], "cRLSign", usages=("digital_signature", "crl_sign")),
        "other-trust-domain": leaf(["spiffe://other.org/workload/api"], "other.org"),
    }
    for index, (spiffe_id, part) in enumerate(_invalid_ids()):
        try:
            peers[f"006-{index}-{part}"] = leaf([spiffe_id], "not a valid SPIFFE ID", part)
        except ValueError:
            # A URI that cryptography cannot put in a URI SAN at all; nothing to present.
            continue
    return peers


def _call(
    imported: ImportedAuthority, peer: Peer, entry_point: str
) -> tuple[grpc.StatusCode, str]:
    """Call one entry point presenting ``peer``; for the stream, its first message."""
    with imported.ca.channel(peer.chain_pem, peer.key_pem) as channel:
        ca = ca_pb2_grpc.CertificateAuthorityStub(channel)
        try:
            if entry_point == "Renew":
                ca.Renew(ca_pb2.RenewRequest(csr=_csr()), timeout=CALL_TIMEOUT_SECONDS)
            elif entry_point == "Delegate":
                ca.Delegate(
                    ca_pb2.DelegateRequest(
                        csr=_csr(f"{WORKLOAD}/child"),
                        spiffe_id=f"{WORKLOAD}/child",
                        permissions=[],
                        audiences=[],
                        max_depth=0,
                        ttl_seconds=600,
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            elif entry_point == "GetStatus":
                admin_pb2_grpc.AdminStub(channel).GetStatus(
                    admin_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT_SECONDS
                )
            else:
                stream = ca.WatchTrustBundle(
                    ca_pb2.WatchTrustBundleRequest(), timeout=CALL_TIMEOUT_SECONDS
                )
                try:
                    next(stream)
                finally:
                    stream.cancel()
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


# -- refused peers ----------------------------------------------------------------------------


def test_every_invalid_line_of_case_006_becomes_a_peer(imported: ImportedAuthority) -> None:
    peers = _broken_peers(imported)

    # The ".." segment of the case's fault class is among them, and at most the lines that
    # cryptography cannot encode are missing.
    assert any(p.reason[-1] == "segment '..'" for p in peers.values())
    assert sum(name.startswith("006-") for name in peers) >= len(_invalid_ids()) - 2


@pytest.fixture
def entries_for_their_ids(imported: ImportedAuthority) -> Iterator[None]:
    """Entries for the IDs the broken leaves name, so a CA that picked one would let it in."""
    made = [
        imported.ca.create_entry(path, ("*",), ("*",), 2, 600)
        for path in ("/workload/api", "/admin", "/other")
    ]
    yield
    with imported.ca.admin_channel() as channel:
        for spiffe_id in made:
            admin_pb2_grpc.AdminStub(channel).DeleteEntry(
                admin_pb2.DeleteEntryRequest(spiffe_id=spiffe_id), timeout=CALL_TIMEOUT_SECONDS
            )


@pytest.mark.usefixtures("entries_for_their_ids")
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_broken_peer_certificates_are_unauthenticated_with_the_reason(
    imported: ImportedAuthority, entry_point: str
) -> None:
    wrong = []
    for name, peer in _broken_peers(imported).items():
        code, details = _call(imported, peer, entry_point)
        if code != grpc.StatusCode.UNAUTHENTICATED or not all(
            word in details for word in peer.reason
        ):
            wrong.append(f"{name}: {code.name}: {details[:200]!r} (want {peer.reason})")

    assert not wrong, f"{entry_point} as a broken peer:\n" + "\n".join(wrong)


# -- the conforming leaf without a scope extension -------------------------------------------


def test_case_005_ok_leaf_carries_no_scope_extension(imported: ImportedAuthority) -> None:
    leaf = x509.load_pem_x509_certificate((imported.case_005 / "svid-one-uri-ok.pem").read_bytes())

    assert SCOPE_OID not in [e.oid for e in leaf.extensions]


def test_ok_leaf_without_entry_authenticates_but_cannot_renew(
    imported: ImportedAuthority,
) -> None:
    # SPEC §3: it authenticates with an empty scope; SPEC §4: Renew takes the entry's scope,
    # and there is no entry for it.
    peer = _case_005(imported, "svid-one-uri-ok")

    code, details = _call(imported, peer, "Renew")

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "no registration entry" in details
    assert WORKLOAD in details


def test_ok_leaf_is_denied_admin_calls_by_its_empty_scope(imported: ImportedAuthority) -> None:
    peer = _case_005(imported, "svid-one-uri-ok")

    code, details = _call(imported, peer, "GetStatus")

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert WORKLOAD in details
    assert "/dmc.v1.Admin/GetStatus" in details


def test_ok_leaf_cannot_delegate_with_depth_zero(imported: ImportedAuthority) -> None:
    peer = _case_005(imported, "svid-one-uri-ok")

    code, details = _call(imported, peer, "Delegate")

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "depth" in details


def test_ok_leaf_may_watch_the_trust_bundle(imported: ImportedAuthority) -> None:
    # SPEC §4: the CertificateAuthority RPCs are open to any valid SVID of the trust domain.
    peer = _case_005(imported, "svid-one-uri-ok")

    assert _call(imported, peer, "WatchTrustBundle") == (grpc.StatusCode.OK, "")


def test_leaf_of_the_imported_root_renews_into_its_entrys_scope(
    imported: ImportedAuthority,
) -> None:
    # A certificate issued by the imported CA, before dmc, with no scope extension: with an
    # entry, Renew gives a dmc SVID with the entry's current scope (SPEC §3, §4).
    spiffe_id = imported.ca.create_entry(
        "/imported/renews", ("/demo.Echo/*",), (f"spiffe://{TRUST_DOMAIN}/db",), 1, 600
    )
    peer = imported.leaf(uris=[spiffe_id])

    with imported.ca.channel(peer.chain_pem, peer.key_pem) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=_csr(spiffe_id)), timeout=CALL_TIMEOUT_SECONDS
        )

    leaf = x509.load_der_x509_certificate(response.certificate_chain[0])
    assert response.spiffe_id == spiffe_id
    assert SCOPE_OID in [e.oid for e in leaf.extensions]
    leaf.verify_directly_issued_by(imported.root.certificate)


def test_case_008_peer_with_empty_subject_and_critical_san_is_accepted(
    imported: ImportedAuthority,
) -> None:
    spiffe_id = imported.ca.create_entry("/case-008/peer", ("*",), ("*",), 0, 600)
    made = make_leaf(imported.root, uris=[spiffe_id], subject=x509.Name([]), san_critical=True)
    peer = Peer(_pem(made.certificate), _key_pem(made.key), ())
    assert made.certificate.subject == x509.Name([])
    san = made.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical

    with imported.ca.channel(peer.chain_pem, peer.key_pem) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
            ca_pb2.RenewRequest(csr=_csr(spiffe_id)), timeout=CALL_TIMEOUT_SECONDS
        )

    assert response.spiffe_id == spiffe_id
