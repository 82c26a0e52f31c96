//! Migrations between two agents on loopback, ordered through `HttpAgent` as the controller
//! orders them: they complete with the VM on exactly one host, and a destination that dies
//! mid-way leaves the VM running on its source. Needs /dev/kvm and
//! `cargo build -p fastmig-cli` (see `agent_util`).

mod agent_util;

use std::time::{Duration, Instant};

use agent_util::{small_vm, vm_names, wait_ended, TestAgent};
use fastmig_cluster::proto::{
    MigrationId, MigrationPhase, PrepareIncoming, Side, StartOutgoing, StartVm, VmName,
};
use fastmig_cluster::{AgentApi, AgentError};
use fastmig_host::{MigrationRequest, RunStatus};
use fastmig_migration::TransportKind;

/// Orders a migration of `vm` from `src` to `dst` as the controller does: prepare the
/// destination, then start the source.
fn order(
    src: &TestAgent,
    dst: &TestAgent,
    id: u64,
    vm: &StartVm,
    transport: TransportKind,
    max_bandwidth: Option<u64>,
) {
    let ready = dst
        .api()
        .prepare_incoming(&PrepareIncoming {
            migration: MigrationId(id),
            vm: vm.clone(),
            transport,
            source: src.host.clone(),
        })
        .expect("prepare incoming");
    // The destination lists the VM as arriving, and nothing runs yet.
    let arriving = dst.api().report().expect("report");
    let v = arriving
        .vms
        .iter()
        .find(|v| v.vm == vm.vm)
        .expect("listed while it arrives");
    assert_eq!(v.status, RunStatus::Inmigrate);
    let rec = src
        .api()
        .start_outgoing(&StartOutgoing {
            migration: MigrationId(id),
            vm: vm.vm.clone(),
            destination: dst.host.clone(),
            request: MigrationRequest {
                transport,
                max_bandwidth,
                ..MigrationRequest::to(&ready.uri)
            },
        })
        .expect("start outgoing");
    assert_eq!(rec.side, Side::Source);
}

fn migrate_and_check(transport: TransportKind) {
    let src = TestAgent::start("src");
    let dst = TestAgent::start("dst");
    let report = src.api().start_vm(&small_vm("vm1")).expect("start");
    // The controller carries the trace position over (VmReport::start_vm copies it).
    let vm = report.start_vm();
    assert_eq!(vm.demand_epoch_ms, report.demand_epoch_ms);
    assert!(vm.demand_epoch_ms.is_some());
    order(&src, &dst, 1, &vm, transport, None);

    let s = wait_ended(&src.api(), MigrationId(1), Duration::from_secs(60));
    let MigrationPhase::Completed {
        summary: Some(summary),
    } = &s.phase
    else {
        panic!("source: {:?}\n{}", s.phase, src.log());
    };
    assert!(summary.digest_match);
    let d = wait_ended(&dst.api(), MigrationId(1), Duration::from_secs(10));
    assert!(
        matches!(d.phase, MigrationPhase::Completed { .. }),
        "destination: {:?}",
        d.phase
    );
    assert_eq!(d.side, Side::Destination);

    // Exactly one host runs it, by both agents' reports and by the processes themselves.
    let (rs, rd) = (
        src.api().report().expect("src"),
        dst.api().report().expect("dst"),
    );
    assert!(vm_names(&rs).is_empty(), "{:?}", rs.vms);
    assert_eq!(vm_names(&rd), ["vm1"]);
    assert_eq!(rd.vms[0].demand_epoch_ms, report.demand_epoch_ms);
    assert!(
        src.vm_client("vm1").is_none(),
        "the source process has quit"
    );
    let c = dst.vm_client("vm1").expect("the destination process");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    let verify = c.verify_memory().expect("verify");
    assert!(verify.is_clean(), "{verify:?}");
    assert!(verify.pages_checked > 0);
}

#[test]
fn a_classic_migration_between_two_agents_completes() {
    migrate_and_check(TransportKind::Classic);
}

#[test]
fn a_multi_tcp_migration_between_two_agents_completes() {
    migrate_and_check(TransportKind::MultiTcp { streams: 3 });
}

#[test]
fn bad_migration_orders_are_refused_and_change_nothing() {
    let src = TestAgent::start("src");
    src.api().start_vm(&small_vm("vm1")).expect("start");
    let out = |vm: &str, dest: &str| StartOutgoing {
        migration: MigrationId(5),
        vm: VmName(vm.into()),
        destination: fastmig_cluster::proto::HostName(dest.into()),
        request: MigrationRequest::to("127.0.0.1:1"),
    };
    // To itself, of an unknown VM.
    assert_eq!(status(src.api().start_outgoing(&out("vm1", "src"))), 409);
    assert_eq!(status(src.api().start_outgoing(&out("ghost", "dst"))), 404);
    // An incoming VM whose name already runs here.
    let prep = PrepareIncoming {
        migration: MigrationId(6),
        vm: small_vm("vm1"),
        transport: TransportKind::Classic,
        source: fastmig_cluster::proto::HostName("other".into()),
    };
    assert_eq!(status(src.api().prepare_incoming(&prep)), 409);
    let r = src.api().report().expect("report");
    assert!(r.migrations.is_empty());
    assert_eq!(r.vms.len(), 1);
    assert_eq!(r.vms[0].status, RunStatus::Running);
}

/// A VM whose 16 MiB are all written once (`fill`), then quiet: a migration capped at
/// 4 MB/s takes about 4 s, long enough to interrupt.
fn slow_vm() -> StartVm {
    let mut vm = small_vm("vm1");
    vm.workload = "fill".into();
    vm
}

fn status<T: std::fmt::Debug>(r: Result<T, AgentError>) -> u16 {
    match r {
        Err(AgentError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Waits until the source reports the migration sending pages.
fn wait_sending(src: &TestAgent, id: u64) {
    let start = Instant::now();
    loop {
        let r = src.api().migration(MigrationId(id)).expect("record");
        if let MigrationPhase::Running { progress: Some(_) } = r.phase {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not sending: {:?}",
            r.phase
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_destination_host_that_dies_mid_way_leaves_the_vm_on_its_source() {
    let src = TestAgent::start("src");
    let mut dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    order(
        &src,
        &dst,
        2,
        &slow_vm(),
        TransportKind::Classic,
        Some(4_000_000),
    );
    wait_sending(&src, 2);
    // The whole destination host goes: its agent and the VM process it was receiving into.
    let pid = dst.vm_pid("vm1").expect("incoming pid");
    dst.kill();
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());

    let s = wait_ended(&src.api(), MigrationId(2), Duration::from_secs(60));
    assert!(
        matches!(s.phase, MigrationPhase::Failed { .. }),
        "{:?}",
        s.phase
    );
    let c = src.vm_client("vm1").expect("the VM is still on the source");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    // The restarted destination agent has nothing: its incoming VM never ran.
    dst.spawn();
    assert!(vm_names(&dst.api().report().expect("report")).is_empty());
    assert_eq!(vm_names(&src.api().report().expect("report")), ["vm1"]);
}

#[test]
fn a_destination_agent_killed_mid_way_ends_with_the_vm_on_exactly_one_host() {
    let src = TestAgent::start("src");
    let mut dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    order(
        &src,
        &dst,
        3,
        &slow_vm(),
        TransportKind::Classic,
        Some(4_000_000),
    );
    wait_sending(&src, 3);
    // Only the agent dies: the incoming VM process receives on, and the restarted agent
    // adopts it and the migration with it.
    dst.kill();
    let s = wait_ended(&src.api(), MigrationId(3), Duration::from_secs(60));
    dst.spawn();
    let d = wait_ended(&dst.api(), MigrationId(3), Duration::from_secs(20));
    let (on_src, on_dst) = (src.vm_client("vm1"), dst.vm_client("vm1"));
    match (&s.phase, &d.phase) {
        (MigrationPhase::Completed { .. }, MigrationPhase::Completed { .. }) => {
            assert!(on_src.is_none());
            let c = on_dst.expect("on the destination");
            assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
        }
        (MigrationPhase::Failed { .. }, MigrationPhase::Failed { .. }) => {
            assert!(on_dst.is_none());
            let c = on_src.expect("on the source");
            assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
        }
        other => panic!("the two agents disagree: {other:?}"),
    }
    let names = |a: &TestAgent| vm_names(&a.api().report().expect("report"));
    assert_eq!(names(&src).len() + names(&dst).len(), 1);
}

#[test]
fn a_cancelled_migration_leaves_the_vm_on_its_source() {
    let src = TestAgent::start("src");
    let dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    order(
        &src,
        &dst,
        4,
        &slow_vm(),
        TransportKind::Classic,
        Some(4_000_000),
    );
    wait_sending(&src, 4);
    // Only the source cancels: the destination cannot know whether the source committed.
    assert!(matches!(
        dst.api().cancel_migration(MigrationId(4)),
        Err(AgentError::Refused { status: 409, .. })
    ));
    src.api().cancel_migration(MigrationId(4)).expect("cancel");
    let s = wait_ended(&src.api(), MigrationId(4), Duration::from_secs(30));
    assert!(
        matches!(s.phase, MigrationPhase::Failed { .. }),
        "{:?}",
        s.phase
    );
    let d = wait_ended(&dst.api(), MigrationId(4), Duration::from_secs(30));
    assert!(
        matches!(d.phase, MigrationPhase::Failed { .. }),
        "{:?}",
        d.phase
    );
    let c = src.vm_client("vm1").expect("on the source");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    assert!(vm_names(&dst.api().report().expect("report")).is_empty());
    assert_eq!(vm_names(&src.api().report().expect("report")), ["vm1"]);
}

#[test]
fn a_source_agent_killed_mid_way_ends_with_the_vm_on_exactly_one_host() {
    let mut src = TestAgent::start("src");
    let dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    order(
        &src,
        &dst,
        7,
        &slow_vm(),
        TransportKind::Classic,
        Some(4_000_000),
    );
    wait_sending(&src, 7);
    // The source's agent dies; its VM process migrates on, and the restarted agent takes
    // the migration up again from vm.json.
    src.kill();
    src.spawn();
    let s = wait_ended(&src.api(), MigrationId(7), Duration::from_secs(60));
    let d = wait_ended(&dst.api(), MigrationId(7), Duration::from_secs(30));
    assert!(
        matches!(s.phase, MigrationPhase::Completed { .. }),
        "source: {:?}\n{}",
        s.phase,
        src.log()
    );
    assert!(
        matches!(d.phase, MigrationPhase::Completed { .. }),
        "{:?}",
        d.phase
    );
    assert!(
        src.vm_client("vm1").is_none(),
        "the source process has quit"
    );
    let c = dst.vm_client("vm1").expect("on the destination");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    assert!(vm_names(&src.api().report().expect("report")).is_empty());
    assert_eq!(vm_names(&dst.api().report().expect("report")), ["vm1"]);
}

#[test]
fn sigterm_lets_an_outgoing_migration_finish_first() {
    let mut src = TestAgent::start("src");
    let dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    order(
        &src,
        &dst,
        8,
        &slow_vm(),
        TransportKind::Classic,
        Some(4_000_000),
    );
    wait_sending(&src, 8);
    // The agent's grace period (10 s in these tests) covers this ~4 s migration.
    let status = src.terminate();
    assert!(status.success(), "{status:?}\n{}", src.log());
    // It exited only once the migration had ended: the source process has already quit.
    assert!(src.vm_client("vm1").is_none(), "{}", src.log());
    let d = wait_ended(&dst.api(), MigrationId(8), Duration::from_secs(30));
    assert!(
        matches!(d.phase, MigrationPhase::Completed { .. }),
        "{:?}",
        d.phase
    );
    let c = dst.vm_client("vm1").expect("on the destination");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
}

/// shm and handover pass memory through a unix socket: they work between two agents that
/// share a machine, as here.
#[test]
fn shm_and_handover_migrations_between_agents_on_one_machine_complete() {
    migrate_and_check(TransportKind::Shm);
    migrate_and_check(TransportKind::Handover);
}

#[test]
fn sigterm_cancels_a_migration_that_outlasts_the_grace_period() {
    let mut src = TestAgent::start_with_grace("src", "1s");
    let dst = TestAgent::start("dst");
    src.api().start_vm(&slow_vm()).expect("start");
    // 16 MiB at 1 MB/s: far longer than the 1 s of grace.
    order(
        &src,
        &dst,
        9,
        &slow_vm(),
        TransportKind::Classic,
        Some(1_000_000),
    );
    wait_sending(&src, 9);
    let status = src.terminate();
    assert!(status.success(), "{status:?}\n{}", src.log());
    assert!(
        src.log().contains("cancelling the migration"),
        "{}",
        src.log()
    );
    // Cancelled: the VM runs on the source, and the destination gives its VM up.
    let c = src.vm_client("vm1").expect("the VM stays on the source");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    let d = wait_ended(&dst.api(), MigrationId(9), Duration::from_secs(30));
    assert!(
        matches!(d.phase, MigrationPhase::Failed { .. }),
        "{:?}",
        d.phase
    );
    assert!(vm_names(&dst.api().report().expect("report")).is_empty());
    // The restarted source agent still has it.
    src.spawn();
    assert_eq!(vm_names(&src.api().report().expect("report")), ["vm1"]);
}
