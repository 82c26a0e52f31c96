//! `fastmig bench migration`: migrates the same VM with each transport (and optionally QEMU),
//! several times each, in one run, and writes a table (medians), a JSON file and an SVG chart.
//!
//! Every repetition starts a fresh source (`fastmig run`) and destination (`fastmig incoming`)
//! process, waits for the workload to reach its dirty rate, then runs `fastmig migrate --json`
//! and keeps its summary. Ratios between transports are meaningful within one run only: this
//! machine is noisy.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fastmig_migration::TransportKind;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::procs::{free_loopback_port, run_json, ChildVm};
use crate::usage;

/// `fastmig bench ...`
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Migrate one VM with several transports (and QEMU), repeatedly, and report medians.
    Migration(MigrationBenchArgs),
    /// Run a grid of real migrations over an emulated link; write sweep.csv and charts.
    Sweep(crate::sweep_cmd::SweepArgs),
    /// Redraw the chart of a `bench migration` run from its results.json.
    Chart {
        /// The `results.json` written by `bench migration`.
        results: PathBuf,
        /// Where to write the SVG.
        #[arg(long, default_value = "chart.svg")]
        out: PathBuf,
    },
}

/// Arguments of `fastmig bench migration`.
#[derive(clap::Args, Debug)]
pub struct MigrationBenchArgs {
    /// Guest memory size (K/M/G suffixes).
    #[arg(long, default_value = "1G", value_parser = crate::units::parse_mem, allow_hyphen_values = true)]
    pub mem: u64,
    /// Workload spec of the migrated VM, e.g. `dirty:rate=20000,wss=256M,pattern=random`.
    #[arg(long, default_value = "idle")]
    pub workload: String,
    /// vCPUs of the migrated VM (the `dirty` rate is split between them; one emulated vCPU
    /// tops out near 40-60k pages/s on this machine).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Comma-separated transports: classic, multi-tcp, shm, handover.
    #[arg(long, default_value = "classic,multi-tcp,shm", value_delimiter = ',', value_parser = crate::units::parse_transport)]
    pub transports: Vec<TransportKind>,
    /// Repetitions of each transport (the table shows medians).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Streams for multi-tcp (default: number of cores).
    #[arg(long)]
    pub streams: Option<usize>,
    /// Downtime limit passed to `migrate`.
    #[arg(long, default_value = "30ms", value_parser = crate::units::parse_duration)]
    pub downtime_limit: Duration,
    /// Bandwidth cap passed to `migrate` (bytes/s with K/M/G suffixes); none by default.
    #[arg(long, value_parser = crate::units::parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Also migrate a QEMU VM of the same size and dirty rate (`bench/peer-qemu.sh`, modes tcp and multifd).
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// Do not write non-zero data into all guest memory before the workload starts.
    #[arg(long)]
    pub no_prefill: bool,
    /// Seconds the workload runs on the source before the migration starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Output directory for `results.json`, `results.md` and `chart.svg`.
    #[arg(long, default_value = "bench/out/migration")]
    pub out: PathBuf,
    /// Print the child processes' logs.
    #[arg(long)]
    pub verbose: bool,
    /// Print the result as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Summary fields whose medians are reported, in table order.
const FIELDS: &[&str] = &[
    "guest_dirty_pps",
    "total_ms",
    "downtime_ms",
    "setup_ms",
    "rounds",
    "bytes_sent",
    "pages_sent",
    "throughput_mib_s",
    "src_cpu_s",
    "dst_cpu_s",
    "cpu_s_per_gib",
];

/// Runs a bench subcommand.
pub fn main(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Migration(args) => migration(args),
        BenchCommand::Sweep(args) => crate::sweep_cmd::main(args),
        BenchCommand::Chart { results, out } => {
            let text = std::fs::read_to_string(&results)
                .map_err(|e| usage!("cannot read {}: {e}", results.display()))?;
            let r: Value = serde_json::from_str(&text)
                .map_err(|e| usage!("{} is not a results.json: {e}", results.display()))?;
            let medians: BTreeMap<String, BTreeMap<String, f64>> =
                serde_json::from_value(r["medians"].clone())
                    .map_err(|e| usage!("{}: no medians: {e}", results.display()))?;
            let mem = fastmig_vmm::format_size(r["mem_bytes"].as_u64().unwrap_or(0));
            let workload = r["workload"].as_str().unwrap_or("?");
            crate::charts::migration_chart(&out, &mem, workload, &medians)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

fn migration(args: MigrationBenchArgs) -> Result<()> {
    let mem_bytes = args.mem;
    let transports = args.transports.clone();
    if args.repeat == 0 {
        return Err(usage!("--repeat must be at least 1"));
    }
    let spec: fastmig_vmm::WorkloadSpec = args
        .workload
        .parse()
        .map_err(|e| usage!("--workload: {e}"))?;
    let rate = workload_rate(&spec);
    if args.peer.is_some()
        && rate == 0
        && matches!(
            spec.kind,
            fastmig_vmm::WorkloadKind::Dirty | fastmig_vmm::WorkloadKind::Verify
        )
    {
        return Err(usage!(
            "--peer qemu needs a paced workload (rate > 0): QEMU's guest has no unpaced mode"
        ));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let work = tempfile::Builder::new().prefix("fastmig-bench").tempdir()?;

    let total_runs = transports.len() * args.repeat;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total_runs as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:30} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut runs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for transport in &transports {
        let name = transport.name();
        for rep in 0..args.repeat {
            bar.set_message(format!("{name} #{}", rep + 1));
            let summary = one_migration(&args, *transport, work.path(), rep)
                .with_context(|| format!("{name} repetition {}", rep + 1))?;
            runs.entry(name.to_string()).or_default().push(summary);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    if args.peer.as_deref() == Some("qemu") {
        for mode in ["tcp", "multifd"] {
            eprintln!("bench: QEMU peer, {mode} ...");
            let rows = qemu_peer(&args, mode, rate)?;
            runs.insert(format!("qemu-{mode}"), rows);
        }
    }

    for rows in runs.values_mut() {
        for row in rows.iter_mut() {
            add_cpu_per_gib(row, mem_bytes);
        }
    }
    let medians: BTreeMap<String, BTreeMap<String, f64>> = runs
        .iter()
        .map(|(t, rows)| (t.clone(), median_fields(rows)))
        .collect();
    let result = json!({
        "mem_bytes": mem_bytes,
        "workload": args.workload,
        "vcpus": args.vcpus,
        "repeat": args.repeat,
        "downtime_limit": format!("{}ms", args.downtime_limit.as_millis()),
        "prefill": !args.no_prefill,
        "medians": medians,
        "runs": runs,
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)?)?;
    let table = markdown_table(&medians);
    std::fs::write(args.out.join("results.md"), &table)?;
    let chart = args.out.join("chart.svg");
    let mem = fastmig_vmm::format_size(args.mem);
    crate::charts::migration_chart(&chart, &mem, &args.workload, &medians)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "mem {mem} workload {} ({} repetitions, medians; guest_dirty_pps: distinct pages/s the guest dirtied, at most the workload's requested rate; pages_sent: over all rounds)\n",
            args.workload, args.repeat
        );
        println!("{table}");
        println!(
            "wrote {}, {}, {}",
            json_path.display(),
            args.out.join("results.md").display(),
            chart.display()
        );
    }
    Ok(())
}

/// The guest's dirty rate in pages/s, for the QEMU peer: 0 for workloads that do not keep
/// writing (`idle`, `fill`).
fn workload_rate(spec: &fastmig_vmm::WorkloadSpec) -> u64 {
    match spec.kind {
        fastmig_vmm::WorkloadKind::Dirty | fastmig_vmm::WorkloadKind::Verify => spec.rate,
        _ => 0,
    }
}

fn one_migration(
    args: &MigrationBenchArgs,
    transport: TransportKind,
    work: &Path,
    rep: usize,
) -> Result<Value> {
    let name = transport.name();
    let mem_bytes = args.mem;
    let src_api = work.join(format!("src-{name}-{rep}.sock"));
    let dst_api = work.join(format!("dst-{name}-{rep}.sock"));
    let addr = match transport {
        TransportKind::Shm | TransportKind::Handover => {
            format!("unix:{}", work.join(format!("mig-{rep}.sock")).display())
        }
        _ => format!("127.0.0.1:{}", free_loopback_port()?),
    };
    let mut run_args = vec![
        "run".to_string(),
        "--mem".into(),
        mem_bytes.to_string(),
        "--workload".into(),
        args.workload.clone(),
        "--api".into(),
        src_api.display().to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
    ];
    if !args.no_prefill {
        run_args.push("--prefill".into());
    }
    let boot = Duration::from_secs(120);
    let mut src = ChildVm::spawn("source", &run_args, work, args.verbose, boot)?;
    src.wait_status("running", boot, |st| {
        st.status == fastmig_host::RunStatus::Running
    })?;
    let dst_args = vec![
        "incoming".to_string(),
        "--listen".into(),
        addr.clone(),
        "--api".into(),
        dst_api.display().to_string(),
        "--mem".into(),
        mem_bytes.to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
    ];
    let mut dst = ChildVm::spawn("destination", &dst_args, work, args.verbose, boot)?;
    dst.wait_status("listening", boot, |st| st.listening == Some(true))?;
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s.max(0.0)));
    // The rate the guest really reaches (distinct pages/s from the dirty log), not the target.
    let guest_rate = src.client.query_status()?.dirty_rate_pps;

    let mut mig_args = vec![
        "migrate".to_string(),
        "--api".into(),
        src_api.display().to_string(),
        "--to".into(),
        addr,
        "--transport".into(),
        name.to_string(),
        "--downtime-limit".into(),
        format!("{}us", args.downtime_limit.as_micros()),
        "--json".into(),
    ];
    if let TransportKind::MultiTcp { streams } = transport {
        let n = args.streams.map_or(streams as usize, |n| n);
        mig_args.extend(["--streams".to_string(), n.to_string()]);
    }
    if let Some(bw) = args.max_bandwidth {
        mig_args.extend(["--max-bandwidth".to_string(), bw.to_string()]);
    }
    let mut summary = run_json(&mig_args)?;
    summary["guest_dirty_pps"] = json!(guest_rate);
    if summary["status"] != "completed" {
        bail!("migration did not complete: {summary}");
    }
    dst.quit().ok();
    src.quit().ok();
    Ok(summary)
}

fn qemu_peer(args: &MigrationBenchArgs, mode: &str, rate: u64) -> Result<Vec<Value>> {
    let script = Path::new("bench/peer-qemu.sh");
    if !script.exists() {
        return Err(usage!(
            "--peer qemu needs bench/peer-qemu.sh: run from the repository root"
        ));
    }
    let limit_ms = args.downtime_limit.as_millis();
    let mem = args.mem.to_string();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(script)
        .args(["--mem", &mem, "--rate", &rate.to_string(), "--mode", mode])
        .args(["--repeat", &args.repeat.to_string()])
        .args(["--downtime-limit", &limit_ms.to_string()]);
    if mode == "multifd" {
        let streams = args.streams.unwrap_or_else(default_streams);
        cmd.args(["--channels", &streams.to_string()]);
    }
    if let Some(wss) = workload_key(&args.workload, "wss") {
        cmd.args(["--wss", &wss]);
    }
    if let Some(p) = workload_key(&args.workload, "pattern") {
        cmd.args(["--pattern", &p]);
    }
    let out = cmd
        .stderr(if args.verbose {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .output()
        .context("running bench/peer-qemu.sh")?;
    if !out.status.success() {
        bail!("bench/peer-qemu.sh --mode {mode} failed ({})", out.status);
    }
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing bench/peer-qemu.sh output")?;
    if rows.is_empty() {
        bail!("bench/peer-qemu.sh --mode {mode} printed no result");
    }
    Ok(rows)
}

fn workload_key(spec: &str, key: &str) -> Option<String> {
    spec.split_once(':')?
        .1
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// Default stream count: the number of cores.
pub fn default_streams() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Source plus destination CPU seconds per GiB of guest memory migrated.
fn add_cpu_per_gib(row: &mut Value, mem_bytes: u64) {
    let cpu = row["src_cpu_s"].as_f64().unwrap_or(0.0) + row["dst_cpu_s"].as_f64().unwrap_or(0.0);
    let gib = mem_bytes as f64 / (1u64 << 30) as f64;
    if let Value::Object(map) = row {
        map.insert("cpu_s_per_gib".into(), json!(cpu / gib));
    }
}

/// Median of each numeric summary field over the repetitions.
fn median_fields(rows: &[Value]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for field in FIELDS {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| r[*field].as_f64()).collect();
        if let Some(m) = median(&mut v) {
            out.insert(field.to_string(), m);
        }
    }
    out
}

/// Median (mean of the middle two for an even count); `None` for no values.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn markdown_table(medians: &BTreeMap<String, BTreeMap<String, f64>>) -> String {
    let mut s = String::from("| transport |");
    for f in FIELDS {
        s.push_str(&format!(" {f} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(FIELDS.len()));
    s.push('\n');
    for (t, m) in medians {
        s.push_str(&format!("| {t} |"));
        for f in FIELDS {
            match m.get(*f) {
                Some(v) if v.abs() >= 100.0 => s.push_str(&format!(" {v:.0} |")),
                Some(v) => s.push_str(&format!(" {v:.3} |")),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn rate_and_keys_are_read_from_a_workload_spec() {
        let rate = |s: &str| workload_rate(&s.parse().expect("spec"));
        assert_eq!(rate("dirty:rate=20000,wss=256M"), 20000);
        assert_eq!(rate("dirty"), 1000, "the workload's default rate");
        assert_eq!(rate("idle"), 0);
        assert_eq!(rate("fill:rate=500"), 0);
        assert_eq!(
            workload_key("dirty:rate=5,pattern=seq", "pattern").as_deref(),
            Some("seq")
        );
    }

    #[test]
    fn cpu_per_gib_adds_both_sides() {
        let mut row = json!({"src_cpu_s": 1.0, "dst_cpu_s": 0.5});
        add_cpu_per_gib(&mut row, 512 << 20);
        assert_eq!(row["cpu_s_per_gib"], json!(3.0));
    }
}
