//! Supervised training on a long-tailed subset with neural-collapse analysis (document 001).
//!
//! One run trains a classifier (no bias) with the chosen loss and optimiser, and every
//! `analyze_freq` epochs (and at the last epoch) measures test accuracy overall, per group and
//! per class, and the neural-collapse metrics of the penultimate features of the training set.
//! With `analyze_layers`, each analysis also measures the drift of every block's features
//! ([`Classifier::layer_features`]), not only the last.
//! The raw features, labels, predictions and classifier weights of each analysis epoch are kept
//! as a safetensors object so that anyone can recompute the metrics independently.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;

use super::{to_json, ClassRecord, DataInput, EpochRecord, InputDecl, Method, MethodError, Outcome, Progress, RunProblem, RunRecord, TrainInputs};
use crate::data::ImageSet;
use crate::metrics::{self, Centering, NcInput};
use crate::models::{self, Classifier, ModelConfig, ModelKind};
use crate::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, Params, Schema};
use crate::rng::Rng;
use crate::train::{self, LossKind, OptimConfig, Optimizer, OptimizerKind};

/// The method.
pub struct Supervised;

const MODELS: &[&str] = &["mlp", "cnn", "resnet", "vit", "conv4"];
const LOSSES: &[&str] = &["ce", "focal", "logit_adjustment", "balanced_softmax"];
const OPTIMIZERS: &[&str] = &["sgd", "adam", "adamw", "rmsprop"];
const SCHEDULES: &[&str] = &["constant", "cosine"];
const CENTERINGS: &[&str] = &["global", "balanced"];
const DEVICES: &[&str] = &["cpu", "cuda"];

/// A run's parameters, as the code reads them; [`SCHEMA`] defines and documents each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct P {
    dataset: String,
    imbalance: f64,
    data_seed: u64,
    model: Model,
    width: usize,
    /// The ViT's only.
    vit_final_norm: Option<bool>,
    loss: Loss,
    /// The focal loss's only ([`Supervised::inactive`]).
    focal_gamma: Option<f64>,
    /// Logit adjustment's only.
    la_tau: Option<f64>,
    optimizer: Optim,
    lr: f64,
    lr_schedule: LrSchedule,
    /// SGD's only ([`Supervised::inactive`]).
    momentum: Option<f64>,
    weight_decay: f64,
    drift_penalty: f64,
    epochs: usize,
    batch_size: usize,
    analyze_freq: usize,
    analyze_layers: bool,
    device: Dev,
    centering: Centering,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Model {
    Mlp,
    Cnn,
    Resnet,
    Vit,
    Conv4,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Loss {
    Ce,
    Focal,
    LogitAdjustment,
    BalancedSoftmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Optim {
    Sgd,
    Adam,
    Adamw,
    Rmsprop,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LrSchedule {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Dev {
    Cpu,
    Cuda,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

static SCHEMA: &[ParamDef] = &[
    ParamDef { name: "dataset", kind: K::DataName, default: Dv::Str("mnist"), doc: "a data set declared under [data]" },
    ParamDef {
        name: "imbalance",
        kind: K::Float { min: 0.0, max: 1.0, min_exclusive: true },
        default: Dv::Float(0.01),
        doc: "imbalance factor f = n_min/n_max; n_i = floor(n_max·f^(i/(C−1))); 1 is balanced",
    },
    ParamDef { name: "data_seed", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(0), doc: "seed of the per-class shuffle that picks the long-tailed subset" },
    ParamDef { name: "model", kind: K::Choice(MODELS), default: Dv::Str("mlp"), doc: "backbone" },
    ParamDef { name: "width", kind: K::Int { min: 1, max: 64 }, default: Dv::Int(1), doc: "width multiplier of the backbone" },
    ParamDef { name: "vit_final_norm", kind: K::Bool, default: Dv::Bool(true), doc: "keep the ViT's final LayerNorm (false replaces it by the identity); ViT runs only" },
    ParamDef { name: "loss", kind: K::Choice(LOSSES), default: Dv::Str("ce"), doc: "training loss" },
    ParamDef {
        name: "focal_gamma",
        kind: K::Float { min: 0.0, max: 10.0, min_exclusive: false },
        default: Dv::Float(2.0),
        doc: "focusing parameter γ of the focal loss (read by focal runs only, left out of the others)",
    },
    ParamDef {
        name: "la_tau",
        kind: K::Float { min: 0.0, max: 10.0, min_exclusive: false },
        default: Dv::Float(1.0),
        doc: "temperature τ of logit adjustment (read by its runs only, left out of the others)",
    },
    ParamDef { name: "optimizer", kind: K::Choice(OPTIMIZERS), default: Dv::Str("sgd"), doc: "optimiser" },
    ParamDef { name: "lr", kind: K::Float { min: 0.0, max: 10.0, min_exclusive: true }, default: Dv::Float(0.05), doc: "learning rate" },
    ParamDef { name: "lr_schedule", kind: K::Choice(SCHEDULES), default: Dv::Str("cosine"), doc: "learning-rate schedule over the epochs" },
    ParamDef {
        name: "momentum",
        kind: K::Float { min: 0.0, max: 0.999, min_exclusive: false },
        default: Dv::Float(0.9),
        doc: "momentum of SGD; the other optimisers do not read it, and their runs leave it out",
    },
    ParamDef { name: "weight_decay", kind: K::Float { min: 0.0, max: 1.0, min_exclusive: false }, default: Dv::Float(5e-4), doc: "weight decay (L2 for SGD/Adam/RMSprop, decoupled for AdamW)" },
    ParamDef {
        name: "drift_penalty",
        kind: K::Float { min: 0.0, max: 1000.0, min_exclusive: false },
        default: Dv::Float(0.0),
        doc: "weight of the drift penalty ‖batch mean − mean of batch class means‖²",
    },
    ParamDef { name: "epochs", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(30), doc: "training epochs" },
    ParamDef { name: "batch_size", kind: K::Int { min: 1, max: 1_000_000 }, default: Dv::Int(128), doc: "batch size" },
    ParamDef { name: "analyze_freq", kind: K::Int { min: 1, max: 100_000 }, default: Dv::Int(5), doc: "analyse every this many epochs (and at the last)" },
    ParamDef {
        name: "analyze_layers", kind: K::Bool, default: Dv::Bool(false), doc: "also measure the drift of every block's features at each analysis (drift_norm_layer1–4, drift_excess_layer1–4)"
    },
    ParamDef { name: "device", kind: K::Choice(DEVICES), default: Dv::Str("cpu"), doc: "where to train: cpu, or cuda (needs a build with --features cuda)" },
    ParamDef { name: "centering", kind: K::Choice(CENTERINGS), default: Dv::Str("global"), doc: "mean that centres class means in NC1–NC3: sample mean (global) or class-balanced mean" },
];

/// The run's one input: the `dataset` with its balanced test split and a long-tailed training
/// subset (`imbalance`, `data_seed`).
const INPUT: &str = "data";

/// Metric columns, per analysis epoch. Accuracies are percentages on the balanced test set;
/// NC metrics are measured on the training set's features.
static METRICS: &[&str] = &[
    "train_loss",
    "train_accuracy",
    "accuracy",
    "balanced_accuracy",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "nc1",
    "nc2_equinorm_features",
    "nc2_equinorm_classifier",
    "nc2_equiangular_features",
    "nc2_equiangular_classifier",
    "nc3",
    "nc1_balanced",
    "nc2_equinorm_features_balanced",
    "nc2_equiangular_features_balanced",
    "nc3_balanced",
    "nc4",
    "drift_abs",
    "drift_norm",
    "drift_norm_etf",
    "drift_excess",
    "minority_cosine",
    "drift_norm_layer1",
    "drift_norm_layer2",
    "drift_norm_layer3",
    "drift_norm_layer4",
    "drift_excess_layer1",
    "drift_excess_layer2",
    "drift_excess_layer3",
    "drift_excess_layer4",
];

/// The most blocks `analyze_layers` reports (the ResNet's stem and three stages).
const MAX_LAYERS: usize = 4;

/// Resolved, typed parameters of one run.
#[derive(Debug, Clone)]
struct Config {
    model: ModelKind,
    width: usize,
    vit_final_norm: bool,
    loss: LossKind,
    optim: OptimConfig,
    cosine: bool,
    drift_penalty: f64,
    epochs: usize,
    batch_size: usize,
    analyze_freq: usize,
    analyze_layers: bool,
    centering: Centering,
    cuda: bool,
}

impl Config {
    fn from_params(p: &Params) -> Result<Self, MethodError> {
        let p: P = super::params(p)?;
        let needs = |k: &str| MethodError::Invalid(format!("this run reads `{k}`, which it lacks"));
        let model = match p.model {
            Model::Mlp => ModelKind::Mlp,
            Model::Cnn => ModelKind::Cnn,
            Model::Resnet => ModelKind::Resnet,
            Model::Vit => ModelKind::Vit,
            Model::Conv4 => ModelKind::Conv4,
        };
        let loss = match p.loss {
            Loss::Ce => LossKind::Ce,
            Loss::Focal => LossKind::Focal { gamma: p.focal_gamma.ok_or_else(|| needs("focal_gamma"))? },
            Loss::LogitAdjustment => LossKind::LogitAdjustment { tau: p.la_tau.ok_or_else(|| needs("la_tau"))? },
            Loss::BalancedSoftmax => LossKind::BalancedSoftmax,
        };
        let kind = match p.optimizer {
            Optim::Sgd => OptimizerKind::Sgd,
            Optim::Adam => OptimizerKind::Adam,
            Optim::Adamw => OptimizerKind::Adamw,
            Optim::Rmsprop => OptimizerKind::Rmsprop,
        };
        // RMSprop runs without momentum, as PyTorch's default; `momentum` is SGD's.
        let momentum = match kind {
            OptimizerKind::Sgd => p.momentum.ok_or_else(|| needs("momentum"))?,
            _ => 0.0,
        };
        let optim = OptimConfig { kind, lr: p.lr, momentum, weight_decay: p.weight_decay, beta1: 0.9, beta2: 0.999, eps: 1e-8, alpha: 0.99 };
        Ok(Config {
            model,
            width: p.width,
            vit_final_norm: match p.model {
                Model::Vit => p.vit_final_norm.ok_or_else(|| needs("vit_final_norm"))?,
                _ => true,
            },
            loss,
            optim,
            cosine: p.lr_schedule == LrSchedule::Cosine,
            drift_penalty: p.drift_penalty,
            epochs: p.epochs,
            batch_size: p.batch_size,
            analyze_freq: p.analyze_freq,
            analyze_layers: p.analyze_layers,
            centering: p.centering,
            cuda: p.device == Dev::Cuda,
        })
    }
}

impl Method for Supervised {
    fn name(&self) -> &'static str {
        "supervised"
    }

    fn version(&self) -> u32 {
        // Raised with every change to any bit of a run's results, a kernel's summation order
        // included; CHANGELOG.md says what each version changed.
        11
    }

    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }

    fn data_params(&self) -> &'static [&'static str] {
        &["dataset", "imbalance", "data_seed", "device"]
    }

    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        let p: P = super::params(params)?;
        Ok(vec![InputDecl::long_tail_of(INPUT, &p.dataset, p.imbalance, p.data_seed)])
    }

    fn check_run(&self, p: &Params) -> Vec<RunProblem> {
        let mut problems = Vec::new();
        if let (Some(e), Some(a)) = (p.get("epochs").and_then(|v| v.as_i64()), p.get("analyze_freq").and_then(|v| v.as_i64())) {
            if a > e {
                problems.push(RunProblem::new("analyze_freq", format!("analyze_freq = {a} exceeds epochs = {e}")).hint("the last epoch is always analysed; lower analyze_freq"));
            }
        }
        problems
    }

    fn inactive(&self, p: &Params) -> Vec<&'static str> {
        let is = |k: &str, v: &str| p.get(k).and_then(|x| x.as_str()) == Some(v);
        let mut unread = Vec::new();
        for (param, applies) in [("momentum", is("optimizer", "sgd")), ("focal_gamma", is("loss", "focal")), ("la_tau", is("loss", "logit_adjustment")), ("vit_final_norm", is("model", "vit"))] {
            if !applies {
                unread.push(param);
            }
        }
        unread
    }

    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let cfg = Config::from_params(params)?;
        train_run(&cfg, seed, inputs.input(INPUT)?, progress)
    }
}

/// Gather `idx` into an N×C×H×W tensor scaled to [−1, 1], and its labels.
fn batch(data: &ImageSet, idx: &[usize], dev: &Device) -> Result<(Tensor, Tensor), MethodError> {
    let dim = data.dim();
    let mut px = Vec::with_capacity(idx.len() * dim);
    let mut ys = Vec::with_capacity(idx.len());
    for &i in idx {
        px.extend(data.pixels[i * dim..(i + 1) * dim].iter().map(|v| v * 2.0 - 1.0));
        ys.push(data.labels[i]);
    }
    let x = Tensor::from_vec(px, (idx.len(), data.channels, data.height, data.width), dev)?;
    let y = Tensor::from_vec(ys, idx.len(), dev)?;
    Ok((x, y))
}

/// Features and predictions of `idx` in evaluation mode, in chunks.
fn evaluate(model: &dyn Classifier, data: &ImageSet, idx: &[usize], dev: &Device) -> Result<(Vec<f32>, Vec<u32>), MethodError> {
    let mut feats = Vec::with_capacity(idx.len() * model.feature_dim());
    let mut preds = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(512) {
        let (x, _) = batch(data, chunk, dev)?;
        let (f, logits) = model.forward(&x, false)?;
        feats.extend(f.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        preds.extend(logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?);
    }
    Ok((feats, preds))
}

/// Every block's features ([`Classifier::layer_features`]) on the samples `idx`, in eval mode:
/// one (row-major N×D_l values, D_l) per block, at most [`MAX_LAYERS`].
fn evaluate_layers(model: &dyn Classifier, data: &ImageSet, idx: &[usize], dev: &Device) -> Result<Vec<(Vec<f32>, usize)>, MethodError> {
    let mut out: Vec<(Vec<f32>, usize)> = Vec::new();
    for chunk in idx.chunks(512) {
        let (x, _) = batch(data, chunk, dev)?;
        let layers = model.layer_features(&x, false)?;
        if layers.len() > MAX_LAYERS {
            return Err(MethodError::Invalid(format!("the model has {} blocks; layer-wise analysis reports at most {MAX_LAYERS}", layers.len())));
        }
        out.resize_with(layers.len(), || (Vec::new(), 0));
        for (slot, t) in out.iter_mut().zip(layers) {
            slot.1 = t.dim(1)?;
            slot.0.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// The device a run asks for; CUDA needs a build with `--features cuda` and a GPU.
fn device(cfg: &Config) -> Result<Device, MethodError> {
    if !cfg.cuda {
        return Ok(Device::Cpu);
    }
    crate::models::cuda_device(0)?.ok_or_else(|| {
        MethodError::Invalid(
            "device = \"cuda\" but this build of reprise has no CUDA support: rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit, or set device = \"cpu\"".into(),
        )
    })
}

fn train_run(cfg: &Config, seed: u64, inputs: &DataInput, progress: &dyn Progress) -> Result<Outcome, MethodError> {
    let dev = device(cfg)?;
    let data = inputs.data;
    let c = data.num_classes;
    let mut counts = vec![0usize; c];
    for &i in inputs.train {
        counts[data.labels[i] as usize] += 1;
    }
    let groups = metrics::groups_by_rank(&counts);
    let minority: Vec<usize> = (0..c).filter(|&k| groups[k] == metrics::Group::Tail).collect();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mcfg = ModelConfig { kind: cfg.model, channels: data.channels, height: data.height, width: data.width, num_classes: c, width_mult: cfg.width, vit_final_norm: cfg.vit_final_norm };
    let model = models::build(&mcfg, vb)?;
    models::seeded_init(&varmap, seed)?;
    let mut opt = Optimizer::new(varmap.all_vars(), &cfg.optim)?;

    let mut order: Vec<usize> = inputs.train.to_vec();
    let mut rng = Rng::derive(seed, "batch-order");
    let steps_per_epoch = order.len().div_ceil(cfg.batch_size.max(1));
    let total_steps = (steps_per_epoch * cfg.epochs).max(1);
    let mut step = 0usize;
    let mut record = RunRecord { epochs: Vec::new(), train_counts: counts.clone(), failure: None };
    let mut objects = BTreeMap::new();

    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0f64;
        let mut seen = 0usize;
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            if cfg.cosine {
                let t = step as f64 / total_steps as f64;
                opt.set_lr(cfg.optim.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()));
            }
            let (x, y) = batch(data, chunk, &dev)?;
            let (feats, logits) = model.forward(&x, true)?;
            let mut loss = train::loss(&cfg.loss, &logits, &y, &counts)?;
            if cfg.drift_penalty > 0.0 {
                let labels: Vec<u32> = chunk.iter().map(|&i| data.labels[i]).collect();
                loss = (loss + (train::drift_penalty(&feats, &labels, c)? * cfg.drift_penalty)?)?;
            }
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                let reason = format!("the training loss became {l} at epoch {epoch}, step {step}: the run diverged");
                record.failure = Some(reason.clone());
                objects.insert("metrics.json".to_string(), to_json(&record)?);
                return Ok(Outcome::Failed { reason, objects });
            }
            opt.backward_step(&loss)?;
            loss_sum += l * chunk.len() as f64;
            seen += chunk.len();
            step += 1;
        }
        progress.epoch(epoch, cfg.epochs, "");
        if epoch % cfg.analyze_freq == 0 || epoch == cfg.epochs {
            let (rec, tensors) = match analyse(model.as_ref(), &dev, cfg, inputs, &counts, &groups, &minority, epoch, loss_sum / seen.max(1) as f64) {
                Ok(x) => x,
                // Degenerate features (e.g. every ReLU dead after a too-large step) are a
                // property of this configuration: record the run as failed, like a divergence.
                Err(MethodError::Metrics(m)) => {
                    let reason = format!("analysis at epoch {epoch} failed: {m}");
                    record.failure = Some(reason.clone());
                    objects.insert("metrics.json".to_string(), to_json(&record)?);
                    return Ok(Outcome::Failed { reason, objects });
                }
                Err(e) => return Err(e),
            };
            objects.insert(rec.analysis_object.clone(), tensors);
            record.epochs.push(rec);
        }
    }
    objects.insert("metrics.json".to_string(), to_json(&record)?);
    let weights = varmap
        .data()
        .lock()
        .map_err(|_| MethodError::Invalid("the model's variables are poisoned".into()))?
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<BTreeMap<_, _>, candle_core::Error>>()?;
    objects.insert("model.safetensors".to_string(), safetensors_bytes(&weights)?);
    Ok(Outcome::Done(objects))
}

/// Serialise named tensors in sorted order (stable bytes for stable hashes).
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>, MethodError> {
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None).map_err(|e| MethodError::Invalid(format!("cannot serialise tensors: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn analyse(
    model: &dyn Classifier,
    dev: &Device,
    cfg: &Config,
    inputs: &DataInput,
    counts: &[usize],
    groups: &[metrics::Group],
    minority: &[usize],
    epoch: usize,
    train_loss: f64,
) -> Result<(EpochRecord, Vec<u8>), MethodError> {
    let data = inputs.data;
    let c = data.num_classes;
    let (feats, preds) = evaluate(model, data, inputs.train, dev)?;
    let labels: Vec<u32> = inputs.train.iter().map(|&i| data.labels[i]).collect();
    let w = model.classifier().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let d = model.feature_dim();
    let wv: Vec<f32> = w.flatten_all()?.to_vec1::<f32>()?;
    let nc_at = |centering: Centering| {
        metrics::neural_collapse(&NcInput { features: &feats, n: labels.len(), d, labels: &labels, predictions: &preds, classifier: &wv, num_classes: c, minority, centering })
            .map_err(|e| MethodError::Metrics(e.to_string()))
    };
    let nc = nc_at(cfg.centering)?;
    // Beside them, always the class-balanced centring: under imbalance the sample mean folds the
    // drift into NC1–NC3 of the features.
    let balanced = if cfg.centering == Centering::Balanced { nc.clone() } else { nc_at(Centering::Balanced)? };
    let train_acc = metrics::accuracy(&labels, &preds, groups);
    let (_, test_preds) = evaluate(model, data, inputs.test, dev)?;
    let test_labels: Vec<u32> = inputs.test.iter().map(|&i| data.labels[i]).collect();
    let acc = metrics::accuracy(&test_labels, &test_preds, groups);

    let mut m = BTreeMap::new();
    let pct = |x: f64| 100.0 * x;
    m.insert("train_loss".to_string(), train_loss);
    m.insert("train_accuracy".to_string(), pct(train_acc.overall));
    m.insert("accuracy".to_string(), pct(acc.overall));
    m.insert("balanced_accuracy".to_string(), pct(acc.balanced));
    for (name, v) in [("head_accuracy", acc.head), ("medium_accuracy", acc.medium), ("tail_accuracy", acc.tail)] {
        if let Some(v) = v {
            m.insert(name.to_string(), pct(v));
        }
    }
    m.insert("nc1".into(), nc.nc1);
    m.insert("nc2_equinorm_features".into(), nc.nc2_equinorm_features);
    m.insert("nc2_equinorm_classifier".into(), nc.nc2_equinorm_classifier);
    m.insert("nc2_equiangular_features".into(), nc.nc2_equiangular_features);
    m.insert("nc2_equiangular_classifier".into(), nc.nc2_equiangular_classifier);
    m.insert("nc3".into(), nc.nc3);
    m.insert("nc1_balanced".into(), balanced.nc1);
    m.insert("nc2_equinorm_features_balanced".into(), balanced.nc2_equinorm_features);
    m.insert("nc2_equiangular_features_balanced".into(), balanced.nc2_equiangular_features);
    m.insert("nc3_balanced".into(), balanced.nc3);
    m.insert("nc4".into(), nc.nc4);
    m.insert("drift_abs".into(), nc.drift_abs);
    m.insert("drift_norm".into(), nc.drift_norm);
    // What a perfect simplex with these class counts has already, and the excess over it.
    if let Some(etf) = metrics::drift_norm_etf(counts) {
        m.insert("drift_norm_etf".into(), etf);
        if etf > 0.0 {
            m.insert("drift_excess".into(), nc.drift_norm / etf);
        }
    }
    if let Some(mc) = nc.minority_cosine {
        m.insert("minority_cosine".into(), mc);
    }
    if cfg.analyze_layers {
        let etf = metrics::drift_norm_etf(counts).filter(|&e| e > 0.0);
        for (l, (f, dl)) in evaluate_layers(model, data, inputs.train, dev)?.iter().enumerate() {
            let (_, drift) = metrics::mean_drift(f, labels.len(), *dl, &labels, c).map_err(|e| MethodError::Metrics(format!("layer {}: {e}", l + 1)))?;
            m.insert(format!("drift_norm_layer{}", l + 1), drift);
            if let Some(e) = etf {
                m.insert(format!("drift_excess_layer{}", l + 1), drift / e);
            }
        }
    }
    let per_class = (0..c)
        .map(|k| {
            let row = &wv[k * d..(k + 1) * d];
            ClassRecord {
                class: k,
                train_count: counts[k],
                group: group_name(groups[k]).to_string(),
                test_accuracy: acc.per_class.get(k).copied().flatten().map(pct),
                classifier_norm: row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt(),
                extra: BTreeMap::new(),
            }
        })
        .collect();
    let name = format!("analysis/e{epoch:04}.safetensors");
    let mut t = BTreeMap::new();
    let cpu = Device::Cpu;
    t.insert("features".to_string(), Tensor::from_vec(feats, (labels.len(), d), &cpu)?);
    t.insert("labels".to_string(), Tensor::from_vec(labels.clone(), labels.len(), &cpu)?);
    t.insert("predictions".to_string(), Tensor::from_vec(preds, labels.len(), &cpu)?);
    t.insert("classifier".to_string(), w);
    let bytes = safetensors_bytes(&t)?;
    Ok((EpochRecord { epoch, metrics: m, per_class, analysis_object: name, per_task: Vec::new() }, bytes))
}

fn group_name(g: metrics::Group) -> &'static str {
    match g {
        metrics::Group::Head => "head",
        metrics::Group::Medium => "medium",
        metrics::Group::Tail => "tail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_struct_and_the_schema_agree() {
        Schema::of::<P>().check().unwrap();
    }

    /// A spec over optimizers × momentum: the momentum of non-SGD runs is not read, so it leaves
    /// those runs (and their keys), and the runs that differed only there are one.
    #[test]
    fn parameters_a_configuration_does_not_read_leave_the_run() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("templates")).unwrap();
        std::fs::write(dir.path().join("templates/t.md.j2"), "x").unwrap();
        std::fs::create_dir_all(dir.path().join("data-manifests")).unwrap();
        std::fs::write(dir.path().join("data-manifests/m.toml"), "").unwrap();
        let text = r#"
[report]
id = "demo"
title = "Demo"
template = "t.md.j2"

[data.mnist]
manifest = "m"

[experiments.e]
title = "E"
grid = { optimizer = ["sgd", "adam"], momentum = [0.5, 0.9], loss = ["ce", "focal"] }
"#;
        let spec = crate::spec::parse(text, std::path::Path::new("reports/demo.toml"), dir.path(), "quick", &[]).unwrap();
        let runs = &spec.experiments[0].runs;
        let labels: Vec<String> = runs.iter().map(|r| r.label()).collect();
        // sgd: 2 momenta × 2 losses; adam: one run per loss.
        assert_eq!(runs.len(), 6, "{labels:?}");
        for r in runs {
            let sgd = r.params["optimizer"].as_str() == Some("sgd");
            assert_eq!(r.params.contains_key("momentum"), sgd, "{}", r.label());
            assert_eq!(r.point.contains_key("momentum"), sgd, "{}", r.label());
            assert_eq!(r.params.contains_key("focal_gamma"), r.params["loss"].as_str() == Some("focal"), "{}", r.label());
            assert!(!r.params.contains_key("la_tau") && !r.params.contains_key("vit_final_norm"), "{}", r.label());
        }
        // Every run still decodes, and an SGD run reads its momentum.
        for r in runs {
            let cfg = Config::from_params(&r.params).unwrap();
            if r.params["optimizer"].as_str() == Some("sgd") {
                assert_eq!(Some(cfg.optim.momentum), r.params["momentum"].as_f64());
            } else {
                assert_eq!(cfg.optim.momentum, 0.0);
            }
        }
    }
}
