//! `fastmig simulate --frontier`: how much harder a cluster can consolidate at the same SLA
//! when migration is cheaper.
//!
//! For each migration cost (CloudSim's formula; with `--model`, the fitted model's classic at
//! 32 MiB/s and classic, multi-tcp and shm-class at 1 and 10 Gbit/s), every detector's safety
//! parameter is swept over a fixed grid ([`param_grid`]), with the selector of `--policy`.
//! Each run is a point (SLAV, energy), averaged over the days given; a cost's curve is the
//! Pareto frontier of its points (no other point of that cost has both less energy and less
//! SLAV). The energy a cost needs at a target SLAV is read off its frontier
//! ([`energy_at`]): the target is the SLAV that `--policy` (default LR-MMT 1.2) reaches with
//! CloudSim's own formula.
//!
//! ```text
//!  costs × detectors × params × days ──simulate──► points ──mean over days──► per cost:
//!      Pareto frontier ──energy_at(target SLAV)──► saved vs the reference run and vs CloudSim's curve
//! ```
//!
//! Outputs in `--out`: `frontier.csv` (every point), `frontier.md` (the summary, also
//! printed) and `frontier.svg` (energy against SLAV, log scale, one curve per cost); `--json`
//! prints one object instead of the table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fastmig_sim::spec::{DetectorKind, DETECTORS};
use fastmig_sim::{PolicySpec, SimOptions};
use plotters::prelude::*;
use serde::Serialize;

use super::model_spec::{self, ModelRow};
use super::tables::{write_csv, Fixed};
use super::{run_jobs, Job, Row, SimulateArgs};
use crate::charts::plot_err;
use crate::usage;

/// The safety parameters swept for `d`, from aggressive (consolidates hardest) to safe,
/// CloudSim's default among them.
pub fn param_grid(d: DetectorKind) -> &'static [f64] {
    match d {
        // Overloaded above the threshold: a higher one consolidates harder.
        DetectorKind::Thr => &[1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
        // Overloaded above 1 - s × spread: a smaller s consolidates harder.
        DetectorKind::Iqr => &[0.0, 0.5, 1.0, 1.5, 2.0, 3.0],
        DetectorKind::Mad => &[0.0, 1.0, 2.0, 2.5, 3.0, 4.0],
        // Overloaded when s × predicted ≥ 1: a smaller s consolidates harder.
        DetectorKind::Lr | DetectorKind::Lrr => &[0.9, 1.0, 1.1, 1.2, 1.3, 1.5],
    }
}

/// One (detector, parameter) run of one cost, averaged over the days.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Policy name (`lr-mmt`).
    pub policy: String,
    /// Safety parameter.
    pub param: f64,
    /// Energy, kWh.
    pub energy_kwh: f64,
    /// SLAV.
    pub slav: f64,
    /// Migrations.
    pub migrations: f64,
}

/// The Pareto frontier of `points`: sorted by SLAV, each with less energy than every point
/// before it (so energy falls as SLAV grows).
pub fn pareto(points: &[Point]) -> Vec<Point> {
    let mut sorted: Vec<&Point> = points
        .iter()
        .filter(|p| p.slav.is_finite() && p.energy_kwh.is_finite())
        .collect();
    sorted.sort_by(|a, b| {
        a.slav
            .total_cmp(&b.slav)
            .then(a.energy_kwh.total_cmp(&b.energy_kwh))
    });
    let mut out: Vec<Point> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|l| p.energy_kwh < l.energy_kwh) {
            out.push(p.clone());
        }
    }
    out
}

/// The least energy the frontier reaches at a SLAV of at most `slav`: `None` below its
/// lowest SLAV; its last (least-energy) point beyond its highest; between two points,
/// interpolated linearly in log SLAV (linearly in SLAV when the lower one is 0) — an
/// estimate of a parameter between two grid values.
pub fn energy_at(frontier: &[Point], slav: f64) -> Option<f64> {
    let first = frontier.first()?;
    if slav < first.slav {
        return None;
    }
    let i = frontier.iter().rposition(|p| p.slav <= slav)?;
    let Some(next) = frontier.get(i + 1) else {
        return Some(frontier[i].energy_kwh);
    };
    let a = &frontier[i];
    let f = if a.slav > 0.0 {
        (slav / a.slav).ln() / (next.slav / a.slav).ln()
    } else {
        slav / next.slav
    };
    Some(a.energy_kwh + f * (next.energy_kwh - a.energy_kwh))
}

/// One migration cost's curve.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// How the table names it (`cloudsim`, `model classic 10gbit`).
    pub migration: String,
    /// Every run, averaged over days.
    pub points: Vec<Point>,
    /// Its Pareto frontier.
    pub frontier: Vec<Point>,
    /// Energy on the frontier at the target SLAV, kWh (`None`: the curve never gets that low).
    pub energy_at_target_kwh: Option<f64>,
    /// Energy saved against the reference run, fraction.
    pub saved_vs_reference: Option<f64>,
    /// Energy saved against CloudSim's curve at the same SLAV, fraction.
    pub saved_vs_cloudsim_curve: Option<f64>,
}

/// The reference run that sets the target SLAV.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Its policy (`--policy`, `--param`).
    pub policy: String,
    /// Its safety parameter.
    pub param: Option<f64>,
    /// Its energy with CloudSim's formula, kWh.
    pub energy_kwh: f64,
    /// Its SLAV with CloudSim's formula: the target.
    pub slav: f64,
}

/// `--frontier`'s whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Frontier {
    /// Days simulated.
    pub days: Vec<String>,
    /// The target.
    pub target: Target,
    /// One curve per migration cost, CloudSim's first.
    pub curves: Vec<Curve>,
}

/// Runs `--frontier`.
pub(super) fn run(
    args: &SimulateArgs,
    days: &[PathBuf],
    opts: &SimOptions,
    detectors: &[DetectorKind],
) -> Result<()> {
    let reference = super::parse_policy(&args.policy, args.param)?;
    let PolicySpec::Dynamic { selector, .. } = reference else {
        return Err(usage!(
            "--frontier needs a dynamic --policy (DETECTOR-SELECTOR), not {}",
            reference.name()
        ));
    };
    let mut costs: Vec<(String, Option<ModelRow>)> = vec![("cloudsim".into(), None)];
    if let Some(p) = &args.model {
        for m in model_spec::sweep_rows(p)? {
            costs.push((m.label.clone(), Some(m)));
        }
    }
    let mut policies = Vec::new();
    for &d in detectors {
        for &param in param_grid(d) {
            policies.push(PolicySpec::Dynamic {
                detector: d,
                selector,
                param,
            });
        }
    }
    // The reference run first, then every (cost, policy, day).
    let mut jobs: Vec<Job> = days
        .iter()
        .map(|d| Job {
            day: d.clone(),
            policy: reference,
            gbit: None,
            model: None,
        })
        .collect();
    for (_, model) in &costs {
        for &policy in &policies {
            for d in days {
                jobs.push(Job {
                    day: d.clone(),
                    policy,
                    gbit: None,
                    model: model.clone(),
                });
            }
        }
    }
    let rows = run_jobs(&jobs, args, opts, None)?;
    let n = days.len();
    let (reference_rows, rest) = rows.split_at(n);
    let mean = |rs: &[Row], f: &dyn Fn(&Row) -> f64| rs.iter().map(f).sum::<f64>() / n as f64;
    let target = Target {
        policy: reference.name(),
        param: reference_rows.first().and_then(|r| r.result.param),
        energy_kwh: mean(reference_rows, &|r| r.result.energy_kwh),
        slav: mean(reference_rows, &|r| r.result.slav),
    };
    let mut curves = Vec::new();
    for (c, (label, _)) in costs.iter().enumerate() {
        let points: Vec<Point> = policies
            .iter()
            .enumerate()
            .map(|(k, policy)| {
                let start = (c * policies.len() + k) * n;
                let rs = &rest[start..start + n];
                Point {
                    policy: policy.name(),
                    param: rs.first().and_then(|r| r.result.param).unwrap_or(f64::NAN),
                    energy_kwh: mean(rs, &|r| r.result.energy_kwh),
                    slav: mean(rs, &|r| r.result.slav),
                    migrations: mean(rs, &|r| r.result.migrations as f64),
                }
            })
            .collect();
        let frontier = pareto(&points);
        let at = energy_at(&frontier, target.slav);
        curves.push(Curve {
            migration: label.clone(),
            points,
            frontier,
            energy_at_target_kwh: at,
            saved_vs_reference: at.map(|e| 1.0 - e / target.energy_kwh),
            saved_vs_cloudsim_curve: None,
        });
    }
    let cloudsim_at = curves.first().and_then(|c| c.energy_at_target_kwh);
    for c in &mut curves {
        c.saved_vs_cloudsim_curve = match (c.energy_at_target_kwh, cloudsim_at) {
            (Some(e), Some(base)) => Some(1.0 - e / base),
            _ => None,
        };
    }
    let result = Frontier {
        days: days.iter().map(|d| super::day_name(d)).collect(),
        target,
        curves,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_points(&args.out.join("frontier.csv"), &result)?;
    let md = summary(&result);
    std::fs::write(args.out.join("frontier.md"), &md).context("writing frontier.md")?;
    chart(&args.out.join("frontier.svg"), &result)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print!("{md}");
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[derive(Serialize)]
struct CsvRow<'a> {
    migration: &'a str,
    policy: &'a str,
    param: Fixed<3>,
    energy_kwh: Fixed<4>,
    slav: Fixed<10>,
    migrations: Fixed<1>,
    on_frontier: bool,
}

fn write_points(path: &Path, f: &Frontier) -> Result<()> {
    write_csv(
        path,
        f.curves.iter().flat_map(|c| {
            c.points.iter().map(move |p| CsvRow {
                migration: &c.migration,
                policy: &p.policy,
                param: Fixed(p.param),
                energy_kwh: Fixed(p.energy_kwh),
                slav: Fixed(p.slav),
                migrations: Fixed(p.migrations),
                on_frontier: c.frontier.contains(p),
            })
        }),
    )
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} %", x * 100.0))
        .unwrap_or_else(|| "not reached".into())
}

/// The summary table (markdown).
fn summary(f: &Frontier) -> String {
    let t = &f.target;
    let mut md = format!(
        "Target: the SLAV of {}{} with CloudSim's migration formula, {:.8} (energy {:.2} kWh), days {}.\n\n",
        t.policy,
        t.param.map(|p| format!(" {p}")).unwrap_or_default(),
        t.slav,
        t.energy_kwh,
        f.days.join(", ")
    );
    md.push_str("| migration cost | runs | frontier points | energy at target SLAV kWh | saved vs reference run | saved vs CloudSim's curve | frontier point at or below the target |\n|---|---:|---:|---:|---:|---:|---|\n");
    for c in &f.curves {
        let best = c
            .frontier
            .iter()
            .rev()
            .find(|p| p.slav <= t.slav)
            .map(|p| format!("{} {}", p.policy, p.param))
            .unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            c.migration,
            c.points.len(),
            c.frontier.len(),
            c.energy_at_target_kwh
                .map(|e| format!("{e:.2}"))
                .unwrap_or_else(|| "not reached".into()),
            pct(c.saved_vs_reference),
            pct(c.saved_vs_cloudsim_curve),
            best
        ));
    }
    md
}

/// One colour per curve, CloudSim's blue first.
const COLOURS: [RGBColor; 8] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    RGBColor(255, 140, 0),
    RGBColor(128, 0, 128),
    RGBColor(110, 110, 110),
];

/// Energy against log10 SLAV: each cost's points (small) and its frontier (a line); the
/// target SLAV as a vertical line. Points with a SLAV of 0 cannot be drawn on a log axis.
fn chart(path: &Path, f: &Frontier) -> Result<()> {
    let drawn = |p: &Point| p.slav > 0.0;
    let all = || {
        f.curves
            .iter()
            .flat_map(|c| c.points.iter())
            .filter(|p| drawn(p))
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in all() {
        x0 = x0.min(p.slav.log10());
        x1 = x1.max(p.slav.log10());
        y0 = y0.min(p.energy_kwh);
        y1 = y1.max(p.energy_kwh);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (-8.0, -2.0, 0.0, 1.0);
    }
    let (xpad, ypad) = (((x1 - x0) * 0.05).max(0.1), ((y1 - y0) * 0.05).max(0.1));
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "energy against SLAV, one curve per migration cost ({})",
                f.days.join(", ")
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("SLAV (log scale)")
        .y_desc("energy (kWh)")
        .x_label_formatter(&|x| format!("{:.0e}", 10f64.powf(*x)))
        .draw()
        .map_err(plot_err)?;
    if f.target.slav > 0.0 {
        let x = f.target.slav.log10();
        chart
            .draw_series(LineSeries::new(
                [(x, y0 - ypad), (x, y1 + ypad)],
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!(
                "target SLAV ({} with CloudSim's formula)",
                f.target.policy
            ))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for (i, c) in f.curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<(f64, f64)> = c
            .frontier
            .iter()
            .filter(|p| drawn(p))
            .map(|p| (p.slav.log10(), p.energy_kwh))
            .collect();
        chart
            .draw_series(LineSeries::new(line, colour.stroke_width(2)))
            .map_err(plot_err)?
            .label(c.migration.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(
                c.points
                    .iter()
                    .filter(|p| drawn(p))
                    .map(|p| Circle::new((p.slav.log10(), p.energy_kwh), 3, colour.mix(0.5))),
            )
            .map_err(plot_err)?;
    }
    crate::charts::draw_legend(&mut chart, Some(SeriesLabelPosition::UpperRight))?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// `--frontier-detectors`: detector names, comma-separated.
pub(super) fn parse_detectors(s: &str) -> Result<Vec<DetectorKind>> {
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            DETECTORS
                .into_iter()
                .find(|d| d.name() == n)
                .ok_or_else(|| {
                    usage!("--frontier-detectors: {n:?} is not thr, iqr, mad, lr or lrr")
                })
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(usage!("--frontier-detectors: no detector given"))
            } else {
                Ok(v)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(slav: f64, energy_kwh: f64) -> Point {
        Point {
            policy: "lr-mmt".into(),
            param: 1.0,
            energy_kwh,
            slav,
            migrations: 0.0,
        }
    }

    #[test]
    fn the_frontier_keeps_only_points_no_other_beats_on_both() {
        // (1e-5, 170) and (1e-4, 160) and (1e-3, 150) are on it; (2e-4, 165) is beaten by
        // (1e-4, 160), and (1e-3, 155) by (1e-3, 150).
        let f = pareto(&[
            pt(1e-3, 155.0),
            pt(1e-4, 160.0),
            pt(2e-4, 165.0),
            pt(1e-5, 170.0),
            pt(1e-3, 150.0),
        ]);
        let got: Vec<(f64, f64)> = f.iter().map(|p| (p.slav, p.energy_kwh)).collect();
        assert_eq!(got, [(1e-5, 170.0), (1e-4, 160.0), (1e-3, 150.0)]);
    }

    #[test]
    fn energy_at_a_slav_interpolates_in_log_slav() {
        let f = pareto(&[pt(1e-5, 170.0), pt(1e-3, 150.0)]);
        // Below the curve: not reachable.
        assert_eq!(energy_at(&f, 1e-6), None);
        // On a point, and past the last one (its least energy).
        assert_eq!(energy_at(&f, 1e-5), Some(170.0));
        assert_eq!(energy_at(&f, 1e-2), Some(150.0));
        // 1e-4 is halfway between 1e-5 and 1e-3 in log SLAV: 160.
        let e = energy_at(&f, 1e-4).expect("reached");
        assert!((e - 160.0).abs() < 1e-9, "{e}");
        // From a SLAV of 0, linearly: a quarter of the way to 4e-4 at 1e-4: 170 - 5 = 165.
        let g = pareto(&[pt(0.0, 170.0), pt(4e-4, 150.0)]);
        assert!((energy_at(&g, 1e-4).expect("reached") - 165.0).abs() < 1e-9);
        assert_eq!(energy_at(&[], 1.0), None);
    }

    #[test]
    fn detectors_parse_and_every_grid_holds_cloudsims_default() {
        assert_eq!(
            parse_detectors("lr, thr").expect("parse"),
            [DetectorKind::Lr, DetectorKind::Thr]
        );
        assert!(parse_detectors("lr,xyz").is_err());
        assert!(parse_detectors(",").is_err());
        for d in DETECTORS {
            assert!(param_grid(d).contains(&d.default_param()), "{d:?}");
        }
    }
}
