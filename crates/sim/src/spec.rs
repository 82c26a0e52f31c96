//! Policy names as the CLI spells them (`npa`, `dvfs`, `thr-mmt`, `lrr-mc`, ...).

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::policy::{Iqr, Lr, Mad, Mc, Mmt, Mu, OverloadDetector, Rs, Thr, VmSelector};

/// Overload detection algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorKind {
    /// Static threshold.
    Thr,
    /// Inter-quartile range.
    Iqr,
    /// Median absolute deviation.
    Mad,
    /// Local regression.
    Lr,
    /// Robust local regression.
    Lrr,
}

/// VM selection algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectorKind {
    /// Minimum migration time.
    Mmt,
    /// Minimum utilisation.
    Mu,
    /// Maximum correlation.
    Mc,
    /// Random selection (seeded).
    Rs,
}

/// A complete consolidation policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PolicySpec {
    /// Non power-aware: every host draws full power all day; no migrations.
    Npa,
    /// Power follows load, no migrations (hosts with no load are off).
    Dvfs,
    /// Dynamic consolidation: detector, selector, PABFD placement, underload evacuation.
    Dynamic {
        /// Overload detector.
        detector: DetectorKind,
        /// VM selector.
        selector: SelectorKind,
        /// Detector safety parameter (threshold for THR).
        param: f64,
    },
}

impl DetectorKind {
    /// CloudSim's default safety parameter: THR 0.8, IQR 1.5, MAD 2.5, LR/LRR 1.2.
    pub fn default_param(self) -> f64 {
        match self {
            Self::Thr => 0.8,
            Self::Iqr => 1.5,
            Self::Mad => 2.5,
            Self::Lr | Self::Lrr => 1.2,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Thr => "thr",
            Self::Iqr => "iqr",
            Self::Mad => "mad",
            Self::Lr => "lr",
            Self::Lrr => "lrr",
        }
    }

    /// The detector object.
    pub fn build(self, param: f64) -> Box<dyn OverloadDetector> {
        match self {
            Self::Thr => Box::new(Thr { threshold: param }),
            Self::Iqr => Box::new(Iqr { safety: param }),
            Self::Mad => Box::new(Mad { safety: param }),
            Self::Lr => Box::new(Lr {
                safety: param,
                robust: false,
            }),
            Self::Lrr => Box::new(Lr {
                safety: param,
                robust: true,
            }),
        }
    }
}

impl SelectorKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmt => "mmt",
            Self::Mu => "mu",
            Self::Mc => "mc",
            Self::Rs => "rs",
        }
    }

    /// The selector object.
    pub fn build(self) -> Box<dyn VmSelector> {
        match self {
            Self::Mmt => Box::new(Mmt),
            Self::Mu => Box::new(Mu),
            Self::Mc => Box::new(Mc),
            Self::Rs => Box::new(Rs),
        }
    }
}

/// All detectors, in CloudSim's reporting order.
pub const DETECTORS: [DetectorKind; 5] = [
    DetectorKind::Thr,
    DetectorKind::Iqr,
    DetectorKind::Mad,
    DetectorKind::Lr,
    DetectorKind::Lrr,
];
/// All selectors, in CloudSim's reporting order.
pub const SELECTORS: [SelectorKind; 4] = [
    SelectorKind::Mmt,
    SelectorKind::Mc,
    SelectorKind::Mu,
    SelectorKind::Rs,
];

impl PolicySpec {
    /// Parses `npa`, `dvfs` or `DETECTOR-SELECTOR` (underscores accepted too, as in CloudSim's
    /// file names). `param` overrides the detector's default safety parameter.
    pub fn parse(name: &str, param: Option<f64>) -> Result<Self, SimError> {
        let lower = name.trim().to_ascii_lowercase().replace('_', "-");
        match lower.as_str() {
            "npa" | "dvfs" if param.is_some() => {
                Err(SimError::Config(format!("policy {lower} takes no --param")))
            }
            "npa" => Ok(Self::Npa),
            "dvfs" => Ok(Self::Dvfs),
            _ => {
                let (d, s) = lower
                    .split_once('-')
                    .ok_or_else(|| SimError::Config(format!("unknown policy {name:?}: expected npa, dvfs or DETECTOR-SELECTOR (e.g. lr-mmt)")))?;
                let detector = DETECTORS
                    .into_iter()
                    .find(|k| k.name() == d)
                    .ok_or_else(|| {
                        SimError::Config(format!(
                            "unknown detector {d:?} in {name:?}: expected thr, iqr, mad, lr or lrr"
                        ))
                    })?;
                let selector = SELECTORS
                    .into_iter()
                    .find(|k| k.name() == s)
                    .ok_or_else(|| {
                        SimError::Config(format!(
                            "unknown selector {s:?} in {name:?}: expected mmt, mc, mu or rs"
                        ))
                    })?;
                let param = param.unwrap_or(detector.default_param());
                if !param.is_finite() || param < 0.0 {
                    return Err(SimError::Config(format!(
                        "--param must be a finite number >= 0, got {param}"
                    )));
                }
                Ok(Self::Dynamic {
                    detector,
                    selector,
                    param,
                })
            }
        }
    }

    /// Canonical name (`lr-mmt`).
    pub fn name(&self) -> String {
        match self {
            Self::Npa => "npa".into(),
            Self::Dvfs => "dvfs".into(),
            Self::Dynamic {
                detector, selector, ..
            } => format!("{}-{}", detector.name(), selector.name()),
        }
    }

    /// Safety parameter, if any.
    pub fn param(&self) -> Option<f64> {
        match self {
            Self::Dynamic { param, .. } => Some(*param),
            _ => None,
        }
    }

    /// Every policy of the CloudSim reference table with default parameters.
    pub fn all_reference() -> Vec<Self> {
        let mut v = vec![Self::Npa, Self::Dvfs];
        for d in DETECTORS {
            for s in SELECTORS {
                v.push(Self::Dynamic {
                    detector: d,
                    selector: s,
                    param: d.default_param(),
                });
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_defaults() {
        assert_eq!(PolicySpec::parse("npa", None).ok(), Some(PolicySpec::Npa));
        let p = PolicySpec::parse("LR_MMT", None).ok();
        assert_eq!(
            p,
            Some(PolicySpec::Dynamic {
                detector: DetectorKind::Lr,
                selector: SelectorKind::Mmt,
                param: 1.2
            })
        );
        assert_eq!(
            PolicySpec::parse("thr-mc", Some(0.9))
                .ok()
                .and_then(|p| p.param()),
            Some(0.9)
        );
        assert!(PolicySpec::parse("foo-mmt", None).is_err());
        assert!(PolicySpec::parse("thr-xx", None).is_err());
        assert!(PolicySpec::parse("dvfs", Some(1.0)).is_err());
        assert_eq!(PolicySpec::all_reference().len(), 22);
    }
}
