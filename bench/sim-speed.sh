#!/bin/bash
# Simulator speed benchmark behind bench/RESULTS.md ("Simulator": one policy over one day, and
# the scale series). Runs NEW (and OLD, if given, alternately, since this VM's speed drifts)
# 3 times each; prints the runs and medians.
# Usage: bench/sim-speed.sh [NEW_BINARY] [OLD_BINARY]   (default NEW: target/release/fastmig)
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=${1:-target/release/fastmig}
OLD=${2:-}
D=${FASTMIG_SHARED:-../shared}/data/planetlab/20110303
[ -x "$NEW" ] || { echo "sim-speed: $NEW not built (cargo build --release)" >&2; exit 2; }
[ -d "$D" ] || { echo "sim-speed: no trace directory $D" >&2; exit 2; }
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
wall() { { /usr/bin/time -f "%e" "$@" >/dev/null; } 2>&1 | tail -1; }
echo "# one policy over one day: wall s, 3 runs, median"
for p in npa dvfs thr-mmt thr-mc thr-mu thr-rs iqr-mmt iqr-mc iqr-mu iqr-rs mad-mmt mad-mc \
         mad-mu mad-rs lr-mmt lr-mc lr-mu lr-rs lrr-mmt lrr-mc lrr-mu lrr-rs; do
  n=""; o=""
  for _ in 1 2 3; do
    n="$n $(wall "$NEW" simulate --trace "$D" --policy "$p" --json)"
    [ -n "$OLD" ] && o="$o $(wall "$OLD" simulate --trace "$D" --policy "$p" --json)"
  done
  line="$p new:$n median $(echo $n | tr ' ' '\n' | med)"
  [ -n "$OLD" ] && line="$line old:$o median $(echo $o | tr ' ' '\n' | med)"
  echo "$line"
done
echo "# lr-mmt at scale F: user s, wall s, max RSS KB"
for F in 1 5 10 20 62.5; do
  for _ in 1 2 3; do
    /usr/bin/time -f "F=$F new %U %e %M" "$NEW" simulate --trace "$D" --policy lr-mmt --scale "$F" --json 2>&1 >/dev/null | tail -1
    if [ -n "$OLD" ] && [ "$F" != 62.5 ]; then
      /usr/bin/time -f "F=$F old %U %e %M" "$OLD" simulate --trace "$D" --policy lr-mmt --scale "$F" --json 2>&1 >/dev/null | tail -1
    fi
  done
done
