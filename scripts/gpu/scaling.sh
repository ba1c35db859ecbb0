#!/usr/bin/env bash
# scaling.sh - ON a multi-GPU machine: data-parallel scaling of the training step.
#   bash scripts/gpu/scaling.sh            (needs gpu-bin/ from scripts/build-cuda.sh, NCCL inside)
# For N in 1 2 4 8 (up to the GPUs present): train-bench with --nproc-per-node N (one process
# per GPU, NCCL all-reduce of the gradients), ResNet-50 bf16, batch 256 per GPU, at 224 px.
# Prints one JSON line per N (images/s over all GPUs, per GPU, the all-reduce time per step that
# the backward does not hide) and a final line with the scaling efficiency
#   efficiency(N) = images_per_s(N) / (N * images_per_s(1)).
# Goal (issue 12): at least 0.90 at 8 GPUs (PyTorch DDP reaches about that on one 8-GPU node).
# Env: OUT (./gpu-out), SIZE (224), BATCH (256), STEPS (20), WARMUP (3), T_RUN (240 s per N).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
. scripts/gpu/libs.sh
SIZE=${SIZE:-224}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "=== scaling.sh $(date -u +%FT%TZ): $gpus GPU(s)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
check_ldd "$BIN/train-bench"
res="$OUT/scaling.jsonl"
: > "$res"
for n in 1 2 4 8; do
  [ "$n" -le "$gpus" ] || break
  echo "--- $n GPU(s)"
  timeout "${T_RUN:-240}" "$BIN/train-bench" --model resnet50 --batch-size "$BATCH" --size "$SIZE" \
    --steps "$STEPS" --warmup "$WARMUP" --device cuda:0 --nproc-per-node "$n" 2>"$OUT/scaling-$n.log" \
    | sed -n 's/^\(\[rank 0\] \)\{0,1\}\({.*}\)$/\2/p' | tee -a "$res"
  echo "exit code ${PIPESTATUS[0]} (log: $OUT/scaling-$n.log)"
done
"$PY" - "$res" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[r["world_size"]] = r
if 1 not in runs:
    print(json.dumps({"error": "no one-GPU run"}))
    sys.exit(0)
one = runs[1]["images_per_s"]
for n, r in sorted(runs.items()):
    print(json.dumps({
        "gpus": n, "images_per_s": round(r["images_per_s"], 1),
        "images_per_s_per_gpu": round(r["images_per_s_per_gpu"], 1),
        "efficiency": round(r["images_per_s"] / (n * one), 3),
        "allreduce_exposed_ms": r.get("allreduce_exposed_ms"),
    }))
PY
[ "$gpus" -ge 2 ] || echo "=== only $gpus GPU here: no scaling figure (the script is ready for a multi-GPU machine)"
