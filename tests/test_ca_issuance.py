"""The CA's issuing RPCs against a real CA replica, a real etcd and real gRPC (SPEC §2 to §4).

Every entry point that takes a CSR (Bootstrap, Renew, Delegate) is given each broken CSR of
``tests/cases``, rebuilt by the case's ``gen.py`` for the ID that entry point issues. A
refused call must name what was wrong, use the status of SPEC §4 and write nothing to etcd;
an accepted one must yield a leaf that follows the X.509-SVID profile of SPEC §2 field by
field. The delegation subset rule (SPEC §3) and the Admin service's scope check are driven
through the RPCs too.
"""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from etcd3aio import Etcd3Client, prefix_range_end

from ca_harness import CaHarness, ImportedCa
from certgen import make_intermediate, make_root, new_key
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.scope import DelegationScope, decode_scope
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess

CASES = Path(__file__).parent / "cases"
# The project's venv interpreter: the cases' gen.py scripts need its cryptography.
PYTHON = sys.executable
# SPEC §3 fixes the number; written out here so that a wrong constant in the code shows.
SCOPE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.32473.4.1")
BACKDATE = timedelta(seconds=30)
DEFAULT_SVID_TTL = timedelta(hours=1)
TIMEOUT = 15

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

EtcdState = dict[bytes, tuple[int, bytes]]
BuildCase = Callable[[str, str], Path]


# ---------------------------------------------------------------- helpers


def etcd_state(ca: CaHarness) -> EtcdState:
    """Every key under the replica's prefix with its mod revision and value, read from etcd.

    Read from etcd itself, not the replica's view: the view follows etcd asynchronously
    (a Bootstrap's token deletion reaches it after the RPC returns), so its revision is no
    exact witness of "nothing written", while a linearizable read of the prefix is.
    """

    async def read() -> EtcdState:
        client = Etcd3Client([ca.etcd_endpoint])
        await client.connect()
        try:
            assert client.kv is not None
            response = await client.kv.get(ca.prefix, range_end=prefix_range_end(ca.prefix))
        finally:
            await client.close()
        return {kv.key: (int(kv.mod_revision), kv.value) for kv in response.kvs}

    return ca.run(read())


def refused(ca: CaHarness, call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Make a call that must fail; check it wrote nothing to etcd; return code and details."""
    before = etcd_state(ca)
    assert before, f"nothing under {ca.prefix}: the comparison would prove nothing"
    with pytest.raises(grpc.RpcError) as info:
        call()
    after = etcd_state(ca)

    assert after == before, "a refused call changed etcd"
    error: Any = info.value
    return error.code(), error.details() or ""


def pem_body_to_der(pem: bytes) -> bytes:
    """The DER between the armour lines, decoded without parsing (broken CSRs stay broken)."""
    lines = pem.decode("ascii").strip().splitlines()
    assert lines[0].startswith("-----BEGIN") and lines[-1].startswith("-----END")
    return base64.b64decode("".join(lines[1:-1]))


def read_csr(path: Path) -> bytes:
    return pem_body_to_der(path.read_bytes())


def generate_case(case: str, out: Path, spiffe_id: str | None = None) -> Path:
    """Rebuild ``tests/cases/<case>`` into ``out`` with its own gen.py, for ``spiffe_id``."""
    command = [PYTHON, str(CASES / case / "gen.py"), "--out", str(out)]
    if spiffe_id is not None:
        command += ["--id", spiffe_id]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return out


def make_csr(key: PrivateKeyTypes, uris: tuple[str, ...] = ()) -> bytes:
    """A DER CSR with an empty subject and the given URI SANs (none: no SAN extension)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def ca_stub(channel: grpc.Channel) -> ca_pb2_grpc.CertificateAuthorityStub:
    return ca_pb2_grpc.CertificateAuthorityStub(channel)


def admin_stub(channel: grpc.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


@dataclass(frozen=True)
class Workload:
    """An SVID the CA issued and the private key it belongs to."""

    key: PrivateKeyTypes
    response: ca_pb2.SVIDResponse

    @property
    def chain(self) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(der) for der in self.response.certificate_chain]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def scope(self) -> DelegationScope:
        return scope_of(self.leaf)

    def channel(self, ca: CaHarness) -> grpc.Channel:
        return ca.channel(certificates_to_pem(self.chain), private_key_to_pem(self.key))


def bootstrap(ca: CaHarness, spiffe_id: str, key_type: str = "ec-p256") -> Workload:
    """Bootstrap ``spiffe_id`` (its entry exists) with a fresh key and join token."""
    key = new_key(key_type)
    request = ca_pb2.BootstrapRequest(
        join_token=ca.join_token(spiffe_id), csr=make_csr(key, (spiffe_id,))
    )
    with ca.bootstrap_channel() as channel:
        response = ca_stub(channel).Bootstrap(request, timeout=TIMEOUT)
    return Workload(key, response)


def renew(ca: CaHarness, caller: Workload, key_type: str = "ec-p256") -> Workload:
    key = new_key(key_type)
    own_id = uri_sans(caller.leaf)[0]
    with caller.channel(ca) as channel:
        response = ca_stub(channel).Renew(
            ca_pb2.RenewRequest(csr=make_csr(key, (own_id,))), timeout=TIMEOUT
        )
    return Workload(key, response)


def delegate_request(
    csr: bytes,
    spiffe_id: str,
    permissions: tuple[str, ...] = ("/demo.Echo/*",),
    audiences: tuple[str, ...] = ("*",),
    max_depth: int = 0,
    ttl_seconds: int = 600,
) -> ca_pb2.DelegateRequest:
    return ca_pb2.DelegateRequest(
        csr=csr,
        spiffe_id=spiffe_id,
        permissions=permissions,
        audiences=audiences,
        max_depth=max_depth,
        ttl_seconds=ttl_seconds,
    )


def delegate(ca: CaHarness, caller: Workload, spiffe_id: str, **scope: Any) -> Workload:
    key = new_key()
    with caller.channel(ca) as channel:
        response = ca_stub(channel).Delegate(
            delegate_request(make_csr(key, (spiffe_id,)), spiffe_id, **scope), timeout=TIMEOUT
        )
    return Workload(key, response)


def leaf_of(response: ca_pb2.SVIDResponse) -> x509.Certificate:
    return x509.load_der_x509_certificate(response.certificate_chain[0])


def uri_sans(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def scope_of(certificate: x509.Certificate) -> DelegationScope:
    value = certificate.extensions.get_extension_for_oid(SCOPE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return decode_scope(value.value)


def bundle_roots(response: ca_pb2.SVIDResponse) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(a.certificate) for a in response.bundle.authorities]


def root_svid_scope(
    permissions: tuple[str, ...], audiences: tuple[str, ...], max_depth: int
) -> DelegationScope:
    return DelegationScope(
        permissions=permissions,
        audiences=audiences,
        max_depth=max_depth,
        delegators=(),
        not_after=None,
    )


def whole_seconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


# ---------------------------------------------------------------- entry points


class Issuer:
    """One entry point that takes a CSR, set up to issue ``spiffe_id``.

    Bootstrap presents one join token until a call succeeds, so a success after refusals
    proves the refusals left the token unspent; it then takes a fresh token. Renew calls as
    an SVID of ``spiffe_id``; Delegate calls as the SVID of the parent ``/delegate``.
    """

    def __init__(self, ca: CaHarness, kind: str, stack: ExitStack) -> None:
        self.ca = ca
        self.kind = kind
        # Each entry point issues an ID of its own, none of them the committed files' ID.
        if kind == "Bootstrap":
            self.spiffe_id = ca.create_entry("/boot/api")
            self._token = ca.join_token(self.spiffe_id)
            self._channel = stack.enter_context(ca.bootstrap_channel())
        elif kind == "Renew":
            self.spiffe_id = ca.create_entry("/renew/api")
            self._channel = stack.enter_context(bootstrap(ca, self.spiffe_id).channel(ca))
        else:
            parent = ca.create_entry("/delegate", max_depth=2)
            self.spiffe_id = f"{parent}/api"
            self._channel = stack.enter_context(bootstrap(ca, parent).channel(ca))
        self._stub = ca_stub(self._channel)

    def _call(self, csr: bytes) -> ca_pb2.SVIDResponse:
        if self.kind == "Bootstrap":
            request = ca_pb2.BootstrapRequest(join_token=self._token, csr=csr)
            return self._stub.Bootstrap(request, timeout=TIMEOUT)
        if self.kind == "Renew":
            return self._stub.Renew(ca_pb2.RenewRequest(csr=csr), timeout=TIMEOUT)
        return self._stub.Delegate(delegate_request(csr, self.spiffe_id), timeout=TIMEOUT)

    def refuse(self, csr: bytes) -> tuple[grpc.StatusCode, str]:
        """Submit a CSR that must be refused, with nothing written to etcd."""
        return refused(self.ca, lambda: self._call(csr))

    def accept(self, csr: bytes) -> ca_pb2.SVIDResponse:
        """Submit a CSR that must be accepted; the response is checked to be for the ID."""
        response = self._call(csr)
        assert uri_sans(leaf_of(response)) == [self.spiffe_id]
        assert response.spiffe_id == self.spiffe_id
        if self.kind == "Bootstrap":
            self._token = self.ca.join_token(self.spiffe_id)
        return response

    def expected_scope(self, issued_at: datetime) -> DelegationScope:
        """The scope the leaf must carry: its entry's, or the requested delegation's."""
        if self.kind == "Delegate":
            return DelegationScope(
                permissions=("/demo.Echo/*",),
                audiences=("*",),
                max_depth=0,
                delegators=(self.spiffe_id.removesuffix("/api"),),
                not_after=issued_at + timedelta(seconds=600),
            )
        return root_svid_scope(("*",), ("*",), 2)


@pytest.fixture(scope="module")
def build_case(tmp_path_factory: pytest.TempPathFactory) -> BuildCase:
    """``build_case(case, spiffe_id)``: the case rebuilt for that ID, once per module."""
    built: dict[tuple[str, str], Path] = {}

    def build(case: str, spiffe_id: str) -> Path:
        if (case, spiffe_id) not in built:
            out = tmp_path_factory.mktemp(case[:3])
            built[case, spiffe_id] = generate_case(case, out, spiffe_id)
        return built[case, spiffe_id]

    return build


@pytest.fixture(params=["Bootstrap", "Renew", "Delegate"])
def issuer(request: pytest.FixtureRequest, ca: CaHarness) -> Iterator[Issuer]:
    with ExitStack() as stack:
        yield Issuer(ca, request.param, stack)


# ---------------------------------------------------------------- the CSR cases


def test_csr_whose_signature_does_not_verify_is_invalid_argument(
    issuer: Issuer, build_case: BuildCase
) -> None:
    csrs = build_case("001-csr-signature-mismatch", issuer.spiffe_id)

    for name in (
        "csr-signature-bit-flipped.pem",
        "csr-key-swapped.pem",
        "csr-algorithm-relabelled.pem",
    ):
        code, details = issuer.refuse(read_csr(csrs / name))
        assert (code, name) == (INVALID_ARGUMENT, name), details
        assert "signature does not verify" in details, (name, details)

    issuer.accept(read_csr(csrs / "csr-ok.pem"))


def test_csr_asking_for_ca_powers_is_invalid_argument_naming_them(
    issuer: Issuer, build_case: BuildCase
) -> None:
    csrs = build_case("002-csr-requests-ca-powers", issuer.spiffe_id)

    for name, powers in (
        ("csr-ca-true.pem", ("CA:TRUE", "keyCertSign", "cRLSign")),
        ("csr-leaf-with-keycertsign.pem", ("keyCertSign",)),
        ("csr-crlsign.pem", ("cRLSign",)),
    ):
        code, details = issuer.refuse(read_csr(csrs / name))
        assert (code, name) == (INVALID_ARGUMENT, name), details
        for power in powers:
            assert power in details, (name, details)

    leaf = leaf_of(issuer.accept(read_csr(csrs / "csr-ca-false-ok.pem")))
    # Whatever the CSR asked for, the leaf's flags come from the profile alone.
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (usage.digital_signature, usage.key_cert_sign, usage.crl_sign) == (True, False, False)


def test_csr_with_names_beside_its_spiffe_id_is_invalid_argument_naming_each(
    issuer: Issuer, build_case: BuildCase
) -> None:
    csrs = build_case("003-csr-extra-subject-alt-names", issuer.spiffe_id)

    for name, words in (
        ("csr-two-spiffe-ids.pem", ("URI spiffe://example.org/admin",)),
        ("csr-https-uri-first.pem", ("URI https://inventory.example.org/host/42",)),
        ("csr-uri-plus-dns.pem", ("DNS name api.internal.example.org",)),
        ("csr-uri-plus-ip-and-email.pem", ("IP address 10.0.0.7", "ops@example.org")),
    ):
        code, details = issuer.refuse(read_csr(csrs / name))
        assert (code, name) == (INVALID_ARGUMENT, name), details
        for word in words:
            assert word in details, (name, details)

    leaf = leaf_of(issuer.accept(read_csr(csrs / "csr-one-uri-ok.pem")))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(issuer.spiffe_id)]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("csr-reject-rsa-1024.pem", ("RSA key of 1024 bits", "minimum is 2048")),
        ("csr-reject-rsa-2047.pem", ("RSA key of 2047 bits", "2048")),
        ("csr-reject-ec-secp256k1.pem", ("secp256k1", "256 bits")),
        ("csr-reject-ec-p192.pem", ("secp192r1", "192 bits")),
        ("csr-reject-ed25519.pem", ("Ed25519",)),
        ("csr-reject-ed448.pem", ("Ed448",)),
        ("csr-reject-dsa-2048.pem", ("DSA key of 2048 bits",)),
    ],
)
def test_csr_with_weak_or_unsupported_key_is_invalid_argument_naming_it(
    issuer: Issuer, build_case: BuildCase, name: str, words: tuple[str, ...]
) -> None:
    csrs = build_case("004-csr-weak-or-unsupported-key", issuer.spiffe_id)

    code, details = issuer.refuse(read_csr(csrs / name))

    assert code == INVALID_ARGUMENT, details
    # The key's type and size, and the allowed set.
    for word in (*words, "allowed", "P-256", "P-384", "RSA"):
        assert word in details, details
    # A refused Bootstrap left its token unspent: the same token works now.
    issuer.accept(read_csr(csrs / "csr-accept-ec-p256.pem"))


def test_csr_with_allowed_key_gets_the_key_usage_of_its_type(
    issuer: Issuer, build_case: BuildCase
) -> None:
    csrs = build_case("004-csr-weak-or-unsupported-key", issuer.spiffe_id)

    for name, key_encipherment in (
        ("csr-accept-ec-p256.pem", False),
        ("csr-accept-ec-p384.pem", False),
        ("csr-accept-rsa-2048.pem", True),
    ):
        leaf = leaf_of(issuer.accept(read_csr(csrs / name)))
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        # SPEC §2: digitalSignature, plus keyEncipherment for RSA keys only.
        assert usage.value == key_usage(digital_signature=True, key_encipherment=key_encipherment)
        csr_key = x509.load_der_x509_csr(read_csr(csrs / name)).public_key()
        assert leaf.public_key() == csr_key


def test_csr_uri_with_a_dot_dot_segment_is_invalid_argument(
    issuer: Issuer, tmp_path: Path
) -> None:
    # Case 006's gen.py has no --id: its CSR names workload/../admin whatever is issued.
    csrs = generate_case("006-spiffe-id-path-grammar", tmp_path)

    code, details = issuer.refuse(read_csr(csrs / "csr-uri-dot-dot-segment.pem"))

    assert code == INVALID_ARGUMENT, details
    assert "segment '..'" in details


def spiffe_id_lines(verdict: str) -> list[tuple[str, tuple[str, ...]]]:
    """Case 006's table: (ID, the words naming the offending part) for one verdict."""
    lines = (CASES / "006-spiffe-id-path-grammar" / "spiffe-ids.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line]
    return [
        (row[1], tuple(row[2].split(" / ")) if len(row) > 2 else ())
        for row in rows
        if row[0] == verdict
    ]


def csr_for_uri(key: PrivateKeyTypes, uri: str) -> bytes | None:
    """A CSR whose one URI SAN is ``uri``, or None if X.509 cannot carry it as a URI."""
    try:
        csr = make_csr(key, (uri,))
        x509.load_der_x509_csr(csr).extensions  # noqa: B018
    except ValueError:
        return None
    return csr


def test_csr_uri_san_outside_the_spiffe_id_grammar_is_invalid_argument_naming_the_part(
    issuer: Issuer,
) -> None:
    key = new_key()
    tried = 0

    for spiffe_id, parts in spiffe_id_lines("invalid"):
        csr = csr_for_uri(key, spiffe_id)
        if csr is None:
            continue
        tried += 1
        code, details = issuer.refuse(csr)
        assert code == INVALID_ARGUMENT, (spiffe_id[:80], details)
        assert any(part in details for part in parts), (spiffe_id[:80], details)

    assert tried >= 14
    issuer.accept(make_csr(key, (issuer.spiffe_id,)))


def test_csr_uri_san_that_is_a_valid_id_is_issued_at_every_entry_point(ca: CaHarness) -> None:
    valid = [spiffe_id for spiffe_id, _ in spiffe_id_lines("valid")]
    assert len(valid) >= 5

    for spiffe_id in valid:
        ca.create_entry(spiffe_id.removeprefix(f"spiffe://{ca.trust_domain}"), max_depth=1)
        # Bootstrap, then Renew, then Delegate to the same ID (SPEC §3 allows P's own ID).
        first = bootstrap(ca, spiffe_id)
        renewed = renew(ca, first)
        delegated = delegate(ca, renewed, spiffe_id)
        for workload in (first, renewed, delegated):
            assert uri_sans(workload.leaf) == [spiffe_id]
        assert delegated.scope.delegators == (spiffe_id,)


def test_csr_for_another_id_is_permission_denied_naming_both(issuer: Issuer) -> None:
    key = new_key()
    others = ["spiffe://example.org/admin", f"{issuer.spiffe_id}/below"]
    others += [spiffe_id for spiffe_id, _ in spiffe_id_lines("valid")]

    for other in others:
        code, details = issuer.refuse(make_csr(key, (other,)))
        assert code == PERMISSION_DENIED, (other[:80], details)
        assert issuer.spiffe_id in details
        # A very long ID may be shown cut; its start is named.
        assert other[:150] in details, details

    issuer.accept(make_csr(key, (issuer.spiffe_id,)))


def test_csr_without_any_san_is_issued_for_the_entry_point_id(issuer: Issuer) -> None:
    leaf = leaf_of(issuer.accept(make_csr(new_key())))

    assert uri_sans(leaf) == [issuer.spiffe_id]


def test_empty_subject_csr_gives_a_leaf_whose_san_is_critical(
    issuer: Issuer, build_case: BuildCase, tmp_path: Path
) -> None:
    csrs = build_case("008-empty-subject-san-not-critical", issuer.spiffe_id)

    leaf = leaf_of(issuer.accept(read_csr(csrs / "csr-empty-subject.pem")))

    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    (tmp_path / "leaf.pem").write_bytes(certificates_to_pem([leaf]))
    shown = subprocess.run(
        [openssl(), "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "leaf.pem")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert shown.splitlines()[0] == "X509v3 Subject Alternative Name: critical"


# ---------------------------------------------------------------- the leaf profile


def openssl() -> str:
    found = shutil.which("openssl")
    assert found is not None, "the system openssl is needed"
    return found


def key_usage(*, digital_signature: bool, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def openssl_verify(folder: Path, response: ca_pb2.SVIDResponse) -> None:
    """``openssl verify -CAfile bundle -untrusted chain leaf`` must accept the SVID."""
    folder.mkdir(parents=True, exist_ok=True)
    chain = [x509.load_der_x509_certificate(der) for der in response.certificate_chain]
    (folder / "bundle.pem").write_bytes(certificates_to_pem(bundle_roots(response)))
    (folder / "chain.pem").write_bytes(certificates_to_pem(chain))
    (folder / "leaf.pem").write_bytes(certificates_to_pem(chain[:1]))

    for purpose in ("sslclient", "sslserver"):
        result = subprocess.run(
            [
                openssl(), "verify", "-x509_strict", "-purpose", purpose,
                "-CAfile", str(folder / "bundle.pem"),
                "-untrusted", str(folder / "chain.pem"),
                str(folder / "leaf.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{folder / 'leaf.pem'}: OK"


def check_svid_profile(
    leaf: x509.Certificate,
    signer: x509.Certificate,
    spiffe_id: str,
    scope: DelegationScope,
    lifetime: timedelta,
    dns_names: tuple[str, ...] = (),
) -> None:
    """SPEC §2 and §3, field by field, for a leaf issued ``lifetime`` long by ``signer``."""
    extensions = {extension.oid: extension for extension in leaf.extensions}
    assert leaf.version is x509.Version.v3
    assert set(extensions) == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        SCOPE_OID,
    }

    # One URI SAN, the SPIFFE ID, beside the entry's DNS names; critical with an empty
    # subject (RFC 5280 §4.1.2.6).
    san = extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    assert san.value.get_values_for_type(x509.DNSName) == list(dns_names)
    assert len(list(san.value)) == 1 + len(dns_names)
    assert san.critical is (len(leaf.subject) == 0)

    constraints = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)

    usage = extensions[ExtensionOID.KEY_USAGE]
    assert usage.critical
    rsa_key = isinstance(leaf.public_key(), rsa.RSAPublicKey)
    assert usage.value == key_usage(digital_signature=True, key_encipherment=rsa_key)

    extended = extensions[ExtensionOID.EXTENDED_KEY_USAGE].value
    assert isinstance(extended, x509.ExtendedKeyUsage)
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert len(list(extended)) == 2

    ski = extensions[ExtensionOID.SUBJECT_KEY_IDENTIFIER]
    assert not ski.critical
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = extensions[ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    assert not aki.critical
    assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
    signer_ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == signer_ski.digest

    # RFC 5280 §4.1.2.2: positive, at most 20 octets; SPEC §2: at least 64 random bits
    # (a uniformly drawn 64-bit serial is shorter than 49 bits once in 2^16).
    assert 0 < leaf.serial_number < 2**159
    assert leaf.serial_number.bit_length() > 48

    assert leaf.issuer == signer.subject
    leaf.verify_directly_issued_by(signer)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == BACKDATE + lifetime

    extension = extensions[SCOPE_OID]
    assert not extension.critical
    assert scope_of(leaf) == scope


KEY_TYPES = ["ec-p256", "ec-p384", "rsa-2048"]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_issued_leaf_follows_the_x509_svid_profile(
    issuer: Issuer, key_type: str, tmp_path: Path
) -> None:
    key = new_key(key_type)
    before = whole_seconds(datetime.now(UTC))

    response = issuer.accept(make_csr(key, (issuer.spiffe_id,)))

    after = whole_seconds(datetime.now(UTC))
    leaf = leaf_of(response)
    # SPEC §2: notBefore is the issuance time back-dated by exactly 30 s.
    assert before - BACKDATE <= leaf.not_valid_before_utc <= after - BACKDATE
    issued_at = leaf.not_valid_before_utc + BACKDATE
    lifetime = timedelta(seconds=600) if issuer.kind == "Delegate" else DEFAULT_SVID_TTL
    (signer,) = bundle_roots(response)
    check_svid_profile(leaf, signer, issuer.spiffe_id, issuer.expected_scope(issued_at), lifetime)
    assert leaf.public_key() == key.public_key()
    assert response.expires_at.ToDatetime(tzinfo=UTC) == leaf.not_valid_after_utc
    assert len(response.certificate_chain) == 1
    openssl_verify(tmp_path, response)


def test_leaf_under_an_imported_intermediate_carries_it_and_verifies_with_openssl(
    etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path
) -> None:
    root = make_root("example.org")
    intermediate = make_intermediate(root, "example.org", common_name="example.org issuing")
    chain_pem = certificates_to_pem([intermediate.certificate, root.certificate])
    imported = ImportedCa(chain_pem=chain_pem, key_pem=private_key_to_pem(intermediate.key))
    ca = CaHarness(etcd.endpoint, etcd_prefix, tmp_path / "ca", imported=imported).start()
    try:
        spiffe_id = ca.create_entry("/web")
        workload = bootstrap(ca, spiffe_id, "ec-p384")
        renewed = renew(ca, workload, "rsa-2048")
    finally:
        ca.stop()

    for issued in (workload, renewed):
        # SPEC §2: the bundle holds the root; the intermediate travels in the chain.
        assert issued.chain[1:] == [intermediate.certificate]
        assert bundle_roots(issued.response) == [root.certificate]
        check_svid_profile(
            issued.leaf,
            intermediate.certificate,
            spiffe_id,
            root_svid_scope(("*",), ("*",), 2),
            DEFAULT_SVID_TTL,
        )
        openssl_verify(tmp_path / format(issued.leaf.serial_number, "x"), issued.response)


def test_entry_ttl_sets_the_leaf_lifetime(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web", ttl_seconds=120)

    workload = bootstrap(ca, spiffe_id)

    leaf = workload.leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == BACKDATE + timedelta(
        seconds=120
    )
    renewed = renew(ca, workload).leaf
    assert renewed.not_valid_after_utc - renewed.not_valid_before_utc == BACKDATE + timedelta(
        seconds=120
    )


def test_entry_dns_names_go_into_the_svid_beside_the_uri_san(ca: CaHarness) -> None:
    names = ("web.example.org", "web.internal.example.org")
    spiffe_id = ca.create_entry("/web", dns_names=names)

    workload = bootstrap(ca, spiffe_id)
    renewed = renew(ca, workload)

    (signer,) = bundle_roots(workload.response)
    for issued in (workload, renewed):
        check_svid_profile(
            issued.leaf,
            signer,
            spiffe_id,
            root_svid_scope(("*",), ("*",), 2),
            DEFAULT_SVID_TTL,
            dns_names=names,
        )


# ---------------------------------------------------------------- delegation (SPEC §3)

TD = "spiffe://example.org"
DB = (f"{TD}/db",)


@pytest.fixture
def web(ca: CaHarness) -> Workload:
    """A root SVID of /web with a narrow scope, two hops of delegation left."""
    spiffe_id = ca.create_entry(
        "/web",
        permissions=("/demo.Echo/*", "/demo.Time/Now"),
        audiences=(f"{TD}/web/*", f"{TD}/db"),
        max_depth=2,
    )
    return bootstrap(ca, spiffe_id)


@pytest.mark.parametrize(
    ("child", "request_scope", "words"),
    [
        ("/web/job", {"permissions": ("/other.Svc/*",)}, "permission '/other.Svc/*'"),
        ("/web/job", {"permissions": ("*",)}, "permission '*'"),
        ("/web/job", {"permissions": ("/demo.Time/*",)}, "permission '/demo.Time/*'"),
        ("/web/job", {"permissions": ("/demo.Echo/Say", "/demo.Time/Set")}, "'/demo.Time/Set'"),
        ("/web/job", {"audiences": (f"{TD}/api",)}, f"audience '{TD}/api'"),
        ("/web/job", {"audiences": ("*",)}, "audience '*'"),
        ("/web/job", {"audiences": (f"{TD}/web-evil",)}, f"audience '{TD}/web-evil'"),
        ("/web/job", {"audiences": (f"{TD}/web-evil/*",)}, f"audience '{TD}/web-evil/*'"),
        ("/web/job", {"audiences": (f"{TD}/db/*",)}, f"audience '{TD}/db/*'"),
        ("/web/job", {"max_depth": 2}, "max_depth 2"),
        ("/web-evil", {}, f"'{TD}/web-evil'"),
        ("/web-evil/job", {}, f"'{TD}/web-evil/job'"),
        ("/api", {}, f"'{TD}/api'"),
        ("/we", {}, f"'{TD}/we'"),
    ],
)
def test_delegation_that_widens_the_callers_scope_is_permission_denied_naming_it(
    ca: CaHarness, web: Workload, child: str, request_scope: dict[str, Any], words: str
) -> None:
    spiffe_id = f"{TD}{child}"
    asked = {"audiences": (f"{TD}/db",), "max_depth": 0, **request_scope}
    request = delegate_request(make_csr(new_key(), (spiffe_id,)), spiffe_id, **asked)

    with web.channel(ca) as channel:
        code, details = refused(ca, lambda: ca_stub(channel).Delegate(request, timeout=TIMEOUT))

    assert code == PERMISSION_DENIED, details
    assert words in details


def test_delegation_into_another_trust_domain_is_permission_denied(
    ca: CaHarness, web: Workload
) -> None:
    spiffe_id = "spiffe://other.org/web/job"
    request = delegate_request(make_csr(new_key(), (spiffe_id,)), spiffe_id, audiences=())

    with web.channel(ca) as channel:
        code, details = refused(ca, lambda: ca_stub(channel).Delegate(request, timeout=TIMEOUT))

    assert code == PERMISSION_DENIED, details
    assert "spiffe://other.org/web/job" in details


def test_delegation_from_a_scope_of_depth_zero_is_permission_denied(ca: CaHarness) -> None:
    caller = bootstrap(ca, ca.create_entry("/leaf", max_depth=0))
    spiffe_id = f"{TD}/leaf/job"
    request = delegate_request(make_csr(new_key(), (spiffe_id,)), spiffe_id)

    with caller.channel(ca) as channel:
        code, details = refused(ca, lambda: ca_stub(channel).Delegate(request, timeout=TIMEOUT))

    assert code == PERMISSION_DENIED, details
    assert "depth exhausted" in details


def test_delegation_chain_names_its_delegators_and_never_outlives_the_parent(
    ca: CaHarness, web: Workload
) -> None:
    before = whole_seconds(datetime.now(UTC))
    middle = delegate(ca, web, f"{TD}/web/a", audiences=DB, max_depth=1, ttl_seconds=300)
    after = whole_seconds(datetime.now(UTC))
    child = delegate(
        ca,
        middle,
        f"{TD}/web/a/b",
        permissions=("/demo.Echo/Say",),
        audiences=DB,
        ttl_seconds=7200,
    )

    # SPEC §3: C.delegators = P.delegators + [P's ID]; notAfter = now + ttl.
    scope = middle.scope
    assert scope.permissions == ("/demo.Echo/*",)
    assert scope.audiences == (f"{TD}/db",)
    assert scope.max_depth == 1
    assert scope.delegators == (f"{TD}/web",)
    assert scope.not_after is not None
    assert before + timedelta(seconds=300) <= scope.not_after <= after + timedelta(seconds=300)
    assert middle.leaf.not_valid_after_utc == scope.not_after
    # The grandchild asked for 2 h: shortened, not refused, to the parent's hard end.
    assert child.scope == DelegationScope(
        permissions=("/demo.Echo/Say",),
        audiences=(f"{TD}/db",),
        max_depth=0,
        delegators=(f"{TD}/web", f"{TD}/web/a"),
        not_after=scope.not_after,
    )
    assert child.leaf.not_valid_after_utc == scope.not_after


def test_delegated_svid_cannot_delegate_past_its_depth_or_outside_its_id(
    ca: CaHarness, web: Workload
) -> None:
    middle = delegate(ca, web, f"{TD}/web/a", audiences=DB, max_depth=1)
    child = delegate(ca, middle, f"{TD}/web/a/b", audiences=DB)

    for caller, spiffe_id, words in (
        (child, f"{TD}/web/a/b/c", "depth exhausted"),
        (middle, f"{TD}/web/x", f"'{TD}/web/x'"),
        (middle, f"{TD}/web", f"'{TD}/web'"),
    ):
        request = delegate_request(make_csr(new_key(), (spiffe_id,)), spiffe_id, audiences=DB)
        with caller.channel(ca) as channel:
            call = functools.partial(ca_stub(channel).Delegate, request, timeout=TIMEOUT)
            code, details = refused(ca, call)
        assert code == PERMISSION_DENIED, details
        assert words in details


def test_delegated_svid_leaf_lives_the_entry_ttl_within_its_scope(ca: CaHarness) -> None:
    parent = bootstrap(ca, ca.create_entry("/short", ttl_seconds=120, max_depth=1))

    child = delegate(ca, parent, f"{TD}/short/job", ttl_seconds=3600)

    # SPEC §3: each certificate of a delegation lives the entry's SVID TTL, cut at notAfter.
    leaf = child.leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == BACKDATE + timedelta(
        seconds=120
    )
    assert child.scope.not_after == leaf.not_valid_before_utc + BACKDATE + timedelta(hours=1)


def test_delegated_svid_renews_keeping_its_scope_and_hard_end(
    ca: CaHarness, web: Workload
) -> None:
    child = delegate(ca, web, f"{TD}/web/a", audiences=DB, max_depth=1, ttl_seconds=300)

    renewed = renew(ca, child)

    assert uri_sans(renewed.leaf) == [f"{TD}/web/a"]
    assert renewed.scope == child.scope
    assert renewed.leaf.serial_number != child.leaf.serial_number
    assert renewed.leaf.not_valid_after_utc == child.scope.not_after
    # And it still delegates with what it holds.
    grandchild = delegate(ca, renewed, f"{TD}/web/a/b", audiences=DB)
    assert grandchild.scope.delegators == (f"{TD}/web", f"{TD}/web/a")


def test_root_svid_renews_taking_its_entrys_current_scope(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web", permissions=("/a.A/*",), audiences=("*",), max_depth=0)
    workload = bootstrap(ca, spiffe_id)
    with ca.admin_channel() as channel:
        admin_stub(channel).DeleteEntry(
            admin_pb2.DeleteEntryRequest(spiffe_id=spiffe_id), timeout=TIMEOUT
        )
    ca.create_entry("/web", permissions=("/b.B/*",), audiences=(f"{TD}/db",), max_depth=1)

    renewed = renew(ca, workload)

    assert workload.scope == root_svid_scope(("/a.A/*",), ("*",), 0)
    assert renewed.scope == root_svid_scope(("/b.B/*",), (f"{TD}/db",), 1)


def test_renewal_after_the_entry_is_deleted_is_permission_denied(ca: CaHarness) -> None:
    spiffe_id = ca.create_entry("/web")
    workload = bootstrap(ca, spiffe_id)
    with ca.admin_channel() as channel:
        admin_stub(channel).DeleteEntry(
            admin_pb2.DeleteEntryRequest(spiffe_id=spiffe_id), timeout=TIMEOUT
        )
    request = ca_pb2.RenewRequest(csr=make_csr(new_key(), (spiffe_id,)))

    with workload.channel(ca) as channel:
        code, details = refused(ca, lambda: ca_stub(channel).Renew(request, timeout=TIMEOUT))

    assert code == PERMISSION_DENIED, details
    assert spiffe_id in details


# ---------------------------------------------------------------- the Admin service


def test_admin_service_refuses_a_caller_whose_scope_lacks_the_method(ca: CaHarness) -> None:
    workload = bootstrap(ca, ca.create_entry("/web", permissions=("/demo.Echo/*",)))

    with workload.channel(ca) as channel:
        stub = admin_stub(channel)
        code, details = refused(
            ca, lambda: stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=TIMEOUT)
        )

    assert code == PERMISSION_DENIED, details
    assert "/dmc.v1.Admin/ListEntries" in details


def test_admin_service_serves_exactly_the_methods_the_scope_permits(ca: CaHarness) -> None:
    reader = bootstrap(ca, ca.create_entry("/ops", permissions=("/dmc.v1.Admin/ListEntries",)))
    entry = admin_pb2.Entry(spiffe_id=f"{TD}/new", permissions=["*"], audiences=["*"])

    with reader.channel(ca) as channel:
        stub = admin_stub(channel)
        listed = stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=TIMEOUT)
        code, details = refused(
            ca,
            lambda: stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT),
        )

    assert f"{TD}/ops" in [e.spiffe_id for e in listed.entries]
    assert code == PERMISSION_DENIED, details
    assert "/dmc.v1.Admin/CreateEntry" in details


def test_delegated_admin_scope_is_enforced_on_the_admin_service(ca: CaHarness) -> None:
    ops = bootstrap(ca, ca.create_entry("/ops", permissions=("/dmc.v1.Admin/*",), max_depth=1))
    reader = delegate(
        ca, ops, f"{TD}/ops/reader", permissions=("/dmc.v1.Admin/GetEntry",), audiences=()
    )

    with reader.channel(ca) as channel:
        stub = admin_stub(channel)
        entry = stub.GetEntry(admin_pb2.GetEntryRequest(spiffe_id=f"{TD}/ops"), timeout=TIMEOUT)
        code, _ = refused(
            ca, lambda: stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=TIMEOUT)
        )

    assert entry.spiffe_id == f"{TD}/ops"
    assert code == PERMISSION_DENIED


def test_admin_entry_cannot_be_deleted(ca: CaHarness) -> None:
    admin_id = f"{TD}/dmc/admin"
    request = admin_pb2.DeleteEntryRequest(spiffe_id=admin_id)

    with ca.admin_channel() as channel:
        stub = admin_stub(channel)
        code, details = refused(ca, lambda: stub.DeleteEntry(request, timeout=TIMEOUT))
        still = stub.GetEntry(admin_pb2.GetEntryRequest(spiffe_id=admin_id), timeout=TIMEOUT)

    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert admin_id in details
    assert list(still.permissions) == ["/dmc.v1.Admin/*"]


def test_entry_claiming_a_dns_name_another_id_holds_is_refused(ca: CaHarness) -> None:
    holder = ca.create_entry("/web", dns_names=("web.example.org",))
    entry = admin_pb2.Entry(
        spiffe_id=f"{TD}/impostor",
        permissions=["*"],
        audiences=["*"],
        dns_names=["other.example.org", "web.example.org"],
    )

    with ca.admin_channel() as channel:
        stub = admin_stub(channel)
        code, details = refused(
            ca,
            lambda: stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT),
        )
        listed = stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=TIMEOUT)

    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    assert "web.example.org" in details
    assert holder in details
    assert f"{TD}/impostor" not in [e.spiffe_id for e in listed.entries]
    # The name that was free was not claimed either: another ID may take it.
    ca.create_entry("/other", dns_names=("other.example.org",))


# ---------------------------------------------------------------- other malformed input


@pytest.mark.parametrize(
    ("csr", "words"),
    [
        (b"", "empty"),
        (b"\x30\x03\x02\x01\x01", "does not parse as DER"),
        (b"not a certificate request", "does not parse as DER"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n", "PEM"),
    ],
)
def test_csr_that_is_not_a_der_request_is_invalid_argument(
    issuer: Issuer, csr: bytes, words: str
) -> None:
    code, details = issuer.refuse(csr)

    assert code == INVALID_ARGUMENT, details
    assert words in details


def test_delegate_to_an_id_outside_the_grammar_is_invalid_argument_naming_the_part(
    ca: CaHarness,
) -> None:
    caller = bootstrap(ca, ca.create_entry("/web", max_depth=2))

    with caller.channel(ca) as channel:
        stub = ca_stub(channel)
        for spiffe_id, parts in spiffe_id_lines("invalid"):
            request = delegate_request(make_csr(new_key()), spiffe_id)
            code, details = refused(ca, functools.partial(stub.Delegate, request, timeout=TIMEOUT))
            assert code == INVALID_ARGUMENT, (spiffe_id[:80], details)
            assert any(part in details for part in parts), (spiffe_id[:80], details)


@pytest.mark.parametrize(
    ("request_scope", "words"),
    [
        ({"ttl_seconds": 0}, "TTL"),
        ({"max_depth": 17}, "17"),
        ({"permissions": ("demo.Echo/Say",)}, "demo.Echo/Say"),
        ({"audiences": ("spiffe://example.org/db/../admin",)}, "segment '..'"),
    ],
)
def test_delegate_with_a_malformed_scope_is_invalid_argument(
    ca: CaHarness, request_scope: dict[str, Any], words: str
) -> None:
    caller = bootstrap(ca, ca.create_entry("/web", max_depth=2))
    spiffe_id = f"{TD}/web/job"
    request = delegate_request(make_csr(new_key(), (spiffe_id,)), spiffe_id, **request_scope)

    with caller.channel(ca) as channel:
        code, details = refused(
            ca, functools.partial(ca_stub(channel).Delegate, request, timeout=TIMEOUT)
        )

    assert code == INVALID_ARGUMENT, details
    assert words in details


def test_entry_and_token_for_an_id_outside_the_grammar_are_invalid_argument(
    ca: CaHarness,
) -> None:
    with ca.admin_channel() as channel:
        stub = admin_stub(channel)
        for spiffe_id, parts in spiffe_id_lines("invalid"):
            entry = admin_pb2.Entry(spiffe_id=spiffe_id, permissions=["*"], audiences=["*"])
            for call in (
                functools.partial(
                    stub.CreateEntry, admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT
                ),
                functools.partial(
                    stub.CreateJoinToken,
                    admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=60),
                    timeout=TIMEOUT,
                ),
            ):
                code, details = refused(ca, call)
                assert code == INVALID_ARGUMENT, (spiffe_id[:80], details)
                assert any(part in details for part in parts), (spiffe_id[:80], details)
