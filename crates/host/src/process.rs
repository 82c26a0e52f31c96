//! One VM process's state: its VM and what it is doing (running, migrating out, receiving a
//! migration), and the execution of control commands against it.
//!
//! ```text
//!  run:      running ──migrate──► (migrating) ──ok──► postmigrate (paused here for good)
//!                                     ├──error/cancel──► running again (the engine resumes it)
//!                                     └──Commit sent, no Resumed──► paused, in-doubt (an operator
//!                                        checks the destination, then `cont` here or `quit`)
//!  incoming: inmigrate (no VM or an empty one) ──receive ok──► running
//!                                              └──error──► process exits, VM never resumed
//! ```
//!
//! A VM that migrated away is never resumed here (`cont` and a second `migrate` are refused),
//! so it never runs on two hosts; a failed or cancelled migration leaves it running here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use fastmig_migration::{
    CancelToken, Endpoint, MigrateOptions, MigrationError, MigrationSummary, Progress,
};
use fastmig_vmm::{Vm, VmRunState};

use crate::command::{
    Command, CommandError, Empty, MigrateState, MigrationRequest, Return, RunStatus, SetDirtyRate,
    StatusInfo, VmInfo,
};
use crate::kvm_adapter::KvmMigratable;

/// What the control server needs from a process: run one command.
pub trait Handler: Send + Sync {
    /// Runs `command` and returns its result or why it failed.
    fn execute(&self, command: Command) -> Result<Return, CommandError>;
}

/// The outgoing migration.
#[derive(Clone)]
enum Outgoing {
    None,
    Active {
        cancel: CancelToken,
        progress: Option<Progress>,
    },
    Completed(MigrationSummary),
    /// `Commit` was sent but no `Resumed` came back: the VM is paused here and may run on the
    /// destination. Only an operator who checked the destination may `cont` it here.
    InDoubt(String),
    Failed {
        cancelled: bool,
        error: String,
    },
}

/// A process's VM, shared by the control socket, the main thread and migration threads.
pub struct VmProcess {
    /// Itself, for the migration thread (set by the constructors).
    this: std::sync::Weak<VmProcess>,
    vm: RwLock<Option<Arc<Vm>>>,
    outgoing: Mutex<Outgoing>,
    incoming: AtomicBool,
    /// An incoming process's migration listener is bound (a source may connect now).
    listening: AtomicBool,
    quit: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmProcess {
    fn new(vm: Option<Arc<Vm>>, incoming: bool) -> Arc<VmProcess> {
        Arc::new_cyclic(|this| VmProcess {
            this: this.clone(),
            vm: RwLock::new(vm),
            outgoing: Mutex::new(Outgoing::None),
            incoming: AtomicBool::new(incoming),
            listening: AtomicBool::new(false),
            quit: AtomicBool::new(false),
        })
    }

    /// A process running `vm`.
    pub fn running(vm: Arc<Vm>) -> Arc<VmProcess> {
        Self::new(Some(vm), false)
    }

    /// A process waiting for an incoming migration (its VM, if built early, is set later).
    pub fn incoming() -> Arc<VmProcess> {
        Self::new(None, true)
    }

    /// Sets (or replaces) the VM.
    pub fn set_vm(&self, vm: Arc<Vm>) {
        *self.vm.write().unwrap_or_else(|p| p.into_inner()) = Some(vm);
    }

    /// Marks the incoming process as ready for a source to connect.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    /// Marks the incoming migration as finished (the VM runs).
    pub fn incoming_done(&self) {
        self.incoming.store(false, Ordering::SeqCst);
    }

    /// The VM, if there is one yet.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True once `quit` was received.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }

    /// True once the VM has migrated away (it must never run here again).
    pub fn migrated_away(&self) -> bool {
        matches!(*lock(&self.outgoing), Outgoing::Completed(_))
    }

    fn migrating(&self) -> bool {
        matches!(*lock(&self.outgoing), Outgoing::Active { .. })
    }

    fn need_vm(&self) -> Result<Arc<Vm>, CommandError> {
        self.vm()
            .ok_or_else(|| CommandError::generic("no VM yet: waiting for an incoming migration"))
    }

    fn query_status(&self) -> StatusInfo {
        let listening = Some(self.listening.load(Ordering::SeqCst));
        let Some(vm) = self.vm() else {
            return StatusInfo {
                status: RunStatus::Inmigrate,
                progress: 0,
                dirty_rate_pps: 0.0,
                working_set_pages: None,
                pages_written: None,
                heartbeats: None,
                migrating: false,
                listening,
                error: None,
            };
        };
        let s = vm.status();
        let status = if self.incoming.load(Ordering::SeqCst) {
            RunStatus::Inmigrate
        } else if self.migrated_away() {
            RunStatus::Postmigrate
        } else {
            match s.state {
                VmRunState::Created => RunStatus::Created,
                VmRunState::Incoming => RunStatus::Inmigrate,
                VmRunState::Running => RunStatus::Running,
                VmRunState::Paused => RunStatus::Paused,
                VmRunState::Stopped => RunStatus::Stopped,
                VmRunState::Failed(_) => RunStatus::Failed,
            }
        };
        StatusInfo {
            status,
            progress: s.progress,
            dirty_rate_pps: s.dirty_rate_pps,
            working_set_pages: Some(s.working_set_pages),
            pages_written: Some(s.pages_written),
            heartbeats: Some(s.heartbeats),
            migrating: self.migrating(),
            listening: (status == RunStatus::Inmigrate)
                .then_some(listening)
                .flatten(),
            error: match s.state {
                VmRunState::Failed(why) => Some(why),
                _ => None,
            },
        }
    }

    fn query_migrate(&self) -> MigrateState {
        match &*lock(&self.outgoing) {
            Outgoing::None => MigrateState::None,
            Outgoing::Active { progress, .. } => MigrateState::Active {
                progress: progress.clone(),
            },
            Outgoing::Completed(summary) => MigrateState::Completed {
                summary: summary.clone(),
            },
            Outgoing::InDoubt(error) => MigrateState::InDoubt {
                error: error.clone(),
            },
            Outgoing::Failed {
                cancelled: true,
                error,
            } => MigrateState::Cancelled {
                error: error.clone(),
            },
            Outgoing::Failed { error, .. } => MigrateState::Failed {
                error: error.clone(),
            },
        }
    }

    fn start_migration(&self, req: &MigrationRequest) -> Result<(), CommandError> {
        let vm = self.need_vm()?;
        if self.incoming.load(Ordering::SeqCst) {
            return Err(CommandError::generic("this VM is still being received"));
        }
        if self.migrated_away() {
            return Err(CommandError::generic(
                "the VM has already migrated away (it runs on the destination)",
            ));
        }
        let endpoint = req.validate()?;
        if vm.status().state != VmRunState::Running {
            return Err(CommandError::generic(format!(
                "only a running VM can migrate (it is {})",
                vm.status().state.name()
            )));
        }
        let this = self
            .this
            .upgrade()
            .ok_or_else(|| CommandError::generic("the process is shutting down"))?;
        let cancel = CancelToken::new();
        {
            let mut out = lock(&self.outgoing);
            match &*out {
                Outgoing::Active { .. } => {
                    return Err(CommandError::generic("a migration is already in progress"))
                }
                Outgoing::Completed(_) => {
                    return Err(CommandError::generic("the VM has already migrated away"))
                }
                _ => {}
            }
            *out = Outgoing::Active {
                cancel: cancel.clone(),
                progress: None,
            };
        }
        let progress_to = Arc::clone(&this);
        let mut opts = req.engine_options();
        opts.cancel = cancel;
        opts.progress = Some(Arc::new(move |p: &Progress| {
            if let Outgoing::Active { progress, .. } = &mut *lock(&progress_to.outgoing) {
                *progress = Some(p.clone());
            }
        }));
        let tls = req.tls.clone();
        let spawned = std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || {
                let adapter = KvmMigratable::new(vm);
                let result = match &tls {
                    None => fastmig_migration::migrate(&adapter, &endpoint, &opts),
                    Some(files) => migrate_tls(&adapter, &endpoint, &opts, files),
                };
                let next = match result {
                    Ok(summary) => {
                        tracing::info!("migration completed; the VM now runs on the destination");
                        Outgoing::Completed(summary)
                    }
                    Err(e @ MigrationError::InDoubt(_)) => {
                        let error = error_line(&e);
                        tracing::error!("migration in doubt: {error}");
                        Outgoing::InDoubt(error)
                    }
                    Err(e) => {
                        let cancelled = matches!(e, MigrationError::Cancelled);
                        let error = error_line(&e);
                        tracing::warn!("migration failed: {error}");
                        Outgoing::Failed { cancelled, error }
                    }
                };
                *lock(&this.outgoing) = next;
            });
        if let Err(e) = spawned {
            *lock(&self.outgoing) = Outgoing::None;
            return Err(CommandError::generic(format!(
                "cannot start a migration thread: {e}"
            )));
        }
        Ok(())
    }
}

/// Migrates through a mutual-TLS tunnel to `endpoint` (TCP); a TLS refusal is the error.
fn migrate_tls(
    vm: &KvmMigratable,
    endpoint: &Endpoint,
    opts: &MigrateOptions,
    files: &fastmig_migration::tls::TlsFiles,
) -> Result<fastmig_migration::MigrationSummary, MigrationError> {
    use fastmig_migration::tls::{client_config, SourceTunnel};
    let setup = |reason: String| MigrationError::TransportSetup {
        reason,
        source: None,
    };
    let Endpoint::Tcp(addr) = endpoint else {
        return Err(setup("TLS needs a host:port destination".into()));
    };
    let config = client_config(files).map_err(|e| setup(error_line(&e)))?;
    let tunnel = SourceTunnel::start(*addr, config).map_err(|e| setup(error_line(&e)))?;
    fastmig_migration::migrate(vm, tunnel.endpoint(), opts).map_err(|e| tunnel.explain(e))
}

/// An error and its sources on one line, `outer: cause: root cause`, without repeating a
/// cause the outer message already spells out.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string().replace('\n', " ");
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

impl Handler for VmProcess {
    fn execute(&self, command: Command) -> Result<Return, CommandError> {
        let failed = |e: fastmig_vmm::VmmError| CommandError::generic(error_line(&e));
        let empty = Return::Empty(Empty {});
        match command {
            Command::QueryStatus => Ok(Return::Status(self.query_status())),
            Command::QueryVm => {
                let vm = self.need_vm()?;
                let c = vm.config();
                Ok(Return::Vm(VmInfo {
                    mem_size: c.mem_size,
                    vcpus: c.vcpus,
                    workload: c.workload.to_string(),
                }))
            }
            Command::Stop => {
                if self.migrating() {
                    return Err(CommandError::generic(
                        "a migration is in progress: cancel it first (migrate-cancel)",
                    ));
                }
                self.need_vm()?.pause().map_err(failed)?;
                Ok(empty)
            }
            Command::Cont => {
                if self.migrated_away() {
                    return Err(CommandError::generic(
                        "the VM has migrated to the destination; resuming it here too would run it twice",
                    ));
                }
                if self.migrating() {
                    return Err(CommandError::generic("a migration is in progress"));
                }
                self.need_vm()?.resume().map_err(failed)?;
                Ok(empty)
            }
            Command::Quit => {
                if let Outgoing::Active { cancel, .. } = &*lock(&self.outgoing) {
                    cancel.cancel();
                }
                self.quit.store(true, Ordering::SeqCst);
                Ok(empty)
            }
            Command::VerifyMemory => {
                if self.migrating() {
                    return Err(CommandError::generic("a migration is in progress"));
                }
                // A migrated-away VM is paused for good; checking it is still meaningful.
                let report = self.need_vm()?.verify_memory().map_err(failed)?;
                Ok(Return::Verify(report))
            }
            Command::Migrate(req) => {
                self.start_migration(&req)?;
                Ok(empty)
            }
            Command::QueryMigrate => Ok(Return::Migrate(Box::new(self.query_migrate()))),
            Command::SetDirtyRate(SetDirtyRate { pages_per_s }) => {
                self.need_vm()?
                    .set_workload_rate(pages_per_s)
                    .map_err(failed)?;
                Ok(empty)
            }
            Command::MigrateCancel => match &*lock(&self.outgoing) {
                Outgoing::Active { cancel, .. } => {
                    cancel.cancel();
                    Ok(empty)
                }
                _ => Err(CommandError::generic("no migration in progress")),
            },
        }
    }
}
