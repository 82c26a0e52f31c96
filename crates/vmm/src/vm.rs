//! The VM: KVM setup, the vCPU threads' lifecycle (start, acknowledged pause, resume,
//! shutdown), the dirty-rate monitor, state save/restore and the verify check. The pieces
//! live beside it: [`crate::config`], [`crate::vcpu`] (the thread state machine),
//! [`crate::boot`], [`crate::msrs`], [`crate::state`], [`crate::pacing`], [`crate::verify`].

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::signal::Killable;

use crate::boot;
use crate::config::{VmConfig, VmRunState, VmStatus};
use crate::dirty::{DirtyLogHandle, DirtyLogSource, KvmDirtyLog};
use crate::error::StateError;
use crate::guest;
use crate::memory::{GuestMemory, GuestRegion};
use crate::msrs::readable_msrs;
use crate::pacing::Pacer;
use crate::state::{VcpuState, VmState, WorkloadVcpuState};
use crate::vcpu::{
    install_kick_handler, kick_signal, lock, VcpuEvent, VcpuResponse, VcpuShared, VcpuSlot,
    VcpuThread, WorkloadLayout,
};
use crate::verify::{check_slice, StopPoint, VerifyReport};
use crate::workload::WorkloadKind;
use crate::{VmmError, PAGE_SIZE};

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// How often an unacknowledged pause re-kicks: a kick that lands just before a thread enters
/// KVM_RUN is lost, the next one is not.
const REKICK: Duration = Duration::from_millis(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Incoming,
    Started,
    Stopped,
}

/// The VM's end of one vCPU thread.
struct VcpuHandle {
    events: Sender<VcpuEvent>,
    thread: JoinHandle<()>,
}

/// The VM's end of the dirty-rate monitor: dropping `quit` ends it.
struct Monitor {
    quit: Sender<()>,
    thread: JoinHandle<()>,
}

/// Lifecycle state, behind one lock: whoever holds it may command the vCPUs, and while it
/// is held no other caller can resume them.
struct Control {
    phase: Phase,
    /// Every vCPU thread acknowledged a pause (meaningful while `Started`).
    paused: bool,
    /// Incoming VMs need `restore_state` before `start`.
    restored: bool,
    vcpus: Vec<VcpuHandle>,
    responses: Option<Receiver<(usize, VcpuResponse)>>,
    monitor: Option<Monitor>,
}

/// A KVM virtual machine running one of the built-in workloads. `Send + Sync`: every method
/// takes `&self`.
pub struct Vm {
    // Fields drop in this order: threads and vCPU fds first, then the VM fd, and the guest
    // memory mapping last, so KVM never holds a memslot over an unmapped range.
    /// Behind a lock because an incoming VM adopts the workload of the state it restores.
    cfg: RwLock<VmConfig>,
    ctl: Mutex<Control>,
    shared: Arc<VcpuShared>,
    dirty_rate_bits: Arc<AtomicU64>,
    /// Distinct pages dirtied over the last complete [`WSS_WINDOW`]; `u64::MAX` until one is.
    working_set_pages: Arc<AtomicU64>,
    dirty: Arc<DirtyLogSource>,
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
        install_kick_handler()?;
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
            boot::set_cpuid(&fd, &cpuid, id)?;
            slots.push(VcpuSlot {
                fd: Mutex::new(fd),
                workload: Mutex::new(WorkloadVcpuState::default()),
            });
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|e| VmmError::kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let saveable_msrs = readable_msrs(&lock(&slots[0].fd), msr_list.as_slice())?;
        let vm_fd = Arc::new(vm_fd);
        let dirty = Arc::new(DirtyLogSource::new(Arc::clone(&vm_fd), 0, mem.size()));
        let slices = guest::slices(&cfg.workload, cfg.mem_size, cfg.vcpus);
        let shared = Arc::new(VcpuShared::new(
            slots,
            WorkloadLayout {
                spec: cfg.workload.clone(),
                slices,
            },
        ));
        Ok(Vm {
            cfg: RwLock::new(cfg),
            ctl: Mutex::new(Control {
                phase,
                paused: true,
                restored: false,
                vcpus: Vec::new(),
                responses: None,
                monitor: None,
            }),
            shared,
            dirty_rate_bits: Arc::new(AtomicU64::new(0)),
            working_set_pages: Arc::new(AtomicU64::new(u64::MAX)),
            vm_fd,
            mem: Arc::new(mem),
            dirty,
            saveable_msrs,
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
                self.mem.write(page, &[0xa5; PAGE_SIZE])?;
            }
        }
        let layout = self.layout();
        for (slot, slice) in self.shared.vcpus.iter().zip(&layout.slices) {
            boot::boot_vcpu(&lock(&slot.fd), slice)?;
        }
        Ok(())
    }

    fn layout(&self) -> RwLockReadGuard<'_, WorkloadLayout> {
        self.shared
            .workload
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns the vCPU threads and the dirty-rate monitor, and runs (from reset or from a
    /// restored state).
    pub fn start(&self) -> Result<(), VmmError> {
        let mut ctl = lock(&self.ctl);
        match ctl.phase {
            Phase::Created => {}
            Phase::Incoming if ctl.restored => {}
            Phase::Incoming => return Err(VmmError::InvalidState(StateError::NotRestored)),
            Phase::Started => return Err(VmmError::InvalidState(StateError::AlreadyStarted)),
            Phase::Stopped => return Err(VmmError::InvalidState(StateError::ShutDown)),
        }
        let (responses_tx, responses) = mpsc::channel();
        ctl.responses = Some(responses);
        for idx in 0..self.shared.vcpus.len() {
            let (events, rx) = mpsc::channel();
            let vcpu = VcpuThread {
                idx,
                shared: Arc::clone(&self.shared),
                events: rx,
                responses: responses_tx.clone(),
                pacer: Pacer::default(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{idx}"))
                .spawn(move || vcpu.run())
                .map_err(|source| VmmError::Thread {
                    what: "vCPU",
                    source,
                })?;
            ctl.vcpus.push(VcpuHandle { events, thread });
        }
        let handle = self.dirty.subscribe()?;
        let (quit, quit_rx) = mpsc::channel();
        let rate = Arc::clone(&self.dirty_rate_bits);
        let wss = Arc::clone(&self.working_set_pages);
        let thread = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || dirty_rate_monitor(&quit_rx, &handle, &rate, &wss))
            .map_err(|source| VmmError::Thread {
                what: "dirty-rate monitor",
                source,
            })?;
        ctl.monitor = Some(Monitor { quit, thread });
        ctl.phase = Phase::Started;
        self.command(&mut ctl, VcpuEvent::Resume)?;
        ctl.paused = false;
        Ok(())
    }

    /// Sends `event` to every vCPU. For `Pause` and `Finish`, waits until each acknowledged
    /// it, re-kicking running ones; a failed vCPU ends the wait with its error.
    ///
    /// `Resume` is not waited for: nothing depends on a vCPU having re-entered `KVM_RUN`
    /// (memory is safe to read only while paused, and that is what `Pause` acknowledges), and
    /// on a destination the wait lies inside the migration's downtime: it costs a scheduler
    /// wake-up of every new vCPU thread, milliseconds on a busy host. Its `Resumed` answers
    /// are left in the channel and skipped by the next command; a vCPU that fails after the
    /// resume is reported by `status` and by that next command.
    fn command(&self, ctl: &mut Control, event: VcpuEvent) -> Result<(), VmmError> {
        for h in &ctl.vcpus {
            // A thread that already ended is accounted for by its Failed/Finished response.
            let _ = h.events.send(event);
        }
        if event == VcpuEvent::Resume {
            return Ok(());
        }
        let Some(responses) = &ctl.responses else {
            return Ok(());
        };
        let mut acked = vec![false; ctl.vcpus.len()];
        while acked.contains(&false) {
            for (h, _) in ctl.vcpus.iter().zip(&acked).filter(|(_, a)| !**a) {
                // Fails only for a thread that already ended, which answers anyway.
                let _ = h.thread.kill(kick_signal());
            }
            match responses.recv_timeout(REKICK) {
                Ok(answer) => self.take_answer(event, answer, &mut acked)?,
                Err(RecvTimeoutError::Timeout) => {
                    // A thread that ended without answering (it panicked) must not be waited
                    // for forever. Answers sent just before it ended are taken first.
                    let ended_silently =
                        |(a, h): (&bool, &VcpuHandle)| !*a && h.thread.is_finished();
                    if acked.iter().zip(&ctl.vcpus).any(ended_silently) {
                        while let Ok(answer) = responses.try_recv() {
                            self.take_answer(event, answer, &mut acked)?;
                        }
                        for (a, h) in acked.iter_mut().zip(&ctl.vcpus) {
                            if !*a && h.thread.is_finished() {
                                if event != VcpuEvent::Finish {
                                    return Err(self.failed_error());
                                }
                                *a = true;
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return if event == VcpuEvent::Finish {
                        Ok(())
                    } else {
                        Err(self.failed_error())
                    };
                }
            }
        }
        Ok(())
    }

    /// Records vCPU `idx`'s answer to `event`. A vCPU that ended is an error unless it was
    /// asked to end; other answers (left from an earlier command) are ignored.
    fn take_answer(
        &self,
        event: VcpuEvent,
        (idx, answer): (usize, VcpuResponse),
        acked: &mut [bool],
    ) -> Result<(), VmmError> {
        let expect = match event {
            VcpuEvent::Pause => VcpuResponse::Paused,
            VcpuEvent::Resume => VcpuResponse::Resumed,
            VcpuEvent::Finish => VcpuResponse::Finished,
        };
        match answer {
            r if r == expect => acked[idx] = true,
            VcpuResponse::Finished | VcpuResponse::Failed(_) if event == VcpuEvent::Finish => {
                acked[idx] = true
            }
            VcpuResponse::Finished | VcpuResponse::Failed(_) => return Err(self.failed_error()),
            VcpuResponse::Paused | VcpuResponse::Resumed => {}
        }
        Ok(())
    }

    fn failed_error(&self) -> VmmError {
        match self.shared.failure() {
            Some(f) => VmmError::VcpuFailed(f),
            None => VmmError::VcpuThreadLost,
        }
    }

    /// The control block of a started, healthy VM; `not_started` says why otherwise.
    fn started_control(&self, op: &'static str) -> Result<MutexGuard<'_, Control>, VmmError> {
        let ctl = lock(&self.ctl);
        if let Some(f) = self.shared.failure() {
            return Err(VmmError::VcpuFailed(f));
        }
        if ctl.phase != Phase::Started {
            let state = phase_state(ctl.phase, ctl.paused);
            return Err(VmmError::InvalidState(StateError::not_started(op, &state)));
        }
        Ok(ctl)
    }

    /// Parks every vCPU outside KVM_RUN; returns once all of them acknowledged.
    pub fn pause(&self) -> Result<(), VmmError> {
        let mut ctl = self.started_control("pause")?;
        if !ctl.paused {
            self.command(&mut ctl, VcpuEvent::Pause)?;
            ctl.paused = true;
        }
        Ok(())
    }

    /// Lets parked vCPUs run again; returns once each was told (see `command`).
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut ctl = self.started_control("resume")?;
        if ctl.paused {
            self.command(&mut ctl, VcpuEvent::Resume)?;
            ctl.paused = false;
        }
        Ok(())
    }

    /// Current state and counters.
    pub fn status(&self) -> VmStatus {
        let state = {
            let ctl = lock(&self.ctl);
            match self.shared.failure() {
                Some(f) => VmRunState::Failed(f.to_string()),
                None => phase_state(ctl.phase, ctl.paused),
            }
        };
        let (mut pages, mut beats) = (0, 0);
        for slot in &self.shared.vcpus {
            let w = lock(&slot.workload);
            pages += w.pages_done;
            beats += w.heartbeats;
        }
        let running = state == VmRunState::Running;
        let rate = if running {
            f64::from_bits(self.dirty_rate_bits.load(Ordering::Relaxed))
        } else {
            0.0
        };
        let working_set_pages = match self.working_set_pages.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => running.then_some(n),
        };
        VmStatus {
            state,
            progress: pages + beats,
            pages_written: pages,
            heartbeats: beats,
            dirty_rate_pps: rate,
            working_set_pages,
        }
    }

    /// Changes the write rate of a `dirty`/`verify` workload (pages/s over all vCPUs, above
    /// 0), running or not: the vCPUs pace their next batch at it, and a saved state carries
    /// it (so a migrated VM keeps it). What the guest writes is unchanged, so `verify` still
    /// checks.
    pub fn set_workload_rate(&self, rate: u64) -> Result<(), VmmError> {
        let spec = self.cfg().workload.clone();
        if rate == 0 || !matches!(spec.kind, WorkloadKind::Dirty | WorkloadKind::Verify) {
            return Err(VmmError::NotPaced(spec));
        }
        // The layout the vCPUs read and the configuration a saved state carries.
        self.shared
            .workload
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .spec
            .rate = rate;
        self.cfg
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .workload
            .rate = rate;
        Ok(())
    }

    /// The configuration the VM was built with (with the rate last set).
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
    /// them parked: only a holder of this lock can resume them, so the caller may use the
    /// vCPU fds without racing a concurrent `resume`.
    fn lock_parked(&self, op: &'static str) -> Result<MutexGuard<'_, Control>, VmmError> {
        let ctl = lock(&self.ctl);
        let parked = match ctl.phase {
            Phase::Created | Phase::Incoming | Phase::Stopped => true,
            Phase::Started => ctl.paused,
        };
        if parked {
            Ok(ctl)
        } else {
            Err(VmmError::InvalidState(StateError::NotPaused { op }))
        }
    }

    /// Captures the complete vCPU and workload state. Only while paused (or before start);
    /// no side effects.
    pub fn save_state(&self) -> Result<VmState, VmmError> {
        let _parked = self.lock_parked("save_state")?;
        let vcpus = self
            .shared
            .vcpus
            .iter()
            .map(|slot| {
                VcpuState::capture(&lock(&slot.fd), &self.saveable_msrs, *lock(&slot.workload))
            })
            .collect::<Result<_, _>>()?;
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
        let mut ctl = lock(&self.ctl);
        if !matches!(ctl.phase, Phase::Created | Phase::Incoming) {
            return Err(VmmError::InvalidState(StateError::RestoreAfterStart));
        }
        // An incoming VM is built before anyone knows what the source runs: it adopts the
        // state's workload (the guest program itself arrives with guest memory).
        let adopt = ctl.phase == Phase::Incoming && st.workload != self.cfg().workload;
        if st.mem_size != self.cfg().mem_size
            || st.vcpus.len() != self.shared.vcpus.len()
            || (!adopt && st.workload != self.cfg().workload)
        {
            return Err(VmmError::InvalidState(StateError::Mismatch {
                state_mem: st.mem_size,
                state_vcpus: st.vcpus.len(),
                state_workload: st.workload.to_string(),
                vm_mem: self.cfg().mem_size,
                vm_vcpus: self.shared.vcpus.len(),
                vm_workload: self.cfg().workload.to_string(),
            }));
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
            vs.apply(&lock(&slot.fd))?;
            *lock(&slot.workload) = vs.workload;
        }
        ctl.restored = true;
        Ok(())
    }

    /// Checks every page of the `verify` working set against the stamps the guest must have
    /// written, recomputed from each vCPU's exact sequence number. Pauses briefly if running.
    pub fn verify_memory(&self) -> Result<VerifyReport, VmmError> {
        if self.cfg().workload.kind != WorkloadKind::Verify {
            return Err(VmmError::NotVerifiable(self.cfg().workload.clone()));
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
        let mut report = VerifyReport::default();
        let layout = self.layout();
        for (c, (slot, slice)) in self.shared.vcpus.iter().zip(&layout.slices).enumerate() {
            let regs = lock(&slot.fd)
                .get_regs()
                .map_err(|e| VmmError::kvm("KVM_GET_REGS", e))?;
            let stop = StopPoint {
                rbx: regs.rbx,
                rip: regs.rip,
            };
            let read = |gpa| {
                let mut stamp = [0u8; 16];
                self.mem.read(gpa, &mut stamp).map(|()| stamp)
            };
            check_slice(c, slice, stop, read, &mut report)?;
        }
        Ok(report)
    }

    /// Stops the vCPU and monitor threads. Idempotent; also runs on drop.
    pub fn shutdown(&self) {
        let mut ctl = lock(&self.ctl);
        if ctl.phase == Phase::Stopped {
            return;
        }
        if let Err(e) = self.command(&mut ctl, VcpuEvent::Finish) {
            tracing::error!("stopping the vCPUs: {e}");
        }
        let monitor = ctl.monitor.take();
        let threads = ctl
            .vcpus
            .drain(..)
            .map(|h| h.thread)
            .chain(monitor.map(|m| {
                drop(m.quit);
                m.thread
            }));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a VM thread panicked");
            }
        }
        ctl.responses = None;
        ctl.phase = Phase::Stopped;
    }
}

/// The run state of a healthy VM in `phase`.
fn phase_state(phase: Phase, paused: bool) -> VmRunState {
    match (phase, paused) {
        (Phase::Created, _) => VmRunState::Created,
        (Phase::Incoming, _) => VmRunState::Incoming,
        (Phase::Stopped, _) => VmRunState::Stopped,
        (Phase::Started, false) => VmRunState::Running,
        (Phase::Started, true) => VmRunState::Paused,
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
        // The VM fd is only held to keep the VM alive until the fields drop in order.
        let _ = &self.vm_fd;
    }
}

/// Window over which the monitor counts distinct dirtied pages: the working set a pre-copy
/// round of a few seconds meets (the migration model's `wss`).
pub const WSS_WINDOW: Duration = Duration::from_secs(5);

/// Measures the dirty rate once a second, and the distinct pages dirtied over each
/// [`WSS_WINDOW`], until `quit` is dropped.
fn dirty_rate_monitor(
    quit: &Receiver<()>,
    handle: &DirtyLogHandle,
    rate_bits: &AtomicU64,
    wss_pages: &AtomicU64,
) {
    let mut last = Instant::now();
    // One bitmap ORed over the window (not one per second: a 64 GiB VM's is 2 MiB).
    let mut window: Option<(Instant, KvmDirtyLog)> = None;
    loop {
        let wait = (last + Duration::from_secs(1)).saturating_duration_since(Instant::now());
        if !matches!(quit.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
            return;
        }
        match handle.fetch() {
            Ok(bitmap) => {
                let now = Instant::now();
                let rate = bitmap.count() as f64 / (now - last).as_secs_f64();
                last = now;
                rate_bits.store(rate.to_bits(), Ordering::Relaxed);
                let (start, acc) = window.get_or_insert_with(|| (now, KvmDirtyLog::default()));
                acc.union(&bitmap);
                if now - *start >= WSS_WINDOW {
                    wss_pages.store(acc.count(), Ordering::Relaxed);
                    window = None;
                }
            }
            Err(e) => {
                tracing::warn!("dirty-rate monitor: {e}");
                last = Instant::now();
                window = None;
            }
        }
    }
}
