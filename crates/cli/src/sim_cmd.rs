//! `fastmig simulate`: runs the consolidation simulator (crate `fastmig-sim`) on PlanetLab,
//! Google cluster-data or CSV traces, one policy, a sweep (`--sweep`, `--migration-sweep`) or
//! the energy/SLAV frontier (`--frontier`, in `frontier.rs`), and writes tables, CSV and SVG
//! charts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use fastmig_sim::cost::{CloudSimCost, MigrationCostModel, MigrationProfile};
use fastmig_sim::{simulate, DatacenterSpec, PolicySpec, SimOptions, SimResult, Simulation, Trace};
use plotters::prelude::*;

use crate::charts::plot_err;
use serde::Serialize;

use crate::usage;

mod frontier;
mod model_spec;
mod tables;
use fastmig_model::Transport;
use model_spec::{ModelRow, ModelSpec};
use tables::{
    print_text, read_reference, rel, write_csv, Fixed, PolicyCsvRow, Shown, SimResultRef,
    SpeedCsvRow,
};

/// Migration speeds of `--migration-sweep`, Gbit/s.
const SWEEP_SPEEDS_GBIT: [f64; 4] = [0.25, 1.0, 10.0, 40.0];

/// Arguments of `fastmig simulate`.
#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Trace: a PlanetLab day directory (one file per VM), a Google cluster-data directory
    /// (`CPU MEMORY` percent per line; the memory sets the model's working set), a directory
    /// of such days, or a `.csv` file (`name,u0,u1,...` in percent). Repeat for several days.
    #[arg(long, required = true)]
    trace: Vec<PathBuf>,
    /// Policy: `npa`, `dvfs` or DETECTOR-SELECTOR with DETECTOR in thr|iqr|mad|lr|lrr and
    /// SELECTOR in mmt|mc|mu|rs (e.g. `lr-mmt`).
    #[arg(long, default_value = "lr-mmt")]
    policy: String,
    /// Detector safety parameter (default: CloudSim's, THR 0.8, IQR 1.5, MAD 2.5, LR/LRR 1.2).
    #[arg(long)]
    param: Option<f64>,
    /// Print one JSON object (or one per line for several days) instead of text.
    #[arg(long)]
    json: bool,
    /// Migration cost: `cloudsim` (RAM / half of 1 Gbit/s), `gbit=N` (N Gbit/s for the
    /// migration stream), `profile:FILE.json` (see `MigrationProfile`) or
    /// `model:MODEL.json[,transport=classic|multi-tcp|shm|handover][,link=host|10gbit|32mib][,dirty=PAGES_PER_S]`
    /// (the fitted pre-copy model; defaults classic, the host's link, 10000 pages/s at full
    /// CPU).
    #[arg(long, default_value = "cloudsim")]
    migration: String,
    /// Run every reference policy (NPA, DVFS, 5 detectors x 4 selectors) over every day and
    /// write a table, a CSV and charts into `--out`.
    #[arg(long)]
    sweep: bool,
    /// Run `--policy` at 0.25, 1, 10 and 40 Gbit/s migration bandwidth (plus CloudSim's model,
    /// and the fitted model's rows with `--model`) over every day and write a table, a CSV and
    /// a chart into `--out`.
    #[arg(long)]
    migration_sweep: bool,
    /// With `--migration-sweep` or `--frontier`: a fitted model (`fastmig model fit`) whose
    /// rows (curves) are added: classic at 32 MiB/s (2011's default cap), and classic,
    /// multi-tcp and shm-class rates on 1 and 10 Gbit/s links (transports the model lacks are
    /// skipped).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Energy against SLAV for each migration cost (CloudSim's formula, and the `--model`
    /// rows): every detector's safety parameter swept with `--policy`'s selector, one Pareto
    /// curve per cost, and the energy each needs at the SLAV `--policy` reaches with
    /// CloudSim's formula. Writes frontier.csv, frontier.md and frontier.svg into `--out`.
    #[arg(long, conflicts_with_all = ["sweep", "migration_sweep"])]
    frontier: bool,
    /// Detectors whose parameter `--frontier` sweeps, comma-separated.
    #[arg(long, default_value = "thr,iqr,mad,lr,lrr", requires = "frontier")]
    frontier_detectors: String,
    /// Output directory for sweeps.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// Scale factor: round(800 x F) hosts and round(VMs x F) VMs, VM i replaying trace
    /// i mod VMs (for example 62.5 gives 50,000 hosts and 65,750 VMs from 1,052 traces).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Keep VMs whose CPU request drops to exactly 0 (CloudSim removes them for good).
    #[arg(long)]
    keep_idle_vms: bool,
    /// Seed for random VM selection (RS).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// CloudSim reference CSV to compare a `--sweep` against (columns day,policy,param,...).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Approximate PABFD for very large runs: examine at most this many candidate hosts per
    /// VM (most promising first) and take the best valid one seen (0 = exact semantics).
    #[arg(long, default_value_t = 0)]
    pabfd_budget: usize,
    /// Worker threads for sweeps.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// One row of output: day, policy, migration model and the metrics.
#[derive(Debug, Clone, Serialize)]
struct Row {
    day: String,
    #[serde(flatten)]
    result: SimResult,
    wall_s: f64,
}

/// Runs the simulator.
pub fn main(args: SimulateArgs) -> Result<()> {
    if !(args.scale.is_finite() && args.scale > 0.0) {
        return Err(usage!("--scale must be > 0, got {}", args.scale));
    }
    if args.threads == 0 {
        return Err(usage!("--threads must be at least 1"));
    }
    if args.reference.is_some() && !args.sweep {
        return Err(usage!("--reference applies to --sweep only"));
    }
    // Checked before anything runs: a bad reference must not cost a whole sweep.
    let reference = match &args.reference {
        Some(p) => Some(read_reference(p)?),
        None => None,
    };
    let days = resolve_days(&args.trace)?;
    let opts = SimOptions {
        seed: args.seed,
        remove_idle_vms: !args.keep_idle_vms,
        pabfd_budget: args.pabfd_budget,
        ..SimOptions::default()
    };
    if args.sweep || args.migration_sweep {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
    }
    if args.sweep {
        let cost = parse_migration(&args.migration)?;
        let policies = PolicySpec::all_reference();
        let jobs: Vec<Job> = days
            .iter()
            .flat_map(|d| {
                policies.iter().map(move |p| Job {
                    day: d.clone(),
                    policy: *p,
                    gbit: None,
                    model: None,
                })
            })
            .collect();
        let rows = run_jobs(&jobs, &args, &opts, Some(cost.as_ref()))?;
        write_policy_sweep(&args.out, &rows, reference.as_deref())?;
        eprintln!("wrote {}", args.out.display());
    }
    if args.model.is_some() && !args.migration_sweep && !args.frontier {
        return Err(usage!(
            "--model applies to --migration-sweep and --frontier only"
        ));
    }
    if args.frontier {
        let detectors = frontier::parse_detectors(&args.frontier_detectors)?;
        return frontier::run(&args, &days, &opts, &detectors);
    }
    if args.migration_sweep {
        let policy = parse_policy(&args.policy, args.param)?;
        let model_rows = match &args.model {
            Some(p) => model_spec::sweep_rows(p)?,
            None => Vec::new(),
        };
        let mut jobs = Vec::new();
        for d in &days {
            jobs.push(Job {
                day: d.clone(),
                policy,
                gbit: None,
                model: None,
            });
            for g in SWEEP_SPEEDS_GBIT {
                jobs.push(Job {
                    day: d.clone(),
                    policy,
                    gbit: Some(g),
                    model: None,
                });
            }
            for m in &model_rows {
                jobs.push(Job {
                    day: d.clone(),
                    policy,
                    gbit: None,
                    model: Some(m.clone()),
                });
            }
        }
        let rows = run_jobs(&jobs, &args, &opts, None)?;
        write_speed_sweep(&args.out, &rows, &jobs)?;
        eprintln!("wrote {}", args.out.display());
    }
    if args.sweep || args.migration_sweep {
        return Ok(());
    }

    let policy = parse_policy(&args.policy, args.param)?;
    let cost = parse_migration(&args.migration)?;
    for day in &days {
        let trace = load_trace(day)?;
        let spec = scaled_spec(&trace, args.scale)?;
        let t0 = std::time::Instant::now();
        // Long (scaled) runs get a progress bar on stderr, in simulated seconds.
        let bar = if args.scale > 1.0 {
            indicatif::ProgressBar::new(opts.duration_s as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let result = Simulation::new(&trace, &spec, policy, cost.as_ref(), opts.clone())
            .and_then(|sim| sim.run_with_progress(&mut |t, _| bar.set_position(t as u64)))
            .with_context(|| format!("simulating {}", day.display()))?;
        bar.finish_and_clear();
        let row = Row {
            day: day_name(day),
            result,
            wall_s: t0.elapsed().as_secs_f64(),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            print_text(&row);
        }
    }
    Ok(())
}

fn parse_policy(name: &str, param: Option<f64>) -> Result<PolicySpec> {
    PolicySpec::parse(name, param).map_err(|e| usage!("--policy: {e}"))
}

/// Parses `--migration`.
fn parse_migration(spec: &str) -> Result<Box<dyn MigrationCostModel>> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("cloudsim") {
        return Ok(Box::new(CloudSimCost));
    }
    if let Some(n) = s.strip_prefix("gbit=") {
        let g: f64 = n
            .parse()
            .map_err(|_| usage!("--migration gbit=N: {n:?} is not a number"))?;
        let p = MigrationProfile::bandwidth(g);
        p.validate().map_err(|e| usage!("--migration: {e}"))?;
        return Ok(Box::new(p));
    }
    if let Some(f) = s.strip_prefix("profile:") {
        let p =
            MigrationProfile::from_file(Path::new(f)).map_err(|e| usage!("--migration: {e}"))?;
        return Ok(Box::new(p));
    }
    if let Some(rest) = s.strip_prefix("model:") {
        return Ok(Box::new(ModelSpec::parse(rest)?.build()?));
    }
    Err(usage!(
        "--migration must be cloudsim, gbit=N, profile:FILE.json or model:MODEL.json[,...], \
         got {spec:?}"
    ))
}

/// Expands each `--trace`: a directory whose entries are all directories is a set of days.
fn resolve_days(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut days = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(usage!("--trace {}: no such file or directory", p.display()));
        }
        if p.is_dir() {
            let mut subdirs = Vec::new();
            let mut files = 0;
            for e in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
                let e = e?;
                if e.path().is_dir() {
                    subdirs.push(e.path());
                } else if !e
                    .file_name()
                    .to_string_lossy()
                    .to_ascii_lowercase()
                    .starts_with("readme")
                {
                    files += 1;
                }
            }
            if files == 0 && !subdirs.is_empty() {
                subdirs.sort();
                days.extend(subdirs);
                continue;
            }
        }
        days.push(p.clone());
    }
    Ok(days)
}

fn load_trace(day: &Path) -> Result<Trace> {
    let trace = Trace::load(day).map_err(|e| usage!("{e}"))?;
    if let Some(w) = fastmig_sim::trace_google::clamp_warning(&trace) {
        eprintln!("fastmig: warning: {}: {w}", day.display());
    }
    Ok(trace)
}

/// The data centre for `--scale`, refused (a usage error) when its hosts and VMs alone would
/// not fit in the memory this machine has available: an absurd scale must not abort on a
/// failed allocation.
fn scaled_spec(trace: &Trace, scale: f64) -> Result<DatacenterSpec> {
    if scale == 1.0 {
        return Ok(DatacenterSpec::reference(trace.len()));
    }
    let hosts = ((fastmig_sim::setup::REFERENCE_HOSTS as f64) * scale)
        .round()
        .max(1.0);
    let vms = ((trace.len() as f64) * scale).round().max(1.0);
    let need = fastmig_sim::memory_lower_bound(hosts, vms);
    if let Some(avail) = available_memory_bytes() {
        if need > avail as f64 {
            return Err(usage!(
                "--scale {scale}: {hosts:.0} hosts and {vms:.0} VMs need at least {:.1} GiB, \
                 this machine has {:.1} GiB available",
                need / GIB,
                avail as f64 / GIB
            ));
        }
    }
    Ok(DatacenterSpec::scaled(
        hosts as usize,
        vms as usize,
        trace.len(),
    ))
}

const GIB: f64 = (1u64 << 30) as f64;

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where it cannot be read: then sizes are
/// not checked in advance).
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn day_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

struct Job {
    day: PathBuf,
    policy: PolicySpec,
    /// `None`: the `--migration` model (or CloudSim's in a speed sweep); `Some(g)`: g Gbit/s.
    gbit: Option<f64>,
    /// A fitted-model row of `--migration-sweep --model` (then `gbit` is `None`).
    model: Option<ModelRow>,
}

/// Runs jobs on `--threads` workers with a progress bar on stderr. Traces are loaded once per
/// day. Rows come back in job order.
fn run_jobs(
    jobs: &[Job],
    args: &SimulateArgs,
    opts: &SimOptions,
    base_cost: Option<&dyn MigrationCostModel>,
) -> Result<Vec<Row>> {
    // Each day's trace and data centre, built (and size-checked) before any job starts.
    let mut traces: Vec<(PathBuf, Trace, DatacenterSpec)> = Vec::new();
    for j in jobs {
        if !traces.iter().any(|(p, _, _)| *p == j.day) {
            let trace = load_trace(&j.day)?;
            let spec = scaled_spec(&trace, args.scale)?;
            traces.push((j.day.clone(), trace, spec));
        }
    }
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Row>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..args.threads.min(jobs.len()).max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let Some((_, trace, spec)) = traces.iter().find(|(p, _, _)| *p == job.day) else {
                    break;
                };
                let profile;
                let cost: &dyn MigrationCostModel = match (&job.model, job.gbit, base_cost) {
                    (Some(m), _, _) => &m.cost,
                    (None, Some(g), _) => {
                        profile = MigrationProfile::bandwidth(g);
                        &profile
                    }
                    (None, None, Some(c)) => c,
                    (None, None, None) => &CloudSimCost,
                };
                let t0 = std::time::Instant::now();
                let r = simulate(trace, spec, job.policy, cost, opts)
                    .map(|result| Row {
                        day: day_name(&job.day),
                        result,
                        wall_s: t0.elapsed().as_secs_f64(),
                    })
                    .map_err(|e| anyhow!("{} {}: {e}", day_name(&job.day), job.policy.name()));
                bar.set_message(format!("{} {}", day_name(&job.day), job.policy.name()));
                bar.inc(1);
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
            });
        }
    });
    bar.finish_and_clear();
    let results = results
        .into_inner()
        .map_err(|_| anyhow!("a simulation thread panicked"))?;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("a simulation did not run"))))
        .collect()
}

/// Extracts one metric from a result (for charts).
type MetricFn = dyn Fn(&SimResult) -> f64;

fn write_policy_sweep(
    out: &Path,
    rows: &[Row],
    reference: Option<&[(String, String, SimResultRef)]>,
) -> Result<()> {
    let mut md = String::from("| day | policy | param | energy kWh | SLATAH | PDM | SLAV | ESV | migrations | shutdowns |");
    if reference.is_some() {
        md.push_str(" ref energy | diff | ref SLATAH | diff | ref PDM | diff | ref migr. | diff |");
    }
    md.push('\n');
    md.push_str(&"|---".repeat(if reference.is_some() { 18 } else { 10 }));
    md.push_str("|\n");
    for row in rows {
        let r = &row.result;
        let param = r.param.map(|p| p.to_string()).unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.4} | {:.5} | {:.7} | {:.6} | {} | {} |",
            row.day,
            r.policy,
            param,
            r.energy_kwh,
            r.slatah,
            r.pdm,
            r.slav,
            r.esv,
            r.migrations,
            r.host_shutdowns
        ));
        if let Some(refs) = reference {
            match refs
                .iter()
                .find(|(d, p, _)| *d == row.day && *p == r.policy)
            {
                Some((_, _, x)) => md.push_str(&format!(
                    " {:.2} | {} | {:.4} | {} | {:.4} | {} | {} | {} |",
                    x.energy_kwh,
                    rel(r.energy_kwh, x.energy_kwh),
                    x.slatah,
                    rel(r.slatah, x.slatah),
                    x.pdm,
                    rel(r.pdm, x.pdm),
                    x.migrations,
                    rel(r.migrations as f64, x.migrations)
                )),
                None => md.push_str(" | | | | | | | |"),
            }
        }
        md.push('\n');
    }
    write_csv(
        &out.join("policies.csv"),
        rows.iter().map(|row| {
            let r = &row.result;
            PolicyCsvRow {
                day: &row.day,
                policy: &r.policy,
                param: Shown(r.param),
                hosts: r.hosts,
                vms: r.vms,
                energy_kwh: Fixed(r.energy_kwh),
                slatah: Fixed(r.slatah),
                pdm: Fixed(r.pdm),
                slav: Fixed(r.slav),
                esv: Fixed(r.esv),
                migrations: r.migrations,
                host_shutdowns: r.host_shutdowns,
                wall_s: Fixed(row.wall_s),
            }
        }),
    )?;
    std::fs::write(out.join("policies.md"), &md).context("writing policies.md")?;
    print!("{md}");
    // One chart per day: energy, SLAV, ESV and migrations per policy (NPA left out of the
    // energy panel's scale would hide the rest, so it is drawn but the axis is set by the max).
    let mut days: Vec<&str> = rows.iter().map(|r| r.day.as_str()).collect();
    days.dedup();
    for day in days {
        let sel: Vec<&Row> = rows
            .iter()
            .filter(|r| r.day == day && r.result.policy != "npa")
            .collect();
        let names: Vec<String> = sel.iter().map(|r| r.result.policy.clone()).collect();
        let panels: [(&str, Vec<f64>); 4] = [
            (
                "energy (kWh)",
                sel.iter().map(|r| r.result.energy_kwh).collect(),
            ),
            (
                "SLAV (x 1e-5)",
                sel.iter().map(|r| r.result.slav * 1e5).collect(),
            ),
            (
                "ESV (x 1e-3)",
                sel.iter().map(|r| r.result.esv * 1e3).collect(),
            ),
            (
                "migrations",
                sel.iter().map(|r| r.result.migrations as f64).collect(),
            ),
        ];
        let path = out.join(format!("policies-{day}.svg"));
        bar_chart_grid(
            &path,
            &format!("fastmig simulate, day {day}, all policies (NPA omitted)"),
            &names,
            &panels,
        )?;
    }
    Ok(())
}

fn write_speed_sweep(out: &Path, rows: &[Row], jobs: &[Job]) -> Result<()> {
    let mut md = String::from("| day | policy | migration | energy kWh | SLATAH | PDM | SLAV | ESV | migrations | shutdowns |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (row, job) in rows.iter().zip(jobs) {
        let r = &row.result;
        let label = speed_label(job);
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.4} | {:.6} | {:.8} | {:.6} | {} | {} |\n",
            row.day,
            r.policy,
            label,
            r.energy_kwh,
            r.slatah,
            r.pdm,
            r.slav,
            r.esv,
            r.migrations,
            r.host_shutdowns
        ));
    }
    let labels: Vec<String> = jobs.iter().map(speed_label).collect();
    write_csv(
        &out.join("migration-speed.csv"),
        rows.iter()
            .zip(jobs)
            .zip(&labels)
            .map(|((row, job), label)| {
                let r = &row.result;
                SpeedCsvRow {
                    day: &row.day,
                    policy: &r.policy,
                    migration: label,
                    gbit: Shown(job.gbit.or(job.model.as_ref().map(|m| m.gbit))),
                    energy_kwh: Fixed(r.energy_kwh),
                    slatah: Fixed(r.slatah),
                    pdm: Fixed(r.pdm),
                    slav: Fixed(r.slav),
                    esv: Fixed(r.esv),
                    migrations: r.migrations,
                    host_shutdowns: r.host_shutdowns,
                }
            }),
    )?;
    std::fs::write(out.join("migration-speed.md"), &md).context("writing migration-speed.md")?;
    print!("{md}");
    // Chart: mean over days of each metric against bandwidth (log x axis).
    let speeds = SWEEP_SPEEDS_GBIT;
    let mean = |f: &dyn Fn(&SimResult) -> f64, g: f64| {
        let v: Vec<f64> = rows
            .iter()
            .zip(jobs)
            .filter(|(_, j)| j.gbit == Some(g) && j.model.is_none())
            .map(|(r, _)| f(&r.result))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let metrics: [(&str, &MetricFn); 4] = [
        ("energy (kWh)", &|r| r.energy_kwh),
        ("SLAV (x 1e-5)", &|r| r.slav * 1e5),
        ("ESV (x 1e-3)", &|r| r.esv * 1e3),
        ("migrations", &|r| r.migrations as f64),
    ];
    let policy = rows
        .first()
        .map(|r| r.result.policy.clone())
        .unwrap_or_default();
    let svg = out.join("migration-speed.svg");
    let root = SVGBackend::new(&svg, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!("{policy}: effect of migration bandwidth (mean over days)"),
            ("sans-serif", 20),
        )
        .map_err(plot_err)?;
    // The fitted-model rows (`--model`), one line per transport: (transport, [(label, gbit)]).
    let mut model_lines: Vec<(Transport, Vec<(&str, f64)>)> = Vec::new();
    for m in jobs.iter().filter_map(|j| j.model.as_ref()) {
        let line = match model_lines.iter_mut().find(|(t, _)| *t == m.transport) {
            Some((_, l)) => l,
            None => {
                model_lines.push((m.transport, Vec::new()));
                match model_lines.last_mut() {
                    Some((_, l)) => l,
                    None => continue,
                }
            }
        };
        if !line.iter().any(|(l, _)| *l == m.label) {
            line.push((&m.label, m.gbit));
        }
    }
    let mean_model = |f: &dyn Fn(&SimResult) -> f64, label: &str| {
        let v: Vec<f64> = rows
            .iter()
            .zip(jobs)
            .filter(|(_, j)| j.model.as_ref().is_some_and(|m| m.label == label))
            .map(|(r, _)| f(&r.result))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let colours = [RED, GREEN, MAGENTA, CYAN];
    for (area, (label, f)) in root.split_evenly((2, 2)).iter().zip(metrics) {
        let pts: Vec<(f64, f64)> = speeds.iter().map(|&g| (g.log10(), mean(f, g))).collect();
        let lines: Vec<(Transport, Vec<(f64, f64)>)> = model_lines
            .iter()
            .map(|(t, l)| {
                let p = l
                    .iter()
                    .map(|&(lab, g)| (g.log10(), mean_model(f, lab)))
                    .collect();
                (*t, p)
            })
            .collect();
        let ymax = pts
            .iter()
            .chain(lines.iter().flat_map(|(_, p)| p.iter()))
            .map(|p| p.1)
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(label, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.7_f64..1.7_f64, 0.0..ymax)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("migration bandwidth (Gbit/s, log scale)")
            .x_label_formatter(&|x| format!("{:.2}", 10f64.powf(*x)))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2)))
            .map_err(plot_err)?
            .label("profile (RAM / bandwidth)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(plot_err)?;
        for ((t, p), colour) in lines.iter().zip(colours.iter().cycle()) {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(p.clone(), colour.stroke_width(2)))
                .map_err(plot_err)?
                .label(format!("model {t}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            chart
                .draw_series(
                    p.iter()
                        .map(|&q| TriangleMarker::new(q, 5, colour.filled())),
                )
                .map_err(plot_err)?;
        }
        if !lines.is_empty() {
            crate::charts::draw_legend(&mut chart, None)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The migration model of a speed-sweep job, as the table and the CSV name it.
fn speed_label(job: &Job) -> String {
    if let Some(m) = &job.model {
        return m.label.clone();
    }
    job.gbit
        .map(|g| format!("{g} Gbit/s"))
        .unwrap_or_else(|| "cloudsim".into())
}

fn bar_chart_grid(
    path: &Path,
    title: &str,
    names: &[String],
    panels: &[(&str, Vec<f64>); 4],
) -> Result<()> {
    let root = SVGBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(plot_err)?;
    for (area, (label, values)) in root.split_evenly((2, 2)).iter().zip(panels.iter()) {
        let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(*label, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(70)
            .build_cartesian_2d((0..names.len()).into_segmented(), 0.0..max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len())
            .x_label_style(
                ("sans-serif", 10)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(BLUE.mix(0.7).filled())
                    .margin(3)
                    .data(values.iter().enumerate().map(|(i, v)| (i, *v))),
            )
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_specs_parse_and_bad_ones_are_usage_errors() {
        assert!(parse_migration("cloudsim").is_ok());
        let m = parse_migration("gbit=10").map(|m| m.describe());
        assert!(m.is_ok_and(|d| d.contains("10 Gbit/s")));
        for bad in ["gbit=x", "gbit=0", "warp", "profile:/nonexistent.json"] {
            let e = parse_migration(bad)
                .err()
                .map(|e| crate::error::exit_code(&e));
            assert_eq!(e, Some(2), "{bad}");
        }
    }
}
