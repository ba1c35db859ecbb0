#!/usr/bin/env bash
# The main job on the embedded default data set, on a fresh machine:
# build, generate an ImageNet-like folder (10 classes, with ImageNet's oddities), shard it, verify.
# Usage: scripts/demo.sh [OUT_DIR]   (default: data/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/demo}

scripts/setup.sh
cargo build --release --locked -p tools
bin=target/release

rm -rf "$out"
mkdir -p "$out"
"$bin/make-imagenet-like" "$out/imagenet-like" --classes 10 --per-class 100 --seed 0 --oddities
# The generated set contains one truncated JPEG on purpose: it is listed in report.json and
# skipped; --allow-skips accepts that.
"$bin/shard-imagenet" "$out/imagenet-like" "$out/shards" --allow-skips --shard-bytes 16000000
"$bin/shard-imagenet" verify "$out/shards"
echo "shards: $out/shards (manifest.json, report.json, train/, val/)"
