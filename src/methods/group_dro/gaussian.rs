//! Gaussians for the class anchors of document 003: the squared 2-Wasserstein distance between
//! two Gaussians with its exact gradient, batch moments, and the anchor covariance.
//!
//! W2²(N(μ₁, Σ₁), N(μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (A^½ Σ₁ A^½)^½ with A = Σ₂.
//! The document's code returns this squared distance and calls it W2; we name it W2².
//!
//! **Gradient.** With M = A^½ Σ₁ A^½ and the optimal transport map T = A^½ M^{−½} A^½ (from
//! N(·, Σ₁) to N(·, Σ₂)): ∂W2²/∂Σ₁ = I − T, ∂W2²/∂Σ₂ = I − T⁻¹ with T⁻¹ = A^{−½} M^½ A^{−½},
//! ∂W2²/∂μ₁ = 2(μ₁ − μ₂) = −∂W2²/∂μ₂. Every matrix function comes from one symmetric eigen-
//! decomposition (cyclic Jacobi, accurate to the last bits on the small eigenvalues of a
//! rank-deficient batch covariance + εI, where Newton–Schulz iterations converge slowly): two per
//! distance, no iteration count to tune. The training step injects these gradients into the
//! autograd graph as a linear surrogate (⟨G, X⟩ with G constant has gradient G), so candle never
//! differentiates a matrix square root. Tests check the closed forms and the gradients against
//! finite differences.

use crate::metrics::linalg::{jacobi_eigen, SymEigen};

/// `V f(Λ) Vᵀ` for the eigen-decomposition of a symmetric `d×d` matrix.
fn apply(e: &SymEigen, d: usize, f: impl Fn(f64) -> f64) -> Vec<f64> {
    let fl: Vec<f64> = e.values.iter().map(|&l| f(l)).collect();
    let v = &e.vectors;
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in i..d {
            let s: f64 = (0..d).map(|k| v[i * d + k] * fl[k] * v[j * d + k]).sum();
            out[i * d + j] = s;
            out[j * d + i] = s;
        }
    }
    out
}

/// `a · b` for row-major `d×d` matrices.
pub fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

/// `(a + aᵀ) / 2`: removes the rounding asymmetry of a product that is symmetric in exact
/// arithmetic.
fn symmetrize(a: &mut [f64], d: usize) {
    for i in 0..d {
        for j in (i + 1)..d {
            let s = 0.5 * (a[i * d + j] + a[j * d + i]);
            a[i * d + j] = s;
            a[j * d + i] = s;
        }
    }
}

/// The principal square root of a symmetric positive semi-definite `d×d` matrix (eigenvalues
/// below zero, from rounding, count as zero).
pub fn sqrtm(a: &[f64], d: usize) -> Vec<f64> {
    apply(&jacobi_eigen(a, d), d, |l| l.max(0.0).sqrt())
}

/// W2² between two Gaussians and its gradient with respect to each mean and covariance.
#[derive(Debug, Clone, PartialEq)]
pub struct W2 {
    pub value: f64,
    pub grad_mean1: Vec<f64>,
    /// Symmetric `d×d`.
    pub grad_cov1: Vec<f64>,
    pub grad_mean2: Vec<f64>,
    pub grad_cov2: Vec<f64>,
}

/// W2²(N(mean1, cov1), N(mean2, cov2)) for `d`-dimensional Gaussians with positive definite
/// covariances (row-major `d×d`), with its gradient (see the module's notes).
pub fn w2_squared(mean1: &[f64], cov1: &[f64], mean2: &[f64], cov2: &[f64], d: usize) -> W2 {
    let ea = jacobi_eigen(cov2, d);
    let floor = f64::MIN_POSITIVE;
    let a_half = apply(&ea, d, |l| l.max(0.0).sqrt());
    let a_ihalf = apply(&ea, d, |l| 1.0 / l.max(floor).sqrt());
    let mut m = matmul(&matmul(&a_half, cov1, d), &a_half, d);
    symmetrize(&mut m, d);
    let em = jacobi_eigen(&m, d);
    let tr_sqrt_m: f64 = em.values.iter().map(|l| l.max(0.0).sqrt()).sum();
    let trace = |a: &[f64]| (0..d).map(|i| a[i * d + i]).sum::<f64>();
    let diff: Vec<f64> = mean1.iter().zip(mean2).map(|(a, b)| a - b).collect();
    let value = diff.iter().map(|x| x * x).sum::<f64>() + trace(cov1) + trace(cov2) - 2.0 * tr_sqrt_m;

    let m_half = apply(&em, d, |l| l.max(0.0).sqrt());
    let m_ihalf = apply(&em, d, |l| 1.0 / l.max(floor).sqrt());
    let t = matmul(&matmul(&a_half, &m_ihalf, d), &a_half, d);
    let t_inv = matmul(&matmul(&a_ihalf, &m_half, d), &a_ihalf, d);
    let identity_minus = |x: &[f64]| {
        let mut g: Vec<f64> = x.iter().map(|v| -v).collect();
        for i in 0..d {
            g[i * d + i] += 1.0;
        }
        symmetrize(&mut g, d);
        g
    };
    W2 {
        // Rounding can take a zero distance a hair below zero.
        value: value.max(0.0),
        grad_mean1: diff.iter().map(|x| 2.0 * x).collect(),
        grad_cov1: identity_minus(&t),
        grad_mean2: diff.iter().map(|x| -2.0 * x).collect(),
        grad_cov2: identity_minus(&t_inv),
    }
}

/// The mean and unbiased covariance (+ εI) of `n` rows of `d` values (the document's
/// `losses.py`); `None` below two rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub n: usize,
    pub mean: Vec<f64>,
    pub cov: Vec<f64>,
}

pub fn batch_moments(rows: &[&[f64]], d: usize, eps: f64) -> Option<Moments> {
    let n = rows.len();
    if n < 2 {
        return None;
    }
    let mut mean = vec![0.0; d];
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r.iter()) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0.0; d * d];
    for r in rows {
        for i in 0..d {
            let ci = r[i] - mean[i];
            for j in i..d {
                cov[i * d + j] += ci * (r[j] - mean[j]);
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / (n - 1) as f64 + if i == j { eps } else { 0.0 };
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    Some(Moments { n, mean, cov })
}

/// The gradient with respect to each row of a loss's gradient `(grad_mean, grad_cov)` with
/// respect to the rows' [`batch_moments`]: g_i = g_μ/n + 2 G_Σ (z_i − μ)/(n − 1) for symmetric
/// G_Σ. `d` values per row, in the rows' order.
pub fn moments_backward(rows: &[&[f64]], m: &Moments, grad_mean: &[f64], grad_cov: &[f64], d: usize) -> Vec<Vec<f64>> {
    let n = m.n as f64;
    rows.iter()
        .map(|r| {
            let c: Vec<f64> = r.iter().zip(&m.mean).map(|(z, mu)| z - mu).collect();
            (0..d).map(|i| grad_mean[i] / n + 2.0 / (n - 1.0) * (0..d).map(|j| grad_cov[i * d + j] * c[j]).sum::<f64>()).collect()
        })
        .collect()
}

/// An anchor's covariance S = L Lᵀ + εI from its factor `l` (row-major `d×d`).
pub fn anchor_cov(l: &[f64], d: usize, eps: f64) -> Vec<f64> {
    let mut s = vec![0.0; d * d];
    for i in 0..d {
        for j in i..d {
            let v = (0..d).map(|k| l[i * d + k] * l[j * d + k]).sum::<f64>() + if i == j { eps } else { 0.0 };
            s[i * d + j] = v;
            s[j * d + i] = v;
        }
    }
    s
}

/// The gradient with respect to L of a loss with symmetric gradient G with respect to
/// S = L Lᵀ + εI: (G + Gᵀ) L = 2 G L.
pub fn anchor_cov_backward(l: &[f64], grad_cov: &[f64], d: usize) -> Vec<f64> {
    matmul(grad_cov, l, d).into_iter().map(|v| 2.0 * v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_spd(rng: &mut Rng, d: usize, cond: f64) -> Vec<f64> {
        // Q diag(λ) Qᵀ with Q from the eigenvectors of a random symmetric matrix and λ spread
        // log-uniformly over [1/cond, 1].
        let mut s: Vec<f64> = (0..d * d).map(|_| rng.normal()).collect();
        symmetrize(&mut s, d);
        let q = jacobi_eigen(&s, d).vectors;
        let lambdas: Vec<f64> = (0..d).map(|k| cond.powf(-(k as f64) / (d - 1).max(1) as f64)).collect();
        let mut a = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = (0..d).map(|k| q[i * d + k] * lambdas[k] * q[j * d + k]).sum();
            }
        }
        symmetrize(&mut a, d);
        a
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn diag(v: &[f64]) -> Vec<f64> {
        let d = v.len();
        let mut a = vec![0.0; d * d];
        for i in 0..d {
            a[i * d + i] = v[i];
        }
        a
    }

    #[test]
    fn the_square_root_squares_back_even_when_ill_conditioned_or_rank_deficient() {
        let mut rng = Rng::derive(1, "sqrtm-test");
        for (d, cond) in [(4, 10.0), (16, 1e4), (64, 1e4)] {
            let a = random_spd(&mut rng, d, cond);
            let r = sqrtm(&a, d);
            assert!(max_abs_diff(&matmul(&r, &r, d), &a) < 1e-12, "d {d} cond {cond}");
        }
        // A batch covariance of 3 samples in 16 dimensions (rank 2) + 1e-4 I: the small
        // eigenvalues must come out as √1e-4, not under-estimated.
        let rows: Vec<Vec<f64>> = (0..3).map(|_| (0..16).map(|_| rng.normal()).collect()).collect();
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        let m = batch_moments(&refs, 16, 1e-4).unwrap();
        let r = sqrtm(&m.cov, 16);
        assert!(max_abs_diff(&matmul(&r, &r, 16), &m.cov) < 1e-12);
        let e = jacobi_eigen(&r, 16);
        let small = e.values.iter().filter(|&&l| (l - 1e-2).abs() < 1e-9).count();
        assert_eq!(small, 14, "eigenvalues of the root: {:?}", e.values);
    }

    #[test]
    fn w2_meets_its_closed_forms() {
        let mut rng = Rng::derive(2, "w2-test");
        let d = 5;
        let a = random_spd(&mut rng, d, 100.0);
        let b = random_spd(&mut rng, d, 100.0);
        let mu1: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let mu2: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        // Identical Gaussians: 0.
        assert!(w2_squared(&mu1, &a, &mu1, &a, d).value < 1e-12);
        // Equal covariances: the squared distance of the means.
        let dist: f64 = mu1.iter().zip(&mu2).map(|(x, y)| (x - y).powi(2)).sum();
        assert!((w2_squared(&mu1, &a, &mu2, &a, d).value - dist).abs() < 1e-12);
        // Diagonal covariances: Σ (√aᵢ − √bᵢ)².
        let (da, db) = ([1.0, 4.0, 9.0, 0.25, 2.0], [4.0, 1.0, 9.0, 1.0, 8.0]);
        let want: f64 = da.iter().zip(&db).map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2)).sum();
        assert!((w2_squared(&[0.0; 5], &diag(&da), &[0.0; 5], &diag(&db), d).value - want).abs() < 1e-12);
        // One dimension: (μ₁ − μ₂)² + (σ₁ − σ₂)².
        let w = w2_squared(&[1.0], &[4.0], &[-2.0], &[0.25], 1);
        assert!((w.value - (9.0 + 1.5f64.powi(2))).abs() < 1e-12);
        // Symmetric and non-negative.
        let (x, y) = (w2_squared(&mu1, &a, &mu2, &b, d).value, w2_squared(&mu2, &b, &mu1, &a, d).value);
        assert!((x - y).abs() < 1e-10 && x > 0.0, "{x} {y}");
    }

    /// The directional derivative of `f` along the symmetric perturbation E_ij + E_ji (E_ii on
    /// the diagonal), by central differences.
    fn fd_sym(f: &dyn Fn(&[f64]) -> f64, x: &[f64], d: usize, i: usize, j: usize, h: f64) -> f64 {
        let mut p = x.to_vec();
        let mut m = x.to_vec();
        p[i * d + j] += h;
        m[i * d + j] -= h;
        if i != j {
            p[j * d + i] += h;
            m[j * d + i] -= h;
        }
        (f(&p) - f(&m)) / (2.0 * h)
    }

    #[test]
    fn w2_gradients_match_finite_differences() {
        let mut rng = Rng::derive(3, "w2-grad");
        let d = 4;
        let a = random_spd(&mut rng, d, 50.0);
        let b = random_spd(&mut rng, d, 50.0);
        let mu1: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let mu2: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let w = w2_squared(&mu1, &a, &mu2, &b, d);
        let h = 1e-6;
        for i in 0..d {
            for j in i..d {
                // The gradient's entries appear twice off the diagonal.
                let k = if i == j { 1.0 } else { 2.0 };
                let f1 = |s: &[f64]| w2_squared(&mu1, s, &mu2, &b, d).value;
                let f2 = |s: &[f64]| w2_squared(&mu1, &a, &mu2, s, d).value;
                assert!((fd_sym(&f1, &a, d, i, j, h) - k * w.grad_cov1[i * d + j]).abs() < 1e-6, "cov1 ({i},{j})");
                assert!((fd_sym(&f2, &b, d, i, j, h) - k * w.grad_cov2[i * d + j]).abs() < 1e-6, "cov2 ({i},{j})");
            }
            let mut p = mu1.clone();
            p[i] += h;
            let mut m = mu1.clone();
            m[i] -= h;
            let fd = (w2_squared(&p, &a, &mu2, &b, d).value - w2_squared(&m, &a, &mu2, &b, d).value) / (2.0 * h);
            assert!((fd - w.grad_mean1[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn the_chain_through_batch_moments_and_the_anchor_factor_matches_finite_differences() {
        // The loss the training step differentiates: W2²(moments(z), N(m, L Lᵀ + εI)), with a
        // rank-deficient batch covariance (3 rows in 4 dimensions).
        let mut rng = Rng::derive(4, "w2-chain");
        let (d, n, eps) = (4, 3, 1e-4);
        let z: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let l: Vec<f64> = (0..d * d).map(|_| 0.5 * rng.normal()).collect();
        let m: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let loss = |z: &[f64], l: &[f64]| {
            let rows: Vec<&[f64]> = z.chunks(d).collect();
            let mo = batch_moments(&rows, d, eps).unwrap();
            w2_squared(&mo.mean, &mo.cov, &m, &anchor_cov(l, d, eps), d)
        };
        let rows: Vec<&[f64]> = z.chunks(d).collect();
        let mo = batch_moments(&rows, d, eps).unwrap();
        let w = loss(&z, &l);
        let gz: Vec<f64> = moments_backward(&rows, &mo, &w.grad_mean1, &w.grad_cov1, d).concat();
        let gl = anchor_cov_backward(&l, &w.grad_cov2, d);
        let h = 1e-6;
        for k in 0..n * d {
            let (mut p, mut q) = (z.clone(), z.clone());
            p[k] += h;
            q[k] -= h;
            let fd = (loss(&p, &l).value - loss(&q, &l).value) / (2.0 * h);
            assert!((fd - gz[k]).abs() < 1e-5, "z[{k}]: fd {fd} vs {}", gz[k]);
        }
        for k in 0..d * d {
            let (mut p, mut q) = (l.clone(), l.clone());
            p[k] += h;
            q[k] -= h;
            let fd = (loss(&z, &p).value - loss(&z, &q).value) / (2.0 * h);
            assert!((fd - gl[k]).abs() < 1e-5, "L[{k}]: fd {fd} vs {}", gl[k]);
        }
    }

    #[test]
    fn batch_moments_are_unbiased_and_need_two_rows() {
        let rows: [&[f64]; 3] = [&[1.0, 0.0], &[3.0, 2.0], &[2.0, 4.0]];
        let m = batch_moments(&rows, 2, 0.5).unwrap();
        assert_eq!(m.mean, vec![2.0, 2.0]);
        // Deviations (−1,−2), (1,0), (0,2): Σ = [[2, 2], [2, 8]] / 2, + 0.5 on the diagonal.
        assert_eq!(m.cov, vec![1.5, 1.0, 1.0, 4.5]);
        assert!(batch_moments(&rows[..1], 2, 0.5).is_none());
    }
}
