#!/usr/bin/env bash
# The project's tests, CPU only, as CI runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo not found: install Rust (rustup) first" >&2; exit 2; }
command -v tar >/dev/null || { echo "test: tar not found (apt-get install tar)" >&2; exit 2; }
cargo test --workspace --locked
