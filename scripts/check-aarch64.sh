#!/usr/bin/env bash
# The aarch64 (NEON) kernels, cross-compiled and run under qemu-aarch64: correctness only (no ARM
# machine at hand). Installs what it needs when missing: the Rust target (rustup), Debian's aarch64
# cross linker and C library, and qemu-user. Runs the kernel tests (every path the emulated CPU has:
# portable and neon, bit-compared) and the model against transformers' references on the tiny
# checkpoints (tests/model_reference.rs, on both paths).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=$(command -v sudo || true)
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# tests/common reruns a test binary on the other kernel path: through the emulator too.
export SWITCHYARD_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
cargo test -q -p switchyard-kernels --target "$target"
cargo test -q --target "$target" --test model_reference
