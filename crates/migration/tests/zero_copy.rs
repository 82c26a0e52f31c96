//! multi-tcp with `MSG_ZEROCOPY` page sends (`MigrateOptions::zero_copy_send`).
//!
//! The kernel reads guest pages when it transmits, after `sendmsg` returned, so a page the
//! guest rewrites in between goes out newer than its hash; it is dirty and sent again, so
//! memory still matches as of the pause. `measure_zero_copy_send_1gib` (ignored) is the
//! measurement behind `bench/RESULTS.md`, "Zero-copy send (MSG_ZEROCOPY)"; it asserts
//! correctness only, never time.

mod common;

use std::time::Duration;

use common::{pair, MIB};
use fastmig_migration::test_utils::{SoftVm, WritePattern, WriterConfig};
use fastmig_migration::{MigrateOptions, ReceiveOptions, TransportKind};

#[test]
fn zero_copy_send_with_guest_writing_matches() {
    let src = SoftVm::new(32 * MIB).expect("src");
    src.fill(0.7);
    src.start_writer(WriterConfig {
        pages_per_sec: 5000,
        pattern: WritePattern::Random { seed: 11 },
    });
    std::thread::sleep(Duration::from_millis(30));
    let dst = SoftVm::new_incoming(32 * MIB).expect("dst");
    let opts = MigrateOptions {
        transport: TransportKind::MultiTcp { streams: 2 },
        zero_copy_send: true,
        ..Default::default()
    };
    let ropts = ReceiveOptions {
        verify_memory: true,
        ..Default::default()
    };
    let (s, d) = pair(&src, &dst, &opts, &ropts);
    let s = s.expect("migration");
    let d = d.expect("receive");
    assert!(s.digest_match);
    assert!(s.rounds >= 2, "the writer forces at least one dirty round");
    assert_eq!(d.pages_received, s.pages_sent);
    src.stop_writer();
    assert!(
        src.snapshot() == dst.snapshot(),
        "destination memory equals the source's as of the pause"
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `cargo test --release -p fastmig-migration --features test-utils --test zero_copy -- \
///  --ignored --nocapture` (1 GiB, all pages non-zero, idle and with 20k writes/s).
#[test]
#[ignore = "measurement (1 GiB, tens of seconds); run by hand"]
fn measure_zero_copy_send_1gib() {
    for rate in [0u64, 20_000] {
        let mut rows: Vec<(bool, Vec<[f64; 4]>)> = vec![(false, Vec::new()), (true, Vec::new())];
        for _rep in 0..3 {
            for (zero_copy, runs) in rows.iter_mut() {
                let src = SoftVm::new(1024 * MIB).expect("src");
                src.fill(1.0);
                if rate > 0 {
                    src.start_writer(WriterConfig {
                        pages_per_sec: rate,
                        pattern: WritePattern::Random { seed: 3 },
                    });
                }
                let dst = SoftVm::new_incoming(1024 * MIB).expect("dst");
                // Allocate the destination's pages first, as the VMM's incoming VM does
                // (it pre-faults): otherwise page faults on the receiving side dominate.
                dst.fill(1.0);
                let opts = MigrateOptions {
                    transport: TransportKind::MultiTcp { streams: 2 },
                    zero_copy_send: *zero_copy,
                    on_no_converge: fastmig_migration::OnNoConverge::Force,
                    ..Default::default()
                };
                let (s, d) = pair(&src, &dst, &opts, &ReceiveOptions::default());
                let s = s.expect("migration");
                d.expect("receive");
                assert!(s.digest_match);
                runs.push([s.total_ms, s.downtime_ms, s.src_cpu_s, s.dst_cpu_s]);
            }
        }
        for (zero_copy, runs) in rows {
            let col = |i: usize| median(runs.iter().map(|r| r[i]).collect());
            println!(
                "writes/s {rate:>6} zero_copy {zero_copy:<5} total {:7.1} ms  downtime {:6.1} ms  src cpu {:.3} s  dst cpu {:.3} s  (median of {})",
                col(0),
                col(1),
                col(2),
                col(3),
                runs.len()
            );
        }
    }
}
