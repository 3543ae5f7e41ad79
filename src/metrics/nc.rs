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
        Some(index) => {
            Err(MetricsError::ClassOutOfRange { what, index, value: xs[index] as usize, num_classes })
        }
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
    let NcInput { features, n, d, labels, predictions, classifier, num_classes, minority, .. } =
        *input;
    if n == 0 {
        return Err(MetricsError::NoSamples);
    }
    let nd = n.checked_mul(d).ok_or(MetricsError::Shape {
        what: "features",
        expected: usize::MAX,
        got: features.len(),
    })?;
    check_len("features", features.len(), nd)?;
    check_len("labels", labels.len(), n)?;
    check_len("predictions", predictions.len(), n)?;
    let cd = num_classes.checked_mul(d).ok_or(MetricsError::Shape {
        what: "classifier",
        expected: usize::MAX,
        got: classifier.len(),
    })?;
    check_len("classifier", classifier.len(), cd)?;
    check_classes("labels", labels, num_classes)?;
    check_classes("predictions", predictions, num_classes)?;
    if let Some(index) = minority.iter().position(|&m| m >= num_classes) {
        return Err(MetricsError::ClassOutOfRange {
            what: "minority",
            index,
            value: minority[index],
            num_classes,
        });
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

/// Computes NC1–NC4, drift and minority collapse as defined in [`crate::metrics`].
pub fn neural_collapse(input: &NcInput) -> Result<NcMetrics, MetricsError> {
    validate(input)?;
    let NcInput { features, n, d, labels, predictions, classifier, num_classes, minority, centering } =
        *input;
    let row = |i: usize| &features[i * d..(i + 1) * d];

    // Class counts and means, over the classes that have samples.
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
    // slot[c] = position of class c among the non-empty classes.
    let mut slot = vec![usize::MAX; num_classes];
    for (k, &c) in present.iter().enumerate() {
        slot[c] = k;
    }
    let means: Vec<Vec<f64>> = present
        .iter()
        .map(|&c| sums[c * d..(c + 1) * d].iter().map(|s| s / counts[c] as f64).collect())
        .collect();
    let mut mu_g = vec![0.0; d];
    let mut mu_b = vec![0.0; d];
    for (k, &c) in present.iter().enumerate() {
        for j in 0..d {
            mu_g[j] += counts[c] as f64 * means[k][j] / n as f64;
            mu_b[j] += means[k][j] / cp as f64;
        }
    }
    let centre = match centering {
        Centering::Global => &mu_g,
        Centering::Balanced => &mu_b,
    };
    // Rows of Mᵀ: the centred class means μ_c − μ̄.
    let mt: Vec<Vec<f64>> =
        means.iter().map(|m| m.iter().zip(centre).map(|(a, b)| a - b).collect()).collect();
    let m_fro = mt.iter().map(|v| dot(v, v)).sum::<f64>().sqrt();
    if m_fro == 0.0 {
        return Err(MetricsError::DegenerateMeans);
    }
    let w: Vec<Vec<f64>> = present
        .iter()
        .map(|&c| classifier[c * d..(c + 1) * d].iter().map(|&x| f64::from(x)).collect())
        .collect();
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
    let trace = cp as f64
        * basis.iter().zip(&proj).map(|((_, s2), p)| (p / n as f64) / s2).sum::<f64>();
    let nc1 = trace / cp as f64;

    // NC2.
    let feat_norms: Vec<f64> = mt.iter().map(|v| norm(v)).collect();
    let w_norms: Vec<f64> = w.iter().map(|v| norm(v)).collect();
    // Means are positive: M ≠ 0 and W ≠ 0 were checked above.
    let nc2_equinorm_features = std_over_mean(&feat_norms).ok_or(MetricsError::DegenerateMeans)?;
    let nc2_equinorm_classifier = std_over_mean(&w_norms).ok_or(MetricsError::ZeroClassifier)?;
    let target = 1.0 / (cp as f64 - 1.0);
    // |cos + 1/(C'−1)| is symmetric, so the mean over ordered pairs equals that over a < b.
    let nc2_equiangular_features =
        mean_over_pairs(cp, |a, b| (cosine(&mt[a], &mt[b]) + target).abs());
    let nc2_equiangular_classifier =
        mean_over_pairs(cp, |a, b| (cosine(&w[a], &w[b]) + target).abs());

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

    // Drift of the global mean away from the class-balanced mean.
    let drift_abs = norm(&mu_g.iter().zip(&mu_b).map(|(g, b)| g - b).collect::<Vec<_>>());
    let spread = means
        .iter()
        .map(|m| norm(&m.iter().zip(&mu_b).map(|(a, b)| a - b).collect::<Vec<_>>()))
        .sum::<f64>()
        / cp as f64;
    // spread > 0: if every μ_c equalled μ_B, all means would coincide and so would μ_G, making
    // M = 0 under either centering, which was rejected above.
    let drift_norm = drift_abs / spread;

    // Minority collapse among the non-empty minority classes.
    let mut mins: Vec<usize> =
        minority.iter().copied().filter(|&c| counts[c] > 0).collect();
    mins.sort_unstable();
    mins.dedup();
    let minority_cosine = (mins.len() >= 2).then(|| {
        mean_over_pairs(mins.len(), |a, b| cosine(&w[slot[mins[a]]], &w[slot[mins[b]]]))
    });

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
