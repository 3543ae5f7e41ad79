//! Functional networks for meta-learning: the parameters are arguments of the forward pass, not
//! variables the network owns.
//!
//! MAML, Meta-SGD, Bayesian TAML and WAMAL evaluate a network at *fast weights* θ' = θ − α∇L(θ):
//! the same architecture at parameters that are the result of a computation. Every network here
//! therefore has three parts: a description of its parameters ([`ParamSpec`]: names and shapes,
//! in the order the forward pass takes them), a seeded initialiser returning plain tensors, and
//! `forward(params, x)`, built from differentiable operations only. Wrap the initial tensors in
//! `Var`s to meta-learn them: `loss.backward()` then gives `grads.get(&param)` for every one of
//! them, and a second forward at `θ − α g` (plain tensors, [`sgd_fast_weights`]) runs the adapted
//! network and stays differentiable with respect to θ.
//!
//! Gradients are first order: candle's backward pass does not differentiate through itself, and
//! the fused CPU ops (convolution, the BatchNorm below, max-pooling) have hand-written backward
//! passes that are not differentiable again, so the gradient g inside θ − α g is a constant of the
//! second forward pass (∂θ'/∂θ = I). Second-order terms come from finite-difference
//! Hessian-vector products on top of these first-order gradients (`methods::class_aware_lora`'s
//! pattern).
//!
//! * [`FunctionalMlp`]: linear layers of any widths with biases and ReLU between them.
//! * [`FunctionalConv4`]: the Conv-4 learner of Bayesian TAML (l2b): 4 × [conv 3×3 (same padding)
//!   with bias → BatchNorm with the batch's statistics always (no running statistics), a learned
//!   shift β and no learned scale, ε = 1e-3 (tf.contrib `batch_norm`'s default, which l2b leaves
//!   as it is) → ReLU → 2×2 max-pooling], flatten, then a linear head with bias whose two tensors
//!   come last, so that each task can start from a zero head ([`FunctionalConv4::zero_head`]).
//!
//! On the CPU in f32 the Conv-4 runs the fused convolution of [`kernels::conv`], its own fused
//! batch-statistics BatchNorm + ReLU op (below) and [`kernels::pool`]'s max-pooling with PyTorch's
//! gradient rule (the whole gradient to the first maximum of a window: the derivative, which
//! finite differences check); on other devices and dtypes (the f64 of the tests) it runs the same
//! computation from candle's own operations, [`reference_batch_norm_shift`] and
//! [`reference_max_pool2`]. A test compares the two paths, value and gradient.

use std::sync::{Arc, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{self, alloc::par_zeroed, conv::conv2d, linear::linear, pool};
use crate::rng::Rng;

/// The name and shape of one parameter tensor of a functional network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        ParamSpec { name: name.into(), shape: shape.to_vec() }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Check that `params` has one tensor of the right shape per spec; `what` names the network.
fn check_params(what: &str, specs: &[ParamSpec], params: &[Tensor]) -> Result<()> {
    if specs.len() != params.len() {
        candle_core::bail!("{what}: expected {} parameter tensors ({}), got {}", specs.len(), specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "), params.len());
    }
    for (s, p) in specs.iter().zip(params) {
        if p.dims() != s.shape.as_slice() {
            candle_core::bail!("{what}: parameter {} has shape {:?}, expected {:?}", s.name, p.dims(), s.shape);
        }
    }
    Ok(())
}

/// How weights are drawn. Biases of [`Init::TruncatedNormal`] layers, BatchNorm shifts and the
/// Conv-4's head are zero whatever the rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// PyTorch's defaults for `nn.Conv2d` and `nn.Linear`: the weight from
    /// `kaiming_uniform_(a = √5)`, i.e. U(−b, b) with b = gain·√(3/fan_in), gain = √(2/(1 + 5)),
    /// so b = 1/√fan_in; the bias from U(−1/√fan_in, 1/√fan_in). fan_in = in·kh·kw for a
    /// convolution, in for a linear layer.
    PytorchDefault,
    /// l2b's convolutions (`tf.truncated_normal_initializer(stddev = std)`, std 0.02 there):
    /// N(0, std²) with every draw beyond two standard deviations drawn again; biases 0.
    TruncatedNormal { std: f64 },
}

impl Init {
    /// The values of a weight (`bias` false) or bias of a layer with this fan-in, in row-major
    /// order.
    fn draw(self, rng: &mut Rng, n: usize, fan_in: usize, bias: bool) -> Vec<f64> {
        match self {
            Init::PytorchDefault => {
                let b = 1.0 / (fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| rng.uniform(-b, b)).collect()
            }
            Init::TruncatedNormal { .. } if bias => vec![0.0; n],
            Init::TruncatedNormal { std } => (0..n)
                .map(|_| loop {
                    let v = rng.normal();
                    if v.abs() <= 2.0 {
                        break v * std;
                    }
                })
                .collect(),
        }
    }
}

fn tensor(values: Vec<f64>, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

/// Fast weights θ − lr·g, one tensor per parameter, g = `grads.get(param)`; a parameter without
/// a gradient (the loss did not use it) is kept as it is. The gradients are constants (candle
/// detaches them), so the result is differentiable with respect to `params` with Jacobian I:
/// first-order MAML.
pub fn sgd_fast_weights(params: &[Tensor], grads: &GradStore, lr: f64) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|p| match grads.get(p) {
            Some(g) => p - (g * lr)?,
            None => Ok(p.clone()),
        })
        .collect()
}

/// Linear layers with biases and ReLU between them (none after the last): widths
/// `[input, hidden…, output]`; the input is flattened from its second dimension.
/// Parameters `fc{i}.weight` (out×in) and `fc{i}.bias` (out), i = 1…layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionalMlp {
    widths: Vec<usize>,
}

impl FunctionalMlp {
    /// At least two widths (input and output), all positive.
    pub fn new(widths: &[usize]) -> Result<Self> {
        if widths.len() < 2 || widths.contains(&0) {
            candle_core::bail!("functional MLP: need at least an input and an output width, all positive, got {widths:?}");
        }
        Ok(FunctionalMlp { widths: widths.to_vec() })
    }

    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.widths.windows(2).enumerate().flat_map(|(i, w)| [ParamSpec::new(format!("fc{}.weight", i + 1), &[w[1], w[0]]), ParamSpec::new(format!("fc{}.bias", i + 1), &[w[1]])]).collect()
    }

    /// PyTorch's default initialisation ([`Init::PytorchDefault`]), every tensor in
    /// [`FunctionalMlp::param_specs`] order from the one stream `Rng::derive(seed,
    /// "functional-mlp-init")`.
    pub fn init(&self, seed: u64, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        let mut rng = Rng::derive(seed, "functional-mlp-init");
        self.param_specs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let fan_in = self.widths[i / 2];
                tensor(Init::PytorchDefault.draw(&mut rng, s.numel(), fan_in, i % 2 == 1), &s.shape, device, dtype)
            })
            .collect()
    }

    /// The output (N×out) at `params`.
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        check_params("functional MLP", &self.param_specs(), params)?;
        let mut h = x.flatten_from(1)?;
        let layers = params.len() / 2;
        for (i, wb) in params.chunks_exact(2).enumerate() {
            // The engine's fused linear (bias and ReLU in the GEMM's output pass) on f32 CPU
            // tensors; candle's operations otherwise.
            h = linear(&h, &wb[0], &wb[1], i + 1 < layers)?;
        }
        Ok(h)
    }
}

/// BatchNorm's ε in Bayesian TAML's learner: tf.contrib.layers.batch_norm's default, which l2b
/// does not change.
pub const TAML_BN_EPS: f64 = 1e-3;

const BLOCKS: usize = 4;
/// Parameter tensors per block: the convolution's weight and bias, BatchNorm's shift.
const PER_BLOCK: usize = 3;

/// The Conv-4 learner of Bayesian TAML as a functional network (module documentation).
///
/// Parameters, in order: `block{1..4}.conv.weight` (hidden×in×3×3), `block{1..4}.conv.bias`,
/// `block{1..4}.bn.shift` (hidden each), interleaved by block, then the head: `head.weight`
/// (classes×D) and `head.bias` (classes). D = hidden·h·w of the last block's output: a block
/// pools only an input of at least 2×2, rounding down as PyTorch's and TensorFlow's "valid"
/// pooling do (84 → 42 → 21 → 10 → 5, 32 → 2, 28 → 1, 14 → 7 → 3 → 1 → 1). The convolution's bias
/// is followed by a batch-statistics BatchNorm, which subtracts the channel's mean, so it changes
/// neither the output nor any other gradient and gets a zero gradient (up to rounding); it is
/// kept because l2b has it (and its initialisation modulation adds to it).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionalConv4 {
    in_channels: usize,
    hidden: usize,
    classes: usize,
    eps: f64,
    pools: [bool; BLOCKS],
    /// Height and width of the last block's output.
    out_hw: (usize, usize),
}

impl FunctionalConv4 {
    /// `in_channels`×`height`×`width` inputs, `hidden` channels per block (32 in l2b), `classes`
    /// outputs; BatchNorm ε [`TAML_BN_EPS`].
    pub fn new(in_channels: usize, height: usize, width: usize, hidden: usize, classes: usize) -> Result<Self> {
        if in_channels == 0 || height == 0 || width == 0 || hidden == 0 || classes == 0 {
            candle_core::bail!("functional Conv-4: zero dimension in input {in_channels}×{height}×{width}, hidden {hidden}, classes {classes}");
        }
        let (mut h, mut w) = (height, width);
        let mut pools = [false; BLOCKS];
        for p in &mut pools {
            *p = h >= 2 && w >= 2;
            if *p {
                (h, w) = (h / 2, w / 2);
            }
        }
        Ok(FunctionalConv4 { in_channels, hidden, classes, eps: TAML_BN_EPS, pools, out_hw: (h, w) })
    }

    /// The same network with another BatchNorm ε.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Feature dimension D, the head's input.
    pub fn feature_dim(&self) -> usize {
        self.hidden * self.out_hw.0 * self.out_hw.1
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of body tensors (4 blocks × weight, bias, shift); the head's two follow them.
    pub const BODY_PARAMS: usize = BLOCKS * PER_BLOCK;

    /// The body's parameters (the first [`Self::BODY_PARAMS`] of [`Self::param_specs`]).
    pub fn body_specs(&self) -> Vec<ParamSpec> {
        let mut specs = Vec::with_capacity(Self::BODY_PARAMS);
        let mut cin = self.in_channels;
        for b in 1..=BLOCKS {
            specs.push(ParamSpec::new(format!("block{b}.conv.weight"), &[self.hidden, cin, 3, 3]));
            specs.push(ParamSpec::new(format!("block{b}.conv.bias"), &[self.hidden]));
            specs.push(ParamSpec::new(format!("block{b}.bn.shift"), &[self.hidden]));
            cin = self.hidden;
        }
        specs
    }

    /// The head's parameters: `head.weight` (classes×D), `head.bias` (classes).
    pub fn head_specs(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("head.weight", &[self.classes, self.feature_dim()]), ParamSpec::new("head.bias", &[self.classes])]
    }

    /// Body then head: what [`FunctionalConv4::forward`] takes.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut s = self.body_specs();
        s.extend(self.head_specs());
        s
    }

    /// The body's initial parameters: convolution weights and biases by `init` (fan-in = in·3·3),
    /// BatchNorm shifts 0, drawn in [`FunctionalConv4::body_specs`] order from the one stream
    /// `Rng::derive(seed, "functional-conv4-init")`.
    pub fn init_body(&self, seed: u64, init: Init, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        let mut rng = Rng::derive(seed, "functional-conv4-init");
        self.body_specs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let values = match i % PER_BLOCK {
                    0 => init.draw(&mut rng, s.numel(), s.shape[1] * 9, false),
                    1 => init.draw(&mut rng, s.numel(), self.body_specs()[i - 1].shape[1] * 9, true),
                    _ => vec![0.0; s.numel()],
                };
                tensor(values, &s.shape, device, dtype)
            })
            .collect()
    }

    /// A zero head (weight and bias), as each task of Bayesian TAML starts from.
    pub fn zero_head(&self, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        self.head_specs().iter().map(|s| Tensor::zeros(s.shape.as_slice(), dtype, device)).collect()
    }

    /// [`FunctionalConv4::init_body`] followed by [`FunctionalConv4::zero_head`].
    pub fn init(&self, seed: u64, init: Init, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        let mut p = self.init_body(seed, init, device, dtype)?;
        p.extend(self.zero_head(device, dtype)?);
        Ok(p)
    }

    /// The flattened output of the last block, N×D, at the body parameters `body`.
    pub fn features(&self, body: &[Tensor], x: &Tensor) -> Result<Tensor> {
        check_params("functional Conv-4", &self.body_specs(), body)?;
        let mut h = x.clone();
        for (p, &pool) in body.chunks_exact(PER_BLOCK).zip(&self.pools) {
            let z = conv2d(&h, &p[0], Some(&p[1]), 1, 1, false)?;
            h = batch_norm_shift(&z, &p[2], self.eps, true)?;
            if pool {
                h = max_pool2(&h)?;
            }
        }
        h.flatten_from(1)
    }

    /// Logits `features · head.weightᵀ + head.bias`, N×classes.
    pub fn head(&self, head: &[Tensor], features: &Tensor) -> Result<Tensor> {
        check_params("functional Conv-4 head", &self.head_specs(), head)?;
        features.matmul(&head[0].t()?)?.broadcast_add(&head[1])
    }

    /// Logits, N×classes, at `params` (body then head, [`FunctionalConv4::param_specs`]).
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        if params.len() != Self::BODY_PARAMS + 2 {
            check_params("functional Conv-4", &self.param_specs(), params)?;
        }
        let (body, head) = params.split_at(Self::BODY_PARAMS);
        self.head(head, &self.features(body, x)?)
    }
}

/// BatchNorm of an N×C×H×W input with the batch's statistics and a shift only:
/// y = (x − mean_c)/√(var_c + eps) + shift_c, mean and (population) variance over N·H·W per
/// channel, then a ReLU if `relu`. The fused op below for f32 on the CPU, else
/// [`reference_batch_norm_shift`].
pub fn batch_norm_shift(x: &Tensor, shift: &Tensor, eps: f64, relu: bool) -> Result<Tensor> {
    if x.rank() == 4 && kernels::fast_cpu(&[x, shift]) {
        let op = ShiftBatchNorm { eps, relu, stats: Arc::new(OnceLock::new()) };
        x.contiguous()?.apply_op2(&shift.contiguous()?, op)
    } else {
        reference_batch_norm_shift(x, shift, eps, relu)
    }
}

/// [`batch_norm_shift`] from candle's operations.
pub fn reference_batch_norm_shift(x: &Tensor, shift: &Tensor, eps: f64, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// 2×2 max-pooling with stride 2 (windows that do not fit dropped) and PyTorch's gradient: the
/// first maximum of each window (row-major) gets the whole gradient. [`kernels::pool`]'s op for
/// f32 on the CPU, else [`reference_max_pool2`].
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    if kernels::fast_cpu(&[x]) {
        pool::max_pool2d_with(x, 2, pool::PoolGradient::FirstMax)
    } else {
        reference_max_pool2(x)
    }
}

/// [`max_pool2`] from candle's reductions: the same values; the gradient of a window with tied
/// maxima goes to each of them in full (ties aside, the same gradient).
pub fn reference_max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let x = x.narrow(2, 0, 2 * ho)?.narrow(3, 0, 2 * wo)?.contiguous()?;
    x.reshape((n, c, ho, 2, wo, 2))?.max_keepdim(5)?.max_keepdim(3)?.reshape((n, c, ho, wo))
}

/// Names the op in errors.
const OP: &str = "batch-statistics batch-norm";

/// Per-channel statistics of one forward pass, kept for the backward pass.
#[derive(Debug)]
struct ChannelStats {
    mean: Vec<f64>,
    /// 1/√(var + eps).
    inv_std: Vec<f64>,
}

/// The fused op of [`batch_norm_shift`]: inputs (x, shift).
struct ShiftBatchNorm {
    eps: f64,
    relu: bool,
    stats: Arc<OnceLock<ChannelStats>>,
}

/// Independent f32 accumulators per sum (so that consecutive additions do not wait for each
/// other and the loop vectorises), combined in f64. The order is fixed, so the bits do not
/// depend on the thread count.
const LANES: usize = 16;

/// Σ f(v) over a slice in [`LANES`] f32 lanes, combined in f64 (the kernels' own lane sum).
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    crate::models::kernels::norm::lane_sum::<LANES>(v, f)
}

/// (Σ d, Σ d·(x − mean)) over one plane, d = g, or g masked by the ReLU (output r ≤ 0) when
/// `relu`; [`LANES`] f32 lanes each, combined in f64.
#[inline(always)]
fn backward_sums(g: &[f32], r: &[f32], x: &[f32], mean: f32, relu: bool) -> (f64, f64) {
    let len = g.len();
    let (r, x) = (&r[..len], &x[..len]);
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let full = len / LANES * LANES;
    for s in (0..full).step_by(LANES) {
        for l in 0..LANES {
            let d = if relu { kernels::relu_backward(g[s + l], r[s + l]) } else { g[s + l] };
            a[l] += d;
            b[l] += d * (x[s + l] - mean);
        }
    }
    let (mut sa, mut sb) = (0f64, 0f64);
    for t in full..len {
        let d = if relu { kernels::relu_backward(g[t], r[t]) } else { g[t] };
        sa += f64::from(d);
        sb += f64::from(d * (x[t] - mean));
    }
    let total = |v: [f32; LANES]| v.iter().map(|&s| f64::from(s)).sum::<f64>();
    (total(a) + sa, total(b) + sb)
}

/// (N, C, H·W) of an N×C×H×W layout.
fn nchw(dims: &[usize]) -> Result<(usize, usize, usize)> {
    let &[n, c, h, w] = dims else { candle_core::bail!("{OP}: expected an N×C×H×W input, got {dims:?}") };
    if n * h * w == 0 {
        candle_core::bail!("{OP}: empty input {dims:?}");
    }
    Ok((n, c, h * w))
}

impl CustomOp2 for ShiftBatchNorm {
    fn name(&self) -> &'static str {
        "batch-stat-shift-batch-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l1.dims())?;
        let x = kernels::cpu_f32(s1, l1, OP, "input")?;
        let shift = kernels::cpu_f32(s2, l2, OP, "shift")?;
        if shift.len() != c {
            candle_core::bail!("{OP}: {c} channels but a shift of {}", shift.len());
        }
        let m = (n * hw) as f64;
        let plane = |i: usize, ch: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
        // Two passes per channel: the mean, then the centred squares (population variance).
        let (mean, inv_std): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mean = (0..n).map(|i| lane_sum(plane(i, ch), |v| v)).sum::<f64>() / m;
                let mf = mean as f32;
                let var = (0..n).map(|i| lane_sum(plane(i, ch), |v| (v - mf) * (v - mf))).sum::<f64>() / m;
                (mean, 1.0 / (var + self.eps).sqrt())
            })
            .unzip();
        // y = x·a + b per channel, a = 1/√(var + eps), b = shift − mean·a.
        let a: Vec<f32> = inv_std.iter().map(|&s| s as f32).collect();
        let b: Vec<f32> = (0..c).map(|ch| (f64::from(shift[ch]) - mean[ch] * f64::from(a[ch])) as f32).collect();
        let relu = self.relu;
        let y = par_zeroed(x.len(), hw, |i, o| {
            let (ac, bc) = (a[i % c], b[i % c]);
            let xi = &x[i * hw..(i + 1) * hw];
            if relu {
                o.iter_mut().zip(xi).for_each(|(o, &v)| *o = kernels::relu(v * ac + bc));
            } else {
                o.iter_mut().zip(xi).for_each(|(o, &v)| *o = v * ac + bc);
            }
        });
        // candle makes one op per call, so the cell is empty here.
        let _ = self.stats.set(ChannelStats { mean, inv_std });
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }

    fn bwd(&self, x: &Tensor, shift: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else { candle_core::bail!("{OP}: backward before forward") };
        let (n, c, hw) = nchw(x.dims())?;
        let m = (n * hw) as f64;
        let relu = self.relu;
        let (gx, gshift) = kernels::with_f32(OP, &[(x, "input"), (grad, "output gradient"), (res, "output")], |s| {
            let (xs, gs, rs) = (s[0], s[1], s[2]);
            let at = |i: usize, ch: usize| (i * c + ch) * hw..(i * c + ch + 1) * hw;
            // Per channel Σ dy and Σ dy·(x − mean), dy the output gradient through the ReLU.
            let sums: Vec<(f64, f64)> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mf = stats.mean[ch] as f32;
                    (0..n).fold((0f64, 0f64), |(sa, sb), i| {
                        let r = at(i, ch);
                        let (a, b) = backward_sums(&gs[r.clone()], &rs[r.clone()], &xs[r], mf, relu);
                        (sa + a, sb + b)
                    })
                })
                .collect();
            // dx = s·(dy − Σdy/m) − s³·(x − mean)·Σdy(x − mean)/m, s = 1/√(var + eps),
            // as k1·dy + k2·x + k3 per channel.
            let coef: Vec<(f32, f32, f32)> = (0..c)
                .map(|ch| {
                    let (sdy, sdyx) = sums[ch];
                    let s = stats.inv_std[ch];
                    let k2 = -s * s * s * sdyx / m;
                    let k3 = -s * sdy / m - k2 * stats.mean[ch];
                    (s as f32, k2 as f32, k3 as f32)
                })
                .collect();
            let gx = x.track_op().then(|| {
                par_zeroed(xs.len(), hw, |i, o| {
                    let (k1, k2, k3) = coef[i % c];
                    let r = i * hw..(i + 1) * hw;
                    let (xp, gp, rp) = (&xs[r.clone()], &gs[r.clone()], &rs[r]);
                    for t in 0..o.len() {
                        let d = if relu { kernels::relu_backward(gp[t], rp[t]) } else { gp[t] };
                        o[t] = k1 * d + k2 * xp[t] + k3;
                    }
                })
            });
            let gshift: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
            Ok((gx, gshift))
        })?;
        let dev = x.device();
        let gx = gx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        let gshift = shift.track_op().then(|| Tensor::from_vec(gshift, shift.shape(), dev)).transpose()?;
        Ok((gx, gshift))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_support::with_reference_ops;
    use candle_core::Var;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        tensor((0..n).map(|_| rng.normal()).collect(), dims, &cpu(), dtype).unwrap()
    }

    fn labels(n: usize, classes: usize) -> Tensor {
        Tensor::from_vec((0..n).map(|i| ((i * 7 + 3) % classes) as u32).collect::<Vec<_>>(), n, &cpu()).unwrap()
    }

    fn flat64(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
    }

    fn ce(logits: &Tensor, y: &Tensor) -> Tensor {
        candle_nn::loss::cross_entropy(logits, y).unwrap()
    }

    /// Autograd against central finite differences, in f64, for `entries` entries of every
    /// parameter (all of a tensor with fewer); returns the largest relative error |autograd − FD|
    /// / |FD| over entries with |FD| > 1e-4 and the largest absolute error over all of them.
    ///
    /// Step h = 1e-5 on O(1) parameters and losses. The central difference's truncation error is
    /// about h²/6·|L'''| ~ 1e-11·|L'''|, its rounding error about ε·|L|/h ~ 1e-16/1e-5 = 1e-11,
    /// so where the loss is smooth the two sides agree to ~1e-10 absolute, ~1e-8 relative on a
    /// gradient of 0.01. Tolerance: |autograd − FD| ≤ 1e-6·|FD| + 1e-9 (100× the rounding error;
    /// the conv biases' gradients are 0 in exact arithmetic, BatchNorm subtracts them, so there
    /// both sides are rounding noise). ReLU and max-pooling are smooth except where a
    /// pre-activation crosses 0 or two entries of a window swap order within ±h; at these sizes
    /// (a few thousand activations of spread O(1)) that is unlikely, and it would show as an error
    /// of the order of the gradient, not as a near miss.
    fn check_fd(specs: &[ParamSpec], params: &[Tensor], entries: usize, loss: impl Fn(&[Tensor]) -> Tensor) -> (f64, f64) {
        let vars: Vec<Var> = params.iter().map(|p| Var::from_tensor(p).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&tensors).backward().unwrap();
        let h = 1e-5;
        let (mut worst_rel, mut worst_abs) = (0f64, 0f64);
        let mut rng = Rng::new(99);
        for (k, spec) in specs.iter().enumerate() {
            let g = flat64(grads.get(&tensors[k]).unwrap_or_else(|| panic!("no gradient for {}", spec.name)));
            let base = flat64(&params[k]);
            let picks: Vec<usize> = if base.len() <= entries { (0..base.len()).collect() } else { (0..entries).map(|_| rng.below(base.len())).collect() };
            for j in picks {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut ps = params.to_vec();
                    ps[k] = Tensor::from_vec(v, spec.shape.as_slice(), &cpu()).unwrap();
                    loss(&ps).to_scalar::<f64>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let err = (g[j] - fd).abs();
                assert!(err <= 1e-6 * fd.abs() + 1e-9, "{}[{j}]: autograd {} vs FD {fd} (error {err:e})", spec.name, g[j]);
                worst_abs = worst_abs.max(err);
                if fd.abs() > 1e-4 {
                    worst_rel = worst_rel.max(err / fd.abs());
                }
            }
        }
        (worst_rel, worst_abs)
    }

    #[test]
    fn conv4_gradients_match_finite_differences() {
        // 3 input channels, 16×16 → 8 → 4 → 2 → 1, 2 hidden channels, D = 2, 4 classes.
        let net = FunctionalConv4::new(3, 16, 16, 2, 4).unwrap();
        assert_eq!(net.feature_dim(), 2);
        let mut params = net.init_body(5, Init::PytorchDefault, &cpu(), DType::F64).unwrap();
        let mut rng = Rng::new(3);
        // Non-zero shifts and head, so that every gradient is non-trivial.
        for k in (2..FunctionalConv4::BODY_PARAMS).step_by(3) {
            params[k] = (randn(&mut rng, &[2], DType::F64) * 0.5).unwrap();
        }
        params.push(randn(&mut rng, &[4, 2], DType::F64));
        params.push(randn(&mut rng, &[4], DType::F64));
        let x = randn(&mut rng, &[3, 3, 16, 16], DType::F64);
        let y = labels(3, 4);
        let (rel, abs) = check_fd(&net.param_specs(), &params, 6, |p| ce(&net.forward(p, &x).unwrap(), &y));
        println!("Conv-4: largest relative error {rel:e}, largest absolute error {abs:e}");
    }

    #[test]
    fn mlp_gradients_match_finite_differences() {
        let net = FunctionalMlp::new(&[12, 7, 6, 3]).unwrap();
        let params = net.init(2, &cpu(), DType::F64).unwrap();
        let mut rng = Rng::new(4);
        let x = randn(&mut rng, &[5, 3, 2, 2], DType::F64);
        let y = labels(5, 3);
        let (rel, abs) = check_fd(&net.param_specs(), &params, 6, |p| ce(&net.forward(p, &x).unwrap(), &y));
        println!("MLP: largest relative error {rel:e}, largest absolute error {abs:e}");
    }

    /// In f32 on the CPU the MLP runs the fused linear kernel; its values and gradients (also
    /// through fast weights θ − α·g, where the weights are computed tensors) agree with the f64
    /// path of candle's own operations.
    #[test]
    fn mlp_fused_f32_path_matches_the_f64_path() {
        let net = FunctionalMlp::new(&[20, 16, 8, 5]).unwrap();
        let mut rng = Rng::new(9);
        let x64 = randn(&mut rng, &[6, 20], DType::F64);
        let y = labels(6, 5);
        let run = |dtype: DType| -> (Vec<f64>, Vec<Vec<f64>>) {
            let theta: Vec<Tensor> = net.init(1, &cpu(), DType::F64).unwrap().iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            let vars: Vec<candle_core::Var> = theta.iter().map(|t| candle_core::Var::from_tensor(t).unwrap()).collect();
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let x = x64.to_dtype(dtype).unwrap();
            let loss = candle_nn::loss::cross_entropy(&net.forward(&tensors, &x).unwrap(), &y).unwrap();
            let fast = sgd_fast_weights(&tensors, &loss.backward().unwrap(), 0.3).unwrap();
            let out = net.forward(&fast, &x).unwrap();
            let query = candle_nn::loss::cross_entropy(&out, &y).unwrap();
            let grads = query.backward().unwrap();
            let g = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect();
            (out.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(), g)
        };
        let ((o32, g32), (o64, g64)) = (run(DType::F32), run(DType::F64));
        let close = |a: &[f64], b: &[f64], what: &str| {
            let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
            assert!(err < 1e-5, "{what}: relative error {err:e}");
        };
        close(&o32, &o64, "output at the fast weights");
        for (k, (a, b)) in g32.iter().zip(&g64).enumerate() {
            close(a, b, &format!("gradient of tensor {k}"));
        }
    }

    /// The BatchNorm by hand on a 2-channel input, both paths, with and without the ReLU.
    #[test]
    fn batch_norm_uses_the_batch_statistics() {
        // N = 2, C = 2, 2×2 planes: channel 0 holds 1..8, channel 1 a spread with negatives.
        let ch0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let ch1 = [-3.0, 0.5, 2.0, 10.0, -1.0, 4.0, 0.0, 0.25];
        let shift = [0.5, -0.25];
        let mut xs = Vec::new();
        for i in 0..2 {
            xs.extend_from_slice(&ch0[4 * i..4 * i + 4]);
            xs.extend_from_slice(&ch1[4 * i..4 * i + 4]);
        }
        let eps = TAML_BN_EPS;
        let expected = |relu: bool| -> Vec<f64> {
            let norm = |vals: &[f64; 8], b: f64| -> Vec<f64> {
                let mean = vals.iter().sum::<f64>() / 8.0;
                let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 8.0;
                vals.iter().map(|v| (v - mean) / (var + eps).sqrt() + b).map(|v| if relu { v.max(0.0) } else { v }).collect()
            };
            let (a, b) = (norm(&ch0, shift[0]), norm(&ch1, shift[1]));
            (0..2).flat_map(|i| a[4 * i..4 * i + 4].iter().chain(&b[4 * i..4 * i + 4]).copied().collect::<Vec<_>>()).collect()
        };
        for dtype in [DType::F32, DType::F64] {
            let x = tensor(xs.clone(), &[2, 2, 2, 2], &cpu(), dtype).unwrap();
            let s = tensor(shift.to_vec(), &[2], &cpu(), dtype).unwrap();
            for relu in [false, true] {
                let got = flat64(&batch_norm_shift(&x, &s, eps, relu).unwrap());
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-14 };
                for (g, e) in got.iter().zip(expected(relu)) {
                    assert!((g - e).abs() <= tol, "{dtype:?} relu {relu}: {g} vs {e}");
                }
            }
        }
    }

    /// The fused f32 path (conv, BatchNorm op, first-max pooling) against candle's operations:
    /// values and every parameter's gradient on a Conv-4 at 28×28 (14 → 7 → 3 → 1, odd sizes).
    #[test]
    fn fast_path_matches_candle_ops() {
        let net = FunctionalConv4::new(1, 28, 28, 8, 5).unwrap();
        let mut params = net.init(7, Init::PytorchDefault, &cpu(), DType::F32).unwrap();
        let mut rng = Rng::new(8);
        let n = params.len();
        params[n - 2] = randn(&mut rng, &[5, net.feature_dim()], DType::F32);
        let x = randn(&mut rng, &[6, 1, 28, 28], DType::F32);
        let y = labels(6, 5);
        let run = || {
            let vars: Vec<Var> = params.iter().map(|p| Var::from_tensor(p).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let logits = net.forward(&ts, &x).unwrap();
            let grads = ce(&logits, &y).backward().unwrap();
            let mut out = vec![flat64(&logits)];
            out.extend(ts.iter().map(|t| flat64(grads.get(t).unwrap())));
            out
        };
        let fast = run();
        let reference = with_reference_ops(run);
        let names: Vec<String> = std::iter::once("logits".to_string()).chain(net.param_specs().into_iter().map(|s| s.name)).collect();
        for ((a, b), name) in fast.iter().zip(&reference).zip(names) {
            let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let d = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
            // The conv biases' gradients are 0 in exact arithmetic and rounding noise (~1e-6 here)
            // on both sides, against gradients of order 1 for the other parameters: compare them
            // in absolute terms (with the scale's floor of 1e-3, d < 1e-2 is |difference| < 1e-5).
            let tol = if name.ends_with("conv.bias") { 1e-2 } else { 1e-4 };
            assert!(d < tol, "{name}: relative difference {d:e}");
            println!("{name}: relative difference {d:e} (largest |value| {:e})", b.iter().fold(0f64, |m, v| m.max(v.abs())));
        }
    }

    #[test]
    fn zero_head_gives_zero_logits_and_a_uniform_softmax() {
        let net = FunctionalConv4::new(1, 14, 14, 4, 5).unwrap();
        let params = net.init(1, Init::TruncatedNormal { std: 0.02 }, &cpu(), DType::F32).unwrap();
        let x = randn(&mut Rng::new(2), &[3, 1, 14, 14], DType::F32);
        let logits = net.forward(&params, &x).unwrap();
        assert_eq!(logits.dims(), &[3, 5]);
        assert!(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0));
        let p = crate::models::softmax_last(&logits).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(p.iter().all(|&v| v == 1.0 / 5.0), "{p:?}");
        let loss = ce(&logits, &labels(3, 5)).to_scalar::<f32>().unwrap();
        assert!((f64::from(loss) - 5f64.ln()).abs() < 1e-6);
    }

    /// One inner step from a zero head moves only the head (the body's gradients are exactly 0:
    /// nothing flows back through a zero weight), and lowers the loss on the batch it was taken
    /// on; the loss at θ' has a gradient with respect to θ; a second step, now through the
    /// adapted head, lowers the loss again.
    #[test]
    fn fast_weight_steps_lower_the_loss() {
        let net = FunctionalConv4::new(1, 16, 16, 8, 4).unwrap();
        let params = net.init(3, Init::PytorchDefault, &cpu(), DType::F32).unwrap();
        let mut rng = Rng::new(6);
        let x = randn(&mut rng, &[20, 1, 16, 16], DType::F32);
        let y = labels(20, 4);
        let vars: Vec<Var> = params.iter().map(|p| Var::from_tensor(p).unwrap()).collect();
        let theta: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let l0 = ce(&net.forward(&theta, &x).unwrap(), &y);
        let grads = l0.backward().unwrap();
        for (t, s) in theta.iter().zip(net.param_specs()).take(FunctionalConv4::BODY_PARAMS) {
            let g = flat64(grads.get(t).unwrap());
            assert!(g.iter().all(|&v| v == 0.0), "{}: non-zero gradient through a zero head", s.name);
        }
        let alpha = 0.1;
        let plain: Vec<Tensor> = theta.iter().map(Tensor::detach).collect();
        let fast = sgd_fast_weights(&plain, &grads, alpha).unwrap();
        // The detached copies are other tensors: their gradients are looked up by the originals.
        assert!(fast.iter().zip(&plain).all(|(f, p)| flat64(f) == flat64(p)));
        let fast = sgd_fast_weights(&theta, &grads, alpha).unwrap();
        let l1 = ce(&net.forward(&fast, &x).unwrap(), &y);
        let (l0v, l1v) = (l0.to_scalar::<f32>().unwrap(), l1.to_scalar::<f32>().unwrap());
        assert!(l1v < l0v, "loss {l0v} → {l1v}");
        // The outer gradient reaches θ through θ' (first order: ∂θ'/∂θ = I).
        let outer = l1.backward().unwrap();
        let g_body = flat64(outer.get(&theta[0]).unwrap());
        assert!(g_body.iter().any(|&v| v != 0.0));
        // A second inner step: candle keeps the gradients of variables only, so the step from θ'
        // starts from θ' as new variables.
        let vars2: Vec<Var> = fast.iter().map(|t| Var::from_tensor(&t.detach()).unwrap()).collect();
        let theta2: Vec<Tensor> = vars2.iter().map(|v| v.as_tensor().clone()).collect();
        let grads2 = ce(&net.forward(&theta2, &x).unwrap(), &y).backward().unwrap();
        assert!(flat64(grads2.get(&theta2[0]).unwrap()).iter().any(|&v| v != 0.0));
        let fast2 = sgd_fast_weights(&theta2, &grads2, alpha).unwrap();
        let l2v = ce(&net.forward(&fast2, &x).unwrap(), &y).to_scalar::<f32>().unwrap();
        assert!(l2v < l1v, "loss {l1v} → {l2v}");
    }

    #[test]
    fn shapes_specs_and_init() {
        for (side, d) in [(84usize, 5 * 5), (32, 2 * 2), (28, 1), (14, 1)] {
            let net = FunctionalConv4::new(3, side, side, 32, 5).unwrap();
            assert_eq!(net.feature_dim(), 32 * d, "{side}");
            let p = net.init(0, Init::PytorchDefault, &cpu(), DType::F32).unwrap();
            assert_eq!(p.len(), 14);
            let x = Tensor::zeros((2, 3, side, side), DType::F32, &cpu()).unwrap();
            assert_eq!(net.features(&p[..12], &x).unwrap().dims(), &[2, 32 * d]);
        }
        let net = FunctionalConv4::new(3, 32, 32, 32, 5).unwrap();
        let specs = net.param_specs();
        assert_eq!(specs[0], ParamSpec::new("block1.conv.weight", &[32, 3, 3, 3]));
        assert_eq!(specs[3], ParamSpec::new("block2.conv.weight", &[32, 32, 3, 3]));
        assert_eq!(specs[11], ParamSpec::new("block4.bn.shift", &[32]));
        assert_eq!(specs[12], ParamSpec::new("head.weight", &[5, 128]));
        // Reproducible, seed-dependent, within the bounds of the rule.
        let a = net.init_body(4, Init::PytorchDefault, &cpu(), DType::F64).unwrap();
        let b = net.init_body(4, Init::PytorchDefault, &cpu(), DType::F64).unwrap();
        let c = net.init_body(5, Init::PytorchDefault, &cpu(), DType::F64).unwrap();
        assert_eq!(flat64(&a[3]), flat64(&b[3]));
        assert_ne!(flat64(&a[3]), flat64(&c[3]));
        let bound = 1.0 / (32.0f64 * 9.0).sqrt();
        for k in [3, 4] {
            let v = flat64(&a[k]);
            assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|x| x.abs() > bound / 2.0), "{}", specs[k].name);
        }
        assert!(flat64(&a[5]).iter().all(|&v| v == 0.0));
        let t = net.init_body(4, Init::TruncatedNormal { std: 0.02 }, &cpu(), DType::F64).unwrap();
        let w = flat64(&t[3]);
        assert!(w.iter().all(|x| x.abs() <= 0.04));
        let sd = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt();
        // A normal truncated at 2σ has standard deviation 0.880σ.
        assert!((sd / 0.02 - 0.88).abs() < 0.03, "{sd}");
        assert!(flat64(&t[4]).iter().all(|&v| v == 0.0));
        // The MLP.
        let mlp = FunctionalMlp::new(&[784, 256, 10]).unwrap();
        let p = mlp.init(1, &cpu(), DType::F32).unwrap();
        assert_eq!(p.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>(), vec![vec![256, 784], vec![256], vec![10, 256], vec![10]]);
        let out = mlp.forward(&p, &Tensor::zeros((3, 1, 28, 28), DType::F32, &cpu()).unwrap()).unwrap();
        assert_eq!(out.dims(), &[3, 10]);
        assert!(mlp.forward(&p[..2], &Tensor::zeros((3, 784), DType::F32, &cpu()).unwrap()).is_err());
        assert!(FunctionalMlp::new(&[4]).is_err());
    }
}
