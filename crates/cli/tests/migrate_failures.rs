//! Failure safety of live migration between real `fastmig` processes: whatever breaks (the
//! destination dies, the connection drops or is corrupted, the peer speaks another protocol
//! version or has another memory size, the user cancels, the peer goes silent), `migrate`
//! exits non-zero with one line saying what failed, the VM keeps running on the source with
//! its memory intact, and the destination never resumes it. Bad command-line input for the
//! migration commands exits 2 with one line.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use fastmig_migration::protocol::{
    encode, encode_with_version, read_message, Hello, HelloReply, Message, PROTOCOL_VERSION,
};
use fastmig_migration::{RegionLayout, TransportKind, VmLayout};
use serde_json::json;

/// A verify VM whose every page holds data, so that a capped transfer takes seconds
/// (64 MiB at 8 MiB/s) and a fault lands mid-transfer.
const MEM: &str = "64M";
const MEM_BYTES: u64 = 64 << 20;
const WORKLOAD: &str = "verify:rate=2000,wss=8M,pattern=random";

fn source(dir: &std::path::Path) -> Proc {
    let src = Proc::run_with(dir, "src", MEM, WORKLOAD, &["--prefill"]);
    let p = src.progress();
    src.wait_progress_above(p);
    src
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The layout `fastmig run --mem` announces: one region at GPA 0, one vCPU.
fn layout(mem_bytes: u64) -> VmLayout {
    VmLayout {
        regions: vec![RegionLayout {
            gpa: 0,
            size: mem_bytes,
        }],
        vcpus: 1,
        features: u64::from(fastmig_vmm::STATE_VERSION),
    }
}

fn hello(mem_bytes: u64, version: u16) -> Message {
    Message::Hello(Hello {
        version,
        max_version: version,
        layout: layout(mem_bytes),
        transport: TransportKind::Classic,
        session: 0x5eed,
    })
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the destination");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// SIGKILLs the destination once the source has sent 4 MiB of a transfer capped at 8 MiB/s.
fn kill_destination_mid_transfer(transport: &str) {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let to = match transport {
        "shm" => format!("unix:{}", dir.path().join("mig.sock").display()),
        _ => loopback(free_port()),
    };
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &[]);
    let client = migrate_spawn(
        dir.path(),
        &src,
        &to,
        &["--transport", transport, "--max-bandwidth", "8M"],
    );
    wait_bytes_sent(&src, 4 << 20);
    // Mid-transfer: the destination has not resumed anything yet.
    assert_eq!(dst.status()["status"], "inmigrate");
    dst.child.kill().expect("SIGKILL the destination");
    dst.child.wait().expect("reap the destination");
    let out = client.finish(PATIENCE);
    out.assert_failed_with(&["migration failed", "still runs on the source"]);
    src.assert_still_runs_here();
    // The failed attempt left nothing behind (dirty log, transport state): a retry to a new
    // destination succeeds and the VM arrives intact.
    let to = match transport {
        "shm" => format!("unix:{}", dir.path().join("mig2.sock").display()),
        _ => loopback(free_port()),
    };
    let dst2 = Proc::incoming(dir.path(), "dst2", &to, MEM, &[]);
    let retry = migrate(dir.path(), &src, &to, &["--transport", transport]);
    assert_eq!(
        retry.code,
        Some(0),
        "retry failed: {retry:?}\n{}",
        dst2.log()
    );
    let p = dst2.wait_status("running", PATIENCE)["progress"]
        .as_u64()
        .expect("progress");
    dst2.wait_progress_above(p);
    dst2.assert_memory_intact();
    assert_eq!(src.status()["status"], "postmigrate");
}

#[test]
fn destination_killed_mid_transfer() {
    kill_destination_mid_transfer("classic");
}

#[test]
fn destination_killed_mid_transfer_multi_tcp() {
    kill_destination_mid_transfer("multi-tcp");
}

/// With shm the source writes straight into the destination's memory: its death must not
/// take the source down with it (the mapping stays valid) nor leave it waiting.
#[test]
fn destination_killed_mid_transfer_shm() {
    kill_destination_mid_transfer("shm");
}

#[test]
fn connection_closed_mid_transfer() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let dst_port = free_port();
    let mut dst = Proc::incoming(dir.path(), "dst", &loopback(dst_port), MEM, &[]);
    // Close the connection after 3 MiB of the ~64 MiB stream.
    let proxy = FaultProxy::start(dst_port, Fault::TruncateAt(3 << 20));
    let out = migrate(dir.path(), &src, &loopback(proxy.port), &[]);
    assert_eq!(
        proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        3 << 20,
        "the cut must fall inside the transfer"
    );
    let line = out.assert_failed_with(&["migration failed", "still runs on the source"]);
    assert!(
        [
            "closed",
            "reset",
            "broken pipe",
            "eof",
            "truncated",
            "connection"
        ]
        .iter()
        .any(|w| line.to_lowercase().contains(w)),
        "the error should say the connection went away: {line}"
    );
    drop(proxy);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
}

/// Migrates through a proxy that flips one bit inside the data of the 300th non-zero page
/// frame (classic); returns the `migrate` result and both processes.
fn migrate_with_a_corrupted_page(dir: &std::path::Path) -> (Finished, Proc, Proc) {
    let src = source(dir);
    let dst_port = free_port();
    let dst = Proc::incoming(dir, "dst", &loopback(dst_port), MEM, &[]);
    let proxy = FaultProxy::start(dst_port, Fault::CorruptPageData(300));
    let out = migrate(
        dir,
        &src,
        &loopback(proxy.port),
        &["--transport", "classic"],
    );
    assert!(
        proxy.corrupted.load(std::sync::atomic::Ordering::Relaxed),
        "the proxy never reached the page to corrupt: {out:?}"
    );
    drop(proxy);
    (out, src, dst)
}

/// Every multi-tcp stream (control and data) is cut after 1 MiB.
#[test]
fn connection_closed_mid_transfer_multi_tcp() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let dst_port = free_port();
    let mut dst = Proc::incoming(dir.path(), "dst", &loopback(dst_port), MEM, &[]);
    let proxy = FaultProxy::start(dst_port, Fault::TruncateAt(1 << 20));
    let out = migrate(
        dir.path(),
        &src,
        &loopback(proxy.port),
        &["--transport", "multi-tcp", "--streams", "2"],
    );
    out.assert_failed_with(&["migration failed", "still runs on the source"]);
    drop(proxy);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
}

#[test]
fn corrupted_page_data_is_caught_and_the_source_keeps_the_vm() {
    require_kvm();
    let dir = workdir();
    let (out, src, mut dst) = migrate_with_a_corrupted_page(dir.path());
    out.assert_failed_with(&["destination", "still runs on the source"]);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
    assert!(
        dst.log().contains("checksum"),
        "the destination should say what it caught: {}",
        dst.log()
    );
}

/// The source's one line should say what the destination caught, not only where.
#[test]
fn corrupted_page_error_on_the_source_names_the_checksum() {
    require_kvm();
    let dir = workdir();
    let (out, _src, _dst) = migrate_with_a_corrupted_page(dir.path());
    out.assert_failed_with(&["checksum", "still runs on the source"]);
}

#[test]
fn destination_refuses_to_resume_a_truncated_stream() {
    require_kvm();
    let dir = workdir();
    let to = loopback(free_port());
    let mut dst = Proc::incoming(dir.path(), "dst", &to, "32M", &[]);
    // Play the source: a valid handshake, a few pages, then half a page frame and EOF.
    let mut s = connect(&to);
    s.write_all(&encode(&hello(32 << 20, PROTOCOL_VERSION)))
        .expect("send Hello");
    match read_message(&mut s).expect("HelloReply") {
        Message::HelloReply(r) => assert!(r.accepted, "refused: {r:?}"),
        other => panic!("expected HelloReply, got {other:?}"),
    }
    let page = vec![0xa5u8; 4096];
    for i in 0..8u64 {
        let frame = encode(&Message::Page {
            gpa: (1 << 20) + i * 4096,
            data: Some(page.clone()),
        });
        s.write_all(&frame).expect("send page");
    }
    let last = encode(&Message::Page {
        gpa: 2 << 20,
        data: Some(page.clone()),
    });
    s.write_all(&last[..last.len() / 2])
        .expect("send half a page");
    s.shutdown(Shutdown::Write).expect("half-close");
    assert_destination_never_resumed(&mut dst);
    let log = dst.log().to_lowercase();
    assert!(
        log.contains("truncated") || log.contains("eof") || log.contains("closed"),
        "the destination should say the stream ended early: {log}"
    );
}

/// Plays a destination that answers the source's Hello with a HelloReply of version
/// `PROTOCOL_VERSION + 1` (accepting or not), then swallows whatever follows. Returns the
/// `migrate` result and how many bytes the source sent after its Hello.
fn migrate_to_a_newer_destination(
    src: &Proc,
    dir: &std::path::Path,
    accepted: bool,
) -> (Finished, usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let to = loopback(listener.local_addr().expect("addr").port());
    let other = PROTOCOL_VERSION + 1;
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept the source");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let got = read_message(&mut s).expect("the source's Hello");
        let Message::Hello(h) = got else {
            panic!("expected Hello, got {got:?}")
        };
        // The source offers every version it speaks, up to this one.
        assert_eq!(h.max_version, PROTOCOL_VERSION);
        let reply = Message::HelloReply(HelloReply {
            version: other,
            accepted,
            reason: (!accepted).then(|| format!("destination speaks protocol version {other}")),
        });
        s.write_all(&encode_with_version(&reply, other))
            .expect("send HelloReply");
        // Hold the connection until the source gives up on it.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        sink.len()
    });
    let out = migrate(dir, src, &to, &[]);
    let after_hello = fake.join().expect("fake destination");
    (out, after_hello)
}

#[test]
fn source_reports_a_refusal_from_a_newer_destination() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let (out, after_hello) = migrate_to_a_newer_destination(&src, dir.path(), false);
    out.assert_failed_with(&["version", "still runs on the source"]);
    assert!(
        after_hello < 4096,
        "the source sent {after_hello} bytes to a destination that refused it"
    );
    src.assert_still_runs_here();
}

/// An eager newer destination that "accepts": the source must still refuse, by version.
#[test]
fn source_refuses_a_destination_of_another_protocol_version() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let (out, after_hello) = migrate_to_a_newer_destination(&src, dir.path(), true);
    out.assert_failed_with(&["version", "still runs on the source"]);
    assert!(
        after_hello < 4096,
        "the source sent {after_hello} bytes to a destination of another version"
    );
    src.assert_still_runs_here();
}

#[test]
fn destination_refuses_a_source_of_another_protocol_version() {
    require_kvm();
    let dir = workdir();
    let to = loopback(free_port());
    let mut dst = Proc::incoming(dir.path(), "dst", &to, "32M", &[]);
    let mut s = connect(&to);
    let other = PROTOCOL_VERSION + 1;
    s.write_all(&encode_with_version(&hello(32 << 20, other), other))
        .expect("send Hello");
    match read_message(&mut s).expect("a readable refusal") {
        Message::HelloReply(r) => {
            assert!(!r.accepted, "accepted a version-{other} source: {r:?}");
            assert_eq!(r.version, PROTOCOL_VERSION);
            let reason = r.reason.unwrap_or_default();
            assert!(reason.contains("version"), "reason: {reason}");
        }
        Message::Failed { reason } => assert!(reason.contains("version"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_destination_never_resumed(&mut dst);
    assert!(dst.log().contains("version"), "{}", dst.log());
}

#[test]
fn memory_size_mismatch_is_refused_with_both_sizes() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let to = loopback(free_port());
    let mut dst = Proc::incoming(dir.path(), "dst", &to, "32M", &[]);
    let out = migrate(dir.path(), &src, &to, &["--json"]);
    let line = out.assert_failed_with(&["memory size", "still runs on the source"]);
    for size in [MEM_BYTES, 32 << 20] {
        assert!(
            line.contains(&size.to_string()),
            "the refusal should name {size}: {line}"
        );
    }
    // --json: one object on stdout saying the same.
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "want one JSON line: {:?}", out.stdout);
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["transport"], "classic", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("memory size")),
        "{v}"
    );
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
}

#[test]
fn migrate_cancel_mid_transfer_keeps_the_vm_on_the_source() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let to = loopback(free_port());
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &[]);
    let client = migrate_spawn(dir.path(), &src, &to, &["--max-bandwidth", "8M"]);
    wait_bytes_sent(&src, 2 << 20);
    let cancel = Client::spawn(
        dir.path(),
        "cancel",
        &["migrate-cancel", "--api", path_str(&src.api)],
    )
    .finish(PATIENCE);
    assert_eq!(cancel.code, Some(0), "{cancel:?}");
    let out = client.finish(PATIENCE);
    out.assert_failed_with(&["cancel", "still runs on the source"]);
    assert_eq!(
        api(&src.api, "query-migrate", json!({})).expect("query-migrate")["status"],
        "cancelled"
    );
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
    // Nothing left to cancel: a second cancel is an error, not a silent success.
    let again = Client::spawn(
        dir.path(),
        "cancel2",
        &["migrate-cancel", "--api", path_str(&src.api)],
    )
    .finish(PATIENCE);
    assert_ne!(again.code, Some(0), "{again:?}");
}

#[test]
fn ctrl_c_on_migrate_cancels_the_migration() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let to = loopback(free_port());
    let mut dst = Proc::incoming(dir.path(), "dst", &to, MEM, &[]);
    let client = migrate_spawn(dir.path(), &src, &to, &["--max-bandwidth", "8M"]);
    wait_bytes_sent(&src, 2 << 20);
    client.signal(2); // SIGINT, as Ctrl-C sends
    let out = client.finish(PATIENCE);
    out.assert_failed_with(&["cancel", "still runs on the source"]);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
}

#[test]
fn silent_destination_times_out() {
    require_kvm();
    let dir = workdir();
    let src = source(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let to = loopback(listener.local_addr().expect("addr").port());
    // Accept and say nothing, keeping the connection open until the source hangs up.
    let silent = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    });
    let started = std::time::Instant::now();
    let out = migrate(dir.path(), &src, &to, &["--timeout", "1s"]);
    let line = out.assert_failed_with(&["still runs on the source"]);
    assert!(
        ["timed out", "timeout", "silent", "no answer"]
            .iter()
            .any(|w| line.to_lowercase().contains(w)),
        "the error should say the destination did not answer: {line}"
    );
    // Not a hang until some default: well under the 10 s default timeout. (A correctness
    // bound with a wide margin, not a speed claim.)
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "took {:?}",
        started.elapsed()
    );
    src.assert_still_runs_here();
    silent.join().expect("silent destination");
}

#[test]
fn bad_migration_input_exits_2_with_one_line() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run(dir.path(), "src", "32M", "idle");
    let sock = path_str(&src.api).to_string();
    let to = loopback(free_port());
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["migrate", "--api", &sock, "--to", "nowhere"],
            &["nowhere"],
        ),
        (
            &["migrate", "--api", &sock, "--to", "127.0.0.1:99999"],
            &["99999"],
        ),
        (
            &[
                "migrate",
                "--api",
                &sock,
                "--to",
                &to,
                "--transport",
                "pigeon",
            ],
            &["pigeon"],
        ),
        (
            &[
                "migrate",
                "--api",
                &sock,
                "--to",
                &to,
                "--downtime-limit",
                "fast",
            ],
            &["fast"],
        ),
        (
            &[
                "migrate",
                "--api",
                &sock,
                "--to",
                &to,
                "--max-bandwidth",
                "lots",
            ],
            &["lots"],
        ),
        (
            &["migrate", "--api", &sock, "--to", &to, "--streams", "2"],
            &["streams"],
        ),
    ];
    for (i, (args, needles)) in cases.iter().enumerate() {
        let out = Client::spawn(dir.path(), &format!("bad{i}"), args).finish(PATIENCE);
        out.assert_one_line_exit(2, needles);
        assert_eq!(
            api(&src.api, "query-migrate", json!({})).expect("query-migrate")["status"],
            "none",
            "{args:?} must not start a migration"
        );
    }
    // A socket with no VM behind it, and a destination still waiting for its VM.
    let missing = dir.path().join("nobody.sock");
    let out = Client::spawn(
        dir.path(),
        "novm",
        &["migrate", "--api", path_str(&missing), "--to", &to],
    )
    .finish(PATIENCE);
    // Nothing answers there: a runtime failure (the same line works once the VM runs), the
    // same code `status` gives for it.
    out.assert_one_line_exit(1, &["nobody.sock", "cannot connect"]);
    let dst = Proc::incoming(dir.path(), "dst", &loopback(free_port()), "32M", &[]);
    let out = Client::spawn(
        dir.path(),
        "inmigrate",
        &["migrate", "--api", path_str(&dst.api), "--to", &to],
    )
    .finish(PATIENCE);
    out.assert_one_line_exit(2, &["not started"]);
    // migrate-cancel without a migration.
    let out =
        Client::spawn(dir.path(), "nocancel", &["migrate-cancel", "--api", &sock]).finish(PATIENCE);
    assert_ne!(out.code, Some(0), "{out:?}");
    // Values clap itself checks (a fixed list) get clap's usual multi-line message.
    let out = Client::spawn(
        dir.path(),
        "noconv",
        &[
            "migrate",
            "--api",
            &sock,
            "--to",
            &to,
            "--on-no-converge",
            "maybe",
        ],
    )
    .finish(PATIENCE);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .next()
            .is_some_and(|l| l.contains("maybe")),
        "{out:?}"
    );
    // None of this disturbed the VM.
    let p = src.status()["progress"].as_u64().expect("progress");
    src.wait_progress_above(p);
}
