#!/usr/bin/env python3
"""Unit tests of the QEMU peer's host-side helpers (no QEMU needed).

Run: python3 bench/qemu-guest/test_peer.py
"""
import gzip
import json
import os
import stat
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mkinitramfs  # noqa: E402
import peer_run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_newc(data: bytes):
    """Independent newc reader: list of (name, mode, rdevmajor, rdevminor, body)."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body_start = (name_start + namesize + 3) & ~3
        body = data[body_start:body_start + size]
        off = (body_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, rmaj, rmin, body))


class InitramfsTest(unittest.TestCase):
    def test_archive_holds_init_and_console(self):
        with tempfile.TemporaryDirectory() as d:
            init = os.path.join(d, "init")
            payload = bytes(range(256)) * 5 + b"odd"  # length not a multiple of 4
            with open(init, "wb") as f:
                f.write(payload)
            out = os.path.join(d, "i.cpio.gz")
            subprocess.run([sys.executable, os.path.join(HERE, "mkinitramfs.py"),
                            "--init", init, "--out", out], check=True)
            with open(out, "rb") as f:
                entries = parse_newc(gzip.decompress(f.read()))
        by_name = {e[0]: e for e in entries}
        self.assertEqual(sorted(by_name), ["dev", "dev/console", "init"])
        _, mode, _, _, body = by_name["init"]
        self.assertTrue(stat.S_ISREG(mode) and mode & 0o111)
        self.assertEqual(body, payload)
        _, mode, rmaj, rmin, _ = by_name["dev/console"]
        self.assertTrue(stat.S_ISCHR(mode))
        self.assertEqual((rmaj, rmin), (5, 1))
        self.assertTrue(stat.S_ISDIR(by_name["dev"][1]))

    def test_archive_is_reproducible(self):
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"x" * 10)
            f.flush()
            self.assertEqual(mkinitramfs.build(f.name), mkinitramfs.build(f.name))


class ParseTest(unittest.TestCase):
    def test_sizes(self):
        self.assertEqual(peer_run.parse_size("256M"), 256 << 20)
        self.assertEqual(peer_run.parse_size("1G"), 1 << 30)
        self.assertEqual(peer_run.parse_size("1GiB"), 1 << 30)
        self.assertEqual(peer_run.parse_size("4096"), 4096)
        with self.assertRaises(Exception):
            peer_run.parse_size("lots")

    def test_rate_lines(self):
        text = "FM x=1\nREADY\nRATE t_ms=1000 pps=19990 total=20000\n" \
               "RATE t_ms=2000 pps=20010 total=40010\n"
        self.assertEqual(peer_run.last_rates(text, 1), [20010])
        self.assertEqual(peer_run.last_rates(text, 5), [19990, 20010])


class FakeGuest:
    def __init__(self, text):
        self.text = text

    def serial(self):
        return self.text


class DestinationCheckTest(unittest.TestCase):
    SRC = "READY\nRATE t_ms=1000 pps=20000 total=20000\nRATE t_ms=2000 pps=20000 total=40000\n"

    def test_continuing_counter_is_ok(self):
        dst = FakeGuest("RATE t_ms=3000 pps=20000 total=60000\n")
        self.assertTrue(peer_run.check_destination(FakeGuest(self.SRC), dst, 0.5))

    def test_reboot_is_detected(self):
        # A rebooted guest prints its banner and starts counting from zero.
        dst = FakeGuest("FM total_bytes=1\nREADY\nRATE t_ms=1000 pps=20000 total=20000\n")
        self.assertFalse(peer_run.check_destination(FakeGuest(self.SRC), dst, 0.5))

    def test_oops_is_detected(self):
        dst = FakeGuest("[ 12.8] Oops: 0011 [#1] PREEMPT SMP NOPTI\n")
        self.assertFalse(peer_run.check_destination(FakeGuest(self.SRC), dst, 0.5))

    def test_silent_destination_fails_after_timeout(self):
        self.assertFalse(peer_run.check_destination(FakeGuest(self.SRC), FakeGuest(""), 0.3))


class CpuTest(unittest.TestCase):
    def test_own_process_cpu_is_counted(self):
        # Burn CPU in a child whose main thread has a comm with spaces and a
        # parenthesis, then read it back through cpu_seconds().
        code = ("import ctypes,time\n"
                "ctypes.CDLL(None).prctl(15, b'CPU 0/T) x', 0, 0, 0)\n"
                "t=time.process_time()\n"
                "while time.process_time()-t < 0.3: pass\n"
                "print('done', flush=True)\n"
                "time.sleep(5)\n")
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        try:
            self.assertEqual(child.stdout.readline().strip(), b"done")
            total, vcpu = peer_run.cpu_seconds(child.pid)
            self.assertGreaterEqual(total, 0.25)
            # The renamed main thread counts as a vCPU thread ("CPU n/...").
            self.assertGreaterEqual(vcpu, 0.25)
            self.assertLessEqual(vcpu, total)
        finally:
            child.kill()
            child.wait()


class DirtierTest(unittest.TestCase):
    """Runs the guest program on the host with a small working set and no prefill."""

    def test_banner_reports_parameters(self):
        with tempfile.TemporaryDirectory() as d:
            exe = os.path.join(d, "dirtier")
            subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe,
                            os.path.join(HERE, "dirtier.c")], check=True)
            env = {"fm_wss": "4M", "fm_prefill": "0", "fm_rate": "1000",
                   "fm_pattern": "hotcold", "fm_hot": "0.25", "fm_report_ms": "100"}
            proc = subprocess.Popen([exe], env=env, stdout=subprocess.PIPE, text=True)
            try:
                banner = proc.stdout.readline().split()
                ready = proc.stdout.readline().strip()
                rate_line = proc.stdout.readline()
            finally:
                proc.kill()
                proc.wait()
        fields = dict(kv.split("=", 1) for kv in banner[1:])
        self.assertEqual(banner[0], "FM")
        self.assertEqual(int(fields["wss_bytes"]), 4 << 20)
        self.assertEqual(int(fields["filled_bytes"]), 4 << 20)  # no prefill: wss only
        self.assertEqual(int(fields["pages"]), 1024)
        self.assertEqual(int(fields["hot_pages"]), 256)
        self.assertEqual(fields["pattern"], "hotcold")
        self.assertEqual(ready, "READY")
        self.assertTrue(peer_run.RATE_RE.match(rate_line), rate_line)


class SummarizeTest(unittest.TestCase):
    def test_median_and_failed_runs(self):
        runs = []
        for total, ok in [(100, True), (300, True), (200, True), (5, False)]:
            runs.append({"mem_bytes": 1 << 30, "rate_pps": 0, "transport": "qemu-tcp",
                         "status": "completed" if ok else "failed", "dst_guest_ok": ok,
                         "total_ms": total})
        stdin = "# cmd\n" + "\n".join(json.dumps(r) for r in runs) + "\n"
        out = subprocess.run([sys.executable, os.path.join(HERE, "summarize.py")],
                             input=stdin, capture_output=True, text=True, check=True).stdout
        row = out.strip().splitlines()[-1].split("|")
        self.assertEqual(row[4].strip(), "3/4")
        self.assertEqual(row[5].strip(), "200")  # median of 100, 300, 200; failed run ignored


if __name__ == "__main__":
    unittest.main()
