#!/usr/bin/env bash
# Creates .venv and installs dmc with its test tools into it. Idempotent and quiet when
# nothing changed; every later command (./run dev, ./run tests) calls it first.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.dmc-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
