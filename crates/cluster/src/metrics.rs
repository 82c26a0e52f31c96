//! Prometheus metrics of the agent and the controller (`GET /metrics`, OpenMetrics text as
//! `prometheus-client` encodes it; Prometheus scrapes it as is).
//!
//! Gauges (utilisation, state, power, VMs) are rendered from the current state at every
//! scrape. The controller's counters and histograms (migrations by transport and result,
//! bytes, downtime, duration, decision time) follow its store: [`ControllerMetrics::sync`]
//! counts each migration once when it reaches a final state and each decision once, so a
//! restarted controller's counters carry on from its database. The agent counts the
//! migrations it saw end in [`MigrationCounts`] (since its start).
//!
//! This module owns the metric names and their encoding; it does not own the HTTP routes
//! (`agent::routes`, `controller::dashboard`) or the state it reads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use fastmig_host::RunStatus;
use fastmig_migration::{MigrationSummary, TransportKind};
use fastmig_sim::setup::HostType;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::controller::{Controller, HostStatus, VmStatus};
use crate::proto::{HostReport, HostState, MigrationPhase, MigrationRecord, VmName, VmReport};
use crate::store::{MigrationRow, StoreError};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Fraction of a host type's idle power (at 0 % utilisation) a host in standby draws. 0, as
/// the simulator counts a switched-off host (CloudSim: a host at 0 % is off), so that the
/// measured energy and the simulator's prediction count standby alike.
pub const STANDBY_POWER_FRACTION: f64 = 0.0;

/// How many ended migrations the dashboard keeps (newest last).
pub const RECENT_KEPT: usize = 50;

/// Estimated power of a host, W: its SPECpower model at `utilization` when active, its
/// idle power times `standby_fraction` in standby.
pub fn host_power_w(
    t: &HostType,
    state: HostState,
    utilization: f64,
    standby_fraction: f64,
) -> f64 {
    match state {
        HostState::Active => t.power.power(utilization),
        HostState::Standby => t.power.power(0.0) * standby_fraction,
    }
}

/// Utilisation of a host from its report: requested MIPS of the VMs it runs or receives over
/// its declared MIPS (the controller's rule).
pub fn report_utilization(rep: &HostReport) -> f64 {
    let total = rep.host_type.total_mips();
    let req: f64 = rep
        .vms
        .iter()
        .filter(|v| on_host(v))
        .map(|v| v.demand * v.mips)
        .sum();
    if total > 0.0 {
        req / total + 0.0
    } else {
        0.0
    }
}

fn on_host(v: &VmReport) -> bool {
    !matches!(v.status, RunStatus::Postmigrate | RunStatus::Stopped)
}

/// A name as a label value: the serde name of a unit enum variant (`classic`, `source`).
pub fn serde_label<T: Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => "unknown".into(),
    }
}

fn state_label(s: HostState) -> String {
    serde_label(&s)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStateLabels {
    host: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    transport: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentMigrationLabels {
    transport: String,
    side: String,
    result: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;
type HistFamily = Family<TransportLabel, Histogram, fn() -> Histogram>;

fn downtime_hist() -> Histogram {
    // 0.5 ms .. 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn duration_hist() -> Histogram {
    // 0.25 s .. 512 s.
    Histogram::new(exponential_buckets(0.25, 2.0, 12))
}

fn decision_hist() -> Histogram {
    // 10 µs .. 42 s.
    Histogram::new(exponential_buckets(1e-5, 4.0, 12))
}

/// Every host's gauges, shared by agent and controller: `fastmig_host_utilization`,
/// `fastmig_host_state` (1 for the state it is in, 0 for the other), `fastmig_host_vms`.
struct HostGauges {
    util: Family<HostLabel, GaugeF>,
    state: Family<HostStateLabels, Gauge>,
    vms: Family<HostLabel, Gauge>,
    vm_util: Family<VmLabels, GaugeF>,
}

impl HostGauges {
    fn new() -> Self {
        Self {
            util: Family::default(),
            state: Family::default(),
            vms: Family::default(),
            vm_util: Family::default(),
        }
    }

    fn host(&self, host: &str, state: HostState, util: f64, vms: usize) {
        let h = HostLabel { host: host.into() };
        // `+ 0.0` turns the -0.0 of an empty float sum into 0.
        self.util.get_or_create(&h).set(util + 0.0);
        self.vms.get_or_create(&h).set(vms as i64);
        for s in [HostState::Active, HostState::Standby] {
            let l = HostStateLabels {
                host: host.into(),
                state: state_label(s),
            };
            self.state.get_or_create(&l).set(i64::from(s == state));
        }
    }

    fn vm(&self, vm: &VmName, host: &str, demand: f64) {
        let l = VmLabels {
            vm: vm.0.clone(),
            host: host.into(),
        };
        self.vm_util.get_or_create(&l).set(demand);
    }

    fn register(self, r: &mut Registry) {
        r.register(
            "fastmig_host_utilization",
            "Requested MIPS over declared MIPS (0..1, above 1 when overloaded)",
            self.util,
        );
        r.register(
            "fastmig_host_state",
            "Power state of the host: 1 for the state it is in",
            self.state,
        );
        r.register(
            "fastmig_host_vms",
            "VMs on the host (running or arriving)",
            self.vms,
        );
        r.register(
            "fastmig_vm_utilization",
            "CPU demand of the VM (fraction of its MIPS)",
            self.vm_util,
        );
    }
}

fn text(r: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, r);
    out
}

/// Migrations an agent saw end, by transport, side and result, since it started.
#[derive(Debug, Default, Clone)]
pub struct MigrationCounts(BTreeMap<(String, String, String), u64>);

impl MigrationCounts {
    /// Counts `rec` ending in `phase` (a final phase).
    pub fn ended(&mut self, rec: &MigrationRecord, phase: &MigrationPhase) {
        let result = match phase {
            MigrationPhase::Completed { .. } => "completed",
            MigrationPhase::Failed { .. } => "failed",
            MigrationPhase::InDoubt { .. } => "in-doubt",
            MigrationPhase::Prepared | MigrationPhase::Running { .. } => return,
        };
        let key = (
            rec.transport.name().to_owned(),
            serde_label(&rec.side),
            result.to_owned(),
        );
        *self.0.entry(key).or_default() += 1;
    }
}

/// The agent's `/metrics`: its host's utilisation, state and VMs, its VMs' demand, the
/// migrations it saw end and those in flight.
pub fn render_agent(rep: &HostReport, counts: &MigrationCounts) -> String {
    let mut r = Registry::default();
    let g = HostGauges::new();
    let host = rep.host.0.as_str();
    let vms: Vec<&VmReport> = rep.vms.iter().filter(|v| on_host(v)).collect();
    g.host(host, rep.state, report_utilization(rep), vms.len());
    for v in vms {
        g.vm(&v.vm, host, v.demand);
    }
    g.register(&mut r);
    let ended: Family<AgentMigrationLabels, Counter> = Family::default();
    for ((transport, side, result), n) in &counts.0 {
        let l = AgentMigrationLabels {
            transport: transport.clone(),
            side: side.clone(),
            result: result.clone(),
        };
        ended.get_or_create(&l).inc_by(*n);
    }
    r.register(
        "fastmig_agent_migrations",
        "Migrations this agent saw end since it started, by transport, side and result",
        ended,
    );
    let open: Gauge = Gauge::default();
    open.set(
        rep.migrations
            .iter()
            .filter(|m| !crate::agent::state::is_final(&m.phase))
            .count() as i64,
    );
    r.register(
        "fastmig_agent_migrations_in_flight",
        "Migrations of this agent not ended",
        open,
    );
    text(&r)
}

/// Where [`ControllerMetrics::sync`] stopped reading the store.
#[derive(Debug, Default)]
struct Cursor {
    /// Migrations seen open: read again at the next sync.
    open: BTreeSet<u64>,
    /// Highest migration id read.
    max_migration: u64,
    /// Highest decision id counted.
    max_decision: i64,
    /// The last ended migrations, newest last.
    recent: VecDeque<MigrationRow>,
}

/// The controller's counters and histograms, fed from its store.
pub struct ControllerMetrics {
    standby_fraction: f64,
    migrations: Family<MigrationLabels, Counter>,
    bytes: Family<TransportLabel, Counter>,
    downtime: HistFamily,
    duration: HistFamily,
    decision: Histogram,
    cursor: Mutex<Cursor>,
}

/// A transport label from a `MigrationRow::transport` (a `TransportKind` as JSON).
fn row_transport(row: &MigrationRow) -> String {
    serde_json::from_str::<TransportKind>(&row.transport)
        .map(|t| t.name().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl ControllerMetrics {
    /// Empty counters; power of hosts in standby at `standby_fraction` of their idle power.
    pub fn new(standby_fraction: f64) -> Self {
        Self {
            standby_fraction,
            migrations: Family::default(),
            bytes: Family::default(),
            downtime: Family::new_with_constructor(downtime_hist),
            duration: Family::new_with_constructor(duration_hist),
            decision: decision_hist(),
            cursor: Mutex::new(Cursor::default()),
        }
    }

    /// Fraction of idle power a host in standby draws.
    pub fn standby_fraction(&self) -> f64 {
        self.standby_fraction
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, row: &MigrationRow) {
        let transport = row_transport(row);
        let l = MigrationLabels {
            transport: transport.clone(),
            result: row.state.as_str().into(),
        };
        self.migrations.get_or_create(&l).inc();
        let t = TransportLabel { transport };
        if let Some(s) = row
            .summary
            .as_deref()
            .and_then(|s| serde_json::from_str::<MigrationSummary>(s).ok())
        {
            self.bytes.get_or_create(&t).inc_by(s.bytes_sent);
        }
        if let Some(d) = row.measured_downtime_s {
            self.downtime.get_or_create(&t).observe(d);
        }
        if let Some(d) = row.measured_s {
            self.duration.get_or_create(&t).observe(d);
        }
    }

    /// Counts the migrations that ended and the decisions made since the last sync; returns
    /// how many migrations ended.
    pub fn sync(&self, ctl: &mut Controller) -> Result<usize, StoreError> {
        let store = ctl.store();
        let (max_decision, max_migration, _) = store.max_ids()?;
        let mut c = self.lock();
        let mut ended = 0;
        let ids: Vec<u64> = c
            .open
            .iter()
            .copied()
            .chain(c.max_migration + 1..=max_migration)
            .collect();
        for id in ids {
            match store.migration(crate::proto::MigrationId(id))? {
                Some(row) if row.state.is_final() => {
                    self.count(&row);
                    ended += 1;
                    c.open.remove(&id);
                    c.recent.push_back(row);
                    if c.recent.len() > RECENT_KEPT {
                        c.recent.pop_front();
                    }
                }
                Some(_) => {
                    c.open.insert(id);
                }
                None => {
                    c.open.remove(&id);
                }
            }
        }
        c.max_migration = c.max_migration.max(max_migration);
        if max_decision > c.max_decision {
            let n = (max_decision - c.max_decision).min(100_000);
            for d in store.decisions(n)? {
                if d.id > c.max_decision {
                    self.decision.observe(d.decision_us as f64 / 1e6);
                }
            }
            c.max_decision = max_decision;
        }
        Ok(ended)
    }

    /// The last ended migrations, newest last (as of the last sync).
    pub fn recent(&self) -> Vec<MigrationRow> {
        self.lock().recent.iter().cloned().collect()
    }

    /// The controller's `/metrics` for the state given; `energy_j` is the energy integrated
    /// so far, when known.
    pub fn render(
        &self,
        hosts: &[HostStatus],
        vms: &BTreeMap<VmName, VmStatus>,
        in_flight: usize,
        energy_j: Option<f64>,
    ) -> String {
        let mut r = Registry::default();
        let g = HostGauges::new();
        let power: Family<HostLabel, GaugeF> = Family::default();
        let reachable: Family<HostLabel, Gauge> = Family::default();
        let mut total = 0.0;
        let mut active = 0;
        for h in hosts {
            g.host(&h.name.0, h.state, h.utilization, h.vms.len());
            let l = HostLabel {
                host: h.name.0.clone(),
            };
            reachable.get_or_create(&l).set(i64::from(h.reachable));
            if let Some(t) = &h.host_type {
                let w = host_power_w(t, h.state, h.utilization, self.standby_fraction);
                power.get_or_create(&l).set(w);
                total += w;
            }
            active += usize::from(h.state == HostState::Active);
        }
        for (name, v) in vms {
            g.vm(name, &v.host.0, v.report.demand);
        }
        g.register(&mut r);
        r.register(
            "fastmig_host_reachable",
            "1 when the host's last report arrived",
            reachable,
        );
        r.register(
            "fastmig_host_power_watts",
            "Estimated power of the host (SPECpower model of its type; standby counted as off)",
            power,
        );
        let cluster: GaugeF = Gauge::default();
        cluster.set(total);
        r.register(
            "fastmig_cluster_power_watts",
            "Estimated power of all hosts",
            cluster,
        );
        let act: Gauge = Gauge::default();
        act.set(active as i64);
        r.register(
            "fastmig_cluster_active_hosts",
            "Hosts active (not in standby)",
            act,
        );
        if let Some(e) = energy_j {
            let c: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
            c.inc_by(e);
            r.register(
                "fastmig_cluster_energy_joules",
                "Estimated energy of all hosts since the controller's HTTP server started",
                c,
            );
        }
        let open: Gauge = Gauge::default();
        open.set(in_flight as i64);
        r.register(
            "fastmig_migrations_in_flight",
            "Migrations ordered and not ended",
            open,
        );
        r.register(
            "fastmig_migrations",
            "Migrations ended, by transport and result (done, failed)",
            self.migrations.clone(),
        );
        r.register(
            "fastmig_migration_bytes",
            "Bytes sent by ended migrations (the source's summary)",
            self.bytes.clone(),
        );
        r.register(
            "fastmig_migration_downtime_seconds",
            "Measured downtime of completed migrations",
            self.downtime.clone(),
        );
        r.register(
            "fastmig_migration_duration_seconds",
            "Measured total time of completed migrations",
            self.duration.clone(),
        );
        r.register(
            "fastmig_decision_seconds",
            "Time of the policy round of each interval",
            self.decision.clone(),
        );
        text(&r)
    }
}

/// Every metric family the agent and the controller export (for the deploy/ checks).
pub const EXPORTED: &[&str] = &[
    "fastmig_host_utilization",
    "fastmig_host_state",
    "fastmig_host_vms",
    "fastmig_vm_utilization",
    "fastmig_host_reachable",
    "fastmig_host_power_watts",
    "fastmig_cluster_power_watts",
    "fastmig_cluster_active_hosts",
    "fastmig_cluster_energy_joules_total",
    "fastmig_migrations_in_flight",
    "fastmig_migrations_total",
    "fastmig_migration_bytes_total",
    "fastmig_migration_downtime_seconds",
    "fastmig_migration_duration_seconds",
    "fastmig_decision_seconds",
    "fastmig_agent_migrations_total",
    "fastmig_agent_migrations_in_flight",
];

#[cfg(test)]
mod tests {
    use super::*;
    use fastmig_sim::setup::reference_host_types;

    #[test]
    fn power_follows_the_model_and_standby_fraction() {
        let g4 = reference_host_types()[0].clone();
        // G4 table: 86 W idle, 117 W full; 0.5 is a table point (102 W).
        assert_eq!(host_power_w(&g4, HostState::Active, 0.5, 0.0), 102.0);
        assert_eq!(host_power_w(&g4, HostState::Standby, 0.5, 0.0), 0.0);
        assert_eq!(host_power_w(&g4, HostState::Standby, 0.9, 0.1), 8.6);
    }
}
