#!/usr/bin/env bash
# test-cuda-local.sh - what of the CUDA build can be tested on a machine without a GPU:
# builds the trainer's tests with `--features cuda` and runs them against the link stub of the
# driver (every driver call fails, so the GPU tests print that they skipped), which checks that
# every kernel module compiles with NVRTC and that the CPU tests still pass in a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-cuda.sh --env)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
# The binaries record NEEDED libcuda.so.1; here that is the stub (never on a GPU machine).
stub="$CARGO_TARGET_DIR/libcuda-stub"
mkdir -p "$stub"
ln -sfn "$CUDA_ROOT/lib/stubs/libcuda.so" "$stub/libcuda.so.1"
export LD_LIBRARY_PATH="$stub:$LD_LIBRARY_PATH"
cargo test --release --features cuda,nccl -p trainer "$@"
