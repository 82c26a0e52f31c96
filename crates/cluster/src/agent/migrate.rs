//! The two halves of a migration as an agent carries them out: the source asks its VM
//! process to `migrate` and follows `query-migrate`; the destination starts an incoming VM
//! process and follows its `query-status`. Each half runs as a task that updates the
//! migration's record until it ends.
//!
//! | source process says | source agent does | record |
//! |---|---|---|
//! | `completed` | `quit` the source process, remove its directory | `completed` |
//! | `failed` / `cancelled` | checks the VM runs here again | `failed` |
//! | `in-doubt` | leaves the VM paused (see PROTOCOL.md) | `in-doubt` |
//!
//! | incoming process | destination agent does | record |
//! |---|---|---|
//! | `running` | keeps it as one of its VMs | `completed` |
//! | exits or fails | removes its directory | `failed` |

use std::sync::Arc;
use std::time::Duration;

use fastmig_host::{ClientError, ControlClient, MigrateState, RunStatus};

use crate::agent::blocking;
use crate::agent::state::Agent;
use crate::agent::vmproc::VmDir;
use crate::proto::{MigrationId, MigrationPhase, VmName};

/// How often a migration's process is polled.
const POLL: Duration = Duration::from_millis(100);
/// Consecutive failed polls (about 10 s) after which a source process is taken as gone.
const SOURCE_SILENT_POLLS: u32 = 100;

/// Follows an outgoing migration until it ends.
pub async fn watch_outgoing(agent: Arc<Agent>, id: MigrationId, vm: VmName, client: ControlClient) {
    let mut silent = 0;
    loop {
        tokio::time::sleep(POLL).await;
        let c = client.clone();
        let state = match blocking(move || c.query_migrate()).await {
            Ok(s) => s,
            Err(e) => {
                silent += 1;
                if silent < SOURCE_SILENT_POLLS {
                    continue;
                }
                let error = format!("the source VM process stopped answering: {e}");
                tracing::error!(migration = %id, vm = %vm, "{error}");
                agent
                    .lock()
                    .set_phase(id, MigrationPhase::InDoubt { error });
                return;
            }
        };
        silent = 0;
        match state {
            MigrateState::Active { progress } => {
                agent
                    .lock()
                    .set_phase(id, MigrationPhase::Running { progress });
            }
            // `migrate` makes the migration active before it answers: none means it was never
            // started (the agent died between recording it and asking).
            MigrateState::None => {
                clear_outgoing(&agent, &vm);
                let error = "the VM process never started this migration".to_string();
                tracing::warn!(migration = %id, vm = %vm, "{error}");
                agent.lock().set_phase(id, MigrationPhase::Failed { error });
                return;
            }
            MigrateState::Completed { summary } => {
                // The destination runs the VM: the paused source process goes.
                let c = client.clone();
                if let Err(e) = blocking(move || c.quit()).await {
                    tracing::warn!(vm = %vm, "quitting the migrated-away source: {e}");
                }
                let mut inner = agent.lock();
                if let Some(entry) = inner.vms.remove(&vm) {
                    entry.dir.remove();
                }
                inner.set_phase(
                    id,
                    MigrationPhase::Completed {
                        summary: Some(summary),
                    },
                );
                tracing::info!(migration = %id, vm = %vm, "migration completed");
                return;
            }
            MigrateState::Failed { error } | MigrateState::Cancelled { error } => {
                let c = client.clone();
                let status = blocking(move || c.query_status()).await;
                match &status {
                    Ok(st) if st.status == RunStatus::Running => {}
                    other => tracing::error!(
                        vm = %vm,
                        "after a failed migration the VM does not run on the source: {other:?}"
                    ),
                }
                // The report shows the VM as it is now, not as the monitor last saw it
                // (paused for the stop-and-copy round).
                if let Ok(st) = status {
                    if let Some(entry) = agent.lock().vms.get_mut(&vm) {
                        entry.last = Some(st);
                    }
                }
                clear_outgoing(&agent, &vm);
                tracing::warn!(migration = %id, vm = %vm, "migration failed: {error}");
                agent.lock().set_phase(id, MigrationPhase::Failed { error });
                return;
            }
            MigrateState::InDoubt { error } => {
                tracing::error!(migration = %id, vm = %vm, "migration in doubt: {error}");
                agent
                    .lock()
                    .set_phase(id, MigrationPhase::InDoubt { error });
                return;
            }
        }
    }
}

/// Forgets the outgoing migration in the VM's metadata.
fn clear_outgoing(agent: &Agent, vm: &VmName) {
    let mut inner = agent.lock();
    if let Some(entry) = inner.vms.get_mut(vm) {
        entry.meta.outgoing = None;
        if let Err(e) = entry.dir.write_meta(&entry.meta) {
            tracing::warn!(vm = %vm, "{e}");
        }
    }
}

/// Follows an incoming VM process until the VM runs here or the process ends.
pub async fn watch_incoming(
    agent: Arc<Agent>,
    id: MigrationId,
    vm: VmName,
    client: ControlClient,
    dir: VmDir,
) {
    loop {
        tokio::time::sleep(POLL).await;
        let c = client.clone();
        let error = match blocking(move || c.query_status()).await {
            Ok(st) => match st.status {
                RunStatus::Inmigrate => continue,
                RunStatus::Running | RunStatus::Paused => {
                    let mut inner = agent.lock();
                    if let Some(entry) = inner.vms.get_mut(&vm) {
                        entry.meta.incoming = None;
                        entry.last = Some(st);
                        if let Err(e) = entry.dir.write_meta(&entry.meta) {
                            tracing::warn!(vm = %vm, "{e}");
                        }
                    }
                    inner.set_phase(id, MigrationPhase::Completed { summary: None });
                    tracing::info!(migration = %id, vm = %vm, "VM received, it runs here");
                    return;
                }
                other => {
                    let c = client.clone();
                    let _ = blocking(move || c.quit()).await;
                    format!(
                        "the incoming VM process is {other}: {}",
                        st.error.unwrap_or_default()
                    )
                }
            },
            // Its socket refuses: the process has ended (it exits when receiving fails).
            Err(ClientError::Connect { .. }) => {
                // Give its last log line a moment to land.
                tokio::time::sleep(POLL).await;
                format!("the incoming VM process ended: {}", dir.last_log_line())
            }
            Err(_) => continue,
        };
        tracing::warn!(migration = %id, vm = %vm, "{error}");
        let mut inner = agent.lock();
        inner.vms.remove(&vm);
        dir.remove();
        inner.set_phase(id, MigrationPhase::Failed { error });
        return;
    }
}
