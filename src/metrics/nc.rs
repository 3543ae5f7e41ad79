//! Neural-collapse metrics NC1–NC4, mean drift and minority collapse; the definitions are in the
//! module documentation of [`crate::metrics`].

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::linalg::{cosine, dot, jacobi_eigen, norm, std_over_mean};
use super::MetricsError;

/// Samples per parallel work item. Partial sums are combined in chunk order, so results do not
/// depend on the number of threads.
const CHUNK: usize = 256;

/// Relative cut-off for the eigenvalues of `MᵀM` kept in the pseudo-inverse of `Σ_B`.
const PINV_RTOL: f64 = 1e-10;

/// Which mean `μ̄` centres the class means for NC1–NC3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// `μ̄ = μ_G = Σ_c n_c μ_c / N`, the sample mean (Papyan et al.).
    #[default]
    Global,
    /// `μ̄ = μ_B = (1/C') Σ_c μ_c`, the class-balanced mean.
    Balanced,
}

/// Everything [`neural_collapse`] reads. Matrices are row-major slices.
#[derive(Debug, Clone, Copy)]
pub struct NcInput<'a> {
    /// `n × d` features `H`.
    pub features: &'a [f32],
    pub n: usize,
    pub d: usize,
    /// `n` true labels, each below `num_classes`.
    pub labels: &'a [u32],
    /// `n` predicted labels, each below `num_classes`.
    pub predictions: &'a [u32],
    /// `num_classes × d` classifier matrix `W` (no bias).
    pub classifier: &'a [f32],
    pub num_classes: usize,
    /// Minority class indices for `minority_cosine` (each below `num_classes`).
    pub minority: &'a [usize],
    pub centering: Centering,
}

/// The neural-collapse metrics of one set of features and classifier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NcMetrics {
    pub nc1: f64,
    pub nc2_equinorm_features: f64,
    pub nc2_equinorm_classifier: f64,
    pub nc2_equiangular_features: f64,
    pub nc2_equiangular_classifier: f64,
    pub nc3: f64,
    pub nc4: f64,
    pub drift_abs: f64,
    pub drift_norm: f64,
    pub minority_cosine: Option<f64>,
    pub empty_classes: usize,
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), MetricsError> {
    if got == expected {
        Ok(())
    } else {
        Err(MetricsError::Shape { what, expected, got })
    }
}

fn check_classes(what: &'static str, xs: &[u32], num_classes: usize) -> Result<(), MetricsError> {
    match xs.iter().position(|&x| x as usize >= num_classes) {
        Some(index) => Err(MetricsError::ClassOutOfRange { what, index, value: xs[index] as usize, num_classes }),
        None => Ok(()),
    }
}

fn check_finite(what: &'static str, xs: &[f32]) -> Result<(), MetricsError> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(MetricsError::NonFinite { what, index }),
        None => Ok(()),
    }
}

fn validate(input: &NcInput) -> Result<(), MetricsError> {
    let NcInput { features, n, d, labels, predictions, classifier, num_classes, minority, .. } = *input;
    if n == 0 {
        return Err(MetricsError::NoSamples);
    }
    let nd = n.checked_mul(d).ok_or(MetricsError::Shape { what: "features", expected: usize::MAX, got: features.len() })?;
    check_len("features", features.len(), nd)?;
    check_len("labels", labels.len(), n)?;
    check_len("predictions", predictions.len(), n)?;
    let cd = num_classes.checked_mul(d).ok_or(MetricsError::Shape { what: "classifier", expected: usize::MAX, got: classifier.len() })?;
    check_len("classifier", classifier.len(), cd)?;
    check_classes("labels", labels, num_classes)?;
    check_classes("predictions", predictions, num_classes)?;
    if let Some(index) = minority.iter().position(|&m| m >= num_classes) {
        return Err(MetricsError::ClassOutOfRange { what: "minority", index, value: minority[index], num_classes });
    }
    check_finite("features", features)?;
    check_finite("classifier", classifier)?;
    Ok(())
}

/// Mean over unordered pairs `a < b` of `f(a, b)`; the caller guarantees at least two items.
fn mean_over_pairs(k: usize, f: impl Fn(usize, usize) -> f64) -> f64 {
    let mut total = 0.0;
    let mut pairs = 0usize;
    for a in 0..k {
        for b in (a + 1)..k {
            total += f(a, b);
            pairs += 1;
        }
    }
    total / pairs as f64
}

/// The drift norm that a perfect simplex ETF already has with these class counts: class means
/// μ_c of equal norm with cosines −1/(C−1) around μ_B give ‖μ_G − μ_B‖ / ‖μ_c − μ_B‖ =
/// √((C Σ p_c² − 1)/(C − 1)), p_c = n_c / N over the C non-empty classes. 0 when balanced; `None`
/// with fewer than two non-empty classes. Only `drift_norm` beyond this value says something
/// about the features; below it, the features are closer to balanced than a collapsed network's.
pub fn drift_norm_etf(counts: &[usize]) -> Option<f64> {
    // In integers, so that balanced counts give exactly 0: (C Σ n_c² − N²) / ((C − 1) N²).
    let present: Vec<u128> = counts.iter().filter(|&&k| k > 0).map(|&k| k as u128).collect();
    if present.len() < 2 {
        return None;
    }
    let (c, n) = (present.len() as u128, present.iter().sum::<u128>());
    let num = c * present.iter().map(|k| k * k).sum::<u128>() - n * n;
    Some((num as f64 / ((c - 1) as f64 * (n * n) as f64)).sqrt())
}

/// Class counts and means over the classes that have samples, and the two centres.
struct ClassMeans {
    counts: Vec<usize>,
    /// The non-empty classes, ascending.
    present: Vec<usize>,
    /// slot[c] = position of class c among the non-empty classes.
    slot: Vec<usize>,
    /// One mean per non-empty class, in `present` order.
    means: Vec<Vec<f64>>,
    /// μ_G = Σ_c n_c μ_c / N.
    mu_g: Vec<f64>,
    /// μ_B = (1/C') Σ_c μ_c.
    mu_b: Vec<f64>,
}

/// The caller has validated the shapes and the labels.
fn class_means(features: &[f32], n: usize, d: usize, labels: &[u32], num_classes: usize) -> Result<ClassMeans, MetricsError> {
    let row = |i: usize| &features[i * d..(i + 1) * d];
    let mut counts = vec![0usize; num_classes];
    let mut sums = vec![0.0f64; num_classes * d];
    for (i, &y) in labels.iter().enumerate() {
        let y = y as usize;
        counts[y] += 1;
        for (s, &x) in sums[y * d..(y + 1) * d].iter_mut().zip(row(i)) {
            *s += f64::from(x);
        }
    }
    let present: Vec<usize> = (0..num_classes).filter(|&c| counts[c] > 0).collect();
    let cp = present.len();
    if cp < 2 {
        return Err(MetricsError::TooFewClasses(cp));
    }
    let mut slot = vec![usize::MAX; num_classes];
    for (k, &c) in present.iter().enumerate() {
        slot[c] = k;
    }
    let means: Vec<Vec<f64>> = present.iter().map(|&c| sums[c * d..(c + 1) * d].iter().map(|s| s / counts[c] as f64).collect()).collect();
    let mut mu_g = vec![0.0; d];
    let mut mu_b = vec![0.0; d];
    for (k, &c) in present.iter().enumerate() {
        for j in 0..d {
            mu_g[j] += counts[c] as f64 * means[k][j] / n as f64;
            mu_b[j] += means[k][j] / cp as f64;
        }
    }
    Ok(ClassMeans { counts, present, slot, means, mu_g, mu_b })
}

/// (drift_abs, drift_norm) from the class means and the two centres; drift_norm is not finite
/// when every class mean equals μ_B (the callers rule that out).
fn drift(means: &[Vec<f64>], mu_g: &[f64], mu_b: &[f64]) -> (f64, f64) {
    let drift_abs = norm(&mu_g.iter().zip(mu_b).map(|(g, b)| g - b).collect::<Vec<_>>());
    let spread = means.iter().map(|m| norm(&m.iter().zip(mu_b).map(|(a, b)| a - b).collect::<Vec<_>>())).sum::<f64>() / means.len() as f64;
    (drift_abs, drift_abs / spread)
}

/// `(drift_abs, drift_norm)` alone (the definitions of [`crate::metrics`]), for features
/// without a classifier of their own, such as an inner layer's: the same numbers as
/// [`neural_collapse`] gives for the same features and labels.
pub fn mean_drift(features: &[f32], n: usize, d: usize, labels: &[u32], num_classes: usize) -> Result<(f64, f64), MetricsError> {
    if n == 0 {
        return Err(MetricsError::NoSamples);
    }
    let nd = n.checked_mul(d).ok_or(MetricsError::Shape { what: "features", expected: usize::MAX, got: features.len() })?;
    check_len("features", features.len(), nd)?;
    check_len("labels", labels.len(), n)?;
    check_classes("labels", labels, num_classes)?;
    check_finite("features", features)?;
    let cm = class_means(features, n, d, labels, num_classes)?;
    let (abs, norm) = drift(&cm.means, &cm.mu_g, &cm.mu_b);
    if !norm.is_finite() {
        return Err(MetricsError::DegenerateMeans);
    }
    Ok((abs, norm))
}

/// Computes NC1–NC4, drift and minority collapse as defined in [`crate::metrics`].
pub fn neural_collapse(input: &NcInput) -> Result<NcMetrics, MetricsError> {
    validate(input)?;
    let NcInput { features, n, d, labels, predictions, classifier, num_classes, minority, centering } = *input;
    let row = |i: usize| &features[i * d..(i + 1) * d];

    let ClassMeans { counts, present, slot, means, mu_g, mu_b } = class_means(features, n, d, labels, num_classes)?;
    let cp = present.len();
    let centre = match centering {
        Centering::Global => &mu_g,
        Centering::Balanced => &mu_b,
    };
    // Rows of Mᵀ: the centred class means μ_c − μ̄.
    let mt: Vec<Vec<f64>> = means.iter().map(|m| m.iter().zip(centre).map(|(a, b)| a - b).collect()).collect();
    let m_fro = mt.iter().map(|v| dot(v, v)).sum::<f64>().sqrt();
    if m_fro == 0.0 {
        return Err(MetricsError::DegenerateMeans);
    }
    let w: Vec<Vec<f64>> = present.iter().map(|&c| classifier[c * d..(c + 1) * d].iter().map(|&x| f64::from(x)).collect()).collect();
    let w_fro = w.iter().map(|v| dot(v, v)).sum::<f64>().sqrt();
    if w_fro == 0.0 {
        return Err(MetricsError::ZeroClassifier);
    }

    // NC1 in the span of M: MᵀM = V S² Vᵀ, u_k = M v_k / s_k.
    let mut gram = vec![0.0; cp * cp];
    for a in 0..cp {
        for b in a..cp {
            let g = dot(&mt[a], &mt[b]);
            gram[a * cp + b] = g;
            gram[b * cp + a] = g;
        }
    }
    let eig = jacobi_eigen(&gram, cp);
    let lam_max = eig.values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // (u_k, s_k²) for the kept eigenvalues; lam_max > 0 because M ≠ 0.
    let basis: Vec<(Vec<f64>, f64)> = (0..cp)
        .filter(|&k| eig.values[k] > PINV_RTOL * lam_max)
        .map(|k| {
            let s = eig.values[k].sqrt();
            let mut u = vec![0.0; d];
            for (a, m) in mt.iter().enumerate() {
                let coef = eig.vectors[a * cp + k] / s;
                for (uj, mj) in u.iter_mut().zip(m) {
                    *uj += coef * mj;
                }
            }
            (u, eig.values[k])
        })
        .collect();
    // Σ_i (u_kᵀ (h_i − μ_{y_i}))² for every kept k, summed per chunk then in chunk order.
    let partials: Vec<Vec<f64>> = (0..n)
        .collect::<Vec<_>>()
        .par_chunks(CHUNK)
        .map(|idx| {
            let mut acc = vec![0.0; basis.len()];
            let mut r = vec![0.0; d];
            for &i in idx {
                let mu = &means[slot[labels[i] as usize]];
                for ((rj, &x), m) in r.iter_mut().zip(row(i)).zip(mu) {
                    *rj = f64::from(x) - m;
                }
                for (a, (u, _)) in acc.iter_mut().zip(&basis) {
                    let p = dot(u, &r);
                    *a += p * p;
                }
            }
            acc
        })
        .collect();
    let mut proj = vec![0.0; basis.len()];
    for part in &partials {
        for (p, x) in proj.iter_mut().zip(part) {
            *p += x;
        }
    }
    // Tr(Σ_W Σ_B⁺) = C' Σ_k (u_kᵀ Σ_W u_k) / s_k², and NC1 divides that by C'.
    let trace = cp as f64 * basis.iter().zip(&proj).map(|((_, s2), p)| (p / n as f64) / s2).sum::<f64>();
    let nc1 = trace / cp as f64;

    // NC2.
    let feat_norms: Vec<f64> = mt.iter().map(|v| norm(v)).collect();
    let w_norms: Vec<f64> = w.iter().map(|v| norm(v)).collect();
    // Means are positive: M ≠ 0 and W ≠ 0 were checked above.
    let nc2_equinorm_features = std_over_mean(&feat_norms).ok_or(MetricsError::DegenerateMeans)?;
    let nc2_equinorm_classifier = std_over_mean(&w_norms).ok_or(MetricsError::ZeroClassifier)?;
    let target = 1.0 / (cp as f64 - 1.0);
    // |cos + 1/(C'−1)| is symmetric, so the mean over ordered pairs equals that over a < b.
    let nc2_equiangular_features = mean_over_pairs(cp, |a, b| (cosine(&mt[a], &mt[b]) + target).abs());
    let nc2_equiangular_classifier = mean_over_pairs(cp, |a, b| (cosine(&w[a], &w[b]) + target).abs());

    // NC3.
    let mut nc3 = 0.0;
    for (wv, mv) in w.iter().zip(&mt) {
        for (x, y) in wv.iter().zip(mv) {
            let diff = x / w_fro - y / m_fro;
            nc3 += diff * diff;
        }
    }

    // NC4: disagreement with the nearest-class-mean classifier.
    let mismatches: usize = (0..n)
        .collect::<Vec<_>>()
        .par_chunks(CHUNK)
        .map(|idx| {
            let mut count = 0usize;
            for &i in idx {
                let h = row(i);
                let mut best = (f64::INFINITY, 0usize);
                for (k, mu) in means.iter().enumerate() {
                    let dist: f64 = h
                        .iter()
                        .zip(mu)
                        .map(|(&x, m)| {
                            let e = f64::from(x) - m;
                            e * e
                        })
                        .sum();
                    if dist < best.0 {
                        best = (dist, k);
                    }
                }
                if predictions[i] as usize != present[best.1] {
                    count += 1;
                }
            }
            count
        })
        .sum();
    let nc4 = mismatches as f64 / n as f64;

    // spread > 0: if every μ_c equalled μ_B, all means would coincide and so would μ_G, making
    // M = 0 under either centering, which was rejected above.
    let (drift_abs, drift_norm) = drift(&means, &mu_g, &mu_b);

    // Minority collapse among the non-empty minority classes.
    let mut mins: Vec<usize> = minority.iter().copied().filter(|&c| counts[c] > 0).collect();
    mins.sort_unstable();
    mins.dedup();
    let minority_cosine = (mins.len() >= 2).then(|| mean_over_pairs(mins.len(), |a, b| cosine(&w[slot[mins[a]]], &w[slot[mins[b]]])));

    Ok(NcMetrics {
        nc1,
        nc2_equinorm_features,
        nc2_equinorm_classifier,
        nc2_equiangular_features,
        nc2_equiangular_classifier,
        nc3,
        nc4,
        drift_abs,
        drift_norm,
        minority_cosine,
        empty_classes: num_classes - cp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn input<'a>(features: &'a [f32], d: usize, labels: &'a [u32], predictions: &'a [u32], classifier: &'a [f32], num_classes: usize, minority: &'a [usize], centering: Centering) -> NcInput<'a> {
        NcInput { features, n: labels.len(), d, labels, predictions, classifier, num_classes, minority, centering }
    }

    fn close(got: f64, want: f64, rel: f64, what: &str) {
        let tol = rel * want.abs().max(1e-300);
        assert!((got - want).abs() <= tol, "{what}: got {got:e}, want {want:e} (rel {rel:e})");
    }

    /// Simplex ETF in R⁴: class c sits at `offset + e_c − ¼·1` (exact in f32), with no
    /// within-class spread, and W equals the centred class means (times 2; NC3 ignores scale).
    fn etf_case(counts: &[usize]) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let (c, d) = (4, 4);
        let vertex = |k: usize, j: usize| if j == k { 0.75f32 } else { -0.25 };
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for (k, &nk) in counts.iter().enumerate() {
            for _ in 0..nk {
                features.extend((0..d).map(|j| 3.0 + vertex(k, j)));
                labels.push(k as u32);
            }
        }
        let w: Vec<f32> = (0..c).flat_map(|k| (0..d).map(move |j| 2.0 * vertex(k, j))).collect();
        (features, labels, w)
    }

    #[test]
    fn simplex_etf_is_fully_collapsed() {
        // Balanced counts: μ_G = μ_B = 3·1, both centerings see the exact ETF.
        let (h, y, w) = etf_case(&[2, 2, 2, 2]);
        for centering in [Centering::Global, Centering::Balanced] {
            let m = neural_collapse(&input(&h, 4, &y, &y, &w, 4, &[2, 3], centering)).unwrap();
            assert_eq!(m.nc1, 0.0, "Σ_W = 0 exactly");
            assert!(m.nc2_equinorm_features.abs() < 1e-12, "{m:?}");
            assert!(m.nc2_equinorm_classifier.abs() < 1e-12, "{m:?}");
            assert!(m.nc2_equiangular_features.abs() < 1e-12, "{m:?}");
            assert!(m.nc2_equiangular_classifier.abs() < 1e-12, "{m:?}");
            assert!(m.nc3.abs() < 1e-12, "{m:?}");
            assert_eq!(m.nc4, 0.0);
            assert!(m.drift_abs.abs() < 1e-12 && m.drift_norm.abs() < 1e-12, "{m:?}");
            // ETF rows: cos = −1/(C−1) = −1/3.
            close(m.minority_cosine.unwrap(), -1.0 / 3.0, 1e-12, "minority_cosine");
            assert_eq!(m.empty_classes, 0);
        }
    }

    #[test]
    fn a_perfect_simplex_has_the_closed_form_drift() {
        for counts in [[8usize, 4, 2, 1], [5, 5, 5, 5], [20, 1, 1, 1]] {
            let (h, y, w) = etf_case(&counts);
            let m = neural_collapse(&input(&h, 4, &y, &y, &w, 4, &[], Centering::Balanced)).unwrap();
            let etf = drift_norm_etf(&counts).unwrap();
            close(m.drift_norm, etf, 1e-12, "drift_norm of a simplex");
        }
        // By hand: counts 8, 4, 2, 1 (N = 15): Σp² = (64 + 16 + 4 + 1)/225 = 85/225;
        // (4 · 85/225 − 1)/3 = (340 − 225)/675 = 115/675.
        close(drift_norm_etf(&[8, 4, 2, 1]).unwrap(), (115.0f64 / 675.0).sqrt(), 1e-15, "by hand");
        assert_eq!(drift_norm_etf(&[5, 5, 5]), Some(0.0));
        assert_eq!(drift_norm_etf(&[5, 0, 0]), None);
        // Empty classes do not count.
        assert_eq!(drift_norm_etf(&[8, 4, 0, 2, 1]), drift_norm_etf(&[8, 4, 2, 1]));
    }

    #[test]
    fn imbalanced_etf_is_collapsed_only_around_the_balanced_mean() {
        let (h, y, w) = etf_case(&[8, 4, 2, 1]);
        let bal = neural_collapse(&input(&h, 4, &y, &y, &w, 4, &[], Centering::Balanced)).unwrap();
        assert_eq!(bal.nc1, 0.0);
        assert!(bal.nc2_equinorm_features.abs() < 1e-12, "{bal:?}");
        assert!(bal.nc2_equiangular_features.abs() < 1e-12, "{bal:?}");
        assert!(bal.nc3.abs() < 1e-12, "{bal:?}");
        assert_eq!(bal.minority_cosine, None);
        // Around the sample mean the geometry is distorted by the imbalance.
        let glo = neural_collapse(&input(&h, 4, &y, &y, &w, 4, &[], Centering::Global)).unwrap();
        assert!(glo.nc2_equinorm_features > 0.1 && glo.nc3 > 0.01, "{glo:?}");
        // Drift: μ_G − μ_B = Σ_c (n_c/N − ¼) v_c; with v_c = e_c − ¼·1 and weights
        // p = (8,4,2,1)/15: μ_G − μ_B = p − ¼·1 (the ¼·1 terms cancel since Σ p = 1), so
        // drift_abs = ‖(17, 1, −7, −11)/60‖ = √460/60; ‖v_c‖ = √(9/16 + 3/16) = √3/2.
        close(glo.drift_abs, 460f64.sqrt() / 60.0, 1e-12, "drift_abs");
        close(glo.drift_norm, (460f64.sqrt() / 60.0) / (3f64.sqrt() / 2.0), 1e-12, "drift_norm");
        assert_eq!((glo.drift_abs, glo.drift_norm), (bal.drift_abs, bal.drift_norm));
    }

    #[test]
    fn mean_drift_alone_matches_the_full_metrics() {
        // The imbalanced simplex above: drift_abs = √460/60, drift_norm = that / (√3/2).
        let (h, y, w) = etf_case(&[8, 4, 2, 1]);
        let (abs, nrm) = mean_drift(&h, y.len(), 4, &y, 4).unwrap();
        close(abs, 460f64.sqrt() / 60.0, 1e-12, "drift_abs");
        close(nrm, (460f64.sqrt() / 60.0) / (3f64.sqrt() / 2.0), 1e-12, "drift_norm");
        let full = neural_collapse(&input(&h, 4, &y, &y, &w, 4, &[], Centering::Global)).unwrap();
        assert_eq!((abs, nrm), (full.drift_abs, full.drift_norm));
        // 1-D by hand: class 0 at 0, 1, 2 (μ = 1), class 2 at 5; μ_G = 2, μ_B = 3:
        // drift_abs = 1, drift_norm = 1 / mean(2, 2) = ½. Class 1 is empty and ignored.
        assert_eq!(mean_drift(&[0.0, 1.0, 2.0, 5.0], 4, 1, &[0, 0, 0, 2], 3).unwrap(), (1.0, 0.5));
        // Degenerate inputs are errors, not NaN.
        assert!(matches!(mean_drift(&[1.0, 1.0], 2, 1, &[0, 1], 2), Err(MetricsError::DegenerateMeans)));
        assert!(matches!(mean_drift(&[1.0, 2.0], 2, 1, &[0, 0], 2), Err(MetricsError::TooFewClasses(1))));
        assert!(mean_drift(&[1.0], 2, 1, &[0, 1], 2).is_err());
    }

    /// Two non-empty classes in 1-D plus an empty class 1 (its W row must be ignored).
    ///
    /// Class 0: h = 0, 1, 2 → μ_0 = 1. Class 2: h = 5 → μ_2 = 5. N = 4, C' = 2.
    /// μ_G = (0+1+2+5)/4 = 2, μ_B = (1+5)/2 = 3.
    /// drift_abs = |2 − 3| = 1; drift_norm = 1 / mean(|1−3|, |5−3|) = 1/2.
    /// Σ_W = (1 + 0 + 1 + 0)/4 = 1/2.
    /// Global:   M = (−1, 3), Σ_B = (1 + 9)/2 = 5, NC1 = (Σ_W/Σ_B)/C' = (1/2 / 5)/2 = 1/20.
    ///           (Via the code path: MᵀM = [[1,−3],[−3,9]] has eigenvalues 10, 0; u = ±1;
    ///           Tr = C'·Σ_W/s² = 2·(1/2)/10 = 1/10; NC1 = Tr/C' = 1/20.)
    ///           Equinorm features: norms 1, 3 → std 1 / mean 2 = 1/2.
    ///           NC3 = ‖a − b‖² = 2 − 2a·b, a = (−1,2)/√5, b = (−1,3)/√10 → 2 − 14/√50.
    /// Balanced: M = (−2, 2), Σ_B = 4, NC1 = (1/2 / 4)/2 = 1/16; equinorm features 0;
    ///           NC3 = 2 − 2·(2 + 4)/(√5·√8) = 2 − 6/√10.
    /// Both:     W rows (−1), (2): norms 1, 2 → std 1/2 / mean 3/2 = 1/3. All cosines are −1 and
    ///           1/(C'−1) = 1, so both equiangularities are 0. Nearest means: 0→0, 1→0, 2→0
    ///           (|2−1| < |2−5|), 5→2; predictions (0, 0, 2, 2) disagree once: NC4 = 1/4.
    #[test]
    fn two_classes_one_dimension_by_hand() {
        let h = [0.0f32, 1.0, 2.0, 5.0];
        let y = [0u32, 0, 0, 2];
        let p = [0u32, 0, 2, 2];
        let w = [-1.0f32, 100.0, 2.0];
        let glo = neural_collapse(&input(&h, 1, &y, &p, &w, 3, &[1, 2], Centering::Global)).unwrap();
        let bal = neural_collapse(&input(&h, 1, &y, &p, &w, 3, &[1, 2], Centering::Balanced)).unwrap();
        close(glo.nc1, 1.0 / 20.0, 1e-12, "nc1 global");
        close(bal.nc1, 1.0 / 16.0, 1e-12, "nc1 balanced");
        close(glo.nc2_equinorm_features, 0.5, 1e-12, "equinorm global");
        assert!(bal.nc2_equinorm_features.abs() < 1e-15);
        close(glo.nc3, 2.0 - 14.0 / 50f64.sqrt(), 1e-9, "nc3 global");
        close(bal.nc3, 2.0 - 6.0 / 10f64.sqrt(), 1e-9, "nc3 balanced");
        for m in [&glo, &bal] {
            close(m.nc2_equinorm_classifier, 1.0 / 3.0, 1e-12, "equinorm classifier");
            assert!(m.nc2_equiangular_features.abs() < 1e-15, "{m:?}");
            assert!(m.nc2_equiangular_classifier.abs() < 1e-15, "{m:?}");
            assert_eq!(m.nc4, 0.25);
            assert_eq!(m.drift_abs, 1.0);
            assert_eq!(m.drift_norm, 0.5);
            // Minority [1, 2]: class 1 is empty, so only one class is left.
            assert_eq!(m.minority_cosine, None);
            assert_eq!(m.empty_classes, 1);
        }
        let m = neural_collapse(&input(&h, 1, &y, &p, &w, 3, &[2, 0, 2], Centering::Global)).unwrap();
        assert_eq!(m.minority_cosine, Some(-1.0));
    }

    #[test]
    fn rejects_bad_inputs() {
        let h = [0.0f32, 1.0, 2.0, 5.0];
        let y = [0u32, 0, 1, 1];
        let w = [1.0f32, -1.0];
        let ok = input(&h, 1, &y, &y, &w, 2, &[], Centering::Global);
        assert!(neural_collapse(&ok).is_ok());
        let e = |i: NcInput| neural_collapse(&i).unwrap_err();
        assert_eq!(e(NcInput { n: 0, features: &[], labels: &[], predictions: &[], ..ok }), MetricsError::NoSamples);
        assert!(matches!(e(NcInput { d: 2, ..ok }), MetricsError::Shape { what: "features", .. }));
        assert!(matches!(e(NcInput { predictions: &y[..3], ..ok }), MetricsError::Shape { what: "predictions", .. }));
        assert!(matches!(e(NcInput { classifier: &w[..1], ..ok }), MetricsError::Shape { what: "classifier", .. }));
        let y_bad = [0u32, 0, 1, 2];
        assert!(matches!(e(NcInput { labels: &y_bad, ..ok }), MetricsError::ClassOutOfRange { what: "labels", index: 3, .. }));
        assert!(matches!(e(NcInput { minority: &[5], ..ok }), MetricsError::ClassOutOfRange { what: "minority", .. }));
        let h_nan = [0.0f32, f32::NAN, 2.0, 5.0];
        assert_eq!(e(NcInput { features: &h_nan, ..ok }), MetricsError::NonFinite { what: "features", index: 1 });
        let y_one = [1u32; 4];
        assert_eq!(e(NcInput { labels: &y_one, ..ok }), MetricsError::TooFewClasses(1));
        let h_same = [1.0f32, 1.0, 1.0, 1.0];
        assert_eq!(e(NcInput { features: &h_same, ..ok }), MetricsError::DegenerateMeans);
        assert_eq!(e(NcInput { classifier: &[0.0, 0.0], ..ok }), MetricsError::ZeroClassifier);
    }

    #[derive(serde::Deserialize)]
    struct Case {
        n: usize,
        d: usize,
        num_classes: usize,
        features: Vec<f32>,
        labels: Vec<u32>,
        predictions: Vec<u32>,
        classifier: Vec<f32>,
        minority: Vec<usize>,
    }

    /// Reference numbers printed by `tests/reference/nc_metrics_reference.py` (numpy: full
    /// Σ_W and Σ_B, `numpy.linalg.pinv`, explicit loops), which also wrote the fixture
    /// `tests/reference/nc_case.json` (N = 60, D = 7, C = 5, counts 30/15/10/5/0).
    #[test]
    fn matches_numpy_reference() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/nc_case.json");
        let text = std::fs::read_to_string(path).unwrap();
        let case: Case = serde_json::from_str(&text).unwrap();
        let expected = [
            (
                Centering::Global,
                NcMetrics {
                    nc1: 0.8993977923840273,
                    nc2_equinorm_features: 0.39668466196646773,
                    nc2_equinorm_classifier: 0.13624783400053272,
                    nc2_equiangular_features: 0.4307973704246371,
                    nc2_equiangular_classifier: 0.46978201376731527,
                    nc3: 0.7632379091574711,
                    nc4: 0.18333333333333332,
                    drift_abs: 1.502129200000983,
                    drift_norm: 0.4709740394303622,
                    minority_cosine: Some(0.1613148860449102),
                    empty_classes: 1,
                },
            ),
            (
                Centering::Balanced,
                NcMetrics {
                    nc1: 0.9214446096155291,
                    nc2_equinorm_features: 0.233766672613018,
                    nc2_equinorm_classifier: 0.13624783400053272,
                    nc2_equiangular_features: 0.4550865479091914,
                    nc2_equiangular_classifier: 0.46978201376731527,
                    nc3: 0.6892328761581784,
                    nc4: 0.18333333333333332,
                    drift_abs: 1.502129200000983,
                    drift_norm: 0.4709740394303622,
                    minority_cosine: Some(0.1613148860449102),
                    empty_classes: 1,
                },
            ),
        ];
        for (centering, want) in expected {
            let got = neural_collapse(&NcInput {
                features: &case.features,
                n: case.n,
                d: case.d,
                labels: &case.labels,
                predictions: &case.predictions,
                classifier: &case.classifier,
                num_classes: case.num_classes,
                minority: &case.minority,
                centering,
            })
            .unwrap();
            let pairs = [
                ("nc1", got.nc1, want.nc1),
                ("nc2_equinorm_features", got.nc2_equinorm_features, want.nc2_equinorm_features),
                ("nc2_equinorm_classifier", got.nc2_equinorm_classifier, want.nc2_equinorm_classifier),
                ("nc2_equiangular_features", got.nc2_equiangular_features, want.nc2_equiangular_features),
                ("nc2_equiangular_classifier", got.nc2_equiangular_classifier, want.nc2_equiangular_classifier),
                ("nc3", got.nc3, want.nc3),
                ("nc4", got.nc4, want.nc4),
                ("drift_abs", got.drift_abs, want.drift_abs),
                ("drift_norm", got.drift_norm, want.drift_norm),
            ];
            for (name, g, w) in pairs {
                close(g, w, 1e-9, &format!("{centering:?} {name}"));
            }
            close(got.minority_cosine.unwrap(), want.minority_cosine.unwrap(), 1e-9, "minority_cosine");
            assert_eq!(got.empty_classes, want.empty_classes);
        }
    }

    #[test]
    fn independent_of_sample_order_and_chunking() {
        // More samples than one parallel chunk; reversing the order must not change anything
        // beyond rounding.
        let (n, d, c) = (3 * CHUNK + 17, 3, 3);
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) as f32 - 0.5
        };
        let labels: Vec<u32> = (0..n).map(|i| (i % c) as u32).collect();
        let features: Vec<f32> = (0..n * d).map(|k| next() + if k % d == (k / d) % c { 2.0 } else { 0.0 }).collect();
        let w: Vec<f32> = (0..c * d).map(|_| next()).collect();
        let preds: Vec<u32> = labels.iter().map(|&y| (y + (y == 2) as u32) % 3).collect();
        let a = neural_collapse(&input(&features, d, &labels, &preds, &w, c, &[0, 1], Centering::Global)).unwrap();
        let rev_f: Vec<f32> = features.chunks(d).rev().flatten().copied().collect();
        let rev_y: Vec<u32> = labels.iter().rev().copied().collect();
        let rev_p: Vec<u32> = preds.iter().rev().copied().collect();
        let b = neural_collapse(&input(&rev_f, d, &rev_y, &rev_p, &w, c, &[0, 1], Centering::Global)).unwrap();
        close(a.nc1, b.nc1, 1e-12, "nc1");
        close(a.nc3, b.nc3, 1e-12, "nc3");
        assert_eq!(a.nc4, b.nc4);
        assert!(a.nc4 > 0.3 && a.nc4 < 0.4, "class 2 is always mispredicted: {}", a.nc4);
    }
}
