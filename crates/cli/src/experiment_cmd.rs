//! `fastmig experiment consolidation`: the same trace-driven scenario run three times on a
//! testbed (no consolidation, consolidation with 2011-style classic migration, consolidation
//! with the fast transport), measured side by side with the simulator's prediction of each.
//!
//! ```text
//!  trace files ─► OUT/trace (copied or generated: the testbed and the simulator read the same)
//!  for none, classic-2011, fast:
//!     testbed up (same hosts, VMs, placement, trace, compression; the scenario's controller)
//!     ─► sample every agent each second for the window (energy, active hosts, overload)
//!     ─► the controller's migrations of the window ─► controller stopped
//!     ─► every VM on exactly one host, its memory checked ─► testbed down (always)
//!     ─► crates/sim on the same scenario (the prediction)
//!  ─► a table on stdout (or `--json`), OUT/results.{json,md}, OUT/experiment.svg
//! ```
//!
//! It owns only the orchestration and the accounting: the testbed is `testbed_cmd`'s, the
//! consolidation the controller's (`crates/cluster`), the prediction `crates/sim`'s.

mod chart;
mod measure;
mod predict;
mod report;
mod trace;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fastmig_migration::TransportKind;
use serde::Serialize;

use crate::testbed_cmd::{self, UpArgs};
use crate::units;
use crate::usage;
use report::{Experiment, ScenarioResult};

/// The fitted model committed with the sources (`bench/characterisation/model.json`): the
/// prediction's default migration cost.
const COMMITTED_MODEL: &str = include_str!("../../../bench/characterisation/model.json");

/// Experiments on a testbed.
#[derive(clap::Subcommand, Debug)]
pub enum ExperimentCommand {
    /// No consolidation vs consolidation with classic (2011-style) vs fast migration, on the
    /// same trace-driven VMs, each beside the simulator's prediction.
    Consolidation(ConsolidationArgs),
}

/// `fastmig experiment consolidation` flags.
#[derive(clap::Args, Debug)]
pub struct ConsolidationArgs {
    /// A short run (60 s per scenario unless `--duration`; under 5 minutes in all).
    #[arg(long)]
    quick: bool,
    /// Hosts of the testbed (each a G4: 2 × 1,860 MIPS, SPECpower model).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=20))]
    hosts: u16,
    /// VMs per host at the start (16 MiB, `verify` workload, `--vm-mips` each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
    vms_per_host: u16,
    /// Declared capacity of each VM, MIPS. Agents admit a VM only while the declared MIPS of
    /// their VMs fit the host (3,720 for a G4): 500 lets 7 share a host.
    #[arg(long, default_value_t = 500.0)]
    vm_mips: f64,
    /// PlanetLab day directory: VM `i` follows its file `i` in name order (READMEs and
    /// hidden files skipped). Without it: a generated trace (seeded, PlanetLab format).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Time each trace sample (300 s of its day) lasts here; also the controller's interval.
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    sample_period: Duration,
    /// Length of each scenario's measured window (default 6 minutes, 1 with `--quick`).
    #[arg(long, value_parser = units::parse_duration)]
    duration: Option<Duration>,
    /// Each host's link, bytes/s (`125M`) or bits/s (`1gbit`).
    #[arg(long, default_value = "1gbit", value_parser = units::parse_bandwidth)]
    link: u64,
    /// The 2011-style bandwidth cap of the `classic-2011` scenario's migrations (QEMU's
    /// default `max_bandwidth` of 32 MiB/s).
    #[arg(long, default_value = "32M", value_parser = units::parse_bandwidth)]
    classic_bandwidth: u64,
    /// The 2011-style downtime limit of the `classic-2011` scenario's migrations (QEMU's
    /// default of 300 ms); the `fast` scenario keeps the engine's default (30 ms).
    #[arg(long, default_value = "300ms", value_parser = units::parse_duration)]
    classic_downtime_limit: Duration,
    /// Transport of the `fast` scenario (between testbed hosts: a TCP transport).
    #[arg(long, default_value = "multi-tcp", value_parser = units::parse_transport)]
    fast_transport: TransportKind,
    /// The controller's policy (and the simulator's), as `fastmig simulate` names it.
    #[arg(long, default_value = "lr-mmt")]
    policy: String,
    /// Fitted model (`fastmig model fit`) the prediction prices migrations with; default:
    /// the one committed in `bench/characterisation/model.json`, compiled in.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Directory for `results.json`, `results.md`, the chart `experiment.svg` and the trace
    /// used (`trace/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The testbed's directory (one scenario at a time).
    #[arg(long, default_value = "/tmp/fastmig-experiment")]
    dir: PathBuf,
}

/// Memory of every VM.
const VM_MEM_BYTES: u64 = 16 << 20;
/// Workload of every VM: the `verify` writer (its stamps are checked at the end); the agents
/// set its write rate from the VM's demand every second.
const WORKLOAD: &str = "verify:rate=1000,wss=12M";
/// Seconds of a trace sample (PlanetLab: 5 minutes).
const TRACE_SAMPLE_S: f64 = 300.0;

/// The three scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The controller records but never migrates nor parks hosts.
    None,
    /// Consolidation, classic transport capped at `--classic-bandwidth`.
    Classic2011,
    /// Consolidation, `--fast-transport` without a cap.
    Fast,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::None, Scenario::Classic2011, Scenario::Fast];

    /// The name in the output.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::Classic2011 => "classic-2011",
            Scenario::Fast => "fast",
        }
    }

    fn transport(self, a: &ConsolidationArgs) -> TransportKind {
        match self {
            Scenario::None | Scenario::Classic2011 => TransportKind::Classic,
            Scenario::Fast => a.fast_transport,
        }
    }

    fn bandwidth(self, a: &ConsolidationArgs) -> Option<u64> {
        match self {
            Scenario::Classic2011 => Some(a.classic_bandwidth),
            Scenario::None | Scenario::Fast => None,
        }
    }

    /// The downtime limit of its migrations.
    fn downtime_limit(self, a: &ConsolidationArgs) -> Duration {
        match self {
            Scenario::Classic2011 => a.classic_downtime_limit,
            Scenario::None | Scenario::Fast => fastmig_migration::DEFAULT_DOWNTIME_LIMIT,
        }
    }
}

/// What every scenario shares.
pub struct Setup {
    /// Hosts.
    pub hosts: usize,
    /// VMs per host at the start.
    pub vms_per_host: usize,
    /// MIPS of each VM.
    pub vm_mips: f64,
    /// The trace directory both the testbed and the simulator read.
    pub trace_dir: PathBuf,
    /// Its files.
    pub trace_files: usize,
    /// Wall seconds per trace sample.
    pub sample_period_s: f64,
    /// Trace seconds per wall second.
    pub compression: f64,
    /// The measured window, wall seconds.
    pub window_s: f64,
    /// Link rate, bytes/s.
    pub link: u64,
    /// Policy.
    pub policy: String,
    /// The fitted model and where it came from.
    pub model: fastmig_model::Model,
    /// Where the model came from.
    pub model_source: String,
}

fn load_model(a: &ConsolidationArgs) -> Result<(fastmig_model::Model, String)> {
    match &a.model {
        Some(p) => {
            let m = fastmig_model::Model::load(p)
                .map_err(|e| usage!("--model {}: {e}", p.display()))?;
            Ok((m, p.display().to_string()))
        }
        None => {
            let m = fastmig_model::Model::from_json(COMMITTED_MODEL)
                .context("the committed model bench/characterisation/model.json")?;
            Ok((m, "bench/characterisation/model.json (compiled in)".into()))
        }
    }
}

/// Runs `fastmig experiment ...`.
pub fn main(cmd: ExperimentCommand) -> Result<()> {
    match cmd {
        ExperimentCommand::Consolidation(a) => consolidation(a),
    }
}

fn consolidation(a: ConsolidationArgs) -> Result<()> {
    // Installed first: Ctrl-C or SIGTERM from here on ends the scenario and brings its
    // testbed down instead of killing this process with the testbed up.
    let signalled = || fastmig_host::run::termination_flag().load(Ordering::SeqCst);
    signalled();
    let window = a.duration.unwrap_or(if a.quick {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(360)
    });
    if a.sample_period < Duration::from_millis(500) {
        return Err(usage!("--sample-period must be at least 500ms"));
    }
    if window < a.sample_period * 5 {
        return Err(usage!(
            "--duration must cover at least 5 samples ({:?})",
            a.sample_period * 5
        ));
    }
    if !(a.vm_mips.is_finite() && a.vm_mips > 0.0) {
        return Err(usage!("--vm-mips must be a positive number"));
    }
    let g4 = fastmig_sim::setup::reference_host_types()[0].clone();
    if a.vm_mips > g4.pe_mips {
        return Err(usage!(
            "--vm-mips {} exceeds a G4 core ({} MIPS)",
            a.vm_mips,
            g4.pe_mips
        ));
    }
    let (model, model_source) = load_model(&a)?;
    // Checked before any testbed exists: a model without the transports' parameters.
    for t in [a.fast_transport, TransportKind::Classic] {
        model
            .params(crate::model_cmd::model_transport(t))
            .map_err(|e| usage!("the model has no {} parameters: {e}", t.name()))?;
    }
    let vms = usize::from(a.hosts) * usize::from(a.vms_per_host);
    let _tmp;
    let work = match &a.out {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::canonicalize(d)?
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("fastmig-experiment")
                .tempdir()?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let (trace_dir, trace_desc, trace_files) = trace::prepare(a.trace.as_deref(), vms, &work)?;
    let setup = Setup {
        hosts: usize::from(a.hosts),
        vms_per_host: usize::from(a.vms_per_host),
        vm_mips: a.vm_mips,
        trace_dir,
        trace_files,
        sample_period_s: a.sample_period.as_secs_f64(),
        compression: TRACE_SAMPLE_S / a.sample_period.as_secs_f64(),
        window_s: window.as_secs_f64(),
        link: a.link,
        policy: a.policy.clone(),
        model,
        model_source,
    };
    // The policy must be one the controller runs (it migrates).
    let policy = fastmig_sim::PolicySpec::parse(&a.policy, None)
        .map_err(|e| usage!("--policy {}: {e}", a.policy))?;
    if !matches!(policy, fastmig_sim::PolicySpec::Dynamic { .. }) {
        return Err(usage!(
            "--policy {}: the controller needs DETECTOR-SELECTOR (e.g. lr-mmt)",
            a.policy
        ));
    }
    // The predictions first: cheap, and a setup the simulator refuses costs no testbed run.
    let predictions = Scenario::ALL
        .into_iter()
        .map(|sc| {
            predict::predict(
                &setup,
                sc,
                sc.bandwidth(&a),
                sc.downtime_limit(&a),
                sc.transport(&a),
            )
        })
        .collect::<Result<Vec<_>>>()
        .context("the simulator's prediction")?;

    let started = Instant::now();
    let mut results = Vec::new();
    for (i, (sc, predicted)) in Scenario::ALL.into_iter().zip(predictions).enumerate() {
        eprintln!(
            "experiment: scenario {} of 3 ({}), elapsed {:.0} s",
            i + 1,
            sc.name(),
            started.elapsed().as_secs_f64()
        );
        let measured = run_scenario(&a, &setup, sc, &signalled, started)?;
        results.push(ScenarioResult::new(
            sc,
            sc.transport(&a),
            sc.bandwidth(&a),
            sc.downtime_limit(&a),
            setup.compression,
            measured,
            predicted,
        ));
    }
    let exp = Experiment {
        hosts: setup.hosts,
        host_type: g4.name.clone(),
        vms,
        vm_mips: setup.vm_mips,
        vm_mem_mib: VM_MEM_BYTES >> 20,
        workload: WORKLOAD.into(),
        trace: trace_desc,
        trace_files: setup.trace_files,
        sample_period_s: setup.sample_period_s,
        compression: setup.compression,
        window_s: setup.window_s,
        link_bytes_s: setup.link,
        policy: setup.policy.clone(),
        interval_s: setup.sample_period_s,
        classic_bandwidth_bytes_s: a.classic_bandwidth,
        prediction_model: setup.model_source.clone(),
        wall_s: started.elapsed().as_secs_f64(),
        scenarios: results,
    };
    let json = serde_json::to_string_pretty(&exp)?;
    let table = report::table(&exp);
    if let Some(d) = &a.out {
        std::fs::write(d.join("results.json"), &json).context("writing results.json")?;
        std::fs::write(d.join("results.md"), &table).context("writing results.md")?;
        chart::draw(&d.join("experiment.svg"), &exp)?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    let bad: Vec<String> = exp
        .scenarios
        .iter()
        .flat_map(|s| {
            s.vms
                .iter()
                .filter(|v| !v.ok())
                .map(move |v| format!("{}: {} on {:?}", s.name, v.vm, v.hosts))
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "VMs not on exactly one host with clean memory: {}",
            bad.join("; ")
        );
    }
    Ok(())
}

/// Brings the testbed down when dropped: after the scenario, on a failure, on an interrupt.
struct TestbedGuard {
    dir: PathBuf,
}

impl Drop for TestbedGuard {
    fn drop(&mut self) {
        if let Err(e) = testbed_cmd::down(&self.dir) {
            eprintln!("fastmig: bringing the testbed down: {e:#}");
        }
    }
}

fn run_scenario(
    a: &ConsolidationArgs,
    setup: &Setup,
    sc: Scenario,
    signalled: &dyn Fn() -> bool,
    started: Instant,
) -> Result<measure::Measured> {
    if signalled() {
        bail!("interrupted");
    }
    let up = UpArgs {
        hosts: a.hosts,
        link: a.link,
        vms_per_host: a.vms_per_host,
        workload: WORKLOAD.into(),
        vm_mips: a.vm_mips,
        demand: 0.0,
        trace: Some(setup.trace_dir.clone()),
        host_type: "G4".into(),
        dir: a.dir.clone(),
        policy: a.policy.clone(),
        interval: a.sample_period,
        no_controller: false,
        sample_period: a.sample_period,
        transport: sc.transport(a),
        migration_bandwidth: sc.bandwidth(a),
        migration_downtime_limit: Some(sc.downtime_limit(a)),
        no_consolidation: sc == Scenario::None,
        model: None,
    };
    std::fs::create_dir_all(&a.dir).context("creating the testbed directory")?;
    let dir = std::fs::canonicalize(&a.dir).context("resolving the testbed directory")?;
    // Refused by `up` before it records anything when a testbed is up: no guard yet, so that
    // another run's testbed is not brought down.
    let tb = testbed_cmd::up(up)?;
    let _guard = TestbedGuard { dir };
    if signalled() {
        bail!("interrupted");
    }
    measure::run(setup, &tb, signalled, &|line: &str| {
        eprintln!(
            "experiment: {}: {line}, elapsed {:.0} s",
            sc.name(),
            started.elapsed().as_secs_f64()
        );
    })
}
