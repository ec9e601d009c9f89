"""`dmc-admin bundle show|prepare|activate|retire|rotate`: the trust bundle's life cycle.

Every sub-command that changes the bundle writes the new bundle to ``--bundle``, and
``activate`` and ``rotate`` renew the operator's SVID under the new authority (into
``--cert`` and ``--key``), so the next command still trusts the CA's serving certificate
and the CA still trusts the operator once the old authority is retired.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TextIO, TypeVar

import grpc
from cryptography import x509

from dmc._cli import CommandParser, add_command, add_option, add_switch, calls_to, emit, rfc3339
from dmc._cli import parse_duration as _parse_duration
from dmc._issuance import csr_for, new_key_like, read_svid_response
from dmc.connect import Credential, ca_channel, load_credential
from dmc.errors import DmcError, InvalidArgument
from dmc.files import write_atomic
from dmc.pem import (
    certificates_to_pem,
    load_certificates,
    load_private_key,
    private_key_to_pem,
)
from dmc.spiffe_bundle import SpiffeBundle, write_spiffe_bundle
from dmc.svid import parse_svid, verify_chain
from dmc.v1 import admin_pb2, admin_pb2_grpc, ca_pb2, ca_pb2_grpc
from dmc_ca.keys import KeyType
from dmc_ca.rotation import Progress, Step, rotate

__all__ = ["add_bundle_commands", "bundle_data"]

RPC_TIMEOUT_SECONDS = 30.0
DEFAULT_PROPAGATION = "5m"
DEFAULT_OVERLAP = "0s"
_STATE_NAMES = {
    ca_pb2.PREPARED: "PREPARED",
    ca_pb2.ACTIVE: "ACTIVE",
    ca_pb2.PREVIOUS: "PREVIOUS",
}
_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_BAR_WIDTH = 30
# Without a terminal, a wait reports a line this often.
_PLAIN_EVERY = timedelta(seconds=10)

_T = TypeVar("_T")


def add_bundle_commands(parser: CommandParser) -> None:
    """Add ``bundle show|prepare|activate|retire|rotate`` to ``dmc-admin``."""
    bundle = add_command(parser, "bundle", help="the trust bundle and its authorities")
    show = add_command(bundle, "show", help="print the trust bundle", handler=_show)
    add_option(
        show,
        "--format",
        choices=["pem", "spiffe"],
        default="pem",
        help="PEM roots, or the SPIFFE bundle (JWK set) for federation",
    )

    prepare = add_command(
        bundle,
        "prepare",
        help="add a new authority, trusted but not yet signing",
        handler=_prepare,
    )
    add_option(
        prepare,
        "--key-type",
        choices=[k.value for k in KeyType],
        help=f"key type of a created authority (default {KeyType.EC_P256.value})",
    )
    add_option(
        prepare, "--ca-cert", help="import this CA certificate chain (PEM), ending in a root"
    )
    add_option(prepare, "--ca-key", help="the private key (PEM) of --ca-cert")

    activate = add_command(
        bundle, "activate", help="make a prepared authority the signer", handler=_activate
    )
    activate.add_argument(
        "id", nargs="?", default="", help="authority id (default: newest prepared)"
    )

    retire = add_command(
        bundle, "retire", help="remove an authority from the bundle", handler=_retire
    )
    retire.add_argument("id", nargs="?", default="", help="authority id (default: the previous)")
    add_switch(
        retire,
        "--force",
        help="retire now although SVIDs it signed are still valid (after a key compromise: "
        "everything it signed stops verifying at once)",
    )

    rotate_command = add_command(
        bundle,
        "rotate",
        help="prepare, wait, activate, wait, retire; safe to interrupt and run again",
        handler=_rotate,
    )
    add_option(
        rotate_command,
        "--propagation",
        type=_parse_duration,
        default=DEFAULT_PROPAGATION,
        help="how long the new authority is trusted before it signs",
    )
    add_option(
        rotate_command,
        "--overlap",
        type=_parse_duration,
        default=DEFAULT_OVERLAP,
        help="how long the old authority stays trusted after it stops signing, at least "
        "until every SVID it signed has expired",
    )
    add_option(
        rotate_command,
        "--key-type",
        choices=[k.value for k in KeyType],
        help=f"key type of the new authority (default {KeyType.EC_P256.value})",
    )


# -- the operator's credential -------------------------------------------------------------


class _Operator:
    """The operator's credential files and the CA they talk to, kept current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.address: str = args.ca
        self._paths = (Path(args.cert), Path(args.key), Path(args.bundle))
        self.credential: Credential = load_credential(*self._paths)
        self.roots = self.credential.bundle

    def call(self, rpc: Callable[[grpc.Channel], _T]) -> _T:
        credential = self.credential
        with (
            ca_channel(
                self.address,
                certificates_to_pem(self.roots),
                credential.chain_pem,
                credential.key_pem,
            ) as channel,
            calls_to(self.address),
        ):
            return rpc(channel)

    def bundle(self) -> ca_pb2.TrustBundle:
        bundle = self.call(
            lambda ch: ca_pb2_grpc.CertificateAuthorityStub(ch).GetTrustBundle(
                ca_pb2.GetTrustBundleRequest(), timeout=RPC_TIMEOUT_SECONDS
            )
        )
        self.follow(bundle)
        return bundle

    def admin(self, rpc: Callable[[admin_pb2_grpc.AdminStub], _T]) -> _T:
        return self.call(lambda ch: rpc(admin_pb2_grpc.AdminStub(ch)))

    def follow(self, bundle: ca_pb2.TrustBundle) -> None:
        """Trust the bundle's roots from now on, and write them to ``--bundle``."""
        roots = tuple(_roots(bundle))
        if not roots or roots == self.roots:
            return
        self.roots = roots
        write_atomic(self._paths[2], certificates_to_pem(roots), _PUBLIC_MODE)

    def renew_under(self, bundle: ca_pb2.TrustBundle) -> None:
        """Renew the operator SVID unless it chains to the ACTIVE authority already."""
        active = [
            x509.load_der_x509_certificate(a.certificate)
            for a in bundle.authorities
            if a.state == ca_pb2.ACTIVE
        ]
        try:
            verify_chain(self.credential.chain, active, datetime.now(UTC))
        except DmcError:
            self._renew()

    def keep_fresh(self) -> None:
        """Renew the operator SVID once half its life has passed, as workloads do (SPEC §7)."""
        leaf = self.credential.chain[0]
        half = (
            leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        )
        if datetime.now(UTC) >= half:
            self._renew()

    def _renew(self) -> None:
        current = parse_svid(self.credential.chain[0])
        key = new_key_like(self.credential.key)
        request = ca_pb2.RenewRequest(csr=csr_for(key, current.spiffe_id))
        response = self.call(
            lambda ch: ca_pb2_grpc.CertificateAuthorityStub(ch).Renew(
                request, timeout=RPC_TIMEOUT_SECONDS
            )
        )
        issued = read_svid_response(response, key, self.roots, expected_id=current.spiffe_id)
        cert_path, key_path, _ = self._paths
        # The key first: a crash between the writes leaves a certificate that does not
        # match its key, which the next command reports, never a key-less certificate.
        write_atomic(key_path, private_key_to_pem(issued.key), _KEY_MODE)
        write_atomic(cert_path, certificates_to_pem(issued.chain), _PUBLIC_MODE)
        self.credential = Credential(chain=issued.chain, key=issued.key, bundle=self.roots)


def _roots(bundle: ca_pb2.TrustBundle) -> list[x509.Certificate]:
    seen: dict[bytes, x509.Certificate] = {}
    for authority in bundle.authorities:
        seen.setdefault(
            authority.certificate, x509.load_der_x509_certificate(authority.certificate)
        )
    return list(seen.values())


# -- data ----------------------------------------------------------------------------------


def _stamp(
    message: ca_pb2.Authority, field: Literal["created_at", "state_since", "retirable_at"]
) -> str | None:
    if not message.HasField(field):
        return None
    return rfc3339(getattr(message, field).ToDatetime(tzinfo=UTC))


def authority_data(authority: ca_pb2.Authority) -> dict[str, object]:
    """One authority as ``dmc-admin`` prints it."""
    certificate = x509.load_der_x509_certificate(authority.certificate)
    data: dict[str, object] = {
        "id": authority.id,
        "state": _STATE_NAMES.get(authority.state, "UNSPECIFIED"),
        "subject": certificate.subject.rfc4514_string(),
        "not_after": rfc3339(certificate.not_valid_after_utc),
        "created_at": _stamp(authority, "created_at"),
        "state_since": _stamp(authority, "state_since"),
    }
    retirable = _stamp(authority, "retirable_at")
    if retirable is not None:
        data["retirable_at"] = retirable
    return data


def bundle_data(bundle: ca_pb2.TrustBundle) -> dict[str, object]:
    """The bundle as ``dmc-admin`` prints it (``status`` and ``bundle show``)."""
    return {
        "trust_domain": bundle.trust_domain,
        "sequence": bundle.sequence,
        "refresh_hint_seconds": bundle.refresh_hint_seconds,
        "authorities": [authority_data(a) for a in bundle.authorities],
    }


# -- sub-commands --------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> None:
    operator = _Operator(args)
    bundle = operator.call(
        lambda ch: ca_pb2_grpc.CertificateAuthorityStub(ch).GetTrustBundle(
            ca_pb2.GetTrustBundleRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
    )
    roots = _roots(bundle)
    if args.format == "spiffe":
        # SPIFFE Trust Domain and Bundle §4: the document itself is JSON, whatever --output.
        document = write_spiffe_bundle(
            SpiffeBundle(
                x509_authorities=tuple(roots),
                sequence=bundle.sequence,
                refresh_hint_seconds=bundle.refresh_hint_seconds,
            )
        )
        sys.stdout.write(document.decode("utf-8"))
        sys.stdout.flush()
        return
    pem = certificates_to_pem(roots).decode()
    emit(args.output, {**bundle_data(bundle), "pem": pem}, text=pem)


def _key_type(args: argparse.Namespace) -> str:
    return str(args.key_type) if args.key_type else ""


def _prepare(args: argparse.Namespace) -> None:
    if (args.ca_cert is None) != (args.ca_key is None):
        raise InvalidArgument("--ca-cert and --ca-key go together")
    if args.ca_cert is not None and args.key_type:
        raise InvalidArgument("--key-type applies to a created authority, not to --ca-cert")
    # Read the imported CA before any call, so a missing file is refused up front; the CA
    # checks the rest and writes nothing when it refuses.
    chain_pem = Path(args.ca_cert).read_bytes() if args.ca_cert else b""
    key_pem = Path(args.ca_key).read_bytes() if args.ca_key else b""
    if args.ca_cert:
        # Read here first, so that a cut-off or corrupt block is named with its file.
        load_certificates(chain_pem, args.ca_cert)
        load_private_key(key_pem, args.ca_key)
    operator = _Operator(args)
    request = admin_pb2.PrepareAuthorityRequest(
        key_type=_key_type(args), ca_certificate_chain_pem=chain_pem, ca_private_key_pem=key_pem
    )

    authority = operator.admin(
        lambda stub: stub.PrepareAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
    )
    operator.bundle()
    emit(args.output, authority_data(authority))


def _activate(args: argparse.Namespace) -> None:
    operator = _Operator(args)
    request = admin_pb2.ActivateAuthorityRequest(id=args.id)

    authority = operator.admin(
        lambda stub: stub.ActivateAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
    )
    operator.renew_under(operator.bundle())
    emit(args.output, authority_data(authority))


def _retire(args: argparse.Namespace) -> None:
    operator = _Operator(args)
    # Renewed first: a forced retirement may remove the authority of the operator's SVID.
    operator.renew_under(operator.bundle())
    request = admin_pb2.RetireAuthorityRequest(id=args.id, force=args.force)

    authority = operator.admin(
        lambda stub: stub.RetireAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
    )
    operator.bundle()
    emit(args.output, {**authority_data(authority), "retired": True})


class _RotateClient:
    """`rotate`'s calls, keeping the operator's files current as the bundle changes."""

    def __init__(self, operator: _Operator, key_type: str) -> None:
        self._operator = operator
        self._key_type = key_type

    def bundle(self) -> ca_pb2.TrustBundle:
        self._operator.keep_fresh()
        bundle = self._operator.bundle()
        # Renewed as soon as another authority signs, which is long before the overlap
        # ends and the old one goes.
        self._operator.renew_under(bundle)
        return bundle

    def prepare(self) -> ca_pb2.Authority:
        request = admin_pb2.PrepareAuthorityRequest(key_type=self._key_type)
        return self._operator.admin(
            lambda stub: stub.PrepareAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
        )

    def activate(self, authority_id: str) -> ca_pb2.Authority:
        request = admin_pb2.ActivateAuthorityRequest(id=authority_id)
        return self._operator.admin(
            lambda stub: stub.ActivateAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
        )

    def retire(self, authority_id: str) -> ca_pb2.Authority:
        request = admin_pb2.RetireAuthorityRequest(id=authority_id)
        return self._operator.admin(
            lambda stub: stub.RetireAuthority(request, timeout=RPC_TIMEOUT_SECONDS)
        )


def _rotate(args: argparse.Namespace) -> None:
    operator = _Operator(args)
    printer = ProgressPrinter(sys.stderr, sys.stderr.isatty())

    def sleep(seconds: float) -> None:
        # A wait may outlast the operator's SVID; it is renewed as it goes.
        time.sleep(seconds)
        operator.keep_fresh()

    actions = rotate(
        _RotateClient(operator, _key_type(args)),
        propagation=args.propagation,
        overlap=args.overlap,
        on_progress=printer,
        sleep=sleep,
    )
    bundle = operator.bundle()
    emit(
        args.output,
        {"actions": actions, "bundle": bundle_data(bundle)},
        text="\n".join(actions) or "nothing to do",
    )


class ProgressPrinter:
    """Shows the walk: a bar on a terminal, plain lines otherwise (one per step and now
    and then during a wait)."""

    def __init__(self, stream: TextIO, terminal: bool) -> None:
        self._stream = stream
        self._terminal = terminal
        self._last: tuple[Step, str] | None = None
        self._last_line_left: timedelta | None = None

    def __call__(self, progress: Progress) -> None:
        key = (progress.step, progress.authority_id)
        fresh = key != self._last
        if fresh and self._terminal and self._last is not None:
            self._stream.write("\n")
        self._last = key
        subject = f" {progress.authority_id}" if progress.authority_id else ""

        if progress.remaining is None or progress.total is None:
            self._stream.write(f"bundle rotate: {progress.step.value}{subject}\n")
            self._last = None
        elif self._terminal:
            self._stream.write("\r" + self._bar(progress, subject))
        elif fresh or self._due(progress.remaining):
            left = _seconds(progress.remaining)
            self._stream.write(f"bundle rotate: {progress.step.value}{subject}: {left} left\n")
            self._last_line_left = progress.remaining
        self._stream.flush()

    def _due(self, remaining: timedelta) -> bool:
        last = self._last_line_left
        return remaining <= timedelta(0) or last is None or last - remaining >= _PLAIN_EVERY

    @staticmethod
    def _bar(progress: Progress, subject: str) -> str:
        assert progress.remaining is not None and progress.total is not None
        total = progress.total.total_seconds()
        done = 1.0 if total <= 0 else 1 - progress.remaining.total_seconds() / total
        filled = round(_BAR_WIDTH * min(max(done, 0.0), 1.0))
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        return f"[{bar}] {progress.step.value}{subject}: {_seconds(progress.remaining)} left "


def _seconds(duration: timedelta) -> str:
    seconds = max(0, int(duration.total_seconds() + 0.999))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"
