#!/usr/bin/env bash
# Coverage-guided fuzzing (docs/testing.md, "Fuzzing"), on stable Rust.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 30 s each, every target)
#
# Builds the libFuzzer binaries of fuzz/libfuzzer/ in release with LLVM's SanitizerCoverage passes
# (inline 8-bit counters, PC table, comparison tracing, stack depth: what cargo-fuzz passes, minus the
# nightly-only -Zsanitizer), then runs each target for SECONDS from a fresh working corpus seeded with
# fuzz/corpus/<target>/ and fuzz/regressions/<target>/, with fuzz/dict/<target>.dict when there is one. An input that panics, hangs
# past 10 s or grows past 2 GiB is written to fuzz/regressions/<target>/ (which
# `cargo test -p switchyard-fuzz` replays on every test run) and makes the script fail after the
# remaining targets ran. Per target it prints libFuzzer's last coverage line and run count.
#
# Environment: SWITCHYARD_FUZZ_TARGET_DIR (default target/fuzz), SWITCHYARD_FUZZ_JOBS (cargo -j),
# SWITCHYARD_FUZZ_ARGS (more libFuzzer flags, e.g. -seed=1), SWITCHYARD_FUZZ_KEEP (a folder: the
# working corpora are merged into it, one subfolder per target, to pick new seeds from).
set -euo pipefail
cd "$(dirname "$0")/.."

all=(http_request chat_template output_parser dispatch_frame)
secs=${1:-30}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz: unknown target $t (targets: ${all[*]})" >&2; exit 2; }
done

# libFuzzer itself is C++, compiled by libfuzzer-sys's build script.
command -v c++ >/dev/null 2>&1 || { echo "fuzz: needs a C++ compiler (scripts/install-system-deps.sh installs g++)" >&2; exit 2; }

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${SWITCHYARD_FUZZ_TARGET_DIR:-$PWD/target/fuzz}
# Instrumentation for the fuzzed code only: with an explicit --target, RUSTFLAGS do not reach build
# scripts and proc macros (which would not load with sancov calls in them). Debug assertions and
# overflow checks come from fuzz/libfuzzer/Cargo.toml's release profile.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
jobs=()
[ -z "${SWITCHYARD_FUZZ_JOBS:-}" ] || jobs=(-j "$SWITCHYARD_FUZZ_JOBS")

echo "== fuzz: building ${targets[*]} (release, sancov, $host, into $CARGO_TARGET_DIR)"
start=$SECONDS
cargo build --manifest-path fuzz/libfuzzer/Cargo.toml --release --target "$host" "${jobs[@]}" "${bins[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

logs=$CARGO_TARGET_DIR/logs
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  # Seeds, and the inputs that once failed (good starting points near known-fragile code).
  find fuzz/corpus/"$t" fuzz/regressions/"$t" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' -exec cp {} "$work"/ \; 2>/dev/null || true
  mkdir -p fuzz/regressions/"$t"
  dict=()
  [ ! -f fuzz/dict/"$t".dict ] || dict=(-dict=fuzz/dict/"$t".dict)
  # shellcheck disable=SC2086
  extra=(${SWITCHYARD_FUZZ_ARGS:-})
  echo "== fuzz: $t for ${secs} s"
  rc=0
  RUST_BACKTRACE=1 "$CARGO_TARGET_DIR/$host/release/$t" "$work" "${dict[@]}" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix=fuzz/regressions/"$t"/ -print_final_stats=1 "${extra[@]}" >"$logs/$t.log" 2>&1 || rc=$?
  cov=$(grep -a 'cov:' "$logs/$t.log" | tail -n 1 || true)
  runs=$(grep -a '^stat::number_of_executed_units' "$logs/$t.log" | awk '{print $2}' || true)
  echo "fuzz: $t: ${runs:-?} runs; last: ${cov:-no coverage line}"
  if [ -n "${SWITCHYARD_FUZZ_KEEP:-}" ]; then
    mkdir -p "$SWITCHYARD_FUZZ_KEEP/$t"
    "$CARGO_TARGET_DIR/$host/release/$t" -merge=1 "$SWITCHYARD_FUZZ_KEEP/$t" "$work" >>"$logs/$t.log" 2>&1 || true
  fi
  rm -rf "$work"
  if [ $rc -ne 0 ]; then
    echo "fuzz: $t FAILED (exit $rc); its log ($logs/$t.log) ends:"
    tail -n 60 "$logs/$t.log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failing inputs were written to fuzz/regressions/<target>/ (git status fuzz/regressions)."
  echo "Replay them: cargo test -p switchyard-fuzz --test replay   (one target: ... --test replay ${failed[0]})"
  echo "Fix the code, keep the input (rename it after the defect), and commit both."
  exit 1
fi
echo "fuzz: no failures in ${targets[*]}"
