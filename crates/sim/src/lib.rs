//! fastmig-sim: a trace-driven data-centre simulator for dynamic VM consolidation.
//!
//! **Owns**: trace loading (PlanetLab and Google cluster-data directories, CSV), the host/VM model, SPECpower power
//! models, the consolidation policies of Beloglazov and Buyya (2012) as small side-effect-free
//! traits (overload detectors THR/IQR/MAD/LR/LRR, VM selectors MMT/MU/MC/RS, PABFD placement,
//! underload evacuation, NPA and DVFS baselines), a pluggable migration cost model, and the
//! metrics (energy, SLATAH, PDM, SLAV, ESV, migrations, shutdowns).
//!
//! **Does not own**: sockets, KVM or the real migration engine (a measured migration is fed in
//! through [`cost::MigrationProfile`], the fitted pre-copy model of `fastmig-model` through
//! [`ModelCost`], or a custom [`cost::MigrationCostModel`]), command-line
//! parsing, charts or file output (the `fastmig` binary does those).
//!
//! The default options reproduce CloudSim 3.0.3's power-aware consolidation semantics,
//! including its quirks (documented in `README.md` and at the place each is reproduced).
//!
//! ```text
//!  Trace ──► DatacenterSpec ──► Simulation ──(tick every 300 s)──► OverloadDetector
//!                                   │                               VmSelector
//!                                   │                               VmPlacement (PABFD)
//!                                   └──► MigrationCostModel        ──► SimResult
//! ```

pub mod cost;
pub mod engine;
pub mod error;
pub mod ids;
mod index;
pub mod metrics;
pub mod model_cost;
pub mod policy;
pub mod power;
mod prune;
pub mod rng;
pub mod setup;
pub mod spec;
pub mod stats;
pub mod trace;
pub mod trace_google;

pub use cost::{CloudSimCost, MigrationCostModel, MigrationProfile};
pub use engine::{memory_lower_bound, simulate, SimOptions, Simulation};
pub use error::SimError;
pub use ids::{HostId, VmId};
pub use metrics::SimResult;
pub use model_cost::{Link, ModelCost};
pub use setup::DatacenterSpec;
pub use spec::PolicySpec;
pub use trace::Trace;
