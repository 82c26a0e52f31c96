//! Runs the CloudSim reference policies on a PlanetLab day and prints ours next to CloudSim's.
//!
//! `cargo run --release -p fastmig-sim --example compare_reference -- DAY_DIR REFERENCE_CSV [policy...]`

use std::time::Instant;

use fastmig_sim::{simulate, CloudSimCost, DatacenterSpec, PolicySpec, SimOptions, Trace};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: compare_reference DAY_DIR REFERENCE_CSV [policy...]")?;
    let csv = args.get(2).ok_or("missing REFERENCE_CSV")?;
    let trace = Trace::load(std::path::Path::new(dir))?;
    // SCALE=F replicates the day to round(800 F) hosts and round(n F) VMs (metrics then differ
    // from the reference, which is for F = 1).
    let scale: f64 = std::env::var("SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let spec = if scale == 1.0 {
        DatacenterSpec::reference(trace.len())
    } else {
        DatacenterSpec::scaled(
            (800.0 * scale).round() as usize,
            (trace.len() as f64 * scale).round() as usize,
            trace.len(),
        )
    };
    let reference = std::fs::read_to_string(csv)?;
    let keep_idle = std::env::var("KEEP_IDLE").is_ok();
    let filter: Vec<&String> = args.iter().skip(3).collect();
    println!("{:<8} {:>9} {:>9} {:>6} | {:>7} {:>7} {:>6} | {:>7} {:>7} {:>6} | {:>6} {:>6} {:>6} | {:>5} {:>5} | {:>5}", "policy", "energy", "ref", "diff%", "slatah", "ref", "diff%", "pdm", "ref", "diff%", "migr", "ref", "diff%", "shut", "ref", "ms");
    for line in reference.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let name = f[1].replace('_', "-");
        if !filter.is_empty() && !filter.iter().any(|p| **p == name) {
            continue;
        }
        let policy = PolicySpec::parse(&name, None)?;
        let index_min_hosts = std::env::var("INDEX_MIN_HOSTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let pabfd_budget = std::env::var("BUDGET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let opts = SimOptions {
            remove_idle_vms: !keep_idle,
            index_min_hosts,
            pabfd_budget,
            ..SimOptions::default()
        };
        let t0 = Instant::now();
        let r = simulate(&trace, &spec, policy, &CloudSimCost, &opts)?;
        let ms = t0.elapsed().as_millis();
        let p = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        let d = |a: f64, b: f64| if b != 0.0 { (a - b) / b * 100.0 } else { 0.0 };
        println!(
            "{:<8} {:>9.2} {:>9.2} {:>6.1} | {:>7.4} {:>7.4} {:>6.1} | {:>8.6} {:>7.5} {:>6.1} | {:>6} {:>6} {:>6.1} | {:>5} {:>5} | {:>5}",
            name,
            r.energy_kwh,
            p(5),
            d(r.energy_kwh, p(5)),
            r.slatah,
            p(6),
            d(r.slatah, p(6)),
            r.pdm,
            p(7),
            d(r.pdm, p(7)),
            r.migrations,
            p(9),
            d(r.migrations as f64, p(9)),
            r.host_shutdowns,
            p(10),
            ms
        );
    }
    Ok(())
}
