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
/// intercept, solved by Householder QR (as Commons Math `OLSMultipleLinearRegression`).
/// Returns `None` when there are fewer observations than parameters or when the design matrix
/// is exactly singular (a zero pivot) — the cases where Commons Math throws.
pub fn r_squared(xs: &[&[f64]], y: &[f64]) -> Option<f64> {
    let m = y.len();
    let p = xs.len() + 1;
    if m == 0 || xs.len() + 1 > m || xs.iter().any(|c| c.len() < m) {
        return None;
    }
    // Column-major design matrix with the intercept column first.
    let mut a: Vec<Vec<f64>> = Vec::with_capacity(p);
    a.push(vec![1.0; m]);
    for c in xs {
        a.push(c[..m].to_vec());
    }
    let mut b = y.to_vec();
    for k in 0..p {
        let norm_sq: f64 = a[k][k..].iter().map(|v| v * v).sum();
        let alpha = if a[k][k] > 0.0 {
            -norm_sq.sqrt()
        } else {
            norm_sq.sqrt()
        };
        if alpha == 0.0 {
            return None;
        }
        // Householder vector v = x - alpha e1, stored in a[k][k..].
        a[k][k] -= alpha;
        let vnorm_sq: f64 = a[k][k..].iter().map(|v| v * v).sum();
        if vnorm_sq == 0.0 {
            return None;
        }
        let (head, tail) = a.split_at_mut(k + 1);
        let v = &head[k][k..];
        for col in tail.iter_mut() {
            let dot: f64 = v.iter().zip(&col[k..]).map(|(a, b)| a * b).sum();
            let f = 2.0 * dot / vnorm_sq;
            for (c, vv) in col[k..].iter_mut().zip(v) {
                *c -= f * vv;
            }
        }
        let dot: f64 = v.iter().zip(&b[k..]).map(|(a, b)| a * b).sum();
        let f = 2.0 * dot / vnorm_sq;
        for (c, vv) in b[k..].iter_mut().zip(v) {
            *c -= f * vv;
        }
    }
    // After the reflections the residual is the tail of Q^T y.
    let rss: f64 = b[p..].iter().map(|v| v * v).sum();
    let mean = y.iter().sum::<f64>() / m as f64;
    let tss: f64 = y.iter().map(|v| (v - mean) * (v - mean)).sum();
    Some(1.0 - rss / tss)
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
