"""Plugged-in CAs: `dmc-ca init` and `dmc-admin bundle prepare` with `--ca-cert/--ca-key`
(SPEC §2, §6), with roots and intermediates made at run time and the broken inputs of
cases 005 and 007.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from etcd3aio import Etcd3Client, prefix_range_end

from ca_harness import CaHarness, ImportedCa
from certgen import CertAndKey, make_intermediate, make_root, new_key
from dmc._issuance import csr_for, read_svid_response
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.spiffe_id import SpiffeId
from dmc.v1 import ca_pb2, ca_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.service import bundle_to_proto

CASES = Path(__file__).parent / "cases"
BIN = Path(sys.executable).parent
TIMEOUT = 15


# ---------------------------------------------------------------- helpers


def pem(cert_and_key: CertAndKey) -> tuple[bytes, bytes]:
    return (
        certificates_to_pem([cert_and_key.certificate]),
        private_key_to_pem(cert_and_key.key),
    )


def write_ca(folder: Path, chain: list[CertAndKey]) -> tuple[Path, Path]:
    """``ca.pem`` (the chain, signing certificate first) and ``ca.key`` (its key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "ca.pem", folder / "ca.key"
    cert_file.write_bytes(certificates_to_pem([c.certificate for c in chain]))
    key_file.write_bytes(private_key_to_pem(chain[0].key))
    return cert_file, key_file


def run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / command), *args], capture_output=True, text=True, timeout=60, check=False
    )


def dmc_admin(ca: CaHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return run(
        "dmc-admin",
        "--ca",
        ca.address,
        "--cert",
        str(ca.data_dir / "admin.pem"),
        "--key",
        str(ca.data_dir / "admin.key"),
        "--bundle",
        str(ca.data_dir / "bundle.pem"),
        *args,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: INVALID_ARGUMENT: "), lines[0]
    return lines[0]


def etcd_keys(endpoint: str, prefix: str) -> dict[bytes, bytes]:
    async def read() -> dict[bytes, bytes]:
        client = Etcd3Client([endpoint])
        await client.connect()
        try:
            assert client.kv is not None
            response = await client.kv.get(prefix, range_end=prefix_range_end(prefix))
            return {kv.key: kv.value for kv in response.kvs}
        finally:
            await client.close()

    return asyncio.run(read())


def current_bundle(ca: CaHarness) -> ca_pb2.TrustBundle:
    assert ca.ca is not None
    return bundle_to_proto(ca.ca.bundle())


def roots_of(bundle: ca_pb2.TrustBundle) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(a.certificate) for a in bundle.authorities]


def issue(ca: CaHarness, path: str) -> ca_pb2.SVIDResponse:
    """Bootstrap a workload through the Bootstrap listener, trusting the current bundle."""
    spiffe_id = ca.create_entry(path)
    token = ca.join_token(spiffe_id)
    key = new_key()
    roots = certificates_to_pem(roots_of(current_bundle(ca)))
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    with grpc.secure_channel(ca.bootstrap_address, credentials) as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(join_token=token, csr=csr_for(key, SpiffeId.parse(spiffe_id))),
            timeout=TIMEOUT,
        )
    read_svid_response(response, key, ())
    return response


def openssl_verify(folder: Path, root: x509.Certificate, response: ca_pb2.SVIDResponse) -> str:
    """``openssl verify`` of the SVID against ``root`` alone, intermediates untrusted."""
    chain = [x509.load_der_x509_certificate(d) for d in response.certificate_chain]
    (folder / "root.pem").write_bytes(certificates_to_pem([root]))
    (folder / "leaf.pem").write_bytes(certificates_to_pem(chain[:1]))
    args = ["openssl", "verify", "-CAfile", str(folder / "root.pem")]
    if chain[1:]:
        (folder / "untrusted.pem").write_bytes(certificates_to_pem(chain[1:]))
        args += ["-untrusted", str(folder / "untrusted.pem")]
    result = subprocess.run(
        [*args, str(folder / "leaf.pem")], capture_output=True, text=True, check=False
    )
    return result.stdout + result.stderr


@pytest.fixture
def external() -> tuple[CertAndKey, CertAndKey]:
    """An operator's root and an intermediate under it (the plugged-in CA)."""
    root = make_root("example.org", common_name="corp root")
    return root, make_intermediate(root, common_name="corp dmc intermediate")


# ---------------------------------------------------------------- (c) intermediates

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


@needs_openssl
def test_prepared_intermediate_signs_svids_that_openssl_verifies_against_the_external_root(
    ca: CaHarness, external: tuple[CertAndKey, CertAndKey], tmp_path: Path
) -> None:
    root, intermediate = external
    cert_file, key_file = write_ca(tmp_path / "import", [intermediate, root])

    prepared = dmc_admin(
        ca, "bundle", "prepare", "--ca-cert", str(cert_file), "--ca-key", str(key_file)
    )
    assert prepared.returncode == 0, prepared.stderr
    assert dmc_admin(ca, "bundle", "activate").returncode == 0

    # The bundle publishes the external root, never the intermediate (SPEC §2)...
    assert root.certificate in roots_of(current_bundle(ca))
    assert intermediate.certificate not in roots_of(current_bundle(ca))
    # ...and every SVID response carries the intermediate after the leaf.
    response = issue(ca, "/web")
    chain = [x509.load_der_x509_certificate(d) for d in response.certificate_chain]
    assert chain[1:] == [intermediate.certificate]
    assert "leaf.pem: OK" in openssl_verify(tmp_path, root.certificate, response)


@needs_openssl
def test_init_with_an_intermediate_publishes_its_root_and_chains_every_svid(
    etcd: EtcdProcess,
    etcd_prefix: str,
    external: tuple[CertAndKey, CertAndKey],
    tmp_path: Path,
) -> None:
    root, intermediate = external
    chain_pem = certificates_to_pem([intermediate.certificate, root.certificate])
    imported = ImportedCa(chain_pem, private_key_to_pem(intermediate.key))
    harness = CaHarness(etcd.endpoint, etcd_prefix, tmp_path / "ca", imported=imported).start()
    try:
        assert x509.load_pem_x509_certificates(harness.bundle_pem) == [root.certificate]
        response = issue(harness, "/web")
        assert "leaf.pem: OK" in openssl_verify(tmp_path, root.certificate, response)
    finally:
        harness.stop()


# ---------------------------------------------------------------- refused imports


def refused_import(kind: str) -> list[CertAndKey]:
    now = datetime.now(UTC)
    root = make_root(common_name="corp root")
    if kind == "key that does not match":
        other = make_intermediate(root)
        return [CertAndKey(make_intermediate(root).certificate, other.key), root]
    if kind == "expired":
        expired = make_intermediate(
            root, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
        )
        return [expired, root]
    assert kind == "no keyCertSign"
    return [make_intermediate(root, usages=("crl_sign",)), root]


REFUSALS = {
    "key that does not match": "does not match",
    "expired": "expired at",
    "no keyCertSign": "no keyCertSign",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_bundle_prepare_refuses_a_bad_import_saying_why_and_writes_nothing(
    ca: CaHarness, etcd: EtcdProcess, kind: str, tmp_path: Path
) -> None:
    cert_file, key_file = write_ca(tmp_path, refused_import(kind))
    before = etcd_keys(etcd.endpoint, ca.prefix)

    result = dmc_admin(
        ca, "bundle", "prepare", "--ca-cert", str(cert_file), "--ca-key", str(key_file)
    )

    assert REFUSALS[kind] in one_error_line(result)
    assert etcd_keys(etcd.endpoint, ca.prefix) == before


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_ca_init_refuses_a_bad_import_saying_why_and_writes_nothing(
    etcd: EtcdProcess, etcd_prefix: str, kind: str, tmp_path: Path
) -> None:
    cert_file, key_file = write_ca(tmp_path / "import", refused_import(kind))

    result = run(
        "dmc-ca",
        "init",
        "--trust-domain",
        "example.org",
        "--etcd",
        f"http://{etcd.endpoint}",
        "--etcd-prefix",
        etcd_prefix,
        "--kek-file",
        str(tmp_path / "kek"),
        "--out",
        str(tmp_path / "out"),
        "--ca-cert",
        str(cert_file),
        "--ca-key",
        str(key_file),
    )

    assert REFUSALS[kind] in one_error_line(result)
    assert etcd_keys(etcd.endpoint, etcd_prefix) == {}
    assert not (tmp_path / "out" / "admin.pem").exists()


# ---------------------------------------------------------------- case 005 under an import


@pytest.fixture
def case_005(tmp_path: Path) -> tuple[CertAndKey, Path]:
    """Case 005's leaves re-signed by an operator root, as its gen.py does with --ca-cert."""
    root = make_root("example.org", common_name="corp root")
    cert_pem, key_pem = pem(root)
    (tmp_path / "root.pem").write_bytes(cert_pem)
    (tmp_path / "root.key").write_bytes(key_pem)
    out = tmp_path / "case"
    subprocess.run(
        [
            sys.executable,
            str(CASES / "005-svid-with-several-uri-sans" / "gen.py"),
            "--out",
            str(out),
            "--ca-cert",
            str(tmp_path / "root.pem"),
            "--ca-key",
            str(tmp_path / "root.key"),
        ],
        check=True,
        capture_output=True,
    )
    return root, out


def renew_as(ca: CaHarness, folder: Path, name: str) -> grpc.RpcError | None:
    chain = (folder / f"{name}.pem").read_bytes()
    key = (folder / f"{name}.key").read_bytes()
    roots = certificates_to_pem(roots_of(current_bundle(ca)))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )
    with grpc.secure_channel(ca.address, credentials) as channel:
        try:
            ca_pb2_grpc.CertificateAuthorityStub(channel).Renew(
                ca_pb2.RenewRequest(csr=csr_for(new_key(), None)), timeout=TIMEOUT
            )
        except grpc.RpcError as error:
            return error
    return None


def check_case_005(ca: CaHarness, folder: Path) -> None:
    for bad in ("svid-https-uri-then-spiffe-id", "svid-two-spiffe-ids"):
        error = renew_as(ca, folder, bad)
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        assert "2 URI SANs" in (error.details() or ""), error.details()
    # The one-URI leaf authenticates (empty scope, SPEC §3); what follows is not about it.
    error = renew_as(ca, folder, "svid-one-uri-ok")
    assert error is None or error.code() not in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAVAILABLE,
    ), error.details() if error else None


def test_case_005_leaves_of_a_prepared_import_are_refused_by_uri_count(
    ca: CaHarness, case_005: tuple[CertAndKey, Path], tmp_path: Path
) -> None:
    _root, folder = case_005

    result = dmc_admin(
        ca,
        "bundle",
        "prepare",
        "--ca-cert",
        str(tmp_path / "root.pem"),
        "--ca-key",
        str(tmp_path / "root.key"),
    )

    assert result.returncode == 0, result.stderr
    check_case_005(ca, folder)


def test_case_005_leaves_of_an_init_import_are_refused_by_uri_count(
    etcd: EtcdProcess, etcd_prefix: str, case_005: tuple[CertAndKey, Path], tmp_path: Path
) -> None:
    root, folder = case_005
    imported = ImportedCa(*pem(root))
    harness = CaHarness(etcd.endpoint, etcd_prefix, tmp_path / "ca", imported=imported).start()
    try:
        check_case_005(harness, folder)
    finally:
        harness.stop()


# ---------------------------------------------------------------- case 007 as --ca-cert


def formatted(chain: list[x509.Certificate]) -> dict[str, str]:
    """The chain written the seven ways of case 007 (see its gen.py)."""
    first, second = (c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
    lines = second.splitlines()
    return {
        "bundle-clean.pem": first + second,
        "bundle-trailing-blank-lines.pem": first + second + "\n\n  \n\t\n",
        "bundle-leading-and-between-blank-lines.pem": "\n\n" + first + "\n\n" + second,
        "bundle-crlf.pem": (first + second).replace("\n", "\r\n"),
        "bundle-explanatory-text.pem": "subject=intermediate\n" + first + "\n# root\n" + second,
        "bundle-second-block-truncated.pem": first + "\n".join(lines[:-2]) + "\n",
        "bundle-second-block-bad-char.pem": first
        + "\n".join([*lines[:3], lines[3][:10] + "!" + lines[3][11:], *lines[4:]])
        + "\n",
    }


HARMLESS = [
    "bundle-clean.pem",
    "bundle-trailing-blank-lines.pem",
    "bundle-leading-and-between-blank-lines.pem",
    "bundle-crlf.pem",
    "bundle-explanatory-text.pem",
]
BROKEN = ["bundle-second-block-truncated.pem", "bundle-second-block-bad-char.pem"]


@pytest.fixture
def formatted_chain(
    external: tuple[CertAndKey, CertAndKey], tmp_path: Path
) -> Iterator[tuple[CertAndKey, CertAndKey, Path]]:
    root, intermediate = external
    folder = tmp_path / "formatted"
    folder.mkdir()
    for name, text in formatted([intermediate.certificate, root.certificate]).items():
        (folder / name).write_bytes(text.encode())
    (folder / "ca.key").write_bytes(private_key_to_pem(intermediate.key))
    yield root, intermediate, folder


@pytest.mark.parametrize("name", HARMLESS)
def test_bundle_prepare_reads_a_ca_chain_in_harmless_formatting(
    ca: CaHarness, formatted_chain: tuple[CertAndKey, CertAndKey, Path], name: str
) -> None:
    root, _intermediate, folder = formatted_chain

    result = dmc_admin(
        ca,
        "bundle",
        "prepare",
        "--ca-cert",
        str(folder / name),
        "--ca-key",
        str(folder / "ca.key"),
    )

    assert result.returncode == 0, result.stderr
    assert root.certificate in roots_of(current_bundle(ca))


@pytest.mark.parametrize("name", BROKEN)
def test_bundle_prepare_refuses_a_broken_ca_chain_naming_file_and_block(
    ca: CaHarness,
    etcd: EtcdProcess,
    formatted_chain: tuple[CertAndKey, CertAndKey, Path],
    name: str,
) -> None:
    _root, _intermediate, folder = formatted_chain
    before = etcd_keys(etcd.endpoint, ca.prefix)

    result = dmc_admin(
        ca,
        "bundle",
        "prepare",
        "--ca-cert",
        str(folder / name),
        "--ca-key",
        str(folder / "ca.key"),
    )

    line = one_error_line(result)
    assert str(folder / name) in line and "block 2" in line
    assert etcd_keys(etcd.endpoint, ca.prefix) == before


@pytest.mark.parametrize("name", BROKEN)
def test_ca_init_refuses_a_broken_ca_chain_naming_file_and_block(
    etcd: EtcdProcess,
    etcd_prefix: str,
    formatted_chain: tuple[CertAndKey, CertAndKey, Path],
    name: str,
    tmp_path: Path,
) -> None:
    _root, _intermediate, folder = formatted_chain

    result = run(
        "dmc-ca",
        "init",
        "--trust-domain",
        "example.org",
        "--etcd",
        f"http://{etcd.endpoint}",
        "--etcd-prefix",
        etcd_prefix,
        "--kek-file",
        str(tmp_path / "kek"),
        "--out",
        str(tmp_path / "out"),
        "--ca-cert",
        str(folder / name),
        "--ca-key",
        str(folder / "ca.key"),
    )

    line = one_error_line(result)
    assert str(folder / name) in line and "block 2" in line
    assert etcd_keys(etcd.endpoint, etcd_prefix) == {}


def test_bundle_prepare_reads_a_der_root(ca: CaHarness, tmp_path: Path) -> None:
    root = make_root("example.org", common_name="corp der root")
    (tmp_path / "root.der").write_bytes(root.certificate.public_bytes(serialization.Encoding.DER))
    (tmp_path / "root.key").write_bytes(private_key_to_pem(root.key))

    result = dmc_admin(
        ca,
        "bundle",
        "prepare",
        "--ca-cert",
        str(tmp_path / "root.der"),
        "--ca-key",
        str(tmp_path / "root.key"),
    )

    assert result.returncode == 0, result.stderr
    assert root.certificate in roots_of(current_bundle(ca))
