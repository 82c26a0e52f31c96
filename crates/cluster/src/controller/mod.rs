//! The controller: every interval it gathers the agents' reports, runs the simulator's
//! policies on them ([`round`]), orders the migrations they chose, follows them to their end
//! ([`reconcile`]), and records everything in its [`Store`].
//!
//! ```text
//!  tick ─► report() from every agent (threads) ─► end open migrations (reconcile)
//!       ─► histories ─► round::plan (detector, selector, PABFD, evacuation)
//!       ─► wake / order moves (≤ K in flight per host) / standby ─► store (one transaction)
//! ```
//!
//! A migration is written to the store (`ordered`) before either agent hears of it, so a
//! controller that dies at any point finds it on restart ([`Controller::new`] loads the open
//! ones) and ends it from what the agents then report.
//!
//! It does not own the agents (the [`AgentApi`] seam), the policies (`fastmig_sim`), or
//! the HTTP API (`api`).

pub mod api;
pub mod dashboard;
mod orders;
pub mod reconcile;
pub mod round;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastmig_host::RunStatus;
use fastmig_migration::TransportKind;
use fastmig_sim::cost::{CloudSimCost, MigrationCostModel};
use fastmig_sim::engine::VM_HISTORY;
use fastmig_sim::policy::{OverloadDetector, Pabfd, VmSelector};
use fastmig_sim::rng::SplitMix64;
use fastmig_sim::setup::HostType;
use fastmig_sim::{ModelCost, PolicySpec};
use serde::{Deserialize, Serialize};

use crate::agent_api::{AgentApi, AgentError};
use crate::proto::{HostName, HostReport, HostState, MigrationId, StartVm, VmName, VmReport};
use crate::store::{
    now_ms, DecisionRow, HostRow, HostSample, IntervalWrite, MigrationRow, MigrationState, Store,
    StoreError, VmRow, VmSample,
};
use reconcile::Resolution;
use round::{Plan, PlannedMove, Policies, RoundHost, RoundVm};

/// Why the controller could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The configuration cannot run.
    #[error("controller configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an order (the policy's or an operator's) was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// No such VM.
    #[error("unknown VM {0}")]
    UnknownVm(VmName),
    /// No such host.
    #[error("unknown host {0}")]
    UnknownHost(HostName),
    /// Source and destination are the same host.
    #[error("VM {0} already runs on {1}")]
    SameHost(VmName, HostName),
    /// The destination is in standby.
    #[error("host {0} is in standby")]
    Standby(HostName),
    /// The destination's agent did not answer its last report.
    #[error("host {0} is unreachable")]
    Unreachable(HostName),
    /// The destination lacks CPU or RAM.
    #[error("host {0} has no room for VM {1}")]
    NoRoom(HostName, VmName),
    /// The VM is migrating, or a host is at its in-flight limit.
    #[error("busy: {0}")]
    Busy(String),
    /// A VM of this name exists.
    #[error("VM {0} exists")]
    Exists(VmName),
    /// An agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The migration cost the controller predicts for each order.
pub enum CostModel {
    /// CloudSim's `RAM / (bandwidth / 2)` (no downtime prediction).
    CloudSim,
    /// The fitted pre-copy model (`--model FILE`), for the controller's transport.
    Model(Box<ModelCost>),
}

impl CostModel {
    fn model(&self) -> &dyn MigrationCostModel {
        match self {
            CostModel::CloudSim => &CloudSimCost,
            CostModel::Model(m) => m.as_ref(),
        }
    }
}

/// How the controller runs.
pub struct ControllerConfig {
    /// Policy as `fastmig simulate --policy` names it (`lr-mmt`).
    pub policy: String,
    /// Interval between rounds.
    pub interval: Duration,
    /// Most migrations in flight per host, as source or destination (default 1).
    pub max_in_flight: usize,
    /// Transport of the migrations it orders.
    pub transport: TransportKind,
    /// Bandwidth cap of the migrations it orders, bytes/s (`None`: the engine's default,
    /// none).
    pub migration_bandwidth: Option<u64>,
    /// Downtime limit of the migrations it orders (`None`: the engine's default, 30 ms).
    pub migration_downtime_limit: Option<Duration>,
    /// Whether the rounds consolidate (default). `false`: every round gathers, records and
    /// serves the reports but plans nothing: no migration, no standby, no wake (the baseline
    /// of `fastmig experiment`); operators' orders are still carried out.
    pub consolidate: bool,
    /// Predicted cost.
    pub cost: CostModel,
    /// Threads gathering reports.
    pub gather_threads: usize,
    /// Seed of the random selector.
    pub seed: u64,
    /// Keep the host and VM samples of this many intervals (at least the 30 the histories
    /// need); `None`: keep all.
    pub keep_intervals: Option<u32>,
}

impl ControllerConfig {
    /// Defaults: 10 s, one migration per host, classic without a bandwidth cap,
    /// consolidating, CloudSim's cost, 16 threads.
    pub fn new(policy: &str) -> Self {
        Self {
            policy: policy.into(),
            interval: Duration::from_secs(10),
            max_in_flight: 1,
            transport: TransportKind::Classic,
            migration_bandwidth: None,
            migration_downtime_limit: None,
            consolidate: true,
            cost: CostModel::CloudSim,
            gather_threads: 16,
            seed: 42,
            keep_intervals: None,
        }
    }
}

/// A host as the controller last saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    /// Its name.
    pub name: HostName,
    /// Whether the last report arrived.
    pub reachable: bool,
    /// Power state.
    pub state: HostState,
    /// Declared type (`None` until a first report).
    pub host_type: Option<HostType>,
    /// Utilisation (requested MIPS / capacity) at the last report.
    pub utilization: f64,
    /// VMs on it (running or arriving).
    pub vms: Vec<VmName>,
    /// Migrations in flight from or to it.
    pub in_flight: usize,
}

/// A VM as the controller last saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    /// Where it runs.
    pub host: HostName,
    /// Its report there.
    pub report: VmReport,
}

/// What one interval did (stored as the decision's summary).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Decision {
    /// Interval number.
    pub interval: i64,
    /// Hosts whose report did not arrive.
    pub unreachable: Vec<HostName>,
    /// Migrations that ended this interval: (id, state).
    pub ended: Vec<(MigrationId, MigrationState)>,
    /// What the policy chose.
    pub plan: Plan,
    /// Moves ordered, with their ids.
    pub ordered: Vec<(MigrationId, PlannedMove)>,
    /// Moves left for later (a host at its in-flight limit).
    pub deferred: Vec<PlannedMove>,
    /// Orders the agents refused: (move, error).
    pub refused: Vec<(PlannedMove, String)>,
    /// Time spent in the policy round, microseconds.
    pub decision_us: u64,
}

/// The controller.
pub struct Controller {
    cfg: ControllerConfig,
    agents: BTreeMap<HostName, Arc<dyn AgentApi>>,
    store: Box<dyn Store>,
    detector: Box<dyn OverloadDetector>,
    selector: Box<dyn VmSelector>,
    rng: SplitMix64,
    interval_no: i64,
    next_migration: u64,
    next_order: i64,
    hosts: BTreeMap<HostName, HostStatus>,
    reports: BTreeMap<HostName, HostReport>,
    vms: BTreeMap<VmName, VmStatus>,
    host_hist: HashMap<HostName, VecDeque<f64>>,
    vm_hist: HashMap<VmName, VecDeque<f64>>,
    open: BTreeMap<MigrationId, MigrationRow>,
}

/// Each agent's report (or why it did not come), by host.
pub type Reports = Vec<(HostName, Result<HostReport, AgentError>)>;

/// Asks every agent for its report, on `threads` threads.
pub fn gather(agents: &[Arc<dyn AgentApi>], threads: usize) -> Reports {
    let threads = threads.clamp(1, agents.len().max(1));
    let chunk = agents.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = agents
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|a| (a.host().clone(), a.report()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(agents.chunks(chunk))
            .flat_map(|(h, part)| {
                // A thread that panicked answers for none of its hosts: each is recorded as
                // unreachable rather than silently missing.
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|a| {
                            let host = a.host().clone();
                            let e = AgentError::Unreachable {
                                host: host.clone(),
                                reason: "report thread panicked".into(),
                            };
                            (host, Err(e))
                        })
                        .collect()
                })
            })
            .collect()
    })
}

/// The spec a VM report describes (what a destination needs to receive it, the controller's
/// `PrepareIncoming` included): [`VmReport::start_vm`].
pub fn spec_of(vm: &VmReport) -> StartVm {
    vm.start_vm()
}

fn ram_mb(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX)
}

fn push_hist(h: &mut VecDeque<f64>, u: f64) {
    h.push_front(u);
    h.truncate(VM_HISTORY);
}

impl Controller {
    /// A controller over `agents`, carrying on from what `store` holds (hosts, open
    /// migrations, histories, ids).
    pub fn new(
        cfg: ControllerConfig,
        agents: Vec<Arc<dyn AgentApi>>,
        mut store: Box<dyn Store>,
    ) -> Result<Self, ControllerError> {
        let spec = PolicySpec::parse(&cfg.policy, None)
            .map_err(|e| ControllerError::Config(e.to_string()))?;
        let PolicySpec::Dynamic {
            detector,
            selector,
            param,
        } = spec
        else {
            return Err(ControllerError::Config(format!(
                "policy {} never migrates: the controller needs DETECTOR-SELECTOR (e.g. lr-mmt)",
                cfg.policy
            )));
        };
        if cfg
            .keep_intervals
            .is_some_and(|k| (k as usize) < VM_HISTORY)
        {
            return Err(ControllerError::Config(format!(
                "keep at least {VM_HISTORY} intervals of samples (the histories' length)"
            )));
        }
        if cfg.max_in_flight == 0 {
            return Err(ControllerError::Config(
                "max in flight must be at least 1".into(),
            ));
        }
        let mut by_name = BTreeMap::new();
        for a in agents {
            let name = a.host().clone();
            if by_name.insert(name.clone(), a).is_some() {
                return Err(ControllerError::Config(format!("host {name} given twice")));
            }
        }
        let (interval_no, next_migration, next_order) = store.max_ids()?;
        let mut hosts = BTreeMap::new();
        for row in store.hosts()? {
            if by_name.contains_key(&row.name) {
                hosts.insert(
                    row.name.clone(),
                    HostStatus {
                        host_type: serde_json::from_str(&row.host_type).ok(),
                        name: row.name,
                        reachable: false,
                        state: row.state,
                        utilization: 0.0,
                        vms: Vec::new(),
                        in_flight: 0,
                    },
                );
            }
        }
        let open = store
            .migrations(true)?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        let host_hist = store
            .host_histories(VM_HISTORY as i64)?
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        let vm_hist = store
            .vm_histories(VM_HISTORY as i64)?
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        Ok(Self {
            detector: detector.build(param),
            selector: selector.build(),
            rng: SplitMix64::new(cfg.seed ^ interval_no as u64),
            cfg,
            agents: by_name,
            store,
            interval_no,
            next_migration: next_migration + 1,
            next_order: next_order + 1,
            hosts,
            reports: BTreeMap::new(),
            vms: BTreeMap::new(),
            host_hist,
            vm_hist,
            open,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// Hosts as last seen.
    pub fn hosts(&self) -> Vec<HostStatus> {
        self.hosts.values().cloned().collect()
    }

    /// VMs as last seen.
    pub fn vms(&self) -> &BTreeMap<VmName, VmStatus> {
        &self.vms
    }

    /// Migrations not ended.
    pub fn open_migrations(&self) -> Vec<MigrationRow> {
        self.open.values().cloned().collect()
    }

    /// The simulator's policies as this controller is configured to run them.
    fn policies(&self) -> Policies<'_> {
        Policies {
            detector: self.detector.as_ref(),
            selector: self.selector.as_ref(),
            placement: &Pabfd,
            cost: self.cfg.cost.model(),
            interval_s: self.cfg.interval.as_secs_f64(),
            max_in_flight: self.cfg.max_in_flight,
        }
    }

    /// Each host's last report (the dashboard reads migrations' progress from it).
    pub fn reports(&self) -> &BTreeMap<HostName, HostReport> {
        &self.reports
    }

    /// The store (the API reads migrations and decisions from it).
    pub fn store(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    /// The next order id (operator orders are numbered in the store).
    pub fn next_order_id(&mut self) -> i64 {
        let id = self.next_order;
        self.next_order += 1;
        id
    }

    /// The agents, to gather reports without holding the controller (the API stays
    /// responsive while an agent times out).
    pub fn agents(&self) -> Vec<Arc<dyn AgentApi>> {
        self.agents.values().cloned().collect()
    }

    /// Takes fresh reports in: hosts, VMs, and the end of open migrations.
    fn refresh(&mut self, gathered: Reports, decision: &mut Decision) -> Result<(), StoreError> {
        let mut reports = BTreeMap::new();
        for (name, r) in gathered {
            match r {
                Ok(rep) if rep.host == name => {
                    reports.insert(name, rep);
                }
                Ok(rep) => {
                    tracing::warn!(host = %name, reported = %rep.host, "agent reports another host's name; skipped");
                    decision.unreachable.push(name);
                }
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "no report");
                    decision.unreachable.push(name);
                }
            }
        }
        // Unreachable hosts keep their last report: their VMs stay where they were.
        for name in &decision.unreachable {
            if let Some(h) = self.hosts.get_mut(name) {
                h.reachable = false;
            }
        }
        for (name, rep) in &reports {
            self.reports.insert(name.clone(), rep.clone());
        }
        self.reconcile(&reports, decision)?;
        self.rebuild_views(&reports);
        Ok(())
    }

    fn reconcile(
        &mut self,
        reports: &BTreeMap<HostName, HostReport>,
        decision: &mut Decision,
    ) -> Result<(), StoreError> {
        let ids: Vec<MigrationId> = self.open.keys().copied().collect();
        for id in ids {
            let Some(m) = self.open.get(&id).cloned() else {
                continue;
            };
            let res = reconcile::resolve(&m, reports.get(&m.source), reports.get(&m.destination));
            let mut row = m.clone();
            match res {
                Resolution::Pending => continue,
                Resolution::InDoubt(e) => {
                    if row.state == MigrationState::InDoubt {
                        continue;
                    }
                    tracing::warn!(migration = %id, vm = %row.vm, error = %e, "migration in doubt");
                    row.state = MigrationState::InDoubt;
                    row.error = Some(e);
                    self.store.put_migration(&row)?;
                    self.open.insert(id, row);
                    continue;
                }
                Resolution::Done(summary) => {
                    row.state = MigrationState::Done;
                    if let Some(s) = summary {
                        row.measured_s = Some(s.total_ms / 1e3);
                        row.measured_downtime_s = Some(s.downtime_ms / 1e3);
                        row.summary = serde_json::to_string(&s).ok();
                    }
                }
                Resolution::Failed {
                    error,
                    cancel_destination,
                } => {
                    if cancel_destination {
                        if let Some(a) = self.agents.get(&m.destination) {
                            // Best effort: an incoming VM left behind is the agent's to clean
                            // up too; it never runs (the source kept the VM).
                            let _ = a.cancel_migration(id);
                        }
                    }
                    row.state = MigrationState::Failed;
                    row.error = Some(error);
                }
            }
            row.ended_ms = Some(now_ms());
            self.store.put_migration(&row)?;
            tracing::info!(migration = %id, vm = %row.vm, state = row.state.as_str(), "migration ended");
            decision.ended.push((id, row.state));
            self.open.remove(&id);
        }
        Ok(())
    }

    fn in_flight(&self) -> HashMap<HostName, usize> {
        let mut n: HashMap<HostName, usize> = HashMap::new();
        for m in self.open.values() {
            *n.entry(m.source.clone()).or_default() += 1;
            *n.entry(m.destination.clone()).or_default() += 1;
        }
        n
    }

    fn rebuild_views(&mut self, fresh: &BTreeMap<HostName, HostReport>) {
        let in_flight = self.in_flight();
        // VMs: from every last report (fresh or, for unreachable hosts, the last one), the
        // entry where the VM runs wins over an arriving copy.
        let mut vms: BTreeMap<VmName, VmStatus> = BTreeMap::new();
        for (name, rep) in &self.reports {
            for v in &rep.vms {
                if matches!(v.status, RunStatus::Postmigrate | RunStatus::Stopped) {
                    continue;
                }
                let arriving = v.status == RunStatus::Inmigrate;
                match vms.get(&v.vm) {
                    Some(_) if arriving => {}
                    _ => {
                        vms.insert(
                            v.vm.clone(),
                            VmStatus {
                                host: name.clone(),
                                report: v.clone(),
                            },
                        );
                    }
                }
            }
        }
        self.vms = vms;
        for (name, rep) in &self.reports {
            let total = rep.host_type.total_mips();
            let req: f64 = rep
                .vms
                .iter()
                .filter(|v| !matches!(v.status, RunStatus::Postmigrate | RunStatus::Stopped))
                .map(|v| v.demand * v.mips)
                // Not `sum()`: an empty float sum is -0.0.
                .fold(0.0, |a, b| a + b);
            let reachable = fresh.contains_key(name);
            let util = if total > 0.0 { req / total } else { 0.0 };
            self.hosts.insert(
                name.clone(),
                HostStatus {
                    name: name.clone(),
                    reachable,
                    state: rep.state,
                    host_type: Some(rep.host_type.clone()),
                    utilization: util,
                    vms: rep.vms.iter().map(|v| v.vm.clone()).collect(),
                    in_flight: in_flight.get(name).copied().unwrap_or(0),
                },
            );
            if reachable {
                push_hist(self.host_hist.entry(name.clone()).or_default(), util);
            }
        }
        for (name, v) in &self.vms {
            if fresh.contains_key(&v.host) {
                push_hist(
                    self.vm_hist.entry(name.clone()).or_default(),
                    v.report.demand,
                );
            }
        }
    }

    fn round_input(&self) -> (Vec<RoundHost>, Vec<RoundVm>) {
        let busy: std::collections::HashSet<&VmName> = self.open.values().map(|m| &m.vm).collect();
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        for (name, st) in &self.hosts {
            let (Some(rep), true) = (self.reports.get(name), st.reachable) else {
                continue;
            };
            let hi = hosts.len();
            hosts.push(RoundHost {
                name: name.clone(),
                host_type: rep.host_type.clone(),
                active: rep.state == HostState::Active,
                standby: rep.state == HostState::Standby,
                in_flight: st.in_flight,
                history: self
                    .host_hist
                    .get(name)
                    .map(|h| h.iter().copied().collect())
                    .unwrap_or_default(),
            });
            for v in &rep.vms {
                if matches!(v.status, RunStatus::Postmigrate | RunStatus::Stopped) {
                    continue;
                }
                vms.push(RoundVm {
                    name: v.vm.clone(),
                    host: hi,
                    mips: v.mips,
                    ram_mb: ram_mb(v.mem_bytes),
                    requested_mips: v.demand * v.mips,
                    history: self
                        .vm_hist
                        .get(&v.vm)
                        .map(|h| h.iter().copied().collect())
                        .unwrap_or_default(),
                    movable: v.status == RunStatus::Running && !busy.contains(&v.vm),
                });
            }
        }
        (hosts, vms)
    }

    /// One interval: reports, migrations ended, the policy round, orders, the store.
    pub fn tick(&mut self) -> Result<Decision, ControllerError> {
        let reports = gather(&self.agents(), self.cfg.gather_threads);
        self.tick_with(reports)
    }

    /// [`Controller::tick`] with reports gathered by [`gather`] beforehand.
    pub fn tick_with(&mut self, reports: Reports) -> Result<Decision, ControllerError> {
        self.interval_no += 1;
        let mut d = Decision {
            interval: self.interval_no,
            ..Decision::default()
        };
        self.refresh(reports, &mut d)?;
        let (hosts, vms) = self.round_input();
        let t0 = Instant::now();
        // The round draws from the controller's generator (RS selection) while the policies
        // borrow the controller: it works on a copy that then replaces the original.
        let mut rng = self.rng.clone();
        let plan = if self.cfg.consolidate {
            round::plan(&hosts, &vms, &self.policies(), &mut rng)
        } else {
            Plan::default()
        };
        self.rng = rng;
        d.decision_us = t0.elapsed().as_micros() as u64;
        self.apply(&plan, &mut d)?;
        d.plan = plan;
        self.record(&d)?;
        Ok(d)
    }

    fn apply(&mut self, plan: &Plan, d: &mut Decision) -> Result<(), ControllerError> {
        if let Some(h) = &plan.wake {
            if let Err(e) = self.set_power(h, true) {
                tracing::warn!(host = %h, error = %e, "wake failed");
            }
        }
        let mut in_flight = self.in_flight();
        for mv in &plan.moves {
            let busy =
                |h: &HostName| in_flight.get(h).copied().unwrap_or(0) >= self.cfg.max_in_flight;
            if busy(&mv.source) || busy(&mv.destination) {
                d.deferred.push(mv.clone());
                continue;
            }
            let (t, i) = (self.cfg.transport, self.interval_no);
            match self.order(&mv.vm, &mv.destination, t, mv.origin, Some(i)) {
                Ok(row) => {
                    *in_flight.entry(mv.source.clone()).or_default() += 1;
                    *in_flight.entry(mv.destination.clone()).or_default() += 1;
                    d.ordered.push((row.id, mv.clone()));
                }
                Err(OrderError::Store(e)) => return Err(e.into()),
                Err(e) => d.refused.push((mv.clone(), e.to_string())),
            }
        }
        for h in &plan.to_standby {
            if in_flight.contains_key(h) {
                continue;
            }
            if let Err(e) = self.set_power(h, false) {
                tracing::warn!(host = %h, error = %e, "standby refused");
            }
        }
        Ok(())
    }

    fn record(&mut self, d: &Decision) -> Result<(), StoreError> {
        let t = now_ms();
        let mut w = IntervalWrite::default();
        for (name, st) in &self.hosts {
            let Some(rep) = self.reports.get(name) else {
                continue;
            };
            w.hosts.push(HostRow {
                name: name.clone(),
                state: st.state,
                reachable: st.reachable,
                host_type: serde_json::to_string(&rep.host_type).unwrap_or_default(),
                migration_address: rep.migration_address.clone(),
                last_report_ms: rep.time_ms as i64,
            });
            if st.reachable {
                w.host_samples.push(HostSample {
                    host: name.clone(),
                    interval_no: self.interval_no,
                    time_ms: t,
                    utilization: st.utilization,
                    vm_count: st.vms.len() as i64,
                });
            }
        }
        for (name, v) in &self.vms {
            w.vms.push(VmRow {
                name: name.clone(),
                host: Some(v.host.clone()),
                spec: serde_json::to_string(&spec_of(&v.report)).unwrap_or_default(),
                status: v.report.status.to_string(),
                demand: v.report.demand,
                updated_ms: t,
            });
            if self.hosts.get(&v.host).is_some_and(|h| h.reachable) {
                w.vm_samples.push(VmSample {
                    vm: name.clone(),
                    interval_no: self.interval_no,
                    host: v.host.clone(),
                    demand: v.report.demand,
                    dirty_rate_pps: v.report.dirty_rate_pps,
                });
            }
        }
        w.decision = Some(DecisionRow {
            id: self.interval_no,
            time_ms: t,
            policy: self.cfg.policy.clone(),
            decision_us: d.decision_us as i64,
            hosts: self.hosts.len() as i64,
            vms: self.vms.len() as i64,
            unreachable: d.unreachable.len() as i64,
            overloaded: d.plan.overloaded.len() as i64,
            migrations_ordered: d.ordered.len() as i64,
            summary: serde_json::to_string(d).unwrap_or_default(),
        });
        self.store.write_interval(&w)?;
        if let Some(k) = self.cfg.keep_intervals {
            self.store
                .prune_samples(self.interval_no - i64::from(k) + 1)?;
        }
        Ok(())
    }

    fn agent(&self, h: &HostName) -> Result<&Arc<dyn AgentApi>, OrderError> {
        self.agents
            .get(h)
            .ok_or_else(|| OrderError::UnknownHost(h.clone()))
    }

    /// Interval number of the last tick.
    pub fn interval_no(&self) -> i64 {
        self.interval_no
    }
}

#[cfg(test)]
mod tests;
