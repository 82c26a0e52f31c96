//! The seam between the controller and its agents.

use crate::proto::{
    HostName, HostReport, IncomingReady, MigrationId, MigrationRecord, PrepareIncoming,
    StartOutgoing, StartVm, VmName, VmReport,
};

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached or did not answer in time.
    #[error("agent {host} unreachable: {reason}")]
    Unreachable {
        /// The host.
        host: HostName,
        /// What the transport said.
        reason: String,
    },
    /// The agent refused the request (4xx) and changed nothing.
    #[error("agent {host} refused ({status}): {error}")]
    Refused {
        /// The host.
        host: HostName,
        /// HTTP status.
        status: u16,
        /// The agent's error line.
        error: String,
    },
    /// The agent failed while carrying out the request (5xx).
    #[error("agent {host} failed ({status}): {error}")]
    Failed {
        /// The host.
        host: HostName,
        /// HTTP status.
        status: u16,
        /// The agent's error line.
        error: String,
    },
    /// The reply was not what the API documents.
    #[error("agent {host} sent a malformed reply: {reason}")]
    BadReply {
        /// The host.
        host: HostName,
        /// What was wrong.
        reason: String,
    },
}

/// What the controller can ask of one agent. Blocking calls; the controller runs them on its
/// own threads. Implemented by the HTTP client and by test doubles.
pub trait AgentApi: Send + Sync {
    /// The host this agent runs.
    fn host(&self) -> &HostName;
    /// `GET /report`.
    fn report(&self) -> Result<HostReport, AgentError>;
    /// `POST /vms`.
    fn start_vm(&self, vm: &StartVm) -> Result<VmReport, AgentError>;
    /// `DELETE /vms/{vm}`.
    fn stop_vm(&self, vm: &VmName) -> Result<(), AgentError>;
    /// `POST /migrations/incoming`.
    fn prepare_incoming(&self, order: &PrepareIncoming) -> Result<IncomingReady, AgentError>;
    /// `POST /migrations/outgoing`.
    fn start_outgoing(&self, order: &StartOutgoing) -> Result<MigrationRecord, AgentError>;
    /// `GET /migrations/{id}`.
    fn migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError>;
    /// `POST /migrations/{id}/cancel`.
    fn cancel_migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError>;
    /// `POST /standby`.
    fn standby(&self) -> Result<HostReport, AgentError>;
    /// `POST /wake`.
    fn wake(&self) -> Result<HostReport, AgentError>;
}
