//! The agent's HTTP API (the table in [`crate::proto`]): authentication first, then each
//! request parsed into its type; a refused request changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fastmig_migration::TransportKind;
use fastmig_vmm::WorkloadSpec;
use serde::de::DeserializeOwned;

use crate::agent::demand::Demand;
use crate::agent::migrate::{watch_incoming, watch_outgoing};
use crate::agent::state::{is_final, now_ms, Agent, MigEntry, VmEntry};
use crate::agent::vmproc::{self, valid_vm_name, MigrationMeta, VmDir, VmMeta};
use crate::agent::{blocking, build_report, vm_report};
use crate::proto::{
    ApiError, HostReport, HostState, IncomingReady, MigrationId, MigrationPhase, MigrationRecord,
    PrepareIncoming, Side, StartOutgoing, StartVm, VmName, VmReport,
};

/// A refused or failed request: its status and one line.
#[derive(Debug)]
pub struct ApiFail {
    status: StatusCode,
    error: String,
}

impl ApiFail {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiFail {
            status,
            error: error.into(),
        }
    }
    fn bad(e: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e)
    }
    fn conflict(e: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, e)
    }
    fn not_found(e: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, e)
    }
    fn internal(e: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    }
}

impl IntoResponse for ApiFail {
    fn into_response(self) -> Response {
        (self.status, Json(ApiError { error: self.error })).into_response()
    }
}

type Reply<T> = Result<Json<T>, ApiFail>;

/// The whole cause chain of an error, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// The router, with the token check in front of every route (the fallback included).
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/report", get(report))
        .route("/vms", post(start_vm))
        .route("/vms/{vm}", delete(stop_vm))
        .route("/migrations/incoming", post(prepare_incoming))
        .route("/migrations/outgoing", post(start_outgoing))
        .route("/migrations/{id}", get(migration))
        .route("/migrations/{id}/cancel", post(cancel))
        .route("/standby", post(standby))
        .route("/wake", post(wake))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiFail::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&agent),
            require_token,
        ))
        .with_state(agent)
}

async fn require_token(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !agent.cfg.token.accepts(given) {
        return ApiFail::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer TOKEN)",
        )
        .into_response();
    }
    next.run(req).await
}

/// Parses a JSON body into its type: anything else is a 400 with serde's reason.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiFail> {
    serde_json::from_slice(body).map_err(|e| ApiFail::bad(format!("malformed request body: {e}")))
}

fn refuse_if_shutting_down(agent: &Agent) -> Result<(), ApiFail> {
    if agent.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiFail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ));
    }
    Ok(())
}

/// Checks a VM's request before anything is started; returns its loaded demand source.
fn check_vm(vm: &StartVm) -> Result<Demand, ApiFail> {
    if !valid_vm_name(&vm.vm.0) {
        return Err(ApiFail::bad(format!(
            "bad VM name {:?} (1-64 of A-Z a-z 0-9 - _ ., not starting with a dot)",
            vm.vm.0
        )));
    }
    vm.workload
        .parse::<WorkloadSpec>()
        .map_err(|e| ApiFail::bad(format!("workload: {}", chain(&e))))?;
    if vm.vcpus == 0 || vm.mem_bytes == 0 || !vm.mem_bytes.is_multiple_of(1 << 20) {
        return Err(ApiFail::bad(
            "a VM needs vCPUs and a memory size that is a positive multiple of 1 MiB",
        ));
    }
    if !(vm.mips.is_finite() && vm.mips > 0.0) {
        return Err(ApiFail::bad("mips must be positive"));
    }
    Demand::load(&vm.demand).map_err(|e| ApiFail::bad(format!("demand: {}", chain(&e))))
}

/// Reserves a VM on an active host: refuses standby, shutdown, names in use and a VM that
/// does not fit in the host's declared capacity (RAM and MIPS, as CloudSim allocates them)
/// next to the VMs already here.
fn reserve(agent: &Agent, new: &StartVm) -> Result<(), ApiFail> {
    let vm = &new.vm;
    refuse_if_shutting_down(agent)?;
    let mut inner = agent.lock();
    if inner.state == HostState::Standby {
        return Err(ApiFail::conflict(format!(
            "host {} is in standby: it takes no VM",
            agent.cfg.host
        )));
    }
    if inner.vms.contains_key(vm) || inner.starting.contains_key(vm) {
        return Err(ApiFail::conflict(format!(
            "a VM named {vm} is already here"
        )));
    }
    let host = &agent.cfg.host_type;
    let (mut mem, mut mips) = (new.mem_bytes, new.mips);
    for v in inner
        .vms
        .values()
        .map(|e| &e.meta.vm)
        .chain(inner.starting.values())
    {
        mem += v.mem_bytes;
        mips += v.mips;
    }
    let (host_mem, host_mips) = (
        u64::from(host.ram_mb) << 20,
        host.pe_mips * f64::from(host.pes),
    );
    if mem > host_mem || mips > host_mips {
        return Err(ApiFail::conflict(format!(
            "no room for {vm} on {}: it would need {} MiB and {mips} MIPS of {} MiB and {host_mips} MIPS",
            agent.cfg.host,
            mem >> 20,
            host_mem >> 20
        )));
    }
    inner.starting.insert(vm.clone(), new.clone());
    Ok(())
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let rep = build_report(&agent);
    let counts = agent.lock().ended.clone();
    let body = crate::metrics::render_agent(&rep, &counts);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

async fn report(State(agent): State<Arc<Agent>>) -> Json<HostReport> {
    Json(build_report(&agent))
}

async fn start_vm(State(agent): State<Arc<Agent>>, body: Bytes) -> Reply<VmReport> {
    let mut vm: StartVm = parse(&body)?;
    let demand = check_vm(&vm)?;
    reserve(&agent, &vm)?;
    let epoch = *vm.demand_epoch_ms.get_or_insert_with(now_ms);
    let meta = VmMeta {
        vm: vm.clone(),
        demand_epoch_ms: epoch,
        incoming: None,
        outgoing: None,
    };
    let dir = VmDir::new(&agent.cfg.data_dir, &vm.vm);
    let bin = agent.cfg.fastmig_bin.clone();
    let d = dir.clone();
    let started = blocking(move || {
        d.create()?;
        d.write_meta(&meta)?;
        let client = vmproc::spawn_run(&bin, &d, &meta.vm)?;
        let status = client
            .query_status()
            .map_err(vmproc::VmProcError::Control)?;
        Ok::<_, vmproc::VmProcError>((client, status, meta))
    })
    .await;
    let mut inner = agent.lock();
    inner.starting.remove(&vm.vm);
    let (client, status, meta) = started.map_err(|e| {
        dir.remove();
        ApiFail::internal(format!("starting VM {}: {}", vm.vm, chain(&e)))
    })?;
    tracing::info!(vm = %vm.vm, "VM started");
    let entry = VmEntry {
        meta,
        dir,
        client,
        demand,
        last: Some(status),
        rate_set: None,
    };
    let report = vm_report(&entry, now_ms());
    inner.vms.insert(vm.vm, entry);
    Ok(Json(report))
}

async fn stop_vm(
    State(agent): State<Arc<Agent>>,
    Path(vm): Path<String>,
) -> Reply<serde_json::Value> {
    let vm = VmName(vm);
    let entry = {
        let inner = agent.lock();
        let entry = inner
            .vms
            .get(&vm)
            .ok_or_else(|| ApiFail::not_found(format!("no VM {vm} here")))?;
        if inner.migrating(&vm) {
            return Err(ApiFail::conflict(format!(
                "VM {vm} is migrating: cancel the migration first"
            )));
        }
        entry.clone()
    };
    let c = entry.client.clone();
    if let Err(e) = blocking(move || c.quit()).await {
        // A process that is already gone is as good as stopped.
        tracing::warn!(vm = %vm, "quit: {e}");
    }
    agent.lock().vms.remove(&vm);
    entry.dir.remove();
    tracing::info!(vm = %vm, "VM stopped");
    Ok(Json(serde_json::json!({})))
}

async fn prepare_incoming(State(agent): State<Arc<Agent>>, body: Bytes) -> Reply<IncomingReady> {
    let mut order: PrepareIncoming = parse(&body)?;
    let demand = check_vm(&order.vm)?;
    if order.source == agent.cfg.host {
        return Err(ApiFail::conflict(
            "a VM cannot migrate to the host it runs on",
        ));
    }
    if agent.lock().migrations.contains_key(&order.migration) {
        return Err(ApiFail::conflict(format!(
            "migration {} is already known here",
            order.migration
        )));
    }
    reserve(&agent, &order.vm)?;
    let vm = order.vm.vm.clone();
    let dir = VmDir::new(&agent.cfg.data_dir, &vm);
    // shm and handover pass memory through a unix socket: both agents share a machine.
    let listen = match order.transport {
        TransportKind::Classic | TransportKind::MultiTcp { .. } | TransportKind::Rdma { .. } => {
            let port = std::net::TcpListener::bind((agent.cfg.migration_address, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port());
            match port {
                Ok(p) => std::net::SocketAddr::new(agent.cfg.migration_address, p).to_string(),
                Err(e) => {
                    agent.lock().starting.remove(&vm);
                    return Err(ApiFail::internal(format!("no free port: {e}")));
                }
            }
        }
        _ => format!("unix:{}", dir.migration_socket().display()),
    };
    let epoch = *order.vm.demand_epoch_ms.get_or_insert_with(now_ms);
    let meta = VmMeta {
        vm: order.vm.clone(),
        demand_epoch_ms: epoch,
        incoming: Some(MigrationMeta {
            migration: order.migration,
            peer: order.source.clone(),
            transport: order.transport,
        }),
        outgoing: None,
    };
    let bin = agent.cfg.fastmig_bin.clone();
    let accept = agent.cfg.accept_timeout;
    let (d, l) = (dir.clone(), listen.clone());
    let started = blocking(move || {
        d.create()?;
        d.write_meta(&meta)?;
        let client = vmproc::spawn_incoming(&bin, &d, &meta.vm, &l, accept)?;
        Ok::<_, vmproc::VmProcError>((client, meta))
    })
    .await;
    let mut inner = agent.lock();
    inner.starting.remove(&vm);
    let (client, meta) = started.map_err(|e| {
        dir.remove();
        ApiFail::internal(format!("preparing to receive VM {vm}: {}", chain(&e)))
    })?;
    inner.migrations.insert(
        order.migration,
        MigEntry {
            record: MigrationRecord {
                migration: order.migration,
                vm: vm.clone(),
                side: Side::Destination,
                peer: order.source.clone(),
                transport: order.transport,
                phase: MigrationPhase::Prepared,
            },
            ended: None,
        },
    );
    inner.vms.insert(
        vm.clone(),
        VmEntry {
            meta,
            dir: dir.clone(),
            client: client.clone(),
            demand,
            last: None,
            rate_set: None,
        },
    );
    tracing::info!(migration = %order.migration, vm = %vm, %listen, "incoming VM prepared");
    tokio::spawn(watch_incoming(
        Arc::clone(&agent),
        order.migration,
        vm,
        client,
        dir,
    ));
    Ok(Json(IncomingReady {
        migration: order.migration,
        uri: listen,
    }))
}

async fn start_outgoing(State(agent): State<Arc<Agent>>, body: Bytes) -> Reply<MigrationRecord> {
    let order: StartOutgoing = parse(&body)?;
    refuse_if_shutting_down(&agent)?;
    if order.destination == agent.cfg.host {
        return Err(ApiFail::conflict(
            "a VM cannot migrate to the host it runs on",
        ));
    }
    order
        .request
        .validate()
        .map_err(|e| ApiFail::bad(format!("migration request: {e}")))?;
    let record = order.source_record();
    let client = {
        let mut inner = agent.lock();
        if inner.migrations.contains_key(&order.migration) {
            return Err(ApiFail::conflict(format!(
                "migration {} is already known here",
                order.migration
            )));
        }
        let entry = inner
            .vms
            .get(&order.vm)
            .ok_or_else(|| ApiFail::not_found(format!("no VM {} here", order.vm)))?;
        if entry.meta.incoming.is_some() || entry.status() != fastmig_host::RunStatus::Running {
            return Err(ApiFail::conflict(format!(
                "VM {} is {} here, not running",
                order.vm,
                entry.status()
            )));
        }
        let client = entry.client.clone();
        if inner.migrating(&order.vm) {
            return Err(ApiFail::conflict(format!(
                "VM {} is already migrating",
                order.vm
            )));
        }
        // Reserved before the call, so that a second order for this VM is refused.
        inner.migrations.insert(
            order.migration,
            MigEntry {
                record: record.clone(),
                ended: None,
            },
        );
        client
    };
    // Written before the VM process is asked, so that an agent killed in between finds the
    // migration on restart (a process that never started it says so, and it ends failed).
    let outgoing = Some(MigrationMeta {
        migration: order.migration,
        peer: order.destination.clone(),
        transport: order.request.transport,
    });
    set_outgoing(&agent, &order.vm, outgoing);
    let (c, req) = (client.clone(), order.request.clone());
    if let Err(e) = blocking(move || c.migrate(&req)).await {
        agent.lock().migrations.remove(&order.migration);
        set_outgoing(&agent, &order.vm, None);
        return Err(match e {
            fastmig_host::ClientError::Refused(r) => ApiFail::conflict(r.desc),
            other => ApiFail::internal(chain(&other)),
        });
    }
    tracing::info!(migration = %order.migration, vm = %order.vm, to = %order.destination, "migration started");
    tokio::spawn(watch_outgoing(
        Arc::clone(&agent),
        order.migration,
        order.vm,
        client,
    ));
    Ok(Json(record))
}

/// Records (or forgets) a VM's outgoing migration in its `vm.json`.
fn set_outgoing(agent: &Agent, vm: &VmName, outgoing: Option<MigrationMeta>) {
    let mut inner = agent.lock();
    if let Some(entry) = inner.vms.get_mut(vm) {
        entry.meta.outgoing = outgoing;
        if let Err(e) = entry.dir.write_meta(&entry.meta) {
            tracing::warn!(vm = %vm, "{e}");
        }
    }
}

fn migration_id(id: &str) -> Result<MigrationId, ApiFail> {
    let n = id.strip_prefix('m').unwrap_or(id);
    n.parse()
        .map(MigrationId)
        .map_err(|_| ApiFail::bad(format!("bad migration id {id:?}")))
}

fn find_migration(agent: &Agent, id: MigrationId) -> Result<MigrationRecord, ApiFail> {
    agent
        .lock()
        .migrations
        .get(&id)
        .map(|m| m.record.clone())
        .ok_or_else(|| ApiFail::not_found(format!("no migration {id} here")))
}

async fn migration(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    find_migration(&agent, id).map(Json)
}

async fn cancel(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Reply<MigrationRecord> {
    let id = migration_id(&id)?;
    let record = find_migration(&agent, id)?;
    if is_final(&record.phase) {
        return Ok(Json(record));
    }
    if record.side == Side::Destination {
        // Ending the incoming process could lose a VM the source has already committed;
        // only the source knows, so only the source cancels.
        return Err(ApiFail::conflict(
            "cancel a migration on its source's agent (the destination cannot know whether the source has committed)",
        ));
    }
    let client = agent
        .lock()
        .vms
        .get(&record.vm)
        .map(|e| e.client.clone())
        .ok_or_else(|| ApiFail::not_found(format!("no VM {} here", record.vm)))?;
    match blocking(move || client.migrate_cancel()).await {
        // Refused: it has just ended; the watcher records how.
        Ok(()) | Err(fastmig_host::ClientError::Refused(_)) => {}
        Err(e) => return Err(ApiFail::internal(chain(&e))),
    }
    tracing::info!(migration = %id, "cancel requested");
    find_migration(&agent, id).map(Json)
}

async fn standby(State(agent): State<Arc<Agent>>) -> Reply<HostReport> {
    {
        let mut inner = agent.lock();
        if !inner.vms.is_empty() || !inner.starting.is_empty() {
            return Err(ApiFail::conflict(format!(
                "{} VMs run here: migrate them away first",
                inner.vms.len() + inner.starting.len()
            )));
        }
        if let Err(e) = std::fs::write(agent.standby_marker(), b"standby\n") {
            return Err(ApiFail::internal(format!(
                "writing the standby marker: {e}"
            )));
        }
        inner.state = HostState::Standby;
    }
    tracing::info!("host in standby");
    Ok(Json(build_report(&agent)))
}

async fn wake(State(agent): State<Arc<Agent>>) -> Reply<HostReport> {
    {
        let mut inner = agent.lock();
        match std::fs::remove_file(agent.standby_marker()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ApiFail::internal(format!(
                    "removing the standby marker: {e}"
                )))
            }
        }
        inner.state = HostState::Active;
    }
    tracing::info!("host active");
    Ok(Json(build_report(&agent)))
}
