#!/usr/bin/env bash
# Fashion-MNIST (70,000 28x28 greyscale images, 10 classes), a small real data set that Debian
# ships: downloads the dataset-fashion-mnist package with apt-get (without installing it),
# extracts it, converts the IDX files to an ImageNet-style folder and shards that.
# Usage: scripts/fashion-mnist.sh [OUT_DIR [IMPORT_OPTIONS...]]
#   OUT_DIR defaults to data/fashion-mnist; IMPORT_OPTIONS go to import-fashion-mnist, e.g.
#   --upscale 32 or --limit-per-class 100. PROFILE=dev builds unoptimised binaries (faster build).
# Output: OUT_DIR/deb (the package and its extracted files), OUT_DIR/folder, OUT_DIR/shards.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/fashion-mnist}
shift || true
profile=${PROFILE:-release}

scripts/setup.sh
cargo build --profile "$profile" --locked -p tools --bin import-fashion-mnist --bin shard-imagenet
bin=${CARGO_TARGET_DIR:-$PWD/target}/$([ "$profile" = dev ] && echo debug || echo "$profile")

deb=$out/deb
mkdir -p "$deb"
if ! ls "$deb"/dataset-fashion-mnist_*.deb >/dev/null 2>&1; then
  if ! (cd "$deb" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); then
    apt-get update >/dev/null
    (cd "$deb" && apt-get download dataset-fashion-mnist >/dev/null)
  fi
fi
rm -rf "$deb/x"
dpkg-deb -x "$deb"/dataset-fashion-mnist_*.deb "$deb/x"

rm -rf "$out/folder" "$out/shards"
"$bin/import-fashion-mnist" "$deb/x/usr/share/datasets/fashion-mnist" "$out/folder" "$@"
"$bin/shard-imagenet" "$out/folder" "$out/shards"
"$bin/shard-imagenet" verify "$out/shards"
