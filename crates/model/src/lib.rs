//! fastmig-model: an analytic model of fastmig's pre-copy live migration.
//!
//! **Owns**: the scenario and prediction types ([`MigrationScenario`], [`Prediction`]), the
//! per-transport parameters and their file format ([`Model`], `model.json` with a magic, a
//! version and a checksum), the prediction itself ([`predict`]), the hint of what would make a
//! non-converging migration converge ([`what_would_converge`]), least-squares fitting from
//! measured runs ([`fit`]) and accuracy reports ([`evaluate`]).
//!
//! **Does not own**: sockets, KVM, the real engine (`fastmig-migration`, whose rules this
//! crate mirrors: see [`predict`]), sweeps, CSV files or command-line parsing (the `fastmig`
//! binary does those).
//!
//! ```text
//!  sweep rows (Observation) ──fit──► Model (per transport: rates, per-round and per-page
//!                                     costs, fixed downtime, CPU) ──save──► model.json
//!  MigrationScenario + Model ──predict──► Prediction (time, downtime, bytes, rounds, CPU,
//!                                                     converges) ──► what_would_converge
//! ```

mod dirty;
mod error;
mod file;
mod fit;
mod predict;
mod scenario;

pub use dirty::distinct_pages;
pub use error::ModelError;
pub use file::{Model, TransportParams, MODEL_MAGIC, MODEL_VERSION};
pub use fit::{evaluate, fit, Accuracy, FitReport, Measured, Observation};
pub use predict::{predict, what_would_converge, Bound, ConvergeHint, Outcome, Prediction};
pub use scenario::{MigrationScenario, OnNoConverge, Pattern, Transport, PAGE_SIZE};
