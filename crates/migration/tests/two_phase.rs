//! The two-phase end (`Ready` → `Commit` → resume) seen from the destination, driven by a
//! scripted source: the destination resumes only on `Commit`, never when the source fails,
//! closes or stays silent between `Ready` and `Commit`. And the digest, computed on both
//! sides, catches a page lost on a stream whose every frame is valid.

mod common;

use std::time::Duration;

use common::{assert_source_intact, frame_dropping_proxy, loopback, receive_into, MIB};
use fastmig_migration::protocol::{read_message, write_message, Message, ProtocolError};
use fastmig_migration::test_utils::{ScriptedSource, SoftVm};
use fastmig_migration::{
    migrate, Listener, MigratableVm, MigrateOptions, MigrationError, ReceiveOptions,
    ReceiveSummary, PAGE_SIZE,
};

fn ropts() -> ReceiveOptions {
    ReceiveOptions {
        accept_timeout: Some(Duration::from_secs(5)),
        io_timeout: Duration::from_secs(2),
        commit_timeout: Duration::from_millis(400),
        verify_memory: false,
    }
}

/// Runs `receive` into `dst` while `script` plays the source: a valid migration of 16 pages
/// (round 1, then `State` and `Complete` with the right digest) whose answer must be
/// `Ready`; `script` then decides the ending.
fn scripted(
    dst: &SoftVm,
    script: impl FnOnce(&mut ScriptedSource) + Send,
) -> Result<ReceiveSummary, MigrationError> {
    let l: Listener = loopback();
    let ep = l.endpoint().expect("endpoint");
    std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(dst, &l, &ropts()));
        let mut src = ScriptedSource::connect(&ep, &dst.layout()).expect("handshake");
        for p in 0..16 {
            src.send_page(p, p as u8 + 1).expect("page");
        }
        let ack = src.end_round().expect("round ack");
        assert!(matches!(ack, Message::RoundAck { round: 1 }), "{ack:?}");
        let ready = src.complete(b"scripted-state").expect("answer to complete");
        assert!(matches!(ready, Message::Ready), "{ready:?}");
        script(&mut src);
        h.join().expect("receiver thread")
    })
}

fn assert_never_resumed(dst: &SoftVm) {
    assert_eq!(dst.resume_count(), 0, "destination resumed without Commit");
    assert!(!dst.is_running(), "destination runs without Commit");
}

#[test]
fn destination_is_paused_after_ready_and_resumes_on_commit() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let mut source_digest = 0;
    let r = scripted(&dst, |src| {
        // Ready has arrived: the state is restored but the VM must not run yet.
        assert_never_resumed(&dst);
        assert_eq!(
            dst.restored_state().as_deref(),
            Some(&b"scripted-state"[..])
        );
        source_digest = src.digest();
        write_message(src.conn(), &Message::Commit).expect("commit");
        match read_message(src.conn()).expect("resumed") {
            Message::Resumed(r) => assert!(r.digest_match, "{r:?}"),
            other => panic!("expected Resumed, got {other:?}"),
        }
    });
    let s = r.expect("receive");
    assert_eq!(dst.resume_count(), 1);
    assert!(dst.is_running());
    assert!(s.digest_match);
    assert_eq!(s.digest, source_digest);
    assert_eq!(s.source_digest, source_digest);
    assert_eq!(s.pages_received, 16);
    // Page 3 was sent filled with 4.
    assert_eq!(dst.snapshot()[3 * PAGE_SIZE], 4);
}

#[test]
fn failed_after_ready_never_resumes() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = scripted(&dst, |src| {
        let failed = Message::Failed {
            reason: "source: cancelled".into(),
        };
        write_message(src.conn(), &failed).expect("failed");
        // A late Commit must not count: the destination has already given up.
        let _ = write_message(src.conn(), &Message::Commit);
    });
    assert!(
        matches!(r, Err(MigrationError::PeerFailed { ref reason }) if reason.contains("cancelled")),
        "{r:?}"
    );
    assert_never_resumed(&dst);
}

#[test]
fn source_closing_after_ready_never_resumes() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = scripted(&dst, |src| src.conn().shutdown());
    assert!(
        matches!(
            r,
            Err(MigrationError::Wire {
                phase: "commit",
                source: ProtocolError::Truncated | ProtocolError::Io(_)
            })
        ),
        "{r:?}"
    );
    assert_never_resumed(&dst);
}

#[test]
fn source_silent_after_ready_never_resumes() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let r = scripted(&dst, |src| {
        // Outlive the destination's commit timeout, then try to commit too late.
        std::thread::sleep(ropts().commit_timeout * 3);
        let _ = write_message(src.conn(), &Message::Commit);
    });
    assert!(
        matches!(r, Err(MigrationError::Timeout { phase: "commit" })),
        "{r:?}"
    );
    assert_never_resumed(&dst);
}

#[test]
fn a_page_frame_lost_on_a_valid_stream_is_caught_by_the_digest() {
    // Every frame the destination reads is well formed and checksummed; one page is simply
    // missing. Only the digest comparison can tell.
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let proxy = frame_dropping_proxy(l.endpoint().expect("endpoint"), 10);
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &ropts()));
        let r = migrate(&src, &proxy, &MigrateOptions::default());
        (r, h.join().expect("receiver"))
    });
    assert!(
        matches!(d, Err(MigrationError::Digest { .. })),
        "destination: {d:?}"
    );
    assert!(
        matches!(r, Err(MigrationError::PeerFailed { ref reason }) if reason.contains("digest")),
        "source: {r:?}"
    );
    assert_source_intact(&src);
    assert_never_resumed(&dst);
}

#[test]
fn verify_memory_names_the_page_written_behind_the_transport() {
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l: Listener = loopback();
    let ep = l.endpoint().expect("endpoint");
    let opts = ReceiveOptions {
        verify_memory: true,
        ..ropts()
    };
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &opts));
        let mut src = ScriptedSource::connect(&ep, &dst.layout()).expect("handshake");
        for p in 0..16 {
            src.send_page(p, 7).expect("page");
        }
        assert!(matches!(
            src.end_round(),
            Ok(Message::RoundAck { round: 1 })
        ));
        // Two pages in 1024 are stamped: page 0 (sent as all 7s) and page 512 (never sent,
        // so recorded as zero).
        dst.fill(2.0 / 1024.0);
        let answer = src.complete(b"s").expect("answer");
        assert!(
            matches!(answer, Message::Failed { ref reason } if reason.contains("page 0")),
            "{answer:?}"
        );
        h.join().expect("receiver")
    });
    assert!(
        matches!(
            r,
            Err(MigrationError::VerifyMismatch {
                page: 0,
                mismatched: 2
            })
        ),
        "{r:?}"
    );
    assert_never_resumed(&dst);
    assert!(dst.restored_state().is_none(), "verified before restoring");
}

/// Burns about `secs` of CPU on the calling thread.
fn burn_cpu(secs: f64) {
    let start = fastmig_migration::thread_cpu_time();
    let mut x = 1u64;
    while fastmig_migration::thread_cpu_time() - start < secs {
        for i in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

#[test]
fn destination_cpu_counts_only_the_migration() {
    // The receiving thread has already used CPU before the source arrives; that CPU is not
    // the migration's.
    let before = 0.5;
    let src = SoftVm::new(4 * MIB).expect("src");
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = loopback();
    let ep = l.endpoint().expect("endpoint");
    let (r, d) = std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (dst, l) = (&dst, &l);
        let h = s.spawn(move || {
            burn_cpu(before);
            let _ = ready_tx.send(());
            receive_into(dst, l, &ropts())
        });
        let _ = ready_rx.recv();
        (
            migrate(&src, &ep, &MigrateOptions::default()),
            h.join().expect("receiver"),
        )
    });
    let (s, d) = (r.expect("migration"), d.expect("receive"));
    assert!(d.dst_cpu_s > 0.0 && d.dst_cpu_s < before, "{d:?}");
    assert_eq!(
        s.dst_cpu_s, d.dst_cpu_s,
        "the source reports the destination's figure"
    );
}

#[test]
fn verify_memory_does_not_apply_to_adopted_memory() {
    // Nothing is copied in a handover, so there is no transfer record to check the memory
    // against: asking for verification must not fail it.
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let ep = fastmig_migration::Endpoint::Unix(std::env::temp_dir().join(format!(
        "fastmig-verify-handover-{}.sock",
        std::process::id()
    )));
    let l = Listener::bind(&ep).expect("bind");
    let opts = MigrateOptions {
        transport: fastmig_migration::TransportKind::Handover,
        ..Default::default()
    };
    let ropts = ReceiveOptions {
        verify_memory: true,
        ..ropts()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let adopt = fastmig_migration::IncomingVm::OnDemand(Box::new(SoftVm::incoming));
            fastmig_migration::receive(&l, &ropts, adopt)
        });
        (migrate(&src, &ep, &opts), h.join().expect("receiver"))
    });
    r.expect("handover");
    let (dst, d) = d.expect("receive");
    assert!(d.digest_match && dst.is_running());
}
