//! The controller's HTTP API (JSON; `crates/cluster/openapi.json` documents it and a test
//! checks the live server against it).
//!
//! | method and path | body | reply |
//! |---|---|---|
//! | `GET /hosts` | | `[HostStatus]` |
//! | `GET /vms` | | `[VmEntry]` |
//! | `GET /migrations[?open=true]` | | `[MigrationRow]`, newest first |
//! | `GET /decisions[?limit=N]` | | `[DecisionRow]`, newest first (default 20) |
//! | `POST /vms` | [`PlaceVm`] | 201 [`Placed`] |
//! | `POST /migrations` | [`OrderMigration`] | 201 `MigrationRow` |
//! | `POST /hosts/{id}/standby` | | `HostStatus` |
//! | `POST /hosts/{id}/wake` | | `HostStatus` |
//!
//! Every request carries `Authorization: Bearer TOKEN` (the token the controller uses with
//! its agents), compared in constant time; without it: 401. A malformed body: 400. An
//! unknown VM or host: 404. An order the cluster's state forbids (to itself, to a host in
//! standby or without room, a VM already migrating): 409. All with `{"error": "..."}` and
//! nothing changed.
//!
//! Handlers run the controller's blocking calls on tokio's blocking pool.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::auth::Token;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fastmig_migration::TransportKind;
use serde::{Deserialize, Serialize};

use super::{Controller, HostStatus, OrderError};
use crate::agent_api::AgentError;
use crate::proto::{ApiError, HostName, StartVm, VmName, VmReport};
use crate::store::{now_ms, OrderRow, Origin};

/// `POST /vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceVm {
    /// The VM.
    pub vm: StartVm,
    /// Where; PABFD chooses when absent.
    #[serde(default)]
    pub host: Option<HostName>,
}

/// Reply of `POST /vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placed {
    /// Where it runs.
    pub host: HostName,
    /// Its report.
    pub vm: VmReport,
}

/// `POST /migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderMigration {
    /// The VM.
    pub vm: VmName,
    /// Where to.
    pub destination: HostName,
    /// Transport; the controller's when absent.
    #[serde(default)]
    pub transport: Option<TransportKind>,
}

/// One VM in `GET /vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmEntry {
    /// Its name.
    pub vm: VmName,
    /// Where it runs.
    pub host: HostName,
    /// Its report there.
    pub report: VmReport,
}

#[derive(Debug, Deserialize)]
struct MigrationsQuery {
    #[serde(default)]
    open: bool,
}

#[derive(Debug, Deserialize)]
struct DecisionsQuery {
    limit: Option<i64>,
}

/// The API's shared state.
#[derive(Clone)]
pub struct ApiState {
    ctl: Arc<Mutex<Controller>>,
    token: Arc<Token>,
}

impl ApiState {
    /// The controller behind the API and the bearer token it requires.
    pub fn new(ctl: Arc<Mutex<Controller>>, token: Token) -> Self {
        Self {
            ctl,
            token: Arc::new(token),
        }
    }
}

/// An error reply.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<OrderError> for Refusal {
    fn from(e: OrderError) -> Self {
        let code = match &e {
            OrderError::UnknownVm(_) | OrderError::UnknownHost(_) => StatusCode::NOT_FOUND,
            OrderError::SameHost(..)
            | OrderError::Standby(_)
            | OrderError::NoRoom(..)
            | OrderError::Busy(_)
            | OrderError::Exists(_)
            | OrderError::Unreachable(_)
            | OrderError::Agent(AgentError::Refused { .. }) => StatusCode::CONFLICT,
            OrderError::Agent(_) => StatusCode::BAD_GATEWAY,
            OrderError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal(code, e.to_string())
    }
}

fn lock(ctl: &Mutex<Controller>) -> MutexGuard<'_, Controller> {
    ctl.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&mut Controller) -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    let ctl = Arc::clone(&st.ctl);
    tokio::task::spawn_blocking(move || f(&mut lock(&ctl)))
        .await
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, Refusal> {
    b.map(|Json(t)| t).map_err(|e| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("malformed request: {}", e.body_text()),
        )
    })
}

async fn auth(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !st.token.accepts(given) {
        return Refusal(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response();
    }
    next.run(req).await
}

fn record_order(ctl: &mut Controller, kind: &str, body: String, outcome: &str) {
    let id = ctl.next_order_id();
    let row = OrderRow {
        id,
        time_ms: now_ms(),
        kind: kind.into(),
        body,
        outcome: outcome.into(),
    };
    if let Err(e) = ctl.store().put_order(&row) {
        tracing::warn!(error = %e, "order not recorded");
    }
}

async fn hosts(State(st): State<ApiState>) -> Result<Json<Vec<HostStatus>>, Refusal> {
    Ok(Json(blocking(&st, |c| Ok(c.hosts())).await?))
}

async fn vms(State(st): State<ApiState>) -> Result<Json<Vec<VmEntry>>, Refusal> {
    Ok(Json(
        blocking(&st, |c| {
            Ok(c.vms()
                .iter()
                .map(|(n, v)| VmEntry {
                    vm: n.clone(),
                    host: v.host.clone(),
                    report: v.report.clone(),
                })
                .collect())
        })
        .await?,
    ))
}

async fn migrations(
    State(st): State<ApiState>,
    q: Query<MigrationsQuery>,
) -> Result<Response, Refusal> {
    let open = q.open;
    let rows = blocking(&st, move |c| {
        c.store()
            .migrations(open)
            .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await?;
    Ok(Json(rows).into_response())
}

async fn decisions(
    State(st): State<ApiState>,
    q: Query<DecisionsQuery>,
) -> Result<Response, Refusal> {
    let limit = q.limit.unwrap_or(20).clamp(1, 10_000);
    let rows = blocking(&st, move |c| {
        c.store()
            .decisions(limit)
            .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await?;
    Ok(Json(rows).into_response())
}

async fn place_vm(
    State(st): State<ApiState>,
    b: Result<Json<PlaceVm>, JsonRejection>,
) -> Result<Response, Refusal> {
    let req = body(b)?;
    let placed = blocking(&st, move |c| {
        let text = serde_json::to_string(&req).unwrap_or_default();
        let r = c.place_vm(&req.vm, req.host.as_ref());
        if matches!(r, Ok(_) | Err(OrderError::Agent(_))) {
            let outcome = r
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "accepted".into());
            record_order(c, "place-vm", text, &outcome);
        }
        let (host, vm) = r?;
        Ok(Placed { host, vm })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(placed)).into_response())
}

async fn order_migration(
    State(st): State<ApiState>,
    b: Result<Json<OrderMigration>, JsonRejection>,
) -> Result<Response, Refusal> {
    let req = body(b)?;
    let row = blocking(&st, move |c| {
        let text = serde_json::to_string(&req).unwrap_or_default();
        let t = req.transport.unwrap_or(c.config().transport);
        let r = c.order(&req.vm, &req.destination, t, Origin::Operator, None);
        if matches!(r, Ok(_) | Err(OrderError::Agent(_))) {
            let outcome = r
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "accepted".into());
            record_order(c, "migrate", text, &outcome);
        }
        Ok(r?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(row)).into_response())
}

async fn power(st: ApiState, id: String, active: bool) -> Result<Json<HostStatus>, Refusal> {
    let host = HostName(id);
    Ok(Json(
        blocking(&st, move |c| {
            let known = c.hosts().into_iter().find(|h| h.name == host);
            let Some(status) = known else {
                return Err(OrderError::UnknownHost(host).into());
            };
            if !active && status.in_flight > 0 {
                return Err(
                    OrderError::Busy(format!("host {host} has migrations in flight")).into(),
                );
            }
            let kind = if active { "wake" } else { "standby" };
            let r = c.set_power(&host, active);
            let outcome = r
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "accepted".into());
            if matches!(r, Ok(_) | Err(OrderError::Agent(_))) {
                record_order(c, kind, format!("{{\"host\":{:?}}}", host.0), &outcome);
            }
            r?;
            c.hosts()
                .into_iter()
                .find(|h| h.name == host)
                .ok_or_else(|| OrderError::UnknownHost(host).into())
        })
        .await?,
    ))
}

async fn standby(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<HostStatus>, Refusal> {
    power(st, id, false).await
}

async fn wake(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<HostStatus>, Refusal> {
    power(st, id, true).await
}

async fn not_found() -> Refusal {
    Refusal(StatusCode::NOT_FOUND, "no such endpoint".into())
}

/// The API's routes.
pub fn router(st: ApiState) -> Router {
    let dash = super::dashboard::Dashboard::new(Arc::clone(&st.ctl));
    Router::new()
        .merge(dash.private_routes())
        .route("/hosts", get(hosts))
        .route("/vms", get(vms).post(place_vm))
        .route("/migrations", get(migrations).post(order_migration))
        .route("/decisions", get(decisions))
        .route("/hosts/{id}/standby", post(standby))
        .route("/hosts/{id}/wake", post(wake))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), auth))
        .with_state(st)
        .merge(dash.public_routes())
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    st: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(st))
        .with_graceful_shutdown(shutdown)
        .await
}
