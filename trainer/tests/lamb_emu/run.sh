#!/usr/bin/env bash
# Runs the CUDA LAMB kernels on the CPU (no GPU, no CUDA toolkit: g++ >= 11 and python3) and
# compares them with the CPU `Lamb`:
#   bash trainer/tests/lamb_emu/run.sh [OUT_DIR]
# then (run.sh does it) LAMB_EMU_DIR=OUT_DIR cargo test --release -p trainer --test lamb_emu -- --nocapture
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out="$(mkdir -p "${1:-/tmp/lamb-emu}" && cd "${1:-/tmp/lamb-emu}" && pwd)"
python3 - "$repo" "$out/kernels.cu" <<'PY'
import sys
repo, dst = sys.argv[1], sys.argv[2]
lamb = open(f"{repo}/trainer/src/cuda/lamb.rs").read()
kern = open(f"{repo}/trainer/src/cuda/kernels.rs").read()
source = lamb.split('source: r#"', 1)[1].split('"#,', 1)[0]
prelude = kern.split('pub const PRELUDE: &str = r#"', 1)[1].split('"#;', 1)[0]
open(dst, "w").write(prelude + "\n" + source)
PY
g++ -std=c++20 -O1 -ffp-contract=off -pthread -I"$here" -I"$out" "$here/harness.cpp" -o "$out/harness"
for cfg in 0 1 2; do
  mkdir -p "$out/cfg$cfg"
  (cd "$out/cfg$cfg" && "$out/harness" "$cfg")
done
cd "$repo"
LAMB_EMU_DIR="$out" cargo test --release -p trainer --test lamb_emu -- --nocapture
