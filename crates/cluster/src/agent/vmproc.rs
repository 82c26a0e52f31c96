//! The VM processes of one agent: each VM lives in `DATA_DIR/vms/NAME/` with its metadata
//! (`vm.json`), its control socket (`api.sock`), its ready file and its log (`vm.log`). The
//! processes are started with `--daemonize`, in their own process group, so that they
//! outlive the agent: a restarted agent adopts them from these directories.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fastmig_host::ControlClient;
use fastmig_migration::TransportKind;
use serde::{Deserialize, Serialize};

use crate::proto::{HostName, MigrationId, StartVm, VmName};

/// What `vm.json` holds: enough to report the VM and to carry on after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMeta {
    /// How it was started (or announced, for an incoming VM).
    pub vm: StartVm,
    /// When its demand trace started, ms since the Unix epoch.
    pub demand_epoch_ms: u64,
    /// An incoming migration not yet finished here.
    #[serde(default)]
    pub incoming: Option<MigrationMeta>,
    /// An outgoing migration not yet finished here.
    #[serde(default)]
    pub outgoing: Option<MigrationMeta>,
}

/// A migration a VM takes part in, as `vm.json` remembers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationMeta {
    /// The migration.
    pub migration: MigrationId,
    /// The other host.
    pub peer: HostName,
    /// Its transport.
    pub transport: TransportKind,
}

/// Why a VM process could not be started or its directory used.
#[derive(Debug, thiserror::Error)]
pub enum VmProcError {
    /// Creating, reading or writing the VM's directory failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `vm.json` is not what this agent writes.
    #[error("{path} is not a VM's metadata")]
    Meta {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The `fastmig` process failed before it was ready.
    #[error("the VM process did not start: {0}")]
    Start(String),
    /// Its control socket does not answer.
    #[error("the VM process's control socket")]
    Control(#[source] fastmig_host::ClientError),
}

/// A VM's directory and the files in it.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    /// `DATA_DIR/vms/NAME`.
    pub fn new(data_dir: &Path, vm: &VmName) -> VmDir {
        VmDir(vms_dir(data_dir).join(&vm.0))
    }
    /// Control socket.
    pub fn api(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    /// Metadata.
    pub fn meta(&self) -> PathBuf {
        self.0.join("vm.json")
    }
    /// The process's stderr.
    pub fn log(&self) -> PathBuf {
        self.0.join("vm.log")
    }
    /// Ready file (holds the process id while it runs).
    pub fn ready(&self) -> PathBuf {
        self.0.join("ready")
    }
    /// Unix migration endpoint of an incoming shm/handover migration.
    pub fn migration_socket(&self) -> PathBuf {
        self.0.join("mig.sock")
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> VmProcError + '_ {
        move |source| VmProcError::Io {
            what,
            path: self.0.clone(),
            source,
        }
    }

    /// Creates the directory (it must not exist: a name is one VM).
    pub fn create(&self) -> Result<(), VmProcError> {
        if let Some(parent) = self.0.parent() {
            std::fs::create_dir_all(parent).map_err(self.io("creating"))?;
        }
        std::fs::create_dir(&self.0).map_err(self.io("creating the VM directory"))
    }

    /// Removes it and everything in it.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), "cannot remove a VM directory: {e}");
            }
        }
    }

    /// Writes `vm.json` atomically (a temporary file renamed over it).
    pub fn write_meta(&self, meta: &VmMeta) -> Result<(), VmProcError> {
        let tmp = self.0.join("vm.json.tmp");
        let text = serde_json::to_vec_pretty(meta).map_err(|source| VmProcError::Meta {
            path: self.meta(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(self.io("writing vm.json in"))?;
        std::fs::rename(&tmp, self.meta()).map_err(self.io("writing vm.json in"))
    }

    /// Reads `vm.json`.
    pub fn read_meta(&self) -> Result<VmMeta, VmProcError> {
        let path = self.meta();
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
            .map_err(self.io("reading vm.json in"))?;
        serde_json::from_str(&text).map_err(|source| VmProcError::Meta { path, source })
    }

    /// The last line of the process's log (its error line when it failed).
    pub fn last_log_line(&self) -> String {
        let Ok(mut f) = std::fs::File::open(self.log()) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut tail = String::new();
        let _ = f.read_to_string(&mut tail);
        tail.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// `DATA_DIR/vms`.
pub fn vms_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("vms")
}

/// True for names that are safe as one path component and readable in logs.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// How long a starting VM process may take to be ready.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Starts `fastmig ARGS --api .. --ready-file .. --daemonize` with its stderr in the VM's
/// log, waits until it is ready and connects to it. Blocking.
fn spawn(bin: &Path, dir: &VmDir, args: &[String]) -> Result<ControlClient, VmProcError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log())
        .map_err(dir.io("opening the log in"))?;
    let status = Command::new(bin)
        .args(args)
        .arg("--api")
        .arg(dir.api())
        .arg("--ready-file")
        .arg(dir.ready())
        .arg("--daemonize")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .map_err(dir.io("starting the fastmig binary for"))?;
    if !status.success() {
        return Err(VmProcError::Start(format!(
            "{status}: {}",
            dir.last_log_line()
        )));
    }
    connect(dir, CONNECT_WAIT)
}

/// Connects to a VM's control socket; the client waits at most 5 s for each reply.
pub fn connect(dir: &VmDir, wait: Duration) -> Result<ControlClient, VmProcError> {
    let mut client = ControlClient::connect(dir.api(), wait).map_err(VmProcError::Control)?;
    client.reply_timeout = Duration::from_secs(5);
    Ok(client)
}

/// Starts `fastmig run` for a new VM. Blocking.
pub fn spawn_run(bin: &Path, dir: &VmDir, vm: &StartVm) -> Result<ControlClient, VmProcError> {
    let args = vec![
        "run".into(),
        "--mem".into(),
        vm.mem_bytes.to_string(),
        "--vcpus".into(),
        vm.vcpus.to_string(),
        "--workload".into(),
        vm.workload.clone(),
    ];
    spawn(bin, dir, &args)
}

/// Starts `fastmig incoming` listening on `listen` (`IP:PORT` or `unix:PATH`), its memory
/// prepared for `vm`; it gives up when no source connects within `accept_timeout`. Blocking.
pub fn spawn_incoming(
    bin: &Path,
    dir: &VmDir,
    vm: &StartVm,
    listen: &str,
    accept_timeout: Duration,
) -> Result<ControlClient, VmProcError> {
    let args = vec![
        "incoming".into(),
        "--listen".into(),
        listen.to_string(),
        "--mem".into(),
        vm.mem_bytes.to_string(),
        "--vcpus".into(),
        vm.vcpus.to_string(),
        "--accept-timeout".into(),
        format!("{}ms", accept_timeout.as_millis()),
    ];
    spawn(bin, dir, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_single_safe_path_components() {
        for ok in ["vm1", "web-01", "a.b_c"] {
            assert!(valid_vm_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }
}
