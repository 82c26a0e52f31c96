#!/usr/bin/env python3
"""Median table (markdown) of peer-qemu.sh JSON lines read from stdin.

Groups by (mem, rate, transport); lines that are not JSON objects (for
example `# command` markers) are skipped. Only completed runs whose
destination guest continued are counted; the others are tallied as failed.
"""
import json
import statistics
import sys

FIELDS = ["total_ms", "downtime_ms", "setup_ms", "rounds", "bytes_sent", "pages_sent",
          "throughput_mib_s", "src_cpu_s", "dst_cpu_s", "src_cpu_process_s",
          "guest_rate_pps_before"]


def main() -> int:
    groups = {}
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            continue
        run = json.loads(line)
        key = (run["mem_bytes"], run["rate_pps"], run["transport"])
        groups.setdefault(key, []).append(run)
    print("| mem MiB | rate pps | transport | ok/runs | " + " | ".join(FIELDS) + " |")
    print("|" + "---|" * (4 + len(FIELDS)))
    for (mem, rate, transport), runs in sorted(groups.items()):
        ok = [r for r in runs if r["status"] == "completed" and r.get("dst_guest_ok")]
        cells = []
        for f in FIELDS:
            vals = [r[f] for r in ok if r.get(f) is not None]
            if not vals:
                cells.append("-")
                continue
            med = statistics.median(vals)
            cells.append(f"{med:.0f}" if med >= 100 else f"{med:.2f}".rstrip("0").rstrip("."))
        print(f"| {mem >> 20} | {rate} | {transport} | {len(ok)}/{len(runs)} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
