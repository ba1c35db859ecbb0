#!/usr/bin/env bash
# Coverage-guided fuzzing of one parser or decoder with AFL++ (cargo afl).
#
#   scripts/fuzz.sh list                 the targets (tools/src/fuzz_targets.rs)
#   scripts/fuzz.sh TARGET SECONDS       build fuzz/ with cargo afl, fuzz TARGET for SECONDS,
#                                        print one JSON line of results (from fuzzer_stats)
#   scripts/fuzz.sh tmin TARGET FILE OUT minimise a finding (then commit OUT under
#                                        fuzz/regressions/TARGET/)
#
# Seeds: fuzz/corpus/TARGET/. Output: fuzz/out/TARGET/default/{queue,crashes,hangs,fuzzer_stats}
# (git-ignored). A crash is a panic, an abort or an allocation over 1 GiB (the harness's
# allocator limit); a hang is an input that runs over the timeout (AFL_TIMEOUT_MS, default 2000).
# Needs `cargo install cargo-afl` (cargo afl config --build runs once per toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets() { sed -n '/^pub const TARGETS/,/^];/p' tools/src/fuzz_targets.rs | grep -o '("[a-z_]*"' | tr -d '("'; }

case "${1:-}" in
  list) targets; exit 0 ;;
  ""|-h|--help) sed -n '2,15p' "$0"; exit 2 ;;
esac

# FUZZ_NO_BUILD=1: use fuzz/target/release/rsb-fuzz as it is (runs in a row after one build).
build() { [ -n "${FUZZ_NO_BUILD:-}" ] || (cd fuzz && cargo afl build --release --quiet); }
bin=$root/fuzz/target/release/rsb-fuzz
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1

if [ "$1" = tmin ]; then
  [ $# -eq 4 ] || { echo "usage: $0 tmin TARGET FILE OUT" >&2; exit 2; }
  build
  FUZZ_TARGET=$2 cargo afl tmin -i "$3" -o "$4" -- "$bin"
  exit 0
fi

target=$1 seconds=${2:?usage: $0 TARGET SECONDS}
targets | grep -qx "$target" || { echo "unknown target $target; scripts/fuzz.sh list" >&2; exit 2; }
build
out=fuzz/out/$target
rm -rf "$out"
mkdir -p "$out"
# -t: per-input timeout (ms); -m none: the harness's allocator limit (1 GiB per allocation)
# bounds memory, an address-space limit would also trip over the thread stacks' reservations.
# -V: stop after SECONDS. Dictionary-free; stdout/stderr of AFL go to fuzz/out/TARGET/afl.log.
FUZZ_TARGET=$target cargo afl fuzz -i "fuzz/corpus/$target" -o "$out" \
  -t "${AFL_TIMEOUT_MS:-2000}" -m none -V "$seconds" -- "$bin" >"$out/afl.log" 2>&1 || {
  tail -30 "$out/afl.log" >&2; exit 1; }
stats=$out/default/fuzzer_stats
val() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$stats"; }
# Saved crashes and hangs are the unique ones (AFL's de-duplication by coverage).
printf '{"target":"%s","seconds":%s,"execs":%s,"execs_per_sec":%s,"corpus_count":%s,"edges_found":%s,"crashes":%s,"hangs":%s,"stability":"%s","afl":"%s"}\n' \
  "$target" "$(val run_time)" "$(val execs_done)" "$(val execs_per_sec)" \
  "$(val corpus_count)" "$(val edges_found)" "$(val saved_crashes)" "$(val saved_hangs)" \
  "$(val stability)" "$(val afl_version)"
