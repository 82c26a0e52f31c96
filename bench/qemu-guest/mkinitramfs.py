#!/usr/bin/env python3
"""Build the QEMU peer's initramfs: a gzip'd cpio (newc) holding /init only.

Owns: packing the static dirtier binary as /init plus /dev/console (so the
kernel can give init a console even if its built-in initramfs lacks one).
Does not own: building the binary (bench/qemu-guest/build.sh does that).

Stdlib only, so the bench needs no `cpio` package. Timestamps are zero so the
archive is reproducible.
"""
import argparse
import gzip
import stat
import sys

NEWC_MAGIC = b"070701"


def _entry(ino: int, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> bytes:
    name_bytes = name.encode() + b"\0"
    fields = [
        ino, mode, 0, 0,  # ino, mode, uid, gid
        2 if stat.S_ISDIR(mode) else 1,  # nlink
        0, len(data),  # mtime, filesize
        0, 0, rdev[0], rdev[1],  # dev major/minor, rdev major/minor
        len(name_bytes), 0,  # namesize (with NUL), check
    ]
    header = NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
    out = header + name_bytes
    out += b"\0" * (-len(out) % 4)  # header+name padded to 4 bytes
    out += data
    out += b"\0" * (-len(data) % 4)
    return out


def build(init_path: str) -> bytes:
    with open(init_path, "rb") as f:
        init = f.read()
    parts = [
        _entry(1, "dev", stat.S_IFDIR | 0o755),
        _entry(2, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _entry(3, "init", stat.S_IFREG | 0o755, init),
        _entry(0, "TRAILER!!!", 0),
    ]
    return b"".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="static binary to install as /init")
    ap.add_argument("--out", required=True, help="output .cpio.gz path")
    args = ap.parse_args()
    archive = build(args.init)
    with open(args.out, "wb") as f:
        f.write(gzip.compress(archive, compresslevel=6, mtime=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
