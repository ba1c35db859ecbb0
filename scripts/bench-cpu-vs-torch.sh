#!/usr/bin/env bash
# Our CPU training step and evaluation forward against PyTorch's, in the same run: one JSON line
# per (model, size) with ours_images_per_s, torch_images_per_s, ratio (training) and the same for
# evaluation (ours_eval_images_per_s, torch_eval_images_per_s, eval_ratio), plus how many cores
# each kept busy.
#
# Ours: `train-bench --device cpu` (the fast path: channels-last f32 through trainer::ops::cpu,
# the explicit backward, BCE + LAMB of the A1 recipe; `--eval` for the evaluation forward).
# PyTorch: benches/torch/cpu_step.py (timm's model, cross-entropy + SGD, NCHW, default threads).
# The first run installs torch 2.5.1 and timm 0.5.4 (PyPI's CUDA wheel, it runs on the CPU;
# about 5 GB) into .venv-torch (TORCH_VENV to put it elsewhere).
#
# Usage: scripts/bench-cpu-vs-torch.sh [MODELS [SIZES]]
#   MODELS defaults to "resnet18 resnet50", SIZES to "64 128 224";
#   BATCH (16), STEPS (4 timed), WARMUP (1) from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
models=${1:-resnet18 resnet50}
sizes=${2:-64 128 224}
batch=${BATCH:-16}
steps=${STEPS:-4}
warmup=${WARMUP:-1}
venv=${TORCH_VENV:-.venv-torch}

if ! "$venv/bin/python" -c "import torch, timm" 2>/dev/null; then
  echo "installing torch 2.5.1 and timm 0.5.4 into $venv (first run)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.5.1 timm==0.5.4 "numpy<2" >&2
fi
scripts/setup.sh >&2
cargo build --release --locked -p tools --bin train-bench >&2
bench=${CARGO_TARGET_DIR:-$PWD/target}/release/train-bench

for model in $models; do
  for size in $sizes; do
    common=(--device cpu --model "$model" --size "$size" --batch-size "$batch"
            --steps "$steps" --warmup "$warmup")
    ours_train=$("$bench" "${common[@]}")
    ours_eval=$("$bench" "${common[@]}" --eval)
    theirs=$("$venv/bin/python" benches/torch/cpu_step.py --model "$model" --size "$size" \
             --batch-size "$batch" --steps "$steps" --warmup "$warmup")
    python3 - "$ours_train" "$ours_eval" "$theirs" <<'PY'
import json, sys
train, ev, torch = (json.loads(a) for a in sys.argv[1:4])
print(json.dumps({
    "bench": "cpu-vs-torch", "model": train["model"], "size": train["size"],
    "batch_size": train["batch_size"], "steps": train["steps"],
    "ours_images_per_s": train["images_per_s"],
    "torch_images_per_s": torch["train_images_per_s"],
    "ratio": train["images_per_s"] / torch["train_images_per_s"],
    "ours_eval_images_per_s": ev["images_per_s"],
    "torch_eval_images_per_s": torch["eval_images_per_s"],
    "eval_ratio": ev["images_per_s"] / torch["eval_images_per_s"],
    "ours_cpu_busy_cores": train["cpu_busy_cores"],
    "torch_cpu_busy_cores": torch["train_cpu_busy_cores"],
    "ours_eval_cpu_busy_cores": ev["cpu_busy_cores"],
    "torch_eval_cpu_busy_cores": torch["eval_cpu_busy_cores"],
    "cores": train["cores"], "torch": torch["torch"], "timm": torch["timm"],
    "git_rev": train["git_rev"],
}))
PY
  done
done
