//! The multi-tcp round barrier between real `fastmig` processes: the destination answers
//! `RoundEnd(k, data_bytes)` with `RoundAck(k)` only once its data streams have delivered
//! `data_bytes`. A proxy slows the data streams so that they lag behind the control stream,
//! counts what it has forwarded on them, and checks at every `RoundAck` that the bytes the
//! matching `RoundEnd` announced have already gone through. An early ack would let the
//! source pause the VM with a backlog still in flight (counted as downtime) and overrate its
//! bandwidth.
//!
//! These tests start KVM guests and fail (never skip) without /dev/kvm.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[test]
fn round_ack_waits_for_the_data_streams_to_deliver_the_round() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run_with(
        dir.path(),
        "src",
        "32M",
        "verify:rate=2000,wss=8M,pattern=random",
        &["--prefill"],
    );
    let p = src.progress();
    src.wait_progress_above(p);
    let port = free_port();
    let dst = Proc::incoming(dir.path(), "dst", &format!("127.0.0.1:{port}"), "32M", &[]);

    let data = DataStreams {
        forwarded: Arc::new(AtomicU64::new(0)),
        // About 32 MiB/s per stream: the source fills the socket buffers, so each RoundEnd
        // overtakes a backlog of page data.
        chunk_delay: Duration::from_millis(2),
        stall_after: None,
    };
    let announced: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    // (round, announced bytes, forwarded when the ack passed), for every ack.
    let acks: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::default();
    let (forwarded, ann, seen) = (data.forwarded.clone(), announced.clone(), acks.clone());
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == Dir::ToDestination && f.kind() == round_end_kind() {
            let v = json_payload(f);
            let round = v["round"].as_u64().expect("round");
            let bytes = v["data_bytes"].as_u64().expect("data_bytes");
            ann.lock().expect("lock").insert(round, bytes);
        } else if d == Dir::ToSource && f.kind() == round_ack_kind() {
            let fwd = forwarded.load(Ordering::SeqCst);
            let round = json_payload(f)["round"].as_u64().expect("round");
            let want = ann.lock().expect("lock").get(&round).copied();
            let want = want.unwrap_or_else(|| panic!("RoundAck({round}) before its RoundEnd"));
            seen.lock().expect("lock").push((round, want, fwd));
        }
        Verdict::Forward
    });
    let proxy = FrameProxy::start_with(port, rule, data);
    let out = migrate(
        dir.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "multi-tcp", "--streams", "2"],
    );
    assert_eq!(out.code, Some(0), "{out:?}\n{}", dst.log());
    drop(proxy);
    let acks = acks.lock().expect("lock").clone();
    assert!(!acks.is_empty(), "no RoundAck went through the proxy");
    // The first round carries the whole 32 MiB: the barrier is really exercised.
    assert!(
        acks[0].1 >= 16 << 20,
        "round 1 announced only {} bytes",
        acks[0].1
    );
    for (round, want, fwd) in &acks {
        assert!(
            fwd >= want,
            "RoundAck({round}) passed when {fwd} of the {want} announced data bytes had been forwarded"
        );
    }
    let p = dst.wait_status("running", PATIENCE)["progress"]
        .as_u64()
        .expect("progress");
    dst.wait_progress_above(p);
    dst.assert_memory_intact();
}

/// A data stream goes silent mid-round while the source, its bytes swallowed by the proxy,
/// finishes the round and sends `RoundEnd`: the destination waits for the announced bytes
/// for its I/O timeout (`incoming --timeout 2s`), then fails with a timeout, tells the
/// source, and never resumes; the source keeps the VM.
#[test]
fn a_silent_data_stream_times_out_the_round() {
    require_kvm();
    let dir = workdir();
    let src = Proc::run_with(
        dir.path(),
        "src",
        "32M",
        "verify:rate=2000,wss=8M,pattern=random",
        &["--prefill"],
    );
    let port = free_port();
    let mut dst = Proc::incoming(
        dir.path(),
        "dst",
        &format!("127.0.0.1:{port}"),
        "32M",
        &["--timeout", "2s"],
    );
    let data = DataStreams {
        stall_after: Some(1 << 20),
        ..DataStreams::default()
    };
    let round_ends = Arc::new(AtomicU64::new(0));
    let seen = round_ends.clone();
    let rule: FrameRule = Arc::new(move |d, f| {
        if d == Dir::ToDestination && f.kind() == round_end_kind() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        Verdict::Forward
    });
    let proxy = FrameProxy::start_with(port, rule, data);
    let started = std::time::Instant::now();
    let out = migrate(
        dir.path(),
        &src,
        &format!("127.0.0.1:{}", proxy.port),
        &["--transport", "multi-tcp", "--streams", "2"],
    );
    // The round ended on the control stream: the destination was waiting for data, not
    // for the control stream.
    assert!(
        round_ends.load(Ordering::SeqCst) >= 1,
        "no RoundEnd: {out:?}"
    );
    out.assert_failed_with(&["timed out", "still runs on the source"]);
    // The destination's 2 s, not the source's 10 s, ended it (a wide correctness bound).
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "took {:?}",
        started.elapsed()
    );
    drop(proxy);
    src.assert_still_runs_here();
    assert_destination_never_resumed(&mut dst);
    assert!(
        dst.log().contains("timed out during receiving pages"),
        "{}",
        dst.log()
    );
}
