#!/usr/bin/env bash
# Compiles every CUDA kernel (kernels/cuda/*.cu) with NVRTC, as the server does at start, for sm_80 and
# sm_90, and reads ptxas's register, stack and spill counts for sm_90. No GPU is needed: NVRTC and ptxas
# come from NVIDIA's PyPI wheels (CUDA 13.0, whose PTX 9.0 the 580 driver of the lent H200 takes),
# installed under .venv-cuda/ (ignored by git). Fails on a compile error, a missing entry point, or a
# kernel that spills registers. docs/gpu.md says what runs on a device and when.
#
#   bash scripts/check-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."

dir=.venv-cuda
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -x "$dir/nvidia/cu13/bin/ptxas" ]; then
  echo "== installing NVRTC and ptxas 13.0 from PyPI into $dir"
  rm -rf "$dir" && mkdir -p "$dir/whl"
  python3 -m pip download --quiet --no-deps -d "$dir/whl" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*"
  for w in "$dir"/whl/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
  chmod +x "$dir/nvidia/cu13/bin/ptxas"
  rm -rf "$dir/whl"
fi
lib=$(cd "$dir/nvidia/cu13/lib" && pwd)
ptxas=$(cd "$dir/nvidia/cu13/bin" && pwd)/ptxas

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "== NVRTC: every kernel file for sm_80 and sm_90 (kernels/tests/cuda_nvrtc.rs)"
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SWITCHYARD_REQUIRE_NVRTC=1 SWITCHYARD_PTX_OUT="$out" \
  cargo test -q -p switchyard-kernels --test cuda_nvrtc

echo "== ptxas -v, sm_90: registers, stack, spills per kernel"
"$ptxas" --version | tail -1
fail=0
for ptx in "$out"/*.sm_90.ptx; do
  "$ptxas" -v --gpu-name sm_90 "$ptx" -o /dev/null 2>"$out/log" || { cat "$out/log"; exit 1; }
  python3 - "$out/log" "$(basename "$ptx" .sm_90.ptx)" <<'PY' || fail=1
import re, sys
text = open(sys.argv[1]).read()
bad = 0
for name, body in re.findall(r"Compiling entry function '(\w+)' for 'sm_90'\n(.*?)(?=ptxas info\s+: Compiling entry|\Z)", text, re.S):
    regs = re.search(r"Used (\d+) registers", body)
    stack = re.search(r"(\d+) bytes stack frame", body)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
    smem = re.search(r"(\d+) bytes smem", body)
    s_st, s_ld = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
    print(f"  {sys.argv[2]:<12} {name:<24} {int(regs.group(1)) if regs else 0:>4} regs {int(stack.group(1)) if stack else 0:>6} B stack {s_st + s_ld:>4} B spilled {int(smem.group(1)) if smem else 0:>6} B smem")
    bad += (s_st + s_ld) > 0
sys.exit(1 if bad else 0)
PY
done
[ $fail -eq 0 ] || { echo "check-cuda: a kernel spills registers (see above)"; exit 1; }
echo "check-cuda: every kernel compiles for sm_80 and sm_90, and none spills on sm_90"
