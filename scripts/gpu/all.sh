#!/usr/bin/env bash
# all.sh - ON the GPU machine: the device checks of issues 6, 7 and 12 in one call, the most
# important first, inside DEADLINE seconds (default 560; give the call timeout_s 600):
#   1. issue6-check.sh "tests bench torch" with tighter timeouts: every GPU test binary (op,
#      step, LAMB and feed tests), train-bench at 224 and 160 (+ the graph backward at 224),
#      PyTorch's channels-last runs, the ratios (at most 390 s by its timeouts, usually less);
#   1b. train-bench with two NCCL ranks (a clear refusal on a one-GPU machine; images/s and the
#      exposed all-reduce time where there are two GPUs; at most 90 s);
#   2. e2e-bench.sh at a reduced size (PER_CLASS 200, about 2 GiB of JPEGs; WARMUP 5 +
#      STEPS 30), its phase timeouts cut from what is left;
#   3. issue6-check.sh learn (the demo's short A3 run on the GPU) if 150 s are left.
# Then, with device time left, scripts/gpu/models.sh (issues 15 and 16: EfficientNet-B0,
# RegNetY-4GF and ViT-S against PyTorch, 6 runs of at most 75 s each).
# Needs gpu-bin/ (scripts/build-cuda.sh here; carry it). Everything goes to $OUT (./gpu-out):
# issue6.log, test-*.log, train-bench.jsonl, torch.txt, e2e-bench.log, results.jsonl.
set -u
cd "$(dirname "$0")/../.."
start=$(date +%s)
DEADLINE=${DEADLINE:-560}
left() { echo $((DEADLINE - ($(date +%s) - start))); }
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

T_TEST=45 T_BENCH=60 T_GRAPH=45 T_TORCH=90 TB_CONFIGS=channels_last \
  bash scripts/gpu/issue6-check.sh "tests bench torch"

. scripts/gpu/libs.sh
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "=== all.sh: issue 12, two ranks with NCCL ($gpus GPU(s) here: with one, the second rank must be refused with a clear message)"
timeout 90 "$BIN/train-bench" --model resnet50 --batch-size 64 --size 160 --steps 5 --warmup 2 \
  --device cuda --nproc-per-node 2 > "$OUT/dist-2.log" 2>&1
echo "exit code $?"
tail -8 "$OUT/dist-2.log"
sed -n "s/^\[rank 0\] \({.*}\)$/\1/p" "$OUT/dist-2.log" > "$OUT/dist.jsonl"

l=$(left)
echo "=== all.sh: ${l}s left for issue 7"
if [ "$l" -gt 90 ]; then
  # generation 15 %, sharding 10 %, our two runs 17 % each, timm's two 18 % each.
  PER_CLASS=${PER_CLASS:-200} STEPS=${STEPS:-30} WARMUP=${WARMUP:-5} \
    T_GEN=$((l * 15 / 100)) T_SHARD=$((l * 10 / 100)) T_OURS=$((l * 17 / 100)) \
    T_TIMM=$((l * 18 / 100)) bash scripts/gpu/e2e-bench.sh
else
  echo "=== all.sh: no time left for e2e-bench.sh"
fi
l=$(left)
if [ "$l" -gt 150 ]; then
  bash scripts/gpu/issue6-check.sh learn
fi
echo "=== all.sh done after $(($(date +%s) - start)) s"
