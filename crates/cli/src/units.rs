//! Value parsers for the command line (clap `value_parser`s): sizes, durations, bandwidths,
//! transports and workloads. A bad value is refused by clap with the message returned here,
//! quoting the value (exit code 2).

use std::time::Duration;

use fastmig_migration::{OnNoConverge, TransportKind};

/// A byte size with an optional K/M/G suffix (powers of 1024), e.g. `64M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("a size cannot be negative: `{s}`"));
    }
    fastmig_vmm::parse_size(s).map_err(|e| e.to_string())
}

/// A non-zero byte size.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("a memory size must be positive: `{s}`")),
        n => Ok(n),
    }
}

/// A duration: `30ms`, `2s`, `500us`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
        .map_err(|_| format!("bad duration `{s}` (examples: 30ms, 2s, 500us)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 1e6 {
        return Err(format!("bad duration `{s}`: out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A positive duration (a timeout of zero would fail at once).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("a timeout must be positive: `{s}`")),
        d => Ok(d),
    }
}

/// A bandwidth in bytes/s: `1G` (bytes/s, K/M/G powers of 1024) or `10gbit` / `500mbit`
/// (bits/s, powers of 1000).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let bad = || format!("bad bandwidth `{s}` (examples: 1G, 10gbit)");
    let t = s.trim().to_ascii_lowercase();
    for (suffix, mult) in [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)] {
        if let Some(n) = t.strip_suffix(suffix) {
            let v: f64 = n.trim().parse().map_err(|_| bad())?;
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("bad bandwidth `{s}`: must be positive"));
            }
            return Ok((v * mult / 8.0) as u64);
        }
    }
    let v = fastmig_vmm::parse_size(t.trim_end_matches("/s")).map_err(|_| bad())?;
    if v == 0 {
        return Err(format!("bad bandwidth `{s}`: must be positive"));
    }
    Ok(v)
}

/// A transport: `classic`, `multi-tcp` (one stream per core), `multi-tcp:N`, `shm`,
/// `handover`, `rdma`, `rdma:PIN_MIB`, `rdma:qps=N,pin=MIB`.
pub fn parse_transport(s: &str) -> Result<TransportKind, String> {
    s.parse()
        .map_err(|e: fastmig_migration::BadTransport| e.to_string())
}

/// `wait`, `force` or `abort`.
pub fn parse_on_no_converge(s: &str) -> Result<OnNoConverge, String> {
    s.parse()
        .map_err(|e: fastmig_migration::BadPolicy| e.to_string())
}

/// A workload spec, checked now (`NAME[:key=value,...]`).
pub fn parse_workload(s: &str) -> Result<fastmig_vmm::WorkloadSpec, String> {
    s.parse().map_err(|e: fastmig_vmm::VmmError| e.to_string())
}

/// A migration endpoint: `HOST:PORT` or `unix:PATH`.
pub fn parse_endpoint(s: &str) -> Result<fastmig_migration::Endpoint, String> {
    s.parse()
        .map_err(|e: fastmig_migration::BadEndpoint| e.to_string())
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
        assert!(parse_timeout("0s").is_err());
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

    #[test]
    fn negative_and_zero_sizes_say_so() {
        assert!(parse_size("-64M").unwrap_err().contains("negative"));
        assert!(parse_mem("0").unwrap_err().contains("positive"));
        assert_eq!(parse_mem("64M").unwrap(), 64 << 20);
    }
}
