//! Parsing of sizes, durations and bandwidths given on the command line. Every failure is a
//! usage error (exit code 2) that quotes the bad value.

use std::time::Duration;

use crate::usage;

/// A byte size with an optional K/M/G suffix (powers of 1024), e.g. `64M`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    fastmig_vmm::parse_size(s).map_err(|e| usage!("{e}"))
}

/// A duration: `30ms`, `2s`, `500us`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| usage!("bad duration `{s}` (examples: 30ms, 2s, 500us)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 1e6 {
        return Err(usage!("bad duration `{s}`: out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A bandwidth in bytes/s: `1G` (bytes/s, K/M/G powers of 1024) or `10gbit` / `500mbit`
/// (bits/s, powers of 1000).
pub fn parse_bandwidth(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    for (suffix, mult) in [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)] {
        if let Some(n) = t.strip_suffix(suffix) {
            let v: f64 = n
                .trim()
                .parse()
                .map_err(|_| usage!("bad bandwidth `{s}` (examples: 1G, 10gbit)"))?;
            if !v.is_finite() || v <= 0.0 {
                return Err(usage!("bad bandwidth `{s}`: must be positive"));
            }
            return Ok((v * mult / 8.0) as u64);
        }
    }
    let v = parse_size(t.trim_end_matches("/s"))
        .map_err(|_| usage!("bad bandwidth `{s}` (examples: 1G, 10gbit)"))?;
    if v == 0 {
        return Err(usage!("bad bandwidth `{s}`: must be positive"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30ms").unwrap(), Duration::from_millis(30));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_millis(15));
        for bad in ["", "ms", "-1ms", "fast", "1e99s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bandwidth("10gbit").unwrap(), 1_250_000_000);
        assert_eq!(parse_bandwidth("100Mbit").unwrap(), 12_500_000);
        for bad in ["", "0", "fast", "-1gbit", "0gbit"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }
}
