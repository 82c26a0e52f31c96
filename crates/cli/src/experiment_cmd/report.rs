//! The experiment's output: one JSON object (`Experiment`, with a `scenarios` list) and a
//! Markdown table of the same figures, measured beside predicted.
//!
//! Host time (active host-hours, energy, overloaded and violation time) is given on the
//! trace's clock (wall time × `compression`), the clock the simulator runs on; migrations'
//! time, downtime and CPU on the wall clock, as they really took.

use std::fmt::Write as _;

use fastmig_cluster::store::{MigrationRow, MigrationState};
use fastmig_migration::{MigrationSummary, TransportKind};
use serde::Serialize;

use super::measure::{Measured, VmCheck};
use super::predict::Predicted;
use super::Scenario;
use crate::testbed_cmd::transport_arg;

/// The whole experiment (`--json`).
#[derive(Debug, Serialize)]
pub struct Experiment {
    /// Hosts of the testbed.
    pub hosts: usize,
    /// Their type.
    pub host_type: String,
    /// VMs.
    pub vms: usize,
    /// Each VM's MIPS.
    pub vm_mips: f64,
    /// Each VM's memory, MiB.
    pub vm_mem_mib: u64,
    /// Their workload.
    pub workload: String,
    /// Where the trace came from.
    pub trace: String,
    /// Trace files used (VM i follows file i mod this).
    pub trace_files: usize,
    /// Wall seconds per trace sample.
    pub sample_period_s: f64,
    /// Trace seconds per wall second.
    pub compression: f64,
    /// Each scenario's measured window, wall s.
    pub window_s: f64,
    /// Each host's link, bytes/s.
    pub link_bytes_s: u64,
    /// The controller's policy.
    pub policy: String,
    /// The controller's interval, s.
    pub interval_s: f64,
    /// The classic-2011 scenario's bandwidth cap, bytes/s.
    pub classic_bandwidth_bytes_s: u64,
    /// The model the prediction priced migrations with.
    pub prediction_model: String,
    /// The whole run, wall s.
    pub wall_s: f64,
    /// The scenarios, in order.
    pub scenarios: Vec<ScenarioResult>,
}

/// One scenario, measured and predicted.
#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    /// `none`, `classic-2011` or `fast`.
    pub name: String,
    /// Transport of its migrations.
    pub transport: String,
    /// Their bandwidth cap, bytes/s.
    pub migration_bandwidth_bytes_s: Option<u64>,
    /// Their downtime limit, ms.
    pub downtime_limit_ms: f64,
    /// Whether the controller consolidated.
    pub consolidation: bool,
    /// Hosts' active time, hours (trace clock).
    pub active_host_hours: f64,
    /// Estimated energy, kWh (trace clock; the controller's power model).
    pub energy_kwh: f64,
    /// Hosts' overloaded time (requested MIPS above capacity), s (trace clock).
    pub overload_s: f64,
    /// Hosts' SLA-violation time (overloaded or receiving a migration, as the simulator
    /// counts it), s (trace clock).
    pub violation_s: f64,
    /// Violation time over active time (the simulator's SLATAH).
    pub slatah: f64,
    /// MIPS lost to migration over MIPS requested.
    pub pdm: f64,
    /// SLATAH × PDM.
    pub slav: f64,
    /// Migrations ordered in the window that completed (the VM runs on its destination).
    pub migrations: usize,
    /// Migrations ordered in the window that failed, the VM staying on its source: orders
    /// an agent refused (its admission counts declared MIPS, the policy requested ones) and
    /// migrations that did not complete.
    pub failed_migrations: usize,
    /// Sum of the completed migrations' total time, wall s.
    pub total_migration_s: f64,
    /// Sum of their downtime, wall ms.
    pub total_downtime_ms: f64,
    /// Sum of their source and destination migration threads' CPU time, s.
    pub migration_cpu_s: f64,
    /// The simulator's active host-hours.
    pub predicted_active_host_hours: f64,
    /// The simulator's energy, kWh.
    pub predicted_energy_kwh: f64,
    /// The simulator's SLA-violation host time (SLATAH × active time), s.
    pub predicted_violation_s: f64,
    /// The simulator's SLATAH.
    pub predicted_slatah: f64,
    /// The simulator's PDM.
    pub predicted_pdm: f64,
    /// The simulator's SLAV.
    pub predicted_slav: f64,
    /// The simulator's migrations.
    pub predicted_migrations: u64,
    /// Sum of the simulated migrations' time, wall s.
    pub predicted_total_migration_s: f64,
    /// Sum of their downtime, wall ms.
    pub predicted_total_downtime_ms: f64,
    /// Sum of their CPU on source and destination, s (0 when CloudSim's formula priced them).
    pub predicted_migration_cpu_s: f64,
    /// What priced the simulated migrations.
    pub predicted_with: String,
    /// Each VM at the end.
    pub vms: Vec<VmCheck>,
    /// The measured samples (wall s, active hosts, power W), for the chart.
    #[serde(skip)]
    pub series: Vec<(f64, f64, f64)>,
}

fn summary(m: &MigrationRow) -> Option<MigrationSummary> {
    m.summary
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
}

impl ScenarioResult {
    /// The result of one scenario; `compression` converts host time to the trace's clock.
    pub fn new(
        sc: Scenario,
        transport: TransportKind,
        bandwidth: Option<u64>,
        downtime_limit: std::time::Duration,
        compression: f64,
        m: Measured,
        p: Predicted,
    ) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let slatah = ratio(m.violation_s, m.active_s);
        let pdm = ratio(m.degraded_mips_s, m.requested_mips_s);
        let done: Vec<&MigrationRow> = m
            .migrations
            .iter()
            .filter(|r| r.state == MigrationState::Done)
            .collect();
        let r = &p.result;
        ScenarioResult {
            name: sc.name().into(),
            transport: transport_arg(transport),
            migration_bandwidth_bytes_s: bandwidth,
            downtime_limit_ms: downtime_limit.as_secs_f64() * 1e3,
            consolidation: sc != Scenario::None,
            active_host_hours: m.active_s * compression / 3600.0,
            energy_kwh: m.energy_j * compression / 3.6e6,
            overload_s: m.overload_s * compression,
            violation_s: m.violation_s * compression,
            slatah,
            pdm,
            slav: slatah * pdm,
            migrations: done.len(),
            failed_migrations: m
                .migrations
                .iter()
                .filter(|r| r.state == MigrationState::Failed)
                .count(),
            // Folded from +0.0: an empty float sum is -0.0.
            total_migration_s: done
                .iter()
                .filter_map(|r| r.measured_s)
                .fold(0.0, |a, b| a + b),
            total_downtime_ms: done
                .iter()
                .filter_map(|r| r.measured_downtime_s)
                .fold(0.0, |a, b| a + b)
                * 1e3,
            migration_cpu_s: done
                .iter()
                .filter_map(|r| summary(r))
                .map(|s| s.src_cpu_s + s.dst_cpu_s)
                .fold(0.0, |a, b| a + b),
            predicted_active_host_hours: r.active_host_hours,
            predicted_energy_kwh: r.energy_kwh,
            predicted_violation_s: r.slatah * r.active_host_hours * 3600.0,
            predicted_slatah: r.slatah,
            predicted_pdm: r.pdm,
            predicted_slav: r.slav,
            predicted_migrations: r.migrations,
            predicted_total_migration_s: p.total_migration_s,
            predicted_total_downtime_ms: p.total_downtime_ms,
            predicted_migration_cpu_s: p.total_migration_cpu_s,
            predicted_with: p.cost,
            vms: m.vms,
            series: m.series,
        }
    }
}

/// The experiment as Markdown: the setup, then one row per metric with each scenario's
/// measured and predicted value.
pub fn table(e: &Experiment) -> String {
    let mut out = String::new();
    // `write!` to a String cannot fail.
    let _ = writeln!(
        out,
        "Consolidation experiment: {} hosts ({}), {} VMs of {} MIPS and {} MiB (`{}`), \
         policy {} every {} s; trace {} ({} files), one 300 s sample every {} s (x{}); \
         {} s measured per scenario; links of {} Mbit/s; classic-2011 capped at {:.0} MiB/s. \
         Host time on the trace's clock, migrations on the wall clock. \
         Prediction: crates/sim with the fitted model {}.\n",
        e.hosts,
        e.host_type,
        e.vms,
        e.vm_mips,
        e.vm_mem_mib,
        e.workload,
        e.policy,
        e.interval_s,
        e.trace,
        e.trace_files,
        e.sample_period_s,
        e.compression,
        e.window_s,
        e.link_bytes_s as f64 * 8.0 / 1e6,
        e.classic_bandwidth_bytes_s as f64 / 1048576.0,
        e.prediction_model,
    );
    let _ = write!(out, "| metric |");
    for s in &e.scenarios {
        let _ = write!(out, " {} | {} (sim) |", s.name, s.name);
    }
    let _ = write!(out, "\n|---|");
    for _ in &e.scenarios {
        let _ = write!(out, "---:|---:|");
    }
    out.push('\n');
    type Pair = fn(&ScenarioResult) -> (String, String);
    let rows: [(&str, Pair); 14] = [
        ("active host-hours", |s| {
            (
                f(s.active_host_hours, 2),
                f(s.predicted_active_host_hours, 2),
            )
        }),
        ("energy (kWh)", |s| {
            (f(s.energy_kwh, 3), f(s.predicted_energy_kwh, 3))
        }),
        ("overloaded host time (s)", |s| {
            (f(s.overload_s, 0), "-".into())
        }),
        ("SLA-violation host time (s)", |s| {
            (f(s.violation_s, 0), f(s.predicted_violation_s, 0))
        }),
        ("SLATAH", |s| (g(s.slatah), g(s.predicted_slatah))),
        ("PDM", |s| (g(s.pdm), g(s.predicted_pdm))),
        ("SLAV", |s| (g(s.slav), g(s.predicted_slav))),
        ("downtime limit (ms)", |s| {
            (f(s.downtime_limit_ms, 0), f(s.downtime_limit_ms, 0))
        }),
        ("migrations", |s| {
            (s.migrations.to_string(), s.predicted_migrations.to_string())
        }),
        ("failed migrations", |s| {
            (s.failed_migrations.to_string(), "-".into())
        }),
        ("total migration time (s)", |s| {
            (
                f(s.total_migration_s, 2),
                f(s.predicted_total_migration_s, 2),
            )
        }),
        ("total downtime (ms)", |s| {
            (
                f(s.total_downtime_ms, 1),
                f(s.predicted_total_downtime_ms, 1),
            )
        }),
        ("migration CPU (s)", |s| {
            (f(s.migration_cpu_s, 2), f(s.predicted_migration_cpu_s, 2))
        }),
        ("VMs on one host, memory clean", |s| {
            let ok = s.vms.iter().filter(|v| v.ok()).count();
            (format!("{ok}/{}", s.vms.len()), "-".into())
        }),
    ];
    for (label, pair) in rows {
        let _ = write!(out, "| {label} |");
        for s in &e.scenarios {
            let (m, p) = pair(s);
            let _ = write!(out, " {m} | {p} |");
        }
        out.push('\n');
    }
    out
}

fn f(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn g(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastmig_cluster::proto::{HostName, MigrationId, VmName};
    use fastmig_cluster::store::Origin;
    use fastmig_sim::SimResult;

    fn row(id: u64, state: MigrationState, s: Option<f64>, down: Option<f64>) -> MigrationRow {
        MigrationRow {
            id: MigrationId(id),
            vm: VmName("vm1".into()),
            source: HostName("h1".into()),
            destination: HostName("h2".into()),
            transport: "\"classic\"".into(),
            state,
            origin: Origin::Evacuation,
            decision: Some(1),
            predicted_s: None,
            predicted_downtime_s: None,
            measured_s: s,
            measured_downtime_s: down,
            summary: None,
            error: None,
            started_ms: 0,
            ended_ms: Some(1000),
        }
    }

    #[test]
    fn host_time_goes_to_the_trace_clock_and_migrations_stay_on_the_wall_clock() {
        // 120 wall s of 2 hosts = 240 active s; x150: 10 host-hours. 360,000 J x150 =
        // 54e6 J = 15 kWh. Violation 24 s of 240: SLATAH 0.1. PDM 30 / 3000.
        let m = Measured {
            active_s: 240.0,
            energy_j: 360_000.0,
            overload_s: 12.0,
            violation_s: 24.0,
            requested_mips_s: 3000.0,
            degraded_mips_s: 30.0,
            migrations: vec![
                row(1, MigrationState::Done, Some(0.5), Some(0.002)),
                row(2, MigrationState::Done, Some(1.5), Some(0.004)),
                row(3, MigrationState::Failed, None, None),
            ],
            vms: Vec::new(),
            series: Vec::new(),
        };
        let result = SimResult {
            policy: "lr-mmt".into(),
            param: None,
            hosts: 2,
            vms: 6,
            energy_kwh: 14.0,
            slatah: 0.2,
            pdm: 0.01,
            slav: 0.002,
            esv: 0.028,
            migrations: 4,
            host_shutdowns: 1,
            sla_overall: 0.0,
            vms_removed_idle: 0,
            migration_model: "test".into(),
            migration_downtime_s: 0.0,
            migration_s: 0.0,
            migration_cpu_s: 0.0,
            active_host_hours: 9.0,
        };
        let p = Predicted {
            result,
            total_migration_s: 2.2,
            total_downtime_ms: 7.0,
            total_migration_cpu_s: 0.4,
            cost: "test".into(),
        };
        let r = ScenarioResult::new(
            Scenario::Classic2011,
            TransportKind::Classic,
            Some(32 << 20),
            std::time::Duration::from_millis(300),
            150.0,
            m,
            p,
        );
        assert!((r.active_host_hours - 10.0).abs() < 1e-9);
        assert!((r.energy_kwh - 15.0).abs() < 1e-9);
        assert_eq!((r.overload_s, r.violation_s), (1800.0, 3600.0));
        assert!((r.slatah - 0.1).abs() < 1e-12);
        assert!((r.pdm - 0.01).abs() < 1e-12);
        assert!((r.slav - 0.001).abs() < 1e-12);
        assert_eq!((r.migrations, r.failed_migrations), (2, 1));
        assert_eq!(r.downtime_limit_ms, 300.0);
        assert_eq!(r.total_migration_s, 2.0);
        assert!((r.total_downtime_ms - 6.0).abs() < 1e-9);
        // 0.2 of 9 host-hours.
        assert!((r.predicted_violation_s - 0.2 * 9.0 * 3600.0).abs() < 1e-6);
        assert_eq!(r.predicted_migrations, 4);
        assert_eq!(r.predicted_migration_cpu_s, 0.4);
        assert_eq!(r.transport, "classic");
        assert!(r.consolidation);
    }
}
