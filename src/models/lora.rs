//! LoRA adapters on a frozen Vision Transformer, for parameter-efficient fine-tuning (document 000).
//!
//! A LoRA-wrapped linear layer computes `h = W0 x + b0 + B (g ⊙ (A x))`, where `W0`, `b0` are the
//! frozen pretrained weights, `A` (R×in) and `B` (out×R) are the trainable adapter factors, and
//! `g` (length R) is a per-sample *gate*: the caller folds the usual LoRA scale `alpha/r` and any
//! learned factors into it (see `methods::class_aware_lora`), so plain LoRA is `g = (alpha/r)·1`.
//! `A` is drawn Kaiming-uniform as in the reference LoRA code (`kaiming_uniform_(a=√5)`, i.e.
//! U(−1/√in, 1/√in)) from a seeded [`Rng`] stream; `B` starts at zero, so an adapted network
//! starts exactly equal to the pretrained one.
//!
//! [`VitBackbone`] holds a ViT's weights as plain (non-variable) tensors, so they are frozen by
//! construction: no gradient is ever taken with respect to them and no optimiser sees them. Its
//! forward pass is written functionally — the adapter tensors are arguments — so that the
//! meta-learner can evaluate the network at perturbed adapter values (hypergradients by finite
//! differences of gradients). Every linear layer of every block (`attn.qkv`, `attn.proj`,
//! `mlp.fc1`, `mlp.fc2`) carries an adapter; the patch embedding (a convolution), the norms and the
//! tokens stay frozen.
//!
//! Two checkpoint layouts load into it: the engine's own ViT ([`super::vit`], names
//! `patch_embed.{weight,bias}`, `blocks.N.…`, `norm.…`) and timm's ViT layout as shipped for
//! ViT-B/16 (names `patch_embed.proj.{weight,bias}`, an optional `norm_pre.…` as in timm's CLIP
//! variants, `head.…` ignored). Depth, width, patch size and token count are read from the
//! tensors; the number of heads, the LayerNorm ε and the activation are given by the caller.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::attention;
use crate::rng::Rng;

/// The four adapted linear layers of a transformer block, in adapter order.
pub const ADAPTED: [&str; 4] = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"];

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: the engine's ViT and timm's ImageNet ViTs.
    Gelu,
    /// x·σ(1.702x): OpenAI CLIP's image towers.
    QuickGelu,
}

/// A frozen linear layer: y = x Wᵀ + b.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn in_dim(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `x` is N×T×in; the adapter, if any, is (A, B, gate) with the gate N×R (per sample) or 1×R.
    pub fn forward(&self, x: &Tensor, adapter: Option<(&Tensor, &Tensor, &Tensor)>) -> candle_core::Result<Tensor> {
        let mut y = x.broadcast_matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, gate)) = adapter {
            let z = x.broadcast_matmul(&a.t()?)?; // N×T×R
            let z = z.broadcast_mul(&gate.unsqueeze(1)?)?;
            y = (y + z.broadcast_matmul(&b.t()?)?)?;
        }
        Ok(y)
    }
}

/// LayerNorm weights (frozen).
#[derive(Debug, Clone)]
pub struct FrozenNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl FrozenNorm {
    fn forward(&self, x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct FrozenBlock {
    pub norm1: FrozenNorm,
    pub qkv: FrozenLinear,
    pub proj: FrozenLinear,
    pub norm2: FrozenNorm,
    pub fc1: FrozenLinear,
    pub fc2: FrozenLinear,
}

impl FrozenBlock {
    fn linears(&self) -> [&FrozenLinear; 4] {
        [&self.qkv, &self.proj, &self.fc1, &self.fc2]
    }
}

/// A frozen ViT: patch embedding, cls token, position embedding, optional pre-norm, blocks,
/// optional final norm; its features are the (normalised) cls token.
#[derive(Debug, Clone)]
pub struct VitBackbone {
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub norm_pre: Option<FrozenNorm>,
    pub blocks: Vec<FrozenBlock>,
    pub norm: Option<FrozenNorm>,
    pub heads: usize,
    pub eps: f64,
    pub activation: Activation,
}

/// How a checkpoint is laid out and the architecture facts it does not store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitLoadOptions {
    pub heads: usize,
    pub eps: f64,
    pub activation: Activation,
}

fn take(t: &HashMap<String, Tensor>, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    match t.get(name) {
        Some(x) => x.to_dtype(dtype)?.to_device(dev),
        None => candle_core::bail!("ViT checkpoint: tensor `{name}` is missing"),
    }
}

fn take_opt(t: &HashMap<String, Tensor>, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Option<Tensor>> {
    t.get(name).map(|x| x.to_dtype(dtype)?.to_device(dev)).transpose()
}

impl VitBackbone {
    /// Build from named tensors in either layout (see the module doc), cast to `dtype`.
    pub fn from_tensors(t: &HashMap<String, Tensor>, opts: VitLoadOptions, dtype: DType, dev: &Device) -> candle_core::Result<Self> {
        let prefix = if t.contains_key("patch_embed.proj.weight") { "patch_embed.proj" } else { "patch_embed" };
        let lin =
            |name: &str| -> candle_core::Result<FrozenLinear> { Ok(FrozenLinear { weight: take(t, &format!("{name}.weight"), dtype, dev)?, bias: take_opt(t, &format!("{name}.bias"), dtype, dev)? }) };
        let norm = |name: &str| -> candle_core::Result<Option<FrozenNorm>> {
            match (take_opt(t, &format!("{name}.weight"), dtype, dev)?, take_opt(t, &format!("{name}.bias"), dtype, dev)?) {
                (Some(weight), Some(bias)) => Ok(Some(FrozenNorm { weight, bias })),
                (None, None) => Ok(None),
                _ => candle_core::bail!("ViT checkpoint: `{name}` has a weight or a bias but not both"),
            }
        };
        let need = |name: &str| -> candle_core::Result<FrozenNorm> { norm(name)?.ok_or_else(|| candle_core::Error::Msg(format!("ViT checkpoint: norm `{name}` is missing"))) };
        let mut blocks = Vec::new();
        while t.contains_key(&format!("blocks.{}.attn.qkv.weight", blocks.len())) {
            let p = format!("blocks.{}", blocks.len());
            blocks.push(FrozenBlock {
                norm1: need(&format!("{p}.norm1"))?,
                qkv: lin(&format!("{p}.attn.qkv"))?,
                proj: lin(&format!("{p}.attn.proj"))?,
                norm2: need(&format!("{p}.norm2"))?,
                fc1: lin(&format!("{p}.mlp.fc1"))?,
                fc2: lin(&format!("{p}.mlp.fc2"))?,
            });
        }
        if blocks.is_empty() {
            candle_core::bail!("ViT checkpoint: no transformer blocks (`blocks.0.attn.qkv.weight` is missing)");
        }
        let v = VitBackbone {
            patch_weight: take(t, &format!("{prefix}.weight"), dtype, dev)?,
            patch_bias: take(t, &format!("{prefix}.bias"), dtype, dev)?,
            cls_token: take(t, "cls_token", dtype, dev)?,
            pos_embed: take(t, "pos_embed", dtype, dev)?,
            norm_pre: norm("norm_pre")?,
            blocks,
            norm: norm("norm")?,
            heads: opts.heads,
            eps: opts.eps,
            activation: opts.activation,
        };
        let d = v.dim();
        if opts.heads == 0 || !d.is_multiple_of(opts.heads) {
            candle_core::bail!("ViT checkpoint: width {d} is not divisible by {} heads", opts.heads);
        }
        if v.patch_weight.rank() != 4 || v.pos_embed.dims() != [1, v.tokens() + 1, d] {
            candle_core::bail!("ViT checkpoint: patch embedding {:?} and position embedding {:?} do not fit a square token grid", v.patch_weight.dims(), v.pos_embed.dims());
        }
        Ok(v)
    }

    /// Load a safetensors file's bytes.
    pub fn from_safetensors(bytes: &[u8], opts: VitLoadOptions, dtype: DType, dev: &Device) -> candle_core::Result<Self> {
        let t = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        Self::from_tensors(&t, opts, dtype, dev)
    }

    /// Embedding width D.
    pub fn dim(&self) -> usize {
        self.cls_token.dims().last().copied().unwrap_or(0)
    }
    pub fn patch(&self) -> usize {
        self.patch_weight.dims().get(2).copied().unwrap_or(0)
    }
    pub fn channels(&self) -> usize {
        self.patch_weight.dims().get(1).copied().unwrap_or(0)
    }
    /// Patch tokens T (without the cls token), read from the position embedding.
    pub fn tokens(&self) -> usize {
        self.pos_embed.dims().get(1).copied().unwrap_or(1).saturating_sub(1)
    }
    /// The square input side the backbone expects: √T · patch.
    pub fn input_side(&self) -> usize {
        (self.tokens() as f64).sqrt().round() as usize * self.patch()
    }

    /// Shapes (R×in, out×R) of the adapters, in adapter order: block by block, [`ADAPTED`] order.
    pub fn adapter_shapes(&self, rank: usize) -> Vec<((usize, usize), (usize, usize))> {
        self.blocks.iter().flat_map(|b| b.linears().map(|l| ((rank, l.in_dim()), (l.out_dim(), rank)))).collect()
    }

    /// Adapter names, in adapter order (`blocks.0.attn.qkv.lora_a`, `….lora_b`, …).
    pub fn adapter_names(&self) -> Vec<String> {
        (0..self.blocks.len()).flat_map(|i| ADAPTED.iter().flat_map(move |l| [format!("blocks.{i}.{l}.lora_a"), format!("blocks.{i}.{l}.lora_b")])).collect()
    }

    /// Initial adapters: A ~ U(−1/√in, 1/√in) from `Rng::derive(seed, "lora-init")`, B = 0.
    pub fn init_adapters(&self, rank: usize, seed: u64, dtype: DType, dev: &Device) -> candle_core::Result<Vec<Tensor>> {
        let mut rng = Rng::derive(seed, "lora-init");
        let mut out = Vec::new();
        for ((r, i), (o, r2)) in self.adapter_shapes(rank) {
            let bound = 1.0 / (i as f64).sqrt();
            let a: Vec<f64> = (0..r * i).map(|_| rng.uniform(-bound, bound)).collect();
            out.push(Tensor::from_vec(a, (r, i), dev)?.to_dtype(dtype)?);
            out.push(Tensor::zeros((o, r2), dtype, dev)?);
        }
        Ok(out)
    }

    /// Features (N×D) of images `x` (N×C×H×W). `adapters` are 2 per adapted layer in adapter
    /// order (or empty: the plain backbone); `gate` is N×R or 1×R.
    pub fn features(&self, x: &Tensor, adapters: &[Tensor], gate: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let d = self.dim();
        let with = !adapters.is_empty();
        if with && adapters.len() != 8 * self.blocks.len() {
            candle_core::bail!("LoRA ViT: {} adapter tensors for {} blocks (expected {})", adapters.len(), self.blocks.len(), 8 * self.blocks.len());
        }
        let p = self.patch();
        let patches = x.conv2d(&self.patch_weight, 0, p, 1, 1)?.broadcast_add(&self.patch_bias.reshape((1, d, 1, 1))?)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let mut h = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        if let Some(nrm) = &self.norm_pre {
            h = nrm.forward(&h, self.eps)?;
        }
        let ad = |bi: usize, li: usize| -> Option<(&Tensor, &Tensor, &Tensor)> { with.then(|| (&adapters[8 * bi + 2 * li], &adapters[8 * bi + 2 * li + 1], gate)) };
        for (bi, blk) in self.blocks.iter().enumerate() {
            // attention
            let qkv = blk.qkv.forward(&blk.norm1.forward(&h, self.eps)?, ad(bi, 0))?;
            let att = attention(&qkv, self.heads)?;
            h = (h + blk.proj.forward(&att, ad(bi, 1))?)?;
            // MLP
            let m = blk.fc1.forward(&blk.norm2.forward(&h, self.eps)?, ad(bi, 2))?;
            let m = match self.activation {
                Activation::Gelu => m.gelu_erf()?,
                Activation::QuickGelu => (&m * sigmoid(&(&m * 1.702)?)?)?,
            };
            h = (h + blk.fc2.forward(&m, ad(bi, 3))?)?;
        }
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        match &self.norm {
            Some(nrm) => nrm.forward(&cls, self.eps),
            None => Ok(cls),
        }
    }
}

/// σ(x) = 1/(1 + e^(−x)) from differentiable primitives.
pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{test_support, Classifier, ModelConfig, ModelKind};

    fn engine_vit_tensors(seed: u64) -> (HashMap<String, Tensor>, Box<dyn Classifier>) {
        let cfg = ModelConfig::new(ModelKind::Vit, 1, 8, 8, 3);
        let (vm, model) = test_support::build_seeded(&cfg, seed);
        let t = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        (t, model)
    }

    const ENGINE: VitLoadOptions = VitLoadOptions { heads: 4, eps: 1e-5, activation: Activation::Gelu };

    #[test]
    fn zero_b_reproduces_the_engine_vit_and_adapters_change_it() {
        let (t, model) = engine_vit_tensors(5);
        let vit = VitBackbone::from_tensors(&t, ENGINE, DType::F32, &Device::Cpu).unwrap();
        assert_eq!((vit.dim(), vit.patch(), vit.tokens(), vit.input_side(), vit.blocks.len()), (64, 2, 16, 8, 2));
        let (x, _) = test_support::batch(3, 1, 8, 8, 3);
        let reference = model.features(&x, false).unwrap();
        let gate = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        let mut ad = vit.init_adapters(4, 1, DType::F32, &Device::Cpu).unwrap();
        let ours = vit.features(&x, &ad, &gate).unwrap();
        let plain = vit.features(&x, &[], &gate).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&ours, &reference) < 1e-5, "{}", diff(&ours, &reference));
        assert!(diff(&plain, &reference) < 1e-5);
        // A nonzero B changes the features; a zero gate switches the adapter off again.
        ad[1] = Tensor::ones(ad[1].dims(), DType::F32, &Device::Cpu).unwrap();
        assert!(diff(&vit.features(&x, &ad, &gate).unwrap(), &reference) > 1e-3);
        let off = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(diff(&vit.features(&x, &ad, &off).unwrap(), &reference) < 1e-5);
    }

    #[test]
    fn lora_linear_matches_a_hand_computation() {
        // W0 = [[1, 2]], b0 = [0.5], A = [[1, 0], [0, 1]], B = [[3, 4]], gate = [0.5, 2]:
        // x = [1, 1] gives 1 + 2 + 0.5 + 3·0.5·1 + 4·2·1 = 13.
        let dev = Device::Cpu;
        let l = FrozenLinear { weight: Tensor::new(&[[1f64, 2.]], &dev).unwrap(), bias: Some(Tensor::new(&[0.5f64], &dev).unwrap()) };
        let a = Tensor::new(&[[1f64, 0.], [0., 1.]], &dev).unwrap();
        let b = Tensor::new(&[[3f64, 4.]], &dev).unwrap();
        let g = Tensor::new(&[[0.5f64, 2.]], &dev).unwrap();
        let x = Tensor::new(&[[[1f64, 1.]]], &dev).unwrap();
        let y = l.forward(&x, Some((&a, &b, &g))).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(y, vec![13.0]);
    }

    #[test]
    fn init_is_seeded_kaiming_uniform_with_zero_b() {
        let (t, _) = engine_vit_tensors(2);
        let vit = VitBackbone::from_tensors(&t, ENGINE, DType::F32, &Device::Cpu).unwrap();
        let a = vit.init_adapters(8, 3, DType::F32, &Device::Cpu).unwrap();
        let b = vit.init_adapters(8, 3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(vit.adapter_names().len(), 16);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let bound = 1.0 / (64f32).sqrt();
        let a0 = a[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a0.iter().all(|v| v.abs() <= bound) && a0.iter().any(|v| v.abs() > bound / 2.0));
        assert!(a[1].flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0));
    }
}
