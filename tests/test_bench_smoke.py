"""Smoke tests of the scripts beside the product: the issuance benchmark and the dev certs.

The benchmark runs for real (a `dmc-ca dev` subprocess and client processes on 127.0.0.1),
but briefly; these tests check that it reports its figures, never how large they are.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from dmc.pem import load_certificates_file, load_private_key_file
from dmc.svid import parse_svid

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "issuance.py"
MAKE_DEV_CERTS = REPO / "certs" / "make-dev-certs.py"


def _run(*args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO,
    )


def _openssl_verify(bundle: Path, *leaves: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), "-purpose", purpose, *map(str, leaves)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- bench/issuance.py ----------------------------------------------------------------------


def test_bench_quick_reports_positive_figures_as_json() -> None:
    result = _run(BENCH, "--quick", "--output", "json", timeout=120)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cpu_count"] == os.cpu_count()
    for library in ("python", "cryptography", "grpcio"):
        assert report[library]
    assert report["in_process"]["svids_per_second"] > 0
    assert report["in_process"]["iterations"] > 0
    end_to_end = report["end_to_end"]
    assert end_to_end["renewals_per_second"] > 0
    assert end_to_end["renewals"] > 0
    assert end_to_end["clients"] == 2
    assert end_to_end["errors"] == 0, end_to_end["first_error"]
    assert 0 < end_to_end["p50_ms"] <= end_to_end["p99_ms"]
    assert report["ratio"] == pytest.approx(
        end_to_end["renewals_per_second"] / report["in_process"]["svids_per_second"]
    )


def test_bench_table_names_each_figure() -> None:
    result = _run(BENCH, "--quick", "--seconds", "0.5", "--clients", "1", timeout=120)

    assert result.returncode == 0, result.stderr
    lines = {line.strip().split("  ")[0]: line for line in result.stdout.splitlines()}
    for label in ("machine", "libraries", "in-process limit", "end-to-end Renew", "latency"):
        assert label in lines, result.stdout
    assert "SVIDs/s" in lines["in-process limit"]
    assert "renewals/s" in lines["end-to-end Renew"]
    assert "1 client process," in lines["end-to-end Renew"]
    assert f"{os.cpu_count()} cores" in lines["machine"]


@pytest.mark.parametrize("flag", ["--clients", "--seconds"])
def test_bench_refuses_zero_before_starting_anything(flag: str) -> None:
    result = _run(BENCH, flag, "0", timeout=60)

    assert result.returncode == 2
    assert "must be positive" in result.stderr
    assert result.stdout == ""


# -- certs/make-dev-certs.py ----------------------------------------------------------------


def test_make_dev_certs_leaves_verify_with_openssl(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ids = ["spiffe://acme.test/api", "spiffe://acme.test/jobs/nightly"]

    result = _run(
        MAKE_DEV_CERTS,
        "--trust-domain",
        "acme.test",
        *(arg for spiffe_id in ids for arg in ("--id", spiffe_id)),
        "--out",
        out,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    bundle, api, nightly = out / "bundle.pem", out / "api.pem", out / "jobs-nightly.pem"
    server = _openssl_verify(bundle, api, nightly, purpose="sslserver")
    assert server.returncode == 0, server.stdout + server.stderr
    client = _openssl_verify(bundle, api, nightly, purpose="sslclient")
    assert client.returncode == 0, client.stdout + client.stderr
    for leaf, spiffe_id in ((api, ids[0]), (nightly, ids[1])):
        (certificate,) = load_certificates_file(leaf)
        assert str(parse_svid(certificate).spiffe_id) == spiffe_id


def test_make_dev_certs_writes_keys_0600_matching_their_certificates(tmp_path: Path) -> None:
    result = _run(MAKE_DEV_CERTS, "--out", tmp_path, timeout=60)

    assert result.returncode == 0, result.stderr
    for stem, certificate_file in (
        ("root", "bundle.pem"),
        ("server", "server.pem"),
        ("client", "client.pem"),
    ):
        key_path = tmp_path / f"{stem}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        certificate = load_certificates_file(tmp_path / certificate_file)[0]
        assert load_private_key_file(key_path).public_key() == certificate.public_key()


def test_make_dev_certs_puts_host_names_on_the_first_id_only(tmp_path: Path) -> None:
    result = _run(
        MAKE_DEV_CERTS,
        "--out",
        tmp_path,
        "--dns-name",
        "api.acme.test",
        "--ip-san",
        "::1",
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    server = load_certificates_file(tmp_path / "server.pem")[0]
    client = load_certificates_file(tmp_path / "client.pem")[0]
    server_names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert server_names.get_values_for_type(x509.DNSName) == ["api.acme.test"]
    assert [str(ip) for ip in server_names.get_values_for_type(x509.IPAddress)] == ["::1"]
    client_names = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert client_names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/client"
    ]
    assert client_names.get_values_for_type(x509.DNSName) == []


def test_make_dev_certs_refuses_an_id_outside_the_trust_domain(tmp_path: Path) -> None:
    result = _run(MAKE_DEV_CERTS, "--out", tmp_path, "--id", "spiffe://other.test/web", timeout=60)

    assert result.returncode == 1
    assert "not in trust domain example.org" in result.stderr
    assert not (tmp_path / "bundle.pem").exists()
