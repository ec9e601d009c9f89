"""The toolkit shared by the ``dmc``, ``dmc-ca`` and ``dmc-admin`` commands (SPEC §6).

- Flags that fall back to ``DMC_*`` environment variables (``--data-dir`` reads
  ``DMC_DATA_DIR``), read when the command parses its arguments, never at import; the flag
  wins over the variable, and a repeated flag reads a comma-separated variable.
- ``--output text|json``, accepted before and after the sub-command.
- One error boundary, `run_command`, that turns every failure into one ``error: <STATUS>:
  <details>`` line on stderr and a non-zero exit status.

A command is built and run like this::

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(lambda: dispatch(build_parser(), argv))
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import re
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn, TextIO

import grpc

from dmc.errors import DmcError, InvalidArgument, status_code_of

__all__ = [
    "CommandError",
    "CommandParser",
    "Handler",
    "OutputFormat",
    "add_command",
    "add_option",
    "add_switch",
    "calls_to",
    "describe_rpc_error",
    "dispatch",
    "emit",
    "format_text",
    "new_parser",
    "parse_arguments",
    "parse_duration",
    "rfc3339",
    "run_command",
]

Handler = Callable[[argparse.Namespace], int | None]
"""A sub-command: takes the parsed arguments, prints its result, returns an exit status."""

ENV_PREFIX = "DMC_"
EXIT_FAILURE = 1
# The shell's convention for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
_DURATION = re.compile(r"(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?")

# gRPC's words for a peer it could not open a TCP connection to (grpcio 1.85, checked by
# tests/test_cli_toolkit.py against a real closed port).
_UNREACHABLE_WORDS = (
    "Connection refused",
    "Failed to connect to remote host",
    "No route to host",
    "Network is unreachable",
    "errors resolving",
    "Domain name not found",
    "Connection timed out",
)
# The server closed the connection during the handshake: it refused the client certificate
# (none, untrusted, expired, not yet valid). gRPC shows this as "Socket closed".
_PEER_REFUSED_WORDS = ("Socket closed", "Connection reset", "Broken pipe")
# The client refused the server: its certificate does not verify against the bundle or does
# not carry the host name (DEPENDENCIES.md: Python gRPC verifies the host name).
_CLIENT_REFUSED_WORDS = (
    "CERTIFICATE_VERIFY_FAILED",
    "Hostname Verification",
    "Tls handshake failed",
    "Ssl handshake failed",
    "SSL_ERROR",
    "handshake",
)
_PEER_ADDRESS = re.compile(r"\b(?:ipv4|ipv6):(\S+?):\s")


class OutputFormat(enum.StrEnum):
    """How a command prints its data (``--output``)."""

    TEXT = "text"
    JSON = "json"


class CommandError(Exception):
    """A failure to print as ``error: <status>: <details>``, for statuses outside the tree.

    Used for refused RPCs (whose status may be any gRPC code) and for commands that exist but
    are not built (``UNIMPLEMENTED``).
    """

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details

    def line(self) -> str:
        """The one line the error boundary prints."""
        return _error_line(self.status.name, self.details)


# -- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FromEnvironment:
    """The default of an option until parsing ends: then its variable, or its default."""

    flag: str
    variable: str
    required: bool
    repeated: bool
    switch: bool
    convert: Callable[[str], object]
    choices: tuple[str, ...] | None
    default: object

    def resolve(self, environ: Mapping[str, str]) -> object:
        """The value from the environment, else the default; `_MISSING` if required."""
        raw = environ.get(self.variable)
        if raw is None:
            return _MISSING if self.required else self.default
        if self.switch:
            return _parse_switch(raw, self.variable)
        if self.repeated:
            return [self._convert(item.strip()) for item in raw.split(",") if item.strip()]
        return self._convert(raw)

    def _convert(self, raw: str) -> object:
        if self.choices is not None and raw not in self.choices:
            allowed = ", ".join(self.choices)
            raise InvalidArgument(
                f"{self.variable}: invalid choice {raw!r} (choose from {allowed})"
            )
        try:
            return self.convert(raw)
        except (DmcError, ValueError) as exc:
            raise InvalidArgument(f"{self.variable}: {exc}") from exc


_MISSING = object()


class _Append(argparse.Action):
    """``action="append"`` whose first use replaces the environment default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = list(current) if isinstance(current, list) else []
        items.append(values)
        setattr(namespace, self.dest, items)


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors raise `InvalidArgument`.

    argparse prints a usage dump and exits 2 on a bad flag; SPEC §6 wants one
    ``error: INVALID_ARGUMENT: …`` line, which the error boundary prints.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._commands: argparse._SubParsersAction[CommandParser] | None = None
        self._has_output = False

    def error(self, message: str) -> NoReturn:
        """Raise `InvalidArgument` instead of printing the usage and exiting."""
        raise InvalidArgument(message)


def new_parser(prog: str, description: str, *, output: bool = True) -> CommandParser:
    """A command's top-level parser; with ``output``, it takes ``--output text|json``."""
    parser = CommandParser(prog=prog, description=description)
    if output:
        add_option(
            parser,
            "--output",
            choices=[f.value for f in OutputFormat],
            default=OutputFormat.TEXT.value,
            help="print data as text or as JSON",
        )
        parser._has_output = True
    return parser


def add_command(
    parser: CommandParser, name: str, *, help: str, handler: Handler | None = None
) -> CommandParser:
    """Add sub-command ``name`` to ``parser``; ``handler`` runs it (leave it out for groups).

    The sub-command accepts ``--output`` too when its parent does (SPEC §6: "accepted after
    the sub-command too"); a value given there wins over one given before it.
    """
    if parser._commands is None:
        parser._commands = parser.add_subparsers(
            dest="command", metavar="COMMAND", required=True, parser_class=CommandParser
        )
    command = parser._commands.add_parser(name, help=help, description=help)
    if parser._has_output:
        # SUPPRESS: when the flag is absent here, the value parsed before the sub-command
        # (or the environment) stays in the namespace.
        command.add_argument(
            "--output",
            choices=[f.value for f in OutputFormat],
            default=argparse.SUPPRESS,
            help="print data as text or as JSON",
        )
        command._has_output = True
    if handler is not None:
        command.set_defaults(handler=handler)
    return command


def add_option(
    container: argparse._ActionsContainer,
    flag: str,
    *,
    help: str,
    required: bool = False,
    repeated: bool = False,
    type: Callable[[str], object] = str,
    default: object = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    env: str | None = None,
) -> None:
    """Add ``flag`` with a fallback to its environment variable (``--ca`` → ``DMC_CA``).

    ``repeated`` flags may be given several times and read a comma-separated variable. A
    ``required`` flag is satisfied by its variable; `parse_arguments` reports what is missing.
    ``type`` may raise `DmcError` or `ValueError`; either becomes a usage error. A string
    ``default`` is converted by ``type``, as argparse does.
    """
    variable = env or _variable_for(flag)
    shown_default = default
    if isinstance(default, str):
        # As argparse does: a string default goes through ``type`` like a typed value.
        default = type(default)
    fallback = _FromEnvironment(
        flag=flag,
        variable=variable,
        required=required,
        repeated=repeated,
        switch=False,
        convert=type,
        choices=tuple(choices) if choices is not None else None,
        default=default if default is not None or not repeated else [],
    )
    container.add_argument(
        flag,
        action=_Append if repeated else "store",
        type=_argparse_type(type),
        choices=choices,
        default=fallback,
        metavar=metavar or (None if choices else flag.lstrip("-").replace("-", "_").upper()),
        help=_help_text(
            help, variable, required=required, default=shown_default, repeated=repeated
        ),
    )


def add_switch(
    container: argparse._ActionsContainer, flag: str, *, help: str, env: str | None = None
) -> None:
    """Add an on/off ``flag``; its variable reads ``1``/``true``/``yes``/``on`` or the opposite."""
    variable = env or _variable_for(flag)
    fallback = _FromEnvironment(
        flag=flag,
        variable=variable,
        required=False,
        repeated=False,
        switch=True,
        convert=str,
        choices=None,
        default=False,
    )
    container.add_argument(
        flag, action="store_true", default=fallback, help=f"{help} [env {variable}]"
    )


def parse_arguments(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``, then fill every flag left out from its variable in ``environ``.

    ``environ`` defaults to `os.environ`, read now. Raises `InvalidArgument` naming every
    required flag that neither the command line nor the environment gave.
    """
    environment = os.environ if environ is None else environ
    namespace = parser.parse_args(argv)

    missing: list[str] = []
    for name, value in vars(namespace).items():
        if not isinstance(value, _FromEnvironment):
            continue
        resolved = value.resolve(environment)
        if resolved is _MISSING:
            missing.append(f"{value.flag} (or {value.variable})")
        setattr(namespace, name, resolved)

    if missing:
        noun = "argument is" if len(missing) == 1 else "arguments are"
        raise InvalidArgument(f"the following {noun} required: {', '.join(missing)}")
    return namespace


def dispatch(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Parse the arguments and run the chosen sub-command's handler; return its status."""
    namespace = parse_arguments(parser, argv, environ)
    handler: Handler = namespace.handler
    status = handler(namespace)
    return 0 if status is None else status


def parse_duration(text: str) -> timedelta:
    """Read a duration like ``90s``, ``10m``, ``24h`` or ``1h30m`` (SPEC §6).

    Raises `InvalidArgument` for anything else, including an empty string and units out of
    order.
    """
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise InvalidArgument(
            f"invalid duration {text!r}: use hours, minutes and seconds like 90s, 10m, 24h "
            "or 1h30m"
        )
    hours, minutes, seconds = (int(match.group(unit) or 0) for unit in ("h", "m", "s"))
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _variable_for(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _argparse_type(convert: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap ``convert`` so that argparse reports its failures as ``argument --x: …``."""
    if convert is str:
        return str

    def converted(raw: str) -> object:
        try:
            return convert(raw)
        except (DmcError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return converted


def _help_text(
    help: str, variable: str, *, required: bool, default: object, repeated: bool
) -> str:
    notes = [f"env {variable}" + (", comma-separated" if repeated else "")]
    if required:
        notes.append("required")
    elif default is not None:
        notes.append(f"default {default}")
    return f"{help} [{'; '.join(notes)}]"


def _parse_switch(raw: str, variable: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise InvalidArgument(f"{variable}: {raw!r} is neither true (1, yes) nor false (0, no)")


# -- output --------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 with a ``Z``: ``2026-12-04T15:44:00Z``."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def emit(
    output: str, data: Mapping[str, object], text: str | None = None, *, out: TextIO | None = None
) -> None:
    """Print ``data`` as JSON, or ``text`` (by default `format_text` of ``data``).

    In JSON, datetimes become RFC 3339 strings, timedeltas whole seconds, paths strings.
    """
    stream = sys.stdout if out is None else out
    if output == OutputFormat.JSON:
        stream.write(json.dumps(data, indent=2, default=_json_value) + "\n")
    else:
        stream.write((format_text(data) if text is None else text).rstrip("\n") + "\n")
    stream.flush()


def format_text(data: Mapping[str, object], indent: str = "") -> str:
    """``key: value`` lines; lists joined by commas, lists of mappings as indented blocks."""
    lines: list[str] = []
    for key, value in data.items():
        label = f"{indent}{key.replace('_', ' ')}:"
        if isinstance(value, Mapping):
            lines.append(label)
            lines.append(format_text(value, indent + "  "))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            lines.append(label)
            for item in value:
                block = format_text(item, indent + "    ").splitlines()
                lines.append(f"{indent}  - {block[0].lstrip()}")
                lines.extend(block[1:])
        elif isinstance(value, list | tuple):
            lines.append(f"{label} {', '.join(_text_value(v) for v in value) or '-'}")
        else:
            lines.append(f"{label} {_text_value(value)}")
    return "\n".join(lines)


def _text_value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        return rfc3339(value)
    return str(value)


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- the error boundary --------------------------------------------------------------------


def run_command(command: Callable[[], int | None], *, err: TextIO | None = None) -> int:
    """Run ``command`` and return the process exit status; print any failure as one line.

    ``error: <STATUS>: <details>`` for a `DmcError` (its status from the error tree), a
    refused RPC, or a usage error (``INVALID_ARGUMENT``); ``error: INTERNAL: …`` for a bug,
    with its traceback only when ``DMC_DEBUG=1``. Ctrl-C exits 130 without a word.
    """
    # grpc reads GRPC_VERBOSITY once, when it is first imported (measured with grpcio 1.85),
    # so this default reaches only a process that has not imported grpc yet and the
    # processes this command starts.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    stream = sys.stderr if err is None else err

    try:
        status = command()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except CommandError as exc:
        line = exc.line()
    except DmcError as exc:
        line = _error_line(status_code_of(exc).name, str(exc))
    except grpc.RpcError as exc:
        line = _rpc_error(exc, target=None).line()
    except OSError as exc:
        # A file the user named cannot be read or written: input refused before (or
        # instead of) any call.
        line = _error_line(grpc.StatusCode.INVALID_ARGUMENT.name, _describe_os_error(exc))
    except Exception as exc:
        if os.environ.get("DMC_DEBUG") == "1":
            traceback.print_exc(file=stream)
        line = _error_line(grpc.StatusCode.INTERNAL.name, f"{type(exc).__name__}: {exc}")
    else:
        return 0 if status is None else status

    stream.write(line + "\n")
    stream.flush()
    return EXIT_FAILURE


@contextlib.contextmanager
def calls_to(target: str) -> Iterator[None]:
    """Turn a refused RPC to ``target`` into a `CommandError` whose line names ``target``."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _rpc_error(exc, target) from exc


def describe_rpc_error(code: grpc.StatusCode, details: str, target: str | None) -> str:
    """The details to print for a refused RPC; explains the ways ``UNAVAILABLE`` arises.

    SPEC §4: a missing, untrusted, expired or not-yet-valid client certificate fails the TLS
    handshake before any RPC; the server closes the socket and the client sees
    ``UNAVAILABLE``. A closed port or an unknown host is ``UNAVAILABLE`` too.
    """
    if code != grpc.StatusCode.UNAVAILABLE:
        return details
    where = target or _peer_address(details) or "the given address"
    reason = _reason(details)
    if any(word in details for word in _UNREACHABLE_WORDS):
        return f"the CA at {where} is unreachable ({reason})"
    if any(word in details for word in _PEER_REFUSED_WORDS):
        return (
            f"the CA at {where} refused the certificate: it closed the TLS handshake, so the "
            "client certificate is missing, not trusted, expired or not yet valid "
            f"({reason})"
        )
    if any(word in details for word in _CLIENT_REFUSED_WORDS):
        return (
            f"the TLS handshake with the CA at {where} failed: its certificate does not "
            f"verify against the bundle or does not name the host ({reason}); if the CA's "
            "key was rotated while this bundle was offline, fetch the current bundle "
            "(dmc-admin bundle show)"
        )
    return details


def _rpc_error(error: grpc.RpcError, target: str | None) -> CommandError:
    if isinstance(error, grpc.Call):
        code, details = error.code(), error.details() or ""
    else:
        code, details = grpc.StatusCode.UNKNOWN, str(error)
    return CommandError(code, describe_rpc_error(code, details, target))


def _reason(details: str) -> str:
    """The last part of gRPC's details: what went wrong at the peer address."""
    match = _PEER_ADDRESS.search(details)
    reason = details[match.end() :] if match else details
    return reason.removesuffix(": OK").strip()


def _peer_address(details: str) -> str | None:
    match = _PEER_ADDRESS.search(details)
    return urllib.parse.unquote(match.group(1)) if match else None


def _describe_os_error(error: OSError) -> str:
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


def _error_line(status: str, details: str) -> str:
    """``error: <status>: <details>`` on one line, whatever the details hold."""
    return f"error: {status}: {' '.join(details.split())}"
