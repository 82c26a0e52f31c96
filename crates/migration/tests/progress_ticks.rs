//! The progress ticker inside a long round: one report per interval, not more, each with the
//! time since the migration started and the bandwidth of the round so far. Written for the mutants of `engine.rs`'s `send_round`
//! (TESTING.md, "engine.rs").

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{pair, MIB};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{MigrateOptions, Phase, Progress, ReceiveOptions, PAGE_SIZE};

#[test]
fn in_round_ticks_come_once_per_interval_with_the_time_since_the_start() {
    // 8 MiB at a 4 MiB/s cap: round 1 lasts about 1.75 s, so a 200 ms ticker reports in it
    // several times.
    let interval = Duration::from_millis(200);
    let src = SoftVm::new(8 * MIB).expect("src");
    src.fill(1.0);
    let dst = SoftVm::new_incoming(8 * MIB).expect("dst");
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let opts = MigrateOptions {
        bandwidth_limit: Some(4 * MIB),
        progress_interval: interval,
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().expect("lock").push(p.clone())
        })),
        ..Default::default()
    };
    let (r, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
    let s = r.expect("migration");
    d.expect("receive");
    let seen = seen.lock().expect("lock");
    // The ticks of round 1: in pre-copy, before any round finished.
    let ticks: Vec<&Progress> = seen
        .iter()
        .filter(|p| p.phase == Phase::PreCopy && p.round == 0)
        .collect();
    let round_ms = s.round_details[0].ms;
    let interval_ms = interval.as_secs_f64() * 1e3;
    assert!(ticks.len() >= 2, "{} ticks in {round_ms} ms", ticks.len());
    // Tick k comes at least k intervals after the round started, so no more than the
    // round's length allows (a ticker that fires on every 20 ms poll gives about 9 times
    // as many).
    assert!(
        ticks.len() as f64 <= round_ms / interval_ms + 1.0,
        "{} ticks in a round of {round_ms} ms at one per {interval_ms} ms",
        ticks.len()
    );
    // ... and says so: its time since the start (in ms) is at least k intervals, and no
    // later than the report that follows the round.
    let after_round = seen
        .iter()
        .find(|p| p.phase == Phase::PreCopy && p.round == 1)
        .expect("the report after round 1");
    for (k, t) in ticks.iter().enumerate() {
        let at_least = (k + 1) as f64 * interval_ms;
        assert!(
            t.elapsed_ms >= at_least && t.elapsed_ms <= after_round.elapsed_ms,
            "tick {} at {} ms: expected {at_least} ms to {} ms",
            k + 1,
            t.elapsed_ms,
            after_round.elapsed_ms
        );
        // Its bandwidth is the round's so far: the pages done in it (all of `pages_sent` in
        // round 1) over the time since the round started, which is at least k intervals and
        // at most the time since the migration started.
        let mib = t.pages_sent as f64 * PAGE_SIZE as f64 / MIB as f64;
        let (low, high) = (mib / (t.elapsed_ms / 1e3), mib / (at_least / 1e3));
        assert!(
            t.bandwidth_mib_s >= low * (1.0 - 1e-9) && t.bandwidth_mib_s <= high * (1.0 + 1e-9),
            "tick {}: {} MiB/s, expected {low} to {high} MiB/s: {t:?}",
            k + 1,
            t.bandwidth_mib_s
        );
    }
}
