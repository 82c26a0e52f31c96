//! A test double for the agents: a whole cluster in memory, each host an [`AgentApi`].
//!
//! It keeps the agents' rules (a host in standby takes no VM and refuses standby while VMs
//! run; a migration is prepared on the destination, then started on the source, and both
//! report it under one id) without VM processes, so controller tests and the scale benchmark
//! run thousands of hosts. Migrations move only when the test calls [`FakeCluster::step`]:
//! every running migration then completes (the VM leaves the source and runs on the
//! destination) or fails (the VM keeps running on the source) if the test asked for that.
//! Hosts can be made unreachable, and an agent's restart can lose its migration records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use fastmig_host::RunStatus;
use fastmig_migration::{MigrationStatus, MigrationSummary};
use fastmig_sim::setup::HostType;

use crate::agent_api::{AgentApi, AgentError};
pub use crate::controller::spec_of;
use crate::proto::{
    DemandSource, HostName, HostReport, HostState, IncomingReady, MigrationId, MigrationPhase,
    MigrationRecord, PrepareIncoming, Side, StartOutgoing, StartVm, VmName, VmReport,
};

/// One simulated host.
#[derive(Debug, Clone)]
struct FakeHost {
    report: HostReport,
    reachable: bool,
    /// The next outgoing migration of this host fails with this error at [`FakeCluster::step`].
    fail_next: Option<String>,
    /// Report calls served (tests check the controller asks every host once per interval).
    reports_served: u64,
    /// The outgoing migrations ordered from this host, in order.
    outgoing: Vec<StartOutgoing>,
}

/// A cluster of fake agents sharing one state.
#[derive(Debug)]
pub struct FakeCluster {
    hosts: Vec<Mutex<FakeHost>>,
    index: HashMap<HostName, usize>,
}

/// One fake agent: an [`AgentApi`] over one host of a [`FakeCluster`].
#[derive(Debug, Clone)]
pub struct FakeAgent {
    cluster: Arc<FakeCluster>,
    idx: usize,
    name: HostName,
}

fn lock(m: &Mutex<FakeHost>) -> MutexGuard<'_, FakeHost> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM spec with a constant demand, for tests and benchmarks.
pub fn test_vm(name: &str, mem_mb: u64, mips: f64, demand: f64) -> StartVm {
    StartVm {
        vm: VmName(name.into()),
        mem_bytes: mem_mb << 20,
        vcpus: 1,
        mips,
        workload: "idle".into(),
        demand: DemandSource::Constant {
            utilization: demand,
        },
        demand_epoch_ms: None,
    }
}

fn vm_report(spec: &StartVm, status: RunStatus) -> VmReport {
    let demand = match &spec.demand {
        DemandSource::Constant { utilization } => *utilization,
        DemandSource::Trace { .. } => 0.0,
    };
    VmReport {
        vm: spec.vm.clone(),
        status,
        mem_bytes: spec.mem_bytes,
        vcpus: spec.vcpus,
        mips: spec.mips,
        demand,
        dirty_rate_pps: 0.0,
        working_set_bytes: 0,
        workload: spec.workload.clone(),
        demand_source: spec.demand.clone(),
        demand_epoch_ms: spec.demand_epoch_ms,
    }
}

fn summary(total_ms: f64) -> MigrationSummary {
    MigrationSummary {
        status: MigrationStatus::Completed,
        transport: "classic".into(),
        total_ms,
        downtime_ms: 12.0,
        setup_ms: 1.0,
        dst_setup_ms: 1.0,
        rounds: 3,
        bytes_sent: 1 << 20,
        pages_sent: 256,
        zero_pages_skipped: 0,
        throughput_mib_s: 100.0,
        src_cpu_s: 0.1,
        dst_cpu_s: 0.1,
        digest_match: true,
        round_details: Vec::new(),
    }
}

impl FakeCluster {
    /// Hosts `(name, type)`, all active and empty.
    pub fn new(hosts: Vec<(HostName, HostType)>) -> Arc<Self> {
        let index = hosts
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let hosts = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (host, host_type))| {
                Mutex::new(FakeHost {
                    report: HostReport {
                        migration_address: format!("10.0.{}.{}:7000", i / 250, i % 250 + 1),
                        host,
                        host_type,
                        state: HostState::Active,
                        vms: Vec::new(),
                        migrations: Vec::new(),
                        time_ms: 0,
                    },
                    reachable: true,
                    fail_next: None,
                    reports_served: 0,
                    outgoing: Vec::new(),
                })
            })
            .collect();
        Arc::new(Self { hosts, index })
    }

    /// One agent per host, in host order.
    pub fn agents(self: &Arc<Self>) -> Vec<FakeAgent> {
        self.index_sorted()
            .into_iter()
            .map(|(name, idx)| FakeAgent {
                cluster: Arc::clone(self),
                idx,
                name,
            })
            .collect()
    }

    fn index_sorted(&self) -> Vec<(HostName, usize)> {
        let mut v: Vec<_> = self.index.iter().map(|(n, &i)| (n.clone(), i)).collect();
        v.sort_by_key(|x| x.1);
        v
    }

    fn host(&self, name: &HostName) -> &Mutex<FakeHost> {
        let i = self
            .index
            .get(name)
            .unwrap_or_else(|| panic!("fake cluster has no host {name}"));
        &self.hosts[*i]
    }

    /// Starts a VM directly on a host (the cluster's initial state).
    pub fn start(&self, host: &HostName, spec: &StartVm) {
        lock(self.host(host))
            .report
            .vms
            .push(vm_report(spec, RunStatus::Running));
    }

    /// Sets a VM's demand wherever it runs.
    pub fn set_demand(&self, vm: &VmName, demand: f64) {
        for h in &self.hosts {
            for v in lock(h).report.vms.iter_mut().filter(|v| &v.vm == vm) {
                v.demand = demand;
            }
        }
    }

    /// Sets every VM's demand at once (`f` gets the VM's name; thousands of hosts).
    pub fn update_demands(&self, f: impl Fn(&VmName) -> f64) {
        for h in &self.hosts {
            for v in lock(h).report.vms.iter_mut() {
                v.demand = f(&v.vm);
            }
        }
    }

    /// Makes a host's agent (un)reachable.
    pub fn set_reachable(&self, host: &HostName, reachable: bool) {
        lock(self.host(host)).reachable = reachable;
    }

    /// The next outgoing migration of `host` fails at the next [`FakeCluster::step`].
    pub fn fail_next_outgoing(&self, host: &HostName, error: &str) {
        lock(self.host(host)).fail_next = Some(error.into());
    }

    /// An agent restart that lost its migration records (its VMs survive).
    pub fn forget_migrations(&self, host: &HostName) {
        lock(self.host(host)).report.migrations.clear();
    }

    /// The outgoing migrations ordered from `host` (its agent's `start_outgoing` calls).
    pub fn outgoing(&self, host: &HostName) -> Vec<StartOutgoing> {
        lock(self.host(host)).outgoing.clone()
    }

    /// Report calls the host served.
    pub fn reports_served(&self, host: &HostName) -> u64 {
        lock(self.host(host)).reports_served
    }

    /// The host's current state.
    pub fn state(&self, host: &HostName) -> HostState {
        lock(self.host(host)).report.state
    }

    /// Every host the VM is on, with its status there.
    pub fn placements(&self, vm: &VmName) -> Vec<(HostName, RunStatus)> {
        let mut out = Vec::new();
        for h in &self.hosts {
            let h = lock(h);
            for v in h.report.vms.iter().filter(|v| &v.vm == vm) {
                out.push((h.report.host.clone(), v.status));
            }
        }
        out
    }

    /// Hosts on which the VM runs (status `running`): exactly one for a healthy VM.
    pub fn running_on(&self, vm: &VmName) -> Vec<HostName> {
        self.placements(vm)
            .into_iter()
            .filter(|(_, s)| *s == RunStatus::Running)
            .map(|(h, _)| h)
            .collect()
    }

    /// Every VM name in the cluster.
    pub fn vm_names(&self) -> Vec<VmName> {
        let mut out: Vec<VmName> = self
            .hosts
            .iter()
            .flat_map(|h| {
                lock(h)
                    .report
                    .vms
                    .iter()
                    .map(|v| v.vm.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Ends every running migration: completed (the VM moves), or failed for a source told to
    /// fail. Returns how many ended.
    pub fn step(&self) -> usize {
        let mut running = Vec::new();
        for h in &self.hosts {
            let h = lock(h);
            for r in &h.report.migrations {
                if r.side == Side::Source && matches!(r.phase, MigrationPhase::Running { .. }) {
                    running.push((h.report.host.clone(), r.clone()));
                }
            }
        }
        for (src, rec) in &running {
            let fail = lock(self.host(src)).fail_next.take();
            let (src_phase, dst_phase) = match &fail {
                Some(e) => (
                    MigrationPhase::Failed { error: e.clone() },
                    MigrationPhase::Failed { error: e.clone() },
                ),
                None => (
                    MigrationPhase::Completed {
                        summary: Some(summary(1500.0)),
                    },
                    MigrationPhase::Completed { summary: None },
                ),
            };
            {
                let mut s = lock(self.host(src));
                if fail.is_none() {
                    s.report.vms.retain(|v| v.vm != rec.vm);
                }
                set_phase(&mut s.report, rec.migration, src_phase);
            }
            let mut d = lock(self.host(&rec.peer));
            if fail.is_none() {
                for v in d.report.vms.iter_mut().filter(|v| v.vm == rec.vm) {
                    v.status = RunStatus::Running;
                }
            } else {
                d.report
                    .vms
                    .retain(|v| !(v.vm == rec.vm && v.status == RunStatus::Inmigrate));
            }
            set_phase(&mut d.report, rec.migration, dst_phase);
        }
        running.len()
    }
}

fn set_phase(r: &mut HostReport, id: MigrationId, phase: MigrationPhase) {
    for m in r.migrations.iter_mut().filter(|m| m.migration == id) {
        m.phase = phase.clone();
    }
}

impl FakeAgent {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut FakeHost) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let mut h = lock(&self.cluster.hosts[self.idx]);
        if !h.reachable {
            return Err(AgentError::Unreachable {
                host: self.name.clone(),
                reason: "connection refused (fake)".into(),
            });
        }
        f(&mut h)
    }

    fn refused(&self, status: u16, error: String) -> AgentError {
        AgentError::Refused {
            host: self.name.clone(),
            status,
            error,
        }
    }

    fn record(&self, id: MigrationId) -> Result<MigrationRecord, AgentError> {
        self.with(|h| {
            h.report
                .migrations
                .iter()
                .find(|m| m.migration == id)
                .cloned()
                .ok_or_else(|| self.refused(404, format!("unknown migration {id}")))
        })
    }
}

impl AgentApi for FakeAgent {
    fn host(&self) -> &HostName {
        &self.name
    }

    fn report(&self) -> Result<HostReport, AgentError> {
        self.with(|h| {
            h.reports_served += 1;
            h.report.time_ms = crate::store::now_ms() as u64;
            Ok(h.report.clone())
        })
    }

    fn start_vm(&self, vm: &StartVm) -> Result<VmReport, AgentError> {
        self.with(|h| {
            if h.report.state == HostState::Standby {
                return Err(self.refused(409, "host is in standby".into()));
            }
            if h.report.vms.iter().any(|v| v.vm == vm.vm) {
                return Err(self.refused(409, format!("VM {} exists", vm.vm)));
            }
            let r = vm_report(vm, RunStatus::Running);
            h.report.vms.push(r.clone());
            Ok(r)
        })
    }

    fn stop_vm(&self, vm: &VmName) -> Result<(), AgentError> {
        self.with(|h| {
            let before = h.report.vms.len();
            h.report.vms.retain(|v| &v.vm != vm);
            if h.report.vms.len() == before {
                return Err(self.refused(404, format!("unknown VM {vm}")));
            }
            Ok(())
        })
    }

    fn prepare_incoming(&self, order: &PrepareIncoming) -> Result<IncomingReady, AgentError> {
        self.with(|h| {
            if h.report.state == HostState::Standby {
                return Err(self.refused(409, "host is in standby".into()));
            }
            if h.report.vms.iter().any(|v| v.vm == order.vm.vm) {
                return Err(self.refused(409, format!("VM {} exists here", order.vm.vm)));
            }
            h.report
                .vms
                .push(vm_report(&order.vm, RunStatus::Inmigrate));
            h.report.migrations.push(MigrationRecord {
                migration: order.migration,
                vm: order.vm.vm.clone(),
                side: Side::Destination,
                peer: order.source.clone(),
                transport: order.transport,
                phase: MigrationPhase::Prepared,
            });
            Ok(IncomingReady {
                migration: order.migration,
                uri: h.report.migration_address.clone(),
            })
        })
    }

    fn start_outgoing(&self, order: &StartOutgoing) -> Result<MigrationRecord, AgentError> {
        let rec = self.with(|h| {
            let Some(vm) = h.report.vms.iter().find(|v| v.vm == order.vm) else {
                return Err(self.refused(404, format!("unknown VM {}", order.vm)));
            };
            if vm.status != RunStatus::Running {
                return Err(self.refused(409, format!("VM {} is {}", order.vm, vm.status)));
            }
            let rec = order.source_record();
            h.report.migrations.push(rec.clone());
            h.outgoing.push(order.clone());
            Ok(rec)
        })?;
        if let Some(&d) = self.cluster.index.get(&order.destination) {
            set_phase(
                &mut lock(&self.cluster.hosts[d]).report,
                order.migration,
                MigrationPhase::Running { progress: None },
            );
        }
        Ok(rec)
    }

    fn migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError> {
        self.record(id)
    }

    fn cancel_migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError> {
        self.with(|h| {
            let Some(rec) = h.report.migrations.iter_mut().find(|m| m.migration == id) else {
                return Err(self.refused(404, format!("unknown migration {id}")));
            };
            if matches!(
                rec.phase,
                MigrationPhase::Prepared | MigrationPhase::Running { .. }
            ) {
                rec.phase = MigrationPhase::Failed {
                    error: "cancelled".into(),
                };
                if rec.side == Side::Destination {
                    let vm = rec.vm.clone();
                    h.report
                        .vms
                        .retain(|v| !(v.vm == vm && v.status == RunStatus::Inmigrate));
                }
            }
            Ok(h.report
                .migrations
                .iter()
                .find(|m| m.migration == id)
                .cloned()
                .expect("found above"))
        })
    }

    fn standby(&self) -> Result<HostReport, AgentError> {
        self.with(|h| {
            if !h.report.vms.is_empty() {
                return Err(self.refused(409, "VMs run on this host".into()));
            }
            h.report.state = HostState::Standby;
            Ok(h.report.clone())
        })
    }

    fn wake(&self) -> Result<HostReport, AgentError> {
        self.with(|h| {
            h.report.state = HostState::Active;
            Ok(h.report.clone())
        })
    }
}
