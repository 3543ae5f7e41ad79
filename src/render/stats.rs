//! The interval estimates behind claim verdicts: Student's t quantiles, Welch's interval for a
//! difference of means, the one-sample interval of a mean, and a seeded bootstrap of Spearman's
//! ρ over per-point means. Everything is deterministic (a report renders to the same bytes).

use crate::rng::Rng;

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine coefficients; relative error below 1e-14).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz).
fn inc_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    // The fraction converges fast for x < (a + 1)/(a + b + 2); use the symmetry otherwise.
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - inc_beta(1.0 - x, b, a);
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp() / a;
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = if d.abs() < tiny { tiny } else { d };
    d = 1.0 / d;
    let mut f = d;
    for m in 1..300 {
        let m = m as f64;
        for num in [m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)), -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))] {
            d = 1.0 + num * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = 1.0 + num / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-15 {
            break;
        }
    }
    front * f
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom (df > 0, not necessarily whole).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * inc_beta(df / (df + t * t), df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom, by bisection on [`t_cdf`].
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e4, 1e4);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// A measured value with a 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    (m, x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0))
}

/// mean(a) − mean(b) with Welch's 95 % interval (unequal variances, Welch–Satterthwaite degrees
/// of freedom). `None` unless each side has at least two values. When both sides have no spread
/// the interval is the point itself.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Estimate> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let (sa, sb) = (va / a.len() as f64, vb / b.len() as f64);
    let d = ma - mb;
    let se = (sa + sb).sqrt();
    if se == 0.0 {
        return Some(Estimate { value: d, lo: d, hi: d });
    }
    let df = (sa + sb).powi(2) / (sa * sa / (a.len() as f64 - 1.0) + sb * sb / (b.len() as f64 - 1.0));
    let half = t_quantile(0.975, df) * se;
    Some(Estimate { value: d, lo: d - half, hi: d + half })
}

/// The mean of `x` with its 95 % t interval; `None` below two values.
pub fn mean_interval(x: &[f64]) -> Option<Estimate> {
    if x.len() < 2 {
        return None;
    }
    let (m, v) = mean_var(x);
    let half = t_quantile(0.975, x.len() as f64 - 1.0) * (v / x.len() as f64).sqrt();
    Some(Estimate { value: m, lo: m - half, hi: m + half })
}

/// Spearman's ρ between the points' x and the mean of their y values, with a 95 % percentile
/// bootstrap interval: `resamples` times, each point's values are resampled with replacement
/// (seeded by `seed`) and ρ recomputed. `None` with fewer than three points, with a point of
/// fewer than two values (no spread to resample), or when ρ is undefined (constant means).
pub fn spearman_interval(points: &[(f64, Vec<f64>)], resamples: usize, seed: u64) -> Option<Estimate> {
    if points.len() < 3 || points.iter().any(|(_, ys)| ys.len() < 2) {
        return None;
    }
    let xs: Vec<f64> = points.iter().map(|(x, _)| *x).collect();
    let observed: Vec<f64> = points.iter().map(|(_, ys)| ys.iter().sum::<f64>() / ys.len() as f64).collect();
    let rho = super::summary::spearman(&xs, &observed)?;
    let mut rng = Rng::derive(seed, "claim-bootstrap");
    let mut draws = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let m: Vec<f64> = points.iter().map(|(_, ys)| (0..ys.len()).map(|_| ys[rng.below(ys.len())]).sum::<f64>() / ys.len() as f64).collect();
        // A resample with constant means has no ρ; it counts as no association.
        draws.push(super::summary::spearman(&xs, &m).unwrap_or(0.0));
    }
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Some(Estimate { value: rho, lo: at(0.025), hi: at(0.975) })
}

/// Seeds per side that a two-sided 5 % test with 80 % power needs to tell a difference `margin`
/// apart from zero when the spread over seeds is `sd`: ⌈2 (1.96 + 0.84)² sd² / margin²⌉, at
/// least 2 (normal approximation; with few seeds the t test needs a few more).
pub fn seeds_needed(sd: f64, margin: f64) -> Option<usize> {
    if margin == 0.0 || margin.is_nan() || !sd.is_finite() {
        return None;
    }
    Some(((2.0 * (1.96f64 + 0.84).powi(2) * sd * sd / (margin * margin)).ceil() as usize).max(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_the_tables() {
        // Two-sided 95 % critical values from standard t tables.
        for (df, q) in [(1.0, 12.706_204_7), (2.0, 4.302_652_7), (4.0, 2.776_445_1), (10.0, 2.228_138_9), (30.0, 2.042_272_5), (1e6, 1.959_966)] {
            assert!((t_quantile(0.975, df) - q).abs() < 1e-5, "df {df}: {} vs {q}", t_quantile(0.975, df));
        }
        assert!((t_cdf(0.0, 3.0) - 0.5).abs() < 1e-15);
        // P(T ≤ 1) with one degree of freedom (Cauchy): 1/2 + arctan(1)/π = 0.75.
        assert!((t_cdf(1.0, 1.0) - 0.75).abs() < 1e-12);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn welch_by_hand() {
        // a = 1, 2, 3 (mean 2, var 1); b = 4, 6 (mean 5, var 2). d = −3,
        // se² = 1/3 + 2/2 = 4/3, df = (4/3)² / ((1/3)²/2 + 1²/1) = (16/9)/(1/18 + 1) = 32/19.
        let e = welch(&[1.0, 2.0, 3.0], &[4.0, 6.0]).unwrap();
        let df: f64 = 32.0 / 19.0;
        let half = t_quantile(0.975, df) * (4.0f64 / 3.0).sqrt();
        assert_eq!(e.value, -3.0);
        assert!((e.lo - (-3.0 - half)).abs() < 1e-12 && (e.hi - (-3.0 + half)).abs() < 1e-12);
        // With df = 32/19 ≈ 1.68 the critical value lies between those of 1 and 2 df.
        assert!(half / (4.0f64 / 3.0).sqrt() > 4.30 && half / (4.0f64 / 3.0).sqrt() < 12.71);
        assert!(welch(&[1.0], &[2.0, 3.0]).is_none());
        // Equal spread-free sides: the point itself.
        assert_eq!(welch(&[2.0, 2.0], &[1.0, 1.0]).unwrap(), Estimate { value: 1.0, lo: 1.0, hi: 1.0 });
    }

    #[test]
    fn a_one_sample_interval_by_hand() {
        // 1, 2, 3: mean 2, sd 1, se 1/√3, t(0.975, 2) = 4.3027.
        let e = mean_interval(&[1.0, 2.0, 3.0]).unwrap();
        let half = 4.302_652_7 / 3f64.sqrt();
        assert!((e.lo - (2.0 - half)).abs() < 1e-6 && (e.hi - (2.0 + half)).abs() < 1e-6);
    }

    #[test]
    fn a_bootstrap_of_a_clear_and_of_a_noisy_trend() {
        // Means 1, 2, 3, 4 with tiny spread: every resample keeps the order, ρ = 1 throughout.
        let clear: Vec<(f64, Vec<f64>)> = (1..=4).map(|i| (i as f64, vec![i as f64 - 0.01, i as f64 + 0.01])).collect();
        let e = spearman_interval(&clear, 2000, 1).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (1.0, 1.0, 1.0));
        // Spread far above the differences: the interval reaches across zero.
        let noisy: Vec<(f64, Vec<f64>)> = (1..=4).map(|i| (i as f64, vec![i as f64 - 10.0, i as f64 + 10.0, i as f64 * 0.5])).collect();
        let e = spearman_interval(&noisy, 2000, 1).unwrap();
        assert!(e.lo < 0.0 && e.hi > 0.5, "{e:?}");
        // Deterministic in the seed; one value at a point gives no interval.
        assert_eq!(spearman_interval(&noisy, 2000, 1), Some(e));
        assert!(spearman_interval(&[(1.0, vec![1.0]), (2.0, vec![2.0, 3.0]), (3.0, vec![3.0, 4.0])], 100, 1).is_none());
    }

    #[test]
    fn seeds_needed_by_hand() {
        // sd 1, margin 1: 2 · 2.8² = 15.68 → 16.
        assert_eq!(seeds_needed(1.0, 1.0), Some(16));
        assert_eq!(seeds_needed(0.1, 1.0), Some(2));
        assert_eq!(seeds_needed(1.0, 0.0), None);
    }
}
