//! What a VM is built with ([`VmConfig`] and its checks) and what it reports ([`VmRunState`],
//! [`VmStatus`]). No KVM here.

use serde::{Deserialize, Serialize};

use crate::workload::{WorkloadKind, WorkloadSpec};
use crate::{VmmError, PAGE_SIZE};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 16;
/// Largest guest memory: one slot at GPA 0, below the 3 GiB mark where the TSS and identity
/// map pages sit.
pub const MAX_MEM_SIZE: u64 = 3 << 30;

/// What to build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest memory in bytes: a multiple of 4 KiB, at least `workload.min_mem_size()`, at most
    /// [`MAX_MEM_SIZE`].
    pub mem_size: u64,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// The built-in guest program and its parameters.
    pub workload: WorkloadSpec,
}

impl VmConfig {
    /// Checks sizes and counts; every failure is a clear [`VmmError::InvalidConfig`].
    pub fn validate(&self) -> Result<(), VmmError> {
        let bad = |m: String| Err(VmmError::InvalidConfig(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_VCPUS}, got {}", self.vcpus));
        }
        if !self.mem_size.is_multiple_of(PAGE_SIZE) {
            return bad(format!(
                "memory size {} is not a multiple of 4K",
                self.mem_size
            ));
        }
        if self.mem_size > MAX_MEM_SIZE {
            return bad(format!(
                "memory size {} is over the {} limit",
                crate::format_size(self.mem_size),
                crate::format_size(MAX_MEM_SIZE)
            ));
        }
        let min = self.workload.min_mem_size();
        if self.mem_size < min {
            return bad(format!(
                "memory size {} is too small for workload `{}` (needs at least {})",
                crate::format_size(self.mem_size),
                self.workload,
                crate::format_size(min)
            ));
        }
        let n = u64::from(self.vcpus);
        let wss_pages = self.workload.wss / PAGE_SIZE;
        if matches!(
            self.workload.kind,
            WorkloadKind::Dirty | WorkloadKind::Verify
        ) {
            let per_vcpu = if self.workload.pattern == crate::Pattern::HotCold {
                2
            } else {
                1
            };
            if wss_pages < per_vcpu * n {
                return bad(format!(
                    "working set of {wss_pages} pages is too small for {n} vCPUs"
                ));
            }
        }
        Ok(())
    }
}

/// Run state of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmRunState {
    /// Built and loaded by [`Vm::new`], not started.
    Created,
    /// A destination or adopted VM waiting for state and `start`.
    Incoming,
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// Shut down.
    Stopped,
    /// A vCPU hit an unexpected exit; the message says which.
    Failed(String),
}

impl VmRunState {
    /// Short lower-case name (`running`, `paused`, ...), as the control API reports it.
    pub fn name(&self) -> &'static str {
        match self {
            VmRunState::Created => "created",
            VmRunState::Incoming => "incoming",
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::Stopped => "stopped",
            VmRunState::Failed(_) => "failed",
        }
    }
}

/// A snapshot of the VM's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Run state.
    pub state: VmRunState,
    /// Monotonic progress counter: pages written plus heartbeats, over all vCPUs.
    pub progress: u64,
    /// Pages the guest has confirmed written.
    pub pages_written: u64,
    /// Heartbeats counted while halted.
    pub heartbeats: u64,
    /// Distinct pages dirtied per second, measured over the last second from KVM's dirty log.
    pub dirty_rate_pps: f64,
}
