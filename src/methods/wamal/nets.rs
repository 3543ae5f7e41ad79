//! The two networks, as functional parameter lists (so that the multi-task network can run at
//! fast weights θ1⁺ = θ1 − α∇L1), and the losses of the two levels.
//!
//! * Multi-task network θ1: a backbone x → f(x) (an MLP `input → hidden → features`, ReLU after
//!   both layers), a primary head Lin(d,d)-ReLU-Lin(d,C) and an auxiliary head of the same shape
//!   ending in the auxiliary classes (Σψ, or the fine classes for the human task). Heads end in
//!   logits; the losses take the softmax.
//! * Generator θ2: a **separate** backbone of the same shape, a label head Lin(d,d)-ReLU-Lin(d,Σψ)
//!   and a weight head Lin(d,d)-ReLU-Lin(d,1) → sigmoid s.
//!
//! Neither network sees the primary label: the generator meets it only through the mask of its
//! block, applied after its last layer.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor, TensorId};

use super::losses::{focal, focal_difference, masked_softmax, neg_entropy, weight};
use crate::meta::{Problem, StepSize};
use crate::models::functional::FunctionalMlp;
use crate::models::kernels::linear::linear;
use crate::rng::Rng;

/// Tensors per two-layer part (two weights, two biases).
pub const PART: usize = 4;

/// What the auxiliary head learns and from what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Single-task learning: the primary loss only.
    Stl,
    /// The human-designed auxiliary task: the fine labels, no block constraint.
    Human,
    /// Generated labels, every sample weighted 1.
    Maxl,
    /// Generated labels and per-sample weights.
    Wamal,
}

impl Variant {
    /// Whether a generator is trained (the meta level runs).
    pub fn generates(self) -> bool {
        matches!(self, Variant::Maxl | Variant::Wamal)
    }
}

/// The sizes of both networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub input: usize,
    pub hidden: usize,
    /// d: the backbone's output and the heads' hidden width.
    pub features: usize,
    pub primary: usize,
    /// The auxiliary head's outputs: Σψ (generated labels) or the fine classes (human).
    pub aux: usize,
    /// Σψ: the generator's label outputs.
    pub generated: usize,
}

fn part(widths: &[usize], seed: u64, what: &str, dev: &Device, dtype: DType) -> Result<Vec<Tensor>> {
    FunctionalMlp::new(widths)?.init(Rng::derive(seed, what).next_u64(), dev, dtype)
}

/// x W1ᵀ + b1 → ReLU → · W2ᵀ + b2, ReLU after it too when `relu_last`: the engine's fused
/// linear kernel on f32 CPU tensors (fast weights included), candle's operations otherwise.
fn two_layer(p: &[Tensor], x: &Tensor, relu_last: bool) -> Result<Tensor> {
    let h = linear(x, &p[0], &p[1], true)?;
    linear(&h, &p[2], &p[3], relu_last)
}

impl Arch {
    /// θ1: backbone, primary head, auxiliary head (PyTorch's default initialisation, one seeded
    /// stream per part).
    pub fn init_learner(&self, seed: u64, dev: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        let d = self.features;
        let mut v = part(&[self.input, self.hidden, d], seed, "wamal-learner-backbone", dev, dtype)?;
        v.extend(part(&[d, d, self.primary], seed, "wamal-learner-primary", dev, dtype)?);
        v.extend(part(&[d, d, self.aux], seed, "wamal-learner-aux", dev, dtype)?);
        Ok(v)
    }

    /// θ2: backbone, label head, weight head.
    pub fn init_generator(&self, seed: u64, dev: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        let d = self.features;
        let mut v = part(&[self.input, self.hidden, d], seed, "wamal-generator-backbone", dev, dtype)?;
        v.extend(part(&[d, d, self.generated], seed, "wamal-generator-label", dev, dtype)?);
        v.extend(part(&[d, d, 1], seed, "wamal-generator-weight", dev, dtype)?);
        Ok(v)
    }
}

/// The multi-task network's primary and auxiliary logits.
pub fn learner(theta: &[Tensor], x: &Tensor) -> Result<(Tensor, Tensor)> {
    let f = two_layer(&theta[..PART], &x.flatten_from(1)?, true)?;
    Ok((two_layer(&theta[PART..2 * PART], &f, false)?, two_layer(&theta[2 * PART..3 * PART], &f, false)?))
}

/// The generator's label logits (N×Σψ) and weight-head sigmoid s (N).
pub fn generator(phi: &[Tensor], x: &Tensor) -> Result<(Tensor, Tensor)> {
    let f = two_layer(&phi[..PART], &x.flatten_from(1)?, true)?;
    let a = two_layer(&phi[PART..2 * PART], &f, false)?;
    let s = candle_nn::ops::sigmoid(&two_layer(&phi[2 * PART..3 * PART], &f, false)?.squeeze(1)?)?;
    Ok((a, s))
}

/// One batch as both levels read it.
pub struct Batch {
    pub x: Tensor,
    /// One-hot primary labels (N×C).
    pub primary: Tensor,
    /// The human task's one-hot fine labels (N×fine), or the generated labels' block masks
    /// (N×Σψ), by variant.
    pub aux: Tensor,
}

/// The settings the losses read.
#[derive(Debug, Clone, Copy)]
pub struct Losses {
    pub variant: Variant,
    pub focal_gamma: f64,
    /// R of w = 2^(2R·s − R).
    pub range: f64,
    /// The weight of the negative entropy in the meta objective (0.2).
    pub entropy_weight: f64,
}

/// The parts of the level-1 loss L1 = mean ℓ(p, y) + mean w·ℓ(q, ŷ).
pub struct Level1 {
    pub total: Tensor,
    pub primary: Tensor,
    pub aux: Option<Tensor>,
}

impl Losses {
    /// L1(θ1, θ2) on `b` (θ2 unread by STL and the human task).
    pub fn level1(&self, theta: &[Tensor], phi: &[Tensor], b: &Batch) -> Result<Level1> {
        self.level1_from(theta, b, || generator(phi, &b.x))
    }

    /// L1 at the generator's outputs `known` (from the same φ and batch).
    pub fn level1_at(&self, theta: &[Tensor], known: Option<&Generated>, phi: &[Tensor], b: &Batch) -> Result<Level1> {
        self.level1_from(theta, b, || match known.filter(|g| g.matches(phi, &b.x)) {
            Some(g) => Ok(g.outputs()),
            None => generator(phi, &b.x),
        })
    }

    /// L1 with the generator's outputs from `generated` (called only when they are read).
    fn level1_from(&self, theta: &[Tensor], b: &Batch, generated: impl FnOnce() -> Result<(Tensor, Tensor)>) -> Result<Level1> {
        let (p, q) = learner(theta, &b.x)?;
        let primary = focal(&p, &b.primary, self.focal_gamma)?.mean(0)?;
        let aux = match self.variant {
            Variant::Stl => None,
            Variant::Human => Some(focal(&q, &b.aux, self.focal_gamma)?.mean(0)?),
            Variant::Maxl | Variant::Wamal => {
                let (a, s) = generated()?;
                let target = masked_softmax(&a, &b.aux)?;
                // MAXL: w ≡ 1, as a tensor, so that it and WAMAL at s = ½ compute the same numbers.
                let w = if self.variant == Variant::Wamal { weight(&s, self.range)? } else { s.ones_like()? };
                Some((w * focal(&q, &target, self.focal_gamma)?)?.mean(0)?)
            }
        };
        let total = match &aux {
            Some(a) => (&primary + a)?,
            None => primary.clone(),
        };
        Ok(Level1 { total, primary, aux })
    }

    /// L1(θ⁺, θ2) − L1(θ⁻, θ2) on `b`, the generator evaluated once for both (the same value
    /// as two calls of [`Losses::level1`] up to rounding). The meta step differentiates it with
    /// respect to θ2 alone.
    pub fn level1_difference(&self, plus: &[Tensor], minus: &[Tensor], phi: &[Tensor], b: &Batch) -> Result<Tensor> {
        self.level1_difference_from(plus, minus, b, || generator(phi, &b.x))
    }

    fn level1_difference_from(&self, plus: &[Tensor], minus: &[Tensor], b: &Batch, generated: impl FnOnce() -> Result<(Tensor, Tensor)>) -> Result<Tensor> {
        let ((pp, qp), (pm, qm)) = (learner(plus, &b.x)?, learner(minus, &b.x)?);
        let primary = focal_difference(&pp, &pm, &b.primary, self.focal_gamma)?.mean(0)?;
        let aux = match self.variant {
            Variant::Stl => return Ok(primary),
            Variant::Human => focal_difference(&qp, &qm, &b.aux, self.focal_gamma)?.mean(0)?,
            Variant::Maxl | Variant::Wamal => {
                let (a, s) = generated()?;
                let target = masked_softmax(&a, &b.aux)?;
                let w = if self.variant == Variant::Wamal { weight(&s, self.range)? } else { s.ones_like()? };
                (w * focal_difference(&qp, &qm, &target, self.focal_gamma)?)?.mean(0)?
            }
        };
        primary + aux
    }

    /// The regulariser from the generator's label logits `a`.
    fn entropy_of(&self, a: &Tensor, b: &Batch) -> Result<Tensor> {
        neg_entropy(&masked_softmax(a, &b.aux)?)? * self.entropy_weight
    }
}

/// The generator's outputs on one batch for one φ: label logits (N×Σψ) and s (N), with the ids
/// of the φ tensors and of the batch's images they were computed from. Tensors never change
/// value, so equal ids mean equal outputs.
pub struct Generated {
    phi: Vec<TensorId>,
    x: TensorId,
    logits: Tensor,
    s: Tensor,
}

impl Generated {
    /// [`generator`] at `phi` on `x`.
    pub fn of(phi: &[Tensor], x: &Tensor) -> Result<Generated> {
        let (logits, s) = generator(phi, x)?;
        Ok(Generated { phi: phi.iter().map(Tensor::id).collect(), x: x.id(), logits, s })
    }

    fn matches(&self, phi: &[Tensor], x: &Tensor) -> bool {
        self.x == x.id() && self.phi.len() == phi.len() && self.phi.iter().zip(phi).all(|(id, p)| *id == p.id())
    }

    fn outputs(&self) -> (Tensor, Tensor) {
        (self.logits.clone(), self.s.clone())
    }
}

/// The meta step's bilevel problem: θ = θ1, φ = θ2, one inner SGD step of size α on L1, outer
/// M = mean ℓ(p(θ1⁺), y) + λ Σ ȳ log ȳ.
pub struct MetaProblem<'a> {
    pub losses: Losses,
    pub batch: &'a Batch,
    pub inner_lr: f64,
    /// The generator's outputs for the φ tensors of the last call: the hypergradient passes
    /// the meta objective's φ variables again to the difference of the inner losses, which then
    /// shares the objective's forward pass of the generator; a level-1 step just taken on the
    /// same batch at the same φ lends its own ([`MetaProblem::reusing`]) to the first inner step.
    generated: RefCell<Option<Generated>>,
}

impl<'a> MetaProblem<'a> {
    pub fn new(losses: Losses, batch: &'a Batch, inner_lr: f64) -> MetaProblem<'a> {
        MetaProblem { losses, batch, inner_lr, generated: RefCell::new(None) }
    }

    /// Starts from the generator's outputs `known` (used only where φ and the batch's images
    /// are the very tensors they were computed from).
    pub fn reusing(self, known: Option<Generated>) -> MetaProblem<'a> {
        *self.generated.borrow_mut() = known;
        self
    }

    /// `generator(phi, x)`, computed once per set of φ tensors.
    fn generated(&self, phi: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let mut cache = self.generated.borrow_mut();
        if let Some(g) = cache.as_ref().filter(|g| g.matches(phi, &self.batch.x)) {
            return Ok(g.outputs());
        }
        let g = Generated::of(phi, &self.batch.x)?;
        let out = g.outputs();
        *cache = Some(g);
        Ok(out)
    }
}

impl Problem for MetaProblem<'_> {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], _step: usize) -> Result<Tensor> {
        Ok(self.losses.level1_from(theta, self.batch, || self.generated(phi))?.total)
    }

    fn inner_loss_difference(&self, plus: &[Tensor], minus: &[Tensor], phi: &[Tensor], _step: usize) -> Result<Tensor> {
        self.losses.level1_difference_from(plus, minus, self.batch, || self.generated(phi))
    }

    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor> {
        let (p, _) = learner(theta, &self.batch.x)?;
        let (a, _) = self.generated(phi)?;
        focal(&p, &self.batch.primary, self.losses.focal_gamma)?.mean(0)? + self.losses.entropy_of(&a, self.batch)?
    }

    fn step_size(&self, _phi: &[Tensor]) -> Result<StepSize> {
        Ok(StepSize::Scalar(self.inner_lr))
    }
}
