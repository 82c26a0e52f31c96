//! Small statistics kernels with the exact conventions of CloudSim's `MathUtil` (which relies on
//! Apache Commons Math): percentile estimation, IQR quartile indices, MAD, simple and multiple
//! least squares.

/// Median with the Commons Math `Percentile` convention (`pos = p (n + 1)`, interpolate).
/// Returns 0 for an empty slice.
pub fn median(data: &[f64]) -> f64 {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, 50.0)
}

/// Percentile `p` (0-100) of an already sorted slice, Commons Math legacy estimator.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    if n == 1 {
        return sorted[0];
    }
    let pos = p * (n as f64 + 1.0) / 100.0;
    let fpos = pos.floor();
    let d = pos - fpos;
    let ipos = fpos as usize;
    if pos < 1.0 {
        return sorted[0];
    }
    if pos >= n as f64 {
        return sorted[n - 1];
    }
    let lower = sorted[ipos - 1];
    let upper = sorted[ipos];
    lower + d * (upper - lower)
}

/// Interquartile range the way CloudSim's `MathUtil.iqr` computes it: sort, then
/// `q1 = round(0.25 (n + 1)) - 1`, `q3 = round(0.75 (n + 1)) - 1` (Java `Math.round`).
pub fn iqr(data: &[f64]) -> f64 {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let q1 = ((0.25 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    let q3 = ((0.75 * (n + 1.0) + 0.5).floor() as usize)
        .saturating_sub(1)
        .min(v.len() - 1);
    v[q3] - v[q1]
}

/// Median absolute deviation (CloudSim `MathUtil.mad`).
pub fn mad(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let m = median(data);
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Ordinary least squares `y = a + b x` with the updating formulas of Commons Math
/// `SimpleRegression`. Returns `(intercept, slope)`, or `None` with fewer than 3 points.
pub fn simple_regression(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len().min(y.len());
    if n < 3 {
        return None;
    }
    let (mut sum_x, mut sum_y, mut sum_xx, mut sum_xy) = (0.0, 0.0, 0.0, 0.0);
    let (mut xbar, mut ybar) = (0.0, 0.0);
    for i in 0..n {
        let k = i as f64;
        if i == 0 {
            xbar = x[i];
            ybar = y[i];
        } else {
            let fact1 = 1.0 + k;
            let fact2 = k / (1.0 + k);
            let dx = x[i] - xbar;
            let dy = y[i] - ybar;
            sum_xx += dx * dx * fact2;
            sum_xy += dx * dy * fact2;
            xbar += dx / fact1;
            ybar += dy / fact1;
        }
        sum_x += x[i];
        sum_y += y[i];
    }
    if sum_xx.abs() < 10.0 * f64::MIN_POSITIVE {
        return None;
    }
    let slope = sum_xy / sum_xx;
    let intercept = (sum_y - slope * sum_x) / n as f64;
    Some((intercept, slope))
}

/// Coefficient of determination R² of the least-squares fit of `y` on the columns `xs` plus an
/// intercept, computed step by step as Commons Math's `OLSMultipleLinearRegression` does
/// (Householder QR on the transposed design, back substitution, residuals `y - X b`, total sum
/// of squares by the `SecondMoment` update), so that near-ties between VMs resolve the same way.
/// Returns `None` when there are fewer observations than parameters or when a pivot is exactly
/// zero — the cases where Commons Math throws.
pub fn r_squared(xs: &[&[f64]], y: &[f64]) -> Option<f64> {
    let m = y.len();
    let p = xs.len() + 1;
    if m == 0 || p > m || xs.iter().any(|c| c.len() < m) {
        return None;
    }
    // qrt[col][row]: the transposed design matrix, intercept column first.
    let mut qrt: Vec<Vec<f64>> = Vec::with_capacity(p);
    qrt.push(vec![1.0; m]);
    for c in xs {
        qrt.push(c[..m].to_vec());
    }
    let mut r_diag = vec![0.0; p];
    for minor in 0..p.min(m) {
        let (head, tail) = qrt.split_at_mut(minor + 1);
        let q_minor = &mut head[minor];
        let mut x_norm_sqr = 0.0;
        for c in &q_minor[minor..] {
            x_norm_sqr += c * c;
        }
        let a = if q_minor[minor] > 0.0 {
            -x_norm_sqr.sqrt()
        } else {
            x_norm_sqr.sqrt()
        };
        r_diag[minor] = a;
        if a != 0.0 {
            q_minor[minor] -= a;
            for q_col in tail.iter_mut() {
                let mut alpha = 0.0;
                for row in minor..m {
                    alpha -= q_col[row] * q_minor[row];
                }
                alpha /= a * q_minor[minor];
                for row in minor..m {
                    q_col[row] -= alpha * q_minor[row];
                }
            }
        }
    }
    if r_diag.iter().any(|d| d.abs() <= 0.0) {
        return None;
    }
    // Solve R b = Q^T y.
    let mut yy = y.to_vec();
    for minor in 0..p.min(m) {
        let q_minor = &qrt[minor];
        let mut dot = 0.0;
        for row in minor..m {
            dot += yy[row] * q_minor[row];
        }
        dot /= r_diag[minor] * q_minor[minor];
        for row in minor..m {
            yy[row] += dot * q_minor[row];
        }
    }
    let mut beta = vec![0.0; p];
    for row in (0..p).rev() {
        yy[row] /= r_diag[row];
        let y_row = yy[row];
        beta[row] = y_row;
        for i in 0..row {
            yy[i] -= y_row * qrt[row][i];
        }
    }
    // Residuals y - X b, row by row.
    let mut rss = 0.0;
    for row in 0..m {
        let mut fit = 0.0;
        for (j, b) in beta.iter().enumerate() {
            let x = if j == 0 { 1.0 } else { xs[j - 1][row] };
            fit += x * b;
        }
        let r = y[row] - fit;
        rss += r * r;
    }
    // SecondMoment: m2 += (n - 1) * dev * (dev / n).
    let (mut m1, mut m2) = (0.0, 0.0);
    for (i, &v) in y.iter().enumerate() {
        let n = (i + 1) as f64;
        let dev = v - m1;
        let n_dev = dev / n;
        m1 += n_dev;
        m2 += (n - 1.0) * dev * n_dev;
    }
    Some(1.0 - rss / m2)
}

/// The R² of every leave-one-out regression of a set of series: element `i` is, bit for bit,
/// [`r_squared`] of `series[i]` on all the other series (in their order) plus an intercept,
/// each series cut to the shortest length `m`. Returns `None` when any of those regressions is
/// undefined (`m` smaller than the number of series, or an exactly zero pivot), which is when
/// at least one [`r_squared`] call would return `None`.
///
/// This is what the MC selector needs, computed several times faster than `n` calls of
/// [`r_squared`] without changing a single rounding:
///
/// - **Shared prefix.** Regression `i` has the design columns `[1, s0, .., s(i-1), s(i+1), ..]`,
///   so its first `i + 1` columns are those of the full design `[1, s0, .., s(n-1)]`.
///   Householder step `k` only reads and writes columns `>= k`, with the reflector built from
///   column `k`, so after steps `0..=i` every column of regression `i` holds exactly what the
///   full design's QR holds at that point. One "trunk" QR of the full design is therefore run
///   step by step, and regression `i` branches off it (copies its columns) after step `i` to
///   finish its own steps. That does about a third of the arithmetic of `n` separate QRs.
/// - **Independent chains side by side.** Within a step every column's reflection is its own
///   dependency chain. The columns are stored row-major (`buf[row * stride + col]`) so one
///   pass over the rows updates all of them element-wise: each column still sees exactly the
///   scalar sequence of operations (no reassociation, no fused multiply-add), but the CPU
///   overlaps the chains and the compiler vectorises across them.
/// - **`Q^T y` during the QR.** The response of regression `i` (`series[i]`) is carried as an
///   extra column of the trunk and of branch `i` and reflected with the solve's formula
///   (`dot += y q`, `dot /= r q`, `y += dot q`) at each step, exactly the operations the
///   scalar solve applies after the QR, since a step's reflector is final once it is built.
pub fn leave_one_out_r_squared(series: &[&[f64]]) -> Option<Vec<f64>> {
    let n = series.len();
    let m = series.iter().map(|s| s.len()).min()?;
    if m == 0 || n > m {
        return None;
    }
    let series: Vec<&[f64]> = series.iter().map(|s| &s[..m]).collect();
    // Trunk columns: 0 = intercept, 1 + c = series c (the design), then 1 + n + i = the
    // response of regression i, which rides along the trunk while regression i shares it.
    let ts = 2 * n + 1;
    let mut trunk = vec![0.0; m * ts];
    for (row, cells) in trunk.chunks_exact_mut(ts).enumerate() {
        cells[0] = 1.0;
        for (c, s) in series.iter().enumerate() {
            cells[1 + c] = s[row];
            cells[1 + n + c] = s[row];
        }
    }
    let mut trunk_diag = vec![0.0; n];
    // Branch i: its design positions i+1..n (series i+1..n) at 0..n-1-i, its response last.
    let mut branch = vec![0.0; m * n];
    let mut branch_diag = vec![0.0; n];
    let mut acc = vec![0.0; ts];
    let mut yy = vec![0.0; m];
    let mut beta = vec![0.0; n];
    let mut fit = vec![0.0; m];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Trunk step i: pivot = design position i. Its other columns are only needed by the
        // branches still to come (positions i+1..=n, none after the last step) and by the
        // responses of regressions i..n.
        let cols = if i + 1 < n { i + 1..n + 1 } else { 0..0 };
        let a = householder_step(&mut trunk, ts, m, i, i, cols, 1 + n + i..ts, &mut acc);
        if a == 0.0 {
            return None;
        }
        trunk_diag[i] = a;

        // Branch i: copy its columns from the trunk (all rows: the rows above the diagonal
        // are entries of R that the back substitution reads), then finish its steps.
        let bs = n - i;
        let branch = &mut branch[..m * bs];
        for (dst, src) in branch.chunks_exact_mut(bs).zip(trunk.chunks_exact(ts)) {
            dst[..bs - 1].copy_from_slice(&src[i + 2..n + 1]);
            dst[bs - 1] = src[1 + n + i];
        }
        for (minor, diag) in branch_diag.iter_mut().enumerate().skip(i + 1) {
            let piv = minor - i - 1;
            let a = householder_step(
                branch,
                bs,
                m,
                minor,
                piv,
                piv + 1..bs - 1,
                bs - 1..bs,
                &mut acc,
            );
            if a == 0.0 {
                return None;
            }
            *diag = a;
        }

        // Back substitution R b = Q^T y, as in `r_squared`. Position `pos` of regression i
        // lives in the trunk up to i and in the branch after.
        let r_entry = |pos: usize, row: usize| {
            if pos <= i {
                trunk[row * ts + pos]
            } else {
                branch[row * bs + pos - i - 1]
            }
        };
        for (row, y) in yy.iter_mut().enumerate() {
            *y = branch[row * bs + bs - 1];
        }
        for pos in (0..n).rev() {
            yy[pos] /= if pos <= i {
                trunk_diag[pos]
            } else {
                branch_diag[pos]
            };
            let y_pos = yy[pos];
            beta[pos] = y_pos;
            for (row, y) in yy[..pos].iter_mut().enumerate() {
                *y -= y_pos * r_entry(pos, row);
            }
        }

        // Residuals y - X b, accumulated over the design columns in order for every row.
        fit.fill(0.0);
        for (pos, &b) in beta.iter().enumerate() {
            if pos == 0 {
                // The intercept's regressor is 1 and `1 * b` is `b` exactly.
                for f in fit.iter_mut() {
                    *f += b;
                }
            } else {
                let col = series[if pos <= i { pos - 1 } else { pos }];
                for (f, &x) in fit.iter_mut().zip(col) {
                    *f += x * b;
                }
            }
        }
        let mut rss = 0.0;
        for (&y, &f) in series[i].iter().zip(&fit) {
            let r = y - f;
            rss += r * r;
        }
        out.push(1.0 - rss / second_moment(series[i]));
    }
    Some(out)
}

/// One Householder step of `r_squared`'s QR on a row-major buffer (`buf[row * stride + col]`,
/// `m` rows): the reflector is built from column `piv` at diagonal row `minor`, applied with
/// the QR's formula to the columns `cols` and with the solve's formula (`Q^T y`) to the
/// responses `ys`. Returns the diagonal entry of R; when it is 0 nothing is reflected.
/// `acc` (at least `stride` long) holds the per-column dot products.
#[allow(clippy::too_many_arguments)]
fn householder_step(
    buf: &mut [f64],
    stride: usize,
    m: usize,
    minor: usize,
    piv: usize,
    cols: std::ops::Range<usize>,
    ys: std::ops::Range<usize>,
    acc: &mut [f64],
) -> f64 {
    let mut x_norm_sqr = 0.0;
    for row in minor..m {
        let c = buf[row * stride + piv];
        x_norm_sqr += c * c;
    }
    let a = if buf[minor * stride + piv] > 0.0 {
        -x_norm_sqr.sqrt()
    } else {
        x_norm_sqr.sqrt()
    };
    if a == 0.0 {
        return a;
    }
    buf[minor * stride + piv] -= a;
    acc[cols.clone()].fill(0.0);
    acc[ys.clone()].fill(0.0);
    let rows = buf[minor * stride..m * stride].chunks_exact_mut(stride);
    for cells in rows {
        let q = cells[piv];
        for (alpha, &x) in acc[cols.clone()].iter_mut().zip(&cells[cols.clone()]) {
            *alpha -= x * q;
        }
        for (dot, &y) in acc[ys.clone()].iter_mut().zip(&cells[ys.clone()]) {
            *dot += y * q;
        }
    }
    let denom = a * buf[minor * stride + piv];
    for alpha in &mut acc[cols.clone()] {
        *alpha /= denom;
    }
    for dot in &mut acc[ys.clone()] {
        *dot /= denom;
    }
    let rows = buf[minor * stride..m * stride].chunks_exact_mut(stride);
    for cells in rows {
        let q = cells[piv];
        for (x, &alpha) in cells[cols.clone()].iter_mut().zip(&acc[cols.clone()]) {
            *x -= alpha * q;
        }
        for (y, &dot) in cells[ys.clone()].iter_mut().zip(&acc[ys.clone()]) {
            *y += dot * q;
        }
    }
    a
}

/// Second central moment (sum of squared deviations) by Commons Math's `SecondMoment`
/// update, `m2 += (n - 1) dev (dev / n)`.
fn second_moment(y: &[f64]) -> f64 {
    let (mut m1, mut m2) = (0.0, 0.0);
    for (i, &v) in y.iter().enumerate() {
        let n = (i + 1) as f64;
        let dev = v - m1;
        let n_dev = dev / n;
        m1 += n_dev;
        m2 += (n - 1.0) * dev * n_dev;
    }
    m2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile_follow_commons_math() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        // Even count: mean of the two middle values.
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn iqr_uses_rounded_quartile_indices() {
        // n = 12: q1 index round(3.25) - 1 = 2, q3 index round(9.75) - 1 = 9 -> 10 - 3 = 7.
        let d: Vec<f64> = (1..=12).map(f64::from).collect();
        assert_eq!(iqr(&d), 7.0);
    }

    #[test]
    fn mad_of_known_series() {
        // median 3; deviations 2,1,0,1,2,3 -> median of {0,1,1,2,2,3} = 1.5.
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 1.5);
    }

    #[test]
    fn simple_regression_recovers_a_line() {
        let x: Vec<f64> = (1..=10).map(f64::from).collect();
        let y: Vec<f64> = x.iter().map(|x| 0.5 + 0.1 * x).collect();
        let (a, b) = simple_regression(&x, &y).expect("fit");
        assert!((a - 0.5).abs() < 1e-12 && (b - 0.1).abs() < 1e-12);
    }

    #[test]
    fn r_squared_is_one_for_an_exact_linear_relation_and_none_when_singular() {
        let x1 = [1.0, 2.0, 3.0, 4.0, 6.0];
        let y: Vec<f64> = x1.iter().map(|x| 2.0 * x + 1.0).collect();
        let r2 = r_squared(&[&x1], &y).expect("fit");
        assert!((r2 - 1.0).abs() < 1e-12);
        let zero = [0.0; 5];
        assert!(r_squared(&[&zero], &y).is_none());
        // Fewer observations than parameters.
        assert!(r_squared(&[&x1[..1]], &y[..1]).is_none());
    }

    /// A history generator with the shapes that make regressions fragile: quantised values
    /// (PlanetLab samples are whole percents), exact copies and multiples of another series,
    /// near-collinear copies, constant and all-zero series.
    fn random_series(rng: &mut crate::rng::SplitMix64, others: &[Vec<f64>], m: usize) -> Vec<f64> {
        let unit =
            |rng: &mut crate::rng::SplitMix64| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        // Mostly plain series, so that most cases are defined; each fragile shape now and then.
        let kind = rng.below(40);
        let base = if others.is_empty() {
            None
        } else {
            Some(&others[rng.below(others.len() as u64) as usize])
        };
        (0..m)
            .map(|row| match (kind, base) {
                (0, _) => 0.0,
                (1, _) => 0.37,
                (2, Some(b)) => b[row],
                (3, Some(b)) => 2.0 * b[row] + 0.1,
                (4, Some(b)) => b[row] + 1e-9 * unit(rng),
                (5, Some(b)) => b[row] * (1.0 + 1e-13 * unit(rng)),
                (6..=19, _) => rng.below(101) as f64 / 100.0,
                _ => unit(rng),
            })
            .collect()
    }

    #[test]
    fn leave_one_out_matches_scalar_r_squared_bit_for_bit() {
        let mut rng = crate::rng::SplitMix64::new(0x5eed);
        let (mut defined, mut undefined) = (0, 0);
        for case in 0..3000 {
            let n = 1 + rng.below(if case % 10 == 0 { 30 } else { 12 }) as usize;
            let m = n + rng.below((31 - n) as u64) as usize;
            let mut cols: Vec<Vec<f64>> = Vec::new();
            for _ in 0..n {
                let s = random_series(&mut rng, &cols, m);
                cols.push(s);
            }
            // Some series longer than the shortest: every series is cut to the shortest.
            if n > 1 && rng.below(4) == 0 {
                let extra = rng.below(5) as usize;
                cols[0].resize(m + extra, 0.5);
            }
            let refs: Vec<&[f64]> = cols.iter().map(|c| c.as_slice()).collect();
            let scalar: Vec<Option<f64>> = (0..n)
                .map(|i| {
                    let others: Vec<&[f64]> =
                        (0..n).filter(|&j| j != i).map(|j| &refs[j][..m]).collect();
                    r_squared(&others, &refs[i][..m])
                })
                .collect();
            let batched = leave_one_out_r_squared(&refs);
            if scalar.iter().any(Option::is_none) {
                undefined += 1;
                assert!(
                    batched.is_none(),
                    "case {case}: n {n} m {m}: scalar undefined, batched {batched:?}"
                );
            } else {
                defined += 1;
                let batched = batched
                    .unwrap_or_else(|| panic!("case {case}: n {n} m {m}: batched undefined"));
                for (i, (s, b)) in scalar.iter().zip(&batched).enumerate() {
                    let s = s.unwrap_or(f64::NAN);
                    assert_eq!(
                        s.to_bits(),
                        b.to_bits(),
                        "case {case}: n {n} m {m} regression {i}: {s} vs {b}"
                    );
                }
            }
        }
        // Both outcomes must actually be exercised.
        assert!(
            defined > 1000 && undefined > 100,
            "defined {defined}, undefined {undefined}"
        );
    }
}
