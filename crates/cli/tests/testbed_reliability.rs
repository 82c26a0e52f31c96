//! Reliability of the consolidation system on a testbed with its controller (issue 12): the
//! controller SIGKILLed right after it ordered a migration, and an agent SIGKILLed while it
//! sends one and while it receives one, each restarted with the same database or data
//! directory; the destination's link cut during one and brought back. Afterwards every VM runs on exactly one host (by every agent's report), every
//! `verify` VM's memory checks clean (through its VM process's control socket), and the
//! controller's `/vms` and `/migrations` agree with the agents: the migration ended as done
//! (the VM on its destination) or failed (on its source), once.
//!
//! Needs root, `/dev/kvm` and `ip netns`, and fails loudly without them. A testbed's names
//! are fixed (bridge `fmtb0`), so the scenarios run one after another in one test, each on its
//! own testbed directory, under the lock `tests/testbed.rs` takes too (`testbed_lock`).
//!
//! The cluster: 3 hosts whose declared RAM (40 MB) holds two 16 MiB VMs, linked at 4 Mbit/s so
//! that a migration lasts long enough to be killed in the middle. `vm1`, `vm2` on `h1` and
//! `vm3` on `h2` is a placement the policy leaves alone (`h1` cannot be evacuated, `h2`'s VM
//! finds no room on an active host, `h3` is empty and in standby): the only migrations are
//! the ones the test orders.

mod common;
mod testbed_lock;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fastmig_cluster::auth::Token;
use fastmig_cluster::controller::api::VmEntry;
use fastmig_cluster::http_client::HttpAgent;
use fastmig_cluster::proto::{HostName, HostReport, MigrationPhase, Side};
use fastmig_cluster::store::{MigrationRow, MigrationState};
use fastmig_cluster::AgentApi;
use serde_json::{json, Value};

const CONTROLLER: &str = "http://10.232.0.1:7400";
const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const VMS: [&str; 3] = ["vm1", "vm2", "vm3"];

/// One testbed, brought down on drop (also when an assertion fails).
struct Testbed {
    dir: PathBuf,
    token: Token,
    http: ureq::Agent,
}

impl Testbed {
    fn up(dir: PathBuf) -> Testbed {
        std::fs::create_dir_all(&dir).expect("dir");
        // G4's power model and MIPS, with room for two 16 MiB VMs.
        let mut g4 = fastmig_sim::setup::reference_host_types()[0].clone();
        g4.ram_mb = 40;
        let host_type = dir.with_extension("host.json");
        std::fs::write(&host_type, serde_json::to_vec(&g4).expect("json")).expect("host type");
        let out = Command::new(common::bin())
            .args(["testbed", "up", "--hosts", "3", "--link", "4mbit"])
            .arg("--host-type")
            .arg(&host_type)
            .args(["--interval", "2s", "--dir"])
            .arg(&dir)
            .output()
            .expect("testbed up");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let tb = Testbed {
            token: Token::new(
                std::fs::read_to_string(dir.join("token"))
                    .unwrap_or_default()
                    .trim(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "no token ({e}): {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
            dir,
            http: ureq::Agent::new_with_config(
                ureq::config::Config::builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build(),
            ),
        };
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("controller: {CONTROLLER}")),
            "{text}"
        );
        tb
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{CONTROLLER}{path}");
        let auth = self.token.bearer();
        let resp = match (method, body) {
            ("GET", _) => self.http.get(&url).header("Authorization", &auth).call(),
            (_, b) => self
                .http
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b.unwrap_or(json!({}))),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{url}: {text}")),
        )
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let (status, v) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {v}");
        serde_json::from_value(v).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("testbed.json")).expect("state"))
            .expect("state json")
    }

    fn set_state(&self, key: &str, index: Option<usize>, pid: u32) {
        let mut st = self.state();
        match index {
            Some(i) => st[key][i] = json!(pid),
            None => st[key] = json!(pid),
        }
        std::fs::write(
            self.dir.join("testbed.json"),
            serde_json::to_vec(&st).expect("json"),
        )
        .expect("state");
    }

    fn agent(&self, i: usize) -> HttpAgent {
        HttpAgent::new(
            HostName(HOSTS[i].into()),
            &format!("http://10.232.0.{}:7070", 11 + i),
            &self.token,
            Duration::from_secs(30),
        )
    }

    fn reports(&self) -> Vec<HostReport> {
        (0..HOSTS.len())
            .map(|i| self.agent(i).report().expect("report"))
            .collect()
    }

    /// Places the VMs: vm1 and vm2 on h1, vm3 on h2. The controller's first round has put
    /// the empty hosts into standby: each is woken just before its VMs are placed (the next
    /// round sees them busy).
    fn place(&self) {
        // Demand 40 % (4,000 pages/s) for 3 s stamps the whole working set, so that a
        // migration has 12 MiB to send (about 25 s at 4 Mbit/s); then 0.2 % (20 pages/s),
        // well below the link, so that it converges.
        let trace = self.dir.with_extension("trace");
        let mut samples = vec!["40"; 3];
        samples.extend(["0.2"; 1000]);
        std::fs::write(&trace, samples.join("\n")).expect("trace");
        for (vm, host) in [("vm1", "h1"), ("vm2", "h1"), ("vm3", "h2")] {
            let start = Instant::now();
            loop {
                self.call("POST", &format!("/hosts/{host}/wake"), None);
                let body = json!({"host": host, "vm": {
                    "vm": vm, "mem_bytes": 16 << 20, "vcpus": 1, "mips": 500.0,
                    "workload": "verify:rate=20,wss=12M",
                    "demand": {"kind": "trace", "path": trace, "format": "planetlab",
                        "sample_period_ms": 1000}}});
                let (status, v) = self.call("POST", "/vms", Some(body));
                if status == 201 {
                    break;
                }
                // Put back into standby by a round between the wake and the order.
                assert!(
                    status == 409 && start.elapsed() < Duration::from_secs(30),
                    "placing {vm} on {host}: {status} {v}"
                );
            }
        }
        // Past the 3 s of high demand (and 1 s for the agent to apply the next sample).
        std::thread::sleep(Duration::from_secs(5));
    }

    /// Orders `vm` to `destination` through the controller, retrying while a round has the
    /// destination in standby (it is woken first).
    fn order(&self, vm: &str, destination: &str) -> MigrationRow {
        let start = Instant::now();
        loop {
            self.call("POST", &format!("/hosts/{destination}/wake"), None);
            let body = json!({"vm": vm, "destination": destination,
                "transport": fastmig_migration::TransportKind::Classic});
            let (status, v) = self.call("POST", "/migrations", Some(body));
            if status == 201 {
                return serde_json::from_value(v).expect("migration row");
            }
            assert!(
                status == 409 && start.elapsed() < Duration::from_secs(30),
                "ordering {vm} to {destination}: {status} {v}"
            );
        }
    }

    /// Waits until the source agent reports pages moving for `vm`.
    fn wait_sending(&self, src: usize, vm: &str) {
        let start = Instant::now();
        loop {
            let r = self.agent(src).report().expect("report");
            let sending = r.migrations.iter().any(|m| {
                m.vm.0 == vm
                    && m.side == Side::Source
                    && matches!(m.phase, MigrationPhase::Running { progress: Some(_) })
            });
            if sending {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{vm} not sending from {}: {:?}",
                HOSTS[src],
                r.migrations
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs process `pid` and restarts it with the same command line (in namespace `ns`,
    /// appending to `log`); returns the new pid.
    fn kill_and_restart(&self, pid: u32, ns: Option<&str>, log: &Path) -> u32 {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let st = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
        {
            assert!(start.elapsed() < Duration::from_secs(10), "{pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(&args);
                c
            }
            None => {
                let mut c = Command::new(&args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .expect("log");
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("restart");
        let pid = child.id();
        // Reaped when `testbed down` stops it.
        std::thread::spawn(move || child.wait());
        pid
    }

    fn restart_controller(&self) {
        let pid = self.state()["controller"].as_u64().expect("controller pid") as u32;
        let new = self.kill_and_restart(pid, None, &self.dir.join("controller.log"));
        self.set_state("controller", None, new);
        let start = Instant::now();
        loop {
            let answers = self
                .http
                .get(format!("{CONTROLLER}/hosts"))
                .header("Authorization", &self.token.bearer())
                .call()
                .is_ok_and(|r| r.status() == 200);
            if answers {
                return;
            }
            // Its waiter thread reaps it: an exited controller leaves no /proc entry.
            assert!(
                Path::new(&format!("/proc/{new}")).exists(),
                "the restarted controller exited"
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the restarted controller does not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn restart_agent(&self, i: usize) {
        let pid = self.state()["agents"][i].as_u64().expect("agent pid") as u32;
        let log = self.dir.join(HOSTS[i]).join("agent.log");
        let new = self.kill_and_restart(pid, Some(&format!("fmtb-{}", HOSTS[i])), &log);
        self.set_state("agents", Some(i), new);
        let start = Instant::now();
        while self.agent(i).report().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the restarted agent {} does not answer",
                HOSTS[i]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until neither the controller nor any agent has a migration open.
    fn wait_quiet(&self) {
        let start = Instant::now();
        loop {
            let open: Vec<MigrationRow> = self.get("/migrations?open=true");
            let busy: Vec<String> = self
                .reports()
                .iter()
                .flat_map(|r| r.migrations.iter())
                .filter(|m| {
                    matches!(
                        m.phase,
                        MigrationPhase::Running { .. } | MigrationPhase::Prepared
                    )
                })
                .map(|m| format!("{} {:?} {:?}", m.vm.0, m.side, m.phase))
                .collect();
            if open.is_empty() && busy.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "still open: controller {open:?}, agents {busy:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The invariants after a crash and restart; `ordered` is the migration the test ordered.
    /// Returns whether it ended done.
    fn check(&self, ordered: &MigrationRow) -> bool {
        self.wait_quiet();
        // Exactly one host runs each VM, running, with clean memory.
        let reports = self.reports();
        let mut at = Vec::new();
        for vm in VMS {
            let hosts: Vec<usize> = (0..HOSTS.len())
                .filter(|&i| reports[i].vms.iter().any(|v| v.vm.0 == vm))
                .collect();
            assert_eq!(hosts.len(), 1, "{vm} runs on {hosts:?}");
            let i = hosts[0];
            let sock = self
                .dir
                .join(HOSTS[i])
                .join("data/vms")
                .join(vm)
                .join("api.sock");
            let c = fastmig_host::ControlClient::connect(&sock, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{vm} on {}: {e}", HOSTS[i]));
            assert_eq!(
                c.query_status().expect("status").status,
                fastmig_host::RunStatus::Running,
                "{vm}"
            );
            let v = c.verify_memory().expect("verify-memory");
            assert!(v.is_clean(), "{vm}: {v:?}");
            assert!(v.pages_checked > 0, "{vm}: {v:?}");
            at.push((vm, HOSTS[i]));
        }
        // The controller sees the same placement (after a round has read the reports).
        let start = Instant::now();
        loop {
            let vms: Vec<VmEntry> = self.get("/vms");
            let mut seen: Vec<(String, String)> = vms
                .iter()
                .map(|e| (e.vm.0.clone(), e.host.0.clone()))
                .collect();
            seen.sort();
            let want: Vec<(String, String)> = at
                .iter()
                .map(|(v, h)| (v.to_string(), h.to_string()))
                .collect();
            if seen == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "controller {seen:?}, agents {want:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // The ordered migration is in the books once, ended, and where the VM runs says how.
        let all: Vec<MigrationRow> = self.get("/migrations");
        let rows: Vec<&MigrationRow> = all.iter().filter(|m| m.id == ordered.id).collect();
        assert_eq!(rows.len(), 1, "{all:?}");
        let row = rows[0];
        let host = at
            .iter()
            .find(|(v, _)| *v == ordered.vm.0)
            .map(|(_, h)| *h)
            .expect("placed");
        match row.state {
            MigrationState::Done => assert_eq!(host, row.destination.0, "{row:?}"),
            MigrationState::Failed => assert_eq!(host, row.source.0, "{row:?}"),
            other => panic!("{other:?}: {row:?}"),
        }
        eprintln!(
            "migration {} of {} {} -> {}: {:?} after {:?} s ({:?})",
            row.id.0,
            row.vm.0,
            row.source.0,
            row.destination.0,
            row.state,
            row.measured_s,
            row.error
        );
        // Nothing else moved or is open.
        assert!(
            all.iter().all(|m| m.state.is_final()),
            "open migrations: {all:?}"
        );
        row.state == MigrationState::Done
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The logs go with the testbed's directory: show their ends.
            let logs = [
                self.dir.join("controller.log"),
                self.dir.join("h1/agent.log"),
                self.dir.join("h2/agent.log"),
                self.dir.join("h3/agent.log"),
            ];
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {}", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let out = Command::new(common::bin())
            .args(["testbed", "down", "--dir"])
            .arg(&self.dir)
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!("testbed down: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

fn vm_host(tb: &Testbed, vm: &str) -> usize {
    let reports = tb.reports();
    (0..HOSTS.len())
        .find(|&i| reports[i].vms.iter().any(|v| v.vm.0 == vm))
        .unwrap_or_else(|| panic!("{vm} runs nowhere"))
}

/// The controller SIGKILLed right after it ordered a migration (the source is sending),
/// restarted with the same database.
fn controller_killed_mid_interval(tb: &Testbed) {
    let row = tb.order("vm1", "h2");
    assert_eq!(row.state, MigrationState::Running, "{row:?}");
    tb.wait_sending(0, "vm1");
    tb.restart_controller();
    tb.check(&row);
}

/// An agent SIGKILLed while it sends (`kill_source`) or receives a migration the
/// controller ordered, restarted with the same data directory.
fn agent_killed(tb: &Testbed, kill_source: bool) {
    // vm3 between h2 and h3: h1 is full.
    let src = vm_host(tb, "vm3");
    let dst = if src == 1 { 2 } else { 1 };
    let row = tb.order("vm3", HOSTS[dst]);
    tb.wait_sending(src, "vm3");
    tb.restart_agent(if kill_source { src } else { dst });
    tb.check(&row);
}

/// The destination's link cut (`ip link set down` in its namespace) while a migration the
/// controller ordered copies, and brought back once the source gave up: the migration fails
/// and the VM stays on its source.
fn link_cut(tb: &Testbed) {
    let src = vm_host(tb, "vm3");
    let dst = if src == 1 { 2 } else { 1 };
    let row = tb.order("vm3", HOSTS[dst]);
    tb.wait_sending(src, "vm3");
    let link = |state: &str| {
        let ns = format!("fmtb-{}", HOSTS[dst]);
        let dev = format!("fmtb{}", HOSTS[dst]);
        let st = Command::new("ip")
            .args(["-n", &ns, "link", "set", &dev, state])
            .status()
            .expect("ip");
        assert!(st.success());
    };
    link("down");
    let start = Instant::now();
    loop {
        let r = tb.agent(src).report().expect("report");
        let running = r.migrations.iter().any(|m| {
            m.migration == row.id
                && matches!(
                    m.phase,
                    MigrationPhase::Running { .. } | MigrationPhase::Prepared
                )
        });
        if !running {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the source still sends over a cut link"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    link("up");
    assert!(
        !tb.check(&row),
        "a migration over a cut link cannot be done"
    );
}

#[test]
fn no_vm_is_lost_or_doubled_when_the_controller_or_an_agent_dies_mid_migration() {
    common::require_root_kvm_netns("these tests");
    let _lock = testbed_lock::lock();
    let tmp = tempfile::tempdir().expect("tempdir");

    let tb = Testbed::up(tmp.path().join("controller-killed"));
    tb.place();
    controller_killed_mid_interval(&tb);
    drop(tb);

    let tb = Testbed::up(tmp.path().join("agent-killed"));
    tb.place();
    agent_killed(&tb, true);
    agent_killed(&tb, false);
    link_cut(&tb);
    drop(tb);

    // `down` stopped the controllers and agents and removed the network.
    let ps = Command::new("pgrep")
        .args(["-f", &tmp.path().display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&ps.stdout)
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&links.stdout).contains("fmtb"));
}
