//! The plain CNN: two conv/pool stages and a hidden linear layer, the convolutional baseline.
//!
//! conv3×3(C→32·m, pad 1) → ReLU → maxpool 2 → conv3×3(32·m→64·m, pad 1) → ReLU → maxpool 2 →
//! flatten → Linear(64·m·⌊H/4⌋·⌊W/4⌋, 128·m) → ReLU → features (D = 128·m) → classifier (no
//! bias), m = `width_mult`. A 28×28 input goes 28→14→7, an 8×8 one 8→4→2.
//! Variables: `conv1.{weight,bias}`, `conv2.{weight,bias}`, `fc.{weight,bias}`,
//! `classifier.weight`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::conv::Conv;
use super::kernels::linear::Linear;
use super::kernels::pool::max_pool2d;
use super::{classifier_weight, Classifier, ModelConfig};

/// Two conv/ReLU/max-pool stages, a hidden linear layer and a bias-free classifier.
#[derive(Debug, Clone)]
pub struct Cnn {
    conv1: Conv,
    conv2: Conv,
    fc: Linear,
    classifier: Tensor,
    dim: usize,
}

impl Cnn {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, w) = (cfg.height / 4, cfg.width / 4);
        if h == 0 || w == 0 {
            candle_core::bail!("cnn needs an input of at least 4×4, got {}×{}", cfg.height, cfg.width);
        }
        let c1 = 32 * cfg.width_mult;
        let c2 = 64 * cfg.width_mult;
        let dim = 128 * cfg.width_mult;
        Ok(Cnn {
            conv1: Conv::new(cfg.channels, c1, 3, 1, 1, true, vb.pp("conv1"))?,
            conv2: Conv::new(c1, c2, 3, 1, 1, true, vb.pp("conv2"))?,
            fc: Linear::new(c2 * h * w, dim, vb.pp("fc"))?,
            classifier: classifier_weight(cfg.num_classes, dim, vb)?,
            dim,
        })
    }
}

impl Classifier for Cnn {
    fn features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let h = max_pool2d(&self.conv1.forward_relu(x)?, 2)?;
        let h = max_pool2d(&self.conv2.forward_relu(&h)?, 2)?;
        self.fc.forward_relu(&h.flatten_from(1)?)
    }

    fn layer_features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Vec<Tensor>> {
        let h1 = max_pool2d(&self.conv1.forward_relu(x)?, 2)?;
        let h2 = max_pool2d(&self.conv2.forward_relu(&h1)?, 2)?;
        let f = self.fc.forward_relu(&h2.flatten_from(1)?)?;
        Ok(vec![super::channel_means(&h1)?, super::channel_means(&h2)?, f])
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
    use crate::models::{test_support, ModelKind};

    #[test]
    fn shapes() {
        test_support::check_shapes(ModelKind::Cnn, 128);
    }

    #[test]
    fn sgd_step_lowers_loss() {
        test_support::check_sgd_step_lowers_loss(ModelKind::Cnn, 0.01);
    }
}
