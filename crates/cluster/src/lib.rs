//! The consolidation system for real: one **agent** per host and a **controller**.
//!
//! - An agent supervises the VM processes of its host (each a `fastmig run`/`incoming`
//!   process driven only through `fastmig_host::ControlClient`), reports the host's capacity
//!   and its VMs' demand, carries out the migrations the controller orders, and enforces the
//!   host's standby state.
//! - The controller gathers the agents' reports every interval, runs the simulator's own
//!   policies (`fastmig_sim::policy`: detectors, selectors, PABFD; never a copy), orders
//!   migrations, puts emptied hosts into standby and wakes them, and records everything in its
//!   database.
//!
//! [`proto`] holds the types that cross the agent's HTTP API, and [`AgentApi`] is the seam
//! between the controller and the agents: the HTTP client implements it, and so do the test
//! doubles that stand in for thousands of hosts in the scale benchmark.
//!
//! [`metrics`] renders both sides' Prometheus `/metrics`; the controller's dashboard (`/`,
//! `/events`) is `controller::dashboard`.
//!
//! This crate does not own the VM (that is `fastmig-vmm` and `fastmig-host`), the migration
//! protocol (`fastmig-migration`), the policies (`fastmig-sim`) or the cost model
//! (`fastmig-model`); it only drives them.

pub mod agent;
pub mod agent_api;
pub mod auth;
pub mod controller;
pub mod fake_agent;
pub mod http_client;
pub mod metrics;
pub mod proto;
pub mod store;

pub use agent_api::{AgentApi, AgentError};
