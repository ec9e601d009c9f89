"""The SPIFFE bundle format (SPIFFE Trust Domain and Bundle §4): `dmc.spiffe_bundle` and
`dmc-admin bundle show --format spiffe`, checked by a reader of this suite's own and by the
`spiffe` package (in a subprocess: its generated protos clash with others in one process).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_harness import CaHarness
from certgen import make_root, new_key
from dmc.errors import InvalidArgument
from dmc.spiffe_bundle import SpiffeBundle, parse_spiffe_bundle, write_spiffe_bundle
from dmc.v1 import admin_pb2, admin_pb2_grpc

DMC_ADMIN = Path(sys.executable).with_name("dmc-admin")
TIMEOUT = 15


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def read_bundle_per_spec(document: bytes) -> tuple[list[bytes], int, int]:
    """This suite's reader: what §4 requires of an X.509 SPIFFE bundle, checked one by one.

    Returns the DER certificates, the sequence and the refresh hint.
    """
    obj = json.loads(document)
    assert isinstance(obj, dict) and isinstance(obj["keys"], list)
    # §4.1: spiffe_sequence and spiffe_refresh_hint are numbers (dmc always sets both).
    assert isinstance(obj["spiffe_sequence"], int) and obj["spiffe_sequence"] >= 0
    assert isinstance(obj["spiffe_refresh_hint"], int) and obj["spiffe_refresh_hint"] > 0
    certificates = []
    for key in obj["keys"]:
        # §4.2: kty and use are required; an X.509 authority is `use: x509-svid` with an
        # x5c of exactly one certificate (standard base64 DER, RFC 7517 §4.7).
        assert key["use"] == "x509-svid"
        assert key["kty"] in ("EC", "RSA")
        assert isinstance(key["x5c"], list) and len(key["x5c"]) == 1
        raw = base64.b64decode(key["x5c"][0], validate=True)
        certificate = x509.load_der_x509_certificate(raw)
        if key["kty"] == "EC":
            numbers = certificate.public_key().public_numbers()  # type: ignore[union-attr]
            size = (certificate.public_key().key_size + 7) // 8  # type: ignore[union-attr]
            x = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
            assert int.from_bytes(x, "big") == numbers.x and len(x) == size  # type: ignore[union-attr]
        certificates.append(raw)
    return certificates, obj["spiffe_sequence"], obj["spiffe_refresh_hint"]


def dmc_admin(ca: CaHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(DMC_ADMIN),
            "--ca",
            ca.address,
            "--cert",
            str(ca.data_dir / "admin.pem"),
            "--key",
            str(ca.data_dir / "admin.key"),
            "--bundle",
            str(ca.data_dir / "bundle.pem"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SPIFFE_READER = textwrap.dedent(
    """
    import sys
    from cryptography.hazmat.primitives import serialization
    from spiffe import TrustDomain, X509Bundle

    bundle = X509Bundle.parse(TrustDomain("example.org"), open(sys.argv[1], "rb").read())
    for certificate in bundle.x509_authorities:
        print(certificate.public_bytes(serialization.Encoding.DER).hex())
    """
)


def test_exported_spiffe_bundle_follows_the_spec_and_matches_the_pem_export(
    ca: CaHarness, tmp_path: Path
) -> None:
    # Three authorities of the three key families, in three states.
    with ca.admin_channel() as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        admin.PrepareAuthority(
            admin_pb2.PrepareAuthorityRequest(key_type="ec-p384"), timeout=TIMEOUT
        )
        admin.PrepareAuthority(
            admin_pb2.PrepareAuthorityRequest(key_type="rsa-2048"), timeout=TIMEOUT
        )

    spiffe = dmc_admin(ca, "bundle", "show", "--format", "spiffe")
    pem = dmc_admin(ca, "bundle", "show", "--format", "pem")

    assert spiffe.returncode == 0 and pem.returncode == 0, spiffe.stderr + pem.stderr
    certificates, sequence, refresh_hint = read_bundle_per_spec(spiffe.stdout.encode())
    pem_certificates = [der(c) for c in x509.load_pem_x509_certificates(pem.stdout.encode())]
    assert certificates == pem_certificates and len(certificates) == 3
    assert sequence == 3 and refresh_hint > 0
    # dmc's own reader, which clients use for federation, reads the same.
    parsed = parse_spiffe_bundle(spiffe.stdout)
    assert [der(c) for c in parsed.x509_authorities] == certificates
    # The spiffe package reads the PEM export as the same certificates.
    (tmp_path / "bundle.pem").write_text(pem.stdout)
    read = subprocess.run(
        [sys.executable, "-c", SPIFFE_READER, str(tmp_path / "bundle.pem")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sorted(read.stdout.split()) == sorted(c.hex() for c in certificates)


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "ec-p521", "rsa-2048"])
def test_spiffe_bundle_round_trips(key_type: str) -> None:
    key = new_key(key_type) if key_type != "ec-p521" else _p521()
    roots = (
        make_root(common_name="a", key=key).certificate,
        make_root(common_name="b").certificate,
    )
    bundle = SpiffeBundle(x509_authorities=roots, sequence=7, refresh_hint_seconds=300)

    document = write_spiffe_bundle(bundle)

    assert parse_spiffe_bundle(document) == bundle
    read_bundle_per_spec(document)


def _p521() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP521R1())


def test_writer_lists_a_certificate_once() -> None:
    root = make_root().certificate

    document = write_spiffe_bundle(SpiffeBundle((root, root), 1, 60))

    assert len(json.loads(document)["keys"]) == 1


def _document(**changes: Any) -> dict[str, Any]:
    root = make_root().certificate
    obj: dict[str, Any] = json.loads(write_spiffe_bundle(SpiffeBundle((root,), 1, 60)))
    obj["keys"][0].update(changes)
    return obj


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use": None}, "has no 'use'"),
        ({"x5c": []}, "exactly one certificate, it has 0"),
        ({"x5c": ["AAAA", "BBBB"]}, "exactly one certificate, it has 2"),
        ({"x5c": ["not base64!"]}, "not a base64 DER certificate"),
        ({"x": "AAAA"}, "'x' does not match"),
        ({"kty": "RSA"}, "'kty' does not match"),
    ],
)
def test_reader_refuses_a_malformed_x509_key_naming_it(
    changes: dict[str, Any], message: str
) -> None:
    obj = _document(**changes)
    if changes.get("use", "") is None:
        del obj["keys"][0]["use"]

    with pytest.raises(InvalidArgument, match=message) as caught:
        parse_spiffe_bundle(json.dumps(obj), "peer.json")
    assert "peer.json: key 1" in str(caught.value)


def test_reader_refuses_a_sequence_that_is_not_a_number() -> None:
    obj = _document()
    obj["spiffe_sequence"] = "7"

    with pytest.raises(InvalidArgument, match="'spiffe_sequence' is not a whole number"):
        parse_spiffe_bundle(json.dumps(obj))


def test_reader_passes_over_jwt_svid_keys() -> None:
    obj = _document()
    obj["keys"].append({"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "P-256"})

    bundle = parse_spiffe_bundle(json.dumps(obj))

    assert len(bundle.x509_authorities) == 1
