//! What a VM is built with ([`VmConfig`] and its checks) and what it reports ([`VmRunState`],
//! [`VmStatus`]). No KVM here.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::workload::{format_size, Pattern, WorkloadKind, WorkloadSpec};
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
        self.check().map_err(VmmError::InvalidConfig)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount {
                got: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !self.mem_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(ConfigError::MemNotPageMultiple(self.mem_size));
        }
        if self.mem_size > MAX_MEM_SIZE {
            return Err(ConfigError::MemTooLarge {
                size: format_size(self.mem_size),
                max: format_size(MAX_MEM_SIZE),
            });
        }
        let min = self.workload.min_mem_size();
        if self.mem_size < min {
            return Err(ConfigError::MemTooSmall {
                size: format_size(self.mem_size),
                workload: self.workload.to_string(),
                min: format_size(min),
            });
        }
        let n = u64::from(self.vcpus);
        let wss_pages = self.workload.wss / PAGE_SIZE as u64;
        if matches!(
            self.workload.kind,
            WorkloadKind::Dirty | WorkloadKind::Verify
        ) {
            let per_vcpu = if self.workload.pattern == Pattern::HotCold {
                2
            } else {
                1
            };
            if wss_pages < per_vcpu * n {
                return Err(ConfigError::WorkingSetTooSmall {
                    pages: wss_pages,
                    vcpus: n,
                });
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
    /// Working set: distinct pages dirtied over the last 10 s of running, from the same log.
    pub working_set_pages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mem_size: u64, vcpus: u8, spec: &str) -> VmConfig {
        VmConfig {
            mem_size,
            vcpus,
            workload: spec.parse().expect("spec"),
        }
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let err = |c: VmConfig| match c.validate() {
            Err(VmmError::InvalidConfig(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            err(cfg(16 << 20, 0, "idle")),
            ConfigError::VcpuCount { got: 0, max: 16 }
        );
        assert_eq!(
            err(cfg(16 << 20, 17, "idle")),
            ConfigError::VcpuCount { got: 17, max: 16 }
        );
        assert!(cfg(16 << 20, 16, "idle").validate().is_ok());
        assert_eq!(
            err(cfg((16 << 20) + 1, 1, "idle")),
            ConfigError::MemNotPageMultiple((16 << 20) + 1)
        );
        assert!(matches!(
            err(cfg(MAX_MEM_SIZE + PAGE_SIZE as u64, 1, "idle")),
            ConfigError::MemTooLarge { .. }
        ));
        assert!(cfg(MAX_MEM_SIZE, 1, "idle").validate().is_ok());
        // dirty's default working set is 16M; the 64K below DATA_BASE come on top.
        let e = err(cfg(16 << 20, 1, "dirty"));
        assert!(matches!(e, ConfigError::MemTooSmall { .. }), "{e}");
        assert!(e.to_string().contains("needs at least 16448K"), "{e}");
        assert!(cfg((16 << 20) + (64 << 10), 1, "dirty").validate().is_ok());
        // One page per vCPU; two for hotcold.
        assert_eq!(
            err(cfg(16 << 20, 3, "verify:wss=8K")),
            ConfigError::WorkingSetTooSmall { pages: 2, vcpus: 3 }
        );
        assert!(cfg(16 << 20, 2, "verify:wss=8K").validate().is_ok());
        assert_eq!(
            err(cfg(16 << 20, 2, "verify:wss=12K,pattern=hotcold")),
            ConfigError::WorkingSetTooSmall { pages: 3, vcpus: 2 }
        );
        assert!(cfg(16 << 20, 2, "verify:wss=16K,pattern=hotcold")
            .validate()
            .is_ok());
        // fill and idle have no working set to split.
        assert!(cfg(1 << 20, 16, "fill").validate().is_ok());
    }
}
