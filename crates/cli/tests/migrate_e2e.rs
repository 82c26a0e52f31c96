//! Live migration between two real `fastmig` processes on loopback: `run` on the source,
//! `incoming` on the destination, `migrate --json` driving it. Checks that the VM continues on
//! the destination from where it stopped, its memory is intact, the source stays paused for
//! good, and the summary printed by `migrate --json` is complete and consistent.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use common::*;
use serde_json::{json, Value};

/// One migration to check: a source VM, a transport, and what the summary must show.
struct Case<'a> {
    mem: &'a str,
    workload: &'a str,
    transport: &'a str,
    extra: &'a [&'a str],
    /// Start the destination with `--mem` (memory prepared before the migration) or
    /// without (VM built from the source's announced layout).
    prepared: bool,
}

/// Migrates a `case.workload` VM from a `run` process to an `incoming` process and checks
/// both ends and the summary. Returns the summary.
fn migrate_and_check(case: &Case) -> Value {
    require_kvm();
    let dir = workdir();
    let to = match case.transport {
        "shm" | "handover" => format!("unix:{}", dir.path().join("mig.sock").display()),
        _ => format!("127.0.0.1:{}", free_port()),
    };
    let src = Proc::run(dir.path(), "src", case.mem, case.workload);
    let mut dst = if case.prepared {
        Proc::incoming(dir.path(), "dst", &to, case.mem, &[])
    } else {
        Proc::incoming_with(dir.path(), "dst", &to, &[])
    };
    assert_eq!(dst.status()["status"], "inmigrate");
    // Let the guest run a little on the source, so there is progress to carry over.
    let before = src.progress();
    src.wait_progress_above(before);

    let mut args = vec!["--transport", case.transport, "--json"];
    args.extend_from_slice(case.extra);
    let out = migrate(dir.path(), &src, &to, &args);
    assert_eq!(
        out.code,
        Some(0),
        "migrate failed: {out:?}\nsource log: {}\ndestination log: {}",
        src.log(),
        dst.log()
    );

    // Exactly one JSON object on stdout.
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "want one JSON line: {:?}", out.stdout);
    let summary: Value = serde_json::from_str(lines[0]).expect("summary is JSON");
    check_summary(&summary, case);

    // The source is paused for good and refuses to run the VM a second time.
    let src_last = src.wait_status("postmigrate", PATIENCE);
    let src_progress = src_last["progress"].as_u64().expect("progress");
    let refused = api(&src.api, "cont", json!({})).expect_err("cont after migration");
    assert!(
        refused.to_string().contains("migrated"),
        "cont refusal should say why: {refused}"
    );
    assert_eq!(src.status()["status"], "postmigrate");
    // Nor will it migrate the VM a second time.
    let again = migrate(dir.path(), &src, &to, &["--transport", case.transport]);
    again.assert_one_line_exit(2, &["not started"]);
    // Still paused a moment later: its progress does not move.
    let dst_first = dst.wait_status("running", PATIENCE);
    let dst_progress = dst_first["progress"].as_u64().expect("progress");
    assert!(
        dst_progress >= src_progress,
        "destination progress {dst_progress} is behind the source's last {src_progress}"
    );
    // The guest keeps going on the destination...
    dst.wait_progress_above(dst_progress);
    // ...and not on the source.
    assert_eq!(
        src.progress(),
        src_progress,
        "the source VM moved after migrating"
    );

    // Only a `verify` guest stamps its pages in a checkable way; the others are refused.
    if case.workload.starts_with("verify") {
        dst.assert_memory_intact();
    } else {
        let refused = api(&dst.api, "verify-memory", json!({})).expect_err("not a verify VM");
        assert!(refused.to_string().contains("verify"), "{refused}");
    }
    assert!(dst.is_alive(), "destination died: {}", dst.log());
    summary
}

fn check_summary(s: &Value, case: &Case) {
    let num = |k: &str| -> f64 {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("summary field `{k}` missing or not a number: {s}"))
    };
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["transport"], case.transport, "{s}");
    assert_eq!(s["digest_match"], true, "{s}");
    let total = num("total_ms");
    let downtime = num("downtime_ms");
    let setup = num("setup_ms");
    assert!(total > 0.0, "{s}");
    assert!(
        downtime > 0.0 && downtime <= total,
        "downtime vs total: {s}"
    );
    // Setup (connect, handshake, transport) takes time and is part of the total.
    assert!(setup > 0.0 && setup < total, "setup vs total: {s}");
    let rounds = num("rounds");
    assert_eq!(rounds.fract(), 0.0, "rounds is a count: {s}");
    let pages = num("pages_sent");
    let bytes = num("bytes_sent");
    let throughput = num("throughput_mib_s");
    if case.transport == "handover" {
        // The memory itself changes hands: nothing is copied, there are no rounds.
        assert_eq!((rounds, pages, bytes), (0.0, 0.0, 0.0), "{s}");
        // No page bytes moved, so no throughput can be claimed.
        assert_eq!(throughput, 0.0, "{s}");
    } else {
        assert!((1.0..=30.0).contains(&rounds), "rounds: {s}");
        assert!(pages > 0.0, "{s}");
        assert!(throughput > 0.0, "{s}");
    }
    if matches!(case.transport, "classic" | "multi-tcp") {
        // Every sent page travels in full, plus framing.
        assert!(
            bytes >= pages * 4096.0,
            "bytes_sent {bytes} < pages_sent {pages} x 4096: {s}"
        );
    }
    let src_cpu = num("src_cpu_s");
    let dst_cpu = num("dst_cpu_s");
    assert!(src_cpu > 0.0, "the source must have spent some CPU: {s}");
    assert!(
        dst_cpu > 0.0,
        "the destination must have spent some CPU: {s}"
    );
    // CPU per side cannot exceed wall time times the two cores of this machine by much.
    assert!(
        src_cpu * 1e3 <= total * 4.0 + 100.0,
        "src_cpu_s vs total: {s}"
    );
}

#[test]
fn classic_migrates_an_idle_vm() {
    let s = migrate_and_check(&Case {
        mem: "32M",
        workload: "idle",
        transport: "classic",
        extra: &[],
        prepared: true,
    });
    // An idle guest dirties almost nothing: the first pass is (nearly) all there is.
    assert!(s["rounds"].as_u64().is_some_and(|r| r <= 5), "{s}");
}

#[test]
fn classic_migrates_a_dirtying_vm() {
    migrate_and_check(&Case {
        mem: "64M",
        workload: "dirty:rate=3000,wss=8M,pattern=random",
        transport: "classic",
        extra: &[],
        prepared: true,
    });
}

#[test]
fn classic_migrates_a_verify_vm_page_for_page() {
    migrate_and_check(&Case {
        mem: "64M",
        workload: "verify:rate=3000,wss=8M,pattern=hotcold",
        transport: "classic",
        extra: &[],
        prepared: true,
    });
}

#[test]
fn multi_tcp_migrates_a_verify_vm() {
    let s = migrate_and_check(&Case {
        mem: "64M",
        workload: "verify:rate=3000,wss=8M,pattern=random",
        transport: "multi-tcp",
        extra: &["--streams", "2"],
        prepared: true,
    });
    assert_eq!(s["transport"], "multi-tcp");
}

#[test]
fn shm_migrates_a_verify_vm_over_a_unix_socket() {
    migrate_and_check(&Case {
        mem: "64M",
        workload: "verify:rate=3000,wss=8M,pattern=seq",
        transport: "shm",
        extra: &[],
        prepared: true,
    });
}

#[test]
fn destination_without_mem_builds_the_vm_from_the_source_layout() {
    migrate_and_check(&Case {
        mem: "32M",
        workload: "verify:rate=2000,wss=4M,pattern=random",
        transport: "classic",
        extra: &[],
        prepared: false,
    });
}

#[test]
fn handover_passes_the_memory_itself() {
    let s = migrate_and_check(&Case {
        mem: "64M",
        workload: "verify:rate=3000,wss=8M,pattern=random",
        transport: "handover",
        extra: &[],
        prepared: false,
    });
    assert_eq!(s["transport"], "handover");
}
