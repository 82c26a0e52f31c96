//! Results of a run.
//!
//! Definitions (CloudSim `Helper`): energy is the integral of host power, SLATAH is the share
//! of *all hosts' pooled active time* during which the allocated MIPS were below the requested
//! MIPS, PDM is the *pooled* MIPS lost to migration divided by all MIPS requested by all VMs,
//! SLAV = SLATAH x PDM and ESV = energy x SLAV. SLATAH, PDM and SLAV are fractions. A host
//! shutdown is an active-to-idle transition in a host's state history (hosts start counted as
//! active, so a host never used counts one shutdown).

use serde::{Deserialize, Serialize};

/// Metrics of one simulation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    /// Policy name (`lr-mmt`).
    pub policy: String,
    /// Detector safety parameter, if any.
    pub param: Option<f64>,
    /// Number of hosts.
    pub hosts: usize,
    /// Number of VMs.
    pub vms: usize,
    /// Energy in kWh.
    pub energy_kwh: f64,
    /// SLA violation time per active host (fraction).
    pub slatah: f64,
    /// Performance degradation due to migration (fraction).
    pub pdm: f64,
    /// SLATAH x PDM.
    pub slav: f64,
    /// Energy x SLAV.
    pub esv: f64,
    /// Number of migrations started.
    pub migrations: u64,
    /// Number of active-to-idle host transitions.
    pub host_shutdowns: u64,
    /// Pooled fraction of requested MIPS not allocated, for any reason.
    pub sla_overall: f64,
    /// VMs removed because their request reached exactly 0 (CloudSim quirk, see `SimOptions`).
    pub vms_removed_idle: usize,
    /// The migration cost model used.
    pub migration_model: String,
    /// Sum of all migrations' downtime, s (0 with CloudSim's formula, which has none).
    #[serde(default)]
    pub migration_downtime_s: f64,
    /// Sum of all migrations' duration, s.
    #[serde(default)]
    pub migration_s: f64,
    /// Sum of all migrations' CPU on their source and destination hosts, PE-seconds (0
    /// with CloudSim's formula, which has no CPU cost).
    #[serde(default)]
    pub migration_cpu_s: f64,
    /// Hosts' pooled active time (the denominator of SLATAH), hours.
    #[serde(default)]
    pub active_host_hours: f64,
}
