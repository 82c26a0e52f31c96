//! Small statistics kernels with the exact conventions of CloudSim's `MathUtil` (which relies on
//! Apache Commons Math): percentile estimation, IQR quartile indices, MAD, simple and multiple
//! least squares.

/// Median with the Commons Math `Percentile` convention (`pos = p (n + 1)`, interpolate).
/// Returns 0 for an empty slice.
pub fn median(data: &[f64]) -> f64 {
    with_sorted(data, |v| percentile_sorted(v, 50.0))
}

/// `f64::total_cmp`'s order as an unsigned integer: sorting these keys sorts the values
/// exactly as `sort_by(f64::total_cmp)` does, with plain integer comparisons.
fn total_order_key(x: f64) -> u64 {
    let b = x.to_bits() as i64;
    ((b ^ (((b >> 63) as u64) >> 1) as i64) as u64) ^ (1 << 63)
}

/// The inverse of [`total_order_key`].
fn from_total_order_key(k: u64) -> f64 {
    let b = (k ^ (1 << 63)) as i64;
    f64::from_bits((b ^ (((b >> 63) as u64) >> 1) as i64) as u64)
}

/// Runs `f` on a copy of `data` sorted by `f64::total_cmp` (on the stack, as integer keys, for
/// the short histories the detectors use: these statistics run for every candidate host).
fn with_sorted<R>(data: &[f64], f: impl FnOnce(&[f64]) -> R) -> R {
    const STACK: usize = 64;
    let n = data.len();
    if n > STACK {
        let mut v = data.to_vec();
        v.sort_by(f64::total_cmp);
        return f(&v);
    }
    let mut keys = [0u64; STACK];
    for (k, &x) in keys.iter_mut().zip(data) {
        *k = total_order_key(x);
    }
    keys[..n].sort_unstable();
    let mut sorted = [0.0; STACK];
    for (v, &k) in sorted.iter_mut().zip(&keys[..n]) {
        *v = from_total_order_key(k);
    }
    f(&sorted[..n])
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
    if data.is_empty() {
        return 0.0;
    }
    with_sorted(data, |v| {
        let (q1, q3) = quartile_ranks(v.len());
        v[q3] - v[q1]
    })
}

/// The ranks (0-based, in sorted order) of the first and third quartile of `n > 0` values.
fn quartile_ranks(n: usize) -> (usize, usize) {
    let nf = n as f64;
    let q1 = ((0.25 * (nf + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    let q3 = ((0.75 * (nf + 1.0) + 0.5).floor() as usize)
        .saturating_sub(1)
        .min(n - 1);
    (q1, q3)
}

/// Median absolute deviation (CloudSim `MathUtil.mad`).
pub fn mad(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let m = median(data);
    if data.len() > 64 {
        let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
        return median(&dev);
    }
    let mut dev = [0.0; 64];
    for (d, x) in dev.iter_mut().zip(data) {
        *d = (m - x).abs();
    }
    median(&dev[..data.len()])
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
/// [`r_squared`] without changing a single rounding: every value goes through exactly the
/// scalar code's sequence of IEEE operations (no reassociation, no fused multiply-add), only
/// shared work is done once and independent work is done side by side.
///
/// - **Shared prefix (the trunk).** Regression `i` has the design columns
///   `[1, s0, .., s(i-1), s(i+1), ..]`, so its first `i + 1` columns are those of the full
///   design `[1, s0, .., s(n-1)]`. Householder step `k` only reads and writes columns `>= k`,
///   with the reflector built from column `k`, so after steps `0..=i` every column of
///   regression `i` holds exactly what the full design's QR holds at that point. One QR of
///   the full design (the trunk) is run step by step and regression `i` branches off it
///   (copies its columns) after step `i`. That is about a third of the arithmetic of `n`
///   separate QRs. Within a trunk step every column's reflection is its own dependency
///   chain; the trunk is row-major so one pass over the rows advances all of them.
/// - **Branches as lanes.** After branching, regression `i` takes its own steps `i+1..n`.
///   At step `k` every regression that has branched (`i < k`) has the same shape (pivot at
///   position `k`, the same rows and columns), so the branches are stored lane-wise
///   (`[row][chunk of lanes][position][lane]`) and each step is applied to all of them at
///   once, every operation element-wise per lane; the per-lane sign choice of the reflector
///   is a select.
///   The back substitution and the residuals run lane-wise the same way.
/// - **`Q^T y` during the QR.** The response of regression `i` (`series[i]`) is carried as an
///   extra column of the trunk and of its branch and reflected with the solve's formula
///   (`dot += y q`, `dot /= r q`, `y += dot q`) at each step: exactly the operations the
///   scalar solve applies after the QR, since a step's reflector is final once it is built.
pub fn leave_one_out_r_squared(series: &[&[f64]]) -> Option<Vec<f64>> {
    // The branch storage is the one large buffer (about 100 KB for 20 VMs); it is kept per
    // thread between calls instead of being allocated and zeroed each time. Nothing in it is
    // read before this call writes it (see the comments at its uses; the bit-for-bit tests run
    // many shapes one after another on one thread, so they exercise the reuse).
    thread_local! {
        static BRANCHES: std::cell::RefCell<Vec<[f64; LANES]>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    BRANCHES.with(|cell| {
        let mut buf = cell.take();
        let out = leave_one_out_with(series, &mut buf);
        cell.replace(buf);
        out
    })
}

fn leave_one_out_with(series: &[&[f64]], branches: &mut Vec<[f64; LANES]>) -> Option<Vec<f64>> {
    let n = series.len();
    let m = series.iter().map(|s| s.len()).min()?;
    if m == 0 || n > m {
        return None;
    }
    let series: Vec<&[f64]> = series.iter().map(|s| &s[..m]).collect();
    if n > LANES * MAX_CHUNKS {
        // Beyond the lane buffers: one scalar regression per series (same results, slower).
        return (0..n)
            .map(|i| {
                let others: Vec<&[f64]> = (0..n).filter(|&j| j != i).map(|j| series[j]).collect();
                r_squared(&others, series[i])
            })
            .collect();
    }

    // Trunk, row-major: column 0 = intercept, 1 + c = series c (the full design), then
    // 1 + n + i = the response of regression i, which rides along while regression i shares
    // the trunk.
    let ts = 2 * n + 1;
    let mut trunk = vec![0.0; m * ts];
    for (row, cells) in trunk.chunks_exact_mut(ts).enumerate() {
        cells[0] = 1.0;
        for (c, s) in series.iter().enumerate() {
            cells[1 + c] = s[row];
            cells[1 + n + c] = s[row];
        }
    }
    let mut acc = vec![0.0; ts];
    let mut trunk_diag = vec![0.0; n];
    // Every series' SecondMoment, the series side by side (independent chains).
    let (mut m1, mut m2) = (vec![0.0; n], vec![0.0; n]);
    for (row, cells) in trunk.chunks_exact(ts).enumerate() {
        let k = (row + 1) as f64;
        for ((m1, m2), &v) in m1.iter_mut().zip(m2.iter_mut()).zip(&cells[1 + n..]) {
            let dev = v - *m1;
            let n_dev = dev / k;
            *m1 += n_dev;
            *m2 += (k - 1.0) * dev * n_dev;
        }
    }

    // Branches, lane-wise: `lanes[(row * chunks + chunk) * width + pos][lane]` is design
    // position `pos` (position `n`: the response) of regression `chunk * LANES + lane`.
    // Lanes of regressions that have not branched yet (and the padding lanes past `n`) hold
    // values that are never read back: they are overwritten when the regression branches.
    // A branched regression's positions up to its branch point are never read either (the
    // back substitution takes those from the trunk).
    let chunks = n.div_ceil(LANES);
    let width = n + 1;
    let block = |row: usize, chunk: usize| (row * chunks + chunk) * width;
    let need = m * chunks * width;
    if branches.len() < need {
        branches.resize(need, [0.0; LANES]);
    }
    let lanes = &mut branches[..need];
    let mut diag = vec![[0.0; LANES]; chunks * n];
    let mut lane_acc = vec![[0.0; LANES]; chunks * width];

    for i in 0..n {
        // Trunk step i: pivot = position i. The other design columns are only needed by the
        // regressions still to branch (none after the last step); the responses are those of
        // the regressions i..n.
        let cols = if i + 1 < n { i + 1..n + 1 } else { 0..0 };
        let a = householder_step(&mut trunk, ts, m, i, i, cols, 1 + n + i..ts, &mut acc);
        if a == 0.0 {
            return None;
        }
        trunk_diag[i] = a;

        // Regression i branches: its position `pos > i` is trunk column `pos + 1` (series i
        // is skipped), all rows (those above the diagonal are entries of R). Its positions
        // up to i are the trunk's own; the back substitution reads those from the trunk.
        let (chunk, lane) = (i / LANES, i % LANES);
        for (row, cells) in trunk.chunks_exact(ts).enumerate() {
            let dst = &mut lanes[block(row, chunk)..block(row, chunk) + width];
            for (d, &x) in dst[i + 1..n].iter_mut().zip(&cells[i + 2..n + 1]) {
                d[lane] = x;
            }
            dst[n][lane] = cells[1 + n + i];
        }
        for (d, &t) in diag[chunk * n..chunk * n + i + 1]
            .iter_mut()
            .zip(&trunk_diag)
        {
            d[lane] = t;
        }

        // Step i + 1 of every branched regression (0..=i) at once.
        let minor = i + 1;
        if minor < n {
            let active = (i + 1).div_ceil(LANES);
            let mut denom = [[0.0; LANES]; MAX_CHUNKS];
            // The pivots' squared norms, the chunks side by side (independent chains).
            let mut norm = [[0.0; LANES]; MAX_CHUNKS];
            for row in minor..m {
                for (c, norm) in norm[..active].iter_mut().enumerate() {
                    let q = lanes[block(row, c) + minor];
                    for l in 0..LANES {
                        norm[l] += q[l] * q[l];
                    }
                }
            }
            for (c, norm) in norm[..active].iter().enumerate() {
                let q = &mut lanes[block(minor, c) + minor];
                let d = &mut diag[c * n + minor];
                for l in 0..LANES {
                    let root = norm[l].sqrt();
                    let a = if q[l] > 0.0 { -root } else { root };
                    d[l] = a;
                    q[l] -= a;
                    denom[c][l] = a * q[l];
                }
            }
            // Exactly zero pivot in a branched regression: undefined (r_squared's None).
            if (0..=i).any(|r| diag[(r / LANES) * n + minor][r % LANES] == 0.0) {
                return None;
            }
            for (c, denom) in denom[..active].iter().enumerate() {
                let acc = &mut lane_acc[..width];
                reflect_lanes(lanes, acc, m, minor, |row| block(row, c), denom);
            }
        }
    }

    // Back substitution R b = Q^T y, lane-wise, in place in the response column; `beta`
    // keeps the coefficients per position.
    let mut beta = vec![[0.0; LANES]; chunks * n];
    for c in 0..chunks {
        for pos in (0..n).rev() {
            let y = &mut lanes[block(pos, c) + n];
            let d = &diag[c * n + pos];
            for l in 0..LANES {
                y[l] /= d[l];
            }
            let b = *y;
            beta[c * n + pos] = b;
            // R's entry is the trunk's for the regressions that share position `pos`.
            let shared: [bool; LANES] = std::array::from_fn(|l| pos <= c * LANES + l);
            for (row, shared_r) in trunk.chunks_exact(ts).take(pos).map(|t| t[pos]).enumerate() {
                let cells = &mut lanes[block(row, c)..block(row, c) + width];
                let own = cells[pos];
                for l in 0..LANES {
                    let r = if shared[l] { shared_r } else { own[l] };
                    cells[n][l] -= b[l] * r;
                }
            }
        }
    }

    // Residuals y - X b and their sum of squares, lane-wise. Regression `r` (a lane) has
    // series `s` at position `s + 1` when `s < r`, at `s` when `s > r` and nowhere when
    // `s == r`, so adding the terms series by series adds them in position order, as the
    // scalar code does.
    let mut out = Vec::with_capacity(n);
    let mut fit = vec![[0.0; LANES]; m];
    for c in 0..chunks {
        let beta = &beta[c * n..c * n + n];
        // The intercept's regressor is 1, and `1 * b` is `b` exactly.
        fit.fill([0.0; LANES]);
        for f in fit.iter_mut() {
            for l in 0..LANES {
                f[l] += beta[0][l];
            }
        }
        for (s, series_s) in series.iter().enumerate() {
            let mut coef = [0.0; LANES];
            let mut skip = [false; LANES];
            for l in 0..LANES {
                let r = c * LANES + l;
                coef[l] = match s.cmp(&r) {
                    // (`s + 1 == n` only for the padding lanes past `n`.)
                    std::cmp::Ordering::Less => beta.get(s + 1).map_or(0.0, |b| b[l]),
                    std::cmp::Ordering::Greater => beta[s][l],
                    std::cmp::Ordering::Equal => 0.0,
                };
                skip[l] = s == r;
            }
            if s / LANES == c {
                for (f, &x) in fit.iter_mut().zip(*series_s) {
                    for l in 0..LANES {
                        let sum = f[l] + x * coef[l];
                        f[l] = if skip[l] { f[l] } else { sum };
                    }
                }
            } else {
                for (f, &x) in fit.iter_mut().zip(*series_s) {
                    for l in 0..LANES {
                        f[l] += x * coef[l];
                    }
                }
            }
        }
        for l in 0..LANES {
            let Some(y) = series.get(c * LANES + l) else {
                break;
            };
            let mut rss = 0.0;
            for (&y, f) in y.iter().zip(&fit) {
                let r = y - f[l];
                rss += r * r;
            }
            out.push(1.0 - rss / m2[c * LANES + l]);
        }
    }
    Some(out)
}

/// The index of the series with the greatest leave-one-out R² (the ranking of
/// [`leave_one_out_r_squared`], as the MC selector reads it), when a cheap computation can
/// prove it; `None` when it cannot, and the caller must run the exact regressions.
///
/// The exact values take one QR per series in Commons Math's arithmetic (about `m n³ / 6`
/// products in all, even shared as in [`leave_one_out_r_squared`]); their ranking does not
/// need them. With an intercept, `1 - R²` of series `i` on the others is `1 / (C⁻¹)ᵢᵢ`, where
/// `C` is the correlation matrix of the series, so one Cholesky factorisation of `C` (about
/// `m n² / 2 + n³ / 3` products) gives every `1 - R²` at once. Those values differ from Commons
/// Math's in the last bits, so an answer is given only when rounding cannot change it:
///
/// - **Well posed.** Every series varies, with an uncentred norm at most `10⁴` times its
///   centred norm (`ρ`, what centring cancels), and keeps more than `10⁻⁶` of its variance
///   unexplained by the series before it (every Cholesky pivot² of `C`). The design then has
///   full rank by a margin far above rounding (a leave-one-out pivot is never smaller than the
///   full design's), so no Commons Math pivot is exactly zero and the exact path would not
///   fall back to MMT either.
/// - **Error bound.** Both this `1 - R²` and Commons Math's are within the relative error
///   `b = 64 (m + n)² ρ² κ ε` of the exact value, with `κ = n Σ 1 / (1 - R²ᵢ)`, an upper bound
///   of `cond₂(C)` (`λmax ≤ trace C = n`, `1 / λmin ≤ trace C⁻¹`); `b` must be below `10⁻³`.
///   First-order perturbation bounds give `κ` times a small multiple of `(m + n) ρ ε`; the
///   rest is margin (on PlanetLab day 20110303 the largest observed difference from the exact
///   values was `3·10⁻⁷ b`).
/// - **Clear winner.** The least `1 - R²` lies in `[10⁻⁶, 0.99]`: its R² is clearly positive
///   (so it beats CloudSim's starting value `Double.MIN_VALUE`) and clearly below 1 (so that
///   distinct values of `1 - R²` stay distinct when `1 - x` rounds). Every other series' is
///   larger by more than `5 b` relative plus `4 ε`, so with both computations within `b` of
///   the truth the exact ranking has the same strict winner.
///
/// On day 20110303 this decides 97-99 % of the MC selections; the others (flat or collinear
/// histories, copies of one VM on one host, near ties) take the exact path.
pub fn leave_one_out_winner_if_certain(series: &[&[f64]]) -> Option<usize> {
    let n = series.len();
    let m = series.iter().map(|s| s.len()).min()?;
    // With m <= n the leave-one-out designs fit exactly (R² = 1 for all): the exact path.
    if n < 2 || m <= n {
        return None;
    }
    // Centred series scaled to unit norm, row-major (`z[row * n + j]`), so that the Gram
    // products below run as independent chains side by side.
    let mut z = vec![0.0; m * n];
    let mut rho2_max: f64 = 0.0;
    for (j, s) in series.iter().enumerate() {
        let s = &s[..m];
        let mean = s.iter().sum::<f64>() / m as f64;
        let (mut centred, mut raw) = (0.0, 0.0);
        for &x in s {
            centred += (x - mean) * (x - mean);
            raw += x * x;
        }
        let rho2 = raw / centred;
        // (Also false for NaN: a series with a NaN is never decided here.)
        if !(centred > 0.0 && rho2 <= 1e8) {
            return None;
        }
        rho2_max = rho2_max.max(rho2);
        let scale = 1.0 / centred.sqrt();
        for (row, &x) in s.iter().enumerate() {
            z[row * n + j] = (x - mean) * scale;
        }
    }
    // Lower triangle of C = Zᵀ Z (`c[i * n + j]`, j <= i), then its Cholesky factor in place.
    let mut c = vec![0.0; n * n];
    for row in z.chunks_exact(n) {
        for (i, &zi) in row.iter().enumerate() {
            for (acc, &zj) in c[i * n..i * n + i + 1].iter_mut().zip(row) {
                *acc += zi * zj;
            }
        }
    }
    for k in 0..n {
        let (done, rest) = c.split_at_mut(k * n);
        let row_k = &mut rest[..n];
        for j in 0..k {
            let row_j = &done[j * n..j * n + j + 1];
            let dot: f64 = row_k[..j].iter().zip(row_j).map(|(a, b)| a * b).sum();
            row_k[j] = (row_k[j] - dot) / row_j[j];
        }
        let pivot2 = row_k[k] - row_k[..k].iter().map(|a| a * a).sum::<f64>();
        if pivot2.is_nan() || pivot2 <= 1e-6 {
            return None;
        }
        row_k[k] = pivot2.sqrt();
    }
    // (C⁻¹)ᵢᵢ is the squared norm of column i of L⁻¹: solve L w = eᵢ (w is zero above i).
    let mut one_minus_r2 = vec![0.0; n];
    let mut w = vec![0.0; n];
    for (i, e) in one_minus_r2.iter_mut().enumerate() {
        let mut norm2 = 0.0;
        for k in i..n {
            let row = &c[k * n..k * n + k + 1];
            let dot: f64 = row[i..k].iter().zip(&w[i..k]).map(|(a, b)| a * b).sum();
            let wk = (if k == i { 1.0 } else { 0.0 } - dot) / row[k];
            w[k] = wk;
            norm2 += wk * wk;
        }
        *e = 1.0 / norm2;
    }
    let kappa = n as f64 * one_minus_r2.iter().map(|e| 1.0 / e).sum::<f64>();
    let size = (m + n) as f64;
    let bound = 64.0 * size * size * rho2_max * kappa * f64::EPSILON;
    let (mut best, mut least) = (0, f64::INFINITY);
    for (i, &e) in one_minus_r2.iter().enumerate() {
        if e < least {
            (best, least) = (i, e);
        }
    }
    let clear_of = least * (1.0 + 5.0 * bound) + 4.0 * f64::EPSILON;
    let certain = bound < 1e-3
        && (1e-6..=0.99).contains(&least)
        && one_minus_r2
            .iter()
            .enumerate()
            .all(|(j, &e)| j == best || e > clear_of);
    certain.then_some(best)
}

/// Lanes per chunk of the lane-wise branch storage: one SSE2 register, which is what the
/// compiler vectorises cleanly (with 4, it shuffled lanes across neighbouring positions).
const LANES: usize = 2;
/// Chunks of lanes a stack buffer holds; more series than `LANES * MAX_CHUNKS` take the
/// scalar path.
const MAX_CHUNKS: usize = 32;

/// The reflection of one lane-wise branch step for one chunk of lanes whose row `row` starts
/// at `lanes[block(row)]`: the pivot at position `minor` (already turned into the
/// Householder vector; `denom = a * q[minor]` per lane) is applied with the QR's formula to
/// positions `minor+1..width-1` and with the solve's formula to the response (the last
/// position). `acc` is `width` long.
fn reflect_lanes(
    lanes: &mut [[f64; LANES]],
    acc: &mut [[f64; LANES]],
    m: usize,
    minor: usize,
    block: impl Fn(usize) -> usize,
    denom: &[f64; LANES],
) {
    let width = acc.len();
    let (alpha, dot) = acc[minor + 1..].split_at_mut(width - minor - 2);
    let dot = &mut dot[0];
    // All positions' dot products in one pass over the rows: each is its own chain, summed
    // in row order; the CPU overlaps them. (Blocking positions to keep the sums in registers
    // measured no faster.)
    alpha.fill([0.0; LANES]);
    *dot = [0.0; LANES];
    for row in minor..m {
        let cells = &lanes[block(row)..block(row) + width];
        let q = cells[minor];
        for (alpha, x) in alpha.iter_mut().zip(&cells[minor + 1..width - 1]) {
            for l in 0..LANES {
                alpha[l] -= x[l] * q[l];
            }
        }
        let y = cells[width - 1];
        for l in 0..LANES {
            dot[l] += y[l] * q[l];
        }
    }
    for alpha in alpha.iter_mut() {
        for l in 0..LANES {
            alpha[l] /= denom[l];
        }
    }
    for l in 0..LANES {
        dot[l] /= denom[l];
    }
    for row in minor..m {
        let cells = &mut lanes[block(row)..block(row) + width];
        let q = cells[minor];
        for (x, alpha) in cells[minor + 1..width - 1].iter_mut().zip(alpha.iter()) {
            for l in 0..LANES {
                x[l] -= alpha[l] * q[l];
            }
        }
        let y = &mut cells[width - 1];
        for l in 0..LANES {
            y[l] += dot[l] * q[l];
        }
    }
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

#[cfg(test)]
pub(crate) mod tests;
