//! The VMM's errors: [`VmmError`] names the phase that failed and keeps its source; the
//! typed reasons below it say what was wrong (at most two levels deep).

use std::num::ParseIntError;

use crate::config::VmRunState;
use crate::workload::WorkloadSpec;

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
    /// Building an MSR list for KVM_GET_MSRS/KVM_SET_MSRS failed.
    #[error("cannot build the MSR list for {op}")]
    MsrList {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        op: &'static str,
        /// Why the list could not be built (too many entries).
        #[source]
        source: vmm_sys_util::fam::Error,
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
    InvalidConfig(#[source] ConfigError),
    /// A workload spec or size string is malformed.
    #[error(transparent)]
    InvalidSpec(SpecError),
    /// The operation is not allowed in the VM's current state.
    #[error(transparent)]
    InvalidState(StateError),
    /// A vCPU stopped on an unexpected exit or error; the VM is failed.
    #[error("VM failed: {0}")]
    VcpuFailed(#[source] VcpuFailure),
    /// A vCPU thread ended without saying why (it panicked).
    #[error("a vCPU thread ended unexpectedly")]
    VcpuThreadLost,
    /// `set_workload_rate` on a workload without a paced rate, or a rate of 0.
    #[error("a write rate applies to the paced `dirty` and `verify` workloads, with a rate above 0 (this VM runs `{0}`)")]
    NotPaced(WorkloadSpec),
    /// `verify_memory` on a workload that does not stamp pages.
    #[error("verify-memory needs the `verify` workload (this VM runs `{0}`)")]
    NotVerifiable(WorkloadSpec),
    /// Encoding a state failed.
    #[error("cannot encode VM state")]
    StateEncode(#[source] EncodeError),
    /// Decoding a state failed (bad magic, version, checksum, size or payload).
    #[error("cannot decode VM state: {0}")]
    StateDecode(#[source] DecodeError),
    /// Spawning a thread failed.
    #[error("cannot spawn {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A helper thread (pre-faulting guest memory) panicked.
    #[error("a {what} thread panicked")]
    ThreadPanicked {
        /// Which thread.
        what: &'static str,
    },
    /// Installing the vCPU kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
}

impl VmmError {
    pub(crate) fn kvm(op: &'static str, source: kvm_ioctls::Error) -> Self {
        VmmError::Kvm { op, source }
    }

    /// A `map_err` adapter for a failed memory syscall.
    pub(crate) fn memory(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Self {
        move |e| VmmError::Memory {
            op,
            source: e.into(),
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

/// Why a [`crate::VmConfig`] (or an adopted memory fd) cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The vCPU count is outside 1..=MAX_VCPUS.
    #[error("vcpus must be 1..={max}, got {got}")]
    VcpuCount {
        /// The count asked for.
        got: u8,
        /// [`crate::MAX_VCPUS`].
        max: u8,
    },
    /// Memory size is not a multiple of the page size.
    #[error("memory size {0} is not a multiple of 4K")]
    MemNotPageMultiple(u64),
    /// Memory size is over [`crate::MAX_MEM_SIZE`].
    #[error("memory size {size} is over the {max} limit")]
    MemTooLarge {
        /// Asked for, formatted (`4G`).
        size: String,
        /// The limit, formatted.
        max: String,
    },
    /// Memory is too small for the workload's working set.
    #[error("memory size {size} is too small for workload `{workload}` (needs at least {min})")]
    MemTooSmall {
        /// Asked for, formatted.
        size: String,
        /// The workload spec.
        workload: String,
        /// The minimum, formatted.
        min: String,
    },
    /// Fewer working-set pages than the vCPUs need (one each, two for hotcold).
    #[error("working set of {pages} pages is too small for {vcpus} vCPUs")]
    WorkingSetTooSmall {
        /// Working-set pages.
        pages: u64,
        /// vCPUs.
        vcpus: u64,
    },
    /// An adopted memory fd is smaller than the guest memory.
    #[error("memory fd holds {fd_size} bytes, the VM needs {mem_size}")]
    MemoryFdTooSmall {
        /// Bytes in the fd.
        fd_size: u64,
        /// Guest memory size.
        mem_size: u64,
    },
}

/// Why a workload spec (`dirty:rate=1000,...`) or a size (`64M`) does not parse. Each
/// variant carries the whole input text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The name before `:` is not a workload.
    #[error("workload `{spec}`: unknown workload `{name}` (expected idle, dirty, verify or fill)")]
    UnknownWorkload {
        /// The input.
        spec: String,
        /// The name found.
        name: String,
    },
    /// A parameter without `=`.
    #[error("workload `{spec}`: `{pair}` is not key=value")]
    NotKeyValue {
        /// The input.
        spec: String,
        /// The parameter.
        pair: String,
    },
    /// A key this workload does not take.
    #[error("workload `{spec}`: unknown key `{key}` for {workload}")]
    UnknownKey {
        /// The input.
        spec: String,
        /// The key.
        key: String,
        /// The workload name.
        workload: String,
    },
    /// `rate` or `seed` is not a whole number.
    #[error("workload `{spec}`: {key} `{value}` is not a whole number")]
    NotANumber {
        /// The input.
        spec: String,
        /// `rate` or `seed`.
        key: &'static str,
        /// The value.
        value: String,
        /// The parse error.
        #[source]
        source: ParseIntError,
    },
    /// `hot` or `hotw` is not in 0..=1.
    #[error("workload `{spec}`: {key} `{value}` is not a fraction between 0 and 1")]
    NotAFraction {
        /// The input.
        spec: String,
        /// `hot` or `hotw`.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// `pattern` is not `seq`, `random` or `hotcold`.
    #[error("workload `{spec}`: unknown pattern `{value}`")]
    UnknownPattern {
        /// The input.
        spec: String,
        /// The value.
        value: String,
    },
    /// `wss` is zero or not a multiple of 4K.
    #[error("workload `{spec}`: wss must be a non-zero multiple of 4K")]
    WssNotPages {
        /// The input.
        spec: String,
    },
    /// `hot` is 0 or 1.
    #[error("workload `{spec}`: hot must be strictly between 0 and 1")]
    HotOutOfRange {
        /// The input.
        spec: String,
    },
    /// A size that is not a number with an optional K/M/G suffix, or overflows.
    #[error("size `{0}`: expected e.g. 4096, 512K, 64M or 1G")]
    Size(String),
}

/// An operation asked of a VM in a state that does not allow it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    /// `op` needs started vCPUs (pause, resume).
    #[error("{op}: the VM is not started (it is {state})")]
    NotStarted {
        /// The operation.
        op: &'static str,
        /// The VM's state.
        state: &'static str,
    },
    /// `op` needs every vCPU parked (save, verify).
    #[error("{op} needs a paused VM")]
    NotPaused {
        /// The operation.
        op: &'static str,
    },
    /// `start` on an incoming VM before `restore_state`.
    #[error("an incoming VM needs restore_state before start")]
    NotRestored,
    /// `start` twice.
    #[error("VM already started")]
    AlreadyStarted,
    /// `start` after `shutdown`.
    #[error("VM was shut down")]
    ShutDown,
    /// `restore_state` after `start`.
    #[error("restore_state needs a VM that has not started")]
    RestoreAfterStart,
    /// The saved state does not fit this VM.
    #[error(
        "state is for {state_mem} bytes, {state_vcpus} vCPUs, workload `{state_workload}`; \
         this VM has {vm_mem} bytes, {vm_vcpus} vCPUs, `{vm_workload}`"
    )]
    Mismatch {
        /// The state's memory size.
        state_mem: u64,
        /// The state's vCPU count.
        state_vcpus: usize,
        /// The state's workload.
        state_workload: String,
        /// This VM's memory size.
        vm_mem: u64,
        /// This VM's vCPU count.
        vm_vcpus: usize,
        /// This VM's workload.
        vm_workload: String,
    },
}

impl StateError {
    pub(crate) fn not_started(op: &'static str, state: &VmRunState) -> Self {
        StateError::NotStarted {
            op,
            state: state.name(),
        }
    }
}

/// Why a vCPU stopped the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {vcpu}: {cause} at rip {rip:#x}")]
pub struct VcpuFailure {
    /// The vCPU index.
    pub vcpu: usize,
    /// Its instruction pointer when it stopped (`u64::MAX` if unreadable).
    pub rip: u64,
    /// What happened.
    #[source]
    pub cause: VcpuFailCause,
}

/// What made a vCPU fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuFailCause {
    /// `KVM_RUN` returned an error other than EINTR/EAGAIN.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// Completing a pending port read before a pause failed.
    #[error("completing port I/O failed")]
    CompleteIo(#[source] kvm_ioctls::Error),
    /// An exit the built-in guest never makes (shown as KVM reported it).
    #[error("unexpected exit {0}")]
    UnexpectedExit(String),
}

/// Why a state could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serialiser failed.
    #[error("serialising the payload failed")]
    Payload(#[source] postcard::Error),
    /// The payload is over [`crate::STATE_MAX_BYTES`].
    #[error("state is {len} bytes, over the {max}-byte cap")]
    TooLarge {
        /// Payload bytes.
        len: u64,
        /// The cap.
        max: u64,
    },
}

/// Why a state frame was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header.
    #[error("{0} bytes is shorter than the header")]
    Short(usize),
    /// Not a fastmig state.
    #[error("bad magic: not a fastmig VM state")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported state version {found} (this build reads {supported})")]
    BadVersion {
        /// The frame's version.
        found: u32,
        /// [`crate::STATE_VERSION`].
        supported: u32,
    },
    /// The header's payload length is over the cap.
    #[error("payload of {len} bytes is over the {max}-byte cap")]
    TooLarge {
        /// The header's length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The frame's payload length differs from its header.
    #[error("payload is {actual} bytes, header says {header}")]
    Length {
        /// Bytes after the header.
        actual: u64,
        /// The header's length.
        header: u64,
    },
    /// The payload's CRC-32 differs from the header's.
    #[error("checksum mismatch")]
    Checksum,
    /// Bytes left over after the payload deserialised.
    #[error("{0} bytes after the state")]
    Trailing(usize),
    /// A field has the wrong size (the XSAVE area).
    #[error("{what}: {len} entries, expected {expected}")]
    Field {
        /// The field.
        what: &'static str,
        /// Entries found.
        len: usize,
        /// Entries expected.
        expected: usize,
    },
    /// The payload passed the checksum but does not deserialise.
    #[error("payload does not deserialise")]
    Payload(#[source] postcard::Error),
}
