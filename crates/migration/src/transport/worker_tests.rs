//! The sending workers' results: their CPU time reaches the source's figure (`src_cpu_s` adds
//! the transport's `worker_cpu_s`, which `merge_worker_results` sums round after round).

use super::*;
use crate::util::CancelToken;

fn stats(pages: u64) -> PageStats {
    PageStats {
        pages,
        zero_pages: 1,
        bytes: pages * 4096,
    }
}

#[test]
fn merged_results_add_every_workers_cpu_to_the_running_total() {
    let cancel = CancelToken::new();
    let mut cpu_s = 0.0;
    // Round 1: two workers (exact binary fractions, so the sums are exact).
    let merged = merge_worker_results(
        vec![(Ok(stats(3)), 0.25), (Ok(stats(5)), 0.5)],
        &cancel,
        &mut cpu_s,
    )
    .expect("no worker failed");
    assert_eq!(
        merged,
        PageStats {
            pages: 8,
            zero_pages: 2,
            bytes: 8 * 4096,
        }
    );
    assert_eq!(cpu_s, 0.75);
    // Round 2 adds to what round 1 used.
    merge_worker_results(vec![(Ok(stats(1)), 0.125)], &cancel, &mut cpu_s).expect("ok");
    assert_eq!(cpu_s, 0.875);
    // A failed worker's CPU counts too: it was spent on the migration.
    let r = merge_worker_results(
        vec![
            (Ok(stats(1)), 0.0625),
            (
                Err(MigrationError::Internal {
                    what: "worker".into(),
                }),
                0.125,
            ),
        ],
        &cancel,
        &mut cpu_s,
    );
    assert!(matches!(r, Err(MigrationError::Internal { .. })), "{r:?}");
    assert_eq!(cpu_s, 1.0625);
}

#[test]
fn real_workers_cpu_reaches_the_total() {
    // Two threads that burn CPU; what `run_worker` measured for each is what the total gains.
    let cancel = CancelToken::new();
    let results: Vec<SendWorkerResult> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    run_worker(&cancel, || {
                        let mut x = 0u64;
                        for i in 0..2_000_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                        }
                        Ok(stats(x % 2 + 1))
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| join_worker(h, "worker")).collect()
    });
    let reported: f64 = results.iter().map(|r| r.1).sum();
    assert!(reported > 0.0, "the workers used no CPU: {reported}");
    let mut cpu_s = 0.0;
    merge_worker_results(results, &cancel, &mut cpu_s).expect("no worker failed");
    assert_eq!(cpu_s, reported);
}
