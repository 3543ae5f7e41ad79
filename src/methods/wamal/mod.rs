//! Weight-aware meta auxiliary learning, WAMAL (document 002), with its baselines as variants:
//! single-task learning (`stl`), a human-designed auxiliary task (`human`: the fine classes),
//! MAXL (`maxl`: generated auxiliary labels, every sample weighted 1) and WAMAL (`wamal`:
//! generated labels and a learned weight per sample).
//!
//! **Data.** One data set with fine labels, capped at `train_per_class` training images per fine
//! class, then relabelled to the primary classes by `hierarchy` (both are derived-data cells:
//! input `primary`); the human task reads the same images' fine labels (input `fine`, the cap
//! alone). The generated labels need only the block sizes ψ (`psi`), never the fine labels.
//!
//! **Networks** ([`nets`]): a multi-task network θ1 (backbone, primary head, auxiliary head) and,
//! for MAXL and WAMAL, a generator θ2 with its own backbone, a label head whose softmax is masked
//! to the primary class's block of ψ_y auxiliary classes, and a weight head s → w = 2^(2R·s − R).
//!
//! **Training.** Level 1: θ1 ← SGD on L1 = mean ℓ(p, y) + mean w·ℓ(q, ŷ), ℓ the focal loss on
//! probabilities with γ = 2 that the public code trains with ([`losses`]). Level 2 (MAXL, WAMAL):
//! θ1⁺ = θ1 − α∇θ1 L1, M(θ2) = mean ℓ(p(θ1⁺), y) + λ Σ ȳ log ȳ, θ2 ← SGD(θ2 − β(∇M + wd·θ2)); the
//! hypergradient through the one unrolled step comes from [`crate::meta::hypergradient`]
//! (finite-difference Hessian-vector products; dM/dθ2 alone, [`crate::meta::Unroll::phi_only`],
//! so the product is one backward pass of L1(θ1 + εu) − L1(θ1 − εu) to θ2, the generator
//! evaluated once for the meta objective and that difference, and once for a level-1 step and
//! the level-2 step after it on the same batch). The public code runs, per epoch, one pass of
//! level 1 and then one pass of level 2 (`schedule = alternate_passes`); the document's sample
//! interleaves them per batch (`interleaved`). Learning rates follow PyTorch's StepLR; the inner
//! α is halved one epoch earlier than StepLR in the public code (`inner_lr_rule = repo`:
//! α·γ^⌊(e+1)/step⌋ at 0-based epoch e) or with it (`step_lr`).
//!
//! **Records**, each epoch: the primary test accuracy and its running maximum (`best_accuracy`:
//! the public code keeps the model of its best *test* accuracy), the human task's fine accuracy,
//! the training losses, and over the training images the distribution of log₂ w and how the
//! generated labels use their blocks.

pub mod hierarchy;
pub mod losses;
pub mod nets;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;

use super::{to_json, DataInput, Derive, EpochRecord, InputDecl, Method, MethodError, Outcome, Progress, RunProblem, RunRecord, TrainInputs};
use crate::meta::{hypergradient, Unroll};
use crate::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, ParamValue, Params, Schema};
use crate::rng::Rng;
use crate::train::loss::one_hot;
use crate::train::schedule::Schedule;
use hierarchy::Hierarchy;
use nets::{Arch, Batch, Generated, Losses, MetaProblem, Variant, PART};

/// The method.
pub struct Wamal;

/// The input with primary labels, and the one with the same images' fine labels.
const PRIMARY: &str = "primary";
const FINE: &str = "fine";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct P {
    dataset: String,
    train_per_class: usize,
    data_seed: u64,
    hierarchy: Hierarchy,
    variant: Variant,
    psi: Option<Vec<i64>>,
    schedule: Option<Order>,
    backbone: Backbone,
    hidden: usize,
    features: usize,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    lr_step: usize,
    lr_gamma: f64,
    inner_lr: Option<f64>,
    inner_lr_rule: Option<InnerRule>,
    gen_lr: Option<f64>,
    gen_weight_decay: Option<f64>,
    entropy_weight: Option<f64>,
    weight_range: Option<f64>,
    focal_gamma: f64,
    hvp_eps: Option<f64>,
}

/// When level 2 runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Per epoch, a pass of level 1, then a pass of level 2 (the public code).
    AlternatePasses,
    /// Per batch, a level-1 step, then a level-2 step on the same batch (the document's sample).
    Interleaved,
}

/// When the inner step size α is halved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InnerRule {
    /// α·γ^⌊(e+1)/step⌋: one epoch before StepLR (the public code's `(epoch + 1) % 50 == 0`).
    Repo,
    /// α·γ^⌊e/step⌋, with StepLR.
    StepLr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Backbone {
    Mlp,
    Vgg16,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

const fn positive(max: f64) -> K {
    K::Float { min: 0.0, max, min_exclusive: true }
}

const fn float(min: f64, max: f64) -> K {
    K::Float { min, max, min_exclusive: false }
}

const fn count(min: i64, max: i64) -> K {
    K::Int { min, max }
}

static SCHEMA: &[ParamDef] = &[
    ParamDef { name: "dataset", kind: K::DataName, default: Dv::Str("mnist"), doc: "the data set, with its fine labels" },
    ParamDef { name: "train_per_class", kind: count(0, 1_000_000), default: Dv::Int(0), doc: "training images kept per fine class (0: all)" },
    ParamDef { name: "data_seed", kind: count(0, i64::MAX), default: Dv::Int(0), doc: "seed of the per-class shuffle that picks the training images" },
    ParamDef { name: "hierarchy", kind: K::Choice(&["mod5", "pairs", "parity", "cifar100_coarse"]), default: Dv::Str("mod5"), doc: "fine → primary classes" },
    ParamDef { name: "variant", kind: K::Choice(&["stl", "human", "maxl", "wamal"]), default: Dv::Str("wamal"), doc: "single task, human auxiliary task (fine labels), MAXL (w = 1) or WAMAL" },
    ParamDef {
        name: "psi",
        kind: K::IntList { min: 1, max: 1000, min_len: 1, max_len: 1000 },
        default: Dv::IntList(&[2, 2, 2, 2, 2]),
        doc: "ψ: auxiliary classes per primary class (one entry per primary class; MAXL, WAMAL)",
    },
    ParamDef {
        name: "schedule",
        kind: K::Choice(&["alternate_passes", "interleaved"]),
        default: Dv::Str("alternate_passes"),
        doc: "per epoch a level-1 pass then a level-2 pass (the public code), or both per batch (the document's sample)",
    },
    ParamDef { name: "backbone", kind: K::Choice(&["mlp", "vgg16"]), default: Dv::Str("mlp"), doc: "both networks' backbone: an MLP input → hidden → features (VGG-16: not in the engine yet)" },
    ParamDef { name: "hidden", kind: count(1, 65_536), default: Dv::Int(256), doc: "the MLP backbone's hidden width" },
    ParamDef { name: "features", kind: count(1, 65_536), default: Dv::Int(128), doc: "d: the backbone's output and the heads' hidden width (VGG-16: 512)" },
    ParamDef { name: "epochs", kind: count(1, 100_000), default: Dv::Int(200), doc: "training epochs (each evaluated)" },
    ParamDef { name: "batch_size", kind: count(1, 1_000_000), default: Dv::Int(100), doc: "batch size of both levels" },
    ParamDef { name: "lr", kind: positive(10.0), default: Dv::Float(0.01), doc: "θ1's SGD learning rate" },
    ParamDef { name: "momentum", kind: float(0.0, 0.999), default: Dv::Float(0.0), doc: "θ1's SGD momentum (the public code: none)" },
    ParamDef { name: "weight_decay", kind: float(0.0, 1.0), default: Dv::Float(0.0), doc: "θ1's L2 weight decay" },
    ParamDef { name: "lr_step", kind: count(1, 100_000), default: Dv::Int(50), doc: "StepLR: learning rates × lr_gamma every lr_step epochs" },
    ParamDef { name: "lr_gamma", kind: positive(1.0), default: Dv::Float(0.5), doc: "StepLR's factor" },
    ParamDef { name: "inner_lr", kind: positive(10.0), default: Dv::Float(0.01), doc: "α of the unrolled step θ1⁺ = θ1 − α∇L1 (MAXL, WAMAL)" },
    ParamDef { name: "inner_lr_rule", kind: K::Choice(&["repo", "step_lr"]), default: Dv::Str("repo"), doc: "α halved one epoch before StepLR (the public code) or with it" },
    ParamDef { name: "gen_lr", kind: positive(10.0), default: Dv::Float(1e-3), doc: "the generator's SGD learning rate (StepLR like θ1's)" },
    ParamDef { name: "gen_weight_decay", kind: float(0.0, 1.0), default: Dv::Float(5e-4), doc: "the generator's L2 weight decay" },
    ParamDef { name: "entropy_weight", kind: float(0.0, 100.0), default: Dv::Float(0.2), doc: "λ of λ Σ ȳ log ȳ in the meta objective" },
    ParamDef { name: "weight_range", kind: positive(60.0), default: Dv::Float(15.0), doc: "R of w = 2^(2R·s − R) (WAMAL)" },
    ParamDef { name: "focal_gamma", kind: float(0.0, 10.0), default: Dv::Float(2.0), doc: "γ of the focal loss on probabilities (0: cross-entropy)" },
    ParamDef { name: "hvp_eps", kind: positive(1.0), default: Dv::Float(0.01), doc: "ε‖v‖ of the finite-difference Hessian-vector products" },
];

static METRICS: &[&str] = &[
    "accuracy",
    "best_accuracy",
    "aux_accuracy",
    "train_loss",
    "aux_loss",
    "meta_loss",
    "lr",
    "inner_lr",
    "log2w_mean",
    "log2w_std",
    "log2w_q05",
    "log2w_q25",
    "log2w_q50",
    "log2w_q75",
    "log2w_q95",
    "label_entropy",
    "label_block_entropy",
    "label_confidence",
];

/// The parameters only the generator reads.
const GENERATOR_PARAMS: [&str; 8] = ["psi", "schedule", "inner_lr", "inner_lr_rule", "gen_lr", "gen_weight_decay", "entropy_weight", "hvp_eps"];

impl Method for Wamal {
    fn name(&self) -> &'static str {
        "wamal"
    }

    fn version(&self) -> u32 {
        // 2: the MLP layers run the fused linear kernel (other summation order, other bits).
        // 3: the meta step's finite difference is taken with respect to θ2 alone, one backward
        // pass of the difference of the inner losses (the same product, other rounding).
        3
    }

    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }

    fn data_params(&self) -> &'static [&'static str] {
        &["dataset", "train_per_class", "data_seed", "hierarchy"]
    }

    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        let p: P = super::params(params)?;
        let mut fine = InputDecl::new(FINE, &p.dataset);
        if p.train_per_class > 0 {
            fine = fine.then(Derive::Cap { per_class: p.train_per_class, seed: p.data_seed });
        }
        let primary = InputDecl { name: PRIMARY.to_string(), ..fine.clone() }.then(Derive::Relabel { map: p.hierarchy.map() });
        Ok(vec![primary, fine])
    }

    fn inactive(&self, p: &Params) -> Vec<&'static str> {
        let variant = p.get("variant").and_then(ParamValue::as_str).unwrap_or("wamal");
        match variant {
            "stl" | "human" => [GENERATOR_PARAMS.as_slice(), &["weight_range"]].concat(),
            "maxl" => vec!["weight_range"],
            _ => Vec::new(),
        }
    }

    fn check_run(&self, params: &Params) -> Vec<RunProblem> {
        let mut problems = Vec::new();
        let Ok(p) = super::params::<P>(params) else { return problems };
        if let Some(psi) = &p.psi {
            let want = p.hierarchy.primary_classes();
            if psi.len() != want {
                problems.push(
                    RunProblem::new("psi", format!("ψ has {} entries, but the hierarchy `{:?}` has {want} primary classes", psi.len(), p.hierarchy))
                        .hint(format!("give one count per primary class, e.g. [{}]", vec!["2"; want].join(", "))),
                );
            }
        }
        problems
    }

    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let p: P = super::params(params)?;
        let cfg = Config::from(&p)?;
        train_run(&cfg, seed, inputs.input(PRIMARY)?, inputs.input(FINE)?, progress)
    }
}

/// A run's settings, with what its variant does not read resolved away.
#[derive(Debug, Clone)]
pub struct Config {
    pub losses: Losses,
    pub meta: Option<MetaConfig>,
    pub hidden: usize,
    pub features: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub lr_step: usize,
    pub lr_gamma: f64,
}

/// The generator's settings (MAXL, WAMAL).
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub psi: Vec<usize>,
    pub order: Order,
    pub inner_lr: f64,
    pub inner_rule: InnerRule,
    pub gen_lr: f64,
    pub gen_weight_decay: f64,
    pub hvp_eps: f64,
    /// Keep the weight head as initialised (a test's device: MAXL is WAMAL frozen at s = ½).
    pub freeze_weight_head: bool,
}

impl Config {
    fn from(p: &P) -> Result<Config, MethodError> {
        if p.backbone == Backbone::Vgg16 {
            return Err(MethodError::Invalid("the VGG-16 backbone is not in the engine yet (the paper profile names it); use `backbone = \"mlp\"`".into()));
        }
        let needs = |k: &str| MethodError::Invalid(format!("this run reads `{k}`, which it lacks"));
        let meta = if p.variant.generates() {
            let psi = p.psi.as_ref().ok_or_else(|| needs("psi"))?.iter().map(|&n| usize::try_from(n).map_err(|_| needs("psi ≥ 1"))).collect::<Result<Vec<_>, _>>()?;
            Some(MetaConfig {
                psi,
                order: p.schedule.ok_or_else(|| needs("schedule"))?,
                inner_lr: p.inner_lr.ok_or_else(|| needs("inner_lr"))?,
                inner_rule: p.inner_lr_rule.ok_or_else(|| needs("inner_lr_rule"))?,
                gen_lr: p.gen_lr.ok_or_else(|| needs("gen_lr"))?,
                gen_weight_decay: p.gen_weight_decay.ok_or_else(|| needs("gen_weight_decay"))?,
                hvp_eps: p.hvp_eps.ok_or_else(|| needs("hvp_eps"))?,
                freeze_weight_head: false,
            })
        } else {
            None
        };
        let losses = Losses {
            variant: p.variant,
            focal_gamma: p.focal_gamma,
            range: if p.variant == Variant::Wamal { p.weight_range.ok_or_else(|| needs("weight_range"))? } else { 0.0 },
            entropy_weight: if p.variant.generates() { p.entropy_weight.ok_or_else(|| needs("entropy_weight"))? } else { 0.0 },
        };
        Ok(Config {
            losses,
            meta,
            hidden: p.hidden,
            features: p.features,
            epochs: p.epochs,
            batch_size: p.batch_size,
            lr: p.lr,
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            lr_step: p.lr_step,
            lr_gamma: p.lr_gamma,
        })
    }

    /// θ1's (and the generator's, relative to its base) learning rate at 0-based epoch `e`.
    pub fn lr_at(&self, base: f64, e: usize) -> f64 {
        Schedule::Step { every: self.lr_step, gamma: self.lr_gamma }.lr(base, e)
    }

    /// The inner step size α at 0-based epoch `e`.
    pub fn inner_lr_at(&self, meta: &MetaConfig, e: usize) -> f64 {
        match meta.inner_rule {
            InnerRule::StepLr => self.lr_at(meta.inner_lr, e),
            InnerRule::Repo => self.lr_at(meta.inner_lr, e + 1),
        }
    }
}

/// Pixels normalised as the public code does for its images: (x − 0.5) / 0.2.
fn images(data: &DataInput, idx: &[usize], dev: &Device) -> Result<Tensor, MethodError> {
    let d = data.data;
    let dim = d.dim();
    let mut px = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        px.extend(d.pixels[i * dim..(i + 1) * dim].iter().map(|v| (v - 0.5) / 0.2));
    }
    Ok(Tensor::from_vec(px, (idx.len(), dim), dev)?)
}

/// What a training step needs of the data: the primary input's images and labels, and the fine
/// label of each of its images (indexed like the primary set).
pub struct Data<'a> {
    pub primary: &'a DataInput<'a>,
    pub fine_labels: Vec<u32>,
    pub fine_classes: usize,
}

/// The fine label of every image of the primary input. The relabel cell writes a new set of the
/// capped split's training images then its test images, in order, so the k-th training (test)
/// image of `primary` is the k-th of `fine`; every fine class must fall into one primary class.
pub fn fine_labels(primary: &DataInput, fine: &DataInput) -> Result<Vec<u32>, MethodError> {
    if primary.train.len() != fine.train.len() || primary.test.len() != fine.test.len() {
        return Err(MethodError::Invalid("the primary and fine inputs hold different numbers of images: both must come from the same capped split".into()));
    }
    let mut out = vec![0u32; primary.data.len()];
    let mut parent: Vec<Option<u32>> = vec![None; fine.data.num_classes];
    for (p, f) in primary.train.iter().zip(fine.train).chain(primary.test.iter().zip(fine.test)) {
        let (pl, fl) = (primary.data.labels[*p], fine.data.labels[*f]);
        if *parent[fl as usize].get_or_insert(pl) != pl {
            return Err(MethodError::Invalid(format!("fine class {fl} falls into two primary classes: the inputs are not aligned")));
        }
        out[*p] = fl;
    }
    Ok(out)
}

impl Data<'_> {
    /// The batch of training or test images `idx`, with the targets the variant reads.
    pub fn batch(&self, cfg: &Config, idx: &[usize], dev: &Device) -> Result<Batch, MethodError> {
        let x = images(self.primary, idx, dev)?;
        let labels: Vec<u32> = idx.iter().map(|&i| self.primary.data.labels[i]).collect();
        let primary = one_hot(&labels, self.primary.data.num_classes, x.device(), x.dtype())?;
        let aux = match (&cfg.meta, cfg.losses.variant) {
            (_, Variant::Human) => {
                let fine: Vec<u32> = idx.iter().map(|&i| self.fine_labels[i]).collect();
                one_hot(&fine, self.fine_classes, x.device(), x.dtype())?
            }
            (Some(m), _) => {
                let k: usize = m.psi.iter().sum();
                Tensor::from_vec(hierarchy::masks(&m.psi, &labels), (idx.len(), k), dev)?.to_dtype(x.dtype())?
            }
            (None, _) => x.zeros_like()?.narrow(1, 0, 1)?,
        };
        Ok(Batch { x, primary, aux })
    }
}

/// The state of a run: both parameter lists and θ1's momentum buffers.
pub struct State {
    pub theta: Vec<Tensor>,
    pub phi: Vec<Tensor>,
    momentum: Vec<Option<Tensor>>,
    /// The generator's outputs of the last level-1 step (MAXL, WAMAL), which a level-2 step on
    /// the same batch at the same θ2 (the interleaved order) reads instead of computing them
    /// again.
    generated: Option<Box<Generated>>,
}

/// What one level-1 step measured.
pub struct StepLosses {
    pub total: f64,
    pub primary: f64,
    pub aux: f64,
}

impl State {
    pub fn new(theta: Vec<Tensor>, phi: Vec<Tensor>) -> State {
        let n = theta.len();
        State { theta, phi, momentum: vec![None; n], generated: None }
    }

    /// θ1 ← SGD(lr, momentum, weight decay) on L1; θ2 held fixed. PyTorch's SGD: g + wd·θ, the
    /// buffer b ← μ b + g (b = g at the first step), θ ← θ − lr·b. A parameter without a
    /// gradient (STL's auxiliary head) does not move.
    pub fn level1(&mut self, cfg: &Config, b: &Batch, lr: f64) -> Result<StepLosses, MethodError> {
        let vars = self.theta.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        let vt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        self.generated = if cfg.losses.variant.generates() { Some(Box::new(Generated::of(&self.phi, &b.x)?)) } else { None };
        let l = cfg.losses.level1_at(&vt, self.generated.as_deref(), &self.phi, b)?;
        let grads = l.total.backward()?;
        for (i, v) in vt.iter().enumerate() {
            let Some(g) = grads.get(v) else { continue };
            let g = if cfg.weight_decay > 0.0 { (g + (&self.theta[i] * cfg.weight_decay)?)? } else { g.clone() };
            let step = match (&self.momentum[i], cfg.momentum > 0.0) {
                (Some(buf), true) => ((buf * cfg.momentum)? + g)?,
                _ => g,
            };
            self.theta[i] = (&self.theta[i] - (&step * lr)?)?;
            if cfg.momentum > 0.0 {
                self.momentum[i] = Some(step);
            }
        }
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>());
        Ok(StepLosses { total: scalar(&l.total)?, primary: scalar(&l.primary)?, aux: l.aux.as_ref().map(scalar).transpose()?.unwrap_or(0.0) })
    }

    /// θ2 ← θ2 − β(dM/dθ2 + wd·θ2) through one unrolled step of size α; returns M. MAXL's weight
    /// head (which it never reads) and a frozen one stay as they are.
    pub fn level2(&mut self, cfg: &Config, meta: &MetaConfig, b: &Batch, inner_lr: f64, gen_lr: f64) -> Result<f64, MethodError> {
        let problem = MetaProblem::new(cfg.losses, b, inner_lr).reusing(self.generated.take().map(|g| *g));
        let h = hypergradient(&problem, &self.theta, &self.phi, Unroll::phi_only(1, meta.hvp_eps))?;
        let grads = h.phi_tensors(&self.phi)?;
        let trained = if cfg.losses.variant == Variant::Wamal && !meta.freeze_weight_head { 3 * PART } else { 2 * PART };
        for (p, g) in self.phi.iter_mut().zip(&grads).take(trained) {
            let g = (g + (&*p * meta.gen_weight_decay)?)?;
            *p = (&*p - (g * gen_lr)?)?;
        }
        Ok(h.value)
    }
}

/// The report's WAMAL step for `reprise bench`: the schema's defaults with `variant = wamal`,
/// the quick profile's backbone widths and θ1's momentum (0.9), and `schedule = interleaved`
/// (a level-1 and a level-2 step per batch).
pub fn bench_config(hidden: usize, features: usize) -> Result<Config, MethodError> {
    let mut p = Wamal.schema().defaults();
    p.insert("hidden".into(), ParamValue::Int(hidden as i64));
    p.insert("features".into(), ParamValue::Int(features as i64));
    p.insert("momentum".into(), ParamValue::Float(0.9));
    p.insert("schedule".into(), ParamValue::Str("interleaved".into()));
    Config::from(&super::params::<P>(&p)?)
}

/// The sizes of both networks for this data and configuration.
pub fn arch(cfg: &Config, data: &Data) -> Arch {
    let generated = cfg.meta.as_ref().map_or(1, |m| m.psi.iter().sum());
    let aux = match cfg.losses.variant {
        Variant::Human => data.fine_classes,
        Variant::Stl => 1,
        _ => generated,
    };
    Arch { input: data.primary.data.dim(), hidden: cfg.hidden, features: cfg.features, primary: data.primary.data.num_classes, aux, generated }
}

fn train_run(cfg: &Config, seed: u64, primary: &DataInput, fine: &DataInput, progress: &dyn Progress) -> Result<Outcome, MethodError> {
    let dev = Device::Cpu;
    let classes = primary.data.num_classes;
    if let Some(m) = &cfg.meta {
        if m.psi.len() != classes {
            return Err(MethodError::Invalid(format!("ψ has {} entries for {classes} primary classes", m.psi.len())));
        }
    }
    let data = Data { primary, fine_labels: fine_labels(primary, fine)?, fine_classes: fine.data.num_classes };
    let a = arch(cfg, &data);
    let mut state = State::new(a.init_learner(seed, &dev, DType::F32)?, a.init_generator(seed, &dev, DType::F32)?);
    let mut counts = vec![0usize; classes];
    for &i in primary.train {
        counts[primary.data.labels[i] as usize] += 1;
    }
    let mut record = RunRecord { epochs: Vec::new(), train_counts: counts, failure: None };
    let mut order_rng = Rng::derive(seed, "wamal-batch-order");
    let mut best = f64::NEG_INFINITY;
    let bs = cfg.batch_size.max(1);
    for epoch in 1..=cfg.epochs {
        let e = epoch - 1;
        let lr = cfg.lr_at(cfg.lr, e);
        let mut order = primary.train.to_vec();
        order_rng.shuffle(&mut order);
        let (mut sums, mut seen, mut meta_sum, mut meta_n) = ([0.0f64; 2], 0usize, 0.0f64, 0usize);
        let mut diverged = None;
        for chunk in order.chunks(bs) {
            let b = data.batch(cfg, chunk, &dev)?;
            let l = state.level1(cfg, &b, lr)?;
            if !l.total.is_finite() {
                diverged = Some(format!("the level-1 loss became {} at epoch {epoch}", l.total));
                break;
            }
            sums[0] += l.primary * chunk.len() as f64;
            sums[1] += l.aux * chunk.len() as f64;
            seen += chunk.len();
            if let Some(m) = cfg.meta.as_ref().filter(|m| m.order == Order::Interleaved) {
                let v = state.level2(cfg, m, &b, cfg.inner_lr_at(m, e), cfg.lr_at(m.gen_lr, e))?;
                meta_sum += v;
                meta_n += 1;
            }
        }
        if let Some(m) = cfg.meta.as_ref().filter(|m| m.order == Order::AlternatePasses && diverged.is_none()) {
            let mut order = primary.train.to_vec();
            order_rng.shuffle(&mut order);
            for chunk in order.chunks(bs) {
                let b = data.batch(cfg, chunk, &dev)?;
                meta_sum += state.level2(cfg, m, &b, cfg.inner_lr_at(m, e), cfg.lr_at(m.gen_lr, e))?;
                meta_n += 1;
            }
        }
        if diverged.is_none() && !meta_sum.is_finite() {
            diverged = Some(format!("the meta objective became {meta_sum} at epoch {epoch}"));
        }
        if let Some(reason) = diverged {
            record.failure = Some(reason.clone());
            let objects = BTreeMap::from([("metrics.json".to_string(), to_json(&record)?)]);
            return Ok(Outcome::Failed { reason, objects });
        }
        let mut m = BTreeMap::new();
        let (acc, aux_acc) = evaluate(cfg, &state, &data, &dev)?;
        best = best.max(acc);
        m.insert("accuracy".to_string(), acc);
        m.insert("best_accuracy".to_string(), best);
        if let Some(x) = aux_acc {
            m.insert("aux_accuracy".to_string(), x);
        }
        m.insert("train_loss".to_string(), sums[0] / seen.max(1) as f64);
        m.insert("lr".to_string(), lr);
        if cfg.losses.variant != Variant::Stl {
            m.insert("aux_loss".to_string(), sums[1] / seen.max(1) as f64);
        }
        if let Some(meta) = &cfg.meta {
            m.insert("meta_loss".to_string(), meta_sum / meta_n.max(1) as f64);
            m.insert("inner_lr".to_string(), cfg.inner_lr_at(meta, e));
            m.extend(generator_stats(cfg, meta, &state, &data, &dev)?);
        }
        progress.epoch(epoch, cfg.epochs, &format!("acc {acc:.1}"));
        record.epochs.push(EpochRecord { epoch, metrics: m, per_class: Vec::new(), analysis_object: String::new(), per_task: Vec::new() });
    }
    Ok(Outcome::Done(BTreeMap::from([("metrics.json".to_string(), to_json(&record)?)])))
}

/// The primary test accuracy (%) and, for the human task, the fine test accuracy.
fn evaluate(cfg: &Config, state: &State, data: &Data, dev: &Device) -> Result<(f64, Option<f64>), MethodError> {
    let (mut right, mut right_aux) = (0usize, 0usize);
    for chunk in data.primary.test.chunks(500) {
        let x = images(data.primary, chunk, dev)?;
        let (p, q) = nets::learner(&state.theta, &x)?;
        let pred = p.argmax(D::Minus1)?.to_vec1::<u32>()?;
        right += chunk.iter().zip(&pred).filter(|(&i, &c)| data.primary.data.labels[i] == c).count();
        if cfg.losses.variant == Variant::Human {
            let pred = q.argmax(D::Minus1)?.to_vec1::<u32>()?;
            right_aux += chunk.iter().zip(&pred).filter(|(&i, &c)| data.fine_labels[i] == c).count();
        }
    }
    let n = data.primary.test.len().max(1) as f64;
    Ok((100.0 * right as f64 / n, (cfg.losses.variant == Variant::Human).then(|| 100.0 * right_aux as f64 / n)))
}

/// The value at quantile `q` of sorted `v` (linear interpolation between order statistics,
/// numpy's default).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Normalised entropy H(p)/log(len) of a distribution given by non-negative masses (1 for one
/// class).
pub fn normalised_entropy(p: &[f64]) -> f64 {
    let total: f64 = p.iter().sum();
    if p.len() < 2 || total <= 0.0 {
        return 1.0;
    }
    -p.iter().filter(|&&x| x > 0.0).map(|&x| x / total * (x / total).ln()).sum::<f64>() / (p.len() as f64).ln()
}

/// Over the training images: the distribution of log₂ w (0 for MAXL), the normalised entropy of
/// the mean generated label (over all Σψ classes: at least log C / log Σψ by construction, as
/// every block carries its class's share), its mean within-block version (per primary class, the
/// class-mean label restricted to its block: 1 when each class spreads evenly over its ψ
/// auxiliary classes, 0 when it uses one), and the mean largest label entry.
fn generator_stats(cfg: &Config, meta: &MetaConfig, state: &State, data: &Data, dev: &Device) -> Result<BTreeMap<String, f64>, MethodError> {
    let k: usize = meta.psi.iter().sum();
    let blocks = hierarchy::blocks(&meta.psi);
    let classes = meta.psi.len();
    let (mut log2w, mut mean, mut class_sum, mut conf) = (Vec::new(), vec![0.0f64; k], vec![vec![0.0f64; k]; classes], 0.0f64);
    for chunk in data.primary.train.chunks(500) {
        let b = data.batch(cfg, chunk, dev)?;
        let (a, s) = nets::generator(&state.phi, &b.x)?;
        let y = losses::masked_softmax(&a, &b.aux)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        if cfg.losses.variant == Variant::Wamal {
            log2w.extend(losses::log2_weight(&s, cfg.losses.range)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        } else {
            log2w.extend(std::iter::repeat_n(0.0, chunk.len()));
        }
        for (row, &i) in y.iter().zip(chunk) {
            let c = data.primary.data.labels[i] as usize;
            for j in 0..k {
                mean[j] += row[j];
                class_sum[c][j] += row[j];
            }
            conf += row.iter().cloned().fold(0.0, f64::max);
        }
    }
    let n = log2w.len().max(1) as f64;
    let mut m = BTreeMap::new();
    let mu = log2w.iter().sum::<f64>() / n;
    m.insert("log2w_mean".to_string(), mu);
    m.insert("log2w_std".to_string(), (log2w.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / n).sqrt());
    log2w.sort_by(f64::total_cmp);
    for (name, q) in [("log2w_q05", 0.05), ("log2w_q25", 0.25), ("log2w_q50", 0.5), ("log2w_q75", 0.75), ("log2w_q95", 0.95)] {
        m.insert(name.to_string(), quantile(&log2w, q));
    }
    m.insert("label_entropy".to_string(), normalised_entropy(&mean));
    let within: Vec<f64> = blocks.iter().enumerate().filter(|(_, r)| r.len() > 1).map(|(c, r)| normalised_entropy(&class_sum[c][r.clone()])).collect();
    if !within.is_empty() {
        m.insert("label_block_entropy".to_string(), within.iter().sum::<f64>() / within.len() as f64);
    }
    m.insert("label_confidence".to_string(), conf / n);
    Ok(m)
}
