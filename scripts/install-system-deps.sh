#!/usr/bin/env bash
# System packages the tests need, installed with apt only when missing (so it is a no-op on a
# prepared machine): etcd-server for the whole-system cluster tests (and etcd-client's etcdctl, which
# sets up etcd's users and roles in the etcd authentication test), python3-venv for the
# openai-client tests, libturbojpeg0 (libjpeg-turbo, loaded at run time: JPEGs decoded as Pillow
# decodes them), g++ (libFuzzer, which scripts/fuzz.sh builds, is C++), and protoc with the protobuf
# well-known types (optional: without them the build uses the protoc that cargo downloads, see
# scripts/protoc).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v c++ >/dev/null 2>&1 || need+=(g++)
ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so\.0' || [ -e /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/libturbojpeg.so.0 ] || need+=(libturbojpeg0)
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
  need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=$(command -v sudo || true)
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
