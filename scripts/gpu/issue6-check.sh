#!/usr/bin/env bash
# issue6-check.sh - run ON the GPU machine (one H100), from the repository root:
#   bash scripts/gpu/issue6-check.sh [PHASES]     (default "tests bench torch"; also "learn")
# Needs gpu-bin/ from scripts/build-cuda.sh (carry it: `carry: ["gpu-bin"]`). About 5 minutes,
# at most 580 s by its timeouts (3 test binaries x T_TEST 50, T_BENCH 90 x 2 + T_GRAPH 70,
# T_TORCH 180; all from the environment, and TB_CONFIGS goes to torch_baseline.py):
#   1. the CUDA op tests and the GPU-vs-CPU training-step test (prebuilt test binaries);
#   2. train-bench: ResNet-50, batch 256, 224 and 160 px, with the per-op breakdown (explicit
#      backward, the default), then 224 px with candle's graph backward for comparison;
#   3. the PyTorch + timm anchor on the same GPU (scripts/gpu/torch_baseline.py);
#   4. the ratio of the two, as JSON lines;
#   learn (separately, about 2 minutes): the README demo's shortened A3 run (generated 10-class
#   set, resnet18 at 48 px, 6 epochs) on cuda:0, to compare its top-1 with the CPU run's 84.5 %.
# Everything is logged to $OUT (or ./gpu-out).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/issue6.log") 2>&1
. scripts/gpu/libs.sh
PHASES=${1:-"tests bench torch"}
has() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
echo "=== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
cat "$BIN/BUILDINFO" 2>/dev/null
check_ldd "$BIN/train-bench"

if has tests; then
echo "=== op tests (GPU vs CPU references)"
for t in "$BIN"/tests/*; do
  [ -x "$t" ] || continue
  echo "--- $t"
  timeout "${T_TEST:-50}" "$t" --test-threads 1 --nocapture > "$OUT/test-$(basename "$t").log" 2>&1
  rc=$?
  grep -vE '^\s*$' "$OUT/test-$(basename "$t").log" | tail -60
  echo "exit code $rc$([ $rc = 124 ] && echo ' (TIMEOUT)')"
done
fi

if has bench; then
echo "=== train-bench (ours)"
for size in 224 160; do
  timeout "${T_BENCH:-90}" "$BIN/train-bench" --model resnet50 --batch-size 256 --size $size --steps 20 \
    --warmup 3 --device cuda:0 --breakdown | tee -a "$OUT/train-bench.jsonl"
  echo "exit code ${PIPESTATUS[0]}"
done
timeout "${T_GRAPH:-70}" "$BIN/train-bench" --model resnet50 --batch-size 256 --size 224 --steps 10 \
  --warmup 2 --device cuda:0 --backward graph | tee -a "$OUT/train-bench.jsonl"
echo "exit code ${PIPESTATUS[0]}"

fi

if has torch; then
echo "=== PyTorch + timm anchor (same GPU)"
TB_STEPS=20 TB_WARMUP=5 timeout "${T_TORCH:-180}" "$PY" scripts/gpu/torch_baseline.py | tee "$OUT/torch.txt"

fi

if has bench && has torch; then
echo "=== ratio"
"$PY" - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
ours, graph = {}, {}
for line in open(f"{out}/train-bench.jsonl"):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        (graph if r.get("backward") == "graph" else ours)[r["size"]] = r
        # What ran (GPU, driver, NVRTC, cuDNN; kernels as machine code or PTX), and whether the
        # cuDNN choices came from the start-up cache (every run after the first should say so).
        print(json.dumps({"size": r["size"], "backward": r.get("backward"),
                          "warmup_s": round(r.get("warmup_s", 0), 2), "cuda": r.get("cuda"),
                          "cudnn_plans": r.get("cudnn_plans"), "kernels": r.get("kernels")}))
for size, g in graph.items():
    if size in ours:
        print(json.dumps({
            "size": size, "explicit_images_per_s": round(ours[size]["images_per_s"], 1),
            "graph_images_per_s": round(g["images_per_s"], 1),
            "explicit_over_graph": round(ours[size]["images_per_s"] / g["images_per_s"], 3),
            "explicit_peak_gib": round((ours[size].get("peak_mem_bytes") or 0) / 2**30, 2),
            "graph_peak_gib": round((g.get("peak_mem_bytes") or 0) / 2**30, 2),
        }))
torch = {}
for line in open(f"{out}/torch.txt"):
    m = re.search(r"torch bf16-autocast channels_last: batch 256 (\d+)px: (\d+) img/s.*peak mem ([\d.]+) GiB", line)
    if m:
        torch[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
for size in (224, 160):
    if size in ours and size in torch:
        o = ours[size]
        t_ips, t_mem = torch[size]
        print(json.dumps({
            "size": size, "ours_images_per_s": round(o["images_per_s"], 1),
            "torch_images_per_s": t_ips, "ratio": round(o["images_per_s"] / t_ips, 3),
            "ours_peak_gib": round((o.get("peak_mem_bytes") or 0) / 2**30, 2),
            "torch_peak_gib": t_mem,
        }))
PY
fi

if has learn; then
  echo "=== learn: the demo's shortened A3 run on cuda:0 (CPU: 84.5 % top-1)"
  d=/tmp/rsb-learn
  rm -rf "$d" && mkdir -p "$d"
  "$BIN/make-imagenet-like" "$d/imagenet-like" --classes 10 --per-class 100 --seed 0 --oddities &&
    "$BIN/shard-imagenet" "$d/imagenet-like" "$d/shards" --allow-skips --shard-bytes 16000000 >/dev/null &&
    timeout 150 "$BIN/train" --recipe a3 --data "$d/shards" --out "$d/run" --model resnet18 \
      --epochs 6 --batch-size 64 --micro-batch 32 --size 48 --device cuda:0 \
      --set data.test_size_px=48 --set schedule.warmup_epochs=1 \
      --set 'optim.lr_scaling="none"' --set optim.lr=0.005 --set run.eval_every_epochs=2 \
      --no-bar | tee "$OUT/learn-summary.json"
  cp "$d/run/metrics.jsonl" "$OUT/learn-metrics.jsonl" 2>/dev/null
fi
echo "=== done $(date -u +%FT%TZ)"
