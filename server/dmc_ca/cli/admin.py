"""`dmc-admin`: operate a dmc CA over its Admin service (SPEC §6).

It authenticates with an operator SVID (``--cert``/``--key``, trusted through
``--bundle``) whose scope permits the Admin method it calls.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import TypeVar

from dmc._cli import (
    CommandParser,
    add_command,
    add_option,
    calls_to,
    dispatch,
    emit,
    new_parser,
    parse_duration,
    rfc3339,
    run_command,
)
from dmc.connect import ca_channel, load_credential
from dmc.errors import InvalidArgument
from dmc.revocation import normalize_serial
from dmc.scope import MAX_DEPTH, validate_audience, validate_permission
from dmc.spiffe_id import SpiffeId
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2
from dmc_ca.cli.bundle import add_bundle_commands, bundle_data

__all__ = ["build_parser", "main"]

RPC_TIMEOUT_SECONDS = 30.0

_Response = TypeVar("_Response")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dmc-admin``."""
    return run_command(lambda: dispatch(build_parser(), argv))


def _spiffe_id(text: str) -> str:
    return str(SpiffeId.parse(text))


def _max_depth(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_DEPTH:
        raise InvalidArgument(f"--max-depth {text!r} is not a whole number in 0..{MAX_DEPTH}")
    return int(text)


def build_parser() -> CommandParser:
    """The ``dmc-admin`` argument parser."""
    parser = new_parser(
        "dmc-admin", "Manage a dmc CA: entries, tokens, revocations, the trust bundle."
    )
    add_option(parser, "--ca", required=True, help="the CA's mTLS address HOST:PORT")
    add_option(parser, "--cert", required=True, help="operator SVID chain (PEM)")
    add_option(parser, "--key", required=True, help="operator private key (PEM)")
    add_option(parser, "--bundle", required=True, help="trust bundle (PEM)")

    entry = add_command(parser, "entry", help="registration entries")
    create = add_command(entry, "create", help="register a SPIFFE ID", handler=_entry_create)
    add_option(create, "--spiffe-id", type=_spiffe_id, required=True, help="the workload's ID")
    add_option(
        create,
        "--permission",
        repeated=True,
        type=validate_permission,
        help="gRPC method pattern its SVIDs may call: '*', /pkg.Service/*, /pkg.Service/Method",
    )
    add_option(
        create,
        "--audience",
        repeated=True,
        help="SPIFFE ID pattern of servers that may accept its calls: '*', an ID, or ID/*",
    )
    add_option(create, "--max-depth", type=_max_depth, default=0, help="delegation hops allowed")
    add_option(
        create, "--max-ttl", type=parse_duration, default="1h", help="lifetime of each SVID"
    )
    add_option(create, "--dns-name", repeated=True, help="DNS SAN of its SVIDs (repeatable)")
    for name, handler, text in (
        ("get", _entry_get, "show one entry"),
        ("delete", _entry_delete, "delete one entry"),
    ):
        command = add_command(entry, name, help=text, handler=handler)
        command.add_argument("spiffe_id", type=_spiffe_id, metavar="ID", help="the entry's ID")
    add_command(entry, "list", help="list every entry", handler=_entry_list)

    token = add_command(parser, "token", help="join tokens")
    token_create = add_command(
        token, "create", help="make a single-use join token", handler=_token_create
    )
    add_option(token_create, "--spiffe-id", type=_spiffe_id, required=True, help="its entry")
    add_option(token_create, "--ttl", type=parse_duration, default="1h", help="its lifetime")

    revoke = add_command(
        parser, "revoke", help="revoke a certificate or a SPIFFE ID", handler=_revoke
    )
    add_option(
        revoke,
        "--serial",
        type=normalize_serial,
        help="serial of one certificate, hex in any case, colons allowed",
    )
    add_option(
        revoke,
        "--spiffe-id",
        type=_spiffe_id,
        help="an identity: its certificates issued until now, and their delegates",
    )
    add_option(revoke, "--reason", required=True, help="why, kept with the revocation")
    revocations = add_command(parser, "revocations", help="revocations in force")
    add_command(revocations, "list", help="list every revocation", handler=_revocations_list)

    add_bundle_commands(parser)

    add_command(parser, "status", help="the CA's state as the caller sees it", handler=_status)
    return parser


def _call(
    args: argparse.Namespace, rpc: Callable[[admin_pb2_grpc.AdminStub], _Response]
) -> _Response:
    credential = load_credential(args.cert, args.key, args.bundle)
    with (
        ca_channel(args.ca, credential.bundle_pem, credential.chain_pem, credential.key_pem) as ch,
        calls_to(args.ca),
    ):
        return rpc(admin_pb2_grpc.AdminStub(ch))


def _entry_data(entry: admin_pb2.Entry) -> dict[str, object]:
    return {
        "spiffe_id": entry.spiffe_id,
        "permissions": list(entry.permissions),
        "audiences": list(entry.audiences),
        "max_depth": entry.max_depth,
        "max_ttl_seconds": entry.max_ttl_seconds,
        "dns_names": list(entry.dns_names),
        "created_at": rfc3339(entry.created_at.ToDatetime(tzinfo=UTC)),
    }


def _entry_create(args: argparse.Namespace) -> None:
    trust_domain = SpiffeId.parse(args.spiffe_id).trust_domain
    audiences = [validate_audience(a, trust_domain) for a in args.audience]
    entry = admin_pb2.Entry(
        spiffe_id=args.spiffe_id,
        permissions=args.permission,
        audiences=audiences,
        max_depth=args.max_depth,
        max_ttl_seconds=int(args.max_ttl.total_seconds()),
        dns_names=args.dns_name,
    )
    created = _call(
        args,
        lambda stub: stub.CreateEntry(
            admin_pb2.CreateEntryRequest(entry=entry), timeout=RPC_TIMEOUT_SECONDS
        ),
    )
    emit(args.output, _entry_data(created))


def _entry_get(args: argparse.Namespace) -> None:
    found = _call(
        args,
        lambda stub: stub.GetEntry(
            admin_pb2.GetEntryRequest(spiffe_id=args.spiffe_id), timeout=RPC_TIMEOUT_SECONDS
        ),
    )
    emit(args.output, _entry_data(found))


def _entry_list(args: argparse.Namespace) -> None:
    listed = _call(
        args,
        lambda stub: stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=RPC_TIMEOUT_SECONDS),
    )
    entries = [_entry_data(e) for e in listed.entries]
    text = "\n".join(str(e["spiffe_id"]) for e in entries) or "(no entries)"
    emit(args.output, {"entries": entries}, text=text)


def _entry_delete(args: argparse.Namespace) -> None:
    _call(
        args,
        lambda stub: stub.DeleteEntry(
            admin_pb2.DeleteEntryRequest(spiffe_id=args.spiffe_id), timeout=RPC_TIMEOUT_SECONDS
        ),
    )
    emit(args.output, {"deleted": args.spiffe_id})


def _token_create(args: argparse.Namespace) -> None:
    ttl_seconds = int(args.ttl.total_seconds())
    if ttl_seconds <= 0:
        raise InvalidArgument("--ttl must be positive")
    created = _call(
        args,
        lambda stub: stub.CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(spiffe_id=args.spiffe_id, ttl_seconds=ttl_seconds),
            timeout=RPC_TIMEOUT_SECONDS,
        ),
    )
    # SPEC §6: the token alone in text (so `$(dmc-admin token create …)` works), an object
    # with a `token` field in JSON.
    emit(
        args.output,
        {
            "token": created.token,
            "spiffe_id": created.spiffe_id,
            "expires_at": rfc3339(created.expires_at.ToDatetime(tzinfo=UTC)),
        },
        text=created.token,
    )


def _revocation_data(revocation: ca_pb2.Revocation) -> dict[str, object]:
    target = revocation.WhichOneof("target") or "serial"
    return {
        "kind": "serial" if target == "serial" else "id",
        target: getattr(revocation, target),
        "reason": revocation.reason,
        "revoked_at": rfc3339(revocation.revoked_at.ToDatetime(tzinfo=UTC)),
        "expires_at": rfc3339(revocation.expires_at.ToDatetime(tzinfo=UTC)),
    }


def _revoke(args: argparse.Namespace) -> None:
    # SPEC §6: `revoke (--serial HEX | --spiffe-id ID)`, exactly one of the two.
    if (args.serial is None) == (args.spiffe_id is None):
        raise InvalidArgument("revoke needs exactly one of --serial and --spiffe-id")
    if not args.reason.strip():
        raise InvalidArgument("--reason must not be empty")
    if args.serial is not None:
        request = admin_pb2.RevokeRequest(serial=args.serial, reason=args.reason)
    else:
        request = admin_pb2.RevokeRequest(spiffe_id=args.spiffe_id, reason=args.reason)
    revocation = _call(args, lambda stub: stub.Revoke(request, timeout=RPC_TIMEOUT_SECONDS))
    emit(args.output, _revocation_data(revocation))


def _revocations_list(args: argparse.Namespace) -> None:
    listed = _call(
        args,
        lambda stub: stub.ListRevocations(
            admin_pb2.ListRevocationsRequest(), timeout=RPC_TIMEOUT_SECONDS
        ),
    )
    revocations = [_revocation_data(r) for r in listed.revocations]
    lines = [
        f"{r['kind']} {r.get('serial') or r.get('spiffe_id')} revoked {r['revoked_at']} "
        f"until {r['expires_at']}: {r['reason']}"
        for r in revocations
    ]
    emit(args.output, {"revocations": revocations}, text="\n".join(lines) or "(no revocations)")


def _status(args: argparse.Namespace) -> None:
    status = _call(
        args,
        lambda stub: stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_SECONDS),
    )
    data: Mapping[str, object] = {
        "trust_domain": status.trust_domain,
        "version": status.version,
        "caller": status.caller_spiffe_id,
        "replica": status.replica,
        "entries": status.entries,
        "etcd_revision": status.etcd_revision,
        "bundle": bundle_data(status.bundle),
    }
    emit(args.output, data)
