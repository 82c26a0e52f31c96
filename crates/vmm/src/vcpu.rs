//! A vCPU thread: an explicit state machine (running, paused, finished) driven by
//! [`VcpuEvent`]s on its own channel; every event is answered with a [`VcpuResponse`] on the
//! VM's response channel, so a pause is acknowledged only once the vCPU is out of `KVM_RUN`
//! and has released its fd (the shape of Firecracker's `vstate/vcpu.rs`).
//!
//! ```text
//!            Resume                        Finish / channel closed / another vCPU failed
//!  Paused ──────────> Running ───────────────────────────────────────────> Finished
//!    ^   <──────────    │  KVM_RUN exits: mailbox `in` -> grant + pacing wait
//!    │      Pause       │                 hlt -> heartbeat wait (10 ms)
//!    └── Finish ──> Finished              anything else -> Failed(..), Finished
//! ```
//!
//! A running vCPU sees a new event after its next exit: the VM kicks it with a real-time
//! signal (no-op handler, no `SA_RESTART`) so a blocked `KVM_RUN` returns `EINTR`. The waits
//! inside the run loop (pacing, heartbeat) wait on the event channel, so they end at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, Once, RwLock};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{VcpuFailCause, VcpuFailure};
use crate::guest::{self, Slice};
use crate::pacing::{next_grant, Grant, Pacer};
use crate::state::WorkloadVcpuState;
use crate::workload::WorkloadSpec;
use crate::VmmError;

/// How long a halted guest waits before it is resumed (and a heartbeat counted).
const HEARTBEAT: Duration = Duration::from_millis(10);

/// A command to a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VcpuEvent {
    /// Leave `KVM_RUN` and wait, fd released.
    Pause,
    /// Run again (from paused or from start).
    Resume,
    /// End the thread.
    Finish,
}

/// A vCPU thread's answer to an event, or its report of a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VcpuResponse {
    /// Out of `KVM_RUN`, fd released, waiting for the next event.
    Paused,
    /// Running.
    Resumed,
    /// The thread ends.
    Finished,
    /// An unexpected exit or KVM error; the thread ends. The VM is failed.
    Failed(VcpuFailure),
}

/// The states of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    /// In its run loop, holding its vCPU fd.
    Running,
    /// Blocked on its event channel, fd released.
    Paused,
    /// The thread has ended (or is about to).
    Finished,
}

/// The state machine: the state after `event` and the acknowledgement to send.
/// `Finished` is final.
pub(crate) fn on_event(state: RunState, event: VcpuEvent) -> (RunState, VcpuResponse) {
    match (state, event) {
        (RunState::Finished, _) | (_, VcpuEvent::Finish) => {
            (RunState::Finished, VcpuResponse::Finished)
        }
        (_, VcpuEvent::Pause) => (RunState::Paused, VcpuResponse::Paused),
        (_, VcpuEvent::Resume) => (RunState::Running, VcpuResponse::Resumed),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vCPU's fd and the VMM side of its workload.
pub(crate) struct VcpuSlot {
    /// Held by the vCPU thread while running; by the VM (save, restore, verify) while paused.
    pub(crate) fd: Mutex<VcpuFd>,
    pub(crate) workload: Mutex<WorkloadVcpuState>,
}

/// The workload a VM runs and how its working set is split between vCPUs.
pub(crate) struct WorkloadLayout {
    pub(crate) spec: WorkloadSpec,
    pub(crate) slices: Vec<Slice>,
}

/// What the vCPU threads of a VM share with it.
pub(crate) struct VcpuShared {
    pub(crate) vcpus: Vec<VcpuSlot>,
    /// Written only by `restore_state` before any vCPU thread exists; read per batch.
    pub(crate) workload: RwLock<WorkloadLayout>,
    failed: AtomicBool,
    failure: Mutex<Option<VcpuFailure>>,
}

impl VcpuShared {
    pub(crate) fn new(vcpus: Vec<VcpuSlot>, workload: WorkloadLayout) -> Self {
        VcpuShared {
            vcpus,
            workload: RwLock::new(workload),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// Why the VM failed, if a vCPU did.
    pub(crate) fn failure(&self) -> Option<VcpuFailure> {
        lock(&self.failure).clone()
    }

    fn fail(&self, failure: VcpuFailure) {
        lock(&self.failure).get_or_insert(failure);
        self.failed.store(true, Ordering::SeqCst);
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Signal(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// A vCPU thread's own end of the channels.
pub(crate) struct VcpuThread {
    pub(crate) idx: usize,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) events: Receiver<VcpuEvent>,
    pub(crate) responses: Sender<(usize, VcpuResponse)>,
    pub(crate) pacer: Pacer,
}

impl VcpuThread {
    /// The thread body: starts paused, ends in `Finished`.
    pub(crate) fn run(mut self) {
        let mut state = RunState::Paused;
        while state != RunState::Finished {
            let event = match state {
                RunState::Running => self.running(),
                // A closed channel means the VM is gone.
                _ => Ok(self.events.recv().unwrap_or(VcpuEvent::Finish)),
            };
            let response = match event {
                Ok(event) => {
                    let (next, response) = on_event(state, event);
                    if state == RunState::Running && next != RunState::Running {
                        // A resumed VM must not burst to catch up on the paused time.
                        self.pacer.reset();
                    }
                    state = next;
                    response
                }
                Err(failure) => {
                    tracing::error!(vcpu = self.idx, "{failure}");
                    self.shared.fail(failure.clone());
                    state = RunState::Finished;
                    VcpuResponse::Failed(failure)
                }
            };
            // Nobody listening means the VM is being dropped; the thread ends anyway.
            let _ = self.responses.send((self.idx, response));
        }
    }

    /// The next event for a running vCPU: a command, or `Finish` when the VM is gone or
    /// another vCPU failed.
    fn poll_event(&self) -> Option<VcpuEvent> {
        match self.events.try_recv() {
            Ok(e) => Some(e),
            Err(TryRecvError::Disconnected) => Some(VcpuEvent::Finish),
            Err(TryRecvError::Empty) => self
                .shared
                .failed
                .load(Ordering::SeqCst)
                .then_some(VcpuEvent::Finish),
        }
    }

    /// Waits up to `timeout` for an event.
    fn wait_event(&self, timeout: Duration) -> Option<VcpuEvent> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Disconnected) => Some(VcpuEvent::Finish),
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// Runs the vCPU until an event arrives. Unexpected exits are errors, never panics.
    fn running(&mut self) -> Result<VcpuEvent, VcpuFailure> {
        let shared = Arc::clone(&self.shared);
        let mut fd = lock(&shared.vcpus[self.idx].fd);
        let mut pending_io = false;
        let mut pending_event = None;
        loop {
            if let Some(event) = pending_event.take().or_else(|| self.poll_event()) {
                if pending_io {
                    complete_io(&mut fd)
                        .map_err(|e| self.failure(&fd, VcpuFailCause::CompleteIo(e)))?;
                }
                return Ok(event);
            }
            pending_io = false;
            let cause = match fd.run() {
                Ok(VcpuExit::IoIn(port, data))
                    if port == guest::MAILBOX_PORT && data.len() == 4 =>
                {
                    let (count, event) = self.mailbox();
                    data.copy_from_slice(&count.to_le_bytes());
                    pending_io = true;
                    pending_event = event;
                    continue;
                }
                Ok(VcpuExit::Hlt) => {
                    pending_event = self.wait_event(HEARTBEAT);
                    if pending_event.is_none() {
                        lock(&shared.vcpus[self.idx].workload).heartbeats += 1;
                    }
                    continue;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => VcpuFailCause::Run(e),
                Ok(exit) => VcpuFailCause::UnexpectedExit(format!("{exit:?}")),
            };
            return Err(self.failure(&fd, cause));
        }
    }

    fn failure(&self, fd: &VcpuFd, cause: VcpuFailCause) -> VcpuFailure {
        VcpuFailure {
            vcpu: self.idx,
            rip: fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX),
            cause,
        }
    }

    /// The VMM side of the mailbox: confirms the previous batch, paces and grants the next
    /// one. An event during the pacing wait grants 0 pages and is returned.
    fn mailbox(&mut self) -> (u32, Option<VcpuEvent>) {
        let slot = &self.shared.vcpus[self.idx];
        let layout = self
            .shared
            .workload
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let rate = layout.spec.rate as f64 / self.shared.vcpus.len() as f64;
        let grant = next_grant(
            &mut lock(&slot.workload),
            &layout.spec,
            &layout.slices[self.idx],
            rate,
        );
        if let Grant::Pages { issued, batch } = grant {
            if rate > 0.0 {
                let due = self.pacer.due(Instant::now(), issued, rate);
                let wait = due.saturating_duration_since(Instant::now());
                let event = if wait.is_zero() {
                    self.poll_event()
                } else {
                    self.wait_event(wait)
                };
                if event.is_some() {
                    return (0, event);
                }
            }
            lock(&slot.workload).in_flight = batch;
        }
        (grant.mailbox_value(), None)
    }
}

/// Completes the `in` KVM is holding (it writes eax and advances RIP on the next KVM_RUN),
/// so saved registers never miss a half-done instruction.
fn complete_io(fd: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() != libc::EINTR => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_resume_and_finish_follow_the_state_machine() {
        use RunState::*;
        use VcpuEvent::*;
        let cases = [
            (Running, Pause, Paused, VcpuResponse::Paused),
            (Paused, Pause, Paused, VcpuResponse::Paused),
            (Paused, Resume, Running, VcpuResponse::Resumed),
            (Running, Resume, Running, VcpuResponse::Resumed),
            (Running, Finish, Finished, VcpuResponse::Finished),
            (Paused, Finish, Finished, VcpuResponse::Finished),
            (Finished, Resume, Finished, VcpuResponse::Finished),
            (Finished, Pause, Finished, VcpuResponse::Finished),
        ];
        for (from, event, to, ack) in cases {
            assert_eq!(on_event(from, event), (to, ack), "{from:?} + {event:?}");
        }
    }

    fn shared() -> Arc<VcpuShared> {
        let spec: WorkloadSpec = "idle".parse().expect("spec");
        let slices = guest::slices(&spec, 16 << 20, 1);
        Arc::new(VcpuShared::new(Vec::new(), WorkloadLayout { spec, slices }))
    }

    /// A paused thread needs no vCPU fd: drive one through its channel.
    #[test]
    fn a_paused_thread_acknowledges_every_event_and_ends_on_finish() {
        let (tx, events) = std::sync::mpsc::channel();
        let (responses, rx) = std::sync::mpsc::channel();
        let thread = VcpuThread {
            idx: 3,
            shared: shared(),
            events,
            responses,
            pacer: Pacer::default(),
        };
        let h = std::thread::spawn(move || thread.run());
        tx.send(VcpuEvent::Pause).expect("send");
        assert_eq!(rx.recv().expect("ack"), (3, VcpuResponse::Paused));
        tx.send(VcpuEvent::Finish).expect("send");
        assert_eq!(rx.recv().expect("ack"), (3, VcpuResponse::Finished));
        h.join().expect("thread ends");
        assert!(rx.recv().is_err(), "nothing after Finished");
    }

    #[test]
    fn a_paused_thread_ends_when_the_vm_drops_its_channel() {
        let (tx, events) = std::sync::mpsc::channel();
        let (responses, rx) = std::sync::mpsc::channel();
        let thread = VcpuThread {
            idx: 0,
            shared: shared(),
            events,
            responses,
            pacer: Pacer::default(),
        };
        let h = std::thread::spawn(move || thread.run());
        drop(tx);
        assert_eq!(rx.recv().expect("ack"), (0, VcpuResponse::Finished));
        h.join().expect("thread ends");
    }

    #[test]
    fn a_failure_is_recorded_once_and_kept() {
        let s = shared();
        assert_eq!(s.failure(), None);
        let failure = |vcpu| VcpuFailure {
            vcpu,
            rip: 0x8000,
            cause: VcpuFailCause::UnexpectedExit("Shutdown".into()),
        };
        s.fail(failure(1));
        s.fail(failure(2));
        assert_eq!(s.failure(), Some(failure(1)));
        assert_eq!(
            failure(1).to_string(),
            "vCPU 1: unexpected exit Shutdown at rip 0x8000"
        );
        assert!(s.failed.load(Ordering::SeqCst));
    }
}
