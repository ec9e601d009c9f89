"""The committed generated code must be what scripts/gen-proto.sh makes of proto/."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "client" / "dmc" / "v1"


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    fresh = tmp_path / "dmc" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "the generator wrote nothing"
    committed = sorted(p.name for p in GENERATED.iterdir() if p.suffix in {".py", ".pyi"})
    assert set(names) <= set(committed), f"generated files not committed: {names}"
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/gen-proto.sh: {mismatch}"
