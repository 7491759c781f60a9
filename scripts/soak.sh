#!/usr/bin/env bash
# Endurance runs (docs/testing.md#endurance): `serve` or a whole cluster at twice its capacity for
# DURATION seconds with a mix of chats, streams, tools, images, structured outputs, cancellations and bad
# inputs; --chaos kills and restarts cluster processes (expert and attention workers, a coordinator,
# etcd) during the load. Fails when a completion differs from the same request run alone, when anything
# but 429/503 answers a well-formed request, or when memory does not come back within 5% of its baseline.
#   scripts/soak.sh DURATION [--target serve|cluster] [--chaos] [--out report.json]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/soak.sh DURATION_SECONDS [--target serve|cluster] [--chaos] [--out FILE]" >&2; exit 2; }
bash scripts/install-system-deps.sh
cargo build --bin switchyard
venv=${SWITCHYARD_TEST_VENV:-.venv-test}
if ! "$venv/bin/python" -c "import openai, pytest, httpx, yaml" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check -r tests/python/requirements.txt
fi
grep -m1 -o 'avx512[a-z_0-9]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/cpu: /'; echo
SWITCHYARD_BIN=${SWITCHYARD_BIN:-target/debug/switchyard} "$venv/bin/python" tests/python/soak.py "$@"
