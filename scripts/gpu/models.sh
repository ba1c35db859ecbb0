#!/usr/bin/env bash
# models.sh - ON the GPU machine, after all.sh: the device checks of issues 15 and 16. For each
# model, train-bench (our CUDA path, bf16, batch 256, 224 px) and PyTorch's step for timm's
# model (scripts/gpu/models_torch.py: bf16 autocast, channels_last convnets, sdpa attention) on
# the same GPU; one ratio line per model into $OUT/models.jsonl (images/s and peak memory of
# each side). Each run is cut at T_RUN seconds (default 75) so a hang costs little.
# Usage: bash scripts/gpu/models.sh [MODELS]   (default "efficientnet_b0 regnety_040
# vit_small_patch16_224"); BATCH (256), SIZE (224), STEPS (10), WARMUP (3). Needs gpu-bin/.
set -u
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
. scripts/gpu/libs.sh
models=${1:-efficientnet_b0 regnety_040 vit_small_patch16_224}
batch=${BATCH:-256} size=${SIZE:-224} steps=${STEPS:-10} warmup=${WARMUP:-3} t=${T_RUN:-75}
# Our train-bench on model $1, log to $OUT/models-$1-$2.log, extra arguments after: prints its
# last line (the JSON figures when it worked).
ours_run() {
  local m=$1 tag=$2
  shift 2
  timeout "$t" "$BIN/train-bench" --model "$m" --device cuda --batch-size "$batch" \
    --size "$size" --steps "$steps" --warmup "$warmup" "$@" 2> "$OUT/models-$m-$tag.log" | tail -1
  tail -3 "$OUT/models-$m-$tag.log" >&2
}
for m in $models; do
  echo "=== models.sh: $m (batch $batch, $size px)"
  ours=$(ours_run "$m" ours)
  echo "ours: $ours"
  if ! "$PY" -c 'import json,sys; json.loads(sys.argv[1])' "$ours" 2>/dev/null; then
    # The default backward (explicit for the convnets) failed: measure candle's graph instead,
    # and keep the failure's log for the fix.
    echo "=== models.sh: $m again with --backward graph"
    ours=$(ours_run "$m" ours-graph --backward graph)
    echo "ours, graph backward: $ours"
  fi
  theirs=$(MT_BATCH=$batch MT_SIZE=$size MT_STEPS=$steps MT_WARMUP=$warmup timeout "$t" \
    "$PY" scripts/gpu/models_torch.py "$m" 2> "$OUT/models-$m-torch.log" | tail -1)
  echo "torch (exit $?): $theirs"
  tail -3 "$OUT/models-$m-torch.log"
  "$PY" - "$ours" "$theirs" >> "$OUT/models.jsonl" <<'PY'
import json, sys
def parse(s):
    try:
        return json.loads(s)
    except Exception:
        return None
ours, theirs = parse(sys.argv[1]), parse(sys.argv[2])
line = {"bench": "models-vs-torch", "ours": ours, "torch": theirs}
if ours and theirs:
    line["model"] = ours["model"]
    line["ratio"] = ours["images_per_s"] / theirs["images_per_s"]
    if ours.get("peak_mem_bytes") and theirs.get("peak_mem_bytes"):
        line["memory_ratio"] = ours["peak_mem_bytes"] / theirs["peak_mem_bytes"]
print(json.dumps(line))
PY
  tail -1 "$OUT/models.jsonl"
done
