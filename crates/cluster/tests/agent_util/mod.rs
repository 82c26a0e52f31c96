//! Shared fixtures of the agent tests: real `fastmig agent` processes on loopback, each with
//! its own data directory, and the VM processes they start.
//!
//! These tests need `/dev/kvm` and the `fastmig` binary built from this tree, of the same
//! profile (`cargo test --workspace` builds it; alone, `cargo build -p fastmig-cli` first;
//! `FASTMIG_BIN` names another one). Without either they fail
//! at once, saying so, rather than pass without testing anything.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fastmig_cluster::auth::Token;
use fastmig_cluster::http_client::HttpAgent;
use fastmig_cluster::proto::{
    DemandSource, HostName, HostReport, MigrationId, MigrationPhase, MigrationRecord, StartVm,
    VmName,
};
use fastmig_cluster::AgentApi;
use fastmig_host::ControlClient;

/// The token every test agent shares.
pub const TOKEN: &str = "test-token-0123456789";

/// The `fastmig` binary under test.
pub fn fastmig_bin() -> PathBuf {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests run real VMs and need /dev/kvm"
    );
    // The test executable is target/PROFILE/deps/NAME: the binary of the same profile sits
    // in target/PROFILE (`cargo test --workspace [--release]` builds it).
    let bin = std::env::var_os("FASTMIG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the test executable");
            exe.parent()
                .and_then(Path::parent)
                .map(|profile| profile.join("fastmig"))
                .expect("target/PROFILE")
        });
    if std::env::var_os("FASTMIG_BIN").is_none() {
        assert_fresh(&bin);
    }
    let ok = Command::new(&bin)
        .args(["agent", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} is missing or has no `agent` subcommand: run `cargo build -p fastmig-cli` (with --release for a release test run) first",
        bin.display()
    );
    bin
}

/// Fails when a source file of the crates the binary is built from is newer than the binary:
/// `cargo test -p fastmig-cluster` does not rebuild another package's binary, and a stale
/// one would test old code.
fn assert_fresh(bin: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut best = None;
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest(&p)
            } else {
                e.metadata().and_then(|m| m.modified()).ok()
            };
            best = best.max(t);
        }
        best
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for c in ["cluster", "host", "vmm", "migration", "cli"] {
        let src = crates.join(c).join("src");
        if let Some(t) = newest(&src) {
            assert!(
                t <= built,
                "{} is older than {}: run `cargo build -p fastmig-cli` first",
                bin.display(),
                src.display()
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One agent process and its data directory.
pub struct TestAgent {
    pub host: HostName,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
    /// `--shutdown-grace`.
    grace: &'static str,
}

impl TestAgent {
    /// Starts an agent and waits until it answers.
    pub fn start(name: &str) -> TestAgent {
        Self::start_with_grace(name, "10s")
    }

    /// Starts an agent with this `--shutdown-grace`.
    pub fn start_with_grace(name: &str, grace: &'static str) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).expect("token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut a = TestAgent {
            host: HostName(name.into()),
            port: free_port(),
            dir,
            child: None,
            bin: fastmig_bin(),
            grace,
        };
        a.spawn();
        a
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the agent process on the same port and data directory.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log");
        let child = Command::new(&self.bin)
            .args(["--log", "info", "agent", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--host-id", &self.host.0, "--host-type", "G4", "--data-dir"])
            .arg(self.data_dir())
            .arg("--token-file")
            .arg(self.dir.path().join("token"))
            .args(["--shutdown-grace", self.grace, "--accept-timeout", "20s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        self.child = Some(child);
        let api = self.api();
        let start = Instant::now();
        while let Err(e) = api.report() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "agent {} did not answer: {e}\n{}",
                self.host,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("a running agent");
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        c.wait().expect("wait")
    }

    /// A client with the right token.
    pub fn api(&self) -> HttpAgent {
        self.api_with(TOKEN)
    }

    /// A client with any token.
    pub fn api_with(&self, token: &str) -> HttpAgent {
        HttpAgent::new(
            self.host.clone(),
            &self.url(),
            &Token::new(token).expect("token"),
            Duration::from_secs(20),
        )
    }

    /// The control client of a VM of this host, when its process answers.
    pub fn vm_client(&self, vm: &str) -> Option<ControlClient> {
        let sock = self.data_dir().join("vms").join(vm).join("api.sock");
        let c = ControlClient::connect(sock, Duration::ZERO).ok()?;
        c.query_status().ok().map(|_| c)
    }

    /// The process id of a VM's process (its ready file).
    pub fn vm_pid(&self, vm: &str) -> Option<u32> {
        let ready = self.data_dir().join("vms").join(vm).join("ready");
        std::fs::read_to_string(ready).ok()?.trim().parse().ok()
    }

    /// A raw request (for what the typed client cannot send).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let url = format!("{}{path}", self.url());
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let req = req
            .header("Content-Type", "application/json")
            .body(body.unwrap_or("").to_string())
            .expect("request");
        let mut resp = agent.run(req).expect("the agent answers");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        (status, text)
    }
}

impl Drop for TestAgent {
    /// Kills the agent and quits every VM process it left, so that no test leaks a VM.
    fn drop(&mut self) {
        self.kill();
        if let Ok(entries) = std::fs::read_dir(self.data_dir().join("vms")) {
            for e in entries.flatten() {
                if let Ok(c) = ControlClient::connect(e.path().join("api.sock"), Duration::ZERO) {
                    let _ = c.quit();
                }
            }
        }
    }
}

/// A small VM: 16 MiB, one vCPU, a `verify` workload (its memory can be checked).
pub fn small_vm(name: &str) -> StartVm {
    StartVm {
        vm: VmName(name.into()),
        mem_bytes: 16 << 20,
        vcpus: 1,
        mips: 500.0,
        workload: "verify:rate=1000,wss=8M".into(),
        demand: DemandSource::Constant { utilization: 0.5 },
        demand_epoch_ms: None,
    }
}

/// The report's VM names.
pub fn vm_names(r: &HostReport) -> Vec<String> {
    r.vms.iter().map(|v| v.vm.0.clone()).collect()
}

/// Polls a migration on one agent until it ends (at most `within`).
pub fn wait_ended(api: &HttpAgent, id: MigrationId, within: Duration) -> MigrationRecord {
    let start = Instant::now();
    loop {
        let r = api.migration(id).expect("migration record");
        if matches!(
            r.phase,
            MigrationPhase::Completed { .. }
                | MigrationPhase::Failed { .. }
                | MigrationPhase::InDoubt { .. }
        ) {
            return r;
        }
        assert!(
            start.elapsed() < within,
            "migration {id} on {} still {:?}",
            api.host(),
            r.phase
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
