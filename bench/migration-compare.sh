#!/usr/bin/env bash
# Old build against new build, alternating, on the same machine: 1 GiB idle and dirty, every
# transport, `--repeat 3` per run, and the medians side by side.
#
#   bench/migration-compare.sh OLD_BIN NEW_BIN OUTDIR [PAIRS]
#
# Each workload runs PAIRS times (default 2) as old, new, then new, old (so neither build
# always goes first). Run it on a quiet machine: one migration at a time uses both cores.
# The table shows, per workload and transport, the median over all runs of each build of:
# total ms / downtime ms / setup ms / CPU s per GiB (both sides). MEM, WSS and TRANSPORTS
# (environment) shrink it for a quick check, e.g. MEM=256M WSS=64M.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 OLD_BIN NEW_BIN OUTDIR [PAIRS]" >&2
  exit 2
fi
OLD=$1
NEW=$2
OUT=$3
PAIRS=${4:-2}
MEM=${MEM:-1G}
TRANSPORTS=${TRANSPORTS:-classic,multi-tcp,shm,handover}
WSS=${WSS:-256M}
mkdir -p "$OUT"

run() { # build-tag binary workload-tag workload index
  local dir="$OUT/$1-$3-$5"
  echo "== $(date -u +%T) $1 $3 #$5" >&2
  "$2" bench migration --mem "$MEM" --workload "$4" --transports "$TRANSPORTS" \
    --repeat 3 --out "$dir" > "$dir.txt" 2>&1 || { echo "failed: see $dir.txt" >&2; exit 1; }
}

for w in "idle:idle" "dirty:dirty:rate=20000,wss=$WSS,pattern=random"; do
  tag=${w%%:*}
  spec=${w#*:}
  for i in $(seq "$PAIRS"); do
    if [ $((i % 2)) -eq 1 ]; then
      run old "$OLD" "$tag" "$spec" "$i"
      run new "$NEW" "$tag" "$spec" "$i"
    else
      run new "$NEW" "$tag" "$spec" "$i"
      run old "$OLD" "$tag" "$spec" "$i"
    fi
  done
done

python3 - "$OUT" "$MEM" <<'PY'
import glob, json, os, statistics, sys
out, mem = sys.argv[1], sys.argv[2]
gib = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[mem[-1]] * int(mem[:-1]) / (1 << 30)
runs = {}
for f in glob.glob(os.path.join(out, "*-*-*", "results.json")):
    build, tag, _ = os.path.basename(os.path.dirname(f)).split("-")
    for t, rs in json.load(open(f))["runs"].items():
        runs.setdefault((tag, t), {}).setdefault(build, []).extend(rs)
def cell(rs):
    if not rs:
        return "-"
    med = lambda k: statistics.median(r[k] for r in rs)
    cpu = statistics.median((r["src_cpu_s"] + r["dst_cpu_s"]) / gib for r in rs)
    return f"{med('total_ms'):.0f} / {med('downtime_ms'):.2f} / {med('setup_ms'):.1f} / {cpu:.2f} (n={len(rs)})"
print(f"Medians over all runs ({mem}): total ms / downtime ms / setup ms / CPU s per GiB\n")
print("| workload | transport | old | new |")
print("|---|---|---|---|")
for (tag, t) in sorted(runs):
    b = runs[(tag, t)]
    print(f"| {tag} | {t} | {cell(b.get('old', []))} | {cell(b.get('new', []))} |")
PY
