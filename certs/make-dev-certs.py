"""Make a dev root and X.509-SVIDs under dmc's profile, for manual tests with openssl or grpcurl.

    .venv/bin/python certs/make-dev-certs.py
    .venv/bin/python certs/make-dev-certs.py --trust-domain acme.test \\
        --id spiffe://acme.test/api --id spiffe://acme.test/batch --out /tmp/dev-certs

writes, into ``certs/out/`` unless ``--out`` says otherwise:

- ``bundle.pem`` (the root, as dmc's trust bundle holds it) and ``root.key``;
- for each ``--id``, ``<name>.pem`` (the leaf; no intermediate, so the chain is the leaf)
  and ``<name>.key``, where ``<name>`` is the ID's path with ``/`` turned into ``-``.

The first ``--id`` is the server: it also carries ``--dns-name`` and ``--ip-san`` (default
``localhost`` and ``127.0.0.1``), because TLS clients check the server's host name. Keys
are written 0600. The output is for local use only and is never committed.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dmc.errors import DmcError, InvalidArgument
from dmc.files import write_atomic
from dmc.pem import certificates_to_pem, private_key_to_pem
from dmc.scope import DelegationScope
from dmc.spiffe_id import SpiffeId, validate_trust_domain
from dmc_ca.keys import KeyType, generate_private_key
from dmc_ca.profile import SigningAuthority, create_authority, issue_svid

DEFAULT_TRUST_DOMAIN = "example.org"
DEFAULT_PATHS = ("/server", "/client")
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_SANS = ("127.0.0.1",)
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
ROOT_TTL = timedelta(days=30)
DEFAULT_SVID_TTL_HOURS = 24
KEY_MODE = 0o600
CERT_MODE = 0o644


def file_stem(spiffe_id: SpiffeId) -> str:
    """``ns-prod-web`` for ``spiffe://td/ns/prod/web``: the path, ``/`` turned into ``-``."""
    if not spiffe_id.path:
        raise InvalidArgument(
            f"{spiffe_id} is the trust domain's own ID; give a workload path, e.g."
            f" spiffe://{spiffe_id.trust_domain}/web"
        )
    return spiffe_id.path.lstrip("/").replace("/", "-")


def parse_ids(texts: Sequence[str], trust_domain: str) -> list[SpiffeId]:
    """The IDs to issue, each valid, in ``trust_domain``, with distinct file names."""
    ids = [SpiffeId.parse(text) for text in texts]
    stems: dict[str, SpiffeId] = {}
    for spiffe_id in ids:
        if spiffe_id.trust_domain != trust_domain:
            raise InvalidArgument(f"{spiffe_id} is not in trust domain {trust_domain}")
        stem = file_stem(spiffe_id)
        if stem in stems:
            raise InvalidArgument(f"{stems[stem]} and {spiffe_id} would both be written as {stem}")
        stems[stem] = spiffe_id
    return ids


def make_dev_certs(
    out: Path,
    trust_domain: str,
    ids: Sequence[SpiffeId],
    key_type: KeyType,
    svid_ttl: timedelta,
    dns_names: Sequence[str],
    ip_sans: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[Path]:
    """Write a root and one SVID per ID into ``out``; return the files written."""
    now = datetime.now(UTC)
    root, root_key = create_authority(trust_domain, key_type, ROOT_TTL, now)
    authority = SigningAuthority(private_key=root_key, certificate=root, chain=(root,))
    # A dev SVID may call anything and be accepted anywhere, and delegate no further.
    scope = DelegationScope(permissions=("*",), audiences=("*",), max_depth=0)

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bundle.pem", out / "root.key"]
    write_atomic(written[0], certificates_to_pem([root]), CERT_MODE)
    write_atomic(written[1], private_key_to_pem(root_key), KEY_MODE)
    for position, spiffe_id in enumerate(ids):
        key = generate_private_key(key_type)
        server = position == 0
        leaf = issue_svid(
            authority,
            key.public_key(),
            spiffe_id,
            scope,
            int(svid_ttl.total_seconds()),
            now,
            dns_names=dns_names if server else (),
            ip_addresses=ip_sans if server else (),
        )
        stem = file_stem(spiffe_id)
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        # SPEC §2: the bundle holds the root; a chain never does.
        write_atomic(cert_path, certificates_to_pem(authority.svid_chain(leaf)), CERT_MODE)
        write_atomic(key_path, private_key_to_pem(key), KEY_MODE)
        written += [cert_path, key_path]
    return written


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _key_type(text: str) -> KeyType:
    try:
        return KeyType(text)
    except ValueError:
        allowed = ", ".join(k.value for k in KeyType)
        raise argparse.ArgumentTypeError(f"key type {text!r} is not one of {allowed}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certs/make-dev-certs.py",
        description="Make a dev root and X.509-SVIDs under dmc's profile (local use only).",
    )
    parser.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="trust domain (default %(default)s)"
    )
    parser.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="SPIFFE_ID",
        help="an SVID to make (repeatable; the first is the server); default:"
        f" {', '.join(f'spiffe://TD{path}' for path in DEFAULT_PATHS)}",
    )
    parser.add_argument(
        "--dns-name",
        action="append",
        dest="dns_names",
        metavar="NAME",
        help=f"DNS SAN of the first SVID (repeatable; default {', '.join(DEFAULT_DNS_NAMES)})",
    )
    parser.add_argument(
        "--ip-san",
        action="append",
        dest="ip_sans",
        type=_ip_address,
        metavar="IP",
        help=f"IP SAN of the first SVID (repeatable; default {', '.join(DEFAULT_IP_SANS)})",
    )
    parser.add_argument(
        "--key-type",
        type=_key_type,
        default=KeyType.EC_P256,
        metavar="{" + ",".join(k.value for k in KeyType) + "}",
        help="key type of the root and the SVIDs (default %(default)s)",
    )
    parser.add_argument(
        "--svid-ttl-hours",
        type=int,
        default=DEFAULT_SVID_TTL_HOURS,
        help="lifetime of each SVID in hours (default %(default)s; the root lasts 30 days)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default certs/out)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trust_domain = validate_trust_domain(args.trust_domain)
        id_texts = args.ids or [f"spiffe://{trust_domain}{path}" for path in DEFAULT_PATHS]
        ids = parse_ids(id_texts, trust_domain)
        if args.svid_ttl_hours <= 0:
            raise InvalidArgument("--svid-ttl-hours must be positive")
        written = make_dev_certs(
            args.out,
            trust_domain,
            ids,
            args.key_type,
            timedelta(hours=args.svid_ttl_hours),
            args.dns_names or DEFAULT_DNS_NAMES,
            args.ip_sans or [ipaddress.ip_address(ip) for ip in DEFAULT_IP_SANS],
        )
    except (DmcError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(f"wrote a dev root for {trust_domain} and {len(ids)} SVIDs (local use only):")
    for path in written:
        print(f"  {path}")
    server, folder = file_stem(ids[0]), args.out
    print(
        "\ntry:\n"
        f"  openssl verify -CAfile {folder}/bundle.pem {folder}/{server}.pem\n"
        f"  openssl s_server -accept 127.0.0.1:8443 -cert {folder}/{server}.pem"
        f" -key {folder}/{server}.key -CAfile {folder}/bundle.pem -Verify 1"
    )
    if len(ids) > 1:
        client = file_stem(ids[1])
        print(
            f"  openssl s_client -connect 127.0.0.1:8443 -CAfile {folder}/bundle.pem"
            f" -cert {folder}/{client}.pem -key {folder}/{client}.key"
            " -verify_return_error -verify_ip 127.0.0.1"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
