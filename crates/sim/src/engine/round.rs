//! One scheduling round (CloudSim `optimizeAllocation`): detect over-utilised hosts, select
//! and place their VMs, evacuate under-utilised hosts, then undo the hypothetical moves so the
//! chosen migrations can start from the hosts' real state.

use super::Simulation;
use crate::ids::{HostId, VmId};

impl Simulation<'_> {
    pub(super) fn sort_by_utilization_desc(&self, vms: &mut [VmId]) {
        // Stable, like Java's Collections.sort.
        vms.sort_by(|&a, &b| {
            self.vms[b.idx()]
                .requested
                .total_cmp(&self.vms[a.idx()].requested)
        });
    }

    /// CloudSim `PowerVmAllocationPolicyMigrationAbstract.optimizeAllocation`.
    pub(super) fn optimize_allocation(&mut self, _t: f64) -> Vec<(VmId, HostId)> {
        let n = self.hosts.len();
        self.in_round = true;
        for h in 0..n {
            self.refresh(HostId(h as u32));
        }
        self.build_index();
        let over: Vec<HostId> = (0..n as u32)
            .map(HostId)
            .filter(|&h| self.is_overloaded(h, None))
            .collect();
        // One vector for all hosts (a vector per host was a visible cost at 50,000 hosts).
        let mut saved: Vec<(HostId, VmId)> = Vec::with_capacity(self.vms.len());
        for (h, host) in self.hosts.iter().enumerate() {
            for &v in &host.vm_list {
                if !host.migrating_in.contains(&v) {
                    saved.push((HostId(h as u32), v));
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
            over_set[h.idx()] = true;
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
                self.disable_in_index(HostId(h as u32));
            }
        }
        let mut order: Vec<HostId> = (0..n as u32)
            .map(HostId)
            .filter(|&h| {
                let u = self.utilization_fraction(self.hosts[h.idx()].util_mips, h.idx());
                u > 0.0 && u < 1.0
            })
            .collect();
        order.sort_by(|&a, &b| {
            let ua = self.utilization_fraction(self.hosts[a.idx()].util_mips, a.idx());
            let ub = self.utilization_fraction(self.hosts[b.idx()].util_mips, b.idx());
            ua.total_cmp(&ub).then(a.cmp(&b))
        });
        let mut start = 0;
        loop {
            if excluded_count == n {
                break;
            }
            while start < order.len() && excl_under[order[start].idx()] {
                start += 1;
            }
            let Some(&under) = order[start..]
                .iter()
                .find(|&&h| !excl_under[h.idx()] && !self.all_migrating_out_or_any_in(h))
            else {
                break;
            };
            excl_under[under.idx()] = true;
            excluded_count += 1;
            excl_place[under.idx()] = true;
            self.disable_in_index(under);
            let mut vms: Vec<VmId> = self.hosts[under.idx()]
                .vm_list
                .iter()
                .copied()
                .filter(|&v| !self.vms[v.idx()].in_migration)
                .collect();
            if vms.is_empty() {
                continue;
            }
            self.sort_by_utilization_desc(&mut vms);
            let mut placed: Vec<(VmId, HostId)> = Vec::new();
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
                if !excl_under[h.idx()] {
                    excl_under[h.idx()] = true;
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

    pub(super) fn disable_in_index(&mut self, h: HostId) {
        if let Some(index) = self.index.as_mut() {
            index.disable(h);
        }
    }

    pub(super) fn all_migrating_out_or_any_in(&self, h: HostId) -> bool {
        let host = &self.hosts[h.idx()];
        for &v in &host.vm_list {
            if !self.vms[v.idx()].in_migration {
                return false;
            }
            if host.migrating_in.contains(&v) {
                return true;
            }
        }
        true
    }

    pub(super) fn restore_allocation(&mut self, saved: &[(HostId, VmId)]) {
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
                self.vms[v.idx()].host = None;
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
                let size = self.vms[v.idx()].size_mb as i64;
                let host = &mut self.hosts[h];
                host.vm_list.push(v);
                host.storage_used += size;
            }
        }
        for &(h, v) in saved {
            if !rebuild[h.idx()] {
                continue;
            }
            if self.vm_create(h, v) {
                self.vms[v.idx()].table = Some(h);
            } else {
                tracing::warn!(host = h.0, vm = v.0, "could not restore VM allocation");
            }
        }
        self.round_modified.iter_mut().for_each(|m| *m = false);
        for h in 0..self.hosts.len() {
            self.refresh(HostId(h as u32));
        }
    }
}
