#!/usr/bin/env bash
# Regenerates the committed gRPC code of proto/ into client/dmc/v1 (plus .pyi stubs).
# The proto package dmc.v1 is the Python package dmc.v1, so imports come out right through
# the -I layout. tests/test_generated_code.py fails when the committed code drifts.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-client}
py=${PYTHON:-.venv/bin/python}
bin=$(dirname "$py")
"$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/dmc/v1/*.proto >/dev/null
