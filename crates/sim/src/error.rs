//! Errors of the simulator crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading input or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A trace directory or file could not be read.
    #[error("reading trace {path}: {source}")]
    TraceIo {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A trace file has malformed content.
    #[error("{path}:{line}: {msg}")]
    TraceFormat {
        /// The offending file.
        path: PathBuf,
        /// 1-based line number (0 when the problem is the whole file).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A trace directory contains no trace files.
    #[error("trace directory {0} contains no trace files")]
    EmptyTrace(PathBuf),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A migration-cost profile could not be read or parsed.
    #[error("migration profile {path}: {msg}")]
    Profile {
        /// The profile file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A fitted migration model cannot serve the chosen transport or link.
    #[error("migration model: {0}")]
    Model(#[source] fastmig_model::ModelError),
    /// The initial placement found no host for a VM (CloudSim aborts the run here too).
    #[error("initial placement: no host can take VM {0}")]
    InitialPlacement(u32),
    /// A migration could not be completed on its target (CloudSim aborts the run here too).
    #[error("migration of VM {vm} to host {host} could not be completed")]
    MigrationTarget {
        /// The VM being migrated.
        vm: u32,
        /// The target host.
        host: u32,
    },
}
