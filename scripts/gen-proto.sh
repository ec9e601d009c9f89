#!/usr/bin/env bash
# Regenerates the committed gRPC code of proto/ into client/dmc/v1 and, for the agent's
# SPIFFE Workload API, client/dmc/agent/_proto (plus .pyi stubs). Each file's path under
# proto/ is its Python module's path, so imports come out right through the -I layout. tests/test_generated_code.py fails when the committed code drifts.
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
  proto/dmc/v1/*.proto proto/dmc/agent/_proto/*.proto >/dev/null
