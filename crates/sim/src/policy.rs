//! Consolidation policies as small, side-effect-free traits.
//!
//! - [`OverloadDetector`]: is this host over-utilised? (THR, IQR, MAD, LR, LRR)
//! - [`VmSelector`]: which VM should leave an over-utilised host? (MMT, MU, MC, RS)
//! - [`VmPlacement`]: which host should receive a VM? (PABFD, first fit)
//!
//! Each takes a read-only view and returns a decision, so the same implementations can serve a
//! live cluster controller. The semantics are those of CloudSim 3.0.3
//! (`PowerVmAllocationPolicyMigration*`, `PowerVmSelectionPolicy*`), including its quirks; the
//! quirks are named where they are reproduced.

use crate::ids::{HostId, VmId};
use crate::rng::SplitMix64;
use crate::stats;

/// Read-only view of one host's load, as a detector needs it.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a> {
    /// Host capacity in MIPS (all PEs).
    pub total_mips: f64,
    /// Sum of the current MIPS requests of the VMs on the host.
    pub requested_mips: f64,
    /// Host utilisation history as a fraction of capacity, most recent first, with trailing
    /// zeros trimmed (CloudSim `PowerHostUtilizationHistory.getUtilizationHistory`).
    pub history: &'a [f64],
    /// Migration time in seconds of the host's largest-RAM VM (used by LR/LRR).
    pub max_vm_migration_time_s: f64,
    /// Scheduling interval in seconds.
    pub interval_s: f64,
}

impl HostView<'_> {
    /// Current requested utilisation (may exceed 1).
    pub fn utilization(&self) -> f64 {
        self.requested_mips / self.total_mips
    }
}

/// Decides whether a host is over-utilised.
pub trait OverloadDetector: Send + Sync {
    /// Short lower-case name (`thr`, `iqr`, ...).
    fn name(&self) -> &'static str;
    /// The decision.
    fn is_overloaded(&self, host: &HostView<'_>) -> bool;
}

/// Static threshold: over-utilised when requested utilisation > `threshold`.
#[derive(Debug, Clone, Copy)]
pub struct Thr {
    /// Utilisation threshold (CloudSim default 0.8).
    pub threshold: f64,
}

impl OverloadDetector for Thr {
    fn name(&self) -> &'static str {
        "thr"
    }
    fn is_overloaded(&self, host: &HostView<'_>) -> bool {
        host.utilization() > self.threshold
    }
}

/// The fall-back CloudSim uses while a host's history is too short: THR 0.7.
pub const FALLBACK: Thr = Thr { threshold: 0.7 };

/// Minimum history length for IQR and MAD ("12 has been suggested as a safe value").
pub const MIN_HISTORY_IQR_MAD: usize = 12;
/// History length used by LR and LRR.
pub const LR_HISTORY: usize = 10;

/// Inter-quartile range: threshold `1 - s * IQR(history)`.
#[derive(Debug, Clone, Copy)]
pub struct Iqr {
    /// Safety parameter `s` (default 1.5).
    pub safety: f64,
}

impl OverloadDetector for Iqr {
    fn name(&self) -> &'static str {
        "iqr"
    }
    fn is_overloaded(&self, host: &HostView<'_>) -> bool {
        if host.history.len() < MIN_HISTORY_IQR_MAD {
            return FALLBACK.is_overloaded(host);
        }
        let upper = 1.0 - self.safety * stats::iqr(host.history);
        host.utilization() > upper
    }
}

/// Median absolute deviation: threshold `1 - s * MAD(history)`.
#[derive(Debug, Clone, Copy)]
pub struct Mad {
    /// Safety parameter `s` (default 2.5).
    pub safety: f64,
}

impl OverloadDetector for Mad {
    fn name(&self) -> &'static str {
        "mad"
    }
    fn is_overloaded(&self, host: &HostView<'_>) -> bool {
        if host.history.len() < MIN_HISTORY_IQR_MAD {
            return FALLBACK.is_overloaded(host);
        }
        let upper = 1.0 - self.safety * stats::mad(host.history);
        host.utilization() > upper
    }
}

/// Local regression over the last 10 samples, predicting one migration time ahead:
/// over-utilised when `s * prediction >= 1`.
///
/// CloudSim's "loess" applies its tricube weights only when at least 40 % of them are zero,
/// which never happens for 10 points, so the fit is plain least squares on x = 1..10. LRR's
/// bisquare re-weighting is skipped for the same reason, which is why CloudSim reports
/// identical results for LR and LRR. Both are reproduced that way here.
#[derive(Debug, Clone, Copy)]
pub struct Lr {
    /// Safety parameter `s` (default 1.2).
    pub safety: f64,
    /// Reported name (`lr` or `lrr`); the computation is the same (see above).
    pub robust: bool,
}

impl Lr {
    /// The predicted utilisation (before the safety factor), or `None` while history is short.
    pub fn predict(&self, host: &HostView<'_>) -> Option<f64> {
        if host.history.len() < LR_HISTORY {
            return None;
        }
        let mut y = [0.0; LR_HISTORY];
        let mut x = [0.0; LR_HISTORY];
        for i in 0..LR_HISTORY {
            y[i] = host.history[LR_HISTORY - i - 1];
            x[i] = (i + 1) as f64;
        }
        let (a, b) = stats::simple_regression(&x, &y)?;
        let intervals = (host.max_vm_migration_time_s / host.interval_s).ceil();
        Some(a + b * (LR_HISTORY as f64 + intervals))
    }
}

impl OverloadDetector for Lr {
    fn name(&self) -> &'static str {
        if self.robust {
            "lrr"
        } else {
            "lr"
        }
    }
    fn is_overloaded(&self, host: &HostView<'_>) -> bool {
        match self.predict(host) {
            Some(p) => p * self.safety >= 1.0,
            None => FALLBACK.is_overloaded(host),
        }
    }
}

/// Read-only view of a VM that may be selected for migration.
#[derive(Debug, Clone, Copy)]
pub struct VmView<'a> {
    /// The VM.
    pub id: VmId,
    /// Configured RAM in MB (drives migration time).
    pub ram_mb: u32,
    /// Configured capacity in MIPS.
    pub mips: f64,
    /// Current request in MIPS.
    pub requested_mips: f64,
    /// Utilisation history as a fraction of `mips`, most recent first (at most 30 values).
    pub history: &'a [f64],
}

/// Chooses the next VM to migrate away from an over-utilised host.
pub trait VmSelector: Send + Sync {
    /// Short lower-case name (`mmt`, `mu`, `mc`, `rs`).
    fn name(&self) -> &'static str;
    /// Index into `vms` (the host's migratable VMs in host order), or `None` if empty.
    fn select(&self, vms: &[VmView<'_>], rng: &mut SplitMix64) -> Option<usize>;
}

/// Minimum migration time: the VM with the least RAM (first one on ties).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mmt;

impl VmSelector for Mmt {
    fn name(&self) -> &'static str {
        "mmt"
    }
    fn select(&self, vms: &[VmView<'_>], _rng: &mut SplitMix64) -> Option<usize> {
        let mut best = None;
        let mut min = f64::MAX;
        for (i, vm) in vms.iter().enumerate() {
            let metric = f64::from(vm.ram_mb);
            if metric < min {
                min = metric;
                best = Some(i);
            }
        }
        best
    }
}

/// Minimum utilisation: the VM with the lowest current utilisation (first one on ties).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mu;

impl VmSelector for Mu {
    fn name(&self) -> &'static str {
        "mu"
    }
    fn select(&self, vms: &[VmView<'_>], _rng: &mut SplitMix64) -> Option<usize> {
        let mut best = None;
        let mut min = f64::MAX;
        for (i, vm) in vms.iter().enumerate() {
            let metric = vm.requested_mips / vm.mips;
            if metric < min {
                min = metric;
                best = Some(i);
            }
        }
        best
    }
}

/// Random selection, seeded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rs;

impl VmSelector for Rs {
    fn name(&self) -> &'static str {
        "rs"
    }
    fn select(&self, vms: &[VmView<'_>], rng: &mut SplitMix64) -> Option<usize> {
        if vms.is_empty() {
            return None;
        }
        Some(rng.below(vms.len() as u64) as usize)
    }
}

/// Maximum correlation: the VM whose utilisation history is best explained (highest R²) by a
/// linear model of the other VMs' histories. Falls back to MMT when the regression is not
/// defined (fewer history samples than VMs, or a singular design), as CloudSim does.
///
/// The choice is the one of one [`stats::r_squared`] call per VM: a cheap ranking
/// ([`stats::leave_one_out_winner_if_certain`]) answers when it can prove the winner, and
/// otherwise (1-3 % of selections on PlanetLab) the R² values are computed bit for bit,
/// together, by [`stats::leave_one_out_r_squared`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Mc;

impl VmSelector for Mc {
    fn name(&self) -> &'static str {
        "mc"
    }
    fn select(&self, vms: &[VmView<'_>], rng: &mut SplitMix64) -> Option<usize> {
        if vms.is_empty() {
            return None;
        }
        let n = vms.len();
        let m = vms.iter().map(|v| v.history.len()).min().unwrap_or(0);
        if n < 2 || m < n {
            return Mmt.select(vms, rng);
        }
        let histories: Vec<&[f64]> = vms.iter().map(|v| &v.history[..m]).collect();
        if let Some(best) = stats::leave_one_out_winner_if_certain(&histories) {
            return Some(best);
        }
        // Bit-identical to one `stats::r_squared` call per VM on the others (see there).
        let Some(metrics) = stats::leave_one_out_r_squared(&histories) else {
            return Mmt.select(vms, rng);
        };
        // CloudSim starts from Double.MIN_VALUE: non-positive and NaN metrics never win, and the
        // first VM is the answer when nothing beats it.
        let mut max = 4.9e-324_f64;
        let mut idx = 0;
        for (i, &r2) in metrics.iter().enumerate() {
            if r2 > max {
                max = r2;
                idx = i;
            }
        }
        Some(idx)
    }
}

/// A VM waiting for a host, as a placement policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct PlacementVm {
    /// The VM.
    pub id: VmId,
    /// MIPS it requests now.
    pub requested_mips: f64,
}

/// The state a placement policy may query. All queries are read-only; "after allocation"
/// questions are answered hypothetically.
pub trait PlacementContext {
    /// Number of hosts.
    fn host_count(&self) -> usize;
    /// Hosts the caller ruled out for this decision.
    fn is_excluded(&self, host: HostId) -> bool;
    /// Capacity check (PE size, free MIPS, RAM, bandwidth).
    fn is_suitable(&self, host: HostId, vm: &PlacementVm) -> bool;
    /// MIPS the host's scheduler has allocated right now, including VMs placed hypothetically
    /// earlier in this round (a VM migrating in counts at its full potential).
    fn utilization_mips(&self, host: HostId) -> f64;
    /// Would the host be over-utilised (by the active detector) with the VM added?
    fn overloaded_after(&self, host: HostId, vm: &PlacementVm) -> bool;
    /// Power now and power with the VM added (`None` if the latter is undefined).
    fn power_now_and_after(&self, host: HostId, vm: &PlacementVm) -> (f64, Option<f64>);
}

/// Picks a host for a VM.
pub trait VmPlacement: Send + Sync {
    /// Short name.
    fn name(&self) -> &'static str;
    /// The chosen host, or `None` when no host fits.
    fn find_host(&self, vm: &PlacementVm, ctx: &dyn PlacementContext) -> Option<HostId>;
}

/// Power-aware best fit decreasing (the "decreasing" sort is done by the caller): the suitable
/// host with the least power increase, skipping hosts that the VM would over-utilise. Hosts
/// with nothing allocated skip the over-utilisation check. The increase is measured against
/// the power at the start of the round, so hosts that already received VMs this round look
/// more expensive (CloudSim quirk, reproduced).
/// Ties go to the lowest host id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pabfd;

impl VmPlacement for Pabfd {
    fn name(&self) -> &'static str {
        "pabfd"
    }
    fn find_host(&self, vm: &PlacementVm, ctx: &dyn PlacementContext) -> Option<HostId> {
        let mut min = f64::MAX;
        let mut best = None;
        for h in 0..ctx.host_count() {
            let host = HostId(h as u32);
            if ctx.is_excluded(host) || !ctx.is_suitable(host, vm) {
                continue;
            }
            // The power test is cheap and the over-utilisation test is not; a host that cannot
            // beat the current minimum needs no over-utilisation test, so test power first (the
            // outcome is the same as CloudSim's order because both tests are pure).
            let (now, after) = ctx.power_now_and_after(host, vm);
            let Some(after) = after else { continue };
            let diff = after - now;
            if diff >= min {
                continue;
            }
            if ctx.utilization_mips(host) != 0.0 && ctx.overloaded_after(host, vm) {
                continue;
            }
            min = diff;
            best = Some(host);
        }
        best
    }
}

/// First fit: the first suitable host (CloudSim `PowerVmAllocationPolicySimple`, used by the
/// NPA and DVFS baselines).
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstFit;

impl VmPlacement for FirstFit {
    fn name(&self) -> &'static str {
        "first-fit"
    }
    fn find_host(&self, vm: &PlacementVm, ctx: &dyn PlacementContext) -> Option<HostId> {
        (0..ctx.host_count())
            .map(|h| HostId(h as u32))
            .find(|&h| !ctx.is_excluded(h) && ctx.is_suitable(h, vm))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn view(requested: f64, history: &[f64]) -> HostView<'_> {
        HostView {
            total_mips: 1000.0,
            requested_mips: requested,
            history,
            max_vm_migration_time_s: 27.84,
            interval_s: 300.0,
        }
    }

    #[test]
    fn thr_is_strictly_greater_than() {
        let t = Thr { threshold: 0.8 };
        assert!(!t.is_overloaded(&view(800.0, &[])));
        assert!(t.is_overloaded(&view(800.1, &[])));
    }

    #[test]
    fn short_history_falls_back_to_thr_07() {
        let h = [0.5; 5];
        // 750 / 1000 = 0.75 > 0.7 with fewer than 12 (IQR/MAD) or 10 (LR) samples.
        for d in [
            &Iqr { safety: 1.5 } as &dyn OverloadDetector,
            &Mad { safety: 2.5 },
            &Lr {
                safety: 1.2,
                robust: false,
            },
        ] {
            assert!(d.is_overloaded(&view(750.0, &h)), "{}", d.name());
            assert!(!d.is_overloaded(&view(650.0, &h)), "{}", d.name());
        }
    }

    #[test]
    fn iqr_threshold_from_history() {
        // History 0.1, 0.2, ..., 1.2 (12 values): IQR = 1.0 - 0.3 = 0.7 (indices 2 and 9),
        // threshold 1 - 0.5 * 0.7 = 0.65.
        let h: Vec<f64> = (1..=12).map(|i| i as f64 / 10.0).collect();
        let d = Iqr { safety: 0.5 };
        assert!(d.is_overloaded(&view(660.0, &h)));
        assert!(!d.is_overloaded(&view(640.0, &h)));
    }

    #[test]
    fn mad_threshold_from_history() {
        // 12 values alternating 0.4 / 0.6: median 0.5, all deviations 0.1, MAD = 0.1,
        // threshold 1 - 2.5 * 0.1 = 0.75.
        let h: Vec<f64> = (0..12)
            .map(|i| if i % 2 == 0 { 0.4 } else { 0.6 })
            .collect();
        let d = Mad { safety: 2.5 };
        assert!(d.is_overloaded(&view(760.0, &h)));
        assert!(!d.is_overloaded(&view(740.0, &h)));
    }

    #[test]
    fn lr_extrapolates_one_migration_ahead() {
        // Most recent first: 0.80, 0.78, ..., 0.62 -> oldest-first y = 0.62 + 0.02 (x - 1).
        // One migration interval ahead (27.84 s -> 1 interval): x = 11 -> 0.82; 0.82 * 1.2 =
        // 0.984 < 1, not overloaded; with safety 1.25: 1.025 >= 1, overloaded.
        let h: Vec<f64> = (0..10).map(|i| 0.80 - 0.02 * i as f64).collect();
        let lr = Lr {
            safety: 1.2,
            robust: false,
        };
        let p = lr.predict(&view(0.0, &h)).expect("enough history");
        assert!((p - 0.82).abs() < 1e-12);
        assert!(!lr.is_overloaded(&view(0.0, &h)));
        assert!(Lr {
            safety: 1.25,
            robust: true
        }
        .is_overloaded(&view(0.0, &h)));
    }

    /// A host of 1,024 MIPS: `requested / 1024` is exact for whole MIPS, so a test can put the
    /// utilisation exactly on a threshold built from powers of two.
    fn view_1024(requested: f64, history: &[f64]) -> HostView<'_> {
        HostView {
            total_mips: 1024.0,
            ..view(requested, history)
        }
    }

    // Boundary tests: every value below is exactly representable and every operation on the
    // path is exact, so the host sits *on* the threshold and `>` and `>=` answer differently.

    /// A hand-made placement context: per host, (excluded, suitable, power now, power after
    /// or `None` when the VM does not fit, allocated MIPS, over-utilised after).
    pub(crate) struct FakeCtx(pub(crate) Vec<(bool, bool, f64, Option<f64>, f64, bool)>);

    impl PlacementContext for FakeCtx {
        fn host_count(&self) -> usize {
            self.0.len()
        }
        fn is_excluded(&self, host: HostId) -> bool {
            self.0[host.idx()].0
        }
        fn is_suitable(&self, host: HostId, _vm: &PlacementVm) -> bool {
            self.0[host.idx()].1
        }
        fn utilization_mips(&self, host: HostId) -> f64 {
            self.0[host.idx()].4
        }
        fn overloaded_after(&self, host: HostId, _vm: &PlacementVm) -> bool {
            self.0[host.idx()].5
        }
        fn power_now_and_after(&self, host: HostId, _vm: &PlacementVm) -> (f64, Option<f64>) {
            (self.0[host.idx()].2, self.0[host.idx()].3)
        }
    }

    #[test]
    fn pabfd_takes_the_least_increase_lowest_id_and_checks_only_used_hosts() {
        let vm = PlacementVm {
            id: VmId(0),
            requested_mips: 500.0,
        };
        let find = |hosts: Vec<(bool, bool, f64, Option<f64>, f64, bool)>| {
            Pabfd.find_host(&vm, &FakeCtx(hosts)).map(|h| h.0)
        };
        // Increases: host 0 +20, host 1 +10, host 2 +10 (tie: the lower id, 1, wins), host 3
        // +30: host 1.
        let base = vec![
            (false, true, 100.0, Some(120.0), 900.0, false),
            (false, true, 100.0, Some(110.0), 900.0, false),
            (false, true, 90.0, Some(100.0), 900.0, false),
            (false, true, 100.0, Some(130.0), 900.0, false),
        ];
        assert_eq!(find(base.clone()), Some(1));
        // Host 1 over-utilised after taking the VM (and in use): the tie partner, 2.
        let mut h = base.clone();
        h[1].5 = true;
        assert_eq!(find(h.clone()), Some(2));
        // Hosts 1 and 2 excluded / unsuitable / no room: host 0 (+20) next.
        for k in 0..3 {
            let mut h = base.clone();
            match k {
                0 => (h[1].0, h[2].0) = (true, true),
                1 => (h[1].1, h[2].1) = (false, false),
                _ => (h[1].3, h[2].3) = (None, None),
            }
            assert_eq!(find(h), Some(0), "case {k}");
        }
        // A host with nothing allocated skips the over-utilisation test (CloudSim): host 1
        // empty and "over-utilised after" is still taken.
        let mut h = base.clone();
        (h[1].4, h[1].5) = (0.0, true);
        assert_eq!(find(h), Some(1));
        // A negative increase (power now from the start of the round) beats everything.
        let mut h = base.clone();
        h[3].3 = Some(95.0);
        assert_eq!(find(h), Some(3));
        // Nothing fits: none.
        let none: Vec<_> = base
            .iter()
            .map(|&(e, _, n, a, u, o)| (e, false, n, a, u, o))
            .collect();
        assert_eq!(find(none), None);
        assert_eq!(find(Vec::new()), None);
    }

    #[test]
    fn built_policies_report_the_names_the_spec_parses() {
        // The objects' names and the spec's name table are written separately; a policy built
        // from a spec must report the name that spec is parsed from (`lrr` is an `Lr`).
        for k in crate::spec::DETECTORS {
            assert_eq!(k.build(k.default_param()).name(), k.name());
        }
        for k in crate::spec::SELECTORS {
            assert_eq!(k.build().name(), k.name());
        }
    }

    #[test]
    fn thr_boundary_is_not_overloaded() {
        // 768 / 1024 = 0.75 exactly = threshold: 0.75 > 0.75 is false (>= would say true).
        let t = Thr { threshold: 0.75 };
        assert!(!t.is_overloaded(&view_1024(768.0, &[])));
        // 769 / 1024 = 0.7509765625 > 0.75.
        assert!(t.is_overloaded(&view_1024(769.0, &[])));
        // The fall-back THR 0.7: 700 / 1000 rounds to the same double as the literal 0.7.
        assert!(!FALLBACK.is_overloaded(&view(700.0, &[])));
        assert!(FALLBACK.is_overloaded(&view(701.0, &[])));
    }

    #[test]
    fn iqr_boundary_is_not_overloaded() {
        // History 1/16, 2/16, ..., 12/16 (12 samples): quartile ranks round(0.25 * 13) - 1 = 2
        // and round(0.75 * 13) - 1 = 9, so IQR = 10/16 - 3/16 = 7/16; with s = 1 the threshold
        // is 1 - 7/16 = 9/16 = 0.5625 = 576 / 1024.
        let h: Vec<f64> = (1..=12).map(|k| k as f64 / 16.0).collect();
        assert_eq!(stats::iqr(&h), 7.0 / 16.0);
        let d = Iqr { safety: 1.0 };
        assert!(!d.is_overloaded(&view_1024(576.0, &h)), "0.5625 > 0.5625");
        assert!(
            d.is_overloaded(&view_1024(577.0, &h)),
            "0.5634765625 > 0.5625"
        );
    }

    #[test]
    fn mad_boundary_is_not_overloaded() {
        // 12 samples alternating 0.25 / 0.75: median (Commons Math, pos = 0.5 * 13 = 6.5)
        // = 0.25 + 0.5 * (0.75 - 0.25) = 0.5; every deviation is 0.25, so MAD = 0.25; with
        // CloudSim's s = 2.5 the threshold is 1 - 0.625 = 0.375 = 384 / 1024.
        let h: Vec<f64> = (0..12)
            .map(|i| if i % 2 == 0 { 0.25 } else { 0.75 })
            .collect();
        assert_eq!(stats::mad(&h), 0.25);
        let d = Mad { safety: 2.5 };
        assert!(!d.is_overloaded(&view_1024(384.0, &h)), "0.375 > 0.375");
        assert!(
            d.is_overloaded(&view_1024(385.0, &h)),
            "0.3759765625 > 0.375"
        );
    }

    #[test]
    fn lr_and_lrr_boundary_is_overloaded() {
        // A flat history of 0.5 (10 samples): every dy in the updating formulas is 0, so the
        // slope is exactly 0 and the intercept (5.0 - 0) / 10 = 0.5; the prediction one
        // migration ahead is 0.5, and with s = 2 it is exactly 1.0: 1.0 >= 1.0 is overloaded
        // (> would say not). The same for 0.25 and s = 4.
        for (u, s) in [(0.5, 2.0), (0.25, 4.0)] {
            let h = [u; LR_HISTORY];
            for robust in [false, true] {
                let lr = Lr { safety: s, robust };
                assert_eq!(lr.predict(&view(0.0, &h)), Some(u), "{}", lr.name());
                assert!(lr.is_overloaded(&view(0.0, &h)), "{} {u} x {s}", lr.name());
                // Just below: the next double under s gives a product below 1.0.
                let below = Lr {
                    safety: f64::from_bits(s.to_bits() - 1),
                    robust,
                };
                assert!(!below.is_overloaded(&view(0.0, &h)), "{} {u}", lr.name());
            }
        }
    }

    #[test]
    fn detectors_use_thr_07_below_their_history_length() {
        // One sample short of each detector's history (11 for IQR/MAD, 9 for LR/LRR): the
        // fall-back decides, at its own boundary 700 / 1000 = 0.7 (not over) and just above.
        let short_iqr = [0.5; MIN_HISTORY_IQR_MAD - 1];
        let short_lr = [0.5; LR_HISTORY - 1];
        let cases: [(&dyn OverloadDetector, &[f64]); 4] = [
            (&Iqr { safety: 1.5 }, &short_iqr),
            (&Mad { safety: 2.5 }, &short_iqr),
            (
                &Lr {
                    safety: 1.2,
                    robust: false,
                },
                &short_lr,
            ),
            (
                &Lr {
                    safety: 1.2,
                    robust: true,
                },
                &short_lr,
            ),
        ];
        for (d, h) in cases {
            assert!(!d.is_overloaded(&view(700.0, h)), "{}", d.name());
            assert!(d.is_overloaded(&view(701.0, h)), "{}", d.name());
        }
    }

    fn vm(id: u32, ram: u32, req: f64, hist: &[f64]) -> VmView<'_> {
        VmView {
            id: VmId(id),
            ram_mb: ram,
            mips: 1000.0,
            requested_mips: req,
            history: hist,
        }
    }

    #[test]
    fn mmt_and_mu_pick_the_minimum_first_on_ties() {
        let mut rng = SplitMix64::new(1);
        let vms = [
            vm(0, 1740, 100.0, &[]),
            vm(1, 613, 300.0, &[]),
            vm(2, 613, 50.0, &[]),
        ];
        // Least RAM is 613 MB; VM 1 comes first.
        assert_eq!(Mmt.select(&vms, &mut rng), Some(1));
        // Lowest utilisation: VM 2 at 5 %.
        assert_eq!(Mu.select(&vms, &mut rng), Some(2));
        assert_eq!(Mmt.select(&[], &mut rng), None);
    }

    /// MC as it was written before the batched kernel: one scalar regression per VM.
    fn mc_reference(vms: &[VmView<'_>], rng: &mut SplitMix64) -> Option<usize> {
        let n = vms.len();
        let m = vms.iter().map(|v| v.history.len()).min().unwrap_or(0);
        if n < 2 || m < n {
            return Mmt.select(vms, rng);
        }
        let histories: Vec<&[f64]> = vms.iter().map(|v| v.history).collect();
        stats::tests::scalar_mc_choice(&histories).or_else(|| Mmt.select(vms, rng))
    }

    #[test]
    fn mc_selects_exactly_as_one_scalar_regression_per_vm() {
        // Seeded hosts of 2..=20 VMs with 30-sample whole-percent histories (as PlanetLab's),
        // some idle (all zero: singular, MMT fall-back), some copies of another VM (ties),
        // some histories shorter than the others.
        let mut rng = SplitMix64::new(2011);
        let mut fallbacks = 0;
        for _ in 0..400 {
            let n = 2 + rng.below(19) as usize;
            let mut hists: Vec<Vec<f64>> = Vec::new();
            for v in 0..n {
                let len = if rng.below(10) == 0 {
                    20 + rng.below(10)
                } else {
                    30
                };
                let h: Vec<f64> = match rng.below(30) {
                    0 => vec![0.0; len as usize],
                    1 if v > 0 => hists[rng.below(v as u64) as usize].clone(),
                    _ => (0..len).map(|_| rng.below(101) as f64 / 100.0).collect(),
                };
                hists.push(h);
            }
            let rams: Vec<u32> = (0..n)
                .map(|_| [613, 870, 1740][rng.below(3) as usize])
                .collect();
            let vms: Vec<VmView<'_>> = hists
                .iter()
                .zip(&rams)
                .enumerate()
                .map(|(i, (h, &ram))| vm(i as u32, ram, 1.0, h))
                .collect();
            let mut r1 = SplitMix64::new(1);
            let mut r2 = SplitMix64::new(1);
            let expected = mc_reference(&vms, &mut r1);
            assert_eq!(Mc.select(&vms, &mut r2), expected, "n {n}");
            if expected == Mmt.select(&vms, &mut r1) {
                fallbacks += 1;
            }
        }
        // Not every host may fall back, or the regressions would go untested.
        assert!(fallbacks < 300, "{fallbacks} of 400 picked MMT's VM");
    }

    #[test]
    fn mc_picks_a_correlated_vm_and_falls_back_to_mmt() {
        let mut rng = SplitMix64::new(1);
        // VM 0 is noise and has the least RAM (MMT and the "nothing beats index 0" default
        // would both pick it). VM 2 follows VM 1 closely (2x plus small noise), so both have
        // R² near 1 while VM 0's R² is near 0: MC must pick VM 1 or VM 2, never VM 0.
        let noise = [0.31, 0.05, 0.27, 0.12, 0.33, 0.02, 0.18];
        let a = [0.10, 0.15, 0.22, 0.30, 0.34, 0.41, 0.47];
        let b: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, x)| 2.0 * x + if i % 2 == 0 { 0.01 } else { -0.01 })
            .collect();
        let vms = [
            vm(0, 613, 1.0, &noise),
            vm(1, 870, 1.0, &a),
            vm(2, 870, 1.0, &b),
        ];
        let pick = Mc.select(&vms, &mut rng);
        assert!(pick == Some(1) || pick == Some(2), "picked {pick:?}");
        // Too little history (2 samples for 3 VMs) -> MMT fall-back -> first VM with least RAM.
        let short = [0.1, 0.2];
        let vms = [
            vm(0, 870, 1.0, &short),
            vm(1, 613, 1.0, &short),
            vm(2, 613, 1.0, &short),
        ];
        assert_eq!(Mc.select(&vms, &mut rng), Some(1));
    }

    #[test]
    fn rs_is_seeded() {
        let vms = [vm(0, 1, 1.0, &[]), vm(1, 1, 1.0, &[]), vm(2, 1, 1.0, &[])];
        let picks = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..20)
                .map(|_| Rs.select(&vms, &mut r).unwrap_or(9))
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert!(picks(7).iter().all(|&i| i < 3));
    }
}
