//! The agent's `/metrics` on a real agent process: behind the token, strictly parsed, its
//! host, state and VMs as `/report` shows them, and a migration counted once on each side.
//! Needs /dev/kvm and `cargo build -p fastmig-cli` (see `agent_util`).

mod agent_util;
mod prom_text;

use std::time::Duration;

use agent_util::{small_vm, wait_ended, TestAgent, TOKEN};
use fastmig_cluster::metrics::{report_utilization, EXPORTED};
use fastmig_cluster::proto::{MigrationId, MigrationPhase, PrepareIncoming, StartOutgoing};
use fastmig_cluster::AgentApi;
use fastmig_host::MigrationRequest;
use fastmig_migration::TransportKind;

fn scrape(a: &TestAgent) -> prom_text::Exposition {
    let (status, text) = a.raw("GET", "/metrics", Some(&format!("Bearer {TOKEN}")), None);
    assert_eq!(status, 200, "{text}");
    prom_text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn agent_metrics_show_its_host_vms_and_migrations() {
    let src = TestAgent::start("src");
    let dst = TestAgent::start("dst");
    let (status, _) = src.raw("GET", "/metrics", None, None);
    assert_eq!(status, 401);

    let report = src.api().start_vm(&small_vm("vm1")).expect("start");
    let m = scrape(&src);
    let rep = src.api().report().expect("report");
    let l = [("host", "src")];
    assert_eq!(m.value("fastmig_host_vms", &l), 1.0);
    assert_eq!(
        m.value(
            "fastmig_host_state",
            &[("host", "src"), ("state", "active")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "fastmig_host_state",
            &[("host", "src"), ("state", "standby")]
        ),
        0.0
    );
    // A constant demand of 0.5 on 500 MIPS over the G4's 2 × 1,860 MIPS.
    assert_eq!(
        m.value("fastmig_host_utilization", &l),
        report_utilization(&rep)
    );
    assert!((report_utilization(&rep) - 250.0 / 3720.0).abs() < 1e-12);
    assert_eq!(
        m.value("fastmig_vm_utilization", &[("vm", "vm1"), ("host", "src")]),
        report.demand
    );
    assert_eq!(m.find("fastmig_agent_migrations_total", &[]).len(), 0);
    let d = scrape(&dst);
    assert_eq!(d.value("fastmig_host_vms", &[("host", "dst")]), 0.0);
    assert_eq!(d.value("fastmig_host_utilization", &[("host", "dst")]), 0.0);

    // One classic migration: counted once on each side.
    let vm = report.start_vm();
    let ready = dst
        .api()
        .prepare_incoming(&PrepareIncoming {
            migration: MigrationId(1),
            vm: vm.clone(),
            transport: TransportKind::Classic,
            source: src.host.clone(),
        })
        .expect("prepare");
    assert_eq!(
        scrape(&dst).value("fastmig_agent_migrations_in_flight", &[]),
        1.0
    );
    src.api()
        .start_outgoing(&StartOutgoing {
            migration: MigrationId(1),
            vm: vm.vm.clone(),
            destination: dst.host.clone(),
            request: MigrationRequest {
                transport: TransportKind::Classic,
                ..MigrationRequest::to(&ready.uri)
            },
        })
        .expect("start outgoing");
    let s = wait_ended(&src.api(), MigrationId(1), Duration::from_secs(60));
    assert!(
        matches!(s.phase, MigrationPhase::Completed { .. }),
        "{:?}",
        s.phase
    );
    let e = wait_ended(&dst.api(), MigrationId(1), Duration::from_secs(10));
    assert!(
        matches!(e.phase, MigrationPhase::Completed { .. }),
        "{:?}",
        e.phase
    );
    let m = scrape(&src);
    let done = |side| {
        [
            ("transport", "classic"),
            ("side", side),
            ("result", "completed"),
        ]
    };
    assert_eq!(
        m.value("fastmig_agent_migrations_total", &done("source")),
        1.0
    );
    assert_eq!(m.sum("fastmig_agent_migrations_total", &[]), 1.0);
    assert_eq!(m.value("fastmig_agent_migrations_in_flight", &[]), 0.0);
    assert_eq!(m.value("fastmig_host_vms", &l), 0.0);
    let d = scrape(&dst);
    assert_eq!(
        d.value("fastmig_agent_migrations_total", &done("destination")),
        1.0
    );
    assert_eq!(d.value("fastmig_host_vms", &[("host", "dst")]), 1.0);
    assert_eq!(
        d.value("fastmig_vm_utilization", &[("vm", "vm1"), ("host", "dst")]),
        0.5
    );

    // Standby shows as the state.
    src.api().standby().expect("standby");
    let m = scrape(&src);
    assert_eq!(
        m.value(
            "fastmig_host_state",
            &[("host", "src"), ("state", "standby")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "fastmig_host_state",
            &[("host", "src"), ("state", "active")]
        ),
        0.0
    );
    for f in [
        "fastmig_host_utilization",
        "fastmig_host_state",
        "fastmig_host_vms",
        "fastmig_vm_utilization",
        "fastmig_agent_migrations",
        "fastmig_agent_migrations_in_flight",
    ] {
        assert!(d.types.contains_key(f), "{f} not exported");
        let listed = EXPORTED
            .iter()
            .any(|e| e.strip_suffix("_total").unwrap_or(e) == f);
        assert!(listed, "{f} missing from EXPORTED");
    }
    dst.api().stop_vm(&vm.vm).expect("stop");
}
