//! `fastmig model fit` (fit the analytic model to a sweep) and `fastmig predict` (what a
//! migration will cost, and whether it converges, before it starts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use fastmig_model::{
    evaluate, fit, predict, what_would_converge, Accuracy, MigrationScenario, Model, Observation,
    OnNoConverge, Pattern, Transport,
};
use serde_json::json;

use crate::sweep_row::{self, Split};
use crate::{units, usage};

/// `fastmig model ...`
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Fit the model's per-transport parameters (least squares) to the `train` runs of a
    /// sweep, write model.json, and print the error per transport on the fitting runs and
    /// on the held-out (`test`) runs.
    Fit {
        /// The `sweep.csv` of `fastmig bench sweep`; several are pooled (e.g. a full sweep
        /// and a sweep repeating its CPU-bound points).
        #[arg(required = true)]
        sweep: Vec<PathBuf>,
        /// Where to write the model.
        #[arg(short, long, default_value = "model.json")]
        out: PathBuf,
        /// Fit on every run, held-out ones included.
        #[arg(long)]
        all: bool,
        /// Print the errors as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a model's errors on the runs of a sweep (all of them, or one split).
    Eval {
        /// The sweep(s), pooled as for `fit`.
        #[arg(required = true)]
        sweep: Vec<PathBuf>,
        /// The model.
        #[arg(long)]
        model: PathBuf,
        /// Only the runs of this split.
        #[arg(long, value_enum)]
        split: Option<SplitArg>,
        /// Also print every run's predicted and measured values.
        #[arg(long)]
        rows: bool,
        /// Compare each grid point once, by its median run (the repetition whose total time
        /// is the median of the point's repetitions), rather than every run: a repeated
        /// point's runs scatter on a shared machine, and this separates the model's error
        /// from that scatter.
        #[arg(long)]
        by_point: bool,
        /// Print the errors as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A split on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SplitArg {
    /// Fitting runs.
    Train,
    /// Held-out runs.
    Test,
}

/// Transports on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// One TCP stream.
    Classic,
    /// Parallel TCP streams.
    MultiTcp,
    /// Shared memory (same host).
    Shm,
    /// Memory handover (same host).
    Handover,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Classic => Transport::Classic,
            TransportArg::MultiTcp => Transport::MultiTcp,
            TransportArg::Shm => Transport::Shm,
            TransportArg::Handover => Transport::Handover,
        }
    }
}

/// Write patterns on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternArg {
    /// A sweep over the working set.
    Seq,
    /// Uniform over the working set.
    Random,
    /// Hot set and cold set.
    Hotcold,
}

impl From<PatternArg> for Pattern {
    fn from(p: PatternArg) -> Self {
        match p {
            PatternArg::Seq => Pattern::Seq,
            PatternArg::Random => Pattern::Random,
            PatternArg::Hotcold => Pattern::HotCold,
        }
    }
}

/// `--on-no-converge` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    /// Go on to the round limit, then fail.
    Wait,
    /// Stop and copy at once.
    Force,
    /// Fail at once.
    Abort,
}

impl From<PolicyArg> for OnNoConverge {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Wait => OnNoConverge::Wait,
            PolicyArg::Force => OnNoConverge::Force,
            PolicyArg::Abort => OnNoConverge::Abort,
        }
    }
}

fn size_arg(s: &str) -> Result<u64> {
    units::parse_size(s).map_err(anyhow::Error::msg)
}

fn bandwidth_arg(s: &str) -> Result<u64> {
    units::parse_bandwidth(s).map_err(anyhow::Error::msg)
}

fn duration_arg(s: &str) -> Result<Duration> {
    units::parse_duration(s).map_err(anyhow::Error::msg)
}

fn rate_arg(s: &str) -> Result<f64> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(usage!("bad dirty rate `{s}`: pages/s, a number ≥ 0")),
    }
}

/// A CPU share in (0, 1] (`predict --cpu-share`, `migrate --cpu-share`).
pub fn share_arg(s: &str) -> Result<f64> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(usage!("bad CPU share `{s}`: a number in (0, 1]")),
    }
}

/// Arguments of `fastmig predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// The model (`fastmig model fit`).
    #[arg(long)]
    pub model: PathBuf,
    /// Guest memory size (K/M/G suffixes).
    #[arg(long, value_parser = size_arg)]
    pub mem: u64,
    /// Guest page writes per second.
    #[arg(long, value_parser = rate_arg, default_value = "0")]
    pub dirty_rate: f64,
    /// Working-set size (default: all memory).
    #[arg(long, value_parser = size_arg)]
    pub wss: Option<u64>,
    /// Write pattern.
    #[arg(long, value_enum, default_value = "random")]
    pub pattern: PatternArg,
    /// Bytes of memory in non-zero pages (default: all; zero pages cost a flag only).
    #[arg(long, value_parser = size_arg)]
    pub nonzero: Option<u64>,
    /// Link bandwidth, bytes/s (`1G`) or bits/s (`10gbit`); default: unlimited.
    #[arg(long, value_parser = bandwidth_arg)]
    pub bandwidth: Option<u64>,
    /// The transport's own cap (`migrate --max-bandwidth`); default: none.
    #[arg(long, value_parser = bandwidth_arg)]
    pub max_bandwidth: Option<u64>,
    /// Transport.
    #[arg(long, value_enum, default_value = "classic")]
    pub transport: TransportArg,
    /// Streams (multi-tcp).
    #[arg(long, default_value_t = 2)]
    pub streams: u32,
    /// Fraction of the CPU the migration gets, in (0, 1].
    #[arg(long, value_parser = share_arg, default_value = "1")]
    pub cpu_share: f64,
    /// Downtime limit (as `migrate --downtime-limit`).
    #[arg(long, value_parser = duration_arg, default_value = "30ms")]
    pub downtime_limit: Duration,
    /// Round limit, the full pass included.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Non-convergence policy (as `migrate --on-no-converge`).
    #[arg(long, value_enum, default_value = "wait")]
    pub on_no_converge: PolicyArg,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The model's transport for a migration transport. The model has no RDMA transport yet:
/// `rdma` is priced as a network transport (multi-tcp).
pub fn model_transport(t: fastmig_migration::TransportKind) -> Transport {
    use fastmig_migration::TransportKind as K;
    match t {
        K::Classic => Transport::Classic,
        K::MultiTcp { .. } | K::Rdma { .. } => Transport::MultiTcp,
        K::Shm => Transport::Shm,
        K::Handover => Transport::Handover,
    }
}

/// Loads a model file; a missing or bad file is a usage error naming its cause.
pub fn load_model(path: &Path) -> Result<Model> {
    Model::load(path).map_err(|e| {
        usage!(
            "{}",
            crate::error::one_line(
                &anyhow::Error::new(e).context(format!("cannot use model {}", path.display()))
            )
        )
    })
}

fn observations(rows: &[sweep_row::SweepRow], split: Option<Split>) -> Result<Vec<Observation>> {
    Ok(point_observations(rows, split)?
        .into_iter()
        .map(|(_, o)| o)
        .collect())
}

/// The runs of `split` with the grid point each measured.
fn point_observations(
    rows: &[sweep_row::SweepRow],
    split: Option<Split>,
) -> Result<Vec<(&str, Observation)>> {
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| split.is_none_or(|s| r.split == s)) {
        if let Some(o) = r.observation()? {
            out.push((r.point(), o));
        }
    }
    Ok(out)
}

/// One observation per grid point: the repetition with the median total time (the lower
/// middle one for an even count), in the order points first appear.
fn median_runs(obs: Vec<(&str, Observation)>) -> Vec<Observation> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_point: BTreeMap<&str, Vec<Observation>> = BTreeMap::new();
    for (point, o) in obs {
        if !by_point.contains_key(point) {
            order.push(point);
        }
        by_point.entry(point).or_default().push(o);
    }
    order
        .into_iter()
        .filter_map(|p| {
            let mut runs = by_point.remove(p)?;
            runs.sort_by(|a, b| a.measured.total_ms.total_cmp(&b.measured.total_ms));
            let mid = (runs.len() - 1) / 2;
            Some(runs.swap_remove(mid))
        })
        .collect()
}

/// Runs `fastmig model ...`.
pub fn main(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Fit {
            sweep,
            out,
            all,
            json,
        } => {
            let rows = sweep_row::read_all(&sweep)?;
            let train = observations(&rows, (!all).then_some(Split::Train))?;
            if train.is_empty() {
                return Err(usage!("{}: no completed fitting run", names(&sweep)));
            }
            let report = fit(&train).map_err(|e| usage!("{e}"))?;
            report
                .model
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            let test = observations(&rows, Some(Split::Test))?;
            let held = if all || test.is_empty() {
                BTreeMap::new()
            } else {
                evaluate(&report.model, &test).map_err(|e| usage!("{e}"))?
            };
            if json {
                println!(
                    "{}",
                    json!({"model": out, "fit": report.errors, "held_out": held})
                );
            } else {
                println!("wrote {} (fitted on {} runs)", out.display(), train.len());
                println!("\nerror on the fitting runs:\n{}", table(&report.errors));
                if !held.is_empty() {
                    println!("error on held-out runs:\n{}", table(&held));
                }
            }
            Ok(())
        }
        ModelCommand::Eval {
            sweep,
            model,
            split,
            rows: per_row,
            by_point,
            json,
        } => {
            let model = load_model(&model)?;
            let rows = sweep_row::read_all(&sweep)?;
            let split = split.map(|s| match s {
                SplitArg::Train => Split::Train,
                SplitArg::Test => Split::Test,
            });
            let obs = if by_point {
                median_runs(point_observations(&rows, split)?)
            } else {
                observations(&rows, split)?
            };
            if per_row {
                println!("transport,mem_mib,pattern,write_pps,link_mib_s,limit_ms,measured_total_ms,predicted_total_ms,measured_downtime_ms,predicted_downtime_ms,measured_mib,predicted_mib,measured_rounds,predicted_rounds,measured_outcome,predicted_outcome");
                for o in &obs {
                    let p = predict(&model, &o.scenario).map_err(|e| usage!("{e}"))?;
                    let (s, m) = (&o.scenario, &o.measured);
                    let mib = (1u64 << 20) as f64;
                    println!(
                        "{},{},{:?},{:.0},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{:?},{:?}",
                        s.transport,
                        s.mem_bytes >> 20,
                        s.pattern,
                        s.dirty_rate_pps,
                        s.link_bytes_s.map(|l| format!("{:.0}", l / mib)).unwrap_or_default(),
                        s.downtime_limit_s * 1e3,
                        m.total_ms,
                        p.total_ms,
                        m.downtime_ms,
                        p.downtime_ms,
                        m.bytes as f64 / mib,
                        p.bytes as f64 / mib,
                        m.rounds,
                        p.rounds,
                        m.outcome,
                        p.outcome
                    );
                }
            }
            let acc = evaluate(&model, &obs).map_err(|e| usage!("{e}"))?;
            if json {
                println!("{}", serde_json::to_string(&acc)?);
            } else {
                println!("{}", table(&acc));
            }
            Ok(())
        }
    }
}

/// The sweeps' paths, for messages.
fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A markdown table of accuracies, one row per transport.
pub fn table(acc: &BTreeMap<Transport, Accuracy>) -> String {
    let mut s = String::from(
        "| transport | runs | total median | total p90 | bytes median | bytes p90 | downtime median abs | downtime within 25%/5ms | convergence right |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (t, a) in acc {
        s.push_str(&format!(
            "| {t} | {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} ms | {:.0} % | {}/{} |\n",
            a.runs,
            a.total_median * 100.0,
            a.total_p90 * 100.0,
            a.bytes_median * 100.0,
            a.bytes_p90 * 100.0,
            a.downtime_median_ms,
            a.downtime_ok * 100.0,
            a.convergence_right,
            a.runs
        ));
    }
    s
}

/// The scenario `fastmig predict` describes.
fn scenario(a: &PredictArgs) -> MigrationScenario {
    let mut s = MigrationScenario::new(a.mem, a.transport.into());
    s.dirty_rate_pps = a.dirty_rate;
    s.wss_bytes = a.wss.unwrap_or(a.mem);
    s.pattern = a.pattern.into();
    s.nonzero_bytes = a.nonzero;
    s.link_bytes_s = a.bandwidth.map(|b| b as f64);
    s.bandwidth_cap_bytes_s = a.max_bandwidth.map(|b| b as f64);
    s.streams = a.streams;
    s.cpu_share = a.cpu_share;
    s.downtime_limit_s = a.downtime_limit.as_secs_f64();
    s.max_rounds = a.max_rounds;
    s.on_no_converge = a.on_no_converge.into();
    s
}

/// Runs `fastmig predict`.
pub fn predict_main(a: PredictArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let s = scenario(&a);
    let p = predict(&model, &s).map_err(|e| usage!("{e}"))?;
    let hint = if p.converges {
        None
    } else {
        Some(what_would_converge(&model, &s).map_err(|e| usage!("{e}"))?)
    };
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["converge_hint"] = serde_json::to_value(&hint)?;
        println!("{v}");
        return Ok(());
    }
    print_prediction(&p, hint.as_ref());
    Ok(())
}

/// A prediction as `fastmig predict` prints it, with what would converge when it does not.
pub fn print_prediction(p: &fastmig_model::Prediction, hint: Option<&fastmig_model::ConvergeHint>) {
    let gib = (1u64 << 30) as f64;
    println!(
        "predicted migration ({}, {:.0} MiB/s, bound by {:?})",
        p.transport,
        p.rate_bytes_s / (1u64 << 20) as f64,
        p.bound
    );
    println!(
        "  converges    {:>10}",
        if p.converges { "yes" } else { "no" }
    );
    println!("  outcome      {:>10?}", p.outcome);
    println!("  total        {:>10.1} ms", p.total_ms);
    println!("  downtime     {:>10.1} ms", p.downtime_ms);
    println!("  bytes        {:>10.3} GiB", p.bytes as f64 / gib);
    println!("  rounds       {:>10}", p.rounds);
    println!("  src CPU      {:>10.3} s", p.src_cpu_s);
    println!("  dst CPU      {:>10.3} s", p.dst_cpu_s);
    if let Some(h) = hint {
        match h.downtime_limit_s {
            Some(d) => println!(
                "  would converge with a downtime limit of {:.0} ms",
                d * 1e3
            ),
            None => println!("  no downtime limit up to an hour converges"),
        }
        match h.link_bytes_s {
            Some(l) => println!(
                "  would converge on a link of {:.0} MiB/s ({:.2} Gbit/s)",
                l / (1u64 << 20) as f64,
                l * 8.0 / 1e9
            ),
            None => println!(
                "  no faster link converges: the transport's CPU rate or cap binds first (or it uses no link)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep_row::sample_row;

    #[test]
    fn by_point_keeps_the_median_run_of_each_point() {
        // Point p: three repetitions of 30, 10 and 20 ms (the median run is the 20 ms one);
        // point q: two of 40 and 50 ms (the lower middle one, 40); point r: one run.
        let runs = [
            ("p|0", 30.0),
            ("q|0", 50.0),
            ("p|1", 10.0),
            ("r|0", 7.0),
            ("p|2", 20.0),
            ("q|1", 40.0),
        ];
        let rows: Vec<_> = runs
            .iter()
            .map(|(key, total)| {
                let mut r = sample_row(key);
                r.rep = key[2..].parse().expect("rep");
                r.total_ms = *total;
                r
            })
            .collect();
        let picked = median_runs(point_observations(&rows, None).expect("observations"));
        let totals: Vec<f64> = picked.iter().map(|o| o.measured.total_ms).collect();
        assert_eq!(totals, [20.0, 40.0, 7.0]);
    }
}
