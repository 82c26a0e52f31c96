//! [`ModelCost`]: each migration's time, downtime and CPU from the fitted pre-copy model of
//! `fastmig-model` (pure arithmetic: no sockets, no engine).
//!
//! ```text
//!  MigrationCostQuery (RAM, target bw, CPU utilisation)
//!     ──► MigrationScenario (memory, dirty rate, working set, link, transport)
//!     ──predict──► Prediction ──► MigrationCost (duration, downtime, CPU as MIPS)
//! ```
//!
//! **Dirty rate from CPU.** PlanetLab traces have only CPU utilisation, so a VM's page-write
//! rate is derived from it: `dirty_rate = utilisation × dirty_pps_at_full_cpu`, uniformly
//! random over a working set of the whole RAM (for a trace with a memory series, Google's,
//! over the memory in use at the migration's start: `mem_utilization × RAM`). Why: page writes are made by executing
//! instructions, so to first order they scale with the CPU a VM uses, and an idle VM dirties
//! nothing. The default, [`DEFAULT_DIRTY_PPS_AT_FULL_CPU`] = 10,000 pages/s (40 MB/s), is the
//! order of what our guest writer reaches with one busy vCPU in the characterisation sweep
//! (up to about 11,800 distinct pages/s, `bench/characterisation/sweep.csv`). A random
//! pattern over all of RAM is the model's most pessimistic case for a given rate: re-sent
//! pages are `W(1 - e^(-D t / W))`, with no hot set that re-dirties cheaply.
//!
//! **Units.** The VM's RAM is CloudSim's MB, read as 10^6 bytes, and a host's bandwidth is
//! CloudSim's unit (1,000,000 = 1 Gbit/s = 125 × 10^6 bytes/s): those are the units in which
//! CloudSim's `RAM / (bw / 2)` is written, so a model with a link efficiency of 1/2, no fixed
//! costs and a guest that writes nothing while migrating (`guest_rate_factor` 0) gives
//! exactly CloudSim's durations.
//!
//! **Links.** `Link::Host` is the target host's bandwidth. Classic and multi-tcp carry pages
//! over the link at the model's link efficiency. shm and handover use no link; an explicit
//! [`Link::BytesPerS`] caps their rate instead (an "shm-class" transport, one-sided writes at
//! shm's per-page cost, on a network of that speed), and `Link::Host` leaves them unbounded.
//!
//! **Policy.** The simulator cannot leave a VM on its source, so a migration that does not
//! converge is predicted with `--on-no-converge force`: it completes with a long
//! stop-and-copy, whose downtime is what it costs. The downtime limit is the engine's
//! default, 300 ms.

use std::str::FromStr;

use fastmig_model::{predict, MigrationScenario, Model, OnNoConverge, Pattern, Transport};

use crate::cost::{MigrationCost, MigrationCostModel, MigrationCostQuery};
use crate::error::SimError;

/// Page writes per second of a VM at 100 % CPU (see the module doc for the rule and why).
pub const DEFAULT_DIRTY_PPS_AT_FULL_CPU: f64 = 10_000.0;

/// Bytes per second of one CloudSim bandwidth unit (1,000,000 units = 1 Gbit/s).
const BYTES_S_PER_BW_UNIT: f64 = 125.0;

/// Bytes in one CloudSim MB (its migration formula's unit).
const BYTES_PER_MB: u64 = 1_000_000;

/// The link a model-based migration uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    /// The target host's bandwidth, as CloudSim's formula uses it (default).
    Host,
    /// A fixed link, bytes/s.
    BytesPerS(f64),
}

impl FromStr for Link {
    type Err = SimError;

    /// `host`, or a number with a unit: `10gbit`, `100mbit` (bits/s, decimal), `32mib`,
    /// `1gib` (bytes/s, binary).
    fn from_str(s: &str) -> Result<Self, SimError> {
        let t = s.trim().to_ascii_lowercase();
        if t == "host" {
            return Ok(Link::Host);
        }
        let split = t
            .find(|c: char| c.is_ascii_alphabetic())
            .ok_or_else(|| bad_link(s))?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.trim().parse().map_err(|_| bad_link(s))?;
        let scale = match unit {
            "gbit" => 1e9 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gib" => (1u64 << 30) as f64,
            "mib" => (1u64 << 20) as f64,
            _ => return Err(bad_link(s)),
        };
        let bytes = n * scale;
        if !(bytes.is_finite() && bytes > 0.0) {
            return Err(bad_link(s));
        }
        Ok(Link::BytesPerS(bytes))
    }
}

fn bad_link(s: &str) -> SimError {
    SimError::Config(format!(
        "link {s:?}: expected host or a positive number with a unit gbit, mbit, gib or mib \
         (e.g. 10gbit, 32mib)"
    ))
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Host => f.write_str("host bandwidth"),
            Link::BytesPerS(b) => write!(f, "{} Gbit/s", b * 8.0 / 1e9),
        }
    }
}

/// The fitted pre-copy model as the simulator's migration cost.
#[derive(Debug, Clone)]
pub struct ModelCost {
    model: Model,
    transport: Transport,
    link: Link,
    dirty_pps_at_full_cpu: f64,
    /// The migrations' downtime limit, s (`None`: the scenario's default, 300 ms).
    downtime_limit_s: Option<f64>,
}

impl ModelCost {
    /// A cost model for `transport` over `link`, with the default dirty-rate rule. Fails when
    /// the model has no parameters for the transport.
    pub fn new(model: Model, transport: Transport, link: Link) -> Result<Self, SimError> {
        model.params(transport).map_err(SimError::Model)?;
        Ok(ModelCost {
            model,
            transport,
            link,
            dirty_pps_at_full_cpu: DEFAULT_DIRTY_PPS_AT_FULL_CPU,
            downtime_limit_s: None,
        })
    }

    /// Sets the migrations' downtime limit, s (finite and >= 0), for a cluster whose
    /// migrations are configured with another than the default 300 ms.
    pub fn with_downtime_limit(mut self, limit_s: f64) -> Result<Self, SimError> {
        if !(limit_s.is_finite() && limit_s >= 0.0) {
            return Err(SimError::Config(format!(
                "downtime limit {limit_s} s must be >= 0"
            )));
        }
        self.downtime_limit_s = Some(limit_s);
        Ok(self)
    }

    /// Sets the page-write rate of a VM at 100 % CPU (pages/s, finite and >= 0).
    pub fn with_dirty_pps_at_full_cpu(mut self, pps: f64) -> Result<Self, SimError> {
        if !(pps.is_finite() && pps >= 0.0) {
            return Err(SimError::Config(format!(
                "dirty rate at full CPU {pps} pages/s must be >= 0"
            )));
        }
        self.dirty_pps_at_full_cpu = pps;
        Ok(self)
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The scenario the model predicts for one request.
    pub fn scenario(&self, req: &MigrationCostQuery) -> MigrationScenario {
        let mem_bytes = u64::from(req.ram_mb) * BYTES_PER_MB;
        let mut s = MigrationScenario::new(mem_bytes, self.transport);
        let util = if req.cpu_utilization.is_finite() {
            req.cpu_utilization.clamp(0.0, 1.0)
        } else {
            0.0
        };
        s.dirty_rate_pps = util * self.dirty_pps_at_full_cpu;
        // The memory in use, when the trace says (Google's), else all of RAM.
        s.wss_bytes = match req.mem_utilization {
            Some(m) if m.is_finite() => (m.clamp(0.0, 1.0) * mem_bytes as f64) as u64,
            _ => mem_bytes,
        };
        s.pattern = Pattern::Random;
        s.link_bytes_s = Some(match self.link {
            Link::Host => req.target_bw as f64 * BYTES_S_PER_BW_UNIT,
            Link::BytesPerS(b) => b,
        });
        // shm and handover use no link; an explicit link caps them (an shm-class transport,
        // one-sided writes at shm's per-page cost, carried by a link of that speed).
        if let (Link::BytesPerS(b), false) = (self.link, self.transport.uses_link()) {
            s.bandwidth_cap_bytes_s = Some(b);
        }
        s.on_no_converge = OnNoConverge::Force;
        if let Some(d) = self.downtime_limit_s {
            s.downtime_limit_s = d;
        }
        s
    }
}

impl MigrationCostModel for ModelCost {
    fn describe(&self) -> String {
        format!(
            "model ({}, link {}, {} pages/s at full CPU)",
            self.transport, self.link, self.dirty_pps_at_full_cpu
        )
    }

    /// A request the model refuses (no RAM, or a target without bandwidth) never completes,
    /// as CloudSim's formula gives an infinite time for a zero bandwidth.
    fn cost(&self, req: &MigrationCostQuery, pe_mips: f64) -> MigrationCost {
        let Ok(p) = predict(&self.model, &self.scenario(req)) else {
            return MigrationCost {
                duration_s: f64::INFINITY,
                source_overhead_mips: 0.0,
                target_overhead_mips: 0.0,
                downtime_s: 0.0,
            };
        };
        let duration_s = p.total_ms / 1e3;
        // Core-seconds spread over the migration, as MIPS of one PE (as `MigrationProfile`).
        let per_s = |cpu_s: f64| {
            if duration_s > 0.0 {
                cpu_s / duration_s * pe_mips
            } else {
                0.0
            }
        };
        MigrationCost {
            duration_s,
            source_overhead_mips: per_s(p.src_cpu_s),
            target_overhead_mips: per_s(p.dst_cpu_s),
            downtime_s: p.downtime_ms / 1e3,
        }
    }
}

/// A model that reduces to CloudSim's `RAM / (bw / 2)`: link efficiency 1/2, no fixed cost,
/// no CPU cost, and a guest that writes nothing while it migrates. For tests and checks.
pub fn cloudsim_equivalent_model(transport: Transport) -> Model {
    let mut p = fastmig_model::TransportParams::ideal(f64::MAX);
    p.link_efficiency = 0.5;
    p.guest_rate_factor = 0.0;
    let mut m = Model::default();
    m.transports.insert(transport, p);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CloudSimCost;
    use crate::setup::reference_vm_types;
    use fastmig_model::TransportParams;

    fn req(ram_mb: u32, target_bw: u64, cpu_utilization: f64) -> MigrationCostQuery {
        MigrationCostQuery {
            ram_mb,
            target_bw,
            cpu_utilization,
            mem_utilization: None,
        }
    }

    #[test]
    fn reduced_model_is_cloudsims_formula_bit_for_bit() {
        // Every reference VM size on 1 and 10 Gbit/s hosts, idle and busy (the reduced model's
        // guest writes nothing while migrating): e.g. 870 MB / 62.5 MB/s = 13.92 s.
        let m = ModelCost::new(
            cloudsim_equivalent_model(Transport::Classic),
            Transport::Classic,
            Link::Host,
        )
        .unwrap();
        for t in reference_vm_types() {
            for bw in [1_000_000, 10_000_000] {
                for u in [0.0, 0.37, 1.0] {
                    let r = req(t.ram_mb, bw, u);
                    let ours = m.cost(&r, 1860.0);
                    let theirs = CloudSimCost.cost(&r, 1860.0);
                    assert_eq!(
                        ours.duration_s.to_bits(),
                        theirs.duration_s.to_bits(),
                        "{} MB at {bw}: {} vs {}",
                        t.ram_mb,
                        ours.duration_s,
                        theirs.duration_s
                    );
                    assert_eq!(ours, theirs);
                }
            }
        }
        assert_eq!(m.cost(&req(870, 1_000_000, 1.0), 1860.0).duration_s, 13.92);
    }

    /// Classic at 100 MiB/s page rate with a 10 ms fixed downtime and 1 core-s of source CPU
    /// per GiB sent; nothing else, so that the arithmetic can be done by hand.
    fn hand_model() -> Model {
        let mut p = TransportParams::ideal(f64::MAX);
        p.downtime_fixed_s = 0.010;
        p.src_cpu_s_per_byte = 1.0 / (1u64 << 30) as f64;
        let mut m = Model::default();
        m.transports.insert(Transport::Classic, p);
        m
    }

    #[test]
    fn idle_vm_costs_its_memory_over_the_link_and_the_fixed_downtime() {
        // 1000 MB idle over a fixed 1 Gbit/s link (125e6 bytes/s): 8 s, nothing dirtied, so
        // stop-and-copy sends nothing: downtime 10 ms, total 8.010 s. Source CPU: 1e9 bytes
        // at 1 core-s/GiB = 0.9313 core-s over 8.01 s = 0.11627 of a 1000-MIPS PE.
        let m = ModelCost::new(hand_model(), Transport::Classic, "1gbit".parse().unwrap()).unwrap();
        let c = m.cost(&req(1000, 10_000_000, 0.0), 1000.0);
        assert!((c.duration_s - 8.010).abs() < 1e-9, "{c:?}");
        assert!((c.downtime_s - 0.010).abs() < 1e-12, "{c:?}");
        let cpu = 1e9 / (1u64 << 30) as f64;
        assert!((c.source_overhead_mips - cpu / 8.010 * 1000.0).abs() < 1e-6);
        assert_eq!(c.target_overhead_mips, 0.0);
    }

    #[test]
    fn the_downtime_limit_reaches_the_scenario() {
        let m = ModelCost::new(hand_model(), Transport::Classic, Link::Host).unwrap();
        let q = req(1000, 1_000_000, 1.0);
        assert_eq!(m.scenario(&q).downtime_limit_s, 0.3);
        let tight = m.clone().with_downtime_limit(0.03).unwrap();
        assert_eq!(tight.scenario(&q).downtime_limit_s, 0.03);
        assert!(m.clone().with_downtime_limit(-1.0).is_err());
        assert!(m.with_downtime_limit(f64::NAN).is_err());
    }

    #[test]
    fn a_busier_vm_takes_longer_and_a_faster_link_helps() {
        // At 100 % CPU the VM writes 10k pages/s: round 1 (8 s) dirties part of its RAM,
        // which is sent again, so it takes longer than when idle; at 10 Gbit/s less.
        let slow = ModelCost::new(hand_model(), Transport::Classic, Link::Host).unwrap();
        let idle = slow.cost(&req(1000, 1_000_000, 0.0), 1000.0);
        let busy = slow.cost(&req(1000, 1_000_000, 1.0), 1000.0);
        assert!(busy.duration_s > idle.duration_s + 1.0, "{idle:?} {busy:?}");
        let fast = ModelCost::new(hand_model(), Transport::Classic, "10gbit".parse().unwrap())
            .unwrap()
            .cost(&req(1000, 1_000_000, 1.0), 1000.0);
        assert!(fast.duration_s < busy.duration_s / 5.0, "{fast:?} {busy:?}");
        // Deterministic: the same request gives the same bits.
        assert_eq!(slow.cost(&req(1000, 1_000_000, 1.0), 1000.0), busy);
    }

    #[test]
    fn the_memory_in_use_sets_the_working_set() {
        // 1000 MB, busy (10k writes/s) over 1 Gbit/s: round 1 takes 8 s, in which a random
        // writer over all 1e9 bytes (244,140.6 pages) dirties 244,140.6 (1 - e^(-80000 /
        // 244140.6)) = 68,578 pages, but over 10 % of it (24,414 pages) at most 24,414 pages
        // (it saturates: 24,414 (1 - e^(-3.28)) = 23,500): less to send again, so faster.
        let m = ModelCost::new(hand_model(), Transport::Classic, "1gbit".parse().unwrap()).unwrap();
        let all = m.scenario(&req(1000, 1_000_000, 1.0));
        assert_eq!(all.wss_bytes, 1_000_000_000);
        let mut q = req(1000, 1_000_000, 1.0);
        q.mem_utilization = Some(0.1);
        let tenth = m.scenario(&q);
        assert_eq!(tenth.wss_bytes, 100_000_000);
        assert!(
            m.cost(&q, 1000.0).duration_s < m.cost(&req(1000, 1_000_000, 1.0), 1000.0).duration_s
        );
        // Out-of-range fractions are clamped; a NaN means unknown (all of RAM).
        q.mem_utilization = Some(2.15);
        assert_eq!(m.scenario(&q).wss_bytes, 1_000_000_000);
        q.mem_utilization = Some(f64::NAN);
        assert_eq!(m.scenario(&q).wss_bytes, 1_000_000_000);
    }

    #[test]
    fn an_explicit_link_caps_shm() {
        // shm at a CPU rate of 1 GiB/s (hand model: no link use). 1000 MB idle: host link
        // leaves it at 1e9 / 2^30 = 0.9313 s; a 1 Gbit/s link caps it at 125e6 bytes/s: 8 s.
        let mut m = hand_model();
        m.transports
            .insert(Transport::Shm, TransportParams::ideal((1u64 << 30) as f64));
        let unbounded = ModelCost::new(m.clone(), Transport::Shm, Link::Host).unwrap();
        let c = unbounded.cost(&req(1000, 1_000_000, 0.0), 1000.0);
        assert!(
            (c.duration_s - 1e9 / (1u64 << 30) as f64).abs() < 1e-9,
            "{c:?}"
        );
        let capped = ModelCost::new(m, Transport::Shm, "1gbit".parse().unwrap()).unwrap();
        let c = capped.cost(&req(1000, 1_000_000, 0.0), 1000.0);
        assert!((c.duration_s - 8.0).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn links_parse_with_units_and_bad_specs_are_refused() {
        assert_eq!("host".parse::<Link>().unwrap(), Link::Host);
        assert_eq!("10gbit".parse::<Link>().unwrap(), Link::BytesPerS(1.25e9));
        assert_eq!(
            "32MiB".parse::<Link>().unwrap(),
            Link::BytesPerS(32.0 * 1048576.0)
        );
        for bad in ["", "10", "gbit", "-1gbit", "0mbit", "10furlongs", "nangbit"] {
            assert!(bad.parse::<Link>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_model_without_the_transport_is_refused() {
        assert!(matches!(
            ModelCost::new(hand_model(), Transport::Shm, Link::Host),
            Err(SimError::Model(_))
        ));
        let m = ModelCost::new(hand_model(), Transport::Classic, Link::Host).unwrap();
        assert!(m.with_dirty_pps_at_full_cpu(-1.0).is_err());
    }
}
