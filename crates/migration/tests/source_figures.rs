//! The source's summary figures that no other test pins: the source's CPU is the
//! migration's only (not what the calling thread used before), and the rounds are numbered
//! from 1. Written for the mutants of `engine.rs`'s `run` and `send_round` (TESTING.md,
//! "engine.rs").

mod common;

use common::{pair, MIB};
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{thread_cpu_time, MigrateOptions, ReceiveOptions};

/// Burns about `secs` of CPU on the calling thread.
fn burn_cpu(secs: f64) {
    let start = thread_cpu_time();
    let mut x = 1u64;
    while thread_cpu_time() - start < secs {
        for i in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

#[test]
fn source_cpu_counts_only_the_migration() {
    // The calling thread has used CPU before it migrates; that CPU is not the migration's.
    let before = 0.5;
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    burn_cpu(before);
    let cpu0 = thread_cpu_time();
    let (r, d) = pair(
        &src,
        &dst,
        &MigrateOptions::default(),
        &ReceiveOptions::default(),
    );
    let used = thread_cpu_time() - cpu0;
    let s = r.expect("migration");
    d.expect("receive");
    // Classic has no worker threads: the source's figure is this thread's CPU during the call.
    assert!(
        s.src_cpu_s > 0.0 && s.src_cpu_s <= used,
        "src_cpu_s {} s, the thread used {used} s during the call ({before} s before it)",
        s.src_cpu_s
    );
}

#[test]
fn round_details_are_numbered_from_the_full_pass_to_stop_and_copy() {
    let src = SoftVm::new(4 * MIB).expect("src");
    src.fill(0.5);
    let dst = SoftVm::new_incoming(4 * MIB).expect("dst");
    let (r, d) = pair(
        &src,
        &dst,
        &MigrateOptions::default(),
        &ReceiveOptions::default(),
    );
    let s = r.expect("migration");
    d.expect("receive");
    // Round 1 is the full pass (every page, zero or not); the last is stop-and-copy.
    let numbers: Vec<u32> = s.round_details.iter().map(|r| r.round).collect();
    let expected: Vec<u32> = (1..=s.rounds).collect();
    assert_eq!(numbers, expected, "{s:?}");
    let first = &s.round_details[0];
    assert_eq!(first.pages + first.zero_pages, 1024, "{first:?}");
    assert!(s.round_details.last().is_some_and(|r| r.stop_and_copy));
}
