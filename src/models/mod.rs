//! The networks that cells train: a small MLP, CNN, ResNet, ViT and Conv-4 behind one `Classifier`
//! trait.
//!
//! Methods (losses, re-weighting, post-hoc corrections, feature statistics) need the same two
//! things from every network: the penultimate features and a bias-free linear classifier on top of
//! them. This module exposes exactly that, builds each architecture from a `ModelConfig` with
//! stable variable names (they name checkpoint tensors), and owns the seeded initialisation so a
//! spec's seed pins the initial weights on every machine, independently of candle's own RNG.
//!
//! All architectures are sized for quick CPU runs and accept both 28×28 and 8×8 inputs.
//!
//! Training speed on the CPU comes from the kernels in [`kernels`]: the layers the architectures
//! use (convolution, max-pooling, BatchNorm, linear, LayerNorm, softmax, attention, GELU, residual
//! add + ReLU) are candle custom ops with their own backward passes for f32 tensors on the CPU,
//! and candle's operations on other devices; the tests compare both.

pub mod cnn;
pub mod conv4;
pub mod functional;
pub mod kernels;
pub mod lora;
pub mod mlp;
pub mod resnet;
pub mod vit;

use candle_core::{DType, Device, Tensor, D};

use kernels::{alloc, fused};

/// GPU `ordinal` of candle's CUDA backend, or `None` when this build has no CUDA support (built
/// without `--features cuda`); each caller says how to fix that in its own terms.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<Option<Device>> {
    if !candle_core::utils::cuda_is_available() {
        return Ok(None);
    }
    Device::new_cuda(ordinal).map(Some)
}

/// Thread settings of the CPU kernels; call once, before the first tensor operation (candle reads
/// them lazily and keeps them). Rayon (our kernels) and candle's GEMM use `RAYON_NUM_THREADS` = `n`.
/// candle's element-wise operations get no worker threads of their own (`CANDLE_NUM_THREADS` = 1):
/// its pool's workers spin after every operation and take the cores the GEMM threads need (with
/// two threads on two cores, an MLP step ran 2.6x slower than with one). Variables the user set
/// are left alone.
pub fn set_cpu_threads(n: usize) {
    for (var, value) in [("RAYON_NUM_THREADS", n.max(1)), ("CANDLE_NUM_THREADS", 1)] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value.to_string());
        }
    }
}

use candle_nn::VarMap;

use crate::rng::Rng;

/// Which architecture to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Cnn,
    Resnet,
    Vit,
    Conv4,
}

fn default_width_mult() -> usize {
    1
}

fn default_true() -> bool {
    true
}

/// Shape of the input and output and the few architecture knobs the specs vary.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Architecture (required).
    pub kind: ModelKind,
    /// Input channels C of the N×C×H×W input (required).
    pub channels: usize,
    /// Input height H (required).
    pub height: usize,
    /// Input width W (required).
    pub width: usize,
    /// Number of classes, the classifier's output size (required).
    pub num_classes: usize,
    /// Multiplies every hidden size and channel count. Default 1.
    #[serde(default = "default_width_mult")]
    pub width_mult: usize,
    /// ViT only: apply the final LayerNorm before the features (the ablation sets it to false,
    /// replacing the norm with identity). Default true.
    #[serde(default = "default_true")]
    pub vit_final_norm: bool,
}

impl ModelConfig {
    /// A config with the defaults for `width_mult` (1) and `vit_final_norm` (true).
    pub fn new(kind: ModelKind, channels: usize, height: usize, width: usize, num_classes: usize) -> Self {
        ModelConfig { kind, channels, height, width, num_classes, width_mult: 1, vit_final_norm: true }
    }
}

/// A network split into penultimate features and a bias-free linear classifier.
pub trait Classifier: Send + Sync {
    /// Penultimate features, N×D (after any final normalisation, before the classifier).
    fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Classifier weights C×D (no bias).
    fn classifier(&self) -> &Tensor;
    fn feature_dim(&self) -> usize;
    /// The features after each of the network's blocks, input side first, N×D_l each, the last
    /// being [`Classifier::features`]. A convolutional block's maps are averaged over their
    /// positions (one value per channel). For layer-wise analysis, not training; the default
    /// gives the final features only.
    fn layer_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.features(x, train)?])
    }
    /// (features, logits) in one pass; logits = features · classifierᵀ, N×C.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let f = self.features(x, train)?;
        let logits = f.matmul(&self.classifier().t()?)?;
        Ok((f, logits))
    }
}

/// Build the network described by `cfg`, creating its variables through `vb`.
///
/// Variables get candle's default initialisation; call [`seeded_init`] on the backing `VarMap`
/// for a reproducible one.
pub fn build(cfg: &ModelConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Box<dyn Classifier>> {
    if cfg.channels == 0 || cfg.height == 0 || cfg.width == 0 || cfg.num_classes == 0 {
        candle_core::bail!("model config has a zero dimension: {cfg:?}");
    }
    if cfg.width_mult == 0 {
        candle_core::bail!("model config: width_mult must be at least 1");
    }
    alloc::keep_freed_memory();
    Ok(match cfg.kind {
        ModelKind::Mlp => Box::new(mlp::Mlp::new(cfg, vb)?),
        ModelKind::Cnn => Box::new(cnn::Cnn::new(cfg, vb)?),
        ModelKind::Resnet => Box::new(resnet::ResNet::new(cfg, vb)?),
        ModelKind::Vit => Box::new(vit::Vit::new(cfg, vb)?),
        ModelKind::Conv4 => Box::new(conv4::Conv4::new(cfg, vb)?),
    })
}

/// Standard deviation of the ViT cls token and position embedding at initialisation.
const TOKEN_INIT_STD: f64 = 0.02;

/// Overwrite every variable in `varmap` with a seeded initialisation.
///
/// Variables are visited in sorted name order and all values are drawn, in row-major order, from
/// one stream `Rng::derive(seed, "model-init")`, so the result depends only on the seed and the
/// set of variable names and shapes. The rule, by variable:
///
/// * name ending in `cls_token` or `pos_embed` (ViT): N(0, 0.02²);
/// * any other tensor of rank ≥ 2 (linear and conv weights): U(−b, b) with
///   b = √3 / √fan_in = √(3 / fan_in), fan_in = product of all dimensions but the first
///   (in·kh·kw for a conv, in for a linear). This is Kaiming-uniform with gain 1, i.e. variance
///   1/fan_in;
/// * rank ≤ 1 named `…weight` (norm-layer scales) or `…running_var`: 1;
/// * every other rank ≤ 1 tensor (biases, norm shifts, `running_mean`): 0.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = Rng::derive(seed, "model-init");
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f64> = if name.ends_with("cls_token") || name.ends_with("pos_embed") {
            (0..n).map(|_| TOKEN_INIT_STD * rng.normal()).collect()
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = (3.0 / fan_in.max(1) as f64).sqrt();
            (0..n).map(|_| rng.uniform(-bound, bound)).collect()
        } else if name.ends_with("weight") || name.ends_with("running_var") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// LayerNorm over the last dimension, built from differentiable primitives.
///
/// candle-nn's `LayerNorm` takes a fused kernel without a backward pass for contiguous inputs,
/// so the transformer uses this one. Variables: `weight` (scale, init 1) and `bias` (shift,
/// init 0); eps 1e-5 as in PyTorch.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(LayerNorm { weight, bias, eps: 1e-5 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match fused::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            Some(y) => Ok(y),
            None => Self::reference(x, &self.weight, &self.bias, self.eps),
        }
    }

    /// The same computation from candle's primitives (other devices and dtypes; tests).
    pub(crate) fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(weight)?.broadcast_add(bias)
    }
}

/// Softmax over the last dimension with a backward pass (candle-nn's `softmax_last_dim` is a
/// fused kernel without one): [`fused::softmax_last`] on the CPU in f32, else
/// [`softmax_last_reference`].
pub(crate) fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    match fused::softmax_last(x)? {
        Some(y) => Ok(y),
        None => softmax_last_reference(x),
    }
}

/// Multi-head self-attention between a transformer's projections: `qkv` is N×T×3D (q, k, v
/// side by side, head h in columns h·dh..(h+1)·dh of each), the result N×T×D is
/// softmax(q·kᵀ/√dh)·v per head, heads side by side. [`fused::attention`] on the CPU in f32,
/// else [`attention_reference`].
pub(crate) fn attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    match fused::attention(qkv, heads)? {
        Some(y) => Ok(y),
        None => attention_reference(qkv, heads),
    }
}

/// [`attention`] from differentiable primitives.
pub(crate) fn attention_reference(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (n, t, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    let dh = d / heads;
    // N×T×3D → 3×N×H×T×dh
    let qkv = qkv.reshape((n, t, 3, heads, dh))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
    softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))
}

/// Softmax over the last dimension from differentiable primitives.
pub(crate) fn softmax_last_reference(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The classifier weight, C×D, shared by all architectures under the name `classifier.weight`.
/// N×C×H×W → N×C: each channel's mean over its positions.
pub(crate) fn channel_means(h: &Tensor) -> candle_core::Result<Tensor> {
    h.flatten_from(2)?.mean(2)
}

pub(crate) fn classifier_weight(num_classes: usize, dim: usize, vb: candle_nn::VarBuilder) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (dim as f64).sqrt();
    vb.pp("classifier").get_with_hints((num_classes, dim), "weight", candle_nn::Init::Uniform { lo: -bound, up: bound })
}

/// The dtype reprise builds and trains models in (inputs are N×C×H×W f32); pass it to
/// `VarBuilder::from_varmap`.
pub const MODEL_DTYPE: DType = DType::F32;

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared checks for the per-model tests: output shapes and one SGD step lowering the loss.
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    use crate::train::optim::{OptimConfig, Optimizer};

    thread_local! {
        /// When set, [`kernels::fast_cpu`] answers false on this thread, so the layers run candle's own
        /// operations: the reference the fast kernels are compared with.
        pub static REFERENCE_OPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Run `f` with candle's own operations instead of the fused kernels (on this thread).
    pub fn with_reference_ops<R>(f: impl FnOnce() -> R) -> R {
        REFERENCE_OPS.with(|c| c.set(true));
        let r = f();
        REFERENCE_OPS.with(|c| c.set(false));
        r
    }

    /// A deterministic N×C×H×W batch and labels.
    pub fn batch(n: usize, c: usize, h: usize, w: usize, classes: usize) -> (Tensor, Tensor) {
        let mut rng = Rng::new(11);
        let xs: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal() as f32).collect();
        let ys: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
        let x = Tensor::from_vec(xs, (n, c, h, w), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(ys, n, &Device::Cpu).unwrap();
        (x, y)
    }

    pub fn build_seeded(cfg: &ModelConfig, seed: u64) -> (VarMap, Box<dyn Classifier>) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, MODEL_DTYPE, &Device::Cpu);
        let model = build(cfg, vb).unwrap();
        seeded_init(&varmap, seed).unwrap();
        (varmap, model)
    }

    pub fn check_shapes(kind: ModelKind, expected_dim: usize) {
        for &(h, w) in &[(28usize, 28usize), (8, 8)] {
            let cfg = ModelConfig::new(kind, 1, h, w, 10);
            let (_vm, model) = build_seeded(&cfg, 1);
            assert_eq!(model.feature_dim(), expected_dim);
            assert_eq!(model.classifier().dims(), &[10, expected_dim]);
            let (x, _) = batch(5, 1, h, w, 10);
            for train in [true, false] {
                let (f, logits) = model.forward(&x, train).unwrap();
                assert_eq!(f.dims(), &[5, expected_dim], "{kind:?} {h}x{w}");
                assert_eq!(logits.dims(), &[5, 10], "{kind:?} {h}x{w}");
                let f2 = model.features(&x, train).unwrap();
                assert_eq!(f2.dims(), &[5, expected_dim]);
            }
        }
    }

    pub fn check_sgd_step_lowers_loss(kind: ModelKind, lr: f64) {
        let cfg = ModelConfig::new(kind, 1, 8, 8, 4);
        let (varmap, model) = build_seeded(&cfg, 3);
        let (x, y) = batch(32, 1, 8, 8, 4);
        let ce = |train: bool| {
            let (_, logits) = model.forward(&x, train).unwrap();
            candle_nn::loss::cross_entropy(&logits, &y).unwrap()
        };
        let before = ce(true);
        let mut opt = Optimizer::new(varmap.all_vars(), &OptimConfig::sgd(lr)).unwrap();
        opt.backward_step(&before).unwrap();
        let before = before.to_scalar::<f32>().unwrap();
        let after = ce(true).to_scalar::<f32>().unwrap();
        assert!(after < before, "{kind:?}: loss {before} -> {after}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    /// A training step gives the same bits whatever the thread count: a cell's key does not name
    /// the threads it ran with (`run --jobs 1` on two cores gives each cell two), so every
    /// parallel split must leave the order of every sum alone. Batch 128 on 28×28, as the
    /// reports train: smaller batches fall under the sizes where the kernels split work.
    #[test]
    fn a_training_step_is_bit_identical_at_any_thread_count() {
        use crate::train::{OptimConfig, Optimizer};
        let (x, y) = test_support::batch(128, 1, 28, 28, 10);
        for kind in [ModelKind::Mlp, ModelKind::Cnn, ModelKind::Resnet, ModelKind::Vit, ModelKind::Conv4] {
            let step = |threads: usize| -> Vec<Vec<u32>> {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let (varmap, model) = test_support::build_seeded(&ModelConfig::new(kind, 1, 28, 28, 10), 5);
                    let mut opt = Optimizer::new(varmap.all_vars(), &OptimConfig::sgd(0.05)).unwrap();
                    for _ in 0..2 {
                        let (_, logits) = model.forward(&x, true).unwrap();
                        opt.backward_step(&candle_nn::loss::cross_entropy(&logits, &y).unwrap()).unwrap();
                    }
                    let mut vars: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    vars.sort_by(|a, b| a.0.cmp(&b.0));
                    vars.iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()).collect()
                })
            };
            let one = step(1);
            for threads in [2, 3] {
                assert!(step(threads) == one, "{kind:?}: {threads} threads differ from 1");
            }
        }
    }

    /// Each model's layer-wise features: one N×D_l matrix per block, the last bit-identical to
    /// the features (eval mode, where BatchNorm reads its running statistics and no state moves),
    /// the inner ones one value per channel for convolutional blocks.
    #[test]
    fn layer_features_end_with_the_features() {
        let (x, _) = test_support::batch(6, 1, 28, 28, 10);
        let expected: [(ModelKind, &[usize]); 5] =
            [(ModelKind::Mlp, &[256, 128]), (ModelKind::Cnn, &[32, 64, 128]), (ModelKind::Resnet, &[16, 16, 32, 64]), (ModelKind::Vit, &[64, 64]), (ModelKind::Conv4, &[32, 32, 32, 32])];
        for (kind, dims) in expected {
            let (_vm, model) = test_support::build_seeded(&ModelConfig::new(kind, 1, 28, 28, 10), 2);
            let layers = model.layer_features(&x, false).unwrap();
            let got: Vec<usize> = layers.iter().map(|t| t.dim(1).unwrap()).collect();
            assert_eq!(got, dims, "{kind:?}");
            assert!(layers.iter().all(|t| t.dim(0).unwrap() == 6), "{kind:?}");
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(layers.last().unwrap()), bits(&model.features(&x, false).unwrap()), "{kind:?}");
        }
    }

    /// The backward pass in use is the patched one (vendor/candle-core): a single contribution
    /// is stored as it is, so a −0 gradient keeps its sign (the published pass added it to
    /// zeros, giving +0); and a first gradient that does not fit its tensor is still an error.
    #[test]
    fn backward_stores_a_single_gradient_as_is_and_rejects_a_misfit() {
        let x = candle_core::Var::from_vec(vec![1f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
        let z = Tensor::from_vec(vec![-0.0f32; 3], 3, &Device::Cpu).unwrap();
        let g = (x.as_tensor() * &z).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(gx.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()), "{gx:?}");

        /// Identity whose backward pass returns a gradient of the wrong shape.
        struct Misfit;
        impl candle_core::CustomOp1 for Misfit {
            fn name(&self) -> &'static str {
                "misfit"
            }
            fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let v = kernels::cpu_f32(s, l, "misfit", "input")?.to_vec();
                Ok((candle_core::CpuStorage::F32(v), l.shape().clone()))
            }
            fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
                let _ = arg;
                Ok(Some(grad.flatten_all()?))
            }
        }
        let y = candle_core::Var::from_vec(vec![1f32; 6], (2, 3), &Device::Cpu).unwrap();
        let out = y.as_tensor().apply_op1(Misfit).unwrap().sum_all().unwrap();
        let err = out.backward().unwrap_err().to_string();
        assert!(err.contains("shape mismatch"), "{err}");
    }

    /// The patched backward pass (vendor/candle-core): a tensor reached by several gradient
    /// contributions gets their exact sum, for tensors below and above the size from which the
    /// sum runs in parallel, and a tensor reached once gets its one contribution as it is.
    #[test]
    fn backward_sums_gradient_contributions_exactly() {
        let mut rng = crate::rng::Rng::new(3);
        for n in [1000usize, 70_000] {
            let v = |rng: &mut crate::rng::Rng| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
            let (xv, rv) = (v(&mut rng), v(&mut rng));
            let x = candle_core::Var::from_vec(xv, n, &Device::Cpu).unwrap();
            let r = Tensor::from_vec(rv.clone(), n, &Device::Cpu).unwrap();
            // x reaches the loss three ways: ·2, ·3 and ·r; y once.
            let y = candle_core::Var::from_vec(vec![1f32; n], n, &Device::Cpu).unwrap();
            let x = x.as_tensor();
            let t = ((x * 2.0).unwrap() + (x * 3.0).unwrap()).unwrap();
            let t = (t + (x * &r).unwrap()).unwrap();
            let loss = ((t * &r).unwrap() + (y.as_tensor() * &r).unwrap()).unwrap();
            let grads = loss.sum_all().unwrap().backward().unwrap();
            let gx = grads.get(x).unwrap().to_vec1::<f32>().unwrap();
            let gy = grads.get(y.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            for (i, &ri) in rv.iter().enumerate() {
                // Contributions in the order the backward pass meets them.
                let want = (ri * ri + ri * 3.0) + ri * 2.0;
                let alt = (ri * 2.0 + ri * 3.0) + ri * ri;
                assert!(gx[i] == want || gx[i] == alt, "n {n}, element {i}: {} vs {want} / {alt}", gx[i]);
                assert_eq!(gy[i], ri, "n {n}, element {i}");
            }
        }
    }

    /// Wall time of one SGD training step (forward, cross-entropy, backward, update) per model,
    /// batch 128 of 28×28×1 input (and 8×8×1 for comparison). Run with `cargo test --lib -- --ignored --nocapture speed`.
    #[test]
    #[ignore]
    fn speed_of_one_training_step() {
        use crate::train::optim::{OptimConfig, Optimizer};
        const STEPS: u32 = 20;
        for (side, kind) in [28usize, 8].into_iter().flat_map(|side| [ModelKind::Mlp, ModelKind::Cnn, ModelKind::Resnet, ModelKind::Vit, ModelKind::Conv4].map(|k| (side, k))) {
            let cfg = ModelConfig::new(kind, 1, side, side, 10);
            let (varmap, model) = test_support::build_seeded(&cfg, 1);
            let (x, y) = test_support::batch(128, 1, side, side, 10);
            let mut opt = Optimizer::new(varmap.all_vars(), &OptimConfig::sgd(0.01)).unwrap();
            let mut step = || {
                let (_, logits) = model.forward(&x, true).unwrap();
                let l = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
                opt.backward_step(&l).unwrap();
            };
            step(); // warm-up, not timed
            let start = std::time::Instant::now();
            for _ in 0..STEPS {
                step();
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / f64::from(STEPS);
            println!("{kind:?}: {ms:.1} ms/step (batch 128, {side}x{side}x1, SGD)");
        }
    }

    #[test]
    fn config_serde_defaults() {
        let cfg: ModelConfig = serde_json::from_str(r#"{"kind":"vit","channels":1,"height":28,"width":28,"num_classes":10}"#).unwrap();
        assert_eq!(cfg, ModelConfig::new(ModelKind::Vit, 1, 28, 28, 10));
        assert_eq!(serde_json::to_string(&ModelKind::Resnet).unwrap(), "\"resnet\"");
        assert_eq!(serde_json::to_string(&ModelKind::Conv4).unwrap(), "\"conv4\"");
    }

    #[test]
    fn seeded_init_is_reproducible_and_follows_the_rule() {
        let cfg = ModelConfig::new(ModelKind::Vit, 1, 8, 8, 3);
        let vm_a = VarMap::new();
        let vm_b = VarMap::new();
        let _a = build(&cfg, VarBuilder::from_varmap(&vm_a, DType::F32, &Device::Cpu)).unwrap();
        let _b = build(&cfg, VarBuilder::from_varmap(&vm_b, DType::F32, &Device::Cpu)).unwrap();
        seeded_init(&vm_a, 42).unwrap();
        seeded_init(&vm_b, 42).unwrap();
        let da = vm_a.data().lock().unwrap();
        let db = vm_b.data().lock().unwrap();
        for (name, va) in da.iter() {
            let a = va.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = db[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{name}");
            let dims = va.dims();
            if name.ends_with("cls_token") || name.ends_with("pos_embed") {
                assert!(a.iter().all(|v| v.abs() < 0.2), "{name}");
            } else if dims.len() >= 2 {
                let fan_in: usize = dims[1..].iter().product();
                let bound = (3.0 / fan_in as f64).sqrt() as f32;
                assert!(a.iter().all(|v| v.abs() <= bound), "{name}");
                assert!(a.iter().any(|v| v.abs() > bound / 2.0), "{name}");
            } else if name.ends_with("weight") {
                assert!(a.iter().all(|&v| v == 1.0), "{name}");
            } else {
                assert!(a.iter().all(|&v| v == 0.0), "{name}");
            }
        }
        drop(db);
        let vm_c = VarMap::new();
        let _c = build(&cfg, VarBuilder::from_varmap(&vm_c, DType::F32, &Device::Cpu)).unwrap();
        seeded_init(&vm_c, 43).unwrap();
        let w_a = da["classifier.weight"].as_tensor().flatten_all().unwrap();
        let w_c = vm_c.data().lock().unwrap()["classifier.weight"].as_tensor().flatten_all().unwrap();
        assert_ne!(w_a.to_vec1::<f32>().unwrap(), w_c.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn layer_norm_and_softmax_match_candle_and_backprop() {
        // candle's fused layer norm only runs in f32/f16, so compare in f32 ...
        let vm = VarMap::new();
        let ln = LayerNorm::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let xs = vec![1.0f64, 2.0, 4.0, -1.0, 0.5, 0.5, 3.0, 2.0];
        let x32 = Tensor::from_vec(xs.iter().map(|&v| v as f32).collect::<Vec<_>>(), (2, 4), &Device::Cpu).unwrap();
        let ours = ln.forward(&x32).unwrap();
        let reference = candle_nn::ops::layer_norm(&x32, &ln.weight, &ln.bias, 1e-5).unwrap();
        let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // ... and by hand in f64: row [1, 2, 4, −1] has mean 1.5 and variance
        // (0.25 + 0.25 + 6.25 + 6.25)/4 = 3.25, so its first entry maps to −0.5/√(3.25 + 1e-5).
        let vm = VarMap::new();
        let ln = LayerNorm::new(4, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
        let x = candle_core::Var::from_vec(xs, (2, 4), &Device::Cpu).unwrap();
        let y = ln.forward(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        assert!((y[0][0] + 0.5 / (3.25f64 + 1e-5).sqrt()).abs() < 1e-12);
        let g = ln.forward(x.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&ln.weight).is_some());
        let s = softmax_last(x.as_tensor()).unwrap();
        let sref = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
        let diff = (&s - sref).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        let g = s.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }
}

#[cfg(test)]
mod fast_kernels {
    //! Whole-model check of the fused CPU kernels against candle's own operations.
    use super::test_support::{batch, build_seeded, with_reference_ops};
    use super::*;
    use crate::train::LossKind;

    /// max |a − b| / max(max |b|, 1e-3) over two tensors.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// For every model, input size and train/eval mode: the same loss, gradient of every variable
    /// and (BatchNorm) running statistics with the fused kernels as with candle's operations.
    ///
    /// The kernels round differently, so an activation that lies within an ulp of a ReLU's kink
    /// can land on the other side of it and change a few gradient entries by far more than
    /// rounding (it happens for one element of the ResNet with init seed 7: one BatchNorm output
    /// is exactly 0 in candle's arithmetic and −6e−8 in ours). The seed below has no such
    /// coincidence; if a change to the kernels makes this test fail by a wide margin in a single
    /// model, check for a kink before suspecting the kernel.
    #[test]
    fn every_model_matches_candle_ops() {
        let mut worst = 0f32;
        let kinds = [ModelKind::Mlp, ModelKind::Cnn, ModelKind::Resnet, ModelKind::Vit, ModelKind::Conv4];
        for kind in kinds {
            for side in [28usize, 8] {
                for train in [true, false] {
                    let cfg = ModelConfig::new(kind, 1, side, side, 10);
                    let (x, y) = batch(12, 1, side, side, 10);
                    let run = |reference: bool| {
                        let go = || {
                            let (vm, model) = build_seeded(&cfg, 8);
                            let (_, logits) = model.forward(&x, train).unwrap();
                            let loss = crate::train::loss(&LossKind::Ce, &logits, &y, &[1; 10]).unwrap();
                            let grads = loss.backward().unwrap();
                            let data = vm.data().lock().unwrap();
                            let mut names: Vec<String> = data.keys().cloned().collect();
                            names.sort();
                            let vars: Vec<(String, Tensor, Option<Tensor>)> = names
                                .into_iter()
                                .map(|n| {
                                    let t = data[&n].as_tensor().clone();
                                    let g = grads.get(&t).cloned();
                                    (n, t.copy().unwrap(), g)
                                })
                                .collect();
                            (loss.to_scalar::<f32>().unwrap(), vars)
                        };
                        if reference {
                            with_reference_ops(go)
                        } else {
                            go()
                        }
                    };
                    let (loss_fast, fast) = run(false);
                    let (loss_ref, reference) = run(true);
                    let what = format!("{kind:?} {side}x{side} train {train}");
                    assert!((loss_fast - loss_ref).abs() <= 1e-5 * loss_ref.abs().max(1.0), "{what}: loss {loss_fast} vs {loss_ref}");
                    for ((name, value, grad), (_, value_ref, grad_ref)) in fast.iter().zip(&reference) {
                        // Values: BatchNorm running statistics (the other variables are untouched).
                        assert!(rel_diff(value, value_ref) < 1e-5, "{what}: {name}");
                        match (grad, grad_ref) {
                            (Some(g), Some(r)) => {
                                let d = rel_diff(g, r);
                                worst = worst.max(d);
                                assert!(d < 1e-4, "{what}: gradient of {name} differs by {d}");
                            }
                            (None, None) => {}
                            _ => panic!("{what}: gradient of {name} present on one side only"),
                        }
                    }
                }
            }
        }
        println!("largest relative gradient difference: {worst:e}");
    }
}
