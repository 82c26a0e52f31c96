//! Same-host transports over Unix sockets: `shm` (remote write into the destination's
//! memfd) and `handover` (the destination adopts the source's memfd).

mod common;

use std::time::Duration;

use common::{pair_on, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    migrate, receive, Endpoint, IncomingVm, Listener, MigrateOptions, MigrationError, Phase,
    Progress, ReceiveOptions, TransportKind,
};

fn unix_endpoint(tag: &str) -> Endpoint {
    let p = std::env::temp_dir().join(format!("fastmig-{tag}-{}.sock", std::process::id()));
    Endpoint::Unix(p)
}

#[test]
fn shm_with_guest_writing_matches() {
    let src = SoftVm::with_regions(&[(0, 8 * MIB), (1 << 30, 8 * MIB)], 1, 0).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 4000,
        pattern: WritePattern::Random { seed: 5 },
    });
    std::thread::sleep(Duration::from_millis(30));
    let dst = SoftVm::with_regions(&[(0, 8 * MIB), (1 << 30, 8 * MIB)], 1, 0).expect("dst");
    dst.set_paused(true);
    let l = Listener::bind(&unix_endpoint("shm")).expect("bind");
    let opts = MigrateOptions {
        transport: TransportKind::Shm,
        ..Default::default()
    };
    let (r, d) = pair_on(
        &l,
        &src,
        &dst,
        &opts,
        &ReceiveOptions {
            verify_memory: true,
            ..Default::default()
        },
    );
    let s = r.expect("migration");
    let d = d.expect("receive");
    assert_eq!((s.transport.as_str(), d.transport.as_str()), ("shm", "shm"));
    assert!(s.digest_match);
    assert_eq!(d.pages_received, s.pages_sent);
    src.stop_writer();
    assert!(
        src.snapshot() == dst.snapshot(),
        "destination memory equals the source's as of the pause"
    );
    assert!(dst.is_running() && !src.is_running());
}

#[test]
fn shm_over_tcp_is_refused() {
    let src = SoftVm::new(4 * MIB).expect("src");
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let opts = MigrateOptions {
        transport: TransportKind::Shm,
        ..Default::default()
    };
    let (r, _) = common::pair(&src, &dst, &opts, &ReceiveOptions::default());
    match r {
        Err(MigrationError::PeerRefused { reason }) => assert!(reason.contains("unix"), "{reason}"),
        other => panic!("expected refusal, got {other:?}"),
    }
    common::assert_source_intact(&src);
}

#[test]
fn handover_adopts_memory_without_copying() {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(0.3);
    src.set_state(b"softvm-state:handover".to_vec());
    src.start_writer(WriterConfig {
        pages_per_sec: 2000,
        pattern: WritePattern::Sequential,
    });
    std::thread::sleep(Duration::from_millis(30));
    let ep = unix_endpoint("handover");
    let l = Listener::bind(&ep).expect("bind");
    let opts = MigrateOptions {
        transport: TransportKind::Handover,
        ..Default::default()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            receive(
                &l,
                &ReceiveOptions::default(),
                IncomingVm::OnDemand(Box::new(SoftVm::incoming)),
            )
        });
        (migrate(&src, &ep, &opts), h.join().expect("join"))
    });
    let s = r.expect("handover");
    let (dst, d) = d.expect("receive");
    assert_eq!(s.transport, "handover");
    assert_eq!(
        (s.bytes_sent, s.pages_sent, d.bytes_received),
        (0, 0, 0),
        "nothing is copied"
    );
    assert!(dst.is_running() && !src.is_running());
    src.stop_writer();
    assert!(src.snapshot() == dst.snapshot());
    assert!(dst
        .restored_state()
        .is_some_and(|st| st.starts_with(b"softvm-state:handover")));
    // Same memory object: a write by the new VM is visible through the old mapping.
    dst.fill(1.0);
    assert_eq!(src.stamp(7), dst.stamp(7));
    assert!(dst.stamp(7).is_some_and(|(seq, page)| seq > 0 && page == 7));
}

/// A handover destination listening on TCP, which cannot carry the memory descriptors, says
/// so before it accepts (not with a failure once the source has committed to a handover).
#[test]
fn handover_over_tcp_is_refused() {
    let src = SoftVm::new(4 * MIB).expect("src");
    let l = common::loopback();
    let ep = l.endpoint().expect("ep");
    let opts = MigrateOptions {
        transport: TransportKind::Handover,
        ..Default::default()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            receive(
                &l,
                &ReceiveOptions::default(),
                IncomingVm::OnDemand(Box::new(SoftVm::incoming)),
            )
        });
        (migrate(&src, &ep, &opts), h.join().expect("join"))
    });
    match r {
        Err(MigrationError::PeerRefused { reason }) => assert!(reason.contains("unix"), "{reason}"),
        other => panic!("expected refusal, got {other:?}"),
    }
    assert!(d.is_err());
    common::assert_source_intact(&src);
    assert_eq!(src.resume_count(), 0, "never paused, so never resumed");
}

#[test]
fn handover_to_a_copying_destination_is_refused() {
    let src = SoftVm::new(4 * MIB).expect("src");
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = Listener::bind(&unix_endpoint("handover-refused")).expect("bind");
    let opts = MigrateOptions {
        transport: TransportKind::Handover,
        ..Default::default()
    };
    let (r, d) = pair_on(&l, &src, &dst, &opts, &ReceiveOptions::default());
    assert!(
        matches!(r, Err(MigrationError::PeerRefused { .. })),
        "{r:?}"
    );
    assert!(d.is_err());
    common::assert_source_intact(&src);
    assert_eq!(dst.resume_count(), 0);
}

#[test]
fn shm_honours_the_bandwidth_cap() {
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = Listener::bind(&unix_endpoint("shm-cap")).expect("bind");
    let opts = MigrateOptions {
        transport: TransportKind::Shm,
        bandwidth_limit: Some(8 * MIB),
        ..Default::default()
    };
    let (r, _) = pair_on(&l, &src, &dst, &opts, &ReceiveOptions::default());
    let s = r.expect("migration");
    // 4 MiB at 8 MiB/s after a 1 MiB burst: at least ~0.37 s of copying.
    assert!(
        s.throughput_mib_s < 8.0 * 1.4,
        "{} MiB/s over an 8 MiB/s cap",
        s.throughput_mib_s
    );
}

#[test]
fn transport_and_policy_names_parse() {
    use fastmig_migration::OnNoConverge;
    assert_eq!(
        "shm".parse::<TransportKind>().ok(),
        Some(TransportKind::Shm)
    );
    assert_eq!(
        "handover".parse::<TransportKind>().ok(),
        Some(TransportKind::Handover)
    );
    assert_eq!(
        "multi-tcp:3".parse::<TransportKind>().ok(),
        Some(TransportKind::MultiTcp { streams: 3 })
    );
    assert!("multi-tcp:0".parse::<TransportKind>().is_err());
    // `rdma` is a transport now (tests/rdma.rs); an unknown name still is not.
    assert!("infiniband".parse::<TransportKind>().is_err());
    assert_eq!(
        "force".parse::<OnNoConverge>().ok(),
        Some(OnNoConverge::Force)
    );
    assert!("maybe".parse::<OnNoConverge>().is_err());
}

/// Zero pages of a (mostly zero) source are skipped in the first pass only where the
/// destination's page is zero too; against a destination full of old data every page is
/// copied. Either way the destination ends equal to the source.
#[test]
fn shm_first_pass_skips_zero_pages_only_where_the_destination_is_zero() {
    for dirty_destination in [false, true] {
        let src = SoftVm::new(16 * MIB).expect("src");
        src.fill(0.25);
        let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
        if dirty_destination {
            dst.fill(1.0);
        }
        let snap = src.snapshot();
        let pages = snap.len() / 4096;
        let zero = snap
            .chunks(4096)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count();
        assert!(
            zero > pages / 2,
            "the source is mostly zero ({zero} of {pages})"
        );
        let tag = format!("shm-zero-{dirty_destination}");
        let l = Listener::bind(&unix_endpoint(&tag)).expect("bind");
        let opts = MigrateOptions {
            transport: TransportKind::Shm,
            ..Default::default()
        };
        let ropts = ReceiveOptions {
            verify_memory: true,
            ..Default::default()
        };
        let (r, d) = pair_on(&l, &src, &dst, &opts, &ropts);
        let s = r.expect("migration");
        d.expect("receive");
        assert!(s.digest_match);
        if dirty_destination {
            assert_eq!(s.zero_pages_skipped, 0);
            assert_eq!(s.pages_sent as usize, pages);
        } else {
            assert_eq!(s.zero_pages_skipped as usize, zero);
            assert_eq!(s.pages_sent as usize, pages - zero);
        }
        assert!(
            src.snapshot() == dst.snapshot(),
            "destination equals the source (dirty destination: {dirty_destination})"
        );
    }
}

#[test]
fn shm_verify_memory_rehashes_the_destinations_memory() {
    // The destination hashes each page as the source names it; `verify_memory` hashes all of
    // its memory again before `Ready`. A page changed behind the receiver after it was
    // hashed (here: after the full pass, while the source syncs its dirty log) is caught only
    // by that second look.
    let src = SoftVm::with_regions(&[(0, 8 * MIB)], 1, 0).expect("src");
    src.fill(1.0);
    let dst = SoftVm::with_regions(&[(0, 8 * MIB)], 1, 0).expect("dst");
    dst.set_paused(true);
    let l = Listener::bind(&unix_endpoint("shm-verify")).expect("bind");
    let ep = l.endpoint().expect("endpoint");
    let (round_done, round_seen) = std::sync::mpsc::channel::<()>();
    let (tampered, tamper_seen) = std::sync::mpsc::channel::<()>();
    let tamper_seen = std::sync::Mutex::new(tamper_seen);
    let opts = MigrateOptions {
        transport: TransportKind::Shm,
        progress_interval: Duration::ZERO,
        // After the full pass (its `RoundAck` is in: every page is hashed on both sides),
        // the source waits until the test has changed the destination's memory.
        progress: Some(std::sync::Arc::new(move |p: &Progress| {
            if p.phase == Phase::PreCopy && p.round == 1 {
                let _ = round_done.send(());
                let _ = tamper_seen
                    .lock()
                    .expect("lock")
                    .recv_timeout(Duration::from_secs(10));
            }
        })),
        ..Default::default()
    };
    let ropts = ReceiveOptions {
        verify_memory: true,
        ..Default::default()
    };
    let dst_ref = &dst;
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| common::receive_into(dst_ref, &l, &ropts));
        s.spawn(move || {
            round_seen
                .recv_timeout(Duration::from_secs(10))
                .expect("the full pass ends");
            // Pages 0, 256, ..., 1792 are stamped anew. A stamp is the page number and the
            // VM's write count: page 0 gets the stamp the source gave it (both VMs' first
            // write), the 7 others bytes no transfer wrote.
            dst_ref.fill(1.0 / 256.0);
            tampered.send(()).expect("the source waits");
        });
        let r = migrate(&src, &ep, &opts);
        (r, h.join().expect("receiver thread"))
    });
    assert!(
        matches!(
            d,
            Err(MigrationError::VerifyMismatch {
                page: 256,
                mismatched: 7
            })
        ),
        "{d:?}"
    );
    assert!(matches!(r, Err(MigrationError::PeerFailed { .. })), "{r:?}");
    common::assert_source_intact(&src);
    assert_eq!(dst.resume_count(), 0);
}
