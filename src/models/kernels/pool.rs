//! Fast CPU max-pooling (kernel = stride) with a direct backward pass, as a candle custom op.
//!
//! candle 0.11 computes the max-pool gradient from tensor operations: upsample the output, compare
//! it with the input, average-pool the mask, upsample again and multiply, five passes and as many
//! temporaries over the largest activation of a CNN. This op scans each window once forward and
//! once backward.
//!
//! Which gradient: candle's formula gives each of the t tied maxima of a k×k window
//! grad·t/k², so a unique maximum receives grad/k² (a quarter of it for 2×2 pooling) rather than
//! the whole gradient that PyTorch (and the definition of the derivative) gives it. The models
//! keep candle's numbers ([`GRADIENT`] is [`PoolGradient::Candle`]), those of every method version
//! and committed report; [`PoolGradient::FirstMax`] is PyTorch's rule (the whole
//! gradient to the first maximum in row-major order). Changing [`GRADIENT`] changes the training
//! of every pooled model and so needs a new method version.
//!
//! Windows that do not fit are dropped (floor) in the forward pass as in candle and PyTorch; for
//! such inputs candle's backward misaligns its upsampled mask, so in `Candle` mode those inputs
//! go through candle's own op to keep its exact numbers. On other devices or dtypes
//! [`max_pool2d`] is candle's `max_pool2d`.

use super::alloc::par_zeroed;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// Position, within one H×W plane, of the first maximum of the k×k window at (oy, ox).
#[inline]
fn argmax(plane: &[f32], w: usize, k: usize, oy: usize, ox: usize) -> usize {
    let mut best = (oy * k) * w + ox * k;
    let mut best_v = plane[best];
    for i in 0..k {
        let row = (oy * k + i) * w + ox * k;
        for (j, &v) in plane[row..row + k].iter().enumerate() {
            if v > best_v {
                best_v = v;
                best = row + j;
            }
        }
    }
    best
}

/// How the gradient of a window's output is shared among the window's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolGradient {
    /// candle 0.11's rule: each of the t maxima receives grad·t/k².
    Candle,
    /// PyTorch's rule: the first maximum (row-major) receives the whole gradient.
    FirstMax,
}

/// The rule the models use (see the module documentation before changing it).
pub const GRADIENT: PoolGradient = PoolGradient::Candle;

/// Max-pooling with a k×k window and stride k.
#[derive(Debug, Clone, Copy)]
struct MaxPool {
    k: usize,
    gradient: PoolGradient,
}

/// (planes N·C, H, W, Ho, Wo) of a 4-d input, checking that at least one window fits.
fn pool_dims(dims: &[usize], k: usize) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let &[n, c, h, w] = dims else { candle_core::bail!("max_pool2d: expected a 4-d input, got {dims:?}") };
    if k == 0 || h < k || w < k {
        candle_core::bail!("max_pool2d: kernel {k} does not fit the {h}×{w} input");
    }
    Ok((n * c, h, w, h / k, w / k))
}

/// Planes per rayon task: a few tasks per thread, so that small planes do not cost a task each.
fn planes_per_task(planes: usize) -> usize {
    (planes / (rayon::current_num_threads() * 4)).max(1)
}

/// One output row of 2×2 pooling from input rows `r0` and `r1`.
#[inline]
fn pool2_row(r0: &[f32], r1: &[f32], out: &mut [f32]) {
    for ((o, a), b) in out.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
        *o = a[0].max(a[1]).max(b[0].max(b[1]));
    }
}

/// The gradient of one output row of 2×2 pooling: `d0`, `d1` (input rows, overwritten) from the
/// input rows, the pooled row `m` and its gradient `g`. With `avx2` (the CPU has it: see
/// [`has_avx2`]) candle's rule runs through [`avx2::unpool2_candle`], which gives the same bits
/// (every operation is exact or this code's own, in the same order).
#[inline]
#[allow(clippy::too_many_arguments)]
fn unpool2_row(rule: PoolGradient, avx2: bool, r0: &[f32], r1: &[f32], m: &[f32], g: &[f32], d0: &mut [f32], d1: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 && rule == PoolGradient::Candle {
        // SAFETY: the caller checked that the CPU has AVX2.
        unsafe { avx2::unpool2_candle(r0, r1, m, g, d0, d1) };
        return;
    }
    let _ = avx2;
    let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2)).zip(d0.chunks_exact_mut(2).zip(d1.chunks_exact_mut(2)));
    for ((((a, b), (da, db)), &mv), &gv) in windows.zip(m).zip(g) {
        let e = [a[0] == mv, a[1] == mv, b[0] == mv, b[1] == mv];
        let share = match rule {
            PoolGradient::Candle => {
                let ties = e.iter().filter(|&&t| t).count() as f32;
                let s = gv * (ties / 4.0);
                [s; 4]
            }
            PoolGradient::FirstMax => [gv; 4],
        };
        let take = match rule {
            PoolGradient::Candle => e,
            PoolGradient::FirstMax => {
                let f0 = e[0];
                let f1 = e[1] && !f0;
                let f2 = e[2] && !(f0 || f1);
                let f3 = e[3] && !(f0 || f1 || f2);
                [f0, f1, f2, f3]
            }
        };
        da[0] = if take[0] { share[0] } else { 0.0 };
        da[1] = if take[1] { share[1] } else { 0.0 };
        db[0] = if take[2] { share[2] } else { 0.0 };
        db[1] = if take[3] { share[3] } else { 0.0 };
    }
}

/// Whether [`unpool2_row`] may take the AVX2 path on this CPU.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::direct::avx::{load, store};
    use std::arch::x86_64::*;

    /// [`super::unpool2_row`] under candle's rule, four windows per step, the last step moved
    /// back to overlap the one before when four do not divide the row (it writes the same values
    /// again); rows of fewer than four windows take the scalar code. Each window's input pair is
    /// compared with its maximum duplicated into both lanes; the tie count is the sum of the 0/1
    /// lanes of both rows and of the neighbouring lane, exact in f32, and ·¼ is exact, so every
    /// result equals the scalar code's.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpool2_candle(r0: &[f32], r1: &[f32], m: &[f32], g: &[f32], d0: &mut [f32], d1: &mut [f32]) {
        let n = m.len();
        // What keeps every access of `step` inside the slices.
        assert!(g.len() == n && r0.len() == 2 * n && r1.len() == 2 * n, "unpool2: row lengths");
        assert!(d0.len() == 2 * n && d1.len() == 2 * n, "unpool2: row lengths");
        if n < 4 {
            return super::unpool2_row(super::PoolGradient::Candle, false, r0, r1, m, g, d0, d1);
        }
        let (one, quarter) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.25));
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for i in (0..n).step_by(4).map(|i| i.min(n - 4)) {
            let md = _mm256_permutevar8x32_ps(load4(m.as_ptr().wrapping_add(i)), dup);
            let gd = _mm256_permutevar8x32_ps(load4(g.as_ptr().wrapping_add(i)), dup);
            let ea = _mm256_cmp_ps::<_CMP_EQ_OQ>(load(r0.as_ptr().wrapping_add(2 * i)), md);
            let eb = _mm256_cmp_ps::<_CMP_EQ_OQ>(load(r1.as_ptr().wrapping_add(2 * i)), md);
            let both = _mm256_add_ps(_mm256_and_ps(ea, one), _mm256_and_ps(eb, one));
            let ties = _mm256_add_ps(both, _mm256_permute_ps::<0b10_11_00_01>(both));
            let share = _mm256_mul_ps(gd, _mm256_mul_ps(ties, quarter));
            store(d0.as_mut_ptr().wrapping_add(2 * i), _mm256_and_ps(ea, share));
            store(d1.as_mut_ptr().wrapping_add(2 * i), _mm256_and_ps(eb, share));
        }
    }

    /// An unaligned 4-lane vector in memory (see `direct::avx` on why not `_mm_loadu_ps`).
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned4(__m128);

    /// The four floats at `p` in the low half (the high half is not used).
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> __m256 {
        _mm256_castps128_ps256((*(p as *const Unaligned4)).0)
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (planes, h, w, ho, wo) = pool_dims(l.dims(), self.k)?;
        let CpuStorage::F32(v) = s else { candle_core::bail!("max_pool2d: fast path needs f32") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("max_pool2d: fast path needs a contiguous input") };
        let x = &v[a..b];
        let k = self.k;
        let per = planes_per_task(planes);
        let out = par_zeroed(planes * ho * wo, per * ho * wo, |t, os| {
            let xs = &x[t * per * h * w..];
            for (o, plane) in os.chunks_exact_mut(ho * wo).zip(xs.chunks_exact(h * w)) {
                for (oy, orow) in o.chunks_exact_mut(wo).enumerate() {
                    if k == 2 {
                        let r0 = &plane[2 * oy * w..2 * oy * w + 2 * wo];
                        let r1 = &plane[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo];
                        pool2_row(r0, r1, orow);
                    } else {
                        for (ox, ov) in orow.iter_mut().enumerate() {
                            *ov = plane[argmax(plane, w, k, oy, ox)];
                        }
                    }
                }
            }
        });
        let dims = l.dims();
        Ok((CpuStorage::F32(out), Shape::from((dims[0], dims[1], ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (planes, h, w, ho, wo) = pool_dims(arg.dims(), self.k)?;
        let (xc, rc, gc) = (arg.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let (xs, rs, gs) = (xc.storage_and_layout(), rc.storage_and_layout(), gc.storage_and_layout());
        let x = f32_slice(&xs.0, xs.1)?;
        let r = f32_slice(&rs.0, rs.1)?;
        let g = f32_slice(&gs.0, gs.1)?;
        let k = self.k;
        let rule = self.gradient;
        let avx2 = has_avx2();
        let per = planes_per_task(planes);
        let gx = par_zeroed(planes * h * w, per * h * w, |t, gxs| {
            let (xs, rs, gs) = (&x[t * per * h * w..], &r[t * per * ho * wo..], &g[t * per * ho * wo..]);
            let planes = gxs.chunks_exact_mut(h * w).zip(xs.chunks_exact(h * w));
            for ((gxp, plane), (rp, gp)) in planes.zip(rs.chunks_exact(ho * wo).zip(gs.chunks_exact(ho * wo))) {
                if k == 2 {
                    for oy in 0..ho {
                        let (top, bottom) = gxp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
                        unpool2_row(
                            rule,
                            avx2,
                            &plane[2 * oy * w..2 * oy * w + 2 * wo],
                            &plane[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo],
                            &rp[oy * wo..(oy + 1) * wo],
                            &gp[oy * wo..(oy + 1) * wo],
                            &mut top[..2 * wo],
                            &mut bottom[..2 * wo],
                        );
                    }
                } else {
                    unpool_generic(rule, plane, gp, gxp, w, k, ho, wo);
                }
            }
        });
        Ok(Some(Tensor::from_vec(gx, arg.shape(), arg.device())?))
    }
}

/// The gradient of one plane for any window size (`gxp` starts at zero).
#[allow(clippy::too_many_arguments)]
fn unpool_generic(rule: PoolGradient, plane: &[f32], gp: &[f32], gxp: &mut [f32], w: usize, k: usize, ho: usize, wo: usize) {
    for oy in 0..ho {
        for ox in 0..wo {
            let g = gp[oy * wo + ox];
            let best = argmax(plane, w, k, oy, ox);
            match rule {
                PoolGradient::FirstMax => gxp[best] += g,
                PoolGradient::Candle => {
                    let m = plane[best];
                    let window = |i: usize| (oy * k + i) * w + ox * k;
                    let ties = (0..k).map(|i| plane[window(i)..window(i) + k].iter().filter(|&&v| v == m).count()).sum::<usize>();
                    let share = g * (ties as f32 / (k * k) as f32);
                    for i in 0..k {
                        let row = window(i);
                        for (d, &v) in gxp[row..row + k].iter_mut().zip(&plane[row..row + k]) {
                            if v == m {
                                *d += share;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn f32_slice<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(v)) = s else { candle_core::bail!("max_pool2d: fast path needs f32 on the CPU") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("max_pool2d: fast path needs contiguous tensors"),
    }
}

/// Max-pooling with a `k`×`k` window and stride `k` over an N×C×H×W tensor, with the models'
/// gradient rule [`GRADIENT`].
pub fn max_pool2d(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    max_pool2d_with(x, k, GRADIENT)
}

/// Max-pooling with a chosen gradient rule.
pub fn max_pool2d_with(x: &Tensor, k: usize, gradient: PoolGradient) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let exact_fit = k > 0 && h % k == 0 && w % k == 0;
    let fast = super::fast_cpu(&[x]);
    match gradient {
        PoolGradient::Candle if !(fast && exact_fit) => x.max_pool2d(k),
        PoolGradient::FirstMax if !fast => candle_core::bail!("max_pool2d: the first-max gradient is implemented for f32 on the CPU only"),
        _ => x.contiguous()?.apply_op1(MaxPool { k, gradient }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    #[test]
    fn avx2_backward_row_matches_the_scalar_one_bit_for_bit() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2, so the scalar row is the only one");
            return;
        }
        let mut rng = Rng::new(11);
        // Values from a few levels, so that windows with 2, 3 and 4 tied maxima are common; a NaN
        // (equal to nothing) and signed zeros; every row length from empty to 2 full steps + 3.
        let levels = [-1.0f32, -0.0, 0.0, 0.5, 2.0, f32::NAN];
        for n in 0..=19usize {
            for _ in 0..20 {
                let mut pick = || levels[(rng.next_u64() % levels.len() as u64) as usize];
                let r0: Vec<f32> = (0..2 * n).map(|_| pick()).collect();
                let r1: Vec<f32> = (0..2 * n).map(|_| pick()).collect();
                let m: Vec<f32> = (0..n).map(|i| [r0[2 * i], r0[2 * i + 1], r1[2 * i], r1[2 * i + 1]]).map(|w| w.into_iter().fold(f32::NEG_INFINITY, f32::max)).collect();
                let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                let run = |fast: bool| {
                    let (mut d0, mut d1) = (vec![7f32; 2 * n], vec![7f32; 2 * n]);
                    let rule = PoolGradient::Candle;
                    unpool2_row(rule, fast, &r0, &r1, &m, &g, &mut d0, &mut d1);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (bits(&d0), bits(&d1))
                };
                assert_eq!(run(true), run(false), "{n} windows: {r0:?} {r1:?}");
            }
        }
    }

    #[test]
    fn matches_candle_values_and_gradients_without_ties() {
        let mut rng = Rng::new(5);
        for &(n, c, h, w, k) in &[(2usize, 3usize, 8usize, 8usize, 2usize), (1, 2, 7, 9, 2), (3, 1, 9, 6, 3)] {
            let v: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal() as f32).collect();
            let x = Var::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
            let fast = max_pool2d_with(x.as_tensor(), k, PoolGradient::FirstMax).unwrap();
            let slow = x.as_tensor().max_pool2d(k).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let d = (&fast - &slow).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            let r: Vec<f32> = (0..fast.elem_count()).map(|_| rng.normal() as f32).collect();
            let r = Tensor::from_vec(r, fast.dims(), &Device::Cpu).unwrap();
            let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gf = gf.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Reference: each window's maximum receives its output's gradient.
            let xs = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rs = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (ho, wo) = (h / k, w / k);
            let mut expect = vec![0f32; xs.len()];
            for p in 0..n * c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let idx = (0..k * k).map(|t| p * h * w + (oy * k + t / k) * w + ox * k + t % k).max_by(|&a, &b| xs[a].total_cmp(&xs[b])).unwrap();
                        expect[idx] += rs[p * ho * wo + oy * wo + ox];
                    }
                }
            }
            assert_eq!(gf, expect, "{n}x{c}x{h}x{w} k {k}");
        }
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum() {
        let x = Var::from_vec(vec![1f32, 1.0, 0.0, 1.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = max_pool2d_with(x.as_tensor(), 2, PoolGradient::FirstMax).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [1.0, 0.0, 0.0, 0.0]);
    }

    /// The models' default reproduces candle's own max-pool gradient exactly, ties included
    /// (inputs rounded to a coarse grid so that windows hold tied maxima).
    #[test]
    fn candle_mode_matches_candle_exactly() {
        let mut rng = Rng::new(9);
        for &(n, c, h, w, k) in &[(2usize, 3usize, 8usize, 8usize, 2usize), (1, 2, 7, 9, 2), (3, 2, 9, 6, 3)] {
            let v: Vec<f32> = (0..n * c * h * w).map(|_| (rng.normal() * 1.5).round() as f32).collect();
            let x = Var::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
            let fast = max_pool2d(x.as_tensor(), k).unwrap();
            let slow = x.as_tensor().max_pool2d(k).unwrap();
            let r: Vec<f32> = (0..fast.elem_count()).map(|_| rng.normal() as f32).collect();
            let r = Tensor::from_vec(r, fast.dims(), &Device::Cpu).unwrap();
            let grad = |y: &Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(), slow.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let (gf, gs) = (grad(&fast), grad(&slow));
            let diff = gf.iter().zip(&gs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-6, "{n}x{c}x{h}x{w} k {k}: {diff}");
        }
        // A unique maximum of a 2×2 window gets a quarter of the gradient (candle's rule).
        let x = Var::from_vec(vec![1f32, 2.0, 0.0, 3.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let g = max_pool2d(x.as_tensor(), 2).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [0.0, 0.0, 0.0, 0.25]);
    }
}
