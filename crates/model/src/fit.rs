//! Fitting a [`Model`] to measured runs, and measuring its accuracy.
//!
//! Each parameter is fitted (least squares, or a median where noted) on the part of the measurements it explains,
//! so that the fit stays linear and every step can be checked on its own:
//!
//! | parameter | from |
//! |---|---|
//! | `header_bytes_per_page`, `zero_page_bytes` | bytes − 4096 × pages = h × pages + z × zero pages |
//! | `cpu_rate_bytes_s`, `guest_write_slowdown` | Theil–Sen line over runs with neither link nor cap of the full pass's (s − c) / bytes against the guest's write rate D: 1 / rate = (1 + k D) / r0 |
//! | `link_efficiency` | median over link-bound runs of the full pass's bytes / link / (s − c) |
//! | `round_s` (c) | median over later rounds of s − bytes / rate (the three iterated) |
//! | `setup_s`, `setup_s_per_byte`, per-round sync (added to `round_s`) | total − downtime − Σ round s = setup + per-byte × memory + sync × pre-copy rounds |
//! | `downtime_fixed_s` | median of downtime − stop-and-copy round ms |
//!
//! Medians where one noisy run (a neighbour on a shared machine) would pull a mean.
//! | CPU | src (dst) CPU s = fixed + per-byte × bytes |
//! | `guest_rate_factor` | median of D′ / D, D′ solving distinct_pages(D′, full pass) = first dirty set |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dirty::distinct_pages;
use crate::error::ModelError;
use crate::file::{Model, TransportParams};
use crate::predict::{cpu_rate, predict, Outcome};
use crate::scenario::{MigrationScenario, Transport, PAGE_SIZE};

/// What a real migration measured (the fields of the engine's summary that the model
/// predicts, plus per-round figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// How it ended.
    pub outcome: Outcome,
    /// Total, ms (to the failure when it failed).
    pub total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Setup, ms.
    pub setup_ms: f64,
    /// Page bytes on the wire.
    pub bytes: u64,
    /// Pages sent.
    pub pages: u64,
    /// Zero pages sent as flags.
    pub zero_pages: u64,
    /// Rounds including stop-and-copy.
    pub rounds: u32,
    /// Source CPU, s.
    pub src_cpu_s: f64,
    /// Destination CPU, s.
    pub dst_cpu_s: f64,
    /// Wall time of each round, ms (the last is stop-and-copy when it completed).
    pub round_ms: Vec<f64>,
    /// Bytes of each round.
    pub round_bytes: Vec<u64>,
}

/// One measured run: what was migrated and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// The inputs.
    pub scenario: MigrationScenario,
    /// The measurement.
    pub measured: Measured,
}

impl Observation {
    fn completed(&self) -> bool {
        self.measured.outcome != Outcome::NotConverged
    }

    /// Pre-copy rounds as (bytes, seconds): all but the stop-and-copy round.
    fn precopy_rounds(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        let m = &self.measured;
        let n = if self.completed() {
            m.round_ms.len().saturating_sub(1)
        } else {
            m.round_ms.len()
        };
        m.round_bytes
            .iter()
            .zip(&m.round_ms)
            .take(n)
            .map(|(b, ms)| (*b as f64, ms / 1e3))
    }
}

/// Prediction errors over a set of runs of one transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Runs compared.
    pub runs: usize,
    /// Runs that completed both measured and predicted (time, bytes and downtime compare
    /// on these).
    pub compared: usize,
    /// Median relative error of total time.
    pub total_median: f64,
    /// 90th percentile relative error of total time.
    pub total_p90: f64,
    /// Median relative error of bytes.
    pub bytes_median: f64,
    /// 90th percentile relative error of bytes.
    pub bytes_p90: f64,
    /// Median absolute downtime error, ms.
    pub downtime_median_ms: f64,
    /// Fraction of runs whose downtime is within 25 % or 5 ms, whichever is larger.
    pub downtime_ok: f64,
    /// Runs whose convergence was predicted right.
    pub convergence_right: usize,
}

/// A fitted model and its error on the runs it was fitted to.
#[derive(Debug, Clone)]
pub struct FitReport {
    /// The model.
    pub model: Model,
    /// Its accuracy on the fitting runs, per transport.
    pub errors: BTreeMap<Transport, Accuracy>,
}

/// Least squares `y = a + b x`; `None` when the xs do not vary.
fn line(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= 1e-12 * (mx * mx * n).max(1e-300) {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// Least squares `y = c0 x0 + c1 x1 + c2 x2` (rows `[x0, x1, x2, y]`), by the normal
/// equations and Cramer's rule; `None` when they are singular.
fn lstsq3(rows: &[[f64; 4]]) -> Option<[f64; 3]> {
    let mut a = [[0.0f64; 3]; 3];
    let mut b = [0.0f64; 3];
    for r in rows {
        for i in 0..3 {
            for j in 0..3 {
                a[i][j] += r[i] * r[j];
            }
            b[i] += r[i] * r[3];
        }
    }
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&a);
    let scale = a[0][0] * a[1][1] * a[2][2];
    if d.is_nan() || d.abs() <= 1e-9 * scale.abs() {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut m = a;
        for i in 0..3 {
            m[i][k] = b[i];
        }
        *o = det(&m) / d;
    }
    Some(out)
}

/// Least squares `y = b x` through the origin.
fn slope(pts: &[(f64, f64)]) -> Option<f64> {
    let sxx: f64 = pts.iter().map(|(x, _)| x * x).sum();
    (sxx > 0.0).then(|| pts.iter().map(|(x, y)| x * y).sum::<f64>() / sxx)
}

/// `y = a + b x` with both coefficients kept non-negative (a negative intercept or slope is
/// noise: fall back to the one-parameter fit).
fn line_nonneg(pts: &[(f64, f64)]) -> (f64, f64) {
    match line(pts) {
        Some((a, b)) if a >= 0.0 && b >= 0.0 => (a, b),
        Some((a, _)) if a < 0.0 => (0.0, slope(pts).unwrap_or(0.0).max(0.0)),
        _ => (mean(pts.iter().map(|p| p.1)).max(0.0), 0.0),
    }
}

/// The page rate `p` gives scenario `s`: the smallest of CPU, link and cap.
fn rate_of(s: &MigrationScenario, p: &TransportParams) -> f64 {
    let mut r = cpu_rate(s, p);
    if let (Some(l), true) = (s.link_bytes_s, s.transport.uses_link()) {
        r = r.min(l * p.link_efficiency);
    }
    if let Some(cap) = s.bandwidth_cap_bytes_s {
        r = r.min(cap);
    }
    r
}

/// Theil–Sen line `y = a + b x`: `b` the median of the slopes of all pairs with different
/// xs, `a` the median of `y − b x`. A few runs slowed by a neighbour on a shared machine pull
/// a least-squares line; they hardly move these medians. `None` when the xs do not vary.
fn theil_sen(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut slopes = Vec::new();
    for (i, (x1, y1)) in pts.iter().enumerate() {
        for (x2, y2) in &pts[i + 1..] {
            if (x2 - x1).abs() > 1e-9 * x1.abs().max(x2.abs()).max(1.0) {
                slopes.push((y2 - y1) / (x2 - x1));
            }
        }
    }
    let b = median(slopes)?;
    let a = median(pts.iter().map(|(x, y)| y - b * x).collect())?;
    Some((a, b))
}

/// Median (mean of the middle two for an even count); `None` for no values.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

fn fit_transport(t: Transport, rows: &[&Observation]) -> Result<TransportParams, ModelError> {
    let err = |reason: &str| ModelError::Fit {
        transport: t,
        reason: reason.into(),
    };
    let done: Vec<&&Observation> = rows.iter().filter(|o| o.completed()).collect();
    if done.is_empty() {
        return Err(err("no completed run"));
    }
    let mut p = TransportParams::ideal(1.0);

    // Wire bytes per page and per zero page: y = h x1 + z x2 (2×2 normal equations).
    let (mut s11, mut s12, mut s22, mut s1y, mut s2y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for o in &done {
        let m = &o.measured;
        let (x1, x2) = (m.pages as f64, m.zero_pages as f64);
        let y = m.bytes as f64 - PAGE_SIZE as f64 * x1;
        s11 += x1 * x1;
        s12 += x1 * x2;
        s22 += x2 * x2;
        s1y += x1 * y;
        s2y += x2 * y;
    }
    let det = s11 * s22 - s12 * s12;
    // Zero pages must be a real share of the pages sent for their cost to be measurable.
    if det > 1e-9 * s11 * s22 && s22 > 1e-4 * s11 {
        p.header_bytes_per_page = ((s1y * s22 - s2y * s12) / det).max(0.0);
        p.zero_page_bytes = ((s2y * s11 - s1y * s12) / det).max(0.0);
    } else if s11 > 0.0 {
        p.header_bytes_per_page = (s1y / s11).max(0.0);
        // Unmeasured: a zero page costs about a page header.
        p.zero_page_bytes = p.header_bytes_per_page;
    }

    // Time between the end of a round and the next sync (outside the measured round time).
    let mut sync = 0.0;
    if t == Transport::Handover {
        // No pages move: everything is fixed cost.
        p.cpu_rate_bytes_s = 1.0;
        p.downtime_fixed_s = mean(done.iter().map(|o| o.measured.downtime_ms / 1e3));
        p.setup_s = mean(
            done.iter()
                .map(|o| (o.measured.total_ms - o.measured.downtime_ms) / 1e3),
        )
        .max(0.0);
    } else {
        // CPU-bound rate, link efficiency and per-round cost, in turn, three times over:
        // - the rate and how the guest's writing slows it: a Theil–Sen line, over runs
        //   nothing else limits, of the full pass's (time − c) / bytes against the guest's
        //   write rate (the full passes carry most bytes; on a shared machine their rates
        //   scatter, and medians resist a run slowed by a neighbour);
        // - the link efficiency: the same over link-bound runs, against the link;
        // - c: median over the later (small) rounds of time − bytes / rate, which a
        //   least-squares intercept under the full passes' scatter does not give.
        let free = |o: &&&Observation| {
            o.scenario.bandwidth_cap_bytes_s.is_none()
                && (o.scenario.link_bytes_s.is_none() || !t.uses_link())
        };
        let mut c = 0.0;
        for _ in 0..3 {
            // Seconds per byte of each unlimited full pass against the guest's write rate:
            // 1 / rate = (1 + k D) / r0 is a line in D.
            let passes: Vec<(f64, f64)> = rows
                .iter()
                .filter(free)
                .filter_map(|o| {
                    let (b, s) = o.precopy_rounds().next()?;
                    (b > 0.0 && s > c).then(|| {
                        let inv = (s - c) * o.scenario.cpu_share / b;
                        (o.scenario.dirty_rate_pps, inv)
                    })
                })
                .collect();
            match theil_sen(&passes) {
                Some((a, slope)) if a > 0.0 => {
                    p.cpu_rate_bytes_s = 1.0 / a;
                    p.guest_write_slowdown = (slope / a).max(0.0);
                }
                _ => match median(passes.iter().map(|(_, inv)| *inv).collect()) {
                    Some(inv) if inv > 0.0 => {
                        p.cpu_rate_bytes_s = 1.0 / inv;
                        p.guest_write_slowdown = 0.0;
                    }
                    _ => {
                        // No unlimited runs: the fastest round seen bounds the CPU rate below.
                        let best = rows
                            .iter()
                            .flat_map(|o| o.precopy_rounds())
                            .filter(|(b, s)| *b > 0.0 && *s > 0.0)
                            .map(|(b, s)| b / s)
                            .fold(0.0, f64::max);
                        if best <= 0.0 {
                            return Err(err("no pre-copy round with bytes and time"));
                        }
                        p.cpu_rate_bytes_s = best;
                    }
                },
            }
            if t.uses_link() {
                let linked: Vec<f64> = rows
                    .iter()
                    .filter_map(|o| {
                        let l = o.scenario.link_bytes_s?;
                        let cap = o.scenario.bandwidth_cap_bytes_s.unwrap_or(f64::INFINITY);
                        let bound = l < cpu_rate(&o.scenario, &p) && l < cap;
                        let (b, s) = o.precopy_rounds().next()?;
                        (bound && b > 0.0 && s > c).then(|| b / l / (s - c))
                    })
                    .collect();
                p.link_efficiency = median(linked).map(|e| e.clamp(0.05, 1.0)).unwrap_or(1.0);
            }
            let later: Vec<f64> = rows
                .iter()
                .flat_map(|o| {
                    let r = rate_of(&o.scenario, &p);
                    o.precopy_rounds()
                        .skip(1)
                        .filter(|(b, _)| *b > 0.0)
                        .map(move |(b, s)| s - b / r)
                })
                .collect();
            c = median(later).unwrap_or(0.0).max(0.0);
        }
        p.round_s = c;
        // Setup and the per-round sync: what total time the rounds and the downtime leave.
        let rest: Vec<(f64, f64)> = done
            .iter()
            .map(|o| {
                let m = &o.measured;
                let pre: f64 = o.precopy_rounds().map(|(_, s)| s).sum();
                let n = m.round_ms.len().saturating_sub(1) as f64;
                (n, (m.total_ms - m.downtime_ms) / 1e3 - pre)
            })
            .collect();
        let (setup, s) = line_nonneg(&rest);
        p.setup_s = setup;
        sync = s;
        // Setup may grow with memory (shm maps and pre-faults the shared region): fit
        // rest = a + b × GiB + sync × rounds, or a + b × GiB, whichever leaves the smaller
        // squared error with non-negative terms.
        const GIB: f64 = (1u64 << 30) as f64;
        let rows3: Vec<[f64; 4]> = done
            .iter()
            .zip(&rest)
            .map(|(o, (n, r))| [1.0, o.scenario.mem_bytes as f64 / GIB, *n, *r])
            .collect();
        let sse = |f: &dyn Fn(&[f64; 4]) -> f64| -> f64 {
            rows3.iter().map(|r| (r[3] - f(r)).powi(2)).sum()
        };
        let mut best = sse(&|r| setup + s * r[2]);
        if let Some([a, b, c3]) = lstsq3(&rows3) {
            let e = sse(&|r| a + b * r[1] + c3 * r[2]);
            if a >= 0.0 && b >= 0.0 && c3 >= 0.0 && e < best {
                (p.setup_s, p.setup_s_per_byte, sync, best) = (a, b / GIB, c3, e);
            }
        }
        // Or memory alone (no per-round sync term) when that explains more.
        let by_mem: Vec<(f64, f64)> = rows3.iter().map(|r| (r[1], r[3])).collect();
        let (a, b) = line_nonneg(&by_mem);
        if sse(&|r| a + b * r[1]) < best {
            (p.setup_s, p.setup_s_per_byte, sync) = (a, b / GIB, 0.0);
        }
        p.round_s += sync;
        p.downtime_fixed_s = median(
            done.iter()
                .map(|o| {
                    let m = &o.measured;
                    let last = m.round_ms.last().copied().unwrap_or(0.0);
                    (m.downtime_ms - last) / 1e3
                })
                .collect(),
        )
        .unwrap_or(0.0)
        .max(0.0);
    }
    // The guest's write rate during the migration: the first dirty set (round 2, or the
    // stop-and-copy of a two-round run) is distinct_pages(D', full pass time); solve for D'
    // by bisection (distinct pages grow with D) and keep the median of D' / D. A set that
    // saturates the working set says nothing about D' and is left out.
    let page_wire = PAGE_SIZE as f64 + p.header_bytes_per_page;
    let ratios: Vec<f64> = done
        .iter()
        .filter(|o| o.scenario.dirty_rate_pps > 0.0)
        .filter_map(|o| {
            let m = &o.measured;
            let t1 = m.round_ms.first()? / 1e3 + sync;
            let seen = *m.round_bytes.get(1)? as f64 / page_wire;
            let w = o.scenario.wss_pages();
            if seen <= 0.0 || seen >= 0.95 * w || t1 <= 0.0 {
                return None;
            }
            let d = o.scenario.dirty_rate_pps;
            let at = |rate: f64| {
                let mut s = o.scenario.clone();
                s.dirty_rate_pps = rate;
                distinct_pages(&s, t1)
            };
            let (mut lo, mut hi) = (0.0, 4.0 * d);
            if at(hi) < seen {
                return None;
            }
            for _ in 0..60 {
                let mid = (lo + hi) / 2.0;
                if at(mid) < seen {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            Some(hi / d)
        })
        .collect();
    p.guest_rate_factor = median(ratios).map(|r| r.clamp(0.05, 2.0)).unwrap_or(1.0);
    let src: Vec<(f64, f64)> = done
        .iter()
        .map(|o| (o.measured.bytes as f64, o.measured.src_cpu_s))
        .collect();
    let dst: Vec<(f64, f64)> = done
        .iter()
        .map(|o| (o.measured.bytes as f64, o.measured.dst_cpu_s))
        .collect();
    (p.src_cpu_fixed_s, p.src_cpu_s_per_byte) = line_nonneg(&src);
    (p.dst_cpu_fixed_s, p.dst_cpu_s_per_byte) = line_nonneg(&dst);
    Ok(p)
}

/// Fits every transport that has runs, and reports each one's error on its own runs.
pub fn fit(rows: &[Observation]) -> Result<FitReport, ModelError> {
    let mut model = Model::default();
    for t in Transport::ALL {
        let mine: Vec<&Observation> = rows.iter().filter(|o| o.scenario.transport == t).collect();
        if !mine.is_empty() {
            model.transports.insert(t, fit_transport(t, &mine)?);
        }
    }
    let errors = evaluate(&model, rows)?;
    Ok(FitReport { model, errors })
}

fn rel(pred: f64, meas: f64) -> f64 {
    (pred - meas).abs() / meas.abs().max(1e-9)
}

/// Nearest-rank percentile `q` (0..=1) of `v` (sorted here); 0 for none.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The model's errors on `rows`, per transport.
pub fn evaluate(
    model: &Model,
    rows: &[Observation],
) -> Result<BTreeMap<Transport, Accuracy>, ModelError> {
    let mut out = BTreeMap::new();
    for t in Transport::ALL {
        let mine: Vec<&Observation> = rows.iter().filter(|o| o.scenario.transport == t).collect();
        if mine.is_empty() {
            continue;
        }
        let (mut tot, mut byt, mut down) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ok, mut right) = (0usize, 0usize);
        for o in &mine {
            let p = predict(model, &o.scenario)?;
            let m = &o.measured;
            if p.converges == (m.outcome == Outcome::Completed) {
                right += 1;
            }
            if p.outcome == Outcome::NotConverged || m.outcome == Outcome::NotConverged {
                continue;
            }
            tot.push(rel(p.total_ms, m.total_ms));
            if m.bytes > 0 {
                byt.push(rel(p.bytes as f64, m.bytes as f64));
            }
            let d = (p.downtime_ms - m.downtime_ms).abs();
            if d <= (0.25 * m.downtime_ms).max(5.0) {
                ok += 1;
            }
            down.push(d);
        }
        let compared = tot.len();
        out.insert(
            t,
            Accuracy {
                runs: mine.len(),
                compared,
                total_median: percentile(&mut tot.clone(), 0.5),
                total_p90: percentile(&mut tot, 0.9),
                bytes_median: percentile(&mut byt.clone(), 0.5),
                bytes_p90: percentile(&mut byt, 0.9),
                downtime_median_ms: percentile(&mut down, 0.5),
                downtime_ok: if compared == 0 {
                    1.0
                } else {
                    ok as f64 / compared as f64
                },
                convergence_right: right,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Pattern;

    /// Runs "measured" from a known model: fitting them must give its parameters back.
    fn synthetic(truth: &Model) -> Vec<Observation> {
        let mut rows = Vec::new();
        for (i, (mem, rate, link)) in [
            (64u64 << 20, 0.0, None),
            (128 << 20, 2000.0, None),
            (256 << 20, 5000.0, None),
            (512 << 20, 1000.0, None),
            (256 << 20, 2000.0, Some(64.0 * 1048576.0)),
            (128 << 20, 500.0, Some(32.0 * 1048576.0)),
        ]
        .into_iter()
        .enumerate()
        {
            let mut s = MigrationScenario::new(mem, Transport::Classic);
            s.dirty_rate_pps = rate;
            s.wss_bytes = 32 << 20;
            s.pattern = if i % 2 == 0 {
                Pattern::Random
            } else {
                Pattern::Seq
            };
            s.link_bytes_s = link;
            s.downtime_limit_s = 0.03;
            let p = predict(truth, &s).expect("predict");
            let tp = truth.params(Transport::Classic).expect("params");
            // Per-round wall times as the engine measures them (send + ack, no sync).
            let page = PAGE_SIZE as f64 + tp.header_bytes_per_page;
            let r = p.rate_bytes_s;
            let n = p.round_pages.len();
            let round_ms: Vec<f64> = p
                .round_pages
                .iter()
                .enumerate()
                .map(|(k, pg)| {
                    let send = *pg as f64 * page / r;
                    if k + 1 < n {
                        (send + tp.round_s - 0.002) * 1e3
                    } else {
                        send * 1e3
                    }
                })
                .collect();
            let round_bytes = p
                .round_pages
                .iter()
                .map(|pg| (*pg as f64 * page) as u64)
                .collect();
            rows.push(Observation {
                scenario: s,
                measured: Measured {
                    outcome: p.outcome,
                    total_ms: p.total_ms,
                    downtime_ms: p.downtime_ms,
                    setup_ms: p.setup_ms,
                    bytes: p.bytes,
                    pages: p.pages,
                    zero_pages: 0,
                    rounds: p.rounds,
                    src_cpu_s: p.src_cpu_s,
                    dst_cpu_s: p.dst_cpu_s,
                    round_ms,
                    round_bytes,
                },
            });
        }
        rows
    }

    #[test]
    fn fitting_recovers_the_parameters_of_a_known_model() {
        let mut tp = TransportParams::ideal(400.0 * 1048576.0);
        tp.link_efficiency = 0.9;
        // 3 ms per round: 1 ms of it is outside the measured round time (the sync).
        tp.round_s = 0.003;
        tp.header_bytes_per_page = 16.0;
        tp.setup_s = 0.020;
        tp.downtime_fixed_s = 0.004;
        tp.src_cpu_fixed_s = 0.01;
        tp.src_cpu_s_per_byte = 2e-9;
        tp.dst_cpu_fixed_s = 0.02;
        tp.dst_cpu_s_per_byte = 1e-9;
        // The guest keeps 60 % of its write rate while migrating.
        tp.guest_rate_factor = 0.6;
        // Each 10,000 guest writes/s add 20 % to the time per byte.
        tp.guest_write_slowdown = 2e-5;
        let mut truth = Model::default();
        truth.transports.insert(Transport::Classic, tp.clone());
        let rows = synthetic(&truth);
        let r = fit(&rows).expect("fit");
        let got = r.model.params(Transport::Classic).expect("fitted");
        let near = |a: f64, b: f64| (a - b).abs() <= 0.02 * b.abs() + 1e-6;
        assert!(near(got.cpu_rate_bytes_s, tp.cpu_rate_bytes_s), "{got:?}");
        assert!(near(got.link_efficiency, 0.9), "{got:?}");
        assert!(near(got.header_bytes_per_page, 16.0), "{got:?}");
        assert!(near(got.setup_s, 0.020), "{got:?}");
        assert!(near(got.round_s, 0.003), "{got:?}");
        assert!(near(got.downtime_fixed_s, 0.004), "{got:?}");
        assert!(near(got.src_cpu_s_per_byte, 2e-9), "{got:?}");
        assert!(near(got.dst_cpu_fixed_s, 0.02), "{got:?}");
        assert!(near(got.guest_rate_factor, 0.6), "{got:?}");
        assert!(near(got.guest_write_slowdown, 2e-5), "{got:?}");
        let acc = &r.errors[&Transport::Classic];
        assert_eq!(acc.convergence_right, rows.len());
        assert!(acc.total_p90 < 0.01 && acc.bytes_p90 < 0.01, "{acc:?}");
    }

    #[test]
    fn three_term_least_squares_recovers_a_plane() {
        // y = 2 + 3 a + 0.5 b on a small grid: exact.
        let rows: Vec<[f64; 4]> = [(0.0, 1.0), (1.0, 2.0), (2.0, 2.0), (3.0, 5.0), (1.0, 7.0)]
            .iter()
            .map(|&(a, b)| [1.0, a, b, 2.0 + 3.0 * a + 0.5 * b])
            .collect();
        let [c0, c1, c2] = lstsq3(&rows).expect("solvable");
        assert!((c0 - 2.0).abs() < 1e-9 && (c1 - 3.0).abs() < 1e-9 && (c2 - 0.5).abs() < 1e-9);
        // A column that never varies apart from the constant: singular.
        let flat: Vec<[f64; 4]> = (0..4).map(|i| [1.0, 1.0, i as f64, 1.0]).collect();
        assert_eq!(lstsq3(&flat), None);
    }

    #[test]
    fn theil_sen_ignores_an_outlier_that_pulls_least_squares() {
        // y = 1 + 0.5 x at x = 0..6, except x = 6 measured at 20 (a run slowed by a
        // neighbour): the pairwise slopes' median is still 0.5 and the intercept 1.
        let mut pts: Vec<(f64, f64)> = (0..7).map(|x| (x as f64, 1.0 + 0.5 * x as f64)).collect();
        pts[6].1 = 20.0;
        let (a, b) = theil_sen(&pts).expect("xs vary");
        assert!((a - 1.0).abs() < 1e-9 && (b - 0.5).abs() < 1e-9, "{a} {b}");
        let (_, ls) = line(&pts).expect("xs vary");
        assert!(ls > 1.0, "least squares is pulled: {ls}");
        // All xs equal: no line.
        assert_eq!(theil_sen(&[(2.0, 1.0), (2.0, 3.0)]), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.9), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn no_completed_run_is_a_fit_error() {
        assert!(fit(&[]).expect("empty fit").model.transports.is_empty());
        let mut truth = Model::default();
        truth
            .transports
            .insert(Transport::Classic, TransportParams::ideal(1e8));
        let mut rows = synthetic(&truth);
        for r in &mut rows {
            r.measured.outcome = Outcome::NotConverged;
        }
        assert!(matches!(fit(&rows), Err(ModelError::Fit { .. })));
    }
}
