"""`dmc-ca`: run the certificate authority (SPEC §6).

- ``dmc-ca dev``: a local etcd, the trust domain initialised on first run, the CA served.
- ``dmc-ca init``: the first authority (created or imported) and the admin credential.
- ``dmc-ca serve``: one CA replica against an etcd cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from dmc._cli import (
    CommandParser,
    add_command,
    add_option,
    dispatch,
    emit,
    new_parser,
    parse_duration,
    run_command,
)
from dmc.errors import InvalidArgument
from dmc.pem import load_certificates, load_private_key
from dmc.spiffe_id import validate_trust_domain
from dmc_ca.ca import CertificateAuthority
from dmc_ca.keys import KeyType
from dmc_ca.profile import check_imported_authority
from dmc_ca.runtime import (
    CaSettings,
    DevReady,
    etcd_endpoints,
    initialise,
    run_dev,
    run_serve,
    write_admin_credential,
)
from dmc_ca.sealing import generate_kek_file, load_kek
from dmc_ca.server import CaServer, ListenAddress
from dmc_ca.store import Store

__all__ = ["build_parser", "main"]

DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_DATA_DIR = "dmc-dev"
DEFAULT_DEV_TRUST_DOMAIN = "example.org"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dmc-ca``."""
    return run_command(lambda: dispatch(build_parser(), argv))


def _listen(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ValueError as error:
        raise InvalidArgument(str(error)) from error


def _key_type(text: str) -> KeyType:
    try:
        return KeyType(text)
    except ValueError as error:
        allowed = ", ".join(k.value for k in KeyType)
        raise InvalidArgument(f"key type {text!r} is not one of {allowed}") from error


def _add_listen_options(parser: CommandParser) -> None:
    add_option(
        parser, "--listen", type=_listen, default=DEFAULT_LISTEN, help="mTLS listener HOST:PORT"
    )
    add_option(
        parser,
        "--bootstrap-listen",
        type=_listen,
        help="Bootstrap listener HOST:PORT (default: --listen's port + 1; 0 when that is 0)",
    )


def _add_prefix_option(parser: CommandParser) -> None:
    add_option(parser, "--etcd-prefix", default="/dmc/", help="prefix of dmc's keys in etcd")


def build_parser() -> CommandParser:
    """The ``dmc-ca`` argument parser."""
    parser = new_parser("dmc-ca", "Run the dmc certificate authority.")

    dev = add_command(
        parser, "dev", help="run a local CA on an embedded etcd (one command)", handler=_dev
    )
    add_option(dev, "--data-dir", default=DEFAULT_DATA_DIR, help="folder for all dev state")
    add_option(
        dev,
        "--trust-domain",
        type=validate_trust_domain,
        default=DEFAULT_DEV_TRUST_DOMAIN,
        help="trust domain",
    )
    _add_listen_options(dev)
    _add_prefix_option(dev)

    init = add_command(
        parser, "init", help="create the first authority and the admin credential", handler=_init
    )
    add_option(
        init, "--trust-domain", type=validate_trust_domain, required=True, help="trust domain"
    )
    add_option(init, "--etcd", required=True, help="etcd client URLs, comma-separated")
    _add_prefix_option(init)
    add_option(
        init, "--kek-file", required=True, help="key-encryption key file (created if missing)"
    )
    add_option(init, "--out", required=True, help="folder for bundle.pem, admin.pem, admin.key")
    add_option(
        init,
        "--key-type",
        type=_key_type,
        default=KeyType.EC_P256.value,
        choices=[k.value for k in KeyType],
        help="key type of a created authority",
    )
    add_option(init, "--ca-cert", help="import this CA certificate (PEM) instead of creating one")
    add_option(init, "--ca-key", help="the private key (PEM) of --ca-cert")
    add_option(
        init, "--admin-ttl", type=parse_duration, default="24h", help="lifetime of the admin SVID"
    )

    serve = add_command(parser, "serve", help="serve one CA replica", handler=_serve)
    add_option(
        serve, "--trust-domain", type=validate_trust_domain, required=True, help="trust domain"
    )
    add_option(serve, "--etcd", required=True, help="etcd client URLs, comma-separated")
    _add_prefix_option(serve)
    add_option(serve, "--kek-file", required=True, help="key-encryption key file")
    _add_listen_options(serve)
    add_option(
        serve, "--dns-name", repeated=True, help="DNS SAN of the CA's serving SVID (repeatable)"
    )
    add_option(
        serve, "--ip-san", repeated=True, help="IP SAN of the CA's serving SVID (repeatable)"
    )
    return parser


def _configure_logging() -> None:
    # The commands, never the library, configure handlers (STYLE.md).
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _dev(args: argparse.Namespace) -> None:
    _configure_logging()
    data_dir = Path(args.data_dir).absolute()

    def ready(dev: DevReady) -> None:
        server = dev.server
        emit(
            args.output,
            {
                "trust_domain": args.trust_domain,
                "listen": str(server.address),
                "bootstrap_listen": str(server.bootstrap_address),
                "etcd": dev.etcd_endpoint,
                "admin_cert": str(dev.credential.certificate),
                "admin_key": str(dev.credential.key),
                "bundle": str(dev.credential.bundle),
                "first_run": dev.first_run,
            },
            text=_dev_banner(args.trust_domain, dev),
        )

    asyncio.run(
        run_dev(
            data_dir,
            args.trust_domain,
            args.listen,
            args.bootstrap_listen,
            ready,
            etcd_prefix=args.etcd_prefix,
        )
    )


def _dev_banner(trust_domain: str, dev: DevReady) -> str:
    server, credential = dev.server, dev.credential
    state = "initialised" if dev.first_run else "kept from the last run"
    return f"""\
dmc-ca dev: trust domain {trust_domain} ({state}), etcd at {dev.etcd_endpoint}
  mTLS listener:       {server.address}
  bootstrap listener:  {server.bootstrap_address}
  admin credential:    {credential.certificate}
                       {credential.key}
  trust bundle:        {credential.bundle}

Next, in another shell, with dmc's commands on PATH (source .venv/bin/activate):
  export DMC_CA={server.address} DMC_CERT={credential.certificate} \\
         DMC_KEY={credential.key} DMC_BUNDLE={credential.bundle}
  dmc-admin status
  dmc-admin entry create --spiffe-id spiffe://{trust_domain}/web --permission '*' \\
      --audience '*' --max-depth 2
  dmc bootstrap --bootstrap-addr {server.bootstrap_address} --out web \\
      --token "$(dmc-admin token create --spiffe-id spiffe://{trust_domain}/web --ttl 10m)"
  dmc renew --dir web
  dmc inspect web/svid.pem

Stop with Ctrl-C (etcd stops too)."""


def _init(args: argparse.Namespace) -> None:
    if (args.ca_cert is None) != (args.ca_key is None):
        raise InvalidArgument("--ca-cert and --ca-key go together")
    # Read the imported CA before touching anything, so a bad file writes nothing, and
    # parse it here once so that an error names the file the operator gave.
    ca_chain_pem = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    ca_key_pem = Path(args.ca_key).read_bytes() if args.ca_key else None
    if ca_chain_pem is not None and ca_key_pem is not None:
        check_imported_authority(
            load_certificates(ca_chain_pem, args.ca_cert),
            load_private_key(ca_key_pem, args.ca_key),
            datetime.now(UTC),
        )
    admin_ttl_seconds = int(args.admin_ttl.total_seconds())
    if admin_ttl_seconds <= 0:
        raise InvalidArgument("--admin-ttl must be positive")
    kek_file = Path(args.kek_file)

    async def run() -> dict[str, object]:
        store = await Store.open(
            list(etcd_endpoints(args.etcd)), args.etcd_prefix, args.trust_domain
        )
        try:
            kek = load_kek(kek_file) if kek_file.exists() else None
            if kek is None:
                generate_kek_file(kek_file)
                kek = load_kek(kek_file)
            ca: CertificateAuthority = await initialise(
                store,
                kek,
                args.trust_domain,
                key_type=args.key_type,
                ca_chain_pem=ca_chain_pem,
                ca_key_pem=ca_key_pem,
                admin_ttl_seconds=admin_ttl_seconds,
            )
            paths = write_admin_credential(ca, Path(args.out), admin_ttl_seconds)
            return {
                "trust_domain": args.trust_domain,
                "admin_cert": str(paths.certificate),
                "admin_key": str(paths.key),
                "bundle": str(paths.bundle),
                "kek_file": str(kek_file),
            }
        finally:
            await store.close()

    emit(args.output, asyncio.run(run()))


def _serve(args: argparse.Namespace) -> None:
    _configure_logging()
    settings = CaSettings(
        trust_domain=args.trust_domain,
        etcd_endpoints=etcd_endpoints(args.etcd),
        etcd_prefix=args.etcd_prefix,
        kek_file=Path(args.kek_file),
        listen=args.listen,
        bootstrap_listen=args.bootstrap_listen,
        dns_names=tuple(args.dns_name),
        ip_sans=tuple(args.ip_san),
    )

    def ready(server: CaServer) -> None:
        emit(
            args.output,
            {
                "trust_domain": settings.trust_domain,
                "listen": str(server.address),
                "bootstrap_listen": str(server.bootstrap_address),
            },
        )

    asyncio.run(run_serve(settings, ready))
