//! The socket transports inside a round: a cancel lands within a round, not at its end
//! (classic and multi-tcp), the in-round progress ticks count a classic round's pages, and
//! both ends count the same pages and bytes. Written for mutants of `transport/classic.rs`
//! and `multi_tcp.rs` (see TESTING.md).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_source_intact, loopback, receive_into, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    migrate, CancelToken, Endpoint, MigrateOptions, MigrationError, MigrationSummary, Progress,
    ReceiveOptions, ReceiveSummary, TransportKind, PAGE_SIZE,
};

/// A TCP proxy to `target` (every connection: multi-tcp's data streams too) that cancels
/// `cancel` once it has forwarded `after` bytes from the source over all connections, and goes
/// on forwarding. Returns its endpoint and the bytes it forwarded from the source in all.
fn cancelling_proxy(
    target: Endpoint,
    after: u64,
    cancel: CancelToken,
) -> (Endpoint, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = l.local_addr().expect("addr");
    let Endpoint::Tcp(target) = target else {
        panic!("tcp only")
    };
    let forwarded = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&forwarded);
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let Ok(mut inbound) = inbound else { return };
            let Ok(mut outbound) = TcpStream::connect(target) else {
                return;
            };
            let (mut i2, mut o2) = (
                inbound.try_clone().expect("clone"),
                outbound.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut o2, &mut i2);
                let _ = i2.shutdown(std::net::Shutdown::Both);
            });
            let (count, cancel) = (Arc::clone(&count), cancel.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match inbound.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if outbound.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if count.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= after {
                        cancel.cancel();
                    }
                }
                let _ = outbound.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (Endpoint::Tcp(addr), forwarded)
}

#[test]
fn a_cancel_stops_a_classic_round_in_its_course() {
    // 64 MiB of non-zero pages in the full pass, no bandwidth cap; the proxy cancels after
    // 4 MiB. The sender looks at the token every 64 pages, so it stops within 64 pages (plus
    // its 256 KiB buffer and what the sockets hold): far from the 64 MiB a sender that only
    // looked between rounds would send.
    cancel_in_the_full_pass(TransportKind::Classic);
}

#[test]
fn a_cancel_stops_a_multi_tcp_round_in_its_course() {
    // The same with two data streams: each sender looks at the token before each batch
    // (1 MiB at most).
    cancel_in_the_full_pass(TransportKind::MultiTcp { streams: 2 });
}

fn cancel_in_the_full_pass(kind: TransportKind) {
    let src = SoftVm::new(64 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(64 * MIB).expect("dst");
    let l = loopback();
    let cancel = CancelToken::new();
    let (ep, forwarded) = cancelling_proxy(l.endpoint().expect("ep"), 4 * MIB, cancel.clone());
    let opts = MigrateOptions {
        transport: kind,
        cancel,
        io_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let (r, _) = std::thread::scope(|s| {
        let h = s.spawn(|| receive_into(&dst, &l, &ReceiveOptions::default()));
        let r = migrate(&src, &ep, &opts);
        (r, h.join().expect("receiver thread"))
    });
    assert!(
        matches!(r, Err(MigrationError::Cancelled)),
        "{kind:?}: {r:?}"
    );
    assert_source_intact(&src);
    assert!(!dst.is_running());
    let sent = forwarded.load(Ordering::SeqCst);
    assert!(sent >= 4 * MIB, "the proxy cancelled after 4 MiB: {sent}");
    assert!(
        sent < 32 * MIB,
        "{kind:?}: {sent} bytes left the source after a cancel at 4 MiB of a 64 MiB round"
    );
}

#[test]
fn progress_ticks_count_the_pages_of_a_long_classic_round() {
    // 8 MiB at a 4 MiB/s cap: round 1 lasts about 1.75 s, so a 100 ms ticker reports partial
    // progress of it, counted in pages the sender has written.
    let src = SoftVm::new(8 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(8 * MIB).expect("dst");
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MigrateOptions {
        bandwidth_limit: Some(4 * MIB),
        progress_interval: Duration::from_millis(100),
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().expect("lock").push(p.clone())
        })),
        ..Default::default()
    };
    let (r, _) = common::pair(&src, &dst, &opts, &ReceiveOptions::default());
    r.expect("migration");
    let seen = seen.lock().expect("lock");
    let partial = common::in_round_ticks(&seen, 2048);
    for p in &partial {
        // The sender publishes its count after each batch of 64 pages: whole batches only.
        assert_eq!(p.pages_sent % 64, 0, "{p:?}");
        assert_eq!(p.pages_sent + p.remaining_pages, 2048, "{p:?}");
        assert_eq!(p.bytes_sent, p.pages_sent * PAGE_SIZE as u64, "{p:?}");
    }
}

/// Migrates a half-filled VM with a guest writing, and returns both sides' summaries.
fn counted(kind: TransportKind) -> (MigrationSummary, ReceiveSummary) {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 3000,
        pattern: WritePattern::Random { seed: 9 },
    });
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let opts = MigrateOptions {
        transport: kind,
        ..Default::default()
    };
    let (r, d) = common::pair(&src, &dst, &opts, &ReceiveOptions::default());
    src.stop_writer();
    (r.expect("migration"), d.expect("receive"))
}

#[test]
fn both_sides_count_the_same_pages_zero_pages_and_bytes() {
    // What the source put on the wire is what the destination took off it, page for page and
    // byte for byte (headers included), for the transports that copy pages over sockets.
    for kind in [
        TransportKind::Classic,
        TransportKind::MultiTcp { streams: 2 },
    ] {
        let (s, d) = counted(kind);
        assert!(s.zero_pages_skipped >= 2048 / 2, "{kind:?}: {s:?}");
        assert_eq!(d.pages_received, s.pages_sent, "{kind:?}");
        assert_eq!(d.zero_pages, s.zero_pages_skipped, "{kind:?}");
        assert_eq!(d.bytes_received, s.bytes_sent, "{kind:?}");
    }
}
