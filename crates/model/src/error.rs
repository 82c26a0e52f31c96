//! Errors of the model crate: reading a model file, checking a scenario, fitting.

use std::path::PathBuf;

use crate::scenario::Transport;

/// What went wrong, by phase.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading the model file failed.
    #[error("reading model {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the model file failed.
    #[error("writing model {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The model file is larger than any model we write.
    #[error("model file is {size} bytes, more than the {max}-byte cap")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// The model file is not JSON of the expected shape.
    #[error("parsing the model file")]
    Parse(#[source] serde_json::Error),
    /// The file is not a fastmig model.
    #[error("not a fastmig model file (magic {found:?})")]
    BadMagic {
        /// The magic found.
        found: String,
    },
    /// A model of a version this build cannot read.
    #[error("model file version {found}, this build reads version {expected}")]
    BadVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The parameters do not match their checksum (edited or damaged file).
    #[error("model file checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    BadChecksum {
        /// Stored checksum.
        stored: u32,
        /// Checksum of the parameters as read.
        computed: u32,
    },
    /// The model has no parameters for this transport.
    #[error("the model has no parameters for transport {0}")]
    MissingTransport(Transport),
    /// A scenario value is out of range.
    #[error("bad scenario: {0}")]
    BadScenario(String),
    /// Fitting could not determine a transport's parameters.
    #[error("fitting {transport}: {reason}")]
    Fit {
        /// The transport.
        transport: Transport,
        /// Why.
        reason: String,
    },
}
