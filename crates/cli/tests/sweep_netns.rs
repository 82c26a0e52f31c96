//! `fastmig bench sweep` leaves no namespace, veth or qdisc behind, also when a migration in
//! it fails and when it is interrupted. Needs root (network namespaces, `tc`) and
//! `/dev/kvm`; without them the tests say so and return.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let kvm = Path::new("/dev/kvm").exists();
    if !root || !kvm {
        eprintln!("skipped: needs root and /dev/kvm (root {root}, kvm {kvm})");
    }
    root && kvm
}

/// Namespaces and links of the sweep with this pid, in any namespace listing and in the
/// root namespace's link list (a qdisc cannot outlive its link).
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("fmsw-{pid}-");
    let dev = [format!("fmswS{pid}"), format!("fmswD{pid}")];
    let mut out = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let o = Command::new("ip").args(args).output().expect("ip");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.contains(&tag) || dev.iter().any(|d| line.contains(d.as_str())) {
                out.push(line.to_string());
            }
        }
    }
    let q = Command::new("tc")
        .args(["qdisc", "show"])
        .output()
        .expect("tc");
    for line in String::from_utf8_lossy(&q.stdout).lines() {
        if dev.iter().any(|d| line.contains(d.as_str())) {
            out.push(line.to_string());
        }
    }
    out
}

/// One run that fails (a dirtying VM that may take a single round and wait: it cannot meet
/// a zero downtime limit, so the engine fails with NotConverged), then one that completes.
const GRID: &str = r#"{
  "repeat": 1,
  "train": [{
    "mem": ["32M"],
    "workload": [{"pattern": "random", "rate": 20000, "wss": "8M"}],
    "link": ["64M"],
    "transport": ["classic"],
    "downtime_limit": ["0ms"],
    "on_no_converge": "wait",
    "max_rounds": 2
  }, {
    "mem": ["32M"],
    "workload": [{"pattern": "random", "rate": 0, "wss": "4M"}],
    "link": ["64M"],
    "transport": ["classic"]
  }]
}"#;

#[test]
fn a_failed_migration_leaves_no_link_behind() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let grid = dir.path().join("grid.json");
    std::fs::write(&grid, GRID).expect("grid");
    let child = Command::new(env!("CARGO_BIN_EXE_fastmig"))
        .args(["bench", "sweep", "--warmup-s", "0.5", "--grid"])
        .arg(&grid)
        .arg("--out")
        .arg(dir.path())
        .spawn()
        .expect("start sweep");
    let pid = child.id();
    let out = child.wait_with_output().expect("sweep");
    assert!(
        out.status.success(),
        "the sweep records a failed run and goes on"
    );
    let csv = std::fs::read_to_string(dir.path().join("sweep.csv")).expect("csv");
    assert!(csv.contains(",failed,"), "the first run failed: {csv}");
    assert!(csv.contains(",completed,"), "the second completed: {csv}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
    assert!(dir.path().join("chart-mem.svg").exists());
}

#[test]
fn an_interrupted_sweep_leaves_no_link_behind_and_resumes() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let grid = dir.path().join("grid.json");
    // Three idle runs over the emulated link.
    std::fs::write(
        &grid,
        GRID.replace("\"rate\": 20000", "\"rate\": 0")
            .replace("\"max_rounds\": 2", "\"max_rounds\": 30")
            .replace("[\"32M\"]", "[\"32M\", \"48M\"]"),
    )
    .expect("grid");
    let sweep = || {
        Command::new(env!("CARGO_BIN_EXE_fastmig"))
            .args(["bench", "sweep", "--warmup-s", "0.5", "--grid"])
            .arg(&grid)
            .arg("--out")
            .arg(dir.path())
            .spawn()
            .expect("start sweep")
    };
    let child = sweep();
    let pid = child.id();
    // Wait until its link exists, then Ctrl-C (SIGINT to the sweep only).
    let deadline = Instant::now() + Duration::from_secs(60);
    while leftovers(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sweep never created its link"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = child.wait_with_output().expect("sweep");
    assert!(!out.status.success(), "an interrupted sweep exits non-zero");
    assert_eq!(leftovers(pid), Vec::<String>::new());
    let rows = |p: &Path| {
        std::fs::read_to_string(p.join("sweep.csv"))
            .map(|s| s.lines().count().saturating_sub(1))
            .unwrap_or(0)
    };
    let kept = rows(dir.path());
    assert!(kept < 4, "interrupted before the end ({kept} rows)");
    // Resuming does the rest only: four runs in all, none twice.
    let again = sweep();
    let pid2 = again.id();
    assert!(again.wait_with_output().expect("sweep").status.success());
    assert_eq!(rows(dir.path()), 4);
    assert_eq!(leftovers(pid2), Vec::<String>::new());
}
