//! The agent's state: its host state, its VMs and its migrations, behind one mutex that is
//! never held across a call to a VM process (those run on blocking threads, on clones).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastmig_host::{ControlClient, RunStatus, StatusInfo};
use fastmig_sim::setup::HostType;

use crate::agent::demand::Demand;
use crate::agent::vmproc::{VmDir, VmMeta};
use crate::auth::Token;
use crate::proto::{
    HostName, HostState, MigrationId, MigrationPhase, MigrationRecord, StartVm, VmName,
};

/// How an agent is configured (`fastmig agent` flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the HTTP API listens.
    pub listen: std::net::SocketAddr,
    /// This host's name.
    pub host: HostName,
    /// This host's declared type.
    pub host_type: HostType,
    /// Where VMs keep their directories (`vms/NAME/`) and the standby marker.
    pub data_dir: PathBuf,
    /// The controller's shared token.
    pub token: Token,
    /// The address incoming migrations listen on.
    pub migration_address: IpAddr,
    /// The `fastmig` binary VM processes are started from.
    pub fastmig_bin: PathBuf,
    /// On SIGTERM, how long migrations in flight may take to finish before they are
    /// cancelled.
    pub shutdown_grace: Duration,
    /// How long an incoming VM process waits for its source to connect.
    pub accept_timeout: Duration,
}

/// One VM of this host.
#[derive(Debug, Clone)]
pub struct VmEntry {
    /// Its metadata (mirrors `vm.json`).
    pub meta: VmMeta,
    /// Its directory.
    pub dir: VmDir,
    /// Its control socket.
    pub client: ControlClient,
    /// Its demand source, loaded.
    pub demand: Demand,
    /// Last status its process answered.
    pub last: Option<StatusInfo>,
    /// Last dirty rate set from its demand (pages/s), to set it only when it changes.
    pub rate_set: Option<u64>,
}

impl VmEntry {
    /// The last known run state (before the first answer: `inmigrate` for an incoming VM,
    /// `created` otherwise).
    pub fn status(&self) -> RunStatus {
        match (&self.last, &self.meta.incoming) {
            (Some(s), _) => s.status,
            (None, Some(_)) => RunStatus::Inmigrate,
            (None, None) => RunStatus::Created,
        }
    }
}

/// One migration this agent takes part in.
#[derive(Debug, Clone)]
pub struct MigEntry {
    /// Its record as reported.
    pub record: MigrationRecord,
    /// When it ended (ended records are kept for [`ENDED_KEPT`]).
    pub ended: Option<Instant>,
}

/// How long ended migrations stay in reports.
pub const ENDED_KEPT: Duration = Duration::from_secs(300);

/// True for the phases a migration ends in.
pub fn is_final(phase: &MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Completed { .. }
            | MigrationPhase::Failed { .. }
            | MigrationPhase::InDoubt { .. }
    )
}

/// Everything the mutex guards.
#[derive(Debug)]
pub struct Inner {
    /// Power state.
    pub state: HostState,
    /// Running VMs (and incoming ones).
    pub vms: BTreeMap<VmName, VmEntry>,
    /// VMs being started (reserved so that two requests cannot start the same VM, and
    /// counted against the host's capacity).
    pub starting: BTreeMap<VmName, StartVm>,
    /// Migrations.
    pub migrations: BTreeMap<MigrationId, MigEntry>,
    /// Migrations that ended since the agent started (for `/metrics`).
    pub ended: crate::metrics::MigrationCounts,
}

impl Inner {
    /// Updates a migration's phase (and its end time when the phase is final).
    pub fn set_phase(&mut self, id: MigrationId, phase: MigrationPhase) {
        if let Some(m) = self.migrations.get_mut(&id) {
            if is_final(&phase) && m.ended.is_none() {
                m.ended = Some(Instant::now());
                self.ended.ended(&m.record, &phase);
            }
            m.record.phase = phase;
        }
    }

    /// Forgets migrations that ended more than [`ENDED_KEPT`] ago.
    pub fn prune(&mut self) {
        self.migrations
            .retain(|_, m| m.ended.is_none_or(|t| t.elapsed() < ENDED_KEPT));
    }

    /// True when a migration of `vm` has not ended.
    pub fn migrating(&self, vm: &VmName) -> bool {
        self.migrations
            .values()
            .any(|m| &m.record.vm == vm && m.ended.is_none())
    }
}

/// The agent: its configuration and its state.
#[derive(Debug)]
pub struct Agent {
    /// Configuration.
    pub cfg: AgentConfig,
    inner: Mutex<Inner>,
    /// Set on SIGTERM: new VMs and migrations are refused.
    pub shutting_down: AtomicBool,
}

impl Agent {
    /// An agent with no VMs yet (see `adopt`).
    pub fn new(cfg: AgentConfig, state: HostState) -> Agent {
        Agent {
            cfg,
            inner: Mutex::new(Inner {
                state,
                vms: BTreeMap::new(),
                starting: BTreeMap::new(),
                migrations: BTreeMap::new(),
                ended: Default::default(),
            }),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Locks the state. A panic while it was held leaves it usable: every update is one
    /// assignment.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The standby marker file (its presence survives a restart).
    pub fn standby_marker(&self) -> PathBuf {
        self.cfg.data_dir.join("standby")
    }
}

/// Now, ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
