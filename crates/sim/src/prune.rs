//! Certain-overload bounds that let the PABFD index skip hosts without checking them.
//!
//! PABFD rejects a candidate host when the detector says it would be over-utilised with the VM
//! added. In large data centres most hosts in the cheapest buckets fail that test, and walking
//! them one by one made every search grow with the data-centre size. For THR and LR/LRR the
//! detector's statistic is (up to rounding) *linear* in the host's load: THR compares
//! `(req_host + req_vm) / total` with the threshold, and LR's prediction is a fixed weighted sum
//! of the last 10 history values, so prediction(host + VM) = prediction(host) + prediction(VM).
//! A host gets a key, a lower bound of its own part; a VM gets a threshold per host type; a
//! host whose key is at least the threshold is over-utilised after allocation for certain, with
//! a margin (1e-9, relative to the magnitudes involved) far above any rounding difference
//! between the linear form and the detector's exact floating-point computation. Hosts that
//! cannot be bounded this way (short history, IQR/MAD detectors, an LR look-ahead that depends
//! on the VM) get key `-inf` and are always checked exactly, so results never change.

use crate::cost::{MigrationCostModel, MigrationCostQuery};
use crate::policy::LR_HISTORY;
use crate::setup::HostType;
use crate::spec::{DetectorKind, PolicySpec};

/// Relative safety margin of the bounds.
const MARGIN: f64 = 1e-9;

/// The linear bound of one detector.
#[derive(Debug, Clone)]
pub(crate) enum OverloadPrune {
    /// THR: over-utilised when `(req_host + req_vm) / total > threshold`.
    Thr {
        /// The detector's threshold.
        threshold: f64,
    },
    /// LR/LRR: over-utilised when `prediction * safety >= 1` (with at least 10 samples).
    Lr {
        /// `1 / safety`.
        inv_safety: f64,
        /// Per host type: the prediction's weight for history value `j` (most recent first),
        /// or `None` when the look-ahead differs between VMs on that type (no bound then).
        weights: Vec<Option<[f64; LR_HISTORY]>>,
        /// Largest absolute weight per type (scales the margin).
        wmax: Vec<f64>,
    },
}

impl OverloadPrune {
    /// The bound for a policy, if its detector has one.
    pub(crate) fn new(
        policy: &PolicySpec,
        host_types: &[HostType],
        vm_rams: &[u32],
        cost: &dyn MigrationCostModel,
        interval_s: f64,
    ) -> Option<Self> {
        let PolicySpec::Dynamic {
            detector, param, ..
        } = *policy
        else {
            return None;
        };
        if !param.is_finite() {
            return None;
        }
        match detector {
            DetectorKind::Thr => Some(Self::Thr { threshold: param }),
            DetectorKind::Lr | DetectorKind::Lrr => {
                if param <= 0.0 {
                    return None;
                }
                let mut weights = Vec::with_capacity(host_types.len());
                let mut wmax = Vec::with_capacity(host_types.len());
                for t in host_types {
                    // The look-ahead uses the largest RAM on the host with the VM added, so one
                    // of the VMs' RAM sizes: the bound needs it to be the same for all of them.
                    let intervals = |ram_mb: u32| {
                        let d = cost
                            .cost(
                                &MigrationCostQuery {
                                    ram_mb,
                                    target_bw: t.bw as i64 as u64,
                                    // As the detector's look-ahead asks (engine/glue.rs).
                                    cpu_utilization: 1.0,
                                    mem_utilization: None,
                                },
                                t.pe_mips,
                            )
                            .duration_s;
                        (d / interval_s).ceil()
                    };
                    let &first = vm_rams.first()?;
                    let k = intervals(first);
                    let same = k.is_finite()
                        && vm_rams.iter().all(|&r| intervals(r).total_cmp(&k).is_eq());
                    if !same {
                        weights.push(None);
                        wmax.push(0.0);
                        continue;
                    }
                    // Least squares on x = 1..10 (x = 10 - j for history value j), evaluated at
                    // X = 10 + k: weight_j = 1/10 + (x_j - 5.5)(X - 5.5) / 82.5.
                    let n = LR_HISTORY as f64;
                    let xbar = (n + 1.0) / 2.0;
                    let sxx: f64 = (1..=LR_HISTORY).map(|x| (x as f64 - xbar).powi(2)).sum();
                    let target = n + k;
                    let mut w = [0.0; LR_HISTORY];
                    for (j, wj) in w.iter_mut().enumerate() {
                        let x = n - j as f64;
                        *wj = 1.0 / n + (x - xbar) * (target - xbar) / sxx;
                    }
                    wmax.push(w.iter().fold(0.0f64, |m, &v| m.max(v.abs())));
                    weights.push(Some(w));
                }
                Some(Self::Lr {
                    inv_safety: 1.0 / param,
                    weights,
                    wmax,
                })
            }
            DetectorKind::Iqr | DetectorKind::Mad => None,
        }
    }

    /// Lower bound of a host's part of the statistic (`-inf`: no bound, always check).
    /// `hist_sum`: the host's utilisation history (fractions of its capacity, most recent
    /// first, trailing zeros included).
    pub(crate) fn host_key(
        &self,
        ty: usize,
        total_mips: f64,
        req_sum: f64,
        hist_sum: &[f64],
    ) -> f64 {
        let key = match self {
            Self::Thr { threshold } => {
                let u = req_sum / total_mips;
                u - MARGIN * (1.0 + u.abs() + threshold.abs())
            }
            Self::Lr { weights, wmax, .. } => {
                let Some(w) = &weights[ty] else {
                    return f64::NEG_INFINITY;
                };
                // The detector needs at least 10 samples. A positive value at position 9 or
                // later guarantees that with any (non-negative) VM added.
                if !hist_sum.iter().skip(LR_HISTORY - 1).any(|&x| x > 0.0) {
                    return f64::NEG_INFINITY;
                }
                let (mut lin, mut mag) = (0.0, 0.0);
                for (wj, &y) in w.iter().zip(hist_sum) {
                    lin += wj * y;
                    mag += y.abs();
                }
                lin - MARGIN * (1.0 + mag * wmax[ty])
            }
        };
        if key.is_nan() {
            f64::NEG_INFINITY
        } else {
            key
        }
    }

    /// The threshold for a VM on hosts of type `ty`: a host whose key is at least this is
    /// over-utilised after taking the VM (`+inf`: skip nothing). `hist`: the VM's utilisation
    /// history (fractions of its MIPS, most recent first).
    pub(crate) fn vm_threshold(
        &self,
        ty: usize,
        total_mips: f64,
        vm_mips: f64,
        requested_mips: f64,
        hist: &[f64],
    ) -> f64 {
        let tau = match self {
            Self::Thr { threshold } => {
                let x = requested_mips / total_mips;
                threshold - x + MARGIN * (1.0 + x.abs() + threshold.abs())
            }
            Self::Lr {
                inv_safety,
                weights,
                wmax,
            } => {
                let Some(w) = &weights[ty] else {
                    return f64::INFINITY;
                };
                // A negative or non-finite value could undo the host's 10-sample guarantee.
                if hist
                    .iter()
                    .any(|&u| u.is_nan() || u < 0.0 || u.is_infinite())
                {
                    return f64::INFINITY;
                }
                let (mut lin, mut mag) = (0.0, 0.0);
                for (wj, &u) in w.iter().zip(hist) {
                    let c = u * vm_mips / total_mips;
                    lin += wj * c;
                    mag += c.abs();
                }
                inv_safety - lin + MARGIN * (1.0 + inv_safety.abs() + mag * wmax[ty])
            }
        };
        if tau.is_nan() {
            f64::INFINITY
        } else {
            tau
        }
    }
}
