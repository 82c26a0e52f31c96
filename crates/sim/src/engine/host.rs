//! CloudSim's host primitives (`Host`, `HostDynamicWorkload`, the time-shared scheduler):
//! creating and destroying a VM on a host, the scheduler's allocation, a host's update at a
//! time `t` with its SLA and energy bookkeeping, and the cached aggregates placement reads.

use super::model::{
    add_history, add_to_alloc_sum, finalize_host_entry, unscaled_allocation, HostEntry, Vm,
    VmEntry, VM_HISTORY,
};
use super::Simulation;
use crate::ids::{HostId, VmId};
use crate::index::{Entry, PabfdIndex};
use crate::spec::PolicySpec;
use crate::trace::Instant;

impl Simulation<'_> {
    // ---- host primitives (CloudSim Host / HostDynamicWorkload) ------------------------------

    pub(super) fn vm_create(&mut self, h: HostId, v: VmId) -> bool {
        let (ram, bw, size, req) = {
            let vm = &self.vms[v.idx()];
            let (ram, bw) = if vm.instantiating {
                (i64::from(vm.ram_mb), vm.bw as i64)
            } else {
                (0, 0)
            };
            (ram, bw, vm.size_mb as i64, vm.requested)
        };
        let host = &mut self.hosts[h.idx()];
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
        self.dormant[h.idx()] = false;
        self.round_modified[h.idx()] = true;
        let vm = &mut self.vms[v.idx()];
        vm.sched_req = req;
        // The VM's previous host changes too (its VM's host field), for restore_allocation.
        if let Some(old) = vm.host.replace(h) {
            self.round_modified[old.idx()] = true;
        }
        self.refresh_appended(h, v);
        true
    }

    pub(super) fn release(&mut self, h: HostId, v: VmId) {
        let size = self.vms[v.idx()].size_mb as i64;
        let host = &mut self.hosts[h.idx()];
        host.storage_used -= size;
        if let Some(pos) = host.reservations.iter().position(|r| r.0 == v) {
            let (_, ram, bw) = host.reservations.swap_remove(pos);
            host.ram_used -= ram;
            host.bw_used -= bw;
        }
    }

    pub(super) fn vm_destroy(&mut self, h: HostId, v: VmId) {
        self.round_modified[h.idx()] = true;
        if let Some(old) = self.vms[v.idx()].host {
            self.round_modified[old.idx()] = true;
        }
        self.release(h, v);
        let host = &mut self.hosts[h.idx()];
        if let Some(pos) = host.vm_list.iter().position(|&x| x == v) {
            host.vm_list.remove(pos);
        }
        self.vms[v.idx()].host = None;
        self.refresh(h);
    }

    /// Recomputes the cached aggregates of a host from its VM list, in list order (the order
    /// CloudSim sums in).
    pub(super) fn refresh(&mut self, h: HostId) {
        // The aggregates serve placement and detection only, which happen inside rounds (each
        // round starts by refreshing every host), so outside rounds there is nothing to keep.
        if !self.in_round {
            return;
        }
        let host = &self.hosts[h.idx()];
        let mut req_sum = 0.0;
        let mut hist = [0.0; VM_HISTORY];
        let mut max_ram = 0;
        for &v in &host.vm_list {
            let vm = &self.vms[v.idx()];
            req_sum += vm.requested;
            add_history(&mut hist, vm.hist.as_slice(), vm.mips, host.total_mips);
            max_ram = max_ram.max(vm.ram_mb);
        }
        let mut alloc_sum = 0.0;
        let (available, oversubscribed) = self.for_each_allocation(h, |_, inn, a| {
            alloc_sum = add_to_alloc_sum(alloc_sum, a, inn);
        });
        let host = &mut self.hosts[h.idx()];
        host.alloc_sum = alloc_sum;
        host.req_sum = req_sum;
        self.host_hist[h.idx()] = hist;
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
    pub(super) fn refresh_appended(&mut self, h: HostId, v: VmId) {
        if !self.in_round {
            return;
        }
        let host = &self.hosts[h.idx()];
        let vm = &self.vms[v.idx()];
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
            &mut self.host_hist[h.idx()],
            vm.hist.as_slice(),
            vm.mips,
            host.total_mips,
        );
        let host = &mut self.hosts[h.idx()];
        host.alloc_sum = alloc_sum;
        host.req_sum = req_sum;
        host.max_ram = max_ram;
        host.available_mips = available;
        self.reindex(h);
    }

    /// Files the host in the PABFD index under its current aggregates.
    pub(super) fn reindex(&mut self, h: HostId) {
        if self.index.is_some() {
            let key = self.overload_key(h);
            let host = &self.hosts[h.idx()];
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
    pub(super) fn build_index(&mut self) {
        if self.hosts.len() < self.opts.index_min_hosts {
            self.index = None;
            return;
        }
        let items = self.hosts.iter().enumerate().map(|(h, host)| {
            let entry = Entry {
                key: self.overload_key(HostId(h as u32)),
                host: HostId(h as u32),
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
    pub(super) fn overload_key(&self, h: HostId) -> f64 {
        let host = &self.hosts[h.idx()];
        match &self.prune {
            Some(p) => p.host_key(
                host.ty,
                host.total_mips,
                host.req_sum,
                &self.host_hist[h.idx()],
            ),
            None => f64::NEG_INFINITY,
        }
    }

    pub(super) fn is_migrating_in(&self, h: HostId, v: VmId) -> bool {
        self.hosts[h.idx()].migrating_in.contains(&v)
    }

    /// Calls `f(vm, migrating_in, allocated_mips)` for each VM of the host's list, in list
    /// order, with CloudSim's over-subscribing time-shared scheduler semantics: requests are
    /// capped at the PE size, a VM migrating out gets 90 %, one migrating in is charged 10 %,
    /// and an over-subscribed host scales every request down (and floors it). Returns the free
    /// MIPS the scheduler reports afterwards and whether the host is over-subscribed (some
    /// request found less than it asked for free).
    pub(super) fn for_each_allocation(
        &self,
        h: HostId,
        mut f: impl FnMut(VmId, bool, f64),
    ) -> (f64, bool) {
        let host = &self.hosts[h.idx()];
        let mut avail = host.total_mips;
        let mut oversubscribed = false;
        let mut total_req = 0.0;
        for &v in &host.vm_list {
            let c = self.vms[v.idx()].sched_req.min(host.pe_mips);
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
            let vm = &self.vms[v.idx()];
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
    pub(super) fn fill_util_cache(&mut self, t: f64, at: &Instant) {
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
    pub(super) fn vm_update(&mut self, v: VmId, t: f64, at: &Instant, on_sample: bool) {
        let row = self.vms[v.idx()].trace;
        let u = if self.util_cache_t == t {
            self.util_cache[row]
        } else {
            self.trace.utilization_at(row, at)
        };
        let vm = &mut self.vms[v.idx()];
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
    pub(super) fn touch_vms_of(&self, h: usize) {
        let Some(host) = self.hosts.get(h) else {
            return;
        };
        if self.dormant[h] {
            return;
        }
        for &v in &host.vm_list {
            let vm = &self.vms[v.idx()];
            std::hint::black_box((vm.mips, vm.tot_alloc));
        }
    }

    /// CloudSim `HostDynamicWorkload.updateVmsProcessing`.
    pub(super) fn host_update(&mut self, h: HostId, t: f64) {
        let at = self.trace.instant(t);
        self.host_update_at(h, t, &at);
    }

    pub(super) fn host_update_at(&mut self, h: HostId, t: f64, at: &Instant) {
        let on_sample = (t - self.opts.start_s) % self.trace.interval_s == 0.0;
        let list = std::mem::take(&mut self.hosts[h.idx()].vm_list);
        for &v in &list {
            self.vm_update(v, t, at, on_sample);
            let vm = &mut self.vms[v.idx()];
            vm.sched_req = vm.requested;
        }
        self.hosts[h.idx()].vm_list = list;
        let mut allocs = std::mem::take(&mut self.scratch);
        allocs.clear();
        self.for_each_allocation(h, |_, _, a| allocs.push(a));
        let list = std::mem::take(&mut self.hosts[h.idx()].vm_list);
        let mut util = 0.0;
        let mut host_req = 0.0;
        for (i, &v) in list.iter().enumerate() {
            let req = self.vms[v.idx()].requested;
            let mut alloc = allocs[i];
            if !self.is_migrating_in(h, v) {
                let migrating = self.vms[v.idx()].in_migration;
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
        self.hosts[h.idx()].vm_list = list;
        self.scratch = allocs;
        let frac = self.utilization_fraction(util, h.idx());
        let power_now = self.spec.host_types[self.hosts[h.idx()].ty]
            .power
            .power(frac);
        let host = &mut self.hosts[h.idx()];
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
        self.dormant[h.idx()] = self.is_dormant(h);
        self.refresh(h);
    }

    /// A switched-off host with nothing on it and nothing pending: updating it again would
    /// change nothing but the time of its last (inactive) SLA entry, which is never read for
    /// an inactive entry once the switch-off has been counted (`prev_active` false), and its
    /// energy interval is 0 (the power model gives 0 energy from utilisation 0).
    pub(super) fn is_dormant(&self, h: HostId) -> bool {
        let host = &self.hosts[h.idx()];
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

    pub(super) fn host_entry(&mut self, h: HostId, e: HostEntry) {
        let host = &mut self.hosts[h.idx()];
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

    pub(super) fn vm_entry(&mut self, v: VmId, e: VmEntry) {
        let vm = &mut self.vms[v.idx()];
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

    pub(super) fn utilization_fraction(&self, mips: f64, h: usize) -> f64 {
        let u = mips / self.hosts[h].total_mips;
        if u > 1.0 && u < 1.01 {
            1.0
        } else {
            u
        }
    }

    /// `updateCloudetProcessingWithoutSchedulingFutureEventsForce`.
    pub(super) fn force_update(&mut self, t: f64) {
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
                self.host_update_at(HostId(h as u32), t, &at);
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

    pub(super) fn remove_completed_vms_on(&mut self, h: usize) {
        let is_done = |vm: &Vm| !vm.in_migration && vm.requested == 0.0;
        // Most hosts have nothing to remove: check before collecting.
        if !self.hosts[h]
            .vm_list
            .iter()
            .any(|&v| is_done(&self.vms[v.idx()]))
        {
            return;
        }
        let done: Vec<VmId> = self.hosts[h]
            .vm_list
            .iter()
            .copied()
            .filter(|&v| is_done(&self.vms[v.idx()]))
            .collect();
        for v in done {
            if let Some(th) = self.vms[v.idx()].table.take() {
                self.vm_destroy(th, v);
            }
            self.vms[v.idx()].removed = true;
        }
    }
}
