//! The GroupDRO state: the group weights q, their update rules and the training objectives.
//!
//! Updates (ℓ_g the mean loss of group g in the batch; a group absent from the batch has none):
//! - `exp`: q ← normalise(q ⊙ exp(η ℓ)), an absent group's multiplier 1 (Sagawa et al. 2020);
//! - `softmax`: q ← softmax(η ℓ) over the present groups, absent ones 0: no memory;
//! - `exp_smooth`: q ← (1 − γ) q + γ · exp-update(q) (the document's default). The document's
//!   tuning guide says a *higher* γ smooths more; by this formula, its own, γ = 1 is the plain
//!   multiplicative update and γ → 0 freezes q, so a higher γ smooths *less*.
//!
//! Objectives over the present groups: `weighted` Σ q_g ℓ_g (q a constant), `max` max_g ℓ_g
//! (with its gradient: the document's code detaches it, which leaves nothing to train), and
//! `logsumexp` (1/η) log Σ exp(η ℓ_g), whose gradient weights are softmax(η ℓ).

use candle_core::Tensor;

/// How q follows the group losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateMode {
    Exp,
    Softmax,
    ExpSmooth,
}

/// What the network minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Weighted,
    Max,
    Logsumexp,
}

/// One multiplicative-weights step: q ⊙ exp(η ℓ) normalised, absent groups ×1. Computed with
/// the largest exponent subtracted, so a large η ℓ cannot overflow.
fn exp_update(q: &[f64], losses: &[Option<f64>], eta: f64) -> Vec<f64> {
    let top = losses.iter().flatten().map(|l| eta * l).fold(0.0f64, f64::max);
    let raw: Vec<f64> = q.iter().zip(losses).map(|(q, l)| q * (eta * l.unwrap_or(0.0) - top).exp()).collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|v| v / total).collect()
}

/// q after one update with this batch's group losses (`None`: the group is absent).
pub fn update(q: &[f64], losses: &[Option<f64>], mode: UpdateMode, eta: f64, gamma: f64) -> Vec<f64> {
    if losses.iter().all(Option::is_none) {
        return q.to_vec();
    }
    match mode {
        UpdateMode::Exp => exp_update(q, losses, eta),
        UpdateMode::Softmax => {
            let present: Vec<f64> = losses.iter().map(|l| if l.is_some() { 1.0 } else { 0.0 }).collect();
            exp_update(&present, losses, eta)
        }
        UpdateMode::ExpSmooth => {
            let mwu = exp_update(q, losses, eta);
            q.iter().zip(&mwu).map(|(old, new)| (1.0 - gamma) * old + gamma * new).collect()
        }
    }
}

/// The objective over the present groups' mean losses (`losses[g]`, scalar tensors), with the
/// weights `q` for `weighted` and the temperature `eta` for `logsumexp`.
pub fn objective(kind: Objective, q: &[f64], losses: &[Option<Tensor>], eta: f64) -> candle_core::Result<Tensor> {
    let present: Vec<(usize, &Tensor)> = losses.iter().enumerate().filter_map(|(g, l)| l.as_ref().map(|l| (g, l))).collect();
    let Some(&(_, first)) = present.first() else { candle_core::bail!("GroupDRO objective: the batch holds no group") };
    match kind {
        Objective::Weighted => {
            let mut total = (first * q[present[0].0])?;
            for &(g, l) in &present[1..] {
                total = (total + (l * q[g])?)?;
            }
            Ok(total)
        }
        Objective::Max => {
            let values: Vec<f64> = present.iter().map(|(_, l)| l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()).collect::<candle_core::Result<_>>()?;
            // The first of the largest, so ties resolve the same way on every run.
            let best = (0..values.len()).fold(0, |b, i| if values[i] > values[b] { i } else { b });
            Ok(present[best].1.clone())
        }
        Objective::Logsumexp => {
            let stacked = Tensor::stack(&present.iter().map(|(_, l)| (*l).clone()).collect::<Vec<_>>(), 0)?;
            let scaled = (stacked * eta)?;
            let top = scaled.max(0)?.detach();
            let lse = (scaled.broadcast_sub(&top)?.exp()?.sum(0)?.log()? + top)?;
            lse / eta
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn q_updates_match_the_hand_computed_values() {
        let l = [Some(1.0), Some(2.0)];
        let half = [0.5, 0.5];
        assert!(close(&update(&half, &l, UpdateMode::Exp, 0.01, 0.0), &[0.497500, 0.502500], 1e-6));
        assert!(close(&update(&half, &l, UpdateMode::ExpSmooth, 0.01, 0.9), &[0.497750, 0.502250], 1e-6));
        assert!(close(&update(&[0.2, 0.8], &l, UpdateMode::Exp, 0.01, 0.0), &[0.198405, 0.801595], 1e-6));
        // softmax forgets the previous q.
        assert!(close(&update(&[0.9, 0.1], &l, UpdateMode::Softmax, 0.01, 0.0), &[0.4975, 0.5025], 1e-4));
        assert!(close(&update(&half, &l, UpdateMode::Exp, 1.0, 0.0), &[0.268941, 0.731059], 1e-6));
        // γ = 1 is the plain multiplicative update; γ = 0 freezes q.
        assert_eq!(update(&[0.3, 0.7], &l, UpdateMode::ExpSmooth, 0.5, 1.0), update(&[0.3, 0.7], &l, UpdateMode::Exp, 0.5, 0.0));
        assert_eq!(update(&[0.3, 0.7], &l, UpdateMode::ExpSmooth, 0.5, 0.0), vec![0.3, 0.7]);
        // An absent group: multiplier 1 (exp), weight 0 (softmax).
        let absent = [Some(3.0), None];
        let e = update(&half, &absent, UpdateMode::Exp, 1.0, 0.0);
        assert!(close(&e, &[3f64.exp() / (3f64.exp() + 1.0), 1.0 / (3f64.exp() + 1.0)], 1e-12));
        assert_eq!(update(&half, &absent, UpdateMode::Softmax, 1.0, 0.0), vec![1.0, 0.0]);
        // Huge exponents do not overflow.
        let big = update(&half, &[Some(1000.0), Some(999.0)], UpdateMode::Exp, 1.0, 0.0);
        assert!(close(&big, &[1.0 / (1.0 + (-1f64).exp()), (-1f64).exp() / (1.0 + (-1f64).exp())], 1e-12));
    }

    /// ℓ_g(θ) = (θ − a_g)² as tensors of one variable θ.
    fn group_losses(theta: &Var, a: &[f64]) -> Vec<Option<Tensor>> {
        a.iter().map(|&ag| Some((theta.as_tensor() - ag).unwrap().sqr().unwrap())).collect()
    }

    fn grad_of(obj: &Tensor, theta: &Var) -> f64 {
        obj.backward().unwrap().get(theta.as_tensor()).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn objectives_have_their_values_and_gradients() {
        let theta = Var::new(0.0f64, &Device::Cpu).unwrap();
        // At θ = 0 with a = (−1, −√2): ℓ = (1, 2), ∂ℓ/∂θ = 2θ − 2a = (2, 2√2).
        let a = [-1.0, -(2f64.sqrt())];
        let dl = [2.0, 2.0 * 2f64.sqrt()];
        let ls = group_losses(&theta, &a);
        let q = [0.3, 0.7];
        let w = objective(Objective::Weighted, &q, &ls, 0.01).unwrap();
        assert!((w.to_scalar::<f64>().unwrap() - (0.3 + 1.4)).abs() < 1e-12);
        assert!((grad_of(&w, &theta) - (0.3 * dl[0] + 0.7 * dl[1])).abs() < 1e-12);
        // max: only the larger group's gradient.
        let m = objective(Objective::Max, &q, &ls, 0.01).unwrap();
        assert!((m.to_scalar::<f64>().unwrap() - 2.0).abs() < 1e-12);
        assert!((grad_of(&m, &theta) - dl[1]).abs() < 1e-12);
        // logsumexp at η = 0.01: 100 · ln(e^0.01 + e^0.02) = 70.81597, gradient weights softmax(ηℓ).
        let s = objective(Objective::Logsumexp, &q, &ls, 0.01).unwrap();
        assert!((s.to_scalar::<f64>().unwrap() - 70.81597).abs() < 1e-5);
        let sm = update(&[0.5, 0.5], &[Some(1.0), Some(2.0)], UpdateMode::Softmax, 0.01, 0.0);
        assert!((grad_of(&s, &theta) - (sm[0] * dl[0] + sm[1] * dl[1])).abs() < 1e-9);
    }

    #[test]
    fn on_a_convex_toy_groupdro_reaches_the_minimax_point_and_erm_does_not() {
        // Two groups ℓ_g = (θ − a_g)², 90 % of the data in group 0. ERM minimises the
        // count-weighted mean, at 0.9 a₀ + 0.1 a₁; GroupDRO the worst group, at (a₀ + a₁)/2 where
        // both losses are equal, with q → (½, ½).
        let (a0, a1) = (0.0, 1.0);
        let (mut erm, mut dro, mut q) = (0.3, 0.3, vec![0.5, 0.5]);
        for _ in 0..20_000 {
            erm -= 0.01 * (0.9 * 2.0 * (erm - a0) + 0.1 * 2.0 * (erm - a1));
            let losses = [Some((dro - a0) * (dro - a0)), Some((dro - a1) * (dro - a1))];
            q = update(&q, &losses, UpdateMode::Exp, 0.1, 0.0);
            dro -= 0.001 * (q[0] * 2.0 * (dro - a0) + q[1] * 2.0 * (dro - a1));
        }
        assert!((erm - 0.1).abs() < 1e-6, "ERM at {erm}");
        assert!((dro - 0.5).abs() < 1e-2, "GroupDRO at {dro}");
        assert!(close(&q, &[0.5, 0.5], 2e-2), "q = {q:?}");
    }
}
