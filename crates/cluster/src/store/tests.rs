//! One test suite, run against SQLite and against a real PostgreSQL server.
//!
//! PostgreSQL tests read `FASTMIG_TEST_POSTGRES_URL` (default
//! `postgres://fastmig:fastmig@127.0.0.1/fastmig_test`, which `.ci/run` creates) and fail
//! loudly when the server is unreachable: they need it, and CI provides it. Each test works in
//! its own schema, so tests run in parallel.

use super::*;

pub(crate) fn pg_url() -> String {
    std::env::var("FASTMIG_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://fastmig:fastmig@127.0.0.1/fastmig_test".into())
}

/// A store for one test: SQLite in a temp dir, or a fresh PostgreSQL schema.
pub(crate) enum TestDb {
    Sqlite(tempfile::TempDir),
    Pg(String),
}

impl TestDb {
    pub(crate) fn sqlite() -> Self {
        TestDb::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    pub(crate) fn pg(name: &str) -> Self {
        let schema = format!("t_{name}_{}", std::process::id());
        PgBackend::drop_schema(&pg_url(), &schema).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL test server unreachable at {} ({e}): start it (.ci/run does) or set \
                 FASTMIG_TEST_POSTGRES_URL",
                pg_url()
            )
        });
        TestDb::Pg(schema)
    }

    pub(crate) fn open(&self) -> Box<dyn Store> {
        match self {
            TestDb::Sqlite(dir) => {
                let url = format!("sqlite:{}", dir.path().join("c.db").display());
                open(&url).expect("open sqlite")
            }
            TestDb::Pg(schema) => Box::new(
                SqlStore::new(PgBackend::connect(&pg_url(), Some(schema)).expect("connect"))
                    .expect("migrate"),
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Pg(schema) = self {
            let _ = PgBackend::drop_schema(&pg_url(), schema);
        }
    }
}

fn host(name: &str, state: HostState) -> HostRow {
    HostRow {
        name: HostName(name.into()),
        state,
        reachable: true,
        host_type: "{\"name\":\"G4\"}".into(),
        migration_address: "10.0.0.1:7000".into(),
        last_report_ms: 1000,
    }
}

fn migration(id: u64, state: MigrationState) -> MigrationRow {
    MigrationRow {
        id: MigrationId(id),
        vm: VmName("vm1".into()),
        source: HostName("a".into()),
        destination: HostName("b".into()),
        transport: "{\"kind\":\"classic\"}".into(),
        state,
        origin: Origin::Policy,
        decision: Some(3),
        predicted_s: Some(13.92),
        predicted_downtime_s: None,
        measured_s: None,
        measured_downtime_s: None,
        summary: None,
        error: None,
        started_ms: 5000,
        ended_ms: None,
    }
}

fn schema_is_versioned(db: TestDb) {
    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.last().unwrap().0);
    drop(s);
    // Opening again applies nothing twice (a second CREATE TABLE would fail).
    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), 2);
    assert_eq!(s.max_ids().unwrap(), (0, 0, 0));
}

fn hosts_and_vms_round_trip(db: TestDb) {
    let mut s = db.open();
    s.put_host(&host("b", HostState::Standby)).unwrap();
    let mut a = host("a", HostState::Active);
    s.put_host(&a).unwrap();
    a.reachable = false;
    a.last_report_ms = 2000;
    s.put_host(&a).unwrap();
    let hosts = s.hosts().unwrap();
    assert_eq!(hosts, vec![a, host("b", HostState::Standby)]);

    let vm = VmRow {
        name: VmName("vm1".into()),
        host: None,
        spec: "{}".into(),
        status: "running".into(),
        demand: 0.25,
        updated_ms: 7,
    };
    s.put_vm(&vm).unwrap();
    let moved = VmRow {
        host: Some(HostName("b".into())),
        demand: 1.0,
        ..vm
    };
    s.put_vm(&moved).unwrap();
    // 1.0 is a whole number: it must come back as a float on both backends.
    assert_eq!(s.vms().unwrap(), vec![moved]);
}

fn migrations_update_in_place(db: TestDb) {
    let mut s = db.open();
    s.put_migration(&migration(1, MigrationState::Running))
        .unwrap();
    s.put_migration(&migration(2, MigrationState::Ordered))
        .unwrap();
    let mut done = migration(1, MigrationState::Done);
    done.measured_s = Some(2.5);
    done.measured_downtime_s = Some(0.012);
    done.summary = Some("{\"total_ms\":2500}".into());
    done.ended_ms = Some(9000);
    s.put_migration(&done).unwrap();
    let all = s.migrations(false).unwrap();
    assert_eq!(all.len(), 2, "an update replaces, never duplicates");
    assert_eq!(all[1], done);
    let open = s.migrations(true).unwrap();
    assert_eq!(open, vec![migration(2, MigrationState::Ordered)]);
    assert_eq!(s.migration(MigrationId(1)).unwrap(), Some(done));
    assert_eq!(s.migration(MigrationId(9)).unwrap(), None);
    assert_eq!(s.max_ids().unwrap().1, 2);
}

fn intervals_and_histories(db: TestDb) {
    let mut s = db.open();
    for i in 1..=5 {
        let w = IntervalWrite {
            hosts: vec![host("a", HostState::Active)],
            vms: vec![],
            host_samples: vec![HostSample {
                host: HostName("a".into()),
                interval_no: i,
                time_ms: i * 10,
                utilization: i as f64 / 10.0,
                vm_count: 1,
            }],
            vm_samples: vec![VmSample {
                vm: VmName("vm1".into()),
                interval_no: i,
                host: HostName("a".into()),
                demand: i as f64 / 20.0,
                dirty_rate_pps: 100.0,
            }],
            decision: Some(DecisionRow {
                id: i,
                time_ms: i * 10,
                policy: "lr-mmt".into(),
                decision_us: 40 + i,
                hosts: 1,
                vms: 1,
                unreachable: 0,
                overloaded: 0,
                migrations_ordered: 0,
                summary: "{}".into(),
            }),
        };
        s.write_interval(&w).unwrap();
    }
    // Most recent first, at most n.
    let h = s.host_histories(3).unwrap();
    assert_eq!(h[&HostName("a".into())], vec![0.5, 0.4, 0.3]);
    let v = s.vm_histories(30).unwrap();
    assert_eq!(v[&VmName("vm1".into())], vec![0.25, 0.2, 0.15, 0.1, 0.05]);
    let d = s.decisions(2).unwrap();
    assert_eq!(d.iter().map(|d| d.id).collect::<Vec<_>>(), vec![5, 4]);
    assert_eq!(d[0].decision_us, 45);
    assert_eq!(s.max_ids().unwrap().0, 5);
    // Pruning keeps intervals 4 and 5 only.
    s.prune_samples(4).unwrap();
    assert_eq!(
        s.host_histories(30).unwrap()[&HostName("a".into())],
        vec![0.5, 0.4]
    );
    assert_eq!(
        s.vm_histories(30).unwrap()[&VmName("vm1".into())],
        vec![0.25, 0.2]
    );
    assert_eq!(s.decisions(10).unwrap().len(), 5, "decisions are kept");
}

fn orders_are_kept(db: TestDb) {
    let mut s = db.open();
    let o = OrderRow {
        id: 1,
        time_ms: 3,
        kind: "migrate".into(),
        body: "{\"vm\":\"x\"}".into(),
        outcome: "refused: unknown VM x".into(),
    };
    s.put_order(&o).unwrap();
    assert!(s.put_order(&o).is_err(), "order ids are unique");
    assert_eq!(s.max_ids().unwrap().2, 1);
}

fn many_rows_in_one_interval(db: TestDb) {
    // 1,001 hosts and VMs: three multi-row statements each (400 + 400 + 201 rows).
    let mut s = db.open();
    let n = 1001;
    let mut w = IntervalWrite::default();
    for i in 0..n {
        let name = format!("h{i:04}");
        w.hosts.push(host(&name, HostState::Active));
        w.host_samples.push(HostSample {
            host: HostName(name.clone()),
            interval_no: 1,
            time_ms: 1,
            utilization: i as f64 / 1000.0,
            vm_count: 1,
        });
        w.vms.push(VmRow {
            name: VmName(format!("v{i:04}")),
            host: Some(HostName(name.clone())),
            spec: "{}".into(),
            status: "running".into(),
            demand: 0.5,
            updated_ms: 1,
        });
        w.vm_samples.push(VmSample {
            vm: VmName(format!("v{i:04}")),
            interval_no: 1,
            host: HostName(name),
            demand: i as f64 / 2000.0,
            dirty_rate_pps: 0.0,
        });
    }
    s.write_interval(&w).unwrap();
    // Written again (a retried interval): upserts replace, samples are not doubled.
    s.write_interval(&w).unwrap();
    assert_eq!(s.hosts().unwrap().len(), n);
    assert_eq!(s.vms().unwrap().len(), n);
    let h = s.host_histories(30).unwrap();
    assert_eq!(h.len(), n);
    assert_eq!(h[&HostName("h1000".into())], vec![1.0]);
    assert_eq!(
        s.vm_histories(30).unwrap()[&VmName("v0400".into())],
        vec![0.2]
    );
}

macro_rules! both_backends {
    ($($name:ident),*) => {
        mod sqlite_backend {
            $(#[test] fn $name() { super::$name(super::TestDb::sqlite()) })*
        }
        mod postgres_backend {
            $(#[test] fn $name() { super::$name(super::TestDb::pg(stringify!($name))) })*
        }
    };
}

both_backends!(
    schema_is_versioned,
    hosts_and_vms_round_trip,
    migrations_update_in_place,
    intervals_and_histories,
    orders_are_kept,
    many_rows_in_one_interval
);

#[test]
fn a_version_1_database_is_brought_to_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    // A database made by a build that knew only version 1.
    let mut b = SqliteBackend::open(path.to_str().unwrap()).unwrap();
    b.batch(&[(
        "CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        vec![],
    )])
    .unwrap();
    b.apply_script(MIGRATIONS[0].1, 1, 0).unwrap();
    b.batch(&[(
        "INSERT INTO host_samples VALUES ('a', 1, 0, 0.5, 1)",
        vec![],
    )])
    .unwrap();
    drop(b);
    let mut s = open(&format!("sqlite:{}", path.display())).unwrap();
    assert_eq!(s.schema_version().unwrap(), 2);
    assert_eq!(
        s.host_histories(30).unwrap()[&HostName("a".into())],
        vec![0.5]
    );
}

#[test]
fn bad_urls_are_refused() {
    assert!(matches!(open("mysql://x"), Err(StoreError::BadUrl(_))));
    assert!(matches!(open("sqlite:"), Err(StoreError::BadUrl(_))));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let url = format!("sqlite:{}", path.display());
    drop(open(&url).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO schema_version VALUES (99, 0)", [])
        .unwrap();
    drop(conn);
    assert!(matches!(
        open(&url),
        Err(StoreError::TooNew {
            found: 99,
            known: 2
        })
    ));
}
