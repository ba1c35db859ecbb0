#!/usr/bin/env bash
# What building needs beyond Rust: cmake and nasm, to build libjpeg-turbo (with its SIMD code)
# from source for the loader's JPEG decoding, and g++, with which the kernel emulation tests run
# the CUDA kernels' source on the CPU. Installs them with apt-get when missing.
set -euo pipefail
missing=()
for tool in cmake nasm g++; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (needed to build libjpeg-turbo and run the kernel tests)" >&2
    exit 2
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 2; }
