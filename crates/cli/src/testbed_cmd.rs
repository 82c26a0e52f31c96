//! `fastmig testbed up|down`: an emulated cluster on one machine. One network namespace per
//! host, each joined to a bridge by a veth pair whose host side is shaped with `tc tbf`, a
//! `fastmig agent` in each, and a `fastmig controller` on the bridge.
//!
//! ```text
//!  root namespace: bridge fmtb0 10.232.0.1/24, controller :7400 (tests reach agents here)
//!    ├─ veth fmtbr1 ── netns fmtb-h1: veth fmtbh1 10.232.0.11, tbf, agent :7070
//!    ├─ veth fmtbr2 ── netns fmtb-h2: veth fmtbh2 10.232.0.12, tbf, agent :7070
//!    ...
//! ```
//!
//! Every resource is written to the state file (`DIR/testbed.json`) as soon as it exists, so
//! `down` removes exactly what `up` created, also after `up` crashed half-way. Traffic only
//! goes between these namespaces and the bridge.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fastmig_cluster::auth::Token;
use fastmig_cluster::http_client::HttpAgent;
use fastmig_cluster::proto::{DemandSource, HostName, StartVm, TraceFormat, VmName};
use fastmig_cluster::AgentApi;
use serde::{Deserialize, Serialize};

use crate::netns::run;
use crate::units;

/// Prefix of every namespace and interface a testbed creates.
const PREFIX: &str = "fmtb";
/// The bridge.
const BRIDGE: &str = "fmtb0";
/// The agents' API port in every namespace.
const AGENT_PORT: u16 = 7070;
/// The controller's API, on the bridge (`deploy/prometheus.yml` scrapes it there).
const CONTROLLER_LISTEN: &str = "10.232.0.1:7400";
/// How long `down` lets the controller stop after SIGTERM before it is killed.
const CONTROLLER_GRACE: Duration = Duration::from_secs(5);

/// An emulated cluster: network namespaces, a bridge, shaped links and one agent per host.
#[derive(clap::Subcommand, Debug)]
pub enum TestbedCommand {
    /// Create the namespaces, the bridge and the shaped links, and start an agent in each.
    Up(Box<UpArgs>),
    /// Remove everything `up` created (also after `up` crashed), VM processes included.
    Down {
        /// The testbed's directory.
        #[arg(long, default_value = "/tmp/fastmig-testbed")]
        dir: PathBuf,
    },
}

/// `testbed up` flags.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of hosts, 1..=200.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub(crate) hosts: u16,
    /// Each host's link rate, bytes/s (`125M`) or bits/s (`1gbit`).
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub(crate) link: u64,
    /// VMs started on every host (16 MiB, `--workload`).
    #[arg(long, default_value_t = 0)]
    pub(crate) vms_per_host: u16,
    /// Workload of those VMs (`dirty:...`, `verify:...`, as `fastmig run --workload`).
    #[arg(long, default_value = "dirty:rate=1000,wss=8M")]
    pub(crate) workload: String,
    /// Declared capacity of those VMs, MIPS (CloudSim's VM types: 500, 1000, 2000, 2500).
    #[arg(long, default_value_t = 500.0)]
    pub(crate) vm_mips: f64,
    /// Constant CPU demand of those VMs (fraction of their MIPS) when there is no `--trace`.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) demand: f64,
    /// PlanetLab trace directory: VM `i` follows file `i` (in name order), one sample every
    /// `--sample-period`. Without it, VMs demand a constant `--demand`.
    #[arg(long)]
    pub(crate) trace: Option<PathBuf>,
    /// Host type of every host: `G4`, `G5` or a JSON file.
    #[arg(long, default_value = "G4")]
    pub(crate) host_type: String,
    /// The testbed's directory (state file, token, agents' data and logs, the controller's
    /// database and log).
    #[arg(long, default_value = "/tmp/fastmig-testbed")]
    pub(crate) dir: PathBuf,
    /// The controller's policy, as `fastmig controller --policy` takes it.
    #[arg(long, default_value = "lr-mmt")]
    pub(crate) policy: String,
    /// The controller's interval.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    pub(crate) interval: Duration,
    /// Start no controller (only the namespaces, links and agents).
    #[arg(long)]
    pub(crate) no_controller: bool,
    /// Time each trace sample lasts (a PlanetLab sample covers 300 s of its day).
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    pub(crate) sample_period: Duration,
    /// Transport of the controller's migrations (`fastmig controller --transport`).
    #[arg(long, default_value = "classic", value_parser = units::parse_transport)]
    pub(crate) transport: fastmig_migration::TransportKind,
    /// Bandwidth cap of the controller's migrations (`fastmig controller
    /// --migration-bandwidth`); none when absent.
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub(crate) migration_bandwidth: Option<u64>,
    /// Downtime limit of the controller's migrations (`fastmig controller
    /// --migration-downtime-limit`); the engine's default when absent.
    #[arg(long, value_parser = units::parse_duration)]
    pub(crate) migration_downtime_limit: Option<Duration>,
    /// The controller records but never migrates nor parks hosts (`fastmig controller
    /// --no-consolidation`).
    #[arg(long)]
    pub(crate) no_consolidation: bool,
    /// Fitted model the controller predicts each migration with (`fastmig controller --model`).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
}

/// What `up` created, in order (written after every step).
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The bridge, once created.
    bridge: Option<String>,
    /// Namespaces.
    namespaces: Vec<String>,
    /// Root-side veth ends.
    links: Vec<String>,
    /// Agent process ids.
    agents: Vec<u32>,
    /// Agents' data directories (their VM processes are found there).
    data_dirs: Vec<PathBuf>,
    /// Agents: host name and URL.
    urls: Vec<(String, String)>,
    /// The controller's process id, once started.
    #[serde(default)]
    controller: Option<u32>,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("testbed.json")
}

fn save(dir: &Path, st: &State) -> Result<()> {
    let tmp = dir.join("testbed.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?).context("writing the state file")?;
    std::fs::rename(&tmp, state_path(dir)).context("writing the state file")
}

/// Runs `testbed up` or `testbed down`.
pub fn main(cmd: TestbedCommand) -> Result<()> {
    match cmd {
        TestbedCommand::Up(a) => {
            let tb = up(*a)?;
            print_up(&tb);
            Ok(())
        }
        // The processes' command lines name the directory as `up` resolved it.
        TestbedCommand::Down { dir } => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            match down(&dir)? {
                Some(hosts) => println!("testbed down: removed {hosts} hosts"),
                None => println!("no testbed in {}", dir.display()),
            }
            Ok(())
        }
    }
}

/// A testbed that is up.
#[derive(Debug, Clone)]
pub(crate) struct Testbed {
    /// Its directory (absolute).
    pub(crate) dir: PathBuf,
    /// Links' rate, bits/s.
    pub(crate) rate_bits: u64,
    /// Agents: host name and URL.
    pub(crate) urls: Vec<(String, String)>,
    /// The controller's URL, when one runs.
    pub(crate) controller: Option<String>,
    /// The token file.
    pub(crate) token_file: PathBuf,
}

fn print_up(tb: &Testbed) {
    println!(
        "testbed up: {} hosts, links of {} bit/s",
        tb.urls.len(),
        tb.rate_bits
    );
    for (h, u) in &tb.urls {
        println!("  {h}  {u}");
    }
    if let Some(url) = &tb.controller {
        println!(
            "controller: {url} (log {})",
            tb.dir.join("controller.log").display()
        );
    }
    println!("token: {}", tb.token_file.display());
    println!(
        "state: {} (fastmig testbed down --dir {})",
        state_path(&tb.dir).display(),
        tb.dir.display()
    );
}

/// Brings a testbed up (printing nothing); on failure, removes what it created.
pub(crate) fn up(mut a: UpArgs) -> Result<Testbed> {
    if state_path(&a.dir).exists() {
        bail!(
            "{} exists: a testbed is up (or crashed); run `fastmig testbed down --dir {}` first",
            state_path(&a.dir).display(),
            a.dir.display()
        );
    }
    // The names are fixed: one testbed per machine. Checked before anything is recorded, so
    // that cleaning up after a failure never removes another testbed's resources.
    let bridge_exists = Command::new("ip")
        .args(["link", "show", BRIDGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if bridge_exists
        || Path::new("/run/netns")
            .join(format!("{PREFIX}-h1"))
            .exists()
    {
        bail!("a testbed is already up on this machine (bridge {BRIDGE}); `fastmig testbed down --dir DIR` it first");
    }
    std::fs::create_dir_all(&a.dir).context("creating the testbed directory")?;
    // Absolute from here on: the agents' and the controller's command lines name it, and
    // `down` finds stray processes by it.
    a.dir = std::fs::canonicalize(&a.dir).context("resolving the testbed directory")?;
    let mut st = State::default();
    save(&a.dir, &st)?;
    let result = build(&a, &mut st);
    if result.is_err() {
        eprintln!("fastmig: testbed up failed; removing what it created");
        let _ = down(&a.dir);
    }
    result
}

fn build(a: &UpArgs, st: &mut State) -> Result<Testbed> {
    let dir = &a.dir;
    let token_file = dir.join("token");
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .context("reading /dev/urandom for the token")?;
    let token_text: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&token_file, &token_text).context("writing the token")?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let token = Token::new(&token_text)?;

    // Each resource is recorded before it is created: a kill in between leaves a name that
    // `down` finds missing, never a resource it does not know.
    st.bridge = Some(BRIDGE.into());
    save(dir, st)?;
    run(&["ip", "link", "add", BRIDGE, "type", "bridge"])
        .context("creating the bridge (root needed)")?;
    run(&["ip", "addr", "add", "10.232.0.1/24", "dev", BRIDGE])?;
    run(&["ip", "link", "set", BRIDGE, "up"])?;

    let bin = std::env::current_exe().context("locating the fastmig binary")?;
    let rate_bits = (a.link as f64 * 8.0).round() as u64;
    let burst = ((a.link as f64 / 250.0) as u64).max(64 << 10);
    for i in 1..=a.hosts {
        let ns = format!("{PREFIX}-h{i}");
        let (root_if, ns_if) = (format!("{PREFIX}r{i}"), format!("{PREFIX}h{i}"));
        // Hosts 10.232.0.11 to .210.
        let addr = format!("10.232.0.{}", 10 + i);
        st.namespaces.push(ns.clone());
        save(dir, st)?;
        run(&["ip", "netns", "add", &ns])?;
        st.links.push(root_if.clone());
        save(dir, st)?;
        run(&[
            "ip", "link", "add", &root_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &ns])?;
        run(&["ip", "link", "set", &root_if, "master", BRIDGE])?;
        run(&["ip", "link", "set", &root_if, "up"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &ns_if,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", &ns_if, "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        // The host's uplink (what it sends) and downlink (what the bridge sends it).
        for (netns, dev) in [
            (Some(ns.as_str()), ns_if.as_str()),
            (None, root_if.as_str()),
        ] {
            let mut args: Vec<&str> = Vec::new();
            if let Some(n) = netns {
                args.extend(["ip", "netns", "exec", n]);
            }
            let rate = format!("{rate_bits}bit");
            let burst = burst.to_string();
            args.extend([
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "100ms",
            ]);
            run(&args)?;
        }
        let data = dir.join(format!("h{i}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(data.join("agent.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&bin)
            .args(["--log", "info", "agent", "--listen"])
            .arg(format!("{addr}:{AGENT_PORT}"))
            .args(["--host-id", &format!("h{i}"), "--host-type", &a.host_type])
            .arg("--data-dir")
            .arg(data.join("data"))
            .arg("--token-file")
            .arg(&token_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting an agent")?;
        st.agents.push(child.id());
        st.data_dirs.push(data.join("data"));
        st.urls
            .push((format!("h{i}"), format!("http://{addr}:{AGENT_PORT}")));
        save(dir, st)?;
    }
    let agents: Vec<HttpAgent> = st
        .urls
        .iter()
        .map(|(h, u)| HttpAgent::new(HostName(h.clone()), u, &token, Duration::from_secs(20)))
        .collect();
    for agent in &agents {
        let start = Instant::now();
        while let Err(e) = agent.report() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("agent {} did not answer: {e}", agent.host());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // VMs are started before the controller, so that its first round sees them.
    start_vms(a, &agents)?;
    let controller = if a.no_controller {
        None
    } else {
        Some(start_controller(a, st, &bin, &token_file, &token)?)
    };
    Ok(Testbed {
        dir: dir.clone(),
        rate_bits,
        urls: st.urls.clone(),
        controller,
        token_file,
    })
}

/// Starts `vms_per_host` VMs on every agent.
fn start_vms(a: &UpArgs, agents: &[HttpAgent]) -> Result<()> {
    let traces = match &a.trace {
        Some(d) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(d)
                .with_context(|| format!("reading {}", d.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        }
        None => Vec::new(),
    };
    let mut n = 0;
    for agent in agents {
        for _ in 0..a.vms_per_host {
            let demand = match traces.get(n % traces.len().max(1)) {
                Some(path) => DemandSource::Trace {
                    path: path.clone(),
                    format: TraceFormat::Planetlab,
                    sample_period_ms: u64::try_from(a.sample_period.as_millis())
                        .unwrap_or(u64::MAX),
                },
                None => DemandSource::Constant {
                    utilization: a.demand,
                },
            };
            n += 1;
            agent
                .start_vm(&StartVm {
                    vm: VmName(format!("vm{n}")),
                    mem_bytes: 16 << 20,
                    vcpus: 1,
                    mips: a.vm_mips,
                    workload: a.workload.clone(),
                    demand,
                    demand_epoch_ms: None,
                })
                .with_context(|| format!("starting vm{n} on {}", agent.host()))?;
        }
    }
    Ok(())
}

/// Starts the controller in the root namespace, on the bridge, and waits until its API
/// answers with the token. Returns its URL.
fn start_controller(
    a: &UpArgs,
    st: &mut State,
    bin: &Path,
    token_file: &Path,
    token: &Token,
) -> Result<String> {
    let dir = &a.dir;
    let agents: Vec<String> = st.urls.iter().map(|(h, u)| format!("{h}={u}")).collect();
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["--log", "info", "controller", "--listen", CONTROLLER_LISTEN])
        .arg("--agents")
        .arg(agents.join(","))
        .args(["--policy", &a.policy])
        .arg("--interval")
        .arg(format!("{}ms", a.interval.as_millis()))
        .arg("--transport")
        .arg(transport_arg(a.transport));
    if let Some(b) = a.migration_bandwidth {
        cmd.arg("--migration-bandwidth").arg(b.to_string());
    }
    if let Some(d) = a.migration_downtime_limit {
        cmd.arg("--migration-downtime-limit")
            .arg(format!("{}ms", d.as_millis()));
    }
    if a.no_consolidation {
        cmd.arg("--no-consolidation");
    }
    if let Some(m) = &a.model {
        cmd.arg("--model").arg(m);
    }
    let child = cmd
        .arg("--db")
        .arg(format!("sqlite:{}", dir.join("controller.db").display()))
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the controller")?;
    let pid = child.id();
    st.controller = Some(pid);
    save(dir, st)?;
    let url = format!("http://{CONTROLLER_LISTEN}");
    let http = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build(),
    );
    let start = Instant::now();
    loop {
        let answer = http
            .get(format!("{url}/hosts"))
            .header("Authorization", &token.bearer())
            .call();
        match answer {
            Ok(r) if r.status().is_success() => return Ok(url),
            Ok(r) => bail!(
                "the controller answered GET /hosts with {} (see {})",
                r.status(),
                dir.join("controller.log").display()
            ),
            Err(_) if alive(pid) && start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!(
                "the controller did not answer on {url}: {e} (see {})",
                dir.join("controller.log").display()
            ),
        }
    }
}

/// A transport as `--transport` takes it.
pub(crate) fn transport_arg(t: fastmig_migration::TransportKind) -> String {
    match t {
        fastmig_migration::TransportKind::MultiTcp { streams } => format!("multi-tcp:{streams}"),
        other => other.name().to_string(),
    }
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Stops the controller: SIGTERM (it finishes its round and lets migrations end), SIGKILL
/// after [`CONTROLLER_GRACE`]. Only a process whose command line is a fastmig controller of
/// this testbed is signalled (the pid may have been reused after a crash).
fn stop_controller(dir: &Path, pid: u32) {
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains("controller") && c.contains(&dir.join("controller.db").display().to_string())
    });
    if !ours {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let start = Instant::now();
    while alive(pid) && start.elapsed() < CONTROLLER_GRACE {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Stops the controller of the testbed in `dir` (SIGTERM, SIGKILL after a grace period),
/// leaving its agents and VMs running; nothing when it has none.
pub(crate) fn stop_testbed_controller(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(state_path(dir)).context("reading the state file")?;
    let st: State = serde_json::from_str(&text).context("the state file")?;
    if let Some(pid) = st.controller {
        stop_controller(dir, pid);
    }
    Ok(())
}

/// Removes everything the testbed in `dir` created; `None` when there is none there,
/// otherwise how many hosts it had.
pub(crate) fn down(dir: &Path) -> Result<Option<usize>> {
    let path = state_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the state file"),
    };
    let st: State = serde_json::from_str(&text).context("the state file")?;
    let mut failures = Vec::new();
    // The controller first (so that it orders nothing more), then the agents (so that they
    // adopt nothing), then their VM processes, which outlive them by design, then the
    // network.
    if let Some(pid) = st.controller {
        stop_controller(dir, pid);
    }
    for pid in &st.agents {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    // An agent or controller started just before `up` died, not yet in the state file: its
    // command line names this directory.
    for pattern in [
        format!("--data-dir {}/h", dir.display()),
        format!("--db sqlite:{}", dir.join("controller.db").display()),
    ] {
        if let Ok(o) = Command::new("pgrep").args(["-f", "--", &pattern]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
    let mut data_dirs = st.data_dirs.clone();
    if let Ok(entries) = std::fs::read_dir(dir) {
        data_dirs.extend(entries.flatten().map(|e| e.path().join("data")));
    }
    data_dirs.sort();
    data_dirs.dedup();
    for data in &data_dirs {
        let Ok(entries) = std::fs::read_dir(data.join("vms")) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(c) =
                fastmig_host::ControlClient::connect(e.path().join("api.sock"), Duration::ZERO)
            {
                let _ = c.quit();
            }
        }
    }
    for ns in st.namespaces.iter().rev() {
        if !Path::new("/run/netns").join(ns).exists() {
            continue;
        }
        if let Err(e) = run(&["ip", "netns", "del", ns]) {
            failures.push(format!("{e:#}"));
        }
    }
    for link in st.links.iter().rev() {
        // Gone with its namespace's peer, unless the move into the namespace never happened.
        let _ = run(&["ip", "link", "del", link]);
    }
    if let Some(b) = &st.bridge {
        let exists = Command::new("ip")
            .args(["link", "show", b])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if exists {
            if let Err(e) = run(&["ip", "link", "del", b]) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!("testbed down left some things: {}", failures.join("; "));
    }
    std::fs::remove_dir_all(dir).context("removing the testbed directory")?;
    Ok(Some(st.namespaces.len()))
}
