//! A VM's CPU demand over time, from its [`DemandSource`], and the dirty rate that follows it.
//!
//! Demand is a fraction of the VM's MIPS. A trace is time-compressed: sample `i` applies from
//! `epoch + i * sample_period_ms`, wrapping at the end, where `epoch` is when the VM first
//! started (carried across migrations in `StartVm::demand_epoch_ms`, so a migrated VM goes on
//! at the same position of its trace).
//!
//! The guest dirties memory in proportion: `pages/s = demand × 10,000`, the rule the
//! simulator's fitted cost model uses (`fastmig_sim::model_cost::DEFAULT_DIRTY_PPS_AT_FULL_CPU`).

use std::path::Path;

use crate::proto::{DemandSource, TraceFormat};

/// Pages per second a VM dirties at 100 % CPU demand.
pub const DIRTY_PPS_AT_FULL_CPU: f64 = fastmig_sim::model_cost::DEFAULT_DIRTY_PPS_AT_FULL_CPU;

/// Why a demand source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    /// The constant is outside 0..=1.
    #[error("a constant utilization must lie in 0..=1, not {0}")]
    Utilization(f64),
    /// The sample period is zero.
    #[error("a trace's sample_period_ms must be positive")]
    Period,
    /// The trace could not be read or is not in its format (read by the simulator's own
    /// readers, so that the agent and `fastmig simulate` agree on every file).
    #[error("the demand trace")]
    Trace(#[source] fastmig_sim::error::SimError),
}

/// A demand source ready to be evaluated.
#[derive(Debug, Clone)]
pub enum Demand {
    /// A fixed fraction.
    Constant(f64),
    /// Samples (fractions) and how long each lasts.
    Trace {
        /// Fractions of the VM's MIPS, 0..=1.
        samples: Vec<f64>,
        /// Wall time of one sample, ms.
        period_ms: u64,
    },
}

impl Demand {
    /// Checks and loads a source (a trace file is read once, here).
    pub fn load(source: &DemandSource) -> Result<Demand, DemandError> {
        match source {
            DemandSource::Constant { utilization } => {
                if (0.0..=1.0).contains(utilization) {
                    Ok(Demand::Constant(*utilization))
                } else {
                    Err(DemandError::Utilization(*utilization))
                }
            }
            DemandSource::Trace {
                path,
                format,
                sample_period_ms,
            } => {
                if *sample_period_ms == 0 {
                    return Err(DemandError::Period);
                }
                Ok(Demand::Trace {
                    samples: read_trace(path, *format)?,
                    period_ms: *sample_period_ms,
                })
            }
        }
    }

    /// Demand `elapsed_ms` after the VM's epoch.
    pub fn at(&self, elapsed_ms: u64) -> f64 {
        match self {
            Demand::Constant(u) => *u,
            Demand::Trace { samples, period_ms } => {
                // `load` refuses empty traces and a zero period.
                let i = (elapsed_ms / period_ms) as usize % samples.len().max(1);
                samples.get(i).copied().unwrap_or(0.0)
            }
        }
    }
}

/// The dirty rate (pages/s over the whole VM) for a demand: never 0, which the workload
/// reads as "unpaced".
pub fn dirty_rate_for(demand: f64) -> u64 {
    ((demand.clamp(0.0, 1.0) * DIRTY_PPS_AT_FULL_CPU).round() as u64).max(1)
}

/// Reads a trace as fractions of the VM's MIPS, one per 300 s sample of a day: a PlanetLab
/// file (one CPU percentage per line) or a Google file (`google-gcd-2011/vms/*`: a CPU and a
/// memory percentage per line; the CPU column is the demand), both read by the simulator's
/// own readers.
fn read_trace(path: &Path, format: TraceFormat) -> Result<Vec<f64>, DemandError> {
    let files = [path.to_path_buf()];
    let trace = match format {
        TraceFormat::Planetlab => fastmig_sim::trace::load_planetlab_files(&files),
        TraceFormat::Google => fastmig_sim::trace_google::load_files(&files),
    }
    .map_err(DemandError::Trace)?;
    Ok((0..trace.sample_count())
        .map(|i| trace.utilization(0, i as f64 * SAMPLE_S))
        .collect())
}

/// A trace sample's length in the trace's own time (5 minutes).
const SAMPLE_S: f64 = 300.0;

#[cfg(test)]
mod tests {
    use super::*;
    use fastmig_sim::error::SimError;

    #[test]
    fn a_trace_is_time_compressed_and_wraps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vm1");
        // A PlanetLab day: 288 samples, here 10, 50, 100 % over and over.
        let day: String = (0..288).map(|i| ["10\n", "50\n", "100\n"][i % 3]).collect();
        std::fs::write(&p, day).expect("write");
        let d = Demand::load(&DemandSource::Trace {
            path: p,
            format: TraceFormat::Planetlab,
            sample_period_ms: 2000,
        })
        .expect("loads");
        // Sample i covers [2000 i, 2000 (i + 1)) ms; after the day's 288 it starts again.
        assert_eq!(d.at(0), 0.1);
        assert_eq!(d.at(1999), 0.1);
        assert_eq!(d.at(2000), 0.5);
        assert_eq!(d.at(4500), 1.0);
        assert_eq!(d.at(287 * 2000), 1.0);
        assert_eq!(d.at(288 * 2000), 0.1);
        assert_eq!(d.at(289 * 2000), 0.5);
    }

    #[test]
    fn a_google_file_gives_its_cpu_column() {
        // google-gcd-2011/vms/*: "CPU% MEM%" per line, a day of 288 samples; the demand is
        // the CPU column.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vm_1_1");
        let day: String = (0..288)
            .map(|i| if i % 2 == 0 { "25 5.1\n" } else { "50 20\n" })
            .collect();
        std::fs::write(&p, day).expect("write");
        let d = Demand::load(&DemandSource::Trace {
            path: p,
            format: TraceFormat::Google,
            sample_period_ms: 1000,
        })
        .expect("loads");
        assert_eq!(d.at(0), 0.25);
        assert_eq!(d.at(1000), 0.5);
        assert_eq!(d.at(2000), 0.25);
    }

    #[test]
    fn bad_sources_are_refused() {
        assert!(Demand::load(&DemandSource::Constant { utilization: 1.5 }).is_err());
        assert!(Demand::load(&DemandSource::Constant { utilization: -0.1 }).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bad");
        std::fs::write(&p, "10\n250\n").expect("write");
        let trace = |path: std::path::PathBuf, ms| DemandSource::Trace {
            path,
            format: TraceFormat::Planetlab,
            sample_period_ms: ms,
        };
        assert!(matches!(
            Demand::load(&trace(p.clone(), 1000)),
            Err(DemandError::Trace(SimError::TraceFormat { line: 2, .. }))
        ));
        assert!(matches!(
            Demand::load(&trace(p, 0)),
            Err(DemandError::Period)
        ));
        assert!(matches!(
            Demand::load(&trace(dir.path().join("none"), 1000)),
            Err(DemandError::Trace(SimError::TraceIo { .. }))
        ));
    }

    #[test]
    fn the_dirty_rate_is_ten_thousand_pages_per_second_at_full_demand() {
        assert_eq!(dirty_rate_for(1.0), 10_000);
        assert_eq!(dirty_rate_for(0.25), 2_500);
        // Never 0 (the workload reads 0 as unpaced).
        assert_eq!(dirty_rate_for(0.0), 1);
        assert_eq!(dirty_rate_for(7.0), 10_000);
    }
}
