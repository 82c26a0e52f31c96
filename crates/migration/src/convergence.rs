//! The pre-copy stop rule, as a pure function of what the last dirty-log sync showed.
//!
//! After each sync the engine calls [`decide`] with the round's [`Observation`] and the
//! [`History`] of earlier rounds; it answers stop-and-copy, another round, force, or fail,
//! and the next history. Nothing here does I/O or reads a clock, so every rule has a unit
//! test below.

use std::time::Duration;

use crate::options::OnNoConverge;

/// Below this estimated downtime, stop-and-copy at once: another round cannot gain much.
pub(crate) const GOOD_ENOUGH_DOWNTIME: Duration = Duration::from_millis(1);
/// Rounds in a row without a real drop in dirty pages before we call it non-converging.
pub(crate) const STALL_ROUNDS: u32 = 3;
/// A round "drops" if it has fewer than this fraction of the previous round's dirty pages.
pub(crate) const STALL_RATIO: f64 = 0.95;

/// What the sync after a round showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Observation {
    /// Dirty pages now.
    pub dirty: usize,
    /// Pages dirtied per second since the previous sync.
    pub dirty_rate: f64,
    /// Time to send the dirty pages at the measured bandwidth (the downtime if we stop now).
    pub est: Duration,
    /// Rounds sent so far (the full pass included).
    pub rounds: u32,
    /// Measured bandwidth, MiB/s (for the reason text only).
    pub bandwidth_mib_s: f64,
}

/// What the rule remembers between rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct History {
    /// Dirty pages at the previous sync (`usize::MAX` before the first).
    pub prev_dirty: usize,
    /// Rounds in a row whose dirty set did not drop below [`STALL_RATIO`] of the previous.
    pub stalled: u32,
}

impl Default for History {
    fn default() -> Self {
        Self {
            prev_dirty: usize::MAX,
            stalled: 0,
        }
    }
}

/// The limits the rule applies (from `MigrateOptions`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    /// Largest acceptable downtime.
    pub downtime: Duration,
    /// Most rounds including the full pass.
    pub max_rounds: u32,
    /// What to do when rounds stop converging.
    pub on_no_converge: OnNoConverge,
}

/// The rule's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Converged: pause and send the rest.
    StopAndCopy,
    /// Send another pre-copy round. `stalling` says why the rounds look non-converging
    /// (policy `Wait`), for a warning.
    AnotherRound {
        /// Why it does not converge, if it does not.
        stalling: Option<String>,
    },
    /// Not converging and the policy is `Force`: stop-and-copy now, over the limit.
    Force {
        /// Why.
        reason: String,
    },
    /// Not converging and the policy says fail (`Abort`, or `Wait` at the round limit).
    Fail {
        /// Why.
        reason: String,
    },
}

/// The remaining pages already fit the downtime limit; is one more pre-copy round still worth
/// it? Yes when the pages dirtied while sending them (`dirty_rate * est`) would be at most half
/// of them, so the round at least halves the downtime, for about `est` more total time. The
/// limit stays an upper bound; this only buys a shorter pause when it is cheap, as a user
/// asking for "milliseconds" wants.
pub(crate) fn worth_another_round(
    dirty: usize,
    dirty_rate: f64,
    est: Duration,
    rounds: u32,
    max_rounds: u32,
) -> bool {
    est > GOOD_ENOUGH_DOWNTIME
        && rounds + 1 < max_rounds
        && dirty_rate * est.as_secs_f64() <= dirty as f64 / 2.0
}

/// Decides what follows a sync, and returns the history for the next one.
pub(crate) fn decide(h: History, o: &Observation, l: &Limits) -> (Decision, History) {
    // Extra rounds only while they really pay: the last one must have at least halved the
    // dirty set (a round has fixed costs the estimate does not see).
    let last_halved = (o.dirty as f64) <= h.prev_dirty as f64 / 2.0;
    if o.est <= l.downtime
        && !(last_halved
            && worth_another_round(o.dirty, o.dirty_rate, o.est, o.rounds, l.max_rounds))
    {
        return (Decision::StopAndCopy, h);
    }
    let stalled = if (o.dirty as f64) >= STALL_RATIO * h.prev_dirty as f64 {
        h.stalled + 1
    } else {
        0
    };
    let next = History {
        prev_dirty: o.dirty,
        stalled,
    };
    let at_limit = o.rounds + 1 >= l.max_rounds;
    let why = if at_limit {
        Some(format!(
            "round limit {} reached with {} dirty pages (estimated {:?})",
            l.max_rounds, o.dirty, o.est
        ))
    } else if stalled >= STALL_ROUNDS {
        Some(format!(
            "dirty pages stopped shrinking ({} after {} rounds, dirty rate {:.0} pages/s, bandwidth {:.1} MiB/s)",
            o.dirty, o.rounds, o.dirty_rate, o.bandwidth_mib_s
        ))
    } else {
        None
    };
    let decision = match (why, l.on_no_converge) {
        (None, _) => Decision::AnotherRound { stalling: None },
        (Some(reason), OnNoConverge::Force) => Decision::Force { reason },
        (Some(reason), OnNoConverge::Abort) => Decision::Fail { reason },
        (Some(reason), OnNoConverge::Wait) if at_limit => Decision::Fail { reason },
        (Some(reason), OnNoConverge::Wait) => Decision::AnotherRound {
            stalling: Some(reason),
        },
    };
    (decision, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits(policy: OnNoConverge) -> Limits {
        Limits {
            downtime: ms(30),
            max_rounds: 30,
            on_no_converge: policy,
        }
    }

    fn obs(dirty: usize, dirty_rate: f64, est: Duration, rounds: u32) -> Observation {
        Observation {
            dirty,
            dirty_rate,
            est,
            rounds,
            bandwidth_mib_s: 100.0,
        }
    }

    #[test]
    fn another_round_only_when_it_at_least_halves_the_downtime() {
        let max = 30;
        // 9,000 pages left at 17k pages/s, 14 ms to send: ~240 pages come back. Worth it.
        assert!(worth_another_round(9000, 17_000.0, ms(14), 2, max));
        // Already under a millisecond: stop.
        assert!(!worth_another_round(
            100,
            17_000.0,
            Duration::from_micros(500),
            2,
            max
        ));
        // A dirty rate that refills more than half of the set while it is sent: stop.
        assert!(!worth_another_round(1000, 100_000.0, ms(10), 2, max));
        // Exactly half comes back (1000 pages/s × 1 s = 2000 / 2): still worth it.
        assert!(worth_another_round(2000, 1000.0, ms(1000), 2, max));
        assert!(!worth_another_round(2000, 1001.0, ms(1000), 2, max));
        // Exactly the good-enough downtime counts as good enough; a microsecond more does not.
        assert!(!worth_another_round(
            9000,
            17_000.0,
            GOOD_ENOUGH_DOWNTIME,
            2,
            max
        ));
        assert!(worth_another_round(
            9000,
            17_000.0,
            GOOD_ENOUGH_DOWNTIME + Duration::from_micros(1),
            2,
            max
        ));
        // The round limit wins.
        assert!(!worth_another_round(9000, 17_000.0, ms(14), max - 1, max));
        assert!(worth_another_round(9000, 17_000.0, ms(14), max - 2, max));
    }

    #[test]
    fn over_the_limit_means_another_round_and_remembers_the_dirty_set() {
        let (d, h) = decide(
            History::default(),
            &obs(10_000, 1000.0, ms(40), 1),
            &limits(OnNoConverge::Wait),
        );
        assert_eq!(d, Decision::AnotherRound { stalling: None });
        assert_eq!(
            h,
            History {
                prev_dirty: 10_000,
                stalled: 0
            }
        );
    }

    #[test]
    fn within_the_limit_stops_unless_an_extra_round_pays() {
        let l = limits(OnNoConverge::Wait);
        // 20 ms fits 30 ms; a slow dirty rate makes another round worth it, and the first
        // sync counts as having halved (no previous set): one more round.
        let (d, h) = decide(History::default(), &obs(5000, 1000.0, ms(20), 1), &l);
        assert_eq!(d, Decision::AnotherRound { stalling: None });
        // The next sync did not halve the set (3000 > 5000 / 2): stop now.
        let (d, _) = decide(h, &obs(3000, 1000.0, ms(12), 2), &l);
        assert_eq!(d, Decision::StopAndCopy);
        // It halved (2500 = 5000 / 2) and is still worth it: one more.
        let (d, _) = decide(h, &obs(2500, 1000.0, ms(10), 2), &l);
        assert_eq!(d, Decision::AnotherRound { stalling: None });
        // Exactly at the limit counts as fitting, a millisecond over does not.
        let (d, _) = decide(h, &obs(3000, 1000.0, ms(30), 2), &l);
        assert_eq!(d, Decision::StopAndCopy);
        let (d, _) = decide(h, &obs(3000, 1000.0, ms(31), 2), &l);
        assert_eq!(d, Decision::AnotherRound { stalling: None });
        // Under a millisecond stops at once, even after a halving round.
        let (d, _) = decide(h, &obs(10, 0.0, Duration::from_micros(900), 2), &l);
        assert_eq!(d, Decision::StopAndCopy);
    }

    /// Three syncs in a row at ≥ 95 % of the previous dirty set, over the limit.
    fn stall(policy: OnNoConverge) -> Vec<Decision> {
        let l = limits(policy);
        let mut h = History::default();
        let mut out = Vec::new();
        for (i, dirty) in [10_000, 9_500, 9_500, 9_600].into_iter().enumerate() {
            let (d, next) = decide(h, &obs(dirty, 50_000.0, ms(100), i as u32 + 1), &l);
            out.push(d);
            h = next;
        }
        out
    }

    #[test]
    fn a_stall_is_three_rounds_without_a_five_percent_drop() {
        let d = stall(OnNoConverge::Abort);
        // 9,500 is exactly 95 % of 10,000: a stall round (≥). Rounds 2, 3, 4 stall.
        assert_eq!(
            d[..3],
            vec![Decision::AnotherRound { stalling: None }; 3][..]
        );
        assert!(
            matches!(&d[3], Decision::Fail { reason } if reason.contains("stopped shrinking")),
            "{d:?}"
        );
        // A drop just under 95 % resets the count.
        let l = limits(OnNoConverge::Abort);
        let h = History {
            prev_dirty: 10_000,
            stalled: 2,
        };
        let (d, h2) = decide(h, &obs(9_499, 1.0, ms(100), 3), &l);
        assert_eq!(d, Decision::AnotherRound { stalling: None });
        assert_eq!(h2.stalled, 0);
    }

    #[test]
    fn each_policy_answers_a_stall_its_own_way() {
        assert!(matches!(
            stall(OnNoConverge::Force)[3],
            Decision::Force { .. }
        ));
        assert!(matches!(
            stall(OnNoConverge::Abort)[3],
            Decision::Fail { .. }
        ));
        assert!(matches!(
            &stall(OnNoConverge::Wait)[3],
            Decision::AnotherRound { stalling: Some(r) } if r.contains("stopped shrinking")
        ));
    }

    #[test]
    fn the_round_limit_fails_wait_and_abort_and_forces_force() {
        let o = obs(10_000, 1.0, ms(100), 29);
        for (policy, forced) in [
            (OnNoConverge::Wait, false),
            (OnNoConverge::Abort, false),
            (OnNoConverge::Force, true),
        ] {
            let (d, _) = decide(History::default(), &o, &limits(policy));
            match d {
                Decision::Force { reason } => {
                    assert!(forced && reason.contains("round limit 30"))
                }
                Decision::Fail { reason } => {
                    assert!(!forced && reason.contains("round limit 30"))
                }
                other => panic!("{policy:?}: {other:?}"),
            }
        }
        // One round earlier is not the limit yet.
        let (d, _) = decide(
            History::default(),
            &obs(10_000, 1.0, ms(100), 28),
            &limits(OnNoConverge::Wait),
        );
        assert_eq!(d, Decision::AnotherRound { stalling: None });
    }
}
