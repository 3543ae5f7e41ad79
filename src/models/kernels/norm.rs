//! Fused training-mode BatchNorm (optionally followed by ReLU) for N×C×H×W tensors on the CPU.
//!
//! candle-nn's `BatchNorm` builds its training-mode forward pass from about fifteen tensor
//! operations (a transposed copy, means, broadcasts, a transpose back) and autograd adds two or
//! three more per operation backward; on the ResNet those passes over the largest activations cost
//! more than the convolutions. This op computes the per-channel statistics in one pass, normalises
//! (and applies the ReLU) in a second, and backward needs two more, with the closed-form BatchNorm
//! gradient. Statistics are summed in 32 f32 lanes per plane and combined in f64.
//!
//! [`BatchNorm2d`] creates its variables through `candle_nn::batch_norm` (same names, shapes and
//! initialisation: `weight`, `bias`, `running_mean`, `running_var`; PyTorch's eps 1e-5 and
//! momentum 0.1) and updates the running statistics exactly as candle-nn does: biased batch
//! variance for normalising, the unbiased one (×M/(M−1), M = N·H·W) for the running variance.
//! Evaluation mode, other devices and other dtypes use candle-nn's own layer.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, ModuleT, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, VarBuilder};
use rayon::prelude::*;

use super::{cpu_f32, with_f32};

/// Names this module's operations in errors.
const OP: &str = "fused batch-norm";

/// Per-channel batch statistics of one forward pass.
#[derive(Debug)]
pub(super) struct Stats {
    mean: Vec<f64>,
    /// Biased variance.
    var: Vec<f64>,
}

/// Independent f32 accumulators per sum: four AVX vectors, so that consecutive additions do not
/// wait for each other (one 8-lane accumulator ran at the latency of one add per 8 elements).
const LANES: usize = 32;

/// Σ f(v) over a slice in `N` independent f32 lanes (vectorisable; [`LANES`] here), combined in
/// f64 in a fixed order, so the bits do not depend on the thread count.
#[inline(always)]
pub(crate) fn lane_sum<const N: usize>(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; N];
    let chunks = v.chunks_exact(N);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + tail.iter().map(|&x| f64::from(f(x))).sum::<f64>()
}

/// `if r <= 0 { 0 } else { g }` (the gradient through a ReLU whose output is `r`) as a bit
/// mask, so that loops using it vectorise (as a branch they did not, at the baseline x86-64
/// instruction set).
#[inline(always)]
pub(super) fn relu_grad(g: f32, r: f32) -> f32 {
    f32::from_bits(g.to_bits() & u32::from(r <= 0.0).wrapping_sub(1))
}

avx2_variant! {
    /// (Σ dy_i, Σ dy_i·(x_i − mean)) in one pass, with dy_i = g_i masked by the ReLU when the
    /// op applied one (zero where the output r_i ≤ 0); [`LANES`] f32 lanes each, combined in f64.
    fn backward_sums(g: &[f32], r: &[f32], x: &[f32], mean: f32, relu: bool) -> (f64, f64) {
        if relu {
            backward_sums_masked::<true>(g, r, x, mean)
        } else {
            backward_sums_masked::<false>(g, r, x, mean)
        }
    }
}

#[inline(always)]
fn backward_sums_masked<const RELU: bool>(g: &[f32], r: &[f32], x: &[f32], mean: f32) -> (f64, f64) {
    let len = g.len();
    let (r, x) = (&r[..len], &x[..len]);
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let chunks = g.chunks_exact(LANES).zip(r.chunks_exact(LANES)).zip(x.chunks_exact(LANES));
    for ((gc, rc), xc) in chunks {
        // Fixed-size views: no bounds checks, and the lane loop unrolls into vector operations.
        let (gc, rc, xc): (&[f32; LANES], &[f32; LANES], &[f32; LANES]) = (gc.try_into().expect("chunk of LANES"), rc.try_into().expect("chunk of LANES"), xc.try_into().expect("chunk of LANES"));
        for l in 0..LANES {
            let d = if RELU { relu_grad(gc[l], rc[l]) } else { gc[l] };
            a[l] += d;
            b[l] += d * (xc[l] - mean);
        }
    }
    let (mut sa, mut sb) = (0f64, 0f64);
    for t in len / LANES * LANES..len {
        let d = if RELU { relu_grad(g[t], r[t]) } else { g[t] };
        sa += f64::from(d);
        sb += f64::from(d * (x[t] - mean));
    }
    let total = |v: [f32; LANES]| v.iter().map(|&s| f64::from(s)).sum::<f64>();
    (total(a) + sa, total(b) + sb)
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    pub(super) fn of(dims: &[usize]) -> candle_core::Result<Dims> {
        let &[n, c, h, w] = dims else { candle_core::bail!("batch-norm: expected an N×C×H×W input, got {dims:?}") };
        Ok(Dims { n, c, hw: h * w })
    }

    /// Elements per channel, N·H·W.
    fn m(&self) -> usize {
        self.n * self.hw
    }

    /// The H×W planes of channel `ch`.
    fn planes<'a>(&self, v: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (c, hw) = (self.c, self.hw);
        (0..self.n).map(move |i| &v[(i * c + ch) * hw..(i * c + ch + 1) * hw])
    }
}

avx2_variant! {
    /// Σ v over one plane ([`lane_sum`]).
    fn plane_sum(p: &[f32]) -> f64 {
        lane_sum::<LANES>(p, |v| v)
    }
}

avx2_variant! {
    /// Σ (v − mean)² over one plane ([`lane_sum`]).
    fn plane_sq_dev(p: &[f32], mean: f32) -> f64 {
        lane_sum::<LANES>(p, |v| (v - mean) * (v - mean))
    }
}

avx2_variant! {
    /// out = x·a + c, then ReLU if `relu`, over one plane.
    fn affine(out: &mut [f32], x: &[f32], a: f32, c: f32, relu: bool) {
        if relu {
            for (o, &v) in out.iter_mut().zip(x) {
                let y = v * a + c;
                *o = if y < 0.0 { 0.0 } else { y };
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * a + c;
            }
        }
    }
}

/// Per-channel mean and biased variance of an N×C×H×W input (two passes: mean, then the
/// centred squares).
pub(super) fn batch_stats(d: Dims, x: &[f32]) -> Stats {
    let m = d.m().max(1) as f64;
    let (mean, var): (Vec<f64>, Vec<f64>) = (0..d.c)
        .into_par_iter()
        .map(|ch| {
            let mean = d.planes(x, ch).map(plane_sum).sum::<f64>() / m;
            let mf = mean as f32;
            let var = d.planes(x, ch).map(|p| plane_sq_dev(p, mf)).sum::<f64>() / m;
            (mean, var)
        })
        .unzip();
    Stats { mean, var }
}

/// y = (x − mean)/√(var + eps)·w + b per channel, then ReLU if `relu`.
pub(super) fn normalise(d: Dims, x: &[f32], w: &[f32], b: &[f32], eps: f64, relu: bool, stats: &Stats) -> Vec<f32> {
    // y = x·a + c per channel, a = w/√(var+eps), c = b − mean·a.
    let scale: Vec<f32> = (0..d.c).map(|ch| (f64::from(w[ch]) / (stats.var[ch] + eps).sqrt()) as f32).collect();
    let shift: Vec<f32> = (0..d.c).map(|ch| (f64::from(b[ch]) - stats.mean[ch] * f64::from(scale[ch])) as f32).collect();
    super::alloc::par_zeroed(x.len(), d.hw, |i, o| {
        let xi = &x[i * d.hw..(i + 1) * d.hw];
        affine(o, xi, scale[i % d.c], shift[i % d.c], relu)
    })
}

/// The backward pass of training-mode BatchNorm (and ReLU) up to its input gradient: the weight
/// and bias gradients, and per channel (k1, k2, k3) with dx = k1·dy + k2·x + k3, where dy is the
/// output gradient `g` masked by the ReLU (output `r` ≤ 0) when `relu`.
pub(super) struct BnGrads {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) coef: Vec<(f32, f32, f32)>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bn_grads(d: Dims, stats: &Stats, eps: f64, w: &[f32], g: &[f32], r: &[f32], x: &[f32], relu: bool) -> BnGrads {
    let m = d.m().max(1) as f64;
    // Per channel: Σ dy and Σ dy·(x − mean).
    let sums: Vec<(f64, f64)> = (0..d.c)
        .into_par_iter()
        .map(|ch| {
            let mf = stats.mean[ch] as f32;
            let mut sdy = 0f64;
            let mut sdyx = 0f64;
            for ((gp, rp), xp) in d.planes(g, ch).zip(d.planes(r, ch)).zip(d.planes(x, ch)) {
                let (a, b) = backward_sums(gp, rp, xp, mf, relu);
                sdy += a;
                sdyx += b;
            }
            (sdy, sdyx)
        })
        .collect();
    let invstd: Vec<f64> = stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    // The closed form of the BatchNorm gradient.
    let coef = (0..d.c)
        .map(|ch| {
            let (sdy, sdyx) = sums[ch];
            let k1 = f64::from(w[ch]) * invstd[ch];
            let k2 = -k1 * invstd[ch] * invstd[ch] * sdyx / m;
            let k3 = -k1 * sdy / m - k2 * stats.mean[ch];
            (k1 as f32, k2 as f32, k3 as f32)
        })
        .collect();
    BnGrads { weight: (0..d.c).map(|ch| (sums[ch].1 * invstd[ch]) as f32).collect(), bias: sums.iter().map(|s| s.0 as f32).collect(), coef }
}

avx2_variant! {
    /// dx = k1·dy + k2·x + k3 for the H×W plane of one channel (dy = `g` masked by the ReLU
    /// when `relu`), written to `out`; `k` = (k1, k2, k3).
    pub(super) fn bn_input_grad(
        out: &mut [f32],
        x: &[f32],
        g: &[f32],
        r: &[f32],
        k: (f32, f32, f32),
        relu: bool,
    ) {
        let (k1, k2, k3) = k;
        // Equal lengths up front so that the loops below vectorise.
        let len = out.len();
        let (x, g, r) = (&x[..len], &g[..len], &r[..len]);
        if relu {
            for t in 0..len {
                out[t] = k1 * relu_grad(g[t], r[t]) + k2 * x[t] + k3;
            }
        } else {
            for t in 0..len {
                out[t] = k1 * g[t] + k2 * x[t] + k3;
            }
        }
    }
}

/// Training-mode BatchNorm (and ReLU): inputs x, weight, bias.
struct BnOp {
    eps: f64,
    relu: bool,
    /// Written by the forward pass; read by the layer (running statistics) and by backward.
    stats: Arc<OnceLock<Stats>>,
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "fused-batch-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.dims())?;
        let x = cpu_f32(s1, l1, OP, "input")?;
        let w = cpu_f32(s2, l2, OP, "weight")?;
        let b = cpu_f32(s3, l3, OP, "bias")?;
        if w.len() != d.c || b.len() != d.c {
            candle_core::bail!("fused batch-norm: {} channels but weight/bias of {}/{}", d.c, w.len(), b.len());
        }
        let stats = batch_stats(d, x);
        let out = normalise(d, x, w, b, self.eps, self.relu, &stats);
        // A second forward with the same op instance cannot happen (candle makes one per call).
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(out), Shape::from(l1.dims())))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else { candle_core::bail!("fused batch-norm: backward before forward") };
        let d = Dims::of(x.dims())?;
        let dev = x.device();
        let operands = [(x, "input"), (w, "weight"), (grad, "output gradient"), (res, "output")];
        let (grads, gx) = with_f32(OP, &operands, |s| {
            let (xs, ws, gs, rs) = (s[0], s[1], s[2], s[3]);
            let grads = bn_grads(d, stats, self.eps, ws, gs, rs, xs, self.relu);
            let gx = if x.track_op() {
                let gx = super::alloc::par_zeroed(xs.len(), d.hw, |i, o| {
                    let r = i * d.hw..(i + 1) * d.hw;
                    let (xp, gp, rp) = (&xs[r.clone()], &gs[r.clone()], &rs[r]);
                    bn_input_grad(o, xp, gp, rp, grads.coef[i % d.c], self.relu);
                });
                Some(Tensor::from_vec(gx, x.shape(), dev)?)
            } else {
                None
            };
            Ok((grads, gx))
        })?;
        let (gw, gb) = (grads.weight, grads.bias);
        let gw = w.track_op().then(|| Tensor::from_vec(gw, w.shape(), dev)).transpose()?;
        let gb = b.track_op().then(|| Tensor::from_vec(gb, b.shape(), dev)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// BatchNorm over the channels of N×C×H×W inputs, with candle-nn's variables.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    bn: candle_nn::BatchNorm,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm2d {
    /// `channels` features, PyTorch's defaults (eps 1e-5, momentum 0.1), variables `weight`,
    /// `bias`, `running_mean`, `running_var` under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let bn = candle_nn::batch_norm(channels, BatchNormConfig::default(), vb)?;
        // The running statistics are variables of the VarMap, so these share their storage.
        let running_mean = Var::from_tensor(bn.running_mean())?;
        let running_var = Var::from_tensor(bn.running_var())?;
        Ok(BatchNorm2d { bn, running_mean, running_var })
    }

    /// Batch statistics (and a running-statistics update) when `train`, running statistics
    /// otherwise; then a ReLU if `relu`.
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let (w, b, eps) = self.affine()?;
        let fast = super::fast_cpu(&[x, w, b]) && x.rank() == 4;
        if !(train && fast) {
            let y = self.bn.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let stats = Arc::new(OnceLock::new());
        let op = BnOp { eps, relu, stats: stats.clone() };
        let y = x.contiguous()?.apply_op3(w, b, op)?;
        let Some(s) = stats.get() else { candle_core::bail!("fused batch-norm: the forward pass left no statistics") };
        self.update_running(s, Dims::of(x.dims())?)?;
        Ok(y)
    }

    /// The weight and bias (every layer made by [`BatchNorm2d::new`] has them), and eps.
    pub(super) fn affine(&self) -> candle_core::Result<(&Tensor, &Tensor, f64)> {
        let Some((w, b)) = self.bn.weight_and_bias() else { candle_core::bail!("batch-norm without affine parameters is not supported") };
        Ok((w, b, self.bn.eps()))
    }

    /// Fold one training batch's statistics into the running statistics.
    pub(super) fn update_running(&self, s: &Stats, d: Dims) -> candle_core::Result<()> {
        // As candle-nn: running ← running·(1 − momentum) + stat·momentum, with the unbiased
        // variance (×M/(M−1)) for the running variance.
        let mom = self.bn.momentum();
        let m = d.m() as f64;
        let update = |var: &Var, stat: &[f64], factor: f64| -> candle_core::Result<()> {
            let old = var.as_tensor().to_vec1::<f32>()?;
            let new: Vec<f32> = old.iter().zip(stat).map(|(&r, &s)| r * (1.0 - mom) as f32 + (s * factor) as f32).collect();
            var.set(&Tensor::from_vec(new, old.len(), var.device())?)
        };
        update(&self.running_mean, &s.mean, mom)?;
        update(&self.running_var, &s.var, mom * m / (m - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn relu_grad_is_the_branch_it_replaces() {
        let branch = |g: f32, r: f32| if r <= 0.0 { 0.0 } else { g };
        let values = [1.5f32, -2.0, 0.0, -0.0, f32::NAN, f32::INFINITY, f32::MIN_POSITIVE];
        for &g in &values {
            for &r in &values {
                let (a, b) = (relu_grad(g, r), branch(g, r));
                assert_eq!(a.to_bits(), b.to_bits(), "g {g} r {r}: {a} vs {b}");
            }
        }
    }

    /// Values, gradients and running statistics against candle-nn's BatchNorm (+ candle's ReLU).
    #[test]
    fn matches_candle_batch_norm() {
        for &(n, c, h, w) in &[(5usize, 3usize, 7usize, 6usize), (2, 8, 4, 4), (1, 2, 3, 5)] {
            for relu in [false, true] {
                let mut rng = Rng::new((n * 100 + c * 10 + h) as u64);
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
                let ours = BatchNorm2d::new(c, vb.pp("a")).unwrap();
                let theirs = candle_nn::batch_norm(c, BatchNormConfig::default(), vb.pp("b")).unwrap();
                // Non-trivial affine parameters, the same in both.
                {
                    let data = vm.data().lock().unwrap();
                    for name in ["weight", "bias"] {
                        let v: Vec<f32> = (0..c).map(|_| rng.normal() as f32).collect();
                        let t = Tensor::from_vec(v, c, &Device::Cpu).unwrap();
                        data[&format!("a.{name}")].set(&t).unwrap();
                        data[&format!("b.{name}")].set(&t).unwrap();
                    }
                }
                let xv: Vec<f32> = (0..n * c * h * w).map(|_| (rng.normal() * 2.0 + 0.5) as f32).collect();
                let x = Var::from_vec(xv, (n, c, h, w), &Device::Cpu).unwrap();
                let r: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal() as f32).collect();
                let r = Tensor::from_vec(r, (n, c, h, w), &Device::Cpu).unwrap();
                for step in 0..2 {
                    let ya = ours.forward(x.as_tensor(), true, relu).unwrap();
                    let yb = theirs.forward_t(x.as_tensor(), true).unwrap();
                    let yb = if relu { yb.relu().unwrap() } else { yb };
                    let what = format!("{n}x{c}x{h}x{w} relu {relu} step {step}");
                    assert!(max_rel_diff(&ya, &yb) < 1e-5, "{what}: values");
                    let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let var = |name: &str| vm.data().lock().unwrap()[name].as_tensor().clone();
                    let pairs = [(x.as_tensor().clone(), x.as_tensor().clone()), (var("a.weight"), var("b.weight")), (var("a.bias"), var("b.bias"))];
                    for (i, (ta, tb)) in pairs.iter().enumerate() {
                        let d = max_rel_diff(ga.get(ta).unwrap(), gb.get(tb).unwrap());
                        assert!(d < 1e-4, "{what}: gradient {i}: {d}");
                    }
                    for stat in ["running_mean", "running_var"] {
                        let data = vm.data().lock().unwrap();
                        let d = max_rel_diff(data[&format!("a.{stat}")].as_tensor(), data[&format!("b.{stat}")].as_tensor());
                        assert!(d < 1e-5, "{what}: {stat}");
                    }
                }
                // Evaluation mode is candle-nn's own computation on the same running statistics.
                let ya = ours.forward(x.as_tensor(), false, relu).unwrap();
                let yb = theirs.forward_t(x.as_tensor(), false).unwrap();
                let yb = if relu { yb.relu().unwrap() } else { yb };
                assert!(max_rel_diff(&ya, &yb) < 1e-5);
            }
        }
    }
}
