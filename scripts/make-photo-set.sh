#!/usr/bin/env bash
# The realistic benchmark set: crops of real photographs that Debian ships (demo photos of
# kphotoalbum, nature wallpapers of mate-backgrounds and lomiri-wallpapers), cut to
# ImageNet-like 500x375 JPEGs (quality 95, 4:2:0) and sharded.
# Usage: scripts/make-photo-set.sh [OUT_DIR] [TRAIN_IMAGES] [VAL_IMAGES]
# (default: data/photos 5000 500). Needs apt-get (Debian) and a writable temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/photos}
train=${2:-5000}
val=${3:-500}

scripts/setup.sh
cargo build --release --locked -p tools
bin=$PWD/target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

packages=(kphotoalbum mate-backgrounds lomiri-wallpapers-16.04)
if ! (cd "$work" && apt-get download "${packages[@]}" >/dev/null 2>&1); then
  apt-get update >/dev/null
  (cd "$work" && apt-get download "${packages[@]}" >/dev/null)
fi
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
share=$work/x/usr/share
# Photographs only: not the screenshots in kphotoalbum's manual, nor the abstract wallpapers.
photos=("$share/kphotoalbum/demo" "$share/backgrounds/mate/nature")
for f in "$share"/backgrounds/*.jpg; do photos+=("$f"); done

rm -rf "$out"
mkdir -p "$out"
"$bin/make-photo-set" "$out/folder" "${photos[@]}" --train-images "$train" --val-images "$val" \
  --min-short-side 500 | grep -v '^not used'
"$bin/shard-imagenet" "$out/folder" "$out/shards"
