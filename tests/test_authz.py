"""The authorizing server interceptor (SPEC §7) on a real sync gRPC server with mTLS.

SVIDs come from a real CA replica (``CaHarness``) through Bootstrap and Delegate; the
callee is a ``grpc.server`` on 127.0.0.1 port 0 that requires client certificates and
serves a small bytes-in, bytes-out test service of all four call kinds, whose behaviours
answer with the peer they see through ``dmc.authz.current_peer``. The helpers here are
shared with ``test_authz_aio.py`` and ``test_authz_revocation.py``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import dmc.authz
from ca_harness import CaHarness, ImportedCa
from certgen import CertAndKey, make_leaf, make_root
from dmc.authz import Authorizer, AuthorizingInterceptor, Peer, current_peer
from dmc.errors import InvalidSvid, PermissionDenied, Unauthenticated
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.revocation import Revocation, RevocationKind, RevocationSet
from dmc.scope import DelegationScope
from dmc.svid import Svid, parse_svid
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2
from dmc_ca.etcd_process import EtcdProcess

CASES = Path(__file__).parent / "cases"
SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI_STREAM = f"/{SERVICE}/BidiStream"
KINDS = (UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM)
RPC_TIMEOUT = 10.0


# -- identities from the CA -----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A certificate as a server or client presents it: PEM chain (leaf first) and key."""

    chain_pem: bytes
    key_pem: bytes

    @property
    def svid(self) -> Svid:
        return parse_svid(x509.load_pem_x509_certificates(self.chain_pem)[0])

    @property
    def spiffe_id(self) -> str:
        return str(self.svid.spiffe_id)

    @classmethod
    def of(cls, made: CertAndKey) -> Identity:
        return cls(certificates_to_pem([made.certificate]), private_key_to_pem(made.key))


def _csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)


def _identity(response: ca_pb2.SVIDResponse, key: ec.EllipticCurvePrivateKey) -> Identity:
    chain = [x509.load_der_x509_certificate(der) for der in response.certificate_chain]
    return Identity(certificates_to_pem(chain), private_key_to_pem(key))


def issue(
    ca: CaHarness,
    path: str,
    *,
    permissions: tuple[str, ...] = ("*",),
    audiences: tuple[str, ...] = ("*",),
    max_depth: int = 2,
    dns_names: tuple[str, ...] = (),
) -> Identity:
    """Register ``path`` and bootstrap its first SVID with a join token."""
    spiffe_id = ca.create_entry(
        path, permissions, audiences, max_depth=max_depth, dns_names=dns_names
    )
    token = ca.join_token(spiffe_id)
    key = ec.generate_private_key(ec.SECP256R1())
    request = ca_pb2.BootstrapRequest(join_token=token, csr=_csr(key, spiffe_id))
    with ca.bootstrap_channel() as channel:
        response = ca.ca_stub(channel).Bootstrap(request, timeout=RPC_TIMEOUT)
    return _identity(response, key)


def delegate(
    ca: CaHarness,
    parent: Identity,
    child_id: str,
    *,
    permissions: tuple[str, ...],
    audiences: tuple[str, ...],
    max_depth: int = 0,
    ttl_seconds: int = 600,
) -> Identity:
    """A delegated SVID for ``child_id`` from ``parent`` (SPEC §3, Delegate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = ca_pb2.DelegateRequest(
        csr=_csr(key, child_id),
        spiffe_id=child_id,
        permissions=permissions,
        audiences=audiences,
        max_depth=max_depth,
        ttl_seconds=ttl_seconds,
    )
    with ca.channel(parent.chain_pem, parent.key_pem) as channel:
        response = ca.ca_stub(channel).Delegate(request, timeout=RPC_TIMEOUT)
    return _identity(response, key)


def renew(ca: CaHarness, current: Identity) -> Identity:
    """A fresh SVID of the same ID and scope (SPEC §4, Renew)."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = ca_pb2.RenewRequest(csr=_csr(key, current.spiffe_id))
    with ca.channel(current.chain_pem, current.key_pem) as channel:
        response = ca.ca_stub(channel).Renew(request, timeout=RPC_TIMEOUT)
    return _identity(response, key)


def revoke(
    ca: CaHarness, *, serial: str | None = None, spiffe_id: str | None = None, reason: str
) -> ca_pb2.Revocation:
    """Revoke through the Admin service with the admin credential."""
    request = admin_pb2.RevokeRequest(serial=serial, spiffe_id=spiffe_id, reason=reason)
    with ca.admin_channel() as channel:
        return admin_pb2_grpc.AdminStub(channel).Revoke(request, timeout=RPC_TIMEOUT)


def unique_dns_name(label: str) -> str:
    """A DNS name no other entry of the CA holds (SPEC §4: one ID per name)."""
    return f"{label}-{uuid.uuid4().hex[:8]}.example.org"


# -- the test service -----------------------------------------------------------------------


def who() -> bytes:
    """The peer the behaviour sees: ``spiffe_id|delegator,delegator``."""
    peer = current_peer()
    return f"{peer.spiffe_id}|{','.join(map(str, peer.delegators))}".encode()


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return who()


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    # Each step looks again, so a peer lost between steps would show.
    yield who()
    yield who()


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return who() + b"#" + str(sum(1 for _ in requests)).encode()


def _bidi_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in requests:
        yield who()


def echo_handler() -> grpc.GenericRpcHandler:
    """The sync test service: raw bytes, no serializers."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
            "BidiStream": grpc.stream_stream_rpc_method_handler(_bidi_stream),
        },
    )


def server_credentials(identity: Identity, bundle_pem: bytes) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.chain_pem)],
        root_certificates=bundle_pem,
        require_client_auth=True,
    )


@contextmanager
def serve(
    identity: Identity, bundle_pem: bytes, interceptor: grpc.ServerInterceptor | None
) -> Iterator[str]:
    """Run the test service (and health) with ``identity`` on 127.0.0.1; yield its address."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        interceptors=[interceptor] if interceptor is not None else [],
        handlers=[echo_handler()],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity, bundle_pem))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def client_channel(
    address: str, identity: Identity, bundle_pem: bytes, server_name: str
) -> grpc.Channel:
    """An mTLS channel presenting ``identity``, pinning the server by its DNS name."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.chain_pem,
    )
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )


def call(channel: grpc.Channel, method: str) -> list[bytes]:
    """Call ``method`` of the test service in its kind; return every response."""
    if method == UNARY:
        return [channel.unary_unary(method)(b"one", timeout=RPC_TIMEOUT)]
    if method == SERVER_STREAM:
        return list(channel.unary_stream(method)(b"one", timeout=RPC_TIMEOUT))
    if method == CLIENT_STREAM:
        return [channel.stream_unary(method)(iter([b"a", b"b"]), timeout=RPC_TIMEOUT)]
    if method == BIDI_STREAM:
        return list(channel.stream_stream(method)(iter([b"a", b"b"]), timeout=RPC_TIMEOUT))
    # Any other method name, called as unary (the server may not serve it).
    return [channel.unary_unary(method)(b"one", timeout=RPC_TIMEOUT)]


def refusal(channel: grpc.Channel, method: str) -> grpc.RpcError:
    """The error a refused call of ``method`` raises."""
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, method)
    return caught.value


def code_and_details(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


# -- a callee, a caller and a delegate on one CA --------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A callee with a DNS name, a root caller ``web`` and a delegate of it, ``web/job``."""

    ca: CaHarness
    callee: Identity
    callee_dns: str
    web: Identity
    job: Identity


def make_scenario(
    ca: CaHarness, job_permissions: tuple[str, ...] = (UNARY,), callee_path: str = "/callee"
) -> Scenario:
    callee_dns = unique_dns_name("callee")
    callee = issue(ca, callee_path, dns_names=(callee_dns,))
    web = issue(ca, "/web")
    job = delegate(
        ca,
        web,
        ca.id("/web/job"),
        permissions=job_permissions,
        audiences=(callee.spiffe_id,),
    )
    return Scenario(ca, callee, callee_dns, web, job)


@pytest.fixture
def scenario(ca: CaHarness) -> Scenario:
    return make_scenario(ca)


@contextmanager
def callee_server(
    scenario: Scenario, revocations: dmc.authz.RevocationChecker | None = None
) -> Iterator[str]:
    interceptor = AuthorizingInterceptor(scenario.callee.spiffe_id, revocations=revocations)
    with serve(scenario.callee, scenario.ca.bundle_pem, interceptor) as address:
        yield address


@contextmanager
def as_caller(scenario: Scenario, address: str, identity: Identity) -> Iterator[grpc.Channel]:
    with client_channel(address, identity, scenario.ca.bundle_pem, scenario.callee_dns) as ch:
        yield ch


# -- delegation scope at the callee ---------------------------------------------------------


def test_delegate_calls_its_permitted_method_and_the_handler_sees_the_peer(
    scenario: Scenario,
) -> None:
    with callee_server(scenario) as address, as_caller(scenario, address, scenario.job) as ch:
        responses = call(ch, UNARY)

    assert responses == [f"{scenario.job.spiffe_id}|{scenario.web.spiffe_id}".encode()]


def test_delegate_is_refused_a_method_outside_its_permissions(scenario: Scenario) -> None:
    with callee_server(scenario) as address, as_caller(scenario, address, scenario.job) as ch:
        code, details = code_and_details(refusal(ch, SERVER_STREAM))

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert SERVER_STREAM in details
    assert scenario.job.spiffe_id in details
    assert UNARY in details


def test_delegate_is_refused_by_a_server_outside_its_audiences(scenario: Scenario) -> None:
    other_dns = unique_dns_name("other")
    other = issue(scenario.ca, "/other", dns_names=(other_dns,))
    interceptor = AuthorizingInterceptor(other.spiffe_id)

    with (
        serve(other, scenario.ca.bundle_pem, interceptor) as address,
        client_channel(address, scenario.job, scenario.ca.bundle_pem, other_dns) as channel,
    ):
        code, details = code_and_details(refusal(channel, UNARY))

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "audiences" in details
    assert other.spiffe_id in details


def test_every_call_kind_is_authorized_and_sees_the_peer_at_each_step(ca: CaHarness) -> None:
    scenario = make_scenario(ca, job_permissions=(f"/{SERVICE}/*",))
    expected = f"{scenario.job.spiffe_id}|{scenario.web.spiffe_id}".encode()

    with callee_server(scenario) as address, as_caller(scenario, address, scenario.job) as ch:
        results = {method: call(ch, method) for method in KINDS}

    assert results[UNARY] == [expected]
    assert results[SERVER_STREAM] == [expected, expected]
    assert results[CLIENT_STREAM] == [expected + b"#2"]
    assert results[BIDI_STREAM] == [expected, expected]


@pytest.mark.parametrize("method", KINDS)
def test_every_call_kind_is_refused_outside_the_scope(ca: CaHarness, method: str) -> None:
    scenario = make_scenario(ca, job_permissions=("/test.Other/*",))

    with callee_server(scenario) as address, as_caller(scenario, address, scenario.job) as ch:
        code, details = code_and_details(refusal(ch, method))

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert method in details


def test_root_svid_with_wildcard_scope_is_admitted(scenario: Scenario) -> None:
    with callee_server(scenario) as address, as_caller(scenario, address, scenario.web) as ch:
        responses = call(ch, SERVER_STREAM)

    assert responses == [f"{scenario.web.spiffe_id}|".encode()] * 2


def test_health_check_is_exempt_from_the_scope(scenario: Scenario) -> None:
    with callee_server(scenario) as address, as_caller(scenario, address, scenario.job) as ch:
        response = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_without_the_interceptor_the_same_call_passes(scenario: Scenario) -> None:
    # The contrast that shows the refusals above come from the interceptor, not from TLS.
    with (
        serve(scenario.callee, scenario.ca.bundle_pem, None) as address,
        as_caller(scenario, address, scenario.job) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        call(channel, SERVER_STREAM)

    # No interceptor: the behaviour runs and finds no authorized peer.
    assert caught.value.code() is grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]


# -- peers that chain to the bundle but are refused -----------------------------------------


@dataclass(frozen=True)
class ImportedRoot:
    """A CA replica initialised with an imported root, and that root with its key."""

    ca: CaHarness
    root: CertAndKey
    root_dir: Path


@pytest.fixture
def imported(etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> Iterator[ImportedRoot]:
    root = make_root("example.org")
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    (root_dir / "root.pem").write_bytes(certificates_to_pem([root.certificate]))
    (root_dir / "root.key").write_bytes(private_key_to_pem(root.key))
    harness = CaHarness(
        etcd.endpoint,
        etcd_prefix,
        tmp_path / "ca",
        imported=ImportedCa(
            chain_pem=certificates_to_pem([root.certificate]),
            key_pem=private_key_to_pem(root.key),
        ),
    )
    harness.start()
    try:
        yield ImportedRoot(harness, root, root_dir)
    finally:
        harness.stop()


def test_svid_without_scope_extension_holds_an_empty_scope_and_is_refused(
    imported: ImportedRoot,
) -> None:
    scenario = make_scenario(imported.ca)
    caller = Identity.of(make_leaf(imported.root, uris=(imported.ca.id("/web/plain"),)))
    assert caller.svid.scope == DelegationScope()

    with callee_server(scenario) as address, as_caller(scenario, address, caller) as channel:
        code, details = code_and_details(refusal(channel, UNARY))

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "none" in details


def test_case_005_leaves_are_unauthenticated_with_the_uri_san_count(
    imported: ImportedRoot, tmp_path: Path
) -> None:
    scenario = make_scenario(imported.ca)
    out = tmp_path / "case005"
    subprocess.run(
        [
            sys.executable,
            str(CASES / "005-svid-with-several-uri-sans" / "gen.py"),
            "--out",
            str(out),
            "--ca-cert",
            str(imported.root_dir / "root.pem"),
            "--ca-key",
            str(imported.root_dir / "root.key"),
        ],
        check=True,
        timeout=60,
    )

    outcomes = {}
    with callee_server(scenario) as address:
        for name in ("svid-https-uri-then-spiffe-id", "svid-two-spiffe-ids", "svid-one-uri-ok"):
            caller = Identity(
                (out / f"{name}.pem").read_bytes(), (out / f"{name}.key").read_bytes()
            )
            with as_caller(scenario, address, caller) as channel:
                outcomes[name] = code_and_details(refusal(channel, UNARY))

    for name in ("svid-https-uri-then-spiffe-id", "svid-two-spiffe-ids"):
        code, details = outcomes[name]
        assert code is grpc.StatusCode.UNAUTHENTICATED, name
        assert "2 URI SANs" in details, name
    # The conforming leaf authenticates; its missing scope extension leaves it no rights.
    assert outcomes["svid-one-uri-ok"][0] is grpc.StatusCode.PERMISSION_DENIED


def test_peer_of_another_trust_domain_is_unauthenticated(imported: ImportedRoot) -> None:
    scenario = make_scenario(imported.ca)
    stranger = make_leaf(
        imported.root,
        uris=("spiffe://other.org/web",),
        scope=DelegationScope(permissions=("*",), audiences=("*",)),
    )
    caller = Identity.of(stranger)

    with callee_server(scenario) as address, as_caller(scenario, address, caller) as channel:
        code, details = code_and_details(refusal(channel, UNARY))

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "other.org" in details
    assert "example.org" in details


def test_leaf_with_signing_powers_is_unauthenticated(imported: ImportedRoot) -> None:
    scenario = make_scenario(imported.ca)
    signer = make_leaf(
        imported.root,
        uris=(imported.ca.id("/web/signer"),),
        usages=("digital_signature", "key_cert_sign"),
        scope=DelegationScope(permissions=("*",), audiences=("*",)),
    )
    caller = Identity.of(signer)

    with callee_server(scenario) as address, as_caller(scenario, address, caller) as channel:
        code, details = code_and_details(refusal(channel, UNARY))

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "keyCertSign" in details


# -- the authorizer alone -------------------------------------------------------------------


def _pem(leaf: CertAndKey) -> bytes:
    return certificates_to_pem([leaf.certificate])


OWN_ID = "spiffe://example.org/callee"


@functools.cache
def _root() -> CertAndKey:
    return make_root("example.org")


def _leaf(path: str = "/web/job", **scope: object) -> CertAndKey:
    fields: dict[str, object] = {"permissions": (UNARY,), "audiences": (OWN_ID,)}
    fields.update(scope)
    return make_leaf(
        _root(),
        uris=(f"spiffe://example.org{path}",),
        scope=DelegationScope(**fields),  # type: ignore[arg-type]
    )


def test_authorizer_returns_the_peer_with_its_delegators() -> None:
    leaf = _leaf(delegators=("spiffe://example.org/web",))

    peer = Authorizer(OWN_ID).authorize(_pem(leaf), UNARY)

    assert isinstance(peer, Peer)
    assert str(peer.spiffe_id) == "spiffe://example.org/web/job"
    assert [str(d) for d in peer.delegators] == ["spiffe://example.org/web"]
    assert peer.serial == leaf.certificate.serial_number
    assert peer.serial_hex == format(leaf.certificate.serial_number, "x")
    assert peer.not_after == leaf.certificate.not_valid_after_utc


def test_authorizer_matches_service_wildcards_by_service_name() -> None:
    authorizer = Authorizer(OWN_ID)
    pem = _pem(_leaf(permissions=(f"/{SERVICE}/*",)))

    authorizer.authorize(pem, BIDI_STREAM)
    with pytest.raises(PermissionDenied, match="not covered"):
        authorizer.authorize(pem, "/test.EchoMore/Unary")


def test_authorizer_matches_audiences_by_path_segments() -> None:
    pem = _pem(_leaf(audiences=("spiffe://example.org/callee/*",)))

    Authorizer("spiffe://example.org/callee/eu").authorize(pem, UNARY)
    with pytest.raises(PermissionDenied, match="audiences"):
        Authorizer("spiffe://example.org/calleex").authorize(pem, UNARY)


def test_authorizer_refuses_a_missing_or_unreadable_certificate() -> None:
    authorizer = Authorizer(OWN_ID)

    with pytest.raises(Unauthenticated, match="client certificate is required"):
        authorizer.authorize(None, UNARY)
    with pytest.raises(InvalidSvid, match="cannot be read"):
        authorizer.authorize(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", UNARY
        )


def test_authorizer_refuses_an_expired_certificate_on_an_open_connection() -> None:
    past = datetime(2020, 1, 1, tzinfo=UTC)
    expired = make_leaf(
        make_root("example.org", now=past),
        uris=("spiffe://example.org/web",),
        scope=DelegationScope(permissions=("*",), audiences=("*",)),
        issued_at=past,
    )

    with pytest.raises(Unauthenticated, match="expired"):
        Authorizer(OWN_ID).authorize(_pem(expired), UNARY)


def test_authorizer_checks_revocations_on_every_call() -> None:
    leaf = _leaf(delegators=("spiffe://example.org/web",))
    authorizer = Authorizer(OWN_ID, revocations=RevocationSet.empty())
    authorizer.authorize(_pem(leaf), UNARY)

    now = datetime.now(UTC).replace(microsecond=0)
    revoked = Revocation(
        RevocationKind.ID, "spiffe://example.org/web", "key leaked", now, now.replace(year=2100)
    )
    authorizer.revocations = RevocationSet.of([revoked], revision=7)

    with pytest.raises(PermissionDenied, match=r"delegator of spiffe://example\.org/web/job"):
        authorizer.authorize(_pem(leaf), UNARY)


def test_authorizer_parses_each_certificate_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[x509.Certificate] = []

    def counting_parse(certificate: x509.Certificate) -> Svid:
        parsed.append(certificate)
        return parse_svid(certificate)

    monkeypatch.setattr(dmc.authz, "parse_svid", counting_parse)
    authorizer = Authorizer(OWN_ID)
    first, second = _pem(_leaf()), _pem(_leaf())

    for _ in range(20):
        authorizer.authorize(first, UNARY)
        authorizer.authorize(second, UNARY)
        with pytest.raises(PermissionDenied):
            authorizer.authorize(first, SERVER_STREAM)

    assert len(parsed) == 2


def test_current_peer_outside_an_authorized_call_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match="AuthorizingInterceptor"):
        current_peer()


def test_interceptor_from_source_takes_the_sources_own_id() -> None:
    svid = parse_svid(_leaf("/callee").certificate)

    @dataclass(frozen=True)
    class Snapshot:
        svid: Svid
        chain: tuple[x509.Certificate, ...]
        bundle: tuple[x509.Certificate, ...]

    class Source:
        def __init__(self) -> None:
            self.subscribers: list[Any] = []

        def current(self) -> Snapshot:
            return Snapshot(svid, (svid.certificate,), ())

        def subscribe(self, callback: Any) -> Any:
            self.subscribers.append(callback)
            return lambda: None

    source = Source()
    interceptor = AuthorizingInterceptor.from_source(source)

    assert str(interceptor.own_id) == "spiffe://example.org/callee"
    assert interceptor.authorizer.trust_domain == "example.org"
    assert len(source.subscribers) == 1


def test_peer_not_issued_by_a_current_signer_is_refused() -> None:
    # A forced retirement takes the old root out of the bundle; connections opened before
    # it must stop being accepted too.
    old_root = make_root("example.org")
    new_root = make_root("example.org")
    scope = DelegationScope(permissions=("*",), audiences=("*",))
    leaf = make_leaf(old_root, uris=("spiffe://example.org/caller",), scope=scope)
    authorizer = Authorizer("spiffe://example.org/callee")
    pem = leaf.certificate.public_bytes(serialization.Encoding.PEM)

    authorizer.trust_signers([old_root.certificate, new_root.certificate])
    assert authorizer.authorize(pem, "/demo.Echo/Say").spiffe_id.path == "/caller"

    authorizer.trust_signers([new_root.certificate])
    with pytest.raises(Unauthenticated, match="not issued by an authority of the current"):
        authorizer.authorize(pem, "/demo.Echo/Say")
