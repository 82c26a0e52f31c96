//! Child `fastmig` processes, for `demo` and `bench`: a source (`run`) and a destination
//! (`incoming`) started from this same binary, driven over their control sockets, and killed on
//! drop so that an error half-way never leaves a VM behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::api;

/// A `fastmig` child process with a control socket.
pub struct ChildVm {
    /// What it is, for messages ("source", "destination").
    pub role: &'static str,
    /// Its control socket.
    pub api: PathBuf,
    child: Child,
}

impl ChildVm {
    /// Starts `fastmig <args...>` whose control socket is `api`, with stderr passed through
    /// when `verbose`, and waits (up to `timeout`) until the socket answers `query-status`.
    pub fn spawn(
        role: &'static str,
        args: &[String],
        api: &Path,
        verbose: bool,
        timeout: Duration,
    ) -> Result<ChildVm> {
        Self::spawn_wrapped(role, &[], args, api, verbose, timeout)
    }

    /// As [`ChildVm::spawn`], run through a wrapper command `wrapper...` (for example
    /// `ip netns exec NAME`) that execs the `fastmig` binary.
    pub fn spawn_wrapped(
        role: &'static str,
        wrapper: &[String],
        args: &[String],
        api: &Path,
        verbose: bool,
        timeout: Duration,
    ) -> Result<ChildVm> {
        let exe = std::env::current_exe().context("locating the fastmig binary")?;
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
            .stderr(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("starting the {role} process"))?;
        let mut vm = ChildVm {
            role,
            api: api.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = vm.child.try_wait()? {
                bail!("the {role} process exited early ({status})");
            }
            if api.exists() && api::call(api, "query-status", None).is_ok() {
                return Ok(vm);
            }
            if Instant::now() > deadline {
                bail!("the {role} process did not open its control socket in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one control command.
    pub fn call(&self, execute: &str, args: Value) -> Result<Value> {
        api::call(&self.api, execute, Some(args))
            .with_context(|| format!("{} {execute}", self.role))
    }

    /// Waits until `query-status` satisfies `pred`, or fails after `timeout`.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the {} process exited ({status}) while waiting for {what}",
                    self.role
                );
            }
            if let Ok(st) = self.call("query-status", json!({})) {
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
        let _ = self.call("quit", json!({}));
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
