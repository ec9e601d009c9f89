"""Enrolment against a local ``./run dev`` CA, shared by the two examples.

In production an operator registers each workload (``dmc-admin entry create``) and hands
it a join token; here each example does both itself with the admin credential that
``dmc-ca dev`` writes into ``dmc-dev/``, through the ``dmc-admin`` command. The SVID is
kept in ``dmc-dev/examples/<name>/`` and reused on the next start while it is valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import dmc

TRUST_DOMAIN = "example.org"
INVENTORY_ID = f"spiffe://{TRUST_DOMAIN}/demo/inventory"
INVENTORY_DNS = "inventory.example.org"
FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/demo/frontend"

_log = logging.getLogger("examples")


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", default="127.0.0.1:8443", help="the CA's mTLS address")
    parser.add_argument(
        "--dev-dir", type=Path, default=Path("dmc-dev"), help="the data folder of ./run dev"
    )


def enroll(
    name: str,
    spiffe_id: str,
    *,
    ca: str,
    dev_dir: Path,
    permissions: Sequence[str] = (),
    audiences: Sequence[str] = (),
    dns_names: Sequence[str] = (),
) -> dmc.IdentitySource:
    """An identity source for ``spiffe_id``: the kept SVID, or a new one from a join token."""
    state = dev_dir / "examples" / name
    if (state / "svid.pem").exists():
        try:
            return dmc.IdentitySource.from_directory(state, ca=ca)
        except dmc.DmcError as exc:
            _log.warning("cannot reuse the SVID in %s (%s); enrolling again", state, exc)

    entry = ["entry", "create", "--spiffe-id", spiffe_id, "--max-depth", "0"]
    entry += [f"--permission={p}" for p in permissions]
    entry += [f"--audience={a}" for a in audiences]
    entry += [f"--dns-name={d}" for d in dns_names]
    created = _admin(ca, dev_dir, entry)
    if created.returncode != 0 and "ALREADY_EXISTS" not in created.stderr:
        sys.exit(created.stderr.strip())
    issued = _admin(ca, dev_dir, ["token", "create", "--spiffe-id", spiffe_id, "--ttl", "10m"])
    if issued.returncode != 0:
        sys.exit(issued.stderr.strip())
    token = json.loads(issued.stdout)["token"]
    return dmc.IdentitySource.bootstrap(state, ca=ca, bundle=dev_dir / "bundle.pem", token=token)


def _admin(ca: str, dev_dir: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = shutil.which("dmc-admin", path=str(Path(sys.executable).parent)) or "dmc-admin"
    credential = [
        f"--ca={ca}",
        f"--cert={dev_dir / 'admin.pem'}",
        f"--key={dev_dir / 'admin.key'}",
        f"--bundle={dev_dir / 'bundle.pem'}",
        "--output=json",
    ]
    return subprocess.run(
        [command, *credential, *args], capture_output=True, text=True, check=False, timeout=30
    )
