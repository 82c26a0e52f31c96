//! The stop rule's inputs, end to end: the dirty rate, the bandwidth and the downtime estimate
//! the engine hands to `decide` (whose rules `convergence.rs` tests as a pure function) are
//! checked against what the test VM did and what the engine reported.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_source_intact, pair, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{
    MigrateOptions, MigrationError, MigrationStatus, OnNoConverge, Phase, Progress, ReceiveOptions,
    PAGE_SIZE,
};

/// Collects every progress report (per phase and per sync only: no in-round ticks).
fn recorder() -> (Arc<Mutex<Vec<Progress>>>, MigrateOptions) {
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MigrateOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().expect("lock").push(p.clone())
        })),
        progress_interval: Duration::ZERO,
        ..Default::default()
    };
    (seen, opts)
}

/// A `Duration`'s `Debug` text ("1.234567ms", "830.5µs", "2s") back into a duration.
fn parse_debug_duration(s: &str) -> Duration {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or_else(|| panic!("no unit in {s:?}"));
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .unwrap_or_else(|_| panic!("bad number in {s:?}"));
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" => 1e-6,
        "ns" => 1e-9,
        _ => panic!("unknown unit in {s:?}"),
    };
    Duration::from_secs_f64(v * scale)
}

/// The two numbers of "round limit N reached with D dirty pages (estimated EST)".
fn dirty_and_estimate(reason: &str) -> (u64, Duration) {
    let after = reason
        .split("reached with ")
        .nth(1)
        .unwrap_or_else(|| panic!("not a round-limit reason: {reason}"));
    let dirty: u64 = after
        .split(' ')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no dirty count in {reason}"));
    let est = after
        .split("(estimated ")
        .nth(1)
        .and_then(|e| e.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no estimate in {reason}"));
    (dirty, parse_debug_duration(est))
}

#[test]
fn the_estimate_the_rule_judges_is_the_dirty_bytes_over_the_reported_bandwidth() {
    // A round limit of 2 and no downtime to spare: the first sync after the full pass must
    // give up (policy abort), and the reason carries the dirty pages and the estimate the
    // rule saw. The sync's progress report carries the same dirty count, the dirty rate and
    // the bandwidth the estimate was computed with.
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 20_000,
        pattern: WritePattern::Random { seed: 11 },
    });
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let cap = 512 * MIB;
    let (seen, base) = recorder();
    let opts = MigrateOptions {
        downtime_limit: Duration::ZERO,
        max_rounds: 2,
        on_no_converge: OnNoConverge::Abort,
        bandwidth_limit: Some(cap),
        ..base
    };
    let t = Instant::now();
    let (r, _) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    let wall = t.elapsed().as_secs_f64();
    let reason = match r {
        Err(MigrationError::NotConverged { rounds: 1, reason }) => reason,
        other => panic!("expected the round limit to stop the migration: {other:?}"),
    };
    assert_source_intact(&src);
    src.stop_writer();
    let (dirty, est) = dirty_and_estimate(&reason);
    assert!(dirty > 0, "the guest wrote during the full pass: {reason}");

    let seen = seen.lock().expect("lock");
    // Before anything was measured the rule can only assume the cap.
    let setup = seen.first().expect("a setup report");
    assert_eq!(setup.phase, Phase::Setup);
    assert_eq!(setup.bandwidth_mib_s, cap as f64 / MIB as f64);
    let sync: Vec<&Progress> = seen.iter().filter(|p| p.phase == Phase::PreCopy).collect();
    let [sync] = sync[..] else {
        panic!("one sync expected: {seen:?}")
    };
    assert_eq!(sync.remaining_pages, dirty);
    let secs = sync.elapsed_ms / 1e3;
    assert!(secs > 0.0 && secs <= wall, "{sync:?}, wall {wall} s");
    // Dirty pages per second since the log started, which was after the migration started
    // and before the sync was reported: at least `dirty` pages in `secs`.
    assert!(
        sync.dirty_rate_pages_s >= dirty as f64 / secs * (1.0 - 1e-9),
        "dirty rate {} pages/s for {dirty} pages within {secs} s",
        sync.dirty_rate_pages_s
    );
    // Bandwidth: the bytes sent over at most the time elapsed, capped.
    let bw = sync.bandwidth_mib_s * MIB as f64;
    assert!(bw <= cap as f64, "bandwidth {bw} B/s above the cap");
    let full_pass = 2048 * PAGE_SIZE as u64; // the filled half at least
    assert!(sync.bytes_sent >= full_pass, "{sync:?}");
    assert!(
        bw >= (sync.bytes_sent as f64 / secs).min(cap as f64) * (1.0 - 1e-12),
        "bandwidth {bw} B/s below {} bytes in {secs} s",
        sync.bytes_sent
    );
    // The estimate: the dirty bytes at that bandwidth.
    let want = dirty as f64 * PAGE_SIZE as f64 / bw;
    let got = est.as_secs_f64();
    assert!(
        (got - want).abs() <= want * 1e-9 + 2e-9,
        "estimate {est:?} for {dirty} dirty pages at {bw} B/s, expected {want} s"
    );
}

#[test]
fn round_details_report_the_dirty_rate_and_bandwidth_of_each_round() {
    // A guest writing steadily and a downtime limit far above any estimate here: pre-copy
    // stops by the estimate (no forced stop under policy abort). Each round's details then
    // agree with the sync that started it and with its own bytes and time.
    let src = SoftVm::new(16 * MIB).expect("src");
    src.fill(0.5);
    src.start_writer(WriterConfig {
        pages_per_sec: 20_000,
        pattern: WritePattern::Random { seed: 5 },
    });
    let dst = SoftVm::new_incoming(16 * MIB).expect("dst");
    let (seen, base) = recorder();
    let opts = MigrateOptions {
        downtime_limit: Duration::from_secs(5),
        on_no_converge: OnNoConverge::Abort,
        ..base
    };
    let t = Instant::now();
    let (r, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    let wall = t.elapsed().as_secs_f64();
    let s = r.expect("migration");
    d.expect("receive");
    src.stop_writer();
    assert_eq!(
        s.status,
        MigrationStatus::Completed,
        "stopped by the estimate"
    );
    let rounds = &s.round_details;
    assert!(rounds.len() >= 2, "{rounds:?}");
    assert_eq!(
        rounds[0].dirty_rate_pages_s, 0.0,
        "the full pass follows no sync"
    );
    assert!(rounds.last().is_some_and(|r| r.stop_and_copy));
    for r in rounds {
        let secs = r.ms / 1e3;
        assert!(secs > 0.0 && secs <= wall, "{r:?}");
        let want = r.bytes as f64 / secs / MIB as f64;
        assert!(
            (r.bandwidth_mib_s - want).abs() <= want * 1e-9,
            "round {}: {} MiB/s for {} bytes in {secs} s",
            r.round,
            r.bandwidth_mib_s,
            r.bytes
        );
    }
    // Each round after the full pass was started by a sync, reported with its dirty count
    // and rate. The rate counts pages since the previous sync, which came before the
    // previous round was sent and acknowledged: over at least that round's time, at most
    // the time since the start.
    let syncs: Vec<Progress> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|p| p.phase == Phase::PreCopy)
        .cloned()
        .collect();
    assert_eq!(
        syncs.len(),
        rounds.len() - 1,
        "one sync before each round but the first"
    );
    for (i, (sync, r)) in syncs.iter().zip(&rounds[1..]).enumerate() {
        let prev = &rounds[i];
        let dirty = sync.remaining_pages as f64;
        assert_eq!(
            r.dirty_rate_pages_s, sync.dirty_rate_pages_s,
            "round {}",
            r.round
        );
        if !r.stop_and_copy {
            assert_eq!(
                r.pages + r.zero_pages,
                sync.remaining_pages,
                "round {}",
                r.round
            );
        } else {
            assert!(r.pages + r.zero_pages >= sync.remaining_pages, "{r:?}");
        }
        assert!(
            r.dirty_rate_pages_s >= dirty / (sync.elapsed_ms / 1e3) * (1.0 - 1e-9),
            "round {}: {} pages/s for {dirty} pages within {} ms",
            r.round,
            r.dirty_rate_pages_s,
            sync.elapsed_ms
        );
        assert!(
            r.dirty_rate_pages_s <= dirty / (prev.ms / 1e3) * (1.0 + 1e-9),
            "round {}: {} pages/s for {dirty} pages over more than {} ms",
            r.round,
            r.dirty_rate_pages_s,
            prev.ms
        );
    }
}
