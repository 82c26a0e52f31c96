//! The controller's HTTP API: what it shows, the orders it carries out, and the bad requests
//! it refuses with a clear 4xx and nothing changed.

mod controller_common;

use controller_common::{start, Server, TOKEN};
use fastmig_cluster::proto::VmName;

/// Sends a request that must be refused with `status` and leave hosts, VMs and migrations
/// as they were.
fn refused(s: &Server, method: &str, path: &str, body: Option<&str>, status: u16, says: &str) {
    let before = s.snapshot();
    let (code, json) = s.call(method, path, body);
    assert_eq!(code, status, "{method} {path} {body:?}: {json}");
    let error = json["error"].as_str().expect("error line");
    assert!(error.contains(says), "{error:?} should say {says:?}");
    assert_eq!(s.snapshot(), before, "{method} {path} changed something");
}

#[test]
fn without_the_token_nothing_is_served_or_changed() {
    let s = start();
    let before = s.snapshot();
    for token in [None, Some("wrong"), Some("")] {
        for (m, p, b) in [
            ("GET", "/hosts", None),
            ("POST", "/hosts/d/wake", None),
            (
                "POST",
                "/migrations",
                Some(r#"{"vm":"v3","destination":"d"}"#),
            ),
        ] {
            let (code, json) = s.call_with(m, p, b, token);
            assert_eq!(code, 401, "{m} {p} with {token:?}");
            assert!(json["error"].as_str().unwrap().contains("token"));
        }
    }
    assert_eq!(s.snapshot(), before);
    assert_eq!(s.call_with("GET", "/hosts", None, Some(TOKEN)).0, 200);
}

#[test]
fn the_cluster_is_listed() {
    let s = start();
    let (code, hosts) = s.call("GET", "/hosts", None);
    assert_eq!(code, 200);
    assert_eq!(hosts.as_array().unwrap().len(), 4);
    let (_, vms) = s.call("GET", "/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 3);
    for v in ["v1", "v2", "v3"] {
        let host = s.host_of(v);
        assert_eq!(
            s.fake.running_on(&VmName(v.into())),
            vec![controller_common::h(&host)]
        );
    }
    let (_, migs) = s.call("GET", "/migrations", None);
    assert!(migs
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["vm"] == "v1" && m["state"] == "done"));
    let (_, ds) = s.call("GET", "/decisions?limit=2", None);
    assert_eq!(ds.as_array().unwrap().len(), 2);
    assert_eq!(ds[0]["id"], 4);
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let s = start();
    let standby = s.hosts_in("standby");
    assert!(!standby.is_empty(), "the fixture leaves a host in standby");
    let v1_host = s
        .hosts_in("active")
        .into_iter()
        .find(|h| *h == s.host_of("v1"))
        .unwrap();
    let other_active = s
        .hosts_in("active")
        .into_iter()
        .find(|h| *h != s.host_of("v2"))
        .unwrap();

    // Malformed.
    refused(
        &s,
        "POST",
        "/migrations",
        Some("{not json"),
        400,
        "malformed",
    );
    refused(
        &s,
        "POST",
        "/migrations",
        Some(r#"{"vm":"v1"}"#),
        400,
        "malformed",
    );
    refused(
        &s,
        "POST",
        "/migrations",
        Some(r#"{"vm":"v1","destination":"b","x":1}"#),
        400,
        "malformed",
    );
    refused(
        &s,
        "POST",
        "/vms",
        Some(r#"{"vm":{"vm":"n"}}"#),
        400,
        "malformed",
    );
    // Unknown VM or host.
    refused(
        &s,
        "POST",
        "/migrations",
        Some(r#"{"vm":"nope","destination":"b"}"#),
        404,
        "unknown VM",
    );
    refused(
        &s,
        "POST",
        "/migrations",
        Some(r#"{"vm":"v1","destination":"zz"}"#),
        404,
        "unknown host",
    );
    refused(&s, "POST", "/hosts/zz/standby", None, 404, "unknown host");
    refused(&s, "POST", "/hosts/zz/wake", None, 404, "unknown host");
    refused(&s, "GET", "/nothing", None, 404, "no such endpoint");
    // To itself, to a host in standby, to a host without room (v2's 2000 MIPS exceed a G4
    // core's 1860 MIPS on every host).
    let body = format!(r#"{{"vm":"v1","destination":"{v1_host}"}}"#);
    refused(
        &s,
        "POST",
        "/migrations",
        Some(&body),
        409,
        "already runs on",
    );
    let body = format!(r#"{{"vm":"v1","destination":"{}"}}"#, standby[0]);
    refused(&s, "POST", "/migrations", Some(&body), 409, "standby");
    let body = format!(r#"{{"vm":"v2","destination":"{other_active}"}}"#);
    refused(&s, "POST", "/migrations", Some(&body), 409, "no room");
    // A new VM on a host in standby, or with a name in use.
    let vm = r#"{"vm":"n1","mem_bytes":67108864,"vcpus":1,"mips":500.0,"workload":"idle","demand":{"kind":"constant","utilization":0.2}}"#;
    let body = format!(r#"{{"vm":{vm},"host":"{}"}}"#, standby[0]);
    refused(&s, "POST", "/vms", Some(&body), 409, "standby");
    let body = r#"{"vm":{"vm":"v1","mem_bytes":67108864,"vcpus":1,"mips":500.0,"workload":"idle","demand":{"kind":"constant","utilization":0.2}}}"#;
    refused(&s, "POST", "/vms", Some(body), 409, "exists");
    // Standby of a host where VMs run.
    refused(
        &s,
        "POST",
        &format!("/hosts/{v1_host}/standby"),
        None,
        409,
        "VMs run",
    );
}

#[test]
fn operator_orders_are_carried_out() {
    let s = start();
    // A new VM, placed by PABFD.
    let vm = r#"{"vm":{"vm":"n1","mem_bytes":67108864,"vcpus":1,"mips":500.0,"workload":"idle","demand":{"kind":"constant","utilization":0.2}}}"#;
    let (code, placed) = s.call("POST", "/vms", Some(vm));
    assert_eq!(code, 201, "{placed}");
    let host = placed["host"].as_str().unwrap().to_owned();
    assert_eq!(
        s.fake.running_on(&VmName("n1".into())),
        vec![controller_common::h(&host)]
    );
    assert_eq!(s.host_of("n1"), host);

    // Wake a standby host and move the new VM there.
    let target = s.hosts_in("standby")[0].clone();
    let (code, st) = s.call("POST", &format!("/hosts/{target}/wake"), None);
    assert_eq!((code, st["state"].as_str()), (200, Some("active")));
    let body =
        format!(r#"{{"vm":"n1","destination":"{target}","transport":{{"kind":"classic"}}}}"#);
    let (code, m) = s.call("POST", "/migrations", Some(&body));
    assert_eq!(code, 201, "{m}");
    assert_eq!(m["state"], "running");
    assert_eq!(m["origin"], "operator");
    // While it runs, a second order for the VM is refused.
    refused(&s, "POST", "/migrations", Some(&body), 409, "migrating");
    s.fake.step();
    s.ctl.lock().unwrap().tick().unwrap();
    let (_, open) = s.call("GET", "/migrations?open=true", None);
    assert!(open.as_array().unwrap().iter().all(|x| x["id"] != m["id"]));
    let (_, all) = s.call("GET", "/migrations", None);
    let row = all
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == m["id"])
        .unwrap()
        .clone();
    assert_eq!(row["state"], "done");
    assert_eq!(s.fake.running_on(&VmName("n1".into())).len(), 1);
}
