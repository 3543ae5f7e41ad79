//! GroupDRO over heterogeneous feature spaces with Gaussian class anchors (document 003).
//!
//! Two groups share the labels but not the input space: group 0 (e.g. 28×28 MNIST) and group 1
//! (e.g. the 8×8 optical digits, capped per class so it is the smaller, harder group). Each has
//! its own encoder into a shared `latent`-dimensional space (group 0: the engine's CNN features →
//! linear; group 1: an MLP in → 128 → latent), and one head (latent → `head_hidden` → C, with
//! biases) classifies both. Batches are drawn from the union of the two training sets
//! (`sampler = uniform`, the document's) or with each group equally likely
//! (`group_balanced`, Sagawa et al.'s `--reweight_groups`).
//!
//! The objective is ERM (the batch's mean cross-entropy) or GroupDRO over the groups' mean
//! losses ([`dro`]: update rules, objectives, warm-up, and whether q is updated after the
//! optimiser step, as the document's code does, or before the loss, as Sagawa's does). On top,
//! λ_fit · L_fit + λ_sep · L_sep: each class c has a Gaussian anchor N(m_c, L_c L_cᵀ + εI);
//! L_fit is the mean over the batch's classes with ≥ 2 samples of W2²(batch moments, anchor)
//! ([`gaussian`]); L_sep either asks the head to classify `anchor_draws` samples of each anchor
//! as its class (`classifier`) or is the mean hinge max(0, margin − W2²) over anchor pairs
//! (`w2_margin`). The document leaves the anchors' initialisation undefined: m_c ~ N(0, 0.01 I),
//! L_c = I. Adam with coupled L2 weight decay and global gradient-norm clipping.
//!
//! Each epoch records the test accuracy of each group, the worst and their mean (balanced), the
//! pooled accuracy, the groups' training losses, q with its spread within the epoch (`q_std`)
//! and its oscillation (`q_step`, the RMS of its step-to-step changes), the fit and separation
//! losses and the anchors' separation.

pub mod dro;
pub mod gaussian;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;

use super::{to_json, DataInput, EpochRecord, InputDecl, Method, MethodError, Outcome, Progress, RunRecord, TrainInputs};
use crate::models::kernels::linear::Linear;
use crate::models::{self, Classifier, ModelConfig, ModelKind};
use crate::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, Params, Schema};
use crate::rng::Rng;
use crate::train::schedule::clip_grad_norm;
use crate::train::{OptimConfig, Optimizer, OptimizerKind};
use dro::{Objective, UpdateMode};

/// The method.
pub struct GroupDro;

/// The names the two inputs are read by.
const GROUPS: [&str; 2] = ["group0", "group1"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct P {
    dataset0: String,
    dataset1: String,
    group0_per_class: usize,
    group1_per_class: usize,
    data_seed: u64,
    group_dro: bool,
    update_mode: Option<UpdateMode>,
    objective: Option<Objective>,
    eta: Option<f64>,
    gamma: Option<f64>,
    warmup_epochs: Option<usize>,
    update_order: Option<Order>,
    sampler: Sampler,
    latent: usize,
    head_hidden: usize,
    lambda_fit: f64,
    lambda_sep: f64,
    sep_method: SepMethod,
    sep_margin: Option<f64>,
    anchor_draws: Option<usize>,
    anchor_eps: f64,
    lr: f64,
    weight_decay: f64,
    grad_clip: f64,
    batch_size: usize,
    epochs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Order {
    After,
    Before,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Sampler {
    Uniform,
    GroupBalanced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SepMethod {
    Classifier,
    W2Margin,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

const fn float(min: f64, max: f64) -> K {
    K::Float { min, max, min_exclusive: false }
}

const fn positive(max: f64) -> K {
    K::Float { min: 0.0, max, min_exclusive: true }
}

static SCHEMA: &[ParamDef] = &[
    ParamDef { name: "dataset0", kind: K::DataName, default: Dv::Str("mnist"), doc: "group 0's data set (images, its own encoder: the CNN)" },
    ParamDef { name: "dataset1", kind: K::DataName, default: Dv::Str("optdigits"), doc: "group 1's data set (flattened into an MLP encoder); the same classes as group 0" },
    ParamDef { name: "group0_per_class", kind: K::Int { min: 0, max: 1_000_000 }, default: Dv::Int(0), doc: "training images per class kept of group 0 (0: all)" },
    ParamDef { name: "group1_per_class", kind: K::Int { min: 0, max: 1_000_000 }, default: Dv::Int(10), doc: "training images per class kept of group 1 (0: all)" },
    ParamDef { name: "data_seed", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(0), doc: "seed of the per-class shuffle that picks group 1's images" },
    ParamDef { name: "group_dro", kind: K::Bool, default: Dv::Bool(true), doc: "GroupDRO (true) or ERM, the batch's mean cross-entropy (false)" },
    ParamDef { name: "update_mode", kind: K::Choice(&["exp", "softmax", "exp_smooth"]), default: Dv::Str("exp_smooth"), doc: "how q follows the group losses (GroupDRO runs only)" },
    ParamDef {
        name: "objective", kind: K::Choice(&["weighted", "max", "logsumexp"]), default: Dv::Str("weighted"), doc: "Σ q_g ℓ_g, max_g ℓ_g, or (1/η) log Σ exp(η ℓ_g) (GroupDRO runs only)"
    },
    ParamDef { name: "eta", kind: positive(100.0), default: Dv::Float(0.01), doc: "step size η of the q update, and the temperature of `logsumexp` (GroupDRO runs only)" },
    ParamDef { name: "gamma", kind: float(0.0, 1.0), default: Dv::Float(0.9), doc: "q ← (1 − γ) q + γ q_mwu (exp_smooth only): γ = 1 is the plain update" },
    ParamDef { name: "warmup_epochs", kind: K::Int { min: 0, max: 100_000 }, default: Dv::Int(2), doc: "epochs during which q is reset to uniform after every step (GroupDRO runs only)" },
    ParamDef {
        name: "update_order",
        kind: K::Choice(&["after", "before"]),
        default: Dv::Str("after"),
        doc: "update q after the optimiser step from the batch's losses (the document's code) or before forming the loss (Sagawa et al.'s)",
    },
    ParamDef { name: "sampler", kind: K::Choice(&["uniform", "group_balanced"]), default: Dv::Str("uniform"), doc: "batches from the union of the groups, or each draw's group equally likely" },
    ParamDef { name: "latent", kind: K::Int { min: 1, max: 4096 }, default: Dv::Int(64), doc: "dimension of the shared space the encoders map into" },
    ParamDef { name: "head_hidden", kind: K::Int { min: 1, max: 65_536 }, default: Dv::Int(128), doc: "hidden width of the shared head" },
    ParamDef { name: "lambda_fit", kind: float(0.0, 1e6), default: Dv::Float(1e-3), doc: "weight of the anchors' fit loss (W2² of batch moments to anchors)" },
    ParamDef { name: "lambda_sep", kind: float(0.0, 1e6), default: Dv::Float(1e-3), doc: "weight of the anchors' separation loss" },
    ParamDef { name: "sep_method", kind: K::Choice(&["classifier", "w2_margin"]), default: Dv::Str("classifier"), doc: "separation: the head classifies anchor samples, or a hinge on pairwise W2²" },
    ParamDef { name: "sep_margin", kind: float(0.0, 1e6), default: Dv::Float(2.0), doc: "margin of the W2² hinge (w2_margin only)" },
    ParamDef { name: "anchor_draws", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(16), doc: "samples J per anchor per step (classifier separation only)" },
    ParamDef { name: "anchor_eps", kind: positive(1.0), default: Dv::Float(1e-4), doc: "ε added to every covariance (anchors and batch moments)" },
    ParamDef { name: "lr", kind: positive(10.0), default: Dv::Float(1e-3), doc: "Adam's learning rate" },
    ParamDef { name: "weight_decay", kind: float(0.0, 1.0), default: Dv::Float(1e-4), doc: "L2 weight decay, added to the gradient (Adam's coupled form)" },
    ParamDef { name: "grad_clip", kind: float(0.0, 1e6), default: Dv::Float(1.0), doc: "the global gradient norm is clipped to this (0: no clipping)" },
    ParamDef { name: "batch_size", kind: K::Int { min: 1, max: 1_000_000 }, default: Dv::Int(32), doc: "batch size" },
    ParamDef { name: "epochs", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(10), doc: "training epochs (each evaluated)" },
];

static METRICS: &[&str] = &[
    "accuracy",
    "g0_accuracy",
    "g1_accuracy",
    "worst_accuracy",
    "balanced_accuracy",
    "gap_accuracy",
    "train_loss",
    "loss_g0",
    "loss_g1",
    "q_g0",
    "q_g1",
    "q_min",
    "q_std",
    "q_step",
    "q_dev",
    "fit_loss",
    "sep_loss",
    "anchor_sep",
];

impl Method for GroupDro {
    fn name(&self) -> &'static str {
        "group_dro"
    }

    fn version(&self) -> u32 {
        1
    }

    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }

    fn data_params(&self) -> &'static [&'static str] {
        &["dataset0", "dataset1", "group0_per_class", "group1_per_class", "data_seed"]
    }

    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        let p: P = super::params(params)?;
        // Group 1 is capped with the same seed as group 0: the two shuffles are of different
        // data sets, so they are independent.
        let mut g1 = InputDecl::new(GROUPS[1], &p.dataset1);
        if p.group1_per_class > 0 {
            g1 = g1.then(super::Derive::Cap { per_class: p.group1_per_class, seed: p.data_seed });
        }
        let mut g0 = InputDecl::new(GROUPS[0], &p.dataset0);
        if p.group0_per_class > 0 {
            g0 = g0.then(super::Derive::Cap { per_class: p.group0_per_class, seed: p.data_seed });
        }
        Ok(vec![g0, g1])
    }

    fn inactive(&self, p: &Params) -> Vec<&'static str> {
        let is = |k: &str, v: &str| p.get(k).and_then(|x| x.as_str()) == Some(v);
        let dro = p.get("group_dro").and_then(|v| v.as_bool()).unwrap_or(true);
        let mut unread = Vec::new();
        if !dro {
            unread.extend(["update_mode", "objective", "eta", "warmup_epochs", "update_order", "gamma"]);
        } else if !is("update_mode", "exp_smooth") {
            unread.push("gamma");
        }
        unread.push(if is("sep_method", "classifier") { "sep_margin" } else { "anchor_draws" });
        unread
    }

    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let p: P = super::params(params)?;
        let cfg = Config::from(&p)?;
        let groups = [inputs.input(GROUPS[0])?, inputs.input(GROUPS[1])?];
        train_run(&cfg, seed, &groups, progress)
    }
}

/// What [`GroupDro::inactive`] leaves out a run reads as fixed, resolved values.
#[derive(Debug, Clone)]
struct Config {
    dro: Option<DroConfig>,
    sampler: Sampler,
    latent: usize,
    head_hidden: usize,
    lambda_fit: f64,
    lambda_sep: f64,
    sep: Sep,
    eps: f64,
    lr: f64,
    weight_decay: f64,
    grad_clip: f64,
    batch_size: usize,
    epochs: usize,
}

#[derive(Debug, Clone, Copy)]
struct DroConfig {
    mode: UpdateMode,
    objective: Objective,
    eta: f64,
    gamma: f64,
    warmup_epochs: usize,
    order: Order,
}

#[derive(Debug, Clone, Copy)]
enum Sep {
    Classifier { draws: usize },
    W2Margin { margin: f64 },
}

impl Config {
    fn from(p: &P) -> Result<Config, MethodError> {
        let needs = |k: &str| MethodError::Invalid(format!("this run reads `{k}`, which it lacks"));
        let dro = if p.group_dro {
            let mode = p.update_mode.ok_or_else(|| needs("update_mode"))?;
            Some(DroConfig {
                mode,
                objective: p.objective.ok_or_else(|| needs("objective"))?,
                eta: p.eta.ok_or_else(|| needs("eta"))?,
                gamma: if mode == UpdateMode::ExpSmooth { p.gamma.ok_or_else(|| needs("gamma"))? } else { 1.0 },
                warmup_epochs: p.warmup_epochs.ok_or_else(|| needs("warmup_epochs"))?,
                order: p.update_order.ok_or_else(|| needs("update_order"))?,
            })
        } else {
            None
        };
        let sep = match p.sep_method {
            SepMethod::Classifier => Sep::Classifier { draws: p.anchor_draws.ok_or_else(|| needs("anchor_draws"))? },
            SepMethod::W2Margin => Sep::W2Margin { margin: p.sep_margin.ok_or_else(|| needs("sep_margin"))? },
        };
        Ok(Config {
            dro,
            sampler: p.sampler,
            latent: p.latent,
            head_hidden: p.head_hidden,
            lambda_fit: p.lambda_fit,
            lambda_sep: p.lambda_sep,
            sep,
            eps: p.anchor_eps,
            lr: p.lr,
            weight_decay: p.weight_decay,
            grad_clip: p.grad_clip,
            batch_size: p.batch_size,
            epochs: p.epochs,
        })
    }
}

/// The network: two encoders into the shared space, one head, and the class anchors.
struct Net {
    cnn: Box<dyn Classifier>,
    proj0: Linear,
    enc1: [Linear; 2],
    head: [Linear; 2],
    /// C × latent.
    anchor_mean: Tensor,
    /// C × latent × latent: the factors L_c.
    anchor_chol: Tensor,
}

impl Net {
    fn new(cfg: &Config, groups: &[&DataInput; 2], vb: VarBuilder) -> Result<Net, MethodError> {
        let (d0, d1) = (groups[0].data, groups[1].data);
        let classes = d0.num_classes;
        let mcfg = ModelConfig { kind: ModelKind::Cnn, channels: d0.channels, height: d0.height, width: d0.width, num_classes: classes, width_mult: 1, vit_final_norm: true };
        let cnn = models::build(&mcfg, vb.pp("enc0"))?;
        let in1 = d1.dim();
        Ok(Net {
            proj0: Linear::new(cnn.feature_dim(), cfg.latent, vb.pp("enc0.proj"))?,
            cnn,
            enc1: [Linear::new(in1, 128, vb.pp("enc1.fc1"))?, Linear::new(128, cfg.latent, vb.pp("enc1.fc2"))?],
            head: [Linear::new(cfg.latent, cfg.head_hidden, vb.pp("head.fc1"))?, Linear::new(cfg.head_hidden, classes, vb.pp("head.fc2"))?],
            anchor_mean: vb.get((classes, cfg.latent), "anchors.mean")?,
            anchor_chol: vb.get((classes, cfg.latent, cfg.latent), "anchors.chol")?,
        })
    }

    /// The shared-space features of a batch of group `g`'s images.
    fn encode(&self, g: usize, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if g == 0 {
            self.proj0.forward(&self.cnn.features(x, train)?)
        } else {
            self.enc1[1].forward(&self.enc1[0].forward_relu(&x.flatten_from(1)?)?)
        }
    }

    fn head(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.head[1].forward(&self.head[0].forward_relu(z)?)
    }
}

/// Group `g`'s images `idx` as a batch (pixels scaled to [−1, 1]) and their labels.
fn batch(data: &DataInput, idx: &[usize], dev: &Device) -> Result<(Tensor, Vec<u32>), MethodError> {
    let data = data.data;
    let dim = data.dim();
    let mut px = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        px.extend(data.pixels[i * dim..(i + 1) * dim].iter().map(|v| v * 2.0 - 1.0));
    }
    let x = Tensor::from_vec(px, (idx.len(), data.channels, data.height, data.width), dev)?;
    Ok((x, idx.iter().map(|&i| data.labels[i]).collect()))
}

/// Per-sample cross-entropy of `logits` against `labels`.
fn nll(logits: &Tensor, labels: &[u32]) -> candle_core::Result<Tensor> {
    let y = Tensor::from_slice(labels, labels.len(), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Test accuracy (%) of group `g`.
fn accuracy(net: &Net, g: usize, input: &DataInput, dev: &Device) -> Result<(usize, usize), MethodError> {
    let mut correct = 0usize;
    for chunk in input.test.chunks(512) {
        let (x, y) = batch(input, chunk, dev)?;
        let pred = net.head(&net.encode(g, &x, false)?)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += pred.iter().zip(&y).filter(|(p, y)| p == y).count();
    }
    Ok((correct, input.test.len()))
}

/// The fit loss of a batch (mean over its classes with ≥ 2 samples of W2²(moments, anchor)) and
/// its gradients with respect to the features (n × latent), the anchor means and the factors.
struct Fit {
    value: f64,
    grad_z: Vec<f32>,
    grad_mean: Vec<f32>,
    grad_chol: Vec<f32>,
}

fn fit_loss(z: &[f64], labels: &[u32], mean: &[f64], chol: &[f64], classes: usize, d: usize, eps: f64) -> Option<Fit> {
    let mut fit = Fit { value: 0.0, grad_z: vec![0.0; z.len()], grad_mean: vec![0.0; classes * d], grad_chol: vec![0.0; classes * d * d] };
    let mut present = Vec::new();
    for c in 0..classes {
        let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == c).collect();
        if rows.len() >= 2 {
            present.push((c, rows));
        }
    }
    if present.is_empty() {
        return None;
    }
    let k = 1.0 / present.len() as f64;
    for (c, rows) in present {
        let slices: Vec<&[f64]> = rows.iter().map(|&i| &z[i * d..(i + 1) * d]).collect();
        let m = gaussian::batch_moments(&slices, d, eps)?;
        let l = &chol[c * d * d..(c + 1) * d * d];
        let w = gaussian::w2_squared(&m.mean, &m.cov, &mean[c * d..(c + 1) * d], &gaussian::anchor_cov(l, d, eps), d);
        fit.value += k * w.value;
        for (row, g) in rows.iter().zip(gaussian::moments_backward(&slices, &m, &w.grad_mean1, &w.grad_cov1, d)) {
            for (j, v) in g.into_iter().enumerate() {
                fit.grad_z[row * d + j] += (k * v) as f32;
            }
        }
        for j in 0..d {
            fit.grad_mean[c * d + j] += (k * w.grad_mean2[j]) as f32;
        }
        for (j, v) in gaussian::anchor_cov_backward(l, &w.grad_cov2, d).into_iter().enumerate() {
            fit.grad_chol[c * d * d + j] += (k * v) as f32;
        }
    }
    Some(fit)
}

/// The W2² hinge over anchor pairs, mean over pairs of max(0, margin − W2²), with its gradients
/// with respect to the means and factors.
fn margin_loss(mean: &[f64], chol: &[f64], classes: usize, d: usize, eps: f64, margin: f64) -> (f64, Vec<f32>, Vec<f32>) {
    let covs: Vec<Vec<f64>> = (0..classes).map(|c| gaussian::anchor_cov(&chol[c * d * d..(c + 1) * d * d], d, eps)).collect();
    let pairs = (classes * (classes - 1) / 2).max(1) as f64;
    let (mut value, mut gm, mut gl) = (0.0, vec![0.0f32; classes * d], vec![0.0f32; classes * d * d]);
    for i in 0..classes {
        for j in (i + 1)..classes {
            let w = gaussian::w2_squared(&mean[i * d..(i + 1) * d], &covs[i], &mean[j * d..(j + 1) * d], &covs[j], d);
            if w.value >= margin {
                continue;
            }
            value += (margin - w.value) / pairs;
            for (c, gmean, gcov) in [(i, &w.grad_mean1, &w.grad_cov1), (j, &w.grad_mean2, &w.grad_cov2)] {
                for k in 0..d {
                    gm[c * d + k] -= (gmean[k] / pairs) as f32;
                }
                for (k, v) in gaussian::anchor_cov_backward(&chol[c * d * d..(c + 1) * d * d], gcov, d).into_iter().enumerate() {
                    gl[c * d * d + k] -= (v / pairs) as f32;
                }
            }
        }
    }
    (value, gm, gl)
}

/// The accuracy metrics (%) from each group's (correct, total) test counts: per group, the
/// worst, their mean (balanced), the gap between them, and overall pooled over both test sets
/// (count-weighted).
fn group_accuracies(groups: [(usize, usize); 2]) -> BTreeMap<String, f64> {
    let pct = |c: usize, n: usize| 100.0 * c as f64 / n.max(1) as f64;
    let [(c0, n0), (c1, n1)] = groups;
    let (a0, a1) = (pct(c0, n0), pct(c1, n1));
    BTreeMap::from([
        ("accuracy".to_string(), pct(c0 + c1, n0 + n1)),
        ("g0_accuracy".to_string(), a0),
        ("g1_accuracy".to_string(), a1),
        ("worst_accuracy".to_string(), a0.min(a1)),
        ("balanced_accuracy".to_string(), 0.5 * (a0 + a1)),
        ("gap_accuracy".to_string(), (a0 - a1).abs()),
    ])
}

/// ⟨g, x⟩ with `g` a constant: a term whose gradient with respect to `x` is `g`.
fn linear_term(x: &Tensor, g: Vec<f32>) -> candle_core::Result<Tensor> {
    (x * Tensor::from_vec(g, x.shape(), x.device())?)?.sum_all()
}

fn to_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The smallest distance between two anchor means.
fn anchor_separation(mean: &[f64], classes: usize, d: usize) -> f64 {
    let mut best = f64::INFINITY;
    for i in 0..classes {
        for j in (i + 1)..classes {
            let s: f64 = (0..d).map(|k| (mean[i * d + k] - mean[j * d + k]).powi(2)).sum();
            best = best.min(s.sqrt());
        }
    }
    best
}

fn train_run(cfg: &Config, seed: u64, groups: &[&DataInput; 2], progress: &dyn Progress) -> Result<Outcome, MethodError> {
    let dev = Device::Cpu;
    let classes = groups[0].data.num_classes;
    if groups[1].data.num_classes != classes {
        return Err(MethodError::Invalid(format!("the two groups must share their classes: group 0 has {classes}, group 1 has {}; pick data sets with the same labels", groups[1].data.num_classes)));
    }
    let d = cfg.latent;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let net = Net::new(cfg, groups, vb)?;
    models::seeded_init(&varmap, seed)?;
    // Anchors: m_c ~ N(0, 0.01 I), L_c = I (the document leaves both undefined).
    let mut rng = Rng::derive(seed, "anchor-init");
    let mean0: Vec<f32> = (0..classes * d).map(|_| (0.1 * rng.normal()) as f32).collect();
    let eye: Vec<f32> = (0..classes * d * d).map(|k| if (k % (d * d)).is_multiple_of(d + 1) { 1.0 } else { 0.0 }).collect();
    let vars = {
        let data = varmap.data().lock().map_err(|_| MethodError::Invalid("the model's variables are poisoned".into()))?;
        data["anchors.mean"].set(&Tensor::from_vec(mean0, (classes, d), &dev)?)?;
        data["anchors.chol"].set(&Tensor::from_vec(eye, (classes, d, d), &dev)?)?;
        // The CNN's own classifier is not used: only the features are. Sorted, so the clipping
        // norm sums in one order.
        let mut names: Vec<&String> = data.keys().filter(|n| !n.ends_with("classifier.weight")).collect();
        names.sort();
        names.iter().map(|n| data[*n].clone()).collect::<Vec<Var>>()
    };
    let optim = OptimConfig { kind: OptimizerKind::Adam, lr: cfg.lr, momentum: 0.0, weight_decay: cfg.weight_decay, beta1: 0.9, beta2: 0.999, eps: 1e-8, alpha: 0.99 };
    let mut opt = Optimizer::new(vars.clone(), &optim)?;

    let mut counts = vec![0usize; classes];
    for g in groups {
        for &i in g.train {
            counts[g.data.labels[i] as usize] += 1;
        }
    }
    let items: Vec<(usize, usize)> = (0..2).flat_map(|g| groups[g].train.iter().map(move |&i| (g, i))).collect();
    let mut order_rng = Rng::derive(seed, "batch-order");
    let mut draw_rng = Rng::derive(seed, "anchor-draws");
    let mut q = vec![0.5, 0.5];
    let mut record = RunRecord { epochs: Vec::new(), train_counts: counts, failure: None };
    let mut objects = BTreeMap::new();
    let fail = |record: &mut RunRecord, objects: &mut BTreeMap<String, Vec<u8>>, reason: String| -> Result<Outcome, MethodError> {
        record.failure = Some(reason.clone());
        objects.insert("metrics.json".to_string(), to_json(record)?);
        Ok(Outcome::Failed { reason, objects: std::mem::take(objects) })
    };

    for epoch in 1..=cfg.epochs {
        let order: Vec<(usize, usize)> = match cfg.sampler {
            Sampler::Uniform => {
                let mut o = items.clone();
                order_rng.shuffle(&mut o);
                o
            }
            Sampler::GroupBalanced => (0..items.len())
                .map(|_| {
                    let g = order_rng.below(2);
                    (g, groups[g].train[order_rng.below(groups[g].train.len())])
                })
                .collect(),
        };
        let warmup = cfg.dro.is_some_and(|c| epoch <= c.warmup_epochs);
        let (mut ce_sum, mut seen) = (0.0f64, 0usize);
        let (mut group_sum, mut group_n) = ([0.0f64; 2], [0usize; 2]);
        let (mut fit_sum, mut sep_sum, mut steps) = (0.0f64, 0.0f64, 0usize);
        let mut q1_trace = Vec::new();
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            // The batch, group 0's images first.
            let mut zs = Vec::new();
            let mut labels = Vec::new();
            let mut sizes = [0usize; 2];
            for g in 0..2 {
                let idx: Vec<usize> = chunk.iter().filter(|(cg, _)| *cg == g).map(|&(_, i)| i).collect();
                if idx.is_empty() {
                    continue;
                }
                let (x, y) = batch(groups[g], &idx, &dev)?;
                zs.push(net.encode(g, &x, true)?);
                labels.extend(y);
                sizes[g] = idx.len();
            }
            let z = Tensor::cat(&zs, 0)?;
            let per_sample = nll(&net.head(&z)?, &labels)?;
            let mut group_losses: Vec<Option<Tensor>> = vec![None, None];
            let mut start = 0;
            for g in 0..2 {
                if sizes[g] > 0 {
                    group_losses[g] = Some(per_sample.narrow(0, start, sizes[g])?.mean(0)?);
                    start += sizes[g];
                }
            }
            let group_values: Vec<Option<f64>> = group_losses.iter().map(|l| l.as_ref().map(|t| t.to_dtype(DType::F64)?.to_scalar::<f64>()).transpose()).collect::<candle_core::Result<_>>()?;
            let mean_ce = per_sample.mean(0)?;
            let ce = mean_ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !ce.is_finite() {
                return fail(&mut record, &mut objects, format!("the training loss became {ce} at epoch {epoch}: the run diverged"));
            }
            let mut total = match cfg.dro {
                None => mean_ce,
                Some(c) => {
                    if c.order == Order::Before {
                        q = dro::update(&q, &group_values, c.mode, c.eta, c.gamma);
                    }
                    dro::objective(c.objective, &q, &group_losses, c.eta)?
                }
            };
            // The anchors' losses.
            let zv = to_f64(&z)?;
            let (mean_v, chol_v) = (to_f64(&net.anchor_mean)?, to_f64(&net.anchor_chol)?);
            if let Some(fit) = fit_loss(&zv, &labels, &mean_v, &chol_v, classes, d, cfg.eps) {
                fit_sum += fit.value;
                if cfg.lambda_fit > 0.0 {
                    let k = cfg.lambda_fit as f32;
                    let scale = |v: Vec<f32>| v.into_iter().map(|x| x * k).collect::<Vec<f32>>();
                    let term = ((linear_term(&z, scale(fit.grad_z))? + linear_term(&net.anchor_mean, scale(fit.grad_mean))?)? + linear_term(&net.anchor_chol, scale(fit.grad_chol))?)?;
                    total = (total + term)?;
                }
            }
            match cfg.sep {
                Sep::Classifier { draws } => {
                    let xi: Vec<f32> = (0..classes * d * draws).map(|_| draw_rng.normal() as f32).collect();
                    let xi = Tensor::from_vec(xi, (classes, d, draws), &dev)?;
                    // z = m_c + L_c ξ, one row per draw.
                    let samples = net.anchor_chol.matmul(&xi)?.broadcast_add(&net.anchor_mean.unsqueeze(2)?)?.transpose(1, 2)?.contiguous()?.reshape((classes * draws, d))?;
                    let targets: Vec<u32> = (0..classes as u32).flat_map(|c| std::iter::repeat_n(c, draws)).collect();
                    let sep = nll(&net.head(&samples)?, &targets)?.mean(0)?;
                    sep_sum += sep.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if cfg.lambda_sep > 0.0 {
                        total = (total + (sep * cfg.lambda_sep)?)?;
                    }
                }
                Sep::W2Margin { margin } => {
                    let (value, gm, gl) = margin_loss(&mean_v, &chol_v, classes, d, cfg.eps, margin);
                    sep_sum += value;
                    if cfg.lambda_sep > 0.0 {
                        let k = cfg.lambda_sep as f32;
                        let term = (linear_term(&net.anchor_mean, gm.into_iter().map(|x| x * k).collect())? + linear_term(&net.anchor_chol, gl.into_iter().map(|x| x * k).collect())?)?;
                        total = (total + term)?;
                    }
                }
            }
            let mut grads = total.backward()?;
            if cfg.grad_clip > 0.0 {
                clip_grad_norm(&mut grads, &vars, cfg.grad_clip)?;
            }
            opt.step(&grads)?;
            if let Some(c) = cfg.dro {
                if c.order == Order::After {
                    q = dro::update(&q, &group_values, c.mode, c.eta, c.gamma);
                }
                if warmup {
                    q = vec![0.5, 0.5];
                }
                q1_trace.push(q[1]);
            }
            ce_sum += ce * chunk.len() as f64;
            seen += chunk.len();
            for g in 0..2 {
                if let Some(v) = group_values[g] {
                    group_sum[g] += v * sizes[g] as f64;
                    group_n[g] += sizes[g];
                }
            }
            steps += 1;
        }

        // Evaluation.
        let (c0, n0) = accuracy(&net, 0, groups[0], &dev)?;
        let (c1, n1) = accuracy(&net, 1, groups[1], &dev)?;
        let mut m = group_accuracies([(c0, n0), (c1, n1)]);
        let (a0, a1) = (m["g0_accuracy"], m["g1_accuracy"]);
        m.insert("train_loss".to_string(), ce_sum / seen.max(1) as f64);
        for g in 0..2 {
            if group_n[g] > 0 {
                m.insert(format!("loss_g{g}"), group_sum[g] / group_n[g] as f64);
            }
        }
        if cfg.dro.is_some() {
            m.insert("q_g0".to_string(), q[0]);
            m.insert("q_g1".to_string(), q[1]);
            m.insert("q_min".to_string(), q[0].min(q[1]));
            m.insert("q_dev".to_string(), (q[1] - 0.5).abs());
            let n = q1_trace.len().max(1) as f64;
            let mu = q1_trace.iter().sum::<f64>() / n;
            m.insert("q_std".to_string(), (q1_trace.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n).sqrt());
            // Oscillation: the root mean square of q₁'s step-to-step changes (a slow drift has
            // a large spread over the epoch but small steps).
            let steps_sq: Vec<f64> = q1_trace.windows(2).map(|w| (w[1] - w[0]).powi(2)).collect();
            m.insert("q_step".to_string(), (steps_sq.iter().sum::<f64>() / steps_sq.len().max(1) as f64).sqrt());
        }
        m.insert("fit_loss".to_string(), fit_sum / steps.max(1) as f64);
        m.insert("sep_loss".to_string(), sep_sum / steps.max(1) as f64);
        m.insert("anchor_sep".to_string(), anchor_separation(&to_f64(&net.anchor_mean)?, classes, d));
        record.epochs.push(EpochRecord { epoch, metrics: m, per_class: Vec::new(), analysis_object: String::new(), per_task: Vec::new() });
        progress.epoch(epoch, cfg.epochs, &format!("worst-group {:.1} %", a0.min(a1)));
    }
    objects.insert("metrics.json".to_string(), to_json(&record)?);
    let weights: BTreeMap<String, Tensor> = {
        let data = varmap.data().lock().map_err(|_| MethodError::Invalid("the model's variables are poisoned".into()))?;
        data.iter().filter(|(k, _)| !k.ends_with("classifier.weight")).map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    };
    objects.insert("model.safetensors".to_string(), super::supervised::safetensors_bytes(&weights)?);
    Ok(Outcome::Done(objects))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_samples_have_the_anchors_moments() {
        // The separation loss's draws z = m + L ξ: mean m and covariance L Lᵀ, checked on 10⁵
        // draws through the same tensor expression as the training step.
        let (d, draws) = (3, 100_000);
        let m = Tensor::new(&[[0.5f32, -1.0, 2.0]], &Device::Cpu).unwrap();
        let l = Tensor::new(&[[[1.0f32, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.2, 0.7]]], &Device::Cpu).unwrap();
        let mut rng = Rng::derive(5, "anchor-draws-test");
        let xi: Vec<f32> = (0..d * draws).map(|_| rng.normal() as f32).collect();
        let xi = Tensor::from_vec(xi, (1, d, draws), &Device::Cpu).unwrap();
        let s = l.matmul(&xi).unwrap().broadcast_add(&m.unsqueeze(2).unwrap()).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((draws, d)).unwrap();
        let rows: Vec<Vec<f64>> = s.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        let mo = gaussian::batch_moments(&refs, d, 0.0).unwrap();
        let lv = to_f64(&l).unwrap();
        let want = gaussian::anchor_cov(&lv, d, 0.0);
        for k in 0..d {
            assert!((mo.mean[k] - to_f64(&m).unwrap()[k]).abs() < 0.02, "mean {:?}", mo.mean);
        }
        for k in 0..d * d {
            assert!((mo.cov[k] - want[k]).abs() < 0.05, "cov {:?} vs {want:?}", mo.cov);
        }
    }

    #[test]
    fn the_fit_loss_gradient_is_the_sum_over_classes_scaled_by_their_count() {
        // Two classes with two rows each and one class with one row (skipped): the loss is the
        // mean of the two classes' W2², and each row's gradient its class's, halved.
        let (d, eps) = (2, 1e-4);
        let z = [0.0, 1.0, 2.0, 1.0, 5.0, 5.0, -1.0, 0.5, 1.5, -2.0];
        let labels = [0u32, 0, 2, 1, 1];
        let mean = [0.1, 0.2, -0.3, 0.4, 0.0, 0.0];
        let chol = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.2, 1.5, 1.0, 0.0, 0.0, 1.0];
        let fit = fit_loss(&z, &labels, &mean, &chol, 3, d, eps).unwrap();
        let one = |c: usize, rows: [usize; 2]| {
            let r: Vec<&[f64]> = rows.iter().map(|&i| &z[i * d..(i + 1) * d]).collect();
            let m = gaussian::batch_moments(&r, d, eps).unwrap();
            gaussian::w2_squared(&m.mean, &m.cov, &mean[c * d..(c + 1) * d], &gaussian::anchor_cov(&chol[c * 4..(c + 1) * 4], d, eps), d).value
        };
        assert!((fit.value - 0.5 * (one(0, [0, 1]) + one(1, [3, 4]))).abs() < 1e-12);
        // The lone row of class 2 and class 2's anchor get no gradient.
        assert_eq!(&fit.grad_z[4..6], &[0.0, 0.0]);
        assert!(fit.grad_mean[4..6].iter().chain(&fit.grad_chol[8..12]).all(|&g| g == 0.0));
        assert!(fit.grad_z[..4].iter().any(|&g| g != 0.0));
    }

    #[test]
    fn worst_is_the_min_balanced_the_mean_and_overall_is_count_weighted() {
        // 900 of 1,000 right in group 0, 30 of 50 in group 1.
        let m = group_accuracies([(900, 1000), (30, 50)]);
        assert_eq!((m["g0_accuracy"], m["g1_accuracy"]), (90.0, 60.0));
        assert_eq!((m["worst_accuracy"], m["balanced_accuracy"], m["gap_accuracy"]), (60.0, 75.0, 30.0));
        assert!((m["accuracy"] - 100.0 * 930.0 / 1050.0).abs() < 1e-12);
    }

    #[test]
    fn the_w2_hinge_pushes_close_anchors_apart() {
        // Two identical anchors: W2² = 0 < margin, loss = margin; the gradient moves the means
        // apart along their difference (here zero, so only the covariances matter) and a
        // gradient step on the means of two distinct anchors raises their W2².
        let d = 2;
        let chol = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let (v, _, _) = margin_loss(&[0.0, 0.0, 0.0, 0.0], &chol, 2, d, 1e-4, 2.0);
        assert!((v - 2.0).abs() < 1e-9);
        let mean = [0.0, 0.0, 0.5, 0.0];
        let (v, gm, _) = margin_loss(&mean, &chol, 2, d, 1e-4, 2.0);
        assert!((v - (2.0 - 0.25)).abs() < 1e-6, "{v}");
        let stepped: Vec<f64> = mean.iter().zip(&gm).map(|(m, g)| m - 0.1 * f64::from(*g)).collect();
        let (after, _, _) = margin_loss(&stepped, &chol, 2, d, 1e-4, 2.0);
        assert!(after < v, "{after} ≥ {v}");
        // Far apart: no loss, no gradient.
        let (v, gm, gl) = margin_loss(&[0.0, 0.0, 10.0, 0.0], &chol, 2, d, 1e-4, 2.0);
        assert_eq!(v, 0.0);
        assert!(gm.iter().chain(&gl).all(|&g| g == 0.0));
    }
}
