//! The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven through
//! `chromedriver` (Debian's `chromium-driver`) by a small WebDriver client over `ureq`, against
//! a controller over three fake agents. The page loads with no console error, shows every
//! host, follows a migration ordered through the API into flight and done, and its order
//! button starts a migration the API then lists. A screenshot is saved under the test's
//! output directory (`CARGO_TARGET_TMPDIR`).
//!
//! The test needs Chromium: without it, it fails and says what to install (`.ci/run`
//! installs both packages).

mod controller_common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use fastmig_cluster::controller::{Controller, ControllerConfig};
use fastmig_cluster::fake_agent::{test_vm, FakeCluster};
use fastmig_cluster::proto::HostName;
use fastmig_cluster::AgentApi;
use fastmig_sim::setup::reference_host_types;
use serde_json::{json, Value};

const TOKEN: &str = "browser-token";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The longest wait for anything the page shows (it is fed one event a second).
const WAIT: Duration = Duration::from_secs(10);
/// The key of an element reference in WebDriver's JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn h(n: &str) -> HostName {
    HostName(n.into())
}

fn http() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

/// `(status, JSON)` of a request; `body` None sends a GET.
fn request(
    agent: &ureq::Agent,
    url: &str,
    body: Option<&Value>,
    method_delete: bool,
    token: Option<&str>,
) -> (u16, Value) {
    let resp = if method_delete {
        agent.delete(url).call()
    } else if let Some(b) = body {
        let mut r = agent.post(url).header("Content-Type", "application/json");
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.send(b.to_string().as_bytes())
    } else {
        let mut r = agent.get(url);
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.call()
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// A controller over fake agents a, b, c serving its API and dashboard on a loopback port.
struct Cluster {
    base: String,
    fake: Arc<FakeCluster>,
    ctl: Arc<Mutex<Controller>>,
    http: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// a: v1 and v2, b: v3; a few rounds settle it (the controller moves load and puts an empty
    /// host into standby), so the page shows both states.
    fn start() -> Self {
        let g4 = reference_host_types()[0].clone();
        let fake = FakeCluster::new(
            ["a", "b", "c"]
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
        let mut ctl =
            Controller::new(ControllerConfig::new("thr-mmt"), agents, store).expect("controller");
        for _ in 0..3 {
            ctl.tick().expect("tick");
            fake.step();
        }
        ctl.tick().expect("tick");
        let ctl = Arc::new(Mutex::new(ctl));
        let (addr, tx, thread) = controller_common::spawn_api(&ctl, TOKEN);
        Cluster {
            base: format!("http://{addr}"),
            fake,
            ctl,
            http: http(),
            stop: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> Value {
        let (st, v) = request(
            &self.http,
            &format!("{}{path}", self.base),
            None,
            false,
            Some(TOKEN),
        );
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    /// Completes the migrations in flight: the agents finish them, the controller records it.
    fn settle(&self) {
        self.fake.step();
        self.ctl.lock().expect("controller").tick().expect("tick");
    }

    fn host_of(&self, vm: &str) -> String {
        self.get("/vms")
            .as_array()
            .expect("array")
            .iter()
            .find(|v| v["vm"] == vm)
            .and_then(|v| v["host"].as_str())
            .unwrap_or_else(|| panic!("{vm} not listed"))
            .to_owned()
    }

    /// An active host other than `not`.
    fn other_active(&self, not: &str) -> String {
        self.get("/hosts")
            .as_array()
            .expect("array")
            .iter()
            .filter(|x| x["state"] == "active" && x["name"] != not)
            .find_map(|x| x["name"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no active host besides {not}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A chromedriver process and one headless Chromium session behind it.
struct Browser {
    driver: Child,
    session: String,
    http: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: this test needs headless Chromium; install Debian's \
                 `chromium` and `chromium-driver` (apt-get install chromium chromium-driver; \
                 .ci/run does it). Missing package: `{package}`"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let http = http();
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if let Ok(mut r) = http.get(format!("{base}/status")).call() {
                let v: Value = serde_json::from_str(&r.body_mut().read_to_string().expect("body"))
                    .expect("status JSON");
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(start.elapsed() < WAIT, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        // Chromium without these flags tries the network (updates, sync, QUIC probes).
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1400,1000".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let (st, v) = request(&http, &format!("{base}/session"), Some(&caps), false, None);
        assert_eq!(st, 200, "new session: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id: {v}"))
            .to_owned();
        Browser {
            driver,
            session: format!("{base}/session/{session}"),
            http,
            _profile: profile,
        }
    }

    /// A WebDriver command; `Err` holds the WebDriver error name (e.g. `no such element`).
    fn cmd(&self, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (st, v) = request(
            &self.http,
            &format!("{}{path}", self.session),
            body.as_ref(),
            false,
            None,
        );
        if st == 200 {
            Ok(v["value"].clone())
        } else {
            Err(v["value"]["error"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_owned))
        }
    }

    fn must(&self, path: &str, body: Option<Value>) -> Value {
        self.cmd(path, body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    fn goto(&self, url: &str) {
        self.must("/url", Some(json!({ "url": url })));
    }

    /// The element matching a CSS selector, if any.
    fn find(&self, css: &str) -> Option<String> {
        let r = self.cmd(
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        match r {
            Ok(v) => Some(
                v[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("no element id in {v}"))
                    .to_owned(),
            ),
            Err(e) if e == "no such element" => None,
            Err(e) => panic!("find {css}: {e}"),
        }
    }

    /// Runs `f` on the element at `css` until it succeeds: the page re-renders its tables and
    /// selects on every event, so a found element may go stale before it is used.
    fn with<T>(&self, css: &str, what: &str, f: impl Fn(&str) -> Result<T, String>) -> T {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css) {
                match f(&e) {
                    Ok(v) => return v,
                    Err(err) if err == "stale element reference" => {}
                    Err(err) => panic!("{what} ({css}): {err}"),
                }
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: no {css} after {WAIT:?}\n{}",
                self.body_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, css: &str) -> String {
        self.with(css, "text", |e| {
            self.cmd(&format!("/element/{e}/text"), None)
                .map(|v| v.as_str().unwrap_or_default().to_owned())
        })
    }

    fn attr(&self, css: &str, name: &str) -> String {
        self.with(css, "attribute", |e| {
            self.cmd(&format!("/element/{e}/attribute/{name}"), None)
                .map(|v| v.as_str().unwrap_or_default().to_owned())
        })
    }

    fn click(&self, css: &str) {
        self.with(css, "click", |e| {
            self.cmd(&format!("/element/{e}/click"), Some(json!({})))
        });
    }

    fn type_into(&self, css: &str, text: &str) {
        self.with(css, "type", |e| {
            self.cmd(
                &format!("/element/{e}/value"),
                Some(json!({ "text": text })),
            )
        });
    }

    /// Waits until `check` holds.
    fn wait_for(&self, what: &str, check: impl Fn() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < WAIT,
                "{what}: not within {WAIT:?}\n{}",
                self.body_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn body_text(&self) -> String {
        self.find("body")
            .and_then(|e| self.cmd(&format!("/element/{e}/text"), None).ok())
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    /// The console messages since the last call (chromedriver's `browser` log: console calls,
    /// uncaught exceptions, failed loads).
    fn console(&self) -> Vec<Value> {
        let v = self.must("/se/log", Some(json!({"type": "browser"})));
        v.as_array().cloned().unwrap_or_default()
    }

    fn screenshot(&self, to: &Path) -> Vec<u8> {
        let b64 = self.must("/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 string"))
            .expect("screenshot is base64");
        std::fs::write(to, &png).expect("write screenshot");
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (Chromium exits), then the driver: asked first, so that it reaps
        // Chromium; killed if it does not exit.
        let _ = request(&self.http, &self.session, None, true, None);
        if let Some(base) = self.session.split("/session/").next() {
            let _ = self.http.get(format!("{base}/shutdown")).call();
        }
        let start = Instant::now();
        while matches!(self.driver.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Fails on any console message of level SEVERE (errors, uncaught exceptions, failed loads);
/// `seen` keeps every message for the failure's text.
fn assert_no_console_error(b: &Browser, seen: &mut Vec<Value>, when: &str) {
    seen.extend(b.console());
    let errors: Vec<&Value> = seen.iter().filter(|m| m["level"] == "SEVERE").collect();
    assert!(
        errors.is_empty(),
        "console errors {when}: {errors:#?}\nall messages: {seen:#?}"
    );
}

/// A value the page does not know yet shows as "-", never as JavaScript's NaN or undefined.
fn assert_all_shown(text: &str) {
    for bad in ["NaN", "undefined", "null"] {
        assert!(!text.contains(bad), "the page shows {bad}: {text}");
    }
}

#[test]
fn the_dashboard_shows_the_cluster_follows_migrations_and_orders_one() {
    // The browser is dropped first: the server's graceful shutdown waits for the page's open
    // event stream to close.
    let c = Cluster::start();
    let browser = Browser::start();
    let mut console = Vec::new();

    // Loads: the script runs and asks for the token.
    browser.goto(&format!("{}/", c.base));
    browser.wait_for("the page asks for a token", || {
        browser.text("#conn") == "token needed"
    });
    assert_no_console_error(&browser, &mut console, "on load");

    // The operator pastes the token: every host shows, in the state the API reports.
    browser.type_into("#token", TOKEN);
    browser.click("#token-save");
    browser.wait_for("the stream connects", || browser.text("#conn") == "live");
    let hosts = c.get("/hosts");
    let hosts = hosts.as_array().expect("array");
    assert_eq!(hosts.len(), 3);
    for host in hosts {
        let name = host["name"].as_str().expect("name");
        let state = host["state"].as_str().expect("state");
        browser.wait_for(&format!("host {name} shows {state}"), || {
            browser.attr(&format!("#host-{name}"), "data-state") == state
        });
    }
    let states: Vec<&Value> = hosts.iter().map(|x| &x["state"]).collect();
    assert!(
        states.contains(&&json!("active")) && states.contains(&&json!("standby")),
        "the settled fixture has both states: {states:?}"
    );
    for vm in ["v1", "v2", "v3"] {
        let on = c.host_of(vm);
        assert_eq!(browser.attr(&format!("#vm-{vm}"), "data-host"), on, "{vm}");
    }

    // A migration ordered through the API shows in flight, then done, without a reload.
    let vm = "v3";
    let to = c.other_active(&c.host_of(vm));
    let (st, row) = request(
        &c.http,
        &format!("{}/migrations", c.base),
        Some(&json!({"vm": vm, "destination": to})),
        false,
        Some(TOKEN),
    );
    assert_eq!(st, 201, "{row}");
    let id = row["id"].as_u64().expect("id");
    let row = browser.text(&format!("#in-flight #migration-{id}"));
    assert_all_shown(&row);
    c.settle();
    browser.text(&format!("#done #migration-{id}"));
    assert!(browser
        .find(&format!("#in-flight #migration-{id}"))
        .is_none());
    browser.wait_for("the VM shows on its new host", || {
        browser.attr(&format!("#vm-{vm}"), "data-host") == to
    });

    // The order form: pick a VM, a destination and a transport, press the button.
    let vm = "v1";
    let to = c.other_active(&c.host_of(vm));
    browser.click(&format!("#order-vm option[value=\"{vm}\"]"));
    browser.click(&format!("#order-destination option[value=\"{to}\"]"));
    browser.click("#order-transport option[value=\"classic\"]");
    browser.click("#order-migration");
    browser.wait_for("the order is acknowledged", || {
        browser.text("#message").ends_with(" ordered")
    });
    let msg = browser.text("#message");
    let ordered: u64 = msg
        .strip_prefix("migration m")
        .and_then(|r| r.strip_suffix(" ordered"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected message {msg:?}"));
    assert_eq!(browser.attr("#message", "class"), "", "{msg}");
    let listed = c.get("/migrations");
    let row = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["id"] == ordered)
        .unwrap_or_else(|| panic!("m{ordered} not in GET /migrations: {listed}"));
    assert_eq!(row["vm"], vm, "{row}");
    assert_eq!(row["destination"], to.as_str(), "{row}");
    assert!(row["transport"].to_string().contains("classic"), "{row}");
    assert_all_shown(&browser.text(&format!("#in-flight #migration-{ordered}")));
    c.settle();
    browser.text(&format!("#done #migration-{ordered}"));
    assert_eq!(c.host_of(vm), to);
    browser.wait_for("the ordered VM shows on its new host", || {
        browser.attr(&format!("#vm-{vm}"), "data-host") == to
    });

    assert_no_console_error(&browser, &mut console, "after the orders");
    assert_all_shown(&browser.body_text());
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshot.png");
    let png = browser.screenshot(&out);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
    let height = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
    assert!(width >= 800 && height >= 600, "{width}x{height}");
    eprintln!("screenshot: {}", out.display());
}
