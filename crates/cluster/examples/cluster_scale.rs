//! Scale of the controller: decision time per interval against the number of hosts and VMs,
//! and the SQLite database's growth per day of operation. Agents are [`FakeCluster`]
//! doubles; VM demand replays a PlanetLab day (one 5-minute sample per interval).
//!
//! ```text
//! bench/cluster-scale.sh            # builds with opt-level 3 and runs 100, 1,000, 10,000 hosts
//! cluster_scale --hosts 100,1000 --intervals 20 --trace DIR --db-dir DIR
//! cluster_scale --hosts 100,1000 --postgres postgres://fastmig:fastmig@127.0.0.1/fastmig_test
//! ```
//!
//! Per size: hosts alternate G4/G5, three VMs per host (CloudSim's VM types, chosen so each
//! host's RAM holds them), VM j replays trace file j mod files. Each interval: the fake VMs'
//! demand moves to the next sample, the controller ticks (reports gathered on 16 threads,
//! policy round, orders, one store transaction), then every migration ordered completes.
//! Printed: the policy round's time (`decision`, what `decisions.decision_us` records) over
//! the intervals where LR has its 10 samples of history, the whole tick, and the database
//! bytes one interval adds (measured between two closed states of the file, the second after
//! a restart from it), times 8,640 intervals of 10 s per day.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fastmig_cluster::controller::{Controller, ControllerConfig};
use fastmig_cluster::fake_agent::{test_vm, FakeCluster};
use fastmig_cluster::proto::HostName;
use fastmig_cluster::store::{PgBackend, SqlStore};
use fastmig_cluster::AgentApi;
use fastmig_sim::setup::{reference_host_types, reference_vm_types};

struct Args {
    hosts: Vec<usize>,
    intervals: usize,
    trace: PathBuf,
    db_dir: PathBuf,
    /// A PostgreSQL URL: the database is PostgreSQL (a schema per size) instead of SQLite.
    postgres: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        hosts: vec![100, 1000, 10_000],
        intervals: 16,
        trace: PathBuf::from("../shared/data/planetlab/20110303"),
        db_dir: std::env::temp_dir(),
        postgres: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hosts" => {
                a.hosts = v
                    .split(',')
                    .map(|x| x.parse().map_err(|e| format!("--hosts {x}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--intervals" => a.intervals = v.parse().map_err(|e| format!("--intervals: {e}"))?,
            "--trace" => a.trace = v.into(),
            "--db-dir" => a.db_dir = v.into(),
            "--postgres" => a.postgres = Some(v),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.intervals < 12 {
        return Err("--intervals must be at least 12 (LR needs 10 samples)".into());
    }
    Ok(a)
}

fn file_size(p: &std::path::Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", p.display())).ok())
        .map(|m| m.len())
        .sum()
}

/// Where the bench's database is.
enum Db {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Db {
    fn open(&self) -> Box<dyn fastmig_cluster::store::Store> {
        match self {
            Db::Sqlite(p) => {
                fastmig_cluster::store::open(&format!("sqlite:{}", p.display())).expect("store")
            }
            Db::Postgres { url, schema } => Box::new(
                SqlStore::new(PgBackend::connect(url, Some(schema)).expect("connect"))
                    .expect("schema"),
            ),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Db::Sqlite(p) => file_size(p),
            Db::Postgres { url, schema } => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                let row = c
                    .query_one(
                        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND c.relkind = 'r'",
                        &[schema],
                    )
                    .expect("size");
                row.get::<_, i64>(0) as u64
            }
        }
    }

    fn remove(&self) {
        match self {
            Db::Sqlite(p) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
                }
            }
            Db::Postgres { url, schema } => {
                let _ = PgBackend::drop_schema(url, schema);
            }
        }
    }
}

fn controller(fake: &Arc<FakeCluster>, db: &Db) -> Controller {
    let agents = fake
        .agents()
        .into_iter()
        .map(|a| Arc::new(a) as Arc<dyn AgentApi>)
        .collect();
    let store = db.open();
    Controller::new(ControllerConfig::new("lr-mmt"), agents, store).expect("controller")
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster_scale: {e}");
            std::process::exit(2);
        }
    };
    let trace = fastmig_sim::Trace::load(&a.trace).unwrap_or_else(|e| {
        eprintln!("cluster_scale: trace {}: {e}", a.trace.display());
        std::process::exit(2);
    });
    println!(
        "hosts,vms,lr_intervals,decision_ms_mean,decision_ms_max,tick_ms_mean,migrations,db_bytes_per_interval,db_mb_per_day_at_10s"
    );
    for &n in &a.hosts {
        let types = reference_host_types();
        let fake = FakeCluster::new(
            (0..n)
                .map(|i| (HostName(format!("h{i:05}")), types[i % 2].clone()))
                .collect(),
        );
        let vm_types = reference_vm_types();
        let mut rows = Vec::new();
        for i in 0..n {
            // 870 + 613 MB and one of the four types: at most 3,223 MB of 4,096.
            for (k, ty) in [0, 3, i % 4].into_iter().enumerate() {
                let j = 3 * i + k;
                let t = &vm_types[ty];
                let name = format!("v{j:06}");
                let spec = test_vm(&name, u64::from(t.ram_mb), t.mips, 0.0);
                fake.start(&HostName(format!("h{i:05}")), &spec);
                rows.push((name, j % trace.len()));
            }
        }
        let index: std::collections::HashMap<String, usize> = rows.into_iter().collect();
        let db = match &a.postgres {
            Some(url) => Db::Postgres {
                url: url.clone(),
                schema: format!("cluster_scale_{n}"),
            },
            None => Db::Sqlite(a.db_dir.join(format!("cluster-scale-{n}.db"))),
        };
        db.remove();
        let split = a.intervals / 2;
        let mut decision = Vec::new();
        let mut tick = Vec::new();
        let mut migrations = 0;
        let mut ctl = controller(&fake, &db);
        let mut size_at_split = 0;
        for t in 0..a.intervals {
            if t == split {
                drop(ctl);
                size_at_split = db.size();
                ctl = controller(&fake, &db);
            }
            let sample = t % trace.sample_count().max(1);
            fake.update_demands(|vm| {
                index
                    .get(&vm.0)
                    .map_or(0.0, |&row| trace.samples[row][sample])
            });
            let t0 = Instant::now();
            let d = ctl.tick().expect("tick");
            tick.push(t0.elapsed().as_secs_f64() * 1e3);
            migrations += d.ordered.len();
            // LR falls back to THR 0.7 until a host has 10 samples.
            if t >= 10 {
                decision.push(d.decision_us as f64 / 1e3);
            }
            fake.step();
        }
        drop(ctl);
        let per_interval =
            (db.size().saturating_sub(size_at_split)) as f64 / (a.intervals - split) as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let max = decision.iter().copied().fold(0.0, f64::max);
        println!(
            "{n},{},{},{:.2},{:.2},{:.1},{migrations},{:.0},{:.0}",
            3 * n,
            decision.len(),
            mean(&decision),
            max,
            mean(&tick),
            per_interval,
            per_interval * 8640.0 / 1e6
        );
        db.remove();
    }
}
