//! The crate's error type: one enum whose variants name the phase that failed.

use crate::guestmem::BadRegion;
use crate::protocol::ProtocolError;
use crate::vm::VmError;

/// Why a migration (either side) failed. Variants name the phase; sources are chained.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Could not reach the destination.
    #[error("connecting to {endpoint}")]
    Connect {
        /// The endpoint, as text.
        endpoint: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Could not bind, listen on or accept from the destination's endpoint.
    #[error("listening on {endpoint}")]
    Listen {
        /// The endpoint, as text.
        endpoint: String,
        /// The socket error (for a Unix path: why it is not ours to take).
        #[source]
        source: std::io::Error,
    },
    /// The VM's memory regions are unusable (unaligned, null).
    #[error("guest memory")]
    Memory(#[from] BadRegion),
    /// The destination refused the migration.
    #[error("destination refused the migration: {reason}")]
    PeerRefused {
        /// The destination's reason (version, memory size, vCPUs, features, transport).
        reason: String,
    },
    /// We (the destination) refused an incompatible source.
    #[error("incompatible source refused: {reason}")]
    Incompatible {
        /// The reason sent back to the source.
        reason: String,
    },
    /// Transport-specific setup (data streams, fd passing, mapping) failed.
    #[error("transport setup: {reason}")]
    TransportSetup {
        /// What failed.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Starting or stopping the dirty log failed.
    #[error("dirty log start/stop")]
    DirtyLog(#[source] VmError),
    /// Fetching the dirty bitmap failed.
    #[error("dirty log sync")]
    DirtyLogSync(#[source] VmError),
    /// A frame could not be written or read: stream I/O, corruption, truncation, a closed
    /// peer. `phase` names the step (`handshake`, `sending pages`, `receiving pages`,
    /// `round ack`, `sending state`, `ready`, `commit`, `resumed`, `handover`, ...).
    #[error("{phase}")]
    Wire {
        /// The step that failed.
        phase: &'static str,
        /// The framing or stream error.
        #[source]
        source: ProtocolError,
    },
    /// The peer sent a frame that does not belong in this phase.
    #[error("unexpected {got} during {phase}")]
    Unexpected {
        /// Phase we were in.
        phase: &'static str,
        /// What arrived.
        got: String,
    },
    /// Pausing the source VM failed.
    #[error("pausing the VM")]
    Pause(#[source] VmError),
    /// Resuming a VM failed.
    #[error("resuming the VM")]
    Resume(#[source] VmError),
    /// Saving the device and vCPU state failed.
    #[error("saving VM state")]
    SaveState(#[source] VmError),
    /// The caller's constructor could not build a VM on handed-over memory.
    #[error("creating the VM on handed-over memory")]
    Adopt(#[source] VmError),
    /// Restoring the device and vCPU state failed.
    #[error("restoring VM state")]
    RestoreState(#[source] VmError),
    /// `ReceiveOptions::verify_memory`: a page of the received memory does not hash to what
    /// its transfer recorded (something wrote it behind the transport's back).
    #[error("memory verification failed at page {page}: {mismatched} page(s) differ from the recorded hashes")]
    VerifyMismatch {
        /// First page that differs.
        page: usize,
        /// Pages that differ.
        mismatched: usize,
    },
    /// A bug or a broken invariant inside this crate (a worker thread panicked, ...).
    #[error("internal error: {what}")]
    Internal {
        /// What went wrong.
        what: String,
    },
    /// Memory digests differ: the destination's memory is not the source's as of the pause.
    #[error("memory digest mismatch: source {source_digest:#018x}, destination {destination_digest:#018x}")]
    Digest {
        /// Digest computed by the source.
        source_digest: u64,
        /// Digest computed by the destination.
        destination_digest: u64,
    },
    /// The peer reported a failure.
    #[error("peer failed: {reason}")]
    PeerFailed {
        /// The peer's reason.
        reason: String,
    },
    /// A peer did not answer in time.
    #[error("timed out during {phase}")]
    Timeout {
        /// Phase we were waiting in (connect, handshake, pages, ready, commit, resumed).
        phase: &'static str,
    },
    /// Cancelled through the [`crate::CancelToken`].
    #[error("cancelled")]
    Cancelled,
    /// Pre-copy did not converge and the policy said not to force it.
    #[error("pre-copy did not converge after {rounds} rounds: {reason}")]
    NotConverged {
        /// Rounds done.
        rounds: u32,
        /// Why we judged it non-converging.
        reason: String,
    },
    /// `Commit` was sent but the destination's `Resumed` never came: the destination probably
    /// runs the VM, so the source stays paused and the operator must check.
    #[error("commit sent but no resume acknowledgement: VM left paused on the source, check the destination")]
    InDoubt(#[source] Box<MigrationError>),
}

impl MigrationError {
    /// True for errors caused by a socket timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, MigrationError::Timeout { .. })
    }
}

/// Maps a wire error met in `phase` to [`MigrationError::Wire`], turning socket timeouts into
/// [`MigrationError::Timeout`].
pub(crate) fn wire(phase: &'static str, e: ProtocolError) -> MigrationError {
    match &e {
        ProtocolError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            MigrationError::Timeout { phase }
        }
        _ => MigrationError::Wire { phase, source: e },
    }
}

/// `e` and its causes on one line (`outer: cause: root`), for a `Failed` reason that crosses
/// the wire: the peer cannot walk our error chain, so it gets the whole of it as text.
pub(crate) fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}
