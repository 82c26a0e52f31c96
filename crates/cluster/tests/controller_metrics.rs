//! The controller's `/metrics`, `/` and `/events` over fake agents: the exposition parses
//! strictly, every host and VM appears, and the values agree with the API's JSON.

mod controller_common;
mod prom_text;

use std::io::{BufRead, BufReader};

use controller_common::{start, Server, TOKEN};
use fastmig_cluster::metrics::{ControllerMetrics, EXPORTED};
use fastmig_sim::setup::reference_host_types;
use serde_json::Value;

fn get_text(s: &Server, path: &str, token: Option<&str>) -> (u16, String, String) {
    let http = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut r = http.get(format!("{}{path}", s.base));
    if let Some(t) = token {
        r = r.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = r.call().expect("request");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = resp.status().as_u16();
    (status, ct, resp.body_mut().read_to_string().expect("body"))
}

fn scrape(s: &Server) -> prom_text::Exposition {
    let (status, ct, text) = get_text(s, "/metrics", Some(TOKEN));
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    prom_text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn arr(v: &Value) -> &Vec<Value> {
    v.as_array().expect("array")
}

#[test]
fn metrics_need_the_token_and_show_every_host_as_the_api_does() {
    let s = start();
    let (status, _, _) = get_text(&s, "/metrics", None);
    assert_eq!(status, 401);
    let m = scrape(&s);
    let (hosts, vms, migrations) = s.snapshot();
    let g4 = &reference_host_types()[0];
    let mut total_w = 0.0;
    assert_eq!(arr(&hosts).len(), 4);
    for host in arr(&hosts) {
        let name = host["name"].as_str().expect("name");
        let l = [("host", name)];
        let util = host["utilization"].as_f64().expect("util");
        assert_eq!(m.value("fastmig_host_utilization", &l), util, "{name}");
        let state = host["state"].as_str().expect("state");
        let other = if state == "active" {
            "standby"
        } else {
            "active"
        };
        assert_eq!(
            m.value("fastmig_host_state", &[("host", name), ("state", state)]),
            1.0
        );
        assert_eq!(
            m.value("fastmig_host_state", &[("host", name), ("state", other)]),
            0.0
        );
        let n_vms = arr(&host["vms"]).len() as f64;
        assert_eq!(m.value("fastmig_host_vms", &l), n_vms);
        assert_eq!(m.value("fastmig_host_reachable", &l), 1.0);
        let w = if state == "active" {
            g4.power.power(util)
        } else {
            0.0
        };
        assert_eq!(m.value("fastmig_host_power_watts", &l), w, "{name}");
        total_w += w;
    }
    // The fixture settles with hosts in standby and at least one active.
    assert!(!s.hosts_in("standby").is_empty() && !s.hosts_in("active").is_empty());
    assert!((m.value("fastmig_cluster_power_watts", &[]) - total_w).abs() < 1e-9);
    assert_eq!(
        m.value("fastmig_cluster_active_hosts", &[]),
        s.hosts_in("active").len() as f64
    );
    for vm in arr(&vms) {
        let l = [
            ("vm", vm["vm"].as_str().expect("vm")),
            ("host", vm["host"].as_str().expect("host")),
        ];
        assert_eq!(
            m.value("fastmig_vm_utilization", &l),
            vm["report"]["demand"].as_f64().expect("demand")
        );
    }
    assert_eq!(m.find("fastmig_vm_utilization", &[]).len(), arr(&vms).len());

    // Migrations: the counters agree with the store as GET /migrations shows it.
    let done: Vec<&Value> = arr(&migrations)
        .iter()
        .filter(|r| r["state"] == "done")
        .collect();
    assert!(!done.is_empty(), "the fixture migrates");
    let c = [("transport", "classic")];
    assert_eq!(
        m.value(
            "fastmig_migrations_total",
            &[("transport", "classic"), ("result", "done")]
        ),
        done.len() as f64
    );
    // The fake agent's summary: 1 MiB sent, 12 ms of downtime, 1.5 s in all.
    assert_eq!(
        m.value("fastmig_migration_bytes_total", &c),
        (done.len() << 20) as f64
    );
    assert_eq!(
        m.value("fastmig_migration_downtime_seconds_count", &c),
        done.len() as f64
    );
    let downtime: f64 = done
        .iter()
        .map(|r| r["measured_downtime_s"].as_f64().expect("dt"))
        .sum();
    assert!((m.value("fastmig_migration_downtime_seconds_sum", &c) - downtime).abs() < 1e-9);
    assert_eq!(
        m.value("fastmig_migration_duration_seconds_count", &c),
        done.len() as f64
    );
    // 12 ms falls in the bucket le=0.016 and not in le=0.008.
    assert_eq!(
        m.value(
            "fastmig_migration_downtime_seconds_bucket",
            &[("transport", "classic"), ("le", "0.008")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "fastmig_migration_downtime_seconds_bucket",
            &[("transport", "classic"), ("le", "0.016")]
        ),
        done.len() as f64
    );
    let (_, decisions) = s.call("GET", "/decisions?limit=1000", None);
    assert_eq!(
        m.value("fastmig_decision_seconds_count", &[]),
        arr(&decisions).len() as f64
    );
    assert_eq!(m.value("fastmig_migrations_in_flight", &[]), 0.0);

    // An operator's migration: in flight, then counted once.
    let vm = "v3";
    let from = s.host_of(vm);
    let to = s
        .hosts_in("active")
        .into_iter()
        .find(|x| *x != from)
        .expect("another active host");
    let (st, body) = s.call(
        "POST",
        "/migrations",
        Some(&format!(r#"{{"vm":"{vm}","destination":"{to}"}}"#)),
    );
    assert_eq!(st, 201, "{body}");
    assert_eq!(scrape(&s).value("fastmig_migrations_in_flight", &[]), 1.0);
    s.fake.step();
    s.ctl.lock().expect("ctl").tick().expect("tick");
    let m2 = scrape(&s);
    assert_eq!(m2.value("fastmig_migrations_in_flight", &[]), 0.0);
    assert_eq!(
        m2.value(
            "fastmig_migrations_total",
            &[("transport", "classic"), ("result", "done")]
        ),
        done.len() as f64 + 1.0
    );
    assert_eq!(s.host_of(vm), to);
    assert_eq!(
        m2.value(
            "fastmig_vm_utilization",
            &[("vm", vm), ("host", to.as_str())]
        ),
        0.5
    );
    assert!(m2.value("fastmig_cluster_energy_joules_total", &[]) >= 0.0);
    // Every family the controller owns is in its exposition (deploy/ is checked against this
    // list).
    for f in EXPORTED.iter().filter(|f| !f.starts_with("fastmig_agent_")) {
        let base = f.strip_suffix("_total").unwrap_or(f);
        assert!(m2.types.contains_key(base), "{f} not exported");
    }
}

#[test]
fn the_page_is_self_contained_and_public() {
    let s = start();
    let (status, ct, page) = get_text(&s, "/", None);
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    for external in [
        "http://",
        "https://",
        "//cdn",
        "src=\"//",
        "href=\"//",
        "@import",
        "url(",
    ] {
        assert!(!page.contains(external), "the page names {external}");
    }
    assert!(!page.contains("<script src"), "scripts are inline");
    for id in [
        "hosts",
        "vms",
        "in-flight",
        "done",
        "order-migration",
        "order-standby",
        "token",
        "chart-power",
    ] {
        assert!(page.contains(&format!("id=\"{id}\"")), "no element #{id}");
    }
}

#[test]
fn events_stream_the_state_with_every_host() {
    let s = start();
    let (status, _, _) = get_text(&s, "/events", None);
    assert_eq!(status, 401);
    let http = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(std::time::Duration::from_secs(20)))
            .build(),
    );
    let mut resp = http
        .get(format!("{}/events", s.base))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .expect("events");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut lines = BufReader::new(resp.body_mut().as_reader()).lines();
    let (hosts, vms, _) = s.snapshot();
    // Two events: the first (whole history) and the next sample.
    let mut energy = Vec::new();
    for n in 0..2 {
        let v = next_event(&mut lines);
        let names: Vec<&str> = arr(&v["hosts"])
            .iter()
            .map(|x| x["name"].as_str().expect("name"))
            .collect();
        let want: Vec<&str> = arr(&hosts)
            .iter()
            .map(|x| x["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, want, "event {n}");
        for (a, b) in arr(&v["hosts"]).iter().zip(arr(&hosts)) {
            assert_eq!(a["state"], b["state"]);
            assert_eq!(a["utilization"], b["utilization"]);
            assert!(a["capacity_mips"].as_f64().expect("mips") > 0.0);
        }
        assert_eq!(arr(&v["vms"]).len(), arr(&vms).len());
        assert!(!arr(&v["history"]).is_empty());
        // The migrations the store held before the server started are in no point.
        assert_eq!(v["history"][0]["migrations"], 0);
        let p = &v["point"];
        assert_eq!(
            p["active_hosts"].as_u64(),
            Some(s.hosts_in("active").len() as u64)
        );
        let power = v["power_w"].as_f64().expect("power");
        assert!(power > 0.0);
        assert!((power - p["power_w"].as_f64().expect("p")).abs() < 1e-9);
        energy.push(v["energy_j"].as_f64().expect("energy"));
    }
    // Active hosts draw power: energy grows from one sample to the next.
    assert!(energy[1] > energy[0], "{energy:?}");

    // An order shows up in flight, then done, without a new connection.
    let vm = "v3";
    let from = s.host_of(vm);
    let to = s
        .hosts_in("active")
        .into_iter()
        .find(|x| *x != from)
        .expect("another active host");
    let (st, row) = s.call(
        "POST",
        "/migrations",
        Some(&format!(r#"{{"vm":"{vm}","destination":"{to}"}}"#)),
    );
    assert_eq!(st, 201, "{row}");
    let id = row["id"].clone();
    let seen = (0..10).map(|_| next_event(&mut lines)).find(|v| {
        arr(&v["in_flight"])
            .iter()
            .any(|m| m["id"] == id && m["vm"] == vm && m["destination"] == to.as_str())
    });
    assert!(seen.is_some(), "the migration never showed in flight");
    s.fake.step();
    s.ctl.lock().expect("ctl").tick().expect("tick");
    let ended = (0..10).map(|_| next_event(&mut lines)).find(|v| {
        arr(&v["in_flight"]).is_empty()
            && arr(&v["done"])
                .iter()
                .any(|m| m["id"] == id && m["state"] == "done")
    });
    let ended = ended.expect("the migration never showed done");
    let on = arr(&ended["vms"])
        .iter()
        .find(|x| x["vm"] == vm)
        .expect("listed");
    assert_eq!(on["host"], to.as_str());
    // The sample that saw it end counts it in its chart point.
    assert_eq!(ended["point"]["migrations"], 1);
}

/// The next `state` event's JSON (keep-alive comments skipped).
fn next_event(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Value {
    let mut event = None;
    let mut data = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if line.is_empty() && !data.is_empty() {
            break;
        }
        if let Some(e) = line.strip_prefix("event: ") {
            event = Some(e.to_owned());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        } else {
            assert!(line.is_empty() || line.starts_with(':'), "{line:?}");
        }
    }
    assert_eq!(event.as_deref(), Some("state"));
    serde_json::from_str(&data).expect("event data is JSON")
}

#[test]
fn a_migration_is_counted_once_and_a_new_reader_counts_the_store_again() {
    let s = start();
    let (_, migrations) = s.call("GET", "/migrations", None);
    let done = arr(&migrations)
        .iter()
        .filter(|r| r["state"] == "done")
        .count();
    let (_, decisions) = s.call("GET", "/decisions?limit=1000", None);
    let mut ctl = s.ctl.lock().expect("ctl");
    // A reader started afresh (as after a restart of the controller) counts every ended
    // migration in the store once, and nothing more on the next sync.
    let m = ControllerMetrics::new(0.0);
    assert_eq!(m.sync(&mut ctl).expect("sync"), done);
    assert_eq!(m.sync(&mut ctl).expect("sync"), 0);
    let text = m.render(&ctl.hosts(), ctl.vms(), 0, None);
    let e = prom_text::parse(&text).expect("parses");
    let l = [("transport", "classic"), ("result", "done")];
    assert_eq!(e.value("fastmig_migrations_total", &l), done as f64);
    assert_eq!(
        e.value("fastmig_decision_seconds_count", &[]),
        arr(&decisions).len() as f64
    );
    // Without an energy figure, no energy family.
    assert!(!e.types.contains_key("fastmig_cluster_energy_joules"));
    assert_eq!(m.recent().len(), done);
}
