//! The controller against fake agents: what it orders, how migrations end, restarts.

use super::*;
use crate::fake_agent::{test_vm, FakeCluster};
use crate::proto::PrepareIncoming;
use crate::store::tests::TestDb;
use crate::store::Origin;
use fastmig_sim::setup::reference_host_types;

fn h(n: &str) -> HostName {
    HostName(n.into())
}
fn v(n: &str) -> VmName {
    VmName(n.into())
}

/// Hosts a, b, c, d (G4): a over-utilised (v1 1000 + v2 2000 MIPS of 3720), b light (v3),
/// c and d empty. PABFD sends v1 to c: from idle (86 W) to 1000 / 3720 costs 6.9 W, less
/// than b's 250 -> 1250 MIPS (7.1 W); ties go to the first host, so d stays empty.
fn cluster() -> Arc<FakeCluster> {
    let g4 = reference_host_types()[0].clone();
    let c = FakeCluster::new(
        ["a", "b", "c", "d"]
            .into_iter()
            .map(|n| (h(n), g4.clone()))
            .collect(),
    );
    c.start(&h("a"), &test_vm("v1", 870, 1000.0, 1.0));
    c.start(&h("a"), &test_vm("v2", 1740, 2000.0, 1.0));
    c.start(&h("b"), &test_vm("v3", 613, 500.0, 0.5));
    c
}

fn controller(c: &Arc<FakeCluster>, db: &TestDb, k: usize) -> Controller {
    let mut cfg = ControllerConfig::new("thr-mmt");
    cfg.max_in_flight = k;
    controller_with(c, db, cfg)
}

/// A controller of `c`'s agents with `cfg`, recording in `db`.
fn controller_with(c: &Arc<FakeCluster>, db: &TestDb, cfg: ControllerConfig) -> Controller {
    let agents = c
        .agents()
        .into_iter()
        .map(|a| Arc::new(a) as Arc<dyn AgentApi>)
        .collect();
    Controller::new(cfg, agents, db.open()).expect("controller")
}

fn exactly_one_host(c: &FakeCluster) {
    for vm in c.vm_names() {
        assert_eq!(
            c.running_on(&vm).len(),
            1,
            "{vm} runs on {:?}",
            c.placements(&vm)
        );
    }
}

#[test]
fn overload_is_relieved_by_a_migration_followed_to_its_end() {
    let c = cluster();
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    let d = ctl.tick().unwrap();
    assert_eq!(d.plan.overloaded, vec![h("a")]);
    assert_eq!(d.ordered.len(), 1);
    let (id, mv) = &d.ordered[0];
    assert_eq!((&mv.vm, &mv.destination), (&v("v1"), &h("c")));
    // d is empty: standby. Every host was asked once.
    assert_eq!(c.state(&h("d")), HostState::Standby);
    assert_eq!(c.state(&h("c")), HostState::Active);
    assert_eq!(c.reports_served(&h("a")), 1);
    let row = ctl.store().migration(*id).unwrap().unwrap();
    assert_eq!(row.state, MigrationState::Running);
    // CloudSim's formula: 870 MB / (1,000,000 / 16,000 MB/s) = 13.92 s.
    assert!((row.predicted_s.unwrap() - 13.92).abs() < 1e-9);
    assert_eq!(row.predicted_downtime_s, None);

    assert_eq!(c.step(), 1);
    let d = ctl.tick().unwrap();
    assert_eq!(d.ended, vec![(*id, MigrationState::Done)]);
    let row = ctl.store().migration(*id).unwrap().unwrap();
    assert_eq!(row.state, MigrationState::Done);
    assert_eq!(row.measured_s, Some(1.5));
    assert!(row.summary.is_some());
    assert_eq!(c.running_on(&v("v1")), vec![h("c")]);
    assert_eq!(ctl.vms()[&v("v1")].host, h("c"));
    exactly_one_host(&c);
    // Every interval is recorded with its decision time.
    let ds = ctl.store().decisions(10).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[1].migrations_ordered, 1);
    let stored: Decision = serde_json::from_str(&ds[1].summary).unwrap();
    assert_eq!(stored.ordered.len(), 1);
}

#[test]
fn a_failed_migration_leaves_the_vm_on_its_source() {
    let c = cluster();
    c.fail_next_outgoing(&h("a"), "destination vanished");
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    let id = ctl.tick().unwrap().ordered[0].0;
    c.step();
    assert_eq!(c.running_on(&v("v1")), vec![h("a")]);
    assert_eq!(
        c.placements(&v("v1")).len(),
        1,
        "no incoming copy left behind"
    );
    let d = ctl.tick().unwrap();
    assert!(d.ended.contains(&(id, MigrationState::Failed)));
    let row = ctl.store().migration(id).unwrap().unwrap();
    assert_eq!(row.error.as_deref(), Some("destination vanished"));
    // a is still over-utilised: the same round orders a new migration under a new id.
    assert_eq!(d.ordered.len(), 1);
    assert!(d.ordered[0].0 > id);
}

#[test]
fn an_unreachable_agent_is_recorded_and_its_vms_stay() {
    let c = cluster();
    c.set_reachable(&h("a"), false);
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    let d = ctl.tick().unwrap();
    assert_eq!(d.unreachable, vec![h("a")]);
    assert!(d.ordered.is_empty(), "{:?}", d.ordered);
    assert_eq!(ctl.store().decisions(1).unwrap()[0].unreachable, 1);
    // Back: its VMs are seen and the overload relieved; the store marks it reachable again.
    c.set_reachable(&h("a"), true);
    let d = ctl.tick().unwrap();
    assert_eq!(d.ordered.len(), 1);
    let hosts = ctl.store().hosts().unwrap();
    assert!(hosts.iter().all(|r| r.reachable));
}

#[test]
fn at_most_k_migrations_per_host_are_in_flight() {
    // a and d both over-utilised, b the only destination: with K = 1 one waits.
    let g4 = reference_host_types()[0].clone();
    let c = FakeCluster::new(vec![
        (h("a"), g4.clone()),
        (h("b"), g4.clone()),
        (h("d"), g4),
    ]);
    for host in ["a", "d"] {
        c.start(&h(host), &test_vm(&format!("{host}1"), 870, 1000.0, 1.0));
        c.start(&h(host), &test_vm(&format!("{host}2"), 1740, 2000.0, 1.0));
    }
    c.start(&h("b"), &test_vm("b1", 613, 500.0, 0.1));
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    let d = ctl.tick().unwrap();
    assert_eq!(d.plan.overloaded.len(), 2);
    assert_eq!(d.ordered.len(), 1, "{d:?}");
    assert_eq!(ctl.open_migrations().len(), 1);
    // Nothing more while it runs; the next one once it ended.
    let d = ctl.tick().unwrap();
    assert!(d.ordered.is_empty());
    c.step();
    let d = ctl.tick().unwrap();
    assert_eq!(d.ended.len(), 1);
    exactly_one_host(&c);
}

#[test]
fn standby_hosts_are_woken_when_capacity_runs_short() {
    let g4 = reference_host_types()[0].clone();
    let c = FakeCluster::new(vec![(h("a"), g4.clone()), (h("s"), g4)]);
    c.start(&h("a"), &test_vm("v1", 870, 1000.0, 0.2));
    c.start(&h("a"), &test_vm("v2", 1740, 2000.0, 1.0));
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    ctl.tick().unwrap();
    assert_eq!(c.state(&h("s")), HostState::Standby);
    // The load grows: a is over-utilised, s is woken, and the next round uses it.
    c.set_demand(&v("v1"), 1.0);
    let d = ctl.tick().unwrap();
    assert_eq!(d.plan.wake, Some(h("s")));
    assert_eq!(c.state(&h("s")), HostState::Active);
    let d = ctl.tick().unwrap();
    assert_eq!(d.ordered.len(), 1);
    assert_eq!(d.ordered[0].1.destination, h("s"));
}

#[test]
fn a_restarted_controller_ends_the_migration_it_left_in_flight() {
    restart_ends_the_migration_left_in_flight(TestDb::sqlite());
}

#[test]
fn a_restarted_controller_on_postgres_ends_the_migration_it_left_in_flight() {
    restart_ends_the_migration_left_in_flight(TestDb::pg("ctl_restart"));
}

fn restart_ends_the_migration_left_in_flight(db: TestDb) {
    let c = cluster();
    let mut ctl = controller(&c, &db, 1);
    let id = ctl.tick().unwrap().ordered[0].0;
    drop(ctl);
    c.step();
    let mut ctl = controller(&c, &db, 1);
    assert_eq!(ctl.open_migrations().len(), 1, "loaded from the store");
    let d = ctl.tick().unwrap();
    assert_eq!(d.ended, vec![(id, MigrationState::Done)]);
    let all = ctl.store().migrations(false).unwrap();
    let rows: Vec<_> = all.iter().filter(|m| m.id == id).collect();
    assert_eq!(rows.len(), 1, "never both, never a second row");
    assert_eq!(rows[0].state, MigrationState::Done);
    // Ids carry on.
    assert!(ctl.interval_no() == 2);
    exactly_one_host(&c);
}

#[test]
fn a_controller_killed_between_prepare_and_start_fails_the_migration_on_restart() {
    let c = cluster();
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    ctl.tick().unwrap();
    c.step();
    ctl.tick().unwrap();
    drop(ctl);
    // What a controller that died after recording the order and preparing the destination
    // leaves: an `ordered` row, a prepared incoming VM on c's peer, nothing on the source.
    let agents = c.agents();
    let b = agents.iter().find(|a| a.host() == &h("b")).unwrap();
    let row = MigrationRow {
        id: MigrationId(50),
        vm: v("v2"),
        source: h("a"),
        destination: h("b"),
        transport: "{\"kind\":\"classic\"}".into(),
        state: MigrationState::Ordered,
        origin: Origin::Operator,
        decision: None,
        predicted_s: None,
        predicted_downtime_s: None,
        measured_s: None,
        measured_downtime_s: None,
        summary: None,
        error: None,
        started_ms: 1,
        ended_ms: None,
    };
    db.open().put_migration(&row).unwrap();
    b.prepare_incoming(&PrepareIncoming {
        migration: MigrationId(50),
        vm: test_vm("v2", 1740, 2000.0, 1.0),
        transport: TransportKind::Classic,
        source: h("a"),
    })
    .unwrap();
    assert_eq!(c.placements(&v("v2")).len(), 2);
    let mut ctl = controller(&c, &db, 1);
    let d = ctl.tick().unwrap();
    assert!(
        d.ended.contains(&(MigrationId(50), MigrationState::Failed)),
        "{d:?}"
    );
    assert_eq!(c.running_on(&v("v2")), vec![h("a")]);
    assert_eq!(
        c.placements(&v("v2")).len(),
        1,
        "the prepared copy was cancelled"
    );
    let row = ctl.store().migration(MigrationId(50)).unwrap().unwrap();
    assert_eq!(row.state, MigrationState::Failed);
    // New ids never reuse 50.
    assert!(ctl.next_migration > 50);
}

#[test]
fn an_agent_that_forgot_a_completed_migration_is_reconciled_from_where_the_vm_runs() {
    let c = cluster();
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    let id = ctl.tick().unwrap().ordered[0].0;
    c.step();
    c.forget_migrations(&h("a"));
    c.forget_migrations(&h("b"));
    let d = ctl.tick().unwrap();
    assert_eq!(d.ended, vec![(id, MigrationState::Done)]);
}

#[test]
fn histories_survive_a_restart() {
    let c = cluster();
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    for _ in 0..3 {
        ctl.tick().unwrap();
        c.step();
    }
    let before = ctl.host_hist.clone();
    drop(ctl);
    let ctl = controller(&c, &db, 1);
    assert_eq!(ctl.host_hist, before);
    assert_eq!(ctl.host_hist[&h("b")].len(), 3);
    assert_eq!(
        ctl.vm_hist[&v("v3")].iter().copied().collect::<Vec<_>>(),
        vec![0.5; 3]
    );
}

#[test]
fn the_fitted_model_predicts_time_and_downtime() {
    use fastmig_sim::model_cost::cloudsim_equivalent_model;
    let c = cluster();
    let db = TestDb::sqlite();
    let mut cfg = ControllerConfig::new("thr-mmt");
    let t = fastmig_model::Transport::Classic;
    cfg.cost = CostModel::Model(Box::new(
        ModelCost::new(cloudsim_equivalent_model(t), t, fastmig_sim::Link::Host).unwrap(),
    ));
    let mut ctl = controller_with(&c, &db, cfg);
    let id = ctl.tick().unwrap().ordered[0].0;
    let row = ctl.store().migration(id).unwrap().unwrap();
    // The reduced model is CloudSim's formula, and it predicts a downtime.
    assert!((row.predicted_s.unwrap() - 13.92).abs() < 1e-9);
    assert!(row.predicted_downtime_s.is_some());
}

#[test]
fn policies_that_never_migrate_are_refused() {
    let c = cluster();
    let db = TestDb::sqlite();
    let agents: Vec<Arc<dyn AgentApi>> = c
        .agents()
        .into_iter()
        .map(|a| Arc::new(a) as Arc<dyn AgentApi>)
        .collect();
    for p in ["npa", "dvfs", "nonsense"] {
        let r = Controller::new(ControllerConfig::new(p), agents.clone(), db.open());
        assert!(matches!(r, Err(ControllerError::Config(_))), "{p}");
    }
}

#[test]
fn samples_older_than_the_kept_intervals_are_pruned() {
    let c = cluster();
    let db = TestDb::sqlite();
    let mut cfg = ControllerConfig::new("thr-mmt");
    assert!(matches!(
        Controller::new(
            ControllerConfig {
                keep_intervals: Some(29),
                ..ControllerConfig::new("thr-mmt")
            },
            vec![],
            db.open()
        ),
        Err(ControllerError::Config(_))
    ));
    cfg.keep_intervals = Some(30);
    let mut ctl = controller_with(&c, &db, cfg);
    for _ in 0..35 {
        ctl.tick().unwrap();
        c.step();
    }
    // Intervals 6..=35 remain: 30 samples, newest first.
    let hist = ctl.store().host_histories(1000).unwrap();
    assert_eq!(hist[&h("b")].len(), 30);
    assert_eq!(ctl.store().decisions(1000).unwrap().len(), 35);
}

#[test]
fn a_new_vm_wakes_a_standby_host_when_no_active_host_has_room() {
    let g4 = reference_host_types()[0].clone();
    let c = FakeCluster::new(vec![(h("a"), g4.clone()), (h("b"), g4)]);
    let db = TestDb::sqlite();
    let mut ctl = controller(&c, &db, 1);
    ctl.tick().unwrap();
    assert_eq!(c.state(&h("a")), HostState::Standby);
    assert_eq!(
        ctl.hosts()[0].utilization.to_bits(),
        0.0f64.to_bits(),
        "+0, not -0"
    );
    let (host, _) = ctl.place_vm(&test_vm("n1", 64, 500.0, 0.2), None).unwrap();
    assert_eq!(host, h("a"));
    assert_eq!(c.state(&h("a")), HostState::Active);
    assert_eq!(c.running_on(&v("n1")), vec![h("a")]);
    // A VM no host type can hold wakes nothing.
    let r = ctl.place_vm(&test_vm("big", 64, 2500.0, 1.0), None);
    assert!(matches!(r, Err(OrderError::NoRoom(..))), "{r:?}");
    assert_eq!(c.state(&h("b")), HostState::Standby);
}

#[test]
fn without_consolidation_rounds_record_but_never_migrate_or_park_hosts() {
    // The cluster where thr-mmt orders v1 a -> c and parks d (see the first test).
    let c = cluster();
    let db = TestDb::sqlite();
    let mut cfg = ControllerConfig::new("thr-mmt");
    cfg.consolidate = false;
    let mut ctl = controller_with(&c, &db, cfg);
    for _ in 0..3 {
        let d = ctl.tick().unwrap();
        assert!(d.ordered.is_empty() && d.plan.moves.is_empty(), "{d:?}");
        c.step();
    }
    for host in ["a", "b", "c", "d"] {
        assert_eq!(c.state(&h(host)), HostState::Active, "{host}");
        assert!(c.outgoing(&h(host)).is_empty(), "{host}");
    }
    assert_eq!(c.running_on(&v("v1")), vec![h("a")]);
    // Every round was still recorded, with the hosts' samples.
    assert_eq!(ctl.store().decisions(10).unwrap().len(), 3);
    assert!(ctl.store().migrations(false).unwrap().is_empty());
}

#[test]
fn ordered_migrations_carry_the_configured_bandwidth_cap_and_downtime_limit() {
    let default = fastmig_host::MigrationRequest::default();
    for (cap, limit) in [
        (None, None),
        (Some(32 << 20), Some(Duration::from_millis(300))),
    ] {
        let c = cluster();
        let db = TestDb::sqlite();
        let mut cfg = ControllerConfig::new("thr-mmt");
        cfg.migration_bandwidth = cap;
        cfg.migration_downtime_limit = limit;
        let mut ctl = controller_with(&c, &db, cfg);
        assert_eq!(ctl.tick().unwrap().ordered.len(), 1);
        let sent = c.outgoing(&h("a"));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].request.max_bandwidth, cap, "{cap:?}");
        assert_eq!(
            sent[0].request.downtime_limit,
            limit.unwrap_or(default.downtime_limit)
        );
        assert_eq!(sent[0].request.transport, TransportKind::Classic);
    }
}
