//! `fastmig experiment consolidation --quick`: the three scenarios run on a real testbed
//! (4 hosts, 12 `verify` VMs, the generated trace), every VM ends on exactly one host with
//! clean memory in each, and the JSON's fields are present and consistent: no migration and
//! the most energy without consolidation, migrations that completed with both transports.
//!
//! Needs root (namespaces, a bridge, `tc`), `/dev/kvm` and `ip netns`, and fails loudly
//! without them; holds the testbed lock (`testbed_lock`) while it runs. About 4 minutes. A
//! SIGTERM in the middle of a run brings its testbed down and exits 1.

mod common;
mod testbed_lock;

use std::process::{Command, Stdio};

use serde_json::Value;

fn num(s: &Value, key: &str) -> f64 {
    let v = s[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: {key} missing or not a number: {s}", s["name"]));
    assert!(v.is_finite() && v >= 0.0, "{}: {key} = {v}", s["name"]);
    v
}

#[test]
fn the_quick_consolidation_experiment_runs_three_scenarios_and_loses_no_vm() {
    common::require_root_kvm_netns("the experiment tests");
    let _lock = testbed_lock::lock();
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("out");
    let dir = work.path().join("testbed");
    let o = Command::new(common::bin())
        .args(["experiment", "consolidation", "--quick", "--json", "--out"])
        .arg(&out)
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("spawn fastmig");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}: {stderr}", o.status.code());
    // Progress went to stderr, one line per scenario at least.
    for n in 1..=3 {
        assert!(stderr.contains(&format!("scenario {n} of 3")), "{stderr}");
    }
    assert_testbed_gone(&dir);

    let e: Value = serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    // The same object was written to OUT, with the Markdown table.
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("saved"))
            .expect("saved JSON");
    assert_eq!(saved, e);
    assert!(std::fs::read_to_string(out.join("results.md"))
        .expect("table")
        .contains("| energy (kWh) |"));
    assert_eq!(e["hosts"], 4);
    assert_eq!(e["vms"], 12);
    let compression = e["compression"].as_f64().expect("compression");
    let window = e["window_s"].as_f64().expect("window");
    let scenarios = e["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["none", "classic-2011", "fast"]);

    for s in scenarios {
        for key in [
            "active_host_hours",
            "energy_kwh",
            "overload_s",
            "violation_s",
            "slatah",
            "pdm",
            "total_migration_s",
            "total_downtime_ms",
            "migration_cpu_s",
            "predicted_active_host_hours",
            "predicted_energy_kwh",
            "predicted_violation_s",
            "predicted_slatah",
            "predicted_pdm",
        ] {
            num(s, key);
        }
        assert!(
            s["migrations"].is_u64() && s["predicted_migrations"].is_u64(),
            "{s}"
        );
        assert!(num(s, "slatah") <= 1.0 && num(s, "predicted_slatah") <= 1.0);
        // Violation is overload or receiving a migration.
        assert!(num(s, "violation_s") >= num(s, "overload_s"));
        // Host time cannot exceed every host active for the whole window.
        assert!(num(s, "active_host_hours") <= 4.0 * window * compression / 3600.0 * 1.01);
        assert!(num(s, "energy_kwh") > 0.0 && num(s, "predicted_energy_kwh") > 0.0);
        // Every VM ended on exactly one host, running, its memory checked clean.
        let vms = s["vms"].as_array().expect("vms");
        assert_eq!(vms.len(), 12, "{}", s["name"]);
        let mut seen: Vec<&str> = vms.iter().map(|v| v["vm"].as_str().expect("vm")).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 12);
        for v in vms {
            assert_eq!(v["hosts"].as_array().map(Vec::len), Some(1), "{v}");
            assert_eq!(v["status"], "running", "{v}");
            assert!(v["pages_checked"].as_u64() > Some(0), "{v}");
            assert_eq!(v["memory_clean"], true, "{v}");
        }
    }

    let [none, classic, fast] = [&scenarios[0], &scenarios[1], &scenarios[2]];
    // No consolidation: no migration, every host active for the whole window (the first
    // sample may come a second late).
    assert_eq!(none["migrations"], 0);
    assert_eq!(none["predicted_migrations"], 0);
    assert_eq!(num(none, "total_migration_s"), 0.0);
    assert_eq!(num(none, "violation_s"), num(none, "overload_s"));
    assert_eq!(num(none, "pdm"), 0.0);
    let full = 4.0 * window * compression / 3600.0;
    assert!(
        (num(none, "active_host_hours") - full).abs() <= 0.05 * full,
        "{} of {full}",
        none["active_host_hours"]
    );
    // Consolidation parks hosts: less energy than none, measured.
    for s in [classic, fast] {
        assert!(
            num(none, "energy_kwh") > num(s, "energy_kwh"),
            "none {} vs {} {}",
            none["energy_kwh"],
            s["name"],
            s["energy_kwh"]
        );
        assert!(num(s, "active_host_hours") < num(none, "active_host_hours"));
        // Migrations completed, with their time, downtime and CPU recorded.
        let n = s["migrations"].as_u64().expect("migrations");
        assert!(n > 0, "{}: no migration completed", s["name"]);
        assert!(s["failed_migrations"].is_u64());
        assert!(num(s, "total_migration_s") > 0.0);
        assert!(num(s, "total_downtime_ms") > 0.0);
        assert!(num(s, "migration_cpu_s") > 0.0);
        assert!(num(s, "total_downtime_ms") < num(s, "total_migration_s") * 1e3);
    }
    assert_eq!(classic["transport"], "classic");
    assert_eq!(classic["migration_bandwidth_bytes_s"], 32 << 20);
    assert_eq!(classic["downtime_limit_ms"], 300.0);
    assert_eq!(fast["downtime_limit_ms"], 30.0);
    assert!(fast["transport"]
        .as_str()
        .is_some_and(|t| t.starts_with("multi-tcp")));
    assert_eq!(fast["migration_bandwidth_bytes_s"], Value::Null);
}

#[test]
fn sigterm_mid_run_brings_the_testbed_down_and_exits_1() {
    common::require_root_kvm_netns("the experiment tests");
    let _lock = testbed_lock::lock();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("testbed");
    let child = Command::new(common::bin())
        .args(["experiment", "consolidation", "--quick", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fastmig");
    // Once the first scenario's testbed is up and measured for a while.
    let start = std::time::Instant::now();
    while !dir.join("testbed.json").exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no testbed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(5));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signals our own child process, by its id.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_testbed_gone(&dir);
}

/// Nothing of the testbed is left: neither its state file in `dir` nor any of its links.
fn assert_testbed_gone(dir: &std::path::Path) {
    assert!(!dir.join("testbed.json").exists(), "testbed left up");
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("fmtb"),
        "testbed links left behind"
    );
}
