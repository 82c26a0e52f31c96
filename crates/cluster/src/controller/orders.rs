//! Orders: migrations (the policy's and operators'), new VMs, standby and wake, and the
//! drain at shutdown. Each checks first and changes nothing when it refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fastmig_host::{MigrationRequest, RunStatus};
use fastmig_migration::TransportKind;
use fastmig_sim::cost::MigrationCostQuery;

use super::round::{self, RoundVm};
use super::{
    gather, ram_mb, spec_of, Controller, ControllerError, CostModel, Decision, OrderError, VmStatus,
};
use crate::agent_api::AgentError;
use crate::proto::{
    HostName, HostState, MigrationId, PrepareIncoming, StartOutgoing, StartVm, VmName, VmReport,
};
use crate::store::{now_ms, HostRow, MigrationRow, MigrationState, Origin, VmRow};

impl Controller {
    /// Puts a host into standby (`active: false`) or wakes it.
    pub fn set_power(&mut self, h: &HostName, active: bool) -> Result<HostState, OrderError> {
        let agent = Arc::clone(self.agent(h)?);
        let rep = if active {
            agent.wake()?
        } else {
            agent.standby()?
        };
        let state = rep.state;
        if let Some(st) = self.hosts.get_mut(h) {
            st.state = state;
        }
        if let Some(r) = self.reports.get_mut(h) {
            r.state = state;
        }
        if let Some(st) = self.hosts.get(h) {
            let row = HostRow {
                name: h.clone(),
                state,
                reachable: st.reachable,
                host_type: serde_json::to_string(&rep.host_type).unwrap_or_default(),
                migration_address: rep.migration_address.clone(),
                last_report_ms: rep.time_ms as i64,
            };
            self.store.put_host(&row)?;
        }
        tracing::info!(host = %h, ?state, "host power state");
        Ok(state)
    }

    /// Whether `dst` can take `vm` now: known, reachable, active, with free MIPS and RAM,
    /// and for a migration not at its in-flight limit.
    pub fn check_destination(
        &self,
        vm: &StartVm,
        demand: f64,
        dst: &HostName,
        migration: bool,
    ) -> Result<(), OrderError> {
        self.agent(dst)?;
        let st = self
            .hosts
            .get(dst)
            .ok_or_else(|| OrderError::Unreachable(dst.clone()))?;
        if !st.reachable {
            return Err(OrderError::Unreachable(dst.clone()));
        }
        if st.state == HostState::Standby {
            return Err(OrderError::Standby(dst.clone()));
        }
        if migration && self.in_flight().get(dst).copied().unwrap_or(0) >= self.cfg.max_in_flight {
            return Err(OrderError::Busy(format!(
                "host {dst} has {} migrations in flight",
                self.cfg.max_in_flight
            )));
        }
        let rep = self
            .reports
            .get(dst)
            .ok_or_else(|| OrderError::Unreachable(dst.clone()))?;
        let t = &rep.host_type;
        let used_mips: f64 = rep
            .vms
            .iter()
            .map(|v| v.demand * v.mips)
            .fold(0.0, |a, b| a + b);
        let used_ram: u64 = rep.vms.iter().map(|v| u64::from(ram_mb(v.mem_bytes))).sum();
        let want = demand * vm.mips;
        if t.total_mips() - used_mips < want
            || t.pe_mips < want
            || u64::from(t.ram_mb).saturating_sub(used_ram) < u64::from(ram_mb(vm.mem_bytes))
        {
            return Err(OrderError::NoRoom(dst.clone(), vm.vm.clone()));
        }
        Ok(())
    }

    /// Orders one migration: recorded first, then the destination prepares, then the source
    /// starts. Refused (nothing changed but a `failed` row) when an agent refuses.
    pub fn order(
        &mut self,
        vm: &VmName,
        dst: &HostName,
        transport: TransportKind,
        origin: Origin,
        decision: Option<i64>,
    ) -> Result<MigrationRow, OrderError> {
        let st = self
            .vms
            .get(vm)
            .cloned()
            .ok_or_else(|| OrderError::UnknownVm(vm.clone()))?;
        if &st.host == dst {
            return Err(OrderError::SameHost(vm.clone(), dst.clone()));
        }
        if st.report.status != RunStatus::Running || self.open.values().any(|m| &m.vm == vm) {
            return Err(OrderError::Busy(format!(
                "VM {vm} is {} or migrating",
                st.report.status
            )));
        }
        let spec = spec_of(&st.report);
        self.check_destination(&spec, st.report.demand, dst, true)?;
        if self.in_flight().get(&st.host).copied().unwrap_or(0) >= self.cfg.max_in_flight {
            return Err(OrderError::Busy(format!(
                "host {} is at its in-flight limit",
                st.host
            )));
        }
        let src_agent = Arc::clone(self.agent(&st.host)?);
        let dst_agent = Arc::clone(self.agent(dst)?);
        let dst_type = self.reports.get(dst).map(|r| r.host_type.clone());
        let predicted = dst_type.map(|t| {
            self.cfg.cost.model().cost(
                &MigrationCostQuery {
                    ram_mb: ram_mb(spec.mem_bytes),
                    target_bw: t.bw,
                    cpu_utilization: st.report.demand,
                    // Unmeasured (0) means unknown: the model then takes all of its RAM.
                    mem_utilization: (st.report.mem_bytes > 0 && st.report.working_set_bytes > 0)
                        .then(|| st.report.working_set_bytes as f64 / st.report.mem_bytes as f64),
                },
                t.pe_mips,
            )
        });
        let id = MigrationId(self.next_migration);
        self.next_migration += 1;
        let mut row = MigrationRow {
            id,
            vm: vm.clone(),
            source: st.host.clone(),
            destination: dst.clone(),
            transport: serde_json::to_string(&transport).unwrap_or_default(),
            state: MigrationState::Ordered,
            origin,
            decision,
            predicted_s: predicted.map(|c| c.duration_s),
            predicted_downtime_s: match self.cfg.cost {
                CostModel::Model(_) => predicted.map(|c| c.downtime_s),
                CostModel::CloudSim => None,
            },
            measured_s: None,
            measured_downtime_s: None,
            summary: None,
            error: None,
            started_ms: now_ms(),
            ended_ms: None,
        };
        // Written before any agent hears of it: a restart finds it whatever happens next.
        self.store.put_migration(&row)?;
        let fail = |this: &mut Self, mut row: MigrationRow, e: AgentError| {
            row.state = MigrationState::Failed;
            row.error = Some(e.to_string());
            row.ended_ms = Some(now_ms());
            match this.store.put_migration(&row) {
                Ok(()) => OrderError::Agent(e),
                Err(se) => OrderError::Store(se),
            }
        };
        let ready = match dst_agent.prepare_incoming(&PrepareIncoming {
            migration: id,
            vm: spec,
            transport,
            source: st.host.clone(),
        }) {
            Ok(r) => r,
            Err(e) => return Err(fail(self, row, e)),
        };
        let defaults = MigrationRequest::default();
        let request = MigrationRequest {
            uri: ready.uri,
            transport,
            max_bandwidth: self.cfg.migration_bandwidth.or(defaults.max_bandwidth),
            downtime_limit: self
                .cfg
                .migration_downtime_limit
                .unwrap_or(defaults.downtime_limit),
            ..defaults
        };
        if let Err(e) = src_agent.start_outgoing(&StartOutgoing {
            migration: id,
            vm: vm.clone(),
            destination: dst.clone(),
            request,
        }) {
            let _ = dst_agent.cancel_migration(id);
            return Err(fail(self, row, e));
        }
        row.state = MigrationState::Running;
        self.store.put_migration(&row)?;
        for h in [&row.source, &row.destination] {
            if let Some(s) = self.hosts.get_mut(h) {
                s.in_flight += 1;
            }
        }
        tracing::info!(migration = %id, vm = %vm, source = %row.source, destination = %dst, "migration ordered");
        self.open.insert(id, row.clone());
        Ok(row)
    }

    /// Starts a new VM: on `host`, or where PABFD puts it among the active hosts (its demand
    /// taken as its constant demand, or 1 for a trace), or else on a standby host it wakes. Refused with nothing changed when the name exists or the
    /// host cannot take it.
    pub fn place_vm(
        &mut self,
        spec: &StartVm,
        host: Option<&HostName>,
    ) -> Result<(HostName, VmReport), OrderError> {
        if self.vms.contains_key(&spec.vm) {
            return Err(OrderError::Exists(spec.vm.clone()));
        }
        let demand = match &spec.demand {
            crate::proto::DemandSource::Constant { utilization } => utilization.clamp(0.0, 1.0),
            crate::proto::DemandSource::Trace { .. } => 1.0,
        };
        let dst = match host {
            Some(h) => h.clone(),
            None => {
                let (hosts, vms) = self.round_input();
                let new = RoundVm {
                    name: spec.vm.clone(),
                    host: 0,
                    mips: spec.mips,
                    ram_mb: ram_mb(spec.mem_bytes),
                    requested_mips: demand * spec.mips,
                    history: Vec::new(),
                    movable: false,
                };
                let p = self.policies();
                match round::place_new(&hosts, &vms, &new, &p) {
                    Some(i) => hosts[i].name.clone(),
                    None => {
                        // No active host has room: wake the first standby host that can
                        // hold the VM (capacity runs short).
                        let fits = |h: &round::RoundHost| {
                            let t = &h.host_type;
                            let want = demand * spec.mips;
                            h.standby
                                && t.pe_mips >= want
                                && t.total_mips() >= want
                                && u64::from(t.ram_mb) >= u64::from(ram_mb(spec.mem_bytes))
                        };
                        let h = hosts.iter().find(|h| fits(h)).ok_or_else(|| {
                            OrderError::NoRoom(HostName("any host".into()), spec.vm.clone())
                        })?;
                        let name = h.name.clone();
                        self.set_power(&name, true)?;
                        name
                    }
                }
            }
        };
        self.check_destination(spec, demand, &dst, false)?;
        let agent = Arc::clone(self.agent(&dst)?);
        let rep = agent.start_vm(spec)?;
        self.vms.insert(
            spec.vm.clone(),
            VmStatus {
                host: dst.clone(),
                report: rep.clone(),
            },
        );
        if let Some(r) = self.reports.get_mut(&dst) {
            r.vms.push(rep.clone());
        }
        if let Some(h) = self.hosts.get_mut(&dst) {
            h.vms.push(spec.vm.clone());
        }
        self.store.put_vm(&VmRow {
            name: spec.vm.clone(),
            host: Some(dst.clone()),
            spec: serde_json::to_string(spec).unwrap_or_default(),
            status: rep.status.to_string(),
            demand: rep.demand,
            updated_ms: now_ms(),
        })?;
        tracing::info!(vm = %spec.vm, host = %dst, "VM placed");
        Ok((dst, rep))
    }

    /// Follows the open migrations until they end or `timeout` passes, then cancels those
    /// still running (the source keeps the VM) and follows them once more. For shutdown.
    pub fn drain(&mut self, timeout: Duration, poll: Duration) -> Result<usize, ControllerError> {
        let deadline = Instant::now() + timeout;
        let mut d = Decision::default();
        while !self.open.is_empty() && Instant::now() < deadline {
            let r = gather(&self.agents(), self.cfg.gather_threads);
            self.refresh(r, &mut d)?;
            if self.open.is_empty() {
                break;
            }
            std::thread::sleep(poll);
        }
        let left: Vec<MigrationRow> = self.open.values().cloned().collect();
        for m in &left {
            if let Some(a) = self.agents.get(&m.source) {
                let _ = a.cancel_migration(m.id);
            }
        }
        if !left.is_empty() {
            let r = gather(&self.agents(), self.cfg.gather_threads);
            self.refresh(r, &mut d)?;
        }
        Ok(self.open.len())
    }
}
