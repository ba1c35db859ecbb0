#!/usr/bin/env bash
# Transfer learning on real data, as a benchmark (not a test): pre-train on one half of
# Fashion-MNIST, fine-tune on a small part of the other half, and compare with training from
# scratch on the same data with the same budget.
#
#   pre-training set  "tops":  classes 0-4 (T-shirt/top, trouser, pullover, dress, coat),
#                              every train image (30,000), its 5,000 test images as val
#   fine-tuning set   "rest":  classes 5-9 (sandal, shirt, sneaker, bag, ankle boot),
#                              FT_PER_CLASS train images per class, all 5,000 test images as val
#
# Runs on "rest", all with the same recipe, epochs and batches; only the start differs:
#   scratch        timm's random init
#   fine-tune      --init-from the "tops" checkpoint (its 5-class classifier replaced: new classes)
#   bn-reestimate  the same, BatchNorm statistics re-estimated on 8 batches first
#   trunk-0.1      the same, the trunk at 0.1 x the classifier's rate
#   frozen-2       the same, the trunk frozen for the first 2 epochs
#   ft-preset      --recipe ft (SGD, DeiT's fine-tuning values) from the same checkpoint
# The recipe ("light A3"): A3 at 32 px without RandAugment and Mixup/CutMix (28-pixel images),
# LAMB 5e-3 unscaled, per-step cosine, 1 warmup epoch; evaluation after every epoch.
#
# Prints one JSON line per run (final and best top-1) and writes, under OUT (default
# benches/runs/<date>-transfer): the runs' metrics.jsonl, curves.png (all runs overlaid) and
# summary.jsonl. Needs data/fashion-mnist/folder (scripts/fashion-mnist.sh).
#
# Usage: scripts/bench-transfer.sh [OUT]
#   PRE_EPOCHS (3), FT_EPOCHS (20), FT_PER_CLASS (200), BATCH (64), MICRO (32) from the
#   environment.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benches/runs/$(date +%F)-transfer}
pre_epochs=${PRE_EPOCHS:-3}
ft_epochs=${FT_EPOCHS:-20}
per_class=${FT_PER_CLASS:-200}
batch=${BATCH:-64}
micro=${MICRO:-32}
src=data/fashion-mnist/folder
work=data/transfer-bench

if [ ! -f "$src/LOC_synset_mapping.txt" ]; then
  echo "bench-transfer: $src is missing; run scripts/fashion-mnist.sh first" >&2
  exit 2
fi
scripts/setup.sh >&2
cargo build --release --locked -p tools --bin train --bin shard-imagenet --bin plot-metrics >&2
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

# subset NAME FIRST_CLASS LAST_CLASS TRAIN_PER_CLASS(0 = all): hard links into an ImageNet folder.
subset() {
  local name=$1 first=$2 last=$3 limit=$4 dir=$work/$1/folder
  rm -rf "$work/$name"
  mkdir -p "$dir"
  : >"$dir/LOC_synset_mapping.txt"
  for c in $(seq "$first" "$last"); do
    local cls
    cls=$(sed -n "$((c + 1))p" "$src/LOC_synset_mapping.txt")
    echo "$cls" >>"$dir/LOC_synset_mapping.txt"
    local wnid=${cls%% *}
    mkdir -p "$dir/train/$wnid" "$dir/val/$wnid"
    local files=("$src/train/$wnid"/*) # sorted by name
    [ "$limit" = 0 ] || files=("${files[@]:0:$limit}")
    ln "${files[@]}" "$dir/train/$wnid/"
    ln "$src/val/$wnid"/* "$dir/val/$wnid/"
  done
  "$bin/shard-imagenet" "$dir" "$work/$name/shards" --quiet >&2
}
subset tops 0 4 0
subset rest 5 9 "$per_class"

light=(--size 32 --set data.test_size_px=32 --batch-size "$batch" --micro-batch "$micro"
  --set 'augment.rand_augment=""' --set augment.mixup_alpha=0 --set augment.cutmix_alpha=0
  --set schedule.warmup_epochs=1 --set schedule.per_step=true --set run.eval_every_epochs=1
  --model resnet18 --no-bar)
lamb=(--recipe a3 --set 'optim.lr_scaling="none"' --set optim.lr=0.005)

rm -rf "$out"
mkdir -p "$out"
t0=$(date +%s)
"$bin/train" "${lamb[@]}" "${light[@]}" --data "$work/tops/shards" --out "$out/pretrain" \
  --epochs "$pre_epochs" >&2
t_pre=$(($(date +%s) - t0))
ckpt=$out/pretrain/checkpoints/$(cat "$out/pretrain/checkpoints/latest").safetensors

run() { # NAME ARGS...
  local name=$1
  shift
  local t=$(date +%s)
  "$bin/train" "$@" "${light[@]}" --data "$work/rest/shards" --out "$out/$name" \
    --epochs "$ft_epochs" >&2
  echo $(($(date +%s) - t)) >"$out/$name/wall_s"
}
run scratch "${lamb[@]}"
run fine-tune "${lamb[@]}" --init-from "$ckpt"
run bn-reestimate "${lamb[@]}" --init-from "$ckpt" --bn-reestimate-batches 8
run trunk-0.1 "${lamb[@]}" --init-from "$ckpt" --trunk-lr-scale 0.1
run frozen-2 "${lamb[@]}" --init-from "$ckpt" --freeze-trunk-epochs 2
run ft-preset --recipe ft --init-from "$ckpt"

"$bin/plot-metrics" "$out/scratch" "$out/fine-tune" "$out/bn-reestimate" "$out/trunk-0.1" \
  "$out/frozen-2" "$out/ft-preset" --out "$out/curves.png" >&2
# Keep the figures, not the weights.
rm -rf "$out"/*/checkpoints

python3 - "$out" "$t_pre" "$per_class" "$ft_epochs" "$pre_epochs" <<'EOF' | tee "$out/summary.jsonl"
import json, pathlib, sys
out, t_pre, per_class, ft_epochs, pre_epochs = sys.argv[1], *map(int, sys.argv[2:])
def evals(run):
    lines = [json.loads(l) for l in open(pathlib.Path(out, run, "metrics.jsonl")) if l.strip()]
    return [l for l in lines if "top1" in l]
pre = evals("pretrain")
print(json.dumps({"run": "pretrain", "data": "fashion-mnist classes 0-4, 30000 train",
                  "epochs": pre_epochs, "top1": pre[-1]["top1"], "wall_s": t_pre}))
for run in ["scratch", "fine-tune", "bn-reestimate", "trunk-0.1", "frozen-2", "ft-preset"]:
    e = evals(run)
    print(json.dumps({
        "run": run, "data": f"fashion-mnist classes 5-9, {per_class} train per class",
        "epochs": ft_epochs, "top1_first_epoch": e[0]["top1"], "top1": e[-1]["top1"],
        "best_top1": max(x["top1"] for x in e),
        "wall_s": int(pathlib.Path(out, run, "wall_s").read_text())}))
EOF
