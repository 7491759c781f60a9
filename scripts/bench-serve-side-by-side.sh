#!/usr/bin/env bash
# Side-by-side serving benchmark on one machine: Switchyard, vLLM (CPU) and llama.cpp's llama-server, started
# one after another on free ports, each measured by the same client (`switchyard bench serve`) with the same
# random token-id prompts (same seed), greedy, ignore_eos, at each concurrency. Prints one table at the end.
#
# usage: scripts/bench-serve-side-by-side.sh MODEL_DIR
#
# Environment (all optional):
#   SWITCHYARD_BIN   switchyard binary, server and benchmark client   [target/release/switchyard]
#   VLLM_VENV        venv with vLLM CPU 0.32 (docs/benchmarks.md says how to make one)   [.venv-vllm]
#   LLAMA_SERVER     llama.cpp server binary (docs/benchmarks.md: built for AVX2 only)   [.venv-llama/build/bin/llama-server]
#   SWITCHYARD_KERNELS  Switchyard's CPU kernel path (portable, avx2, avx512, avx512bf16, amx)   [the best this CPU has]
#   GGUF             GGUF of the same checkpoint for llama-server (llama.cpp is skipped without it)
#   SERVERS          which servers, in order   ["switchyard vllm llama"]
#   CONCURRENCIES    ["1 16"]; at concurrency 1 NUM_PROMPTS_C1 [8] prompts, otherwise PROMPTS_PER_SLOT [4] per slot
#   INPUT_LEN [128]  OUTPUT_LEN [64]  SEED [0]  NUM_WARMUPS [2]
#   RANGE_START [256], RANGE_END [min(32000, vocab_size - 8)]: token ids of the prompts, clear of special tokens
#   MAX_NUM_SEQS [16]  MAX_MODEL_LEN [4096]  LLAMA_CTX [MAX_NUM_SEQS x per-request context rounded up to 64]
#   STARTUP_TIMEOUT [900] seconds per server   OUT_DIR [a new temporary directory]: logs and JSON results
#   ROUNDS [1]       how many times to run the whole sequence of servers. A shared VM's speed can drift by a
#                    fifth within minutes for every server alike, so each round's ratio compares servers
#                    measured minutes apart; with ROUNDS > 1 the table gives each server's median over the
#                    rounds and each round's switchyard/best ratio, then the median of those ratios.
#
# A peer that is not installed, or that does not come up, is reported as "skipped: ..." and the others still
# run. Every server this script starts is stopped when it exits, however it exits.
set -uo pipefail

MODEL_DIR=${1:?usage: $0 MODEL_DIR}
cd "$(dirname "$0")/.." || exit 1

SWITCHYARD_BIN=${SWITCHYARD_BIN:-target/release/switchyard}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
LLAMA_SERVER=${LLAMA_SERVER:-.venv-llama/build/bin/llama-server}
GGUF=${GGUF:-}
SERVERS=${SERVERS:-switchyard vllm llama}
CONCURRENCIES=${CONCURRENCIES:-1 16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
SEED=${SEED:-0}
NUM_WARMUPS=${NUM_WARMUPS:-2}
NUM_PROMPTS_C1=${NUM_PROMPTS_C1:-8}
PROMPTS_PER_SLOT=${PROMPTS_PER_SLOT:-4}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-16}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
LLAMA_CTX=${LLAMA_CTX:-$((MAX_NUM_SEQS * ((INPUT_LEN + OUTPUT_LEN) / 64 + 1) * 64))}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}
ROUNDS=${ROUNDS:-1}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t bench-serve-XXXXXX)}
mkdir -p "$OUT_DIR"

if [[ ! -x $SWITCHYARD_BIN ]]; then
  echo "error: $SWITCHYARD_BIN not found (cargo build --release first, or set SWITCHYARD_BIN)" >&2
  exit 1
fi
if [[ ! -f $MODEL_DIR/config.json ]]; then
  echo "error: $MODEL_DIR/config.json not found" >&2
  exit 1
fi
vocab=$(jq '.text_config.vocab_size // .vocab_size // 262144' "$MODEL_DIR/config.json")
RANGE_START=${RANGE_START:-256}
RANGE_END=${RANGE_END:-$((vocab - 8 < 32000 ? vocab - 8 : 32000))}

# The one server running now: its process group (setsid makes the server's pid its group id), so that
# stopping it also stops the worker processes it started (vLLM's engine core).
SERVER_PID=""

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  local pid=$SERVER_PID
  SERVER_PID=""
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  for _ in $(seq 150); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  echo "  (server group $pid ignored SIGTERM for 30 s: killing it)"
  kill -KILL -- "-$pid" 2>/dev/null || true
}
trap stop_server EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server LOG COMMAND...: starts the command in its own process group, output to LOG.
start_server() {
  local log=$1
  shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  SERVER_PID=$!
}

# wait_ready NAME PORT LOG: polls /health (or /v1/models) until the server answers, it dies, or time runs out.
wait_ready() {
  local name=$1 port=$2 log=$3 waited=0
  while ((waited < STARTUP_TIMEOUT)); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/health" || curl -sf -o /dev/null "http://127.0.0.1:$port/v1/models"; then
      echo "  $name ready after ${waited} s"
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "skipped: $name exited during startup; last lines of $log:"
      tail -n 5 "$log" | sed 's/^/    /'
      stop_server
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "skipped: $name not ready after $STARTUP_TIMEOUT s (log: $log)"
  stop_server
  return 1
}

num_prompts() {
  if (($1 == 1)); then echo "$NUM_PROMPTS_C1"; else echo $(($1 * PROMPTS_PER_SLOT)); fi
}

# bench_all NAME PORT ROUND: the client at every concurrency against the server on PORT; results in
# NAME-cC-rROUND.json.
bench_all() {
  local name=$1 port=$2 round=$3 c
  for c in $CONCURRENCIES; do
    echo "  $name: concurrency $c, $(num_prompts "$c") prompts"
    if ! "$SWITCHYARD_BIN" bench serve --base-url "http://127.0.0.1:$port" --endpoint /v1/completions \
      --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
      --random-range-start "$RANGE_START" --random-range-end "$RANGE_END" --seed "$SEED" \
      --num-prompts "$(num_prompts "$c")" --max-concurrency "$c" --num-warmups "$NUM_WARMUPS" \
      --temperature 0 --ignore-eos --percentiles 50,99 --label "$name" \
      --json "$OUT_DIR/$name-c$c-r$round.json" >"$OUT_DIR/$name-c$c-r$round.txt" 2>&1; then
      echo "  $name at concurrency $c failed: $(tail -n 1 "$OUT_DIR/$name-c$c-r$round.txt")"
      rm -f "$OUT_DIR/$name-c$c-r$round.json"
    fi
  done
}

# run_server NAME COMMAND...: COMMAND gets `--port P` appended; starts it, benchmarks it (round $ROUND), stops it.
run_server() {
  local name=$1 port log
  shift
  port=$(free_port)
  log="$OUT_DIR/$name-r$ROUND.server.log"
  echo "== $name on port $port, round $ROUND of $ROUNDS (log: $log)"
  start_server "$log" "$@" --port "$port"
  wait_ready "$name" "$port" "$log" || return 0
  bench_all "$name" "$port" "$ROUND"
  stop_server
}

# run_round: every server in SERVERS, one after another, for round $ROUND.
run_round() {
  local server
  for server in $SERVERS; do
    case $server in
      switchyard)
        run_server switchyard "$SWITCHYARD_BIN" serve --model "$MODEL_DIR" --host 127.0.0.1 \
          --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN"
        ;;
      vllm)
        if [[ ! -x $VLLM_VENV/bin/python ]]; then
          echo "skipped: vllm (no $VLLM_VENV/bin/python; see docs/benchmarks.md)"
          continue
        fi
        run_server vllm env VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}" \
          VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" \
          "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --dtype bfloat16 \
          --host 127.0.0.1 --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_NUM_SEQS"
        ;;
      llama)
        if [[ ! -x $LLAMA_SERVER ]]; then
          echo "skipped: llama.cpp (no $LLAMA_SERVER)"
          continue
        fi
        if [[ -z $GGUF || ! -f $GGUF ]]; then
          echo "skipped: llama.cpp (set GGUF to the checkpoint's .gguf file)"
          continue
        fi
        run_server llama "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 -t 2 -np "$MAX_NUM_SEQS" --no-cache-prompt \
          -c "$LLAMA_CTX"
        ;;
      *)
        echo "skipped: unknown server '$server' (known: switchyard vllm llama)"
        ;;
    esac
  done
}

for ROUND in $(seq "$ROUNDS"); do
  run_round
done

echo
echo "Side by side: $INPUT_LEN-token random prompts, $OUTPUT_LEN output tokens, greedy, ignore_eos, seed $SEED"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores; x86 features:" \
  "$(grep -m1 -o -w -E 'avx2|fma|f16c|avx512f|avx512bw|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "Switchyard kernels: $(grep -m1 -o 'CPU kernels: .*' "$OUT_DIR/switchyard-r1.server.log" 2>/dev/null || echo unknown)"
python3 - "$OUT_DIR" "$SERVERS" "$CONCURRENCIES" "$ROUNDS" <<'EOF'
import json, os, statistics, sys

out_dir, servers, concurrencies, rounds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])

def load_round(name, c, r):
    try:
        with open(os.path.join(out_dir, f"{name}-c{c}-r{r}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def load(name, c):
    """The server's result at concurrency c: the one round's, or each figure's median over the rounds
    it completed (a round that failed or did not run is left out)."""
    runs = [r for r in (load_round(name, c, i) for i in range(1, rounds + 1)) if r is not None and r["completed"] > 0]
    if not runs:
        return load_round(name, c, 1)
    med = lambda key: statistics.median(r[key] for r in runs)
    return {"completed": min(r["completed"] for r in runs), "failed": max(r["failed"] for r in runs),
            "output_throughput": med("output_throughput"), "median_ttft_ms": med("median_ttft_ms"),
            "median_itl_ms": med("median_itl_ms")}

def round_ratios(c):
    """switchyard/best output tok/s in each round where Switchyard and a peer both completed."""
    out = []
    for i in range(1, rounds + 1):
        me = load_round("switchyard", c, i)
        peers = [load_round(n, c, i) for n in servers if n != "switchyard"]
        peers = [p for p in peers if p is not None and p["completed"] > 0]
        if me is not None and me["completed"] > 0 and peers:
            out.append(me["output_throughput"] / max(p["output_throughput"] for p in peers))
    return out

def fmt(x, spec):
    return format(x, spec) if x is not None else "-"

print(f"{'conc':>4}  {'server':<11} {'ok/sent':>8} {'out tok/s':>10} {'med TTFT ms':>12} {'med ITL ms':>11}")
for c in concurrencies:
    rows = {}
    for name in servers:
        r = load(name, c)
        rows[name] = r
        if r is None:
            print(f"{c:>4}  {name:<11} {'-':>8} {'-':>10} {'-':>12} {'-':>11}")
            continue
        sent = r["completed"] + r["failed"]
        print(f"{c:>4}  {name:<11} {str(r['completed']) + '/' + str(sent):>8} {r['output_throughput']:>10.2f}"
              f" {r['median_ttft_ms']:>12.1f} {r['median_itl_ms']:>11.2f}")
    me = rows.get("switchyard")
    others = [r for n, r in rows.items() if n != "switchyard" and r is not None and r["completed"] > 0]
    if me is not None and me["completed"] > 0 and others:
        best_tps = max(r["output_throughput"] for r in others)
        best_ttft = min(r["median_ttft_ms"] for r in others)
        best_itl = min(r["median_itl_ms"] for r in others)
        ratio = lambda a, b: a / b if b else None
        cells = [ratio(me["output_throughput"], best_tps), ratio(me["median_ttft_ms"], best_ttft), ratio(me["median_itl_ms"], best_itl)]
        widths = [9, 11, 10]
        print(f"{'':>4}  {'switchyard/best':<20}" + "".join(f" {fmt(x, f'>{w}.2f')}x" for x, w in zip(cells, widths)))
    if rounds > 1:
        rs = round_ratios(c)
        if rs:
            print(f"{'':>4}  out tok/s switchyard/best by round: {', '.join(f'{x:.2f}x' for x in rs)};"
                  f" median {statistics.median(rs):.2f}x")
if rounds > 1:
    print(f"(each server's figures: medians over {rounds} rounds)")
print(f"(tok/s: higher is better; TTFT and ITL: lower is better. Results and logs in {out_dir})")
EOF
