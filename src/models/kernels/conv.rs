//! Fast CPU convolution, forward and backward, as a candle custom op: direct kernels for
//! stride-1 "same" convolutions, im2col + GEMM for the others.
//!
//! candle 0.11's CPU `conv2d` is a direct loop and its input gradient goes through an even slower
//! `conv_transpose2d`; on a 2-core machine that made the CNN several times slower per training step
//! than PyTorch. This module computes a 2-D convolution (NCHW, f32, groups 1, dilation 1) per
//! sample as one GEMM of the weight with an im2col patch matrix, fuses the bias and an optional
//! ReLU into the pass that finishes the output, and computes the gradients as GEMMs too:
//! grad-weight = Σₙ gOₙ · colsₙᵀ and grad-input = col2im(Wᵀ · gOₙ). The batch is split across
//! rayon's threads, each with its own scratch buffers, so no two threads write the same memory.
//! Stride-1 "same" convolutions (most layers of the report backbones) skip the patch matrix: on
//! CPUs with AVX2 and FMA they run the register-tiled kernels of [`super::direct`] over padded
//! planes (forward, input gradient and weight gradient).
//!
//! On other devices or dtypes [`conv2d`] falls back to candle's own `conv2d` (plus bias and ReLU
//! as tensor ops), so the same model code runs with `--features cuda`. [`Conv`] is the layer the
//! models use; it creates its variables through candle-nn, so their names (`<prefix>.weight`,
//! `<prefix>.bias`), shapes and default initialisation are those of `candle_nn::Conv2d`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::alloc::{par_zeroed, UninitChunk, ZeroedLater};
use super::direct::Plan;
use super::geom::{transposed_conv, Geom};
use super::matmul::{matmul, Mat};
use super::{cpu_f32, relu, relu_backward, with_f32};

/// Names this module's operations in errors.
const OP: &str = "fast conv";

/// The output positions [lo, hi) along one axis whose input position o·s + j − pad falls inside
/// [0, len), for kernel offset `j`.
fn valid_range(out: usize, len: usize, s: usize, j: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > j { (pad - j).div_ceil(s) } else { 0 };
    let hi = if len + pad > j { ((len - 1 + pad - j) / s + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Output ranges [lo, hi), one per kernel offset.
type Spans = Vec<(usize, usize)>;

/// [`valid_range`] of every kernel row offset (output rows) and column offset (output columns).
fn ranges(g: &Geom) -> (Spans, Spans) {
    ((0..g.kh).map(|i| valid_range(g.ho, g.h, g.stride, i, g.pad)).collect(), (0..g.kw).map(|j| valid_range(g.wo, g.w, g.stride, j, g.pad)).collect())
}

/// `dst[t] = src[t·stride]` for every t. Stride 2 (the downsampling convolutions) goes through
/// pairs, which compiles to vector shuffles instead of one load per element.
#[inline]
fn gather_strided(dst: &mut [f32], src: &[f32], stride: usize) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    if stride == 2 {
        let (body, last) = dst.split_at_mut(n - 1);
        for (d, pair) in body.iter_mut().zip(src[..2 * (n - 1)].chunks_exact(2)) {
            *d = pair[0];
        }
        last[0] = src[2 * (n - 1)];
    } else {
        for (t, d) in dst.iter_mut().enumerate() {
            *d = src[t * stride];
        }
    }
}

/// `dst[t·stride] += src[t]` for every t: the adjoint of [`gather_strided`].
#[inline]
fn scatter_add_strided(dst: &mut [f32], src: &[f32], stride: usize) {
    let n = src.len();
    if n == 0 {
        return;
    }
    if stride == 2 {
        let (body, last) = src.split_at(n - 1);
        for (pair, v) in dst[..2 * (n - 1)].chunks_exact_mut(2).zip(body) {
            pair[0] += *v;
        }
        dst[2 * (n - 1)] += last[0];
    } else {
        for (t, v) in src.iter().enumerate() {
            dst[t * stride] += *v;
        }
    }
}

/// Zero `row[a..b]`; the ranges are usually one element wide (a 3×3 kernel's border), where a
/// plain store beats a call to memset.
#[inline]
fn zero_small(row: &mut [f32], a: usize, b: usize) {
    match b.saturating_sub(a) {
        0 => {}
        1 => row[a] = 0.0,
        _ => row[a..b].fill(0.0),
    }
}

/// For stride 1 with Wo = W, patch-matrix row (c, i, j) is channel c shifted by
/// (i − pad)·W + (j − pad) positions, plus zeroed borders; this is that offset.
#[inline]
fn shift(g: &Geom, i: usize, j: usize) -> isize {
    (i as isize - g.pad as isize) * g.w as isize + (j as isize - g.pad as isize)
}

/// The row positions [a, b) of the output rows [ylo, yhi) whose source q + off lies in the plane.
#[inline]
fn shifted_span(ylo: usize, yhi: usize, w: usize, plane: usize, off: isize) -> (usize, usize) {
    let (lo, hi) = ((ylo * w) as isize, (yhi * w) as isize);
    let a = lo.max(-off).min(hi);
    let b = hi.min(plane as isize - off).max(a);
    (a as usize, b as usize)
}

/// Whether rows of the patch matrix are whole-plane shifts of the input (stride 1, Wo = W).
fn shiftable(g: &Geom) -> bool {
    g.stride == 1 && g.wo == g.w
}

/// Fill `cols` (K×P, row (c, i, j), column (oy, ox)) with x[c, oy·s + i − pad, ox·s + j − pad],
/// zero outside the input. `x` is one sample, C×H×W.
fn im2col(g: &Geom, x: &[f32], cols: &mut [f32]) {
    let (p, plane) = (g.p(), g.h * g.w);
    let (yr, xr) = ranges(g);
    let mut rows = cols.chunks_exact_mut(p);
    for c in 0..g.c {
        let xc = &x[c * plane..(c + 1) * plane];
        for (i, &(ylo, yhi)) in yr.iter().enumerate() {
            for (j, &(xlo, xhi)) in xr.iter().enumerate() {
                let Some(row) = rows.next() else { return };
                if shiftable(g) {
                    // One copy of the shifted plane, then zero the rows and columns that fall
                    // outside the input (the columns received wrapped-around neighbours).
                    let w = g.w;
                    row[..ylo * w].fill(0.0);
                    row[yhi * w..].fill(0.0);
                    let off = shift(g, i, j);
                    let (a, b) = shifted_span(ylo, yhi, w, plane, off);
                    if b > a {
                        let src = (a as isize + off) as usize;
                        row[a..b].copy_from_slice(&xc[src..src + (b - a)]);
                    }
                    for oy in ylo..yhi {
                        zero_small(row, oy * w, oy * w + xlo);
                        zero_small(row, oy * w + xhi, (oy + 1) * w);
                    }
                    continue;
                }
                for (oy, d) in row.chunks_exact_mut(g.wo).enumerate() {
                    if oy < ylo || oy >= yhi {
                        d.fill(0.0);
                        continue;
                    }
                    let iy = oy * g.stride + i - g.pad;
                    let src = &xc[iy * g.w..(iy + 1) * g.w];
                    zero_small(d, 0, xlo);
                    zero_small(d, xhi, g.wo);
                    if g.stride == 1 {
                        let off = xlo + j - g.pad;
                        d[xlo..xhi].copy_from_slice(&src[off..off + (xhi - xlo)]);
                    } else if xhi > xlo {
                        let start = xlo * g.stride + j - g.pad;
                        gather_strided(&mut d[xlo..xhi], &src[start..], g.stride);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: add every entry of `cols` (K×P) into the input position it was read
/// from. `gx` is one sample, C×H×W. `cols` is scratch: entries that correspond to padding may be
/// overwritten with zeros.
fn col2im(g: &Geom, cols: &mut [f32], gx: &mut [f32]) {
    let (p, plane) = (g.p(), g.h * g.w);
    let (yr, xr) = ranges(g);
    let mut rows = cols.chunks_exact_mut(p);
    for c in 0..g.c {
        let gc = &mut gx[c * plane..(c + 1) * plane];
        for (i, &(ylo, yhi)) in yr.iter().enumerate() {
            for (j, &(xlo, xhi)) in xr.iter().enumerate() {
                let Some(row) = rows.next() else { return };
                if shiftable(g) {
                    // Zero the entries that belong to padding columns, then add the whole shifted
                    // block at once (those zeros land on wrapped-around neighbours).
                    let w = g.w;
                    for oy in ylo..yhi {
                        zero_small(row, oy * w, oy * w + xlo);
                        zero_small(row, oy * w + xhi, (oy + 1) * w);
                    }
                    let off = shift(g, i, j);
                    let (a, b) = shifted_span(ylo, yhi, w, plane, off);
                    if b > a {
                        let dst = (a as isize + off) as usize;
                        for (d, v) in gc[dst..dst + (b - a)].iter_mut().zip(&row[a..b]) {
                            *d += *v;
                        }
                    }
                    continue;
                }
                for oy in ylo..yhi {
                    let d = &row[oy * g.wo..(oy + 1) * g.wo];
                    let iy = oy * g.stride + i - g.pad;
                    let dst = &mut gc[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let off = xlo + j - g.pad;
                        for (a, b) in dst[off..off + (xhi - xlo)].iter_mut().zip(&d[xlo..xhi]) {
                            *a += *b;
                        }
                    } else if xhi > xlo {
                        let start = xlo * g.stride + j - g.pad;
                        scatter_add_strided(&mut dst[start..], &d[xlo..xhi], g.stride);
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch for patch matrices and masked gradients, kept between calls: every user
    /// overwrites the part it reads, so it is never cleared (zeroing it cost a full pass per task).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch split into slices of the given lengths. Their contents are
/// left over from earlier calls: `f` must write every element before reading it.
fn with_scratch<const N: usize, R>(lens: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    // Taken out of the cell, so a nested call (none today) would get its own buffer, not a panic.
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let total = lens.iter().sum::<usize>();
    if buf.len() < total {
        buf.resize(total, 0.0);
    }
    let mut rest = &mut buf[..];
    let parts = std::array::from_fn(|i| {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(lens[i]);
        rest = tail;
        part
    });
    let r = f(parts);
    SCRATCH.with(|s| *s.borrow_mut() = buf);
    r
}

/// Samples per parallel task. Fixed, never derived from the thread count: the weight gradient
/// is summed per task and then over tasks in order, so the same chunking on every machine and
/// under every `--jobs` gives bit-identical results.
const SAMPLES_PER_TASK: usize = 4;

/// Samples per task of the direct backward pass: its weight gradient is one running sum over
/// all of a task's samples. Fixed, for the same reason as [`SAMPLES_PER_TASK`].
const DIRECT_SAMPLES_PER_TASK: usize = 8;

/// How to split a batch of `n` samples: samples per task, and the parallelism inside each GEMM
/// (none: tasks are the unit of parallelism, which keeps every sum's order fixed).
fn split(n: usize) -> (usize, gemm::Parallelism) {
    (SAMPLES_PER_TASK.min(n.max(1)), gemm::Parallelism::None)
}

/// Σ v in 8 independent lanes, so that the compiler vectorises it.
#[inline]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

avx2_variant! {
    /// Add the bias and apply the ReLU to one sample's O×P output.
    fn epilogue(out: &mut [f32], p: usize, bias: Option<&[f32]>, apply_relu: bool) {
        match (bias, apply_relu) {
            (None, false) => {}
            (None, true) => out.iter_mut().for_each(|v| *v = relu(*v)),
            (Some(b), r) => {
                for (row, &bo) in out.chunks_exact_mut(p).zip(b) {
                    if r {
                        row.iter_mut().for_each(|v| *v = relu(*v + bo));
                    } else {
                        row.iter_mut().for_each(|v| *v += bo);
                    }
                }
            }
        }
    }
}

avx2_variant! {
    /// `dst` = `g` where the ReLU's output `r` is positive, 0 elsewhere.
    fn relu_mask(dst: &mut [f32], g: &[f32], r: &[f32]) {
        for ((m, &gv), &rv) in dst.iter_mut().zip(g).zip(r) {
            *m = relu_backward(gv, rv);
        }
    }
}

/// The convolution of a batch (N×C×H×W) with `w` (O×K), plus `bias`, then ReLU if asked:
/// N×O×Ho×Wo. Stride-1 "same" convolutions go through [`direct`], the others through im2col.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>, apply_relu: bool) -> Vec<f32> {
    match Plan::new(g) {
        Some(plan) => forward_direct(g, &plan, x, w, bias, apply_relu),
        None => forward_im2col(g, x, w, bias, apply_relu),
    }
}

fn forward_direct(g: &Geom, plan: &Plan, x: &[f32], w: &[f32], bias: Option<&[f32]>, apply_relu: bool) -> Vec<f32> {
    let il = g.in_len();
    let packed = plan.pack_conv(w, g.o);
    let lens = [plan.input_len(g.c), plan.wide_len(g.o)];
    forward_samples(g, lens, bias, apply_relu, |n, [xpad, wide], out_n| {
        plan.pad_into(&x[n * il..(n + 1) * il], xpad);
        plan.conv_into(xpad, g.c, &packed, g.o, wide, out_n);
    })
}

fn forward_im2col(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>, apply_relu: bool) -> Vec<f32> {
    let (k, p, il) = (g.k(), g.p(), g.in_len());
    let wm = Mat::row_major(w, g.o, k);
    let par = split(g.n).1;
    let cols_len = if g.pointwise() { 0 } else { k * p };
    forward_samples(g, [cols_len], bias, apply_relu, |n, [cols], out_n| {
        let x_n = &x[n * il..(n + 1) * il];
        let patches: &[f32] = if g.pointwise() {
            x_n
        } else {
            im2col(g, x_n, cols);
            cols
        };
        matmul(out_n, wm, Mat::row_major(patches, k, p), false, par);
    })
}

/// The frame of both forward passes: the batch's N×O×Ho×Wo output in tasks of [`split`]
/// samples, each task with this thread's scratch cut to `lens`; `sample(n, scratch, out)`
/// writes sample n's output, then the bias and ReLU are applied to it.
fn forward_samples<const S: usize>(g: &Geom, lens: [usize; S], bias: Option<&[f32]>, apply_relu: bool, sample: impl Fn(usize, &mut [&mut [f32]; S], &mut [f32]) + Sync + Send) -> Vec<f32> {
    let (p, ol) = (g.p(), g.out_len());
    let (per, _) = split(g.n);
    par_zeroed(g.n * ol, per * ol, |t, chunk| {
        with_scratch(lens, |mut scratch| {
            for (i, out_n) in chunk.chunks_exact_mut(ol).enumerate() {
                sample(t * per + i, &mut scratch, out_n);
                epilogue(out_n, p, bias, apply_relu);
            }
        })
    })
}

/// How the gradient reaching the op becomes the gradient of the convolution's output.
#[derive(Clone, Copy)]
pub(super) enum GradIn<'a> {
    /// It is that gradient.
    Plain,
    /// The op applied a ReLU: masked where the op's output (given here) is not positive.
    Relu(&'a [f32]),
    /// The op applied training-mode BatchNorm (and a ReLU if `relu`) to the convolution's output
    /// `z`, with final output `res`: dz = k1·dy + k2·z + k3 per output channel (`coef`).
    BatchNorm { z: &'a [f32], res: &'a [f32], coef: &'a [(f32, f32, f32)], relu: bool },
}

/// Which gradients to compute, and from what.
pub(super) struct BackwardInputs<'a> {
    pub(super) x: &'a [f32],
    pub(super) w: &'a [f32],
    pub(super) dout: GradIn<'a>,
    pub(super) grad: &'a [f32],
    pub(super) need_x: bool,
    pub(super) need_w: bool,
    pub(super) need_b: bool,
}

/// Stride 1 with the output the size of the input (kernel 2·pad + 1, "same" padding).
fn same_stride1(g: &Geom) -> bool {
    g.stride == 1 && g.kh == 2 * g.pad + 1 && g.kw == 2 * g.pad + 1 && !g.pointwise()
}

/// Sample `n`'s gradient w.r.t. the convolution's output: `a.grad` itself, or its masked /
/// BatchNorm-transformed version written to `buf` (`ol` floats, unused for [`GradIn::Plain`]).
fn output_grad<'c>(a: &BackwardInputs<'c>, p: usize, ol: usize, n: usize, buf: &'c mut [f32]) -> &'c [f32] {
    let sample = n * ol..(n + 1) * ol;
    let go = &a.grad[sample.clone()];
    match a.dout {
        GradIn::Plain => go,
        GradIn::Relu(res) => {
            relu_mask(buf, go, &res[sample]);
            buf
        }
        GradIn::BatchNorm { z, res, coef, relu } => {
            let (z, r) = (&z[sample.clone()], &res[sample]);
            for (ch, dst) in buf.chunks_exact_mut(p).enumerate() {
                let plane = ch * p..(ch + 1) * p;
                let (zp, gp, rp) = (&z[plane.clone()], &go[plane.clone()], &r[plane]);
                super::norm::bn_input_grad(dst, zp, gp, rp, coef[ch], relu);
            }
            buf
        }
    }
}

/// Floats of scratch [`output_grad`] needs.
fn output_grad_len(a: &BackwardInputs, ol: usize) -> usize {
    if matches!(a.dout, GradIn::Plain) {
        0
    } else {
        ol
    }
}

/// Gradients w.r.t. the input (N×C×H×W, if asked), the weight (O×K) and the bias (O).
pub(super) fn backward(g: &Geom, a: &BackwardInputs) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    match Plan::new(g) {
        Some(plan) => backward_direct(g, &plan, a),
        None => backward_im2col(g, a),
    }
}

/// Task `t` (of `per` samples): its first sample, its sample count, and its partial weight and
/// bias gradients (zero, sized as asked).
fn task_start(g: &Geom, a: &BackwardInputs, t: usize, per: usize) -> (usize, usize, Vec<f32>, Vec<f32>) {
    let first = t * per;
    let count = per.min(g.n.saturating_sub(first));
    let gw = vec![0f32; if a.need_w { g.o * g.k() } else { 0 }];
    let gb = vec![0f32; if a.need_b { g.o } else { 0 }];
    (first, count, gw, gb)
}

/// Sum per-task partial gradients (weight, bias) in task order.
fn sum_partials(g: &Geom, a: &BackwardInputs, partials: &[(Vec<f32>, Vec<f32>)]) -> (Vec<f32>, Vec<f32>) {
    let mut gw = vec![0f32; if a.need_w { g.o * g.k() } else { 0 }];
    let mut gb = vec![0f32; if a.need_b { g.o } else { 0 }];
    for (pw, pb) in partials {
        gw.iter_mut().zip(pw).for_each(|(a, b)| *a += *b);
        gb.iter_mut().zip(pb).for_each(|(a, b)| *a += *b);
    }
    (gw, gb)
}

/// The input gradient's buffer (empty when it is not asked for).
fn input_grad_buf(g: &Geom, a: &BackwardInputs) -> ZeroedLater {
    ZeroedLater::new(if a.need_x { g.n * g.in_len() } else { 0 })
}

/// One slot per task of `per` samples: that task's chunk of the input gradient (zeroed by the
/// task), if asked for.
fn task_chunks<'x>(gx: &'x mut ZeroedLater, g: &Geom, a: &BackwardInputs, per: usize) -> Vec<Option<UninitChunk<'x>>> {
    let il = g.in_len();
    if a.need_x && il > 0 {
        gx.chunks(per * il).into_iter().map(Some).collect()
    } else {
        (0..g.n.div_ceil(per.max(1))).map(|_| None).collect()
    }
}

fn backward_direct(g: &Geom, plan: &Plan, a: &BackwardInputs) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (p, ol, il) = (g.p(), g.out_len(), g.in_len());
    let per = DIRECT_SAMPLES_PER_TASK.min(g.n.max(1));
    let mut gx = input_grad_buf(g, a);
    let gx_chunks = task_chunks(&mut gx, g, a, per);
    // Stride 1: the input gradient is the "same" convolution of the output gradient with the
    // transposed, flipped kernel (C output channels, O·kh·kw weights each). Stride 2: one
    // correlation per input phase (see `direct::Plan::input_grad`).
    let transposed = plan.transposable();
    let wt = (a.need_x && transposed).then(|| plan.pack_conv(&transposed_conv(g, a.w).1, g.c));
    let packs = if a.need_x && !transposed { plan.input_grad_weights(a.w, g.o, g.c) } else { Vec::new() };
    let (up_gp, up_wide) = if a.need_x { plan.input_grad_scratch(g.o, g.c) } else { (0, 0) };
    // Stride 1's input gradient reads the output gradient as padded planes (one sample at a
    // time); the weight gradient reads every sample of the task transposed (pixel-major).
    let (gl, tl, xl) = (plan.input_len(g.o), plan.grad_t_len(g.o), plan.input_len(g.c));
    let partials: Vec<(Vec<f32>, Vec<f32>)> = gx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(t, gx_chunk)| {
            let mut gx_chunk = gx_chunk.map(UninitChunk::zeroed);
            let (first, count, mut gw, mut gb) = task_start(g, a, t, per);
            let lens = [
                output_grad_len(a, ol),
                if a.need_x && transposed { gl } else { 0 },
                if a.need_w { count * tl } else { 0 },
                if a.need_w { count * xl } else { 0 },
                if a.need_x && transposed { plan.wide_len(g.c) } else { up_wide },
                up_gp,
            ];
            with_scratch(lens, |[masked, gpad, gt, xpad, wide, up]| {
                for i in 0..count {
                    let n = first + i;
                    let go = output_grad(a, p, ol, n, masked);
                    if a.need_b {
                        for (b, row) in gb.iter_mut().zip(go.chunks_exact(p)) {
                            *b += lane_sum(row);
                        }
                    }
                    if a.need_w {
                        plan.grad_t_into(go, g.o, &mut gt[i * tl..(i + 1) * tl]);
                        let x_n = &a.x[n * il..(n + 1) * il];
                        plan.pad_into(x_n, &mut xpad[i * xl..(i + 1) * xl]);
                    }
                    if let Some(chunk) = gx_chunk.as_deref_mut() {
                        let gx_n = &mut chunk[i * il..(i + 1) * il];
                        if let Some(wt) = &wt {
                            plan.pad_into(go, gpad);
                            plan.conv_into(gpad, g.o, wt, g.c, wide, gx_n);
                        } else {
                            plan.input_grad(go, g.o, &packs, g.c, up, wide, gx_n);
                        }
                    }
                }
                if a.need_w {
                    plan.weight_grad(gt, g.o, xpad, g.c, count, &mut gw);
                }
            });
            (gw, gb)
        })
        .collect();
    let (gw, gb) = sum_partials(g, a, &partials);
    (a.need_x.then(|| gx.into_vec()), gw, gb)
}

fn backward_im2col(g: &Geom, a: &BackwardInputs) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (k, p, ol, il) = (g.k(), g.p(), g.out_len(), g.in_len());
    let (per, par) = split(g.n);
    let mut gx = input_grad_buf(g, a);
    let gx_chunks = task_chunks(&mut gx, g, a, per);
    let wm = Mat::row_major(a.w, g.o, k);
    // For a stride-1 "same" convolution the input gradient is itself a "same" convolution of the
    // output gradient with the transposed, spatially flipped kernel, C×(O·kh·kw): one im2col and a
    // GEMM with inner dimension O·kh·kw, instead of a GEMM with inner dimension O whose K×P result
    // col2im must scatter back.
    let transposed = (a.need_x && same_stride1(g)).then(|| transposed_conv(g, a.w));
    let partials: Vec<(Vec<f32>, Vec<f32>)> = gx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(t, gx_chunk)| {
            let mut gx_chunk = gx_chunk.map(UninitChunk::zeroed);
            let (first, count, mut gw, mut gb) = task_start(g, a, t, per);
            let cols_len = if a.need_w && !g.pointwise() { k * p } else { 0 };
            let gcols_len = match &transposed {
                Some((gt, _)) => gt.k() * gt.p(),
                None if a.need_x && !g.pointwise() => k * p,
                None => 0,
            };
            let masked_len = output_grad_len(a, ol);
            with_scratch([cols_len, gcols_len, masked_len], |[cols, gcols, masked]| {
                for i in 0..count {
                    let n = first + i;
                    let go = output_grad(a, p, ol, n, masked);
                    if a.need_b {
                        for (b, row) in gb.iter_mut().zip(go.chunks_exact(p)) {
                            *b += lane_sum(row);
                        }
                    }
                    let gom = Mat::row_major(go, g.o, p);
                    if a.need_w {
                        let x_n = &a.x[n * il..(n + 1) * il];
                        let patches: &[f32] = if g.pointwise() {
                            x_n
                        } else {
                            im2col(g, x_n, cols);
                            cols
                        };
                        matmul(&mut gw, gom, Mat::row_major(patches, k, p).t(), true, par);
                    }
                    if let Some(chunk) = gx_chunk.as_deref_mut() {
                        let gx_n = &mut chunk[i * il..(i + 1) * il];
                        if g.pointwise() {
                            matmul(gx_n, wm.t(), gom, false, par);
                        } else if let Some((gt, wt)) = &transposed {
                            im2col(gt, go, gcols);
                            let wtm = Mat::row_major(wt, gt.o, gt.k());
                            matmul(gx_n, wtm, Mat::row_major(gcols, gt.k(), gt.p()), false, par);
                        } else {
                            matmul(gcols, wm.t(), gom, false, par);
                            col2im(g, gcols, gx_n);
                        }
                    }
                }
            });
            (gw, gb)
        })
        .collect();
    let (gw, gb) = sum_partials(g, a, &partials);
    (a.need_x.then(|| gx.into_vec()), gw, gb)
}

/// The convolution op: inputs (x, weight) or (x, weight, bias).
#[derive(Debug, Clone, Copy)]
struct ConvOp {
    stride: usize,
    pad: usize,
    relu: bool,
}

impl ConvOp {
    fn fwd(&self, x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(x.1.dims(), w.1.dims(), self.stride, self.pad)?;
        let xs = cpu_f32(x.0, x.1, OP, "input")?;
        let ws = cpu_f32(w.0, w.1, OP, "weight")?;
        let bs = match b {
            Some((s, l)) => {
                let v = cpu_f32(s, l, OP, "bias")?;
                if v.len() != g.o {
                    candle_core::bail!("conv2d: bias has {} entries for {} outputs", v.len(), g.o);
                }
                Some(v)
            }
            None => None,
        };
        let out = forward(&g, xs, ws, bs, self.relu);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd_tensors(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
        let need_x = x.track_op();
        let need_w = w.track_op();
        let need_b = b.is_some_and(Tensor::track_op);
        let mut operands = vec![(x, "input"), (w, "weight"), (grad, "output gradient")];
        if self.relu {
            operands.push((res, "output"));
        }
        let (gx, gw, gb) = with_f32(OP, &operands, |s| {
            let inputs = BackwardInputs { x: s[0], w: s[1], dout: s.get(3).map_or(GradIn::Plain, |r| GradIn::Relu(r)), grad: s[2], need_x, need_w, need_b };
            Ok(backward(&g, &inputs))
        })?;
        let dev = x.device();
        let gx = match gx {
            Some(v) => Some(Tensor::from_vec(v, x.shape(), dev)?),
            None => None,
        };
        let gw = if need_w { Some(Tensor::from_vec(gw, w.shape(), dev)?) } else { None };
        let gb = match b {
            Some(b) if need_b => Some(Tensor::from_vec(gb, b.shape(), dev)?),
            _ => None,
        };
        Ok((gx, gw, gb))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.bwd_tensors(x, w, None, res, grad)?;
        Ok((gx, gw))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.bwd_tensors(x, w, Some(b), res, grad)
    }
}

/// Whether the fast path handles these tensors (f32 on the CPU).
fn fast_path(tensors: &[Option<&Tensor>]) -> bool {
    let present: Vec<&Tensor> = tensors.iter().flatten().copied().collect();
    super::fast_cpu(&present)
}

/// `relu?(conv2d(x, w) + b)`: x N×C×H×W, w O×C×kh×kw, b of length O; symmetric stride and
/// padding, groups 1, dilation 1. im2col + GEMM on the CPU in f32, candle's `conv2d` otherwise.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize, apply_relu: bool) -> candle_core::Result<Tensor> {
    if !fast_path(&[Some(x), Some(w), b]) {
        return reference_conv2d(x, w, b, stride, padding, apply_relu);
    }
    let op = ConvOp { stride, pad: padding, relu: apply_relu };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The same computation from candle's own operations (the fallback, and the tests' reference).
pub fn reference_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize, apply_relu: bool) -> candle_core::Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    if apply_relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// A square-kernel convolution layer with the variables of `candle_nn::Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// `cin → cout` channels, `kernel`×`kernel`, with or without a bias; variables `weight`
    /// (cout×cin×k×k) and `bias` (cout) under `vb`, initialised as candle-nn does.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig { padding, stride, ..Default::default() };
        let layer = if bias { candle_nn::conv2d(cin, cout, kernel, cfg, vb)? } else { candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb)? };
        Ok(Conv { weight: layer.weight().clone(), bias: layer.bias().cloned(), stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.padding, false)
    }

    /// `relu(forward(x))`, fused on the CPU.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.padding, true)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(super) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (stride, padding).
    pub(super) fn geometry(&self) -> (usize, usize) {
        (self.stride, self.padding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};

    fn randn(rng: &mut Rng, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// max |a − b| ≤ tol · max(max |b|, 1).
    fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= tol * scale, "{what}: max diff {diff} (scale {scale})");
    }

    /// Values and gradients (w.r.t. input, weight, bias) of the fast op against candle's.
    fn check(shape: Case, bias: bool, relu: bool) {
        let (n, c, h, w, o, k, stride, pad) = shape;
        let mut rng = Rng::new((n * 1000 + c * 100 + k * 10 + stride + pad) as u64);
        let x = Var::from_tensor(&randn(&mut rng, &[n, c, h, w])).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[o, c, k, k])).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[o])).unwrap();
        let b_opt = bias.then_some(b.as_tensor());
        let fast = conv2d(x.as_tensor(), wt.as_tensor(), b_opt, stride, pad, relu).unwrap();
        let slow = reference_conv2d(x.as_tensor(), wt.as_tensor(), b_opt, stride, pad, relu).unwrap();
        let what = format!("{shape:?} bias {bias} relu {relu}");
        assert_close(&fast, &slow, 1e-5, &format!("{what}: values"));
        // A random linear functional of the output, so every output entry gets its own weight.
        let r = randn(&mut rng, slow.dims());
        let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("input", &x), ("weight", &wt)] {
            let (a, b) = (gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
            assert_close(a, b, 1e-4, &format!("{what}: grad {name}"));
        }
        if bias {
            let (a, bb) = (gf.get(b.as_tensor()).unwrap(), gs.get(b.as_tensor()).unwrap());
            assert_close(a, bb, 1e-4, &format!("{what}: grad bias"));
        } else {
            assert!(gf.get(b.as_tensor()).is_none());
        }
    }

    /// (n, c, h, w, o, k, stride, pad)
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const SHAPES: &[Case] = &[
        // (n, c, h, w, o, k, stride, pad)
        (1, 3, 9, 9, 5, 3, 1, 1),
        (5, 3, 9, 7, 5, 3, 2, 1),
        (5, 6, 10, 10, 7, 1, 1, 0),
        (1, 5, 8, 8, 3, 1, 2, 0),
        (5, 2, 12, 11, 9, 7, 1, 0),
        (5, 3, 8, 8, 5, 7, 2, 1),
        (1, 3, 14, 14, 6, 7, 7, 0),
        (5, 13, 7, 7, 11, 3, 2, 0),
        (5, 1, 6, 5, 3, 3, 1, 1),
        (2, 9, 5, 5, 10, 1, 1, 1),
        // "Same" stride-1 convolutions (the whole-plane shift path), down to 1×1 inputs.
        (2, 4, 9, 8, 6, 5, 1, 2),
        (1, 2, 10, 10, 3, 7, 1, 3),
        (5, 3, 1, 1, 4, 3, 1, 1),
        (2, 3, 2, 2, 4, 3, 1, 1),
        // Stride-2 downsampling (the phase-split direct path), 3×3 and 5×5. (candle's reference
        // input gradient gets some even sizes wrong; `direct`'s own tests cover those.)
        (3, 4, 8, 8, 6, 3, 2, 1),
        (2, 3, 11, 9, 4, 5, 2, 2),
        (2, 2, 3, 3, 3, 3, 2, 1),
    ];

    #[test]
    fn matches_candle_values_and_gradients() {
        for &shape in SHAPES {
            for (bias, relu) in [(false, false), (true, false), (true, true), (false, true)] {
                check(shape, bias, relu);
            }
        }
    }

    /// On CPUs with AVX2 the direct kernels take every stride-1 "same" and stride-2 3×3 layer,
    /// so the candle comparisons above do not reach the im2col path for those shapes; CPUs
    /// without AVX2 still use it. Both paths must agree (values and all three gradients).
    #[test]
    fn im2col_path_matches_the_direct_path() {
        let mut rng = Rng::new(21);
        let mut v = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        for (n, c, h, w, o, k, stride, pad) in [(3, 4, 9, 7, 6, 3, 1, 1), (2, 3, 8, 8, 5, 5, 1, 2), (3, 4, 9, 8, 6, 3, 2, 1), (2, 3, 14, 14, 8, 3, 2, 1)] {
            let g = Geom::new(&[n, c, h, w], &[o, c, k, k], stride, pad).unwrap();
            let Some(plan) = Plan::new(&g) else {
                eprintln!("skipped: no direct kernels on this CPU");
                return;
            };
            let (x, wt, b) = (v(n * c * h * w), v(o * c * k * k), v(o));
            let close = |a: &[f32], e: &[f32], what: &str| {
                let scale = e.iter().fold(1f32, |m, t| m.max(t.abs()));
                let diff = a.iter().zip(e).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-5 * scale, "{g:?} {what}: {diff} (scale {scale})");
            };
            let direct = forward_direct(&g, &plan, &x, &wt, Some(&b), true);
            close(&direct, &forward_im2col(&g, &x, &wt, Some(&b), true), "values");
            let grad = v(n * g.out_len());
            let inputs = BackwardInputs { x: &x, w: &wt, dout: GradIn::Relu(&direct), grad: &grad, need_x: true, need_w: true, need_b: true };
            let (dx, dw, db) = backward_direct(&g, &plan, &inputs);
            let (ix, iw, ib) = backward_im2col(&g, &inputs);
            close(&dx.unwrap(), &ix.unwrap(), "input gradient");
            close(&dw, &iw, "weight gradient");
            close(&db, &ib, "bias gradient");
        }
    }

    #[test]
    fn input_gradient_is_skipped_for_untracked_inputs() {
        let mut rng = Rng::new(3);
        let x = randn(&mut rng, &[2, 3, 6, 6]);
        let w = Var::from_tensor(&randn(&mut rng, &[4, 3, 3, 3])).unwrap();
        let y = conv2d(&x, w.as_tensor(), None, 1, 1, false).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(w.as_tensor()).is_some());
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        // The loss Σ r·conv(x, w) + b is linear in each of x, w and b, so central differences are
        // exact up to rounding; step 1e-2 keeps f32 rounding well below the tolerance.
        let mut rng = Rng::new(17);
        let (x0, w0, b0) = (randn(&mut rng, &[2, 2, 5, 4]), randn(&mut rng, &[3, 2, 3, 3]), randn(&mut rng, &[3]));
        let r = randn(&mut rng, &[2, 3, 3, 2]);
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
            let y = conv2d(x, w, Some(b), 2, 1, false).unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        let (xv, wv, bv) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap(), Var::from_tensor(&b0).unwrap());
        let grads = loss(xv.as_tensor(), wv.as_tensor(), bv.as_tensor()).backward().unwrap();
        let eps = 1e-2f32;
        for which in 0..3 {
            let base = [&x0, &w0, &b0][which];
            let analytic = grads.get([&xv, &wv, &bv][which].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let flat = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..flat.len() {
                let shifted = |d: f32| {
                    let mut v = flat.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, base.dims(), &Device::Cpu).unwrap();
                    let mut args = [x0.clone(), w0.clone(), b0.clone()];
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2]).to_scalar::<f32>().unwrap()
                };
                let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                let tol = 1e-2 * (1.0 + analytic[i].abs());
                assert!((fd - analytic[i]).abs() < tol, "arg {which} entry {i}: fd {fd} vs {}", analytic[i]);
            }
        }
    }

    #[test]
    fn layer_keeps_candle_variable_names() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        Conv::new(3, 4, 3, 1, 1, true, vb.pp("a")).unwrap();
        Conv::new(3, 4, 1, 2, 0, false, vb.pp("b")).unwrap();
        let data = vm.data().lock().unwrap();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["a.bias", "a.weight", "b.weight"]);
        assert_eq!(data["a.weight"].dims(), &[4, 3, 3, 3]);
    }

    /// Reports must not depend on `--jobs`: the same inputs give bit-identical values and
    /// gradients whatever the number of threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = |threads: usize| -> Vec<Vec<f32>> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut rng = Rng::new(5);
                let x = candle_core::Var::from_tensor(&randn(&mut rng, &[37, 3, 9, 9])).unwrap();
                let w = candle_core::Var::from_tensor(&randn(&mut rng, &[5, 3, 3, 3])).unwrap();
                let b = candle_core::Var::from_tensor(&randn(&mut rng, &[5])).unwrap();
                let y = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 2, 1, true).unwrap();
                let loss = y.sqr().unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                [y.flatten_all().unwrap(), grads.get(&x).unwrap().flatten_all().unwrap(), grads.get(&w).unwrap().flatten_all().unwrap(), grads.get(&b).unwrap().flatten_all().unwrap()]
                    .iter()
                    .map(|t| t.to_vec1::<f32>().unwrap())
                    .collect()
            })
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            let many = run(threads);
            for (a, b) in one.iter().zip(&many) {
                assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()), "{threads} threads differ from 1");
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Forward and backward time of the convolutions of the report backbones (batch 128),
    /// best of 5: [`forward`] and [`backward`] themselves on random slices, so candle's graph and
    /// the seeding of a gradient are not counted (through candle, the broadcast of the seed
    /// gradient takes up to 40 % of a layer's "backward"). The backward computes the weight gradient and, except for a first
    /// layer (one input channel: the images), the input gradient, as in the models. Run with
    /// `cargo test --lib -- --ignored --nocapture conv_layer_speed`;
    /// `REPRISE_CONV_LAYER=res.s2.conv1` times one layer only, best of 100 (for a profiler).
    #[test]
    #[ignore]
    fn conv_layer_speed() {
        let shapes: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
            // name, c, hw, o, k, stride, pad
            ("cnn.conv1", 1, 28, 32, 3, 1, 1),
            ("cnn.conv2", 32, 14, 64, 3, 1, 1),
            ("res.stem", 1, 28, 16, 3, 1, 1),
            ("res.s1", 16, 28, 16, 3, 1, 1),
            ("res.s2.conv1", 16, 28, 32, 3, 2, 1),
            ("res.s2.conv2", 32, 14, 32, 3, 1, 1),
            ("res.s2.short", 16, 28, 32, 1, 2, 0),
            ("res.s3.conv1", 32, 14, 64, 3, 2, 1),
            ("res.s3.conv2", 64, 7, 64, 3, 1, 1),
            ("conv4.b2", 32, 14, 32, 3, 1, 1),
        ];
        // As in the models: freed buffers stay in the heap (no page faults per allocation).
        super::super::alloc::keep_freed_memory();
        let only = std::env::var("REPRISE_CONV_LAYER").ok();
        let mut rng = crate::rng::Rng::new(7);
        let mut random = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| scale * rng.uniform(-1.0, 1.0) as f32).collect() };
        for &(name, c, hw, o, k, stride, pad) in shapes {
            if only.as_deref().is_some_and(|l| l != name) {
                continue;
            }
            let g = Geom::new(&[128, c, hw, hw], &[o, c, k, k], stride, pad).unwrap();
            let (x, w, dy) = (random(128 * c * hw * hw, 1.0), random(o * c * k * k, 0.1), random(128 * o * g.ho * g.wo, 1.0));
            let inputs = BackwardInputs { x: &x, w: &w, dout: GradIn::Plain, grad: &dy, need_x: c > 1, need_w: true, need_b: false };
            let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
            let reps = if only.is_some() { 100 } else { 5 };
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                let y = forward(&g, &x, &w, None, false);
                let t1 = std::time::Instant::now();
                let grads = backward(&g, &inputs);
                let t2 = std::time::Instant::now();
                std::hint::black_box((y, grads));
                fwd = fwd.min((t1 - t0).as_secs_f64());
                bwd = bwd.min((t2 - t1).as_secs_f64());
            }
            let gflop = 2.0 * 128.0 * (o * c * k * k * g.ho * g.wo) as f64 / 1e9;
            let products = if c > 1 { 2.0 } else { 1.0 };
            println!("{name:14} fwd {:7.2} ms ({:5.1} GFLOP/s)  bwd {:7.2} ms ({:5.1} GFLOP/s; {products} products)", fwd * 1e3, gflop / fwd, bwd * 1e3, products * gflop / bwd);
        }
    }
}
