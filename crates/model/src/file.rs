//! The fitted parameters and their file, `model.json`.
//!
//! Compatibility rule: [`MODEL_VERSION`] is bumped when a parameter changes meaning or a
//! required one is added; a reader accepts exactly its own version (a model is cheap to refit
//! from its sweep, and a silently misread parameter would give wrong predictions). The
//! checksum is CRC-32 of the compact JSON of `transports`, so a hand-edited value is caught.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::scenario::Transport;

/// First field of every model file.
pub const MODEL_MAGIC: &str = "fastmig-model";
/// Version this build writes and reads.
pub const MODEL_VERSION: u32 = 1;
/// Largest model file read, bytes (a model is a few KiB).
const MAX_FILE: u64 = 1 << 20;

/// One transport's parameters. Times in seconds, rates in bytes/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportParams {
    /// Page data rate the transport reaches when neither link nor cap limits it (bounded by
    /// its CPU cost per page), bytes/s, with the whole CPU share.
    pub cpu_rate_bytes_s: f64,
    /// Fraction of the link's rate that carries page bytes (TCP/IP framing, ACK pacing), in
    /// (0, 1].
    pub link_efficiency: f64,
    /// Fixed cost of each pre-copy round: dirty-log sync, round end and acknowledgement, s.
    pub round_s: f64,
    /// Wire bytes per page beyond its 4096 data bytes (headers, batch framing).
    pub header_bytes_per_page: f64,
    /// Wire bytes per zero page (sent as a flag only).
    pub zero_page_bytes: f64,
    /// Connection, handshake and transport setup, s.
    pub setup_s: f64,
    /// Setup per byte of guest memory (shm maps and pre-faults the shared region), s/byte.
    /// Default 0 (added without a version bump: a model without it reads as 0).
    #[serde(default)]
    pub setup_s_per_byte: f64,
    /// Fixed part of downtime: saving and sending the device state, the destination's
    /// digest check and restore, commit and resume, s.
    pub downtime_fixed_s: f64,
    /// Source CPU, s, whatever the size.
    pub src_cpu_fixed_s: f64,
    /// Source CPU per wire byte, s/byte.
    pub src_cpu_s_per_byte: f64,
    /// Destination CPU, s, whatever the size.
    pub dst_cpu_fixed_s: f64,
    /// Destination CPU per wire byte, s/byte.
    pub dst_cpu_s_per_byte: f64,
    /// Guest write rate during the migration over the rate measured before it: below 1
    /// when the migration's threads take CPU from the vCPUs (2 cores here). Default 1; a
    /// model without it reads as 1, so adding it kept the version.
    #[serde(default = "one")]
    pub guest_rate_factor: f64,
    /// How much the guest's own writing slows the CPU-bound rate: the rate is
    /// `cpu_rate_bytes_s / (1 + guest_write_slowdown × dirty_rate_pps)`. A vCPU that writes
    /// takes CPU from the migration's threads (under emulation, about one core at 50k
    /// writes/s here). Default 0; a model without it reads as 0, so adding it kept the
    /// version. Not written when 0, so that the checksum of a file written before it
    /// existed still matches.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guest_write_slowdown: f64,
}

fn one() -> f64 {
    1.0
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl TransportParams {
    /// Rough parameters of an ideal transport at `rate` bytes/s with no fixed costs: a base
    /// for tests and for fitting.
    pub fn ideal(rate: f64) -> Self {
        TransportParams {
            cpu_rate_bytes_s: rate,
            link_efficiency: 1.0,
            round_s: 0.0,
            header_bytes_per_page: 0.0,
            zero_page_bytes: 0.0,
            setup_s: 0.0,
            setup_s_per_byte: 0.0,
            downtime_fixed_s: 0.0,
            src_cpu_fixed_s: 0.0,
            src_cpu_s_per_byte: 0.0,
            dst_cpu_fixed_s: 0.0,
            dst_cpu_s_per_byte: 0.0,
            guest_rate_factor: 1.0,
            guest_write_slowdown: 0.0,
        }
    }
}

/// A fitted model: parameters per transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Model {
    /// Parameters of each fitted transport.
    pub transports: BTreeMap<Transport, TransportParams>,
}

#[derive(Serialize, Deserialize)]
struct ModelFile {
    magic: String,
    version: u32,
    checksum: u32,
    transports: BTreeMap<Transport, TransportParams>,
}

fn checksum(t: &BTreeMap<Transport, TransportParams>) -> Result<u32, ModelError> {
    Ok(crc32fast::hash(
        &serde_json::to_vec(t).map_err(ModelError::Parse)?,
    ))
}

impl Model {
    /// Parameters of `t`, or [`ModelError::MissingTransport`].
    pub fn params(&self, t: Transport) -> Result<&TransportParams, ModelError> {
        self.transports
            .get(&t)
            .ok_or(ModelError::MissingTransport(t))
    }

    /// The file's text (pretty JSON with magic, version and checksum).
    pub fn to_json(&self) -> Result<String, ModelError> {
        let f = ModelFile {
            magic: MODEL_MAGIC.into(),
            version: MODEL_VERSION,
            checksum: checksum(&self.transports)?,
            transports: self.transports.clone(),
        };
        serde_json::to_string_pretty(&f).map_err(ModelError::Parse)
    }

    /// Parses a file's text, checking magic, version and checksum.
    pub fn from_json(text: &str) -> Result<Model, ModelError> {
        // Magic and version first, so that another file or version says so rather than
        // failing on a field it does not have.
        #[derive(Deserialize)]
        struct Head {
            magic: String,
            version: u32,
        }
        let head: Head = serde_json::from_str(text).map_err(ModelError::Parse)?;
        if head.magic != MODEL_MAGIC {
            return Err(ModelError::BadMagic { found: head.magic });
        }
        if head.version != MODEL_VERSION {
            return Err(ModelError::BadVersion {
                found: head.version,
                expected: MODEL_VERSION,
            });
        }
        let f: ModelFile = serde_json::from_str(text).map_err(ModelError::Parse)?;
        let computed = checksum(&f.transports)?;
        if computed != f.checksum {
            return Err(ModelError::BadChecksum {
                stored: f.checksum,
                computed,
            });
        }
        Ok(Model {
            transports: f.transports,
        })
    }

    /// Reads `path` (at most 1 MiB).
    pub fn load(path: &Path) -> Result<Model, ModelError> {
        let read = |source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE {
            return Err(ModelError::TooLarge {
                size,
                max: MAX_FILE,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Model::from_json(&text)
    }

    /// Writes `path`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, self.to_json()?).map_err(|source| ModelError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let mut m = Model::default();
        let mut p = TransportParams::ideal(1.234_567_890_123e9);
        p.round_s = 0.001_234_567_9;
        m.transports.insert(Transport::MultiTcp, p);
        m
    }

    #[test]
    fn round_trip() {
        let m = model();
        assert_eq!(Model::from_json(&m.to_json().unwrap()).unwrap(), m);
        let mut slowed = model();
        if let Some(p) = slowed.transports.get_mut(&Transport::MultiTcp) {
            p.guest_write_slowdown = 3.5e-5;
        }
        assert_eq!(
            Model::from_json(&slowed.to_json().unwrap()).unwrap(),
            slowed
        );
    }

    #[test]
    fn a_file_written_before_the_guest_write_slowdown_still_loads() {
        // The project's model was fitted before `guest_write_slowdown` existed: its stored
        // checksum covers the parameters without it, and it reads as 0.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../bench/characterisation/model.json"
        );
        let text = std::fs::read_to_string(path).expect("the project's model");
        assert!(!text.contains("guest_write_slowdown"));
        let m = Model::from_json(&text).expect("loads");
        assert!(m.transports.values().all(|p| p.guest_write_slowdown == 0.0));
        // A model whose slowdown is 0 writes the same text (so the same checksum).
        assert_eq!(m.to_json().expect("json"), text.trim_end());
    }

    #[test]
    fn bad_magic_version_and_checksum_are_refused() {
        let text = model().to_json().unwrap();
        let magic = text.replace(MODEL_MAGIC, "qemu-model");
        assert!(matches!(
            Model::from_json(&magic),
            Err(ModelError::BadMagic { .. })
        ));
        let version = text.replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(
            Model::from_json(&version),
            Err(ModelError::BadVersion { found: 2, .. })
        ));
        let edited = text.replace("1234567890.123", "2234567890.123");
        assert_ne!(edited, text);
        assert!(matches!(
            Model::from_json(&edited),
            Err(ModelError::BadChecksum { .. })
        ));
        assert!(matches!(
            Model::from_json("{\"magic\":"),
            Err(ModelError::Parse(_))
        ));
    }

    #[test]
    fn missing_transport_is_an_error() {
        assert!(matches!(
            model().params(Transport::Shm),
            Err(ModelError::MissingTransport(Transport::Shm))
        ));
    }
}
