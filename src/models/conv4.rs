//! Conv-4: the four-block convolutional backbone of the few-shot and imbalance literature.
//!
//! Reports compare against papers that use it, so it sits beside the CNN and the ResNet. Each of
//! the four blocks is conv3×3(→32·m, pad 1, no bias: the BatchNorm's shift replaces it) → BN →
//! ReLU → maxpool 2; the features are the flattened output of the last block and the classifier
//! has no bias, m = `width_mult`. A block whose input is smaller than 2×2 skips its pooling (a
//! 2×2 window would not fit), so a 28×28 input goes 28→14→7→3→1 and an 8×8 one 8→4→2→1→1, and both
//! give D = 32·m features. BatchNorm uses batch statistics (and updates its running statistics)
//! when `train` is true and the running statistics otherwise.
//!
//! Variables: `block{1,2,3,4}.conv.weight`, `block{1,2,3,4}.bn.*` (`weight`, `bias`,
//! `running_mean`, `running_var`), `classifier.weight`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::conv::Conv;
use super::kernels::conv_bn::conv_bn;
use super::kernels::norm::BatchNorm2d;
use super::kernels::pool::max_pool2d;
use super::{classifier_weight, Classifier, ModelConfig};

const BLOCKS: usize = 4;

#[derive(Debug, Clone)]
struct Block {
    conv: Conv,
    bn: BatchNorm2d,
    pool: bool,
}

/// Four conv/BN/ReLU/pool blocks and a bias-free classifier on the flattened output.
#[derive(Debug, Clone)]
pub struct Conv4 {
    blocks: Vec<Block>,
    classifier: Tensor,
    dim: usize,
}

impl Conv4 {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let width = 32 * cfg.width_mult;
        let (mut h, mut w) = (cfg.height, cfg.width);
        let mut cin = cfg.channels;
        let mut blocks = Vec::with_capacity(BLOCKS);
        for i in 0..BLOCKS {
            let vb = vb.pp(format!("block{}", i + 1));
            let pool = h >= 2 && w >= 2;
            if pool {
                (h, w) = (h / 2, w / 2);
            }
            blocks.push(Block {
                conv: Conv::new(cin, width, 3, 1, 1, false, vb.pp("conv"))?,
                // PyTorch defaults: eps 1e-5, momentum 0.1.
                bn: BatchNorm2d::new(width, vb.pp("bn"))?,
                pool,
            });
            cin = width;
        }
        let dim = width * h * w;
        Ok(Conv4 { blocks, classifier: classifier_weight(cfg.num_classes, dim, vb)?, dim })
    }
}

impl Classifier for Conv4 {
    fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for b in &self.blocks {
            h = conv_bn(&b.conv, &b.bn, &h, train, true)?;
            if b.pool {
                h = max_pool2d(&h, 2)?;
            }
        }
        h.flatten_from(1)
    }

    fn layer_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut out = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            h = conv_bn(&b.conv, &b.bn, &h, train, true)?;
            if b.pool {
                h = max_pool2d(&h, 2)?;
            }
            // The last block's maps, flattened, are the features.
            out.push(if i + 1 == self.blocks.len() { h.flatten_from(1)? } else { super::channel_means(&h)? });
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
        test_support::check_shapes(ModelKind::Conv4, 32);
    }

    #[test]
    fn sgd_step_lowers_loss() {
        test_support::check_sgd_step_lowers_loss(ModelKind::Conv4, 0.01);
    }

    #[test]
    fn variable_names() {
        let cfg = ModelConfig::new(ModelKind::Conv4, 3, 28, 28, 5);
        let (vm, _) = test_support::build_seeded(&cfg, 1);
        let data = vm.data().lock().unwrap();
        assert_eq!(data["block1.conv.weight"].dims(), &[32, 3, 3, 3]);
        assert_eq!(data["block4.conv.weight"].dims(), &[32, 32, 3, 3]);
        assert!(data.contains_key("block4.bn.running_var"));
        assert!(!data.contains_key("block1.conv.bias"));
        assert_eq!(data["classifier.weight"].dims(), &[5, 32]);
        assert_eq!(data.len(), 4 * 5 + 1);
    }
}
