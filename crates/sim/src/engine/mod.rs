//! The discrete-event engine: hosts, VMs, the 300 s scheduling loop, migrations, energy and
//! SLA accounting, with CloudSim 3.0.3's `PowerDatacenter` semantics.
//!
//! ```text
//!  t = 0      initial placement (PABFD, or first fit for NPA/DVFS), VMs request full MIPS
//!  t = 0.1    workloads start (CloudSim's VM-creation acknowledgement delay)
//!  t = 300.1, 600.1, ... (< 86400)  scheduling tick:
//!     1. update every host: VM requests = trace(t) * MIPS, history, allocation, energy of
//!        the interval since the last event (trapezoid between the two utilisations)
//!     2. detect over-utilised hosts, select VMs, place them (PABFD)
//!     3. evacuate under-utilised hosts, least utilised first, all-or-nothing
//!     4. undo the hypothetical moves and start the chosen migrations
//!  t + RAM/bw migration completes: update every host, move the VM, update again
//! ```
//!
//! During a migration the VM appears on both hosts: the source gives it 90 % of its request
//! (the 10 % degradation, counted in PDM) but counts the full request as its own load; the
//! target counts 10 % of it as load while its SLA accounting sees the full request
//! unallocated, which is what makes SLATAH migration-driven.
//!
//! The engine is split along its seams: `model` (host/VM state), `host` (CloudSim's host
//! primitives and updates), `round` (one consolidation round), `glue` (the views the
//! policies read and the calls into them). This file holds the event loop, the migrations and
//! the final metrics.

mod glue;
mod host;
mod model;
mod round;

use std::collections::BinaryHeap;

use glue::Ctx;

pub use model::VM_HISTORY;
use model::{finalize_host_entry, release_overhead, History, Host, MigrationEvent, Vm};

use crate::cost::{MigrationCostModel, MigrationCostQuery};
use crate::error::SimError;
use crate::ids::{HostId, VmId};
use crate::index::{HostTypeTables, PabfdIndex};
use crate::metrics::SimResult;
use crate::policy::{FirstFit, OverloadDetector, PlacementVm, VmPlacement, VmSelector};
use crate::prune::OverloadPrune;
use crate::rng::SplitMix64;
use crate::setup::DatacenterSpec;
use crate::spec::PolicySpec;
use crate::trace::Trace;

/// Knobs of a run; the defaults reproduce CloudSim 3.0.3.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Simulated time in seconds (86,400: one day). Events at or after it are not processed.
    pub duration_s: f64,
    /// When the workloads start (CloudSim: 0.1 s, the VM-creation acknowledgement delay).
    /// Ticks happen at `start + k * interval`.
    pub start_s: f64,
    /// Seed for random VM selection.
    pub seed: u64,
    /// CloudSim removes a VM for good once its CPU request is exactly 0 at an update (its
    /// `getCompletedVms` treats it as finished). `true` reproduces that; `false` keeps idle
    /// VMs in place.
    pub remove_idle_vms: bool,
    /// Use the bucketed PABFD index instead of a full scan when there are at least this many
    /// hosts (default 0: always). Both give identical placements; the index is faster from a few
    /// hundred hosts up (measured on the 800-host reference day).
    pub index_min_hosts: usize,
    /// Approximation for very large data centres: when non-zero, an indexed PABFD search
    /// examines at most this many candidate hosts, in order of their bucket's lower bound, and
    /// returns the best valid one seen (or none). 0 = exact.
    pub pabfd_budget: usize,
    /// Where each VM starts, by host index (VM i on host `initial_hosts[i]`); `None`: PABFD
    /// places them at their full MIPS (first fit for NPA and DVFS), as CloudSim does. For
    /// replaying a real cluster whose VMs were placed by hand (`fastmig experiment`). A VM
    /// that does not fit its host fails the run.
    pub initial_hosts: Option<Vec<usize>>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            duration_s: 86_400.0,
            start_s: 0.1,
            seed: 42,
            remove_idle_vms: true,
            index_min_hosts: 0,
            pabfd_budget: 0,
            initial_hosts: None,
        }
    }
}

/// One simulation run. Build with [`Simulation::new`], run with [`Simulation::run`].
pub struct Simulation<'a> {
    trace: &'a Trace,
    spec: &'a DatacenterSpec,
    policy: PolicySpec,
    opts: SimOptions,
    cost: &'a dyn MigrationCostModel,
    detector: Option<Box<dyn OverloadDetector>>,
    selector: Option<Box<dyn VmSelector>>,
    rng: SplitMix64,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    events: BinaryHeap<MigrationEvent>,
    seq: u64,
    last_process: f64,
    energy_j: f64,
    migrations: u64,
    /// Sum of the migrations' downtime, s.
    migration_downtime_s: f64,
    /// Sum of the migrations' duration, s.
    migration_s: f64,
    /// Sum of the migrations' CPU on both hosts, PE-seconds.
    migration_cpu_s: f64,
    clamped: u64,
    ticks: u64,
    index: Option<PabfdIndex>,
    /// Lets the index skip hosts that are over-utilised after allocation for certain.
    prune: Option<OverloadPrune>,
    /// Per host type, what the PABFD index search needs (power tables, capacities).
    type_tables: HostTypeTables,
    /// Inside a scheduling round (or the initial placement): keep host aggregates current.
    in_round: bool,
    scratch: Vec<f64>,
    /// Time of the last full update made by a migration completion (NaN after a tick).
    fresh_at: f64,
    /// Hosts changed by the migrations completing at `fresh_at`.
    touched: Vec<HostId>,
    /// Every trace row's utilisation at `util_cache_t` (NaN: none). Filled once per full update
    /// so VM updates read one small, contiguous array instead of each trace row's samples.
    util_cache: Vec<f64>,
    util_cache_t: f64,
    /// Hosts whose update is a no-op (see [`Simulation::is_dormant`]); a full update skips
    /// them. Cleared by anything that gives the host a VM or a migration overhead.
    dormant: Vec<bool>,
    /// Hosts whose VM list, or whose VMs' host field, changed since the last restore (the
    /// hypothetical moves of a round): the only ones the end of the round must rebuild.
    round_modified: Vec<bool>,
    /// Per host, the sum of its VMs' utilisation histories (fractions of the host's capacity,
    /// most recent first), cached by `refresh` for the detectors. Kept out of `Host` so that
    /// the passes over every host stay small.
    host_hist: Vec<[f64; VM_HISTORY]>,
}

/// A lower bound of the memory, in bytes, that a run over `hosts` hosts and `vms` VMs
/// allocates up front (the data-centre spec and the engine's per-host and per-VM state, not
/// counting the trace, the PABFD index or growth during the run). Takes and returns `f64` so
/// that absurd sizes (`--scale 1e9`) can be checked before anything is allocated, without
/// overflow.
pub fn memory_lower_bound(hosts: f64, vms: f64) -> f64 {
    use std::mem::size_of;
    let per_host = size_of::<usize>() // spec.hosts
        + size_of::<Host>()
        + size_of::<[f64; VM_HISTORY]>() // host_hist
        + 2 * size_of::<bool>(); // dormant, round_modified
    let per_vm = size_of::<(usize, usize)>() // spec.vms
        + size_of::<Vm>()
        + size_of::<[f64; 2 * VM_HISTORY]>(); // the history buffer behind each VM's `Box`
    hosts * per_host as f64 + vms * per_vm as f64
}

/// Runs one policy over a trace on a data centre and returns the metrics.
pub fn simulate(
    trace: &Trace,
    spec: &DatacenterSpec,
    policy: PolicySpec,
    cost: &dyn MigrationCostModel,
    opts: &SimOptions,
) -> Result<SimResult, SimError> {
    Simulation::new(trace, spec, policy, cost, opts.clone())?.run()
}

impl<'a> Simulation<'a> {
    /// Validates the setup and creates the hosts and VMs (not yet placed).
    pub fn new(
        trace: &'a Trace,
        spec: &'a DatacenterSpec,
        policy: PolicySpec,
        cost: &'a dyn MigrationCostModel,
        opts: SimOptions,
    ) -> Result<Self, SimError> {
        if spec.hosts.is_empty() {
            return Err(SimError::Config("no hosts".into()));
        }
        if trace.is_empty() {
            return Err(SimError::Config("no VMs in the trace".into()));
        }
        if trace.interval_s.is_nan() || trace.interval_s <= 0.0 {
            return Err(SimError::Config("trace interval must be > 0".into()));
        }
        if let Some(p) = &opts.initial_hosts {
            if p.len() != spec.vms.len() || p.iter().any(|&h| h >= spec.hosts.len()) {
                return Err(SimError::Config(format!(
                    "initial placement: {} entries for {} VMs, each below {} hosts",
                    p.len(),
                    spec.vms.len(),
                    spec.hosts.len()
                )));
            }
        }
        let mut hosts = Vec::with_capacity(spec.hosts.len());
        for &ty in &spec.hosts {
            let t = spec
                .host_types
                .get(ty)
                .ok_or_else(|| SimError::Config(format!("host type {ty} undefined")))?;
            hosts.push(Host {
                ty,
                total_mips: t.total_mips(),
                pe_mips: t.pe_mips,
                ram_mb: i64::from(t.ram_mb),
                bw: t.bw as i64,
                storage_mb: t.storage_mb as i64,
                vm_list: Vec::new(),
                migrating_in: Vec::new(),
                reservations: Vec::new(),
                ram_used: 0,
                bw_used: 0,
                storage_used: 0,
                util_mips: 0.0,
                energy_util: 0.0,
                prev_energy_util: 0.0,
                overhead_mips: 0.0,
                overhead_count: 0,
                req_sum: 0.0,
                available_mips: t.total_mips(),
                oversubscribed: false,
                alloc_sum: 0.0,
                power_now: t.power.power(0.0),
                max_ram: 0,
                last: None,
                active_time: 0.0,
                violation_time: 0.0,
                shutdowns: 0,
                prev_active: true,
            });
        }
        let mut vms = Vec::with_capacity(spec.vms.len());
        for &(ty, tr) in &spec.vms {
            let t = spec
                .vm_types
                .get(ty)
                .ok_or_else(|| SimError::Config(format!("VM type {ty} undefined")))?;
            if tr >= trace.len() {
                return Err(SimError::Config(format!(
                    "VM uses trace row {tr}, trace has {}",
                    trace.len()
                )));
            }
            vms.push(Vm {
                mips: t.mips,
                ram_mb: t.ram_mb,
                bw: t.bw,
                size_mb: t.size_mb,
                trace: tr,
                requested: t.mips,
                sched_req: t.mips,
                instantiating: true,
                host: None,
                table: None,
                in_migration: false,
                removed: false,
                hist: History::new(),
                hist_prev_time: 0.0,
                last: None,
                tot_req: 0.0,
                tot_alloc: 0.0,
                under_mig: 0.0,
            });
        }
        let mut vm_rams: Vec<u32> = vms.iter().map(|v| v.ram_mb).collect();
        vm_rams.sort_unstable();
        vm_rams.dedup();
        // The approximate budget counts examined hosts, so skipping would change its answers.
        let prune = if opts.pabfd_budget == 0 {
            OverloadPrune::new(&policy, &spec.host_types, &vm_rams, cost, trace.interval_s)
        } else {
            None
        };
        let (detector, selector) = match policy {
            PolicySpec::Dynamic {
                detector,
                selector,
                param,
            } => (Some(detector.build(param)), Some(selector.build())),
            _ => (None, None),
        };
        Ok(Self {
            trace,
            spec,
            policy,
            rng: SplitMix64::new(opts.seed),
            opts,
            cost,
            detector,
            selector,
            hosts,
            vms,
            events: BinaryHeap::new(),
            seq: 0,
            last_process: 0.0,
            energy_j: 0.0,
            migrations: 0,
            migration_downtime_s: 0.0,
            migration_s: 0.0,
            migration_cpu_s: 0.0,
            clamped: 0,
            ticks: 0,
            index: None,
            prune,
            type_tables: HostTypeTables::new(&spec.host_types),
            in_round: false,
            scratch: Vec::new(),
            fresh_at: f64::NAN,
            touched: Vec::new(),
            util_cache: Vec::new(),
            util_cache_t: f64::NAN,
            dormant: vec![false; spec.hosts.len()],
            host_hist: vec![[0.0; VM_HISTORY]; spec.hosts.len()],
            round_modified: vec![false; spec.hosts.len()],
        })
    }

    /// Runs the whole simulation.
    pub fn run(self) -> Result<SimResult, SimError> {
        self.run_with_progress(&mut |_, _| {})
    }

    /// Runs the whole simulation, calling `progress(simulated_s, duration_s)` after each
    /// scheduling tick (for progress bars on long runs).
    pub fn run_with_progress(
        mut self,
        progress: &mut dyn FnMut(f64, f64),
    ) -> Result<SimResult, SimError> {
        self.initial_placement()?;
        let interval = self.trace.interval_s;
        let mut next_tick = self.opts.start_s + interval;
        loop {
            let next_mig = self.events.peek().map(|e| e.t);
            let take_mig = matches!(next_mig, Some(m) if m < next_tick);
            let t = if take_mig {
                next_mig.unwrap_or(next_tick)
            } else {
                next_tick
            };
            if t >= self.opts.duration_s {
                break;
            }
            if take_mig {
                if let Some(ev) = self.events.pop() {
                    self.complete_migration(ev)?;
                }
            } else {
                self.tick(t);
                progress(t, self.opts.duration_s);
                next_tick = t + interval;
            }
        }
        Ok(self.finish())
    }

    fn is_dynamic(&self) -> bool {
        matches!(self.policy, PolicySpec::Dynamic { .. })
    }

    // ---- placement at t = 0 -------------------------------------------------------------

    fn initial_placement(&mut self) -> Result<(), SimError> {
        let excluded = vec![false; self.hosts.len()];
        self.in_round = true;
        if self.is_dynamic() {
            self.build_index();
        }
        for i in 0..self.vms.len() {
            let v = VmId(i as u32);
            let pv = PlacementVm {
                id: v,
                requested_mips: self.vms[i].requested,
            };
            let given = self
                .opts
                .initial_hosts
                .as_ref()
                .and_then(|p| p.get(i).copied());
            let found = if let Some(h) = given {
                Some(HostId(h as u32))
            } else if self.is_dynamic() {
                self.place(v, &excluded, false)
            } else {
                let ctx = Ctx {
                    sim: self,
                    excluded: &excluded,
                };
                FirstFit.find_host(&pv, &ctx)
            };
            let h = found.ok_or(SimError::InitialPlacement(v.0))?;
            if !self.vm_create(h, v) {
                return Err(SimError::InitialPlacement(v.0));
            }
            self.vms[i].table = Some(h);
            // Created: no longer instantiating, and no workload until t = start.
            self.vms[i].instantiating = false;
            self.vms[i].requested = 0.0;
            self.refresh(h);
        }
        self.in_round = false;
        self.index = None;
        Ok(())
    }

    // ---- the scheduling tick ---------------------------------------------------------------

    /// The update after the last migration completing at `t`, when every host was already
    /// updated at `t` by the first completion and only the hosts those migrations touched have
    /// changed since: updating the others again would recompute the same values (and the
    /// energy interval is empty), so only the touched hosts are updated. Saves most of the
    /// per-event work in large data centres.
    fn update_touched(&mut self, t: f64) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        let at = self.trace.instant(t);
        for &h in &touched {
            self.host_update_at(h, t, &at);
        }
        if self.opts.remove_idle_vms {
            for &h in &touched {
                self.remove_completed_vms_on(h.idx());
            }
        }
        touched.clear();
        self.touched = touched;
        self.last_process = t;
    }

    fn tick(&mut self, t: f64) {
        self.ticks += 1;
        self.fresh_at = f64::NAN;
        self.force_update(t);
        if self.is_dynamic() {
            let map = self.optimize_allocation(t);
            for (v, target) in map {
                self.start_migration(v, target, t);
            }
        }
        self.last_process = t;
    }

    /// A VM's CPU demand as a fraction of its MIPS, in [0, 1] (what an activity-aware cost
    /// model turns into a dirty rate).
    fn vm_activity(&self, v: VmId) -> f64 {
        let vm = &self.vms[v.idx()];
        if vm.mips > 0.0 {
            (vm.requested / vm.mips).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    fn start_migration(&mut self, v: VmId, target: HostId, t: f64) {
        let source = self.vms[v.idx()].host;
        let pe_mips = self.hosts[target.idx()].pe_mips;
        let cost = self.cost.cost(
            &MigrationCostQuery {
                ram_mb: self.vms[v.idx()].ram_mb,
                target_bw: self.hosts[target.idx()].bw as u64,
                cpu_utilization: self.vm_activity(v),
                mem_utilization: self
                    .trace
                    .memory_at(self.vms[v.idx()].trace, &self.trace.instant(t)),
            },
            pe_mips,
        );
        self.dormant[target.idx()] = false;
        if let Some(s) = source {
            self.dormant[s.idx()] = false;
        }
        self.vms[v.idx()].in_migration = true;
        let counted = !self.is_migrating_in(target, v);
        if counted {
            let size = self.vms[v.idx()].size_mb as i64;
            let host = &mut self.hosts[target.idx()];
            host.storage_used += size;
            host.migrating_in.push(v);
            host.vm_list.push(v);
            host.overhead_mips += cost.target_overhead_mips;
            host.overhead_count += 1;
            if let Some(s) = source {
                let src = &mut self.hosts[s.idx()];
                src.overhead_mips += cost.source_overhead_mips;
                src.overhead_count += 1;
            }
            self.host_update(target, t);
            if let Some(s) = source {
                self.host_update(s, t);
            }
        }
        self.migrations += 1;
        self.migration_downtime_s += cost.downtime_s;
        self.migration_s += cost.duration_s;
        if pe_mips > 0.0 {
            // The overheads are CPU seconds spread over the migration as MIPS of one PE.
            self.migration_cpu_s +=
                (cost.source_overhead_mips + cost.target_overhead_mips) * cost.duration_s / pe_mips;
        }
        self.seq += 1;
        self.events.push(MigrationEvent {
            t: t + cost.duration_s,
            seq: self.seq,
            vm: v,
            target,
            source,
            source_overhead: cost.source_overhead_mips,
            target_overhead: cost.target_overhead_mips,
            counted,
        });
    }

    fn complete_migration(&mut self, ev: MigrationEvent) -> Result<(), SimError> {
        let t = ev.t;
        if t > self.last_process {
            self.force_update(t);
            self.fresh_at = t;
            self.touched.clear();
        }
        let v = ev.vm;
        self.touched.push(ev.target);
        self.touched.extend(ev.source);
        if let Some(h) = self.vms[v.idx()].table.take() {
            self.touched.push(h);
            self.vm_destroy(h, v);
        }
        // removeMigratingInVm
        let size = self.vms[v.idx()].size_mb as i64;
        {
            let host = &mut self.hosts[ev.target.idx()];
            host.storage_used -= size;
            host.migrating_in.retain(|&x| x != v);
            if let Some(pos) = host.vm_list.iter().position(|&x| x == v) {
                host.vm_list.remove(pos);
            }
            if ev.counted {
                release_overhead(host, ev.target_overhead);
            }
        }
        if let (Some(s), true) = (ev.source, ev.counted) {
            release_overhead(&mut self.hosts[s.idx()], ev.source_overhead);
        }
        self.vms[v.idx()].in_migration = false;
        if !self.vm_create(ev.target, v) {
            return Err(SimError::MigrationTarget {
                vm: v.0,
                host: ev.target.0,
            });
        }
        self.vms[v.idx()].table = Some(ev.target);
        let more_now = self.events.peek().is_some_and(|e| e.t == t);
        if !more_now {
            if self.fresh_at == t && self.last_process == t {
                self.update_touched(t);
            } else {
                self.force_update(t);
                self.touched.clear();
            }
        }
        Ok(())
    }

    fn finish(mut self) -> SimResult {
        let (mut active, mut viol, mut shutdowns) = (0.0, 0.0, 0);
        for host in &mut self.hosts {
            if let Some(l) = host.last.take() {
                finalize_host_entry(host, l);
            }
            active += host.active_time;
            viol += host.violation_time;
            shutdowns += host.shutdowns;
        }
        let (mut req, mut alloc, mut under) = (0.0, 0.0, 0.0);
        for vm in &self.vms {
            req += vm.tot_req;
            alloc += vm.tot_alloc;
            under += vm.under_mig;
        }
        let slatah = if active > 0.0 { viol / active } else { 0.0 };
        let pdm = if req > 0.0 { under / req } else { 0.0 };
        let energy_kwh = self.energy_j / 3.6e6;
        if self.clamped > 0 {
            tracing::warn!(count = self.clamped, "host utilisation above 100 % was clamped for the power model (CloudSim would abort)");
        }
        let slav = slatah * pdm;
        SimResult {
            policy: self.policy.name(),
            param: self.policy.param(),
            hosts: self.hosts.len(),
            vms: self.vms.len(),
            energy_kwh,
            slatah,
            pdm,
            slav,
            esv: energy_kwh * slav,
            migrations: self.migrations,
            host_shutdowns: shutdowns,
            sla_overall: if req > 0.0 { (req - alloc) / req } else { 0.0 },
            vms_removed_idle: self.vms.iter().filter(|v| v.removed).count(),
            migration_model: self.cost.describe(),
            migration_downtime_s: self.migration_downtime_s,
            active_host_hours: active / 3600.0,
            migration_s: self.migration_s,
            migration_cpu_s: self.migration_cpu_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bound_counts_every_host_and_vm_without_overflow() {
        // Host and Vm are cache-line aligned: at least 64 bytes each, plus the spec's entries.
        let one_host = memory_lower_bound(1.0, 0.0);
        let one_vm = memory_lower_bound(0.0, 1.0);
        assert!(one_host >= (64 + 8) as f64, "{one_host}");
        assert!(one_vm >= (64 + 16) as f64, "{one_vm}");
        assert_eq!(
            memory_lower_bound(800.0, 1052.0),
            800.0 * one_host + 1052.0 * one_vm
        );
        // --scale 1e9 on the reference day: 8e11 hosts alone need more than 5e13 bytes, and the
        // arithmetic stays finite.
        let huge = memory_lower_bound(8e11, 1.052e12);
        assert!(huge.is_finite() && huge > 8e11 * 72.0);
    }
}
