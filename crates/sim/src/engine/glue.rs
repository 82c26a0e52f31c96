//! Policy glue: the read-only views the policy traits take (`HostView`, `VmView`,
//! `PlacementContext`) built from the engine's state, and the calls into the detector, the
//! selector and PABFD (the full scan, or the bucketed index).

use super::model::{add_history, VM_HISTORY};
use super::Simulation;
use crate::cost::MigrationCostQuery;
use crate::ids::{HostId, VmId};
use crate::policy::{HostView, Pabfd, PlacementContext, PlacementVm, VmPlacement, VmView};

impl<'a> Simulation<'a> {
    pub(super) fn host_view<'h>(
        &self,
        h: HostId,
        extra: Option<VmId>,
        buf: &'h mut [f64; VM_HISTORY],
    ) -> HostView<'h> {
        let host = &self.hosts[h.idx()];
        *buf = self.host_hist[h.idx()];
        let mut req = host.req_sum;
        let mut max_ram = host.max_ram;
        if let Some(v) = extra {
            let vm = &self.vms[v.idx()];
            req += vm.requested;
            add_history(buf, vm.hist.as_slice(), vm.mips, host.total_mips);
            max_ram = max_ram.max(vm.ram_mb);
        }
        let len = buf.iter().rposition(|&x| x != 0.0).map_or(0, |i| i + 1);
        let mig = self
            .cost
            .cost(
                &MigrationCostQuery {
                    ram_mb: max_ram,
                    target_bw: host.bw as u64,
                    // The look-ahead is CloudSim's longest migration off the host: the largest
                    // RAM, at full activity (the prune bound assumes the same).
                    cpu_utilization: 1.0,
                    mem_utilization: None,
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

    pub(super) fn is_overloaded(&self, h: HostId, extra: Option<VmId>) -> bool {
        let Some(d) = self.detector.as_deref() else {
            return false;
        };
        let mut buf = [0.0; VM_HISTORY];
        let view = self.host_view(h, extra, &mut buf);
        d.is_overloaded(&view)
    }

    pub(super) fn select_vm(&mut self, h: HostId) -> Option<VmId> {
        let candidates: Vec<VmId> = self.hosts[h.idx()]
            .vm_list
            .iter()
            .copied()
            .filter(|&v| !self.vms[v.idx()].in_migration)
            .collect();
        let views: Vec<VmView<'_>> = candidates
            .iter()
            .map(|&v| {
                let vm = &self.vms[v.idx()];
                VmView {
                    id: v,
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
    pub(super) fn place(&self, v: VmId, excluded: &[bool], off_excluded: bool) -> Option<HostId> {
        let pv = PlacementVm {
            id: v,
            requested_mips: self.vms[v.idx()].requested,
        };
        let ctx = Ctx {
            sim: self,
            excluded,
        };
        let Some(index) = &self.index else {
            return Pabfd.find_host(&pv, &ctx);
        };
        let vm = &self.vms[v.idx()];
        let tau = |ty: usize| match &self.prune {
            Some(p) => {
                let total = self.spec.host_types[ty].total_mips();
                p.vm_threshold(ty, total, vm.mips, pv.requested_mips, vm.hist.as_slice())
            }
            None => f64::INFINITY,
        };
        index.search(
            &self.type_tables,
            &pv,
            &ctx,
            tau,
            off_excluded,
            self.opts.pabfd_budget,
        )
    }
}

/// The placement policies' read-only view of the simulation.
pub(super) struct Ctx<'s, 'a> {
    pub(super) sim: &'s Simulation<'a>,
    pub(super) excluded: &'s [bool],
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
        self.sim.is_overloaded(host, Some(vm.id))
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
