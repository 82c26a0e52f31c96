//! The controller's dashboard and metrics: `GET /` (one self-contained HTML page, nothing
//! fetched from elsewhere), `GET /events` (server-sent events: the cluster's state every
//! second) and `GET /metrics` (Prometheus, see [`crate::metrics`]).
//!
//! ```text
//!  sampler (1 s) ─► lock controller ─► metrics.sync (store) + snapshot ─► energy ∫ power dt
//!       └─► watch channel ─► every /events stream (first event carries the chart history)
//! ```
//!
//! `/events` and `/metrics` sit behind the API's bearer token like every read of the API
//! (they show the same hosts and VMs as `GET /hosts`); `/` is static and public: the page
//! asks for the token once and keeps it in the browser's local storage.
//!
//! It does not own the controller's state or its orders (`api` does); the page's buttons call
//! the API's POST endpoints.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fastmig_migration::Progress;
use serde::Serialize;

use super::Controller;
use crate::metrics::{host_power_w, ControllerMetrics, STANDBY_POWER_FRACTION};
use crate::proto::{HostName, HostState, MigrationPhase, Side};
use crate::store::{now_ms, MigrationRow};

/// The page, with its CSS and JS inline.
pub const PAGE: &str = include_str!("../../assets/dashboard.html");

/// Points of the charts kept (one per second: an hour).
pub const HISTORY_KEPT: usize = 3600;

/// How often the sampler looks at the controller.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// A host on the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    /// Name.
    pub name: HostName,
    /// Power state.
    pub state: HostState,
    /// Whether its last report arrived.
    pub reachable: bool,
    /// Host type's name.
    pub host_type: Option<String>,
    /// Declared MIPS.
    pub capacity_mips: f64,
    /// Declared RAM, MB.
    pub ram_mb: u32,
    /// Requested MIPS / capacity.
    pub utilization: f64,
    /// Estimated power, W.
    pub power_w: f64,
    /// VMs on it.
    pub vms: Vec<String>,
    /// Migrations in flight from or to it.
    pub in_flight: usize,
}

/// A VM on the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// Name.
    pub vm: String,
    /// Where it runs.
    pub host: String,
    /// Run state.
    pub status: String,
    /// CPU demand (fraction of its MIPS).
    pub demand: f64,
    /// Its MIPS.
    pub mips: f64,
    /// Memory, bytes.
    pub mem_bytes: u64,
}

/// A migration in flight, with the source's last progress.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    /// The controller's row.
    #[serde(flatten)]
    pub row: MigrationRow,
    /// The source agent's last progress report.
    pub progress: Option<Progress>,
}

/// One point of the charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// When, ms since the Unix epoch.
    pub t_ms: i64,
    /// Hosts active.
    pub active_hosts: usize,
    /// Estimated power of all hosts, W.
    pub power_w: f64,
    /// Mean utilisation of the active hosts.
    pub utilization: f64,
    /// Migrations that ended since the previous point.
    pub migrations: usize,
    /// The controller's interval at this point (the page sums migrations per interval).
    pub interval: i64,
}

/// The cluster as one event of `/events` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When, ms since the Unix epoch.
    pub time_ms: i64,
    /// Interval number of the controller's last round.
    pub interval: i64,
    /// Hosts.
    pub hosts: Vec<HostView>,
    /// VMs.
    pub vms: Vec<VmView>,
    /// Migrations in flight.
    pub in_flight: Vec<InFlight>,
    /// The last migrations that ended, newest last.
    pub done: Vec<MigrationRow>,
    /// Estimated power now, W.
    pub power_w: f64,
    /// Energy since the HTTP server started, J (trapezoids between samples).
    pub energy_j: f64,
    /// The newest chart point.
    pub point: Point,
}

#[derive(Serialize)]
struct EventBody<'a> {
    #[serde(flatten)]
    snap: &'a Snapshot,
    /// Chart points: the whole history in a stream's first event, the newest one after.
    history: &'a [Point],
}

#[derive(Default)]
struct Integrator {
    energy_j: f64,
    last: Option<(Instant, f64)>,
    history: VecDeque<Point>,
}

struct Inner {
    ctl: Arc<Mutex<Controller>>,
    metrics: ControllerMetrics,
    integ: Mutex<Integrator>,
    tx: tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
}

/// The dashboard's state: a handle shared by its routes and its sampler task.
#[derive(Clone)]
pub struct Dashboard(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn progress_of(ctl: &Controller, row: &MigrationRow) -> Option<Progress> {
    let rep = ctl.reports().get(&row.source)?;
    rep.migrations
        .iter()
        .filter(|m| m.migration == row.id && m.side == Side::Source)
        .find_map(|m| match &m.phase {
            MigrationPhase::Running { progress } => progress.clone(),
            _ => None,
        })
}

impl Dashboard {
    /// A dashboard over `ctl`; starts its sampler when called inside a tokio runtime (the
    /// sampler ends when the last handle is dropped).
    pub fn new(ctl: Arc<Mutex<Controller>>) -> Self {
        let (tx, _) = tokio::sync::watch::channel(None);
        let d = Dashboard(Arc::new(Inner {
            ctl,
            metrics: ControllerMetrics::new(STANDBY_POWER_FRACTION),
            integ: Mutex::new(Integrator::default()),
            tx,
        }));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sampler(Arc::downgrade(&d.0)));
        }
        d
    }

    /// Reads the controller once: counts ended migrations, builds the snapshot, integrates
    /// power into energy, appends a chart point and sends the snapshot to every stream.
    pub async fn sample(&self) -> Option<Arc<Snapshot>> {
        let inner = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || inner.sample())
            .await
            .ok()?
    }

    /// The routes behind the API's token: `/events`, `/metrics`.
    pub fn private_routes<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let (a, b) = (self.clone(), self.clone());
        Router::new()
            .route("/events", get(move || events(a.clone())))
            .route("/metrics", get(move || metrics(b.clone())))
    }

    /// The public route: `/`, the page.
    pub fn public_routes<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new().route("/", get(|| async { Html(PAGE) }))
    }
}

impl Inner {
    /// Takes a sample and publishes it to the streams before the next sample can start, so
    /// that streams see samples in the order they were taken.
    fn sample(&self) -> Option<Arc<Snapshot>> {
        // Samples run one at a time, whole (the sampler and a new stream may both ask for
        // one): the sample that syncs the store first is also the one that makes the first
        // chart point, so the migrations ended before the dashboard started land in no point.
        let mut integ = lock(&self.integ);
        let mut ctl = lock(&self.ctl);
        let ended = match self.metrics.sync(&mut ctl) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard: store not read");
                0
            }
        };
        let frac = self.metrics.standby_fraction();
        let hosts: Vec<HostView> = ctl
            .hosts()
            .into_iter()
            .map(|h| {
                let t = h.host_type.as_ref();
                HostView {
                    power_w: t.map_or(0.0, |t| host_power_w(t, h.state, h.utilization, frac)),
                    host_type: t.map(|t| t.name.clone()),
                    capacity_mips: t.map_or(0.0, |t| t.total_mips()),
                    ram_mb: t.map_or(0, |t| t.ram_mb),
                    name: h.name,
                    state: h.state,
                    reachable: h.reachable,
                    utilization: h.utilization + 0.0,
                    vms: h.vms.into_iter().map(|v| v.0).collect(),
                    in_flight: h.in_flight,
                }
            })
            .collect();
        let vms = ctl
            .vms()
            .iter()
            .map(|(n, v)| VmView {
                vm: n.0.clone(),
                host: v.host.0.clone(),
                status: v.report.status.to_string(),
                demand: v.report.demand,
                mips: v.report.mips,
                mem_bytes: v.report.mem_bytes,
            })
            .collect();
        let in_flight = ctl
            .open_migrations()
            .into_iter()
            .map(|row| InFlight {
                progress: progress_of(&ctl, &row),
                row,
            })
            .collect();
        let interval = ctl.interval_no();
        drop(ctl);
        let power_w: f64 = hosts.iter().map(|h| h.power_w).sum();
        let active: Vec<&HostView> = hosts
            .iter()
            .filter(|h| h.state == HostState::Active)
            .collect();
        let utilization = if active.is_empty() {
            0.0
        } else {
            active.iter().map(|h| h.utilization).sum::<f64>() / active.len() as f64
        };
        let now = Instant::now();
        if let Some((t0, p0)) = integ.last {
            integ.energy_j += (p0 + power_w) / 2.0 * now.duration_since(t0).as_secs_f64();
        }
        integ.last = Some((now, power_w));
        // The first sample counts every migration the store holds: none of them ended in
        // its interval.
        let first = integ.history.is_empty();
        let point = Point {
            t_ms: now_ms(),
            active_hosts: active.len(),
            power_w,
            utilization,
            migrations: if first { 0 } else { ended },
            interval,
        };
        integ.history.push_back(point);
        if integ.history.len() > HISTORY_KEPT {
            integ.history.pop_front();
        }
        let snap = Arc::new(Snapshot {
            time_ms: point.t_ms,
            interval,
            hosts,
            vms,
            in_flight,
            done: self.metrics.recent(),
            power_w,
            energy_j: integ.energy_j,
            point,
        });
        // Still holding `integ`: published in the order taken.
        self.tx.send_replace(Some(Arc::clone(&snap)));
        Some(snap)
    }
}

async fn sampler(d: Weak<Inner>) {
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = d.upgrade() else { break };
        Dashboard(inner).sample().await;
    }
}

fn event(snap: &Snapshot, history: &[Point]) -> Event {
    let body = EventBody { snap, history };
    Event::default()
        .event("state")
        .data(serde_json::to_string(&body).unwrap_or_else(|_| "{}".into()))
}

async fn events(d: Dashboard) -> Response {
    let mut rx = d.0.tx.subscribe();
    // The first event comes at once, with the whole history; it marks the current sample
    // seen, so that the next event is a newer one.
    let empty = rx.borrow().is_none();
    if empty {
        d.sample().await;
    }
    let first = rx.borrow_and_update().clone();
    let history: Vec<Point> = lock(&d.0.integ).history.iter().copied().collect();
    let first = first.map(|s| event(&s, &history));
    let stream = futures_util::stream::unfold((rx, first), |(mut rx, first)| async move {
        if let Some(ev) = first {
            return Some((Ok::<_, Infallible>(ev), (rx, None)));
        }
        loop {
            rx.changed().await.ok()?;
            let snap = rx.borrow_and_update().clone();
            if let Some(s) = snap {
                let ev = event(&s, std::slice::from_ref(&s.point));
                return Some((Ok(ev), (rx, None)));
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn metrics(d: Dashboard) -> Response {
    let inner = Arc::clone(&d.0);
    let text = tokio::task::spawn_blocking(move || {
        let mut ctl = lock(&inner.ctl);
        if let Err(e) = inner.metrics.sync(&mut ctl) {
            tracing::warn!(error = %e, "metrics: store not read");
        }
        let energy = lock(&inner.integ).energy_j;
        inner.metrics.render(
            &ctl.hosts(),
            ctl.vms(),
            ctl.open_migrations().len(),
            Some(energy),
        )
    })
    .await;
    match text {
        Ok(t) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], t).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
