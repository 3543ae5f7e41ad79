//! The MLP baseline: the simplest network whose features methods can inspect.
//!
//! flatten → Linear(C·H·W, 256·m) → ReLU → Linear(256·m, 128·m) → ReLU → features (D = 128·m)
//! → classifier (no bias), where m is `width_mult`.
//! Variables: `fc1.{weight,bias}`, `fc2.{weight,bias}`, `classifier.weight`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::linear::Linear;
use super::{classifier_weight, Classifier, ModelConfig};

/// Two hidden ReLU layers and a bias-free classifier.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    classifier: Tensor,
    dim: usize,
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let input = cfg.channels * cfg.height * cfg.width;
        let hidden = 256 * cfg.width_mult;
        let dim = 128 * cfg.width_mult;
        Ok(Mlp { fc1: Linear::new(input, hidden, vb.pp("fc1"))?, fc2: Linear::new(hidden, dim, vb.pp("fc2"))?, classifier: classifier_weight(cfg.num_classes, dim, vb)?, dim })
    }
}

impl Classifier for Mlp {
    fn features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward_relu(&x.flatten_from(1)?)?;
        self.fc2.forward_relu(&h)
    }

    fn layer_features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Vec<Tensor>> {
        let h = self.fc1.forward_relu(&x.flatten_from(1)?)?;
        let f = self.fc2.forward_relu(&h)?;
        Ok(vec![h, f])
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
        test_support::check_shapes(ModelKind::Mlp, 128);
    }

    #[test]
    fn sgd_step_lowers_loss() {
        test_support::check_sgd_step_lowers_loss(ModelKind::Mlp, 0.01);
    }
}
