#!/usr/bin/env bash
# Build the QEMU peer guest: static dirtier -> /init -> initramfs.cpio.gz.
# Usage: build.sh OUT_DIR   (rebuilds only when dirtier.c or the packer changed)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
bin="$out/dirtier"
img="$out/initramfs.cpio.gz"
if [[ ! -x "$bin" || "$here/dirtier.c" -nt "$bin" ]]; then
    gcc -static -O2 -Wall -Wextra -Werror -o "$bin" "$here/dirtier.c"
fi
if [[ ! -s "$img" || "$bin" -nt "$img" || "$here/mkinitramfs.py" -nt "$img" ]]; then
    python3 "$here/mkinitramfs.py" --init "$bin" --out "$img"
fi
echo "$img"
