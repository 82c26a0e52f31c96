//! `fastmig migrate --dry-run` and `migrate --json --model` on a real small VM: the model's
//! inputs are measured on the running VM (its memory, page-write rate and working set), the
//! dry run migrates nothing, and a real migration carries the prediction made at its start
//! beside what it measured.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use common::*;
use serde_json::Value;

/// The project's fitted model.
fn model() -> String {
    format!(
        "{}/../../bench/characterisation/model.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

const MIB: u64 = 1 << 20;

/// One JSON object on stdout.
fn one_json(out: &Finished) -> Value {
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "want one JSON line: {out:?}");
    serde_json::from_str(lines[0]).expect("JSON")
}

/// The measured inputs of a VM running `dirty:rate=2000,wss=8M,pattern=random` in 32 MiB.
fn check_measured(m: &Value) {
    assert_eq!(m["mem_bytes"].as_u64(), Some(32 * MIB), "{m}");
    assert_eq!(m["pattern"], "random", "{m}");
    assert_eq!(m["write_rate_source"], "guest", "{m}");
    // The guest is paced at 2000 writes/s; a loaded machine may slow it, never speed it up.
    let w = m["write_pps"].as_f64().expect("write_pps");
    assert!(w > 200.0 && w <= 2000.0 * 1.1, "write rate {w}");
    // 2000 random writes/s over 2048 pages for 5 s touch nearly all of them
    // (2048 (1 - e^(-10000/2048)) = 2032), never more than the set plus a few pages of the
    // guest's own stack and mailbox.
    let wss = m["wss_bytes"].as_u64().expect("wss_bytes");
    assert!(
        wss > 4 * MIB && wss <= 8 * MIB + 64 * 1024,
        "working set {wss}"
    );
}

#[test]
fn dry_run_predicts_from_the_running_vm_and_migrates_nothing() {
    require_kvm();
    let dir = workdir();
    let to = format!("127.0.0.1:{}", free_port());
    // Every page non-zero, as the model assumes of a VM it cannot look into.
    let src = Proc::run_with(
        dir.path(),
        "src",
        "32M",
        "dirty:rate=2000,wss=8M,pattern=random",
        &["--prefill"],
    );
    let m = model();
    let out = migrate(
        dir.path(),
        &src,
        &to,
        &[
            "--dry-run",
            "--model",
            &m,
            "--transport",
            "multi-tcp",
            "--link",
            "1gbit",
            "--json",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}\nsource log: {}", src.log());
    let v = one_json(&out);
    check_measured(&v["measured"]);
    let s = &v["scenario"];
    assert_eq!(s["transport"], "multi-tcp");
    assert_eq!(s["link_bytes_s"].as_f64(), Some(125e6));
    assert_eq!(s["downtime_limit_s"].as_f64(), Some(0.03), "engine default");
    let p = &v["prediction"];
    // Every page is sent at least once: 8192 pages of 4096 bytes plus framing.
    assert!(p["bytes"].as_u64().expect("bytes") >= 32 * MIB);
    assert_eq!(p["converges"], true, "{p}");
    // Bound by the 1 Gbit/s link: 32 MiB / (125 MB/s × efficiency < 1) > 268 ms.
    assert_eq!(p["bound"], "link", "{p}");
    assert!(p["total_ms"].as_f64().expect("total") > 268.0, "{p}");
    // Nothing migrated: the VM still runs here and no migration was started.
    assert_eq!(src.status()["status"], "running");
    let q = api(&src.api, "query-migrate", serde_json::json!({})).expect("query-migrate");
    assert_eq!(q["status"], "none", "{q}");

    // Half the CPU, no link: bound by the transport's CPU rate, halved, so the first pass
    // alone (32 MiB at half the fitted multi-tcp rate) takes twice as long as at full share.
    let half = |share: &str| {
        let out = migrate(
            dir.path(),
            &src,
            &to,
            &[
                "--dry-run",
                "--model",
                &m,
                "--transport",
                "multi-tcp",
                "--cpu-share",
                share,
                "--json",
            ],
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        one_json(&out)
    };
    let (full, halved) = (half("1"), half("0.5"));
    assert_eq!(halved["prediction"]["bound"], "cpu");
    let rate = |v: &Value| v["prediction"]["rate_bytes_s"].as_f64().expect("rate");
    assert!((rate(&halved) * 2.0 - rate(&full)).abs() < 1e-6 * rate(&full));
    assert!(halved["prediction"]["total_ms"].as_f64() > full["prediction"]["total_ms"].as_f64());
    migrate(
        dir.path(),
        &src,
        &to,
        &["--dry-run", "--model", &m, "--cpu-share", "0"],
    )
    .assert_one_line_exit(2, &["cpu share"]);

    // The text form names the measured inputs and the prediction.
    let text = migrate(
        dir.path(),
        &src,
        &to,
        &["--dry-run", "--model", &m, "--sample", "300ms"],
    );
    assert_eq!(text.code, Some(0), "{text:?}");
    assert!(
        text.stdout.contains("measured on the VM: 32 MiB"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("predicted migration (classic"),
        "{}",
        text.stdout
    );

    // Without a model the dry run is refused with a hint, and nothing starts.
    let refused = migrate(dir.path(), &src, &to, &["--dry-run"]);
    refused.assert_one_line_exit(2, &["--model"]);
    let missing = migrate(
        dir.path(),
        &src,
        &to,
        &["--dry-run", "--model", "/nonexistent/model.json"],
    );
    missing.assert_one_line_exit(2, &["model"]);
    assert_eq!(src.status()["status"], "running");
}

#[test]
fn migrate_json_with_a_model_carries_the_prediction_beside_the_measured_values() {
    require_kvm();
    let dir = workdir();
    let to = format!("127.0.0.1:{}", free_port());
    // Every page non-zero, as the model assumes of a VM it cannot look into.
    let src = Proc::run_with(
        dir.path(),
        "src",
        "32M",
        "dirty:rate=2000,wss=8M,pattern=random",
        &["--prefill"],
    );
    let dst = Proc::incoming(dir.path(), "dst", &to, "32M", &[]);
    let m = model();
    let out = migrate(
        dir.path(),
        &src,
        &to,
        &[
            "--model",
            &m,
            "--json",
            "--downtime-limit",
            "30ms",
            "--on-no-converge",
            "force",
        ],
    );
    assert_eq!(
        out.code,
        Some(0),
        "{out:?}\nsource log: {}\ndestination log: {}",
        src.log(),
        dst.log()
    );
    let v = one_json(&out);
    assert_eq!(v["status"], "completed");
    let pred = &v["prediction"];
    check_measured(&pred["measured"]);
    let p = &pred["predicted"];
    assert_eq!(p["transport"], "classic");
    // The errors are the prediction against this very summary.
    let (pt, mt) = (
        p["total_ms"].as_f64().expect("predicted total"),
        v["total_ms"].as_f64().expect("measured total"),
    );
    let err = pred["error"]["total"].as_f64().expect("total error");
    assert!(((pt - mt) / mt - err).abs() < 1e-9, "{pred}");
    let (pb, mb) = (
        p["bytes"].as_f64().expect("predicted bytes"),
        v["bytes_sent"].as_f64().expect("measured bytes"),
    );
    let berr = pred["error"]["bytes"].as_f64().expect("bytes error");
    assert!(((pb - mb) / mb - berr).abs() < 1e-9, "{pred}");
    // Bytes do not depend on the machine's load: the model gets them within 15 %.
    assert!(berr.abs() < 0.15, "bytes predicted {pb}, sent {mb}");
    dst.wait_status("running", PATIENCE);
}
