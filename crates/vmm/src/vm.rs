//! The VM: KVM setup, vCPU threads (an explicit run/park state machine with acknowledged
//! pauses), the workload's VMM side, state save/restore and the verify check.

use std::os::fd::OwnedFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyLog, DirtyLogHandle};
use crate::guest::{self, Slice};
use crate::memory::{GuestMemory, GuestRegion};
use crate::state::{pod_from_bytes, pod_to_bytes, VcpuState, VmState, WorkloadVcpuState};
use crate::workload::{WorkloadKind, WorkloadSpec};
use crate::{VmmError, PAGE_SIZE};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 16;
/// Largest guest memory: one slot at GPA 0, below the 3 GiB mark where the TSS and identity
/// map pages sit.
pub const MAX_MEM_SIZE: u64 = 3 << 30;
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const HEARTBEAT: Duration = Duration::from_millis(10);
/// Batches are sized to about this much guest time at the target rate.
const BATCH_PERIOD_S: f64 = 0.01;
const MAX_BATCH: u64 = 256;
/// MSRs KVM_GET_MSRS accepts per call (KVM_MAX_MSR_ENTRIES in kvm-bindings).
const MSR_CHUNK: usize = 200;

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

/// Result of [`Vm::verify_memory`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Working-set pages whose stamp was checked.
    pub pages_checked: u64,
    /// Writes (sequence numbers, over all vCPUs) the guest had made when checked.
    pub writes_replayed: u64,
    /// Pages whose stamp was not the expected one.
    pub errors: u64,
    /// Up to 8 descriptions of bad pages.
    pub first_errors: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Quit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Incoming,
    Started,
    Stopped,
}

struct Control {
    phase: Phase,
    desired: Desired,
    /// vCPU threads inside their run loop (holding their vCPU fd).
    running: usize,
    failure: Option<String>,
    threads: Vec<libc::pthread_t>,
    /// Incoming VMs need `restore_state` before `start`.
    restored: bool,
}

struct VcpuSlot {
    fd: Mutex<VcpuFd>,
    workload: Mutex<WorkloadVcpuState>,
    /// Pacing anchor `(time, pages issued then)`; cleared on every park so a resumed VM does
    /// not burst to catch up on the paused time.
    pacer: Mutex<Option<(Instant, u64)>>,
}

/// The workload a VM runs and how its working set is split between vCPUs.
struct WorkloadLayout {
    spec: WorkloadSpec,
    slices: Vec<Slice>,
}

struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
    vcpus: Vec<VcpuSlot>,
    /// Written only by `restore_state` before any vCPU thread exists; read per batch.
    workload: RwLock<WorkloadLayout>,
    dirty_rate_bits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn desired(&self) -> Desired {
        let ctl = lock(&self.ctl);
        if ctl.failure.is_some() {
            Desired::Quit
        } else {
            ctl.desired
        }
    }

    /// Waits until `deadline` while the VM should keep running. Returns false when a pause,
    /// quit or failure interrupted the wait.
    fn wait_running_until(&self, deadline: Instant) -> bool {
        let mut ctl = lock(&self.ctl);
        loop {
            if ctl.desired != Desired::Run || ctl.failure.is_some() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            ctl = self
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn kick_all(ctl: &Control) {
        for &t in &ctl.threads {
            // SAFETY: `t` is the pthread id of a vCPU thread we spawned and have not joined
            // (ids are removed before joining); the signal has a no-op handler installed by
            // `install_kick_handler`, so delivery only interrupts KVM_RUN with EINTR.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid starting value; we set a handler that does
        // nothing (async-signal-safe) and no SA_RESTART, so a blocked KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// A KVM virtual machine running one of the built-in workloads. `Send + Sync`: every method
/// takes `&self`.
pub struct Vm {
    // Fields drop in this order: threads and vCPU fds first, then the VM fd, and the guest
    // memory mapping last, so KVM never holds a memslot over an unmapped range.
    /// Behind a lock because an incoming VM adopts the workload of the state it restores.
    cfg: RwLock<VmConfig>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    dirty: Arc<DirtyLog>,
    vm_fd: Arc<VmFd>,
    saveable_msrs: Vec<u32>,
    mem: Arc<GuestMemory>,
}

impl Vm {
    /// Creates the VM, its memfd memory and vCPUs, and loads the workload. Not running.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmmError> {
        cfg.validate()?;
        let mem = GuestMemory::new(cfg.mem_size)?;
        let vm = Self::build(cfg, mem, Phase::Created)?;
        vm.boot()?;
        Ok(vm)
    }

    /// Creates a destination VM: memory allocated and pre-faulted in parallel (so copies into
    /// it do not pay first-touch faults during downtime), vCPUs created, nothing loaded.
    pub fn new_incoming(cfg: VmConfig) -> Result<Vm, VmmError> {
        cfg.validate()?;
        let mem = GuestMemory::new(cfg.mem_size)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        mem.prefault(threads)?;
        Self::build(cfg, mem, Phase::Incoming)
    }

    /// Adopts an existing memory fd (at least `mem_size` bytes) as guest memory, e.g. for a
    /// live upgrade. Contents are untouched; restore state before `start`.
    pub fn from_memory_fd(cfg: VmConfig, fd: OwnedFd) -> Result<Vm, VmmError> {
        cfg.validate()?;
        let mem = GuestMemory::from_fd(fd, cfg.mem_size)?;
        Self::build(cfg, mem, Phase::Incoming)
    }

    fn build(cfg: VmConfig, mem: GuestMemory, phase: Phase) -> Result<Vm, VmmError> {
        install_kick_handler();
        let kvm = Kvm::new().map_err(VmmError::KvmUnavailable)?;
        // Something that opens but is not KVM (a bind-mounted /dev/null, say) fails here.
        if kvm.get_api_version() != 12 {
            return Err(VmmError::KvmUnavailable(kvm_ioctls::Error::new(
                libc::ENOTTY,
            )));
        }
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| VmmError::kvm("KVM_CREATE_VM", e))?;
        vm_fd
            .set_tss_address(TSS_ADDR)
            .map_err(|e| VmmError::kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(|e| VmmError::kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.host_addr() as u64,
        };
        // SAFETY: the region describes our own mapping of `mem.size()` bytes, which lives as
        // long as the `Vm` (the `Arc<GuestMemory>` is dropped only after the VM fd).
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(|e| VmmError::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut slots = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::kvm("KVM_CREATE_VCPU", e))?;
            // Each vCPU reports its own APIC id (leaf 1 EBX[31:24], x2APIC id in leaves
            // 0xb/0x1f EDX), as on real hardware.
            let mut own = cpuid.clone();
            for entry in own.as_mut_slice() {
                match entry.function {
                    1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                    0xb | 0x1f => entry.edx = u32::from(id),
                    _ => {}
                }
            }
            fd.set_cpuid2(&own)
                .map_err(|e| VmmError::kvm("KVM_SET_CPUID2", e))?;
            slots.push(VcpuSlot {
                fd: Mutex::new(fd),
                workload: Mutex::new(WorkloadVcpuState::default()),
                pacer: Mutex::new(None),
            });
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|e| VmmError::kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let saveable_msrs = readable_msrs(&lock(&slots[0].fd), msr_list.as_slice())?;
        let vm_fd = Arc::new(vm_fd);
        let dirty = Arc::new(DirtyLog::new(Arc::clone(&vm_fd), 0, mem.size()));
        let slices = guest::slices(&cfg.workload, cfg.mem_size, cfg.vcpus);
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Control {
                phase,
                desired: Desired::Pause,
                running: 0,
                failure: None,
                threads: Vec::new(),
                restored: false,
            }),
            cv: Condvar::new(),
            vcpus: slots,
            workload: RwLock::new(WorkloadLayout {
                spec: cfg.workload.clone(),
                slices,
            }),
            dirty_rate_bits: AtomicU64::new(0),
        });
        Ok(Vm {
            cfg: RwLock::new(cfg),
            vm_fd,
            mem: Arc::new(mem),
            dirty,
            shared,
            saveable_msrs,
            handles: Mutex::new(Vec::new()),
        })
    }

    /// Loads page tables and the program and puts every vCPU at the entry point in long mode.
    fn boot(&self) -> Result<(), VmmError> {
        let mut result = Ok(());
        guest::load(|gpa, bytes| {
            if result.is_ok() {
                result = self.mem.write(gpa, bytes);
            }
        });
        result?;
        if self.cfg().workload.kind == WorkloadKind::Fill {
            // `fill` promises every page non-zero: mark the low pages the loader left empty.
            for page in [0, 0x9000, 0xa000, 0xb000, 0xc000, 0xd000, 0xe000, 0xf000] {
                self.mem.write(page, &[0xa5; PAGE_SIZE as usize])?;
            }
        }
        let layout = self
            .shared
            .workload
            .read()
            .unwrap_or_else(|p| p.into_inner());
        for (slot, slice) in self.shared.vcpus.iter().zip(&layout.slices) {
            let fd = lock(&slot.fd);
            let mut sregs = fd
                .get_sregs()
                .map_err(|e| VmmError::kvm("KVM_GET_SREGS", e))?;
            let code = kvm_bindings::kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x08,
                type_: 0xb,
                present: 1,
                dpl: 0,
                db: 0,
                s: 1,
                l: 1,
                g: 1,
                ..Default::default()
            };
            let data = kvm_bindings::kvm_segment {
                selector: 0x10,
                type_: 0x3,
                l: 0,
                db: 1,
                ..code
            };
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.gdt.base = guest::GDT_ADDR;
            sregs.gdt.limit = 3 * 8 - 1;
            sregs.cr3 = guest::PML4_ADDR;
            // PAE + OSFXSR + OSXMMEXCPT; PE + MP + ET + NE + WP + PG; LME + LMA.
            sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
            sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
            sregs.efer = (1 << 8) | (1 << 10);
            fd.set_sregs(&sregs)
                .map_err(|e| VmmError::kvm("KVM_SET_SREGS", e))?;
            let regs = kvm_regs {
                rip: guest::CODE_ADDR + guest::ENTRY_OFFSET,
                rflags: 0x2,
                rbx: 0,
                r8: slice.base,
                r9: slice.pages.max(1),
                r10: slice.pattern,
                r11: slice.hot_pages,
                r12: slice.seed,
                r13: 0,
                r15: slice.hot_threshold,
                ..Default::default()
            };
            fd.set_regs(&regs)
                .map_err(|e| VmmError::kvm("KVM_SET_REGS", e))?;
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu)
                .map_err(|e| VmmError::kvm("KVM_SET_FPU", e))?;
        }
        Ok(())
    }

    /// Spawns the vCPU threads and the dirty-rate monitor, and runs (from reset or from a
    /// restored state).
    pub fn start(&self) -> Result<(), VmmError> {
        let mut ctl = lock(&self.shared.ctl);
        match ctl.phase {
            Phase::Created => {}
            Phase::Incoming if ctl.restored => {}
            Phase::Incoming => {
                return Err(VmmError::InvalidState(
                    "an incoming VM needs restore_state before start".into(),
                ))
            }
            Phase::Started => return Err(VmmError::InvalidState("VM already started".into())),
            Phase::Stopped => return Err(VmmError::InvalidState("VM was shut down".into())),
        }
        let mut handles = lock(&self.handles);
        for idx in 0..self.shared.vcpus.len() {
            let shared = Arc::clone(&self.shared);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{idx}"))
                .spawn(move || vcpu_thread(&shared, idx))
                .map_err(|source| VmmError::Thread {
                    what: "vCPU",
                    source,
                })?;
            ctl.threads.push(h.as_pthread_t());
            handles.push(h);
        }
        let shared = Arc::clone(&self.shared);
        let handle = self.dirty.subscribe()?;
        let h = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || dirty_rate_monitor(&shared, &handle))
            .map_err(|source| VmmError::Thread {
                what: "dirty-rate monitor",
                source,
            })?;
        handles.push(h);
        ctl.phase = Phase::Started;
        ctl.desired = Desired::Run;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// The control block of a started, healthy VM; `not_started` says why otherwise.
    fn started_control(&self, not_started: &str) -> Result<MutexGuard<'_, Control>, VmmError> {
        let ctl = lock(&self.shared.ctl);
        if let Some(f) = &ctl.failure {
            return Err(VmmError::VcpuFailed(f.clone()));
        }
        if ctl.phase != Phase::Started {
            return Err(VmmError::InvalidState(not_started.into()));
        }
        Ok(ctl)
    }

    /// Parks every vCPU outside KVM_RUN; returns once all of them acknowledged.
    pub fn pause(&self) -> Result<(), VmmError> {
        let mut ctl = self.started_control("VM is not running")?;
        ctl.desired = Desired::Pause;
        self.shared.cv.notify_all();
        while ctl.running > 0 {
            if ctl.desired == Desired::Run {
                return Err(VmmError::InvalidState(
                    "resumed by another caller before the pause completed".into(),
                ));
            }
            // Re-kick until acknowledged: a kick that lands just before a thread enters
            // KVM_RUN is lost, the next one is not.
            Shared::kick_all(&ctl);
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, Duration::from_millis(2))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut ctl = self.started_control("VM is not started")?;
        ctl.desired = Desired::Run;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Current state and counters.
    pub fn status(&self) -> VmStatus {
        let state = {
            let ctl = lock(&self.shared.ctl);
            match (&ctl.failure, ctl.phase, ctl.desired) {
                (Some(f), _, _) => VmRunState::Failed(f.clone()),
                (None, Phase::Created, _) => VmRunState::Created,
                (None, Phase::Incoming, _) => VmRunState::Incoming,
                (None, Phase::Stopped, _) | (None, Phase::Started, Desired::Quit) => {
                    VmRunState::Stopped
                }
                (None, Phase::Started, Desired::Run) => VmRunState::Running,
                (None, Phase::Started, Desired::Pause) => VmRunState::Paused,
            }
        };
        let (mut pages, mut beats) = (0, 0);
        for slot in &self.shared.vcpus {
            let w = lock(&slot.workload);
            pages += w.pages_done;
            beats += w.heartbeats;
        }
        let rate = if state == VmRunState::Running {
            f64::from_bits(self.shared.dirty_rate_bits.load(Ordering::Relaxed))
        } else {
            0.0
        };
        VmStatus {
            state,
            progress: pages + beats,
            pages_written: pages,
            heartbeats: beats,
            dirty_rate_pps: rate,
        }
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> VmConfig {
        self.cfg().clone()
    }

    fn cfg(&self) -> RwLockReadGuard<'_, VmConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Guest memory: a single region at GPA 0 backed by the memfd.
    pub fn memory_regions(&self) -> Vec<GuestRegion> {
        vec![GuestRegion {
            guest_addr: 0,
            size: self.mem.size(),
            host_addr: self.mem.host_addr() as usize,
            fd: self.mem.fd(),
            fd_offset: 0,
        }]
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        self.mem.read(gpa, buf)
    }

    /// Copies `buf` into guest memory at `gpa` (not recorded in the dirty log: only guest
    /// writes are).
    pub fn write_memory(&self, gpa: u64, buf: &[u8]) -> Result<(), VmmError> {
        self.mem.write(gpa, buf)
    }

    /// A new dirty-log subscription; several may exist at once.
    pub fn dirty_log(&self) -> Result<DirtyLogHandle, VmmError> {
        self.dirty.subscribe()
    }

    /// Returns the control lock if every vCPU is parked (or none ever ran). Holding it keeps
    /// them parked: a vCPU thread must take it to enter its run loop, so the caller may use the
    /// vCPU fds without racing a concurrent `resume`.
    fn lock_parked(&self, what: &str) -> Result<MutexGuard<'_, Control>, VmmError> {
        let ctl = lock(&self.shared.ctl);
        let parked = match ctl.phase {
            Phase::Created | Phase::Incoming | Phase::Stopped => true,
            Phase::Started => ctl.desired != Desired::Run && ctl.running == 0,
        };
        if parked {
            Ok(ctl)
        } else {
            Err(VmmError::InvalidState(format!("{what} needs a paused VM")))
        }
    }

    /// Captures the complete vCPU and workload state. Only while paused (or before start);
    /// no side effects.
    pub fn save_state(&self) -> Result<VmState, VmmError> {
        let _parked = self.lock_parked("save_state")?;
        let mut vcpus = Vec::new();
        for slot in &self.shared.vcpus {
            let fd = lock(&slot.fd);
            let k = |op| move |e| VmmError::kvm(op, e);
            vcpus.push(VcpuState {
                regs: pod_to_bytes(&fd.get_regs().map_err(k("KVM_GET_REGS"))?),
                sregs: pod_to_bytes(&fd.get_sregs().map_err(k("KVM_GET_SREGS"))?),
                fpu: pod_to_bytes(&fd.get_fpu().map_err(k("KVM_GET_FPU"))?),
                xsave: pod_to_bytes(&fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?),
                xcrs: pod_to_bytes(&fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?),
                debug_regs: pod_to_bytes(&fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?),
                events: pod_to_bytes(&fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?),
                mp_state: pod_to_bytes(&fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?),
                msrs: read_msrs(&fd, &self.saveable_msrs)?,
                workload: *lock(&slot.workload),
            });
        }
        Ok(VmState {
            mem_size: self.cfg().mem_size,
            workload: self.cfg().workload.clone(),
            vcpus,
        })
    }

    /// Loads a saved state into a VM that has not started (from `new_incoming` or
    /// `from_memory_fd`; `new` works too). Guest memory is the caller's business.
    pub fn restore_state(&self, st: &VmState) -> Result<(), VmmError> {
        // Held throughout, so a concurrent `start` cannot run a half-restored vCPU.
        let mut ctl = lock(&self.shared.ctl);
        if !matches!(ctl.phase, Phase::Created | Phase::Incoming) {
            return Err(VmmError::InvalidState(
                "restore_state needs a VM that has not started".into(),
            ));
        }
        // An incoming VM is built before anyone knows what the source runs: it adopts the
        // state's workload (the guest program itself arrives with guest memory).
        let adopt = ctl.phase == Phase::Incoming && st.workload != self.cfg().workload;
        if st.mem_size != self.cfg().mem_size
            || st.vcpus.len() != self.shared.vcpus.len()
            || (!adopt && st.workload != self.cfg().workload)
        {
            return Err(VmmError::InvalidState(format!(
                "state is for {} bytes, {} vCPUs, workload `{}`; this VM has {} bytes, {} vCPUs, `{}`",
                st.mem_size,
                st.vcpus.len(),
                st.workload,
                self.cfg().mem_size,
                self.shared.vcpus.len(),
                self.cfg().workload
            )));
        }
        if adopt {
            VmConfig {
                workload: st.workload.clone(),
                ..self.config()
            }
            .validate()?;
            let slices = guest::slices(&st.workload, st.mem_size, self.cfg().vcpus);
            *self
                .shared
                .workload
                .write()
                .unwrap_or_else(|p| p.into_inner()) = WorkloadLayout {
                spec: st.workload.clone(),
                slices,
            };
            self.cfg.write().unwrap_or_else(|p| p.into_inner()).workload = st.workload.clone();
        }
        for (slot, vs) in self.shared.vcpus.iter().zip(&st.vcpus) {
            let fd = lock(&slot.fd);
            let k = |op| move |e| VmmError::kvm(op, e);
            // Order as Firecracker/Cloud Hypervisor: mode state first, then registers, then
            // the MSRs and pending events that depend on them.
            fd.set_mp_state(pod_from_bytes(&vs.mp_state, "mp_state")?)
                .map_err(k("KVM_SET_MP_STATE"))?;
            fd.set_regs(&pod_from_bytes(&vs.regs, "regs")?)
                .map_err(k("KVM_SET_REGS"))?;
            fd.set_sregs(&pod_from_bytes(&vs.sregs, "sregs")?)
                .map_err(k("KVM_SET_SREGS"))?;
            fd.set_fpu(&pod_from_bytes(&vs.fpu, "fpu")?)
                .map_err(k("KVM_SET_FPU"))?;
            fd.set_xsave(&pod_from_bytes(&vs.xsave, "xsave")?)
                .map_err(k("KVM_SET_XSAVE"))?;
            fd.set_xcrs(&pod_from_bytes(&vs.xcrs, "xcrs")?)
                .map_err(k("KVM_SET_XCRS"))?;
            fd.set_debug_regs(&pod_from_bytes(&vs.debug_regs, "debug_regs")?)
                .map_err(k("KVM_SET_DEBUGREGS"))?;
            write_msrs(&fd, &vs.msrs)?;
            fd.set_vcpu_events(&pod_from_bytes(&vs.events, "vcpu_events")?)
                .map_err(k("KVM_SET_VCPU_EVENTS"))?;
            *lock(&slot.workload) = vs.workload;
        }
        ctl.restored = true;
        Ok(())
    }

    /// Checks every page of the `verify` working set against the stamps the guest must have
    /// written, recomputed from each vCPU's exact sequence number. Pauses briefly if running.
    pub fn verify_memory(&self) -> Result<VerifyReport, VmmError> {
        if self.cfg().workload.kind != WorkloadKind::Verify {
            return Err(VmmError::NotVerifiable(self.cfg().workload.to_string()));
        }
        let was_running = self.status().state == VmRunState::Running;
        if was_running {
            self.pause()?;
        }
        let report = self.check_stamps();
        if was_running {
            self.resume()?;
        }
        report
    }

    fn check_stamps(&self) -> Result<VerifyReport, VmmError> {
        let _parked = self.lock_parked("verify_memory")?;
        let mut report = VerifyReport {
            pages_checked: 0,
            writes_replayed: 0,
            errors: 0,
            first_errors: Vec::new(),
        };
        for (c, (slot, slice)) in self
            .shared
            .vcpus
            .iter()
            .zip(
                &self
                    .shared
                    .workload
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .slices,
            )
            .enumerate()
        {
            let regs = lock(&slot.fd)
                .get_regs()
                .map_err(|e| VmmError::kvm("KVM_GET_REGS", e))?;
            // Stopped right after the store, the guest has written `rbx` without counting it.
            let written =
                regs.rbx + u64::from(regs.rip == guest::CODE_ADDR + guest::AFTER_STORE_OFFSET);
            // Stopped between the two stores, the next page already has its frame number.
            let half_written = (regs.rip == guest::CODE_ADDR + guest::SEQ_STORE_OFFSET)
                .then(|| slice.page_of(regs.rbx));
            let mut last: Vec<Option<u64>> = vec![None; slice.pages as usize];
            // Walk backwards: the first time a page comes up is its last write. Stop once
            // every page is accounted for, so long runs cost ~n log n, not one step per write.
            let mut unseen = slice.pages;
            for seq in (0..written).rev() {
                let page = &mut last[slice.page_of(seq) as usize];
                if page.is_none() {
                    *page = Some(seq);
                    unseen -= 1;
                    if unseen == 0 {
                        break;
                    }
                }
            }
            report.writes_replayed += written;
            let mut stamp = [0u8; 16];
            for (i, expect) in last.iter().enumerate() {
                let gpa = slice.base + i as u64 * PAGE_SIZE;
                self.mem.read(gpa, &mut stamp)?;
                let seq = u64::from_le_bytes(stamp[..8].try_into().unwrap_or_default());
                let pfn = u64::from_le_bytes(stamp[8..].try_into().unwrap_or_default());
                let ok = match expect {
                    Some(s) => seq == *s && pfn == gpa / PAGE_SIZE,
                    None if half_written == Some(i as u64) => {
                        seq == 0 && (pfn == 0 || pfn == gpa / PAGE_SIZE)
                    }
                    None => seq == 0 && pfn == 0,
                };
                report.pages_checked += 1;
                if !ok {
                    report.errors += 1;
                    if report.first_errors.len() < 8 {
                        report.first_errors.push(format!(
                            "vCPU {c} page {gpa:#x}: found seq {seq} pfn {pfn:#x}, expected {}",
                            expect.map_or("never written".to_string(), |s| format!("seq {s}"))
                        ));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Stops the vCPU and monitor threads. Idempotent; also runs on drop.
    pub fn shutdown(&self) {
        {
            let mut ctl = lock(&self.shared.ctl);
            if ctl.phase == Phase::Stopped {
                return;
            }
            ctl.desired = Desired::Quit;
            self.shared.cv.notify_all();
            while ctl.running > 0 {
                Shared::kick_all(&ctl);
                ctl = self
                    .shared
                    .cv
                    .wait_timeout(ctl, Duration::from_millis(2))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            ctl.threads.clear();
            ctl.phase = Phase::Stopped;
        }
        for h in lock(&self.handles).drain(..) {
            if h.join().is_err() {
                tracing::error!("a VM thread panicked");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
        // The VM fd is only held to keep the VM alive until the fields drop in order.
        let _ = &self.vm_fd;
    }
}

fn readable_msrs(fd: &VcpuFd, all: &[u32]) -> Result<Vec<u32>, VmmError> {
    // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read; drop
    // that one and carry on, so the list holds exactly the MSRs that can be saved.
    let mut ok = Vec::new();
    let mut rest: &[u32] = all;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let n = read_msr_chunk(fd, chunk)?.len();
        ok.extend_from_slice(&chunk[..n]);
        rest = if n < chunk.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", chunk[n]),
                "MSR not readable, not saved"
            );
            &rest[n + 1..]
        } else {
            &rest[n..]
        };
    }
    Ok(ok)
}

fn read_msr_chunk(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| VmmError::Internal(format!("MSR list: {e:?}")))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| VmmError::kvm("KVM_GET_MSRS", e))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmmError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        out.extend(read_msr_chunk(fd, chunk)?);
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), VmmError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Internal(format!("MSR list: {e:?}")))?;
        let n = fd
            .set_msrs(&list)
            .map_err(|e| VmmError::kvm("KVM_SET_MSRS", e))?;
        rest = if n < chunk.len() {
            // Some saveable MSRs are read-only or host-specific; skip and report.
            // Nothing is lost when the vCPU already holds the saved value (seen for KVM's
            // async-PF MSR 0x4b564d06 when the guest CPUID lacks that PV feature).
            let (index, wanted) = chunk[n];
            let current = read_msr_chunk(fd, &[index])?.first().map(|&(_, v)| v);
            if current == Some(wanted) {
                tracing::debug!(
                    msr = format_args!("{index:#x}"),
                    "MSR not writable, already equal"
                );
            } else {
                tracing::warn!(
                    msr = format_args!("{index:#x}"),
                    wanted,
                    ?current,
                    "MSR could not be restored"
                );
            }
            &rest[n + 1..]
        } else {
            &rest[n..]
        };
    }
    Ok(())
}

fn vcpu_thread(shared: &Shared, idx: usize) {
    loop {
        {
            let mut ctl = lock(&shared.ctl);
            loop {
                if ctl.desired == Desired::Quit || ctl.failure.is_some() {
                    return;
                }
                if ctl.desired == Desired::Run {
                    break;
                }
                ctl = shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
            }
            ctl.running += 1;
        }
        let result = {
            let mut fd = lock(&shared.vcpus[idx].fd);
            run_vcpu(shared, idx, &mut fd)
        };
        *lock(&shared.vcpus[idx].pacer) = None;
        let mut ctl = lock(&shared.ctl);
        ctl.running -= 1;
        if let Err(msg) = result {
            tracing::error!(vcpu = idx, "{msg}");
            ctl.failure.get_or_insert(msg);
            Shared::kick_all(&ctl);
        }
        shared.cv.notify_all();
    }
}

/// Runs the vCPU until the VM should stop running. Unexpected exits are errors, never panics.
fn run_vcpu(shared: &Shared, idx: usize, fd: &mut VcpuFd) -> Result<(), String> {
    let mut pending_io = false;
    loop {
        if shared.desired() != Desired::Run {
            if pending_io {
                // Complete the `in` KVM is holding (it writes eax and advances RIP on the
                // next KVM_RUN), so saved registers never miss a half-done instruction.
                fd.set_kvm_immediate_exit(1);
                let r = fd.run().map(|_| ());
                fd.set_kvm_immediate_exit(0);
                match r {
                    Err(e) if e.errno() == libc::EINTR => {}
                    Ok(()) => {}
                    Err(e) => return Err(format!("vCPU {idx}: completing port I/O failed: {e}")),
                }
            }
            return Ok(());
        }
        pending_io = false;
        let unexpected = match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) if port == guest::MAILBOX_PORT && data.len() == 4 => {
                let count = next_batch(shared, idx);
                data.copy_from_slice(&count.to_le_bytes());
                pending_io = true;
                continue;
            }
            Ok(VcpuExit::Hlt) => {
                if shared.wait_running_until(Instant::now() + HEARTBEAT) {
                    lock(&shared.vcpus[idx].workload).heartbeats += 1;
                }
                continue;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => format!("KVM_RUN failed: {e}"),
            Ok(exit) => format!("unexpected exit {exit:?}"),
        };
        let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        return Err(format!("vCPU {idx}: {unexpected} at rip {rip:#x}"));
    }
}

/// The VMM side of the mailbox: confirms the previous batch and paces the next one.
fn next_batch(shared: &Shared, idx: usize) -> u32 {
    let slot = &shared.vcpus[idx];
    let layout = shared.workload.read().unwrap_or_else(|p| p.into_inner());
    let slice = &layout.slices[idx];
    let spec = &layout.spec;
    let issued = {
        let mut w = lock(&slot.workload);
        w.pages_done += w.in_flight;
        w.in_flight = 0;
        let finished_fill = spec.kind == WorkloadKind::Fill && w.pages_done >= slice.pages;
        if spec.kind == WorkloadKind::Idle || slice.pages == 0 || finished_fill || w.stopped_writing
        {
            w.stopped_writing = true;
            return guest::STOP_WRITING;
        }
        w.pages_done
    };
    let n = shared.vcpus.len() as f64;
    let rate = spec.rate as f64 / n;
    let mut batch = if rate > 0.0 {
        ((rate * BATCH_PERIOD_S).ceil() as u64).clamp(1, MAX_BATCH)
    } else {
        MAX_BATCH
    };
    if spec.kind == WorkloadKind::Fill {
        batch = batch.min(slice.pages - issued);
    }
    if rate > 0.0 {
        let now = Instant::now();
        let due = {
            let mut pacer = lock(&slot.pacer);
            let (t0, base) = *pacer.get_or_insert((now, issued));
            let due = t0 + Duration::from_secs_f64((issued - base) as f64 / rate);
            // A guest slower than the target must not build up credit for a later burst.
            if now > due + Duration::from_millis(100) {
                *pacer = Some((now, issued));
                now
            } else {
                due
            }
        };
        if !shared.wait_running_until(due) {
            return 0;
        }
    }
    lock(&slot.workload).in_flight = batch;
    batch as u32
}

fn dirty_rate_monitor(shared: &Shared, handle: &DirtyLogHandle) {
    let mut last = Instant::now();
    loop {
        {
            let deadline = last + Duration::from_secs(1);
            let mut ctl = lock(&shared.ctl);
            loop {
                if ctl.desired == Desired::Quit {
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                ctl = shared
                    .cv
                    .wait_timeout(ctl, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        match handle.fetch() {
            Ok(bitmap) => {
                let now = Instant::now();
                let rate = bitmap.count() as f64 / (now - last).as_secs_f64();
                last = now;
                shared
                    .dirty_rate_bits
                    .store(rate.to_bits(), Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("dirty-rate monitor: {e}");
                last = Instant::now();
            }
        }
    }
}
