#!/usr/bin/env bash
# QEMU reference peer for `fastmig bench migration --peer qemu`.
#
# Migrates a QEMU VM (same memory size, same guest dirty rate as fastmig's
# bench) over loopback with QEMU's classic `tcp` migration or `multifd`, and
# prints ONE JSON object per repetition on stdout (fields as fastmig's
# migration summary, see bench/README.md). Diagnostics go to stderr.
#
# Installs on demand, from Debian apt only: qemu-system-x86 (>= 9, from
# bookworm-backports if needed, see bench/README.md), a Debian cloud kernel
# (extracted into bench/.cache), and builds the static /init (bench/qemu-guest)
# into an initramfs there.
#
# Usage:
#   bench/peer-qemu.sh --mem 1G --rate 20000 --mode tcp|multifd [--wss SIZE]
#       [--pattern random|seq|hotcold] [--hot F] [--hotw F] [--channels N] [--max-bandwidth BYTES/s]
#       [--downtime-limit MS] [--repeat N] [--accel tcg|kvm] [--timeout S]
#       [--warmup S] [--no-prefill]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="$here/.cache"
log() { echo "[peer-qemu] $*" >&2; }
die() { log "error: $*"; exit 2; }

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit "${1:-2}"; }

mem=1G rate=0 wss="" pattern=random mode=tcp channels=2 max_bw="" downtime=30
repeat=1 accel=tcg run_timeout="" hot=0.1 hotw=0.9 warmup=2 no_prefill=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mem) mem="${2:?}"; shift 2 ;;
        --rate) rate="${2:?}"; shift 2 ;;
        --wss) wss="${2:?}"; shift 2 ;;
        --pattern) pattern="${2:?}"; shift 2 ;;
        --hot) hot="${2:?}"; shift 2 ;;
        --hotw) hotw="${2:?}"; shift 2 ;;
        --mode) mode="${2:?}"; shift 2 ;;
        --channels) channels="${2:?}"; shift 2 ;;
        --max-bandwidth) max_bw="${2:?}"; shift 2 ;;
        --downtime-limit) downtime="${2:?}"; shift 2 ;;
        --repeat) repeat="${2:?}"; shift 2 ;;
        --accel) accel="${2:?}"; shift 2 ;;
        --timeout) run_timeout="${2:?}"; shift 2 ;;
        --warmup) warmup="${2:?}"; shift 2 ;;
        --no-prefill) no_prefill=1; shift ;;
        -h|--help) usage 0 ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
[[ "$rate" =~ ^[0-9]+$ ]] || die "--rate must be a number of pages/s"
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || die "--repeat must be >= 1"
[[ "$mode" == tcp || "$mode" == multifd ]] || die "--mode must be tcp or multifd"
[[ "$pattern" =~ ^(random|seq|hotcold)$ ]] || die "--pattern must be random, seq or hotcold"
[[ "$accel" == tcg || "$accel" == kvm ]] || die "--accel must be tcg or kvm"

# --- dependencies (idempotent, quiet) --------------------------------------
apt_updated=0
# Prints the first Debian archive URI (not the security archive) of the machine's apt sources,
# in deb822 (`URIs:`) or one-line (`deb URI suite ...`) form.
apt_archive_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri="$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' "$f")"
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' "$f")"
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    return 1
}
apt_install() {
    if [[ $apt_updated == 0 ]]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >"$cache/apt.log" 2>&1 || { cat "$cache/apt.log" >&2; die "apt-get install $* failed"; }
}
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'; }
mkdir -p "$cache"
if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing qemu-system-x86"
    apt_install qemu-system-x86
fi
# QEMU < 9.0 loses TCG writes from the migration dirty bitmap (fixed upstream
# by 03bfc2188f "physmem: Fix migration dirty bitmap coherency with TCG memory
# access"): with a dirtying guest the destination kernel oopses. Bookworm
# ships 7.2, so take QEMU from Debian's bookworm-backports, through a private
# sources list and lists dir in bench/.cache (the system apt config is left
# alone).
if [[ "$(qemu_major)" -lt 9 ]]; then
    log "QEMU $(qemu_major).x corrupts TCG guests under migration; installing bookworm-backports QEMU"
    bpo="$cache/apt"
    mkdir -p "$bpo/lists/partial"
    # The archive is the one this machine's own apt configuration names (never a host
    # written here): the first non-security URI of its sources.
    archive="$(apt_archive_uri)" || die "no Debian archive found in this machine's apt sources"
    echo "deb $archive bookworm-backports main" >"$bpo/backports.list"
    aopt=(-o "Dir::Etc::sourcelist=$bpo/backports.list" -o "Dir::Etc::sourceparts=/etc/apt/sources.list.d"
        -o "Dir::State::lists=$bpo/lists")
    if apt-get -qq "${aopt[@]}" update >"$cache/apt.log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get -y -qq "${aopt[@]}" -t bookworm-backports install \
            --no-install-recommends qemu-system-x86 >>"$cache/apt.log" 2>&1; then
        log "now $(qemu-system-x86_64 --version | head -n1)"
    else
        log "warning: backports QEMU install failed (see $cache/apt.log); runs with a dirtying guest will be marked failed"
    fi
fi
# The guest is linked statically: gcc alone is not enough, libc.a is needed.
if ! command -v gcc >/dev/null || ! gcc -print-file-name=libc.a | grep -q /; then
    apt_install gcc libc6-dev
fi

kernel="$cache/vmlinuz"
if [[ ! -s "$kernel" ]]; then
    # The meta package names the current cloud kernel of this Debian release.
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)"
    [[ -n "$pkg" ]] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"
    log "fetching kernel package $pkg"
    rm -rf "$cache/kernel" "$cache"/linux-image-*.deb
    (cd "$cache" && apt-get download -qq "$pkg" 2>"$cache/apt.log") ||
        { cat "$cache/apt.log" >&2; die "apt-get download $pkg failed"; }
    dpkg -x "$cache"/linux-image-*.deb "$cache/kernel"
    cp "$(ls "$cache"/kernel/boot/vmlinuz-* | head -n1)" "$kernel.tmp" && mv "$kernel.tmp" "$kernel"
fi
initrd="$("$here/qemu-guest/build.sh" "$cache/guest")"

# --- run -------------------------------------------------------------------
workdir="$(mktemp -d /tmp/peer-qemu.XXXXXX)"
child=""
cleanup() {
    local rc=$?
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true   # peer_run.py quits its QEMUs
        for _ in $(seq 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$child" 2>/dev/null || true
    fi
    # Backstop: any QEMU of ours still alive (pidfile + name check, so a
    # recycled pid of someone else's process is never hit).
    for pf in "$workdir"/*.pid; do
        [[ -s "$pf" ]] || continue
        pid="$(cat "$pf")"
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == qemu-system-* ]]; then
            log "killing leftover QEMU $pid"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$workdir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=(--kernel "$kernel" --initrd "$initrd" --workdir "$workdir" --mem "$mem"
    --rate "$rate" --pattern "$pattern" --hot "$hot" --hotw "$hotw" --mode "$mode" --channels "$channels"
    --downtime-limit "$downtime" --repeat "$repeat" --accel "$accel" --warmup "$warmup")
[[ $no_prefill == 1 ]] && args+=(--no-prefill)
[[ -n "$wss" ]] && args+=(--wss "$wss")
[[ -n "$max_bw" ]] && args+=(--max-bandwidth "$max_bw")

# Overall bound per repetition (boot + fill + migration + teardown) so a hung
# QEMU can never hang the bench; `timeout` TERMs peer_run.py, which unwinds.
[[ -n "$run_timeout" ]] || run_timeout=600
timeout -k 15 "$((run_timeout * repeat))" python3 "$here/qemu-guest/peer_run.py" "${args[@]}" &
child=$!
wait "$child"
