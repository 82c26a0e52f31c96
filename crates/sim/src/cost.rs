//! Pluggable migration cost: how long a live migration takes and what it costs the hosts.
//!
//! [`CloudSimCost`] is CloudSim's formula: `RAM / (host bandwidth / 2)` (half the link is left
//! for VM traffic), about 16 s per GB on a 1 Gbit/s host. [`MigrationProfile`] describes a real
//! migration engine: link bandwidth, fixed setup time, extra traffic from re-sent dirty pages,
//! and CPU spent on source and destination per GiB moved. A later analytic model crate can
//! implement [`MigrationCostModel`] directly: [`crate::ModelCost`] does, with the fitted
//! pre-copy model of `fastmig-model`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// What a cost model knows about one migration.
#[derive(Debug, Clone, Copy)]
pub struct MigrationCostQuery {
    /// VM RAM in MB.
    pub ram_mb: u32,
    /// Bandwidth of the target host in CloudSim units (1,000,000 = 1 Gbit/s).
    pub target_bw: u64,
    /// The VM's CPU demand when the migration starts, as a fraction of its MIPS (0 = idle,
    /// 1 = fully busy). The detector's look-ahead asks for the worst case, 1. Models that
    /// ignore activity (CloudSim's formula, profiles) ignore it.
    pub cpu_utilization: f64,
    /// The VM's memory in use as a fraction of its RAM, when the trace has a memory series
    /// (Google's); `None` otherwise and in the detector's look-ahead (the worst case: all of
    /// its RAM). The model takes it as the working set; the others ignore it.
    pub mem_utilization: Option<f64>,
}

/// Cost of one migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationCost {
    /// Wall time from start to switch-over, seconds.
    pub duration_s: f64,
    /// Extra CPU load on the source host while migrating, MIPS.
    pub source_overhead_mips: f64,
    /// Extra CPU load on the destination host while migrating, MIPS.
    pub target_overhead_mips: f64,
    /// Time the VM is paused at switch-over, seconds (part of `duration_s`; 0 for models
    /// that do not model it, such as CloudSim's). Reported in total; the hosts' MIPS are not
    /// changed by it.
    pub downtime_s: f64,
}

/// A migration cost model.
pub trait MigrationCostModel: Send + Sync {
    /// Short description for reports.
    fn describe(&self) -> String;
    /// Cost of migrating a VM; `pe_mips` is the PE size of the hosts, to turn CPU seconds into
    /// MIPS.
    fn cost(&self, req: &MigrationCostQuery, pe_mips: f64) -> MigrationCost;
}

/// CloudSim 3.0.3: `duration = RAM / (bw / 2 / 8000)`, no CPU overhead.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloudSimCost;

impl MigrationCostModel for CloudSimCost {
    fn describe(&self) -> String {
        "cloudsim (RAM / half of 1 Gbit/s)".into()
    }
    fn cost(&self, req: &MigrationCostQuery, _pe_mips: f64) -> MigrationCost {
        MigrationCost {
            duration_s: f64::from(req.ram_mb) / (req.target_bw as f64 / (2.0 * 8000.0)),
            source_overhead_mips: 0.0,
            target_overhead_mips: 0.0,
            downtime_s: 0.0,
        }
    }
}

/// A measured or assumed migration engine profile (JSON file for `--migration profile:FILE`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationProfile {
    /// Bandwidth available to the migration stream, Gbit/s.
    pub bandwidth_gbit: f64,
    /// Fixed cost per migration (handshake, device state, switch-over), seconds. Default 0.
    #[serde(default)]
    pub setup_s: f64,
    /// Extra traffic from re-sent dirty pages as a fraction of RAM (0.2 = 20 % more). Default 0.
    #[serde(default)]
    pub dirty_traffic_fraction: f64,
    /// CPU time on the source per GiB sent, core-seconds. Default 0.
    #[serde(default)]
    pub source_cpu_s_per_gib: f64,
    /// CPU time on the destination per GiB received, core-seconds. Default 0.
    #[serde(default)]
    pub target_cpu_s_per_gib: f64,
}

impl MigrationProfile {
    /// A pure-bandwidth profile (`--migration gbit=N`).
    pub fn bandwidth(gbit: f64) -> Self {
        Self {
            bandwidth_gbit: gbit,
            setup_s: 0.0,
            dirty_traffic_fraction: 0.0,
            source_cpu_s_per_gib: 0.0,
            target_cpu_s_per_gib: 0.0,
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.bandwidth_gbit.is_finite() && self.bandwidth_gbit > 0.0) {
            return Err(format!(
                "bandwidth_gbit must be > 0, got {}",
                self.bandwidth_gbit
            ));
        }
        for (name, v) in [
            ("setup_s", self.setup_s),
            ("dirty_traffic_fraction", self.dirty_traffic_fraction),
            ("source_cpu_s_per_gib", self.source_cpu_s_per_gib),
            ("target_cpu_s_per_gib", self.target_cpu_s_per_gib),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be >= 0, got {v}"));
            }
        }
        Ok(())
    }

    /// Reads and validates a JSON profile.
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let err = |msg: String| SimError::Profile {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let p: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        p.validate().map_err(err)?;
        Ok(p)
    }
}

impl MigrationCostModel for MigrationProfile {
    fn describe(&self) -> String {
        format!(
            "profile ({} Gbit/s, setup {} s, dirty +{:.0} %, cpu {}/{} core-s per GiB)",
            self.bandwidth_gbit,
            self.setup_s,
            self.dirty_traffic_fraction * 100.0,
            self.source_cpu_s_per_gib,
            self.target_cpu_s_per_gib
        )
    }
    fn cost(&self, req: &MigrationCostQuery, pe_mips: f64) -> MigrationCost {
        let gib = f64::from(req.ram_mb) / 1024.0;
        let megabits = f64::from(req.ram_mb) * 8.0 * (1.0 + self.dirty_traffic_fraction);
        let transfer = megabits / (self.bandwidth_gbit * 1000.0);
        let duration_s = self.setup_s + transfer;
        // Core-seconds spread over the migration, expressed as MIPS of one PE.
        let per_s = |cpu_s_per_gib: f64| {
            if duration_s > 0.0 {
                cpu_s_per_gib * gib * (1.0 + self.dirty_traffic_fraction) / duration_s * pe_mips
            } else {
                0.0
            }
        };
        MigrationCost {
            duration_s,
            source_overhead_mips: per_s(self.source_cpu_s_per_gib),
            target_overhead_mips: per_s(self.target_cpu_s_per_gib),
            downtime_s: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudsim_formula_matches_its_comment() {
        // 870 MB / (1e6 / 16000) = 870 / 62.5 = 13.92 s.
        let c = CloudSimCost.cost(
            &MigrationCostQuery {
                ram_mb: 870,
                target_bw: 1_000_000,
                cpu_utilization: 0.5,
                mem_utilization: None,
            },
            1860.0,
        );
        assert!((c.duration_s - 13.92).abs() < 1e-12);
        assert_eq!(c.source_overhead_mips, 0.0);
    }

    #[test]
    fn profile_adds_setup_dirty_traffic_and_cpu() {
        let p = MigrationProfile {
            bandwidth_gbit: 10.0,
            setup_s: 0.5,
            dirty_traffic_fraction: 0.25,
            source_cpu_s_per_gib: 1.0,
            target_cpu_s_per_gib: 0.0,
        };
        // 1024 MB * 8 * 1.25 = 10240 Mbit at 10 Gbit/s = 1.024 s, + 0.5 s setup = 1.524 s.
        let c = p.cost(
            &MigrationCostQuery {
                ram_mb: 1024,
                target_bw: 1_000_000,
                cpu_utilization: 0.5,
                mem_utilization: None,
            },
            1000.0,
        );
        assert!((c.duration_s - 1.524).abs() < 1e-12);
        // 1 core-s/GiB * 1.25 GiB moved over 1.524 s = 0.8202 cores = 820.2 MIPS of a 1000-MIPS PE.
        assert!((c.source_overhead_mips - 1.25 / 1.524 * 1000.0).abs() < 1e-9);
        assert_eq!(c.target_overhead_mips, 0.0);
        assert!(MigrationProfile::bandwidth(0.0).validate().is_err());
    }
}
