//! Bayesian task-adaptive meta-learning, "learning to balance" (document 004), beside MAML and
//! Meta-SGD.
//!
//! Few-shot classification with imbalanced episodes ([`crate::data::episodes`], `Mixed`: a fair
//! coin per episode between class and task imbalance). Classes are (digit, rotation) pairs: each
//! role's input is [`Derive::Classes`] → [`Derive::Resize`] → [`Derive::Angles`], which turns
//! class c of the j-th rotation into class j·|classes| + c. Meta-training draws fresh episodes
//! from the training classes in the run; the in-distribution (ID) and out-of-distribution (OOD)
//! test episodes are derived-data cells of their own ([`Derive::Episodes`] over every image of
//! the test classes), drawn once with the seed `episode_seed`, which no method or run seed
//! enters: every run reads the same cells, so differences between methods are paired.
//!
//! The learner is l2b's Conv-4 ([`model::Learner`]): conv with bias, batch-statistics BatchNorm
//! with a learned shift, ReLU, max-pooling; a zero head in every task. A task's K inner steps are
//! θ ← θ − P ⊙ ∇θ L_in, and the meta-gradient is exact, by reverse mode through the K steps
//! ([`crate::meta::hypergradient`]). The variants:
//!
//! * `maml`: P = `inner_lr`, L_in the support's mean cross-entropy.
//! * `meta_sgd`: P = α, a meta-learned tensor per parameter (init `alpha_init`).
//! * `taml`: Meta-SGD plus the three balancing variables from the inference network
//!   ([`model::Encoder`], on the support set only): ω (per-class weights of the inner loss,
//!   softmax(ω)), γ (per-layer step-size scale exp(γ_l)), z (a modulation of the initial conv
//!   filters); reparameterised samples in training with KL/(N + M) added to the query loss; at
//!   test `mc_samples` samples, each with its own inner loop, averaging softmax predictions.
//! * `taml_omega`, `taml_gamma`, `taml_z`: Meta-SGD plus one variable (ablations);
//!   `taml_deterministic`: all three at their posterior means, without the KL term.
//!
//! Meta-optimisation: Adam (`meta_lr`) on the gradient averaged over `meta_batch` tasks, every
//! element clipped to [−3, 3] first (l2b's `misc.py`). Each logged iteration records the
//! meta-training loss; the last record holds the test accuracies, their 95 % intervals over the
//! test episodes (1.96·std/√n, std with ddof 0, as l2b), and for the balancing variables the
//! statistics of the probe tasks (see [`probe`]). The same record lists every test episode as a
//! task (`per_task`, sets `id` and `ood`: its support size `n` and `accuracy`, and for the probe
//! tasks exp(γ_l) per layer as `gamma_conv1`…`gamma_dense` and one row per class with its `shots`
//! and softmax(ω) as `omega`); set `init` holds the probe tasks before meta-training.

pub mod model;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{to_json, DataInput, Derive, EpisodePool, EpochRecord, InputDecl, Method, MethodError, Outcome, Progress, RunRecord, TaskRecord, TrainInputs};
use crate::data::episodes::{self, Episode, EpisodeSpec, Shots};
use crate::meta::hypergradient::{hypergradient, unroll, Unroll, HVP_EPS};
use crate::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, Params, Schema};
use crate::render::summary::spearman;
use crate::rng::Rng;
use crate::train::loss::one_hot;
use crate::train::schedule::{clip_grad_value, Iterations, Step};
use crate::train::{OptimConfig, Optimizer};
use model::{Draw, Encoder, Layout, Learner, Task, TaskProblem, Variant, LAYERS};

/// The method.
pub struct Taml;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct P {
    variant: String,
    dataset: String,
    ood_dataset: String,
    train_classes: Vec<u32>,
    test_classes: Vec<u32>,
    ood_classes: Vec<u32>,
    rotations: Vec<i64>,
    image_size: usize,
    way: usize,
    max_shot: usize,
    query: usize,
    inner_steps: usize,
    test_inner_steps: usize,
    inner_lr: Option<f64>,
    alpha_init: Option<f64>,
    meta_batch: usize,
    meta_lr: f64,
    grad_clip: f64,
    iterations: usize,
    log_every: usize,
    test_episodes: usize,
    mc_samples: Option<usize>,
    probe_tasks: Option<usize>,
    episode_seed: u64,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

const fn positive(max: f64) -> K {
    K::Float { min: 0.0, max, min_exclusive: true }
}

const fn count(min: i64, max: i64) -> K {
    K::Int { min, max }
}

/// The variants, in the order tables list them.
pub const VARIANTS: &[&str] = &["maml", "meta_sgd", "taml", "taml_omega", "taml_gamma", "taml_z", "taml_deterministic"];

static SCHEMA: &[ParamDef] = &[
    ParamDef {
        name: "variant",
        kind: K::Choice(VARIANTS),
        default: Dv::Str("taml"),
        doc: "maml, meta_sgd, taml (α + ω + γ + z, Bayesian), one balancing variable on Meta-SGD, or taml with posterior means and no KL",
    },
    ParamDef { name: "dataset", kind: K::DataName, default: Dv::Str("mnist"), doc: "the in-distribution data set (meta-training and ID meta-test classes)" },
    ParamDef { name: "ood_dataset", kind: K::DataName, default: Dv::Str("optdigits"), doc: "the out-of-distribution data set (its test classes are the OOD meta-test classes)" },
    ParamDef { name: "train_classes", kind: K::IntList { min: 0, max: 9999, min_len: 1, max_len: 1000 }, default: Dv::IntList(&[0, 1, 2, 3, 4]), doc: "meta-training classes of `dataset`" },
    ParamDef { name: "test_classes", kind: K::IntList { min: 0, max: 9999, min_len: 1, max_len: 1000 }, default: Dv::IntList(&[5, 6, 7, 8, 9]), doc: "in-distribution meta-test classes of `dataset`" },
    ParamDef {
        name: "ood_classes",
        kind: K::IntList { min: 0, max: 9999, min_len: 1, max_len: 1000 },
        default: Dv::IntList(&[5, 6, 7, 8, 9]),
        doc: "out-of-distribution meta-test classes of `ood_dataset`",
    },
    ParamDef {
        name: "rotations",
        kind: K::IntList { min: 0, max: 359, min_len: 1, max_len: 4 },
        default: Dv::IntList(&[0, 90]),
        doc: "rotations (degrees); each rotation of a class is a class of its own",
    },
    ParamDef { name: "image_size", kind: count(4, 512), default: Dv::Int(14), doc: "images are resized (area) to this height and width" },
    ParamDef { name: "way", kind: count(2, 100), default: Dv::Int(5), doc: "classes per episode" },
    ParamDef { name: "max_shot", kind: count(1, 1000), default: Dv::Int(10), doc: "shots per class are drawn from U{1..max_shot}" },
    ParamDef { name: "query", kind: count(1, 1000), default: Dv::Int(5), doc: "query images per class" },
    ParamDef { name: "inner_steps", kind: count(1, 100), default: Dv::Int(3), doc: "inner steps K in meta-training" },
    ParamDef { name: "test_inner_steps", kind: count(1, 100), default: Dv::Int(5), doc: "inner steps at test" },
    ParamDef { name: "inner_lr", kind: positive(100.0), default: Dv::Float(0.5), doc: "MAML's inner learning rate (maml only)" },
    ParamDef { name: "alpha_init", kind: positive(100.0), default: Dv::Float(0.01), doc: "Meta-SGD's initial per-parameter step size α (all but maml)" },
    ParamDef { name: "meta_batch", kind: count(1, 1000), default: Dv::Int(2), doc: "tasks per meta-iteration" },
    ParamDef { name: "meta_lr", kind: positive(1.0), default: Dv::Float(1e-3), doc: "Adam's meta learning rate" },
    ParamDef { name: "grad_clip", kind: K::Float { min: 0.0, max: 1e6, min_exclusive: false }, default: Dv::Float(3.0), doc: "every meta-gradient element is clipped to [−c, c] (0: none)" },
    ParamDef { name: "iterations", kind: count(1, 10_000_000), default: Dv::Int(400), doc: "meta-iterations" },
    ParamDef { name: "log_every", kind: count(1, 10_000_000), default: Dv::Int(20), doc: "meta-training loss is recorded as the mean over each block of this many iterations" },
    ParamDef { name: "test_episodes", kind: count(1, 1_000_000), default: Dv::Int(300), doc: "test episodes, ID and OOD each" },
    ParamDef { name: "mc_samples", kind: count(1, 1000), default: Dv::Int(5), doc: "posterior samples per test episode (Bayesian variants)" },
    ParamDef { name: "probe_tasks", kind: count(2, 100_000), default: Dv::Int(40), doc: "ID test episodes whose posterior means give the γ and ω statistics (variants with γ or ω)" },
    ParamDef { name: "episode_seed", kind: count(0, i64::MAX), default: Dv::Int(0), doc: "seed of the test episodes, shared by every run" },
];

static METRICS: &[&str] = &[
    "id_accuracy",
    "id_ci",
    "ood_accuracy",
    "ood_ci",
    "ood_minus_id",
    "train_loss",
    "train_kl",
    "rho_gamma_conv1",
    "rho_gamma_conv2",
    "rho_gamma_conv3",
    "rho_gamma_conv4",
    "rho_gamma_dense",
    "rho_gamma_conv",
    "omega_rho",
    "omega_rarest",
    "omega_balanced_dev",
    "ood_rho_gamma_conv",
    "ood_rho_gamma_dense",
    "ood_omega_rho",
    "init_rho_gamma_conv",
    "init_rho_gamma_dense",
    "init_omega_rho",
    "init_omega_balanced_dev",
];

/// The variant's switches.
pub fn variant(name: &str) -> Option<Variant> {
    let base = Variant { alpha: true, omega: false, gamma: false, z: false, bayesian: true };
    Some(match name {
        "maml" => Variant { alpha: false, ..base },
        "meta_sgd" => base,
        "taml" => Variant { omega: true, gamma: true, z: true, ..base },
        "taml_omega" => Variant { omega: true, ..base },
        "taml_gamma" => Variant { gamma: true, ..base },
        "taml_z" => Variant { z: true, ..base },
        "taml_deterministic" => Variant { omega: true, gamma: true, z: true, bayesian: false, ..base },
        _ => return None,
    })
}

impl Method for Taml {
    fn name(&self) -> &'static str {
        "taml"
    }

    fn version(&self) -> u32 {
        2
    }

    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }

    fn task_values(&self) -> &'static [&'static str] {
        &["n", "accuracy", "gamma_conv1", "gamma_conv2", "gamma_conv3", "gamma_conv4", "gamma_dense", "shots", "omega"]
    }

    fn data_params(&self) -> &'static [&'static str] {
        &["dataset", "ood_dataset", "train_classes", "test_classes", "ood_classes", "rotations", "image_size"]
    }

    fn inactive(&self, p: &Params) -> Vec<&'static str> {
        let name = p.get("variant").and_then(|v| v.as_str()).unwrap_or("taml");
        let v = variant(name).unwrap_or(Variant { alpha: true, omega: true, gamma: true, z: true, bayesian: true });
        let mut out = Vec::new();
        if v.alpha {
            out.push("inner_lr");
        } else {
            out.push("alpha_init");
        }
        if !(v.balancing() && v.bayesian) {
            out.push("mc_samples");
        }
        if !(v.omega || v.gamma) {
            out.push("probe_tasks");
        }
        out
    }

    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        let p: P = super::params(params)?;
        let s = p.image_size;
        let degrees: Vec<f64> = p.rotations.iter().map(|&r| r as f64).collect();
        let mut out = Vec::new();
        for (role, data, classes, salt) in [("train", &p.dataset, &p.train_classes, None), ("id", &p.dataset, &p.test_classes, Some(1)), ("ood", &p.ood_dataset, &p.ood_classes, Some(2))] {
            let mut d = InputDecl::new(role, data).then(Derive::Classes { classes: classes.clone() }).then(Derive::Resize { height: s, width: s }).then(Derive::Angles { degrees: degrees.clone() });
            if let Some(salt) = salt {
                d = d.then(Derive::Episodes { spec: test_episodes(&p, salt), from: EpisodePool::All });
            }
            out.push(d);
        }
        Ok(out)
    }

    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let p: P = super::params(params)?;
        let v = variant(&p.variant).ok_or_else(|| MethodError::Invalid(format!("unknown variant `{}`", p.variant)))?;
        let pools = |role: &str| -> Result<(Pool, &[Episode]), MethodError> {
            let input = inputs.input(role)?;
            Ok((Pool::of(input), input.episodes))
        };
        let cfg = Config::from(&p, v)?;
        let ((train, _), id, ood) = (pools("train")?, pools("id")?, pools("ood")?);
        run(&cfg, seed, &train, id, ood, progress)
    }
}

/// The shared test episodes of the ID (`salt` 1) or OOD (2) meta-test classes: drawn once by a
/// derived-data cell from `episode_seed`, which no method or run seed enters.
fn test_episodes(p: &P, salt: u64) -> EpisodeSpec {
    imbalanced(p.test_episodes, (p.way, p.max_shot, p.query), p.episode_seed.wrapping_mul(1000).wrapping_add(salt))
}

/// `count` imbalanced episodes as l2b draws them (`Mixed`), of (way, max_shot, query).
fn imbalanced(count: usize, (ways, max_shot, queries): (usize, usize, usize), seed: u64) -> EpisodeSpec {
    EpisodeSpec { count, ways, max_shot, queries, shots: Shots::Mixed, seed }
}

/// A run's resolved settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub variant: Variant,
    pub way: usize,
    pub max_shot: usize,
    pub query: usize,
    pub inner_steps: usize,
    pub test_inner_steps: usize,
    pub inner_lr: f64,
    pub alpha_init: f64,
    pub meta_batch: usize,
    pub meta_lr: f64,
    pub grad_clip: f64,
    pub iterations: usize,
    pub log_every: usize,
    pub mc_samples: usize,
    pub probe_tasks: usize,
}

impl Config {
    fn from(p: &P, v: Variant) -> Result<Config, MethodError> {
        let needs = |k: &str| MethodError::Invalid(format!("this run reads `{k}`, which it lacks"));
        Ok(Config {
            variant: v,
            way: p.way,
            max_shot: p.max_shot,
            query: p.query,
            inner_steps: p.inner_steps,
            test_inner_steps: p.test_inner_steps,
            inner_lr: if v.alpha { 0.0 } else { p.inner_lr.ok_or_else(|| needs("inner_lr"))? },
            alpha_init: if v.alpha { p.alpha_init.ok_or_else(|| needs("alpha_init"))? } else { 0.0 },
            meta_batch: p.meta_batch,
            meta_lr: p.meta_lr,
            grad_clip: p.grad_clip,
            iterations: p.iterations,
            log_every: p.log_every,
            mc_samples: if v.balancing() && v.bayesian { p.mc_samples.ok_or_else(|| needs("mc_samples"))? } else { 1 },
            probe_tasks: if v.omega || v.gamma { p.probe_tasks.ok_or_else(|| needs("probe_tasks"))? } else { 0 },
        })
    }
}

/// The images of one role, every rotation's classes numbered after the previous rotation's.
pub struct Pool {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    pub classes: usize,
}

impl Pool {
    /// Every image of an input, training and test alike, in index order.
    fn of(d: &DataInput) -> Pool {
        let set = d.data;
        let mut idx: Vec<usize> = d.train.iter().chain(d.test).copied().collect();
        idx.sort_unstable();
        idx.dedup();
        let mut pool =
            Pool { channels: set.channels, height: set.height, width: set.width, pixels: Vec::with_capacity(idx.len() * set.dim()), labels: Vec::with_capacity(idx.len()), classes: set.num_classes };
        for i in idx {
            pool.pixels.extend_from_slice(set.image(i));
            pool.labels.push(set.labels[i]);
        }
        pool
    }

    /// Built directly (tests).
    pub fn new(channels: usize, height: usize, width: usize, pixels: Vec<f32>, labels: Vec<u32>, classes: usize) -> Pool {
        Pool { channels, height, width, pixels, labels, classes }
    }

    fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Images `idx` as an n×C×H×W tensor.
    fn batch(&self, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let d = self.dim();
        let mut v = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            v.extend_from_slice(&self.pixels[i * d..(i + 1) * d]);
        }
        Tensor::from_vec(v, (idx.len(), self.channels, self.height, self.width), device)
    }

    /// Episodes drawn from every image of the pool.
    pub fn episodes(&self, count: usize, cfg: &Config, seed: u64) -> Result<Vec<Episode>, MethodError> {
        let all: Vec<usize> = (0..self.labels.len()).collect();
        let spec = imbalanced(count, (cfg.way, cfg.max_shot, cfg.query), seed);
        episodes::sample(&self.labels, &all, self.classes, &spec).map_err(|e| MethodError::Invalid(e.to_string()))
    }

    /// An episode as a task: support and query tensors with one-hot labels, and the support's
    /// labels.
    pub fn task(&self, e: &Episode, device: &Device) -> candle_core::Result<(Task, Vec<usize>)> {
        let way = e.classes.len();
        let flat = |sets: &[Vec<usize>]| -> (Vec<usize>, Vec<usize>) {
            let mut idx = Vec::new();
            let mut lab = Vec::new();
            for (k, s) in sets.iter().enumerate() {
                idx.extend_from_slice(s);
                lab.extend(std::iter::repeat_n(k, s.len()));
            }
            (idx, lab)
        };
        let (si, sl) = flat(&e.support);
        let (qi, ql) = flat(&e.query);
        let onehot = |labels: &[usize]| one_hot(&labels.iter().map(|&l| l as u32).collect::<Vec<_>>(), way, device, DType::F32);
        let task = Task { xs: self.batch(&si, device)?, ys: onehot(&sl)?, xq: self.batch(&qi, device)?, yq: onehot(&ql)? };
        Ok((task, sl))
    }
}

/// The meta-learned state of a run.
pub struct Meta {
    pub learner: Learner,
    pub variant: Variant,
    /// Conv weights and biases (8).
    pub conv: Vec<candle_core::Var>,
    /// BatchNorm shifts (4).
    pub shifts: Vec<candle_core::Var>,
    /// Meta-SGD's α (10), or none.
    pub alpha: Vec<candle_core::Var>,
    pub encoder: Option<Encoder>,
    pub encoder_vars: Vec<candle_core::Var>,
    pub inner_lr: f64,
}

/// What one task's meta-gradient step computed.
pub struct TaskGrad {
    /// Outer cross-entropy on the query.
    pub loss: f64,
    /// KL of the balancing variables (0 without).
    pub kl: f64,
    /// A scalar whose gradient with respect to the meta-parameters is this task's meta-gradient.
    pub surrogate: Tensor,
}

impl Meta {
    pub fn new(learner: Learner, cfg: &Config, seed: u64, device: &Device, dtype: DType) -> Result<Meta, MethodError> {
        let (conv, shifts) = learner.init(seed, device, dtype)?;
        let v = cfg.variant;
        let alpha = if v.alpha { model::vars(&model::alpha_init(&learner, cfg.alpha_init, device, dtype)?)? } else { Vec::new() };
        let (encoder, encoder_vars) = if v.balancing() {
            let (c, h, w) = learner.shape;
            let enc = Encoder::init(c, h, w, cfg.max_shot, seed, device, dtype)?;
            let vs = model::vars(&enc.params)?;
            (Some(enc.with_params(vs.iter().map(|v| v.as_tensor().clone()).collect())), vs)
        } else {
            (None, Vec::new())
        };
        Ok(Meta { learner, variant: v, conv: model::vars(&conv)?, shifts: model::vars(&shifts)?, alpha, encoder, encoder_vars, inner_lr: cfg.inner_lr })
    }

    /// Every meta-parameter, for the optimiser.
    pub fn all_vars(&self) -> Vec<candle_core::Var> {
        [&self.conv[..], &self.shifts[..], &self.alpha[..], &self.encoder_vars[..]].concat()
    }

    fn t(vs: &[candle_core::Var]) -> Vec<Tensor> {
        vs.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// θ for a task: the conv parameters and a zero head.
    pub fn theta(&self) -> candle_core::Result<Vec<Tensor>> {
        let c = &self.conv[0];
        let mut th: Vec<Tensor> = self.conv.iter().map(|v| v.as_tensor().detach()).collect();
        th.extend(self.learner.zero_head(c.device(), c.dtype())?);
        Ok(th)
    }

    /// φ for a task: shifts, α and a draw of the balancing variables (detached values).
    pub fn phi(&self, draw: Option<&Draw>) -> Vec<Tensor> {
        let mut phi: Vec<Tensor> = Self::t(&self.shifts).iter().chain(&Self::t(&self.alpha)).map(Tensor::detach).collect();
        if let Some(d) = draw {
            phi.extend(d.tensors().iter().map(Tensor::detach));
        }
        phi
    }

    pub fn problem<'a>(&'a self, task: &'a Task) -> TaskProblem<'a> {
        TaskProblem { learner: &self.learner, task, layout: Layout::of(self.variant), inner_lr: self.inner_lr }
    }

    /// The posterior of a task (with the encoder's graph), if the variant has balancing variables.
    pub fn posterior(&self, task: &Task, labels: &[usize]) -> candle_core::Result<Option<model::Posterior>> {
        match &self.encoder {
            None => Ok(None),
            Some(e) => e.forward(&task.xs, labels, self.learner.way).map(Some),
        }
    }

    /// One task's meta-gradient as a surrogate scalar (see [`TaskGrad`]), one reparameterised draw
    /// for a Bayesian variant (from `rng`), the posterior means otherwise.
    pub fn task_grad(&self, task: &Task, labels: &[usize], steps: usize, hvp_eps: f64, rng: &mut Rng) -> candle_core::Result<TaskGrad> {
        let v = self.variant;
        let post = self.posterior(task, labels)?;
        let draw = match &post {
            Some(p) => Some(Draw::of(p, v, if v.bayesian { Some(rng) } else { None })?),
            None => None,
        };
        let theta = self.theta()?;
        let phi = self.phi(draw.as_ref());
        let hg = hypergradient(&self.problem(task), &theta, &phi, Unroll::new(steps, hvp_eps))?;
        let hp = hg.phi_tensors(&phi)?;
        let mut s = Tensor::zeros((), theta[0].dtype(), theta[0].device())?;
        for (var, g) in self.conv.iter().zip(&hg.theta) {
            s = (s + (var.as_tensor() * g.detach())?.sum_all()?)?;
        }
        let mut graph: Vec<Tensor> = Self::t(&self.shifts);
        graph.extend(Self::t(&self.alpha));
        if let Some(d) = &draw {
            graph.extend(d.tensors());
        }
        for (t, g) in graph.iter().zip(&hp) {
            s = (s + t.broadcast_mul(&g.detach())?.sum_all()?)?;
        }
        let mut kl = 0.0;
        if let (Some(p), true) = (&post, v.bayesian) {
            let k = p.kl(v)?;
            kl = k.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let n = (task.xs.dim(0)? + task.xq.dim(0)?) as f64;
            s = (s + (k / n)?)?;
        }
        Ok(TaskGrad { loss: hg.value, kl, surrogate: s })
    }

    /// Softmax predictions (query × way) of a task after `steps` inner steps: the mean over
    /// `samples` posterior draws (Bayesian variants, from `rng`), else at the posterior means.
    pub fn predict(&self, task: &Task, labels: &[usize], steps: usize, samples: usize, rng: &mut Rng) -> candle_core::Result<Tensor> {
        self.predict_with(task, self.posterior(task, labels)?.as_ref(), steps, samples, rng)
    }

    /// [`Meta::predict`] with the task's posterior (from [`Meta::posterior`]) given.
    pub fn predict_with(&self, task: &Task, post: Option<&model::Posterior>, steps: usize, samples: usize, rng: &mut Rng) -> candle_core::Result<Tensor> {
        let v = self.variant;
        let theta = self.theta()?;
        let draws = if post.is_some() && v.bayesian { samples.max(1) } else { 1 };
        let mut acc: Option<Tensor> = None;
        for _ in 0..draws {
            let draw = match &post {
                Some(p) => Some(Draw::of(p, v, if v.bayesian { Some(&mut *rng) } else { None })?),
                None => None,
            };
            let phi = self.phi(draw.as_ref());
            let end = unroll(&self.problem(task), &theta, &phi, steps)?;
            let probs = candle_nn::ops::softmax(&self.learner.logits(&end, &phi[..4], &task.xq)?, 1)?.detach();
            acc = Some(match acc {
                None => probs,
                Some(a) => (a + probs)?,
            });
        }
        acc.expect("at least one draw") / draws as f64
    }
}

/// Accuracy (%) of predictions against a query's one-hot labels.
fn accuracy(probs: &Tensor, onehot: &Tensor) -> candle_core::Result<f64> {
    let pred = probs.argmax(1)?.to_vec1::<u32>()?;
    let truth = onehot.argmax(1)?.to_vec1::<u32>()?;
    let hits = pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
    Ok(100.0 * hits as f64 / truth.len() as f64)
}

/// Mean and 95 % interval half-width over episodes: 1.96·std/√n with std of ddof 0 (l2b's
/// `main.py`).
pub fn episode_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, 1.96 * var.sqrt() / n.sqrt())
}

/// One probe task's balancing variables at the posterior means: its size N, exp(E γ_l) per layer
/// and per class (shots, softmax(E ω)_c).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProbeRow {
    pub n: usize,
    pub gamma: Vec<f64>,
    pub shots: Vec<usize>,
    pub omega: Vec<f64>,
}

/// The probe tasks' statistics: Spearman ρ(N, exp γ_l) per layer (conv1..4, dense, and the mean
/// of the four conv ρ); over the imbalanced tasks (shots not all equal) the mean ρ(shots_c, ω_c)
/// and the share whose largest ω is a class with the fewest shots; over the balanced tasks the
/// largest |ω_c − 1/way| (not for the OOD set). The share of rarest-class maxima is recorded for
/// the ID set only.
pub fn probe(rows: &[ProbeRow], prefix: &str, out: &mut BTreeMap<String, f64>) {
    if rows.is_empty() {
        return;
    }
    let ns: Vec<f64> = rows.iter().map(|r| r.n as f64).collect();
    if rows[0].gamma.len() == LAYERS {
        let mut conv = Vec::new();
        for (l, name) in LAYER_NAMES.iter().enumerate() {
            let g: Vec<f64> = rows.iter().map(|r| r.gamma[l]).collect();
            if let Some(rho) = spearman(&ns, &g) {
                if prefix.is_empty() || l == 4 {
                    out.insert(format!("{prefix}rho_gamma_{name}"), rho);
                }
                if l < 4 {
                    conv.push(rho);
                }
            }
        }
        if !conv.is_empty() {
            out.insert(format!("{prefix}rho_gamma_conv"), conv.iter().sum::<f64>() / conv.len() as f64);
        }
    }
    if !rows[0].omega.is_empty() {
        let (mut rhos, mut rarest, mut imbalanced, mut dev) = (Vec::new(), 0usize, 0usize, None::<f64>);
        for r in rows {
            let min = *r.shots.iter().min().unwrap_or(&0);
            let max = *r.shots.iter().max().unwrap_or(&0);
            if min == max {
                let way = r.omega.len() as f64;
                let d = r.omega.iter().map(|w| (w - 1.0 / way).abs()).fold(0.0, f64::max);
                dev = Some(dev.map_or(d, |x: f64| x.max(d)));
                continue;
            }
            imbalanced += 1;
            let s: Vec<f64> = r.shots.iter().map(|&x| x as f64).collect();
            if let Some(rho) = spearman(&s, &r.omega) {
                rhos.push(rho);
            }
            let arg = r.omega.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
            if r.shots[arg] == min {
                rarest += 1;
            }
        }
        if !rhos.is_empty() {
            out.insert(format!("{prefix}omega_rho"), rhos.iter().sum::<f64>() / rhos.len() as f64);
        }
        if imbalanced > 0 && prefix.is_empty() {
            out.insert("omega_rarest".into(), 100.0 * rarest as f64 / imbalanced as f64);
        }
        if let (Some(d), true) = (dev, prefix != "ood_") {
            out.insert(format!("{prefix}omega_balanced_dev"), d);
        }
    }
}

/// Every object a run writes, and the test accuracies of each episode.
fn run(cfg: &Config, seed: u64, train: &Pool, (id, id_eps): (Pool, &[Episode]), (ood, ood_eps): (Pool, &[Episode]), progress: &dyn Progress) -> Result<Outcome, MethodError> {
    let device = Device::Cpu;
    let dtype = DType::F32;
    let learner = Learner::new(train.channels, train.height, train.width, cfg.way)?;
    let meta = Meta::new(learner, cfg, seed, &device, dtype)?;
    // Control: the probe statistics of the untrained inference network (the encoder sees the
    // shots, so a trend present before training is not learned).
    let mut init_metrics = BTreeMap::new();
    let mut tasks = Vec::new();
    if cfg.probe_tasks > 0 {
        let mut rows = Vec::new();
        for (k, e) in id_eps.iter().take(cfg.probe_tasks).enumerate() {
            let (task, labels) = id.task(e, &device)?;
            if let Some(post) = meta.posterior(&task, &labels)? {
                let row = probe_row(&post, meta.variant, e, labels.len())?;
                tasks.extend(task_records("init", k, None, &row));
                rows.push(row);
            }
        }
        probe(&rows, "init_", &mut init_metrics);
    }
    let vars = meta.all_vars();
    let mut opt = Optimizer::new(vars.clone(), &OptimConfig::adam(cfg.meta_lr))?;
    let train_eps = train.episodes(cfg.iterations * cfg.meta_batch, cfg, Rng::derive(seed, "taml-train-episodes").next_u64())?;
    let mut rng = Rng::derive(seed, "taml-samples");
    // Σ loss, Σ KL and the number of tasks since the last record.
    let acc = std::cell::Cell::new((0.0f64, 0.0f64, 0usize));
    let loop_ = Iterations { total: cfg.iterations, every: cfg.log_every };
    let (mut records, failure) = loop_.run(
        progress,
        |i| -> Result<Step, MethodError> {
            let mut total: Option<Tensor> = None;
            for t in 0..cfg.meta_batch {
                let e = &train_eps[(i - 1) * cfg.meta_batch + t];
                let (task, labels) = train.task(e, &device)?;
                let g = meta.task_grad(&task, &labels, cfg.inner_steps, HVP_EPS, &mut rng)?;
                if !g.loss.is_finite() {
                    return Ok(Step::Stop(format!("non-finite meta-training loss at iteration {i}")));
                }
                let (l, k, n) = acc.get();
                acc.set((l + g.loss, k + g.kl, n + 1));
                let s = (g.surrogate / cfg.meta_batch as f64)?;
                total = Some(match total {
                    None => s,
                    Some(a) => (a + s)?,
                });
            }
            let mut grads = total.expect("meta_batch ≥ 1").backward()?;
            if cfg.grad_clip > 0.0 {
                clip_grad_value(&mut grads, &vars, cfg.grad_clip)?;
            }
            opt.step(&grads)?;
            Ok(Step::Continue)
        },
        |i| -> Result<EpochRecord, MethodError> {
            let (l, k, n) = acc.replace((0.0, 0.0, 0));
            let n = n.max(1) as f64;
            let mut m = BTreeMap::from([("train_loss".to_string(), l / n)]);
            if meta.variant.balancing() && meta.variant.bayesian {
                m.insert("train_kl".into(), k / n);
            }
            Ok(EpochRecord { epoch: i, metrics: m, per_class: Vec::new(), analysis_object: String::new(), per_task: Vec::new() })
        },
    )?;
    let counts = vec![0usize; train.classes];
    let mut objects = BTreeMap::new();
    if let Some(reason) = failure {
        let record = RunRecord { epochs: records, train_counts: counts, failure: Some(reason.clone()) };
        objects.insert("metrics.json".to_string(), to_json(&record)?);
        return Ok(Outcome::Failed { reason, objects });
    }
    // Test: the shared episodes, ID and OOD.
    let mut test_rng = Rng::derive(seed, "taml-test-samples");
    let last = records.last_mut().ok_or_else(|| MethodError::Invalid("no iterations".into()))?;
    for (name, pool, eps) in [("id", &id, id_eps), ("ood", &ood, ood_eps)] {
        if eps.is_empty() {
            return Err(MethodError::Invalid(format!("the {name} input has no test episodes")));
        }
        let mut accs = Vec::with_capacity(eps.len());
        let mut rows = Vec::new();
        for (k, e) in eps.iter().enumerate() {
            let (task, labels) = pool.task(e, &device)?;
            let post = meta.posterior(&task, &labels)?;
            let probs = meta.predict_with(&task, post.as_ref(), cfg.test_inner_steps, cfg.mc_samples, &mut test_rng)?;
            let acc = accuracy(&probs, &task.yq)?;
            accs.push(acc);
            let row = match post.filter(|_| k < cfg.probe_tasks) {
                Some(post) => probe_row(&post, meta.variant, e, labels.len())?,
                None => ProbeRow { n: labels.len(), gamma: Vec::new(), shots: e.shots(), omega: Vec::new() },
            };
            tasks.extend(task_records(name, k, Some(acc), &row));
            if k < cfg.probe_tasks && (!row.gamma.is_empty() || !row.omega.is_empty()) {
                rows.push(row);
            }
        }
        let (mean, ci) = episode_ci(&accs);
        last.metrics.insert(format!("{name}_accuracy"), mean);
        last.metrics.insert(format!("{name}_ci"), ci);
        probe(&rows, if name == "id" { "" } else { "ood_" }, &mut last.metrics);
    }
    last.metrics.extend(init_metrics);
    last.per_task = tasks;
    let gap = last.metrics["ood_accuracy"] - last.metrics["id_accuracy"];
    last.metrics.insert("ood_minus_id".into(), gap);
    let record = RunRecord { epochs: records, train_counts: counts, failure: None };
    objects.insert("metrics.json".to_string(), to_json(&record)?);
    Ok(Outcome::Done(objects))
}

/// The names of the learner's layers, in γ's order.
pub const LAYER_NAMES: [&str; LAYERS] = ["conv1", "conv2", "conv3", "conv4", "dense"];

/// One task's rows for the `per_task` frame: the task (its support size `n`, its `accuracy` if
/// measured, `gamma_<layer>` = exp(E γ_l) where the variant has γ), then, where the variant has
/// ω, one row per class with its `shots` and `omega` = softmax(E ω)_c.
pub fn task_records(set: &str, task: usize, accuracy: Option<f64>, row: &ProbeRow) -> Vec<TaskRecord> {
    let mut values = BTreeMap::from([("n".to_string(), row.n as f64)]);
    if let Some(a) = accuracy {
        values.insert("accuracy".into(), a);
    }
    for (name, g) in LAYER_NAMES.iter().zip(&row.gamma) {
        values.insert(format!("gamma_{name}"), *g);
    }
    let mut out = vec![TaskRecord { set: set.to_string(), task, class: None, values }];
    for (c, (s, w)) in row.shots.iter().zip(&row.omega).enumerate() {
        out.push(TaskRecord { set: set.to_string(), task, class: Some(c), values: BTreeMap::from([("shots".to_string(), *s as f64), ("omega".to_string(), *w)]) });
    }
    out
}

/// A probe row from a task's posterior means.
fn probe_row(post: &model::Posterior, v: Variant, e: &Episode, n: usize) -> candle_core::Result<ProbeRow> {
    let gamma = if v.gamma { post.gamma.mu.to_dtype(DType::F64)?.exp()?.to_vec1::<f64>()? } else { Vec::new() };
    let omega = if v.omega { candle_nn::ops::softmax(&post.omega.mu.to_dtype(DType::F64)?, 0)?.to_vec1::<f64>()? } else { Vec::new() };
    Ok(ProbeRow { n, gamma, shots: e.shots(), omega })
}
