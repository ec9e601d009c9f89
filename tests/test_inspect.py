"""``dmc inspect FILE`` (SPEC §6), run as the installed command: certificates made at run
time, the several-URI-SAN leaves of cases/005 and the bundle formats of cases/007."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certgen import CertAndKey, make_intermediate, make_leaf, make_root
from dmc.scope import DelegationScope

DMC = Path(sys.executable).with_name("dmc")
CASES = Path(__file__).parent / "cases"
CASE_005 = CASES / "005-svid-with-several-uri-sans"
CASE_007 = CASES / "007-pem-bundle-formatting"
SPEC_KEYS = {
    "spiffe_id",
    "serial",
    "not_before",
    "not_after",
    "permissions",
    "audiences",
    "max_depth",
    "delegators",
    "scope_not_after",
    "chain",
}
WEB = "spiffe://example.org/web"
JOB = "spiffe://example.org/web/mid/job"


def dmc(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dmc`` with no DMC_* settings from the test's environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DMC_")}
    return subprocess.run(
        [str(DMC), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def inspect_json(path: Path) -> dict[str, Any]:
    result = dmc("inspect", path, "--output", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def refused(path: Path) -> str:
    """Inspect ``path`` expecting refusal; return the one error line."""
    result = dmc("inspect", path, "--output", "json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def root() -> CertAndKey:
    return make_root("example.org")


# ---------------------------------------------------------------- SVIDs made here


def test_delegated_svid_shows_every_field_of_spec_section_6(
    root: CertAndKey, tmp_path: Path
) -> None:
    scope_end = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    scope = DelegationScope(
        permissions=("/demo.Echo/Say",),
        audiences=("spiffe://example.org/db",),
        max_depth=0,
        delegators=(WEB, "spiffe://example.org/web/mid"),
        not_after=scope_end,
    )
    leaf = make_leaf(root, uris=[JOB], scope=scope).certificate

    shown = inspect_json(write_pem(tmp_path / "svid.pem", leaf))

    assert set(shown) == SPEC_KEYS
    assert shown["spiffe_id"] == JOB
    assert shown["serial"] == format(leaf.serial_number, "x")
    assert shown["not_before"] == rfc3339(leaf.not_valid_before_utc)
    assert shown["not_after"] == rfc3339(leaf.not_valid_after_utc)
    assert shown["permissions"] == ["/demo.Echo/Say"]
    assert shown["audiences"] == ["spiffe://example.org/db"]
    assert shown["max_depth"] == 0
    assert shown["delegators"] == [WEB, "spiffe://example.org/web/mid"]
    assert shown["scope_not_after"] == rfc3339(scope_end)


def test_chain_lists_every_certificate_leaf_first(root: CertAndKey, tmp_path: Path) -> None:
    intermediate = make_intermediate(root)
    leaf = make_leaf(intermediate, uris=[WEB]).certificate
    path = write_pem(tmp_path / "chain.pem", leaf, intermediate.certificate)

    chain = inspect_json(path)["chain"]

    assert chain == [
        {
            "subject": "",
            "issuer": "CN=intermediate,O=dmc",
            "serial": format(leaf.serial_number, "x"),
            "not_after": rfc3339(leaf.not_valid_after_utc),
        },
        {
            "subject": "CN=intermediate,O=dmc",
            "issuer": "CN=example.org,O=dmc",
            "serial": format(intermediate.certificate.serial_number, "x"),
            "not_after": rfc3339(intermediate.certificate.not_valid_after_utc),
        },
    ]


def test_svid_without_scope_extension_shows_the_empty_scope(
    root: CertAndKey, tmp_path: Path
) -> None:
    leaf = make_leaf(root, uris=[WEB]).certificate

    shown = inspect_json(write_pem(tmp_path / "svid.pem", leaf))

    assert (shown["permissions"], shown["audiences"], shown["max_depth"]) == ([], [], 0)
    assert (shown["delegators"], shown["scope_not_after"]) == ([], None)


def test_der_certificate_is_read(root: CertAndKey, tmp_path: Path) -> None:
    leaf = make_leaf(root, uris=[WEB]).certificate
    path = tmp_path / "svid.der"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.DER))

    assert inspect_json(path)["spiffe_id"] == WEB


def test_text_output_names_id_serial_expiry_and_scope(root: CertAndKey, tmp_path: Path) -> None:
    scope = DelegationScope(permissions=("*",), audiences=("*",), max_depth=2)
    leaf = make_leaf(root, uris=[WEB], scope=scope).certificate

    result = dmc("inspect", write_pem(tmp_path / "svid.pem", leaf))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"spiffe id: {WEB}" in lines
    assert f"serial: {leaf.serial_number:x}" in lines
    assert f"not after: {rfc3339(leaf.not_valid_after_utc)}" in lines
    assert "permissions: *" in lines
    assert "max depth: 2" in lines


def test_output_json_is_accepted_before_the_sub_command(root: CertAndKey, tmp_path: Path) -> None:
    path = write_pem(tmp_path / "svid.pem", make_leaf(root, uris=[WEB]).certificate)

    result = dmc("--output", "json", "inspect", path)

    assert json.loads(result.stdout)["spiffe_id"] == WEB


@pytest.mark.parametrize(
    "variant",
    [
        {"usages": ("digital_signature", "key_cert_sign")},
        {"usages": ("digital_signature", "crl_sign")},
        {"uris": ["spiffe://Example.org/web"]},
        {"uris": ["spiffe://example.org/web", "spiffe://example.org/db"]},
        {"uris": []},
    ],
    ids=["keyCertSign", "cRLSign", "upper-case-trust-domain", "two-uri-sans", "no-uri-san"],
)
def test_leaf_that_is_not_an_x509_svid_is_refused(
    root: CertAndKey, tmp_path: Path, variant: dict[str, Any]
) -> None:
    leaf = make_leaf(root, dns_names=["web.example.org"], **variant).certificate

    line = refused(write_pem(tmp_path / "leaf.pem", leaf, root.certificate))

    assert line.startswith("error: UNAUTHENTICATED: ")


def test_bundle_of_authorities_lists_its_certificates(root: CertAndKey, tmp_path: Path) -> None:
    other = make_root("example.org", common_name="next")
    path = write_pem(tmp_path / "bundle.pem", root.certificate, other.certificate)

    shown = inspect_json(path)

    assert [c["subject"] for c in shown["certificates"]] == [
        "CN=example.org,O=dmc",
        "CN=next,O=dmc",
    ]


def test_missing_file_is_one_invalid_argument_line(tmp_path: Path) -> None:
    line = refused(tmp_path / "absent.pem")

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "absent.pem" in line


# ---------------------------------------------------------------- cases/005


@pytest.mark.parametrize("name", ["svid-https-uri-then-spiffe-id.pem", "svid-two-spiffe-ids.pem"])
def test_case_005_leaf_with_two_uri_sans_is_refused(name: str) -> None:
    line = refused(CASE_005 / name)

    assert line.startswith("error: UNAUTHENTICATED: ")
    assert "2 URI SANs" in line
    assert "spiffe://example.org/workload" not in line


def test_case_005_leaf_with_one_uri_is_shown() -> None:
    shown = inspect_json(CASE_005 / "svid-one-uri-ok.pem")

    assert shown["spiffe_id"] == "spiffe://example.org/workload/api"
    assert (shown["permissions"], shown["max_depth"]) == ([], 0)


# ---------------------------------------------------------------- cases/007


@pytest.mark.parametrize(
    "name",
    [
        "bundle-trailing-blank-lines.pem",
        "bundle-leading-and-between-blank-lines.pem",
        "bundle-crlf.pem",
        "bundle-explanatory-text.pem",
    ],
)
def test_case_007_harmless_formatting_reads_as_the_clean_bundle(name: str) -> None:
    clean = inspect_json(CASE_007 / "bundle-clean.pem")

    assert len(clean["certificates"]) == 2
    assert inspect_json(CASE_007 / name) == clean


def test_case_007_der_root_reads_as_the_first_certificate() -> None:
    clean = inspect_json(CASE_007 / "bundle-clean.pem")

    shown = inspect_json(CASE_007 / "root-a.der")

    assert shown["certificates"] == clean["certificates"][:1]


@pytest.mark.parametrize(
    "name", ["bundle-second-block-truncated.pem", "bundle-second-block-bad-char.pem"]
)
def test_case_007_broken_block_fails_naming_file_and_block(name: str) -> None:
    line = refused(CASE_007 / name)

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert name in line
    assert "block 2" in line
