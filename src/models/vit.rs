//! A tiny Vision Transformer, the architecture of the document's final-norm ablation.
//!
//! Patch embedding is a conv with kernel = stride = patch, patch = H/4 (28×28 → 7, 8×8 → 2, so
//! 16 tokens for square inputs), embedding dim 64·m; a learned cls token and position embedding;
//! 2 pre-norm transformer blocks (4 heads, MLP 128·m with exact (erf) GELU); then the final
//! LayerNorm, applied only if `vit_final_norm` (otherwise identity, and its variables are not
//! created); features = the cls token (D = 64·m) → classifier (no bias). m = `width_mult`.
//!
//! Variables: `patch_embed.{weight,bias}`, `cls_token` (1×1×D), `pos_embed` (1×(T+1)×D),
//! `blocks.{0,1}.norm1.*`, `blocks.{0,1}.attn.qkv.*`, `blocks.{0,1}.attn.proj.*`,
//! `blocks.{0,1}.norm2.*`, `blocks.{0,1}.mlp.fc1.*`, `blocks.{0,1}.mlp.fc2.*`, `norm.*`
//! (only with the final norm), `classifier.weight`; `*` is `weight` and `bias`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::conv::Conv;
use super::kernels::fused;
use super::kernels::linear::Linear;
use super::{attention, classifier_weight, Classifier, LayerNorm, ModelConfig};

const DEPTH: usize = 2;
const HEADS: usize = 4;

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.proj.forward(&attention(&self.qkv.forward(x)?, self.heads)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(dim: usize, mlp: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let va = vb.pp("attn");
        let vm = vb.pp("mlp");
        Ok(Block {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: Attention { qkv: Linear::new(dim, 3 * dim, va.pp("qkv"))?, proj: Linear::new(dim, dim, va.pp("proj"))?, heads: HEADS },
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            fc1: Linear::new(dim, mlp, vm.pp("fc1"))?,
            fc2: Linear::new(mlp, dim, vm.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let h = fused::gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// Patch embedding, cls token, position embedding, pre-norm blocks, optional final norm.
#[derive(Debug, Clone)]
pub struct Vit {
    patch_embed: Conv,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    classifier: Tensor,
    dim: usize,
}

impl Vit {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let patch = cfg.height / 4;
        if patch == 0 || !cfg.height.is_multiple_of(patch) || !cfg.width.is_multiple_of(patch) {
            candle_core::bail!("vit: patch size H/4 = {patch} must divide the {}×{} input", cfg.height, cfg.width);
        }
        let tokens = (cfg.height / patch) * (cfg.width / patch);
        let dim = 64 * cfg.width_mult;
        let mlp = 128 * cfg.width_mult;
        let token_init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let blocks = (0..DEPTH).map(|i| Block::new(dim, mlp, vb.pp("blocks").pp(i))).collect::<candle_core::Result<Vec<_>>>()?;
        let norm = if cfg.vit_final_norm { Some(LayerNorm::new(dim, vb.pp("norm"))?) } else { None };
        Ok(Vit {
            patch_embed: Conv::new(cfg.channels, dim, patch, patch, 0, true, vb.pp("patch_embed"))?,
            cls_token: vb.get_with_hints((1, 1, dim), "cls_token", token_init)?,
            pos_embed: vb.get_with_hints((1, tokens + 1, dim), "pos_embed", token_init)?,
            blocks,
            norm,
            classifier: classifier_weight(cfg.num_classes, dim, vb)?,
            dim,
        })
    }
}

impl Vit {
    /// The tokens entering the first block, N×T×D.
    fn embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        // N×D×h×w → N×T×D
        let patches = self.patch_embed.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((n, 1, self.dim))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)
    }

    /// The cls token of N×T×D tokens, N×D.
    fn cls(h: &Tensor) -> candle_core::Result<Tensor> {
        h.narrow(1, 0, 1)?.squeeze(1)
    }

    /// The features from the last block's tokens: LayerNorm acts per token, so normalising only
    /// the cls token gives the same features.
    fn finish(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let cls = Self::cls(h)?;
        match &self.norm {
            Some(norm) => norm.forward(&cls),
            None => Ok(cls),
        }
    }
}

impl Classifier for Vit {
    fn features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let mut h = self.embed(x)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        self.finish(&h)
    }

    /// The cls token after each block; after the last, the features (normalised if the model
    /// has its final norm).
    fn layer_features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut h = self.embed(x)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            out.push(if i + 1 == self.blocks.len() { self.finish(&h)? } else { Self::cls(&h)? });
        }
        Ok(out)
    }

    fn classifier(&self) -> &Tensor {
        &self.classifier
    }

    fn feature_dim(&self) -> usize {
        self.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{test_support, ModelKind};

    #[test]
    fn shapes() {
        test_support::check_shapes(ModelKind::Vit, 64);
    }

    #[test]
    fn sgd_step_lowers_loss() {
        test_support::check_sgd_step_lowers_loss(ModelKind::Vit, 0.01);
    }

    #[test]
    fn final_norm_ablation_drops_the_norm() {
        let mut cfg = ModelConfig::new(ModelKind::Vit, 1, 8, 8, 3);
        let (vm, _) = test_support::build_seeded(&cfg, 1);
        assert!(vm.data().lock().unwrap().contains_key("norm.weight"));
        cfg.vit_final_norm = false;
        let (vm, model) = test_support::build_seeded(&cfg, 1);
        assert!(!vm.data().lock().unwrap().contains_key("norm.weight"));
        let (x, _) = test_support::batch(4, 1, 8, 8, 3);
        let f = model.features(&x, false).unwrap();
        // Without the norm the cls features are not standardised per row.
        let m = f.mean(1).unwrap().abs().unwrap().max_all().unwrap();
        assert!(m.to_scalar::<f32>().unwrap() > 1e-4);
    }
}
