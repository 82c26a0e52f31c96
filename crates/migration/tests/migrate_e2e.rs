//! End-to-end migrations between two SoftVms over loopback, every transport.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{in_round_ticks, pair, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    MigratableVm, MigrateOptions, MigrationStatus, OnNoConverge, Phase, Progress, ReceiveOptions,
    TransportKind, PAGE_SIZE,
};

fn check_equal_and_handed_over(src: &SoftVm, dst: &SoftVm) {
    assert!(
        !src.is_running(),
        "source stays paused after a successful migration"
    );
    assert!(dst.is_running(), "destination runs the VM");
    assert_eq!(dst.resume_count(), 1);
    src.stop_writer();
    let (a, b) = (src.snapshot(), dst.snapshot());
    assert_eq!(a.len(), b.len());
    let first_diff = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y);
    assert_eq!(
        first_diff, None,
        "destination memory differs from the source's as of the pause"
    );
    let state = dst.restored_state().expect("state restored");
    assert!(state.starts_with(b"softvm-state"));
    // The state carries the writer's sequence number as of the pause.
    assert_eq!(state[state.len() - 8..], src.writes().to_le_bytes());
}

#[test]
fn classic_idle_vm_round_trip() {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let (r, d) = pair(
        &src,
        &dst,
        &MigrateOptions::default(),
        &ReceiveOptions {
            verify_memory: true,
            ..Default::default()
        },
    );
    let s = r.expect("migration");
    let d = d.expect("receive");
    check_equal_and_handed_over(&src, &dst);
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(s.transport, "classic");
    assert!(s.digest_match);
    // Half the 4096 pages were filled; the other half travel as zero-page flags.
    assert_eq!(s.round_details[0].pages, 2048);
    assert_eq!(s.round_details[0].zero_pages, 2048);
    assert_eq!(d.pages_received, s.pages_sent);
    assert!(s.rounds >= 2, "full pass plus stop-and-copy");
    assert!(s.downtime_ms > 0.0 && s.downtime_ms <= s.total_ms);
    assert!(s.src_cpu_s > 0.0 && s.dst_cpu_s > 0.0);
    let json = serde_json::to_value(&s).expect("serialise");
    for k in [
        "status",
        "total_ms",
        "downtime_ms",
        "setup_ms",
        "rounds",
        "bytes_sent",
        "pages_sent",
        "throughput_mib_s",
        "src_cpu_s",
        "dst_cpu_s",
        "digest_match",
        "transport",
    ] {
        assert!(json.get(k).is_some(), "summary lacks {k}");
    }
}

#[test]
fn classic_with_guest_writing_converges_and_matches() {
    let src = SoftVm::new(32 * MIB).expect("src");
    src.fill(0.25);
    src.start_writer(WriterConfig {
        pages_per_sec: 3000,
        pattern: WritePattern::Random { seed: 7 },
    });
    std::thread::sleep(Duration::from_millis(50));
    let dst = SoftVm::new_incoming(32 * MIB).expect("dst");
    let (r, d) = pair(
        &src,
        &dst,
        &MigrateOptions::default(),
        &ReceiveOptions::default(),
    );
    let s = r.expect("migration");
    d.expect("receive");
    assert!(src.writes() > 0);
    check_equal_and_handed_over(&src, &dst);
    assert!(s.round_details.last().is_some_and(|r| r.stop_and_copy));
}

#[test]
fn multi_tcp_two_regions_hot_cold_matches() {
    let regions = [(0, 8 * MIB), (64 * MIB, 8 * MIB)];
    let src = SoftVm::with_regions(&regions, 2, 0x3).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 5000,
        pattern: WritePattern::HotCold {
            hot_fraction: 0.05,
            hot_probability: 0.9,
            seed: 3,
        },
    });
    std::thread::sleep(Duration::from_millis(50));
    let dst = SoftVm::with_regions(&regions, 2, 0x3).expect("dst");
    dst.set_paused(true);
    let opts = MigrateOptions {
        transport: TransportKind::MultiTcp { streams: 3 },
        ..Default::default()
    };
    let (r, d) = pair(
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
    check_equal_and_handed_over(&src, &dst);
    assert_eq!(s.transport, "multi-tcp");
    assert_eq!(d.transport, "multi-tcp");
    assert!(s.zero_pages_skipped > 0);
    assert_eq!(d.pages_received, s.pages_sent);
}

#[test]
fn multi_tcp_sequential_writer_single_stream() {
    let src = SoftVm::new(16 * MIB).expect("src");
    src.start_writer(WriterConfig {
        pages_per_sec: 4000,
        pattern: WritePattern::Sequential,
    });
    std::thread::sleep(Duration::from_millis(30));
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let opts = MigrateOptions {
        transport: TransportKind::MultiTcp { streams: 1 },
        ..Default::default()
    };
    let (r, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    r.expect("migration");
    d.expect("receive");
    check_equal_and_handed_over(&src, &dst);
}

#[test]
fn progress_reports_every_phase_in_order() {
    let src = SoftVm::new(8 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(8 * MIB).expect("dst");
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MigrateOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().expect("lock").push(p.clone())
        })),
        // Only the per-phase reports here; in-round ticks are tested below.
        progress_interval: Duration::ZERO,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let (r, _) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let s = r.expect("migration");
    let seen = seen.lock().expect("lock");
    // Elapsed time in milliseconds: it never goes back, and the last report comes after the
    // pause ended and within the call.
    assert!(seen.windows(2).all(|w| w[0].elapsed_ms <= w[1].elapsed_ms));
    let last_ms = seen.last().map_or(0.0, |p| p.elapsed_ms);
    assert!(
        last_ms >= s.downtime_ms && last_ms <= wall_ms,
        "last report at {last_ms} ms, downtime {} ms, call {wall_ms} ms",
        s.downtime_ms
    );
    let phases: Vec<Phase> = seen.iter().map(|p| p.phase).collect();
    assert_eq!(phases.first(), Some(&Phase::Setup));
    assert_eq!(phases.last(), Some(&Phase::Done));
    assert!(phases.contains(&Phase::PreCopy) && phases.contains(&Phase::StopAndCopy));
    assert!(seen
        .windows(2)
        .all(|w| w[0].round <= w[1].round && w[0].bytes_sent <= w[1].bytes_sent));
    assert_eq!(seen.last().map(|p| p.bytes_sent), Some(s.bytes_sent));
}

#[test]
fn progress_ticks_inside_a_long_round() {
    // 8 MiB at a 4 MiB/s cap: round 1 lasts about 1.75 s, so a 100 ms ticker must report
    // partial progress of that round (remaining pages strictly between 0 and all).
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
        transport: TransportKind::MultiTcp { streams: 2 },
        ..Default::default()
    };
    let (r, _) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    r.expect("migration");
    let seen = seen.lock().expect("lock");
    let partial = in_round_ticks(&seen, 2048);
    // Round 1 starts from nothing sent: a tick counts the pages done so far in it.
    for p in &partial {
        assert!(p.pages_sent > 0, "{p:?}");
        assert_eq!(p.pages_sent + p.remaining_pages, 2048, "{p:?}");
        assert_eq!(p.bytes_sent, p.pages_sent * PAGE_SIZE as u64, "{p:?}");
        // Over the round so far: the 4 MiB/s cap, plus the 1 MiB burst early on.
        assert!(p.bandwidth_mib_s > 0.0 && p.bandwidth_mib_s < 32.0, "{p:?}");
    }
}

#[test]
fn multi_tcp_round_longer_than_io_timeout_is_not_a_timeout() {
    // Round 1 moves 8 MiB at 4 MiB/s (about 1.75 s) while the control stream stays silent;
    // the destination's 600 ms io_timeout must count data-stream bytes as liveness (a 1 MiB
    // batch lands every ~250 ms somewhere).
    let src = SoftVm::new(8 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(8 * MIB).expect("dst");
    let opts = MigrateOptions {
        transport: TransportKind::MultiTcp { streams: 2 },
        bandwidth_limit: Some(4 * MIB),
        ..Default::default()
    };
    let ropts = ReceiveOptions {
        io_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let (r, d) = pair(&src, &dst, &opts, &ropts);
    r.expect("migration");
    d.expect("receive");
    check_equal_and_handed_over(&src, &dst);
}

#[test]
fn bandwidth_cap_bounds_throughput() {
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    for transport in [
        TransportKind::Classic,
        TransportKind::MultiTcp { streams: 2 },
    ] {
        let dst2 = SoftVm::new_incoming(4 * MIB).expect("dst");
        let opts = MigrateOptions {
            transport,
            bandwidth_limit: Some(8 * MIB),
            ..Default::default()
        };
        let (r, _) = pair(&src, &dst2, &opts, &ReceiveOptions::default());
        src.resume().expect("resume for the next run");
        let s = r.expect("migration");
        // 4 MiB at 8 MiB/s with a 1 MiB initial burst: at least ~0.37 s of sending, so the
        // measured rate cannot exceed the cap by more than the burst allows.
        assert!(
            s.throughput_mib_s < 8.0 * 1.4,
            "{transport:?}: {} MiB/s over an 8 MiB/s cap",
            s.throughput_mib_s
        );
        assert!(s.bytes_sent >= 4 * MIB);
    }
    drop(dst);
}

/// Delegates to a SoftVm but reports the first `hot` pages dirty at every sync: a guest that
/// never lets pre-copy converge, deterministically.
struct NeverConverges {
    vm: SoftVm,
    hot: usize,
}

impl MigratableVm for NeverConverges {
    fn layout(&self) -> fastmig_migration::VmLayout {
        self.vm.layout()
    }
    fn memory(&self) -> Vec<fastmig_migration::MemoryRegion> {
        self.vm.memory()
    }
    fn start_dirty_log(&self) -> Result<(), fastmig_migration::VmError> {
        self.vm.start_dirty_log()
    }
    fn sync_dirty_log(&self) -> Result<fastmig_migration::DirtyBitmap, fastmig_migration::VmError> {
        let mut b = self.vm.sync_dirty_log()?;
        for p in 0..self.hot {
            b.set(p);
        }
        Ok(b)
    }
    fn stop_dirty_log(&self) -> Result<(), fastmig_migration::VmError> {
        self.vm.stop_dirty_log()
    }
    fn pause(&self) -> Result<(), fastmig_migration::VmError> {
        self.vm.pause()
    }
    fn resume(&self) -> Result<(), fastmig_migration::VmError> {
        self.vm.resume()
    }
    fn save_state(&self) -> Result<Vec<u8>, fastmig_migration::VmError> {
        self.vm.save_state()
    }
    fn restore_state(&self, s: &[u8]) -> Result<(), fastmig_migration::VmError> {
        self.vm.restore_state(s)
    }
}

fn never_converging_run(
    policy: OnNoConverge,
    max_rounds: u32,
) -> (
    NeverConverges,
    SoftVm,
    Result<fastmig_migration::MigrationSummary, fastmig_migration::MigrationError>,
) {
    let src = NeverConverges {
        vm: SoftVm::new(4 * MIB).expect("src"),
        hot: 256,
    };
    src.vm.fill(1.0);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let opts = MigrateOptions {
        on_no_converge: policy,
        max_rounds,
        // 256 dirty pages never fit in zero downtime.
        downtime_limit: Duration::ZERO,
        ..Default::default()
    };
    let l = common::loopback();
    let ep = l.endpoint().expect("ep");
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| common::receive_into(&dst, &l, &ReceiveOptions::default()));
        let r = fastmig_migration::migrate(&src, &ep, &opts);
        let _ = h.join();
        r
    });
    (src, dst, r)
}

#[test]
fn no_convergence_abort_fails_and_source_keeps_running() {
    let (src, dst, r) = never_converging_run(OnNoConverge::Abort, 30);
    match r {
        Err(fastmig_migration::MigrationError::NotConverged { rounds, reason }) => {
            // Round 1 plus STALL_ROUNDS (3) rounds of 256 pages each.
            assert_eq!(rounds, 4, "{reason}");
            assert!(reason.contains("stopped shrinking"), "{reason}");
        }
        other => panic!("expected NotConverged, got {other:?}"),
    }
    common::assert_source_intact(&src.vm);
    assert!(!dst.is_running());
}

#[test]
fn no_convergence_force_completes_with_forced_status() {
    let (src, dst, r) = never_converging_run(OnNoConverge::Force, 30);
    let s = r.expect("forced migration");
    assert_eq!(s.status, MigrationStatus::CompletedForced);
    assert_eq!(s.rounds, 5, "full pass, 3 stalled rounds, stop-and-copy");
    assert_eq!(s.round_details.last().map(|r| r.pages), Some(256));
    check_equal_and_handed_over(&src.vm, &dst);
}

#[test]
fn no_convergence_wait_gives_up_at_round_limit() {
    let (src, dst, r) = never_converging_run(OnNoConverge::Wait, 6);
    match r {
        Err(fastmig_migration::MigrationError::NotConverged { rounds, reason }) => {
            assert_eq!(rounds, 5, "{reason}");
            assert!(reason.contains("round limit 6"), "{reason}");
        }
        other => panic!("expected NotConverged, got {other:?}"),
    }
    common::assert_source_intact(&src.vm);
    assert!(!dst.is_running());
}

#[test]
fn round_times_run_until_the_destination_acknowledged_them() {
    // A proxy holds the destination's RoundAck(1) back for 300 ms: round 1 must count that
    // wait (its pages are not in the destination's memory before the ack says so), and every
    // figure derived from the round times must agree with them.
    use fastmig_migration::protocol::{decode, Message};
    let held = Duration::from_millis(300);
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let l = common::loopback();
    // Also held: the HelloReply (inside the source's setup) and the Ready (inside the pause).
    let (held_reply, held_ready) = (Duration::from_millis(100), Duration::from_millis(200));
    let hold_ack = move |frame: Vec<u8>| {
        match decode(&frame) {
            Ok((Message::RoundAck { round: 1 }, _)) => std::thread::sleep(held),
            Ok((Message::HelloReply(_), _)) => std::thread::sleep(held_reply),
            Ok((Message::Ready, _)) => std::thread::sleep(held_ready),
            _ => {}
        }
        Some(frame)
    };
    let started = std::time::Instant::now();
    let proxy = common::frame_proxy(
        l.endpoint().expect("endpoint"),
        Box::new(Some),
        Box::new(hold_ack),
    );
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MigrateOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().expect("lock").push(p.clone())
        })),
        ..Default::default()
    };
    let (r, d) = std::thread::scope(|s| {
        let h = s.spawn(|| common::receive_into(&dst, &l, &ReceiveOptions::default()));
        (
            fastmig_migration::migrate(&src, &proxy, &opts),
            h.join().expect("receiver"),
        )
    });
    let s = r.expect("migration");
    d.expect("receive");
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    assert!(
        s.setup_ms >= ms(held_reply) && s.setup_ms <= s.total_ms,
        "{s:?}"
    );
    assert!(
        s.downtime_ms >= ms(held_ready) && s.downtime_ms <= s.total_ms,
        "{s:?}"
    );
    assert!(
        s.total_ms >= ms(held + held_reply + held_ready) && s.total_ms <= wall_ms,
        "{s:?}"
    );
    let mib = (1u64 << 20) as f64;
    // The sync after round 1 reports the bandwidth measured so far: round 1's, end to end.
    let after_first = seen
        .lock()
        .expect("lock")
        .iter()
        .find(|p| p.phase == Phase::PreCopy && p.round == 1)
        .cloned()
        .expect("a report after round 1");
    let first = &s.round_details[0];
    assert!(
        (after_first.bandwidth_mib_s - first.bandwidth_mib_s).abs() <= 1e-6 * first.bandwidth_mib_s,
        "{after_first:?} vs {first:?}"
    );
    assert!(s.round_details[0].ms >= held.as_secs_f64() * 1e3, "{s:?}");
    for r in &s.round_details {
        let expected = r.bytes as f64 / (r.ms / 1e3) / mib;
        assert!(
            (r.bandwidth_mib_s - expected).abs() <= 1e-6 * expected.max(1.0),
            "{r:?}"
        );
    }
    // Throughput is all page bytes over all round times (sending plus acknowledgement).
    let secs: f64 = s.round_details.iter().map(|r| r.ms / 1e3).sum();
    let expected = s.bytes_sent as f64 / secs / mib;
    assert!(
        (s.throughput_mib_s - expected).abs() <= 1e-6 * expected,
        "{} vs {expected}: {s:?}",
        s.throughput_mib_s
    );
}

/// CPU figures are CPU seconds of the threads that did the work: never more than the wall time
/// of the migration times the number of those threads (the main thread and one worker per
/// stream on each side), and not zero. A worker whose CPU was taken as a ratio, or summed
/// wrongly, breaks the bound.
#[test]
fn cpu_figures_fit_in_the_wall_time_of_the_threads_that_did_the_work() {
    let streams = 3;
    for transport in [TransportKind::MultiTcp { streams }, TransportKind::Classic] {
        let src = SoftVm::new(16 * MIB).expect("src");
        src.fill(0.5);
        let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
        let opts = MigrateOptions {
            transport,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let (r, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
        let wall = t0.elapsed().as_secs_f64();
        let (s, d) = (r.expect("migration"), d.expect("receive"));
        let threads = f64::from(1 + streams);
        for (side, cpu) in [("source", s.src_cpu_s), ("destination", d.dst_cpu_s)] {
            assert!(
                cpu > 0.0 && cpu <= wall * threads,
                "{transport:?}: {side} CPU {cpu} s, wall {wall} s"
            );
        }
    }
}
