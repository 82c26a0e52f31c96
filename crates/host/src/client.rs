//! The typed client of a VM process's control socket: one method per command, each returning
//! the command's reply type. The CLI, the benchmarks and the tests talk to VM processes
//! through it.
//!
//! Each call opens its own connection (so a client holds no server slot between calls) and
//! waits at most [`ControlClient::reply_timeout`] for the reply.
//!
//! ```no_run
//! use std::time::Duration;
//! use fastmig_host::{ControlClient, MigrateState, MigrationRequest};
//!
//! // Waits up to 5 s for a process that is still starting to bind its socket.
//! let src = ControlClient::connect("/tmp/src.sock", Duration::from_secs(5))?;
//! let st = src.query_status()?;
//! println!("{} at progress {}", st.status, st.progress);
//! src.migrate(&MigrationRequest::to("127.0.0.1:4444"))?;
//! loop {
//!     match src.query_migrate()? {
//!         MigrateState::Completed { summary } => break println!("{} ms", summary.downtime_ms),
//!         MigrateState::Failed { error } | MigrateState::Cancelled { error } => {
//!             break eprintln!("{error}")
//!         }
//!         _ => std::thread::sleep(Duration::from_millis(100)),
//!     }
//! }
//! # Ok::<(), fastmig_host::ClientError>(())
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fastmig_vmm::VerifyReport;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::command::{
    Command, CommandError, Empty, MigrateState, MigrationRequest, Reply, SetDirtyRate, StatusInfo,
    VmInfo,
};

/// Longest reply line read.
const MAX_REPLY: u64 = 16 << 20;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the socket (within the wait, when there was one).
    #[error(
        "cannot connect to the control socket {} ({}is a VM process running with --api {}?)",
        path.display(),
        waited_note(*waited),
        path.display()
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// How long it waited for the socket to appear.
        waited: Duration,
        /// The last connect error.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the reply failed (the process died, or took longer
    /// than the reply timeout).
    #[error("talking to the control socket {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not what the protocol says.
    #[error("malformed reply from {path}: {line:?}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// The reply line.
        line: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The VM process answered with an error.
    #[error(transparent)]
    Refused(#[from] CommandError),
}

fn waited_note(waited: Duration) -> String {
    if waited.is_zero() {
        String::new()
    } else {
        format!("nothing answered within {:.1}s; ", waited.as_secs_f64())
    }
}

/// A client of one VM process's control socket.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
    /// How long a call waits for its reply (default 30 s: `verify-memory` of a large VM
    /// takes a while).
    pub reply_timeout: Duration,
}

fn connect_error_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

impl ControlClient {
    /// Connects to the socket at `path`, waiting up to `wait` for it to appear and answer
    /// (a process that was just started binds it a moment later). `Duration::ZERO` tries
    /// once.
    pub fn connect(path: impl AsRef<Path>, wait: Duration) -> Result<Self, ClientError> {
        let path = path.as_ref().to_path_buf();
        let start = Instant::now();
        loop {
            match UnixStream::connect(&path) {
                Ok(_) => {
                    return Ok(ControlClient {
                        path,
                        reply_timeout: Duration::from_secs(30),
                    })
                }
                Err(e) if connect_error_is_transient(&e) && start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path,
                        waited: wait,
                        source,
                    })
                }
            }
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends any command and returns the bare `return` value.
    pub fn execute(&self, command: &Command) -> Result<Value, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            waited: Duration::ZERO,
            source,
        })?;
        stream
            .set_read_timeout(Some(self.reply_timeout))
            .map_err(io)?;
        stream
            .set_write_timeout(Some(self.reply_timeout))
            .map_err(io)?;
        let mut line = serde_json::to_string(command).map_err(|source| ClientError::Malformed {
            path: self.path.clone(),
            line: format!("{command:?}"),
            source,
        })?;
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(io)?;
        let mut reply = String::new();
        BufReader::new(stream)
            .take(MAX_REPLY)
            .read_line(&mut reply)
            .map_err(io)?;
        if reply.is_empty() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VM process closed the connection without replying",
            )));
        }
        let parsed: Reply =
            serde_json::from_str(reply.trim()).map_err(|source| ClientError::Malformed {
                path: self.path.clone(),
                line: reply.trim().to_string(),
                source,
            })?;
        match parsed {
            Reply::Return { value, .. } => Ok(value),
            Reply::Error { error, .. } => Err(ClientError::Refused(error)),
        }
    }

    fn call<T: DeserializeOwned>(&self, command: &Command) -> Result<T, ClientError> {
        let value = self.execute(command)?;
        serde_json::from_value(value.clone()).map_err(|source| ClientError::Malformed {
            path: self.path.clone(),
            line: value.to_string(),
            source,
        })
    }

    /// `query-status`.
    pub fn query_status(&self) -> Result<StatusInfo, ClientError> {
        self.call(&Command::QueryStatus)
    }

    /// `query-vm`.
    pub fn query_vm(&self) -> Result<VmInfo, ClientError> {
        self.call(&Command::QueryVm)
    }

    /// `stop`.
    pub fn stop(&self) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::Stop).map(drop)
    }

    /// `cont`.
    pub fn cont(&self) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::Cont).map(drop)
    }

    /// `quit`.
    pub fn quit(&self) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::Quit).map(drop)
    }

    /// `verify-memory`.
    pub fn verify_memory(&self) -> Result<VerifyReport, ClientError> {
        self.call(&Command::VerifyMemory)
    }

    /// `migrate`: starts the migration; follow it with [`ControlClient::query_migrate`].
    pub fn migrate(&self, request: &MigrationRequest) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::Migrate(request.clone()))
            .map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> Result<MigrateState, ClientError> {
        self.call(&Command::QueryMigrate)
    }

    /// `set-dirty-rate`: the workload's page writes per second (above 0).
    pub fn set_dirty_rate(&self, pages_per_s: u64) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::SetDirtyRate(SetDirtyRate { pages_per_s }))
            .map(drop)
    }

    /// `migrate-cancel`.
    pub fn migrate_cancel(&self) -> Result<(), ClientError> {
        self.call::<Empty>(&Command::MigrateCancel).map(drop)
    }
}
