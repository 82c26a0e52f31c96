//! What crosses the agent's HTTP API (JSON bodies), shared by agent, controller and tests.
//!
//! Endpoints of an agent (every request carries `Authorization: Bearer TOKEN`; a missing or
//! wrong token gets 401 and changes nothing; a malformed body 400; an unknown VM or migration
//! 404; a request the host's state forbids, such as a VM for a host in standby, 409):
//!
//! | method and path | body | reply |
//! |---|---|---|
//! | `GET /report` | | [`HostReport`] |
//! | `POST /vms` | [`StartVm`] | [`VmReport`] |
//! | `DELETE /vms/{vm_id}` | | `{}` (the VM process is shut down) |
//! | `POST /migrations/incoming` | [`PrepareIncoming`] | [`IncomingReady`] |
//! | `POST /migrations/outgoing` | [`StartOutgoing`] | [`MigrationRecord`] |
//! | `GET /migrations/{migration_id}` | | [`MigrationRecord`] |
//! | `POST /migrations/{migration_id}/cancel` | | [`MigrationRecord`] |
//! | `POST /standby` | | [`HostReport`] (refused with 409 while VMs run here) |
//! | `POST /wake` | | [`HostReport`] |
//!
//! A migration between two agents: the controller asks the destination's agent to
//! [`PrepareIncoming`] (it starts an incoming VM process listening on its migration address
//! and returns the URI), then the source's agent to [`StartOutgoing`] to that URI; both
//! agents then report the migration's [`MigrationRecord`] under the same [`MigrationId`]
//! until it ends.

use std::fmt;
use std::path::PathBuf;

use fastmig_host::{MigrationRequest, RunStatus};
use fastmig_migration::{MigrationSummary, Progress, TransportKind};
use fastmig_sim::setup::HostType;
use serde::{Deserialize, Serialize};

/// A host's name, unique in the cluster (`--host-id`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostName(pub String);

/// A VM's name, unique in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmName(pub String);

/// A migration's id, chosen by the controller (unique in its database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MigrationId(pub u64);

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m{}", self.0)
    }
}

/// Power state of a host, as its agent enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Takes VMs; its power follows its utilisation.
    Active,
    /// Switched off for consolidation: takes no VM; its power is its host type's idle power
    /// at 0 % utilisation times the standby fraction the controller is configured with.
    Standby,
}

/// How a VM's CPU demand changes over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DemandSource {
    /// A fixed fraction of the VM's MIPS, 0.0..=1.0.
    Constant {
        /// Fraction of the VM's MIPS.
        utilization: f64,
    },
    /// A trace file, time-compressed: sample `i` applies from `i * sample_period_ms` after the
    /// VM started, wrapping at the end.
    Trace {
        /// The trace file on the agent's machine.
        path: PathBuf,
        /// Its format.
        format: TraceFormat,
        /// Wall time each sample lasts (e.g. 2000 ms for one 5-minute sample every 2 s).
        sample_period_ms: u64,
    },
}

/// Format of a CPU-demand trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceFormat {
    /// CloudSim's PlanetLab files: one integer CPU percentage per line, 288 per day.
    Planetlab,
    /// The Google cluster-data 2011 files of `google-gcd-2011` (see its README).
    Google,
}

/// `POST /vms`: start a VM on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    /// Its name (unique in the cluster).
    pub vm: VmName,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Declared capacity in MIPS (CloudSim's VM types: 2500, 2000, 1000, 500).
    pub mips: f64,
    /// Workload spec as `fastmig run --workload` takes it (`idle`, `dirty:...`, `verify:...`).
    pub workload: String,
    /// Where its CPU demand comes from.
    pub demand: DemandSource,
    /// When its demand trace started, ms since the Unix epoch: a migrated VM goes on at the
    /// same position of its trace. Absent for a new VM (the agent takes its start time); the
    /// controller copies [`VmReport::demand_epoch_ms`] into the `StartVm` of a
    /// [`PrepareIncoming`] ([`VmReport::start_vm`] does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_epoch_ms: Option<u64>,
}

/// One VM as its host's agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// Its name.
    pub vm: VmName,
    /// The VM process's state (`running`, `inmigrate`, `postmigrate`, ...).
    pub status: RunStatus,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Declared capacity in MIPS.
    pub mips: f64,
    /// Current CPU demand as a fraction of `mips` (what the guest reports it wants now).
    pub demand: f64,
    /// Distinct pages dirtied per second, measured from KVM's dirty log.
    pub dirty_rate_pps: f64,
    /// Working set: distinct pages dirtied over the last measurement window, bytes.
    pub working_set_bytes: u64,
    /// Workload spec.
    pub workload: String,
    /// Where its demand comes from.
    pub demand_source: DemandSource,
    /// When its demand trace started, ms since the Unix epoch (see
    /// [`StartVm::demand_epoch_ms`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_epoch_ms: Option<u64>,
}

impl VmReport {
    /// The `StartVm` that recreates this VM elsewhere, for a [`PrepareIncoming`]: same size,
    /// workload and demand source, and the same demand epoch, so that its trace goes on
    /// where it is.
    pub fn start_vm(&self) -> StartVm {
        StartVm {
            vm: self.vm.clone(),
            mem_bytes: self.mem_bytes,
            vcpus: self.vcpus,
            mips: self.mips,
            workload: self.workload.clone(),
            demand: self.demand_source.clone(),
            demand_epoch_ms: self.demand_epoch_ms,
        }
    }
}

/// `GET /report`: the host, its VMs and its migrations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host.
    pub host: HostName,
    /// Its declared type (MIPS, RAM, power model): namespaces on one machine share its cores,
    /// so capacity is declared, not measured.
    pub host_type: HostType,
    /// Power state.
    pub state: HostState,
    /// Where other agents send migrations to this host (`IP:PORT` base or `unix:` dir, as the
    /// agent was configured).
    pub migration_address: String,
    /// VMs on this host (including incoming ones, `status: inmigrate`).
    pub vms: Vec<VmReport>,
    /// Migrations this agent takes part in that have not been collected as ended, and the
    /// ended ones of the last few minutes.
    pub migrations: Vec<MigrationRecord>,
    /// Agent's clock when the report was made, ms since the Unix epoch.
    pub time_ms: u64,
}

/// `POST /migrations/incoming`: prepare to receive a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareIncoming {
    /// The migration.
    pub migration: MigrationId,
    /// The VM that will arrive (its memory size, vCPUs, MIPS and demand source come with it).
    pub vm: StartVm,
    /// The transport the source will use.
    pub transport: TransportKind,
    /// The host it comes from.
    pub source: HostName,
}

/// Reply of `POST /migrations/incoming`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingReady {
    /// The migration.
    pub migration: MigrationId,
    /// URI the source's VM process migrates to (`HOST:PORT` or `unix:PATH`).
    pub uri: String,
}

/// `POST /migrations/outgoing`: send a VM away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartOutgoing {
    /// The migration.
    pub migration: MigrationId,
    /// The VM to send.
    pub vm: VmName,
    /// The destination host.
    pub destination: HostName,
    /// The migration options; `uri` is the destination's [`IncomingReady::uri`].
    pub request: MigrationRequest,
}

impl StartOutgoing {
    /// The source's record of this migration as it starts: running, no progress yet.
    pub fn source_record(&self) -> MigrationRecord {
        MigrationRecord {
            migration: self.migration,
            vm: self.vm.clone(),
            side: Side::Source,
            peer: self.destination.clone(),
            transport: self.request.transport,
            phase: MigrationPhase::Running { progress: None },
        }
    }
}

/// Which side of a migration a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The host the VM leaves.
    Source,
    /// The host the VM arrives on.
    Destination,
}

/// A migration's state as one of its agents sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Destination prepared, source not started yet.
    Prepared,
    /// Pages are moving.
    Running {
        /// Last progress report (source side only).
        progress: Option<Progress>,
    },
    /// Done: the destination runs the VM, the source's VM process has quit.
    Completed {
        /// The source's summary (source side; the destination reports `None`).
        summary: Option<MigrationSummary>,
    },
    /// Failed or cancelled: the VM runs on the source.
    Failed {
        /// One line saying why.
        error: String,
    },
    /// `Commit` was sent but no `Resumed` came back (see PROTOCOL.md): the VM is paused on
    /// the source and may run on the destination; an operator or the controller must look.
    InDoubt {
        /// One line saying why.
        error: String,
    },
}

/// One migration as one agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The migration.
    pub migration: MigrationId,
    /// The VM.
    pub vm: VmName,
    /// This agent's side.
    pub side: Side,
    /// The other host.
    pub peer: HostName,
    /// Transport.
    pub transport: TransportKind,
    /// State.
    pub phase: MigrationPhase,
}

/// An agent's error body (with a 4xx/5xx status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// One line saying what was wrong.
    pub error: String,
}
