#!/usr/bin/env bash
# Bounded coverage-guided fuzzing of every target (cargo-fuzz / libFuzzer), from the seed
# corpus in fuzz/corpus (real sessions; regenerate with the capture_seeds binary). Stable
# toolchains build it with RUSTC_BOOTSTRAP=1 (cargo fuzz needs -Z flags).
#
#   cargo install cargo-fuzz --locked
#   fuzz/run.sh [SECONDS_PER_TARGET]     # default 90
#
# A crash leaves its input in fuzz/artifacts/TARGET/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-90}
export RUSTC_BOOTSTRAP=1
for t in wire_decoder handshake control_request; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzz $t for ${SECS}s"
  # The corpus directory collects new inputs; only the seed-* files are committed.
  cargo fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
