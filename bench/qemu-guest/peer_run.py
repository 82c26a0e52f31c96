#!/usr/bin/env python3
"""Run QEMU live migrations on loopback and print one JSON summary per run.

Owns: the QEMU side of fastmig's migration benchmark: per repetition it boots
a destination QEMU (`-incoming defer`) and a source QEMU with the dirtier
guest, waits for READY, configures migration over QMP, migrates over
127.0.0.1, and reports QEMU's own statistics plus the CPU time of both QEMU
processes during the migration.
Does not own: installing QEMU, fetching the kernel or building the initramfs
(bench/peer-qemu.sh does that) nor comparing with fastmig (the lead's bench).

Flow of one repetition:

    dst: qemu -incoming defer          src: qemu (boots, fills, READY)
    dst: caps/params, migrate-incoming tcp:127.0.0.1:PORT
    src: caps/params, cpu sample, migrate tcp:127.0.0.1:PORT
    src: poll query-migrate until completed/failed (bounded)
    src: cpu sample; dst: wait running, cpu sample; dst guest alive check
    print JSON line; quit both (kill if they do not exit)

stdout carries only the JSON lines; diagnostics go to stderr.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import Qmp, QmpError  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# fastmig's defaults: 30 ms downtime target, bandwidth effectively unlimited.
DEFAULT_DOWNTIME_MS = 30
UNLIMITED_BANDWIDTH = 100 << 30  # bytes/s; QEMU 10 defaults to 128 MiB/s


def log(msg: str):
    print(f"[peer-qemu] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int):
    """(process total, vCPU threads) CPU seconds (utime+stime) of a QEMU process.

    The process line includes threads that already exited (migration and
    multifd threads end at completion); vCPU threads are named "CPU n/..."
    thanks to `-name ...,debug-threads=on`.
    """
    def ticks(stat_path):
        with open(stat_path) as f:
            data = f.read()
        comm = data[data.index("(") + 1:data.rindex(")")]
        rest = data[data.rindex(")") + 2:].split()
        return comm, int(rest[11]) + int(rest[12])  # utime, stime

    _, total = ticks(f"/proc/{pid}/stat")
    vcpu = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, t = ticks(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if comm.startswith("CPU "):
            vcpu += t
    return total / CLK_TCK, vcpu / CLK_TCK


class Guest:
    """One QEMU process with its QMP socket and serial log file."""

    def __init__(self, role, args, workdir, incoming):
        self.role = role
        self.qmp_path = os.path.join(workdir, f"{role}.qmp")
        self.serial_path = os.path.join(workdir, f"{role}.serial")
        self.pid_path = os.path.join(workdir, f"{role}.pid")
        for p in (self.qmp_path, self.serial_path, self.pid_path):
            if os.path.exists(p):
                os.unlink(p)
        cmdline = (
            f"console=ttyS0 quiet panic=-1 fm_rate={args.rate} "
            f"fm_pattern={args.pattern} fm_hot={args.hot} fm_hotw={args.hotw} fm_report_ms=1000 "
            f"fm_prefill={0 if args.no_prefill else 1}"
        )
        if args.wss is not None:
            cmdline += f" fm_wss={args.wss}"
        cmd = [
            args.qemu, "-name", f"fastmig-{role},debug-threads=on",
            "-machine", args.machine, "-accel", args.accel, "-cpu", args.cpu,
            "-smp", "1", "-m", f"{args.mem // (1 << 20)}M",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-chardev", f"file,id=con,path={self.serial_path}", "-serial", "chardev:con",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile", self.pid_path,
            # Identical on both sides: the destination must present the same
            # firmware/fw_cfg contents (linuxboot ROM) as the source.
            "-kernel", args.kernel, "-initrd", args.initrd, "-append", cmdline,
        ]
        if incoming:
            cmd += ["-incoming", "defer"]
        log(f"{role}: {' '.join(cmd)}")
        # Own process group: the bash wrapper's trap and ours can kill it whole.
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(workdir, f"{role}.stderr"), "wb"),
            start_new_session=True,
        )
        self.qmp = None

    def connect(self, timeout):
        self.qmp = Qmp(self.qmp_path, timeout=timeout)
        return self.qmp

    def serial(self) -> str:
        try:
            with open(self.serial_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.qmp is not None:
            try:
                self.qmp.timeout = 2
                self.qmp.cmd("quit")
            except (QmpError, OSError):
                pass
            self.qmp.close()
            self.qmp = None
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log(f"{self.role}: pid {self.proc.pid} did not die")


RATE_RE = re.compile(r"^RATE t_ms=(\d+) pps=(\d+) total=(\d+)", re.MULTILINE)
FM_RE = re.compile(r"^FM .*", re.MULTILINE)


def wait_ready(src: Guest, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = src.serial()
        if "READY" in text:
            return
        if "FM error" in text or "Kernel panic" in text:
            raise RuntimeError(f"guest failed to start: {text[-500:]}")
        if not src.alive():
            raise RuntimeError("source QEMU exited before READY")
        time.sleep(0.2)
    raise TimeoutError(f"no READY from the guest within {timeout:.0f} s")


def last_rates(text: str, n: int):
    return [int(m.group(2)) for m in RATE_RE.finditer(text)][-n:]


def check_destination(src: "Guest", dst: "Guest", timeout: float) -> bool:
    """True once the destination prints a RATE line continuing the source's count.

    A fresh boot (FM/READY banner) or a kernel oops means the migrated memory
    was inconsistent; QEMU itself would still report "completed".
    """
    src_totals = [int(m.group(3)) for m in RATE_RE.finditer(src.serial())]
    floor = src_totals[-1] if src_totals else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = dst.serial()
        if FM_RE.search(text) or "Kernel panic" in text or "Oops" in text:
            return False
        totals = [int(m.group(3)) for m in RATE_RE.finditer(text)]
        if totals:
            return totals[0] >= floor
        time.sleep(0.2)
    return False


def run_once(args, rep: int) -> dict:
    workdir = args.workdir
    port = free_port()
    transport = "qemu-multifd" if args.mode == "multifd" else "qemu-tcp"
    result = {
        "status": "failed", "transport": transport, "rep": rep,
        "mem_bytes": args.mem, "rate_pps": args.rate, "pattern": args.pattern,
        "accel": args.accel,
    }
    dst = src = None
    try:
        dst = Guest("dst", args, workdir, incoming=True)
        src = Guest("src", args, workdir, incoming=False)
        dq = dst.connect(args.qmp_timeout)
        sq = src.connect(args.qmp_timeout)
        result["qemu_version"] = "{major}.{minor}.{micro}".format(**sq.version)

        t_boot = time.monotonic()
        wait_ready(src, args.ready_timeout)
        boot_s = time.monotonic() - t_boot
        # Let the dirty rate settle so the migration starts under load.
        time.sleep(args.warmup)
        text = src.serial()
        fm = FM_RE.search(text)
        if fm:
            info = dict(kv.split("=", 1) for kv in fm.group(0).split()[1:] if "=" in kv)
            result["wss_bytes"] = int(info.get("wss_bytes", 0))
            result["filled_bytes"] = int(info.get("filled_bytes", 0))
            result["guest_fill_ms"] = int(info.get("fill_ms", 0))
        result["boot_to_ready_s"] = round(boot_s, 2)
        # The last full second before `migrate` (the first one after READY
        # includes start-up and reads low).
        pre = last_rates(text, 1)
        result["guest_rate_pps_before"] = pre[0] if pre else None
        # fastmig's bench column of the same name. Caveat: fastmig counts
        # distinct dirty pages/s from its dirty log; this is the guest's own
        # count of page writes/s, equal for seq and nearly so for random
        # writes over a large working set.
        result["guest_dirty_pps"] = result["guest_rate_pps_before"]

        caps = [{"capability": "multifd", "state": args.mode == "multifd"}]
        params = {}
        if args.mode == "multifd":
            params["multifd-channels"] = args.channels
        for q in (dq, sq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            if params:
                q.cmd("migrate-set-parameters", **params)
        sq.cmd("migrate-set-parameters", **{
            "downtime-limit": args.downtime_limit,
            "max-bandwidth": args.max_bandwidth,
        })
        uri = f"tcp:127.0.0.1:{port}"
        dq.cmd("migrate-incoming", uri=uri)

        src_cpu0, src_vcpu0 = cpu_seconds(src.proc.pid)
        dst_cpu0, dst_vcpu0 = cpu_seconds(dst.proc.pid)
        serial_len0 = len(src.serial())
        sq.cmd("migrate", uri=uri)
        deadline = time.monotonic() + args.migrate_timeout
        info = {}
        while True:
            info = sq.cmd("query-migrate")
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                log(f"rep {rep}: migration not finished after {args.migrate_timeout} s; cancelling")
                try:
                    sq.cmd("migrate_cancel")
                except QmpError as e:
                    log(f"migrate_cancel: {e}")
                result["error"] = "timeout"
                break
            time.sleep(args.poll_interval)
        src_cpu1, src_vcpu1 = cpu_seconds(src.proc.pid)
        status = info.get("status")
        if status != "completed":
            result["error"] = result.get("error") or info.get("error-desc", status)
            log(f"rep {rep}: migration {status}: {result['error']}")
            return result

        # The destination is done when its VM runs; sample its CPU then.
        dst_deadline = time.monotonic() + args.qmp_timeout
        while dq.cmd("query-status").get("status") != "running":
            if time.monotonic() > dst_deadline:
                raise RuntimeError("destination did not start running after completion")
            time.sleep(0.02)
        dst_cpu1, dst_vcpu1 = cpu_seconds(dst.proc.pid)

        ram = info.get("ram", {})
        # QEMU >= 9 reports zero pages as "zero-pages"; older ones as "duplicate".
        zero_pages = ram.get("zero-pages", ram.get("duplicate", 0))
        total_ms = info.get("total-time", 0)
        transferred = ram.get("transferred", 0)
        # Achieved guest rate during migration, from the source console lines
        # printed after `migrate` (the last ones may cover the stop-and-copy).
        during = last_rates(src.serial()[serial_len0:], 1000)
        result.update({
            "status": "completed",
            "total_ms": total_ms,
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "rounds": ram.get("dirty-sync-count"),
            "bytes_sent": transferred,
            "pages_sent": ram.get("normal", 0) + zero_pages,
            "normal_pages": ram.get("normal"),
            "zero_pages": zero_pages,
            "throughput_mib_s": round(transferred / (1 << 20) / (total_ms / 1000), 1)
            if total_ms else None,
            # Like fastmig's summary, src/dst_cpu_s count the migration work
            # only: the process minus its vCPU thread (under TCG the source
            # vCPU thread is the guest itself, busy dirtying). The *_process_s
            # fields keep the whole-process deltas.
            "src_cpu_s": round((src_cpu1 - src_cpu0) - (src_vcpu1 - src_vcpu0), 3),
            "dst_cpu_s": round((dst_cpu1 - dst_cpu0) - (dst_vcpu1 - dst_vcpu0), 3),
            "src_cpu_process_s": round(src_cpu1 - src_cpu0, 3),
            "dst_cpu_process_s": round(dst_cpu1 - dst_cpu0, 3),
            "guest_rate_pps_during": round(sum(during) / len(during)) if during else None,
        })
        # Proof the guest survived: the destination's console must continue
        # the source's counter (no reboot banner, no oops), not start over.
        result["dst_guest_ok"] = check_destination(src, dst, args.alive_timeout)
        if not result["dst_guest_ok"]:
            result["status"] = "failed"
            result["error"] = "destination guest crashed or rebooted after migration"
            log(f"rep {rep}: {result['error']}; console tail: {dst.serial()[-400:]!r}")
        return result
    except (QmpError, RuntimeError, TimeoutError, OSError) as e:
        log(f"rep {rep}: {type(e).__name__}: {e}")
        result["error"] = str(e)
        return result
    finally:
        for g in (src, dst):
            if g is not None:
                g.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description="QEMU migration runs for fastmig's bench")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--mem", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--rate", type=int, default=0, help="guest dirty rate, pages/s")
    ap.add_argument("--wss", type=parse_size, default=None, help="guest working set, bytes")
    ap.add_argument("--pattern", choices=["random", "seq", "hotcold"], default="random")
    ap.add_argument("--hot", type=float, default=0.1, help="hotcold: hot fraction of the pages")
    ap.add_argument("--hotw", type=float, default=0.9, help="hotcold: fraction of writes to hot pages")
    ap.add_argument("--mode", choices=["tcp", "multifd"], default="tcp")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--max-bandwidth", type=parse_size, default=UNLIMITED_BANDWIDTH)
    ap.add_argument("--downtime-limit", type=int, default=DEFAULT_DOWNTIME_MS, help="ms")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="s of dirtying before migrate (fastmig's bench default: 2)")
    ap.add_argument("--no-prefill", action="store_true",
                    help="touch only the working set, not all free guest memory")
    ap.add_argument("--ready-timeout", type=float, default=None, help="s; default scales with --mem")
    ap.add_argument("--migrate-timeout", type=float, default=300.0, help="s per migration")
    ap.add_argument("--qmp-timeout", type=float, default=15.0, help="s per QMP command")
    ap.add_argument("--alive-timeout", type=float, default=8.0,
                    help="s to wait for the migrated guest to print on the destination")
    ap.add_argument("--poll-interval", type=float, default=0.05)
    args = ap.parse_args()
    if args.ready_timeout is None:
        # TCG boots and fills ~1 GiB in well under a minute here; be generous.
        args.ready_timeout = 60 + 120 * args.mem / (1 << 30)
    if args.rate < 0 or args.channels < 1 or args.repeat < 1:
        ap.error("--rate must be >= 0, --channels and --repeat >= 1")
    if not (0 <= args.hot <= 1 and 0 <= args.hotw <= 1):
        ap.error("--hot and --hotw are fractions in [0, 1]")
    os.makedirs(args.workdir, exist_ok=True)

    # SIGTERM from the wrapper's trap: unwind through `finally` to kill QEMUs.
    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    failures = 0
    try:
        for rep in range(1, args.repeat + 1):
            res = run_once(args, rep)
            print(json.dumps(res, sort_keys=True), flush=True)
            failures += res["status"] != "completed"
    except KeyboardInterrupt as e:
        log(f"interrupted: {e}")
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
