//! The model's state: hosts, VMs, their SLA entries and utilisation histories, pending
//! migrations, and the small arithmetic helpers every update shares. Plain data: the engine's
//! other modules change it; nothing here knows about rounds or policies.

use std::cmp::Ordering;

use crate::ids::{HostId, VmId};

/// Length of the per-VM utilisation history (CloudSim `PowerVm.HISTORY_LENGTH`).
pub const VM_HISTORY: usize = 30;

#[derive(Debug, Clone, Copy)]
pub(super) struct HostEntry {
    pub(super) t: f64,
    pub(super) alloc: f64,
    pub(super) req: f64,
    pub(super) active: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct VmEntry {
    pub(super) t: f64,
    pub(super) alloc: f64,
    pub(super) req: f64,
    pub(super) migrating: bool,
}

/// A VM's last [`VM_HISTORY`] utilisation samples, most recent first, as one slice: a window
/// sliding down a buffer twice that long, so a new sample costs one store (and, once every
/// `VM_HISTORY` samples, one copy) instead of shifting the whole history.
#[derive(Debug, Clone)]
pub(super) struct History {
    pub(super) buf: Box<[f64; 2 * VM_HISTORY]>,
    pub(super) start: usize,
    pub(super) len: usize,
}

impl History {
    pub(super) fn new() -> Self {
        Self {
            buf: Box::new([0.0; 2 * VM_HISTORY]),
            start: 2 * VM_HISTORY,
            len: 0,
        }
    }

    pub(super) fn as_slice(&self) -> &[f64] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(super) fn push_front(&mut self, u: f64) {
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
pub(super) struct Vm {
    // -- touched by every update
    pub(super) mips: f64,
    pub(super) trace: usize,
    /// Current request in MIPS (CloudSim `getCurrentRequestedTotalMips`).
    pub(super) requested: f64,
    /// Request as last stored by a host scheduler (differs from `requested` only at t = 0).
    pub(super) sched_req: f64,
    pub(super) last: Option<VmEntry>,
    pub(super) tot_req: f64,
    // -- second line
    pub(super) tot_alloc: f64,
    pub(super) under_mig: f64,
    pub(super) hist_prev_time: f64,
    pub(super) instantiating: bool,
    pub(super) in_migration: bool,
    pub(super) removed: bool,
    pub(super) ram_mb: u32,
    /// `vm.getHost()`: changed by every create/destroy, including hypothetical ones.
    pub(super) host: Option<HostId>,
    /// The allocation table's host (`getVmTable()`).
    pub(super) table: Option<HostId>,
    /// Utilisation fractions, most recent first.
    pub(super) hist: History,
    // -- rarely read
    pub(super) bw: u64,
    pub(super) size_mb: u64,
}

/// Field order is fixed (`repr(C)`): what a placement check reads comes first (one or two
/// cache lines per candidate host), then what an update writes.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub(super) struct Host {
    // -- read by placement checks
    pub(super) total_mips: f64,
    pub(super) pe_mips: f64,
    // Cached aggregates over `vm_list`, refreshed on every change.
    pub(super) available_mips: f64,
    /// MIPS allocated by the scheduler to the VMs in the list right now, a migrating-in VM
    /// counted at its full potential (CloudSim policy `getUtilizationOfCpuMips(host)`).
    pub(super) alloc_sum: f64,
    /// Power at the utilisation of the last update (CloudSim `host.getPower()`).
    pub(super) power_now: f64,
    pub(super) req_sum: f64,
    pub(super) ram_mb: i64,
    pub(super) ram_used: i64,
    pub(super) bw: i64,
    pub(super) bw_used: i64,
    pub(super) storage_mb: i64,
    pub(super) storage_used: i64,
    pub(super) util_mips: f64,
    pub(super) ty: usize,
    pub(super) max_ram: u32,
    /// Whether the scheduler had to scale requests down at the last refresh (some request
    /// found less than it asked for free).
    pub(super) oversubscribed: bool,
    // -- updates and bookkeeping
    /// Migrations whose CPU overhead is in `overhead_mips`; at 0 the sum is reset to exactly 0
    /// so rounding residue cannot keep an empty host "on".
    pub(super) overhead_count: u32,
    pub(super) vm_list: Vec<VmId>,
    pub(super) migrating_in: Vec<VmId>,
    /// Per-VM RAM/BW reservations that are non-zero (only made at t = 0).
    pub(super) reservations: Vec<(VmId, i64, i64)>,
    pub(super) energy_util: f64,
    pub(super) prev_energy_util: f64,
    pub(super) overhead_mips: f64,
    // SLA accounting
    pub(super) last: Option<HostEntry>,
    pub(super) active_time: f64,
    pub(super) violation_time: f64,
    pub(super) shutdowns: u64,
    pub(super) prev_active: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct MigrationEvent {
    pub(super) t: f64,
    pub(super) seq: u64,
    pub(super) vm: VmId,
    pub(super) target: HostId,
    pub(super) source: Option<HostId>,
    pub(super) source_overhead: f64,
    pub(super) target_overhead: f64,
    /// Whether this migration's CPU overhead was added (not for a repeated migration of a VM
    /// that is already migrating into the same target).
    pub(super) counted: bool,
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

/// What the scheduler allocates a VM on a host that is not over-subscribed: its request
/// capped at the PE size, 90 % of it while migrating out, 10 % while migrating in.
pub(super) fn unscaled_allocation(capped: f64, out: bool, inn: bool) -> f64 {
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
pub(super) fn add_to_alloc_sum(mut sum: f64, a: f64, inn: bool) -> f64 {
    if inn {
        sum += a * 0.9 / 0.1;
    }
    sum + a
}

/// Adds a VM's utilisation history (fractions of its MIPS), as fractions of the host's
/// capacity, to a host history, sample by sample.
pub(super) fn add_history(
    host_hist: &mut [f64; VM_HISTORY],
    vm_hist: &[f64],
    vm_mips: f64,
    host_mips: f64,
) {
    for (h, u) in host_hist.iter_mut().zip(vm_hist) {
        *h += u * vm_mips / host_mips;
    }
}

pub(super) fn release_overhead(host: &mut Host, mips: f64) {
    host.overhead_count = host.overhead_count.saturating_sub(1);
    host.overhead_mips = if host.overhead_count == 0 {
        0.0
    } else {
        (host.overhead_mips - mips).max(0.0)
    };
}

pub(super) fn finalize_host_entry(host: &mut Host, e: HostEntry) {
    if host.prev_active && !e.active {
        host.shutdowns += 1;
    }
    host.prev_active = e.active;
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
