#!/usr/bin/env bash
# The project's tests, CPU only, as CI runs them. Ends with one summary line over all suites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v tar >/dev/null || { echo "test: tar not found (apt-get install tar)" >&2; exit 2; }
# One build, no incremental cache: CI builds from a fresh clone, and the cache only costs disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "tests: $(sum passed) passed, $(sum failed) failed"
exit "$status"
