"""The ``dmc`` command: a workload's side of the CA (SPEC §6).

``bootstrap`` trades a join token for a first SVID, ``renew`` replaces an SVID before it
expires, ``delegate`` asks for a narrower SVID for a helper, ``inspect`` reads certificate
files offline. Each writes ``NAME.key`` (mode 0600), ``NAME.pem`` (chain, leaf first) and
``bundle.pem`` atomically, the key first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from dmc._cli import (
    CommandParser,
    add_command,
    add_option,
    calls_to,
    dispatch,
    emit,
    new_parser,
    parse_duration,
    run_command,
)
from dmc._issuance import KEY_TYPES, Issued, csr_for, new_key, new_key_like, read_svid_response
from dmc.connect import (
    BUNDLE_FILE,
    Credential,
    bootstrap_address,
    ca_channel,
    is_ca_certificate,
    load_bundle_file,
    load_credential_dir,
)
from dmc.errors import InvalidArgument
from dmc.files import write_atomic
from dmc.pem import certificates_to_pem, load_certificates_file, private_key_to_pem
from dmc.scope import MAX_DEPTH, validate_audience, validate_permission
from dmc.spiffe_id import SpiffeId
from dmc.svid import parse_svid
from dmc.v1 import ca_pb2, ca_pb2_grpc

__all__ = ["build_parser", "main"]

SVID_NAME = "svid"
# Seconds; long enough for a CA under load, short enough that a hung CA does not hang a script.
_TIMEOUT = 30.0

_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_FOLDER_MODE = 0o700


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dmc`` with ``argv`` (default: the process arguments); return the exit status."""
    return run_command(lambda: dispatch(build_parser(), argv))


def build_parser() -> CommandParser:
    """The ``dmc`` argument parser with its sub-commands."""
    parser = new_parser(
        "dmc", "Get, renew, delegate and inspect X.509-SVIDs from a dmc certificate authority."
    )

    bootstrap = add_command(
        parser, "bootstrap", help="trade a join token for a first SVID", handler=_bootstrap
    )
    _add_ca_option(bootstrap)
    add_option(bootstrap, "--bundle", required=True, help="trust bundle file (PEM) of the CA")
    add_option(bootstrap, "--token", required=True, help="single-use join token")
    add_option(bootstrap, "--out", required=True, help="folder for svid.pem, svid.key, bundle.pem")
    add_option(
        bootstrap,
        "--bootstrap-addr",
        help="the CA's bootstrap listener HOST:PORT (default: the --ca port + 1)",
    )
    add_option(
        bootstrap,
        "--key-type",
        choices=KEY_TYPES,
        default=KEY_TYPES[0],
        help="type of the new private key",
    )

    renew = add_command(
        parser,
        "renew",
        help="renew an SVID with a new key, authenticating with it",
        handler=_renew,
    )
    _add_ca_option(renew)
    add_option(renew, "--dir", required=True, help="folder holding NAME.pem, NAME.key, bundle.pem")
    add_option(
        renew,
        "--name",
        default=SVID_NAME,
        help="base name of the credential files ('admin' renews the admin credential)",
    )

    delegate = add_command(
        parser,
        "delegate",
        help="get an SVID with a narrower scope for this identity or one below it",
        handler=_delegate,
    )
    _add_ca_option(delegate)
    add_option(delegate, "--dir", required=True, help="folder of the delegating SVID")
    add_option(delegate, "--spiffe-id", required=True, help="SPIFFE ID of the delegated SVID")
    add_option(
        delegate,
        "--permission",
        required=True,
        repeated=True,
        help="gRPC method pattern the delegate may call: '*', /pkg.Service/* or "
        "/pkg.Service/Method (repeat the flag for several)",
    )
    add_option(
        delegate,
        "--audience",
        required=True,
        repeated=True,
        help="SPIFFE ID pattern that may accept the delegate's calls: '*', an ID, or ID/* "
        "(repeat the flag for several)",
    )
    add_option(
        delegate,
        "--max-depth",
        required=True,
        type=_max_depth,
        help=f"further delegation hops allowed, 0..{MAX_DEPTH}",
    )
    add_option(
        delegate,
        "--ttl",
        required=True,
        type=parse_duration,
        help="hard end of the delegation from now, like 90s, 10m, 24h",
    )
    add_option(delegate, "--out", required=True, help="folder for svid.pem, svid.key, bundle.pem")

    inspect = add_command(
        parser,
        "inspect",
        help="show the SPIFFE ID, serial, expiry, scope and chain of a certificate file",
        handler=_inspect,
    )
    inspect.add_argument("file", metavar="FILE", help="certificate, chain or bundle (PEM or DER)")

    agent = add_command(
        parser,
        "agent",
        help="keep an SVID renewed and serve it to Envoy (SDS) and SPIFFE clients (Workload "
        "API) on a Unix socket",
        handler=_agent,
    )
    _add_ca_option(agent)
    add_option(agent, "--dir", required=True, help="folder of the SVID to keep renewed")
    add_option(
        agent,
        "--socket",
        required=True,
        help="Unix socket to serve on, in a folder only this user can enter (made with mode "
        "0700 if missing)",
    )
    return parser


def _add_ca_option(parser: CommandParser) -> None:
    add_option(parser, "--ca", required=True, help="the CA's mTLS address HOST:PORT")


def _max_depth(text: str) -> int:
    depth = int(text)
    if not 0 <= depth <= MAX_DEPTH:
        # SPEC §3: maxDepth INTEGER (0..16).
        raise InvalidArgument(f"max depth {depth} is outside 0..{MAX_DEPTH}")
    return depth


# -- sub-commands --------------------------------------------------------------------------


def _bootstrap(args: argparse.Namespace) -> None:
    roots = load_bundle_file(args.bundle)
    target = args.bootstrap_addr or bootstrap_address(args.ca)
    key = new_key(args.key_type)
    # The CA binds the SPIFFE ID from the token's entry; the CSR only proves the key.
    request = ca_pb2.BootstrapRequest(join_token=args.token, csr=csr_for(key, spiffe_id=None))

    response = _call_ca(
        target,
        certificates_to_pem(roots),
        None,
        lambda ca: ca.Bootstrap(request, timeout=_TIMEOUT),
    )

    issued = read_svid_response(response, key, roots)
    _report(args.output, issued, _write_credential(Path(args.out), SVID_NAME, issued))


def _renew(args: argparse.Namespace) -> None:
    credential = load_credential_dir(args.dir, args.name)
    current = parse_svid(credential.chain[0])
    key = new_key_like(credential.key)
    request = ca_pb2.RenewRequest(csr=csr_for(key, current.spiffe_id))

    response = _call_ca(
        args.ca, credential.bundle_pem, credential, lambda ca: ca.Renew(request, timeout=_TIMEOUT)
    )

    issued = read_svid_response(response, key, credential.bundle, expected_id=current.spiffe_id)
    _report(args.output, issued, _write_credential(Path(args.dir), args.name, issued))


def _delegate(args: argparse.Namespace) -> None:
    credential = load_credential_dir(args.dir, SVID_NAME)
    caller = parse_svid(credential.chain[0])
    child_id = SpiffeId.parse(args.spiffe_id)
    permissions = [validate_permission(p) for p in args.permission]
    audiences = [validate_audience(a, caller.spiffe_id.trust_domain) for a in args.audience]
    ttl_seconds = int(args.ttl.total_seconds())
    if ttl_seconds < 1:
        raise InvalidArgument("--ttl must be at least 1s")
    key = new_key_like(credential.key)
    request = ca_pb2.DelegateRequest(
        csr=csr_for(key, child_id),
        spiffe_id=str(child_id),
        permissions=permissions,
        audiences=audiences,
        max_depth=args.max_depth,
        ttl_seconds=ttl_seconds,
    )

    response = _call_ca(
        args.ca,
        credential.bundle_pem,
        credential,
        lambda ca: ca.Delegate(request, timeout=_TIMEOUT),
    )

    issued = read_svid_response(response, key, credential.bundle, expected_id=child_id)
    _report(args.output, issued, _write_credential(Path(args.out), SVID_NAME, issued))


def _inspect(args: argparse.Namespace) -> None:
    certificates = load_certificates_file(args.file)
    chain = [_describe_certificate(certificate) for certificate in certificates]

    if all(is_ca_certificate(certificate) for certificate in certificates):
        emit(args.output, {"certificates": chain})
        return

    # X.509-SVID §4: the leaf comes first; parse_svid refuses several URI SANs, a CA flag
    # and signing powers, so no SPIFFE ID is ever taken from such a certificate.
    svid = parse_svid(certificates[0])
    emit(
        args.output,
        {
            "spiffe_id": str(svid.spiffe_id),
            "serial": _hex(svid.serial),
            "not_before": svid.not_before,
            "not_after": svid.not_after,
            "permissions": list(svid.scope.permissions),
            "audiences": list(svid.scope.audiences),
            "max_depth": svid.scope.max_depth,
            "delegators": list(svid.scope.delegators),
            "scope_not_after": svid.scope.not_after,
            "chain": chain,
        },
    )


def _agent(args: argparse.Namespace) -> None:
    # Imported here: the agent's Workload API stubs clash with the spiffe package's, so
    # they load only in an agent's process (DEPENDENCIES.md).
    from dmc.agent import AgentConfig, run_agent

    config = AgentConfig(args.ca, Path(args.dir), Path(args.socket))
    # The commands, never the library, configure handlers (STYLE.md).
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(run_agent(config))


# -- helpers -------------------------------------------------------------------------------


def _call_ca(
    address: str,
    bundle_pem: bytes,
    credential: Credential | None,
    rpc: Callable[[ca_pb2_grpc.CertificateAuthorityStub], ca_pb2.SVIDResponse],
) -> ca_pb2.SVIDResponse:
    """Make one call to the CA at ``address``, with mTLS as ``credential`` when given."""
    chain_pem, key_pem = (credential.chain_pem, credential.key_pem) if credential else (None, None)
    with ca_channel(address, bundle_pem, chain_pem, key_pem) as channel, calls_to(address):
        return rpc(ca_pb2_grpc.CertificateAuthorityStub(channel))


def _write_credential(folder: Path, name: str, issued: Issued) -> dict[str, str]:
    """Write key, chain and bundle atomically, the key first; return what went where."""
    folder.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
    files = {
        "key": folder / f"{name}.key",
        "certificate": folder / f"{name}.pem",
        "bundle": folder / BUNDLE_FILE,
    }
    write_atomic(files["key"], private_key_to_pem(issued.key), _KEY_MODE)
    write_atomic(files["certificate"], certificates_to_pem(issued.chain), _PUBLIC_MODE)
    write_atomic(files["bundle"], certificates_to_pem(issued.bundle), _PUBLIC_MODE)
    return {role: os.fspath(path) for role, path in files.items()}


def _report(output: str, issued: Issued, files: dict[str, str]) -> None:
    emit(
        output,
        {
            "spiffe_id": str(issued.svid.spiffe_id),
            "serial": _hex(issued.svid.serial),
            "not_after": issued.svid.not_after,
            **files,
        },
    )


def _describe_certificate(certificate: x509.Certificate) -> dict[str, object]:
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": _hex(certificate.serial_number),
        "not_after": certificate.not_valid_after_utc,
    }


def _hex(serial: int) -> str:
    """SPEC §5: a serial is written as lower-case hex without separators."""
    return f"{serial:x}"
