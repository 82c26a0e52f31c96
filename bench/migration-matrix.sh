#!/usr/bin/env bash
# Issue 3's benchmark: migrate 64 MiB, 256 MiB and 1 GiB VMs (idle, and `dirty` at 5k and
# 50k pages/s) with the given transports, 3 repetitions each, and print one markdown table of
# medians of every summary field. Raw results: bench/out/matrix/<mem>-<workload>/results.json.
#
#   bench/migration-matrix.sh [TRANSPORTS] [REPEAT]     (default: classic 3)
set -euo pipefail
cd "$(dirname "$0")/.."
transports=${1:-classic}
repeat=${2:-3}
cargo build --release -q -p fastmig-cli
bin=target/release/fastmig
out=bench/out/matrix
mkdir -p "$out"
for mem in 64M 256M 1G; do
  case $mem in 64M) wss=32M ;; 256M) wss=128M ;; 1G) wss=512M ;; esac
  # One emulated vCPU writes at most ~40-60k pages/s here: 50k needs two.
  for spec in "idle 1" "dirty:rate=5000,wss=$wss,pattern=random 1" "dirty:rate=50000,wss=$wss,pattern=seq 2"; do
    set -- $spec
    workload=$1 vcpus=$2
    dir="$out/$mem-${workload%%:*}-$(echo "$workload" | sed -n 's/.*rate=\([0-9]*\).*/\1/p')"
    echo "== $mem $workload (vcpus $vcpus)" >&2
    "$bin" bench migration --mem "$mem" --vcpus "$vcpus" --workload "$workload" \
      --transports "$transports" --repeat "$repeat" --out "$dir" --json > "$dir.json"
  done
done
python3 - "$out" <<'PY'
import json, glob, sys, os
fields = ["guest_dirty_pps", "total_ms", "downtime_ms", "setup_ms", "rounds", "bytes_sent",
          "pages_sent", "throughput_mib_s", "src_cpu_s", "dst_cpu_s"]
print("| mem | workload | vcpus | transport | " + " | ".join(fields) + " | digest_match |")
print("|---|---|---:|---|" + "---:|" * len(fields) + "---|")
def key(p):
    r = json.load(open(p)); return (r["mem_bytes"], r["workload"])
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=key):
    r = json.load(open(path))
    for t, m in r["medians"].items():
        digests = all(run.get("digest_match") for run in r["runs"][t])
        cells = []
        for f in fields:
            v = m.get(f)
            cells.append("-" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"))
        print(f"| {r['mem_bytes'] >> 20} MiB | `{r['workload']}` | {r['vcpus']} | {t} | " + " | ".join(cells) + f" | {digests} |")
PY
