#!/usr/bin/env bash
# The crate graph's rules (docs/architecture.md), checked on the resolved dependency tree:
# - the front end (switchyard-router) never depends on the engine, the kernels or the coordinator;
# - the engine contract (switchyard-engine-api) depends on no other switchyard crate;
# - the wire crate (switchyard-proto) knows the contract and nothing behind it;
# - nothing that ships depends on the fuzz harness (switchyard-fuzz); the binary's tree holds every crate
#   that ships, so checking it checks them all.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
forbid() { # crate, then the crates it must not reach
  local crate=$1; shift
  local tree
  tree=$(cargo tree -p "$crate" -e normal,build --prefix none --format '{p}' --offline 2>/dev/null || cargo tree -p "$crate" -e normal,build --prefix none --format '{p}')
  for bad in "$@"; do
    if grep -q "^$bad v" <<<"$tree"; then
      echo "layering: $crate depends on $bad (cargo tree -p $crate -i $bad shows the path)"
      fail=1
    fi
  done
}

forbid switchyard-router switchyard-worker switchyard-kernels switchyard-coordinator
forbid switchyard-engine-api switchyard-worker switchyard-kernels switchyard-coordinator switchyard-router switchyard-proto switchyard-grammar llguidance tonic
forbid switchyard-proto switchyard-worker switchyard-kernels switchyard-coordinator switchyard-router switchyard-grammar
forbid switchyard-grammar switchyard-worker switchyard-kernels switchyard-coordinator switchyard-router
forbid switchyard switchyard-fuzz libfuzzer-sys
[ $fail -eq 0 ] && echo "layering: the router reaches no worker, kernels or coordinator; the contract stands alone; nothing shipped links the fuzz harness"
exit $fail
