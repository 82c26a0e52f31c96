#!/usr/bin/env bash
# Cost of mutual TLS beside clear text: one 1 GiB prefilled idle VM migrated once per
# configuration (classic, classic+TLS, multi-tcp, multi-tcp+TLS) over loopback, in one run.
# Prints wall time of the migration and the CPU seconds both processes spent on it (from
# /proc, so the TLS tunnel threads count), per GiB.
#
#   cargo build --release -p fastmig-cli && bench/tls-cost.sh [MEM]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/fastmig}
MEM=${1:-1G}
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT

# A throw-away PKI: one CA, one certificate per end (SAN 127.0.0.1).
cat > "$W/ca.cnf" <<CNF
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = keyCertSign, digitalSignature
[leaf]
basicConstraints = CA:FALSE
keyUsage = digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
CNF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca.key" \
  -out "$W/ca.pem" -subj /CN=cluster -days 2 -config "$W/ca.cnf" -extensions v3_ca 2>/dev/null
for n in a b; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/$n.key" \
    -out "$W/$n.csr" -subj "/CN=$n" -config "$W/ca.cnf" 2>/dev/null
  openssl x509 -req -in "$W/$n.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
    -out "$W/$n.pem" -days 1 -extfile "$W/ca.cnf" -extensions leaf 2>/dev/null
done

cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
gib=$(python3 -c "import sys; s='$MEM'; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]]/(1<<30))")

printf '%-16s %10s %12s %14s %14s\n' config total_ms s_per_GiB src_cpu_s/GiB dst_cpu_s/GiB
for cfg in classic classic+tls multi-tcp multi-tcp+tls; do
  t=${cfg%+tls}
  src_tls=(); dst_tls=()
  if [[ $cfg == *+tls ]]; then
    src_tls=(--tls-cert "$W/a.pem" --tls-key "$W/a.key" --tls-ca "$W/ca.pem")
    dst_tls=(--tls-cert "$W/b.pem" --tls-key "$W/b.key" --tls-ca "$W/ca.pem")
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -f "$W/s.sock" "$W/d.sock"
  "$BIN" run --mem "$MEM" --workload idle --prefill --api "$W/s.sock" 2>"$W/src.log" &
  src=$!
  "$BIN" incoming --listen "127.0.0.1:$port" --mem "$MEM" --api "$W/d.sock" "${dst_tls[@]}" \
    2>"$W/dst.log" &
  dst=$!
  until grep -q "waiting for an incoming" "$W/dst.log" 2>/dev/null && [ -S "$W/s.sock" ]; do sleep 0.2; done
  sleep 1
  s0=$(cpu $src); d0=$(cpu $dst)
  "$BIN" migrate --api "$W/s.sock" --to "127.0.0.1:$port" --transport "$t" --json \
    --downtime-limit 300ms "${src_tls[@]}" > "$W/sum.json"
  s1=$(cpu $src); d1=$(cpu $dst)
  python3 - "$cfg" "$gib" "$s0" "$s1" "$d0" "$d1" "$W/sum.json" <<'PY'
import json, sys
cfg, gib, s0, s1, d0, d1, path = sys.argv[1], *map(float, sys.argv[2:7]), sys.argv[7]
s = json.load(open(path))
assert s["digest_match"], s
print(f"{cfg:<16} {s['total_ms']:10.0f} {s['total_ms']/1e3/gib:12.2f} {(s1-s0)/gib:14.2f} {(d1-d0)/gib:14.2f}")
PY
  kill $src $dst 2>/dev/null || true
  wait $src $dst 2>/dev/null || true
done
