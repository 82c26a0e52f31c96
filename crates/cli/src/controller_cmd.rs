//! `fastmig controller`: the consolidation controller over the agents of a cluster, with its
//! HTTP API; a clean shutdown on SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fastmig_cluster::auth::Token;
use fastmig_cluster::controller::api::{serve, ApiState};
use fastmig_cluster::controller::{gather, Controller, ControllerConfig, CostModel};
use fastmig_cluster::proto::HostName;
use fastmig_cluster::AgentApi;
use fastmig_migration::TransportKind;

use crate::units;
use crate::usage;

/// One agent on the command line: `HOST=URL`.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The host's name (its agent's `--host-id`).
    pub host: HostName,
    /// Where its agent listens (`http://IP:PORT`).
    pub url: String,
}

fn parse_agent(s: &str) -> Result<AgentSpec, String> {
    let (host, url) = s
        .split_once('=')
        .ok_or_else(|| format!("agent {s:?}: expected HOST=URL (e.g. h1=http://10.0.0.1:7300)"))?;
    if host.is_empty() || url.is_empty() {
        return Err(format!("agent {s:?}: expected HOST=URL"));
    }
    Ok(AgentSpec {
        host: HostName(host.into()),
        url: url.into(),
    })
}

/// `fastmig controller`.
#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// The agents, `HOST=URL,HOST=URL,...`.
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_agent)]
    pub agents: Vec<AgentSpec>,
    /// Consolidation policy, as `fastmig simulate` names it (`lr-mmt`, `thr-mmt`, `mad-mc`...).
    #[arg(long, default_value = "lr-mmt")]
    pub policy: String,
    /// Time between rounds.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    pub interval: Duration,
    /// Database: `sqlite:PATH` (embedded) or `postgres://USER:PASS@HOST/DB`.
    #[arg(long)]
    pub db: String,
    /// File holding the token shared with the agents; the API requires it too.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: std::net::SocketAddr,
    /// Fitted model (`fastmig model fit`): predicts each migration's time and downtime.
    /// Without it: CloudSim's RAM / bandwidth.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Most migrations in flight per host (as source or destination).
    #[arg(long, default_value_t = 1)]
    pub max_in_flight: usize,
    /// Transport of the migrations the controller orders.
    #[arg(long, default_value = "classic", value_parser = units::parse_transport)]
    pub transport: TransportKind,
    /// Bandwidth cap of the migrations the controller orders: bytes/s (`32M`) or bits/s
    /// (`256mbit`); none when absent.
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub migration_bandwidth: Option<u64>,
    /// Downtime limit of the migrations the controller orders (`300ms`); the engine's
    /// default (30 ms) when absent.
    #[arg(long, value_parser = units::parse_duration)]
    pub migration_downtime_limit: Option<Duration>,
    /// Gather, record and serve the reports, but order no migration and put no host into
    /// standby (a baseline to compare consolidation with); operators' orders still run.
    #[arg(long)]
    pub no_consolidation: bool,
    /// Keep the host and VM samples of this many intervals (at least 30), deleting older
    /// ones; all are kept when absent. Decisions and migrations are always kept.
    #[arg(long)]
    pub keep_intervals: Option<u32>,
    /// On shutdown, how long migrations in flight may take to finish before they are
    /// cancelled (the VM then stays on its source).
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    pub drain_timeout: Duration,
}

/// Reads a token file (private to its owner, one printable line).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<Token> {
    Token::from_file(path).map_err(|e| usage!("{e}"))
}

/// The HTTP client of one agent.
fn connect_agent(spec: &AgentSpec, token: &Token) -> anyhow::Result<Arc<dyn AgentApi>> {
    Ok(Arc::new(fastmig_cluster::http_client::HttpAgent::new(
        spec.host.clone(),
        &spec.url,
        token,
        AGENT_TIMEOUT,
    )))
}

/// How long one call to an agent may take (a report, or preparing an incoming VM process).
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

fn cost_model(args: &ControllerArgs) -> anyhow::Result<CostModel> {
    let Some(path) = &args.model else {
        return Ok(CostModel::CloudSim);
    };
    let model = fastmig_model::Model::load(path)
        .with_context(|| format!("loading model {}", path.display()))?;
    let t = crate::model_cmd::model_transport(args.transport);
    let cost = fastmig_sim::ModelCost::new(model, t, fastmig_sim::Link::Host)
        .map_err(|e| usage!("model {}: {e}", path.display()))?;
    Ok(CostModel::Model(Box::new(cost)))
}

fn lock(c: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs rounds every `interval` until `stop` is set, then lets migrations in flight end.
fn rounds(
    ctl: &Mutex<Controller>,
    interval: Duration,
    drain: Duration,
    stop: &AtomicBool,
    wake: &mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let threads = lock(ctl).config().gather_threads;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        // Reports are gathered without holding the controller: the API stays responsive
        // while an agent times out.
        let agents = lock(ctl).agents();
        let reports = gather(&agents, threads);
        match lock(ctl).tick_with(reports) {
            Ok(d) => tracing::info!(
                interval = d.interval,
                unreachable = d.unreachable.len(),
                overloaded = d.plan.overloaded.len(),
                ordered = d.ordered.len(),
                ended = d.ended.len(),
                decision_us = d.decision_us,
                "round"
            ),
            // A store failure is fatal: a controller that cannot record must not act.
            Err(e) => return Err(e).context("round"),
        }
        let left = interval.saturating_sub(started.elapsed());
        if wake.recv_timeout(left) != Err(mpsc::RecvTimeoutError::Timeout) {
            break;
        }
    }
    tracing::info!("stopping: letting migrations in flight end");
    let left = lock(ctl)
        .drain(drain, Duration::from_millis(500))
        .context("draining migrations")?;
    if left > 0 {
        tracing::warn!(
            left,
            "migrations still open at exit; a restart reconciles them"
        );
    }
    Ok(())
}

/// `fastmig controller`.
pub fn main(args: ControllerArgs) -> anyhow::Result<()> {
    let token = read_token(&args.token_file)?;
    let agents = args
        .agents
        .iter()
        .map(|a| connect_agent(a, &token))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = fastmig_cluster::store::open(&args.db).map_err(|e| match e {
        fastmig_cluster::store::StoreError::BadUrl(_) => usage!("--db: {e}"),
        other => anyhow::Error::new(other),
    })?;
    let mut cfg = ControllerConfig::new(&args.policy);
    cfg.interval = args.interval;
    cfg.max_in_flight = args.max_in_flight;
    cfg.transport = args.transport;
    cfg.migration_bandwidth = args.migration_bandwidth;
    cfg.migration_downtime_limit = args.migration_downtime_limit;
    cfg.consolidate = !args.no_consolidation;
    cfg.keep_intervals = args.keep_intervals;
    cfg.cost = cost_model(&args)?;
    let ctl = Controller::new(cfg, agents, store).map_err(|e| match e {
        fastmig_cluster::controller::ControllerError::Config(m) => usage!("{m}"),
        other => anyhow::Error::new(other),
    })?;
    let ctl = Arc::new(Mutex::new(ctl));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("controller API on http://{}", args.listen);

    let stop = Arc::new(AtomicBool::new(false));
    let (wake_tx, wake_rx) = mpsc::channel::<()>();
    let (api_stop_tx, api_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = ApiState::new(Arc::clone(&ctl), token.clone());
    let server = rt.spawn(serve(listener, st, async {
        let _ = api_stop_rx.await;
    }));
    let signals = {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("signal received");
            stop.store(true, Ordering::SeqCst);
            let _ = wake_tx.send(());
            Ok::<(), std::io::Error>(())
        })
    };
    let result = rounds(&ctl, args.interval, args.drain_timeout, &stop, &wake_rx);
    signals.abort();
    let _ = api_stop_tx.send(());
    rt.block_on(server)
        .context("API task")?
        .context("serving the API")?;
    // The store closes with the controller.
    drop(ctl);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastmig_cluster::fake_agent::{test_vm, FakeCluster};
    use fastmig_cluster::proto::VmName;
    use fastmig_cluster::store::MigrationState;

    #[test]
    fn a_stop_cancels_the_migrations_that_do_not_finish_and_the_vm_stays_on_its_source() {
        let g4 = fastmig_sim::setup::reference_host_types()[0].clone();
        let h = |n: &str| HostName(n.into());
        let fake = FakeCluster::new(vec![(h("a"), g4.clone()), (h("b"), g4)]);
        fake.start(&h("a"), &test_vm("v1", 870, 1000.0, 1.0));
        fake.start(&h("a"), &test_vm("v2", 1740, 2000.0, 1.0));
        let dir = tempfile::tempdir().unwrap();
        let store =
            fastmig_cluster::store::open(&format!("sqlite:{}", dir.path().join("c.db").display()))
                .unwrap();
        let agents = fake
            .agents()
            .into_iter()
            .map(|a| Arc::new(a) as Arc<dyn AgentApi>)
            .collect();
        let ctl =
            Mutex::new(Controller::new(ControllerConfig::new("thr-mmt"), agents, store).unwrap());
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        // Asked to stop before it starts: one round runs (it orders v1 a -> b), then the
        // migration, which never finishes here, is cancelled after the drain timeout.
        tx.send(()).unwrap();
        rounds(&ctl, Duration::from_secs(3600), Duration::ZERO, &stop, &rx).unwrap();
        let mut c = lock(&ctl);
        let all = c.store().migrations(false).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, MigrationState::Failed);
        assert!(c.open_migrations().is_empty());
        assert_eq!(fake.running_on(&VmName("v1".into())), vec![h("a")]);
        assert_eq!(fake.placements(&VmName("v1".into())).len(), 1);
    }

    #[test]
    fn agents_are_host_equals_url() {
        let a = parse_agent("h1=http://10.0.0.1:7300").unwrap();
        assert_eq!(
            (a.host.0.as_str(), a.url.as_str()),
            ("h1", "http://10.0.0.1:7300")
        );
        assert!(parse_agent("h1").is_err());
        assert!(parse_agent("=http://x").is_err());
        assert!(parse_agent("h1=").is_err());
    }
}
