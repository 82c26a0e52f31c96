//! The VMM side of the workload mailbox, without KVM: what the answer to the guest's
//! `in eax, 0x10` is (a batch size, or stop) and when it may be given (pacing to the target
//! rate). The vCPU thread calls these and does the waiting.

use std::time::{Duration, Instant};

use crate::guest::{self, Slice};
use crate::state::WorkloadVcpuState;
use crate::workload::{WorkloadKind, WorkloadSpec};

/// Batches are sized to about this much guest time at the target rate.
const BATCH_PERIOD_S: f64 = 0.01;
/// Largest batch (and the batch of an unpaced guest).
pub(crate) const MAX_BATCH: u64 = 256;
/// A guest this far behind its schedule restarts the schedule instead of catching up.
const MAX_LAG: Duration = Duration::from_millis(100);

/// What the guest is told at its mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Stop writing and halt for good ([`guest::STOP_WRITING`]).
    Stop,
    /// Write up to `batch` pages; `issued` pages have been confirmed before them.
    Pages {
        /// Pages confirmed so far (the pacing position).
        issued: u64,
        /// Pages in the next batch, at least 1.
        batch: u64,
    },
}

/// Confirms the previous batch in `w` and decides the next one for a vCPU that writes
/// `slice` at `rate_per_vcpu` pages/s (0: unpaced). Does not mark the new batch in flight:
/// the caller does once the pacing wait is over.
pub(crate) fn next_grant(
    w: &mut WorkloadVcpuState,
    spec: &WorkloadSpec,
    slice: &Slice,
    rate_per_vcpu: f64,
) -> Grant {
    w.pages_done += w.in_flight;
    w.in_flight = 0;
    let finished_fill = spec.kind == WorkloadKind::Fill && w.pages_done >= slice.pages;
    if spec.kind == WorkloadKind::Idle || slice.pages == 0 || finished_fill || w.stopped_writing {
        w.stopped_writing = true;
        return Grant::Stop;
    }
    let mut batch = if rate_per_vcpu > 0.0 {
        ((rate_per_vcpu * BATCH_PERIOD_S).ceil() as u64).clamp(1, MAX_BATCH)
    } else {
        MAX_BATCH
    };
    if spec.kind == WorkloadKind::Fill {
        batch = batch.min(slice.pages - w.pages_done);
    }
    Grant::Pages {
        issued: w.pages_done,
        batch,
    }
}

impl Grant {
    /// The value the guest reads from the mailbox.
    pub(crate) fn mailbox_value(self) -> u32 {
        match self {
            Grant::Stop => guest::STOP_WRITING,
            // At most MAX_BATCH, so it fits.
            Grant::Pages { batch, .. } => batch as u32,
        }
    }
}

/// A vCPU's pacing schedule: page `issued` is due `(issued - base) / rate` after the anchor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pacer {
    /// When, at which page count and at which rate the schedule started.
    anchor: Option<(Instant, u64, f64)>,
}

impl Pacer {
    /// When the batch after `issued` pages may start, at `rate` pages/s (> 0). A guest that
    /// fell more than [`MAX_LAG`] behind is due at once and does not build up credit for a
    /// later burst.
    pub(crate) fn due(&mut self, now: Instant, issued: u64, rate: f64) -> Instant {
        // A new rate (`set_workload_rate`) starts a new schedule: the old one's pages at the
        // new rate would stall a slowed guest for long or let a sped-up one burst.
        if self.anchor.is_some_and(|(_, _, r)| r != rate) {
            self.anchor = None;
        }
        let (t0, base, _) = *self.anchor.get_or_insert((now, issued, rate));
        let due = t0 + Duration::from_secs_f64(issued.saturating_sub(base) as f64 / rate);
        if now > due + MAX_LAG {
            self.anchor = Some((now, issued, rate));
            now
        } else {
            due
        }
    }

    /// Forgets the schedule, so a resumed VM does not burst to catch up on the paused time.
    pub(crate) fn reset(&mut self) {
        self.anchor = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(spec: &WorkloadSpec, pages_total_mem: u64) -> Slice {
        guest::slices(spec, pages_total_mem, 1)[0]
    }

    #[test]
    fn batches_are_ten_milliseconds_of_the_rate_within_bounds() {
        let spec: WorkloadSpec = "dirty:wss=4M".parse().expect("spec");
        let s = slice(&spec, 16 << 20);
        let grant = |rate| next_grant(&mut WorkloadVcpuState::default(), &spec, &s, rate);
        // ceil(rate * 0.01), clamped to 1..=256; unpaced is 256.
        assert_eq!(
            grant(1000.0),
            Grant::Pages {
                issued: 0,
                batch: 10
            }
        );
        assert_eq!(
            grant(1001.0),
            Grant::Pages {
                issued: 0,
                batch: 11
            }
        );
        assert_eq!(
            grant(1.0),
            Grant::Pages {
                issued: 0,
                batch: 1
            }
        );
        assert_eq!(
            grant(25_600.0),
            Grant::Pages {
                issued: 0,
                batch: 256
            }
        );
        assert_eq!(
            grant(1e9),
            Grant::Pages {
                issued: 0,
                batch: 256
            }
        );
        assert_eq!(
            grant(0.0),
            Grant::Pages {
                issued: 0,
                batch: 256
            }
        );
        assert_eq!(grant(0.0).mailbox_value(), 256);
    }

    #[test]
    fn a_grant_confirms_the_batch_in_flight() {
        let spec: WorkloadSpec = "dirty:wss=4M".parse().expect("spec");
        let s = slice(&spec, 16 << 20);
        let mut w = WorkloadVcpuState {
            pages_done: 100,
            in_flight: 10,
            ..Default::default()
        };
        assert_eq!(
            next_grant(&mut w, &spec, &s, 1000.0),
            Grant::Pages {
                issued: 110,
                batch: 10
            }
        );
        assert_eq!((w.pages_done, w.in_flight), (110, 0));
    }

    #[test]
    fn fill_stops_after_its_slice_and_idle_at_once() {
        let spec: WorkloadSpec = "fill".parse().expect("spec");
        let s = slice(&spec, 1 << 20);
        // 1 MiB minus the 64 KiB below DATA_BASE: 240 pages.
        assert_eq!(s.pages, 240);
        let mut w = WorkloadVcpuState {
            pages_done: 200,
            ..Default::default()
        };
        assert_eq!(
            next_grant(&mut w, &spec, &s, 0.0),
            Grant::Pages {
                issued: 200,
                batch: 40
            }
        );
        w.in_flight = 40;
        assert_eq!(next_grant(&mut w, &spec, &s, 0.0), Grant::Stop);
        assert!(w.stopped_writing);
        assert_eq!(w.pages_done, 240);
        assert_eq!(Grant::Stop.mailbox_value(), guest::STOP_WRITING);
        // Once stopped, always stopped (even with pages left, as after a restore).
        w.pages_done = 0;
        assert_eq!(next_grant(&mut w, &spec, &s, 0.0), Grant::Stop);

        let idle: WorkloadSpec = "idle".parse().expect("spec");
        let mut w = WorkloadVcpuState::default();
        assert_eq!(
            next_grant(&mut w, &idle, &slice(&idle, 1 << 20), 0.0),
            Grant::Stop
        );
        assert!(w.stopped_writing);
    }

    #[test]
    fn the_schedule_spaces_batches_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        // 1000 pages/s: page 0 due now, page 10 after 10 ms, page 500 after 0.5 s.
        assert_eq!(p.due(t0, 0, 1000.0), t0);
        assert_eq!(p.due(t0, 10, 1000.0), t0 + Duration::from_millis(10));
        assert_eq!(p.due(t0, 500, 1000.0), t0 + Duration::from_millis(500));
        // Asked later, the schedule keeps its anchor.
        let later = t0 + Duration::from_millis(5);
        assert_eq!(p.due(later, 20, 1000.0), t0 + Duration::from_millis(20));
    }

    #[test]
    fn a_new_rate_starts_a_new_schedule() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.due(t0, 0, 1000.0), t0);
        assert_eq!(p.due(t0, 50, 1000.0), t0 + Duration::from_millis(50));
        // Slowed to 10 pages/s at page 50, 50 ms in: page 50 is due now, page 51 100 ms
        // later (on the old anchor it would be 5.1 s away).
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(p.due(t1, 50, 10.0), t1);
        assert_eq!(p.due(t1, 51, 10.0), t1 + Duration::from_millis(100));
    }

    #[test]
    fn a_late_guest_restarts_the_schedule_and_a_reset_forgets_it() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.due(t0, 0, 1000.0), t0);
        // 100 ms behind exactly is still on the old schedule...
        let t1 = t0 + Duration::from_millis(110);
        assert_eq!(p.due(t1, 10, 1000.0), t0 + Duration::from_millis(10));
        // ...more than that starts a new one from now.
        let t2 = t0 + Duration::from_millis(111);
        assert_eq!(p.due(t2, 10, 1000.0), t2);
        assert_eq!(p.due(t2, 20, 1000.0), t2 + Duration::from_millis(10));
        p.reset();
        let t3 = t2 + Duration::from_secs(5);
        assert_eq!(p.due(t3, 20, 1000.0), t3);
        assert_eq!(p.due(t3, 30, 1000.0), t3 + Duration::from_millis(10));
    }
}
