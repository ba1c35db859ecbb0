#!/usr/bin/env bash
# build-cuda.sh - build the CUDA binaries on a machine without a GPU and stage them for the
# GPU machine: installs the CUDA 13.0 build toolkit if needed (scripts/setup-cuda.sh), builds
# `--features cuda` into target/cuda (separate from the CPU build), copies the binaries and the
# GPU test binaries to gpu-bin/ (ignored by git; carry it to the GPU machine, then run
# scripts/gpu/issue6-check.sh or scripts/gpu/e2e-bench.sh there) with a BUILDINFO file.
# First build: about 17 minutes on 2 cores; rebuilds about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup-cuda.sh --env)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
t0=$(date +%s)
cargo build --release --features cuda,nccl -p tools --bins "$@"
# The GPU test binaries (they skip without a GPU): the trainer's tests whose file names start
# with cuda_.
tests=$(cargo test --release --features cuda,nccl -p trainer --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m.get("profile", {}).get("test"):
        name = m["target"]["name"]
        if name.startswith("cuda_"):
            print(name + "=" + exe)
')
t1=$(date +%s)
# Staged uncompressed in target/gpu-stage, carried as one xz archive (the device tool carries
# at most 64 MiB; each CUDA binary is about 16 MB stripped, mostly compressible PTX).
stage=target/gpu-stage
rm -rf "$stage" gpu-bin
mkdir -p "$stage/tests" gpu-bin
for kv in $tests; do
  cp "${kv#*=}" "$stage/tests/${kv%%=*}"
  strip "$stage/tests/${kv%%=*}" 2>/dev/null || true
done
for b in train train-bench make-imagenet-like shard-imagenet; do
  if [ -x "$CARGO_TARGET_DIR/release/$b" ]; then
    cp "$CARGO_TARGET_DIR/release/$b" "$stage/"
    strip "$stage/$b" 2>/dev/null || true
  fi
done
{
  echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty') in $((t1 - t0)) s"
  echo "nvcc: $(nvcc --version | grep -i release); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "NEEDED: $(readelf -d "$stage/train" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  echo "binaries: $(cd "$stage" && ls | tr '\n' ' ') tests: $(ls "$stage/tests" | tr '\n' ' ')"
  echo "uncompressed: $(du -sh "$stage" | cut -f1)"
} > "$stage/BUILDINFO"
tar -C "$stage" -cJf gpu-bin/bundle.tar.xz .
cp "$stage/BUILDINFO" gpu-bin/BUILDINFO
echo "archive: $(du -h gpu-bin/bundle.tar.xz | cut -f1)" >> gpu-bin/BUILDINFO
cat gpu-bin/BUILDINFO
