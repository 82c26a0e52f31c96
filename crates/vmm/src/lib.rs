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
//!        <──── waits for every VcpuResponse (Paused/Finished, or Failed; not Resumed) ┘
//!  vCPU thread (vcpu.rs): KVM_RUN ─exit─> mailbox `in` (pacing.rs) | hlt (heartbeat)
//!                                         | anything else -> Failed
//!  monitor thread: every 1 s, DirtyLogHandle::fetch -> dirty_rate_pps; ORed over 5 s -> working_set_pages
//! ```
//!
//! Modules: `config` (VmConfig, status types), `vm` (the `Vm` and its lifecycle), `vcpu`
//! (the thread state machine), `boot` (CPUID, long mode), `msrs`, `state` (saved state and
//! its encoding, `VcpuState::capture`/`apply`), `pacing`, `verify` (the stamp replay),
//! `guest` (layout and program), `memory`, `dirty`, `workload`.

mod boot;
mod config;
mod dirty;
mod error;
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
pub use dirty::{DirtyLogHandle, KvmDirtyLog};
pub use error::{
    ConfigError, DecodeError, EncodeError, SpecError, StateError, VcpuFailCause, VcpuFailure,
    VmmError,
};
pub use memory::GuestRegion;
pub use state::{
    VcpuState, VmState, WorkloadVcpuState, STATE_MAGIC, STATE_MAX_BYTES, STATE_VERSION,
};
pub use verify::VerifyReport;
pub use vm::{Vm, WSS_WINDOW};
pub use workload::{format_size, parse_size, Pattern, WorkloadKind, WorkloadSpec};

/// Guest page size used by the dirty log and the workloads.
pub const PAGE_SIZE: usize = 4096;
