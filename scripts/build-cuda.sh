#!/usr/bin/env bash
# build-cuda.sh - build the CUDA binaries on a machine without a GPU and stage them for the
# GPU machine: installs the CUDA 13.0 build toolkit if needed (scripts/setup-cuda.sh), builds
# `--features cuda` into target/cuda (separate from the CPU build), copies the binaries to
# gpu-bin/ (ignored by git; carry it to the GPU machine) with a BUILDINFO file.
# First build: about 17 minutes on 2 cores; rebuilds about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-cuda.sh --env)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
t0=$(date +%s)
cargo build --release --features cuda -p tools --bins "$@"
t1=$(date +%s)
mkdir -p gpu-bin
for b in train train-bench; do
  if [ -x "$CARGO_TARGET_DIR/release/$b" ]; then
    cp "$CARGO_TARGET_DIR/release/$b" gpu-bin/
    strip gpu-bin/$b 2>/dev/null || true
  fi
done
{
  echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty') in $((t1 - t0)) s"
  echo "nvcc: $(nvcc --version | grep -i release); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "NEEDED: $(readelf -d gpu-bin/train | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
} > gpu-bin/BUILDINFO
cat gpu-bin/BUILDINFO
