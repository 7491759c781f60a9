#!/usr/bin/env bash
# The test command (README, .ci/run): the Rust tests, then the whole server driven by the official
# `openai` Python client. Sets up what it needs: a venv in .venv-test with tests/python/requirements.txt
# (system packages come from scripts/install-system-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# etcd (cluster tests), python3-venv: installed with apt when missing.
bash scripts/install-system-deps.sh

cargo test --workspace
cargo build --bin switchyard
# The CUDA kernels compile with NVRTC for sm_80/sm_90 and spill nothing (the PyPI wheels; no GPU needed).
bash scripts/check-cuda.sh

venv=${SWITCHYARD_TEST_VENV:-.venv-test}
if ! "$venv/bin/python" -c "import openai, pytest, httpx, yaml, helm_python, kubernetes_validate, jsonschema, grpc, opentelemetry.proto" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check -r tests/python/requirements.txt
fi
SWITCHYARD_BIN=target/debug/switchyard "$venv/bin/python" -m pytest -q tests/python "$@"
