#!/usr/bin/env bash
# The device check of the CUDA backend (docs/gpu.md), in two halves:
#
#   bash scripts/gpu-check.sh --prepare    # here, with cargo: builds what travels, into target/gpu-check/
#   bash scripts/gpu-check.sh [OUT_DIR]    # on the GPU machine (no Rust there): runs it, writes
#                                          # OUT_DIR/gpu-check.json and gpu-check.log (default: $OUT,
#                                          # else target/gpu-check/out)
#
# --prepare builds, in release and stripped: the switchyard binary and two test binaries, the CUDA
# kernels against the CPU kernels (kernels/tests/cuda_device.rs) and the model on the GPU against the
# CPU model (tests/cuda_model.rs). Carry target/gpu-check to the device (about 40 MB).
#
# On the device, libcuda comes from the driver and libnvrtc from the machine's CUDA toolkit or its
# PyTorch's bundled NVIDIA wheels (found, not carried). It runs, each step's output kept in the report:
#   1. the machine: nvidia-smi, the libraries found, `switchyard` seeing the GPU;
#   2. every kernel against the CPU kernels at the real shapes (max error in bf16 steps, share of
#      elements that differ, batch invariance asserted exactly);
#   3. the tiny fixtures on the GPU against the CPU model (greedy tokens, top-5 log-probs, a batch of 8
#      bit-identical to each prompt alone, a split prompt bit-identical to one pass), and
#      `switchyard generate --device cuda` on them;
#   4. the real shapes from tests/fixtures/gemma-4-26B-A4B-it with --load-format dummy:
#      `switchyard bench --device cuda` at batch 1, 16, 64 and 256, next to the bound from the weight
#      bytes per decode token and the device-to-device copy bandwidth measured in the same run.
#   5. `serve --device cuda` on the tiny bf16 fixture beside `serve --device cpu`, checked through the HTTP
#      API by scripts/serve-check.py: a batch of 8 equal to each alone, a prefix-cache hit equal to the
#      miss, a JSON-schema request, an image request, greedy tokens against the CPU server.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  dest=target/gpu-check
  rm -rf "$dest" && mkdir -p "$dest"
  cargo build --release --bin switchyard
  cp target/release/switchyard "$dest/switchyard"
  # Builds the test target $1 (cargo arguments after it) and copies its executable to $dest/$1.
  test_exe() {
    local name=$1; shift
    local exe
    exe=$(cargo test --release "$@" --test "$name" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$name")
    cp "$exe" "$dest/$name"
  }
  test_exe cuda_device -p switchyard-kernels
  test_exe cuda_model
  strip "$dest/switchyard" "$dest/cuda_device" "$dest/cuda_model"
  ls -la "$dest"
  echo "carry target/gpu-check; on the device: bash scripts/gpu-check.sh"
  exit 0
fi

bin=target/gpu-check
dest_dir=${1:-${OUT:-$bin/out}}
mkdir -p "$dest_dir"
# Everything is written to a scratch folder; only the report and the log go to the destination (the
# device tool brings back at most 8 files).
out=$(mktemp -d)
report="$out/gpu-check.json"
log="$out/gpu-check.log"
: >"$log"
[ -x "$bin/switchyard" ] && [ -x "$bin/cuda_device" ] && [ -x "$bin/cuda_model" ] || { echo "no $bin: run 'bash scripts/gpu-check.sh --prepare' where cargo is, and carry $bin" >&2; exit 2; }

# libnvrtc: the toolkit's, else a Python wheel's (PyTorch's bundled NVIDIA libraries).
libdirs=""
for f in $(ls /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda*/lib64/libnvrtc.so.13 2>/dev/null) \
         $(python3 -c 'import glob, site; [print(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/**/libnvrtc.so.13", recursive=True)]' 2>/dev/null); do
  libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SWITCHYARD_CUDA_CACHE="$out/ptx-cache"

{
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "== step 1: switchyard sees the GPU"
  "$bin/switchyard" generate --model tests/fixtures/tiny-bf16 --prompt-ids 2,17 --max-tokens 1 --device auto 2>&1 | grep -i "device" || true
} >>"$log" 2>&1

echo "== step 2: every kernel against the CPU kernels" >>"$log"
kernels_jsonl="$out/kernels.jsonl"
: >"$kernels_jsonl"
start=$(date +%s)
SWITCHYARD_REQUIRE_CUDA=1 SWITCHYARD_GPU_REPORT="$kernels_jsonl" "$bin/cuda_device" --test-threads=1 >>"$log" 2>&1
kernels_rc=$?
kernels_s=$(( $(date +%s) - start ))

echo "== step 3: the tiny fixtures on the GPU against the CPU model" >>"$log"
model_jsonl="$out/model.txt"
start=$(date +%s)
SWITCHYARD_REQUIRE_CUDA=1 SWITCHYARD_FIXTURES="$PWD/tests/fixtures" "$bin/cuda_model" --test-threads=1 --nocapture >"$model_jsonl" 2>&1
model_rc=$?
model_s=$(( $(date +%s) - start ))
cat "$model_jsonl" >>"$log"
"$bin/switchyard" generate --model tests/fixtures/tiny-bf16 --prompt-ids 2,17,30,41 --max-tokens 8 --device cuda >"$out/generate-cuda.txt" 2>>"$log"
"$bin/switchyard" generate --model tests/fixtures/tiny-bf16 --prompt-ids 2,17,30,41 --max-tokens 8 --device cpu >"$out/generate-cpu.txt" 2>>"$log"
generate_same=$(cmp -s <(python3 -c 'import json,sys; print([json.loads(l)["token"] for l in open(sys.argv[1])])' "$out/generate-cuda.txt") \
                      <(python3 -c 'import json,sys; print([json.loads(l)["token"] for l in open(sys.argv[1])])' "$out/generate-cpu.txt") && echo true || echo false)

echo "== step 4: the published shapes, dummy weights, switchyard bench --device cuda" >>"$log"
start=$(date +%s)
timeout 240 "$bin/switchyard" bench --device cuda --model tests/fixtures/gemma-4-26B-A4B-it --load-format dummy \
  --batch-sizes 1,16,64,256 --prompt-len 128 --decode-steps 16 --json >"$out/bench.jsonl" 2>>"$log"
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

echo "== step 5: serve --device cuda, through the HTTP API" >>"$log"
"$bin/switchyard" serve tests/fixtures/tiny-bf16 --device cuda --port 8123 >"$out/serve-cuda.log" 2>&1 &
gpu_pid=$!
"$bin/switchyard" serve tests/fixtures/tiny-bf16 --device cpu --port 8124 >"$out/serve-cpu.log" 2>&1 &
cpu_pid=$!
for _ in $(seq 1 90); do
  python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8123/health"); u.urlopen("http://127.0.0.1:8124/health")' 2>/dev/null && break
  sleep 1
done
timeout 120 python3 scripts/serve-check.py http://127.0.0.1:8123 --against http://127.0.0.1:8124 >"$out/serve-check.json" 2>>"$log"
serve_rc=$?
kill $gpu_pid $cpu_pid 2>/dev/null
tail -5 "$out/serve-cuda.log" >>"$log"

python3 - "$report" "$kernels_jsonl" "$kernels_rc" "$kernels_s" "$log" "$model_jsonl" "$model_rc" "$model_s" "$generate_same" "$out/bench.jsonl" "$bench_rc" "$bench_s" "$out/serve-check.json" "$serve_rc" <<'PY'
import json, sys
report, jsonl, rc, secs, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model_txt, model_rc, model_s, generate_same = sys.argv[6], int(sys.argv[7]), int(sys.argv[8]), sys.argv[9] == "true"
bench_jsonl, bench_rc, bench_s = sys.argv[10], int(sys.argv[11]), int(sys.argv[12])
serve_json, serve_rc = sys.argv[13], int(sys.argv[14])
def lines(path, key):
    out = []
    for l in open(path, errors="replace"):
        l = l.strip()
        if l.startswith("{") and key in l:
            try:
                out.append(json.loads(l))
            except ValueError:
                pass
    return out
checks = [json.loads(l) for l in open(jsonl) if l.strip()]
text = open(log).read()
out = {
    "machine": text.split("== step 1")[0].strip(),
    "kernels": {"passed": rc == 0, "seconds": secs, "checks": checks},
    "model_tiny_fixtures": {"passed": model_rc == 0, "seconds": model_s, "checks": lines(model_txt, "check"),
                            "generate_cuda_equals_cpu_tokens": generate_same},
    "bench_real_shapes_dummy": {"exit": bench_rc, "seconds": bench_s, "rows": lines(bench_jsonl, "batch")},
    "serve_device_cuda": {"passed": serve_rc == 0, "checks": lines(serve_json, "batch")},
}
json.dump(out, open(report, "w"), indent=2)
print(json.dumps(out, indent=2))
PY
cp "$report" "$log" "$dest_dir/"
tail -60 "$log"
[ $kernels_rc -eq 0 ] && [ $model_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $serve_rc -eq 0 ]
