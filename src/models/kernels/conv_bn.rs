//! A convolution followed by training-mode BatchNorm (and ReLU), as one CPU operation.
//!
//! As two operations, BatchNorm's backward pass writes a full-size gradient for the convolution's
//! output, candle's backward pass zero-fills a buffer of that size and adds the gradient into it,
//! and the convolution reads it again. Fused, the convolution computes each sample's output
//! gradient from the BatchNorm coefficients (dz = k1·dy + k2·z + k3 per channel) into a
//! per-thread buffer while the sample is in cache. The arithmetic is the same, element for
//! element, so the results are bit-identical to the two operations (tested).
//!
//! [`conv_bn`] takes the fused path for f32 tensors on the CPU in training mode with a bias-free
//! convolution; otherwise (evaluation mode, other devices) it calls the two layers in turn.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::conv::{self, BackwardInputs, Conv, GradIn};
use super::geom::Geom;
use super::norm::{self, BatchNorm2d, Dims, Stats};
use super::{cpu_f32, with_f32};

/// Names this module's operations in errors.
const OP: &str = "fused conv + batch-norm";

/// What the forward pass keeps for the backward pass and for the running statistics.
struct Saved {
    /// The convolution's output, BatchNorm's input.
    z: Vec<f32>,
    stats: Stats,
}

/// Inputs: x, the convolution's weight, and BatchNorm's weight and bias concatenated (2·O).
struct ConvBnOp {
    stride: usize,
    pad: usize,
    eps: f64,
    relu: bool,
    saved: Arc<OnceLock<Saved>>,
}

impl ConvBnOp {
    fn dims(&self, x: &[usize], w: &[usize]) -> candle_core::Result<(Geom, Dims)> {
        let g = Geom::new(x, w, self.stride, self.pad)?;
        let d = Dims::of(&[g.n, g.o, g.ho, g.wo])?;
        Ok((g, d))
    }
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "fused-conv-batch-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, d) = self.dims(l1.dims(), l2.dims())?;
        let x = cpu_f32(s1, l1, OP, "input")?;
        let w = cpu_f32(s2, l2, OP, "weight")?;
        let wb = cpu_f32(s3, l3, OP, "batch-norm weight and bias")?;
        if wb.len() != 2 * g.o {
            candle_core::bail!("{OP}: {} output channels but {} batch-norm parameters (expected weight and bias)", g.o, wb.len());
        }
        let z = conv::forward(&g, x, w, None, false);
        let stats = norm::batch_stats(d, &z);
        let out = norm::normalise(d, &z, &wb[..g.o], &wb[g.o..], self.eps, self.relu, &stats);
        // One forward per op instance (candle makes a new one per call).
        let _ = self.saved.set(Saved { z, stats });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(&self, x: &Tensor, w: &Tensor, wb: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else { candle_core::bail!("{OP}: backward before forward") };
        let (g, d) = self.dims(x.dims(), w.dims())?;
        let operands = [(x, "input"), (w, "weight"), (wb, "batch-norm weight and bias"), (grad, "output gradient"), (res, "output")];
        let (bn, (gx, gw, _)) = with_f32(OP, &operands, |s| {
            let (xs, ws, bs, gs, rs) = (s[0], s[1], s[2], s[3], s[4]);
            let z = &saved.z;
            let bn = norm::bn_grads(d, &saved.stats, self.eps, &bs[..g.o], gs, rs, z, self.relu);
            let inputs = BackwardInputs { x: xs, w: ws, dout: GradIn::BatchNorm { z, res: rs, coef: &bn.coef, relu: self.relu }, grad: gs, need_x: x.track_op(), need_w: w.track_op(), need_b: false };
            let grads = conv::backward(&g, &inputs);
            Ok((bn, grads))
        })?;
        let dev = x.device();
        let gx = gx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        let gw = w.track_op().then(|| Tensor::from_vec(gw, w.shape(), dev)).transpose()?;
        let gwb = wb
            .track_op()
            .then(|| {
                let mut v = bn.weight;
                v.extend_from_slice(&bn.bias);
                Tensor::from_vec(v, wb.shape(), dev)
            })
            .transpose()?;
        Ok((gx, gw, gwb))
    }
}

/// `bn(conv(x))`, then a ReLU if `relu`; with batch statistics (and a running-statistics update)
/// when `train`, as [`BatchNorm2d::forward`].
pub fn conv_bn(conv: &Conv, bn: &BatchNorm2d, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
    let (bw, bb, eps) = bn.affine()?;
    let fast = train && conv.bias().is_none() && x.rank() == 4 && super::fast_cpu(&[x, conv.weight(), bw, bb]);
    if !fast {
        return bn.forward(&conv.forward(x)?, train, relu);
    }
    let (stride, pad) = conv.geometry();
    let saved = Arc::new(OnceLock::new());
    let op = ConvBnOp { stride, pad, eps, relu, saved: saved.clone() };
    let wb = Tensor::cat(&[bw, bb], 0)?;
    let y = x.contiguous()?.apply_op3(&conv.weight().contiguous()?, &wb, op)?;
    let Some(s) = saved.get() else { candle_core::bail!("{OP}: the forward pass left no statistics") };
    bn.update_running(&s.stats, Dims::of(y.dims())?)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// The fused op gives exactly the values, gradients and running statistics of the two layers.
    #[test]
    fn fused_conv_bn_is_bit_identical_to_the_two_layers() {
        // (n, cin, hw, cout, kernel, stride)
        for &(n, cin, hw, cout, k, stride) in &[(3usize, 2usize, 9usize, 4usize, 3usize, 1usize), (2, 3, 10, 5, 3, 2), (2, 4, 8, 6, 1, 2), (9, 1, 6, 3, 3, 1)] {
            for relu in [false, true] {
                let what = format!("{n}x{cin}x{hw} → {cout}, k{k} s{stride}, relu {relu}");
                let mut rng = Rng::new((n * 1000 + cin * 100 + k * 10 + stride) as u64);
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
                let conv = Conv::new(cin, cout, k, stride, k / 2, false, vb.pp("conv")).unwrap();
                let bn = BatchNorm2d::new(cout, vb.pp("bn")).unwrap();
                {
                    let data = vm.data().lock().unwrap();
                    for name in ["bn.weight", "bn.bias"] {
                        let v: Vec<f32> = (0..cout).map(|_| rng.normal() as f32).collect();
                        data[name].set(&Tensor::from_vec(v, cout, &Device::Cpu).unwrap()).unwrap();
                    }
                }
                let xv: Vec<f32> = (0..n * cin * hw * hw).map(|_| rng.normal() as f32).collect();
                let x = Var::from_vec(xv, (n, cin, hw, hw), &Device::Cpu).unwrap();
                let snapshot = |vm: &VarMap| -> Vec<Vec<f32>> {
                    let data = vm.data().lock().unwrap();
                    ["bn.running_mean", "bn.running_var"].iter().map(|k| data[*k].as_tensor().to_vec1::<f32>().unwrap()).collect()
                };
                let start = snapshot(&vm);
                let reset = |vm: &VarMap| {
                    let data = vm.data().lock().unwrap();
                    for (k, v) in ["bn.running_mean", "bn.running_var"].iter().zip(&start) {
                        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
                        data[*k].set(&t).unwrap();
                    }
                };
                let run = |fused: bool| {
                    reset(&vm);
                    let y = if fused { conv_bn(&conv, &bn, x.as_tensor(), true, relu).unwrap() } else { bn.forward(&conv.forward(x.as_tensor()).unwrap(), true, relu).unwrap() };
                    let r = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu).unwrap().reshape(y.dims()).unwrap().affine(0.37, -1.0).unwrap().sin().unwrap();
                    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let data = vm.data().lock().unwrap();
                    let mut out = vec![y.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
                    out.push(grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap());
                    for name in ["conv.weight", "bn.weight", "bn.bias"] {
                        let g = grads.get(data[name].as_tensor()).unwrap();
                        out.push(g.flatten_all().unwrap().to_vec1().unwrap());
                    }
                    drop(data);
                    out.extend(snapshot(&vm));
                    out
                };
                let (fused, apart) = (run(true), run(false));
                let names = ["output", "input gradient", "conv weight gradient", "bn weight gradient", "bn bias gradient", "running mean", "running var"];
                for ((a, b), name) in fused.iter().zip(&apart).zip(names) {
                    assert_eq!(a.len(), b.len(), "{what}: {name} length");
                    let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{what}: {name} differs");
                }
                // And the running statistics moved (the update ran on the fused path).
                assert_ne!(fused[5], start[0], "{what}: running mean not updated");
            }
        }
    }
}
