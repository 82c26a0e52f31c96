//! Workload specs (`NAME[:key=value,...]`) and the size syntax (`64M`).
//!
//! Keys and defaults:
//!
//! | workload | keys (default) |
//! |---|---|
//! | `idle` | none |
//! | `dirty`, `verify` | `rate` (1000 pages/s, 0 = unpaced), `wss` (16M), `pattern` (`random`; or `seq`, `hotcold`), `hot` (0.1: fraction of the working set that is hot), `hotw` (0.9: fraction of writes that go to the hot set), `seed` (1) |
//! | `fill` | `rate` (0 = as fast as the guest can) |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::{VmmError, PAGE_SIZE};

/// Which built-in guest program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Halts; the VMM counts a heartbeat every time it resumes the vCPU (about every 10 ms).
    Idle,
    /// Writes pages of a working set at a paced rate.
    Dirty,
    /// Like `dirty`, with stamps the VMM can check (see [`crate::Vm::verify_memory`]).
    Verify,
    /// Writes every page of guest memory once, then behaves as `idle`.
    Fill,
}

/// Order in which `dirty`/`verify` pick the page for each write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Page `seq mod n`: a sweep over the working set.
    Seq,
    /// A hash of the sequence number picks the page uniformly.
    Random,
    /// A hash picks the hot set (first `hot` fraction of pages) with probability `hotw`.
    HotCold,
}

impl Pattern {
    /// Value the guest program reads in `r10`.
    pub(crate) fn guest_code(self) -> u64 {
        match self {
            Pattern::Seq => 0,
            Pattern::Random => 1,
            Pattern::HotCold => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::HotCold => "hotcold",
        }
    }
}

/// A parsed workload spec. `Display` prints the canonical form, which parses back to the same value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// The guest program.
    pub kind: WorkloadKind,
    /// Target write rate in pages per second over all vCPUs; 0 = unpaced.
    pub rate: u64,
    /// Working-set size in bytes (`dirty`/`verify`), a multiple of 4 KiB.
    pub wss: u64,
    /// Page selection order (`dirty`/`verify`).
    pub pattern: Pattern,
    /// Hot fraction of the working set for `hotcold`, in (0, 1).
    pub hot: f64,
    /// Fraction of writes that go to the hot set for `hotcold`, in [0, 1].
    pub hot_writes: f64,
    /// Seed mixed into the page hash of `random`/`hotcold`.
    pub seed: u64,
}

const DEFAULT_RATE: u64 = 1000;
const DEFAULT_WSS: u64 = 16 << 20;

impl WorkloadSpec {
    /// The spec for `kind` with every key at its default.
    pub fn new(kind: WorkloadKind) -> Self {
        WorkloadSpec {
            kind,
            rate: match kind {
                WorkloadKind::Dirty | WorkloadKind::Verify => DEFAULT_RATE,
                WorkloadKind::Idle | WorkloadKind::Fill => 0,
            },
            wss: match kind {
                WorkloadKind::Dirty | WorkloadKind::Verify => DEFAULT_WSS,
                WorkloadKind::Idle | WorkloadKind::Fill => 0,
            },
            pattern: Pattern::Random,
            hot: 0.1,
            hot_writes: 0.9,
            seed: 1,
        }
    }

    /// Smallest guest memory (bytes) this workload fits in: the VMM's reserved low pages plus
    /// the working set, and never less than 1 MiB.
    pub fn min_mem_size(&self) -> u64 {
        let need = crate::guest::DATA_BASE + self.wss;
        need.max(1 << 20)
    }

    fn has_working_set(&self) -> bool {
        matches!(self.kind, WorkloadKind::Dirty | WorkloadKind::Verify)
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            WorkloadKind::Idle => f.write_str("idle"),
            WorkloadKind::Fill => write!(f, "fill:rate={}", self.rate),
            WorkloadKind::Dirty | WorkloadKind::Verify => {
                let name = if self.kind == WorkloadKind::Dirty {
                    "dirty"
                } else {
                    "verify"
                };
                write!(
                    f,
                    "{name}:rate={},wss={},pattern={}",
                    self.rate,
                    format_size(self.wss),
                    self.pattern.name()
                )?;
                let default = WorkloadSpec::new(self.kind);
                if self.pattern == Pattern::HotCold
                    || self.hot != default.hot
                    || self.hot_writes != default.hot_writes
                {
                    write!(f, ",hot={},hotw={}", self.hot, self.hot_writes)?;
                }
                if self.seed != 1 {
                    write!(f, ",seed={}", self.seed)?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for WorkloadSpec {
    type Err = VmmError;

    fn from_str(s: &str) -> Result<Self, VmmError> {
        let spec_text = || s.to_string();
        let bad = VmmError::InvalidSpec;
        let (name, rest) = match s.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        let kind = match name.trim() {
            "idle" => WorkloadKind::Idle,
            "dirty" => WorkloadKind::Dirty,
            "verify" => WorkloadKind::Verify,
            "fill" => WorkloadKind::Fill,
            other => {
                return Err(bad(SpecError::UnknownWorkload {
                    spec: spec_text(),
                    name: other.to_string(),
                }))
            }
        };
        let mut spec = WorkloadSpec::new(kind);
        for pair in rest.into_iter().flat_map(|r| r.split(',')) {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                bad(SpecError::NotKeyValue {
                    spec: spec_text(),
                    pair: pair.to_string(),
                })
            })?;
            let allowed = match kind {
                WorkloadKind::Idle => &[][..],
                WorkloadKind::Fill => &["rate"][..],
                _ => &["rate", "wss", "pattern", "hot", "hotw", "seed"][..],
            };
            if !allowed.contains(&key) {
                return Err(bad(SpecError::UnknownKey {
                    spec: spec_text(),
                    key: key.to_string(),
                    workload: name.to_string(),
                }));
            }
            match key {
                "rate" => spec.rate = parse_int(s, "rate", value)?,
                "wss" => spec.wss = parse_size(value)?,
                "pattern" => {
                    spec.pattern = match value {
                        "seq" => Pattern::Seq,
                        "random" => Pattern::Random,
                        "hotcold" => Pattern::HotCold,
                        _ => {
                            return Err(bad(SpecError::UnknownPattern {
                                spec: spec_text(),
                                value: value.to_string(),
                            }))
                        }
                    }
                }
                "hot" => spec.hot = parse_fraction(s, "hot", value)?,
                "hotw" => spec.hot_writes = parse_fraction(s, "hotw", value)?,
                "seed" => spec.seed = parse_int(s, "seed", value)?,
                // `allowed` holds only the keys above.
                _ => {
                    return Err(bad(SpecError::UnknownKey {
                        spec: spec_text(),
                        key: key.to_string(),
                        workload: name.to_string(),
                    }))
                }
            }
        }
        if spec.has_working_set() {
            if spec.wss == 0 || !spec.wss.is_multiple_of(PAGE_SIZE as u64) {
                return Err(bad(SpecError::WssNotPages { spec: spec_text() }));
            }
            if spec.hot <= 0.0 || spec.hot >= 1.0 {
                return Err(bad(SpecError::HotOutOfRange { spec: spec_text() }));
            }
        }
        Ok(spec)
    }
}

fn parse_fraction(spec: &str, key: &'static str, value: &str) -> Result<f64, VmmError> {
    match value.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(VmmError::InvalidSpec(SpecError::NotAFraction {
            spec: spec.to_string(),
            key,
            value: value.to_string(),
        })),
    }
}

fn parse_int(spec: &str, key: &'static str, value: &str) -> Result<u64, VmmError> {
    value.parse().map_err(|source| {
        VmmError::InvalidSpec(SpecError::NotANumber {
            spec: spec.to_string(),
            key,
            value: value.to_string(),
            source,
        })
    })
}

/// Parses a byte size: a whole number with an optional `K`, `M` or `G` suffix (powers of 1024;
/// `KiB`/`MB` style spellings are accepted too).
pub fn parse_size(s: &str) -> Result<u64, VmmError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let bad = || VmmError::InvalidSpec(SpecError::Size(s.to_string()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte size with the largest exact suffix (`16M`, `1536K`, `4097`).
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("64M").ok(), Some(64 << 20));
        assert_eq!(parse_size("2g").ok(), Some(2 << 30));
        assert_eq!(parse_size("512KiB").ok(), Some(512 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(4097), "4097");
    }

    #[test]
    fn specs_parse_and_round_trip_through_display() {
        for text in [
            "idle",
            "fill:rate=0",
            "dirty:rate=20000,wss=32M,pattern=random",
            "verify:rate=5000,wss=8M,pattern=seq",
            "dirty:rate=10,wss=4K,pattern=hotcold,hot=0.25,hotw=0.75,seed=9",
        ] {
            let spec: WorkloadSpec = text.parse().expect(text);
            assert_eq!(spec.to_string(), text);
            let again: WorkloadSpec = spec.to_string().parse().expect(text);
            assert_eq!(again, spec);
        }
        let d: WorkloadSpec = "dirty".parse().expect("defaults");
        assert_eq!(
            (d.rate, d.wss, d.pattern),
            (1000, 16 << 20, Pattern::Random)
        );
        let h: WorkloadSpec = "verify:pattern=hotcold".parse().expect("hotcold");
        assert_eq!((h.hot, h.hot_writes), (0.1, 0.9));
    }

    #[test]
    fn generated_specs_round_trip() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..500 {
            let kind = [WorkloadKind::Dirty, WorkloadKind::Verify][(next() % 2) as usize];
            let spec = WorkloadSpec {
                kind,
                rate: next() % 100_000,
                wss: (next() % 100_000 + 1) * PAGE_SIZE as u64,
                pattern: [Pattern::Seq, Pattern::Random, Pattern::HotCold][(next() % 3) as usize],
                hot: (next() % 999 + 1) as f64 / 1000.0,
                hot_writes: (next() % 1001) as f64 / 1000.0,
                seed: next() % 3,
            };
            let text = spec.to_string();
            assert_eq!(text.parse::<WorkloadSpec>().expect(&text), spec, "{text}");
        }
    }

    #[test]
    fn malformed_specs_are_rejected_with_a_reason() {
        for text in [
            "bogus",
            "dirty:rate",
            "dirty:rate=fast",
            "dirty:wss=3000",
            "dirty:pattern=zigzag",
            "dirty:hot=1.5",
            "idle:rate=5",
            "fill:wss=4M",
            "dirty:colour=red",
        ] {
            let err = text.parse::<WorkloadSpec>().expect_err(text);
            assert!(matches!(err, VmmError::InvalidSpec(_)), "{text}: {err}");
        }
    }

    #[test]
    fn min_mem_size_covers_the_working_set() {
        let spec: WorkloadSpec = "dirty:wss=32M".parse().expect("spec");
        assert!(spec.min_mem_size() >= (32 << 20) + crate::guest::DATA_BASE);
        assert_eq!(
            WorkloadSpec::new(WorkloadKind::Idle).min_mem_size(),
            1 << 20
        );
    }
}
