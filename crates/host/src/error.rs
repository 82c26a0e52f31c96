//! Errors of a VM process: each variant names the step that failed and keeps its source.

use std::path::PathBuf;

use fastmig_migration::MigrationError;
use fastmig_vmm::VmmError;

/// Why a VM process could not start, serve or finish.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Building, starting or filling the VM failed (a bad spec or a missing `/dev/kvm` is
    /// the user's to fix: see [`HostError::is_usage`]).
    #[error("{what}")]
    Vm {
        /// The step.
        what: &'static str,
        /// The VMM's error.
        #[source]
        source: VmmError,
    },
    /// The control socket path exists and is not a socket: it is never replaced.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another live process serves the control socket.
    #[error("{0} is in use by another running VM")]
    SocketInUse(PathBuf),
    /// Creating, locking or binding the control socket failed.
    #[error("cannot listen on {path}: {what}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding the migration listener failed.
    #[error("cannot listen on {endpoint}")]
    Listen {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: MigrationError,
    },
    /// The TLS files could not be used, or the TLS tunnel could not be set up.
    #[error("TLS")]
    Tls(#[source] fastmig_migration::tls::TlsError),
    /// TLS was asked for on a `unix:` endpoint.
    #[error("--tls-* needs a HOST:PORT --listen (TLS is for networks)")]
    TlsNeedsTcp,
    /// The incoming migration failed; the VM was never started here.
    #[error("incoming migration failed; the VM was not started")]
    Receive(#[source] MigrationError),
    /// The guest failed while running.
    #[error("VM failed: {0}")]
    VmFailed(String),
    /// Any other I/O step (threads, the ready file).
    #[error("{what}")]
    Io {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl HostError {
    /// True when the user must change the command line to fix it (a bad spec or size, a
    /// missing `/dev/kvm`, a socket path that is not free): the CLI exits 2 for these.
    pub fn is_usage(&self) -> bool {
        match self {
            HostError::Vm { source, .. } => source.is_usage(),
            HostError::NotASocket(_) | HostError::SocketInUse(_) | HostError::Listen { .. } => true,
            HostError::Socket { .. } | HostError::Tls(_) | HostError::TlsNeedsTcp => true,
            HostError::Receive(_) | HostError::VmFailed(_) | HostError::Io { .. } => false,
        }
    }

    pub(crate) fn vm(what: &'static str) -> impl FnOnce(VmmError) -> HostError {
        move |source| HostError::Vm { what, source }
    }
}
