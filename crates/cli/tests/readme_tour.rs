//! README's quick tour, extracted from README.md (between the `quick-tour` markers) and run
//! exactly as written, as one block under `set -e`, in a clean temporary directory with the
//! built `fastmig` first on `PATH`. It starts KVM guests and fails without /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The shell lines between the markers, without the code fence.
fn quick_tour() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let start = text
        .find("<!-- quick-tour:begin -->")
        .expect("README has a quick-tour:begin marker");
    let end = text
        .find("<!-- quick-tour:end -->")
        .expect("README has a quick-tour:end marker");
    let block: Vec<&str> = text[start..end]
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("```"))
        .collect();
    assert!(
        block.iter().any(|l| l.starts_with("fastmig ")),
        "the tour has commands: {block:?}"
    );
    block.join("\n") + "\n"
}

#[test]
fn the_readme_quick_tour_runs_as_one_block() {
    require_kvm();
    let dir = workdir();
    let tour = quick_tour();
    let bin_dir = Path::new(bin()).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out_path = dir.path().join("tour.stdout");
    let err_path = dir.path().join("tour.stderr");
    // Files, not pipes: the daemonized VM processes inherit stderr and would hold a pipe open.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("set -e\n{tour}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("bash runs");
    let status = wait_until("the tour to finish", Duration::from_secs(180), || {
        child.try_wait().expect("wait")
    });
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    // Whatever happened, leave no VM process behind.
    for sock in ["src.sock", "dst.sock"] {
        let p = dir.path().join(sock);
        if p.exists() {
            let _ = api(&p, "quit", serde_json::json!({}));
        }
    }
    assert!(
        status.success(),
        "the quick tour failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Each command did its part.
    assert!(stdout.contains("status: running"), "{stdout}");
    assert!(stdout.contains("migration completed"), "{stdout}");
    assert!(stdout.contains("\"errors\": 0"), "{stdout}");
    wait_until("both VM processes to end", PATIENCE, || {
        (!dir.path().join("src.sock").exists() && !dir.path().join("dst.sock").exists())
            .then_some(())
    });
    // Their lock files go with them: the directory keeps nothing of theirs.
    wait_until("the lock files to go", PATIENCE, || {
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".lock"))
            .collect();
        left.is_empty().then_some(())
    });
}
