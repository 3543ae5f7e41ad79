//! Fused CPU kernels for the small element-wise and row-wise operations of the models.
//!
//! Built from candle's primitives, a LayerNorm is nine tensor operations forward and about twenty
//! backward, a softmax five and a dozen, an exact GELU's derivative eight, and a residual
//! `relu(a + b)` five; each is a full pass over memory with a fresh buffer, and on the tiny ViT
//! they took most of the step. Each function here is one custom op with one forward pass and one
//! backward pass over its rows (rayon-parallel), computing the same function: LayerNorm over the
//! last dimension with the biased variance, softmax over the last dimension, multi-head
//! self-attention between the projections (per-sample GEMMs on strided head views, no per-head
//! copies), GELU with erf (the same derivative formula as candle's backward), and `relu(a + b)`
//! whose gradient goes to both inputs. GELU's erf and exp are branch-free polynomial approximations that vectorise (errors
//! below 2.5·10⁻⁷ absolute and 2·10⁻⁷ relative, tested), not libm's scalar calls. They run for
//! f32 tensors on the CPU; other devices and dtypes take the primitive formulation, so results
//! agree to floating-point tolerance everywhere (the tests compare both).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::alloc::par_zeroed;
use super::matmul::{matmul, matmul_rows, Mat};
use super::{cpu_f32, with_f32};
use gemm::Parallelism;

/// Names this module's operations in errors.
const OP: &str = "fused op";

/// Whether every tensor is f32 on the CPU.
fn fast(ts: &[&Tensor]) -> bool {
    super::fast_cpu(ts)
}

/// Elements per rayon task: big enough that the task overhead does not matter, small enough
/// to balance a few tasks per thread. A multiple of `row`.
fn task_len(total: usize, row: usize) -> usize {
    rows_per_task(total, row, rayon::current_num_threads()) * row.max(1)
}

/// [`task_len`] for tasks whose partial sums are added up afterwards (LayerNorm's weight and bias
/// gradients): the split, and so the order of the additions and the bits of the result, must not
/// depend on the thread count, or a cell computed with two threads would differ from the same
/// cell (same key) computed with one. It is the split that one thread used before (which computed
/// the committed reports); several threads still get four tasks.
fn reduction_task_len(total: usize, row: usize) -> usize {
    rows_per_task(total, row, 1) * row.max(1)
}

/// Rows per task: about four tasks per thread, at least 16 Ki elements each.
fn rows_per_task(total: usize, row: usize, threads: usize) -> usize {
    let rows = total / row.max(1);
    (rows / (threads * 4)).max(1).max(16_384 / row.max(1))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension.

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/√(var + eps) of one row.
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, OP, "input")?;
        let w = cpu_f32(s2, l2, OP, "weight")?;
        let b = cpu_f32(s3, l3, OP, "bias")?;
        let d = w.len();
        if d == 0 || b.len() != d || l1.dims().last() != Some(&d) {
            candle_core::bail!("layer norm: last dimension {:?} vs weight {d} and bias {}", l1.dims().last(), b.len());
        }
        let mut out = vec![0f32; x.len()];
        let t = task_len(x.len(), d);
        out.par_chunks_mut(t).zip(x.par_chunks(t)).for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                let (mean, inv) = row_stats(xrow, self.eps);
                for (((o, &v), &wv), &bv) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                    *o = (v - mean) * inv * wv + bv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let eps = self.eps;
        let operands = [(x, "input"), (w, "weight"), (grad, "output gradient")];
        let (gx, gw, gb) = with_f32(OP, &operands, |s| {
            let (xs, ws, gs) = (s[0], s[1], s[2]);
            let mut gx = vec![0f32; xs.len()];
            let t = reduction_task_len(xs.len(), d);
            let partials: Vec<(Vec<f32>, Vec<f32>)> = gx
                .par_chunks_mut(t)
                .zip(xs.par_chunks(t).zip(gs.par_chunks(t)))
                .map(|(gxc, (xc, gc))| {
                    let mut pw = vec![0f32; d];
                    let mut pb = vec![0f32; d];
                    for ((gxr, xr), gr) in gxc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
                        let (mean, inv) = row_stats(xr, eps);
                        // x̂ = (x − mean)·inv, g = dy·w; dx = inv·(g − mean(g) − x̂·mean(g·x̂)).
                        let mut sg = 0f32;
                        let mut sgx = 0f32;
                        for (((&v, &dy), &wv), (pw, pb)) in xr.iter().zip(gr).zip(ws).zip(pw.iter_mut().zip(pb.iter_mut())) {
                            let xh = (v - mean) * inv;
                            let g = dy * wv;
                            sg += g;
                            sgx += g * xh;
                            *pw += dy * xh;
                            *pb += dy;
                        }
                        let (mg, mgx) = (sg / d as f32, sgx / d as f32);
                        for ((o, &v), (&dy, &wv)) in gxr.iter_mut().zip(xr).zip(gr.iter().zip(ws)) {
                            let xh = (v - mean) * inv;
                            *o = inv * (dy * wv - mg - xh * mgx);
                        }
                    }
                    (pw, pb)
                })
                .collect();
            let mut gw = vec![0f32; d];
            let mut gb = vec![0f32; d];
            for (pw, pb) in &partials {
                gw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
                gb.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
            }
            Ok((gx, gw, gb))
        })?;
        let dev = x.device();
        Ok((
            x.track_op().then(|| Tensor::from_vec(gx, x.shape(), dev)).transpose()?,
            w.track_op().then(|| Tensor::from_vec(gw, w.shape(), dev)).transpose()?,
            b.track_op().then(|| Tensor::from_vec(gb, b.shape(), dev)).transpose()?,
        ))
    }
}

/// LayerNorm of `x` over its last dimension: (x − mean)/√(var + eps)·weight + bias, with the
/// biased variance. `None` when the fused op does not apply (not f32 on the CPU).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !fast(&[x, weight, bias]) {
        return Ok(None);
    }
    let op = LayerNormOp { eps: eps as f32 };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct SoftmaxOp;

/// Softmax of one row, in place: max-shifted, libm's `exp`, then divided by the sum.
#[inline]
fn softmax_row(row: &mut [f32]) {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut s = 0f32;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    row.iter_mut().for_each(|v| *v /= s);
}

/// Gradient through one softmax row, in place: `g` (the output's gradient) becomes the input's,
/// y ⊙ (g − ⟨y, g⟩), where `y` is the softmax output.
#[inline]
fn softmax_row_backward(g: &mut [f32], y: &[f32]) {
    let dot: f32 = y.iter().zip(g.iter()).map(|(y, g)| y * g).sum();
    for (g, &y) in g.iter_mut().zip(y) {
        *g = y * (*g - dot);
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, OP, "input")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let t = task_len(x.len(), d);
        out.par_chunks_mut(t).zip(x.par_chunks(t)).for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                orow.copy_from_slice(xrow);
                softmax_row(orow);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = arg.dims().last().copied().unwrap_or(1).max(1);
        let operands = [(res, "output"), (grad, "output gradient")];
        let gx = with_f32(OP, &operands, |s| {
            let (ys, gs) = (s[0], s[1]);
            let mut gx = vec![0f32; ys.len()];
            let t = task_len(ys.len(), d);
            gx.par_chunks_mut(t).zip(ys.par_chunks(t).zip(gs.par_chunks(t))).for_each(|(o, (yc, gc))| {
                for ((orow, yr), gr) in o.chunks_exact_mut(d).zip(yc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
                    orow.copy_from_slice(gr);
                    softmax_row_backward(orow, yr);
                }
            });
            Ok(gx)
        })?;
        Ok(Some(Tensor::from_vec(gx, arg.shape(), arg.device())?))
    }
}

/// Softmax over the last dimension (max-shifted). `None` when the fused op does not apply.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fast(&[x]) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1(SoftmaxOp).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Multi-head self-attention.

/// softmax(q·kᵀ·scale)·v for every head, from the packed projection `qkv` (N×T×3D: q, k and v
/// side by side, head h in columns h·dh..(h+1)·dh of each) to N×T×D (heads side by side). This
/// is the computation between a transformer's two attention projections. Built from candle's
/// operations it needs copies into per-head layouts (four forward; backward, each head's slice
/// grows back to the full width through zero-padding and concatenation). Here each head's
/// matrices are read in place through strides. The steps are the same as the primitive formulation's (the same
/// products, scaling after the product, [`softmax_row`]), so results agree with it.
struct AttentionOp {
    heads: usize,
    scale: f32,
    /// The attention matrices of the forward pass (N×H×T×T), for the backward pass.
    probs: OnceLock<Vec<f32>>,
}

impl AttentionOp {
    /// (T, D, head width) of a `qkv` of dimensions `dims`.
    fn shape(&self, dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
        match *dims {
            [_, t, three_d] if three_d > 0 && three_d % (3 * self.heads) == 0 && t > 0 => Ok((t, three_d / 3, three_d / 3 / self.heads)),
            _ => candle_core::bail!("{OP}: attention needs q, k, v packed as N×T×3D with D divisible by {} heads, got {dims:?}", self.heads),
        }
    }

    /// One head's T×T attention matrix of one sample (`qkv`: T×3D), into `p`.
    fn probabilities(&self, p: &mut [f32], qkv: &[f32], t: usize, d: usize, h: usize) {
        let dh = d / self.heads;
        let q = Mat::strided(&qkv[h * dh..], t, dh, 3 * d, 1);
        let kt = Mat::strided(&qkv[d + h * dh..], dh, t, 1, 3 * d);
        matmul(p, q, kt, false, Parallelism::None);
        for row in p.chunks_exact_mut(t) {
            row.iter_mut().for_each(|v| *v *= self.scale);
            softmax_row(row);
        }
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, OP, "qkv")?;
        let (t, d, dh) = self.shape(l.dims())?;
        let n = l.dims()[0];
        let mut out = vec![0f32; n * t * d];
        let mut probs = vec![0f32; n * self.heads * t * t];
        out.par_chunks_mut(t * d).zip(probs.par_chunks_mut(self.heads * t * t)).zip(x.par_chunks(t * 3 * d)).for_each(|((o, ps), qkv)| {
            for (h, p) in ps.chunks_exact_mut(t * t).enumerate() {
                self.probabilities(p, qkv, t, d, h);
                let v = Mat::strided(&qkv[2 * d + h * dh..], t, dh, 3 * d, 1);
                let p = Mat::row_major(p, t, t);
                matmul_rows(&mut o[h * dh..], d, p, v, false, Parallelism::None);
            }
        });
        // One forward per op instance (a new one per call).
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), Shape::from((n, t, d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (t, d, dh) = self.shape(arg.dims())?;
        let Some(probs) = self.probs.get() else { candle_core::bail!("fused attention: backward before forward") };
        let operands = [(arg, "qkv"), (grad, "output gradient")];
        let gx = with_f32(OP, &operands, |s| {
            let (x, g) = (s[0], s[1]);
            let mut gx = vec![0f32; x.len()];
            gx.par_chunks_mut(t * 3 * d).zip(x.par_chunks(t * 3 * d).zip(g.par_chunks(t * d))).zip(probs.par_chunks(self.heads * t * t)).for_each(|((gqkv, (qkv, go)), ps)| {
                let mut gp = vec![0f32; t * t];
                for (h, p) in ps.chunks_exact(t * t).enumerate() {
                    let go_h = Mat::strided(&go[h * dh..], t, dh, d, 1);
                    let pm = Mat::row_major(p, t, t);
                    // v: pᵀ·go
                    let gv = &mut gqkv[2 * d + h * dh..];
                    matmul_rows(gv, 3 * d, pm.t(), go_h, false, Parallelism::None);
                    // p: go·vᵀ, then through the softmax and the scaling
                    let vt = Mat::strided(&qkv[2 * d + h * dh..], dh, t, 1, 3 * d);
                    matmul(&mut gp, go_h, vt, false, Parallelism::None);
                    for (grow, prow) in gp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                        softmax_row_backward(grow, prow);
                        grow.iter_mut().for_each(|v| *v *= self.scale);
                    }
                    let gs = Mat::row_major(&gp, t, t);
                    // q: gs·k; k: gsᵀ·q
                    let k = Mat::strided(&qkv[d + h * dh..], t, dh, 3 * d, 1);
                    let q = Mat::strided(&qkv[h * dh..], t, dh, 3 * d, 1);
                    matmul_rows(&mut gqkv[h * dh..], 3 * d, gs, k, false, Parallelism::None);
                    let gk = &mut gqkv[d + h * dh..];
                    matmul_rows(gk, 3 * d, gs.t(), q, false, Parallelism::None);
                }
            });
            Ok(gx)
        })?;
        Ok(Some(Tensor::from_vec(gx, arg.shape(), arg.device())?))
    }
}

/// Multi-head self-attention core on packed projections (see [`AttentionOp`]), scale
/// 1/√(head width). `None` when the fused op does not apply.
pub fn attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Option<Tensor>> {
    if heads == 0 {
        candle_core::bail!("{OP}: attention needs at least one head");
    }
    if !fast(&[qkv]) {
        return Ok(None);
    }
    let dh = qkv.dim(candle_core::D::Minus1)? / 3 / heads;
    let op = AttentionOp { heads, scale: (1.0 / (dh as f64).sqrt()) as f32, probs: OnceLock::new() };
    qkv.contiguous()?.apply_op1(op).map(Some)
}

// ---------------------------------------------------------------------------------------------
// GELU (erf).

/// GELU; keeps erf(x/√2) from the forward pass for the backward pass (the erf is most of the
/// cost of both).
struct GeluOp {
    erf: OnceLock<Vec<f32>>,
}

/// eˣ without branches or library calls, so that loops over slices vectorise (libm's `expf` is a
/// scalar call per element). Range reduction x = n·ln2 + r, |r| ≤ ln2/2, a degree-7 Taylor
/// polynomial for eʳ, and 2ⁿ built from its exponent bits. Relative error below 2·10⁻⁷ over
/// [−87, 88] (tested against `f64::exp`); inputs are clamped to that range.
#[inline(always)]
fn exp_vec(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split into a part exact in f32 (few mantissa bits) and the rest.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (for |v| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, read from the low mantissa bits (a float-to-int cast would not vectorise).
    let ni = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits((ni.wrapping_add(127) as u32) << 23) * p
}

/// erf(x): Abramowitz & Stegun 7.1.26 for |x| ≥ 0.75 (absolute error below 1.5·10⁻⁷ for the
/// formula), a series below; both are computed and one selected, so the loop vectorises.
#[inline(always)]
fn erf_vec(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152_1, 1.061_405_4];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = 1.0 - poly * exp_vec(-z * z);
    // Near zero `1 − poly·e^(−z²)` cancels (errors up to 7·10⁻⁷); the Maclaurin series
    // (2/√π)·Σ (−1)ᵏ z²ᵏ⁺¹ / (k!·(2k+1)) to k = 8 is accurate to f32 rounding for z < 0.75.
    let z2 = z * z;
    let series = z
        * (std::f32::consts::FRAC_2_SQRT_PI
            + z2 * (-0.376_126_4 + z2 * (0.112_837_92 + z2 * (-0.026_866_17 + z2 * (0.005_223_977 + z2 * (-8.548_327e-4 + z2 * (1.205_533_5e-4 + z2 * (-1.492_565e-5 + z2 * 1.646_211_4e-6))))))));
    let y = if z < 0.75 { series } else { tail };
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[inline(always)]
fn erf_scaled(v: f32) -> f32 {
    erf_vec(v * std::f32::consts::FRAC_1_SQRT_2)
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, OP, "input")?;
        let mut out = vec![0f32; x.len()];
        let mut erf = vec![0f32; x.len()];
        let t = task_len(x.len(), 1);
        out.par_chunks_mut(t).zip(erf.par_chunks_mut(t)).zip(x.par_chunks(t)).for_each(|((o, e), xs)| {
            // Equal lengths up front and indexed loops, so that these vectorise.
            let len = o.len();
            let (e, xs) = (&mut e[..len], &xs[..len]);
            for t in 0..len {
                e[t] = erf_scaled(xs[t]);
            }
            for t in 0..len {
                // candle's formula, so that the values are identical.
                o[t] = (e[t] + 1.) * 0.5 * xs[t];
            }
        });
        // One forward per op instance (candle makes a new one per call).
        let _ = self.erf.set(erf);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(erf) = self.erf.get() else { candle_core::bail!("fused gelu: backward before forward") };
        let operands = [(arg, "input"), (grad, "output gradient")];
        let gx = with_f32(OP, &operands, |s| {
            let (xs, gs) = (s[0], s[1]);
            let mut gx = vec![0f32; xs.len()];
            let t = task_len(xs.len(), 1);
            gx.par_chunks_mut(t).zip(xs.par_chunks(t).zip(gs.par_chunks(t)).zip(erf.par_chunks(t))).for_each(|(o, ((xc, gc), ec))| {
                let len = o.len();
                let (xc, gc, ec) = (&xc[..len], &gc[..len], &ec[..len]);
                for t in 0..len {
                    let v = xc[t];
                    // candle's backward: 0.5 + 0.398942·e^(−x²/2)·x + 0.5·erf(x/√2).
                    o[t] = gc[t] * (0.5 + 0.398942 * exp_vec(-(v * v) / 2.0) * v + 0.5 * ec[t]);
                }
            });
            Ok(gx)
        })?;
        Ok(Some(Tensor::from_vec(gx, arg.shape(), arg.device())?))
    }
}

/// GELU with the exact (erf) formulation, as candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[x]) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluOp { erf: OnceLock::new() })
}

// ---------------------------------------------------------------------------------------------
// relu(a + b), the end of a residual block.

struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fused-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = cpu_f32(s1, l1, OP, "lhs")?;
        let b = cpu_f32(s2, l2, OP, "rhs")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("add_relu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let t = task_len(a.len(), 1);
        let out = par_zeroed(a.len(), t, |i, o| {
            let r = i * t..i * t + o.len();
            for ((o, &x), &y) in o.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
                let s = x + y;
                *o = if s < 0.0 { 0.0 } else { s };
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // candle's ReLU passes the gradient where its input is ≥ 0; the output is 0 exactly
        // there too only when a + b = 0, which the mask below treats the same way (via a + b).
        let operands = [(a, "lhs"), (b, "rhs"), (grad, "output gradient"), (res, "output")];
        let g = with_f32(OP, &operands, |s| {
            let (ac, bc, gc) = (s[0], s[1], s[2]);
            let t = task_len(gc.len(), 1);
            Ok(par_zeroed(gc.len(), t, |i, o| {
                let r = i * t..i * t + o.len();
                let (x, y, gv) = (&ac[r.clone()], &bc[r.clone()], &gc[r]);
                for (((o, &x), &y), &gv) in o.iter_mut().zip(x).zip(y).zip(gv) {
                    *o = if x + y >= 0.0 { gv } else { 0.0 };
                }
            }))
        })?;
        let g = Tensor::from_vec(g, a.shape(), a.device())?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `relu(a + b)` for tensors of one shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[a, b]) || a.dims() != b.dims() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{softmax_last_reference, LayerNorm};
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn randn(rng: &mut Rng, dims: &[usize], scale: f64) -> Var {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
        Var::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Compare `fast(inputs)` with `slow(inputs)`: values and gradients of Σ r·y w.r.t. every
    /// input.
    fn compare(inputs: &[Var], fast: impl Fn(&[Tensor]) -> Tensor, slow: impl Fn(&[Tensor]) -> Tensor, tol: f32, what: &str) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, ys) = (fast(&ts), slow(&ts));
        assert!(max_rel_diff(&yf, &ys) < tol, "{what}: values {}", max_rel_diff(&yf, &ys));
        let mut rng = Rng::new(99);
        let r = randn(&mut rng, yf.dims(), 1.0);
        let gf = (&yf * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&ys * r.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let d = max_rel_diff(gf.get(t).unwrap(), gs.get(t).unwrap());
            assert!(d < tol * 10.0, "{what}: gradient {i}: {d}");
        }
    }

    #[test]
    fn layer_norm_matches_primitives() {
        let mut rng = Rng::new(1);
        for dims in [[3usize, 5, 64], [2, 7, 10], [1, 1, 3]] {
            let d = dims[2];
            let x = randn(&mut rng, &dims, 2.0);
            let w = randn(&mut rng, &[d], 1.0);
            let b = randn(&mut rng, &[d], 1.0);
            compare(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap().unwrap(), |t| LayerNorm::reference(&t[0], &t[1], &t[2], 1e-5).unwrap(), 1e-5, &format!("layer norm {dims:?}"));
        }
    }

    #[test]
    fn attention_matches_primitives() {
        let mut rng = Rng::new(7);
        // (N, T, D, heads): the ViT's shape, odd token counts, one token, one head, dh = 1.
        for (n, t, d, heads) in [(3, 50, 64, 4), (2, 7, 12, 3), (1, 1, 8, 2), (2, 5, 6, 1), (2, 3, 4, 4)] {
            let qkv = randn(&mut rng, &[n, t, 3 * d], 1.5);
            compare(&[qkv], |x| attention(&x[0], heads).unwrap().unwrap(), |x| crate::models::attention_reference(&x[0], heads).unwrap(), 1e-5, &format!("attention {n}x{t}x{d}, {heads} heads"));
        }
    }

    #[test]
    fn attention_rejects_a_width_the_heads_do_not_divide() {
        let qkv = Tensor::zeros((2, 5, 3 * 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = attention(&qkv, 4).unwrap_err().to_string();
        assert!(err.contains("divisible by 4 heads") && err.contains("[2, 5, 30]"), "{err}");
        let empty = Tensor::zeros((2, 5, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&empty, 1).is_err());
        let err = attention(&qkv, 0).unwrap_err().to_string();
        assert!(err.contains("at least one head"), "{err}");
    }

    #[test]
    fn softmax_matches_primitives() {
        let mut rng = Rng::new(2);
        for dims in [[4usize, 3, 17, 17], [1, 1, 2, 5]] {
            let x = randn(&mut rng, &dims, 3.0);
            compare(&[x], |t| softmax_last(&t[0]).unwrap().unwrap(), |t| softmax_last_reference(&t[0]).unwrap(), 1e-5, "softmax");
        }
    }

    #[test]
    fn gelu_matches_candle() {
        let mut rng = Rng::new(3);
        let x = randn(&mut rng, &[5, 17, 33], 2.0);
        compare(&[x], |t| gelu_erf(&t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), 1e-6, "gelu");
    }

    #[test]
    fn exp_and_erf_approximations_are_accurate() {
        let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 400_000.0;
            let got = f64::from(exp_vec(x as f32));
            let want = (x as f32 as f64).exp();
            worst_exp = worst_exp.max(((got - want) / want).abs());
            let z = -6.0 + 12.0 * f64::from(i) / 400_000.0;
            let got = f64::from(erf_vec(z as f32));
            let want = f64::from(candle_core::cpu::erf::erf_f64(z as f32 as f64) as f32);
            worst_erf = worst_erf.max((got - want).abs());
        }
        assert!(worst_exp < 2e-7, "exp: worst relative error {worst_exp:e}");
        assert!(worst_erf < 2.5e-7, "erf: worst absolute error {worst_erf:e}");
        // Signs, zero and the saturated tails.
        assert_eq!(erf_vec(0.0), 0.0);
        assert_eq!(erf_vec(-1.0), -erf_vec(1.0));
        assert!((erf_vec(9.0) - 1.0).abs() < 1e-7 && (erf_vec(-9.0) + 1.0).abs() < 1e-7);
        assert!(exp_vec(-200.0) >= 0.0 && exp_vec(-200.0) < 1e-37);
        assert!(exp_vec(f32::NAN).is_nan() || exp_vec(f32::NAN) >= 0.0);
    }

    #[test]
    fn add_relu_matches_candle() {
        let mut rng = Rng::new(4);
        let a = randn(&mut rng, &[3, 4, 5, 6], 1.0);
        let b = randn(&mut rng, &[3, 4, 5, 6], 1.0);
        compare(&[a, b], |t| add_relu(&t[0], &t[1]).unwrap(), |t| (&t[0] + &t[1]).unwrap().relu().unwrap(), 1e-6, "add_relu");
    }
}
