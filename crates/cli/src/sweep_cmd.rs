//! `fastmig bench sweep`: a grid of real migrations, one CSV row per run, and charts.
//!
//! Each run starts a source (`fastmig run`, prefilled, with the grid point's workload) and a
//! destination (`fastmig incoming`), measures the guest's write rate, and migrates with
//! `fastmig migrate --json`. TCP transports cross an emulated link ([`crate::netns::Link`]:
//! two namespaces, a veth pair, `tc tbf` on the source side); shm and handover stay on one
//! host (unix sockets). Rows are appended as runs finish, so an interrupted sweep resumes
//! where it stopped: points whose key is already in the CSV are skipped.
//!
//! The grid is JSON (`--grid FILE`, shape of [`Grid`]); `--quick` and the default are built
//! in. Its `test` blocks are the held-out runs: other sizes, rates and bandwidths than the
//! `train` blocks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fastmig_model::{OnNoConverge, Pattern, Transport};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::netns::{Link, DST_ADDR};
use crate::procs::{run_json, ChildVm};
use crate::sweep_row::{self, RunStatus, Split, SweepRow};
use crate::{units, usage};

/// Arguments of `fastmig bench sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// The small built-in grid: 28 runs of 64M-256M VMs, under three minutes.
    #[arg(long, conflicts_with = "grid")]
    pub quick: bool,
    /// A grid file (JSON); default: the built-in full grid.
    ///
    /// Shape: `{"repeat": N, "train": [BLOCK...], "test": [BLOCK...]}`; each block runs the
    /// product of its lists: `mem` (e.g. "256M"), `workload` (`{"pattern": "random", "rate":
    /// 5000, "wss": "32M"}`), `link` ("128M" bytes/s or "10gbit", `null` for none), `transport`, and
    /// optionally `cap`, `downtime_limit` (["30ms"]), `streams` (2), `on_no_converge`
    /// ("force") and `max_rounds` (30). `train` runs fit the model, `test` runs check it.
    /// Repetitions go round the whole grid, so each point's runs are spread over the sweep.
    /// Example: bench/characterisation/current/cpu-interleaved/grid.json.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Output directory: `sweep.csv` and the charts.
    #[arg(long)]
    pub out: PathBuf,
    /// Seconds the workload runs before its rate is measured and the migration starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Only redraw the charts from the CSV.
    #[arg(long)]
    pub charts_only: bool,
    /// Show the child processes' logs.
    #[arg(long)]
    pub verbose: bool,
}

/// A workload of the grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadAxis {
    /// Write pattern.
    pub pattern: Pattern,
    /// Target writes/s; 0 = an idle guest.
    pub rate: u64,
    /// Working set (clamped to half the memory).
    pub wss: String,
}

/// A block of the grid: the cartesian product of its lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Axes {
    /// Memory sizes.
    pub mem: Vec<String>,
    /// Workloads.
    pub workload: Vec<WorkloadAxis>,
    /// Links (`null` = unlimited); ignored by shm and handover.
    pub link: Vec<Option<String>>,
    /// Transport caps (`null` = none).
    #[serde(default = "no_cap")]
    pub cap: Vec<Option<String>>,
    /// Transports.
    pub transport: Vec<Transport>,
    /// Streams of multi-tcp.
    #[serde(default = "two")]
    pub streams: u32,
    /// Downtime limits.
    #[serde(default = "thirty_ms")]
    pub downtime_limit: Vec<String>,
    /// Non-convergence policy (`force` keeps a measured row for every run).
    #[serde(default = "force")]
    pub on_no_converge: OnNoConverge,
    /// Round limit.
    #[serde(default = "thirty")]
    pub max_rounds: u32,
}

fn no_cap() -> Vec<Option<String>> {
    vec![None]
}
fn two() -> u32 {
    2
}
fn thirty_ms() -> Vec<String> {
    vec!["30ms".into()]
}
fn force() -> OnNoConverge {
    OnNoConverge::Force
}
fn thirty() -> u32 {
    30
}

/// A sweep grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grid {
    /// Repetitions of every point.
    pub repeat: u32,
    /// Fitting blocks.
    pub train: Vec<Axes>,
    /// Held-out blocks.
    #[serde(default)]
    pub test: Vec<Axes>,
}

const QUICK: &str = r#"{
  "repeat": 1,
  "train": [{
    "mem": ["64M", "128M", "256M"],
    "workload": [{"pattern": "random", "rate": 0, "wss": "4M"},
                 {"pattern": "random", "rate": 5000, "wss": "16M"}],
    "link": [null, "128M"],
    "transport": ["classic", "multi-tcp"]
  }],
  "test": [{
    "mem": ["192M"],
    "workload": [{"pattern": "seq", "rate": 3000, "wss": "24M"}],
    "link": [null, "96M"],
    "transport": ["classic", "multi-tcp"]
  }]
}"#;

const FULL: &str = r#"{
  "repeat": 1,
  "train": [{
    "mem": ["64M", "256M"],
    "workload": [{"pattern": "random", "rate": 0, "wss": "4M"},
                 {"pattern": "random", "rate": 5000, "wss": "32M"},
                 {"pattern": "seq", "rate": 5000, "wss": "32M"},
                 {"pattern": "hotcold", "rate": 10000, "wss": "32M"}],
    "link": [null, "1gbit", "64M"],
    "transport": ["classic", "multi-tcp", "shm"]
  }, {
    "mem": ["512M"],
    "workload": [{"pattern": "random", "rate": 0, "wss": "4M"},
                 {"pattern": "random", "rate": 20000, "wss": "64M"}],
    "link": [null, "64M"],
    "transport": ["classic", "multi-tcp", "shm"]
  }],
  "test": [{
    "mem": ["128M", "384M"],
    "workload": [{"pattern": "random", "rate": 10000, "wss": "48M"},
                 {"pattern": "hotcold", "rate": 5000, "wss": "32M"},
                 {"pattern": "seq", "rate": 2000, "wss": "16M"}],
    "link": [null, "512mbit", "128M"],
    "transport": ["classic", "multi-tcp", "shm"]
  }, {
    "mem": ["192M"],
    "workload": [{"pattern": "random", "rate": 30000, "wss": "96M"}],
    "link": [null, "48M"],
    "downtime_limit": ["300ms"],
    "transport": ["classic", "multi-tcp", "shm"]
  }]
}"#;

/// One run to do.
#[derive(Debug, Clone)]
struct Point {
    key: String,
    split: Split,
    rep: u32,
    mem: u64,
    pattern: Pattern,
    rate: u64,
    wss: u64,
    link: Option<f64>,
    cap: Option<f64>,
    transport: Transport,
    streams: u32,
    limit: Duration,
    policy: OnNoConverge,
    max_rounds: u32,
}

/// Expands the grid into its runs (duplicates, as links for transports that use none,
/// removed).
fn points(grid: &Grid) -> Result<Vec<Point>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (split, blocks) in [(Split::Train, &grid.train), (Split::Test, &grid.test)] {
        for a in blocks {
            for mem in &a.mem {
                let mem = units::parse_size(mem).map_err(anyhow::Error::msg)?;
                for w in &a.workload {
                    let wss = units::parse_size(&w.wss)
                        .map_err(anyhow::Error::msg)?
                        .min(mem / 2)
                        / 4096
                        * 4096;
                    for link in &a.link {
                        for cap in &a.cap {
                            for &transport in &a.transport {
                                for limit in &a.downtime_limit {
                                    let link = match (link, transport.uses_link()) {
                                        (Some(l), true) => Some(
                                            units::parse_bandwidth(l).map_err(anyhow::Error::msg)?
                                                as f64,
                                        ),
                                        _ => None,
                                    };
                                    let cap = cap
                                        .as_deref()
                                        .map(units::parse_bandwidth)
                                        .transpose()
                                        .map_err(anyhow::Error::msg)?;
                                    let limit =
                                        units::parse_duration(limit).map_err(anyhow::Error::msg)?;
                                    for rep in 0..grid.repeat.max(1) {
                                        let key = format!(
                                            "{}|{}|{:?}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}|{rep}",
                                            match split {
                                                Split::Train => "train",
                                                Split::Test => "test",
                                            },
                                            mem,
                                            w.pattern,
                                            w.rate,
                                            wss,
                                            link.map(|l| l.to_string()).unwrap_or_default(),
                                            cap.map(|c| c.to_string()).unwrap_or_default(),
                                            transport,
                                            a.streams,
                                            limit.as_micros(),
                                            a.on_no_converge,
                                            a.max_rounds,
                                        );
                                        if seen.insert(key.clone()) {
                                            out.push(Point {
                                                key,
                                                split,
                                                rep,
                                                mem,
                                                pattern: w.pattern,
                                                rate: w.rate,
                                                wss,
                                                link,
                                                cap: cap.map(|c| c as f64),
                                                transport,
                                                streams: a.streams,
                                                limit,
                                                policy: a.on_no_converge,
                                                max_rounds: a.max_rounds,
                                            });
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Repetitions go round the whole grid (every point once, then every point again), not
    // back to back: the machine's state drifts over minutes, and back-to-back repetitions
    // let that drift fall on whole points, which then all look faster or slower together.
    out.sort_by_key(|p| p.rep);
    Ok(out)
}

/// Runs `fastmig bench sweep`.
pub fn main(args: SweepArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let csv = args.out.join("sweep.csv");
    if args.charts_only {
        return charts(&args.out, &csv);
    }
    let text = match &args.grid {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| usage!("cannot read grid {}: {e}", p.display()))?,
        None if args.quick => QUICK.into(),
        None => FULL.into(),
    };
    let grid: Grid = serde_json::from_str(&text).map_err(|e| usage!("bad grid: {e}"))?;
    let all = points(&grid)?;
    let done: BTreeSet<String> = if csv.exists() {
        sweep_row::read(&csv)?.into_iter().map(|r| r.key).collect()
    } else {
        BTreeSet::new()
    };
    let todo: Vec<&Point> = all.iter().filter(|p| !done.contains(&p.key)).collect();
    eprintln!(
        "sweep: {} runs in the grid, {} already in {}, {} to do",
        all.len(),
        all.len() - todo.len(),
        csv.display(),
        todo.len()
    );
    let signalled =
        || fastmig_host::run::termination_flag().load(std::sync::atomic::Ordering::SeqCst);
    signalled();
    let work = tempfile::Builder::new().prefix("fastmig-sweep").tempdir()?;
    let link = if todo.iter().any(|p| p.transport.uses_link()) {
        Some(Link::create()?)
    } else {
        None
    };
    let started = Instant::now();
    for (i, p) in todo.iter().enumerate() {
        if signalled() {
            bail!(
                "interrupted; {} runs kept in {}: run again to resume",
                done.len() + i,
                csv.display()
            );
        }
        let eta = if i == 0 {
            "?".to_string()
        } else {
            let left = started.elapsed().as_secs_f64() / i as f64 * (todo.len() - i) as f64;
            format!("{}m{:02}s", (left / 60.0) as u64, left as u64 % 60)
        };
        eprintln!(
            "sweep: run {} of {}, ETA {eta}: {}",
            i + 1,
            todo.len(),
            p.key
        );
        let row = one_run(&args, p, link.as_ref(), work.path(), i);
        if signalled() {
            // The children got the Ctrl-C too: this run's failure is the interrupt's.
            bail!(
                "interrupted; {} runs kept in {}: run again to resume",
                done.len() + i,
                csv.display()
            );
        }
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sweep: run failed: {}", crate::error::one_line(&e));
                failed_row(p, &e)
            }
        };
        sweep_row::append(&csv, &[row])?;
    }
    drop(link);
    let pid = std::process::id().to_string();
    let left: Vec<String> = crate::netns::leftovers()
        .into_iter()
        .filter(|l| l.contains(&pid))
        .collect();
    if !left.is_empty() {
        bail!(
            "the emulated link was not fully removed: {}",
            left.join("; ")
        );
    }
    charts(&args.out, &csv)?;
    eprintln!(
        "sweep: wrote {} and charts in {}",
        csv.display(),
        args.out.display()
    );
    Ok(())
}

fn one_run(
    args: &SweepArgs,
    p: &Point,
    link: Option<&Link>,
    work: &Path,
    i: usize,
) -> Result<SweepRow> {
    let src_api = work.join(format!("src-{i}.sock"));
    let dst_api = work.join(format!("dst-{i}.sock"));
    let (src_wrap, dst_wrap, addr) = match (p.transport.uses_link(), link) {
        (true, Some(l)) => {
            l.shape(p.link)?;
            (
                l.in_src(),
                l.in_dst(),
                format!("{DST_ADDR}:{}", 40000 + i % 20000),
            )
        }
        (true, None) => bail!("a TCP run needs the emulated link"),
        (false, _) => (
            Vec::new(),
            Vec::new(),
            format!("unix:{}", work.join(format!("mig-{i}.sock")).display()),
        ),
    };
    let workload = if p.rate == 0 {
        "idle".to_string()
    } else {
        format!(
            "dirty:rate={},wss={},pattern={}",
            p.rate,
            p.wss,
            pattern_name(p.pattern)
        )
    };
    // One emulated vCPU writes at most ~40k pages/s.
    let vcpus = if p.rate > 25_000 { 2 } else { 1 };
    let run_args: Vec<String> = vec![
        "run".into(),
        "--mem".into(),
        p.mem.to_string(),
        "--workload".into(),
        workload,
        "--api".into(),
        src_api.display().to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--prefill".into(),
    ];
    let boot = Duration::from_secs(120);
    let mut src = ChildVm::spawn_wrapped("source", &src_wrap, &run_args, work, args.verbose, boot)?;
    src.wait_status("running", boot, |st| {
        st.status == fastmig_host::RunStatus::Running
    })?;
    let dst_args: Vec<String> = vec![
        "incoming".into(),
        "--listen".into(),
        addr.clone(),
        "--api".into(),
        dst_api.display().to_string(),
        "--mem".into(),
        p.mem.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
    ];
    let mut dst = ChildVm::spawn_wrapped(
        "destination",
        &dst_wrap,
        &dst_args,
        work,
        args.verbose,
        boot,
    )?;
    dst.wait_status("listening", boot, |st| st.listening == Some(true))?;
    // The write rate the guest really reaches under this machine's load: the model's input.
    let st0 = src.client.query_status()?;
    let cpu0 = cpu_times();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s.max(0.2)));
    let st1 = src.client.query_status()?;
    let cpu_idle = match (cpu0, cpu_times()) {
        (Some((idle0, all0)), Some((idle1, all1))) if all1 > all0 => {
            Some(idle1.saturating_sub(idle0) as f64 / (all1 - all0) as f64)
        }
        _ => None,
    };
    let written = st1.pages_written.unwrap_or(0) as f64 - st0.pages_written.unwrap_or(0) as f64;
    let write_pps = written / t0.elapsed().as_secs_f64();
    let dirty_pps = st1.dirty_rate_pps;
    let mut mig: Vec<String> = vec![
        "migrate".into(),
        "--api".into(),
        src_api.display().to_string(),
        "--to".into(),
        addr,
        "--transport".into(),
        p.transport.name().into(),
        "--downtime-limit".into(),
        format!("{}us", p.limit.as_micros()),
        "--max-rounds".into(),
        p.max_rounds.to_string(),
        "--on-no-converge".into(),
        policy_name(p.policy).into(),
        "--timeout".into(),
        "60s".into(),
        "--json".into(),
    ];
    if p.transport == Transport::MultiTcp {
        mig.extend(["--streams".into(), p.streams.to_string()]);
    }
    if let Some(cap) = p.cap {
        mig.extend(["--max-bandwidth".into(), (cap as u64).to_string()]);
    }
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let summary = run_json(&mig)?;
    dst.quit().ok();
    src.quit().ok();
    let mut row = failed_row(p, &anyhow::anyhow!(""));
    row.guest_write_pps = write_pps;
    row.guest_dirty_pps = dirty_pps;
    row.load1 = load1;
    row.cpu_idle = cpu_idle;
    fill_summary(&mut row, &summary)?;
    Ok(row)
}

/// Idle (idle + iowait) and total jiffies of all cores, from the first line of /proc/stat
/// (`cpu  user nice system idle iowait irq softirq steal ...`); `None` where unreadable.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let idle = v.get(3)? + v.get(4)?;
    Some((idle, v.iter().sum()))
}

fn pattern_name(p: Pattern) -> &'static str {
    match p {
        Pattern::Seq => "seq",
        Pattern::Random => "random",
        Pattern::HotCold => "hotcold",
    }
}

fn policy_name(p: OnNoConverge) -> &'static str {
    match p {
        OnNoConverge::Wait => "wait",
        OnNoConverge::Force => "force",
        OnNoConverge::Abort => "abort",
    }
}

/// The row of a run that produced no summary.
fn failed_row(p: &Point, e: &anyhow::Error) -> SweepRow {
    SweepRow {
        key: p.key.clone(),
        split: p.split,
        rep: p.rep,
        mem_bytes: p.mem,
        pattern: p.pattern,
        target_write_pps: p.rate as f64,
        guest_write_pps: 0.0,
        guest_dirty_pps: 0.0,
        wss_bytes: p.wss,
        link_bytes_s: p.link,
        cap_bytes_s: p.cap,
        transport: p.transport,
        streams: p.streams,
        cpu_share: 1.0,
        load1: 0.0,
        cpu_idle: None,
        downtime_limit_ms: p.limit.as_secs_f64() * 1e3,
        max_rounds: p.max_rounds,
        on_no_converge: p.policy,
        status: RunStatus::Failed,
        error: crate::error::one_line(e),
        total_ms: 0.0,
        downtime_ms: 0.0,
        setup_ms: 0.0,
        dst_setup_ms: 0.0,
        rounds: 0,
        bytes_sent: 0,
        pages_sent: 0,
        zero_pages_skipped: 0,
        throughput_mib_s: 0.0,
        src_cpu_s: 0.0,
        dst_cpu_s: 0.0,
        digest_match: false,
        round_ms: String::new(),
        round_bytes: String::new(),
    }
}

/// Copies `migrate --json`'s line into the row: a failure (`status` other than `completed`,
/// with its `error`), or the typed summary plus `forced` (a forced stop-and-copy is printed
/// as `completed` with `forced: true`).
fn fill_summary(row: &mut SweepRow, line: &Value) -> Result<()> {
    if line["status"] != "completed" {
        row.error = line["error"].as_str().unwrap_or("no summary").to_string();
        return Ok(());
    }
    let forced = line["forced"].as_bool().unwrap_or(false);
    let s: fastmig_migration::MigrationSummary =
        serde_json::from_value(line.clone()).context("reading the summary of `migrate --json`")?;
    row.status = if forced || s.status == fastmig_migration::MigrationStatus::CompletedForced {
        RunStatus::CompletedForced
    } else {
        RunStatus::Completed
    };
    row.error.clear();
    row.total_ms = s.total_ms;
    row.downtime_ms = s.downtime_ms;
    row.setup_ms = s.setup_ms;
    row.dst_setup_ms = s.dst_setup_ms;
    row.rounds = s.rounds;
    row.bytes_sent = s.bytes_sent;
    row.pages_sent = s.pages_sent;
    row.zero_pages_skipped = s.zero_pages_skipped;
    row.throughput_mib_s = s.throughput_mib_s;
    row.src_cpu_s = s.src_cpu_s;
    row.dst_cpu_s = s.dst_cpu_s;
    row.digest_match = s.digest_match;
    let join = |f: &dyn Fn(&fastmig_migration::RoundStats) -> String| {
        s.round_details.iter().map(f).collect::<Vec<_>>().join(";")
    };
    row.round_ms = join(&|r| r.ms.to_string());
    row.round_bytes = join(&|r| r.bytes.to_string());
    Ok(())
}

fn charts(out: &Path, csv: &Path) -> Result<()> {
    let rows: Vec<SweepRow> = sweep_row::read(csv)?
        .into_iter()
        .filter(|r| r.status != RunStatus::Failed)
        .collect();
    crate::sweep_charts::draw(out, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_forced_completion_is_recorded_as_forced() {
        let grid: Grid = serde_json::from_str(QUICK).expect("quick grid");
        let pts = points(&grid).expect("points");
        let round = |round: u32, ms: f64, bytes: u64| fastmig_migration::RoundStats {
            round,
            pages: bytes / 4096,
            zero_pages: 0,
            bytes,
            ms,
            bandwidth_mib_s: 0.0,
            dirty_rate_pages_s: 0.0,
            stop_and_copy: round == 2,
        };
        // As `migrate --json` prints it: the summary, `status` "completed" and `forced`.
        let summary = |forced: bool| {
            let mut v = serde_json::to_value(fastmig_migration::MigrationSummary {
                status: fastmig_migration::MigrationStatus::Completed,
                transport: "classic".into(),
                total_ms: 10.0,
                downtime_ms: 0.5,
                setup_ms: 0.2,
                dst_setup_ms: 0.1,
                rounds: 2,
                bytes_sent: 4096,
                pages_sent: 1,
                zero_pages_skipped: 0,
                throughput_mib_s: 0.4,
                src_cpu_s: 0.01,
                dst_cpu_s: 0.01,
                digest_match: true,
                round_details: vec![round(1, 8.5, 4096), round(2, 0.5, 0)],
            })
            .expect("summary");
            v["forced"] = json!(forced);
            v
        };
        let mut row = failed_row(&pts[0], &anyhow::anyhow!(""));
        fill_summary(&mut row, &summary(true)).expect("fill");
        assert_eq!(row.status, RunStatus::CompletedForced);
        fill_summary(&mut row, &summary(false)).expect("fill");
        assert_eq!(row.status, RunStatus::Completed);
        assert_eq!(
            (row.round_ms.as_str(), row.round_bytes.as_str()),
            ("8.5;0.5", "4096;0")
        );
        let mut failed = failed_row(&pts[0], &anyhow::anyhow!(""));
        fill_summary(&mut failed, &json!({"status": "failed", "error": "boom"})).expect("fill");
        assert_eq!(
            (failed.status, failed.error.as_str()),
            (RunStatus::Failed, "boom")
        );
    }

    #[test]
    fn repetitions_go_round_the_whole_grid() {
        let mut grid: Grid = serde_json::from_str(QUICK).expect("quick grid");
        grid.repeat = 3;
        let pts = points(&grid).expect("points");
        let n = pts.len() / 3;
        assert_eq!(pts.len(), 3 * n);
        // Each third of the runs is one repetition of every point, in the same order.
        let point = |p: &Point| p.key.rsplit_once('|').map(|(k, _)| k.to_string());
        for (i, p) in pts.iter().enumerate() {
            assert_eq!(p.rep as usize, i / n, "run {i}");
            assert_eq!(point(p), point(&pts[i % n]), "run {i}");
        }
    }

    #[test]
    fn grids_expand_without_links_for_same_host_transports() {
        let grid: Grid = serde_json::from_str(FULL).expect("full grid");
        let pts = points(&grid).expect("points");
        // train: 2 sizes × 4 workloads × (3 links × 2 TCP transports + 1 shm) = 56, plus
        // 1 × 2 × (2 × 2 + 1) = 10; test: 2 × 3 × 7 = 42, plus 1 × 1 × 5 = 5.
        assert_eq!(pts.len(), 113);
        assert!(pts
            .iter()
            .filter(|p| p.transport == Transport::Shm)
            .all(|p| p.link.is_none()));
        let keys: BTreeSet<&String> = pts.iter().map(|p| &p.key).collect();
        assert_eq!(keys.len(), pts.len(), "keys are unique");
        let quick: Grid = serde_json::from_str(QUICK).expect("quick");
        assert!(points(&quick)
            .expect("quick points")
            .iter()
            .all(|p| p.mem <= 256 << 20));
    }
}
