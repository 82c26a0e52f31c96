//! `fastmig cluster status` against a live controller API (over fake agents, in this
//! process): the tables and `--json`, a wrong token refused with exit code 2.

use std::process::Command;
use std::sync::{Arc, Mutex};

use fastmig_cluster::controller::api::{serve, ApiState};
use fastmig_cluster::controller::{Controller, ControllerConfig};
use fastmig_cluster::fake_agent::{test_vm, FakeCluster};
use fastmig_cluster::proto::HostName;
use fastmig_cluster::AgentApi;

fn h(n: &str) -> HostName {
    HostName(n.into())
}

#[test]
fn status_shows_hosts_vms_and_migrations_in_flight() {
    let g4 = fastmig_sim::setup::reference_host_types()[0].clone();
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
    let mut ctl = Controller::new(ControllerConfig::new("thr-mmt"), agents, store).unwrap();
    // a is over-utilised: v1 starts migrating to b and stays in flight (never stepped).
    assert_eq!(ctl.tick().unwrap().ordered.len(), 1);
    let ctl = Arc::new(Mutex::new(ctl));
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    // Token files must be private to their owner.
    let private = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    private(&token);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = ApiState::new(
        Arc::clone(&ctl),
        fastmig_cluster::auth::Token::new("tok").unwrap(),
    );
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            serve(l, st, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
    });
    let status = |extra: &[&str], token: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_fastmig"))
            .args(["cluster", "status", "--controller"])
            .arg(format!("http://{addr}"))
            .arg("--token-file")
            .arg(token)
            .args(extra)
            .output()
            .unwrap()
    };

    let out = status(&["--json"], &token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(json["vms"].as_array().unwrap().len(), 2);
    let migs = json["migrations"].as_array().unwrap();
    assert_eq!(migs.len(), 1);
    assert_eq!(
        (migs[0]["vm"].as_str(), migs[0]["destination"].as_str()),
        (Some("v1"), Some("b"))
    );

    let out = status(&[], &token);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("HOST") && text.contains("VM") && text.contains("DESTINATION"));
    // The migration's row: v1 from a to b, running, CloudSim's 870 MB / 62.5 MB/s = 13.92 s.
    let row = text.lines().find(|l| l.ends_with("13.92")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols, ["1", "v1", "a", "b", "running", "13.92"], "{text}");

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    private(&wrong);
    let out = status(&[], &wrong);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let _ = tx.send(());
    server.join().unwrap();
}
