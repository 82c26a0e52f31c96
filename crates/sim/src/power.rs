//! Host power models: SPECpower tables with linear interpolation, as CloudSim's
//! `PowerModelSpecPower` computes them.

use serde::{Deserialize, Serialize};

/// Power draw in watts at 0 %, 10 %, ..., 100 % CPU load (11 points).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecPowerModel {
    /// Watts at load 0.0, 0.1, ..., 1.0.
    pub watts: [f64; 11],
}

/// HP ProLiant ML110 G4 (Xeon 3040), SPECpower_ssj2008.
pub const HP_ML110_G4: [f64; 11] = [
    86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
];
/// HP ProLiant ML110 G5 (Xeon 3075), SPECpower_ssj2008.
pub const HP_ML110_G5: [f64; 11] = [
    93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
];

impl SpecPowerModel {
    /// A model from an 11-point table.
    pub fn new(watts: [f64; 11]) -> Self {
        Self { watts }
    }

    /// Power in watts at `utilization` (fraction 0..=1). Values outside are clamped; CloudSim
    /// would abort the run there instead.
    ///
    /// The arithmetic follows CloudSim step by step (`power1 + delta * (u - u1/10) * 100` with
    /// `delta = (power2 - power1) / 10`) so that results agree to the last bit.
    pub fn power(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0);
        let x = u * 10.0;
        // x is in 0..=10, so truncation is `floor`, and for a non-integer x `ceil` is one more
        // (plain casts: `f64::floor`/`ceil` are library calls on baseline x86-64, and this is
        // the placement hot loop).
        let u1 = x as usize;
        // CloudSim tests `u % 0.1 == 0` first; a table point gives the same value either way
        // (to ~1e-13 W), and this avoids a costly fmod in the placement hot loop.
        if u1 as f64 == x {
            return self.watts[u1];
        }
        let u2 = (u1 + 1).min(10);
        let p1 = self.watts[u1];
        let p2 = self.watts[u2];
        let delta = (p2 - p1) / 10.0;
        p1 + delta * (u - u1 as f64 / 10.0) * 100.0
    }

    /// Power at full load.
    pub fn max_power(&self) -> f64 {
        self.watts[10]
    }

    /// Energy in joules over `dt` seconds when utilisation moves linearly from `from` to `to`
    /// (CloudSim `getEnergyLinearInterpolation`): a host whose utilisation was 0 at the start of
    /// the interval is counted as switched off for the whole interval.
    pub fn energy_linear(&self, from: f64, to: f64, dt: f64) -> f64 {
        if from == 0.0 {
            return 0.0;
        }
        let p_from = self.power(from);
        let p_to = self.power(to);
        (p_from + (p_to - p_from) / 2.0) * dt
    }
}

/// [`SpecPowerModel::power`] with the per-segment divisions done once: the same operations on
/// the same values, so bit-identical results, for the PABFD search loop.
#[derive(Debug, Clone)]
pub(crate) struct PowerTable {
    watts: [f64; 11],
    /// `(watts[k + 1] - watts[k]) / 10` (CloudSim's `delta`).
    delta: [f64; 11],
    /// `k / 10` (the segment's start utilisation).
    start: [f64; 11],
}

impl PowerTable {
    pub(crate) fn new(model: &SpecPowerModel) -> Self {
        let w = model.watts;
        let mut delta = [0.0; 11];
        let mut start = [0.0; 11];
        for k in 0..11 {
            let k2 = (k + 1).min(10);
            delta[k] = (w[k2] - w[k]) / 10.0;
            start[k] = k as f64 / 10.0;
        }
        Self {
            watts: w,
            delta,
            start,
        }
    }

    /// When every utilisation in `[lo, hi]` lies strictly inside one segment (never on a table
    /// point, with a margin far above rounding), that segment's `(watts, delta, start)`, so
    /// that `watts + delta * (u - start) * 100.0` is [`PowerTable::power`] of such a `u`, bit
    /// for bit, without the lookup and branches.
    pub(crate) fn interior_segment(&self, lo: f64, hi: f64) -> Option<(f64, f64, f64)> {
        const MARGIN: f64 = 1e-9;
        let k = (lo.max(0.0) * 10.0) as usize;
        if k >= 10 {
            return None;
        }
        let end = (k + 1) as f64 / 10.0;
        (lo - MARGIN > self.start[k] && hi + MARGIN < end).then_some((
            self.watts[k],
            self.delta[k],
            self.start[k],
        ))
    }

    /// Same value as [`SpecPowerModel::power`].
    #[inline]
    pub(crate) fn power(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0);
        let x = u * 10.0;
        let u1 = (x as usize).min(10);
        if u1 as f64 == x {
            return self.watts[u1];
        }
        self.watts[u1] + self.delta[u1] * (u - self.start[u1]) * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_points_are_exact_and_between_points_is_linear() {
        let g4 = SpecPowerModel::new(HP_ML110_G4);
        assert_eq!(g4.power(0.0), 86.0);
        assert_eq!(g4.power(1.0), 117.0);
        assert_eq!(g4.power(0.5), 102.0);
        // 25 % lies halfway between 20 % (92.6 W) and 30 % (96 W): 94.3 W.
        assert!((g4.power(0.25) - 94.3).abs() < 1e-9);
        let g5 = SpecPowerModel::new(HP_ML110_G5);
        // 95 %: halfway between 133 W and 135 W = 134 W.
        assert!((g5.power(0.95) - 134.0).abs() < 1e-9);
        // 3 %: 93.7 + 0.3 * (97 - 93.7) = 94.69 W.
        assert!((g5.power(0.03) - 94.69).abs() < 1e-9);
    }

    #[test]
    fn interior_segment_formula_gives_the_same_bits() {
        let model = SpecPowerModel::new(HP_ML110_G5);
        let table = PowerTable::new(&model);
        let mut found = 0;
        for b in 0..200 {
            for x in [0.0, 0.001, 0.013, 0.05, 0.4] {
                let (lo, hi) = (f64::from(b) / 200.0 + x, f64::from(b + 1) / 200.0 + x);
                let Some((w, d, st)) = table.interior_segment(lo, hi) else {
                    continue;
                };
                found += 1;
                for i in 0..=1000 {
                    let u = lo + (hi - lo) * f64::from(i) / 1000.0;
                    assert_eq!(
                        (w + d * (u - st) * 100.0).to_bits(),
                        model.power(u).to_bits()
                    );
                }
            }
        }
        // Most ranges are inside a segment; the ones across a segment end are not.
        assert!(found > 700, "{found}");
        assert!(table.interior_segment(0.095, 0.1).is_none());
        assert!(table.interior_segment(0.1, 0.105).is_none());
        assert!(table.interior_segment(0.198, 0.203).is_none());
        assert!(table.interior_segment(0.99, 1.0).is_none());
    }

    #[test]
    fn power_table_gives_the_same_bits() {
        for model in [
            SpecPowerModel::new(HP_ML110_G4),
            SpecPowerModel::new(HP_ML110_G5),
        ] {
            let table = PowerTable::new(&model);
            for i in 0..=100_000 {
                let u = f64::from(i) / 100_000.0;
                for v in [u, u + 1e-13, u - 1e-13, u * 0.999_999_7] {
                    assert_eq!(
                        table.power(v).to_bits(),
                        model.power(v).to_bits(),
                        "u = {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn energy_is_trapezoid_and_zero_for_a_host_that_was_off() {
        let g4 = SpecPowerModel::new(HP_ML110_G4);
        // From 0 % (86 W) to 100 % (117 W) over 300 s: mean 101.5 W -> 30450 J.
        assert!((g4.energy_linear(1e-12, 1.0, 300.0) - 30450.0).abs() < 1e-3);
        assert_eq!(g4.energy_linear(0.0, 1.0, 300.0), 0.0);
        // Constant 50 %: 102 W * 10 s.
        assert!((g4.energy_linear(0.5, 0.5, 10.0) - 1020.0).abs() < 1e-9);
    }
}
