//! The Soft-RoCE lab's test program (`tests/rdma-lab/run.sh` runs it inside a QEMU guest
//! with an rxe device). It migrates a `SoftVm` between two processes over `--transport
//! rdma` and checks memory, then checks the RDMA-specific failures: each must abort with the
//! source VM running and intact and nothing left registered (pinned) in either process.
//!
//! ```text
//! rdma_lab run --addr IP [--mib N]        all scenarios; the destination is a child process
//! rdma_lab dest --addr IP --mib N         one destination (used by `run`)
//! ```
//!
//! Every scenario runs with the default [`RDMA_DEFAULT_QPS`] queue pairs except the
//! `...-one-qp` ones, which repeat a migration over one queue pair for comparison.
//!
//! Prints one `PASS`/`FAIL` line per scenario, the figures as one JSON line (`FIGURES {..}`),
//! and a closing `N passed, N failed` line; exits non-zero on any failure.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::transport::rdma::lab::{self, Fault};
use fastmig_migration::transport::RDMA_DEFAULT_QPS;
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, MigrationSummary, Progress,
    ReceiveOptions, TransportKind,
};

const MIB: u64 = 1 << 20;
/// The scripted guest's page writes per second (2 MiB/s).
const WRITES_PER_S: u64 = 500;
const GIB: f64 = (1u64 << 30) as f64;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Pinned memory of this process, from the kernel (`VmPin` in /proc/self/status), in kB:
/// an independent check that every registration was undone.
fn pinned_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmPin:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(u64::MAX)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("dest") => dest(&args),
        Some("run") => run(&args),
        _ => {
            eprintln!("usage: rdma_lab run --addr IP [--mib N] | dest --addr IP --mib N");
            2
        }
    };
    std::process::exit(code);
}

/// Destination process: prints `LISTENING port`, receives, prints `RESULT {json}`.
fn dest(args: &[String]) -> i32 {
    let (Some(ip), Some(mib)) = (
        arg(args, "--addr").and_then(|a| a.parse::<IpAddr>().ok()),
        arg(args, "--mib").and_then(|m| m.parse::<u64>().ok()),
    ) else {
        eprintln!("dest: --addr IP --mib N");
        return 2;
    };
    let vm = match SoftVm::new_incoming(mib * MIB) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("dest: {e}");
            return 1;
        }
    };
    let l = match Listener::bind(&Endpoint::Tcp(SocketAddr::new(ip, 0))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dest: {e}");
            return 1;
        }
    };
    let port = match l.endpoint() {
        Ok(Endpoint::Tcp(a)) => a.port(),
        _ => return 1,
    };
    println!("LISTENING {port}");
    let opts = ReceiveOptions {
        verify_memory: true,
        ..Default::default()
    };
    let r = receive(&l, &opts, IncomingVm::Only(&vm)).map(|(_, s)| s);
    let out = serde_json::json!({
        "ok": r.is_ok(),
        "error": r.as_ref().err().map(|e| format!("{e:#}: {}", chain(e))),
        "dst_cpu_s": r.as_ref().map(|s| s.dst_cpu_s).unwrap_or(0.0),
        "memory_crc": crc32fast::hash(&vm.snapshot()),
        "running": vm.is_running(),
        "live_registrations": lab::live_registrations(),
        "pinned_kb": pinned_kb(),
    });
    println!("RESULT {out}");
    0
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut v = Vec::new();
    let mut c = e.source();
    while let Some(x) = c {
        v.push(x.to_string());
        c = x.source();
    }
    v.join(": ")
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    /// No guest writes: one pass, the data path's own counts.
    Idle,
    /// `Idle` over one queue pair.
    IdleOneQp,
    /// Whole memory registered at setup; the guest writes meanwhile.
    Whole,
    /// `Whole` over one queue pair.
    WholeOneQp,
    /// A pin budget of a quarter of the memory: chunks registered on demand.
    Budget,
    /// The destination process is killed (SIGKILL) after it registered its memory.
    DestKilled,
    /// The source's queue pair 1 (not the one carrying the messages) is moved to the error
    /// state mid-transfer.
    QpError,
    /// WRITEs with a wrong remote key (remote access error).
    BadRkey,
    /// A connect request with another session than the `Hello`'s: rejected, never accepted.
    WrongSession,
    /// One connection more than the announced queue pairs: refused; the migration succeeds.
    ExtraQp,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "migrate-idle",
            Scenario::IdleOneQp => "migrate-idle-one-qp",
            Scenario::Whole => "migrate-whole-registration",
            Scenario::WholeOneQp => "migrate-whole-registration-one-qp",
            Scenario::Budget => "migrate-pin-budget",
            Scenario::DestKilled => "destination-killed-after-registration",
            Scenario::QpError => "source-qp-1-moved-to-error",
            Scenario::BadRkey => "remote-access-error-bad-rkey",
            Scenario::WrongSession => "connect-request-of-another-session-rejected",
            Scenario::ExtraQp => "connection-beyond-the-queue-pair-count-refused",
        }
    }

    fn idle(self) -> bool {
        matches!(self, Scenario::Idle | Scenario::IdleOneQp)
    }

    fn qps(self) -> u32 {
        match self {
            Scenario::IdleOneQp | Scenario::WholeOneQp => 1,
            _ => RDMA_DEFAULT_QPS,
        }
    }
}

struct Dest {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    port: u16,
}

fn spawn_dest(ip: IpAddr, mib: u64) -> Result<Dest, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["dest", "--addr", &ip.to_string(), "--mib", &mib.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the destination: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(out).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .ok_or("destination printed nothing")?;
    let port = first
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("destination said {first:?}"))?;
    Ok(Dest { child, lines, port })
}

fn dest_result(d: &mut Dest) -> Option<serde_json::Value> {
    let r = d
        .lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("RESULT ").map(str::to_string))
        .and_then(|j| serde_json::from_str(&j).ok());
    let _ = d.child.wait();
    r
}

/// Samples this process's `VmPin` every 10 ms until stopped; the most it saw, in kB.
fn sample_pinned(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            max = max.max(pinned_kb());
            std::thread::sleep(Duration::from_millis(10));
        }
        max
    })
}

/// Room for the source's message buffers (6 slots of 4 KiB) above the pin budget.
const SLOTS_SLACK: u64 = 64 << 10;

struct Figures {
    qps: u32,
    /// Most bytes the source had registered at once (its own counter).
    src_peak_registered: u64,
    summary: MigrationSummary,
    dst_cpu_s: f64,
    counters: lab::Counters,
}

/// Runs `sc` over its own number of queue pairs, or over `qps` when given.
fn scenario(
    sc: Scenario,
    ip: IpAddr,
    mib: u64,
    qps: Option<u32>,
) -> Result<Option<Figures>, String> {
    let qps = qps.unwrap_or(sc.qps());
    let src = SoftVm::new(mib * MIB).map_err(|e| e.to_string())?;
    // Idle: every page filled, so runs are contiguous and WRITEs reach their 1 MiB cap;
    // otherwise every other page (zero pages between: one WRITE per page in the first pass).
    src.fill(if sc.idle() { 1.0 } else { 0.5 });
    if !sc.idle() {
        // Slow enough for the emulated guest's RDMA path (about 10 MiB/s) to converge.
        src.start_writer(WriterConfig {
            pages_per_sec: WRITES_PER_S,
            pattern: WritePattern::Random { seed: 7 },
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut d = spawn_dest(ip, mib)?;
    // The QP error hits QP 1, which carries only WRITEs: its failed completion must abort
    // as one on QP 0 does.
    let (fault, after, qp) = match sc {
        Scenario::QpError => (Fault::QpError, 40, 1),
        Scenario::BadRkey => (Fault::BadRkey, 40, 0),
        Scenario::WrongSession => (Fault::WrongSession, 0, 0),
        Scenario::ExtraQp => (Fault::ExtraQp, 0, 0),
        _ => (Fault::None, 0, 0),
    };
    lab::set_fault(fault, lab::counters().writes + after, qp);
    let killed = Arc::new(AtomicBool::new(false));
    let progress: Option<fastmig_migration::ProgressFn> = (sc == Scenario::DestKilled).then(|| {
        let pid = d.child.id() as libc::pid_t;
        let killed = killed.clone();
        Arc::new(move |p: &Progress| {
            // After setup (memory registered and keys sent) and some pages written.
            if p.pages_sent > 0 && !killed.swap(true, Ordering::Relaxed) {
                // SAFETY: plain kill(2) of our own child, which has not been reaped yet
                // (it is waited for after `migrate` returns).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }) as fastmig_migration::ProgressFn
    });
    let opts = MigrateOptions {
        transport: TransportKind::Rdma {
            pin_budget_mib: if sc == Scenario::Budget {
                (mib / 4) as u32
            } else {
                0
            },
            qps,
        },
        io_timeout: Duration::from_secs(10),
        on_no_converge: fastmig_migration::OnNoConverge::Force,
        progress,
        ..Default::default()
    };
    let before = lab::counters();
    lab::take_peak_registered();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_pinned(stop.clone());
    let r = migrate(&src, &Endpoint::Tcp(SocketAddr::new(ip, d.port)), &opts);
    stop.store(true, Ordering::Relaxed);
    let peak_registered = lab::take_peak_registered();
    let peak_pinned_kb = sampler.join().unwrap_or(u64::MAX);
    lab::set_fault(Fault::None, 0, 0);
    let after = lab::counters();
    src.stop_writer();
    let res = dest_result(&mut d);
    let dest_error = res
        .as_ref()
        .and_then(|v| v.get("error").cloned())
        .unwrap_or_default();
    let src_pinned = pinned_kb();
    let src_live = lab::live_registrations();
    if src_live != 0 || src_pinned != 0 {
        return Err(format!(
            "source still has {src_live} registrations, {src_pinned} kB pinned"
        ));
    }
    match sc {
        Scenario::Idle
        | Scenario::IdleOneQp
        | Scenario::Whole
        | Scenario::WholeOneQp
        | Scenario::Budget
        | Scenario::ExtraQp => {
            let s = r.map_err(|e| format!("migration failed: {e}: {}", chain(&e)))?;
            let res = res.ok_or("destination gave no result")?;
            if !s.digest_match || res["ok"] != true {
                return Err(format!("digest_match {} destination {res}", s.digest_match));
            }
            let crc = crc32fast::hash(&src.snapshot());
            if res["memory_crc"] != crc {
                return Err(format!(
                    "destination memory crc {} != source {crc}",
                    res["memory_crc"]
                ));
            }
            if src.is_running() || res["running"] != true {
                return Err("the VM must run on the destination only".into());
            }
            if res["live_registrations"] != 0 || res["pinned_kb"] != 0 {
                return Err(format!("destination left memory registered: {res}"));
            }
            // The budget (a quarter of the memory) forces chunks in and out; without it
            // everything is registered at setup.
            let maps = after.maps - before.maps;
            if (sc == Scenario::Budget) != (maps > 0) {
                return Err(format!("{maps} chunk registrations asked for"));
            }
            if sc == Scenario::ExtraQp && after.extra_refused != before.extra_refused + 1 {
                return Err("the extra connection was not tried and refused".into());
            }
            // Under the budget the source registers its own memory in the same chunks, at
            // most the budget at once: its own count, and the kernel's (sampled).
            if sc == Scenario::Budget {
                let cap = (mib / 4) * MIB + SLOTS_SLACK;
                if peak_registered > cap || peak_pinned_kb * 1024 > cap {
                    return Err(format!(
                        "source pinned {peak_registered} bytes (VmPin peak {peak_pinned_kb} kB), budget {cap}"
                    ));
                }
                println!(
                    "    source peak: {peak_registered} bytes registered, VmPin {peak_pinned_kb} kB (budget {} MiB)",
                    mib / 4
                );
            }
            Ok(Some(Figures {
                qps,
                src_peak_registered: peak_registered,
                dst_cpu_s: res["dst_cpu_s"].as_f64().unwrap_or(0.0),
                summary: s,
                counters: lab::Counters {
                    writes: after.writes - before.writes,
                    write_bytes: after.write_bytes - before.write_bytes,
                    completions: after.completions - before.completions,
                    maps: after.maps - before.maps,
                    extra_refused: after.extra_refused - before.extra_refused,
                },
            }))
        }
        Scenario::WrongSession => {
            let e = match r {
                Ok(_) => return Err("the migration succeeded with a stranger's session".into()),
                Err(e) => e,
            };
            println!("    source error: {e}: {}", chain(&e));
            if after.writes != before.writes {
                return Err("pages were written over a connection of another session".into());
            }
            if !src.is_running() || src.is_dirty_logging() {
                return Err("source VM not running again (or dirty log still on)".into());
            }
            let res = res.ok_or("destination gave no result")?;
            println!("    destination error: {dest_error}");
            if res["ok"] != false
                || res["running"] != false
                || !dest_error.to_string().contains("session")
            {
                return Err(format!("the destination must refuse the session: {res}"));
            }
            if res["live_registrations"] != 0 || res["pinned_kb"] != 0 {
                return Err(format!("destination left memory registered: {res}"));
            }
            Ok(None)
        }
        Scenario::DestKilled | Scenario::QpError | Scenario::BadRkey => {
            let e = match r {
                Ok(_) => return Err("the migration succeeded despite the fault".into()),
                Err(e) => e,
            };
            println!("    source error: {e}: {}", chain(&e));
            // The fault must have hit the RDMA path, not an earlier refusal or set-up error.
            if after.writes == before.writes {
                return Err("no RDMA WRITE was posted before the failure".into());
            }
            if !src.is_running() || src.is_dirty_logging() {
                return Err("source VM not running again (or dirty log still on)".into());
            }
            // Memory intact: the source's memory is still readable and the guest writes on.
            let w = src.writes();
            src.start_writer(WriterConfig {
                pages_per_sec: WRITES_PER_S,
                pattern: WritePattern::Sequential,
            });
            let until = Instant::now() + Duration::from_secs(5);
            while src.writes() <= w && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            src.stop_writer();
            if src.writes() <= w {
                return Err("the source's guest does not run after the failure".into());
            }
            if sc == Scenario::DestKilled {
                if !killed.load(Ordering::Relaxed) {
                    return Err("the destination was never killed".into());
                }
                return Ok(None);
            }
            let res = res.ok_or("destination gave no result")?;
            println!("    destination error: {dest_error}");
            if res["ok"] != false || res["running"] != false {
                return Err(format!("destination must fail and stay paused: {res}"));
            }
            if res["live_registrations"] != 0 || res["pinned_kb"] != 0 {
                return Err(format!("destination left memory registered: {res}"));
            }
            Ok(None)
        }
    }
}

fn run(args: &[String]) -> i32 {
    let Some(ip) = arg(args, "--addr").and_then(|a| a.parse::<IpAddr>().ok()) else {
        eprintln!("run: --addr IP");
        return 2;
    };
    let mib = arg(args, "--mib")
        .and_then(|m| m.parse().ok())
        .unwrap_or(64u64);
    println!(
        "rdma lab: {} RDMA device(s), {mib} MiB VM",
        lab::device_count()
    );
    if lab::device_count() == 0 {
        println!("FAIL setup: no RDMA device");
        println!("0 passed, 1 failed");
        return 1;
    }
    let (mut passed, mut failed) = (0, 0);
    let mut figures = Vec::new();
    for sc in [
        Scenario::Idle,
        Scenario::IdleOneQp,
        Scenario::Whole,
        Scenario::WholeOneQp,
        Scenario::Budget,
        Scenario::DestKilled,
        Scenario::QpError,
        Scenario::BadRkey,
        Scenario::WrongSession,
        Scenario::ExtraQp,
    ] {
        let t = Instant::now();
        match scenario(sc, ip, mib, None) {
            Ok(f) => {
                passed += 1;
                println!("PASS {} ({:.1} s)", sc.name(), t.elapsed().as_secs_f64());
                if let Some(f) = f.filter(|_| sc != Scenario::ExtraQp) {
                    figures.push((sc.name(), f));
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {}: {e}", sc.name());
            }
        }
    }
    // One queue pair against two, in the order 1, 2, 2, 1 (so neither profits from going
    // first or last), for contiguous memory (idle) and scattered pages (guest writing).
    for (pattern, sc) in [("idle", Scenario::Idle), ("writing", Scenario::Whole)] {
        let mut mib_s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut err = None;
        for q in [1, 2, 2, 1] {
            match scenario(sc, ip, mib, Some(q)) {
                Ok(Some(f)) => mib_s[q as usize - 1].push(f.summary.throughput_mib_s),
                Ok(None) => err = Some("no figures".to_string()),
                Err(e) => err = Some(e),
            }
        }
        let name = format!("compare-one-and-two-qps-{pattern}");
        match err {
            None => {
                passed += 1;
                println!("PASS {name}");
                let c = serde_json::json!({
                    "compare": pattern,
                    "mem_mib": mib,
                    "qps1_mib_s": mib_s[0],
                    "qps2_mib_s": mib_s[1],
                    "qps2_over_qps1": mib_s[1].iter().sum::<f64>() / mib_s[0].iter().sum::<f64>(),
                });
                println!("COMPARE {c}");
            }
            Some(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    for (name, f) in &figures {
        let s = &f.summary;
        let gib = f.counters.write_bytes as f64 / GIB;
        let per_gib = |x: u64| if gib > 0.0 { x as f64 / gib } else { 0.0 };
        let fig = serde_json::json!({
            "scenario": name,
            "qps": f.qps,
            "mem_mib": mib,
            "total_ms": s.total_ms,
            "downtime_ms": s.downtime_ms,
            "rounds": s.rounds,
            "throughput_mib_s": s.throughput_mib_s,
            "written_mib": f.counters.write_bytes as f64 / MIB as f64,
            "zero_pages_skipped": s.zero_pages_skipped,
            "src_cpu_s": s.src_cpu_s,
            "dst_cpu_s": f.dst_cpu_s,
            "cpu_s_per_gib": if gib > 0.0 { (s.src_cpu_s + f.dst_cpu_s) / gib } else { 0.0 },
            "work_requests_per_gib": per_gib(f.counters.writes),
            "completions_per_gib": per_gib(f.counters.completions),
            "chunk_maps": f.counters.maps,
            "src_peak_registered_mib": f.src_peak_registered as f64 / MIB as f64,
            "digest_match": s.digest_match,
        });
        println!("FIGURES {fig}");
    }
    println!("{passed} passed, {failed} failed");
    i32::from(failed > 0)
}
