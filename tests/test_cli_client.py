"""The ``dmc`` command's client sub-commands (SPEC §6), run as the installed command.

The first part needs no CA: refusals the command makes itself, and the error lines for a CA
that cannot be reached. The second part runs bootstrap, renew and delegate end to end
against the session's CA replica, the ``dev_ca`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certgen import make_leaf, make_root
from dmc.connect import ca_channel, load_credential_dir
from dmc.pem import load_certificates_file, load_private_key_file
from dmc.svid import verify_chain
from dmc.v1 import admin_pb2, admin_pb2_grpc

DMC = Path(sys.executable).with_name("dmc")
SUB_COMMANDS = ["bootstrap", "renew", "delegate", "inspect", "agent"]


def dmc(
    *args: str | Path, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dmc``; DMC_* settings come only from ``environ``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    return subprocess.run(
        [str(DMC), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**clean, **(environ or {})},
        timeout=120,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; fails on usage dumps, tracebacks, gRPC noise."""
    assert result.returncode != 0, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert "usage:" not in result.stderr
    return result.stderr.rstrip("\n")


def closed_address() -> str:
    """A loopback address whose port, and port + 1, nothing listens on (most likely)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def write_pem(path: Path, *items: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in items))
    return path


@pytest.fixture
def svid_dir(tmp_path: Path) -> Path:
    """A folder holding svid.pem, svid.key and bundle.pem made at run time."""
    root = make_root("example.org")
    leaf = make_leaf(root, uris=["spiffe://example.org/web"])
    folder = tmp_path / "web"
    folder.mkdir()
    write_pem(folder / "svid.pem", leaf.certificate)
    write_pem(folder / "bundle.pem", root.certificate)
    (folder / "svid.key").write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder


# ---------------------------------------------------------------- without a CA


@pytest.mark.parametrize("command", SUB_COMMANDS)
def test_every_sub_command_has_help(command: str) -> None:
    result = dmc(command, "--help")

    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: dmc {command}")


def test_agent_without_a_credential_folder_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = dmc("agent", "--ca", "127.0.0.1:1", "--dir", str(missing), "--socket", "s")

    line = error_line(result)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "missing" in line


def test_bootstrap_names_every_missing_flag() -> None:
    line = error_line(dmc("bootstrap"))

    assert line == (
        "error: INVALID_ARGUMENT: the following arguments are required: --ca (or DMC_CA), "
        "--bundle (or DMC_BUNDLE), --token (or DMC_TOKEN), --out (or DMC_OUT)"
    )


def test_bootstrap_to_a_closed_port_says_the_ca_is_unreachable(svid_dir: Path) -> None:
    ca = closed_address()
    environ = {
        "DMC_CA": ca,
        "DMC_BUNDLE": str(svid_dir / "bundle.pem"),
        "DMC_TOKEN": "t",
        "DMC_OUT": str(svid_dir / "out"),
    }

    line = error_line(dmc("bootstrap", environ=environ))

    host, port = ca.rsplit(":", 1)
    # SPEC §4: the bootstrap listener is the CA's port + 1 unless --bootstrap-addr says.
    assert line.startswith(f"error: UNAVAILABLE: the CA at {host}:{int(port) + 1} is unreachable")
    assert not (svid_dir / "out").exists()


def test_bootstrap_addr_overrides_port_plus_one(svid_dir: Path) -> None:
    boot = closed_address()
    argv: list[str | Path] = ["--ca", "127.0.0.1:1", "--bundle", svid_dir / "bundle.pem"]

    line = error_line(
        dmc("bootstrap", *argv, "--token", "t", "--out", svid_dir, "--bootstrap-addr", boot)
    )

    assert line.startswith(f"error: UNAVAILABLE: the CA at {boot} is unreachable")


def test_renew_to_a_closed_port_says_the_ca_is_unreachable(svid_dir: Path) -> None:
    ca = closed_address()

    line = error_line(dmc("renew", "--ca", ca, "--dir", svid_dir))

    assert line.startswith(f"error: UNAVAILABLE: the CA at {ca} is unreachable")


@pytest.mark.parametrize("missing", ["svid.pem", "svid.key", "bundle.pem"])
def test_renew_names_the_missing_credential_file(svid_dir: Path, missing: str) -> None:
    (svid_dir / missing).unlink()

    line = error_line(dmc("renew", "--ca", closed_address(), "--dir", svid_dir))

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert str(svid_dir / missing) in line


def test_renew_refuses_a_key_of_another_certificate(svid_dir: Path) -> None:
    other = make_leaf(make_root("example.org"), uris=["spiffe://example.org/web"])
    (svid_dir / "svid.key").write_bytes(
        other.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    line = error_line(dmc("renew", "--ca", closed_address(), "--dir", svid_dir))

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "is not the private key of the certificate" in line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--spiffe-id", "spiffe://example.org/web/../x"], "segment '..'"),
        (["--permission", "not-a-method"], "permission 'not-a-method'"),
        (["--audience", "spiffe://other.org/db"], "trust domain 'other.org'"),
        (["--max-depth", "17"], "max depth 17 is outside 0..16"),
        (["--ttl", "5 min"], "invalid duration"),
        (["--ttl", "0s"], "--ttl must be at least 1s"),
    ],
)
def test_delegate_refuses_bad_input_before_any_call(
    svid_dir: Path, flags: list[str], words: str
) -> None:
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    settings = {
        "--spiffe-id": "spiffe://example.org/web/job",
        "--permission": "/demo.Echo/Say",
        "--audience": "spiffe://example.org/db",
        "--max-depth": "0",
        "--ttl": "5m",
        **given,
    }
    argv = [item for pair in settings.items() for item in pair]

    result = dmc("delegate", "--ca", closed_address(), "--dir", svid_dir, *argv, "--out", "x")

    line = error_line(result)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert words in line


# ---------------------------------------------------------------- against a dev CA


@pytest.fixture
def admin(dev_ca: Any) -> Iterator[admin_pb2_grpc.AdminStub]:
    credential = load_credential_dir(dev_ca.data_dir, "admin")
    with ca_channel(
        dev_ca.address, credential.bundle_pem, credential.chain_pem, credential.key_pem
    ) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


def new_identity(dev_ca: Any, admin: admin_pb2_grpc.AdminStub, **scope: Any) -> str:
    """Create an entry for a fresh SPIFFE ID below /cli; return the ID."""
    spiffe_id = f"spiffe://{dev_ca.trust_domain}/cli/{uuid.uuid4().hex}"
    entry = admin_pb2.Entry(
        spiffe_id=spiffe_id,
        permissions=scope.get("permissions", ["*"]),
        audiences=scope.get("audiences", ["*"]),
        max_depth=scope.get("max_depth", 2),
    )
    admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=30)
    return spiffe_id


def join_token(admin: admin_pb2_grpc.AdminStub, spiffe_id: str) -> str:
    request = admin_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=600)
    token: str = admin.CreateJoinToken(request, timeout=30).token
    return token


def bootstrap(dev_ca: Any, token: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``dmc bootstrap`` at the dev CA's bootstrap listener (``extra`` may name another)."""
    return dmc(
        "bootstrap", "--ca", dev_ca.address, "--bundle", dev_ca.data_dir / "bundle.pem",
        "--token", token, "--out", out, "--bootstrap-addr", dev_ca.bootstrap_address, *extra,
    )  # fmt: skip


def leaf_of(folder: Path, name: str = "svid") -> x509.Certificate:
    return load_certificates_file(folder / f"{name}.pem")[0]


def bootstrapped(dev_ca: Any, admin: admin_pb2_grpc.AdminStub, out: Path, **scope: Any) -> str:
    spiffe_id = new_identity(dev_ca, admin, **scope)
    result = bootstrap(dev_ca, join_token(admin, spiffe_id), out)
    assert result.returncode == 0, result.stderr
    return spiffe_id


def test_bootstrap_writes_a_verifying_svid_with_a_private_key(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    spiffe_id = new_identity(dev_ca, admin)
    out = tmp_path / "web"

    result = bootstrap(dev_ca, join_token(admin, spiffe_id), out, "--output", "json")

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["spiffe_id"] == spiffe_id
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    chain = load_certificates_file(out / "svid.pem")
    roots = load_certificates_file(out / "bundle.pem")
    svid = verify_chain(chain, roots, datetime.now(UTC))
    assert str(svid.spiffe_id) == spiffe_id
    assert shown["serial"] == format(svid.serial, "x")
    key = load_private_key_file(out / "svid.key")
    assert key.public_key() == chain[0].public_key()


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"])
def test_bootstrap_makes_the_chosen_key_type(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path, key_type: str
) -> None:
    spiffe_id = new_identity(dev_ca, admin)

    result = bootstrap(dev_ca, join_token(admin, spiffe_id), tmp_path, "--key-type", key_type)

    assert result.returncode == 0, result.stderr
    key = load_private_key_file(tmp_path / "svid.key")
    expected = ec.EllipticCurvePrivateKey if key_type == "ec-p384" else rsa.RSAPrivateKey
    assert isinstance(key, expected)
    assert key.key_size == int(key_type[-4:].lstrip("p"))


def test_spent_token_is_refused_and_nothing_is_written(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    token = join_token(admin, new_identity(dev_ca, admin))
    assert bootstrap(dev_ca, token, tmp_path / "first").returncode == 0

    line = error_line(bootstrap(dev_ca, token, tmp_path / "second"))

    assert line.startswith("error: UNAUTHENTICATED: ")
    assert not (tmp_path / "second").exists()


def test_bootstrap_sent_to_the_mtls_port_says_the_ca_refused_the_certificate(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    token = join_token(admin, new_identity(dev_ca, admin))

    line = error_line(bootstrap(dev_ca, token, tmp_path, "--bootstrap-addr", dev_ca.address))

    assert line.startswith(
        f"error: UNAVAILABLE: the CA at {dev_ca.address} refused the certificate"
    )


def test_renew_replaces_key_and_certificate_keeping_the_id(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    spiffe_id = bootstrapped(dev_ca, admin, tmp_path)
    before_leaf, before_key = leaf_of(tmp_path), (tmp_path / "svid.key").read_bytes()

    result = dmc("renew", "--ca", dev_ca.address, "--dir", tmp_path, "--output", "json")

    assert result.returncode == 0, result.stderr
    after = leaf_of(tmp_path)
    assert json.loads(result.stdout)["spiffe_id"] == spiffe_id
    assert after.serial_number != before_leaf.serial_number
    assert (tmp_path / "svid.key").read_bytes() != before_key
    assert after.public_key() != before_leaf.public_key()
    assert stat.S_IMODE((tmp_path / "svid.key").stat().st_mode) == 0o600


def test_renew_admin_renews_the_admin_credential(dev_ca: Any, tmp_path: Path) -> None:
    for name in ("admin.pem", "admin.key", "bundle.pem"):
        shutil.copy(dev_ca.data_dir / name, tmp_path / name)
    before = leaf_of(tmp_path, "admin")

    result = dmc("renew", "--ca", dev_ca.address, "--dir", tmp_path, "--name", "admin")

    assert result.returncode == 0, result.stderr
    after = leaf_of(tmp_path, "admin")
    assert after.serial_number != before.serial_number
    assert after.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{dev_ca.trust_domain}/dmc/admin"
    ]


def test_renew_with_a_certificate_of_another_authority_is_refused_by_the_ca(
    dev_ca: Any, svid_dir: Path
) -> None:
    shutil.copy(dev_ca.data_dir / "bundle.pem", svid_dir / "bundle.pem")

    line = error_line(dmc("renew", "--ca", dev_ca.address, "--dir", svid_dir))

    assert line.startswith(
        f"error: UNAVAILABLE: the CA at {dev_ca.address} refused the certificate"
    )


def test_delegate_writes_a_narrower_svid_naming_its_delegator(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    parent = bootstrapped(dev_ca, admin, tmp_path / "web")
    db = f"spiffe://{dev_ca.trust_domain}/db"
    child = f"{parent}/job"

    result = dmc(
        "delegate", "--ca", dev_ca.address, "--dir", tmp_path / "web", "--spiffe-id", child,
        "--permission", "/demo.Echo/Say", "--audience", db, "--max-depth", "0", "--ttl", "5m",
        "--out", tmp_path / "job",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    shown = json.loads(dmc("inspect", tmp_path / "job" / "svid.pem", "--output", "json").stdout)
    assert shown["spiffe_id"] == child
    assert shown["delegators"] == [parent]
    assert (shown["permissions"], shown["audiences"], shown["max_depth"]) == (
        ["/demo.Echo/Say"],
        [db],
        0,
    )
    assert shown["scope_not_after"] is not None


def test_delegate_wider_than_the_caller_is_permission_denied(
    dev_ca: Any, admin: admin_pb2_grpc.AdminStub, tmp_path: Path
) -> None:
    parent = bootstrapped(dev_ca, admin, tmp_path / "web", permissions=["/demo.Echo/*"])

    result = dmc(
        "delegate", "--ca", dev_ca.address, "--dir", tmp_path / "web", "--spiffe-id",
        f"{parent}/x", "--permission", "/other.Svc/*", "--audience", "*", "--max-depth", "0",
        "--ttl", "5m", "--out", tmp_path / "x",
    )  # fmt: skip

    line = error_line(result)
    assert line.startswith("error: PERMISSION_DENIED: ")
    assert "/other.Svc/*" in line
    assert not (tmp_path / "x").exists()
