//! A fused CPU linear layer: y = relu?(x·Wᵀ + b) as one GEMM with the bias and ReLU in its
//! output pass, and a backward pass that skips the input gradient when nothing needs it.
//!
//! candle-nn's `Linear` is a matmul, a broadcast bias add and (in the models) a separate ReLU,
//! and candle's matmul backward always computes both operands' gradients, so the first layer of a
//! network pays for an input gradient nobody reads (a quarter of the MLP's GEMM work). This op
//! computes the forward GEMM with the `gemm` crate, adds the bias and applies the ReLU in place,
//! and backward computes grad-input (gy·W, only when the input is tracked), grad-weight (gyᵀ·x)
//! and grad-bias (column sums). Inputs of any rank are flattened to rows. [`Linear`] creates its
//! variables through `candle_nn::linear` (same names, shapes and initialisation); on other devices
//! and dtypes it runs candle-nn's layer (and candle's ReLU).

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use super::matmul::{matmul_par, Mat};

use super::{cpu_f32, relu, relu_backward, with_f32};

/// Names this module's operations in errors.
const OP: &str = "fused linear";

/// x (N×K) · Wᵀ (W: O×K) + b, then ReLU if asked.
struct LinearOp {
    relu: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[n, k], &[o, k2]) = (l1.dims(), l2.dims()) else { candle_core::bail!("fused linear: expected 2-d input and weight, got {:?} and {:?}", l1.dims(), l2.dims()) };
        if k != k2 || l3.dims() != [o] {
            candle_core::bail!("fused linear: input {:?}, weight {:?}, bias {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let x = cpu_f32(s1, l1, OP, "input")?;
        let w = cpu_f32(s2, l2, OP, "weight")?;
        let b = cpu_f32(s3, l3, OP, "bias")?;
        let mut y = vec![0f32; n * o];
        matmul_par(&mut y, Mat::row_major(x, n, k), Mat::row_major(w, o, k).t(), false);
        if o > 0 {
            for row in y.chunks_exact_mut(o) {
                if self.relu {
                    row.iter_mut().zip(b).for_each(|(v, &bv)| *v = relu(*v + bv));
                } else {
                    row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let (o, _) = w.dims2()?;
        let mut operands = vec![(x, "input"), (w, "weight"), (grad, "output gradient")];
        if self.relu {
            operands.push((res, "output"));
        }
        with_f32(OP, &operands, |s| {
            let (xs, ws, gs) = (s[0], s[1], s[2]);
            let masked: Vec<f32>;
            let gy: &[f32] = if self.relu {
                masked = gs.iter().zip(s[3]).map(|(&g, &r)| relu_backward(g, r)).collect();
                &masked
            } else {
                gs
            };
            let dev = x.device();
            let gx = if x.track_op() {
                let mut gx = vec![0f32; n * k];
                matmul_par(&mut gx, Mat::row_major(gy, n, o), Mat::row_major(ws, o, k), false);
                Some(Tensor::from_vec(gx, (n, k), dev)?)
            } else {
                None
            };
            let gw = if w.track_op() {
                let mut gw = vec![0f32; o * k];
                matmul_par(&mut gw, Mat::row_major(gy, n, o).t(), Mat::row_major(xs, n, k), false);
                Some(Tensor::from_vec(gw, (o, k), dev)?)
            } else {
                None
            };
            let gb = if b.track_op() && o > 0 {
                let mut gb = vec![0f32; o];
                for row in gy.chunks_exact(o) {
                    gb.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
                Some(Tensor::from_vec(gb, o, dev)?)
            } else {
                None
            };
            Ok((gx, gw, gb))
        })
    }
}

/// A linear layer with a bias and the variables of `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// `input → output` features; variables `weight` (output×input) and `bias` (output).
    pub fn new(input: usize, output: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Linear { inner: candle_nn::linear(input, output, vb)? })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }

    /// `relu(forward(x))`, fused on the CPU.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, apply_relu: bool) -> candle_core::Result<Tensor> {
        let w = self.inner.weight();
        let Some(b) = self.inner.bias() else { candle_core::bail!("fused linear: the layer has no bias") };
        if !super::fast_cpu(&[x, w, b]) {
            let y = self.inner.forward(x)?;
            return if apply_relu { y.relu() } else { Ok(y) };
        }
        linear(x, w, b, apply_relu)
    }
}

/// relu?(x·Wᵀ + b) with the weight and bias passed as tensors (fast weights too): the fused op
/// on f32 CPU tensors, candle's matmul, bias add and ReLU elsewhere (f64 included). x has any
/// rank ≥ 1, its last dimension W's second.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, apply_relu: bool) -> candle_core::Result<Tensor> {
    if !super::fast_cpu(&[x, w, b]) || x.rank() == 0 {
        let y = x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?;
        return if apply_relu { y.relu() } else { Ok(y) };
    }
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let y = x2.apply_op3(w, b, LinearOp { relu: apply_relu })?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn matches_candle_linear_values_and_gradients() {
        let mut rng = Rng::new(8);
        for dims in [vec![5usize, 13], vec![3, 7, 13], vec![1, 13]] {
            for apply_relu in [false, true] {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
                let ours = Linear::new(13, 9, vb.pp("l")).unwrap();
                let n: usize = dims.iter().product();
                let x = Var::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), dims.as_slice(), &Device::Cpu).unwrap();
                let ya = ours.apply(x.as_tensor(), apply_relu).unwrap();
                let yb = ours.inner.forward(x.as_tensor()).unwrap();
                let yb = if apply_relu { yb.relu().unwrap() } else { yb };
                assert!(max_rel_diff(&ya, &yb) < 1e-5);
                let r: Vec<f32> = (0..ya.elem_count()).map(|_| rng.normal() as f32).collect();
                let r = Tensor::from_vec(r, ya.dims(), &Device::Cpu).unwrap();
                let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let w = ours.inner.weight();
                let b = ours.inner.bias().unwrap();
                for (i, t) in [x.as_tensor(), w, b].into_iter().enumerate() {
                    let d = max_rel_diff(ga.get(t).unwrap(), gb.get(t).unwrap());
                    assert!(d < 1e-4, "{dims:?} relu {apply_relu}: gradient {i}: {d}");
                }
            }
        }
    }

    #[test]
    fn untracked_input_gets_no_gradient() {
        let vm = VarMap::new();
        let l = Linear::new(4, 3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let g = l.forward(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(l.inner.weight()).is_some());
    }
}
