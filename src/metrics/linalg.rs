//! The little dense linear algebra the metrics need: a cyclic Jacobi eigen-decomposition of a
//! small symmetric matrix (the C'×C' Gram matrix of centred class means) and vector helpers.

/// Eigen-decomposition `A = V diag(values) Vᵀ` of a symmetric `n×n` matrix.
#[derive(Debug, Clone)]
pub(crate) struct SymEigen {
    /// Eigenvalues, in no particular order; `values[k]` belongs to column `k` of `vectors`.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors as the columns of an `n×n` row-major matrix.
    pub vectors: Vec<f64>,
}

/// Cyclic Jacobi rotations on a symmetric `n×n` row-major matrix (only symmetric input is
/// meaningful; the upper triangle drives the rotations). Sweeps until the off-diagonal mass is
/// below `1e-30` of the total squared Frobenius norm (i.e. 1e-15 relative), at most 100 sweeps.
pub(crate) fn jacobi_eigen(matrix: &[f64], n: usize) -> SymEigen {
    assert_eq!(matrix.len(), n * n, "jacobi_eigen: matrix is not n×n");
    let mut a = matrix.to_vec();
    let mut v = vec![0.0; n * n];
    for k in 0..n {
        v[k * n + k] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let mut off = 0.0;
        for p in 0..n {
            for q in (p + 1)..n {
                off += 2.0 * a[p * n + q] * a[p * n + q];
            }
        }
        if off == 0.0 || off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let app = a[p * n + p];
                let aqq = a[q * n + q];
                // Rotation J (J_pp = J_qq = c, J_pq = s, J_qp = -s) with (JᵀAJ)_pq = 0:
                // t = tan(angle) is the smaller root of t² + 2θt − 1 = 0.
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + theta.hypot(1.0));
                let c = 1.0 / t.hypot(1.0);
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    SymEigen { values: (0..n).map(|k| a[k * n + k]).collect(), vectors: v }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Cosine similarity; by convention 0 when either vector is zero (the angle is undefined).
pub(crate) fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot(a, b) / (na * nb)
    }
}

/// Population coefficient of variation `std / mean`; `None` when the mean is zero.
pub(crate) fn std_over_mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if mean == 0.0 {
        return None;
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Some(var.sqrt() / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_symmetric_matrix() {
        let n = 4;
        let a = [
            4.0, 1.0, -2.0, 0.5, //
            1.0, 3.0, 0.0, 1.5, //
            -2.0, 0.0, 5.0, -1.0, //
            0.5, 1.5, -1.0, 2.0,
        ];
        let e = jacobi_eigen(&a, n);
        for i in 0..n {
            for j in 0..n {
                let rec: f64 = (0..n).map(|k| e.vectors[i * n + k] * e.values[k] * e.vectors[j * n + k]).sum();
                assert!((rec - a[i * n + j]).abs() < 1e-12, "A[{i}][{j}]");
                let orth: f64 = (0..n).map(|k| e.vectors[k * n + i] * e.vectors[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((orth - want).abs() < 1e-12, "VᵀV[{i}][{j}]");
            }
        }
        // Trace is preserved.
        assert!((e.values.iter().sum::<f64>() - 14.0).abs() < 1e-12);
    }

    #[test]
    fn jacobi_2x2_known_eigenvalues() {
        // [[2,1],[1,2]] has eigenvalues 1 and 3.
        let mut vals = jacobi_eigen(&[2.0, 1.0, 1.0, 2.0], 2).values;
        vals.sort_by(f64::total_cmp);
        assert!((vals[0] - 1.0).abs() < 1e-14 && (vals[1] - 3.0).abs() < 1e-14);
    }

    #[test]
    fn cosine_and_cv_conventions() {
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 0.0], &[-2.0, 0.0]) + 1.0).abs() < 1e-15);
        assert_eq!(std_over_mean(&[0.0, 0.0]), None);
        // [1, 3]: mean 2, population std 1.
        assert_eq!(std_over_mean(&[1.0, 3.0]), Some(0.5));
    }
}
