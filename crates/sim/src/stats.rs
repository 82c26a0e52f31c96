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
}
