"""A process killed while it persists its identity never leaves a torn or unmatched pair.

A child process replaces the SVID in one folder over and over (`persist_identity`, as the
identity source does after each renewal); it is SIGKILLed at a random moment, about 50
times. After every kill the folder must hold a key and a chain that parse whole and
belong together, and a bundle that parses (SPEC §6: a crash never leaves a torn key or
chain).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from certgen import make_leaf, make_root
from dmc.connect import load_credential_dir
from dmc.pem import private_key_to_pem
from dmc.source import Identity, persist_identity
from dmc.svid import parse_svid

KILLS = 50
WORKERS = 5
PAIRS = 4

# The child: read the prepared pairs, say it is ready, then persist them round and round.
CHILD = """
import sys
from pathlib import Path
from dmc.connect import load_credential_dir
from dmc.source import Identity, persist_identity
from dmc.svid import parse_svid

pairs, target = Path(sys.argv[1]), Path(sys.argv[2])
identities = []
for folder in sorted(pairs.iterdir()):
    credential = load_credential_dir(folder)
    identities.append(
        Identity.create(
            parse_svid(credential.chain[0]), credential.chain, credential.key, credential.bundle
        )
    )
print("ready", flush=True)
number = 0
while True:
    persist_identity(target, identities[number % len(identities)])
    number += 1
"""


def test_killed_writer_always_leaves_a_matching_key_and_chain(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    root = make_root()
    expected = {}
    for number in range(PAIRS):
        leaf = make_leaf(root, uris=[f"spiffe://example.org/crash/{number}"])
        identity = Identity.create(
            parse_svid(leaf.certificate), [leaf.certificate], leaf.key, [root.certificate]
        )
        persist_identity(pairs / str(number), identity)
        expected[leaf.certificate.serial_number] = private_key_to_pem(leaf.key)

    def kill_repeatedly(worker: int) -> int:
        """Kill a writer KILLS / WORKERS times in a folder of its own; check after each."""
        target = tmp_path / f"svid-{worker}"
        persist_identity(target, identity)
        randomness = random.Random(worker)
        for kill in range(KILLS // WORKERS):
            _run_and_kill(pairs, target, randomness.uniform(0, 0.05))
            # Parses whole and the key belongs to the chain, or load_credential_dir raises.
            credential = load_credential_dir(target)
            serial = credential.chain[0].serial_number
            assert private_key_to_pem(credential.key) == expected[serial], f"kill {kill}"
            assert credential.bundle == (root.certificate,)
        # The next writer removes what killed writers left: the version folders they
        # were filling and the ones no link names any more.
        persist_identity(target, identity)
        return len([p for p in target.iterdir() if p.is_dir() and not p.is_symlink()])

    # Several writers at once, each in its own folder, to keep the test short.
    with ThreadPoolExecutor(WORKERS) as pool:
        leftovers = list(pool.map(kill_repeatedly, range(WORKERS)))

    assert leftovers == [1] * WORKERS


def _run_and_kill(pairs: Path, target: Path, delay_seconds: float) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pairs), str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(delay_seconds)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
