//! The digest at process level: a proxy leaves one page frame out of a classic stream. Every
//! other frame passes unchanged with its own valid CRC and the classic stream counts no
//! frames, so the destination's frame checks see a well-formed stream; only the page-hash
//! digest in `Complete` can tell that one page never arrived. The migration must fail, the
//! source keep the VM (running, memory intact), and the destination never resume it.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;

const MEM: &str = "32M";
/// The working set ends at 64 KiB + 8 MiB; `--prefill` gives every page above it non-zero,
/// page-unique bytes that the guest never writes again, so a page there is sent exactly once.
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";
/// Drop the first data page frame at or above this address (outside the working set).
const DROP_FROM: u64 = 16 << 20;

#[test]
fn dropped_page_frame_is_caught_by_the_digest_only() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run_with(dir.path(), "src", MEM, WORKLOAD, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    let port = free_port();
    let mut dst = Proc::incoming(dir.path(), "dst", &format!("127.0.0.1:{port}"), MEM, &[]);

    // The gpa of the dropped frame, and every later frame for the same gpa.
    let dropped: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let resent = Arc::new(Mutex::new(0u32));
    let (d2, r2) = (dropped.clone(), resent.clone());
    let rule: FrameRule = Arc::new(move |dir, f| {
        let Some(gpa) = f.data_page_gpa().filter(|_| dir == Dir::ToDestination) else {
            return Verdict::Forward;
        };
        let mut d = d2.lock().expect("lock");
        match *d {
            None if gpa >= DROP_FROM => {
                *d = Some(gpa);
                Verdict::Drop
            }
            Some(g) if g == gpa => {
                *r2.lock().expect("lock") += 1;
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    });
    let proxy = FrameProxy::start(port, rule);
    let out = migrate(
        dir.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic"],
    );
    let gpa = dropped
        .lock()
        .expect("lock")
        .unwrap_or_else(|| panic!("no data page at or above {DROP_FROM:#x} was sent: {out:?}"));
    // The page was never sent again, so nothing but the digest can notice it is missing.
    assert_eq!(
        *resent.lock().expect("lock"),
        0,
        "page {gpa:#x} was re-sent"
    );
    assert_eq!(
        proxy.kinds(Dir::ToDestination, Verdict::Drop),
        [page_kind()]
    );
    // The stream reached its end: the destination judged a complete, well-framed migration.
    assert!(
        proxy
            .kinds(Dir::ToDestination, Verdict::Forward)
            .contains(&complete_kind()),
        "the stream never reached Complete: {out:?}"
    );
    out.assert_failed_with(&["digest", "still runs on the source"]);
    assert!(
        !proxy
            .kinds(Dir::ToDestination, Verdict::Forward)
            .contains(&commit_kind()),
        "the source committed a migration whose digest did not match"
    );
    drop(proxy);
    assert_eq!(
        api(&src.api, "query-migrate", json!({})).expect("query-migrate")["status"],
        "failed"
    );
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
    let log = dst.log().to_lowercase();
    assert!(
        log.contains("digest") && !log.contains("checksum"),
        "the destination should blame the digest, not a frame checksum: {log}"
    );
}

/// Migrates through a [`FrameProxy`] that forwards every frame and checks the VM arrived.
fn transparent(transport: &str, extra: &[&str]) {
    require_kvm();
    let dir = workdir();
    let src = Proc::run_with(dir.path(), "src", MEM, WORKLOAD, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    let port = free_port();
    let dst = Proc::incoming(dir.path(), "dst", &format!("127.0.0.1:{port}"), MEM, &[]);
    let proxy = FrameProxy::start(port, Arc::new(|_, _| Verdict::Forward));
    let mut args = vec!["--transport", transport];
    args.extend_from_slice(extra);
    let out = migrate(
        dir.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &args,
    );
    assert_eq!(out.code, Some(0), "{out:?}\n{}", dst.log());
    for kind in [complete_kind(), commit_kind()] {
        assert!(proxy
            .kinds(Dir::ToDestination, Verdict::Forward)
            .contains(&kind));
    }
    assert!(proxy
        .kinds(Dir::ToSource, Verdict::Forward)
        .contains(&ready_kind()));
    drop(proxy);
    let p = dst.wait_status("running", PATIENCE)["progress"]
        .as_u64()
        .expect("progress");
    dst.wait_progress_above(p);
    dst.assert_memory_intact();
    assert_eq!(src.status()["status"], "postmigrate");
}

/// The control for the test above: through the same proxy forwarding every frame, the same
/// migration succeeds and the VM arrives intact, so the failure above is the dropped frame's.
#[test]
fn frame_proxy_forwarding_everything_is_transparent() {
    transparent("classic", &[]);
}

/// The same for multi-tcp, whose data streams the proxy copies as bytes (the two-phase
/// tests use it on the control stream).
#[test]
fn frame_proxy_forwarding_everything_is_transparent_multi_tcp() {
    transparent("multi-tcp", &["--streams", "2"]);
}
