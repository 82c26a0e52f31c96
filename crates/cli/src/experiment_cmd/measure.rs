//! One scenario measured on its testbed: every agent's report once a second for the window
//! (power by the controller's model, active hosts, overload, requested MIPS), then the
//! controller's migrations of the window, then, with the controller stopped, where every VM
//! runs and whether its memory checks clean.
//!
//! Definitions, as `crates/sim` (CloudSim) has them, on the testbed's reports:
//! - a host is *active* when it is not in standby; its power is
//!   `fastmig_cluster::metrics::host_power_w` at the controller's utilisation
//!   (`report_utilization`: requested MIPS of the VMs it runs or receives over its declared
//!   MIPS), a host in standby counting as off, as the simulator counts it;
//! - it is *overloaded* while active with that utilisation above 1;
//! - it is *in SLA violation* while overloaded or receiving a migration: the simulator (as
//!   CloudSim) counts a migrating VM's request as unallocated on its destination, so that its
//!   SLATAH is mostly migration time; the receiving intervals are the completed migrations'
//!   records (ordered, plus the source's measured total time). SLATAH is violation time over
//!   active time; `overload_s` is the overloaded time alone;
//! - PDM is the MIPS lost to migration, 10 % of the migrating VM's requested MIPS for each
//!   completed migration's duration (CloudSim's degradation), over all MIPS the VMs
//!   requested.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fastmig_cluster::auth::Token;
use fastmig_cluster::http_client::HttpAgent;
use fastmig_cluster::metrics::{host_power_w, report_utilization, STANDBY_POWER_FRACTION};
use fastmig_cluster::proto::{HostName, HostReport, HostState, MigrationPhase};
use fastmig_cluster::store::{MigrationRow, MigrationState};
use fastmig_cluster::AgentApi;
use fastmig_host::RunStatus;
use serde::Serialize;

use super::Setup;
use crate::testbed_cmd::{self, Testbed};

/// CloudSim's performance degradation of a migrating VM: 10 % of its requested MIPS.
const MIGRATION_DEGRADATION: f64 = 0.1;
/// How long the open migrations of the window may take to end after it.
const SETTLE: Duration = Duration::from_secs(120);

/// What one scenario measured (wall clock; `report` converts to the trace's clock).
#[derive(Debug, Clone)]
pub struct Measured {
    /// Hosts' active time summed, s.
    pub active_s: f64,
    /// Energy, J.
    pub energy_j: f64,
    /// Hosts' overloaded time summed, s.
    pub overload_s: f64,
    /// Hosts' SLA-violation time (overloaded or receiving a migration) summed, s.
    pub violation_s: f64,
    /// MIPS the VMs requested, integrated over the window, MIPS·s.
    pub requested_mips_s: f64,
    /// MIPS lost to migration, MIPS·s.
    pub degraded_mips_s: f64,
    /// The migrations ordered in the window, as the controller recorded them.
    pub migrations: Vec<MigrationRow>,
    /// Each VM at the end.
    pub vms: Vec<VmCheck>,
    /// Every sample: (wall s since the window's start, active hosts, power of all hosts W).
    pub series: Vec<(f64, f64, f64)>,
}

/// Where a VM ended and what its memory check said.
#[derive(Debug, Clone, Serialize)]
pub struct VmCheck {
    /// Its name.
    pub vm: String,
    /// Every host whose agent lists it.
    pub hosts: Vec<String>,
    /// Its VM process's state (`running`), when it is on one host.
    pub status: Option<String>,
    /// Pages the `verify-memory` check read.
    pub pages_checked: u64,
    /// Whether every page held what the guest last stamped.
    pub memory_clean: bool,
}

impl VmCheck {
    /// On exactly one host, running, memory checked and clean.
    pub fn ok(&self) -> bool {
        self.hosts.len() == 1
            && self.status.as_deref() == Some("running")
            && self.pages_checked > 0
            && self.memory_clean
    }
}

/// One host at one sample.
#[derive(Debug, Clone, Copy)]
struct HostSample {
    active: bool,
    utilization: f64,
    power_w: f64,
}

/// Every host and VM at one instant.
#[derive(Debug, Clone)]
struct Sample {
    t_ms: i64,
    hosts: Vec<HostSample>,
    /// Requested MIPS of each running VM.
    vm_mips: HashMap<String, f64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn agents(tb: &Testbed, token: &Token) -> Vec<HttpAgent> {
    tb.urls
        .iter()
        .map(|(h, u)| HttpAgent::new(HostName(h.clone()), u, token, Duration::from_secs(5)))
        .collect()
}

fn host_sample(rep: &HostReport) -> HostSample {
    let utilization = report_utilization(rep);
    HostSample {
        active: rep.state == HostState::Active,
        utilization,
        power_w: host_power_w(
            &rep.host_type,
            rep.state,
            utilization,
            STANDBY_POWER_FRACTION,
        ),
    }
}

/// Reads every agent; an agent that does not answer keeps its previous sample.
fn sample(agents: &[HttpAgent], prev: Option<&Sample>) -> (Sample, Vec<HostReport>) {
    let t_ms = now_ms();
    let mut hosts = Vec::with_capacity(agents.len());
    let mut vm_mips = HashMap::new();
    let mut reports = Vec::new();
    let mut missing = false;
    for (i, a) in agents.iter().enumerate() {
        match a.report() {
            Ok(rep) => {
                hosts.push(host_sample(&rep));
                for v in rep.vms.iter().filter(|v| v.status == RunStatus::Running) {
                    vm_mips.insert(v.vm.0.clone(), v.demand * v.mips);
                }
                reports.push(rep);
            }
            Err(e) => {
                tracing::warn!(host = %a.host(), error = %e, "no report; previous sample kept");
                let kept = prev.and_then(|p| p.hosts.get(i).copied());
                hosts.push(kept.unwrap_or(HostSample {
                    active: true,
                    utilization: 0.0,
                    power_w: 0.0,
                }));
                missing = true;
            }
        }
    }
    // The VMs of a host that did not answer keep their previous demand.
    if let (true, Some(p)) = (missing, prev) {
        for (k, v) in &p.vm_mips {
            vm_mips.entry(k.clone()).or_insert(*v);
        }
    }
    (
        Sample {
            t_ms,
            hosts,
            vm_mips,
        },
        reports,
    )
}

/// Energy and requested MIPS over `[a, b)` (b's time capped at `end_ms`): power by
/// trapezoids, the VMs' requests held at `a`'s values.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    energy_j: f64,
    requested_mips_s: f64,
}

impl Totals {
    fn add(&mut self, a: &Sample, b: &Sample, end_ms: i64) {
        let dt = (b.t_ms.min(end_ms) - a.t_ms) as f64 / 1e3;
        if dt <= 0.0 {
            return;
        }
        for (x, y) in a.hosts.iter().zip(&b.hosts) {
            self.energy_j += (x.power_w + y.power_w) / 2.0 * dt;
        }
        self.requested_mips_s += a.vm_mips.values().sum::<f64>() * dt;
    }
}

/// Resolution of the hosts' timelines.
const SLOT_MS: i64 = 10;
const ACTIVE: u8 = 1;
const OVERLOADED: u8 = 2;
const RECEIVING: u8 = 4;

/// Each host's state over the window in [`SLOT_MS`] slots, so that overloaded samples and
/// receiving intervals combine without counting an instant twice.
struct Timeline {
    start_ms: i64,
    hosts: Vec<Vec<u8>>,
}

impl Timeline {
    fn new(hosts: usize, start_ms: i64, end_ms: i64) -> Self {
        let slots = usize::try_from((end_ms - start_ms).max(0) / SLOT_MS).unwrap_or(0);
        Timeline {
            start_ms,
            hosts: vec![vec![0; slots]; hosts],
        }
    }

    /// Sets `flag` on `host` over `[from_ms, to_ms)`, clipped to the window.
    fn mark(&mut self, host: usize, from_ms: i64, to_ms: i64, flag: u8) {
        let Some(slots) = self.hosts.get_mut(host) else {
            return;
        };
        let slot = |t: i64| ((t - self.start_ms).max(0) / SLOT_MS).min(slots.len() as i64) as usize;
        let (a, b) = (slot(from_ms), slot(to_ms));
        for s in slots.iter_mut().take(b).skip(a) {
            *s |= flag;
        }
    }

    /// The hosts' states from the samples: each sample's holds until the next.
    fn from_samples(samples: &[Sample], end_ms: i64) -> Self {
        let hosts = samples.first().map_or(0, |s| s.hosts.len());
        let start = samples.first().map_or(end_ms, |s| s.t_ms);
        let mut t = Timeline::new(hosts, start, end_ms);
        for w in samples.windows(2) {
            for (i, h) in w[0].hosts.iter().enumerate() {
                if h.active {
                    t.mark(i, w[0].t_ms, w[1].t_ms, ACTIVE);
                    if h.utilization > 1.0 + 1e-9 {
                        t.mark(i, w[0].t_ms, w[1].t_ms, OVERLOADED);
                    }
                }
            }
        }
        t
    }

    /// Summed over hosts, s: active, overloaded, in violation (overloaded or receiving),
    /// each counted only while active.
    fn sums(&self) -> (f64, f64, f64) {
        let (mut active, mut over, mut viol) = (0u64, 0u64, 0u64);
        for s in self.hosts.iter().flatten() {
            if s & ACTIVE != 0 {
                active += 1;
                over += u64::from(s & OVERLOADED != 0);
                viol += u64::from(s & (OVERLOADED | RECEIVING) != 0);
            }
        }
        let secs = |n: u64| n as f64 * SLOT_MS as f64 / 1e3;
        (secs(active), secs(over), secs(viol))
    }
}

/// The controller's API, with the testbed's token.
struct Api {
    http: ureq::Agent,
    url: String,
    token: Token,
}

impl Api {
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.url);
        let mut resp = self
            .http
            .get(&url)
            .header("Authorization", &self.token.bearer())
            .call()
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("GET {url}: {}", resp.status());
        }
        let text = resp.body_mut().read_to_string()?;
        serde_json::from_str(&text).with_context(|| format!("GET {url}: not the expected JSON"))
    }
}

/// Measures the scenario running on `tb` for `setup.window_s`; `progress` gets a line every
/// 10 s.
pub fn run(
    setup: &Setup,
    tb: &Testbed,
    signalled: &dyn Fn() -> bool,
    progress: &dyn Fn(&str),
) -> Result<Measured> {
    let token = Token::from_file(&tb.token_file).context("the testbed's token")?;
    let agents = agents(tb, &token);
    let api = Api {
        http: ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build(),
        ),
        url: tb
            .controller
            .clone()
            .context("the testbed has no controller")?,
        token,
    };
    let (first, reports) = sample(&agents, None);
    // The window starts with the VMs' traces (their demand epoch), a little before the first
    // sample: the first sample stands for that short gap.
    let t0 = reports
        .iter()
        .flat_map(|r| r.vms.iter().filter_map(|v| v.demand_epoch_ms))
        .min()
        .map_or(first.t_ms, |e| e as i64)
        .min(first.t_ms);
    let end = t0 + (setup.window_s * 1e3) as i64;
    let mut samples = vec![Sample {
        t_ms: t0,
        ..first.clone()
    }];
    samples.push(first);
    let mut last_progress = Instant::now();
    while samples.last().is_some_and(|s| s.t_ms < end) {
        if signalled() {
            bail!("interrupted");
        }
        let next = samples.last().map_or(end, |s| s.t_ms + 1000).min(end);
        let wait = next - now_ms();
        if wait > 0 {
            std::thread::sleep(Duration::from_millis(wait as u64));
        }
        let (s, _) = sample(&agents, samples.last());
        samples.push(s);
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let s = samples.last().map(|s| &s.hosts);
            let active = s.map_or(0, |h| h.iter().filter(|x| x.active).count());
            let power: f64 = s.map_or(0.0, |h| h.iter().map(|x| x.power_w).sum());
            progress(&format!(
                "{:.0}/{:.0} s, {active} active hosts, {power:.0} W",
                (now_ms() - t0) as f64 / 1e3,
                setup.window_s
            ));
        }
    }
    let mut totals = Totals::default();
    for w in samples.windows(2) {
        totals.add(&w[0], &w[1], end);
    }
    let mut timeline = Timeline::from_samples(&samples, end);

    // The window's migrations, once each has ended (the controller goes on ordering; later
    // ones are not counted).
    let settle = Instant::now();
    let rows: Vec<MigrationRow> = loop {
        if signalled() {
            bail!("interrupted");
        }
        let open: Vec<MigrationRow> = api.get("/migrations?open=true")?;
        if !open.iter().any(|m| m.started_ms <= end) {
            break api.get("/migrations")?;
        }
        if settle.elapsed() > SETTLE {
            bail!(
                "migrations of the window still open after {SETTLE:?}: {:?}",
                open.iter().map(|m| m.id).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut migrations: Vec<MigrationRow> = rows
        .into_iter()
        .filter(|m| m.started_ms >= t0 && m.started_ms <= end)
        .collect();
    migrations.sort_by_key(|m| m.id);
    let mut degraded_mips_s = 0.0;
    // Completed migrations only, over the source's measured time: most failed ones here are
    // orders an agent refused before any page moved (see `ScenarioResult::failed_migrations`).
    for m in migrations
        .iter()
        .filter(|m| m.state == MigrationState::Done)
    {
        let dur = m.measured_s.unwrap_or(0.0);
        let until = m.started_ms + (dur * 1e3) as i64;
        degraded_mips_s +=
            MIGRATION_DEGRADATION * vm_mips_during(&samples, &m.vm.0, m.started_ms, until) * dur;
        if let Some(d) = tb.urls.iter().position(|(h, _)| *h == m.destination.0) {
            timeline.mark(d, m.started_ms, until, RECEIVING);
        }
    }
    let (active_s, overload_s, violation_s) = timeline.sums();
    let series = samples
        .iter()
        .filter(|x| x.t_ms <= end)
        .map(|x| {
            (
                (x.t_ms - t0) as f64 / 1e3,
                x.hosts.iter().filter(|h| h.active).count() as f64,
                x.hosts.iter().map(|h| h.power_w).sum(),
            )
        })
        .collect();

    // Where every VM ended, with nothing moving any more.
    testbed_cmd::stop_testbed_controller(&tb.dir)?;
    let reports = quiet_reports(&agents)?;
    let vms = check_vms(tb, setup, &reports);
    Ok(Measured {
        active_s,
        energy_j: totals.energy_j,
        overload_s,
        violation_s,
        requested_mips_s: totals.requested_mips_s,
        degraded_mips_s,
        migrations,
        vms,
        series,
    })
}

/// The VM's requested MIPS averaged over the samples in `[from, to]` (the last one before
/// `from` when none falls inside).
fn vm_mips_during(samples: &[Sample], vm: &str, from: i64, to: i64) -> f64 {
    let inside: Vec<f64> = samples
        .iter()
        .filter(|s| s.t_ms >= from && s.t_ms <= to)
        .filter_map(|s| s.vm_mips.get(vm).copied())
        .collect();
    if !inside.is_empty() {
        return inside.iter().sum::<f64>() / inside.len() as f64;
    }
    samples
        .iter()
        .rev()
        .filter(|s| s.t_ms <= from)
        .find_map(|s| s.vm_mips.get(vm).copied())
        .unwrap_or(0.0)
}

/// Every agent's report once none has a migration prepared or running, nor a VM arriving or
/// left behind by one.
fn quiet_reports(agents: &[HttpAgent]) -> Result<Vec<HostReport>> {
    let start = Instant::now();
    loop {
        let reports: Vec<HostReport> = agents
            .iter()
            .map(|a| {
                a.report()
                    .with_context(|| format!("report of {}", a.host()))
            })
            .collect::<Result<_>>()?;
        // A migration still moving, or a VM process not yet quit or not yet started.
        let busy = reports.iter().flat_map(|r| &r.migrations).any(|m| {
            matches!(
                m.phase,
                MigrationPhase::Prepared | MigrationPhase::Running { .. }
            )
        }) || reports
            .iter()
            .flat_map(|r| &r.vms)
            .any(|v| matches!(v.status, RunStatus::Inmigrate | RunStatus::Postmigrate));
        if !busy {
            return Ok(reports);
        }
        if start.elapsed() > SETTLE {
            bail!("agents still migrating {SETTLE:?} after the controller stopped");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Each VM the testbed started: the hosts that list it and, when it is on exactly one, its
/// state and memory check (through its VM process's control socket).
fn check_vms(tb: &Testbed, setup: &Setup, reports: &[HostReport]) -> Vec<VmCheck> {
    (1..=setup.hosts * setup.vms_per_host)
        .map(|n| {
            let vm = format!("vm{n}");
            let hosts: Vec<String> = reports
                .iter()
                .filter(|r| r.vms.iter().any(|v| v.vm.0 == vm))
                .map(|r| r.host.0.clone())
                .collect();
            let mut check = VmCheck {
                vm: vm.clone(),
                hosts: hosts.clone(),
                status: None,
                pages_checked: 0,
                memory_clean: false,
            };
            if let [host] = hosts.as_slice() {
                let sock = tb
                    .dir
                    .join(host)
                    .join("data/vms")
                    .join(&vm)
                    .join("api.sock");
                match fastmig_host::ControlClient::connect(&sock, Duration::from_secs(5)) {
                    Ok(c) => {
                        check.status = c.query_status().ok().map(|s| s.status.to_string());
                        match c.verify_memory() {
                            Ok(v) => {
                                check.pages_checked = v.pages_checked;
                                check.memory_clean = v.is_clean();
                            }
                            Err(e) => tracing::warn!(%vm, error = %e, "verify-memory failed"),
                        }
                    }
                    Err(e) => tracing::warn!(%vm, error = %e, "no control socket"),
                }
            }
            check
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_ms: i64, hosts: &[(bool, f64, f64)], vms: &[(&str, f64)]) -> Sample {
        Sample {
            t_ms,
            hosts: hosts
                .iter()
                .map(|&(active, utilization, power_w)| HostSample {
                    active,
                    utilization,
                    power_w,
                })
                .collect(),
            vm_mips: vms.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn totals_integrate_power_by_trapezoids_and_requests_from_the_interval_start() {
        // Host 0 100 W -> 120 W over 2 s: 220 J; host 1 in standby (0 W). VMs request
        // 1500 MIPS for 2 s.
        let a = s(
            1000,
            &[(true, 1.2, 100.0), (false, 0.0, 0.0)],
            &[("v1", 1000.0), ("v2", 500.0)],
        );
        let b = s(3000, &[(true, 0.5, 120.0), (false, 0.0, 0.0)], &[]);
        let mut t = Totals::default();
        t.add(&a, &b, i64::MAX);
        assert_eq!(t.energy_j, 220.0);
        assert_eq!(t.requested_mips_s, 3000.0);
        // Capped at the window's end: 1 s of the 2.
        let mut c = Totals::default();
        c.add(&a, &b, 2000);
        assert_eq!((c.energy_j, c.requested_mips_s), (110.0, 1500.0));
        // Nothing after the end.
        let mut d = Totals::default();
        d.add(&b, &a, 0);
        assert_eq!(d.energy_j, 0.0);
    }

    #[test]
    fn violation_is_overload_or_receiving_while_active_counted_once() {
        // Host 0: active 0-3 s, overloaded 0-1 s, receiving 0.5-2 s: violation 0-2 s.
        // Host 1: in standby 0-1 s, active 1-3 s; a receiving interval while in standby
        // (0-1 s) does not count.
        let samples = [
            s(0, &[(true, 1.5, 0.0), (false, 0.0, 0.0)], &[]),
            s(1000, &[(true, 0.5, 0.0), (true, 0.2, 0.0)], &[]),
            s(3000, &[(true, 0.5, 0.0), (true, 0.2, 0.0)], &[]),
        ];
        let mut t = Timeline::from_samples(&samples, 3000);
        t.mark(0, 500, 2000, RECEIVING);
        t.mark(1, 0, 1000, RECEIVING);
        // Clipped at both ends of the window.
        t.mark(1, -5000, 0, RECEIVING);
        t.mark(1, 3000, 9000, RECEIVING);
        let (active, over, viol) = t.sums();
        assert!((active - 5.0).abs() < 1e-9, "{active}");
        assert!((over - 1.0).abs() < 1e-9, "{over}");
        assert!((viol - 2.0).abs() < 1e-9, "{viol}");
    }

    #[test]
    fn a_vms_mips_during_a_migration_is_the_mean_of_its_samples_or_the_last_before() {
        let samples = [
            s(0, &[], &[("v", 100.0)]),
            s(1000, &[], &[("v", 200.0)]),
            s(2000, &[], &[("v", 400.0)]),
        ];
        assert_eq!(vm_mips_during(&samples, "v", 900, 2100), 300.0);
        assert_eq!(vm_mips_during(&samples, "v", 500, 800), 100.0);
        assert_eq!(vm_mips_during(&samples, "w", 0, 3000), 0.0);
    }

    #[test]
    fn a_vm_is_fine_only_on_one_host_running_with_checked_clean_memory() {
        let good = VmCheck {
            vm: "vm1".into(),
            hosts: vec!["h1".into()],
            status: Some("running".into()),
            pages_checked: 10,
            memory_clean: true,
        };
        assert!(good.ok());
        for bad in [
            VmCheck {
                hosts: vec!["h1".into(), "h2".into()],
                ..good.clone()
            },
            VmCheck {
                hosts: vec![],
                ..good.clone()
            },
            VmCheck {
                status: Some("paused".into()),
                ..good.clone()
            },
            VmCheck {
                pages_checked: 0,
                ..good.clone()
            },
            VmCheck {
                memory_clean: false,
                ..good.clone()
            },
        ] {
            assert!(!bad.ok(), "{bad:?}");
        }
    }
}
