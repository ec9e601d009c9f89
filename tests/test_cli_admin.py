"""`dmc-admin` as the installed command against the session's CA (SPEC §4, §6).

Entries, tokens, the bundle and the status through the Admin service; ``--output json``
before and after the sub-command; every setting from its DMC_* variable; refusals as one
``error: STATUS: details`` line, input errors before any call.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_harness import CaHarness
from dmc.v1 import ca_pb2, ca_pb2_grpc

DMC_ADMIN = Path(sys.executable).with_name("dmc-admin")
ADMIN_ID = "spiffe://example.org/dmc/admin"


def dmc_admin(
    *args: str | Path, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dmc-admin``; DMC_* settings come only from ``environ``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    return subprocess.run(
        [str(DMC_ADMIN), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**clean, **(environ or {})},
        timeout=60,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; fails on usage dumps and tracebacks."""
    assert result.returncode != 0, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert "usage:" not in result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.rstrip("\n")


def credential_flags(ca: CaHarness) -> list[str | Path]:
    return [
        "--ca",
        ca.address,
        "--cert",
        ca.data_dir / "admin.pem",
        "--key",
        ca.data_dir / "admin.key",
        "--bundle",
        ca.data_dir / "bundle.pem",
    ]


def admin(ca: CaHarness, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``dmc-admin`` with the admin credential of ``ca``, as flags."""
    return dmc_admin(*credential_flags(ca), *args)


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def unique_id(ca: CaHarness, label: str) -> str:
    return ca.id(f"/cli-admin/{label}-{uuid.uuid4().hex[:12]}")


def closed_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


# -- entries ---------------------------------------------------------------------------------


def test_entry_create_get_list_delete(dev_ca: CaHarness) -> None:
    spiffe_id = unique_id(dev_ca, "web")

    created = ok_json(
        admin(
            dev_ca,
            "--output",
            "json",
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--permission",
            "/demo.Echo/*",
            "--permission",
            "/demo.Other/Say",
            "--audience",
            "spiffe://example.org/db",
            "--max-depth",
            "2",
            "--max-ttl",
            "10m",
            "--dns-name",
            f"{uuid.uuid4().hex[:8]}.web.example.org",
        )
    )
    got = ok_json(admin(dev_ca, "entry", "get", spiffe_id, "--output", "json"))
    listed = ok_json(admin(dev_ca, "entry", "list", "--output", "json"))
    text_list = admin(dev_ca, "entry", "list")
    deleted = admin(dev_ca, "entry", "delete", spiffe_id)
    after = admin(dev_ca, "entry", "get", spiffe_id)

    assert created["spiffe_id"] == spiffe_id
    assert created["permissions"] == ["/demo.Echo/*", "/demo.Other/Say"]
    assert created["audiences"] == ["spiffe://example.org/db"]
    assert created["max_depth"] == 2
    assert created["max_ttl_seconds"] == 600
    assert got == created
    assert created in listed["entries"]
    assert any(e["spiffe_id"] == ADMIN_ID for e in listed["entries"])
    assert text_list.returncode == 0
    assert spiffe_id in text_list.stdout.splitlines()
    assert deleted.returncode == 0, deleted.stderr
    assert error_line(after).startswith("error: NOT_FOUND: ")
    assert spiffe_id in after.stderr


def test_entry_get_prints_text_by_default(dev_ca: CaHarness) -> None:
    result = admin(dev_ca, "entry", "get", ADMIN_ID)

    assert result.returncode == 0, result.stderr
    assert ADMIN_ID in result.stdout
    assert "/dmc.v1.Admin/*" in result.stdout
    with pytest.raises(ValueError):
        json.loads(result.stdout)


def test_output_json_is_accepted_before_and_after_the_sub_command(dev_ca: CaHarness) -> None:
    before = ok_json(admin(dev_ca, "--output", "json", "entry", "list"))
    after = ok_json(admin(dev_ca, "entry", "list", "--output", "json"))
    status_after = ok_json(admin(dev_ca, "status", "--output", "json"))

    assert {e["spiffe_id"] for e in before["entries"]} <= {
        e["spiffe_id"] for e in after["entries"]
    }
    assert status_after["caller"] == ADMIN_ID


# -- tokens ----------------------------------------------------------------------------------


def _bootstrap(ca: CaHarness, token: str, spiffe_id: str) -> ca_pb2.SVIDResponse:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with ca.bootstrap_channel() as channel:
        response: ca_pb2.SVIDResponse = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(
                join_token=token, csr=csr.public_bytes(serialization.Encoding.DER)
            ),
            timeout=10,
        )
    return response


def test_token_create_prints_the_token_alone(dev_ca: CaHarness) -> None:
    spiffe_id = dev_ca.create_entry(f"/cli-admin/token-{uuid.uuid4().hex[:12]}")

    result = admin(dev_ca, "token", "create", "--spiffe-id", spiffe_id, "--ttl", "10m")

    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    # SPEC §6: the token alone, so that `$(dmc-admin token create …)` works.
    assert token
    assert result.stdout == token + "\n"
    assert re.fullmatch(r"\S+", token)
    assert _bootstrap(dev_ca, token, spiffe_id).spiffe_id == spiffe_id


def test_token_create_json_has_a_token_field(dev_ca: CaHarness) -> None:
    spiffe_id = dev_ca.create_entry(f"/cli-admin/token-{uuid.uuid4().hex[:12]}")

    printed = ok_json(
        admin(
            dev_ca, "token", "create", "--spiffe-id", spiffe_id, "--ttl", "90s", "--output", "json"
        )
    )

    assert printed["spiffe_id"] == spiffe_id
    assert _bootstrap(dev_ca, printed["token"], spiffe_id).spiffe_id == spiffe_id


def test_token_for_an_id_without_entry_is_not_found(dev_ca: CaHarness) -> None:
    result = admin(dev_ca, "token", "create", "--spiffe-id", unique_id(dev_ca, "none"))

    assert error_line(result).startswith("error: NOT_FOUND: ")


# -- bundle and status -----------------------------------------------------------------------


def test_bundle_show_prints_the_bundle_pem(dev_ca: CaHarness) -> None:
    text = admin(dev_ca, "bundle", "show")
    printed = ok_json(admin(dev_ca, "bundle", "show", "--output", "json"))

    assert text.returncode == 0, text.stderr
    bundle = (dev_ca.data_dir / "bundle.pem").read_text()
    assert text.stdout == bundle
    assert printed["pem"] == bundle
    assert printed["trust_domain"] == "example.org"
    assert [a["state"] for a in printed["authorities"]] == ["ACTIVE"]


def test_status_shows_the_trust_domain_and_the_caller(dev_ca: CaHarness) -> None:
    text = admin(dev_ca, "status")
    printed = ok_json(admin(dev_ca, "--output", "json", "status"))

    assert text.returncode == 0, text.stderr
    assert "example.org" in text.stdout
    assert ADMIN_ID in text.stdout
    assert printed["trust_domain"] == "example.org"
    assert printed["caller"] == ADMIN_ID
    assert printed["entries"] >= 1
    assert printed["bundle"]["authorities"]


# -- environment -----------------------------------------------------------------------------


def test_every_setting_comes_from_dmc_variables(dev_ca: CaHarness) -> None:
    spiffe_id = unique_id(dev_ca, "env")
    environ = {
        "DMC_CA": dev_ca.address,
        "DMC_CERT": str(dev_ca.data_dir / "admin.pem"),
        "DMC_KEY": str(dev_ca.data_dir / "admin.key"),
        "DMC_BUNDLE": str(dev_ca.data_dir / "bundle.pem"),
        "DMC_OUTPUT": "json",
        "DMC_SPIFFE_ID": spiffe_id,
        "DMC_PERMISSION": "/demo.Echo/*,/demo.Other/*",
        "DMC_AUDIENCE": "*",
        "DMC_MAX_DEPTH": "1",
        "DMC_MAX_TTL": "5m",
        "DMC_DNS_NAME": f"{uuid.uuid4().hex[:8]}.env.example.org",
        "DMC_TTL": "2m",
    }

    created = ok_json(dmc_admin("entry", "create", environ=environ))
    token = ok_json(dmc_admin("token", "create", environ=environ))
    status = ok_json(dmc_admin("status", environ=environ))

    assert created["spiffe_id"] == spiffe_id
    assert created["permissions"] == ["/demo.Echo/*", "/demo.Other/*"]
    assert created["audiences"] == ["*"]
    assert created["max_depth"] == 1
    assert created["max_ttl_seconds"] == 300
    assert created["dns_names"] == [environ["DMC_DNS_NAME"]]
    assert token["spiffe_id"] == spiffe_id
    assert status["caller"] == ADMIN_ID


def test_a_flag_wins_over_its_variable(dev_ca: CaHarness) -> None:
    environ = {"DMC_CA": closed_address(), "DMC_OUTPUT": "json"}

    result = dmc_admin(*credential_flags(dev_ca), "--output", "text", "status", environ=environ)

    assert result.returncode == 0, result.stderr
    assert ADMIN_ID in result.stdout
    with pytest.raises(ValueError):
        json.loads(result.stdout)


def _sub_commands() -> list[list[str]]:
    return [
        [],
        ["entry"],
        ["entry", "create"],
        ["entry", "get"],
        ["entry", "list"],
        ["entry", "delete"],
        ["token"],
        ["token", "create"],
        ["bundle"],
        ["bundle", "show"],
        ["status"],
    ]


@pytest.mark.parametrize("command", _sub_commands(), ids=lambda c: " ".join(c) or "dmc-admin")
def test_help_exits_zero_and_names_each_flags_variable(command: list[str]) -> None:
    result = dmc_admin(*command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" ".join(["usage: dmc-admin", *command]))
    joined = " ".join(result.stdout.split())
    flags = set(re.findall(r"^  (--[a-z][a-z-]*)", result.stdout, flags=re.MULTILINE))
    for flag in sorted(flags - {"--help", "--output"}):
        variable = "DMC_" + flag.removeprefix("--").replace("-", "_").upper()
        assert f"[env {variable}" in joined, f"{command} {flag}"


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["entry", "get", "spiffe://example.org/a/../dmc/admin"], "segment '..'"),
        (["entry", "delete", "spiffe://EXAMPLE.org/x"], "trust domain character 'E'"),
        (
            ["entry", "create", "--spiffe-id", "spiffe://example.org/x/", "--permission", "*"],
            "trailing '/'",
        ),
        (["entry", "create", "--spiffe-id", "spiffe://example.org/x", "--permission", "**"], "**"),
        (["token", "create", "--spiffe-id", "spiffe://example.org//x"], "empty segment"),
        (["token", "create", "--spiffe-id", "spiffe://example.org/x", "--ttl", "5 min"], "5 min"),
        (["entry", "create", "--spiffe-id", "spiffe://example.org/x", "--max-depth", "17"], "17"),
    ],
)
def test_invalid_input_is_refused_before_any_call(
    dev_ca: CaHarness, argv: list[str], words: str
) -> None:
    # A closed port: a command that called the CA would say UNAVAILABLE instead.
    flags = credential_flags(dev_ca)
    flags[1] = closed_address()

    line = error_line(dmc_admin(*flags, *argv))

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert words in line


def test_deleting_the_admin_entry_is_failed_precondition(dev_ca: CaHarness) -> None:
    line = error_line(admin(dev_ca, "entry", "delete", ADMIN_ID))

    assert line.startswith("error: FAILED_PRECONDITION: ")
    assert ADMIN_ID in line
    assert admin(dev_ca, "entry", "get", ADMIN_ID).returncode == 0


def test_deleting_an_unknown_entry_is_not_found(dev_ca: CaHarness) -> None:
    spiffe_id = unique_id(dev_ca, "absent")

    line = error_line(admin(dev_ca, "entry", "delete", spiffe_id))

    assert line.startswith("error: NOT_FOUND: ")
    assert spiffe_id in line


def test_creating_an_entry_twice_is_already_exists(dev_ca: CaHarness) -> None:
    spiffe_id = unique_id(dev_ca, "twice")
    argv = ["entry", "create", "--spiffe-id", spiffe_id, "--permission", "*"]
    assert admin(dev_ca, *argv).returncode == 0

    line = error_line(admin(dev_ca, *argv))

    assert line.startswith("error: ALREADY_EXISTS: ")


def test_missing_credential_flag_is_one_invalid_argument_line() -> None:
    line = error_line(dmc_admin("status"))

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "--ca" in line


def test_workload_svid_without_admin_permission_is_permission_denied(
    dev_ca: CaHarness, tmp_path: Path
) -> None:
    spiffe_id = dev_ca.create_entry(
        f"/cli-admin/workload-{uuid.uuid4().hex[:12]}", ("/demo.Echo/*",), ("*",), 1
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with dev_ca.bootstrap_channel() as channel:
        response = ca_pb2_grpc.CertificateAuthorityStub(channel).Bootstrap(
            ca_pb2.BootstrapRequest(join_token=dev_ca.join_token(spiffe_id), csr=csr),
            timeout=10,
        )
    (tmp_path / "svid.pem").write_bytes(
        b"".join(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            for der in response.certificate_chain
        )
    )
    (tmp_path / "svid.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    flags: list[str | Path] = [
        "--ca",
        dev_ca.address,
        "--cert",
        tmp_path / "svid.pem",
        "--key",
        tmp_path / "svid.key",
        "--bundle",
        dev_ca.data_dir / "bundle.pem",
    ]

    status = error_line(dmc_admin(*flags, "status"))
    listing = error_line(dmc_admin(*flags, "entry", "list"))

    assert status.startswith("error: PERMISSION_DENIED: ")
    assert spiffe_id in status
    assert "/dmc.v1.Admin/GetStatus" in status
    assert listing.startswith("error: PERMISSION_DENIED: ")
