//! The host agent (`fastmig agent`): an HTTP server (axum) that starts, stops and migrates
//! the VM processes of one host, reports them, and enforces the host's standby state.
//!
//! ```text
//!  controller ──HTTP+token──► routes ──► Agent (state) ──ControlClient──► VM processes
//!                                 └─► migrate: watch_outgoing / watch_incoming tasks
//!  monitor (1 s): query-status of every VM, dirty rate from its demand, drops dead ones
//! ```
//!
//! Each VM is its own `fastmig run`/`incoming` process, started with `--daemonize` in its own
//! process group: it outlives the agent. On start the agent adopts the VMs still running in
//! `DATA_DIR/vms/` (those whose socket does not answer are dropped with a log line).
//!
//! On SIGTERM/SIGINT the agent stops accepting requests, lets the outgoing migrations in
//! flight finish for up to `shutdown_grace`, cancels those still running (a cancelled
//! migration leaves the VM on the source) and exits. It leaves the VM processes running,
//! incoming ones included: a restarted agent adopts them, so restarting an agent (an
//! upgrade) never stops a guest.
//!
//! It does not own the VM (the `fastmig` VM process), the migration protocol or the
//! decisions (the controller).

pub mod demand;
pub mod migrate;
pub mod routes;
pub mod state;
pub mod vmproc;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastmig_host::{ClientError, ControlClient, RunStatus};
use fastmig_vmm::{WorkloadKind, WorkloadSpec};

use crate::proto::{
    HostReport, HostState, MigrationPhase, MigrationRecord, Side, VmName, VmReport,
};
use state::{now_ms, MigEntry, VmEntry};
pub use state::{Agent, AgentConfig};
use vmproc::VmDir;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory cannot be created or read.
    #[error("data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The API address cannot be bound.
    #[error("listening on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving the API")]
    Serve(#[source] std::io::Error),
}

/// Errors a blocking task can end with, including its own panic.
pub(crate) trait FromJoin {
    /// The task panicked or was cancelled.
    fn from_join(e: tokio::task::JoinError) -> Self;
}

impl FromJoin for ClientError {
    fn from_join(e: tokio::task::JoinError) -> Self {
        ClientError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

impl FromJoin for vmproc::VmProcError {
    fn from_join(e: tokio::task::JoinError) -> Self {
        vmproc::VmProcError::Start(format!("the starting task failed: {e}"))
    }
}

/// Runs a closure that talks to a VM process on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static, E: FromJoin + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(E::from_join(e)),
    }
}

/// A VM's report from its entry (its last status and its demand now).
pub(crate) fn vm_report(entry: &VmEntry, now: u64) -> VmReport {
    let spec = &entry.meta.vm;
    let demand = entry
        .demand
        .at(now.saturating_sub(entry.meta.demand_epoch_ms));
    // Measured by the VM process (distinct pages dirtied over its last complete 5 s window).
    let working_set_bytes = entry
        .last
        .as_ref()
        .and_then(|s| s.working_set_pages)
        .unwrap_or(0)
        * fastmig_vmm::PAGE_SIZE as u64;
    VmReport {
        vm: spec.vm.clone(),
        status: entry.status(),
        mem_bytes: spec.mem_bytes,
        vcpus: spec.vcpus,
        mips: spec.mips,
        demand,
        dirty_rate_pps: entry.last.as_ref().map(|s| s.dirty_rate_pps).unwrap_or(0.0),
        working_set_bytes,
        workload: spec.workload.clone(),
        demand_source: spec.demand.clone(),
        demand_epoch_ms: Some(entry.meta.demand_epoch_ms),
    }
}

/// The host's report from the agent's state (statuses as the monitor last saw them).
pub fn build_report(agent: &Agent) -> HostReport {
    let now = now_ms();
    let mut inner = agent.lock();
    inner.prune();
    HostReport {
        host: agent.cfg.host.clone(),
        host_type: agent.cfg.host_type.clone(),
        state: inner.state,
        migration_address: agent.cfg.migration_address.to_string(),
        vms: inner.vms.values().map(|e| vm_report(e, now)).collect(),
        migrations: inner
            .migrations
            .values()
            .map(|m| m.record.clone())
            .collect(),
        time_ms: now,
    }
}

/// What adoption found that needs a task once the runtime runs.
enum Resume {
    Outgoing(crate::proto::MigrationId, VmName, ControlClient),
    Incoming(crate::proto::MigrationId, VmName, ControlClient, VmDir),
}

/// Adopts the VMs of `DATA_DIR/vms/` whose process still answers. Blocking.
fn adopt(agent: &Agent) -> Result<Vec<Resume>, AgentError> {
    let vms = vmproc::vms_dir(&agent.cfg.data_dir);
    let io = |source| AgentError::DataDir {
        path: vms.clone(),
        source,
    };
    std::fs::create_dir_all(&vms).map_err(io)?;
    let mut resume = Vec::new();
    for entry in std::fs::read_dir(&vms).map_err(io)? {
        let dir = VmDir(entry.map_err(io)?.path());
        let meta = match dir.read_meta() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(dir = %dir.0.display(), "not adopted, left in place: {e}");
                continue;
            }
        };
        let name = meta.vm.vm.clone();
        let alive = vmproc::connect(&dir, Duration::ZERO)
            .map_err(|e| e.to_string())
            .and_then(|c| c.query_status().map(|s| (c, s)).map_err(|e| e.to_string()));
        let (client, status) = match alive {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(vm = %name, "VM process gone, dropping it: {e}");
                dir.remove();
                continue;
            }
        };
        let demand = match demand::Demand::load(&meta.vm.demand) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(vm = %name, "its demand source: {e}; taken as constant 0");
                demand::Demand::Constant(0.0)
            }
        };
        let mut inner = agent.lock();
        for (m, side) in [
            (&meta.incoming, Side::Destination),
            (&meta.outgoing, Side::Source),
        ] {
            let Some(m) = m else { continue };
            let phase = match side {
                Side::Destination => MigrationPhase::Prepared,
                Side::Source => MigrationPhase::Running { progress: None },
            };
            inner.migrations.insert(
                m.migration,
                MigEntry {
                    record: MigrationRecord {
                        migration: m.migration,
                        vm: name.clone(),
                        side,
                        peer: m.peer.clone(),
                        transport: m.transport,
                        phase,
                    },
                    ended: None,
                },
            );
            resume.push(match side {
                Side::Destination => {
                    Resume::Incoming(m.migration, name.clone(), client.clone(), dir.clone())
                }
                Side::Source => Resume::Outgoing(m.migration, name.clone(), client.clone()),
            });
        }
        tracing::info!(vm = %name, status = %status.status, "VM adopted");
        inner.vms.insert(
            name,
            VmEntry {
                meta,
                dir,
                client,
                demand,
                last: Some(status),
                rate_set: None,
            },
        );
    }
    Ok(resume)
}

/// Every second: refreshes each VM's status, sets its dirty rate from its demand, and drops
/// VMs whose process has gone (outside migrations, which their own tasks follow).
async fn monitor(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now_ms();
        let vms: Vec<(VmName, VmEntry, bool)> = {
            let inner = agent.lock();
            inner
                .vms
                .iter()
                .map(|(n, e)| (n.clone(), e.clone(), inner.migrating(n)))
                .collect()
        };
        for (name, entry, migrating) in vms {
            let c = entry.client.clone();
            match blocking(move || c.query_status()).await {
                Ok(st) => {
                    let rate = follow_demand(&entry, &st.status, migrating, now).await;
                    let mut inner = agent.lock();
                    if let Some(e) = inner.vms.get_mut(&name) {
                        e.last = Some(st);
                        if rate.is_some() {
                            e.rate_set = rate;
                        }
                    }
                }
                Err(ClientError::Connect { .. }) if !migrating => {
                    tracing::warn!(vm = %name, "VM process gone: {}", entry.dir.last_log_line());
                    let mut inner = agent.lock();
                    if !inner.migrating(&name) && inner.vms.remove(&name).is_some() {
                        entry.dir.remove();
                    }
                }
                Err(e) => tracing::debug!(vm = %name, "query-status: {e}"),
            }
        }
    }
}

/// Sets a running paced VM's dirty rate to follow its demand (`pages/s = demand × 10,000`,
/// see [`demand`]); returns the rate set, if one was. Left alone during a migration (the
/// rate in force travels with the VM; the destination's agent sets the trace's rate once
/// the VM runs there) and for `idle`/`fill` guests, which have no rate.
async fn follow_demand(
    entry: &VmEntry,
    status: &RunStatus,
    migrating: bool,
    now: u64,
) -> Option<u64> {
    if *status != RunStatus::Running || migrating || entry.meta.incoming.is_some() {
        return None;
    }
    let paced = entry
        .meta
        .vm
        .workload
        .parse::<WorkloadSpec>()
        .is_ok_and(|w| matches!(w.kind, WorkloadKind::Dirty | WorkloadKind::Verify));
    if !paced {
        return None;
    }
    let rate = demand::dirty_rate_for(
        entry
            .demand
            .at(now.saturating_sub(entry.meta.demand_epoch_ms)),
    );
    if entry.rate_set == Some(rate) {
        return None;
    }
    let c = entry.client.clone();
    match blocking(move || c.set_dirty_rate(rate)).await {
        Ok(()) => Some(rate),
        Err(e) => {
            tracing::warn!(vm = %entry.meta.vm.vm, "set-dirty-rate {rate}: {e}");
            None
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; the agent stops only when killed");
            std::future::pending::<()>().await;
        }
    }
}

/// On the way out: lets outgoing migrations finish within the grace period, then cancels
/// the rest and waits for their VMs to run on this host again.
async fn drain(agent: &Arc<Agent>) {
    let outgoing = |agent: &Agent| -> Vec<(crate::proto::MigrationId, VmName)> {
        agent
            .lock()
            .migrations
            .values()
            .filter(|m| m.record.side == Side::Source && m.ended.is_none())
            .map(|m| (m.record.migration, m.record.vm.clone()))
            .collect()
    };
    let start = Instant::now();
    while !outgoing(agent).is_empty() && start.elapsed() < agent.cfg.shutdown_grace {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = outgoing(agent);
    for (id, vm) in &left {
        tracing::warn!(migration = %id, vm = %vm, "shutting down: cancelling the migration");
        let client = agent.lock().vms.get(vm).map(|e| e.client.clone());
        if let Some(c) = client {
            if let Err(e) = blocking(move || c.migrate_cancel()).await {
                tracing::warn!(vm = %vm, "migrate-cancel: {e}");
            }
        }
    }
    let start = Instant::now();
    while !outgoing(agent).is_empty() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the agent until SIGTERM or SIGINT. Blocking: it builds its own runtime.
pub fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AgentError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let state = if cfg.data_dir.join("standby").exists() {
        HostState::Standby
    } else {
        HostState::Active
    };
    let agent = Arc::new(Agent::new(cfg, state));
    let resume = adopt(&agent)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(async move {
        let addr = agent.cfg.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Bind { addr, source })?;
        for r in resume {
            match r {
                Resume::Outgoing(id, vm, c) => {
                    tokio::spawn(migrate::watch_outgoing(Arc::clone(&agent), id, vm, c));
                }
                Resume::Incoming(id, vm, c, d) => {
                    tokio::spawn(migrate::watch_incoming(Arc::clone(&agent), id, vm, c, d));
                }
            }
        }
        tokio::spawn(monitor(Arc::clone(&agent)));
        tracing::info!(%addr, host = %agent.cfg.host, "agent listening");
        let a = Arc::clone(&agent);
        axum::serve(listener, routes::router(Arc::clone(&agent)))
            .with_graceful_shutdown(async move {
                terminated().await;
                a.shutting_down.store(true, Ordering::SeqCst);
                tracing::info!("signal received: no new requests; draining migrations");
            })
            .await
            .map_err(AgentError::Serve)?;
        drain(&agent).await;
        tracing::info!("agent stopped; its VM processes keep running and are adopted on restart");
        Ok(())
    })
}
