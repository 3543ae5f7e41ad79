//! The CPU kernels of the models' layers: GEMM, im2col and direct convolutions, max-pooling,
//! BatchNorm, the fused linear layer and the transformer's fused operations, each a candle custom
//! op with its own backward pass over f32 slices.
//!
//! They have a folder of their own because they are a different kind of code from the
//! architectures beside them: SIMD (some of it `unsafe`), work split between threads, and sums in
//! a fixed order whose bits the cell keys rely on (a key does not name the thread count or the
//! CPU; the bit-identity tests and `verify --recompute` check it), where an architecture is a few
//! lines of plain candle. The folder stays under `models/` rather than at the crate root because
//! only the models call it: each op file ends in the layer the architectures use (`Conv`,
//! `conv_bn`, `Linear`, `BatchNorm2d`, `max_pool2d`, the functions of `fused`), which takes the
//! kernel for f32 tensors on the CPU ([`fast_cpu`]) and candle's own operations otherwise, so the
//! same models run with `--features cuda` and the tests compare both.
//!
//! * `matmul`: the GEMM over strided matrix views, split between threads with the same bits;
//! * `geom`: the sizes of one convolution, read by both convolution paths;
//! * `conv`: the convolution layer and op, im2col + GEMM for shapes `direct` does not take;
//! * `direct`: register-tiled AVX2 / AVX-512 convolutions on padded planes, no patch matrix;
//! * `conv_bn`: a convolution, training-mode BatchNorm and ReLU as one op;
//! * `pool`, `norm`, `linear`: max-pooling, BatchNorm (+ ReLU), linear (+ bias, ReLU);
//! * `fused`: LayerNorm, softmax, attention, GELU, residual add + ReLU;
//! * `alloc`: output buffers zeroed inside the parallel tasks, and glibc tuned so that freed
//!   activations are reused.
//!
//! `reprise bench` measures the result against PyTorch (bench/README.md).

/// Defines `fn $name` whose body runs compiled for AVX2 when the CPU has it, and as baseline
/// x86-64 (SSE2, 4-lane vectors) code otherwise. For the element-wise loops of the custom ops:
/// they use no fused multiply-add and sum in a fixed number of lanes, so wider vectors change
/// their speed, not their results (the bit-identity tests and recomputed reports check this).
/// Helpers the body calls must be `#[inline(always)]` to be compiled for AVX2 with it.
macro_rules! avx2_variant {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                // SAFETY: the CPU has AVX2 (detected above).
                return unsafe { avx2($($arg),*) };
            }
            imp($($arg),*)
        }
    };
}

pub mod alloc;
pub mod conv;
pub mod conv_bn;
mod direct;
pub mod fused;
mod geom;
pub mod linear;
mod matmul;
pub mod norm;
pub mod pool;

use candle_core::{DType, Tensor};

/// The f32 elements of a contiguous CPU storage, for the custom ops' kernels; `op` and `what`
/// name the operation and the operand in the error.
pub(crate) fn cpu_f32<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, op: &str, what: &str) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else { candle_core::bail!("{op}: the {what} must be f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the {what} must be contiguous"),
    }
}

/// The f32 elements of a tensor's storage, which must be on the CPU and contiguous.
pub(crate) fn storage_f32<'a>(s: &'a candle_core::Storage, l: &candle_core::Layout, op: &str, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => cpu_f32(c, l, op, what),
        _ => candle_core::bail!("{op}: the {what} is not on the CPU"),
    }
}

/// Run `f` on the contiguous f32 CPU data of `tensors` (each made contiguous first, a copy only if
/// it was not), given as (tensor, name); `op` and the name go into the error for a tensor that is
/// not f32 on the CPU. The custom ops' backward passes read their operands through this.
pub(crate) fn with_f32<R>(op: &str, tensors: &[(&Tensor, &str)], f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let owned: Vec<Tensor> = tensors.iter().map(|(t, _)| t.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(Tensor::storage_and_layout).collect();
    let slices: Vec<&[f32]> = guards.iter().zip(tensors).map(|((s, l), (_, what))| storage_f32(s, l, op, what)).collect::<candle_core::Result<_>>()?;
    f(&slices)
}

/// `if r > 0 { g } else { 0 }`, the gradient through a ReLU whose output is `r`, as a bit mask so
/// that the loops using it vectorise.
#[inline(always)]
pub(crate) fn relu_backward(g: f32, r: f32) -> f32 {
    f32::from_bits(g.to_bits() & u32::from(r > 0.0).wrapping_neg())
}

/// ReLU that keeps NaN (so a diverging run still shows a NaN loss).
#[inline(always)]
pub(super) fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// Whether the CPU kernels of this folder (conv, conv_bn, pool, norm, linear, fused) handle these
/// tensors: all f32 on the CPU. Otherwise the layers use candle's own operations.
pub(crate) fn fast_cpu(tensors: &[&Tensor]) -> bool {
    #[cfg(test)]
    if super::test_support::REFERENCE_OPS.with(std::cell::Cell::get) {
        return false;
    }
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}
