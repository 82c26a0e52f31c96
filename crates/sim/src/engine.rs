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

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::cost::{MigrationCostModel, MigrationRequest};
use crate::error::SimError;
use crate::ids::{HostId, VmId};
use crate::index::{Entry, PabfdIndex, BUCKETS};
use crate::metrics::SimResult;
use crate::policy::{
    FirstFit, HostView, OverloadDetector, Pabfd, PlacementContext, PlacementVm, VmPlacement,
    VmSelector, VmView,
};
use crate::power::PowerTable;
use crate::prune::OverloadPrune;
use crate::rng::SplitMix64;
use crate::setup::DatacenterSpec;
use crate::spec::PolicySpec;
use crate::trace::{Instant, Trace};

/// Length of the per-VM utilisation history (CloudSim `PowerVm.HISTORY_LENGTH`).
pub const VM_HISTORY: usize = 30;

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
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct HostEntry {
    t: f64,
    alloc: f64,
    req: f64,
    active: bool,
}

#[derive(Debug, Clone, Copy)]
struct VmEntry {
    t: f64,
    alloc: f64,
    req: f64,
    migrating: bool,
}

/// A VM's last [`VM_HISTORY`] utilisation samples, most recent first, as one slice: a window
/// sliding down a buffer twice that long, so a new sample costs one store (and, once every
/// `VM_HISTORY` samples, one copy) instead of shifting the whole history.
#[derive(Debug, Clone)]
struct History {
    buf: Box<[f64; 2 * VM_HISTORY]>,
    start: usize,
    len: usize,
}

impl History {
    fn new() -> Self {
        Self {
            buf: Box::new([0.0; 2 * VM_HISTORY]),
            start: 2 * VM_HISTORY,
            len: 0,
        }
    }

    fn as_slice(&self) -> &[f64] {
        &self.buf[self.start..self.start + self.len]
    }

    fn push_front(&mut self, u: f64) {
        if self.start == 0 {
            // Move the samples that stay to the top half; the window ends at the buffer's end.
            let keep = self.len.min(VM_HISTORY - 1);
            self.buf.copy_within(0..keep, 2 * VM_HISTORY - keep);
            self.start = 2 * VM_HISTORY - keep;
            self.len = keep;
        }
        self.start -= 1;
        self.buf[self.start] = u;
        self.len = (self.len + 1).min(VM_HISTORY);
    }
}

/// Field order is fixed (`repr(C)`) and the fields every update touches come first, so a VM
/// update reads two cache lines instead of three (VMs are visited in host order, so each is a
/// cache miss at scale).
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Vm {
    // -- touched by every update
    mips: f64,
    trace: usize,
    /// Current request in MIPS (CloudSim `getCurrentRequestedTotalMips`).
    requested: f64,
    /// Request as last stored by a host scheduler (differs from `requested` only at t = 0).
    sched_req: f64,
    last: Option<VmEntry>,
    tot_req: f64,
    // -- second line
    tot_alloc: f64,
    under_mig: f64,
    hist_prev_time: f64,
    instantiating: bool,
    in_migration: bool,
    removed: bool,
    ram_mb: u32,
    /// `vm.getHost()`: changed by every create/destroy, including hypothetical ones.
    host: Option<u32>,
    /// The allocation table's host (`getVmTable()`).
    table: Option<u32>,
    /// Utilisation fractions, most recent first.
    hist: History,
    // -- rarely read
    bw: u64,
    size_mb: u64,
}

/// Field order is fixed (`repr(C)`): what a placement check reads comes first (one or two
/// cache lines per candidate host), then what an update writes.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Host {
    // -- read by placement checks
    total_mips: f64,
    pe_mips: f64,
    // Cached aggregates over `vm_list`, refreshed on every change.
    available_mips: f64,
    /// MIPS allocated by the scheduler to the VMs in the list right now, a migrating-in VM
    /// counted at its full potential (CloudSim policy `getUtilizationOfCpuMips(host)`).
    alloc_sum: f64,
    /// Power at the utilisation of the last update (CloudSim `host.getPower()`).
    power_now: f64,
    req_sum: f64,
    ram_mb: i64,
    ram_used: i64,
    bw: i64,
    bw_used: i64,
    storage_mb: i64,
    storage_used: i64,
    util_mips: f64,
    ty: usize,
    max_ram: u32,
    /// Whether the scheduler had to scale requests down at the last refresh (some request
    /// found less than it asked for free).
    oversubscribed: bool,
    // -- updates and bookkeeping
    /// Migrations whose CPU overhead is in `overhead_mips`; at 0 the sum is reset to exactly 0
    /// so rounding residue cannot keep an empty host "on".
    overhead_count: u32,
    vm_list: Vec<u32>,
    migrating_in: Vec<u32>,
    /// Per-VM RAM/BW reservations that are non-zero (only made at t = 0).
    reservations: Vec<(u32, i64, i64)>,
    energy_util: f64,
    prev_energy_util: f64,
    overhead_mips: f64,
    // SLA accounting
    last: Option<HostEntry>,
    active_time: f64,
    violation_time: f64,
    shutdowns: u64,
    prev_active: bool,
}

#[derive(Debug, Clone, Copy)]
struct MigrationEvent {
    t: f64,
    seq: u64,
    vm: u32,
    target: u32,
    source: Option<u32>,
    source_overhead: f64,
    target_overhead: f64,
    /// Whether this migration's CPU overhead was added (not for a repeated migration of a VM
    /// that is already migrating into the same target).
    counted: bool,
}

impl PartialEq for MigrationEvent {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for MigrationEvent {}
impl PartialOrd for MigrationEvent {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for MigrationEvent {
    // Reversed so the BinaryHeap pops the earliest (time, sequence) first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.t.total_cmp(&self.t).then(other.seq.cmp(&self.seq))
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
    clamped: u64,
    ticks: u64,
    index: Option<PabfdIndex>,
    /// Lets the index skip hosts that are over-utilised after allocation for certain.
    prune: Option<OverloadPrune>,
    /// Per host type, the power model for the PABFD search loop.
    power_tables: Vec<PowerTable>,
    /// Per host type, power at each bucket edge `b / BUCKETS` (for the bucket bounds).
    edge_power: Vec<[f64; BUCKETS + 1]>,
    /// Inside a scheduling round (or the initial placement): keep host aggregates current.
    in_round: bool,
    scratch: Vec<f64>,
    /// Time of the last full update made by a migration completion (NaN after a tick).
    fresh_at: f64,
    /// Hosts changed by the migrations completing at `fresh_at`.
    touched: Vec<u32>,
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
            clamped: 0,
            ticks: 0,
            index: None,
            prune,
            power_tables: spec
                .host_types
                .iter()
                .map(|t| PowerTable::new(&t.power))
                .collect(),
            edge_power: spec
                .host_types
                .iter()
                .map(|t| {
                    let table = PowerTable::new(&t.power);
                    std::array::from_fn(|b| table.power(PabfdIndex::bucket_bounds(b).0))
                })
                .collect(),
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
        for v in 0..self.vms.len() {
            let pv = PlacementVm {
                id: VmId(v as u32),
                requested_mips: self.vms[v].requested,
            };
            let found = if self.is_dynamic() {
                self.place(v as u32, &excluded, false).map(HostId)
            } else {
                let ctx = Ctx {
                    sim: self,
                    excluded: &excluded,
                };
                FirstFit.find_host(&pv, &ctx)
            };
            let h = found.ok_or(SimError::InitialPlacement(v as u32))?;
            if !self.vm_create(h.0, v as u32) {
                return Err(SimError::InitialPlacement(v as u32));
            }
            self.vms[v].table = Some(h.0);
            // Created: no longer instantiating, and no workload until t = start.
            self.vms[v].instantiating = false;
            self.vms[v].requested = 0.0;
            self.refresh(h.0);
        }
        self.in_round = false;
        self.index = None;
        Ok(())
    }

    // ---- host primitives (CloudSim Host / HostDynamicWorkload) ------------------------------

    fn vm_create(&mut self, h: u32, v: u32) -> bool {
        let (ram, bw, size, req) = {
            let vm = &self.vms[v as usize];
            let (ram, bw) = if vm.instantiating {
                (i64::from(vm.ram_mb), vm.bw as i64)
            } else {
                (0, 0)
            };
            (ram, bw, vm.size_mb as i64, vm.requested)
        };
        let host = &mut self.hosts[h as usize];
        if host.storage_mb - host.storage_used < size
            || host.ram_mb - host.ram_used < ram
            || host.bw - host.bw_used < bw
        {
            return false;
        }
        host.storage_used += size;
        host.ram_used += ram;
        host.bw_used += bw;
        if ram != 0 || bw != 0 {
            host.reservations.push((v, ram, bw));
        }
        host.vm_list.push(v);
        self.dormant[h as usize] = false;
        self.round_modified[h as usize] = true;
        let vm = &mut self.vms[v as usize];
        vm.sched_req = req;
        // The VM's previous host changes too (its VM's host field), for restore_allocation.
        if let Some(old) = vm.host.replace(h) {
            self.round_modified[old as usize] = true;
        }
        self.refresh_appended(h, v);
        true
    }

    fn release(&mut self, h: u32, v: u32) {
        let size = self.vms[v as usize].size_mb as i64;
        let host = &mut self.hosts[h as usize];
        host.storage_used -= size;
        if let Some(pos) = host.reservations.iter().position(|r| r.0 == v) {
            let (_, ram, bw) = host.reservations.swap_remove(pos);
            host.ram_used -= ram;
            host.bw_used -= bw;
        }
    }

    fn vm_destroy(&mut self, h: u32, v: u32) {
        self.round_modified[h as usize] = true;
        if let Some(old) = self.vms[v as usize].host {
            self.round_modified[old as usize] = true;
        }
        self.release(h, v);
        let host = &mut self.hosts[h as usize];
        if let Some(pos) = host.vm_list.iter().position(|&x| x == v) {
            host.vm_list.remove(pos);
        }
        self.vms[v as usize].host = None;
        self.refresh(h);
    }

    /// Recomputes the cached aggregates of a host from its VM list, in list order (the order
    /// CloudSim sums in).
    fn refresh(&mut self, h: u32) {
        // The aggregates serve placement and detection only, which happen inside rounds (each
        // round starts by refreshing every host), so outside rounds there is nothing to keep.
        if !self.in_round {
            return;
        }
        let host = &self.hosts[h as usize];
        let mut req_sum = 0.0;
        let mut hist = [0.0; VM_HISTORY];
        let mut max_ram = 0;
        for &v in &host.vm_list {
            let vm = &self.vms[v as usize];
            req_sum += vm.requested;
            add_history(&mut hist, vm.hist.as_slice(), vm.mips, host.total_mips);
            max_ram = max_ram.max(vm.ram_mb);
        }
        let mut alloc_sum = 0.0;
        let (available, oversubscribed) = self.for_each_allocation(h, |_, inn, a| {
            alloc_sum = add_to_alloc_sum(alloc_sum, a, inn);
        });
        let host = &mut self.hosts[h as usize];
        host.alloc_sum = alloc_sum;
        host.req_sum = req_sum;
        self.host_hist[h as usize] = hist;
        host.max_ram = max_ram;
        host.available_mips = available;
        host.oversubscribed = oversubscribed;
        self.reindex(h);
    }

    /// [`Simulation::refresh`] after `v` was appended to the host's list, when the cached
    /// aggregates were current before: every sum runs in list order, so continuing each from
    /// its cached value gives the same bits as summing the whole list again, and only the new
    /// VM's (scattered) state is read. An over-subscribed host rescales every allocation, so it
    /// is summed again in full.
    fn refresh_appended(&mut self, h: u32, v: u32) {
        if !self.in_round {
            return;
        }
        let host = &self.hosts[h as usize];
        let vm = &self.vms[v as usize];
        let capped = vm.sched_req.min(host.pe_mips);
        let inn = host.migrating_in.contains(&v);
        let r = if inn { capped * 0.1 } else { capped };
        if host.oversubscribed || host.available_mips < r {
            self.refresh(h);
            return;
        }
        // The next step of each of `for_each_allocation`'s sums (not over-subscribed).
        let available = host.available_mips - r;
        let a = unscaled_allocation(capped, vm.in_migration && !inn, inn);
        let alloc_sum = add_to_alloc_sum(host.alloc_sum, a, inn);
        let req_sum = host.req_sum + vm.requested;
        let max_ram = host.max_ram.max(vm.ram_mb);
        add_history(
            &mut self.host_hist[h as usize],
            vm.hist.as_slice(),
            vm.mips,
            host.total_mips,
        );
        let host = &mut self.hosts[h as usize];
        host.alloc_sum = alloc_sum;
        host.req_sum = req_sum;
        host.max_ram = max_ram;
        host.available_mips = available;
        self.reindex(h);
    }

    /// Files the host in the PABFD index under its current aggregates.
    fn reindex(&mut self, h: u32) {
        if self.index.is_some() {
            let key = self.overload_key(h);
            let host = &self.hosts[h as usize];
            if let Some(index) = self.index.as_mut() {
                let entry = Entry {
                    key,
                    host: h,
                    alloc_mips: host.alloc_sum,
                    power_now: host.power_now,
                };
                index.update(
                    host.ty,
                    host.total_mips,
                    entry,
                    host.alloc_sum < host.util_mips,
                );
            }
        }
    }

    /// (Re)builds the PABFD index from the current host states, if the data centre is large.
    fn build_index(&mut self) {
        if self.hosts.len() < self.opts.index_min_hosts {
            self.index = None;
            return;
        }
        let items = self.hosts.iter().enumerate().map(|(h, host)| {
            let entry = Entry {
                key: self.overload_key(h as u32),
                host: h as u32,
                alloc_mips: host.alloc_sum,
                power_now: host.power_now,
            };
            (
                host.ty,
                host.total_mips,
                entry,
                host.alloc_sum < host.util_mips,
            )
        });
        let index = PabfdIndex::from_hosts(self.spec.host_types.len(), self.hosts.len(), items);
        self.index = Some(index);
    }

    /// The host's key in the PABFD index (see [`OverloadPrune`]).
    fn overload_key(&self, h: u32) -> f64 {
        let host = &self.hosts[h as usize];
        match &self.prune {
            Some(p) => p.host_key(
                host.ty,
                host.total_mips,
                host.req_sum,
                &self.host_hist[h as usize],
            ),
            None => f64::NEG_INFINITY,
        }
    }

    fn is_migrating_in(&self, h: u32, v: u32) -> bool {
        self.hosts[h as usize].migrating_in.contains(&v)
    }

    /// Calls `f(vm, migrating_in, allocated_mips)` for each VM of the host's list, in list
    /// order, with CloudSim's over-subscribing time-shared scheduler semantics: requests are
    /// capped at the PE size, a VM migrating out gets 90 %, one migrating in is charged 10 %,
    /// and an over-subscribed host scales every request down (and floors it). Returns the free
    /// MIPS the scheduler reports afterwards and whether the host is over-subscribed (some
    /// request found less than it asked for free).
    fn for_each_allocation(&self, h: u32, mut f: impl FnMut(u32, bool, f64)) -> (f64, bool) {
        let host = &self.hosts[h as usize];
        let mut avail = host.total_mips;
        let mut oversubscribed = false;
        let mut total_req = 0.0;
        for &v in &host.vm_list {
            let c = self.vms[v as usize].sched_req.min(host.pe_mips);
            let r = if host.migrating_in.contains(&v) {
                c * 0.1
            } else {
                c
            };
            total_req += r;
            if avail >= r {
                avail -= r;
            } else {
                oversubscribed = true;
                avail = 0.0;
            }
        }
        let scale = host.total_mips / total_req;
        for &v in &host.vm_list {
            let vm = &self.vms[v as usize];
            let c = vm.sched_req.min(host.pe_mips);
            let inn = host.migrating_in.contains(&v);
            let out = vm.in_migration && !inn;
            let a = if !oversubscribed {
                unscaled_allocation(c, out, inn)
            } else if out {
                (c * scale * 0.9).floor()
            } else if inn {
                (c * 0.1 * scale).floor()
            } else {
                (c * scale).floor()
            };
            f(v, inn, a);
        }
        (avail, oversubscribed)
    }

    /// Fills the utilisation cache for time `t` (same arithmetic as `utilization_at`).
    fn fill_util_cache(&mut self, t: f64, at: &Instant) {
        if self.util_cache_t == t {
            return;
        }
        let trace = self.trace;
        self.util_cache.clear();
        self.util_cache
            .extend((0..trace.len()).map(|row| trace.utilization_at(row, at)));
        self.util_cache_t = t;
    }

    /// `on_sample`: `t` is a sampling instant (`(t - start) % interval == 0`), the same for
    /// every VM at `t`, so computed once by the caller.
    fn vm_update(&mut self, v: u32, t: f64, at: &Instant, on_sample: bool) {
        let row = self.vms[v as usize].trace;
        let u = if self.util_cache_t == t {
            self.util_cache[row]
        } else {
            self.trace.utilization_at(row, at)
        };
        let vm = &mut self.vms[v as usize];
        vm.instantiating = false;
        vm.requested = u * vm.mips;
        if t > vm.hist_prev_time && on_sample {
            vm.hist.push_front(u);
            vm.hist_prev_time = t;
        }
    }

    /// Reads the two cache lines an update uses of each VM of host `h` (if any), so that these
    /// scattered loads are under way while the previous host is updated: a software prefetch
    /// in safe code. Changes nothing.
    fn touch_vms_of(&self, h: usize) {
        let Some(host) = self.hosts.get(h) else {
            return;
        };
        if self.dormant[h] {
            return;
        }
        for &v in &host.vm_list {
            let vm = &self.vms[v as usize];
            std::hint::black_box((vm.mips, vm.tot_alloc));
        }
    }

    /// CloudSim `HostDynamicWorkload.updateVmsProcessing`.
    fn host_update(&mut self, h: u32, t: f64) {
        let at = self.trace.instant(t);
        self.host_update_at(h, t, &at);
    }

    fn host_update_at(&mut self, h: u32, t: f64, at: &Instant) {
        let on_sample = (t - self.opts.start_s) % self.trace.interval_s == 0.0;
        let list = std::mem::take(&mut self.hosts[h as usize].vm_list);
        for &v in &list {
            self.vm_update(v, t, at, on_sample);
            let vm = &mut self.vms[v as usize];
            vm.sched_req = vm.requested;
        }
        self.hosts[h as usize].vm_list = list;
        let mut allocs = std::mem::take(&mut self.scratch);
        allocs.clear();
        self.for_each_allocation(h, |_, _, a| allocs.push(a));
        let list = std::mem::take(&mut self.hosts[h as usize].vm_list);
        let mut util = 0.0;
        let mut host_req = 0.0;
        for (i, &v) in list.iter().enumerate() {
            let req = self.vms[v as usize].requested;
            let mut alloc = allocs[i];
            if !self.is_migrating_in(h, v) {
                let migrating = self.vms[v as usize].in_migration;
                self.vm_entry(
                    v,
                    VmEntry {
                        t,
                        alloc,
                        req,
                        migrating,
                    },
                );
                if migrating {
                    alloc /= 0.9;
                }
            }
            util += alloc;
            host_req += req;
        }
        self.hosts[h as usize].vm_list = list;
        self.scratch = allocs;
        let frac = self.utilization_fraction(util, h as usize);
        let power_now = self.spec.host_types[self.hosts[h as usize].ty]
            .power
            .power(frac);
        let host = &mut self.hosts[h as usize];
        host.util_mips = util;
        host.power_now = power_now;
        host.prev_energy_util = host.energy_util;
        host.energy_util = util + host.overhead_mips;
        self.host_entry(
            h,
            HostEntry {
                t,
                alloc: util,
                req: host_req,
                active: util > 0.0,
            },
        );
        self.dormant[h as usize] = self.is_dormant(h);
        self.refresh(h);
    }

    /// A switched-off host with nothing on it and nothing pending: updating it again would
    /// change nothing but the time of its last (inactive) SLA entry, which is never read for
    /// an inactive entry once the switch-off has been counted (`prev_active` false), and its
    /// energy interval is 0 (the power model gives 0 energy from utilisation 0).
    fn is_dormant(&self, h: u32) -> bool {
        let host = &self.hosts[h as usize];
        host.vm_list.is_empty()
            && host.migrating_in.is_empty()
            && host.overhead_count == 0
            && host.overhead_mips == 0.0
            && host.util_mips == 0.0
            && host.energy_util == 0.0
            && host.prev_energy_util == 0.0
            && !host.prev_active
            && host.last.is_some_and(|l| !l.active)
    }

    fn host_entry(&mut self, h: u32, e: HostEntry) {
        let host = &mut self.hosts[h as usize];
        if let Some(l) = host.last {
            if l.t == e.t {
                host.last = Some(e);
                return;
            }
            finalize_host_entry(host, l);
            if l.active {
                let dt = e.t - l.t;
                host.active_time += dt;
                if l.alloc < l.req {
                    host.violation_time += dt;
                }
            }
        }
        host.last = Some(e);
    }

    fn vm_entry(&mut self, v: u32, e: VmEntry) {
        let vm = &mut self.vms[v as usize];
        if let Some(l) = vm.last {
            if l.t == e.t {
                vm.last = Some(e);
                return;
            }
            let dt = e.t - l.t;
            vm.tot_alloc += l.alloc * dt;
            vm.tot_req += l.req * dt;
            if l.alloc < l.req && l.migrating {
                vm.under_mig += (l.req - l.alloc) * dt;
            }
        }
        vm.last = Some(e);
    }

    fn utilization_fraction(&self, mips: f64, h: usize) -> f64 {
        let u = mips / self.hosts[h].total_mips;
        if u > 1.0 && u < 1.01 {
            1.0
        } else {
            u
        }
    }

    /// `updateCloudetProcessingWithoutSchedulingFutureEventsForce`.
    fn force_update(&mut self, t: f64) {
        let dt = t - self.last_process;
        let npa = matches!(self.policy, PolicySpec::Npa);
        if npa && dt > 0.0 {
            let types = &self.spec.host_types;
            self.energy_j += self
                .hosts
                .iter()
                .map(|h| types[h.ty].power.max_power() * dt)
                .sum::<f64>();
        }
        let at = self.trace.instant(t);
        self.fill_util_cache(t, &at);
        // CloudSim removes finished VMs after updating every host. A VM that is not migrating
        // is on one list only, its allocation-table host's, and removing it changes nothing the
        // updates or the energy sum read, so each host's are removed right after its update
        // (while its VMs are still in cache).
        let remove = self.opts.remove_idle_vms;
        for h in 0..self.hosts.len() {
            if !self.dormant[h] {
                self.touch_vms_of(h + 1);
                self.host_update_at(h as u32, t, &at);
                if remove {
                    self.remove_completed_vms_on(h);
                }
            }
        }
        if !npa && dt > 0.0 {
            let mut e = 0.0;
            for h in 0..self.hosts.len() {
                // 0 energy (from utilisation 0), and adding +0.0 leaves the sum's bits alone.
                if self.dormant[h] {
                    continue;
                }
                let from = self.utilization_fraction(self.hosts[h].prev_energy_util, h);
                let to = self.utilization_fraction(self.hosts[h].energy_util, h);
                if from > 1.0 || to > 1.0 {
                    self.clamped += 1;
                }
                e += self.spec.host_types[self.hosts[h].ty].power.energy_linear(
                    from.min(1.0),
                    to.min(1.0),
                    dt,
                );
            }
            self.energy_j += e;
        }
        self.last_process = t;
    }

    fn remove_completed_vms_on(&mut self, h: usize) {
        let is_done = |vm: &Vm| !vm.in_migration && vm.requested == 0.0;
        // Most hosts have nothing to remove: check before collecting.
        if !self.hosts[h]
            .vm_list
            .iter()
            .any(|&v| is_done(&self.vms[v as usize]))
        {
            return;
        }
        let done: Vec<u32> = self.hosts[h]
            .vm_list
            .iter()
            .copied()
            .filter(|&v| is_done(&self.vms[v as usize]))
            .collect();
        for v in done {
            if let Some(th) = self.vms[v as usize].table.take() {
                self.vm_destroy(th, v);
            }
            self.vms[v as usize].removed = true;
        }
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
                self.remove_completed_vms_on(h as usize);
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

    fn host_view<'h>(
        &self,
        h: u32,
        extra: Option<u32>,
        buf: &'h mut [f64; VM_HISTORY],
    ) -> HostView<'h> {
        let host = &self.hosts[h as usize];
        *buf = self.host_hist[h as usize];
        let mut req = host.req_sum;
        let mut max_ram = host.max_ram;
        if let Some(v) = extra {
            let vm = &self.vms[v as usize];
            req += vm.requested;
            add_history(buf, vm.hist.as_slice(), vm.mips, host.total_mips);
            max_ram = max_ram.max(vm.ram_mb);
        }
        let len = buf.iter().rposition(|&x| x != 0.0).map_or(0, |i| i + 1);
        let mig = self
            .cost
            .cost(
                &MigrationRequest {
                    ram_mb: max_ram,
                    target_bw: host.bw as u64,
                },
                host.pe_mips,
            )
            .duration_s;
        HostView {
            total_mips: host.total_mips,
            requested_mips: req,
            history: &buf[..len],
            max_vm_migration_time_s: mig,
            interval_s: self.trace.interval_s,
        }
    }

    fn is_overloaded(&self, h: u32, extra: Option<u32>) -> bool {
        let Some(d) = self.detector.as_deref() else {
            return false;
        };
        let mut buf = [0.0; VM_HISTORY];
        let view = self.host_view(h, extra, &mut buf);
        d.is_overloaded(&view)
    }

    fn select_vm(&mut self, h: u32) -> Option<u32> {
        let candidates: Vec<u32> = self.hosts[h as usize]
            .vm_list
            .iter()
            .copied()
            .filter(|&v| !self.vms[v as usize].in_migration)
            .collect();
        let views: Vec<VmView<'_>> = candidates
            .iter()
            .map(|&v| {
                let vm = &self.vms[v as usize];
                VmView {
                    id: VmId(v),
                    ram_mb: vm.ram_mb,
                    mips: vm.mips,
                    requested_mips: vm.requested,
                    history: vm.hist.as_slice(),
                }
            })
            .collect();
        let sel = self.selector.as_deref()?;
        let i = sel.select(&views, &mut self.rng)?;
        candidates.get(i).copied()
    }

    /// PABFD. `off_excluded`: every host idle at the start of the round is excluded (lets the
    /// index skip those groups without walking them).
    fn place(&self, v: u32, excluded: &[bool], off_excluded: bool) -> Option<u32> {
        let pv = PlacementVm {
            id: VmId(v),
            requested_mips: self.vms[v as usize].requested,
        };
        let ctx = Ctx {
            sim: self,
            excluded,
        };
        match &self.index {
            Some(index) => self.place_indexed(index, &pv, &ctx, off_excluded),
            None => Pabfd.find_host(&pv, &ctx).map(|h| h.0),
        }
    }

    /// PABFD through [`PabfdIndex`]; same answer as [`Pabfd`] (see the index docs).
    fn place_indexed(
        &self,
        index: &PabfdIndex,
        vm: &PlacementVm,
        ctx: &Ctx<'_, '_>,
        off_excluded: bool,
    ) -> Option<u32> {
        let mut best: Option<(f64, u32)> = None;
        let better = |d: f64, h: u32, best: &Option<(f64, u32)>| match best {
            None => true,
            Some((bd, bh)) => d < *bd || (d == *bd && h < *bh),
        };
        // Exact check of one host, PABFD order: suitability, power, then over-utilisation.
        let consider = |h: u32, best: &mut Option<(f64, u32)>| {
            let id = HostId(h);
            if ctx.is_excluded(id) || !ctx.is_suitable(id, vm) {
                return;
            }
            let (now, after) = ctx.power_now_and_after(id, vm);
            let Some(after) = after else { return };
            let diff = after - now;
            if !better(diff, h, best) {
                return;
            }
            if ctx.utilization_mips(id) != 0.0 && ctx.overloaded_after(id, vm) {
                return;
            }
            *best = Some((diff, h));
        };
        for &h in &index.shrunk {
            consider(h, &mut best);
        }
        for (&(ty, bits), set) in &index.empty {
            let t = &self.spec.host_types[ty];
            if off_excluded && f64::from_bits(bits) == t.power.power(0.0) {
                continue;
            }
            // No host of this type can take the VM: do not walk the group.
            if t.pe_mips < vm.requested_mips || t.total_mips() < vm.requested_mips {
                continue;
            }
            for &h in set {
                let id = HostId(h);
                if ctx.is_excluded(id) || !ctx.is_suitable(id, vm) {
                    continue;
                }
                consider(h, &mut best);
                break;
            }
        }
        let mut order: Vec<(f64, usize, usize)> = Vec::with_capacity(index.buckets.len() * BUCKETS);
        let vm_state = &self.vms[vm.id.idx()];
        // Per host type (types beyond the eighth are walked without the bound; still exact).
        let mut thresholds = [f64::INFINITY; 8];
        for (ty, buckets) in index.buckets.iter().enumerate() {
            let t = &self.spec.host_types[ty];
            let total = t.total_mips();
            let tau = match &self.prune {
                Some(p) => p.vm_threshold(
                    ty,
                    total,
                    vm_state.mips,
                    vm.requested_mips,
                    vm_state.hist.as_slice(),
                ),
                None => f64::INFINITY,
            };
            if let Some(slot) = thresholds.get_mut(ty) {
                *slot = tau;
            }
            let x = vm.requested_mips / total;
            let limit = 1.0 - x;
            // No host of this type can take the VM (too little room, or a core too small).
            if limit < 0.0 || t.pe_mips < vm.requested_mips {
                continue;
            }
            let table = &self.power_tables[ty];
            let d = |f: f64| table.power(f + x) - table.power(f);
            // The same difference at a bucket edge, the edge's power looked up.
            let edges = &self.edge_power[ty];
            let d_edge = |b: usize| table.power(PabfdIndex::bucket_bounds(b).0 + x) - edges[b];
            // D is piecewise linear in f, so its minimum over a bucket lies at the bucket's
            // ends or at a breakpoint (k/10 or k/10 - x) inside it.
            // Breakpoints with their bucket, then one bound per non-empty bucket from its two
            // ends and the breakpoints inside it.
            let mut bp_bound = [f64::INFINITY; BUCKETS];
            for k in 0..=10 {
                for bp in [k as f64 / 10.0, k as f64 / 10.0 - x] {
                    if (0.0..=limit).contains(&bp) {
                        let slot = &mut bp_bound[PabfdIndex::bucket_of(bp)];
                        *slot = slot.min(d(bp));
                    }
                }
            }
            // D at the upper end of the last bucket bounded: the next bucket's lower end.
            let mut prev_hi: Option<(usize, f64)> = None;
            for (b, &bp_least) in bp_bound.iter().enumerate().take(buckets.len()) {
                // Sorted by key: the least tells whether any host may take the VM.
                if index.first_key(ty, b) >= tau || index.first_key(ty, b).is_nan() {
                    continue;
                }
                let (lo, hi) = PabfdIndex::bucket_bounds(b);
                if lo > limit {
                    break;
                }
                let d_lo = match prev_hi {
                    Some((pb, v)) if pb + 1 == b => v,
                    _ => d_edge(b),
                };
                let d_hi = if hi <= limit { d_edge(b + 1) } else { d(limit) };
                prev_hi = (hi <= limit).then_some((b, d_hi));
                let lb = d_lo.min(d_hi).min(bp_least);
                // Margin for rounding in the bound.
                order.push((lb - 1e-9, ty, b));
            }
        }
        let budget = self.opts.pabfd_budget;
        let mut examined = 0usize;
        // Walks one bucket; false when the approximate budget is used up.
        let mut walk = |ty: usize, b: usize, best: &mut Option<(f64, u32)>| -> bool {
            let tau = thresholds.get(ty).copied().unwrap_or(f64::INFINITY);
            let total = self.spec.host_types[ty].total_mips();
            let table = &self.power_tables[ty];
            let entries = index.below(ty, b, tau);
            // Most candidates sit where the power curve is flattest, all tied up to rounding,
            // so each must be evaluated exactly; inside one segment that is a few flops.
            let (lo, hi) = PabfdIndex::bucket_bounds(b);
            let segment = if budget == 0 {
                let x = vm.requested_mips / total;
                table.interior_segment(lo + x, hi + x)
            } else {
                None
            };
            if budget == 0 {
                // The power difference from the bucket's copy of the host's state, exactly as
                // `power_now_and_after` computes it. First the bucket's least (increase, id)
                // without touching any host's (large, scattered) state: when that host is
                // accepted nothing else in the bucket can beat it, so one exact check does.
                // Written without short-circuits: most hosts tie or lose (fewer mispredicted
                // branches in this, the hottest loop at scale).
                let mut least = (f64::INFINITY, u32::MAX);
                let mut any = false;
                let mut note = |d: f64, h: u32, fits: bool| {
                    let lower = fits & ((d < least.0) | ((d == least.0) & (h < least.1)));
                    if lower {
                        least = (d, h);
                        any = true;
                    }
                };
                match segment {
                    // Inside one segment of the power curve: a few flops, no table lookups.
                    Some((w, delta, start)) => {
                        for e in entries {
                            let after = (e.alloc_mips + vm.requested_mips) / total;
                            note(
                                (w + delta * (after - start) * 100.0) - e.power_now,
                                e.host,
                                true,
                            );
                        }
                    }
                    None => {
                        for e in entries {
                            let after = (e.alloc_mips + vm.requested_mips) / total;
                            note(table.power(after) - e.power_now, e.host, after <= 1.0);
                        }
                    }
                }
                let (bd, bh) = best.unwrap_or((f64::INFINITY, u32::MAX));
                if !any || !((least.0 < bd) || (least.0 == bd && least.1 < bh)) {
                    return true;
                }
                consider(least.1, best);
                if best.is_some_and(|(d, h)| h == least.1 && d == least.0) {
                    return true;
                }
                // That host was rejected (over-utilised after, say): check the bucket in full.
            }
            for e in entries {
                // The power difference from the bucket's copy of the host's state, exactly as
                // `power_now_and_after` computes it: a host that cannot beat the best so far
                // is skipped without touching its (large, scattered) state. Most hosts here
                // tie with the best or lose, so the test is written without short-circuits
                // (fewer mispredicted branches in this, the hottest loop at scale).
                if budget == 0 {
                    let after = (e.alloc_mips + vm.requested_mips) / total;
                    let d = table.power(after) - e.power_now;
                    let (bd, bh) = best.unwrap_or((f64::INFINITY, u32::MAX));
                    let improves = (after <= 1.0) & ((d < bd) | ((d == bd) & (e.host < bh)));
                    if !improves {
                        continue;
                    }
                }
                consider(e.host, best);
                examined += 1;
                if budget > 0 && examined >= budget {
                    return false;
                }
            }
            true
        };
        if budget == 0 {
            // Exact: the answer is the least (increase, id) over every bucket whose bound does
            // not exceed it, whatever the visiting order. Walking the bucket with the least
            // bound first usually finds an answer close to the final one, and then only the
            // buckets bounded below it need sorting (most are not).
            let first = order
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .map(|(i, _)| i);
            if let Some(i) = first {
                let (_, ty, b) = order.swap_remove(i);
                walk(ty, b, &mut best);
                if let Some((bd, _)) = best {
                    order.retain(|o| o.0 <= bd);
                }
            }
        }
        // Buckets with equal bounds may be visited in any order: the result is the minimum.
        order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        for (lb, ty, b) in order {
            if let Some((bd, _)) = best {
                if lb > bd {
                    break;
                }
            }
            if !walk(ty, b, &mut best) {
                break;
            }
        }
        best.map(|(_, h)| h)
    }

    fn sort_by_utilization_desc(&self, vms: &mut [u32]) {
        // Stable, like Java's Collections.sort.
        vms.sort_by(|&a, &b| {
            self.vms[b as usize]
                .requested
                .total_cmp(&self.vms[a as usize].requested)
        });
    }

    /// CloudSim `PowerVmAllocationPolicyMigrationAbstract.optimizeAllocation`.
    fn optimize_allocation(&mut self, _t: f64) -> Vec<(u32, u32)> {
        let n = self.hosts.len();
        self.in_round = true;
        for h in 0..n {
            self.refresh(h as u32);
        }
        self.build_index();
        let over: Vec<u32> = (0..n as u32)
            .filter(|&h| self.is_overloaded(h, None))
            .collect();
        // One vector for all hosts (a vector per host was a visible cost at 50,000 hosts).
        let mut saved: Vec<(u32, u32)> = Vec::with_capacity(self.vms.len());
        for (h, host) in self.hosts.iter().enumerate() {
            for &v in &host.vm_list {
                if !host.migrating_in.contains(&v) {
                    saved.push((h as u32, v));
                }
            }
        }

        let mut to_migrate = Vec::new();
        for &h in &over {
            while let Some(v) = self.select_vm(h) {
                to_migrate.push(v);
                self.vm_destroy(h, v);
                if !self.is_overloaded(h, None) {
                    break;
                }
            }
        }

        let mut over_set = vec![false; n];
        for &h in &over {
            over_set[h as usize] = true;
            self.disable_in_index(h);
        }
        let mut map = Vec::new();
        self.sort_by_utilization_desc(&mut to_migrate);
        for v in to_migrate {
            if let Some(h) = self.place(v, &over_set, false) {
                self.vm_create(h, v);
                map.push((v, h));
            }
        }

        // Under-utilised hosts. CloudSim means to exclude the hosts that just received VMs but
        // reads them from an empty list, so only over-utilised and idle hosts are excluded.
        let mut excl_under = over_set.clone();
        let mut excl_place = over_set;
        let mut excluded_count = over.len();
        for h in 0..n {
            if self.utilization_fraction(self.hosts[h].util_mips, h) == 0.0 {
                if !excl_under[h] {
                    excluded_count += 1;
                }
                excl_under[h] = true;
                excl_place[h] = true;
                self.disable_in_index(h as u32);
            }
        }
        let mut order: Vec<u32> = (0..n as u32)
            .filter(|&h| {
                let u = self.utilization_fraction(self.hosts[h as usize].util_mips, h as usize);
                u > 0.0 && u < 1.0
            })
            .collect();
        order.sort_by(|&a, &b| {
            let ua = self.utilization_fraction(self.hosts[a as usize].util_mips, a as usize);
            let ub = self.utilization_fraction(self.hosts[b as usize].util_mips, b as usize);
            ua.total_cmp(&ub).then(a.cmp(&b))
        });
        let mut start = 0;
        loop {
            if excluded_count == n {
                break;
            }
            while start < order.len() && excl_under[order[start] as usize] {
                start += 1;
            }
            let Some(&under) = order[start..]
                .iter()
                .find(|&&h| !excl_under[h as usize] && !self.all_migrating_out_or_any_in(h))
            else {
                break;
            };
            excl_under[under as usize] = true;
            excluded_count += 1;
            excl_place[under as usize] = true;
            self.disable_in_index(under);
            let mut vms: Vec<u32> = self.hosts[under as usize]
                .vm_list
                .iter()
                .copied()
                .filter(|&v| !self.vms[v as usize].in_migration)
                .collect();
            if vms.is_empty() {
                continue;
            }
            self.sort_by_utilization_desc(&mut vms);
            let mut placed: Vec<(u32, u32)> = Vec::new();
            for v in vms {
                match self.place(v, &excl_place, true) {
                    Some(h) => {
                        self.vm_create(h, v);
                        placed.push((v, h));
                    }
                    None => {
                        for &(pv, ph) in &placed {
                            self.vm_destroy(ph, pv);
                        }
                        placed.clear();
                        break;
                    }
                }
            }
            for &(_, h) in &placed {
                if !excl_under[h as usize] {
                    excl_under[h as usize] = true;
                    excluded_count += 1;
                }
            }
            map.extend(placed);
        }

        self.index = None;
        self.in_round = false;
        self.restore_allocation(&saved);
        map
    }

    fn disable_in_index(&mut self, h: u32) {
        if let Some(index) = self.index.as_mut() {
            index.disable(h);
        }
    }

    fn all_migrating_out_or_any_in(&self, h: u32) -> bool {
        let host = &self.hosts[h as usize];
        for &v in &host.vm_list {
            if !self.vms[v as usize].in_migration {
                return false;
            }
            if host.migrating_in.contains(&v) {
                return true;
            }
        }
        true
    }

    fn restore_allocation(&mut self, saved: &[(u32, u32)]) {
        // A host the round did not touch, with no incoming VM and no reservation, would be
        // rebuilt exactly as it is (same list in the same order, same usage, its VMs' host,
        // table and scheduled request unchanged), so it is left alone.
        let rebuild: Vec<bool> = self
            .hosts
            .iter()
            .zip(&self.round_modified)
            .map(|(host, &modified)| {
                modified || !host.migrating_in.is_empty() || !host.reservations.is_empty()
            })
            .collect();
        for (h, &rebuild_h) in rebuild.iter().enumerate() {
            if !rebuild_h {
                continue;
            }
            let list = std::mem::take(&mut self.hosts[h].vm_list);
            for v in list {
                self.vms[v as usize].host = None;
            }
            let host = &mut self.hosts[h];
            host.reservations.clear();
            host.ram_used = 0;
            host.bw_used = 0;
            host.storage_used = 0;
            let incoming = host.migrating_in.clone();
            if !incoming.is_empty() {
                self.dormant[h] = false;
            }
            for v in incoming {
                let size = self.vms[v as usize].size_mb as i64;
                let host = &mut self.hosts[h];
                host.vm_list.push(v);
                host.storage_used += size;
            }
        }
        for &(h, v) in saved {
            if !rebuild[h as usize] {
                continue;
            }
            if self.vm_create(h, v) {
                self.vms[v as usize].table = Some(h);
            } else {
                tracing::warn!(host = h, vm = v, "could not restore VM allocation");
            }
        }
        self.round_modified.iter_mut().for_each(|m| *m = false);
        for h in 0..self.hosts.len() {
            self.refresh(h as u32);
        }
    }

    fn start_migration(&mut self, v: u32, target: u32, t: f64) {
        let source = self.vms[v as usize].host;
        let cost = self.cost.cost(
            &MigrationRequest {
                ram_mb: self.vms[v as usize].ram_mb,
                target_bw: self.hosts[target as usize].bw as u64,
            },
            self.hosts[target as usize].pe_mips,
        );
        self.dormant[target as usize] = false;
        if let Some(s) = source {
            self.dormant[s as usize] = false;
        }
        self.vms[v as usize].in_migration = true;
        let counted = !self.is_migrating_in(target, v);
        if counted {
            let size = self.vms[v as usize].size_mb as i64;
            let host = &mut self.hosts[target as usize];
            host.storage_used += size;
            host.migrating_in.push(v);
            host.vm_list.push(v);
            host.overhead_mips += cost.target_overhead_mips;
            host.overhead_count += 1;
            if let Some(s) = source {
                let src = &mut self.hosts[s as usize];
                src.overhead_mips += cost.source_overhead_mips;
                src.overhead_count += 1;
            }
            self.host_update(target, t);
            if let Some(s) = source {
                self.host_update(s, t);
            }
        }
        self.migrations += 1;
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
        if let Some(h) = self.vms[v as usize].table.take() {
            self.touched.push(h);
            self.vm_destroy(h, v);
        }
        // removeMigratingInVm
        let size = self.vms[v as usize].size_mb as i64;
        {
            let host = &mut self.hosts[ev.target as usize];
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
            release_overhead(&mut self.hosts[s as usize], ev.source_overhead);
        }
        self.vms[v as usize].in_migration = false;
        if !self.vm_create(ev.target, v) {
            return Err(SimError::MigrationTarget {
                vm: v,
                host: ev.target,
            });
        }
        self.vms[v as usize].table = Some(ev.target);
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
        }
    }
}

/// What the scheduler allocates a VM on a host that is not over-subscribed: its request
/// capped at the PE size, 90 % of it while migrating out, 10 % while migrating in.
fn unscaled_allocation(capped: f64, out: bool, inn: bool) -> f64 {
    if out {
        capped * 0.9
    } else if inn {
        capped * 0.1
    } else {
        capped
    }
}

/// `sum` plus a VM's allocation `a` as CloudSim's policy counts a host's load
/// (`getUtilizationOfCpuMips`): a VM migrating in at its full potential.
fn add_to_alloc_sum(mut sum: f64, a: f64, inn: bool) -> f64 {
    if inn {
        sum += a * 0.9 / 0.1;
    }
    sum + a
}

/// Adds a VM's utilisation history (fractions of its MIPS), as fractions of the host's
/// capacity, to a host history, sample by sample.
fn add_history(host_hist: &mut [f64; VM_HISTORY], vm_hist: &[f64], vm_mips: f64, host_mips: f64) {
    for (h, u) in host_hist.iter_mut().zip(vm_hist) {
        *h += u * vm_mips / host_mips;
    }
}

fn release_overhead(host: &mut Host, mips: f64) {
    host.overhead_count = host.overhead_count.saturating_sub(1);
    host.overhead_mips = if host.overhead_count == 0 {
        0.0
    } else {
        (host.overhead_mips - mips).max(0.0)
    };
}

fn finalize_host_entry(host: &mut Host, e: HostEntry) {
    if host.prev_active && !e.active {
        host.shutdowns += 1;
    }
    host.prev_active = e.active;
}

/// The placement policies' read-only view of the simulation.
struct Ctx<'s, 'a> {
    sim: &'s Simulation<'a>,
    excluded: &'s [bool],
}

impl PlacementContext for Ctx<'_, '_> {
    fn host_count(&self) -> usize {
        self.sim.hosts.len()
    }
    fn is_excluded(&self, host: HostId) -> bool {
        self.excluded[host.idx()]
    }
    fn is_suitable(&self, host: HostId, vm: &PlacementVm) -> bool {
        let h = &self.sim.hosts[host.idx()];
        let v = &self.sim.vms[vm.id.idx()];
        let (ram, bw) = if v.instantiating {
            (i64::from(v.ram_mb), v.bw as i64)
        } else {
            (0, 0)
        };
        h.pe_mips >= vm.requested_mips
            && h.available_mips >= vm.requested_mips
            && h.ram_mb - h.ram_used >= ram
            && h.bw - h.bw_used >= bw
    }
    fn utilization_mips(&self, host: HostId) -> f64 {
        self.sim.hosts[host.idx()].alloc_sum
    }
    fn overloaded_after(&self, host: HostId, vm: &PlacementVm) -> bool {
        let h = &self.sim.hosts[host.idx()];
        let v = &self.sim.vms[vm.id.idx()];
        // vmCreate would fail on storage: CloudSim then treats the host as over-utilised.
        if h.storage_mb - h.storage_used < v.size_mb as i64 {
            return true;
        }
        self.sim.is_overloaded(host.0, Some(vm.id.0))
    }
    fn power_now_and_after(&self, host: HostId, vm: &PlacementVm) -> (f64, Option<f64>) {
        let sim = self.sim;
        let h = &sim.hosts[host.idx()];
        let model = &sim.spec.host_types[h.ty].power;
        // Power now comes from the utilisation measured at the start of the round; the power
        // after allocation from what the scheduler has allocated by now (CloudSim mixes both).
        let now = h.power_now;
        let after = (h.alloc_sum + vm.requested_mips) / h.total_mips;
        (
            now,
            if after <= 1.0 {
                Some(model.power(after))
            } else {
                None
            },
        )
    }
}

#[cfg(test)]
mod history_tests {
    use super::{History, VM_HISTORY};

    #[test]
    fn history_keeps_the_last_samples_most_recent_first() {
        let mut h = History::new();
        let mut reference: Vec<f64> = Vec::new();
        assert!(h.as_slice().is_empty());
        for i in 0..(5 * VM_HISTORY + 7) {
            let u = i as f64 * 0.01;
            h.push_front(u);
            reference.insert(0, u);
            reference.truncate(VM_HISTORY);
            assert_eq!(h.as_slice(), &reference[..], "after {} samples", i + 1);
        }
    }
}
