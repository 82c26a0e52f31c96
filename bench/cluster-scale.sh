#!/usr/bin/env bash
# Controller scale (issue 12): decision time per interval and SQLite growth per day, with fake
# agents, for 100, 1,000 and 10,000 hosts (3 VMs each). The workspace's own crates are built
# at opt-level 3 (dependencies are optimised in every profile), in the debug target dir.
# Usage: bench/cluster-scale.sh [--hosts 100,1000,10000] [--intervals 16] [--trace DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
trace="${FASTMIG_SHARED:-../shared}/data/planetlab/20110303"
CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo run -q -p fastmig-cluster --example cluster_scale -- \
  --trace "$trace" "$@"
