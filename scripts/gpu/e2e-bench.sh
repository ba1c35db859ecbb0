#!/usr/bin/env bash
# e2e-bench.sh - ON the GPU machine: end-to-end training throughput of our `train` and of timm
# on the same generated ImageNet-like images. No Rust, no network needed there.
#
# Run from anywhere: bash scripts/gpu/e2e-bench.sh. Needs gpu-bin/ (scripts/build-cuda.sh
# stages train, make-imagenet-like, shard-imagenet in gpu-bin/bundle.tar.xz; carry it:
# `carry: ["gpu-bin"]`) and /opt/torch/.venv (torch + timm). Phases, each under its own timeout:
#   1. make-imagenet-like: CLASSES x PER_CLASS JPEGs at ImageNet's mean size (about 180k pixels)
#      and, at quality 98, about ImageNet's mean file size (~100 KB; 3.5 GB by default), in
#      parallel on every core;
#   2. shard-imagenet: the same images as tar shards for our loader;
#   3. our train, A2 at 224 and A3 at 160 on cuda:0, batch BATCH, WARMUP + STEPS updates, a
#      metrics line per update (images_per_s, loader_wait_frac);
#   4. timm (scripts/gpu/timm_e2e.py): the same folder through timm's create_loader (WORKERS
#      worker processes, pinned memory, prefetcher, FastCollateMixup, RandAugment m7 / m6)
#      into resnet50 (bf16 autocast, channels_last, Lamb, BCE with target threshold 0.2).
# CPU utilisation comes from /proc/stat around each training phase (timm also reports it for
# its timed steps alone).
#
# Results: $OUT/results.jsonl (one JSON line per phase), logs and metrics under $OUT.
# Env: OUT (./e2e-out), BIN (the unpacked bundle, see libs.sh), WORK (data, /tmp/e2e-data),
# CLASSES (100), PER_CLASS (350), QUALITY (98), STEPS (60), WARMUP (10), BATCH (256),
# WORKERS (16), DEVICE (cuda:0), TRAIN_ARGS (more `train` flags), SKIP_TIMM=1, SKIP_OURS=1,
# T_GEN/T_SHARD/T_OURS/T_TIMM (timeouts in s). A CPU smoke test of the script itself:
#   BIN=target/debug DEVICE=cpu SKIP_TIMM=1 CLASSES=4 PER_CLASS=20 BATCH=8 STEPS=2 WARMUP=1 \
#   WORKERS=2 TRAIN_ARGS="--model resnet18 --size 32 --set data.test_size_px=32" \
#   bash scripts/gpu/e2e-bench.sh
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/e2e-out}
WORK=${WORK:-/tmp/e2e-data}
CLASSES=${CLASSES:-100}
PER_CLASS=${PER_CLASS:-350}
QUALITY=${QUALITY:-98}
STEPS=${STEPS:-60}
WARMUP=${WARMUP:-10}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-16}
DEVICE=${DEVICE:-cuda:0}
T_GEN=${T_GEN:-120}
T_SHARD=${T_SHARD:-60}
T_OURS=${T_OURS:-90}
T_TIMM=${T_TIMM:-75}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
exec > >(tee -a "$OUT/e2e-bench.log") 2>&1
echo "=== e2e-bench.sh $(date -u +%FT%TZ) host=$(hostname) cpus=$(nproc)"
# CUDA user-space libraries on LD_LIBRARY_PATH, $PY (the torch venv), $BIN (unpacked bundle).
. scripts/gpu/libs.sh
[ -f "$BIN/BUILDINFO" ] && sed 's/^/build: /' "$BIN/BUILDINFO"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ "${SKIP_OURS:-0}" = 1 ] || check_ldd "$BIN/train"

# One JSON line to $RESULTS from KEY=VALUE pairs (numbers stay numbers).
record() {
  "$PY" - "$@" <<'EOF' | tee -a "$RESULTS"
import json, sys
out = {}
for kv in sys.argv[1:]:
    k, _, v = kv.partition("=")
    try:
        out[k] = json.loads(v)
    except ValueError:
        out[k] = v
print(json.dumps(out))
EOF
}
jiffies() { head -1 /proc/stat | awk '{t=0; for (i=2;i<=NF;i++) t+=$i; print t, $5+$6}'; }
# cpu_busy T0 I0 T1 I1 -> share of all cores busy
cpu_busy() { awk -v t0="$1" -v i0="$2" -v t1="$3" -v i1="$4" 'BEGIN{d=t1-t0; if (d<=0) d=1; printf "%.4f", (d-(i1-i0))/d}'; }
phase_rc() { [ "$1" = 124 ] && echo timeout || echo "$1"; }

# 1. Images.
SRC="$WORK/folder"
if [ ! -d "$SRC/train" ]; then
  rm -rf "$SRC"
  t0=$(date +%s.%N)
  timeout "$T_GEN" "$BIN/make-imagenet-like" "$SRC" --classes "$CLASSES" --per-class "$PER_CLASS" \
    --val-per-class 2 --val-layout folders --quality "$QUALITY" --threads "$(nproc)"
  rc=$?
  t1=$(date +%s.%N)
  record phase=generate rc="\"$(phase_rc $rc)\"" seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')" \
    bytes="$(du -sb "$SRC" | cut -f1)" files="$(find "$SRC/train" -type f | wc -l)"
  [ $rc = 0 ] || { echo "generation failed"; exit 1; }
fi
echo "train JPEGs: $(find "$SRC/train" -type f | wc -l), $(du -sh "$SRC/train" | cut -f1)"

# 2. Shards.
SHARDS="$WORK/shards"
if [ ! -f "$SHARDS/manifest.json" ]; then
  t0=$(date +%s.%N)
  timeout "$T_SHARD" "$BIN/shard-imagenet" "$SRC" "$SHARDS" --threads "$(nproc)" -q
  rc=$?
  t1=$(date +%s.%N)
  record phase=shard rc="\"$(phase_rc $rc)\"" seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')" \
    bytes="$(du -sb "$SHARDS" | cut -f1)"
  [ $rc = 0 ] || { echo "sharding failed"; exit 1; }
fi

# Summary of a run's metrics lines after the warm-up: images over time, waiting over time.
summarise() { # RUN_DIR LABEL RC CPU_BUSY
  "$PY" - "$@" "$WARMUP" "$BATCH" <<'EOF' | tee -a "$RESULTS"
import json, os, sys, statistics
run, label, rc, busy, warmup, batch = sys.argv[1:7]
warmup, batch = int(warmup), int(batch)
lines = []
path = os.path.join(run, "metrics.jsonl")
if os.path.exists(path):
    for line in open(path):
        m = json.loads(line)
        if "images_per_s" in m and m["step"] > warmup:
            lines.append(m)
out = {"impl": "ours", "label": label, "rc": rc, "steps_timed": len(lines), "batch": batch,
       "cpu_busy_frac_phase": float(busy), "cpu_cores_busy_phase": float(busy) * os.cpu_count()}
if lines:
    # One line per update of `batch` images: its window is batch / images_per_s.
    dts = [batch / m["images_per_s"] for m in lines]
    waits = [m["data_wait_s"] for m in lines]
    out.update({
        "images_per_s": batch * len(lines) / sum(dts),
        "loader_wait_frac": sum(waits) / sum(dts),
        "median_step_images_per_s": statistics.median(m["images_per_s"] for m in lines),
        "median_step_loader_wait_frac": statistics.median(m["loader_wait_frac"] for m in lines),
        "wall_s_timed": sum(dts),
    })
print(json.dumps(out))
EOF
}

# 3. Our trainer.
ours() { # LABEL PRESET
  # The run directory (checkpoints of hundreds of MB) stays out of $OUT; its metrics are copied.
  local label=$1 preset=$2 run="$WORK/runs/ours-$1"
  rm -rf "$run"
  local samples=$(((WARMUP + STEPS) * BATCH))
  local a b
  a=$(jiffies)
  timeout "$T_OURS" "$BIN/train" --recipe "$preset" --data "$SHARDS" --out "$run" --device "$DEVICE" \
    --epochs 1 --batch-size "$BATCH" --micro-batch "$BATCH" --workers "$WORKERS" \
    --train-samples "$samples" --val-samples "$BATCH" --no-bar \
    --set schedule.warmup_epochs=0 --set run.log_every_steps=1 ${TRAIN_ARGS:-} \
    > "$OUT/ours-$label.log" 2>&1
  local rc=$?
  b=$(jiffies)
  tail -5 "$OUT/ours-$label.log"
  cp "$run/metrics.jsonl" "$OUT/ours-$label.metrics.jsonl" 2>/dev/null
  # shellcheck disable=SC2086
  summarise "$run" "$label" "$(phase_rc $rc)" "$(cpu_busy $a $b)"
}
if [ "${SKIP_OURS:-0}" != 1 ]; then
  ours a2-224 a2
  ours a3-160 a3
fi

# 4. timm on the same images.
timm_run() { # LABEL SIZE AA
  local a b rc
  a=$(jiffies)
  timeout "$T_TIMM" "$PY" "$ROOT/scripts/gpu/timm_e2e.py" --data "$SRC" --label "$1" --size "$2" \
    --aa "$3" --batch "$BATCH" --workers "$WORKERS" --steps "$STEPS" --warmup "$WARMUP" \
    > "$OUT/timm-$1.json" 2> "$OUT/timm-$1.log"
  rc=$?
  b=$(jiffies)
  tail -3 "$OUT/timm-$1.log"
  if [ -s "$OUT/timm-$1.json" ]; then
    "$PY" -c 'import json,sys; m=json.loads(open(sys.argv[1]).read()); m["rc"]=sys.argv[2]; m["cpu_busy_frac_phase"]=float(sys.argv[3]); print(json.dumps(m))' \
      "$OUT/timm-$1.json" "$(phase_rc $rc)" "$(cpu_busy $a $b)" | tee -a "$RESULTS"
  else
    record impl=timm label="$1" rc="\"$(phase_rc $rc)\"" cpu_busy_frac_phase="$(cpu_busy $a $b)"
  fi
}
if [ "${SKIP_TIMM:-0}" != 1 ]; then
  timm_run a2-224 224 rand-m7-mstd0.5-inc1
  timm_run a3-160 160 rand-m6-mstd0.5-inc1
fi
echo "=== done $(date -u +%FT%TZ); results in $RESULTS"
cat "$RESULTS"
