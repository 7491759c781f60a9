#!/usr/bin/env bash
# The cluster's overhead, side by side with `switchyard serve` on the same checkpoint and machine:
# `switchyard bench serve` against `serve`, then against the cluster in each layout (etcd, one
# coordinator, ATTENTION attention workers, EXPERTS expert workers and a router, all on loopback), with
# the per-layer expert-dispatch latency read from the attention workers' metrics. One table at the end.
#
# usage: scripts/bench-cluster.sh MODEL_DIR
#
# Environment (all optional):
#   SWITCHYARD_BIN [target/release/switchyard]   LAYOUTS ["tep dep afd"]   ATTENTION [2]   EXPERTS [3]
#   CONCURRENCY [16]   NUM_PROMPTS [64]   INPUT_LEN [128]   OUTPUT_LEN [64]   NUM_WARMUPS [2]   SEED [0]
#   THREADS_PER_WORKER [1] (SWITCHYARD_THREADS of each cluster process; serve uses every core)
#   OUT_DIR [a new temporary directory]: logs and JSON results
set -uo pipefail

MODEL_DIR=${1:?usage: $0 MODEL_DIR}
cd "$(dirname "$0")/.." || exit 1
BIN=${SWITCHYARD_BIN:-target/release/switchyard}
LAYOUTS=${LAYOUTS:-tep dep afd}
ATTENTION=${ATTENTION:-2}
EXPERTS=${EXPERTS:-3}
CONCURRENCY=${CONCURRENCY:-16}
NUM_PROMPTS=${NUM_PROMPTS:-64}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
NUM_WARMUPS=${NUM_WARMUPS:-2}
SEED=${SEED:-0}
THREADS_PER_WORKER=${THREADS_PER_WORKER:-1}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t bench-cluster-XXXXXX)}
MAX_MODEL_LEN=$(( (INPUT_LEN + OUTPUT_LEN + 255) / 256 * 256 ))
mkdir -p "$OUT_DIR"
[[ -x $BIN ]] || { echo "error: $BIN not found (cargo build --release first)" >&2; exit 1; }
command -v etcd >/dev/null || { echo "error: etcd not installed (scripts/install-system-deps.sh)" >&2; exit 1; }
vocab=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c.get('text_config', c).get('vocab_size'))" "$MODEL_DIR/config.json")

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done; PIDS=(); }
trap cleanup EXIT

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
wait_url() { # url pattern seconds (an empty pattern: any 2xx answer)
  for _ in $(seq 1 $(( $3 * 10 ))); do
    if [[ -z $2 ]]; then curl -sf -o /dev/null "$1" 2>/dev/null && return 0
    else curl -sf "$1" 2>/dev/null | grep -q "$2" && return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1 ~ $2" >&2; return 1
}
wait_log() { # file pattern seconds
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for /$2/ in $1" >&2; return 1
}

bench() { # label url [scrape urls]
  "$BIN" bench serve --base-url "$2" --label "$1" --dataset-name random --random-input-len "$INPUT_LEN" \
    --random-output-len "$OUTPUT_LEN" --random-range-start 256 --random-range-end $((vocab - 8 < 32000 ? vocab - 8 : 32000)) \
    --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" --num-warmups "$NUM_WARMUPS" --seed "$SEED" \
    --temperature 0 --ignore-eos --json "$OUT_DIR/$1.json" ${3:+--scrape-metrics "$3"} \
    > "$OUT_DIR/$1.txt" 2>&1
  cat "$OUT_DIR/$1.txt"
}

echo "== serve"
port=$(free_port)
"$BIN" serve --model "$MODEL_DIR" --host 127.0.0.1 --port "$port" --max-model-len "$MAX_MODEL_LEN" \
  --max-num-seqs "$CONCURRENCY" > "$OUT_DIR/serve.log" 2>&1 &
PIDS+=($!)
wait_url "http://127.0.0.1:$port/health" "" 600 && bench serve "http://127.0.0.1:$port"
cleanup

etcd_port=$(free_port); peer_port=$(free_port); etcd_dir=$(mktemp -d)
etcd --data-dir "$etcd_dir" --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" > "$OUT_DIR/etcd.log" 2>&1 &
ETCD_PID=$!
trap 'cleanup; kill $ETCD_PID 2>/dev/null; rm -rf "$etcd_dir"' EXIT
wait_url "http://127.0.0.1:$etcd_port/health" true 60

for layout in $LAYOUTS; do
  echo "== cluster: $layout"
  common=(--model "$MODEL_DIR" --etcd "http://127.0.0.1:$etcd_port" --cluster "bench-$layout")
  engine=(--max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$CONCURRENCY")
  role=attention; holders=$EXPERTS
  if [[ $layout != afd ]]; then role=both; holders=$((EXPERTS + ATTENTION)); fi
  SWITCHYARD_THREADS=$THREADS_PER_WORKER "$BIN" coordinator "${common[@]}" --layout "$layout" --min-expert-workers "$holders" > "$OUT_DIR/$layout-coordinator.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 1 "$EXPERTS"); do
    SWITCHYARD_THREADS=$THREADS_PER_WORKER "$BIN" worker "${common[@]}" "${engine[@]}" --role expert --listen 127.0.0.1:0 \
      --id "expert-$i" > "$OUT_DIR/$layout-expert-$i.log" 2>&1 &
    PIDS+=($!)
  done
  scrape=()
  for i in $(seq 1 "$ATTENTION"); do
    mport=$(free_port)
    SWITCHYARD_THREADS=$THREADS_PER_WORKER "$BIN" worker "${common[@]}" "${engine[@]}" --role "$role" --listen 127.0.0.1:0 \
      --id "attention-$i" --metrics-port "$mport" > "$OUT_DIR/$layout-attention-$i.log" 2>&1 &
    PIDS+=($!)
    scrape+=("http://127.0.0.1:$mport/metrics")
  done
  rport=$(free_port)
  "$BIN" router "${common[@]}" --host 127.0.0.1 --port "$rport" --max-model-len "$MAX_MODEL_LEN" --health-interval-ms 100 \
    > "$OUT_DIR/$layout-router.log" 2>&1 &
  PIDS+=($!)
  wait_log "$OUT_DIR/$layout-coordinator.log" "$holders expert workers" 600 &&
    for i in $(seq 1 "$ATTENTION"); do wait_log "$OUT_DIR/$layout-attention-$i.log" "steps now run on plan" 600 || exit 1; done &&
    wait_url "http://127.0.0.1:$rport/metrics" "switchyard_router_ready_workers $ATTENTION" 120 &&
    bench "cluster-$layout" "http://127.0.0.1:$rport" "$(IFS=,; echo "${scrape[*]}")"
  cleanup
done

echo
echo "== summary: $MODEL_DIR, $INPUT_LEN in / $OUTPUT_LEN out, concurrency $CONCURRENCY, $NUM_PROMPTS prompts, greedy"
python3 - "$OUT_DIR" $LAYOUTS <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
base = load("serve")
print(f"{'setup':<14} {'out tok/s':>10} {'vs serve':>9} {'mean TPOT ms':>13} {'dispatch/layer ms':>18} {'dispatch/step ms':>17}")
for name in ["serve"] + [f"cluster-{l}" for l in sys.argv[2:]]:
    r = load(name)
    if r is None:
        print(f"{name:<14} {'failed':>10}"); continue
    d = r.get("expert_dispatch") or []
    calls = sum(x["calls"] for x in d)
    per_layer = sum(x["mean_ms"] * x["calls"] for x in d) / calls if calls else float("nan")
    per_step = sum(x["mean_ms"] for x in d) if d else float("nan")
    ratio = r["output_throughput"] / base["output_throughput"] if base else float("nan")
    print(f"{name:<14} {r['output_throughput']:>10.1f} {ratio:>8.2f}x {r['mean_tpot_ms']:>13.1f} {per_layer:>18.3f} {per_step:>17.2f}")
EOF
echo "logs and JSON results: $OUT_DIR"
