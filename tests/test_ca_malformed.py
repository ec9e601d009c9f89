"""No RPC answers UNKNOWN: hostile input at every method of the CA (SPEC §4).

Every method of ``dmc.v1.CertificateAuthority`` and ``dmc.v1.Admin`` is enumerated from the
generated descriptors, so an RPC added to the protos is covered without touching this file.
For each method a valid request is mutated one field at a time (recursively into nested
messages) with hostile values of the field's type, and raw bytes that are not a valid
protobuf message are sent too. Bootstrap goes to the bootstrap listener; every other method
goes to the mTLS listener, as the admin and as a workload whose scope holds no Admin
permission. SPEC §4: "Nothing unexpected leaks as UNKNOWN"; details "never carry a stack
trace or key material"; anything unmapped is INTERNAL, which here is a bug as well.

The barrage runs once per module; afterwards what was stored before must be intact.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from ca_harness import CaHarness
from certgen import make_leaf, make_root
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess

TRUST_DOMAIN = "example.org"
CALL_TIMEOUT_SECONDS = 10.0
FORBIDDEN_IN_DETAILS = ("Traceback", 'File "', "Exception", "PRIVATE KEY")
# UNKNOWN and INTERNAL are what SPEC §4 forbids. DEADLINE_EXCEEDED means the CA never
# answered. RESOURCE_EXHAUSTED is no status of SPEC §4's mapping: with payloads below gRPC's
# 4 MiB message limit it means the CA's answer was lost, e.g. details too long for gRPC's
# metadata limit ("received metadata size exceeds hard limit").
BAD_CODES = (
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
# Details name what was wrong (SPEC §4) without echoing a hostile value whole: they stay well
# below gRPC's 8 KiB soft limit on metadata, past which calls start failing at random.
MAX_DETAILS_CHARS = 4096

METHODS: list[MethodDescriptor] = [
    method
    for module, service in ((ca_pb2, "CertificateAuthority"), (admin_pb2, "Admin"))
    for method in module.DESCRIPTOR.services_by_name[service].methods
]
BOOTSTRAP = "dmc.v1.CertificateAuthority.Bootstrap"
# Admin methods whose empty fields mean "the newest" or "the previous" authority (SPEC §4).
AUTHORITY_LIFE_CYCLE = frozenset({"PrepareAuthority", "ActivateAuthority", "RetireAuthority"})


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# -- hostile values -----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_der(
    key: ec.EllipticCurvePrivateKey | None = None,
    uri: str | None = None,
    padding: int = 0,
) -> bytes:
    """A DER CSR, with the URI as its one SAN and ``padding`` bytes of an unknown extension."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    if padding:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.32473.99"), b"\x00" * padding
            ),
            critical=False,
        )
    csr = builder.sign(key or _key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _hostile_strings() -> list[str]:
    return [
        "",
        "x" * (1 << 20),
        # Well-formed but huge: a valid permission pattern of 1 MiB.
        "/pkg.Service/" + "M" * (1 << 20),
        "\x00",
        "\x00\x01\x7f\x80\xff\ufffd\ufeff\u202e\U0001f600",
        "Ã©Ã\u00a0\u00ff\u00fe",
        "\n\r\t",
        "-1",
        "-9223372036854775808",
        "18446744073709551616",
        "spiffe://",
        "spiffe:///x",
        "spiffe://example.org/a/../dmc/admin",
        "spiffe://example.org/./a",
        "spiffe://example.org//a",
        "spiffe://example.org/a/",
        "spiffe://EXAMPLE.org/a",
        "spiffe://example.org:443/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org/a?q=1",
        "spiffe://example.org/a#f",
        "spiffe://example.org/%2e%2e",
        "spiffe://example.org/" + "a" * 3000,
        "spiffe://other.org/x",
        "SPIFFE://example.org/a",
        "https://example.org/a",
        "/a/b/c",
        "/dmc.v1.Admin/**",
        "**",
        "/*",
        "spiffe://example.org/*/x",
        "spiffe://example.org/a/**",
        "*.*",
    ]


def _hostile_bytes(csr_for_caller: bytes) -> list[bytes]:
    pem_csr = x509.load_der_x509_csr(csr_for_caller).public_bytes(serialization.Encoding.PEM)
    certificate = make_leaf(make_root(TRUST_DOMAIN)).certificate
    return [
        b"",
        b"\x00",
        os.urandom(64),
        os.urandom(1 << 20),
        pem_csr,
        b"  \n" + pem_csr,
        csr_der(padding=2 * (1 << 20)),
        certificate.public_bytes(serialization.Encoding.DER),
        csr_for_caller[: len(csr_for_caller) // 2],
        csr_for_caller + b"\x00junk",
        b"\x30\x84\xff\xff\xff\xff",
        b"\x30\x80" + b"\x00" * 16,
        b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
    ]


_UNSIGNED = [0, 1, 17, 2**31, 2**32 - 1]
_UNSIGNED_64 = [*_UNSIGNED, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
_SIGNED = [-1, 0, -(2**31), 2**31 - 1]
_SIGNED_64 = [*_SIGNED, -(2**63), 2**63 - 1]

_SCALARS: dict[int, list[object]] = {
    FieldDescriptor.TYPE_UINT32: list(_UNSIGNED),
    FieldDescriptor.TYPE_FIXED32: list(_UNSIGNED),
    FieldDescriptor.TYPE_UINT64: list(_UNSIGNED_64),
    FieldDescriptor.TYPE_FIXED64: list(_UNSIGNED_64),
    FieldDescriptor.TYPE_INT32: list(_SIGNED),
    FieldDescriptor.TYPE_SINT32: list(_SIGNED),
    FieldDescriptor.TYPE_SFIXED32: list(_SIGNED),
    FieldDescriptor.TYPE_INT64: list(_SIGNED_64),
    FieldDescriptor.TYPE_SINT64: list(_SIGNED_64),
    FieldDescriptor.TYPE_SFIXED64: list(_SIGNED_64),
    FieldDescriptor.TYPE_BOOL: [True, False],
    FieldDescriptor.TYPE_DOUBLE: [float("nan"), float("inf"), -1.0],
    FieldDescriptor.TYPE_FLOAT: [float("nan"), float("inf"), -1.0],
}


@dataclass(frozen=True)
class Hostile:
    """One hostile request: where the damage is, and the bytes to send."""

    what: str
    payload: bytes


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _values_for(fd: FieldDescriptor, strings: list[str], blobs: list[bytes]) -> list[object]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return list(strings)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return list(blobs)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        # Proto3 enums are open: numbers outside the declared values must parse too.
        declared = [v.number for v in fd.enum_type.values] if fd.enum_type else []
        return [0, 2**31 - 1, -1, *declared]
    return list(_SCALARS.get(fd.type, []))


def _mutations(
    baseline: Callable[[], Message], strings: list[str], blobs: list[bytes]
) -> Iterator[Hostile]:
    """Every field of the request (nested ones too) set to each hostile value in turn."""
    yield Hostile("(empty request)", b"")

    def walk(descriptor: Any, trail: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for fd in descriptor.fields:
            here = (*trail, fd.name)
            if fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated:
                yield from walk(fd.message_type, here)
            elif fd.type != FieldDescriptor.TYPE_MESSAGE:
                yield here

    def target(request: Message, trail: tuple[str, ...]) -> tuple[Message, Any]:
        for name in trail[:-1]:
            request = getattr(request, name)
        return request, request.DESCRIPTOR.fields_by_name[trail[-1]]

    template = baseline()
    for trail in walk(template.DESCRIPTOR, ()):
        _, fd = target(template, trail)
        name = ".".join(trail)
        for value in _values_for(fd, strings, blobs):
            request = baseline()
            holder, fd = target(request, trail)
            if fd.is_repeated:
                repeated = getattr(holder, fd.name)
                del repeated[:]
                repeated.append(value)
            else:
                setattr(holder, fd.name, value)
            yield Hostile(f"{name}={_show(value)}", request.SerializeToString())
        if fd.is_repeated and fd.type == FieldDescriptor.TYPE_STRING:
            request = baseline()
            holder, fd = target(request, trail)
            getattr(holder, fd.name).extend(["*"] * 5000)
            yield Hostile(f"{name}=['*'] * 5000", request.SerializeToString())
            request = baseline()
            holder, fd = target(request, trail)
            getattr(holder, fd.name).extend(strings)
            yield Hostile(f"{name}=every hostile string", request.SerializeToString())


def _raw(baseline: Message) -> Iterator[Hostile]:
    """Bytes that are not this message: broken wire format, invalid UTF-8, unknown fields."""
    raw = [
        b"\xff",
        b"\xff\xff\xff\xff",
        b"\x08",
        b"\x0a\x05ab",
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x0f",
        b"\x00\x00",
        b"\x07\x01",
        os.urandom(1024),
        # Field 99, length-delimited: an unknown field, e.g. an unknown case of a oneof.
        baseline.SerializeToString() + b"\x9a\x06\x03abc",
        baseline.SerializeToString() + b"\x98\x06\x01",
    ]
    for index, payload in enumerate(raw):
        yield Hostile(f"raw #{index} {payload[:12]!r}", payload)
    for fd in baseline.DESCRIPTOR.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            # Proto3 strings must be UTF-8: these bytes are not.
            tag = bytes([(fd.number << 3) | 2]) if fd.number < 16 else b""
            if tag:
                bad = b"\xc3\x28\xff\xfe"
                yield Hostile(f"raw {fd.name}=invalid UTF-8", tag + bytes([len(bad)]) + bad)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


# -- the target CA --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one hostile request got back."""

    method: str
    caller: str
    what: str
    code: grpc.StatusCode
    details: str

    def problem(self) -> str | None:
        if self.code in BAD_CODES:
            return f"status {self.code.name}"
        if len(self.details) > MAX_DETAILS_CHARS:
            return f"details of {len(self.details)} characters"
        for word in FORBIDDEN_IN_DETAILS:
            if word in self.details:
                return f"details carry {word!r}"
        return None

    def __str__(self) -> str:
        return (
            f"{self.method} as {self.caller} with {self.what}: "
            f"{self.code.name}: {self.details[:300]!r}"
        )


@dataclass
class Barrage:
    """The CA under attack, what it held before, and every outcome per method."""

    ca: CaHarness
    entries_before: list[admin_pb2.Entry]
    bundle_before: ca_pb2.TrustBundle
    kept_id: str
    kept_token: str
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)


def _bootstrap_svid(ca: CaHarness, spiffe_id: str) -> tuple[bytes, bytes]:
    key = _key()
    with ca.bootstrap_channel() as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(
                join_token=ca.join_token(spiffe_id), csr=csr_der(key, spiffe_id)
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    chain_pem = b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in response.certificate_chain
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return chain_pem, key_pem


def _call(
    channel: grpc.Channel, method: MethodDescriptor, payload: bytes
) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes; for a stream, wait for its first message or its status."""
    if method.server_streaming:
        stream: Any = channel.unary_stream(_path(method))(
            payload,  # type: ignore[arg-type]  # raw bytes: no serializer
            timeout=CALL_TIMEOUT_SECONDS,
        )
        try:
            next(stream)
        except StopIteration:
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        finally:
            stream.cancel()
        return grpc.StatusCode.OK, ""
    try:
        channel.unary_unary(_path(method))(
            payload,  # type: ignore[arg-type]  # raw bytes: no serializer
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _baselines(
    ca: CaHarness, caller_id: str, bootstrap_id: str
) -> dict[str, Callable[[], Message]]:
    """A valid request per method (a fresh one per call), which the barrage then damages."""
    caller_csr = csr_der(uri=caller_id)
    child_csr = csr_der(uri=f"{caller_id}/child")
    counter = iter(range(1_000_000))

    def bootstrap() -> Message:
        return ca_pb2.BootstrapRequest(
            join_token=ca.join_token(bootstrap_id), csr=csr_der(uri=bootstrap_id)
        )

    def create_entry() -> Message:
        return admin_pb2.CreateEntryRequest(
            entry=admin_pb2.Entry(
                spiffe_id=ca.id(f"/fuzz/new/{next(counter)}"),
                permissions=["*"],
                audiences=["*"],
                max_depth=1,
                max_ttl_seconds=600,
                dns_names=[f"n{next(counter)}.fuzz.example.org"],
            )
        )

    return {
        BOOTSTRAP: bootstrap,
        "dmc.v1.CertificateAuthority.Renew": lambda: ca_pb2.RenewRequest(csr=caller_csr),
        "dmc.v1.CertificateAuthority.Delegate": lambda: ca_pb2.DelegateRequest(
            csr=child_csr,
            spiffe_id=f"{caller_id}/child",
            permissions=["/dmc.v1.CertificateAuthority/Renew"],
            audiences=[ca.id("/db")],
            max_depth=0,
            ttl_seconds=600,
        ),
        "dmc.v1.Admin.CreateEntry": create_entry,
        "dmc.v1.Admin.GetEntry": lambda: admin_pb2.GetEntryRequest(spiffe_id=ca.id("/nobody")),
        "dmc.v1.Admin.DeleteEntry": lambda: admin_pb2.DeleteEntryRequest(
            spiffe_id=ca.id(f"/fuzz/absent/{next(counter)}")
        ),
        "dmc.v1.Admin.CreateJoinToken": lambda: admin_pb2.CreateJoinTokenRequest(
            spiffe_id=bootstrap_id, ttl_seconds=60
        ),
        "dmc.v1.Admin.Revoke": lambda: admin_pb2.RevokeRequest(
            serial="0123456789abcdef", reason="fuzz"
        ),
        "dmc.v1.Admin.RetireAuthority": lambda: admin_pb2.RetireAuthorityRequest(
            id="no-such-authority"
        ),
        "dmc.v1.Admin.ActivateAuthority": lambda: admin_pb2.ActivateAuthorityRequest(
            id="no-such-authority"
        ),
    }


def _list_entries(ca: CaHarness) -> list[admin_pb2.Entry]:
    with ca.admin_channel() as channel:
        response = admin_pb2_grpc.AdminStub(channel).ListEntries(
            admin_pb2.ListEntriesRequest(), timeout=CALL_TIMEOUT_SECONDS
        )
    return list(response.entries)


def _bundle(ca: CaHarness) -> ca_pb2.TrustBundle:
    with ca.admin_channel() as channel:
        return ca_pb2_grpc.CertificateAuthorityStub(channel).GetTrustBundle(
            ca_pb2.GetTrustBundleRequest(), timeout=CALL_TIMEOUT_SECONDS
        )


def _harness(etcd: EtcdProcess, folder: Path) -> CaHarness:
    harness = CaHarness(
        etcd.endpoint, f"/malformed-{uuid.uuid4().hex}/", folder, trust_domain=TRUST_DOMAIN
    )
    harness.start()
    return harness


@pytest.fixture(scope="module")
def barrage(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Barrage]:
    """A CA of its own, some state stored, then every hostile request sent once.

    The authority life cycle takes empty fields as "the newest" or "the previous", so some
    of its hostile requests are valid rotations; the admin's go to a second CA, so that the
    first one's bundle must stay exactly as it was.
    """
    ca = _harness(etcd, tmp_path_factory.mktemp("malformed"))
    rotating = _harness(etcd, tmp_path_factory.mktemp("malformed-rotating"))
    channels: list[grpc.Channel] = []
    try:
        kept_id = ca.create_entry(
            "/kept/api", ("/demo.Echo/*",), ("*",), 1, 900, ("kept.example.org",)
        )
        kept_token = ca.join_token(kept_id)
        workload_id = ca.create_entry(
            "/fuzz/workload", ("/dmc.v1.CertificateAuthority/*",), ("*",), 2, 900
        )
        bootstrap_id = ca.create_entry("/fuzz/bootstrap", ("*",), ("*",), 0, 900)
        workload_pem, workload_key = _bootstrap_svid(ca, workload_id)
        result = Barrage(ca, _list_entries(ca), _bundle(ca), kept_id, kept_token)

        channels += [
            ca.admin_channel(),
            ca.channel(workload_pem, workload_key),
            ca.bootstrap_channel(),
            rotating.admin_channel(),
        ]
        admin, workload, bootstrap, rotating_admin = channels
        strings = _hostile_strings()
        for method in METHODS:
            if method.full_name == BOOTSTRAP:
                targets = [("bootstrap listener", bootstrap, ca, bootstrap_id)]
            else:
                rotates = method.name in AUTHORITY_LIFE_CYCLE
                targets = [
                    (
                        "admin",
                        rotating_admin if rotates else admin,
                        rotating if rotates else ca,
                        ca.id("/dmc/admin"),
                    ),
                    ("workload", workload, ca, workload_id),
                ]
            outcomes = result.outcomes.setdefault(method.full_name, [])
            for caller, channel, target, caller_id in targets:
                baseline = _baselines(target, caller_id, bootstrap_id).get(
                    method.full_name, lambda m=method: _message_class(m.input_type)()
                )
                blobs = _hostile_bytes(csr_der(uri=caller_id))
                for item in [*_mutations(baseline, strings, blobs), *_raw(baseline())]:
                    code, details = _call(channel, method, item.payload)
                    outcomes.append(Outcome(method.full_name, caller, item.what, code, details))
        yield result
    finally:
        for channel in channels:
            channel.close()
        rotating.stop()
        ca.stop()


# -- the tests ------------------------------------------------------------------------------


def test_every_rpc_of_both_services_is_attacked(barrage: Barrage) -> None:
    names = {m.name for m in METHODS}

    # The enumeration found the services of SPEC §4, not an empty list.
    assert {"Bootstrap", "Renew", "Delegate", "WatchTrustBundle", "WatchRevocations"} <= names
    assert {"CreateEntry", "DeleteEntry", "CreateJoinToken", "GetStatus", "Revoke"} <= names
    for method in METHODS:
        assert len(barrage.outcomes[method.full_name]) >= 15, method.full_name


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_no_hostile_request_gets_unknown_internal_or_a_traceback(
    barrage: Barrage, method: MethodDescriptor
) -> None:
    bad = [
        f"{problem}: {outcome}"
        for outcome in barrage.outcomes[method.full_name]
        if (problem := outcome.problem()) is not None
    ]

    assert not bad, f"{len(bad)} hostile requests answered badly:\n" + "\n".join(bad[:40])


def test_workload_without_admin_permission_is_denied_every_admin_call(
    barrage: Barrage,
) -> None:
    # SPEC §4: the caller's permissions must cover the Admin method, whatever the request.
    for method in METHODS:
        if method.containing_service.name != "Admin":
            continue
        codes = {
            o.code
            for o in barrage.outcomes[method.full_name]
            if o.caller == "workload" and not o.what.startswith("raw")
        }
        assert codes == {grpc.StatusCode.PERMISSION_DENIED}, method.full_name


def test_stored_state_survives_the_barrage(barrage: Barrage) -> None:
    ca = barrage.ca
    after = {e.spiffe_id: e for e in _list_entries(ca)}

    for entry in barrage.entries_before:
        assert after.get(entry.spiffe_id) == entry
    assert _bundle(ca) == barrage.bundle_before
    # The token made before the barrage was never spent by a refused request.
    key = _key()
    with ca.bootstrap_channel() as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(
                join_token=barrage.kept_token, csr=csr_der(key, barrage.kept_id)
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    leaf = x509.load_der_x509_certificate(response.certificate_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [barrage.kept_id]
    assert san.get_values_for_type(x509.DNSName) == ["kept.example.org"]
