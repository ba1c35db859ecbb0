#!/usr/bin/env bash
# transfer.sh - fine-tune a pretrained ResNet on one of the paper's transfer data sets (Table 5),
# from the files as their authors distribute them to the curves of the fine-tuning run:
#
#   1. recognise the data set in DATASET_DIR (CIFAR-10, CIFAR-100, Flowers-102, Stanford Cars or
#      iNaturalist 2019; the directory itself or its only sub-directory);
#   2. `import-dataset KIND DATASET_DIR OUT/folder` (an ImageNet-style folder; labels checked);
#   3. `shard-imagenet OUT/folder OUT/shards`;
#   4. `train --recipe ft --init-from WEIGHTS --data OUT/shards --out OUT/run` (the `ft` preset:
#      DeiT's fine-tuning values, see the README; the classifier is replaced for the new classes);
#   5. `plot-metrics OUT/run` (OUT/run/plot.png).
#
# Usage: scripts/transfer.sh DATASET_DIR [TRAIN_ARGS...]
#   WEIGHTS  the pretrained weights (required): a checkpoint of ours (.safetensors) or timm's
#            .pth / .safetensors for the same network (e.g. resnet50_a1_0-14fe96d1.pth)
#   OUT      output directory (default data/transfer/KIND)
#   KIND     skip the recognition: cifar10, cifar100, flowers102, stanford-cars or inat2019
#   IMPORT_ARGS  extra arguments of import-dataset (e.g. "--cifar100-labels coarse")
#   BIN      directory of built binaries (default: build them with cargo, release profile)
#   TRAIN_ARGS go to train (any flag but --recipe, --init-from, --data and --out, which the
#            script sets): e.g. --device cuda:0, --epochs 100, --trunk-lr-scale 0.1,
#            --freeze-trunk-epochs 2, --bn-reestimate-batches 50, --set key=value. A rerun with the same OUT re-imports and starts a new run; add
#            --resume (and keep OUT/run) to continue an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 1 ] || usage
case $1 in -h | --help) usage ;; esac
src=$1
shift
[ -d "$src" ] || { echo "transfer.sh: $src: not a directory" >&2; exit 2; }
weights=${WEIGHTS:-}
[ -n "$weights" ] || { echo "transfer.sh: set WEIGHTS to the pretrained weights (.safetensors or .pth)" >&2; exit 2; }
[ -f "$weights" ] || { echo "transfer.sh: WEIGHTS=$weights: no such file" >&2; exit 2; }

# kind_of DIR: the data set whose files DIR holds, or nothing.
kind_of() {
  local d=$1
  if [ -f "$d/train2019.json" ]; then echo inat2019
  elif [ -f "$d/imagelabels.mat" ] && [ -f "$d/setid.mat" ]; then echo flowers102
  elif [ -f "$d/cars_annos.mat" ] || [ -f "$d/devkit/cars_meta.mat" ] || [ -f "$d/cars_meta.mat" ]; then echo stanford-cars
  elif [ -f "$d/data_batch_1" ] || [ -f "$d/data_batch_1.bin" ]; then echo cifar10
  elif { [ -f "$d/train" ] && [ -f "$d/meta" ]; } || [ -f "$d/train.bin" ]; then echo cifar100
  fi
}
kind=${KIND:-$(kind_of "$src")}
if [ -z "$kind" ]; then
  subdirs=("$src"/*/)
  if [ ${#subdirs[@]} -eq 1 ] && [ -d "${subdirs[0]}" ]; then
    kind=$(kind_of "${subdirs[0]}")
    [ -z "$kind" ] || src=${subdirs[0]%/}
  fi
fi
if [ -z "$kind" ]; then
  cat >&2 <<EOF
transfer.sh: $src: no known data set found. Expected one of
  CIFAR-10     data_batch_1..5 and test_batch (Python version) or data_batch_*.bin (binary)
  CIFAR-100    train, test, meta (Python version) or train.bin, test.bin (binary)
  Flowers-102  jpg/, imagelabels.mat, setid.mat
  Stanford Cars  cars_train/, cars_test/, devkit/cars_meta.mat ... or car_ims/ + cars_annos.mat
  iNaturalist 2019  train2019.json, val2019.json and the image tree
(or set KIND).
EOF
  exit 2
fi
out=${OUT:-data/transfer/$kind}
echo "transfer.sh: $kind in $src -> $out" >&2

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  scripts/setup.sh >&2
  cargo build --release --locked -p tools --bin import-dataset --bin shard-imagenet --bin train \
    --bin plot-metrics >&2
  bin=${CARGO_TARGET_DIR:-$PWD/target}/release
fi

rm -rf "$out/folder" "$out/shards"
# shellcheck disable=SC2086 # IMPORT_ARGS is a list of words
"$bin/import-dataset" "$kind" "$src" "$out/folder" ${IMPORT_ARGS:-}
"$bin/shard-imagenet" "$out/folder" "$out/shards"
"$bin/train" --recipe ft --init-from "$weights" --data "$out/shards" --out "$out/run" "$@"
"$bin/plot-metrics" "$out/run"
echo "transfer.sh: done; metrics in $out/run/metrics.jsonl, curves in $out/run/plot.png" >&2
