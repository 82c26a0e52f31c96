//! fastmig-vmm: a small KVM micro-VM for live-migration experiments.
//!
//! Owns: guest memory (a shared memfd), vCPU creation and run loops, the built-in workload
//! guests (`idle`, `dirty`, `verify`, `fill`), pause/resume, the shared dirty log, and complete
//! vCPU + workload state capture/restore in a versioned, checksummed encoding.
//!
//! Does not own: moving memory or state between hosts (that is `fastmig-migration`), the
//! control socket or the command line (the `fastmig` binary), devices, interrupts or firmware
//! (guests start directly in 64-bit mode; there is no in-kernel irqchip, so `hlt` exits to us).
//!
//! ```text
//!  caller ──Vm::pause/resume/shutdown──> VcpuEvent per vCPU channel ──> vCPU thread
//!        <──── waits for every VcpuResponse (Paused/Resumed/Finished, or Failed) ────┘
//!  vCPU thread (vcpu.rs): KVM_RUN ─exit─> mailbox `in` (pacing.rs) | hlt (heartbeat)
//!                                         | anything else -> Failed
//!  monitor thread: every 1 s, DirtyLogHandle::fetch -> dirty_rate_pps
//! ```
//!
//! Modules: `config` (VmConfig, status types), `vm` (the `Vm` and its lifecycle), `vcpu`
//! (the thread state machine), `boot` (CPUID, long mode), `msrs`, `state` (saved state and
//! its encoding, `VcpuState::capture`/`apply`), `pacing`, `verify` (the stamp replay),
//! `guest` (layout and program), `memory`, `dirty`, `workload`.

mod boot;
mod config;
mod dirty;
pub mod guest;
mod memory;
mod msrs;
mod pacing;
mod state;
mod vcpu;
mod verify;
mod vm;
mod workload;

pub use config::{VmConfig, VmRunState, VmStatus, MAX_MEM_SIZE, MAX_VCPUS};
pub use dirty::{DirtyBitmap, DirtyLogHandle};
pub use memory::GuestRegion;
pub use state::{
    VcpuState, VmState, WorkloadVcpuState, STATE_MAGIC, STATE_MAX_BYTES, STATE_VERSION,
};
pub use verify::VerifyReport;
pub use vm::Vm;
pub use workload::{format_size, parse_size, Pattern, WorkloadKind, WorkloadSpec};

/// Guest page size used by the dirty log and the workloads.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of the VMM. Variants name the phase that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("cannot use /dev/kvm (is KVM available and accessible?)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating or mapping guest memory failed.
    #[error("guest memory: {op} failed")]
    Memory {
        /// The operation, e.g. `mmap`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An access outside guest memory.
    #[error("guest access of {len} bytes at {gpa:#x} is outside guest memory")]
    OutOfRange {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The VM configuration cannot work (size, vCPU count, working set).
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// A workload spec or size string is malformed.
    #[error("{0}")]
    InvalidSpec(String),
    /// The operation is not allowed in the VM's current state.
    #[error("{0}")]
    InvalidState(String),
    /// A vCPU stopped on an unexpected exit or error.
    #[error("VM failed: {0}")]
    VcpuFailed(String),
    /// `verify_memory` on a workload that does not stamp pages.
    #[error("verify-memory needs the `verify` workload (this VM runs `{0}`)")]
    NotVerifiable(String),
    /// Encoding a state failed.
    #[error("cannot encode VM state: {0}")]
    StateEncode(String),
    /// Decoding a state failed (bad magic, version, checksum, size or payload).
    #[error("cannot decode VM state: {0}")]
    StateDecode(String),
    /// Spawning a thread failed.
    #[error("cannot spawn {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Installing the vCPU kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// An internal invariant broke (a helper thread panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl VmmError {
    pub(crate) fn kvm(op: &'static str, source: kvm_ioctls::Error) -> Self {
        VmmError::Kvm { op, source }
    }

    pub(crate) fn memory(op: &'static str) -> Self {
        VmmError::Memory {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// True when the error is the caller's input (spec, size, missing KVM) rather than a
    /// runtime failure; the CLI maps these to exit code 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            VmmError::KvmUnavailable(_) | VmmError::InvalidConfig(_) | VmmError::InvalidSpec(_)
        )
    }
}
