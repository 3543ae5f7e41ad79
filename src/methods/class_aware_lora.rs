//! Class-aware meta-learning for long-tailed parameter-efficient fine-tuning (document 000).
//!
//! **Transfer.** A ViT backbone is pretrained on a balanced source task (a shared `pretrain/…`
//! cell: [`Method::pretrain`] trains the engine's ViT, or, with `backbone = "vit-b16-clip"`,
//! imports a ViT-B/16 checkpoint named by a weights manifest), then frozen. Each run adds LoRA
//! adapters (rank r, `lora_alpha`; [`crate::models::lora`]) to every linear layer of every block
//! and trains them with a new bias-free classifier head on the long-tailed target task. Target
//! images are resized (box filter) to the backbone's input side, as CLIP resizes to 224.
//!
//! **Splits and groups.** The long-tailed training subset (counts `n_c`) is split per class into
//! a training part and a *meta* part (`meta_data_ratio`; ⌊ratio·n_c + ½⌋ images, at least one
//! when n_c ≥ 2, at least one left for training). Groups come from the full subset counts: head
//! when n_c ≥ `head_min`, tail when n_c ≤ `tail_max`, medium otherwise. IR = max n / min n; Gini
//! as in [`crate::metrics::gini`].
//!
//! **Meta-parameters φ and the gate.** Every adapter's low-rank update is multiplied per sample
//! by a gate g ∈ ℝ^R (see `models::lora`). A rank factor ρ and an alpha factor a make the gate
//! g_k(ρ, a) = (alpha/r)·α_m·a·σ((ρ·r − k − ½)/τ), k = 0..R−1, τ = ½: a soft rank mask that keeps
//! about ρ·r of R = ⌈1.5·r·max initial factor⌉ allocated components (ρ = 1 is rank r, 2 is rank
//! 2r). The variants (`variant`):
//! - `baseline` (MetaLoRA): φ = {α_m}, one scalar meta-alpha; R = r and g = (alpha/r)·α_m·1.
//! - `shared`: φ = {α_m, ρ, a}, one rank and one alpha factor for every class (initialised at the
//!   class mean of the class-aware initial factors), with the class-aware variant's R, tail loss
//!   weight and meta objective: the control that has everything but the per-class factors.
//! - `class_aware`: φ = {α_m, ρ_c, a_c}, per-class factors initialised by group (`head_factor`,
//!   `medium_factor`, `tail_factor`), routed by prediction: the network first runs with the gate
//!   of the class-mean factors g(ρ̄, ā), its class probabilities p_i = softmax(z⁰_i) mix the per-class gates,
//!   g_i = Σ_c p_ic·g(ρ_c, a_c), and the network runs again with g_i; the same rule in training
//!   and at inference, so the forward pass never reads a label (p is not detached: the routing
//!   is part of the model, and the hypergradient stays exact).
//! - `class_aware_frozen`: the same with the factors kept at their initial values (only α_m is
//!   learned): the control for what meta-learning the factors adds.
//! - `class_aware_label`: the literal reading of the document, kept as an ablation: sample i of
//!   class y_i gets g(ρ_{y_i}, a_{y_i}) in training and every sample g(ρ̄, ā) at inference; the
//!   training forward pass reads the label it should predict.
//!
//! Factors are clamped to [0.1, R/r] (rank) and [0.05, 10] (alpha, α_m) after each meta step.
//!
//! **Training loss.** Cross-entropy on z = f·Wᵀ (`ce`), on z + log n_c (`balanced_softmax`), or
//! LDAM: z = s·(cos(f, w_c) − Δ_y·[c = y]) with Δ_c ∝ n_c^(−1/4), max Δ = 0.5, s = 30 (`ldam`;
//! then predictions and routing use s·cos). All variants but the baseline weight tail samples by
//! `tail_loss_weight` (weighted mean Σ w_i ℓ_i / Σ w_i).
//!
//! **Outer objective** on the meta split, with the inference forward pass. `baseline`: mean
//! cross-entropy (MetaLoRA's validation loss). The others, by `meta_objective`
//! (each a differentiable surrogate of the named metric): `balanced_accuracy` → mean over
//! classes of the class-mean cross-entropy L_c; `gmean` → −mean_c log p̄_c, p̄_c the class-mean
//! probability of the true class (log of a soft geometric mean of per-class accuracies);
//! `worst_class` → τ·log Σ_c exp(L_c/τ), τ = ¼ (a soft maximum). Plus `rank_divergence`·
//! Var_c(ρ_c) + `alpha_smoothness`·Σ_k (a_{σ(k+1)} − a_{σ(k)})², σ the classes by descending count.
//!
//! **Hypergradient.** At the start of every `meta_update_freq`-th epoch (the document's unit):
//! from the current adapters and head θ₀, `meta_inner_steps` SGD steps θ_{j+1} = θ_j − η
//! ∇_θ L_train(θ_j, φ; B_j) (η = `meta_inner_lr`, B_j batches of the training split) are taken on a
//! copy; the outer objective M(θ_K, φ) is differentiated exactly by reverse mode through the
//! unrolled steps: v_K = ∇_θ M, h = ∂_φ M; for j = K−1..0: h −= η ∂_φ⟨∇_θ L_train(θ_j, φ), v_{j+1}⟩
//! and v_j = v_{j+1} − η ∇²_θ L_train(θ_j, φ) v_{j+1}. Both second-order products come from one
//! central difference of first-order gradients, (∇L(θ_j + εv) − ∇L(θ_j − εv))/(2ε) with
//! ε = 10⁻²/‖v‖ (as in DARTS), taken with respect to θ and φ at once — O(ε²) accurate (the shared
//! [`crate::meta::hypergradient()`], with one scalar step size η). φ then takes an Adam step
//! (`meta_lr`). The lookahead is discarded: θ itself moves only by the main optimiser (AdamW,
//! cosine schedule). A test compares h with central finite differences of M(θ_K(φ), φ) on a
//! small network, for every variant.
//!
//! **Records.** Every epoch (and epoch 0, before training): test accuracies (percent, balanced
//! test set) overall, balanced, per group, head−tail gap, G-mean (geometric mean of per-class
//! accuracies) and worst class; IR, Gini; `train_loss` (the epoch's mean training loss, as the
//! optimiser saw it: training forward pass, tail weights), `meta_loss` (mean cross-entropy of the
//! meta split with the inference forward pass, after the epoch: a model that reads labels in
//! training shows a low `train_loss` beside a `meta_loss` above a uniform guess's, ln C),
//! `outer_objective` and the hypergradient's norm (means over the epoch's meta steps), the
//! meta-alpha; per class the factors (`rank_factor`, `alpha_factor`; 1 for the baseline).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::supervised::safetensors_bytes;
use super::{to_json, ClassRecord, DataInput, EpochRecord, InputDecl, Method, MethodError, Outcome, Pretraining, Progress, RunProblem, RunRecord, TrainInputs, PRETRAIN_INPUT};
use crate::data::ImageSet;
use crate::meta::{self, Problem, StepSize, Unroll, HVP_EPS};
use crate::metrics::{self, Group};
use crate::models::lora::{Activation, VitBackbone, VitLoadOptions};
use crate::models::{self, ModelConfig, ModelKind};
use crate::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, ParamValue, Params, Schema};
use crate::rng::Rng;
use crate::train::{self, LossKind, OptimConfig, Optimizer, OptimizerKind};

/// The method.
pub struct ClassAwareLora;

const VARIANTS: &[&str] = &["baseline", "shared", "class_aware", "class_aware_frozen", "class_aware_label"];
const OBJECTIVES: &[&str] = &["balanced_accuracy", "gmean", "worst_class"];
const LOSSES: &[&str] = &["ce", "ldam", "balanced_softmax"];
const BACKBONES: &[&str] = &["pretrain", "vit-b16-clip"];
const ACTIVATIONS: &[&str] = &["gelu", "quick_gelu"];
const DEVICES: &[&str] = &["cpu", "cuda"];

const fn f(min: f64, max: f64) -> K {
    K::Float { min, max, min_exclusive: false }
}
const fn fx(min: f64, max: f64) -> K {
    K::Float { min, max, min_exclusive: true }
}

/// A run's parameters, as the code reads them; [`SCHEMA`] defines and documents each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct P {
    dataset: String,
    imbalance: f64,
    data_seed: u64,
    device: Dev,
    variant: Variant,
    lora_rank: usize,
    lora_alpha: f64,
    /// This and the six below: the variants with factors only ([`FACTORS_ONLY`]); `None` for
    /// the baseline, which reads none of them.
    meta_objective: Option<MetaObjective>,
    meta_data_ratio: f64,
    meta_inner_steps: usize,
    meta_inner_lr: f64,
    meta_lr: f64,
    meta_update_freq: usize,
    tail_loss_weight: Option<f64>,
    rank_divergence: Option<f64>,
    alpha_smoothness: Option<f64>,
    head_factor: Option<f64>,
    medium_factor: Option<f64>,
    tail_factor: Option<f64>,
    head_min: usize,
    tail_max: usize,
    loss: LossName,
    lr: f64,
    weight_decay: f64,
    epochs: usize,
    batch_size: usize,
    backbone: String,
    /// The engine's pretrained ViT only ([`ClassAwareLora::inactive`]), like the two below;
    /// decoded to check them, read by the pretraining cell from its key.
    #[allow(dead_code)]
    vit_width: Option<usize>,
    vit_heads: usize,
    vit_activation: ActivationName,
    pretrain_dataset: String,
    #[allow(dead_code)]
    pretrain_epochs: Option<usize>,
    #[allow(dead_code)]
    pretrain_lr: Option<f64>,
    pretrain_seed: u64,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

/// What a pretraining cell's key holds ([`ClassAwareLora::pretraining`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PretrainP {
    backbone: String,
    vit_width: Option<usize>,
    pretrain_epochs: Option<usize>,
    pretrain_lr: Option<f64>,
    /// The pinned sha256 of an imported checkpoint: key material, read by nothing.
    #[allow(dead_code)]
    weights_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Dev {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Variant {
    Baseline,
    Shared,
    ClassAware,
    ClassAwareFrozen,
    ClassAwareLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MetaObjective {
    BalancedAccuracy,
    Gmean,
    WorstClass,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LossName {
    Ce,
    Ldam,
    BalancedSoftmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActivationName {
    Gelu,
    QuickGelu,
}

/// Parameters only pretraining the engine's ViT reads (`backbone = "pretrain"`).
const PRETRAIN_ONLY: &[&str] = &["vit_width", "pretrain_epochs", "pretrain_lr"];
/// Parameters only the variants with rank and alpha factors read (all but the baseline).
const FACTORS_ONLY: &[&str] = &["meta_objective", "tail_loss_weight", "rank_divergence", "alpha_smoothness", "head_factor", "medium_factor", "tail_factor"];

static SCHEMA: &[ParamDef] = &[
    ParamDef { name: "dataset", kind: K::DataName, default: Dv::Str("mnist"), doc: "the long-tailed target data set, declared under [data]" },
    ParamDef { name: "imbalance", kind: fx(0.0, 1.0), default: Dv::Float(0.01), doc: "imbalance factor n_min/n_max of the target subset (0.01 is IR 100)" },
    ParamDef { name: "data_seed", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(0), doc: "seed of the long-tailed subset" },
    ParamDef { name: "device", kind: K::Choice(DEVICES), default: Dv::Str("cpu"), doc: "cpu, or cuda (a build with --features cuda)" },
    ParamDef {
        name: "variant",
        kind: K::Choice(VARIANTS),
        default: Dv::Str("class_aware"),
        doc: "baseline (MetaLoRA: one meta-learned alpha); shared (one rank and alpha factor for all classes); class_aware (per-class factors routed by the model's prediction); class_aware_frozen (the same, factors kept at their initial values); class_aware_label (per-class factors routed by the true label in training, the class mean at inference: the ablation that leaks the label)",
    },
    ParamDef { name: "lora_rank", kind: K::Int { min: 1, max: 256 }, default: Dv::Int(8), doc: "LoRA rank r" },
    ParamDef { name: "lora_alpha", kind: fx(0.0, 1024.0), default: Dv::Float(8.0), doc: "LoRA alpha; the update is scaled by alpha/r" },
    ParamDef { name: "meta_objective", kind: K::Choice(OBJECTIVES), default: Dv::Str("balanced_accuracy"), doc: "what the outer step optimises (shared, class_aware), through a differentiable surrogate" },
    ParamDef { name: "meta_data_ratio", kind: fx(0.0, 0.5), default: Dv::Float(0.2), doc: "share of each class's training images held out as the meta split" },
    ParamDef { name: "meta_inner_steps", kind: K::Int { min: 1, max: 20 }, default: Dv::Int(3), doc: "unrolled inner SGD steps per meta-update" },
    ParamDef { name: "meta_inner_lr", kind: fx(0.0, 10.0), default: Dv::Float(0.1), doc: "learning rate η of the unrolled inner steps" },
    ParamDef { name: "meta_lr", kind: fx(0.0, 10.0), default: Dv::Float(0.001), doc: "Adam learning rate of the meta-parameters" },
    ParamDef { name: "meta_update_freq", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(1), doc: "a meta-update at the start of every this many epochs (the document's unit)" },
    ParamDef { name: "tail_loss_weight", kind: f(0.0, 100.0), default: Dv::Float(2.0), doc: "loss weight of tail samples (shared, class_aware)" },
    ParamDef { name: "rank_divergence", kind: f(0.0, 100.0), default: Dv::Float(0.01), doc: "weight of Var_c(rank factor)" },
    ParamDef { name: "alpha_smoothness", kind: f(0.0, 100.0), default: Dv::Float(0.005), doc: "weight of the squared differences of alpha factors of count-adjacent classes" },
    ParamDef { name: "head_factor", kind: fx(0.0, 10.0), default: Dv::Float(0.5), doc: "initial rank and alpha factor of head classes" },
    ParamDef { name: "medium_factor", kind: fx(0.0, 10.0), default: Dv::Float(1.0), doc: "initial rank and alpha factor of medium classes" },
    ParamDef { name: "tail_factor", kind: fx(0.0, 10.0), default: Dv::Float(2.0), doc: "initial rank and alpha factor of tail classes" },
    ParamDef { name: "head_min", kind: K::Int { min: 1, max: i64::MAX }, default: Dv::Int(100), doc: "a class is head when its training count n ≥ head_min" },
    ParamDef { name: "tail_max", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(19), doc: "a class is tail when n ≤ tail_max (the document's n < 20)" },
    ParamDef { name: "loss", kind: K::Choice(LOSSES), default: Dv::Str("ce"), doc: "training loss: ce, ldam or balanced_softmax" },
    ParamDef { name: "lr", kind: fx(0.0, 10.0), default: Dv::Float(0.002), doc: "AdamW learning rate of the adapters and head (cosine schedule)" },
    ParamDef { name: "weight_decay", kind: f(0.0, 1.0), default: Dv::Float(0.0), doc: "decoupled weight decay of the adapters and head" },
    ParamDef { name: "epochs", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(20), doc: "fine-tuning epochs" },
    ParamDef { name: "batch_size", kind: K::Int { min: 1, max: 1_000_000 }, default: Dv::Int(64), doc: "batch size" },
    ParamDef {
        name: "backbone",
        kind: K::Choice(BACKBONES),
        default: Dv::Str("pretrain"),
        doc: "pretrain: the engine's ViT trained on pretrain_dataset; vit-b16-clip: the checkpoint named by data-manifests/weights/vit-b16-clip.toml",
    },
    ParamDef { name: "vit_width", kind: K::Int { min: 1, max: 64 }, default: Dv::Int(1), doc: "width multiplier of the pretrained engine ViT" },
    ParamDef { name: "vit_heads", kind: K::Int { min: 1, max: 64 }, default: Dv::Int(4), doc: "attention heads of the backbone (4 for the engine ViT, 12 for ViT-B/16)" },
    ParamDef { name: "vit_activation", kind: K::Choice(ACTIVATIONS), default: Dv::Str("gelu"), doc: "MLP activation of the backbone (quick_gelu for OpenAI CLIP weights)" },
    ParamDef { name: "pretrain_dataset", kind: K::DataName, default: Dv::Str("optdigits"), doc: "balanced source task of the backbone" },
    ParamDef { name: "pretrain_epochs", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(30), doc: "pretraining epochs" },
    ParamDef { name: "pretrain_lr", kind: fx(0.0, 10.0), default: Dv::Float(0.001), doc: "AdamW learning rate of pretraining" },
    ParamDef { name: "pretrain_seed", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(0), doc: "seed of the pretraining" },
];

/// The run's one input: the long-tailed target data set (`dataset`, `imbalance`, `data_seed`)
/// with its balanced test split. The pretraining's source set comes from [`Method::pretraining`].
const TARGET: &str = "target";

static METRICS: &[&str] = &[
    "train_loss",
    "meta_loss",
    "outer_objective",
    "accuracy",
    "balanced_accuracy",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "head_tail_gap",
    "gmean",
    "worst_class",
    "imbalance_ratio",
    "gini",
    "meta_alpha",
    "hypergradient_norm",
    "source_accuracy",
];

/// Temperature of the soft rank mask.
const MASK_TAU: f64 = 0.5;
/// Temperature of the soft maximum of the worst-class surrogate.
const WORST_TAU: f64 = 0.25;
/// LDAM's largest margin and logit scale (Cao et al. 2019).
const LDAM_MAX_MARGIN: f64 = 0.5;
const LDAM_SCALE: f64 = 30.0;

/// Which training loss.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loss {
    Ce,
    Ldam,
    BalancedSoftmax,
}

/// Which outer objective.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Objective {
    /// MetaLoRA: mean cross-entropy over the meta split.
    Overall,
    Balanced,
    Gmean,
    Worst,
}

/// Which rank and alpha factors a run has.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// MetaLoRA: no factors, R = r, one meta-alpha.
    Baseline,
    /// One rank and one alpha factor for every class.
    Shared,
    /// A rank and an alpha factor per class.
    ClassAware,
}

/// How a class-aware sample finds its class's factors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Routing {
    /// The model's own class probabilities mix the per-class gates, in training and at inference.
    Predicted,
    /// The true label in training, the class-mean factors at inference (the ablation that leaks
    /// the label into the training forward pass).
    Label,
}

/// Everything the differentiable pieces need, fixed for one run.
#[derive(Debug, Clone)]
struct Setup {
    kind: Kind,
    routing: Routing,
    /// Whether the outer step moves the rank and alpha factors (α_m is always learned).
    learn_factors: bool,
    rank: usize,
    /// Allocated adapter components R.
    alloc: usize,
    scale: f64,
    classes: usize,
    loss: Loss,
    objective: Objective,
    tail_weight: f64,
    rank_divergence: f64,
    alpha_smoothness: f64,
    /// Per class: training count (full subset) and whether it is tail.
    counts: Vec<usize>,
    tail: Vec<bool>,
    /// Classes by descending count (ties by index), for the smoothness penalty.
    order: Vec<usize>,
    dtype: DType,
}

impl Setup {
    /// Whether the run has rank and alpha factors (and the tail weight and meta objective).
    fn has_factors(&self) -> bool {
        self.kind != Kind::Baseline
    }
}

/// Meta-parameter values: α_m and every class's rank and alpha factor (1 for the baseline; all
/// equal for `shared`).
#[derive(Debug, Clone, PartialEq)]
struct Phi {
    alpha_meta: f64,
    rank: Vec<f64>,
    alpha: Vec<f64>,
}

impl Phi {
    /// The values the outer step learns: [α_m], then [ρ, a] (`shared`) or [ρ_1..ρ_C, a_1..a_C]
    /// (`class_aware`) when the factors are learned.
    fn learned(&self, s: &Setup) -> Vec<f64> {
        let mut v = vec![self.alpha_meta];
        if s.learn_factors {
            match s.kind {
                Kind::Baseline => {}
                Kind::Shared => v.extend([self.rank[0], self.alpha[0]]),
                Kind::ClassAware => {
                    v.extend(&self.rank);
                    v.extend(&self.alpha);
                }
            }
        }
        v
    }

    /// φ with its learned values replaced by `v` (as [`Phi::learned`] orders them).
    fn with_learned(&self, s: &Setup, v: &[f64]) -> Phi {
        let c = s.classes;
        let mut phi = self.clone();
        phi.alpha_meta = v[0];
        if s.learn_factors {
            match s.kind {
                Kind::Baseline => {}
                Kind::Shared => (phi.rank, phi.alpha) = (vec![v[1]; c], vec![v[2]; c]),
                Kind::ClassAware => (phi.rank, phi.alpha) = (v[1..1 + c].to_vec(), v[1 + c..1 + 2 * c].to_vec()),
            }
        }
        phi
    }

    /// [α_m, ρ_1..ρ_C, a_1..a_C], as the run's output stores φ.
    fn flat(&self) -> Vec<f64> {
        let mut v = vec![self.alpha_meta];
        v.extend(&self.rank);
        v.extend(&self.alpha);
        v
    }
}

/// φ as tensors: α_m [1], ρ and a [C].
struct PhiT {
    alpha_meta: Tensor,
    rank: Tensor,
    alpha: Tensor,
}

fn phi_tensors(s: &Setup, phi: &Phi, dev: &Device) -> candle_core::Result<PhiT> {
    let mk = |v: &[f64]| Tensor::from_vec(v.to_vec(), v.len(), dev).and_then(|t| t.to_dtype(s.dtype));
    Ok(PhiT { alpha_meta: mk(&[phi.alpha_meta])?, rank: mk(&phi.rank)?, alpha: mk(&phi.alpha)? })
}

/// Gates n×R for n pairs of factors `rho`, `a` (each [n]):
/// g_k = (alpha/r)·α_m·a·σ((ρ·r − k − ½)/τ).
fn masked_gates(s: &Setup, phi: &PhiT, rho: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
    let dev = phi.alpha_meta.device();
    let k: Vec<f64> = (0..s.alloc).map(|k| k as f64 + 0.5).collect();
    let k = Tensor::from_vec(k, (1, s.alloc), dev)?.to_dtype(s.dtype)?;
    let arg = ((rho.unsqueeze(1)? * s.rank as f64)?.broadcast_sub(&k)? / MASK_TAU)?;
    let mask = crate::models::lora::sigmoid(&arg)?;
    mask.broadcast_mul(&(a * s.scale)?.unsqueeze(1)?)?.broadcast_mul(&phi.alpha_meta.unsqueeze(0)?)
}

/// The gate every sample shares, 1×R: (alpha/r)·α_m·1 for the baseline, the gate of the
/// class-mean factors ρ̄, ā otherwise.
fn uniform_gate(s: &Setup, phi: &PhiT) -> candle_core::Result<Tensor> {
    if !s.has_factors() {
        let base = (&phi.alpha_meta * s.scale)?;
        return Tensor::ones((1, s.alloc), s.dtype, phi.alpha_meta.device())?.broadcast_mul(&base.unsqueeze(0)?);
    }
    masked_gates(s, phi, &phi.rank.mean_keepdim(0)?, &phi.alpha.mean_keepdim(0)?)
}

/// Scores N×C: f·Wᵀ, or cos(f, w_c) for LDAM. `theta` = adapters…, head.
fn scores(s: &Setup, net: &VitBackbone, theta: &[Tensor], x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let (head, adapters) = theta.split_last().ok_or_else(|| candle_core::Error::Msg("no parameters".into()))?;
    let f = net.features(x, adapters, g)?;
    if s.loss == Loss::Ldam {
        let fnorm = f.broadcast_div(&(f.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)?;
        let wnorm = head.broadcast_div(&(head.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)?;
        fnorm.matmul(&wnorm.t()?)
    } else {
        f.matmul(&head.t()?)
    }
}

/// The logits a prediction reads from scores: the scores, or s·cos for LDAM.
fn prediction_logits(s: &Setup, z: Tensor) -> candle_core::Result<Tensor> {
    if s.loss == Loss::Ldam {
        z * LDAM_SCALE
    } else {
        Ok(z)
    }
}

/// The network's scores N×C for images `x`: in training `labels` are the batch's labels, at
/// inference `None`. Only label routing (`class_aware_label`) reads them; every other variant computes
/// the same function of `x`, θ and φ in both modes (the test
/// `training_logits_never_read_the_labels` holds it to that).
fn forward(s: &Setup, net: &VitBackbone, theta: &[Tensor], phi: &PhiT, x: &Tensor, labels: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if s.kind != Kind::ClassAware {
        return scores(s, net, theta, x, &uniform_gate(s, phi)?);
    }
    match (s.routing, labels) {
        (Routing::Label, Some(y)) => scores(s, net, theta, x, &masked_gates(s, phi, &phi.rank.index_select(y, 0)?, &phi.alpha.index_select(y, 0)?)?),
        (Routing::Label, None) => scores(s, net, theta, x, &uniform_gate(s, phi)?),
        (Routing::Predicted, _) => {
            let z0 = prediction_logits(s, scores(s, net, theta, x, &uniform_gate(s, phi)?)?)?;
            let p = candle_nn::ops::softmax(&z0, D::Minus1)?;
            let g = p.matmul(&masked_gates(s, phi, &phi.rank, &phi.alpha)?)?;
            scores(s, net, theta, x, &g)
        }
    }
}

fn row(v: Vec<f64>, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, (1, n), like.device())?.to_dtype(like.dtype())
}

/// Per-sample cross-entropy of logits `z` (N×C) against `y`.
fn ce_per_sample(z: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::log_softmax(z, D::Minus1)?.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// The training loss on one batch (mean, tail-weighted for `shared` and `class_aware`), on the
/// training forward pass.
fn train_loss(s: &Setup, net: &VitBackbone, theta: &[Tensor], phi: &PhiT, x: &Tensor, y: &Tensor, ys: &[u32]) -> candle_core::Result<Tensor> {
    let z = forward(s, net, theta, phi, x, Some(y))?;
    let z = match s.loss {
        Loss::Ce => z,
        Loss::BalancedSoftmax => z.broadcast_add(&row(s.counts.iter().map(|&n| (n.max(1) as f64).ln()).collect(), &z)?)?,
        Loss::Ldam => {
            let m: Vec<f64> = s.counts.iter().map(|&n| (n.max(1) as f64).powf(-0.25)).collect();
            let top = m.iter().cloned().fold(0.0, f64::max);
            let mut margins = vec![0.0; ys.len() * s.classes];
            for (i, &c) in ys.iter().enumerate() {
                margins[i * s.classes + c as usize] = LDAM_MAX_MARGIN * m[c as usize] / top;
            }
            let mt = Tensor::from_vec(margins, (ys.len(), s.classes), z.device())?.to_dtype(z.dtype())?;
            ((z - mt)? * LDAM_SCALE)?
        }
    };
    let l = ce_per_sample(&z, y)?;
    if s.has_factors() && s.tail_weight != 1.0 {
        let w: Vec<f64> = ys.iter().map(|&c| if s.tail[c as usize] { s.tail_weight } else { 1.0 }).collect();
        let total: f64 = w.iter().sum();
        let w = Tensor::from_vec(w, ys.len(), l.device())?.to_dtype(l.dtype())?;
        (l * w)?.sum_all()? / total
    } else {
        l.mean_all()
    }
}

/// The outer objective on the meta split (inference forward pass) plus the φ regularisers.
fn outer(s: &Setup, net: &VitBackbone, theta: &[Tensor], phi: &PhiT, x: &Tensor, y: &Tensor, ys: &[u32]) -> candle_core::Result<Tensor> {
    let z = prediction_logits(s, forward(s, net, theta, phi, x, None)?)?;
    let l = ce_per_sample(&z, y)?;
    // Class-averaging matrix over the classes present: row c = 1/n_c on the samples of c.
    let mut n = vec![0usize; s.classes];
    for &c in ys {
        n[c as usize] += 1;
    }
    let present: Vec<usize> = (0..s.classes).filter(|&c| n[c] > 0).collect();
    let mut avg = vec![0.0; present.len() * ys.len()];
    for (r, &c) in present.iter().enumerate() {
        for (i, &yc) in ys.iter().enumerate() {
            if yc as usize == c {
                avg[r * ys.len() + i] = 1.0 / n[c] as f64;
            }
        }
    }
    let avg = Tensor::from_vec(avg, (present.len(), ys.len()), l.device())?.to_dtype(l.dtype())?;
    let class_mean = |v: &Tensor| avg.matmul(&v.unsqueeze(1)?)?.squeeze(1);
    let mut m = match s.objective {
        Objective::Overall => l.mean_all()?,
        Objective::Balanced => class_mean(&l)?.mean_all()?,
        Objective::Gmean => class_mean(&l.neg()?.exp()?)?.log()?.mean_all()?.neg()?,
        Objective::Worst => ((class_mean(&l)? / WORST_TAU)?.exp()?.sum_all()?.log()? * WORST_TAU)?,
    };
    if s.has_factors() {
        if s.rank_divergence > 0.0 {
            let mean = phi.rank.mean_keepdim(0)?;
            m = (m + (phi.rank.broadcast_sub(&mean)?.sqr()?.mean_all()? * s.rank_divergence)?)?;
        }
        if s.alpha_smoothness > 0.0 && s.classes > 1 {
            let ids = Tensor::from_vec(s.order.iter().map(|&c| c as u32).collect::<Vec<_>>(), s.classes, l.device())?;
            let a = phi.alpha.index_select(&ids, 0)?;
            let d = (a.narrow(0, 1, s.classes - 1)? - a.narrow(0, 0, s.classes - 1)?)?;
            m = (m + (d.sqr()?.sum_all()? * s.alpha_smoothness)?)?;
        }
    }
    Ok(m)
}

/// A batch of the (already resized) pool: images N×C×S×S and labels.
#[derive(Clone)]
struct Batch {
    x: Tensor,
    y: Tensor,
    ys: Vec<u32>,
}

/// One meta step's bilevel problem (see the module doc): the training loss on the inner batches
/// (inner step j reads `inner[j]`), the outer objective on the meta split, SGD steps of size η.
/// The learned φ tensors are [α_m], then [ρ], [a] when the factors are learned (one element each
/// for `shared`, C for `class_aware`); the rest of φ stays at its values.
struct Bilevel<'a> {
    s: &'a Setup,
    net: &'a VitBackbone,
    /// φ's values, which supply what is not learned.
    fixed: PhiT,
    eta: f64,
    inner: &'a [Batch],
    meta: &'a Batch,
}

impl<'a> Bilevel<'a> {
    /// The problem at `phi`, and the learned φ tensors to pass to [`meta::hypergradient()`].
    fn new(s: &'a Setup, net: &'a VitBackbone, phi: &Phi, eta: f64, inner: &'a [Batch], meta: &'a Batch, dev: &Device) -> candle_core::Result<(Bilevel<'a>, Vec<Tensor>)> {
        let fixed = phi_tensors(s, phi, dev)?;
        let mut learned = vec![fixed.alpha_meta.clone()];
        if s.learn_factors {
            match s.kind {
                Kind::Baseline => {}
                Kind::Shared => learned.extend([fixed.rank.narrow(0, 0, 1)?, fixed.alpha.narrow(0, 0, 1)?]),
                Kind::ClassAware => learned.extend([fixed.rank.clone(), fixed.alpha.clone()]),
            }
        }
        Ok((Bilevel { s, net, fixed, eta, inner, meta }, learned))
    }

    /// φ from the learned tensors and the fixed values (`shared`'s one factor stands for every
    /// class).
    fn phi(&self, learned: &[Tensor]) -> candle_core::Result<PhiT> {
        let c = self.s.classes;
        let (rank, alpha) = match (self.s.learn_factors, self.s.kind) {
            (false, _) | (_, Kind::Baseline) => (self.fixed.rank.clone(), self.fixed.alpha.clone()),
            (true, Kind::Shared) => (learned[1].broadcast_as(c)?.contiguous()?, learned[2].broadcast_as(c)?.contiguous()?),
            (true, Kind::ClassAware) => (learned[1].clone(), learned[2].clone()),
        };
        Ok(PhiT { alpha_meta: learned[0].clone(), rank, alpha })
    }
}

impl Problem for Bilevel<'_> {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], step: usize) -> candle_core::Result<Tensor> {
        let b = &self.inner[step];
        train_loss(self.s, self.net, theta, &self.phi(phi)?, &b.x, &b.y, &b.ys)
    }

    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> candle_core::Result<Tensor> {
        outer(self.s, self.net, theta, &self.phi(phi)?, &self.meta.x, &self.meta.y, &self.meta.ys)
    }

    fn step_size(&self, _phi: &[Tensor]) -> candle_core::Result<StepSize> {
        Ok(StepSize::Scalar(self.eta))
    }
}

/// Area (box-filter) resampling of C×H×W pixels to C×nh×nw: each output pixel is the mean of the
/// input over its footprint, partial pixels weighted by their overlap.
pub fn resize_area(px: &[f32], c: usize, h: usize, w: usize, nh: usize, nw: usize) -> Vec<f32> {
    if (h, w) == (nh, nw) {
        return px.to_vec();
    }
    // Overlap weights of each output coordinate with the input coordinates along one axis.
    let weights = |n: usize, m: usize| -> Vec<Vec<(usize, f64)>> {
        let step = n as f64 / m as f64;
        (0..m)
            .map(|o| {
                let (lo, hi) = (o as f64 * step, (o + 1) as f64 * step);
                let mut v = Vec::new();
                let mut i = lo.floor() as usize;
                while (i as f64) < hi && i < n {
                    let ov = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
                    if ov > 0.0 {
                        v.push((i, ov / step));
                    }
                    i += 1;
                }
                v
            })
            .collect()
    };
    let (wy, wx) = (weights(h, nh), weights(w, nw));
    let mut out = vec![0f32; c * nh * nw];
    for ch in 0..c {
        for (oy, ry) in wy.iter().enumerate() {
            for (ox, rx) in wx.iter().enumerate() {
                let mut acc = 0.0f64;
                for &(iy, a) in ry {
                    for &(ix, b) in rx {
                        acc += a * b * f64::from(px[(ch * h + iy) * w + ix]);
                    }
                }
                out[(ch * nh + oy) * nw + ox] = acc as f32;
            }
        }
    }
    out
}

/// Images of `idx`, scaled to [−1, 1] and resized to side × side, as a batch.
fn gather(data: &ImageSet, idx: &[usize], side: usize, dtype: DType, dev: &Device) -> candle_core::Result<Batch> {
    let dim = data.dim();
    let mut px = Vec::with_capacity(idx.len() * data.channels * side * side);
    let mut ys = Vec::with_capacity(idx.len());
    for &i in idx {
        let img: Vec<f32> = data.pixels[i * dim..(i + 1) * dim].iter().map(|v| v * 2.0 - 1.0).collect();
        px.extend(resize_area(&img, data.channels, data.height, data.width, side, side));
        ys.push(data.labels[i]);
    }
    let x = Tensor::from_vec(px, (idx.len(), data.channels, side, side), dev)?.to_dtype(dtype)?;
    let y = Tensor::from_vec(ys.clone(), idx.len(), dev)?;
    Ok(Batch { x, y, ys })
}

/// Split each class's training indices into (train, meta) by `ratio`; deterministic given `seed`.
fn meta_split(data: &ImageSet, train: &[usize], ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &i in train {
        by_class.entry(data.labels[i]).or_default().push(i);
    }
    let mut rng = Rng::derive(seed, "meta-split");
    let (mut tr, mut me) = (Vec::new(), Vec::new());
    for (_, mut v) in by_class {
        v.sort_unstable();
        rng.shuffle(&mut v);
        let n = v.len();
        let mut k = (ratio * n as f64 + 0.5).floor() as usize;
        if n >= 2 {
            k = k.clamp(1, n - 1);
        } else {
            k = 0;
        }
        me.extend_from_slice(&v[..k]);
        tr.extend_from_slice(&v[k..]);
    }
    (tr, me)
}

fn device(p: &P) -> Result<Device, MethodError> {
    if p.device != Dev::Cuda {
        return Ok(Device::Cpu);
    }
    crate::models::cuda_device(0)?.ok_or_else(|| MethodError::Invalid("device = \"cuda\" but this build has no CUDA support: rebuild with --features cuda, or set device = \"cpu\"".into()))
}

fn load_options(p: &P) -> Result<VitLoadOptions, MethodError> {
    let imported = p.backbone != "pretrain";
    Ok(VitLoadOptions {
        heads: p.vit_heads,
        // timm's ViTs use ε = 1e-6; the engine's LayerNorm 1e-5.
        eps: if imported { 1e-6 } else { 1e-5 },
        activation: match p.vit_activation {
            ActivationName::QuickGelu => Activation::QuickGelu,
            ActivationName::Gelu => Activation::Gelu,
        },
    })
}

/// A weights manifest (`data-manifests/weights/<name>.toml`): one safetensors file pinned by
/// sha256, with its provenance. `sha256 = "unpinned"` is refused, like the data manifests'.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsManifest {
    pub name: String,
    pub description: String,
    /// `timm-vit`: timm's ViT key layout.
    pub layout: String,
    pub path: String,
    pub sha256: String,
    pub licence: String,
    pub source: String,
    pub citation: String,
}

/// Read and verify the checkpoint named by `data-manifests/weights/<name>.toml` under `root`.
/// Parse `data-manifests/weights/<name>.toml` under `root`.
pub fn weights_manifest(root: &Path, name: &str) -> Result<WeightsManifest, MethodError> {
    let mpath = root.join("data-manifests").join("weights").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&mpath).map_err(|e| MethodError::Invalid(format!("cannot read {}: {e}", mpath.display())))?;
    toml::from_str(&text).map_err(|e| MethodError::Invalid(format!("{}: {e}", mpath.display())))
}

pub fn load_weights(root: &Path, name: &str) -> Result<Vec<u8>, MethodError> {
    let mpath = root.join("data-manifests").join("weights").join(format!("{name}.toml"));
    let m = weights_manifest(root, name)?;
    if m.layout != "timm-vit" {
        return Err(MethodError::Invalid(format!("{}: unknown layout `{}` (known: timm-vit)", mpath.display(), m.layout)));
    }
    let file = root.join(&m.path);
    let actual = crate::data::sha256_file(&file).map_err(|e| MethodError::Invalid(e.to_string()))?;
    if m.sha256 == crate::data::manifest::UNPINNED {
        return Err(MethodError::Invalid(format!(
            "{}: the checkpoint {} is unpinned; it hashes to {actual}: check that against the source ({}) and pin it",
            mpath.display(),
            file.display(),
            m.source
        )));
    }
    if m.sha256 != actual {
        return Err(MethodError::Invalid(format!("{}: sha256 mismatch: the manifest expects {} but the file hashes to {actual}", file.display(), m.sha256)));
    }
    std::fs::read(&file).map_err(|e| MethodError::Invalid(format!("cannot read {}: {e}", file.display())))
}

/// What a pretraining cell records besides the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PretrainRecord {
    /// Test accuracy (%) on the source task's balanced test split, per epoch.
    source_accuracy: Vec<f64>,
}

impl Method for ClassAwareLora {
    fn name(&self) -> &'static str {
        "class_aware_lora"
    }
    fn version(&self) -> u32 {
        // Raised with every change to any bit of a run's results, a kernel's summation order
        // included; CHANGELOG.md says what each version changed.
        5
    }
    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }
    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }
    fn class_metrics(&self) -> &'static [&'static str] {
        &["rank_factor", "alpha_factor"]
    }
    fn data_params(&self) -> &'static [&'static str] {
        &["dataset", "imbalance", "data_seed", "device"]
    }

    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        let p: P = super::params(params)?;
        Ok(vec![InputDecl::long_tail_of(TARGET, &p.dataset, p.imbalance, p.data_seed)])
    }

    fn check_run(&self, p: &Params) -> Vec<RunProblem> {
        let mut problems = Vec::new();
        if let (Some(h), Some(t)) = (p.get("head_min").and_then(ParamValue::as_i64), p.get("tail_max").and_then(ParamValue::as_i64)) {
            if t >= h {
                problems.push(RunProblem::new("tail_max", format!("tail_max = {t} is not below head_min = {h}")).hint("a class cannot be both head and tail; lower tail_max"));
            }
        }
        problems
    }

    fn inactive(&self, p: &Params) -> Vec<&'static str> {
        let mut off = match p.get("backbone").and_then(ParamValue::as_str) {
            Some("pretrain") | None => Vec::new(),
            Some(_) => PRETRAIN_ONLY.to_vec(),
        };
        if p.get("variant").and_then(ParamValue::as_str) == Some("baseline") {
            off.extend(FACTORS_ONLY);
        }
        off
    }

    fn pretraining(&self, p: &Params, root: &Path) -> Result<Option<Pretraining>, MethodError> {
        let run: P = super::params(p)?;
        let keys: &[&str] = if run.backbone == "pretrain" { &["backbone", "vit_width", "pretrain_epochs", "pretrain_lr"] } else { &["backbone"] };
        let mut params: Params = keys.iter().filter_map(|k| p.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
        // An imported checkpoint is part of the key through its pinned sha256, so pinning a
        // new file recomputes every cell that used the old one.
        if run.backbone != "pretrain" {
            params.insert("weights_sha256".to_string(), ParamValue::Str(weights_manifest(root, &run.backbone)?.sha256));
        }
        Ok(Some(Pretraining { dataset: run.pretrain_dataset, params, seed: run.pretrain_seed }))
    }

    fn pretrain(&self, pt: &Pretraining, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let mut objects = BTreeMap::new();
        let pp: PretrainP = crate::params::decode(&pt.params).map_err(MethodError::Invalid)?;
        let missing = |k: &str| MethodError::Invalid(format!("pretraining the engine's ViT needs `{k}`"));
        if pp.backbone != "pretrain" {
            // An imported checkpoint named by a weights manifest under the project root.
            let bytes = load_weights(inputs.root, &pp.backbone)?;
            objects.insert("backbone.safetensors".to_string(), bytes);
            objects.insert("pretrain.json".to_string(), to_json(&PretrainRecord { source_accuracy: Vec::new() })?);
            return Ok(Outcome::Done(objects));
        }
        let inputs = inputs.input(PRETRAIN_INPUT)?;
        let data = inputs.data;
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let mut cfg = ModelConfig::new(ModelKind::Vit, data.channels, data.height, data.width, data.num_classes);
        cfg.width_mult = pp.vit_width.ok_or_else(|| missing("vit_width"))?;
        let model = models::build(&cfg, vb)?;
        models::seeded_init(&varmap, pt.seed)?;
        let lr = pp.pretrain_lr.ok_or_else(|| missing("pretrain_lr"))?;
        let epochs = pp.pretrain_epochs.ok_or_else(|| missing("pretrain_epochs"))?;
        let mut opt = Optimizer::new(varmap.all_vars(), &OptimConfig { weight_decay: 0.05, ..OptimConfig::new(OptimizerKind::Adamw, lr) })?;
        let counts = vec![1usize; data.num_classes];
        let mut order = inputs.train.to_vec();
        let mut rng = Rng::derive(pt.seed, "pretrain-order");
        let test = gather(data, inputs.test, data.height, DType::F32, &dev)?;
        let mut rec = PretrainRecord { source_accuracy: Vec::new() };
        let bs = 64;
        let total = (order.len().div_ceil(bs) * epochs).max(1);
        let mut step = 0;
        for epoch in 1..=epochs {
            rng.shuffle(&mut order);
            for chunk in order.chunks(bs) {
                opt.set_lr(lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos()));
                let b = gather(data, chunk, data.height, DType::F32, &dev)?;
                let (_, logits) = model.forward(&b.x, true)?;
                let l = train::loss(&LossKind::Ce, &logits, &b.y, &counts)?;
                opt.backward_step(&l)?;
                step += 1;
            }
            let (_, logits) = model.forward(&test.x, false)?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = pred.iter().zip(&test.ys).filter(|(a, b)| a == b).count();
            rec.source_accuracy.push(100.0 * correct as f64 / test.ys.len().max(1) as f64);
            progress.epoch(epoch, epochs, "pretraining");
        }
        let weights =
            varmap.data().lock().map_err(|_| MethodError::Invalid("the model's variables are poisoned".into()))?.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect::<BTreeMap<_, _>>();
        objects.insert("backbone.safetensors".to_string(), safetensors_bytes(&weights)?);
        objects.insert("pretrain.json".to_string(), to_json(&rec)?);
        Ok(Outcome::Done(objects))
    }

    fn run(&self, p: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        run(p, seed, inputs, progress)
    }
}

fn group_name(g: Group) -> &'static str {
    match g {
        Group::Head => "head",
        Group::Medium => "medium",
        Group::Tail => "tail",
    }
}

/// Adam on plain values (the meta-parameters are few).
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    fn step(&mut self, x: &mut [f64], g: &[f64]) {
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        for i in 0..x.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = self.m[i] / (1.0 - b1.powi(self.t));
            let vh = self.v[i] / (1.0 - b2.powi(self.t));
            x[i] -= self.lr * mh / (vh.sqrt() + 1e-8);
        }
    }
}

/// One training cell: load the pretrained backbone, fix the setup and the initial φ and θ from
/// the parameters, record epoch 0, train epoch by epoch (recording each), and return the record
/// with the learned adapters, head and φ. A non-finite loss, meta objective or hypergradient ends
/// the run as a failure with the epochs recorded so far.
fn run(p: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
    let p: &P = &super::params(p)?;
    let dev = device(p)?;
    let dtype = DType::F32;
    let target = inputs.input(TARGET)?;
    let backbone = load_backbone(p, inputs.pretrained, target, dtype, &dev)?;
    let data = target.data;
    let net = &backbone.net;
    let side = net.input_side();

    let counts = class_counts(data, target.train);
    let groups = metrics::groups_by_count(&counts, p.head_min, p.tail_max);
    // The baseline reads no factors; 1 stands for them (its φ is all ones).
    let factors = GroupFactors { head: p.head_factor.unwrap_or(1.0), medium: p.medium_factor.unwrap_or(1.0), tail: p.tail_factor.unwrap_or(1.0) };
    let setup = Setup::new(p, &counts, &groups, &factors, dtype);

    let (train_idx, meta_idx) = meta_split(data, target.train, p.meta_data_ratio, seed);
    let meta = gather(data, &meta_idx, side, dtype, &dev)?;
    let test = gather(data, target.test, side, dtype, &dev)?;

    let schedule = Schedule::new(p);
    let cx = RunContext { setup: &setup, net, data, side, dev: &dev };
    let vars = initial_theta(net, &setup, seed, &dev)?.iter().map(|t| Var::from_tensor(&t.detach())).collect::<candle_core::Result<Vec<_>>>()?;
    let mut trainer = Trainer::new(cx, &meta, &schedule, vars, initial_phi(&setup, &groups, &factors), &train_idx, seed)?;
    let evaluator =
        Evaluator { cx, test: &test, meta: &meta, groups: &groups, imbalance_ratio: metrics::imbalance_ratio(&counts), gini: metrics::gini(&counts), source_accuracy: backbone.source_accuracy };

    let mut order = train_idx.clone();
    let mut order_rng = Rng::derive(seed, "batch-order");
    let mut record = RunRecord { epochs: Vec::new(), train_counts: counts.clone(), failure: None };
    record.epochs.push(evaluator.record(&trainer.theta(), &trainer.phi, 0, &EpochSums::default())?);
    for epoch in 1..=schedule.epochs {
        order_rng.shuffle(&mut order);
        let mut sums = EpochSums::default();
        if trainer.meta_epoch(epoch) {
            if let Step::Diverged(reason) = trainer.meta_step(epoch, &mut sums)? {
                return failed(record, reason);
            }
        }
        for chunk in order.chunks(schedule.batch_size) {
            if let Step::Diverged(reason) = trainer.step(epoch, chunk, &mut sums)? {
                return failed(record, reason);
            }
        }
        record.epochs.push(evaluator.record(&trainer.theta(), &trainer.phi, epoch, &sums)?);
        progress.epoch(epoch, schedule.epochs, "");
    }
    Ok(Outcome::Done(outputs(&record, net, &trainer.vars, &trainer.phi)?))
}

/// The frozen backbone of a run and what its pretraining recorded.
struct Backbone {
    net: VitBackbone,
    /// Test accuracy (%) of the last pretraining epoch; `None` for an imported checkpoint.
    source_accuracy: Option<f64>,
}

/// The backbone from the pretraining cell's `backbone.safetensors`; its input channels must be
/// those of the target data set.
fn load_backbone(p: &P, pretrained: Option<&BTreeMap<String, Vec<u8>>>, target: &DataInput, dtype: DType, dev: &Device) -> Result<Backbone, MethodError> {
    let pre = pretrained.ok_or_else(|| MethodError::Invalid("class_aware_lora needs its pretraining cell's output".into()))?;
    let bytes = pre.get("backbone.safetensors").ok_or_else(|| MethodError::Invalid("the pretraining output has no backbone.safetensors".into()))?;
    let source_accuracy = pre.get("pretrain.json").and_then(|b| serde_json::from_slice::<PretrainRecord>(b).ok()).and_then(|r| r.source_accuracy.last().copied());
    let net = VitBackbone::from_safetensors(bytes, load_options(p)?, dtype, dev)?;
    if net.channels() != target.data.channels {
        return Err(MethodError::Invalid(format!("the backbone takes {} input channels but the target data set has {}", net.channels(), target.data.channels)));
    }
    Ok(Backbone { net, source_accuracy })
}

/// Training images per class in the subset `train`.
fn class_counts(data: &ImageSet, train: &[usize]) -> Vec<usize> {
    let mut counts = vec![0usize; data.num_classes];
    for &i in train {
        counts[data.labels[i] as usize] += 1;
    }
    counts
}

/// The initial rank and alpha factor of each class group (`head_factor`, `medium_factor`,
/// `tail_factor`).
struct GroupFactors {
    head: f64,
    medium: f64,
    tail: f64,
}

impl GroupFactors {
    fn of(&self, g: Group) -> f64 {
        match g {
            Group::Head => self.head,
            Group::Medium => self.medium,
            Group::Tail => self.tail,
        }
    }

    /// The largest factor, and at least 1: it sizes the allocated adapter components.
    fn largest(&self) -> f64 {
        [self.head, self.medium, self.tail].iter().cloned().fold(1.0, f64::max)
    }
}

impl Setup {
    /// The setup of a run from its parameters and the class counts and groups of its training
    /// subset. The variants with factors allocate R = ⌈1.5·r·largest factor⌉ components, so that
    /// a rank factor can grow to R/r; the baseline allocates r.
    fn new(p: &P, counts: &[usize], groups: &[Group], factors: &GroupFactors, dtype: DType) -> Setup {
        let kind = match p.variant {
            Variant::Baseline => Kind::Baseline,
            Variant::Shared => Kind::Shared,
            Variant::ClassAware | Variant::ClassAwareFrozen | Variant::ClassAwareLabel => Kind::ClassAware,
        };
        let has_factors = kind != Kind::Baseline;
        let rank = p.lora_rank;
        let alloc = if has_factors { (1.5 * rank as f64 * factors.largest()).ceil() as usize } else { rank };
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        Setup {
            kind,
            routing: if p.variant == Variant::ClassAwareLabel { Routing::Label } else { Routing::Predicted },
            learn_factors: p.variant != Variant::ClassAwareFrozen,
            rank,
            alloc,
            scale: p.lora_alpha / rank as f64,
            classes: counts.len(),
            loss: match p.loss {
                LossName::Ldam => Loss::Ldam,
                LossName::BalancedSoftmax => Loss::BalancedSoftmax,
                LossName::Ce => Loss::Ce,
            },
            objective: if !has_factors {
                Objective::Overall
            } else {
                match p.meta_objective {
                    Some(MetaObjective::Gmean) => Objective::Gmean,
                    Some(MetaObjective::WorstClass) => Objective::Worst,
                    Some(MetaObjective::BalancedAccuracy) | None => Objective::Balanced,
                }
            },
            // Neutral values where the baseline leaves them out (it reads none of them).
            tail_weight: p.tail_loss_weight.unwrap_or(1.0),
            rank_divergence: p.rank_divergence.unwrap_or(0.0),
            alpha_smoothness: p.alpha_smoothness.unwrap_or(0.0),
            tail: groups.iter().map(|g| *g == Group::Tail).collect(),
            counts: counts.to_vec(),
            order,
            dtype,
        }
    }
}

/// φ before the first meta step: α_m = 1 and each class's rank and alpha factors at its group's
/// initial factor (`class_aware`), all at the class mean of those (`shared`: the same starting
/// gate as the class-aware variant's uniform one), or all 1 (baseline).
fn initial_phi(setup: &Setup, groups: &[Group], factors: &GroupFactors) -> Phi {
    let per_class: Vec<f64> = groups.iter().map(|&g| factors.of(g)).collect();
    let mean = per_class.iter().sum::<f64>() / per_class.len().max(1) as f64;
    let values = match setup.kind {
        Kind::Baseline => vec![1.0; groups.len()],
        Kind::Shared => vec![mean; groups.len()],
        Kind::ClassAware => per_class,
    };
    Phi { alpha_meta: 1.0, rank: values.clone(), alpha: values }
}

/// θ before training: the backbone's adapters with R components (seeded), then a new head C×D
/// drawn from U(−1/√D, 1/√D) with the stream "head-init".
fn initial_theta(net: &VitBackbone, setup: &Setup, seed: u64, dev: &Device) -> Result<Vec<Tensor>, MethodError> {
    let mut theta = net.init_adapters(setup.alloc, seed, setup.dtype, dev)?;
    let (c, d) = (setup.classes, net.dim());
    let mut rng = Rng::derive(seed, "head-init");
    let bound = 1.0 / (d as f64).sqrt();
    let head: Vec<f64> = (0..c * d).map(|_| rng.uniform(-bound, bound)).collect();
    theta.push(Tensor::from_vec(head, (c, d), dev)?.to_dtype(setup.dtype)?);
    Ok(theta)
}

/// The parameters of the training loop.
struct Schedule {
    /// Peak learning rate of AdamW (cosine schedule over all steps) and its weight decay.
    lr: f64,
    weight_decay: f64,
    /// Adam's learning rate for φ.
    meta_lr: f64,
    epochs: usize,
    /// At least 1.
    batch_size: usize,
    /// A meta step at the start of every this many epochs (at least 1).
    meta_update_freq: usize,
    /// Unrolled SGD steps of the hypergradient, and their step size η.
    inner_steps: usize,
    inner_lr: f64,
}

impl Schedule {
    fn new(p: &P) -> Schedule {
        Schedule {
            lr: p.lr,
            weight_decay: p.weight_decay,
            meta_lr: p.meta_lr,
            epochs: p.epochs,
            batch_size: p.batch_size.max(1),
            meta_update_freq: p.meta_update_freq.max(1),
            inner_steps: p.meta_inner_steps,
            inner_lr: p.meta_inner_lr,
        }
    }
}

/// The inner batches of the hypergradient: the training split in an order of their own (stream
/// "meta-batches"), taken a batch at a time and shuffled again when a whole batch no longer fits.
struct InnerBatches {
    order: Vec<usize>,
    pos: usize,
    rng: Rng,
}

impl InnerBatches {
    fn new(train_idx: &[usize], seed: u64) -> InnerBatches {
        let mut order = train_idx.to_vec();
        let mut rng = Rng::derive(seed, "meta-batches");
        rng.shuffle(&mut order);
        InnerBatches { order, pos: 0, rng }
    }

    /// The next `steps` batches of `bs` images.
    fn next(&mut self, steps: usize, bs: usize, cx: &RunContext) -> candle_core::Result<Vec<Batch>> {
        let mut inner = Vec::with_capacity(steps);
        for _ in 0..steps {
            if self.pos + bs > self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.pos = 0;
            }
            let end = (self.pos + bs).min(self.order.len());
            inner.push(gather(cx.data, &self.order[self.pos..end], cx.side, cx.setup.dtype, cx.dev)?);
            self.pos = end;
        }
        Ok(inner)
    }
}

/// Running sums of one epoch, for its record.
#[derive(Default)]
struct EpochSums {
    /// Σ training loss × batch size, over `seen` images.
    loss: f64,
    seen: usize,
    /// Σ outer objective and Σ hypergradient norm, over `meta_steps` meta steps.
    meta: f64,
    hypergradient_norm: f64,
    meta_steps: usize,
}

/// How a training step ended.
enum Step {
    Taken,
    /// The loss, the outer objective or the hypergradient was not finite: the reason.
    Diverged(String),
}

/// What every step and every evaluation of a run reads, and none changes.
#[derive(Clone, Copy)]
struct RunContext<'a> {
    setup: &'a Setup,
    net: &'a VitBackbone,
    data: &'a ImageSet,
    /// The backbone's input side, to which images are resized.
    side: usize,
    dev: &'a Device,
}

/// The training loop's state: θ (as variables) and AdamW, φ and its Adam, the inner batches and
/// the step count.
struct Trainer<'a> {
    cx: RunContext<'a>,
    meta: &'a Batch,
    schedule: &'a Schedule,
    vars: Vec<Var>,
    opt: Optimizer,
    phi: Phi,
    meta_opt: Adam,
    inner: InnerBatches,
    /// Steps taken so far in the run.
    steps_taken: usize,
    /// Steps of the whole run, the length of the cosine schedule (at least 1).
    total_steps: usize,
}

impl<'a> Trainer<'a> {
    /// θ = `vars` and φ = `phi` before the first step, on the training split `train_idx`.
    fn new(cx: RunContext<'a>, meta: &'a Batch, schedule: &'a Schedule, vars: Vec<Var>, phi: Phi, train_idx: &[usize], seed: u64) -> Result<Trainer<'a>, MethodError> {
        let opt = Optimizer::new(vars.clone(), &OptimConfig { weight_decay: schedule.weight_decay, ..OptimConfig::new(OptimizerKind::Adamw, schedule.lr) })?;
        let n_learned = phi.learned(cx.setup).len();
        let meta_opt = Adam { lr: schedule.meta_lr, m: vec![0.0; n_learned], v: vec![0.0; n_learned], t: 0 };
        let total_steps = (train_idx.len().div_ceil(schedule.batch_size) * schedule.epochs).max(1);
        Ok(Trainer { cx, meta, schedule, vars, opt, phi, meta_opt, inner: InnerBatches::new(train_idx, seed), steps_taken: 0, total_steps })
    }

    /// θ's current values.
    fn theta(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Whether `epoch` (from 1) opens with a meta step: epochs 1, 1 + f, 1 + 2f, … for
    /// f = `meta_update_freq`.
    fn meta_epoch(&self, epoch: usize) -> bool {
        (epoch - 1).is_multiple_of(self.schedule.meta_update_freq)
    }

    /// One meta step: the hypergradient of the outer objective through `meta_inner_steps`
    /// unrolled steps from the current θ, then an Adam step of φ's learned values.
    fn meta_step(&mut self, epoch: usize, sums: &mut EpochSums) -> Result<Step, MethodError> {
        let cx = self.cx;
        let inner = self.inner.next(self.schedule.inner_steps, self.schedule.batch_size, &cx)?;
        let (problem, phi) = Bilevel::new(cx.setup, cx.net, &self.phi, self.schedule.inner_lr, &inner, self.meta, cx.dev)?;
        let hg = meta::hypergradient(&problem, &self.theta(), &phi, Unroll::new(inner.len(), HVP_EPS))?;
        if !hg.value.is_finite() || hg.phi.iter().any(|x| !x.is_finite()) {
            return Ok(Step::Diverged(format!("the meta objective or its hypergradient became non-finite at the start of epoch {epoch}")));
        }
        self.update_phi(&hg.phi);
        sums.meta += hg.value;
        sums.hypergradient_norm += hg.norm();
        sums.meta_steps += 1;
        Ok(Step::Taken)
    }

    /// One AdamW step of θ on the training loss of the batch `chunk` (learning rate on the cosine
    /// schedule).
    fn step(&mut self, epoch: usize, chunk: &[usize], sums: &mut EpochSums) -> Result<Step, MethodError> {
        let (cx, step) = (self.cx, self.steps_taken);
        self.opt.set_lr(self.schedule.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / self.total_steps as f64).cos()));
        let b = gather(cx.data, chunk, cx.side, cx.setup.dtype, cx.dev)?;
        let pt = phi_tensors(cx.setup, &self.phi, cx.dev)?;
        let l = train_loss(cx.setup, cx.net, &self.theta(), &pt, &b.x, &b.y, &b.ys)?;
        let lv = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !lv.is_finite() {
            return Ok(Step::Diverged(format!("the training loss became {lv} at epoch {epoch}, step {step}: the run diverged")));
        }
        self.opt.backward_step(&l)?;
        sums.loss += lv * chunk.len() as f64;
        sums.seen += chunk.len();
        self.steps_taken += 1;
        Ok(Step::Taken)
    }

    /// φ after one Adam step of its learned values along the hypergradient `h`, clamped: α_m
    /// and the alpha factors to [0.05, 10], the rank factors to [0.1, R/r].
    fn update_phi(&mut self, h: &[f64]) {
        let setup = self.cx.setup;
        let rank_max = setup.alloc as f64 / setup.rank as f64;
        let mut learned = self.phi.learned(setup);
        self.meta_opt.step(&mut learned, h);
        let mut phi = self.phi.with_learned(setup, &learned);
        phi.alpha_meta = phi.alpha_meta.clamp(0.05, 10.0);
        if setup.has_factors() {
            phi.rank.iter_mut().for_each(|r| *r = r.clamp(0.1, rank_max));
            phi.alpha.iter_mut().for_each(|a| *a = a.clamp(0.05, 10.0));
        }
        self.phi = phi;
    }
}

/// What an epoch's record is measured with: the test split, the groups, and the values that stay
/// fixed during the run.
struct Evaluator<'a> {
    cx: RunContext<'a>,
    test: &'a Batch,
    /// The meta split, whose cross-entropy is `meta_loss`.
    meta: &'a Batch,
    groups: &'a [Group],
    imbalance_ratio: Option<f64>,
    gini: Option<f64>,
    source_accuracy: Option<f64>,
}

impl Evaluator<'_> {
    /// The record of `epoch` for θ and φ, with the means of the epoch's `sums` (none at epoch 0).
    fn record(&self, theta: &[Tensor], phi: &Phi, epoch: usize, sums: &EpochSums) -> Result<EpochRecord, MethodError> {
        let preds = self.predictions(theta, phi)?;
        let meta_loss = self.meta_loss(theta, phi)?;
        let acc = metrics::try_accuracy(&self.test.ys, &preds, self.groups).map_err(|e| MethodError::Metrics(e.to_string()))?;
        let avg = |s: f64, n: usize| (n > 0).then(|| s / n as f64);
        let pct = |x: f64| 100.0 * x;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("train_loss", avg(sums.loss, sums.seen));
        put("meta_loss", Some(meta_loss));
        put("outer_objective", avg(sums.meta, sums.meta_steps));
        put("hypergradient_norm", avg(sums.hypergradient_norm, sums.meta_steps));
        put("accuracy", Some(pct(acc.overall)));
        put("balanced_accuracy", Some(pct(acc.balanced)));
        put("head_accuracy", acc.head.map(pct));
        put("medium_accuracy", acc.medium.map(pct));
        put("tail_accuracy", acc.tail.map(pct));
        put("head_tail_gap", acc.head.zip(acc.tail).map(|(h, t)| pct(h - t)));
        let pcs: Vec<f64> = acc.per_class.iter().flatten().copied().collect();
        let gm = if pcs.iter().any(|&a| a <= 0.0) { 0.0 } else { (pcs.iter().map(|a| a.ln()).sum::<f64>() / pcs.len().max(1) as f64).exp() };
        put("gmean", Some(pct(gm)));
        put("worst_class", pcs.iter().cloned().reduce(f64::min).map(pct));
        put("imbalance_ratio", self.imbalance_ratio);
        put("gini", self.gini);
        put("meta_alpha", Some(phi.alpha_meta));
        put("source_accuracy", self.source_accuracy);
        let w = theta[theta.len() - 1].to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let setup = self.cx.setup;
        let per_class = (0..setup.classes)
            .map(|k| {
                let mut extra = BTreeMap::new();
                extra.insert("rank_factor".to_string(), phi.rank[k]);
                extra.insert("alpha_factor".to_string(), phi.alpha[k]);
                ClassRecord {
                    class: k,
                    train_count: setup.counts[k],
                    group: group_name(self.groups[k]).to_string(),
                    test_accuracy: acc.per_class[k].map(pct),
                    classifier_norm: w[k].iter().map(|v| v * v).sum::<f64>().sqrt(),
                    extra,
                }
            })
            .collect();
        Ok(EpochRecord { epoch, metrics: m, per_class, analysis_object: String::new(), per_task: Vec::new() })
    }

    /// The predicted class of every test image, with the inference forward pass, in batches of
    /// 500.
    fn predictions(&self, theta: &[Tensor], phi: &Phi) -> Result<Vec<u32>, MethodError> {
        let (setup, net) = (self.cx.setup, self.cx.net);
        let pt = phi_tensors(setup, phi, self.cx.dev)?;
        let mut preds = Vec::with_capacity(self.test.ys.len());
        let n = self.test.ys.len();
        let mut start = 0;
        while start < n {
            let len = (n - start).min(500);
            let z = forward(setup, net, theta, &pt, &self.test.x.narrow(0, start, len)?, None)?;
            preds.extend(z.argmax(D::Minus1)?.to_vec1::<u32>()?);
            start += len;
        }
        Ok(preds)
    }

    /// The mean cross-entropy of the meta split with the inference forward pass (a uniform
    /// guess scores ln C).
    fn meta_loss(&self, theta: &[Tensor], phi: &Phi) -> Result<f64, MethodError> {
        let (setup, net) = (self.cx.setup, self.cx.net);
        let pt = phi_tensors(setup, phi, self.cx.dev)?;
        let z = prediction_logits(setup, forward(setup, net, theta, &pt, &self.meta.x, None)?)?;
        Ok(ce_per_sample(&z, &self.meta.y)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// A run that diverged: its record so far, with the reason, as a failure.
fn failed(mut record: RunRecord, reason: String) -> Result<Outcome, MethodError> {
    record.failure = Some(reason.clone());
    Ok(Outcome::Failed { reason, objects: BTreeMap::from([("metrics.json".to_string(), to_json(&record)?)]) })
}

/// The objects of a finished run: `metrics.json` and `adapters.safetensors`, which holds the
/// adapters under the backbone's names, the head as `head.weight` and φ as `meta.phi`
/// ([α_m, ρ_1..ρ_C, a_1..a_C], [`Phi::flat`]).
fn outputs(record: &RunRecord, net: &VitBackbone, vars: &[Var], phi: &Phi) -> Result<BTreeMap<String, Vec<u8>>, MethodError> {
    let mut objects = BTreeMap::new();
    objects.insert("metrics.json".to_string(), to_json(record)?);
    let net_names = net.adapter_names();
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, v) in vars.iter().enumerate() {
        let name = net_names.get(i).cloned().unwrap_or_else(|| "head.weight".to_string());
        t.insert(name, v.as_tensor().to_device(&Device::Cpu)?);
    }
    let phis = phi.flat();
    let len = phis.len();
    t.insert("meta.phi".to_string(), Tensor::from_vec(phis, len, &Device::Cpu)?);
    objects.insert("adapters.safetensors".to_string(), safetensors_bytes(&t)?);
    Ok(objects)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_parameter_struct_and_the_schema_agree() {
        crate::params::Schema::of::<P>().check().unwrap();
        // An imported backbone does not read the engine ViT's pretraining parameters.
        let mut p = crate::params::Schema::of::<P>().defaults();
        assert!(ClassAwareLora.inactive(&p).is_empty());
        p.insert("backbone".into(), ParamValue::Str("vit-b16-clip".into()));
        assert_eq!(ClassAwareLora.inactive(&p), PRETRAIN_ONLY);
        // The baseline reads no factors, tail weight or meta objective, and decodes without them.
        let mut p = crate::params::Schema::of::<P>().defaults();
        p.insert("variant".into(), ParamValue::Str("baseline".into()));
        let off = ClassAwareLora.inactive(&p);
        assert_eq!(off, FACTORS_ONLY);
        for k in off {
            p.remove(k);
        }
        let decoded: P = crate::methods::params(&p).unwrap();
        assert!(decoded.tail_loss_weight.is_none() && decoded.meta_objective.is_none());
    }

    use super::*;
    use std::collections::HashMap;

    /// A tiny random ViT (width 8, 2 heads, 1 block, 2×2 patches of a 4×4 image) in f64.
    fn tiny_vit(seed: u64) -> VitBackbone {
        let mut rng = Rng::new(seed);
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let mut put = |name: &str, dims: &[usize], scale: f64| {
            let n: usize = dims.iter().product();
            let v: Vec<f64> = (0..n).map(|_| scale * rng.normal()).collect();
            t.insert(name.to_string(), Tensor::from_vec(v, dims, &dev).unwrap());
        };
        let d = 8;
        put("patch_embed.weight", &[d, 1, 2, 2], 0.5);
        put("patch_embed.bias", &[d], 0.1);
        put("cls_token", &[1, 1, d], 0.3);
        put("pos_embed", &[1, 5, d], 0.3);
        for (n, dims) in [("attn.qkv", [3 * d, d]), ("attn.proj", [d, d]), ("mlp.fc1", [2 * d, d]), ("mlp.fc2", [d, 2 * d])] {
            put(&format!("blocks.0.{n}.weight"), &dims, 0.3);
            put(&format!("blocks.0.{n}.bias"), &[dims[0]], 0.1);
        }
        let ones = |n: usize| Tensor::ones(n, DType::F64, &dev).unwrap();
        let zeros = |n: usize| Tensor::zeros(n, DType::F64, &dev).unwrap();
        for n in ["blocks.0.norm1", "blocks.0.norm2", "norm"] {
            t.insert(format!("{n}.weight"), ones(d));
            t.insert(format!("{n}.bias"), zeros(d));
        }
        VitBackbone::from_tensors(&t, VitLoadOptions { heads: 2, eps: 1e-5, activation: Activation::QuickGelu }, DType::F64, &dev).unwrap()
    }

    fn tiny_batch(n: usize, seed: u64, classes: usize) -> Batch {
        let mut rng = Rng::new(seed);
        let xs: Vec<f64> = (0..n * 16).map(|_| rng.normal()).collect();
        let ys: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
        Batch { x: Tensor::from_vec(xs, (n, 1, 4, 4), &Device::Cpu).unwrap(), y: Tensor::from_vec(ys.clone(), n, &Device::Cpu).unwrap(), ys }
    }

    fn setup(kind: Kind, routing: Routing, objective: Objective, loss: Loss) -> Setup {
        Setup {
            kind,
            routing,
            learn_factors: true,
            rank: 2,
            alloc: if kind == Kind::Baseline { 2 } else { 6 },
            scale: 1.0,
            classes: 3,
            loss,
            objective,
            tail_weight: 2.0,
            rank_divergence: 0.01,
            alpha_smoothness: 0.005,
            counts: vec![30, 10, 3],
            tail: vec![false, false, true],
            order: vec![0, 1, 2],
            dtype: DType::F64,
        }
    }

    /// Adapters with a nonzero B (so every path carries gradient) and a head.
    fn theta(net: &VitBackbone, s: &Setup) -> Vec<Tensor> {
        let mut th = net.init_adapters(s.alloc, 4, DType::F64, &Device::Cpu).unwrap();
        let mut rng = Rng::new(9);
        for t in th.iter_mut().skip(1).step_by(2) {
            let v: Vec<f64> = (0..t.elem_count()).map(|_| 0.3 * rng.normal()).collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
        let v: Vec<f64> = (0..3 * net.dim()).map(|_| 0.5 * rng.normal()).collect();
        th.push(Tensor::from_vec(v, (3, net.dim()), &Device::Cpu).unwrap());
        th
    }

    /// φ as a run of `s` would hold it: per-class factors, the same factor for every class
    /// (`shared`), or ones (baseline).
    fn test_phi(s: &Setup) -> Phi {
        match s.kind {
            Kind::ClassAware => Phi { alpha_meta: 1.1, rank: vec![0.6, 1.1, 1.9], alpha: vec![0.5, 1.2, 1.8] },
            Kind::Shared => Phi { alpha_meta: 1.1, rank: vec![1.3; 3], alpha: vec![0.9; 3] },
            Kind::Baseline => Phi { alpha_meta: 1.1, rank: vec![1.0; 3], alpha: vec![1.0; 3] },
        }
    }

    fn check(s: &Setup, inner_steps: usize) {
        let net = tiny_vit(1);
        let th = theta(&net, s);
        let phi = test_phi(s);
        let inner: Vec<Batch> = (0..inner_steps).map(|j| tiny_batch(6, 20 + j as u64, 3)).collect();
        let meta = tiny_batch(6, 99, 3);
        let eta = 0.5;
        let dev = Device::Cpu;
        let hypergradient = |inner: &[Batch], hvp_eps: f64| {
            let (problem, learned) = Bilevel::new(s, &net, &phi, eta, inner, &meta, &dev).unwrap();
            let hg = meta::hypergradient(&problem, &th, &learned, Unroll::new(inner.len(), hvp_eps)).unwrap();
            (hg.value, hg.phi)
        };
        let unrolled_outer = |phi: &Phi| {
            let (problem, learned) = Bilevel::new(s, &net, phi, eta, &inner, &meta, &dev).unwrap();
            meta::unrolled_value(&problem, &th, &learned, inner.len()).unwrap()
        };
        // In f64 a small difference step makes the finite-difference Hessian products exact to
        // ~1e-8; the training default (1e-2, for f32) is checked to 2% below.
        let (value, h) = hypergradient(&inner, 1e-5);
        let (_, h_default) = hypergradient(&inner, HVP_EPS);
        let expected_len = match (s.learn_factors, s.kind) {
            (false, _) | (_, Kind::Baseline) => 1,
            (true, Kind::Shared) => 3,
            (true, Kind::ClassAware) => 7,
        };
        assert_eq!(h.len(), expected_len);
        let base = unrolled_outer(&phi);
        assert!((value - base).abs() < 1e-12);
        let step = 1e-5;
        let mut worst: f64 = 0.0;
        let scale = h.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(scale > 1e-4, "the meta-parameters receive no gradient: {h:?}");
        for i in 0..h.len() {
            let mut fl = phi.learned(s);
            fl[i] += step;
            let up = unrolled_outer(&phi.with_learned(s, &fl));
            fl[i] -= 2.0 * step;
            let down = unrolled_outer(&phi.with_learned(s, &fl));
            let fd = (up - down) / (2.0 * step);
            worst = worst.max((fd - h[i]).abs());
        }
        assert!(worst < 2e-5 * scale.max(1.0), "hypergradient differs from finite differences by {worst} (scale {scale}): {h:?}");
        let off = h.iter().zip(&h_default).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(off < 2e-2 * scale.max(1.0), "the default difference step is off by {off}");
        // The indirect part (through the inner steps) is nonzero: dropping it changes h.
        let (_, direct) = hypergradient(&[], 1e-5);
        assert!(h.iter().zip(&direct).any(|(a, b)| (a - b).abs() > 1e-4 * scale), "no gradient flows through the inner steps");
    }

    #[test]
    fn hypergradient_matches_finite_differences() {
        use {Kind::*, Routing::*};
        check(&setup(ClassAware, Predicted, Objective::Balanced, Loss::Ce), 1);
        check(&setup(ClassAware, Predicted, Objective::Gmean, Loss::Ldam), 2);
        check(&setup(ClassAware, Predicted, Objective::Worst, Loss::BalancedSoftmax), 2);
        check(&setup(ClassAware, Label, Objective::Balanced, Loss::Ce), 2);
        check(&setup(Shared, Predicted, Objective::Balanced, Loss::Ce), 2);
        check(&setup(Baseline, Predicted, Objective::Overall, Loss::Ce), 2);
        // Frozen factors: only α_m is learned, through the same problem.
        check(&Setup { learn_factors: false, ..setup(ClassAware, Predicted, Objective::Balanced, Loss::Ce) }, 2);
    }

    #[test]
    fn gates_follow_the_factors_and_predicted_routing_mixes_them_by_probability() {
        let s = setup(Kind::ClassAware, Routing::Predicted, Objective::Balanced, Loss::Ce);
        let phi = Phi { alpha_meta: 1.0, rank: vec![0.5, 1.0, 2.0], alpha: vec![0.5, 1.0, 2.0] };
        let pt = phi_tensors(&s, &phi, &Device::Cpu).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        // g_k(ρ, a) = a·σ((2ρ − k − ½)/½) for r = 2, alpha/r = 1, α_m = 1.
        let hand = |rho: f64, a: f64, k: usize| a * sig((2.0 * rho - k as f64 - 0.5) / 0.5);
        let g = masked_gates(&s, &pt, &pt.rank, &pt.alpha).unwrap().to_vec2::<f64>().unwrap();
        for (c, gc) in g.iter().enumerate() {
            assert_eq!(gc.len(), 6);
            for (k, v) in gc.iter().enumerate() {
                assert!((v - hand(phi.rank[c], phi.alpha[c], k)).abs() < 1e-12);
            }
        }
        let gu = uniform_gate(&s, &pt).unwrap().to_vec2::<f64>().unwrap();
        assert!((gu[0][1] - hand(3.5 / 3.0, 3.5 / 3.0, 1)).abs() < 1e-12);
        // The routed forward pass: the uniform-gate pass's probabilities p, then g = Σ_c p_c g_c.
        let net = tiny_vit(1);
        let th = theta(&net, &s);
        let b = tiny_batch(4, 5, 3);
        let z0 = scores(&s, &net, &th, &b.x, &uniform_gate(&s, &pt).unwrap()).unwrap().to_vec2::<f64>().unwrap();
        let mut mixed = Vec::new();
        for z in &z0 {
            let e: Vec<f64> = z.iter().map(|v| v.exp()).collect();
            let sum: f64 = e.iter().sum();
            mixed.extend((0..6).map(|k| (0..3).map(|c| e[c] / sum * hand(phi.rank[c], phi.alpha[c], k)).sum::<f64>()));
        }
        let g = Tensor::from_vec(mixed, (4, 6), &Device::Cpu).unwrap();
        let by_hand = scores(&s, &net, &th, &b.x, &g).unwrap();
        let routed = forward(&s, &net, &th, &pt, &b.x, None).unwrap();
        assert!((routed - by_hand).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
        // The baseline's gate is (alpha/r)·α_m on its r components.
        let base = setup(Kind::Baseline, Routing::Predicted, Objective::Overall, Loss::Ce);
        let pt = phi_tensors(&base, &Phi { alpha_meta: 0.7, rank: vec![1.0; 3], alpha: vec![1.0; 3] }, &Device::Cpu).unwrap();
        assert_eq!(uniform_gate(&base, &pt).unwrap().to_vec2::<f64>().unwrap(), vec![vec![0.7, 0.7]]);
    }

    /// Issue 22: the label-routed variant gated each training image by its true label, so the
    /// network could read the class it had to predict. The training forward pass must be the
    /// inference one, bit for bit, whatever the labels; the test shows that it catches the leak
    /// by running the same check on `routing = "label"`.
    #[test]
    fn training_logits_never_read_the_labels() {
        let net = tiny_vit(1);
        let b = tiny_batch(6, 7, 3);
        let other = Tensor::new(&[2u32, 2, 0, 1, 0, 1], &Device::Cpu).unwrap();
        let same = |a: &Tensor, b: &Tensor| a.to_vec2::<f64>().unwrap() == b.to_vec2::<f64>().unwrap();
        let modes = |s: &Setup| {
            let th = theta(&net, s);
            let pt = phi_tensors(s, &test_phi(s), &Device::Cpu).unwrap();
            let f = |y: Option<&Tensor>| forward(s, &net, &th, &pt, &b.x, y).unwrap();
            (f(Some(&b.y)), f(Some(&other)), f(None))
        };
        for kind in [Kind::Baseline, Kind::Shared, Kind::ClassAware] {
            for loss in [Loss::Ce, Loss::Ldam] {
                let (train, relabelled, inference) = modes(&setup(kind, Routing::Predicted, Objective::Balanced, loss));
                assert!(same(&train, &inference) && same(&relabelled, &inference), "{kind:?} {loss:?}: the training logits differ from the inference logits");
            }
        }
        let (train, relabelled, inference) = modes(&setup(Kind::ClassAware, Routing::Label, Objective::Balanced, Loss::Ce));
        assert!(!same(&train, &inference) && !same(&train, &relabelled), "the check no longer sees the label-routed leak");
    }

    /// The leak as a training run sees it: images of pure noise, a fresh batch at every step, so
    /// no function of the image predicts its label and no training loss can fall below ln C on
    /// average (the loss is taken before the step that sees the batch). Label routing drives it
    /// far below; predicted routing cannot.
    #[test]
    fn only_label_routing_fits_labels_that_the_images_do_not_carry() {
        let net = tiny_vit(1);
        let chance = (3f64).ln();
        let late_loss = |routing: Routing| {
            let s = Setup { tail_weight: 1.0, ..setup(Kind::ClassAware, routing, Objective::Balanced, Loss::Ce) };
            let vars: Vec<Var> = theta(&net, &s).iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let mut opt = Optimizer::new(vars.clone(), &OptimConfig::new(OptimizerKind::Adamw, 0.02)).unwrap();
            let pt = phi_tensors(&s, &Phi { alpha_meta: 1.0, rank: vec![0.5, 1.0, 2.0], alpha: vec![0.5, 1.0, 2.0] }, &Device::Cpu).unwrap();
            let mut late = Vec::new();
            for step in 0..150u64 {
                let mut rng = Rng::derive(step, "noise-labels");
                let ys: Vec<u32> = (0..24).map(|_| rng.below(3) as u32).collect();
                let x: Vec<f64> = (0..24 * 16).map(|_| rng.normal()).collect();
                let (x, y) = (Tensor::from_vec(x, (24, 1, 4, 4), &Device::Cpu).unwrap(), Tensor::from_vec(ys.clone(), 24, &Device::Cpu).unwrap());
                let th: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let l = train_loss(&s, &net, &th, &pt, &x, &y, &ys).unwrap();
                if step >= 100 {
                    late.push(l.to_scalar::<f64>().unwrap());
                }
                opt.backward_step(&l).unwrap();
            }
            late.iter().sum::<f64>() / late.len() as f64
        };
        let (honest, leaking) = (late_loss(Routing::Predicted), late_loss(Routing::Label));
        assert!(honest > 0.95 * chance, "predicted routing fits noise: {honest} against ln 3 = {chance}");
        assert!(leaking < 0.6 * chance, "label routing no longer reads the label: {leaking} against ln 3 = {chance}");
    }

    #[test]
    fn resize_area_averages_footprints() {
        // 4×4 → 2×2 averages 2×2 blocks.
        let px: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(resize_area(&px, 1, 4, 4, 2, 2), vec![2.5, 4.5, 10.5, 12.5]);
        // 3 → 2 along one axis: footprints [0, 1.5) and [1.5, 3): (a + b/2)/1.5 and (b/2 + c)/1.5.
        let r = resize_area(&[0.0, 3.0, 6.0], 1, 1, 3, 1, 2);
        assert!((r[0] - 1.0).abs() < 1e-6 && (r[1] - 5.0).abs() < 1e-6, "{r:?}");
        // Upsampling 2 → 4 repeats; a constant image stays constant at any size.
        assert_eq!(resize_area(&[1.0, 3.0], 1, 1, 2, 1, 4), vec![1.0, 1.0, 3.0, 3.0]);
        assert!(resize_area(&[0.25; 28 * 28], 1, 28, 28, 8, 8).iter().all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn meta_split_is_per_class_and_keeps_both_sides_populated() {
        let labels: Vec<u32> = [vec![0u32; 10], vec![1; 4], vec![2; 1]].concat();
        let data = ImageSet { pixels: vec![0.0; labels.len()], labels: labels.clone(), channels: 1, height: 1, width: 1, num_classes: 3 };
        let idx: Vec<usize> = (0..labels.len()).collect();
        let (tr, me) = meta_split(&data, &idx, 0.2, 0);
        let count = |v: &[usize], c: u32| v.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!((count(&me, 0), count(&me, 1), count(&me, 2)), (2, 1, 0));
        assert_eq!(tr.len() + me.len(), labels.len());
        assert_eq!(meta_split(&data, &idx, 0.2, 0), (tr, me));
    }

    /// The ViT-B/16 (timm) key layout loads through the manifest path: a tiny file with the same
    /// names (width 24, 12 heads, 2 blocks, 16×16 patches of a 32×32 image, pre-norm, head).
    #[test]
    fn vit_b16_layout_loads_through_a_weights_manifest() {
        let dir = std::env::temp_dir().join(format!("reprise-vitb16-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data-manifests/weights")).unwrap();
        let dev = Device::Cpu;
        let d = 24;
        let mut rng = Rng::new(3);
        let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut put = |name: &str, dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|_| 0.1 * rng.normal() as f32).collect();
            t.insert(name.to_string(), Tensor::from_vec(v, dims, &dev).unwrap());
        };
        put("cls_token", &[1, 1, d]);
        put("pos_embed", &[1, 5, d]);
        put("patch_embed.proj.weight", &[d, 3, 16, 16]);
        put("patch_embed.proj.bias", &[d]);
        put("norm_pre.weight", &[d]);
        put("norm_pre.bias", &[d]);
        for b in 0..2 {
            for (n, o, i) in [("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", 4 * d, d), ("mlp.fc2", d, 4 * d)] {
                put(&format!("blocks.{b}.{n}.weight"), &[o, i]);
                put(&format!("blocks.{b}.{n}.bias"), &[o]);
            }
            for n in ["norm1", "norm2"] {
                put(&format!("blocks.{b}.{n}.weight"), &[d]);
                put(&format!("blocks.{b}.{n}.bias"), &[d]);
            }
        }
        put("norm.weight", &[d]);
        put("norm.bias", &[d]);
        put("head.weight", &[1000, d]);
        put("head.bias", &[1000]);
        let bytes = safetensors_bytes(&t).unwrap();
        std::fs::write(dir.join("tiny-vit-b16.safetensors"), &bytes).unwrap();
        let sha = crate::cache::sha256_hex(&bytes);
        let manifest = |sha: &str| {
            format!(
                "name = \"tiny\"\ndescription = \"test\"\nlayout = \"timm-vit\"\npath = \"tiny-vit-b16.safetensors\"\nsha256 = \"{sha}\"\nlicence = \"test\"\nsource = \"test\"\ncitation = \"test\"\n"
            )
        };
        std::fs::write(dir.join("data-manifests/weights/tiny.toml"), manifest(&sha)).unwrap();
        let loaded = load_weights(&dir, "tiny").unwrap();
        let opts = VitLoadOptions { heads: 12, eps: 1e-6, activation: Activation::QuickGelu };
        let vit = VitBackbone::from_safetensors(&loaded, opts, DType::F32, &dev).unwrap();
        assert_eq!((vit.dim(), vit.patch(), vit.tokens(), vit.input_side(), vit.blocks.len(), vit.channels()), (24, 16, 4, 32, 2, 3));
        assert!(vit.norm_pre.is_some() && vit.norm.is_some());
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).unwrap();
        let ad = vit.init_adapters(4, 0, DType::F32, &dev).unwrap();
        let g = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
        assert_eq!(vit.features(&x, &ad, &g).unwrap().dims(), &[2, 24]);
        // Unpinned and wrong hashes are refused, naming the file.
        std::fs::write(dir.join("data-manifests/weights/tiny.toml"), manifest("unpinned")).unwrap();
        let e = load_weights(&dir, "tiny").unwrap_err().to_string();
        assert!(e.contains("unpinned") && e.contains(&sha), "{e}");
        std::fs::write(dir.join("data-manifests/weights/tiny.toml"), manifest(&"0".repeat(64))).unwrap();
        assert!(load_weights(&dir, "tiny").unwrap_err().to_string().contains("mismatch"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
