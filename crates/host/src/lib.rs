//! `fastmig-host`: one VM process and its control API.
//!
//! It owns what a process hosting one VM needs around the VMM and the migration engine:
//! - [`process::VmProcess`]: the VM and its state machine (running, migrating out,
//!   `postmigrate`, `inmigrate`), and the execution of control commands;
//! - [`command`]: the control protocol as serde types (one [`Command`] enum, typed replies,
//!   the QMP-like envelope); the wire format is described in this crate's README;
//! - [`server::ApiServer`]: the unix control socket, with its path rules and its limits;
//! - [`client::ControlClient`]: the typed client, the one way to talk to a VM process;
//! - [`run`]: the `run` and `incoming` process lives (readiness file, signals);
//! - [`kvm_adapter::KvmMigratable`]: the KVM VM seen by the migration engine.
//!
//! It does not own the VMM (`fastmig-vmm`), the migration protocol and transports
//! (`fastmig-migration`), command-line parsing or printing (the `fastmig` binary).
//!
//! ```text
//!  fastmig CLI ──ControlClient──► control socket ──ApiServer──► VmProcess ──► Vm (KVM)
//!                                                                  └─migrate()─► destination
//! ```

pub mod client;
pub mod command;
pub mod error;
pub mod kvm_adapter;
pub mod process;
pub mod run;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use command::{
    Command, CommandError, ErrorClass, MigrateState, MigrationRequest, Reply, Request, RunStatus,
    SetDirtyRate, StatusInfo, VmInfo,
};
pub use error::HostError;
pub use process::{error_line, Handler, VmProcess};
pub use server::ApiServer;
