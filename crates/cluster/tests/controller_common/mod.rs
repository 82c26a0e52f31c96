//! Shared fixture of the controller's API tests: fake agents, a controller on SQLite, and its
//! HTTP API on a loopback port.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use fastmig_cluster::controller::api::{serve, ApiState};
use fastmig_cluster::controller::{Controller, ControllerConfig};
use fastmig_cluster::fake_agent::{test_vm, FakeCluster};
use fastmig_cluster::proto::HostName;
use fastmig_cluster::AgentApi;
use fastmig_sim::setup::reference_host_types;
use serde_json::Value;

/// The API token of the fixture.
pub const TOKEN: &str = "s3cret-token";

/// A controller serving its API, over fake agents.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The agents.
    pub fake: Arc<FakeCluster>,
    /// The controller.
    pub ctl: Arc<Mutex<Controller>>,
    http: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The controller's API for `ctl` on a loopback port, served by a thread of its own until
/// the sender fires: (address, stop, thread).
pub fn spawn_api(
    ctl: &Arc<Mutex<Controller>>,
    token: &str,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().expect("addr");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = ApiState::new(
        Arc::clone(ctl),
        fastmig_cluster::auth::Token::new(token).expect("token"),
    );
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            serve(l, st, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
    });
    (addr, tx, thread)
}

/// A host name.
pub fn h(n: &str) -> HostName {
    HostName(n.into())
}

/// Hosts a, b, c, d (G4). a: v1 (1000 MIPS, 870 MB) and v2 (2000 MIPS, 1740 MB) fully busy,
/// b: v3 at 250 MIPS. After three rounds (each migration completing between them) the
/// cluster is settled: a migration moved v1 off a, empty hosts are in standby.
pub fn start() -> Server {
    let g4 = reference_host_types()[0].clone();
    let fake = FakeCluster::new(
        ["a", "b", "c", "d"]
            .into_iter()
            .map(|n| (h(n), g4.clone()))
            .collect(),
    );
    fake.start(&h("a"), &test_vm("v1", 870, 1000.0, 1.0));
    fake.start(&h("a"), &test_vm("v2", 1740, 2000.0, 1.0));
    fake.start(&h("b"), &test_vm("v3", 613, 500.0, 0.5));
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("c.db").display());
    let store = fastmig_cluster::store::open(&url).expect("store");
    let agents = fake
        .agents()
        .into_iter()
        .map(|a| Arc::new(a) as Arc<dyn AgentApi>)
        .collect();
    let mut ctl = Controller::new(ControllerConfig::new("thr-mmt"), agents, store).expect("ctl");
    for _ in 0..3 {
        ctl.tick().expect("tick");
        fake.step();
    }
    ctl.tick().expect("tick");
    let ctl = Arc::new(Mutex::new(ctl));
    let (addr, tx, thread) = spawn_api(&ctl, TOKEN);
    let http = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .build(),
    );
    Server {
        base: format!("http://{addr}"),
        fake,
        ctl,
        http,
        stop: Some(tx),
        thread: Some(thread),
        _dir: dir,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// A request with `token` (None: no header); returns (status, JSON body).
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => {
                let mut r = self.http.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .http
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or("").as_bytes())
            }
        };
        let mut resp = resp.expect("request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {text:?}"));
        (status, json)
    }

    /// A request with the right token.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_with(method, path, body, Some(TOKEN))
    }

    /// Hosts, VMs and migrations as the API shows them.
    pub fn snapshot(&self) -> (Value, Value, Value) {
        (
            self.call("GET", "/hosts", None).1,
            self.call("GET", "/vms", None).1,
            self.call("GET", "/migrations", None).1,
        )
    }

    /// Where a VM runs, per the API.
    pub fn host_of(&self, vm: &str) -> String {
        let (_, vms) = self.call("GET", "/vms", None);
        vms.as_array()
            .expect("array")
            .iter()
            .find(|v| v["vm"] == vm)
            .and_then(|v| v["host"].as_str())
            .unwrap_or_else(|| panic!("{vm} not listed"))
            .to_owned()
    }

    /// Hosts in a state, per the API.
    pub fn hosts_in(&self, state: &str) -> Vec<String> {
        let (_, hosts) = self.call("GET", "/hosts", None);
        hosts
            .as_array()
            .expect("array")
            .iter()
            .filter(|h| h["state"] == state)
            .filter_map(|h| h["name"].as_str().map(str::to_owned))
            .collect()
    }
}
