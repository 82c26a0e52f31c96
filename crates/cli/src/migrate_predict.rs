//! The model's prediction for a live VM: `fastmig migrate --dry-run` prints it instead of
//! migrating, and `migrate --json --model FILE` puts the one made at the start beside the
//! measured summary.
//!
//! The inputs come from the VM process itself, over its control socket:
//!
//! ```text
//!  query-vm      mem_size, workload (its pattern, when it is a dirty/verify guest)
//!  query-status  ×2, `--sample` apart: pages_written → write rate (the model's D);
//!                working_set_pages (distinct pages dirtied over the last 5 s) → wss
//!  migrate flags transport, streams, --max-bandwidth, --downtime-limit, --max-rounds,
//!                --on-no-converge; --link and --cpu-share (for the prediction only)
//! ```
//!
//! A guest that reports no page writes (not a fastmig workload guest) has its write rate
//! derived from the distinct pages dirtied in the last second, `d`, by inverting the model's
//! random-pattern formula `d = W (1 - e^(-D / W))`. Every page is taken as non-zero (the
//! VM process does not count zero pages).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fastmig_host::{ControlClient, StatusInfo};
use fastmig_migration::{MigrationSummary, TransportKind};
use fastmig_model::{
    predict, what_would_converge, ConvergeHint, MigrationScenario, Model, OnNoConverge, Pattern,
    Prediction, Transport, PAGE_SIZE,
};
use serde::Serialize;
use serde_json::json;

use crate::migrate_cmd::MigrateArgs;
use crate::usage;

/// What was measured on the VM before the prediction: the model's workload inputs.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// Guest page writes per second over the sample.
    pub write_pps: f64,
    /// Where `write_pps` comes from: `guest` (its page-write counter) or `dirty-log`
    /// (inverted from distinct pages per second).
    pub write_rate_source: &'static str,
    /// Distinct pages dirtied per second (KVM's dirty log, last second).
    pub dirty_pps: f64,
    /// Working set, bytes: distinct pages dirtied over the last 5 s.
    pub wss_bytes: u64,
    /// Write pattern assumed (the workload's, else `random`).
    pub pattern: Pattern,
}

/// A prediction with its inputs and, when it does not converge, what would.
#[derive(Debug, Clone, Serialize)]
pub struct Forecast {
    /// Workload inputs measured on the VM.
    pub measured: Measured,
    /// The scenario given to the model.
    pub scenario: MigrationScenario,
    /// The model's answer.
    pub prediction: Prediction,
    /// What would make it converge (only when it does not).
    pub converge_hint: Option<ConvergeHint>,
}

/// The model's transport for the engine's, and its stream count.
fn transport(t: TransportKind) -> (Transport, u32) {
    let streams = match t {
        TransportKind::MultiTcp { streams } => streams,
        _ => 1,
    };
    (crate::model_cmd::model_transport(t), streams)
}

fn policy(p: fastmig_migration::OnNoConverge) -> OnNoConverge {
    match p {
        fastmig_migration::OnNoConverge::Wait => OnNoConverge::Wait,
        fastmig_migration::OnNoConverge::Force => OnNoConverge::Force,
        fastmig_migration::OnNoConverge::Abort => OnNoConverge::Abort,
    }
}

/// Page writes per second from `d` distinct pages per second over a working set of `w`
/// pages, inverting `d = W (1 - e^(-D / W))`. A `d` at (or above) `w` saturates: the
/// inverse is unbounded there, so it is capped at 10 writes per page per second.
pub fn writes_from_distinct(d: f64, w: f64) -> f64 {
    if d <= 0.0 || w <= 0.0 {
        return 0.0;
    }
    let frac = d / w;
    if frac >= 1.0 - 4.5e-5 {
        return 10.0 * w;
    }
    -w * (1.0 - frac).ln()
}

fn working_set(st: &StatusInfo) -> Option<u64> {
    st.working_set_pages
}

/// Measures the VM over `sample` (waiting up to one more working-set window for its first
/// working-set measurement).
fn measure(client: &ControlClient, sample: Duration) -> Result<Measured> {
    let vm = client
        .query_vm()
        .context("query-vm (the VM's memory size)")?;
    let pattern = vm
        .workload
        .parse::<fastmig_vmm::WorkloadSpec>()
        .ok()
        .filter(|w| {
            matches!(
                w.kind,
                fastmig_vmm::WorkloadKind::Dirty | fastmig_vmm::WorkloadKind::Verify
            )
        })
        .map(|w| match w.pattern {
            fastmig_vmm::Pattern::Seq => Pattern::Seq,
            fastmig_vmm::Pattern::Random => Pattern::Random,
            fastmig_vmm::Pattern::HotCold => Pattern::HotCold,
        })
        .unwrap_or(Pattern::Random);
    let deadline = Instant::now() + fastmig_vmm::WSS_WINDOW + Duration::from_secs(3);
    let st0 = loop {
        let st = client.query_status().context("query-status")?;
        if working_set(&st).is_some() {
            break st;
        }
        if Instant::now() >= deadline {
            return Err(usage!(
                "the VM has no working-set measurement yet (status {}): it must have run for {} s",
                st.status,
                (fastmig_vmm::WSS_WINDOW + Duration::from_secs(1)).as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let t0 = Instant::now();
    std::thread::sleep(sample);
    let st1 = client.query_status().context("query-status")?;
    let secs = t0.elapsed().as_secs_f64();
    let wss_pages = working_set(&st1).or(working_set(&st0)).unwrap_or(0);
    let dirty_pps = st1.dirty_rate_pps;
    let (write_pps, source) = match (st0.pages_written, st1.pages_written) {
        (Some(a), Some(b)) if b > a => (b.saturating_sub(a) as f64 / secs, "guest"),
        _ => (
            writes_from_distinct(dirty_pps, wss_pages as f64),
            "dirty-log",
        ),
    };
    Ok(Measured {
        mem_bytes: vm.mem_size,
        write_pps,
        write_rate_source: source,
        dirty_pps,
        wss_bytes: wss_pages * PAGE_SIZE as u64,
        pattern,
    })
}

/// The scenario of migrating the measured VM with `args`' settings.
fn scenario(m: &Measured, args: &MigrateArgs) -> Result<MigrationScenario> {
    let req = args.request()?;
    let (t, streams) = transport(req.transport);
    let mut s = MigrationScenario::new(m.mem_bytes, t);
    s.dirty_rate_pps = m.write_pps;
    s.wss_bytes = m.wss_bytes;
    s.pattern = m.pattern;
    s.link_bytes_s = args.link.map(|l| l as f64);
    s.bandwidth_cap_bytes_s = req.max_bandwidth.map(|b| b as f64);
    s.streams = streams;
    s.downtime_limit_s = req.downtime_limit.as_secs_f64();
    s.max_rounds = req.max_rounds;
    s.on_no_converge = policy(req.on_no_converge);
    s.cpu_share = args.cpu_share;
    Ok(s)
}

/// Measures the VM and predicts its migration with `args`' settings.
pub fn forecast(client: &ControlClient, model: &Model, args: &MigrateArgs) -> Result<Forecast> {
    let measured = measure(client, args.sample)?;
    let scenario = scenario(&measured, args)?;
    let prediction = predict(model, &scenario).map_err(|e| usage!("{e}"))?;
    let converge_hint = if prediction.converges {
        None
    } else {
        Some(what_would_converge(model, &scenario).map_err(|e| usage!("{e}"))?)
    };
    Ok(Forecast {
        measured,
        scenario,
        prediction,
        converge_hint,
    })
}

/// `--dry-run`'s output: the measured inputs, then the prediction as `fastmig predict`
/// prints it (or one JSON object under `--json`).
pub fn print(f: &Forecast, as_json: bool) -> Result<()> {
    if as_json {
        println!("{}", serde_json::to_string(f)?);
        return Ok(());
    }
    let m = &f.measured;
    let mib = (1u64 << 20) as f64;
    println!(
        "measured on the VM: {:.0} MiB (every page taken as non-zero), {:.0} page writes/s ({}), {:.0} distinct dirty pages/s, working set {:.1} MiB (last 5 s), pattern {:?}",
        m.mem_bytes as f64 / mib,
        m.write_pps,
        m.write_rate_source,
        m.dirty_pps,
        m.wss_bytes as f64 / mib,
        m.pattern
    );
    crate::model_cmd::print_prediction(&f.prediction, f.converge_hint.as_ref());
    Ok(())
}

/// `migrate --json`'s object with the prediction made at the start beside the measured
/// summary, and the relative errors of total time and bytes.
pub fn with_summary(
    summary: serde_json::Value,
    f: &Forecast,
    s: &MigrationSummary,
) -> serde_json::Value {
    let rel = |pred: f64, meas: f64| {
        if meas > 0.0 {
            (pred - meas) / meas
        } else {
            0.0
        }
    };
    let mut v = summary;
    v["prediction"] = json!({
        "measured": f.measured,
        "predicted": f.prediction,
        "converge_hint": f.converge_hint,
        "error": {
            "total": rel(f.prediction.total_ms, s.total_ms),
            "bytes": rel(f.prediction.bytes as f64, s.bytes_sent as f64),
            "downtime_ms": f.prediction.downtime_ms - s.downtime_ms,
        },
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverting_the_random_formula_gives_back_the_write_rate() {
        // W = 8192 pages, D = 5000 writes/s: d = 8192 (1 - e^(-5000/8192)) = 8192 × 0.4569
        // = 3743 distinct pages in one second; inverting gives 5000 back.
        let w = 8192.0;
        let d = w * (1.0 - (-5000.0f64 / w).exp());
        assert!((d - 3743.0).abs() < 1.0, "{d}");
        assert!((writes_from_distinct(d, w) - 5000.0).abs() < 1e-6);
        // Far from saturation distinct ≈ writes: 10 writes/s over 1e6 pages.
        assert!((writes_from_distinct(10.0, 1e6) - 10.0).abs() < 1e-3);
        // Saturated (every page of the set dirtied each second): capped at 10 writes/page/s.
        assert_eq!(writes_from_distinct(8192.0, 8192.0), 81920.0);
        assert_eq!(writes_from_distinct(0.0, 8192.0), 0.0);
    }
}
