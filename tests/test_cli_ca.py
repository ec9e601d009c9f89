"""`dmc-ca` as the installed command (SPEC §6): init, import, dev, help, errors, DMC_* variables.

`init` and `serve` run against the session etcd, each test on a prefix of its own, which
`etcdctl` inspects behind the command's back. `dev` runs its own etcd under a data folder
in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certgen import make_intermediate, make_root, new_key
from dmc.v1 import admin_pb2, admin_pb2_grpc
from dmc_ca.etcd_process import EtcdProcess
from dmc_ca.keys import KeyType

BIN = Path(sys.executable).parent
DMC_CA = BIN / "dmc-ca"
ETCDCTL = BIN / "etcdctl"
CASE_007 = Path(__file__).parent / "cases" / "007-pem-bundle-formatting"
TRUST_DOMAIN = "example.org"
SUB_COMMANDS = ("dev", "init", "serve")
BACKDATE = timedelta(seconds=30)


def dmc_ca(
    *args: str | Path, environ: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dmc-ca``; DMC_* settings come only from ``environ``."""
    return subprocess.run(
        [str(DMC_CA), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=_environment(environ),
        timeout=timeout,
    )


def _environment(environ: dict[str, str] | None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMC_", "GRPC_"))}
    return {**clean, **(environ or {})}


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; fails on usage dumps and tracebacks."""
    assert result.returncode != 0, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert "usage:" not in result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.rstrip("\n")


def etcd_keys(etcd: EtcdProcess, prefix: str) -> list[str]:
    """Every key under ``prefix``, read with etcdctl, not through dmc."""
    listed = subprocess.run(
        [str(ETCDCTL), "--endpoints", etcd.endpoint, "get", "--prefix", prefix, "--keys-only"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line for line in listed.stdout.splitlines() if line]


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def key_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def openssl_verify(root: Path, chain: Path) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of the chain file's leaf, its other certificates as untrusted."""
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), str(chain)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def load_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@dataclass
class Init:
    """The flags of one `dmc-ca init` against the session etcd, on a prefix of its own."""

    etcd: EtcdProcess
    folder: Path
    prefix: str

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def kek(self) -> Path:
        return self.folder / "kek"

    def argv(self, *extra: str | Path) -> list[str | Path]:
        return [
            "init",
            "--trust-domain",
            TRUST_DOMAIN,
            "--etcd",
            f"http://{self.etcd.endpoint}",
            "--etcd-prefix",
            self.prefix,
            "--kek-file",
            self.kek,
            "--out",
            self.out,
            *extra,
        ]

    def run(self, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        return dmc_ca(*self.argv(*extra))

    def keys(self) -> list[str]:
        return etcd_keys(self.etcd, self.prefix)


@pytest.fixture
def init(etcd: EtcdProcess, tmp_path: Path) -> Init:
    return Init(etcd, tmp_path, f"/cli-ca-{uuid.uuid4().hex}/")


def write_ca(folder: Path, name: str, chain: Sequence[x509.Certificate], key: Any) -> Path:
    """``NAME.pem`` (the chain) and ``NAME.key`` in ``folder``; returns the .pem path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.key").write_bytes(key_pem(key))
    path = folder / f"{name}.pem"
    path.write_bytes(pem(*chain))
    return path


def admin_lifetime(out: Path) -> timedelta:
    """How long the admin SVID lives from its issuance (notBefore + 30 s, SPEC §2)."""
    leaf = load_chain(out / "admin.pem")[0]
    return leaf.not_valid_after_utc - (leaf.not_valid_before_utc + BACKDATE)


# -- init ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", [k.value for k in KeyType])
def test_init_creates_the_authority_and_the_admin_credential(init: Init, key_type: str) -> None:
    result = init.run("--key-type", key_type)

    assert result.returncode == 0, result.stderr
    assert init.keys(), "nothing was written to etcd"
    roots = load_chain(init.out / "bundle.pem")
    assert len(roots) == 1
    public = roots[0].public_key()
    if key_type.startswith("ec-"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.key_size == {"ec-p256": 256, "ec-p384": 384}[key_type]
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == int(key_type.removeprefix("rsa-"))
    assert (init.out / "admin.key").stat().st_mode & 0o777 == 0o600
    verified = openssl_verify(init.out / "bundle.pem", init.out / "admin.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    leaf = load_chain(init.out / "admin.pem")[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/dmc/admin"
    ]
    # SPEC §6: the admin SVID lasts 24 h unless --admin-ttl says otherwise.
    assert admin_lifetime(init.out) == timedelta(hours=24)


def test_init_admin_ttl_sets_the_admin_svid_lifetime(init: Init) -> None:
    result = init.run("--admin-ttl", "2h")

    assert result.returncode == 0, result.stderr
    assert admin_lifetime(init.out) == timedelta(hours=2)


def test_init_prints_the_written_paths_as_json(init: Init) -> None:
    result = init.run("--output", "json")

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert Path(printed["admin_cert"]) == init.out / "admin.pem"
    assert Path(printed["admin_key"]) == init.out / "admin.key"
    assert Path(printed["bundle"]) == init.out / "bundle.pem"


def test_second_init_is_refused_with_one_line_and_writes_nothing(init: Init) -> None:
    assert init.run().returncode == 0
    keys_before = init.keys()
    bundle_before = (init.out / "bundle.pem").read_bytes()
    elsewhere = init.folder / "second"

    result = dmc_ca(*init.argv()[:-1], elsewhere)

    assert error_line(result).startswith("error: FAILED_PRECONDITION: ")
    assert TRUST_DOMAIN in result.stderr
    assert init.keys() == keys_before
    assert (init.out / "bundle.pem").read_bytes() == bundle_before
    assert not elsewhere.exists()


# -- init with an imported CA ------------------------------------------------------------------


def test_init_imports_a_root_and_issues_svids_that_verify_against_it(init: Init) -> None:
    root = make_root(TRUST_DOMAIN)
    cert = write_ca(init.folder / "ca", "root", [root.certificate], root.key)

    result = init.run("--ca-cert", cert, "--ca-key", cert.with_suffix(".key"))

    assert result.returncode == 0, result.stderr
    assert load_chain(init.out / "bundle.pem") == [root.certificate]
    verified = openssl_verify(cert, init.out / "admin.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_init_imports_an_intermediate_whose_chain_travels_in_every_svid(init: Init) -> None:
    root = make_root(TRUST_DOMAIN)
    intermediate = make_intermediate(root, TRUST_DOMAIN)
    folder = init.folder / "ca"
    write_ca(folder, "root", [root.certificate], root.key)
    cert = write_ca(
        folder, "chain", [intermediate.certificate, root.certificate], intermediate.key
    )

    result = init.run("--ca-cert", cert, "--ca-key", cert.with_suffix(".key"))

    assert result.returncode == 0, result.stderr
    # SPEC §2: the bundle holds the root only; the intermediate travels in the SVID chain.
    assert load_chain(init.out / "bundle.pem") == [root.certificate]
    assert load_chain(init.out / "admin.pem")[1:] == [intermediate.certificate]
    verified = openssl_verify(folder / "root.pem", init.out / "admin.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _mismatched(folder: Path) -> tuple[Path, Path]:
    root = make_root(TRUST_DOMAIN)
    cert = write_ca(folder, "root", [root.certificate], new_key())
    return cert, cert.with_suffix(".key")


def _expired(folder: Path) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    root = make_root(
        TRUST_DOMAIN, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1)
    )
    cert = write_ca(folder, "root", [root.certificate], root.key)
    return cert, cert.with_suffix(".key")


def _no_key_cert_sign(folder: Path) -> tuple[Path, Path]:
    root = make_root(TRUST_DOMAIN)
    signer = make_intermediate(root, TRUST_DOMAIN, usages=("digital_signature", "crl_sign"))
    cert = write_ca(folder, "chain", [signer.certificate, root.certificate], signer.key)
    return cert, cert.with_suffix(".key")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_mismatched, "does not match"),
        (_expired, "expired"),
        (_no_key_cert_sign, "keyCertSign"),
    ],
    ids=["key-does-not-match", "expired", "no-keyCertSign"],
)
def test_refused_import_writes_nothing_to_etcd_or_out(init: Init, make: Any, words: str) -> None:
    cert, key = make(init.folder / "ca")

    result = init.run("--ca-cert", cert, "--ca-key", key)

    line = error_line(result)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert words in line
    assert init.keys() == []
    assert not init.out.exists() or not any(init.out.iterdir())


@pytest.mark.parametrize(
    "name", ["bundle-second-block-truncated.pem", "bundle-second-block-bad-char.pem"]
)
def test_broken_bundle_as_ca_cert_names_the_file_and_the_block(init: Init, name: str) -> None:
    # Case 007: one error line naming the file and the bad block, never a shorter bundle.
    other = init.folder / "some.key"
    other.write_bytes(key_pem(new_key()))

    result = init.run("--ca-cert", CASE_007 / name, "--ca-key", other)

    line = error_line(result)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert name in line
    assert "block 2" in line
    assert init.keys() == []
    assert not init.out.exists()


@pytest.mark.parametrize(
    "name",
    [
        "bundle-clean.pem",
        "bundle-trailing-blank-lines.pem",
        "bundle-leading-and-between-blank-lines.pem",
        "bundle-crlf.pem",
        "bundle-explanatory-text.pem",
        "root-a.der",
    ],
)
def test_harmless_bundle_formatting_as_ca_cert_is_read_whole(init: Init, name: str) -> None:
    # Case 007's roots come without keys: the refusal must be about the key, which shows
    # the file was read as certificates, not about its formatting.
    other = init.folder / "some.key"
    other.write_bytes(key_pem(new_key()))

    result = init.run("--ca-cert", CASE_007 / name, "--ca-key", other)

    line = error_line(result)
    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert "does not match" in line
    assert "block" not in line
    assert init.keys() == []


def _formattings(chain_pem: str) -> dict[str, str]:
    """Case 007's harmless formattings, applied to a chain of our own."""
    first_end = chain_pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")
    first, second = chain_pem[:first_end], chain_pem[first_end:]
    return {
        "trailing-blank-lines": chain_pem + "\n\n  \n\t\n",
        "leading-and-between-blank-lines": "\n\n" + first + "\n\n" + second,
        "crlf": chain_pem.replace("\n", "\r\n"),
        "explanatory-text": "subject=the signer\n" + first + "\n# its root\n" + second + "# end\n",
    }


@pytest.mark.parametrize(
    "formatting",
    ["trailing-blank-lines", "leading-and-between-blank-lines", "crlf", "explanatory-text"],
)
def test_import_reads_a_chain_in_harmless_formatting(init: Init, formatting: str) -> None:
    root = make_root(TRUST_DOMAIN)
    intermediate = make_intermediate(root, TRUST_DOMAIN)
    folder = init.folder / "ca"
    cert = write_ca(
        folder, "chain", [intermediate.certificate, root.certificate], intermediate.key
    )
    cert.write_text(_formattings(cert.read_text())[formatting], newline="")

    result = init.run("--ca-cert", cert, "--ca-key", cert.with_suffix(".key"))

    assert result.returncode == 0, result.stderr
    assert load_chain(init.out / "bundle.pem") == [root.certificate]
    assert load_chain(init.out / "admin.pem")[1:] == [intermediate.certificate]


# -- help, missing flags, environment ------------------------------------------------------------


@pytest.mark.parametrize("command", ["", *SUB_COMMANDS])
def test_help_exits_zero(command: str) -> None:
    result = dmc_ca(*([command] if command else []), "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: dmc-ca {command}".rstrip())


@pytest.mark.parametrize("command", SUB_COMMANDS)
def test_every_flag_names_its_environment_variable(command: str) -> None:
    help_text = dmc_ca(command, "--help").stdout
    joined = " ".join(help_text.split())

    # argparse lists each option at the start of a line, indented by two spaces.
    flags = set(re.findall(r"^  (--[a-z][a-z-]*)", help_text, flags=re.MULTILINE))
    flags -= {"--help", "--output"}
    assert flags
    for flag in sorted(flags):
        variable = "DMC_" + flag.removeprefix("--").replace("-", "_").upper()
        assert f"[env {variable}" in joined, f"{command} {flag}"


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["init"], "--trust-domain"),
        (["init", "--trust-domain", TRUST_DOMAIN], "--etcd"),
        (["serve"], "--trust-domain"),
        ([], "COMMAND"),
    ],
)
def test_missing_required_flag_is_one_invalid_argument_line(argv: list[str], missing: str) -> None:
    line = error_line(dmc_ca(*argv))

    assert line.startswith("error: INVALID_ARGUMENT: ")
    assert missing.lower() in line.lower()


def test_init_takes_every_setting_from_dmc_variables(init: Init) -> None:
    environ = {
        "DMC_TRUST_DOMAIN": TRUST_DOMAIN,
        "DMC_ETCD": init.etcd.endpoint,
        "DMC_ETCD_PREFIX": init.prefix,
        "DMC_KEK_FILE": str(init.kek),
        "DMC_OUT": str(init.out),
        "DMC_KEY_TYPE": "ec-p384",
        "DMC_ADMIN_TTL": "3h",
        "DMC_OUTPUT": "json",
    }

    result = dmc_ca("init", environ=environ)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bundle"] == str(init.out / "bundle.pem")
    assert init.keys()
    assert init.kek.exists()
    public = load_chain(init.out / "bundle.pem")[0].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.key_size == 384
    assert admin_lifetime(init.out) == timedelta(hours=3)


def test_init_takes_the_imported_ca_from_dmc_variables(init: Init) -> None:
    root = make_root(TRUST_DOMAIN)
    cert = write_ca(init.folder / "ca", "root", [root.certificate], root.key)
    environ = {
        "DMC_CA_CERT": str(cert),
        "DMC_CA_KEY": str(cert.with_suffix(".key")),
    }

    result = dmc_ca(*init.argv(), environ=environ)

    assert result.returncode == 0, result.stderr
    assert load_chain(init.out / "bundle.pem") == [root.certificate]


# -- long-running commands ---------------------------------------------------------------------


class Running:
    """A `dmc-ca` process that prints one JSON object once it serves."""

    def __init__(self, argv: Sequence[str | Path], environ: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [str(DMC_CA), *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_environment(environ),
        )
        self.printed = self._read_object(timeout=60)

    def _read_object(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        # Read the pipe's bytes as they come (no buffered reader that select cannot see).
        descriptor = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        text = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([descriptor], [], [], 0.2)
            if ready:
                chunk = os.read(descriptor, 65536)
                if not chunk:
                    break
                text += chunk
                try:
                    printed: dict[str, Any] = json.loads(text)
                except ValueError:
                    continue
                return printed
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"no JSON object from dmc-ca; printed {text!r}")

    def stop(self) -> int:
        """SIGTERM, as an operator's Ctrl-C or a service manager would send; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self._log.close()
            if self.process.stdout is not None:
                self.process.stdout.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    """Processes a test started; any left running are stopped."""
    started: list[Running] = []
    yield started
    for item in started:
        item.stop()


def _port_open(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, int(port))) == 0


def _etcd_processes_under(folder: Path) -> list[str]:
    listed = subprocess.run(
        ["ps", "-eo", "pid,args"], check=True, capture_output=True, text=True, timeout=30
    )
    return [line for line in listed.stdout.splitlines() if "etcd" in line and str(folder) in line]


def _admin_status(printed: dict[str, Any]) -> admin_pb2.Status:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(printed["bundle"]).read_bytes(),
        private_key=Path(printed["admin_key"]).read_bytes(),
        certificate_chain=Path(printed["admin_cert"]).read_bytes(),
    )
    with grpc.secure_channel(printed["listen"], credentials) as channel:
        status: admin_pb2.Status = admin_pb2_grpc.AdminStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=10
        )
    return status


def test_dev_initialises_stops_etcd_on_sigterm_and_keeps_the_trust_domain(
    tmp_path: Path, running: list[Running]
) -> None:
    data = tmp_path / "dev"
    first = Running(
        [
            "dev",
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
            "--etcd-prefix",
            "/mine/",
            "--trust-domain",
            "dev.example.org",
            "--output",
            "json",
        ],
        {},
        tmp_path / "first.log",
    )
    running.append(first)
    printed = first.printed
    assert printed["first_run"] is True
    assert printed["trust_domain"] == "dev.example.org"
    for address in (printed["listen"], printed["bootstrap_listen"]):
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0
    assert Path(printed["bundle"]) == data.absolute() / "bundle.pem"
    assert _admin_status(printed).trust_domain == "dev.example.org"
    bundle = (data / "bundle.pem").read_bytes()
    admin = (data / "admin.pem").read_bytes()
    assert _port_open(printed["etcd"])

    # SPEC §6: on SIGTERM it stops etcd too.
    assert first.stop() == 0
    assert not _port_open(printed["etcd"])
    assert _etcd_processes_under(data) == []

    # The second run takes every setting from DMC_* variables.
    second = Running(
        ["dev"],
        {
            "DMC_DATA_DIR": str(data),
            "DMC_LISTEN": "127.0.0.1:0",
            "DMC_BOOTSTRAP_LISTEN": "127.0.0.1:0",
            "DMC_ETCD_PREFIX": "/mine/",
            "DMC_TRUST_DOMAIN": "dev.example.org",
            "DMC_OUTPUT": "json",
        },
        tmp_path / "second.log",
    )
    running.append(second)
    assert second.printed["first_run"] is False
    assert (data / "bundle.pem").read_bytes() == bundle
    assert (data / "admin.pem").read_bytes() != admin
    assert _admin_status(second.printed).trust_domain == "dev.example.org"
    assert second.stop() == 0
    assert _etcd_processes_under(data) == []


def _serving_certificate(address: str) -> x509.Certificate:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_serve_takes_every_setting_from_dmc_variables(init: Init, running: list[Running]) -> None:
    assert init.run().returncode == 0
    environ = {
        "DMC_TRUST_DOMAIN": TRUST_DOMAIN,
        "DMC_ETCD": init.etcd.endpoint,
        "DMC_ETCD_PREFIX": init.prefix,
        "DMC_KEK_FILE": str(init.kek),
        "DMC_LISTEN": "127.0.0.1:0",
        "DMC_BOOTSTRAP_LISTEN": "127.0.0.1:0",
        "DMC_DNS_NAME": "ca.example.org,ca2.example.org",
        "DMC_IP_SAN": "127.0.0.1",
        "DMC_OUTPUT": "json",
    }

    server = Running(["serve"], environ, init.folder / "serve.log")
    running.append(server)

    printed = server.printed
    leaf = _serving_certificate(printed["bootstrap_listen"])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ca.example.org", "ca2.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    status = _admin_status(
        {
            **printed,
            "bundle": init.out / "bundle.pem",
            "admin_key": init.out / "admin.key",
            "admin_cert": init.out / "admin.pem",
        }
    )
    assert status.caller_spiffe_id == f"spiffe://{TRUST_DOMAIN}/dmc/admin"
    assert server.stop() == 0
