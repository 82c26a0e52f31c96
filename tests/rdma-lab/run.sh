#!/usr/bin/env bash
# The Soft-RoCE lab: runs the `rdma` transport for real, on a machine without RDMA hardware
# or RDMA support in its kernel (see README.md beside this file).
#
# QEMU (TCG) boots Debian's full kernel (linux-image-amd64: it has rdma_rxe) with an
# initramfs holding the RDMA modules, rdma-core's libraries and rxe provider, busybox,
# iproute2's `rdma` tool and the lab program (crates/migration/examples/rdma_lab.rs). The
# guest adds an rxe device on its NIC and migrates a software VM between two processes over
# `--transport rdma`, then checks the RDMA failure paths. Prints PASS/FAIL per scenario, the
# figures (FIGURES {...}) and `N passed, N failed`; exits non-zero on any failure.
#
# Everything comes from Debian's packages (apt-get install / apt-get download), cached under
# tests/rdma-lab/.cache (git-ignored) between runs.
#
# Usage: tests/rdma-lab/run.sh [--mib N] [--timeout SECONDS] [--profile release|dev]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="$here/.cache"
log() { echo "[rdma-lab] $*" >&2; }
die() { log "error: $*"; exit 2; }

mib=64 run_timeout=540 profile=release
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mib) mib="${2:?}"; shift 2 ;;
        --timeout) run_timeout="${2:?}"; shift 2 ;;
        --profile) profile="${2:?}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ "$mib" =~ ^[1-9][0-9]*$ ]] || die "--mib must be a positive number"
[[ "$profile" == release || "$profile" == dev ]] || die "--profile must be release or dev"
mkdir -p "$cache/debs"

# --- host tools (apt-get install, idempotent) --------------------------------
apt_updated=0
apt_update_once() {
    if [[ $apt_updated == 0 ]]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
[[ -e /usr/include/infiniband/verbs.h ]] || need+=(libibverbs-dev)
[[ -e /usr/include/rdma/rdma_cma.h ]] || need+=(librdmacm-dev)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >"$cache/apt.log" 2>&1 || { cat "$cache/apt.log" >&2; die "apt-get install failed"; }
fi

# --- Debian packages for the guest (apt-get download, cached) -----------------
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)"
if [[ -z "$kpkg" ]]; then
    apt_update_once
    kpkg="$(apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)"
fi
[[ -n "$kpkg" ]] || die "cannot resolve linux-image-amd64"
# A kernel of an older point release is dropped from the cache.
for old in "$cache"/debs/linux-image-*.deb; do
    if [[ -e "$old" && "$(basename "$old")" != "${kpkg}_"* ]]; then rm -f "$old"; fi
done
pkgs=("$kpkg" busybox-static iproute2 libmnl0 libbsd0 libmd0 libcap2
    libibverbs1 librdmacm1 ibverbs-providers libnl-3-200 libnl-route-3-200)
for p in "${pkgs[@]}"; do
    if ! compgen -G "$cache/debs/${p}_*.deb" >/dev/null; then
        log "downloading $p"
        (cd "$cache/debs" && apt-get download -qq "$p" 2>"$cache/apt.log") || {
            apt_update_once
            (cd "$cache/debs" && apt-get download -qq "$p" 2>"$cache/apt.log") ||
                { cat "$cache/apt.log" >&2; die "apt-get download $p failed"; }
        }
    fi
done
pkgroot="$cache/pkgroot"
if [[ ! -e "$pkgroot/.done" || -n "$(find "$cache/debs" -newer "$pkgroot/.done" -name '*.deb')" ]]; then
    log "extracting packages"
    rm -rf "$pkgroot" && mkdir -p "$pkgroot"
    for d in "$cache"/debs/*.deb; do dpkg -x "$d" "$pkgroot"; done
    touch "$pkgroot/.done"
fi
kver="${kpkg#linux-image-}"
[[ -d "$pkgroot/lib/modules/$kver" ]] || die "no kernel modules for $kver in $kpkg"
kernel="$pkgroot/boot/vmlinuz-$kver"

# --- the lab program ---------------------------------------------------------
log "building the lab program ($profile)"
(cd "$root" && cargo build -q --profile "$profile" -p fastmig-migration \
    --features rdma,test-utils --example rdma_lab) || die "cargo build failed"
dir=$([[ $profile == dev ]] && echo debug || echo release)
lab_bin="$root/target/$dir/examples/rdma_lab"

# --- initramfs ---------------------------------------------------------------
stage="$cache/stage"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,etc/libibverbs.d,modules,lib64,lib/x86_64-linux-gnu/libibverbs}
cp "$pkgroot/bin/busybox" "$stage/bin/busybox"
cp "$pkgroot/bin/rdma" "$stage/bin/rdma" 2>/dev/null || cp "$pkgroot/usr/bin/rdma" "$stage/bin/rdma"
cp "$lab_bin" "$stage/bin/rdma_lab"
cp "$pkgroot/etc/libibverbs.d/rxe.driver" "$stage/etc/libibverbs.d/"
cp -L "$pkgroot/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" \
    "$stage/lib/x86_64-linux-gnu/libibverbs/"
# Shared libraries: the packages' copies first, the host's C library for the rest.
pkglibs="$pkgroot/usr/lib/x86_64-linux-gnu:$pkgroot/lib/x86_64-linux-gnu"
for elf in "$stage/bin/rdma" "$stage/bin/rdma_lab" \
    "$stage/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so"; do
    LD_LIBRARY_PATH="$pkglibs" ldd "$elf" | awk '/=> \// { print $3 } /^\t\/lib64/ { print $1 }'
done | sort -u | while read -r lib; do
    case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$stage/lib64/" ;;
        *) cp -L "$lib" "$stage/lib/x86_64-linux-gnu/" ;;
    esac
done
# libibverbs looks for providers under /usr/lib/x86_64-linux-gnu/libibverbs.
mkdir -p "$stage/usr" && ln -s ../lib "$stage/usr/lib"
# Kernel modules: rdma_rxe, the rdma_cm user interface, virtio-net, with their dependencies
# in load order (read from each module's `depends=` field: the package ships no
# modules.dep), decompressed for busybox's insmod.
moddir="$pkgroot/lib/modules/$kver"
# crc32_generic: rxe asks the crypto API for "crc32" (its ICRC) at run time, a dependency
# that `depends=` does not name.
python3 - "$moddir" crc32_generic rdma_rxe rdma_ucm ib_uverbs virtio_net virtio_pci >"$stage/modules/order" <<'PY'
import lzma, os, sys
moddir, roots = sys.argv[1], sys.argv[2:]
byname = {}
for d, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        if ".ko" in f:
            byname[f.split(".ko")[0].replace("-", "_")] = os.path.relpath(os.path.join(d, f), moddir)
builtin = set()
try:
    with open(os.path.join(moddir, "modules.builtin")) as f:
        builtin = {os.path.basename(l.strip()).split(".ko")[0].replace("-", "_") for l in f}
except OSError:
    pass
def depends(path):
    with open(os.path.join(moddir, path), "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9 : data.index(b"\0", at + 1)].decode()
    return [m.replace("-", "_") for m in value.split(",") if m]
order, seen = [], set()
def visit(name):
    if name in seen or name in builtin:
        return
    seen.add(name)
    if name not in byname:
        sys.exit(f"module {name} not found")
    for d in depends(byname[name]):
        visit(d)
    order.append(byname[name])
for r in roots:
    visit(r)
print("\n".join(order))
PY
while read -r m; do
    out="$stage/modules/$(basename "$m" | sed 's/\.ko.*$/.ko/')"
    case "$m" in
        *.xz) xz -dc "$moddir/$m" >"$out" ;;
        *.zst) zstd -qdc "$moddir/$m" >"$out" ;;
        *) cp "$moddir/$m" "$out" ;;
    esac
    basename "$out"
done <"$stage/modules/order" >"$stage/modules/load"
cat >"$stage/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
for m in \$(cat /modules/load); do insmod /modules/\$m || echo "insmod \$m failed"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
if ! rdma link add rxe0 type rxe netdev eth0; then
    echo "rdma link add failed; interfaces and kernel log follow"
    ip link
    dmesg | tail -n 30
fi
rdma link show
/bin/rdma_lab run --addr 10.0.2.15 --mib $mib
echo "LAB EXIT \$?"
poweroff -f
EOF
chmod +x "$stage/init"
initrd="$cache/initramfs.cpio.gz"
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd"

# --- boot --------------------------------------------------------------------
out="$cache/last-run.log"
log "booting $kver under QEMU (TCG); guest log in $out"
# The guest's NIC is QEMU's user-mode network with `restrict=on`: nothing leaves the guest.
# RDMA traffic between the two processes loops back inside rxe.
set +e
timeout "$run_timeout" qemu-system-x86_64 -accel tcg,thread=multi -smp 2 -m 1024 -cpu max \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1" \
    -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0 \
    -nographic -no-reboot </dev/null >"$out" 2>&1
qemu_rc=$?
set -e
tr -d '\r' <"$out" | grep -E '^(rdma lab|PASS|FAIL|    |FIGURES|COMPARE|[0-9]+ passed|LAB EXIT|insmod|rdma link|link |error|\[ *[0-9.]+\]|[0-9]+: )' || true
[[ $qemu_rc -eq 124 ]] && die "the guest did not finish within $run_timeout s (see $out)"
code="$(tr -d '\r' <"$out" | sed -n 's/^LAB EXIT \([0-9]*\)$/\1/p' | tail -n1)"
[[ -n "$code" ]] || die "the lab did not run to its end (see $out)"
exit "$code"
