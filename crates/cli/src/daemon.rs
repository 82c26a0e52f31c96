//! Readiness for scripts: `--ready-file PATH` (written once the process can be used) and
//! `--daemonize` (return once it can be used, leaving it running in the background).
//!
//! `--daemonize` starts this same command again as a child in its own process group, with a
//! ready file, and waits until the file appears (success: exit 0, the child keeps running)
//! or the child exits (its own error line is already on stderr: exit with its code). The
//! child's stderr stays the caller's; its stdin and stdout are closed.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Readiness flags of `run` and `incoming`.
#[derive(clap::Args, Debug, Clone)]
pub struct Readiness {
    /// Write this file (holding the process id) once the process is ready: the VM runs and
    /// the control socket answers (`run`), or a source may connect (`incoming`). It is
    /// removed when the process ends.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Go to the background and return once the process is ready (as `--ready-file` says);
    /// exit with the process's own error when it fails first.
    #[arg(long)]
    pub daemonize: bool,
}

/// When `--daemonize` is given, starts the background child, waits until it is ready and
/// exits this process; otherwise returns.
pub fn maybe_daemonize(r: &Readiness) -> Result<()> {
    if !r.daemonize {
        return Ok(());
    }
    let mut scratch = None;
    let ready: PathBuf = match &r.ready_file {
        Some(p) => p.clone(),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("fastmig-ready")
                .tempdir()
                .context("creating a directory for the ready file")?;
            let p = dir.path().join("ready");
            scratch = Some(dir);
            p
        }
    };
    let mut args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemonize")
        .collect();
    if r.ready_file.is_none() {
        args.push("--ready-file".into());
        args.push(ready.clone().into());
    }
    let exe = std::env::current_exe().context("locating the fastmig binary")?;
    let mut child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its own process group: Ctrl-C in the caller's terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the background process")?;
    loop {
        if ready.exists() {
            // Our scratch ready file has done its job (the child ignores its removal). The
            // child keeps running: exiting neither waits for it nor kills it.
            drop(scratch);
            std::process::exit(0);
        }
        if let Some(status) = child
            .try_wait()
            .context("waiting for the background process")?
        {
            match status.code() {
                // Its own one-line error is already on stderr.
                Some(code) if code != 0 => std::process::exit(code),
                Some(_) => bail!("the background process ended before it was ready"),
                None => bail!("the background process ended before it was ready ({status})"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
