//! `verify-memory` can fail: after a real migration, one page of the destination's guest
//! memory is changed from outside the process (through its guest memfd, found in
//! `/proc/PID/fd`), and `verify-memory` must report exactly that page; with the page put
//! back, it must be clean again. Without this, a checker that always says "0 errors" would
//! pass every migration test.
//!
//! What `verify-memory` checks: the 16-byte stamp (sequence number, frame number) at the
//! start of every working-set page of a `verify` workload, against a replay of the guest's
//! writes. Bytes after the stamp and pages outside the working set are not its business (the
//! migration digest covers every byte of every page in transit).
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use serde_json::{json, Value};

const MEM: &str = "32M";
/// 8 MiB working set: 2048 pages from `DATA_BASE`.
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";
const WSS_PAGES: u64 = (8 << 20) / 4096;
/// Where the working set starts (`fastmig_vmm::guest::DATA_BASE`).
const DATA_BASE: u64 = fastmig_vmm::guest::DATA_BASE;
/// The working-set page to tamper with.
const PAGE_INDEX: u64 = 100;

fn errors(r: &Value) -> u64 {
    r["errors"].as_u64().expect("errors")
}

#[test]
fn verify_memory_names_the_one_page_tampered_with_on_the_destination() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run(dir.path(), "src", MEM, WORKLOAD);
    src.wait_progress_above(src.progress() + 1000);
    let to = format!("127.0.0.1:{}", free_port());
    let dst = Proc::incoming(dir.path(), "dst", &to, MEM, &[]);
    let out = migrate(dir.path(), &src, &to, &["--transport", "classic"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", dst.log());
    dst.wait_status("running", PATIENCE);

    // Freeze the guest so that it cannot rewrite the page between the tamper and the check.
    api(&dst.api, "stop", json!({})).expect("stop");
    dst.wait_status("paused", PATIENCE);
    let clean = dst.verify_memory();
    assert_eq!(errors(&clean), 0, "before tampering: {clean}");
    assert_eq!(clean["pages_checked"].as_u64(), Some(WSS_PAGES), "{clean}");

    let gpa = DATA_BASE + PAGE_INDEX * 4096;
    let mem = dst.open_guest_memfd();
    let mut stamp = [0u8; 16];
    mem.read_exact_at(&mut stamp, gpa).expect("read the stamp");
    // A sequence number the guest has not reached, with the right frame number: only the
    // sequence check can object.
    let mut forged = stamp;
    forged[..8].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
    forged[8..].copy_from_slice(&(gpa / 4096).to_le_bytes());
    mem.write_all_at(&forged, gpa)
        .expect("tamper with the page");

    let bad = dst.verify_memory();
    assert_eq!(errors(&bad), 1, "after tampering with page {gpa:#x}: {bad}");
    assert_eq!(bad["pages_checked"], clean["pages_checked"], "{bad}");
    let named: Vec<&str> = bad["first_errors"]
        .as_array()
        .expect("first_errors")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(named.len(), 1, "{bad}");
    assert!(
        named[0].contains(&format!("page {gpa:#x}:")),
        "the report should name page {gpa:#x}: {}",
        named[0]
    );
    assert!(
        named[0].contains(&format!("found seq {}", u64::MAX / 3)),
        "{}",
        named[0]
    );

    // Put the page back: clean again, so the one error was that page and nothing else.
    mem.write_all_at(&stamp, gpa).expect("restore the page");
    let again = dst.verify_memory();
    assert_eq!(errors(&again), 0, "after restoring: {again}");

    // The guest carries on from there after `cont`.
    api(&dst.api, "cont", json!({})).expect("cont");
    let p = dst.wait_status("running", PATIENCE)["progress"]
        .as_u64()
        .expect("progress");
    dst.wait_progress_above(p);
    dst.assert_memory_intact();
}
