"""The committed generated code must be what scripts/gen-proto.sh makes of proto/."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each generated package, as a path below client/ (the -I layout of scripts/gen-proto.sh).
PACKAGES = [Path("dmc", "v1"), Path("dmc", "agent", "_proto")]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    return out


@pytest.mark.parametrize("package", PACKAGES, ids=str)
def test_generated_code_matches_proto(fresh: Path, package: Path) -> None:
    generated = fresh / package
    committed_dir = ROOT / "client" / package
    names = sorted(p.name for p in generated.iterdir())
    assert names, "the generator wrote nothing"
    committed = sorted(p.name for p in committed_dir.iterdir() if p.suffix in {".py", ".pyi"})
    assert set(names) <= set(committed), f"generated files not committed: {names}"
    _, mismatch, errors = filecmp.cmpfiles(generated, committed_dir, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/gen-proto.sh: {mismatch}"


def test_every_proto_is_generated_and_checked(fresh: Path) -> None:
    protos = [p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*.proto")]
    missing = [str(p) for p in protos if not (fresh / p.with_name(f"{p.stem}_pb2.py")).exists()]
    unchecked = [str(p) for p in protos if p.parent not in PACKAGES]
    assert not missing, f"scripts/gen-proto.sh does not compile {missing}"
    assert not unchecked, f"add the package of {unchecked} to PACKAGES"
