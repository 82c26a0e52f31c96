//! Hardening between real `fastmig` processes: a listener never deletes a user's file nor
//! hijacks another listener; a waiting destination survives stray connections; a stopped
//! peer (SIGSTOP) fails the other side within its timeout plus one second, with the VM on the
//! source only; nonsense limits are refused.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use fastmig_migration::protocol::{encode, read_message, Hello, Message, PROTOCOL_VERSION};
use fastmig_migration::{RegionLayout, VmLayout};
use serde_json::json;

const MEM: &str = "64M";
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";
/// The timeout both sides get in the SIGSTOP tests.
const TIMEOUT_S: u64 = 2;

/// A guest that dirties memory faster than the capped link drains it, so that pre-copy
/// rounds go on until a peer is stopped.
const BUSY_WORKLOAD: &str = "verify:rate=40000,wss=32M,pattern=random";

fn source(dir: &std::path::Path) -> Proc {
    source_with(dir, WORKLOAD)
}

fn source_with(dir: &std::path::Path, workload: &str) -> Proc {
    let src = Proc::run_with(dir, "src", MEM, workload, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    src
}

fn tcp_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn incoming_refuses_to_replace_a_regular_file() {
    let dir = workdir();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"a user's file").expect("write");
    let out = fastmig(&[
        "incoming",
        "--listen",
        &format!("unix:{}", path_str(&file)),
        "--accept-timeout",
        "5s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert!(!stderr.contains("connecting to"), "{stderr}");
    assert_eq!(std::fs::read(&file).expect("file kept"), b"a user's file");
}

#[test]
fn a_second_incoming_on_the_same_path_is_refused_and_the_first_still_receives() {
    require_kvm();
    let dir = workdir();
    let sock = dir.path().join("m.sock");
    let listen = format!("unix:{}", path_str(&sock));
    let mut dst = Proc::incoming(dir.path(), "dst", &listen, MEM, &[]);
    let out = fastmig(&["incoming", "--listen", &listen, "--accept-timeout", "5s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("listening on"), "{stderr}");
    assert!(
        sock.exists(),
        "the second listener removed the first one's socket"
    );
    let src = source(dir.path());
    let done = migrate(dir.path(), &src, &listen, &["--transport", "shm"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    dst.wait_status("running", PATIENCE);
    dst.assert_memory_intact();
    assert!(dst.is_alive());
}

#[test]
fn stray_connections_do_not_stop_a_waiting_destination() {
    require_kvm();
    let dir = workdir();
    let to = tcp_listen();
    let dst = Proc::incoming(dir.path(), "dst", &to, MEM, &[]);
    // A port scan, an HTTP client, a frame that is not a Hello.
    drop(TcpStream::connect(&to).expect("scan"));
    let mut http = TcpStream::connect(&to).expect("http");
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut wrong = TcpStream::connect(&to).expect("wrong frame");
    wrong.write_all(&encode(&Message::Commit)).expect("write");
    wait_until("the strays to be refused", PATIENCE, || {
        (dst.log().matches("did not complete the handshake").count() >= 3).then_some(())
    });
    let src = source(dir.path());
    let done = migrate(dir.path(), &src, &to, &[]);
    assert_eq!(done.code, Some(0), "{done:?}; dst log: {}", dst.log());
    dst.wait_status("running", PATIENCE);
    dst.assert_memory_intact();
}

#[test]
fn zero_timeouts_are_usage_errors() {
    let out = fastmig(&["incoming", "--listen", &tcp_listen(), "--timeout", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
    let dir = workdir();
    let api = dir.path().join("none.sock");
    let out = fastmig(&[
        "migrate",
        "--api",
        path_str(&api),
        "--to",
        "127.0.0.1:9",
        "--timeout",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

#[test]
fn a_hello_larger_than_max_mem_is_refused_before_any_allocation() {
    require_kvm();
    let dir = workdir();
    let to = tcp_listen();
    let mut dst = Proc::incoming_with(dir.path(), "dst", &to, &["--max-mem", "64M"]);
    let mut s = TcpStream::connect(&to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        layout: VmLayout {
            regions: vec![RegionLayout {
                gpa: 0,
                size: 3 << 30,
            }],
            vcpus: 1,
            features: u64::from(fastmig_vmm::STATE_VERSION),
        },
        transport: fastmig_migration::TransportKind::Classic,
        session: 1,
    };
    s.write_all(&encode(&Message::Hello(hello))).expect("hello");
    match read_message(&mut s).expect("a refusal") {
        Message::HelloReply(r) => {
            assert!(!r.accepted, "{r:?}");
            let reason = r.reason.unwrap_or_default();
            assert!(reason.contains("max-mem"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_destination_never_resumed(&mut dst);
}

/// A `Hello` whose region is not a whole number of pages is refused with the cause, not just
/// "building the destination VM".
#[test]
fn an_unaligned_region_is_refused_with_its_cause() {
    require_kvm();
    let dir = workdir();
    let to = tcp_listen();
    let mut dst = Proc::incoming_with(dir.path(), "dst", &to, &[]);
    let mut s = TcpStream::connect(&to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        layout: VmLayout {
            regions: vec![RegionLayout {
                gpa: 0,
                size: (16 << 20) + 100,
            }],
            vcpus: 1,
            features: u64::from(fastmig_vmm::STATE_VERSION),
        },
        transport: fastmig_migration::TransportKind::Classic,
        session: 1,
    };
    s.write_all(&encode(&Message::Hello(hello))).expect("hello");
    match read_message(&mut s).expect("a refusal") {
        Message::HelloReply(r) => {
            assert!(!r.accepted, "{r:?}");
            let reason = r.reason.unwrap_or_default();
            // The outer step and the cause beneath it: the size is not page-aligned.
            assert!(reason.contains("building the destination VM"), "{reason}");
            assert!(
                reason.contains("16777316") || reason.to_lowercase().contains("multiple"),
                "the refusal does not say what is wrong with the size: {reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_destination_never_resumed(&mut dst);
}

/// When to stop a peer.
#[derive(Clone, Copy, Debug)]
enum At {
    /// 4 MiB into the first full pass.
    FirstPass,
    /// In pre-copy round 3 or later.
    LaterRound,
}

fn wait_for(src: &Proc, at: At) {
    match at {
        At::FirstPass => wait_bytes_sent(src, 4 << 20),
        At::LaterRound => wait_until("pre-copy round 3", PATIENCE, || {
            let m = api(&src.api, "query-migrate", json!({})).ok()?;
            // `none`: the request has not reached the engine yet.
            assert!(
                m["status"] == "active" || m["status"] == "none",
                "migration ended early: {m}"
            );
            (m["progress"]["round"].as_u64()? >= 3).then_some(())
        }),
    }
}

/// Time from now until the source's migration is no longer active; its final status.
fn wait_source_failed(src: &Proc) -> (Duration, String) {
    let t = Instant::now();
    let st = wait_until("the source's migration to end", PATIENCE, || {
        let m = api(&src.api, "query-migrate", json!({})).ok()?;
        (m["status"] != "active").then(|| m["status"].as_str().unwrap_or("").to_string())
    });
    (t.elapsed(), st)
}

/// The bandwidth cap of the SIGSTOP tests. After a stop the source's deadline can only start
/// once the kernel stops taking data: over TCP the socket buffers of both ends (~10 MiB per
/// stream on loopback) first fill at the capped rate, so the cap must make that a fraction of
/// a second; shm writes into memory and is caught by the unread backlog of its control stream.
fn cap(transport: &str) -> &'static str {
    if transport == "shm" {
        "16M"
    } else {
        "48M"
    }
}

/// SIGSTOPs the destination at `at`: the source must report failure within its timeout plus
/// one second and keep the VM; once continued, the destination never runs it.
fn stop_destination(transport: &str, at: At) {
    require_kvm();
    let dir = workdir();
    let to = if transport == "shm" {
        format!("unix:{}", path_str(&dir.path().join("m.sock")))
    } else {
        tcp_listen()
    };
    let timeout = format!("{TIMEOUT_S}s");
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &["--timeout", &timeout]);
    let src = source_with(dir.path(), BUSY_WORKLOAD);
    let client = migrate_spawn(
        dir.path(),
        &src,
        &to,
        &[
            "--max-rounds",
            "200",
            "--transport",
            transport,
            "--max-bandwidth",
            cap(transport),
            "--timeout",
            &timeout,
        ],
    );
    wait_for(&src, at);
    assert_eq!(send_signal(dst.child.id(), libc::SIGSTOP), 0);
    let (took, status) = wait_source_failed(&src);
    let out = client.finish(PATIENCE);
    assert_eq!(status, "failed", "{out:?}");
    assert!(
        took <= Duration::from_secs(TIMEOUT_S + 1),
        "{transport} {at:?}: the source took {took:?} to give up (timeout {TIMEOUT_S} s); {out:?}"
    );
    out.assert_failed_with(&["still runs on the source"]);
    assert_eq!(send_signal(dst.child.id(), libc::SIGCONT), 0);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
}

#[test]
fn destination_stopped_in_the_first_pass_classic() {
    stop_destination("classic", At::FirstPass);
}

#[test]
fn destination_stopped_in_the_first_pass_multi_tcp() {
    stop_destination("multi-tcp", At::FirstPass);
}

#[test]
fn destination_stopped_in_the_first_pass_shm() {
    stop_destination("shm", At::FirstPass);
}

#[test]
fn destination_stopped_in_a_later_round_classic() {
    stop_destination("classic", At::LaterRound);
}

#[test]
fn destination_stopped_in_a_later_round_multi_tcp() {
    stop_destination("multi-tcp", At::LaterRound);
}

#[test]
fn destination_stopped_in_a_later_round_shm() {
    stop_destination("shm", At::LaterRound);
}

/// SIGSTOPs the source in the first pass: the destination gives up within its timeout plus
/// one second without running the VM; continued, the source runs it with memory intact.
fn stop_source(transport: &str) {
    require_kvm();
    let dir = workdir();
    let to = if transport == "shm" {
        format!("unix:{}", path_str(&dir.path().join("m.sock")))
    } else {
        tcp_listen()
    };
    let timeout = format!("{TIMEOUT_S}s");
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &["--timeout", &timeout]);
    let src = source(dir.path());
    let client = migrate_spawn(
        dir.path(),
        &src,
        &to,
        &["--transport", transport, "--max-bandwidth", "16M"],
    );
    wait_for(&src, At::FirstPass);
    assert_eq!(send_signal(src.child.id(), libc::SIGSTOP), 0);
    let t = Instant::now();
    let exited = dst.wait_exit(PATIENCE);
    let took = t.elapsed();
    assert_eq!(send_signal(src.child.id(), libc::SIGCONT), 0);
    assert!(
        matches!(exited, Some(c) if c != 0),
        "{exited:?}: {}",
        dst.log()
    );
    assert!(
        took <= Duration::from_secs(TIMEOUT_S + 1),
        "{transport}: the destination took {took:?} to give up; {}",
        dst.log()
    );
    assert!(!dst.log().contains("VM running"), "{}", dst.log());
    let out = client.finish(PATIENCE);
    assert_ne!(out.code, Some(0), "{out:?}");
    src.assert_still_runs_here();
}

#[test]
fn source_stopped_in_the_first_pass_classic() {
    stop_source("classic");
}

#[test]
fn source_stopped_in_the_first_pass_shm() {
    stop_source("shm");
}
