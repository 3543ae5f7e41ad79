//! The losses and maps of WAMAL and MAXL, each a small differentiable function of tensors.
//!
//! * [`masked_softmax`]: the generated auxiliary label ŷ = exp(a) ⊙ m / (Σ exp(a) ⊙ m + 1e-12),
//!   m the 0/1 mask of the primary class's block (MAXL's `mask_softmax`, with WAMAL's exact 0
//!   off the block).
//! * [`log2_weight`] / [`weight`]: w = 2^(2R·s − R) from the weight head's sigmoid s (R = 15 in the
//!   public code): w ∈ [2^−R, 2^R], w = 1 at s = ½.
//! * [`focal`]: the loss both public codes train with everywhere, a focal loss on probabilities
//!   with soft targets, ℓ(p, t) = −Σ_k t_k (1 − p_k)^γ log(p_k + 1e-20), γ = 2. It is not
//!   cross-entropy (γ = 0 would be).
//! * [`focal_difference`]: ℓ(p⁺, t) − ℓ(p⁻, t) of two sets of logits against the same targets.
//! * [`neg_entropy`]: Σ_k ȳ_k log(ȳ_k + 1e-20) of the batch-mean generated label ȳ, the **negative**
//!   entropy: minimising it spreads the generated labels over the auxiliary classes.

use candle_core::{Result, Tensor, D};

/// The additive constant inside the logarithms of [`focal`] and [`neg_entropy`] (the public code's).
pub const LOG_EPS: f64 = 1e-20;

/// ŷ: the softmax of `logits` (N×K) restricted to each row's block (`mask`, N×K of 0/1), exactly 0
/// off the block, with 1e-12 added to the denominator as in the public code. The exponentials
/// are shifted by each row's largest in-block logit (a constant of the graph), which changes
/// nothing but the scale of that 1e-12.
pub fn masked_softmax(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    // Each row's largest in-block logit, on the device: off-block entries are pushed far below
    // (a row without a block gets a shift of 0, as before).
    let detached = logits.detach();
    let off = (mask.affine(-1.0, 1.0)? * 1e30)?;
    let masked_max = (&detached - &off)?.max_keepdim(D::Minus1)?;
    let any = mask.max_keepdim(D::Minus1)?;
    let shift = (masked_max * &any)?;
    let e = (logits.broadcast_sub(&shift)?.exp()? * mask)?;
    let denom = (e.sum_keepdim(D::Minus1)? + 1e-12)?;
    e.broadcast_div(&denom)
}

/// log₂ w = 2R·s − R for the weight head's s ∈ [0, 1].
pub fn log2_weight(s: &Tensor, range: f64) -> Result<Tensor> {
    s.affine(2.0 * range, -range)
}

/// w = 2^(2R·s − R).
pub fn weight(s: &Tensor, range: f64) -> Result<Tensor> {
    (log2_weight(s, range)? * std::f64::consts::LN_2)?.exp()
}

/// Per-sample focal loss on probabilities (N): p = softmax(`logits`), `targets` N×K (one-hot or
/// soft), ℓ_i = −Σ_k t_ik (1 − p_ik)^γ log(p_ik + 1e-20).
pub fn focal(logits: &Tensor, targets: &Tensor, gamma: f64) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(logits, D::Minus1)?;
    let factor = if gamma == 2.0 { p.affine(-1.0, 1.0)?.sqr()? } else { p.affine(-1.0, 1.0)?.powf(gamma)? };
    let logp = (p + LOG_EPS)?.log()?;
    ((targets * factor)? * logp)?.sum(D::Minus1)?.neg()
}

/// ℓ(p⁺, t) − ℓ(p⁻, t) per sample (N) for the same targets, p± = softmax of `plus` and `minus`:
/// −Σ_k t_ik ((1 − p⁺_ik)^γ log(p⁺_ik + 1e-20) − (1 − p⁻_ik)^γ log(p⁻_ik + 1e-20)). The focal loss
/// is linear in the targets, so the targets enter once, multiplying the difference of the two
/// logits' terms.
pub fn focal_difference(plus: &Tensor, minus: &Tensor, targets: &Tensor, gamma: f64) -> Result<Tensor> {
    let terms = |logits: &Tensor| -> Result<Tensor> {
        let p = candle_nn::ops::softmax(logits, D::Minus1)?;
        let factor = if gamma == 2.0 { p.affine(-1.0, 1.0)?.sqr()? } else { p.affine(-1.0, 1.0)?.powf(gamma)? };
        factor * (p + LOG_EPS)?.log()?
    };
    (targets * (terms(plus)? - terms(minus)?)?)?.sum(D::Minus1)?.neg()
}

/// Σ_k ȳ_k log(ȳ_k + 1e-20), ȳ the mean of the rows of `labels` (N×K): −log K at a uniform ȳ, 0
/// when every row puts all its mass on one and the same class.
pub fn neg_entropy(labels: &Tensor) -> Result<Tensor> {
    let mean = labels.mean(0)?;
    (&mean * (&mean + LOG_EPS)?.log()?)?.sum_all()
}
