//! The agent's API with real processes on loopback: VMs started, listed, stopped; refused
//! requests (token, body, unknown names, standby) that change nothing; adoption after a
//! SIGKILL. Needs /dev/kvm and `cargo build -p fastmig-cli` (see `agent_util`).

mod agent_util;

use std::time::Duration;

use agent_util::{small_vm, vm_names, TestAgent, TOKEN};
use fastmig_cluster::proto::{ApiError, HostState, MigrationId, PrepareIncoming, VmName};
use fastmig_cluster::{AgentApi, AgentError};
use fastmig_host::RunStatus;
use fastmig_migration::TransportKind;

fn refused_status(r: Result<impl std::fmt::Debug, AgentError>) -> u16 {
    match r {
        Err(AgentError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn an_agent_starts_lists_and_stops_a_vm() {
    let a = TestAgent::start("h1");
    let api = a.api();
    let started = api.start_vm(&small_vm("vm1")).expect("start");
    assert_eq!(started.status, RunStatus::Running);
    assert_eq!(started.demand, 0.5);
    assert!(started.demand_epoch_ms.is_some());

    let report = api.report().expect("report");
    assert_eq!(report.state, HostState::Active);
    assert_eq!(report.host_type.name, "HP ProLiant ML110 G4");
    assert_eq!(vm_names(&report), ["vm1"]);
    // The VM process itself runs (asked through its own socket, not the agent).
    let c = a.vm_client("vm1").expect("the VM process answers");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);

    // The same name again is refused.
    assert_eq!(refused_status(api.start_vm(&small_vm("vm1"))), 409);

    api.stop_vm(&VmName("vm1".into())).expect("stop");
    assert!(vm_names(&api.report().expect("report")).is_empty());
    assert!(a.vm_client("vm1").is_none(), "the VM process is gone");
    assert!(!a.data_dir().join("vms/vm1").exists());
}

#[test]
fn a_wrong_or_missing_token_gets_401_and_changes_nothing() {
    let a = TestAgent::start("h1");
    let body = serde_json::to_string(&small_vm("vm1")).expect("json");
    for auth in [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
    ] {
        let (status, text) = a.raw("POST", "/vms", auth.as_deref(), Some(&body));
        assert_eq!(status, 401, "{auth:?}");
        let e: ApiError = serde_json::from_str(&text).expect("an ApiError body");
        assert!(e.error.contains("token"), "{}", e.error);
        let (status, _) = a.raw("POST", "/standby", auth.as_deref(), None);
        assert_eq!(status, 401);
    }
    assert_eq!(refused_status(a.api_with("nope").report()), 401);
    let report = a.api().report().expect("report");
    assert!(report.vms.is_empty());
    assert_eq!(report.state, HostState::Active);
    assert!(a.vm_client("vm1").is_none());
}

#[test]
fn malformed_bodies_get_400_and_unknown_names_404() {
    let a = TestAgent::start("h1");
    let auth = format!("Bearer {TOKEN}");
    let auth = Some(auth.as_str());
    let mut wrong_type = serde_json::to_value(small_vm("vm1")).expect("json");
    wrong_type["mem_bytes"] = serde_json::json!("lots");
    let mut bad_workload = small_vm("vm1");
    bad_workload.workload = "juggle".into();
    let mut bad_name = small_vm("../etc");
    bad_name.vcpus = 1;
    for body in [
        "{".to_string(),
        "[]".to_string(),
        r#"{"vm": "vm1"}"#.to_string(),
        wrong_type.to_string(),
        serde_json::to_string(&bad_workload).expect("json"),
        serde_json::to_string(&bad_name).expect("json"),
    ] {
        let (status, text) = a.raw("POST", "/vms", auth, Some(&body));
        assert_eq!(status, 400, "{body}: {text}");
        serde_json::from_str::<ApiError>(&text).expect("an ApiError body");
    }
    let (status, _) = a.raw(
        "POST",
        "/migrations/incoming",
        auth,
        Some("{\"migration\": 1}"),
    );
    assert_eq!(status, 400);
    let (status, _) = a.raw("GET", "/migrations/abc", auth, None);
    assert_eq!(status, 400);

    let api = a.api();
    assert_eq!(refused_status(api.stop_vm(&VmName("ghost".into()))), 404);
    assert_eq!(refused_status(api.migration(MigrationId(99))), 404);
    assert_eq!(refused_status(api.cancel_migration(MigrationId(99))), 404);
    let (status, text) = a.raw("GET", "/nowhere", auth, None);
    assert_eq!(status, 404);
    serde_json::from_str::<ApiError>(&text).expect("an ApiError body");

    let report = api.report().expect("report");
    assert!(report.vms.is_empty() && report.migrations.is_empty());
    assert!(std::fs::read_dir(a.data_dir().join("vms"))
        .expect("vms dir")
        .next()
        .is_none());
}

#[test]
fn standby_refuses_vms_and_is_refused_while_vms_run() {
    let a = TestAgent::start("h1");
    let api = a.api();
    api.start_vm(&small_vm("vm1")).expect("start");
    assert_eq!(refused_status(api.standby()), 409);
    assert_eq!(api.report().expect("report").state, HostState::Active);
    api.stop_vm(&VmName("vm1".into())).expect("stop");

    assert_eq!(api.standby().expect("standby").state, HostState::Standby);
    assert_eq!(refused_status(api.start_vm(&small_vm("vm2"))), 409);
    let order = PrepareIncoming {
        migration: MigrationId(1),
        vm: small_vm("vm3"),
        transport: TransportKind::Classic,
        source: fastmig_cluster::proto::HostName("h0".into()),
    };
    assert_eq!(refused_status(api.prepare_incoming(&order)), 409);
    let report = api.report().expect("report");
    assert!(report.vms.is_empty() && report.migrations.is_empty());
    assert!(a.vm_client("vm2").is_none() && a.vm_client("vm3").is_none());

    assert_eq!(api.wake().expect("wake").state, HostState::Active);
    api.start_vm(&small_vm("vm2")).expect("start after wake");
}

#[test]
fn a_killed_agent_restarted_adopts_its_running_vm() {
    let mut a = TestAgent::start("h1");
    a.api().start_vm(&small_vm("vm1")).expect("start");
    a.api().start_vm(&small_vm("vm2")).expect("start");
    let before = a
        .vm_client("vm1")
        .expect("vm1")
        .query_status()
        .expect("status")
        .progress;
    // vm2's process dies while the agent is away: it is dropped on restart.
    let pid2 = a.vm_pid("vm2").expect("vm2 pid");
    a.kill();
    let st = std::process::Command::new("kill")
        .args(["-9", &pid2.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(300));
    // The VM runs on without its agent.
    let c = a.vm_client("vm1").expect("vm1 outlives its agent");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);

    a.spawn();
    let report = a.api().report().expect("report");
    assert_eq!(vm_names(&report), ["vm1"], "{}", a.log());
    assert_eq!(report.vms[0].status, RunStatus::Running);
    assert!(!a.data_dir().join("vms/vm2").exists());
    let after = c.query_status().expect("status").progress;
    assert!(
        after > before,
        "the guest kept running: {before} -> {after}"
    );
    a.api()
        .stop_vm(&VmName("vm1".into()))
        .expect("stop the adopted VM");
    assert!(a.vm_client("vm1").is_none());
}

#[test]
fn sigterm_stops_the_agent_and_leaves_its_vms_running() {
    let mut a = TestAgent::start("h1");
    a.api().start_vm(&small_vm("vm1")).expect("start");
    let status = a.terminate();
    assert!(status.success(), "{status:?}\n{}", a.log());
    let c = a.vm_client("vm1").expect("the VM outlives its agent");
    assert_eq!(c.query_status().expect("status").status, RunStatus::Running);
    a.spawn();
    assert_eq!(vm_names(&a.api().report().expect("report")), ["vm1"]);
}

#[test]
fn a_vm_or_a_migration_without_room_is_refused() {
    // G4: 2 x 1860 MIPS, 4096 MB.
    let a = TestAgent::start("h1");
    let api = a.api();
    let big = |name: &str| {
        let mut vm = small_vm(name);
        vm.mips = 2500.0;
        vm
    };
    api.start_vm(&big("vm1")).expect("the first fits");
    let refused = |r: Result<_, AgentError>| match r {
        Err(AgentError::Refused { status, error, .. }) => {
            assert!(error.contains("no room"), "{error}");
            status
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(refused(api.start_vm(&big("vm2")).map(drop)), 409);
    let order = PrepareIncoming {
        migration: MigrationId(1),
        vm: big("vm3"),
        transport: TransportKind::Classic,
        source: fastmig_cluster::proto::HostName("h0".into()),
    };
    assert_eq!(refused(api.prepare_incoming(&order).map(drop)), 409);
    let mut huge = small_vm("vm4");
    huge.mem_bytes = 5 << 30;
    assert_eq!(refused(api.start_vm(&huge).map(drop)), 409);
    let report = api.report().expect("report");
    assert_eq!(vm_names(&report), ["vm1"]);
    assert!(report.migrations.is_empty());
    // A smaller one still fits.
    api.start_vm(&small_vm("vm5")).expect("500 MIPS more fits");
}
