//! One consolidation round over the cluster's last reports, with the simulator's own policy
//! objects (`fastmig_sim::policy`): the round logic of `fastmig_sim::engine`
//! (`optimize_allocation`) on live data. Pure: views in, a [`Plan`] out; nothing is ordered
//! here.
//!
//! 1. Over-utilised hosts: the detector on each active host's [`HostView`].
//! 2. From each, the selector picks VMs ([`VmView`]) until the host is no longer
//!    over-utilised; the chosen VMs, largest demand first, are placed by PABFD
//!    ([`VmPlacement`] over a [`PlacementContext`]) on hosts that are not over-utilised.
//! 3. Under-utilised hosts, least utilised first: all of a host's VMs placed elsewhere, or none.
//! 4. Active hosts with nothing on them go to standby; when a VM of an over-utilised host
//!    found no host, one standby host is woken.
//!
//! Differences from the simulator, because hosts here are real: hosts in standby, unreachable
//! hosts and hosts with `max_in_flight` migrations already running are never destinations;
//! VMs already migrating are never selected and count on both hosts; a host with a migration
//! in flight is not evacuated.

use fastmig_sim::cost::{MigrationCostModel, MigrationCostQuery};
use fastmig_sim::policy::{
    HostView, OverloadDetector, PlacementContext, PlacementVm, VmPlacement, VmSelector, VmView,
};
use fastmig_sim::rng::SplitMix64;
use fastmig_sim::setup::HostType;
use fastmig_sim::{HostId, VmId};
use serde::{Deserialize, Serialize};

use crate::proto::{HostName, VmName};
use crate::store::Origin;

/// A host as the round sees it.
#[derive(Debug, Clone)]
pub struct RoundHost {
    /// Its name.
    pub name: HostName,
    /// Its type (capacity, power model).
    pub host_type: HostType,
    /// Takes VMs (active and reachable).
    pub active: bool,
    /// In standby (reachable): may be woken.
    pub standby: bool,
    /// Migrations in flight from or to it.
    pub in_flight: usize,
    /// Utilisation history, most recent first.
    pub history: Vec<f64>,
}

/// A VM as the round sees it.
#[derive(Debug, Clone)]
pub struct RoundVm {
    /// Its name.
    pub name: VmName,
    /// Index of its host in the round's host list.
    pub host: usize,
    /// Declared MIPS.
    pub mips: f64,
    /// RAM, MB.
    pub ram_mb: u32,
    /// Current request, MIPS.
    pub requested_mips: f64,
    /// Demand history as a fraction of `mips`, most recent first.
    pub history: Vec<f64>,
    /// Running and not migrating: may be selected.
    pub movable: bool,
}

/// One move the round chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedMove {
    /// The VM.
    pub vm: VmName,
    /// From.
    pub source: HostName,
    /// To.
    pub destination: HostName,
    /// Why.
    pub origin: Origin,
}

/// What the round decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Hosts the detector found over-utilised.
    pub overloaded: Vec<HostName>,
    /// Moves, in the order to make them.
    pub moves: Vec<PlannedMove>,
    /// VMs of over-utilised hosts for which no host was found.
    pub unplaced: Vec<VmName>,
    /// Under-utilised hosts chosen for evacuation.
    pub evacuated: Vec<HostName>,
    /// Active hosts with nothing on them: to standby.
    pub to_standby: Vec<HostName>,
    /// A standby host to wake (capacity ran short).
    pub wake: Option<HostName>,
}

/// The policy objects a round calls.
pub struct Policies<'a> {
    /// Overload detector.
    pub detector: &'a dyn OverloadDetector,
    /// VM selector.
    pub selector: &'a dyn VmSelector,
    /// Placement (PABFD).
    pub placement: &'a dyn VmPlacement,
    /// Migration cost (the detectors' look-ahead).
    pub cost: &'a dyn MigrationCostModel,
    /// Scheduling interval, s.
    pub interval_s: f64,
    /// Most migrations in flight per host.
    pub max_in_flight: usize,
}

/// Hypothetical per-host state during the round.
struct Work<'a> {
    hosts: &'a [RoundHost],
    vms: &'a [RoundVm],
    /// VM indices on each host (hypothetical).
    on: Vec<Vec<usize>>,
    alloc: Vec<f64>,
    /// Declared MIPS of the VMs on each host: what the agent admits by.
    declared: Vec<f64>,
    ram_used: Vec<u64>,
    power_now: Vec<f64>,
    p: &'a Policies<'a>,
}

fn ram_mb(t: &HostType) -> u64 {
    u64::from(t.ram_mb)
}

impl Work<'_> {
    fn view<'b>(&self, h: usize, extra: Option<usize>, buf: &'b mut Vec<f64>) -> HostView<'b> {
        let host = &self.hosts[h];
        let total = host.host_type.total_mips();
        buf.clear();
        buf.extend_from_slice(&host.history);
        let mut req = self.alloc[h];
        let mut max_ram = self.on[h].iter().map(|&v| self.vms[v].ram_mb).max();
        if let Some(v) = extra {
            let vm = &self.vms[v];
            req += vm.requested_mips;
            if buf.len() < vm.history.len() {
                buf.resize(vm.history.len(), 0.0);
            }
            for (b, u) in buf.iter_mut().zip(&vm.history) {
                *b += u * vm.mips / total;
            }
            max_ram = max_ram.max(Some(vm.ram_mb));
        }
        let mig = self
            .p
            .cost
            .cost(
                &MigrationCostQuery {
                    ram_mb: max_ram.unwrap_or(0),
                    target_bw: host.host_type.bw,
                    cpu_utilization: 1.0,
                    // The detector's look-ahead takes the worst case, as the simulator does.
                    mem_utilization: None,
                },
                host.host_type.pe_mips,
            )
            .duration_s;
        HostView {
            total_mips: total,
            requested_mips: req,
            history: buf,
            max_vm_migration_time_s: mig,
            interval_s: self.p.interval_s,
        }
    }

    fn overloaded(&self, h: usize, extra: Option<usize>) -> bool {
        let mut buf = Vec::new();
        let view = self.view(h, extra, &mut buf);
        self.p.detector.is_overloaded(&view)
    }

    fn remove(&mut self, h: usize, v: usize) {
        self.on[h].retain(|&x| x != v);
        self.alloc[h] -= self.vms[v].requested_mips;
        self.declared[h] -= self.vms[v].mips;
        self.ram_used[h] -= u64::from(self.vms[v].ram_mb);
    }

    fn add(&mut self, h: usize, v: usize) {
        self.on[h].push(v);
        self.alloc[h] += self.vms[v].requested_mips;
        self.declared[h] += self.vms[v].mips;
        self.ram_used[h] += u64::from(self.vms[v].ram_mb);
    }

    fn place(&self, v: usize, excluded: &[bool]) -> Option<usize> {
        let ctx = Ctx { w: self, excluded };
        let pv = PlacementVm {
            id: VmId(v as u32),
            requested_mips: self.vms[v].requested_mips,
        };
        self.p
            .placement
            .find_host(&pv, &ctx)
            .map(|h: HostId| h.idx())
    }

    fn utilization(&self, h: usize) -> f64 {
        self.alloc[h] / self.hosts[h].host_type.total_mips()
    }
}

struct Ctx<'w, 'a> {
    w: &'w Work<'a>,
    excluded: &'w [bool],
}

impl PlacementContext for Ctx<'_, '_> {
    fn host_count(&self) -> usize {
        self.w.hosts.len()
    }
    fn is_excluded(&self, host: HostId) -> bool {
        self.excluded[host.idx()]
    }
    fn is_suitable(&self, host: HostId, vm: &PlacementVm) -> bool {
        let h = host.idx();
        let t = &self.w.hosts[h].host_type;
        let v = &self.w.vms[vm.id.idx()];
        t.pe_mips >= vm.requested_mips
            && t.total_mips() - self.w.alloc[h] >= vm.requested_mips
            && ram_mb(t).saturating_sub(self.w.ram_used[h]) >= u64::from(v.ram_mb)
            // The agent admits a VM by its declared MIPS (a guest may use all of them): a
            // host the agent would refuse is no destination, whatever the VMs use now.
            && self.w.declared[h] + v.mips <= t.total_mips()
    }
    fn utilization_mips(&self, host: HostId) -> f64 {
        self.w.alloc[host.idx()]
    }
    fn overloaded_after(&self, host: HostId, vm: &PlacementVm) -> bool {
        self.w.overloaded(host.idx(), Some(vm.id.idx()))
    }
    fn power_now_and_after(&self, host: HostId, vm: &PlacementVm) -> (f64, Option<f64>) {
        let h = host.idx();
        let t = &self.w.hosts[h].host_type;
        let after = (self.w.alloc[h] + vm.requested_mips) / t.total_mips();
        (
            self.w.power_now[h],
            (after <= 1.0).then(|| t.power.power(after)),
        )
    }
}

impl<'a> Work<'a> {
    /// The hosts with the first `placed` VMs on them.
    fn new(hosts: &'a [RoundHost], vms: &'a [RoundVm], placed: usize, p: &'a Policies<'a>) -> Self {
        let n = hosts.len();
        let mut w = Work {
            hosts,
            vms,
            on: vec![Vec::new(); n],
            alloc: vec![0.0; n],
            declared: vec![0.0; n],
            ram_used: vec![0; n],
            power_now: vec![0.0; n],
            p,
        };
        for (i, v) in vms.iter().enumerate().take(placed) {
            w.add(v.host, i);
        }
        w.power_now = (0..n)
            .map(|h| hosts[h].host_type.power.power(w.utilization(h)))
            .collect();
        w
    }
}

/// PABFD for one new VM on the active hosts as they are (`POST /vms` without a host). The
/// new VM's `host` is ignored.
pub fn place_new(
    hosts: &[RoundHost],
    vms: &[RoundVm],
    new: &RoundVm,
    p: &Policies<'_>,
) -> Option<usize> {
    let mut all = vms.to_vec();
    all.push(new.clone());
    let w = Work::new(hosts, &all, vms.len(), p);
    let excluded: Vec<bool> = hosts.iter().map(|h| !h.active).collect();
    w.place(vms.len(), &excluded)
}

fn sort_by_request_desc(vms: &[RoundVm], list: &mut [usize]) {
    list.sort_by(|&a, &b| vms[b].requested_mips.total_cmp(&vms[a].requested_mips));
}

/// Runs one round. `rng` feeds the random selector.
pub fn plan(hosts: &[RoundHost], vms: &[RoundVm], p: &Policies<'_>, rng: &mut SplitMix64) -> Plan {
    let n = hosts.len();
    let mut w = Work::new(hosts, vms, vms.len(), p);
    let mut out = Plan::default();
    // Never a destination: standby, unreachable, or at the in-flight cap.
    let unusable: Vec<bool> = hosts
        .iter()
        .map(|h| !h.active || h.in_flight >= p.max_in_flight)
        .collect();

    // 1-2: over-utilised hosts and the VMs they shed.
    let over: Vec<usize> = (0..n)
        .filter(|&h| hosts[h].active && w.overloaded(h, None))
        .collect();
    let mut to_migrate: Vec<(usize, usize)> = Vec::new();
    for &h in &over {
        out.overloaded.push(hosts[h].name.clone());
        if hosts[h].in_flight >= p.max_in_flight {
            continue;
        }
        loop {
            let candidates: Vec<usize> = w.on[h]
                .iter()
                .copied()
                .filter(|&v| vms[v].movable)
                .collect();
            let views: Vec<VmView<'_>> = candidates
                .iter()
                .map(|&v| VmView {
                    id: VmId(v as u32),
                    ram_mb: vms[v].ram_mb,
                    mips: vms[v].mips,
                    requested_mips: vms[v].requested_mips,
                    history: &vms[v].history,
                })
                .collect();
            let Some(i) = p.selector.select(&views, rng) else {
                break;
            };
            let Some(&v) = candidates.get(i) else { break };
            to_migrate.push((v, h));
            w.remove(h, v);
            if !w.overloaded(h, None) {
                break;
            }
        }
    }
    let mut excluded = unusable.clone();
    for &h in &over {
        excluded[h] = true;
    }
    let mut order: Vec<usize> = to_migrate.iter().map(|&(v, _)| v).collect();
    sort_by_request_desc(vms, &mut order);
    let mut received = vec![false; n];
    for v in order {
        let src = vms[v].host;
        match w.place(v, &excluded) {
            Some(d) => {
                w.add(d, v);
                received[d] = true;
                out.moves.push(PlannedMove {
                    vm: vms[v].name.clone(),
                    source: hosts[src].name.clone(),
                    destination: hosts[d].name.clone(),
                    origin: Origin::Policy,
                });
            }
            None => {
                // It stays where it is.
                w.add(src, v);
                out.unplaced.push(vms[v].name.clone());
            }
        }
    }

    // 3: under-utilised hosts, least utilised first; all of a host's VMs or none.
    let mut excl_under = excluded.clone();
    for h in 0..n {
        if w.on[h].is_empty() || received[h] || hosts[h].in_flight > 0 || !hosts[h].active {
            excl_under[h] = true;
        }
        if w.on[h].is_empty() {
            excluded[h] = true;
        }
    }
    let mut under: Vec<usize> = (0..n)
        .filter(|&h| !excl_under[h] && w.utilization(h) < 1.0)
        .collect();
    under.sort_by(|&a, &b| {
        w.utilization(a)
            .total_cmp(&w.utilization(b))
            .then(a.cmp(&b))
    });
    for h in under {
        if excl_under[h] {
            continue;
        }
        excl_under[h] = true;
        excluded[h] = true;
        let mut list: Vec<usize> = w.on[h].clone();
        if list.iter().any(|&v| !vms[v].movable) {
            continue;
        }
        sort_by_request_desc(vms, &mut list);
        let mut placed: Vec<(usize, usize)> = Vec::new();
        for &v in &list {
            match w.place(v, &excluded) {
                Some(d) => {
                    w.remove(h, v);
                    w.add(d, v);
                    placed.push((v, d));
                }
                None => {
                    for &(pv, d) in placed.iter().rev() {
                        w.remove(d, pv);
                        w.add(h, pv);
                    }
                    placed.clear();
                    break;
                }
            }
        }
        if placed.is_empty() {
            continue;
        }
        out.evacuated.push(hosts[h].name.clone());
        for (v, d) in placed {
            excl_under[d] = true;
            out.moves.push(PlannedMove {
                vm: vms[v].name.clone(),
                source: hosts[h].name.clone(),
                destination: hosts[d].name.clone(),
                origin: Origin::Evacuation,
            });
        }
    }

    // 4: standby and wake, from the hosts' real state (the moves have not happened yet).
    let mut real_count = vec![0usize; n];
    for v in vms {
        real_count[v.host] += 1;
    }
    for (h, host) in hosts.iter().enumerate() {
        if host.active && real_count[h] == 0 && host.in_flight == 0 && !received[h] {
            out.to_standby.push(host.name.clone());
        }
    }
    if !out.unplaced.is_empty() {
        out.wake = hosts.iter().find(|h| h.standby).map(|h| h.name.clone());
    }
    out
}

#[cfg(test)]
mod tests;
