//! The two-phase end (`Complete` → `Ready` → `Commit` → `Resumed`) between real `fastmig`
//! processes, with a proxy that sees the classic stream frame by frame and breaks it at one
//! exact point. Whatever happens, the VM never runs on two sides; where the source cannot
//! know what the destination did (it sent `Commit` and heard no `Resumed`) it keeps the VM
//! paused, runs it on neither side, and `migrate` says "in doubt" instead of "still runs on
//! the source".
//!
//! | fault                                            | source            | destination      |
//! |--------------------------------------------------|-------------------|------------------|
//! | killed once the source sent `Complete` (classic and multi-tcp) | resumes, intact | dead, never ran |
//! | killed once it wrote `Ready` (never delivered)   | resumes, intact   | dead, never ran  |
//! | killed after `Ready` arrived, `Commit` in flight | paused, in doubt  | dead, never ran  |
//! | `Commit` swallowed, destination alive            | paused, in doubt  | times out, exits |
//! | `migrate-cancel` while `Ready` travels           | resumes, intact   | gets `Failed`    |
//! | source host killed once `Ready` was written      | (dead)            | EOF, never runs  |
//! | stopped (SIGSTOP) once it wrote `Ready`, continued later | paused, in doubt within its timeout + 1 s | resumes on `Commit`: the VM runs here only |
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

const MEM: &str = "32M";
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";

/// A running `verify` VM whose memory beyond the working set is filled, and has made progress.
fn source(dir: &std::path::Path) -> Proc {
    let src = Proc::run_with(dir, "src", MEM, WORKLOAD, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    src
}

/// A destination listening on a free loopback port; returns it and the port.
fn destination(dir: &std::path::Path) -> (Proc, u16) {
    let port = free_port();
    let dst = Proc::incoming(dir, "dst", &format!("127.0.0.1:{port}"), MEM, &[]);
    (dst, port)
}

/// A rule that SIGKILLs `pid` (and waits until it is dead) on the first frame of `kind`
/// travelling `dir`, then gives that frame `verdict`; every other frame is forwarded.
fn kill_on(pid: u32, dir: Dir, kind: u8, verdict: Verdict) -> (FrameRule, Arc<AtomicBool>) {
    let fired = Arc::new(AtomicBool::new(false));
    let flag = fired.clone();
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == dir && f.kind() == kind && !flag.swap(true, Ordering::SeqCst) {
            kill_and_wait_dead(pid);
            return verdict;
        }
        Verdict::Forward
    });
    (rule, fired)
}

/// After the destination died at `dir`/`kind`: `migrate` fails saying the VM still runs on
/// the source, and it does (progress, memory intact); the destination never resumed.
fn destination_killed_at(transport: &str, dir: Dir, kind: u8, verdict: Verdict) -> FrameProxy {
    require_kvm();
    let wd = workdir();
    let src = source(wd.path());
    let (mut dst, port) = destination(wd.path());
    let (rule, fired) = kill_on(dst.pid(), dir, kind, verdict);
    let proxy = FrameProxy::start(port, rule);
    let mut args = vec!["--transport", transport];
    if transport == "multi-tcp" {
        args.extend(["--streams", "2"]);
    }
    let out = migrate(wd.path(), &src, &format!("127.0.0.1:{}", proxy.port), &args);
    assert!(
        fired.load(Ordering::SeqCst),
        "the proxy never saw the frame: {out:?}"
    );
    out.assert_failed_with(&["migration failed", "still runs on the source"]);
    src.assert_still_runs_here();
    assert_eq!(
        api(&src.api, "query-migrate", json!({})).expect("query-migrate")["status"],
        "failed"
    );
    assert_destination_never_resumed(&mut dst);
    proxy
}

#[test]
fn destination_killed_after_complete_leaves_the_vm_on_the_source() {
    let proxy = destination_killed_at(
        "classic",
        Dir::ToDestination,
        complete_kind(),
        Verdict::Forward,
    );
    // The destination died before it could answer: no Ready ever came back.
    assert!(
        !proxy
            .kinds(Dir::ToSource, Verdict::Forward)
            .contains(&ready_kind()),
        "a Ready reached the source"
    );
    assert!(!proxy
        .kinds(Dir::ToDestination, Verdict::Forward)
        .contains(&commit_kind()));
}

/// Multi-tcp: the destination dies with its data-stream receivers joined and `Complete` in
/// flight on the control stream.
#[test]
fn destination_killed_after_complete_leaves_the_vm_on_the_source_multi_tcp() {
    let proxy = destination_killed_at(
        "multi-tcp",
        Dir::ToDestination,
        complete_kind(),
        Verdict::Forward,
    );
    // Two data streams were opened through the proxy besides the control stream.
    assert_eq!(
        proxy
            .kinds(Dir::ToDestination, Verdict::Forward)
            .iter()
            .filter(|&&k| k == data_hello_kind())
            .count(),
        2
    );
    assert!(!proxy
        .kinds(Dir::ToSource, Verdict::Forward)
        .contains(&ready_kind()));
}

#[test]
fn destination_killed_after_writing_ready_leaves_the_vm_on_the_source() {
    // The destination wrote Ready and died before it reached the source (the proxy holds
    // it back): the source never committed, so it resumes.
    let proxy = destination_killed_at("classic", Dir::ToSource, ready_kind(), Verdict::Drop);
    assert!(!proxy
        .kinds(Dir::ToDestination, Verdict::Forward)
        .contains(&commit_kind()));
}

/// What `migrate` and both sides show when `Commit` was sent and no `Resumed` came back.
fn assert_in_doubt(out: &Finished, src: &Proc) {
    let line = out.assert_failed_with(&["in doubt", "check the destination"]);
    assert!(
        !line.contains("still runs on the source"),
        "an in-doubt migration must not claim the VM runs on the source: {line}"
    );
    assert_eq!(
        api(&src.api, "query-migrate", json!({})).expect("query-migrate")["status"],
        "in-doubt"
    );
    // Paused for good on the source: no progress while the operator checks.
    let st = src.status();
    assert_eq!(st["status"], "paused", "{st}");
    let p = st["progress"].as_u64().expect("progress");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.progress(), p, "the in-doubt VM runs on the source");
}

/// Once the operator has made sure the destination does not run the VM, `cont` on the source
/// brings it back with its memory intact.
fn operator_resumes_the_source(src: &Proc) {
    api(&src.api, "cont", json!({})).expect("cont");
    src.assert_still_runs_here();
}

#[test]
fn destination_killed_after_ready_reached_the_source_is_in_doubt() {
    require_kvm();
    let wd = workdir();
    let src = source(wd.path());
    let (mut dst, port) = destination(wd.path());
    // The source got Ready and sent Commit; the destination dies before Commit reaches it.
    let (rule, fired) = kill_on(dst.pid(), Dir::ToDestination, commit_kind(), Verdict::Drop);
    let proxy = FrameProxy::start(port, rule);
    let out = migrate(
        wd.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic", "--json"],
    );
    assert!(fired.load(Ordering::SeqCst), "no Commit seen: {out:?}");
    assert_in_doubt(&out, &src);
    // --json says the same to a script: one object, status "in-doubt".
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["status"], "in-doubt", "{v}");
    assert_destination_never_resumed(&mut dst);
    drop(proxy);
    operator_resumes_the_source(&src);
}

/// The proxy swallows `Commit` and keeps the connection open. The destination waits its
/// commit timeout (30 s), never resumes and exits; the source waits as long for `Resumed`
/// and, having committed, stays paused and reports the migration in doubt.
#[test]
fn swallowed_commit_runs_the_vm_nowhere_and_says_in_doubt() {
    require_kvm();
    let wd = workdir();
    let src = source(wd.path());
    let (mut dst, port) = destination(wd.path());
    let commit = commit_kind();
    let swallowed = Arc::new(AtomicBool::new(false));
    let flag = swallowed.clone();
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == Dir::ToDestination && f.kind() == commit {
            flag.store(true, Ordering::SeqCst);
            return Verdict::Drop;
        }
        Verdict::Forward
    });
    let proxy = FrameProxy::start(port, rule);
    let client = migrate_spawn(
        wd.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic"],
    );
    // While the destination waits for Commit, the VM runs nowhere: the destination holds it
    // restored but paused, the source holds it paused.
    wait_until("Commit to be swallowed", PATIENCE, || {
        swallowed.load(Ordering::SeqCst).then_some(())
    });
    // The destination has restored the state: its guest counter is the source's, and
    // neither moves (a destination that resumed before Commit would count on).
    let (s0, d0) = (src.status(), dst.status());
    assert_eq!(d0["status"], "inmigrate", "{d0}");
    assert_eq!(s0["status"], "paused", "{s0}");
    assert_eq!(
        d0["progress"], s0["progress"],
        "restored progress; {d0} vs {s0}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        dst.status()["progress"],
        d0["progress"],
        "destination runs before Commit"
    );
    assert_eq!(
        src.status()["progress"],
        s0["progress"],
        "source runs after Commit"
    );
    let out = client.finish(PATIENCE);
    assert_in_doubt(&out, &src);
    assert_destination_never_resumed(&mut dst);
    // Both sides time out after 30 s: the destination gives up waiting for Commit, or first
    // sees the source hang up. Either way it says it did not start the VM.
    let log = dst.log().to_lowercase();
    assert!(
        log.contains("the vm was not started"),
        "the destination should say it did not start the VM: {log}"
    );
    drop(proxy);
    operator_resumes_the_source(&src);
}

/// `migrate-cancel` lands while `Ready` is on its way: the source, not yet committed, tells
/// the destination `Failed` instead of `Commit` and resumes; the destination, holding a
/// restored VM, must not resume it on `Failed`.
#[test]
fn cancel_between_ready_and_commit_keeps_the_vm_on_the_source() {
    require_kvm();
    let wd = workdir();
    let src = source(wd.path());
    let (mut dst, port) = destination(wd.path());
    let (ready, api_path) = (ready_kind(), src.api.clone());
    let fired = Arc::new(AtomicBool::new(false));
    let flag = fired.clone();
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == Dir::ToSource && f.kind() == ready && !flag.swap(true, Ordering::SeqCst) {
            api(&api_path, "migrate-cancel", json!({})).expect("migrate-cancel");
        }
        Verdict::Forward
    });
    let proxy = FrameProxy::start(port, rule);
    let out = migrate(
        wd.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic"],
    );
    assert!(fired.load(Ordering::SeqCst), "no Ready seen: {out:?}");
    out.assert_failed_with(&["cancel", "still runs on the source"]);
    assert_destination_never_resumed(&mut dst);
    // The destination got `Failed` where `Commit` would have been.
    let sent = proxy.kinds(Dir::ToDestination, Verdict::Forward);
    assert!(sent.contains(&failed_kind()), "no Failed sent: {sent:?}");
    assert!(!sent.contains(&commit_kind()), "Commit sent: {sent:?}");
    drop(proxy);
    src.assert_still_runs_here();
}

/// The source host dies (SIGKILL) once the destination has written `Ready`: the destination
/// sees its connection end instead of `Commit` and must not resume. (The VM is lost with the
/// source host; what matters is that the destination does not start a copy it was never
/// given, and that it gives up at once rather than after its commit timeout.)
#[test]
fn source_killed_after_ready_never_resumes_the_destination() {
    require_kvm();
    let wd = workdir();
    let mut src = source(wd.path());
    let (mut dst, port) = destination(wd.path());
    let (rule, fired) = kill_on(src.pid(), Dir::ToSource, ready_kind(), Verdict::Drop);
    let proxy = FrameProxy::start(port, rule);
    let client = migrate_spawn(
        wd.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic"],
    );
    wait_until("Ready to pass", PATIENCE, || {
        fired.load(Ordering::SeqCst).then_some(())
    });
    let killed_at = std::time::Instant::now();
    assert_destination_never_resumed(&mut dst);
    // Well inside the 30 s commit timeout: the end of the stream is an answer.
    assert!(
        killed_at.elapsed() < Duration::from_secs(20),
        "the destination waited {:?} for a source that was gone",
        killed_at.elapsed()
    );
    // Killed by the signal (its sockets close a moment before it becomes a zombie).
    assert_eq!(
        src.wait_exit(PATIENCE),
        Some(-1),
        "the source outlived SIGKILL"
    );
    let out = client.finish(PATIENCE);
    assert_ne!(out.code, Some(0), "{out:?}");
    drop(proxy);
}

/// The destination is stopped (SIGSTOP) the moment it has written `Ready`, which still
/// reaches the source. The source commits, hears no `Resumed`, and reports the migration in
/// doubt within its `--timeout` plus one second, keeping the VM paused (it never blocks on
/// the stopped peer). Continued, the destination reads the `Commit` waiting in its socket
/// and resumes: the one case where the VM ends on the destination after a failure report,
/// and still on exactly one side.
#[test]
fn destination_stopped_after_ready_ends_in_doubt_then_runs_only_on_the_destination() {
    require_kvm();
    let wd = workdir();
    let src = source(wd.path());
    let (dst, port) = destination(wd.path());
    let pid = dst.pid();
    let stopped_at = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let at = stopped_at.clone();
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == Dir::ToSource && f.kind() == ready_kind() {
            let mut at = at.lock().expect("lock");
            if at.is_none() {
                assert_eq!(send_signal(pid, 19), 0, "SIGSTOP the destination");
                *at = Some(std::time::Instant::now());
            }
        }
        Verdict::Forward
    });
    let proxy = FrameProxy::start(port, rule);
    let timeout = Duration::from_secs(2);
    let out = migrate(
        wd.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "classic", "--timeout", "2s"],
    );
    let stopped = stopped_at
        .lock()
        .expect("lock")
        .expect("the destination was never stopped: no Ready seen");
    let took = stopped.elapsed();
    assert!(
        took <= timeout + Duration::from_secs(1),
        "the source reported {took:?} after the destination stopped (timeout {timeout:?})"
    );
    assert_in_doubt(&out, &src);
    // Continued: the destination finds `Commit` in its socket and runs the VM.
    assert_eq!(send_signal(pid, 18), 0, "SIGCONT the destination");
    let st = dst.wait_status("running", PATIENCE);
    assert_eq!(st["status"], "running", "{st}");
    dst.wait_progress_above(st["progress"].as_u64().expect("progress"));
    dst.assert_memory_intact();
    // And the source never runs it: still paused, no progress.
    let p = src.progress();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.progress(), p, "the VM runs on the source too");
    assert_eq!(src.status()["status"], "paused");
    drop(proxy);
}
