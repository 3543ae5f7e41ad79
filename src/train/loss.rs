//! Classification losses and the feature "drift penalty", as differentiable candle expressions.
//!
//! The long-tail methods differ only in how the class priors enter the softmax, so all of them
//! live behind one `LossKind`: plain cross-entropy, focal loss, logit adjustment (Menon et al.
//! 2021) and balanced softmax (Ren et al. 2020). Everything goes through `log_softmax` so large
//! logits stay finite, and every loss is checked against finite differences in the tests.

use candle_core::{DType, Tensor, D};

/// Which classification loss to use; the mean over the batch is returned.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossKind {
    /// Cross-entropy −log p_y.
    Ce,
    /// Focal loss (1 − p_y)^γ · (−log p_y); γ = 0 is cross-entropy.
    Focal { gamma: f64 },
    /// Cross-entropy of the adjusted logits z + τ·log π, π = n/N the training class priors.
    LogitAdjustment { tau: f64 },
    /// Cross-entropy of z + log n, n the training class counts.
    BalancedSoftmax,
}

/// Floor for counts and probabilities before a logarithm: a class with no training examples
/// gets log(1e-12) rather than −∞ (as in the reference logit-adjustment code, log(π + 1e-12)).
const LOG_FLOOR: f64 = 1e-12;

/// Floor on 1 − p_y in the focal weight, so that a saturated prediction gives weight 0 and a
/// finite gradient instead of NaN.
const FOCAL_FLOOR: f64 = 1e-30;

/// Mean loss over the batch. `class_counts` are the training counts per class (priors π = n/N);
/// they are only read by the prior-corrected losses, which require one count per logit column.
///
/// `logits` is N×C (f32 or f64), `targets` N class indices (u32).
pub fn loss(kind: &LossKind, logits: &Tensor, targets: &Tensor, class_counts: &[usize]) -> candle_core::Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!("loss: targets {:?} do not match logits {:?}", targets.shape(), logits.shape());
    }
    let z = match kind {
        LossKind::Ce | LossKind::Focal { .. } => logits.clone(),
        LossKind::LogitAdjustment { tau } => {
            let total: usize = counts_for(class_counts, c)?.iter().sum();
            let offsets: Vec<f64> = class_counts.iter().map(|&k| tau * (k as f64 / total.max(1) as f64).max(LOG_FLOOR).ln()).collect();
            logits.broadcast_add(&row(offsets, logits)?)?
        }
        LossKind::BalancedSoftmax => {
            let offsets: Vec<f64> = counts_for(class_counts, c)?.iter().map(|&k| (k as f64).max(LOG_FLOOR).ln()).collect();
            logits.broadcast_add(&row(offsets, logits)?)?
        }
    };
    let logp = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let logp_y = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    match kind {
        LossKind::Focal { gamma } if *gamma != 0.0 => {
            // 1 − p_y as the sum of the other classes' probabilities: no cancellation when p_y≈1.
            let ys = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let mut others = vec![1.0f64; n * c];
            for (i, &y) in ys.iter().enumerate() {
                if y as usize >= c {
                    candle_core::bail!("loss: target {y} out of range for {c} classes");
                }
                others[i * c + y as usize] = 0.0;
            }
            let others = Tensor::from_vec(others, (n, c), logits.device())?.to_dtype(logits.dtype())?;
            let one_minus_p = (logp.exp()? * others)?.sum(1)?;
            let floor = Tensor::full(FOCAL_FLOOR, n, logits.device())?.to_dtype(logits.dtype())?;
            let weight = (one_minus_p.maximum(&floor)?.log()? * *gamma)?.exp()?;
            (weight * logp_y)?.mean_all()?.neg()
        }
        _ => logp_y.mean_all()?.neg(),
    }
}

fn counts_for(class_counts: &[usize], classes: usize) -> candle_core::Result<&[usize]> {
    if class_counts.len() != classes {
        candle_core::bail!("loss: {} class counts for {classes} logit columns", class_counts.len());
    }
    Ok(class_counts)
}

/// A 1×C row with the dtype and device of `like`.
fn row(values: Vec<f64>, like: &Tensor) -> candle_core::Result<Tensor> {
    let c = values.len();
    Tensor::from_vec(values, (1, c), like.device())?.to_dtype(like.dtype())
}

/// ‖mean of batch features − mean over the classes present in the batch of their class means‖²
/// (differentiable), the document's "drift penalty".
///
/// Both means are linear in the features, so the difference is w·F with
/// w_i = 1/N − 1/(K·n_{y_i}), K the number of classes present and n_c their batch counts; the
/// penalty is the squared norm of that D-vector. It is 0 when the batch is class-balanced.
pub fn drift_penalty(features: &Tensor, targets: &[u32], num_classes: usize) -> candle_core::Result<Tensor> {
    let (n, _) = features.dims2()?;
    if targets.len() != n || n == 0 {
        candle_core::bail!("drift_penalty: {} targets for {n} feature rows", targets.len());
    }
    let mut counts = vec![0usize; num_classes];
    for &y in targets {
        match counts.get_mut(y as usize) {
            Some(k) => *k += 1,
            None => candle_core::bail!("drift_penalty: target {y} out of range for {num_classes} classes"),
        }
    }
    let present = counts.iter().filter(|&&k| k > 0).count() as f64;
    let w: Vec<f64> = targets.iter().map(|&y| 1.0 / n as f64 - 1.0 / (present * counts[y as usize] as f64)).collect();
    let w = Tensor::from_vec(w, (1, n), features.device())?.to_dtype(features.dtype())?;
    w.matmul(features)?.sqr()?.sum_all()
}

/// One-hot rows (labels.len() × classes) of `labels`, in `dtype` on `device`.
pub fn one_hot(labels: &[u32], classes: usize, device: &candle_core::Device, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
    let mut v = vec![0f64; labels.len() * classes];
    for (i, &c) in labels.iter().enumerate() {
        v[i * classes + c as usize] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), classes), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(v: &[f64], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    fn all_kinds() -> Vec<LossKind> {
        vec![LossKind::Ce, LossKind::Focal { gamma: 2.0 }, LossKind::Focal { gamma: 0.5 }, LossKind::LogitAdjustment { tau: 1.0 }, LossKind::LogitAdjustment { tau: 0.7 }, LossKind::BalancedSoftmax]
    }

    #[test]
    fn hand_computed_values() {
        // Two samples, two classes, counts n = [1, 3] (π = [1/4, 3/4]).
        // A: z = [0, ln 3], y = 1 → p = [1/4, 3/4], p_y = 3/4.
        // B: z = [0, 0],    y = 0 → p = [1/2, 1/2], p_y = 1/2.
        let z = t2(&[0.0, 3f64.ln(), 0.0, 0.0], 2, 2);
        let y = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let counts = [1usize, 3];
        let l = |k: LossKind| scalar(&loss(&k, &z, &y, &counts).unwrap());
        // CE = (ln(4/3) + ln 2) / 2 = ln(8/3) / 2.
        assert!((l(LossKind::Ce) - (8.0f64 / 3.0).ln() / 2.0).abs() < 1e-12);
        // Focal γ=2: A (1/4)²·ln(4/3) = ln(4/3)/16, B (1/2)²·ln 2 = ln(2)/4; mean of the two.
        let focal = ((4.0f64 / 3.0).ln() / 16.0 + 2f64.ln() / 4.0) / 2.0;
        assert!((l(LossKind::Focal { gamma: 2.0 }) - focal).abs() < 1e-12);
        // Logit adjustment τ=1: z + ln π.
        // A: [ln(1/4), ln 3 + ln(3/4)] ∝ [1/4, 9/4] → p_y = 9/10.
        // B: [ln(1/4), ln(3/4)] → p_0 = 1/4.  Loss = (ln(10/9) + ln 4)/2 = ln(40/9)/2.
        let la = (40.0f64 / 9.0).ln() / 2.0;
        assert!((l(LossKind::LogitAdjustment { tau: 1.0 }) - la).abs() < 1e-12);
        // Balanced softmax: z + ln n = z + ln π + ln N, a per-row constant shift of the τ=1 case.
        assert!((l(LossKind::BalancedSoftmax) - la).abs() < 1e-12);
        // Focal with γ = 0 is cross-entropy.
        assert!((l(LossKind::Focal { gamma: 0.0 }) - l(LossKind::Ce)).abs() < 1e-15);
    }

    #[test]
    fn drift_penalty_hand_computed() {
        // f1 = [1,0], f2 = [3,0] (class 0), f3 = [0,3] (class 1).
        // Batch mean [4/3, 1]; class means [2,0], [0,3], their mean [1, 3/2].
        // Difference [1/3, −1/2]; penalty 1/9 + 1/4 = 13/36.
        let f = t2(&[1.0, 0.0, 3.0, 0.0, 0.0, 3.0], 3, 2);
        let p = scalar(&drift_penalty(&f, &[0, 0, 1], 4).unwrap());
        assert!((p - 13.0 / 36.0).abs() < 1e-12);
        // Balanced batch: both means coincide.
        let p = scalar(&drift_penalty(&f, &[0, 1, 2], 4).unwrap());
        assert!(p.abs() < 1e-12);
    }

    /// Compare candle's gradient of `f` at `x0` with central finite differences.
    fn check_grad(x0: &[f64], rows: usize, cols: usize, f: &dyn Fn(&Tensor) -> Tensor) {
        const EPS: f64 = 1e-6;
        let var = Var::from_tensor(&t2(x0, rows, cols)).unwrap();
        let out = f(var.as_tensor());
        let grads = out.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in 0..x0.len() {
            let mut plus = x0.to_vec();
            let mut minus = x0.to_vec();
            plus[i] += EPS;
            minus[i] -= EPS;
            let fp = scalar(&f(&t2(&plus, rows, cols)));
            let fm = scalar(&f(&t2(&minus, rows, cols)));
            let fd = (fp - fm) / (2.0 * EPS);
            assert!((fd - g[i]).abs() < 1e-6, "element {i}: autograd {} vs fd {fd}", g[i]);
        }
    }

    #[test]
    fn loss_gradients_match_finite_differences() {
        let z = [0.3, -1.2, 2.0, 0.1, 0.5, 0.5, -0.7, 1.5, -2.0, 0.0, 3.0, 1.0];
        let y = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let counts = [50usize, 5, 1, 0];
        for kind in all_kinds() {
            check_grad(&z, 3, 4, &|x| loss(&kind, x, &y, &counts).unwrap());
        }
    }

    #[test]
    fn drift_penalty_gradient_matches_finite_differences() {
        let f = [0.3, -1.2, 2.0, 0.1, 0.5, 0.5, -0.7, 1.5, -2.0, 0.0, 3.0, 1.0];
        check_grad(&f, 4, 3, &|x| drift_penalty(x, &[1, 1, 0, 2], 3).unwrap());
    }

    #[test]
    fn large_logits_stay_finite() {
        let z = t2(&[1000.0, -1000.0, 0.0, 500.0], 2, 2);
        let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        for kind in all_kinds() {
            let z = z.to_dtype(DType::F32).unwrap();
            let var = Var::from_tensor(&z).unwrap();
            let l = loss(&kind, var.as_tensor(), &y, &[3, 1]).unwrap();
            assert!(l.to_scalar::<f32>().unwrap().is_finite(), "{kind:?}");
            let g = l.backward().unwrap();
            let g = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{kind:?}: {g:?}");
        }
    }

    #[test]
    fn loss_kind_serde() {
        let k: LossKind = serde_json::from_str(r#"{"kind":"focal","gamma":2.0}"#).unwrap();
        assert_eq!(k, LossKind::Focal { gamma: 2.0 });
        let k: LossKind = serde_json::from_str(r#"{"kind":"balanced_softmax"}"#).unwrap();
        assert_eq!(k, LossKind::BalancedSoftmax);
        assert_eq!(serde_json::to_string(&LossKind::LogitAdjustment { tau: 1.0 }).unwrap(), r#"{"kind":"logit_adjustment","tau":1.0}"#);
    }
}
