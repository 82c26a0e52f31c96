//! What is migrated, over what, with which settings: the model's typed input.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Guest page size, bytes (the engine's unit of transfer and of the dirty log).
pub const PAGE_SIZE: usize = 4096;

/// The engine's transports, as the model distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// One TCP stream, a header per page.
    Classic,
    /// Parallel TCP streams, batched runs.
    MultiTcp,
    /// One-sided writes into the destination's shared memory (same host; no link).
    Shm,
    /// The memory itself is handed over (same host): no pre-copy at all.
    Handover,
}

impl Transport {
    /// Every transport, in a fixed order.
    pub const ALL: [Transport; 4] = [
        Transport::Classic,
        Transport::MultiTcp,
        Transport::Shm,
        Transport::Handover,
    ];

    /// The name the engine and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Classic => "classic",
            Transport::MultiTcp => "multi-tcp",
            Transport::Shm => "shm",
            Transport::Handover => "handover",
        }
    }

    /// Whether page data crosses the network link (shm and handover stay on one host).
    pub fn uses_link(self) -> bool {
        matches!(self, Transport::Classic | Transport::MultiTcp)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Order in which the guest picks the page of each write (as `fastmig_vmm::Pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// A sweep over the working set.
    Seq,
    /// Uniform over the working set.
    Random,
    /// A hot fraction of the working set takes most writes.
    HotCold,
}

/// What the engine does when pre-copy stops converging (as `fastmig_migration::OnNoConverge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNoConverge {
    /// Keep going until the round limit, then fail (VM stays on the source).
    #[default]
    Wait,
    /// Stop and copy at once, whatever the downtime.
    Force,
    /// Fail at once.
    Abort,
}

/// One migration to predict. Sizes in bytes, rates per second, times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationScenario {
    /// Guest memory size, bytes.
    pub mem_bytes: u64,
    /// Bytes of guest memory in non-zero pages (zero pages cost a flag only).
    /// `None`: every page is non-zero.
    pub nonzero_bytes: Option<u64>,
    /// Guest page writes per second (not distinct pages: the model derives those).
    pub dirty_rate_pps: f64,
    /// Working-set size, bytes (clamped to the memory size).
    pub wss_bytes: u64,
    /// Write pattern.
    pub pattern: Pattern,
    /// Hot fraction of the working set (`hotcold`), in (0, 1). Default 0.1.
    pub hot: f64,
    /// Fraction of writes to the hot set (`hotcold`), in [0, 1]. Default 0.9.
    pub hot_writes: f64,
    /// Link bandwidth, bytes/s; `None` = unlimited (loopback).
    pub link_bytes_s: Option<f64>,
    /// The transport's own token-bucket cap, bytes/s; `None` = none.
    pub bandwidth_cap_bytes_s: Option<f64>,
    /// Transport.
    pub transport: Transport,
    /// Data streams (multi-tcp); informative for the others.
    pub streams: u32,
    /// Fraction of the CPU the migration threads get, in (0, 1]. Default 1.
    pub cpu_share: f64,
    /// Downtime limit, s. The engine's default is 0.3; the CLI's 0.03.
    pub downtime_limit_s: f64,
    /// Most rounds including the full pass. Default 30.
    pub max_rounds: u32,
    /// Non-convergence policy.
    pub on_no_converge: OnNoConverge,
}

impl MigrationScenario {
    /// A scenario with the engine's defaults: idle, all pages non-zero, unlimited link.
    pub fn new(mem_bytes: u64, transport: Transport) -> Self {
        MigrationScenario {
            mem_bytes,
            nonzero_bytes: None,
            dirty_rate_pps: 0.0,
            wss_bytes: 0,
            pattern: Pattern::Random,
            hot: 0.1,
            hot_writes: 0.9,
            link_bytes_s: None,
            bandwidth_cap_bytes_s: None,
            transport,
            streams: 1,
            cpu_share: 1.0,
            downtime_limit_s: 0.3,
            max_rounds: 30,
            on_no_converge: OnNoConverge::Wait,
        }
    }

    /// Checks every value is in range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadScenario(m));
        if self.mem_bytes < PAGE_SIZE as u64 {
            return bad(format!(
                "memory {} bytes is less than a page",
                self.mem_bytes
            ));
        }
        if !(self.dirty_rate_pps.is_finite() && self.dirty_rate_pps >= 0.0) {
            return bad(format!("dirty rate {} pages/s", self.dirty_rate_pps));
        }
        for (what, v) in [
            ("link", self.link_bytes_s),
            ("bandwidth cap", self.bandwidth_cap_bytes_s),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return bad(format!("{what} {v} bytes/s must be positive"));
                }
            }
        }
        if !(self.cpu_share > 0.0 && self.cpu_share <= 1.0) {
            return bad(format!("cpu share {} not in (0, 1]", self.cpu_share));
        }
        if !(self.downtime_limit_s.is_finite() && self.downtime_limit_s >= 0.0) {
            return bad(format!("downtime limit {} s", self.downtime_limit_s));
        }
        if self.pattern == Pattern::HotCold
            && !(self.hot > 0.0 && self.hot < 1.0 && (0.0..=1.0).contains(&self.hot_writes))
        {
            return bad(format!(
                "hotcold needs hot in (0,1) and hot_writes in [0,1], got {} and {}",
                self.hot, self.hot_writes
            ));
        }
        if self.max_rounds < 2 {
            return bad("max_rounds must be at least 2".into());
        }
        Ok(())
    }

    /// Guest pages (fractional for a size that is not a page multiple, so that a model
    /// reduced to `RAM / bandwidth` reproduces that formula exactly).
    pub fn pages(&self) -> f64 {
        self.mem_bytes as f64 / PAGE_SIZE as f64
    }

    /// Non-zero guest pages.
    pub fn nonzero_pages(&self) -> f64 {
        let nz = self
            .nonzero_bytes
            .unwrap_or(self.mem_bytes)
            .min(self.mem_bytes);
        nz as f64 / PAGE_SIZE as f64
    }

    /// Working-set pages (at least one, at most the memory).
    pub fn wss_pages(&self) -> f64 {
        (self.wss_bytes.min(self.mem_bytes) as f64 / PAGE_SIZE as f64).max(1.0)
    }
}
