"""The command toolkit shared by dmc, dmc-ca and dmc-admin (SPEC §6): flags backed by DMC_*
variables, --output on both sides of the sub-command, durations, and the one error line."""

from __future__ import annotations

import argparse
import io
import json
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certgen import CertAndKey, make_leaf, make_root
from dmc import _cli
from dmc._cli import (
    CommandError,
    add_command,
    add_option,
    add_switch,
    calls_to,
    describe_rpc_error,
    dispatch,
    emit,
    new_parser,
    parse_arguments,
    parse_duration,
    run_command,
)
from dmc.errors import InvalidArgument, InvalidSvid, NotFound, PermissionDenied

# ---------------------------------------------------------------- a small command


def _parser(seen: dict[str, argparse.Namespace] | None = None) -> _cli.CommandParser:
    def remember(args: argparse.Namespace) -> None:
        if seen is not None:
            seen["args"] = args

    parser = new_parser("tool", "a test command")
    add_option(parser, "--data-dir", help="data folder")
    go = add_command(parser, "go", help="do it", handler=remember)
    add_option(go, "--ca", required=True, help="CA address")
    add_option(go, "--permission", repeated=True, help="permission")
    add_option(go, "--ttl", type=parse_duration, help="lifetime")
    add_option(go, "--max-ttl", type=parse_duration, default="1h", help="longest lifetime")
    add_option(go, "--depth", type=int, default=1, help="depth")
    add_option(go, "--key-type", choices=["ec-p256", "rsa-2048"], default="ec-p256", help="key")
    add_switch(go, "--force", help="force")
    group = add_command(parser, "entry", help="entries")
    add_command(group, "list", help="list entries", handler=remember)
    return parser


def _parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    return parse_arguments(_parser(), argv, environ or {})


def _run(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    err = io.StringIO()
    status = run_command(lambda: dispatch(_parser(), argv, environ or {}), err=err)
    return status, err.getvalue()


# ---------------------------------------------------------------- environment fallbacks


def test_flag_falls_back_to_its_dmc_variable() -> None:
    args = _parse(["--output", "json", "go"], {"DMC_CA": "ca:1", "DMC_DATA_DIR": "/d"})

    assert args.ca == "ca:1"
    assert args.data_dir == "/d"


def test_flag_wins_over_its_variable() -> None:
    args = _parse(["go", "--ca", "flag:1"], {"DMC_CA": "env:1"})

    assert args.ca == "flag:1"


def test_repeated_flag_reads_a_comma_separated_variable() -> None:
    args = _parse(["go", "--ca", "x"], {"DMC_PERMISSION": "/a.B/*, /c.D/E,"})

    assert args.permission == ["/a.B/*", "/c.D/E"]


def test_repeated_flags_replace_the_variable_rather_than_add_to_it() -> None:
    argv = ["go", "--ca", "x", "--permission", "/p.Q/*", "--permission", "*"]

    args = _parse(argv, {"DMC_PERMISSION": "/env.Only/*"})

    assert args.permission == ["/p.Q/*", "*"]


def test_unset_options_get_their_defaults() -> None:
    args = _parse(["go", "--ca", "x"])

    assert (args.permission, args.ttl, args.depth, args.key_type, args.force) == (
        [],
        None,
        1,
        "ec-p256",
        False,
    )
    assert args.output == "text"
    assert args.data_dir is None


def test_string_default_is_converted_like_a_flag_as_argparse_does() -> None:
    assert _parse(["go", "--ca", "x"]).max_ttl == timedelta(hours=1)
    assert _parse(["go", "--ca", "x", "--max-ttl", "5m"]).max_ttl == timedelta(minutes=5)


def test_variables_are_converted_like_flags() -> None:
    environ = {"DMC_CA": "x", "DMC_TTL": "1h30m", "DMC_DEPTH": "3", "DMC_FORCE": "yes"}

    args = _parse(["go"], environ)

    assert (args.ttl, args.depth, args.force) == (timedelta(minutes=90), 3, True)


def test_required_flag_given_by_its_variable_is_not_reported_missing() -> None:
    status, err = _run(["go"], {"DMC_CA": "ca:1"})

    assert (status, err) == (0, "")


def test_missing_required_flag_names_flag_and_variable() -> None:
    status, err = _run(["go"])

    assert status == 1
    assert err == "error: INVALID_ARGUMENT: the following argument is required: --ca (or DMC_CA)\n"


def test_environment_is_read_when_the_command_parses_not_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = _parser()
    monkeypatch.setenv("DMC_CA", "late:1")

    assert parse_arguments(parser, ["go"]).ca == "late:1"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"DMC_TTL": "soon"}, "error: INVALID_ARGUMENT: DMC_TTL: invalid duration 'soon'"),
        ({"DMC_DEPTH": "two"}, "error: INVALID_ARGUMENT: DMC_DEPTH: invalid literal"),
        ({"DMC_KEY_TYPE": "ed25519"}, "error: INVALID_ARGUMENT: DMC_KEY_TYPE: invalid choice"),
        ({"DMC_FORCE": "maybe"}, "error: INVALID_ARGUMENT: DMC_FORCE: 'maybe' is neither"),
    ],
)
def test_bad_variable_is_one_line_naming_the_variable(
    environ: dict[str, str], expected: str
) -> None:
    status, err = _run(["go", "--ca", "x"], environ)

    assert status == 1
    assert err.startswith(expected)
    assert err.count("\n") == 1


# ---------------------------------------------------------------- --output


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["go", "--ca", "x"], {}, "text"),
        (["--output", "json", "go", "--ca", "x"], {}, "json"),
        (["go", "--ca", "x", "--output", "json"], {}, "json"),
        (["--output", "text", "go", "--ca", "x", "--output", "json"], {}, "json"),
        (["go", "--ca", "x"], {"DMC_OUTPUT": "json"}, "json"),
        (["go", "--ca", "x", "--output", "text"], {"DMC_OUTPUT": "json"}, "text"),
        (["entry", "list", "--output", "json"], {}, "json"),
        (["entry", "--output", "json", "list"], {}, "json"),
    ],
)
def test_output_is_accepted_before_and_after_the_sub_command(
    argv: list[str], environ: dict[str, str], expected: str
) -> None:
    assert _parse(argv, environ).output == expected


def test_emit_json_writes_rfc3339_times_and_plain_values() -> None:
    out = io.StringIO()
    moment = datetime(2026, 12, 4, 15, 44, 0, tzinfo=UTC)

    emit("json", {"not_after": moment, "ttl": timedelta(minutes=5), "ids": ("a",)}, out=out)

    assert json.loads(out.getvalue()) == {
        "not_after": "2026-12-04T15:44:00Z",
        "ttl": 300,
        "ids": ["a"],
    }


def test_emit_text_writes_one_line_per_key_and_blocks_for_lists_of_objects() -> None:
    out = io.StringIO()
    data = {
        "spiffe_id": "spiffe://example.org/a",
        "permissions": ["*", "/a.B/*"],
        "delegators": [],
        "scope_not_after": None,
        "chain": [{"subject": "", "serial": "1f"}, {"subject": "CN=x", "serial": "2"}],
    }

    emit("text", data, out=out)

    assert out.getvalue().splitlines() == [
        "spiffe id: spiffe://example.org/a",
        "permissions: *, /a.B/*",
        "delegators: -",
        "scope not after: -",
        "chain:",
        "  - subject: -",
        "    serial: 1f",
        "  - subject: CN=x",
        "    serial: 2",
    ]


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("24h", timedelta(hours=24)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2h0m5s", timedelta(hours=2, seconds=5)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_reads_hours_minutes_seconds(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "5d", "1.5h", "-5m", "30s1m", "h", "1 h", "ten"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"invalid duration .* like 90s, 10m, 24h"):
        parse_duration(text)


def test_bad_duration_flag_is_one_line_naming_the_flag() -> None:
    status, err = _run(["go", "--ca", "x", "--ttl", "5 minutes"])

    assert status == 1
    assert err.startswith("error: INVALID_ARGUMENT: argument --ttl: invalid duration '5 minutes'")


# ---------------------------------------------------------------- the error boundary


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["go", "--ca", "x", "--bogus"],
        ["--output", "yaml", "go", "--ca", "x"],
        ["go", "--ca", "x", "--depth", "two"],
        ["go", "--ca"],
        ["entry"],
    ],
)
def test_usage_errors_are_one_invalid_argument_line_without_usage(argv: list[str]) -> None:
    status, err = _run(argv)

    assert status == 1
    assert err.startswith("error: INVALID_ARGUMENT: ")
    assert err.count("\n") == 1
    assert "usage:" not in err


def test_help_still_prints_usage_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_command(lambda: dispatch(_parser(), ["go", "--help"], {}))

    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: tool go")
    assert "[env DMC_CA; required]" in help_text


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (PermissionDenied("permission '/other.Svc/*' is not covered"), "PERMISSION_DENIED"),
        (InvalidSvid("certificate has 2 URI SANs"), "UNAUTHENTICATED"),
        (NotFound("no entry spiffe://example.org/x"), "NOT_FOUND"),
        (InvalidArgument("bad\ninput   spread"), "INVALID_ARGUMENT"),
    ],
)
def test_dmc_errors_print_their_status_name_and_details(error: Exception, line: str) -> None:
    err = io.StringIO()

    status = run_command(_raising(error), err=err)

    assert status == 1
    assert err.getvalue() == f"error: {line}: {' '.join(str(error).split())}\n"


def test_command_error_prints_any_status() -> None:
    err = io.StringIO()
    error = CommandError(grpc.StatusCode.UNIMPLEMENTED, "dmc agent is not built yet")

    status = run_command(_raising(error), err=err)

    assert (status, err.getvalue()) == (1, "error: UNIMPLEMENTED: dmc agent is not built yet\n")


def test_unreadable_file_is_one_invalid_argument_line() -> None:
    err = io.StringIO()

    status = run_command(lambda: open("/nonexistent/dmc/file").close(), err=err)

    assert status == 1
    assert err.getvalue() == (
        "error: INVALID_ARGUMENT: /nonexistent/dmc/file: No such file or directory\n"
    )


def test_unexpected_exception_is_one_internal_line_without_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DMC_DEBUG", raising=False)
    err = io.StringIO()

    status = run_command(_raising(ZeroDivisionError("division by zero")), err=err)

    assert (status, err.getvalue()) == (
        1,
        "error: INTERNAL: ZeroDivisionError: division by zero\n",
    )


def test_dmc_debug_adds_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMC_DEBUG", "1")
    err = io.StringIO()

    run_command(_raising(ZeroDivisionError("division by zero")), err=err)

    assert err.getvalue().startswith("Traceback")
    assert err.getvalue().endswith("error: INTERNAL: ZeroDivisionError: division by zero\n")


def test_ctrl_c_exits_130_without_a_word() -> None:
    err = io.StringIO()

    assert run_command(_raising(KeyboardInterrupt()), err=err) == 130
    assert err.getvalue() == ""


def test_command_status_is_returned() -> None:
    assert run_command(lambda: 3) == 3
    assert run_command(lambda: None) == 0


def _raising(error: BaseException) -> Callable[[], None]:
    def command() -> None:
        raise error

    return command


# ---------------------------------------------------------------- refused RPCs, for real


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: "
            "ipv4:127.0.0.1:38433: Socket closed",
            "the CA at 127.0.0.1:38433 refused the certificate",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: "
            "ipv6:%5B::1%5D:37869: Failed to connect to remote host: Connection refused",
            "the CA at [::1]:37869 is unreachable (Failed to connect to remote host: "
            "Connection refused)",
        ),
        (
            "errors resolving nonexistent.invalid:37869: [field:hostname lookup error: "
            "Domain name not found]",
            "the CA at the given address is unreachable",
        ),
    ],
)
def test_unavailable_details_as_grpc_1_85_words_them(details: str, expected: str) -> None:
    assert describe_rpc_error(grpc.StatusCode.UNAVAILABLE, details, None).startswith(expected)


def test_other_statuses_keep_their_details() -> None:
    details = "permission '/other.Svc/*' is not covered by the caller's scope"

    assert describe_rpc_error(grpc.StatusCode.PERMISSION_DENIED, details, "ca:1") == details


@dataclass(frozen=True)
class _TlsServer:
    address: str
    root: CertAndKey
    client: CertAndKey


def _pem(material: CertAndKey) -> tuple[bytes, bytes]:
    key = material.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return material.certificate.public_bytes(serialization.Encoding.PEM), key


def _deny(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "permission '/x.Y/*' is not covered")
    raise AssertionError("abort returns only by raising")


@pytest.fixture(scope="module")
def tls_server() -> Iterator[_TlsServer]:
    """An mTLS gRPC server on 127.0.0.1 whose one method refuses with PERMISSION_DENIED."""
    root = make_root("example.org")
    serving = make_leaf(root, uris=["spiffe://example.org/dmc/ca"], ip_addresses=["127.0.0.1"])
    client = make_leaf(root, uris=["spiffe://example.org/web"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_deny)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Deny", {"Call": handler}),)
    )
    cert_pem, key_pem = _pem(serving)
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=_pem(root)[0],
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield _TlsServer(f"127.0.0.1:{port}", root, client)
    finally:
        server.stop(grace=None)


def _call(address: str, roots: bytes, client: CertAndKey | None) -> str:
    """Call test.Deny/Call through the boundary; return the error line it prints."""
    chain, key = _pem(client) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(roots, key, chain)

    def command() -> None:
        with grpc.secure_channel(address, credentials) as channel, calls_to(address):
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Deny/Call"
            )
            call(b"", timeout=10)

    err = io.StringIO()
    assert run_command(command, err=err) == 1
    return err.getvalue()


def test_refused_rpc_prints_its_status_and_details(tls_server: _TlsServer) -> None:
    line = _call(tls_server.address, _pem(tls_server.root)[0], tls_server.client)

    assert line == "error: PERMISSION_DENIED: permission '/x.Y/*' is not covered\n"


def test_missing_client_certificate_says_the_ca_refused_it(tls_server: _TlsServer) -> None:
    line = _call(tls_server.address, _pem(tls_server.root)[0], None)

    assert line.startswith(f"error: UNAVAILABLE: the CA at {tls_server.address} refused the cert")
    assert line.count("\n") == 1


def test_untrusted_client_certificate_says_the_ca_refused_it(tls_server: _TlsServer) -> None:
    rogue = make_leaf(make_root("example.org"), uris=["spiffe://example.org/web"])

    line = _call(tls_server.address, _pem(tls_server.root)[0], rogue)

    assert line.startswith(f"error: UNAVAILABLE: the CA at {tls_server.address} refused the cert")


def test_untrusted_server_certificate_says_the_handshake_failed(tls_server: _TlsServer) -> None:
    other_bundle = _pem(make_root("example.org"))[0]

    line = _call(tls_server.address, other_bundle, tls_server.client)

    assert line.startswith(
        f"error: UNAVAILABLE: the TLS handshake with the CA at {tls_server.address} failed"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_closed_port_says_the_ca_is_unreachable(tls_server: _TlsServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"

    line = _call(address, _pem(tls_server.root)[0], tls_server.client)

    assert line.startswith(f"error: UNAVAILABLE: the CA at {address} is unreachable (")
    assert "Connection refused" in line
