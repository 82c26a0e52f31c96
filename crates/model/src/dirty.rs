//! How many distinct pages a workload dirties in a time window: the size of the next round.
//!
//! The dirty log reports a page once however often it was written, so a round is sized by
//! distinct pages, not by `rate × time`:
//!
//! - `random` (uniform over W pages at D writes/s): each page escapes one write with
//!   probability 1 − 1/W, so after D·t writes the expected distinct count is
//!   W(1 − (1 − 1/W)^(D t)) ≈ W(1 − e^(−D t / W)).
//! - `seq` (a sweep over W pages): every write hits a new page until the sweep wraps:
//!   min(D t, W).
//! - `hotcold` (a hot set H = hot·W takes a fraction h of the writes, uniformly; the cold
//!   rest C = W − H the others): the random formula on each part,
//!   H(1 − e^(−h D t / H)) + C(1 − e^(−(1−h) D t / C)).

use crate::scenario::{MigrationScenario, Pattern};

/// Expected distinct pages dirtied in `t` seconds by the scenario's workload.
pub fn distinct_pages(s: &MigrationScenario, t: f64) -> f64 {
    let w = s.wss_pages();
    let writes = s.dirty_rate_pps * t.max(0.0);
    if writes <= 0.0 {
        return 0.0;
    }
    match s.pattern {
        Pattern::Seq => writes.min(w),
        Pattern::Random => uniform(w, writes),
        Pattern::HotCold => {
            let hot = (s.hot * w).clamp(1.0, w);
            let cold = w - hot;
            uniform(hot, s.hot_writes * writes) + uniform(cold, (1.0 - s.hot_writes) * writes)
        }
    }
}

/// Expected distinct pages after `writes` uniform writes over `n` pages.
fn uniform(n: f64, writes: f64) -> f64 {
    if n <= 0.0 || writes <= 0.0 {
        return 0.0;
    }
    n * -(-writes / n).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Transport;

    fn scen(pattern: Pattern, rate: f64, wss_pages: u64) -> MigrationScenario {
        let mut s = MigrationScenario::new(1 << 30, Transport::Classic);
        s.pattern = pattern;
        s.dirty_rate_pps = rate;
        s.wss_bytes = wss_pages * 4096;
        s
    }

    #[test]
    fn distinct_pages_per_pattern() {
        // seq: 1000 writes/s for 2 s over 1500 pages wraps: 1500 distinct.
        assert_eq!(
            distinct_pages(&scen(Pattern::Seq, 1000.0, 1500), 2.0),
            1500.0
        );
        // seq, before wrapping: 1000 × 1 = 1000.
        assert_eq!(
            distinct_pages(&scen(Pattern::Seq, 1000.0, 1500), 1.0),
            1000.0
        );
        // random: W = 1000, D t = 1000 → 1000 (1 − e^−1) = 632.12.
        let r = distinct_pages(&scen(Pattern::Random, 1000.0, 1000), 1.0);
        assert!((r - 632.1206).abs() < 1e-3, "{r}");
        // hotcold, hot 0.1, h 0.9, W = 1000, 1000 writes: hot 100 pages get 900 writes →
        // 100 (1 − e^−9) = 99.988; cold 900 get 100 → 900 (1 − e^−1/9) = 94.64. Sum 194.63.
        let h = distinct_pages(&scen(Pattern::HotCold, 1000.0, 1000), 1.0);
        assert!((h - 194.63).abs() < 0.01, "{h}");
        // Nothing written, nothing dirty.
        assert_eq!(distinct_pages(&scen(Pattern::Random, 0.0, 1000), 5.0), 0.0);
    }
}
