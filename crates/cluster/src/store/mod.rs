//! The controller's database: every report, decision, migration and order.
//!
//! One schema (`crates/cluster/migrations/*.sql`, applied in order and recorded in
//! `schema_version`) for two backends: SQLite through `rusqlite` (`sqlite:PATH`, the default:
//! embedded, nothing to install) and PostgreSQL through `postgres` (`postgres://...`). The
//! queries are written once, in the SQL both understand (`$1` parameters, `ON CONFLICT ... DO
//! UPDATE`), over the small [`backend::Backend`] seam; the two backends only move values.
//!
//! The store is blocking: the controller calls it from its own thread.

mod backend;
mod postgres;
mod sqlite;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::proto::{HostName, HostState, MigrationId, VmName};
use backend::{Backend, Value};

pub use self::postgres::PgBackend;
pub use self::sqlite::SqliteBackend;

/// The schema migrations, in order: (version, SQL).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_sample_pruning.sql")),
];

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `--db` URL is neither `sqlite:PATH` nor `postgres://...`.
    #[error("database URL {0:?}: expected sqlite:PATH or postgres://...")]
    BadUrl(String),
    /// Opening or connecting failed.
    #[error("opening the database: {0}")]
    Open(String),
    /// Applying a schema migration failed.
    #[error("applying schema version {version}: {reason}")]
    Migrate {
        /// The version.
        version: i64,
        /// What the database said.
        reason: String,
    },
    /// The database has a newer schema than this build knows.
    #[error("database schema version {found} is newer than this build's {known}")]
    TooNew {
        /// Found in `schema_version`.
        found: i64,
        /// Newest this build knows.
        known: i64,
    },
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(String),
    /// A stored value could not be read back.
    #[error("stored value of {what} is malformed: {reason}")]
    Corrupt {
        /// The column.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// A host's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRow {
    /// Its name.
    pub name: HostName,
    /// Power state.
    pub state: HostState,
    /// Whether its last report arrived.
    pub reachable: bool,
    /// `fastmig_sim::setup::HostType` as JSON.
    pub host_type: String,
    /// Where its agent receives migrations.
    pub migration_address: String,
    /// Time of its last report, ms since the Unix epoch.
    pub last_report_ms: i64,
}

/// A VM's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRow {
    /// Its name.
    pub name: VmName,
    /// Where it runs (`None` while unknown).
    pub host: Option<HostName>,
    /// `proto::StartVm` as JSON.
    pub spec: String,
    /// The VM process's status as reported.
    pub status: String,
    /// Current demand, fraction of its MIPS.
    pub demand: f64,
    /// Time of the report, ms since the Unix epoch.
    pub updated_ms: i64,
}

/// One host's utilisation in one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// The host.
    pub host: HostName,
    /// The interval.
    pub interval_no: i64,
    /// When, ms since the Unix epoch.
    pub time_ms: i64,
    /// Requested MIPS / capacity.
    pub utilization: f64,
    /// VMs on it.
    pub vm_count: i64,
}

/// One VM's demand in one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSample {
    /// The VM.
    pub vm: VmName,
    /// The interval.
    pub interval_no: i64,
    /// Where it ran.
    pub host: HostName,
    /// Fraction of its MIPS.
    pub demand: f64,
    /// Distinct pages dirtied per second.
    pub dirty_rate_pps: f64,
}

/// One interval's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRow {
    /// The interval number.
    pub id: i64,
    /// When it ran, ms since the Unix epoch.
    pub time_ms: i64,
    /// Policy name (`lr-mmt`).
    pub policy: String,
    /// Time spent deciding (views, detection, selection, placement), microseconds.
    pub decision_us: i64,
    /// Hosts managed.
    pub hosts: i64,
    /// VMs managed.
    pub vms: i64,
    /// Hosts whose report did not arrive.
    pub unreachable: i64,
    /// Hosts found over-utilised.
    pub overloaded: i64,
    /// Migrations ordered.
    pub migrations_ordered: i64,
    /// The full decision as JSON.
    pub summary: String,
}

/// A migration's state in the controller's books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Recorded, destination being prepared or source being started.
    Ordered,
    /// Both agents took it.
    Running,
    /// The source reported `Commit` sent without `Resumed`: resolved from where the VM runs.
    InDoubt,
    /// The VM runs on the destination.
    Done,
    /// The VM runs on the source.
    Failed,
}

impl MigrationState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ordered => "ordered",
            Self::Running => "running",
            Self::InDoubt => "in-doubt",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Ordered,
            Self::Running,
            Self::InDoubt,
            Self::Done,
            Self::Failed,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }

    /// Done or failed: nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed)
    }
}

/// Who ordered a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Overload relief chosen by the policy.
    Policy,
    /// Underload evacuation chosen by the policy.
    Evacuation,
    /// An operator's `POST /migrations`.
    Operator,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Evacuation => "evacuation",
            Self::Operator => "operator",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Self::Policy, Self::Evacuation, Self::Operator]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// A migration's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRow {
    /// Its id.
    pub id: MigrationId,
    /// The VM.
    pub vm: VmName,
    /// Where it leaves.
    pub source: HostName,
    /// Where it goes.
    pub destination: HostName,
    /// `TransportKind` as JSON.
    pub transport: String,
    /// State.
    pub state: MigrationState,
    /// Who ordered it.
    pub origin: Origin,
    /// The interval that ordered it.
    pub decision: Option<i64>,
    /// Predicted total time, s.
    pub predicted_s: Option<f64>,
    /// Predicted downtime, s.
    pub predicted_downtime_s: Option<f64>,
    /// Measured total time, s (from the source's summary).
    pub measured_s: Option<f64>,
    /// Measured downtime, s.
    pub measured_downtime_s: Option<f64>,
    /// The source's `MigrationSummary` as JSON.
    pub summary: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was ordered, ms since the Unix epoch.
    pub started_ms: i64,
    /// When it ended.
    pub ended_ms: Option<i64>,
}

/// An operator order's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRow {
    /// Its id.
    pub id: i64,
    /// When, ms since the Unix epoch.
    pub time_ms: i64,
    /// `place-vm`, `migrate`, `standby`, `wake`.
    pub kind: String,
    /// The request as JSON.
    pub body: String,
    /// `accepted` or the refusal.
    pub outcome: String,
}

/// What one interval writes, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct IntervalWrite {
    /// Hosts as reported (unreachable ones with `reachable: false`).
    pub hosts: Vec<HostRow>,
    /// VMs as reported.
    pub vms: Vec<VmRow>,
    /// Host samples.
    pub host_samples: Vec<HostSample>,
    /// VM samples.
    pub vm_samples: Vec<VmSample>,
    /// The decision.
    pub decision: Option<DecisionRow>,
}

/// The controller's database.
pub trait Store: Send {
    /// Writes one interval atomically.
    fn write_interval(&mut self, w: &IntervalWrite) -> Result<(), StoreError>;
    /// Inserts or replaces one host.
    fn put_host(&mut self, h: &HostRow) -> Result<(), StoreError>;
    /// Inserts or replaces one VM.
    fn put_vm(&mut self, v: &VmRow) -> Result<(), StoreError>;
    /// Inserts or replaces one migration.
    fn put_migration(&mut self, m: &MigrationRow) -> Result<(), StoreError>;
    /// Inserts one order.
    fn put_order(&mut self, o: &OrderRow) -> Result<(), StoreError>;
    /// Every host, by name.
    fn hosts(&mut self) -> Result<Vec<HostRow>, StoreError>;
    /// Every VM, by name.
    fn vms(&mut self) -> Result<Vec<VmRow>, StoreError>;
    /// Migrations, newest first; `open_only`: those not done or failed.
    fn migrations(&mut self, open_only: bool) -> Result<Vec<MigrationRow>, StoreError>;
    /// One migration.
    fn migration(&mut self, id: MigrationId) -> Result<Option<MigrationRow>, StoreError>;
    /// The last `limit` decisions, newest first.
    fn decisions(&mut self, limit: i64) -> Result<Vec<DecisionRow>, StoreError>;
    /// The last `n` utilisation samples of every host, most recent first.
    fn host_histories(&mut self, n: i64) -> Result<HashMap<HostName, Vec<f64>>, StoreError>;
    /// The last `n` demand samples of every VM, most recent first.
    fn vm_histories(&mut self, n: i64) -> Result<HashMap<VmName, Vec<f64>>, StoreError>;
    /// Deletes the host and VM samples of intervals before `interval_no`.
    fn prune_samples(&mut self, interval_no: i64) -> Result<(), StoreError>;
    /// The largest ids used: (interval, migration, order); 0 when none.
    fn max_ids(&mut self) -> Result<(i64, u64, i64), StoreError>;
    /// The schema version in the database.
    fn schema_version(&mut self) -> Result<i64, StoreError>;
}

/// Opens `sqlite:PATH` or `postgres://...` and brings its schema up to date.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(StoreError::BadUrl(url.into()));
        }
        Ok(Box::new(SqlStore::new(SqliteBackend::open(path)?)?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(SqlStore::new(PgBackend::connect(url, None)?)?))
    } else {
        Err(StoreError::BadUrl(url.into()))
    }
}

/// The store over any backend: the queries live here, once.
pub struct SqlStore<B: Backend> {
    db: B,
}

const UPSERT_HOST: &str =
    "INSERT INTO hosts (name, state, reachable, host_type, migration_address, last_report_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET state = excluded.state, \
     reachable = excluded.reachable, host_type = excluded.host_type, \
     migration_address = excluded.migration_address, last_report_ms = excluded.last_report_ms";
const UPSERT_VM: &str = "INSERT INTO vms (name, host, spec, status, demand, updated_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET host = excluded.host, \
     spec = excluded.spec, status = excluded.status, demand = excluded.demand, \
     updated_ms = excluded.updated_ms";
const INSERT_HOST_SAMPLE: &str =
    "INSERT INTO host_samples (host, interval_no, time_ms, utilization, vm_count) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (host, interval_no) DO NOTHING";
const INSERT_VM_SAMPLE: &str =
    "INSERT INTO vm_samples (vm, interval_no, host, demand, dirty_rate_pps) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (vm, interval_no) DO NOTHING";
const UPSERT_DECISION: &str =
    "INSERT INTO decisions (id, time_ms, policy, decision_us, hosts, vms, unreachable, \
     overloaded, migrations_ordered, summary) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (id) DO UPDATE SET time_ms = excluded.time_ms, policy = excluded.policy, \
     decision_us = excluded.decision_us, hosts = excluded.hosts, vms = excluded.vms, \
     unreachable = excluded.unreachable, overloaded = excluded.overloaded, \
     migrations_ordered = excluded.migrations_ordered, summary = excluded.summary";
const UPSERT_MIGRATION: &str = "INSERT INTO migrations (id, vm, source, destination, transport, state, origin, decision, \
     predicted_s, predicted_downtime_s, measured_s, measured_downtime_s, summary, error, started_ms, ended_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, measured_s = excluded.measured_s, \
     measured_downtime_s = excluded.measured_downtime_s, summary = excluded.summary, \
     error = excluded.error, ended_ms = excluded.ended_ms";
const MIGRATION_COLUMNS: &str =
    "id, vm, source, destination, transport, state, origin, decision, predicted_s, \
     predicted_downtime_s, measured_s, measured_downtime_s, summary, error, started_ms, ended_ms";

/// Rows per multi-row statement: one statement and one round trip for many rows (a
/// PostgreSQL round trip per row made an interval of 10,000 hosts take 18 s); 400 rows of at
/// most 6 columns stay far below both databases' parameter limits.
const ROWS_PER_STATEMENT: usize = 400;

/// Turns the one-row statement `sql` (whose `VALUES ($1, ..., $n)` names each column once)
/// into statements of up to [`ROWS_PER_STATEMENT`] rows each, appended to `out`.
fn multi_row(
    out: &mut Vec<(String, Vec<Value>)>,
    sql: &str,
    rows: impl Iterator<Item = Vec<Value>>,
) {
    let rows: Vec<Vec<Value>> = rows.collect();
    let Some(cols) = rows.first().map(Vec::len) else {
        return;
    };
    let one = format!(
        "({})",
        (1..=cols)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let groups: Vec<String> = (0..chunk.len())
            .map(|r| {
                let p: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        out.push((
            sql.replacen(&one, &groups.join(", "), 1),
            chunk.iter().flatten().cloned().collect(),
        ));
    }
}

impl<B: Backend> SqlStore<B> {
    /// Wraps a backend and applies the schema migrations it lacks.
    pub fn new(mut db: B) -> Result<Self, StoreError> {
        db.batch(&[(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
            vec![],
        )])?;
        let rows = db.query("SELECT MAX(version) FROM schema_version", &[])?;
        let found = rows
            .first()
            .and_then(|r| r.first())
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            db.apply_script(sql, version, now_ms())
                .map_err(|e| StoreError::Migrate {
                    version,
                    reason: e.to_string(),
                })?;
        }
        Ok(Self { db })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn host_params(h: &HostRow) -> Vec<Value> {
    vec![
        Value::text(&h.name.0),
        Value::text(state_str(h.state)),
        Value::Int(Some(i64::from(h.reachable))),
        Value::text(&h.host_type),
        Value::text(&h.migration_address),
        Value::Int(Some(h.last_report_ms)),
    ]
}

fn vm_params(v: &VmRow) -> Vec<Value> {
    vec![
        Value::text(&v.name.0),
        Value::Text(v.host.as_ref().map(|h| h.0.clone())),
        Value::text(&v.spec),
        Value::text(&v.status),
        Value::Real(Some(v.demand)),
        Value::Int(Some(v.updated_ms)),
    ]
}

fn state_str(s: HostState) -> &'static str {
    match s {
        HostState::Active => "active",
        HostState::Standby => "standby",
    }
}

fn parse_state(s: &str) -> Result<HostState, StoreError> {
    match s {
        "active" => Ok(HostState::Active),
        "standby" => Ok(HostState::Standby),
        other => Err(corrupt("hosts.state", other)),
    }
}

fn corrupt(what: &'static str, v: &str) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: format!("unexpected {v:?}"),
    }
}

fn decision_params(d: &DecisionRow) -> Vec<Value> {
    vec![
        Value::Int(Some(d.id)),
        Value::Int(Some(d.time_ms)),
        Value::text(&d.policy),
        Value::Int(Some(d.decision_us)),
        Value::Int(Some(d.hosts)),
        Value::Int(Some(d.vms)),
        Value::Int(Some(d.unreachable)),
        Value::Int(Some(d.overloaded)),
        Value::Int(Some(d.migrations_ordered)),
        Value::text(&d.summary),
    ]
}

fn migration_params(m: &MigrationRow) -> Vec<Value> {
    vec![
        Value::Int(Some(m.id.0 as i64)),
        Value::text(&m.vm.0),
        Value::text(&m.source.0),
        Value::text(&m.destination.0),
        Value::text(&m.transport),
        Value::text(m.state.as_str()),
        Value::text(m.origin.as_str()),
        Value::Int(m.decision),
        Value::Real(m.predicted_s),
        Value::Real(m.predicted_downtime_s),
        Value::Real(m.measured_s),
        Value::Real(m.measured_downtime_s),
        Value::Text(m.summary.clone()),
        Value::Text(m.error.clone()),
        Value::Int(Some(m.started_ms)),
        Value::Int(m.ended_ms),
    ]
}

struct Row<'a>(&'a [Value], &'static str);

impl Row<'_> {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| corrupt(self.1, "NULL"))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.0.get(i) {
            Some(Value::Text(t)) => Ok(t.clone()),
            Some(Value::Int(None) | Value::Real(None)) => Ok(None),
            _ => Err(corrupt(self.1, &format!("column {i} not text"))),
        }
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?.ok_or_else(|| corrupt(self.1, "NULL"))
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.0.get(i) {
            Some(Value::Int(v)) => Ok(*v),
            Some(Value::Text(None) | Value::Real(None)) => Ok(None),
            _ => Err(corrupt(self.1, &format!("column {i} not an integer"))),
        }
    }
    fn real(&self, i: usize) -> Result<f64, StoreError> {
        self.opt_real(i)?.ok_or_else(|| corrupt(self.1, "NULL"))
    }
    fn opt_real(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.0.get(i) {
            Some(Value::Real(v)) => Ok(*v),
            // SQLite stores a whole REAL as an integer when asked to, and reads it back so.
            Some(Value::Int(v)) => Ok(v.map(|x| x as f64)),
            Some(Value::Text(None)) => Ok(None),
            _ => Err(corrupt(self.1, &format!("column {i} not a number"))),
        }
    }
}

fn migration_from(r: &[Value]) -> Result<MigrationRow, StoreError> {
    let r = Row(r, "migrations");
    let state = r.text(5)?;
    let origin = r.text(6)?;
    Ok(MigrationRow {
        id: MigrationId(r.int(0)? as u64),
        vm: VmName(r.text(1)?),
        source: HostName(r.text(2)?),
        destination: HostName(r.text(3)?),
        transport: r.text(4)?,
        state: MigrationState::parse(&state).ok_or_else(|| corrupt("migrations.state", &state))?,
        origin: Origin::parse(&origin).ok_or_else(|| corrupt("migrations.origin", &origin))?,
        decision: r.opt_int(7)?,
        predicted_s: r.opt_real(8)?,
        predicted_downtime_s: r.opt_real(9)?,
        measured_s: r.opt_real(10)?,
        measured_downtime_s: r.opt_real(11)?,
        summary: r.opt_text(12)?,
        error: r.opt_text(13)?,
        started_ms: r.int(14)?,
        ended_ms: r.opt_int(15)?,
    })
}

fn histories(rows: Vec<Vec<Value>>, n: i64) -> Result<HashMap<String, Vec<f64>>, StoreError> {
    let mut out: HashMap<String, Vec<f64>> = HashMap::new();
    for r in &rows {
        let r = Row(r, "samples");
        let h = out.entry(r.text(0)?).or_default();
        if (h.len() as i64) < n {
            h.push(r.real(2)?);
        }
    }
    Ok(out)
}

impl<B: Backend> Store for SqlStore<B> {
    fn write_interval(&mut self, w: &IntervalWrite) -> Result<(), StoreError> {
        let mut stmts: Vec<(String, Vec<Value>)> = Vec::new();
        multi_row(&mut stmts, UPSERT_HOST, w.hosts.iter().map(host_params));
        multi_row(&mut stmts, UPSERT_VM, w.vms.iter().map(vm_params));
        multi_row(
            &mut stmts,
            INSERT_HOST_SAMPLE,
            w.host_samples.iter().map(|s| {
                vec![
                    Value::text(&s.host.0),
                    Value::Int(Some(s.interval_no)),
                    Value::Int(Some(s.time_ms)),
                    Value::Real(Some(s.utilization)),
                    Value::Int(Some(s.vm_count)),
                ]
            }),
        );
        multi_row(
            &mut stmts,
            INSERT_VM_SAMPLE,
            w.vm_samples.iter().map(|s| {
                vec![
                    Value::text(&s.vm.0),
                    Value::Int(Some(s.interval_no)),
                    Value::text(&s.host.0),
                    Value::Real(Some(s.demand)),
                    Value::Real(Some(s.dirty_rate_pps)),
                ]
            }),
        );
        if let Some(d) = &w.decision {
            stmts.push((UPSERT_DECISION.to_owned(), decision_params(d)));
        }
        let (sqls, params): (Vec<String>, Vec<Vec<Value>>) = stmts.into_iter().unzip();
        let refs: Vec<(&str, Vec<Value>)> = sqls.iter().map(String::as_str).zip(params).collect();
        self.db.batch(&refs)
    }

    fn put_host(&mut self, h: &HostRow) -> Result<(), StoreError> {
        self.db.batch(&[(UPSERT_HOST, host_params(h))])
    }

    fn put_vm(&mut self, v: &VmRow) -> Result<(), StoreError> {
        self.db.batch(&[(UPSERT_VM, vm_params(v))])
    }

    fn put_migration(&mut self, m: &MigrationRow) -> Result<(), StoreError> {
        self.db.batch(&[(UPSERT_MIGRATION, migration_params(m))])
    }

    fn put_order(&mut self, o: &OrderRow) -> Result<(), StoreError> {
        self.db.batch(&[(
            "INSERT INTO orders (id, time_ms, kind, body, outcome) VALUES ($1, $2, $3, $4, $5)",
            vec![
                Value::Int(Some(o.id)),
                Value::Int(Some(o.time_ms)),
                Value::text(&o.kind),
                Value::text(&o.body),
                Value::text(&o.outcome),
            ],
        )])
    }

    fn hosts(&mut self) -> Result<Vec<HostRow>, StoreError> {
        let rows = self.db.query(
            "SELECT name, state, reachable, host_type, migration_address, last_report_ms FROM hosts ORDER BY name",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let r = Row(r, "hosts");
                Ok(HostRow {
                    name: HostName(r.text(0)?),
                    state: parse_state(&r.text(1)?)?,
                    reachable: r.int(2)? != 0,
                    host_type: r.text(3)?,
                    migration_address: r.text(4)?,
                    last_report_ms: r.int(5)?,
                })
            })
            .collect()
    }

    fn vms(&mut self) -> Result<Vec<VmRow>, StoreError> {
        let rows = self.db.query(
            "SELECT name, host, spec, status, demand, updated_ms FROM vms ORDER BY name",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let r = Row(r, "vms");
                Ok(VmRow {
                    name: VmName(r.text(0)?),
                    host: r.opt_text(1)?.map(HostName),
                    spec: r.text(2)?,
                    status: r.text(3)?,
                    demand: r.real(4)?,
                    updated_ms: r.int(5)?,
                })
            })
            .collect()
    }

    fn migrations(&mut self, open_only: bool) -> Result<Vec<MigrationRow>, StoreError> {
        let sql = if open_only {
            format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE state NOT IN ('done', 'failed') ORDER BY id DESC")
        } else {
            format!("SELECT {MIGRATION_COLUMNS} FROM migrations ORDER BY id DESC")
        };
        let rows = self.db.query(&sql, &[])?;
        rows.iter().map(|r| migration_from(r)).collect()
    }

    fn migration(&mut self, id: MigrationId) -> Result<Option<MigrationRow>, StoreError> {
        let sql = format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = $1");
        let rows = self.db.query(&sql, &[Value::Int(Some(id.0 as i64))])?;
        rows.first().map(|r| migration_from(r)).transpose()
    }

    fn decisions(&mut self, limit: i64) -> Result<Vec<DecisionRow>, StoreError> {
        let rows = self.db.query(
            "SELECT id, time_ms, policy, decision_us, hosts, vms, unreachable, overloaded, \
             migrations_ordered, summary FROM decisions ORDER BY id DESC LIMIT $1",
            &[Value::Int(Some(limit))],
        )?;
        rows.iter()
            .map(|r| {
                let r = Row(r, "decisions");
                Ok(DecisionRow {
                    id: r.int(0)?,
                    time_ms: r.int(1)?,
                    policy: r.text(2)?,
                    decision_us: r.int(3)?,
                    hosts: r.int(4)?,
                    vms: r.int(5)?,
                    unreachable: r.int(6)?,
                    overloaded: r.int(7)?,
                    migrations_ordered: r.int(8)?,
                    summary: r.text(9)?,
                })
            })
            .collect()
    }

    fn host_histories(&mut self, n: i64) -> Result<HashMap<HostName, Vec<f64>>, StoreError> {
        let rows = self.db.query(
            "SELECT host, interval_no, utilization FROM host_samples WHERE interval_no > \
             (SELECT COALESCE(MAX(interval_no), 0) FROM host_samples) - $1 ORDER BY host, interval_no DESC",
            &[Value::Int(Some(n))],
        )?;
        Ok(histories(rows, n)?
            .into_iter()
            .map(|(k, v)| (HostName(k), v))
            .collect())
    }

    fn vm_histories(&mut self, n: i64) -> Result<HashMap<VmName, Vec<f64>>, StoreError> {
        let rows = self.db.query(
            "SELECT vm, interval_no, demand FROM vm_samples WHERE interval_no > \
             (SELECT COALESCE(MAX(interval_no), 0) FROM vm_samples) - $1 ORDER BY vm, interval_no DESC",
            &[Value::Int(Some(n))],
        )?;
        Ok(histories(rows, n)?
            .into_iter()
            .map(|(k, v)| (VmName(k), v))
            .collect())
    }

    fn prune_samples(&mut self, interval_no: i64) -> Result<(), StoreError> {
        let p = vec![Value::Int(Some(interval_no))];
        self.db.batch(&[
            ("DELETE FROM host_samples WHERE interval_no < $1", p.clone()),
            ("DELETE FROM vm_samples WHERE interval_no < $1", p),
        ])
    }

    fn max_ids(&mut self) -> Result<(i64, u64, i64), StoreError> {
        let rows = self.db.query(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM decisions), \
             (SELECT COALESCE(MAX(id), 0) FROM migrations), (SELECT COALESCE(MAX(id), 0) FROM orders)",
            &[],
        )?;
        let r = rows.first().ok_or_else(|| corrupt("max ids", "no row"))?;
        let r = Row(r, "max ids");
        Ok((r.int(0)?, r.int(1)? as u64, r.int(2)?))
    }

    fn schema_version(&mut self) -> Result<i64, StoreError> {
        let rows = self
            .db
            .query("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?;
        let r = rows
            .first()
            .ok_or_else(|| corrupt("schema_version", "no row"))?;
        Row(r, "schema_version").int(0)
    }
}

#[cfg(test)]
pub(crate) mod tests;
