//! Child `fastmig` processes, for `demo` and `bench`: a source (`run`) and a destination
//! (`incoming`) started from this same binary, driven through [`ControlClient`], and killed on
//! drop so that an error half-way never leaves a VM behind.
//!
//! A child's stderr goes to a log file in the caller's scratch directory (or to our stderr
//! with `verbose`); when a child fails, its own last error line is part of our error, and a
//! child that exits 2 (bad input) makes ours a usage error too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fastmig_host::{ControlClient, StatusInfo};
use serde_json::Value;

/// A `fastmig` child process with a control socket.
pub struct ChildVm {
    /// What it is, for messages ("source", "destination").
    pub role: &'static str,
    /// Its control socket's client.
    pub client: ControlClient,
    child: Child,
    log: Option<PathBuf>,
}

/// The last `fastmig: ...` line of a child's log (its own error), if any.
fn last_error_line(log: Option<&Path>) -> Option<String> {
    let text = std::fs::read_to_string(log?).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("fastmig: "))
        .map(|l| l.trim_start_matches("fastmig: ").to_string())
}

/// An error for a child that exited: its own error line when it wrote one, a usage error
/// when it exited 2.
fn child_exited(
    role: &str,
    status: std::process::ExitStatus,
    log: Option<&Path>,
    when: &str,
) -> anyhow::Error {
    let why = last_error_line(log)
        .map(|l| format!(": {l}"))
        .unwrap_or_default();
    let msg = format!("the {role} process exited {when} ({status}){why}");
    if status.code() == Some(2) {
        crate::usage!("{msg}")
    } else {
        anyhow::anyhow!(msg)
    }
}

impl ChildVm {
    /// Starts `fastmig <args...>` (its log in `dir`, or on our stderr when `verbose`) and
    /// waits (up to `timeout`) until its control socket — the path after `--api` in
    /// `args` — answers.
    pub fn spawn(
        role: &'static str,
        args: &[String],
        dir: &Path,
        verbose: bool,
        timeout: Duration,
    ) -> Result<ChildVm> {
        Self::spawn_wrapped(role, &[], args, dir, verbose, timeout)
    }

    /// As [`ChildVm::spawn`], run through a wrapper command `wrapper...` (for example
    /// `ip netns exec NAME`) that execs the `fastmig` binary.
    pub fn spawn_wrapped(
        role: &'static str,
        wrapper: &[String],
        args: &[String],
        dir: &Path,
        verbose: bool,
        timeout: Duration,
    ) -> Result<ChildVm> {
        let api = args
            .iter()
            .position(|a| a == "--api")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .context("a child VM process needs --api")?;
        let exe = std::env::current_exe().context("locating the fastmig binary")?;
        let (stderr, log) = if verbose {
            (Stdio::inherit(), None)
        } else {
            let path = dir.join(format!("{role}.log"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            (Stdio::from(file), Some(path))
        };
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting the {role} process"))?;
        let mut child = child;
        let deadline = Instant::now() + timeout;
        let give_up = |child: &mut Child, err: anyhow::Error| {
            let _ = child.kill();
            let _ = child.wait();
            Err(err)
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(child_exited(role, status, log.as_deref(), "early"))
                }
                Ok(None) => {}
                Err(e) => return give_up(&mut child, e.into()),
            }
            if let Ok(client) = ControlClient::connect(&api, Duration::ZERO) {
                if client.query_status().is_ok() {
                    return Ok(ChildVm {
                        role,
                        client,
                        child,
                        log,
                    });
                }
            }
            if Instant::now() > deadline {
                return give_up(
                    &mut child,
                    anyhow::anyhow!(
                        "the {role} process did not open its control socket in {timeout:?}"
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `query-status` satisfies `pred`, or fails after `timeout`.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StatusInfo) -> bool,
    ) -> Result<StatusInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(child_exited(
                    self.role,
                    status,
                    self.log.as_deref(),
                    &format!("while waiting for {what}"),
                ));
            }
            if let Ok(st) = self.client.query_status() {
                if pred(&st) {
                    return Ok(st);
                }
            }
            if Instant::now() > deadline {
                bail!("the {} did not reach {what} in {timeout:?}", self.role);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Asks the process to quit and waits for it (killing it after a grace period).
    pub fn quit(mut self) -> Result<()> {
        let _ = self.client.quit();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        self.child.wait().ok();
        bail!("the {} process did not quit; killed it", self.role)
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `fastmig <args...>` to completion and returns its stdout parsed as JSON; a non-zero
/// exit becomes an error carrying the child's last stderr line.
pub fn run_json(args: &[String]) -> Result<Value> {
    let exe = std::env::current_exe().context("locating the fastmig binary")?;
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running fastmig")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("").to_string();
        // A failed migration still prints its summary; keep it when there is one.
        if let Ok(v) = serde_json::from_str::<Value>(stdout.trim()) {
            return Ok(v);
        }
        bail!(
            "`fastmig {}` failed ({}): {last}",
            args.join(" "),
            out.status
        );
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing the JSON printed by `fastmig {}`", args.join(" ")))
}

/// A free TCP port on loopback (bind to port 0, read it, release it).
pub fn free_loopback_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}
