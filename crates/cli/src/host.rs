//! One `fastmig` process's VM and what it is doing: running, migrating out, or receiving a
//! migration. The control socket ([`crate::api`]) turns requests into calls on a [`Host`].
//!
//! ```text
//!  run:      Running ──migrate──► (active) ──ok──► postmigrate (paused, never resumed here)
//!                                    ├──error/cancel──► Running again (the engine resumes it)
//!                                    └──Commit sent, no Resumed──► paused, in-doubt (an operator
//!                                        checks the destination, then `cont` here or not)
//!  incoming: inmigrate (no VM or an empty one) ──receive ok──► Running
//!                                              └──error──► process exits, VM never resumed
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use fastmig_migration::{
    CancelToken, Endpoint, MigrateOptions, MigrationError, OnNoConverge, Progress, TransportKind,
};
use fastmig_vmm::{Vm, VmRunState};
use serde_json::{json, Map, Value};

use crate::kvm_adapter::KvmMigratable;

/// What an outgoing migration is doing, as `query-migrate` reports it.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// No migration was started.
    None,
    /// In flight.
    Active {
        /// Cancels it.
        cancel: CancelToken,
        /// Last progress report, if any.
        progress: Option<Progress>,
    },
    /// Done: the destination runs the VM; it stays paused here.
    Completed(Value),
    /// `Commit` was sent but no `Resumed` came back: the VM is paused here and may run on the
    /// destination. Only an operator who checked the destination may `cont` it here.
    InDoubt(String),
    /// Failed or cancelled: the VM runs here again.
    Failed {
        /// True when it was `migrate-cancel`.
        cancelled: bool,
        /// One line saying what failed.
        error: String,
    },
}

/// A process's VM, shared by the control socket, the main thread and migration threads.
pub struct Host {
    vm: RwLock<Option<Arc<Vm>>>,
    outgoing: Mutex<Outgoing>,
    incoming: AtomicBool,
    /// An incoming host's migration listener is bound (a source may connect now).
    listening: AtomicBool,
    /// Set by `quit`.
    pub quit: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A control command's failure: an error class and a description.
pub struct CommandError {
    /// QMP-like class, `GenericError` or `CommandNotFound`.
    pub class: &'static str,
    /// What went wrong.
    pub desc: String,
}

impl CommandError {
    fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl Host {
    /// A host running `vm`.
    pub fn running(vm: Arc<Vm>) -> Arc<Host> {
        Arc::new(Host {
            vm: RwLock::new(Some(vm)),
            outgoing: Mutex::new(Outgoing::None),
            incoming: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            quit: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A host waiting for an incoming migration (its VM, if already built, is set later).
    pub fn incoming() -> Arc<Host> {
        Arc::new(Host {
            vm: RwLock::new(None),
            outgoing: Mutex::new(Outgoing::None),
            incoming: AtomicBool::new(true),
            listening: AtomicBool::new(false),
            quit: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sets (or replaces) the VM.
    pub fn set_vm(&self, vm: Arc<Vm>) {
        *self.vm.write().unwrap_or_else(|p| p.into_inner()) = Some(vm);
    }

    /// Marks the incoming host as ready for a source to connect.
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

    fn need_vm(&self) -> Result<Arc<Vm>, CommandError> {
        self.vm()
            .ok_or_else(|| CommandError::generic("no VM yet: waiting for an incoming migration"))
    }

    /// True once the VM has migrated away (it must never run here again).
    pub fn migrated_away(&self) -> bool {
        matches!(*lock(&self.outgoing), Outgoing::Completed(_))
    }

    fn migrating(&self) -> bool {
        matches!(*lock(&self.outgoing), Outgoing::Active { .. })
    }

    /// Runs one control command.
    pub fn execute(
        self: &Arc<Self>,
        cmd: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let no_args = || {
            if args.is_empty() {
                Ok(())
            } else {
                Err(CommandError::generic(format!("{cmd} takes no arguments")))
            }
        };
        match cmd {
            "query-status" => {
                no_args()?;
                Ok(self.query_status())
            }
            "query-vm" => {
                no_args()?;
                let vm = self.need_vm()?;
                let c = vm.config();
                Ok(json!({
                    "mem_size": c.mem_size,
                    "vcpus": c.vcpus,
                    "workload": c.workload.to_string(),
                }))
            }
            "stop" => {
                no_args()?;
                if self.migrating() {
                    return Err(CommandError::generic(
                        "a migration is in progress: cancel it first (migrate-cancel)",
                    ));
                }
                let vm = self.need_vm()?;
                vm.pause()
                    .map(|()| json!({}))
                    .map_err(|e| CommandError::generic(e.to_string()))
            }
            "cont" => {
                no_args()?;
                if self.migrated_away() {
                    return Err(CommandError::generic(
                        "the VM has migrated to the destination; resuming it here too would run it twice",
                    ));
                }
                if self.migrating() {
                    return Err(CommandError::generic("a migration is in progress"));
                }
                let vm = self.need_vm()?;
                vm.resume()
                    .map(|()| json!({}))
                    .map_err(|e| CommandError::generic(e.to_string()))
            }
            "quit" => {
                no_args()?;
                if let Outgoing::Active { cancel, .. } = &*lock(&self.outgoing) {
                    cancel.cancel();
                }
                self.quit.store(true, Ordering::SeqCst);
                Ok(json!({}))
            }
            "verify-memory" => {
                no_args()?;
                if self.migrating() {
                    return Err(CommandError::generic("a migration is in progress"));
                }
                let vm = self.need_vm()?;
                // A migrated-away VM is paused for good; checking it is still meaningful.
                vm.verify_memory()
                    .map_err(|e| CommandError::generic(e.to_string()))
                    .and_then(|r| {
                        serde_json::to_value(r).map_err(|e| CommandError::generic(e.to_string()))
                    })
            }
            "migrate" => self.start_migration(args),
            "query-migrate" => {
                no_args()?;
                Ok(self.query_migrate())
            }
            "migrate-cancel" => {
                no_args()?;
                match &*lock(&self.outgoing) {
                    Outgoing::Active { cancel, .. } => {
                        cancel.cancel();
                        Ok(json!({}))
                    }
                    _ => Err(CommandError::generic("no migration in progress")),
                }
            }
            other => Err(CommandError {
                class: "CommandNotFound",
                desc: format!("the command {other} has not been found"),
            }),
        }
    }

    fn query_status(&self) -> Value {
        let listening = self.listening.load(Ordering::SeqCst);
        let Some(vm) = self.vm() else {
            return json!({
                "status": "inmigrate",
                "listening": listening,
                "progress": 0,
                "dirty_rate_pps": 0.0,
            });
        };
        let s = vm.status();
        let name = if self.incoming.load(Ordering::SeqCst) {
            "inmigrate"
        } else if self.migrated_away() {
            "postmigrate"
        } else {
            s.state.name()
        };
        let mut v = json!({
            "status": name,
            "progress": s.progress,
            "dirty_rate_pps": s.dirty_rate_pps,
            "pages_written": s.pages_written,
            "heartbeats": s.heartbeats,
            "migrating": self.migrating(),
        });
        if let VmRunState::Failed(why) = &s.state {
            v["error"] = json!(why);
        }
        if name == "inmigrate" {
            v["listening"] = json!(listening);
        }
        v
    }

    fn query_migrate(&self) -> Value {
        match &*lock(&self.outgoing) {
            Outgoing::None => json!({"status": "none"}),
            Outgoing::Active { progress, .. } => json!({"status": "active", "progress": progress}),
            Outgoing::Completed(summary) => json!({"status": "completed", "summary": summary}),
            Outgoing::InDoubt(error) => json!({"status": "in-doubt", "error": error}),
            Outgoing::Failed { cancelled, error } => json!({
                "status": if *cancelled { "cancelled" } else { "failed" },
                "error": error,
            }),
        }
    }

    fn start_migration(self: &Arc<Self>, args: &Map<String, Value>) -> Result<Value, CommandError> {
        let vm = self.need_vm()?;
        if self.incoming.load(Ordering::SeqCst) {
            return Err(CommandError::generic("this VM is still being received"));
        }
        if self.migrated_away() {
            return Err(CommandError::generic(
                "the VM has already migrated away (it runs on the destination)",
            ));
        }
        let opts = MigrationRequest::from_args(args).map_err(CommandError::generic)?;
        let endpoint: Endpoint = opts
            .uri
            .parse()
            .map_err(|e: fastmig_migration::BadEndpoint| CommandError::generic(e.to_string()))?;
        if vm.status().state != VmRunState::Running {
            return Err(CommandError::generic(format!(
                "only a running VM can migrate (it is {})",
                vm.status().state.name()
            )));
        }
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
        let host = Arc::clone(self);
        let progress_host = Arc::clone(self);
        let engine_opts = MigrateOptions {
            transport: opts.transport,
            downtime_limit: opts.downtime_limit,
            max_rounds: opts.max_rounds,
            on_no_converge: opts.on_no_converge,
            bandwidth_limit: opts.max_bandwidth,
            connect_timeout: opts.timeout.min(Duration::from_secs(10)),
            io_timeout: opts.timeout,
            ack_timeout: opts.timeout.max(Duration::from_secs(30)),
            cancel,
            progress: Some(Arc::new(move |p: &Progress| {
                if let Outgoing::Active { progress, .. } = &mut *lock(&progress_host.outgoing) {
                    *progress = Some(p.clone());
                }
            })),
            ..MigrateOptions::default()
        };
        let spawned = std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || {
                let adapter = KvmMigratable::new(vm);
                let result = fastmig_migration::migrate(&adapter, &endpoint, &engine_opts);
                let next = match result {
                    Ok(summary) => {
                        let mut v = serde_json::to_value(&summary).unwrap_or(Value::Null);
                        v["status"] = json!("completed");
                        v["forced"] = json!(matches!(
                            summary.status,
                            fastmig_migration::MigrationStatus::CompletedForced
                        ));
                        tracing::info!("migration completed; the VM now runs on the destination");
                        Outgoing::Completed(v)
                    }
                    Err(e @ MigrationError::InDoubt(_)) => {
                        let error = crate::error::one_line(&anyhow::Error::new(e));
                        tracing::error!("migration in doubt: {error}");
                        Outgoing::InDoubt(error)
                    }
                    Err(e) => {
                        let cancelled = matches!(e, MigrationError::Cancelled);
                        let error = crate::error::one_line(&anyhow::Error::new(e));
                        tracing::warn!("migration failed: {error}");
                        Outgoing::Failed { cancelled, error }
                    }
                };
                *lock(&host.outgoing) = next;
            });
        if let Err(e) = spawned {
            *lock(&self.outgoing) = Outgoing::None;
            return Err(CommandError::generic(format!(
                "cannot start a migration thread: {e}"
            )));
        }
        Ok(json!({}))
    }
}

/// The arguments of the `migrate` control command.
#[derive(Debug, Clone)]
pub struct MigrationRequest {
    /// Destination: `host:port` or `unix:/path`.
    pub uri: String,
    /// Transport.
    pub transport: TransportKind,
    /// Downtime limit.
    pub downtime_limit: Duration,
    /// Bandwidth cap, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Policy when rounds stop converging.
    pub on_no_converge: OnNoConverge,
    /// I/O timeout: a peer silent this long fails the migration.
    pub timeout: Duration,
}

impl MigrationRequest {
    /// Reads the `migrate` arguments: `uri` (required), `transport` (`classic`), `streams`,
    /// `downtime_limit_ms` (30), `max_bandwidth` (bytes/s), `max_rounds` (30),
    /// `on_no_converge` (`wait`|`force`|`abort`), `timeout_ms` (10000).
    pub fn from_args(args: &Map<String, Value>) -> Result<Self, String> {
        const KNOWN: &[&str] = &[
            "uri",
            "transport",
            "streams",
            "downtime_limit_ms",
            "max_bandwidth",
            "max_rounds",
            "on_no_converge",
            "timeout_ms",
        ];
        if let Some(k) = args.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("migrate: unknown argument `{k}`"));
        }
        let uri = args
            .get("uri")
            .and_then(Value::as_str)
            .ok_or("migrate: missing string argument `uri`")?
            .to_string();
        let num = |k: &str| -> Result<Option<u64>, String> {
            match args.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| format!("migrate: `{k}` must be a non-negative integer")),
            }
        };
        let name = args
            .get("transport")
            .and_then(Value::as_str)
            .unwrap_or("classic");
        let mut transport: TransportKind = name
            .parse()
            .map_err(|e: fastmig_migration::transport::BadTransport| e.to_string())?;
        if let Some(n) = num("streams")? {
            if n == 0 || n > 64 {
                return Err("migrate: `streams` must be 1..=64".into());
            }
            match &mut transport {
                TransportKind::MultiTcp { streams } => *streams = n as u32,
                _ => return Err("migrate: `streams` only applies to multi-tcp".into()),
            }
        }
        let on_no_converge = match args.get("on_no_converge").and_then(Value::as_str) {
            None | Some("wait") => OnNoConverge::Wait,
            Some("force") => OnNoConverge::Force,
            Some("abort") => OnNoConverge::Abort,
            Some(other) => {
                return Err(format!(
                    "migrate: on_no_converge `{other}` is not wait, force or abort"
                ))
            }
        };
        let max_rounds = num("max_rounds")?.unwrap_or(30);
        if max_rounds < 2 {
            return Err("migrate: `max_rounds` must be at least 2".into());
        }
        let timeout_ms = num("timeout_ms")?.unwrap_or(10_000).max(100);
        Ok(MigrationRequest {
            uri,
            transport,
            downtime_limit: Duration::from_millis(num("downtime_limit_ms")?.unwrap_or(30)),
            max_bandwidth: num("max_bandwidth")?.filter(|&b| b > 0),
            max_rounds: max_rounds as u32,
            on_no_converge,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn migrate_arguments_are_checked() {
        let r = MigrationRequest::from_args(&args(json!({
            "uri": "127.0.0.1:4444", "transport": "multi-tcp", "streams": 3,
            "downtime_limit_ms": 50, "on_no_converge": "force"
        })))
        .expect("valid");
        assert_eq!(r.transport, TransportKind::MultiTcp { streams: 3 });
        assert_eq!(r.downtime_limit, Duration::from_millis(50));
        assert_eq!(r.on_no_converge, OnNoConverge::Force);
        for bad in [
            json!({}),
            json!({"uri": 5}),
            json!({"uri": "x", "transport": "carrier-pigeon"}),
            json!({"uri": "x", "streams": 2}),
            json!({"uri": "x", "transport": "multi-tcp", "streams": 0}),
            json!({"uri": "x", "on_no_converge": "maybe"}),
            json!({"uri": "x", "downtime_limit_ms": -1}),
            json!({"uri": "x", "bogus": 1}),
        ] {
            assert!(
                MigrationRequest::from_args(&args(bad.clone())).is_err(),
                "{bad}"
            );
        }
    }
}
