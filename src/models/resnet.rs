//! A small ResNet: the architecture with BatchNorm, whose train/eval behaviour differs.
//!
//! stem: conv3×3(C→16·m, pad 1, no bias) → BN → ReLU; then three stages of one basic block each
//! with 16·m, 32·m, 64·m channels (stride 1, 2, 2; a 1×1 conv + BN shortcut where the shape
//! changes, identity otherwise); global average pool → features (D = 64·m) → classifier (no bias).
//! A basic block is conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU.
//! BatchNorm uses batch statistics (and updates its running statistics) when `train` is true and
//! the running statistics otherwise.
//!
//! Variables: `stem.conv.weight`, `stem.bn.*`, `stage{1,2,3}.{conv1,conv2}.weight`,
//! `stage{1,2,3}.{bn1,bn2}.*`, `stage{2,3}.shortcut.conv.weight`, `stage{2,3}.shortcut.bn.*`,
//! `classifier.weight`, where `bn.*` is `weight`, `bias`, `running_mean`, `running_var`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::conv::Conv;
use super::kernels::conv_bn::conv_bn;
use super::kernels::fused;
use super::kernels::norm::BatchNorm2d;
use super::{classifier_weight, Classifier, ModelConfig};

fn conv(cin: usize, cout: usize, kernel: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    Conv::new(cin, cout, kernel, stride, kernel / 2, false, vb)
}

fn bn(channels: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm2d> {
    // PyTorch defaults: eps 1e-5, momentum 0.1.
    BatchNorm2d::new(channels, vb)
}

/// Convolution followed by BatchNorm.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv,
    bn: BatchNorm2d,
}

impl ConvBn {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, train, false)
    }

    /// `relu(forward(x))`, the ReLU fused into the BatchNorm.
    fn forward_relu(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        conv_bn(&self.conv, &self.bn, x, train, true)
    }
}

#[derive(Debug, Clone)]
struct BasicBlock {
    first: ConvBn,
    second: ConvBn,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let first = ConvBn { conv: conv(cin, cout, 3, stride, vb.pp("conv1"))?, bn: bn(cout, vb.pp("bn1"))? };
        let second = ConvBn { conv: conv(cout, cout, 3, 1, vb.pp("conv2"))?, bn: bn(cout, vb.pp("bn2"))? };
        let shortcut = if stride != 1 || cin != cout {
            let vs = vb.pp("shortcut");
            Some(ConvBn { conv: conv(cin, cout, 1, stride, vs.pp("conv"))?, bn: bn(cout, vs.pp("bn"))? })
        } else {
            None
        };
        Ok(BasicBlock { first, second, shortcut })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.first.forward_relu(x, train)?;
        let h = self.second.forward(&h, train)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x, train)?,
            None => x.clone(),
        };
        fused::add_relu(&h, &skip)
    }
}

/// Stem, three one-block stages, global average pooling and a bias-free classifier.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stages: Vec<BasicBlock>,
    classifier: Tensor,
    dim: usize,
}

impl ResNet {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let m = cfg.width_mult;
        let widths = [16 * m, 32 * m, 64 * m];
        let stem = ConvBn { conv: conv(cfg.channels, widths[0], 3, 1, vb.pp("stem").pp("conv"))?, bn: bn(widths[0], vb.pp("stem").pp("bn"))? };
        let mut stages = Vec::with_capacity(3);
        let mut cin = widths[0];
        for (i, &cout) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            stages.push(BasicBlock::new(cin, cout, stride, vb.pp(format!("stage{}", i + 1)))?);
            cin = cout;
        }
        let dim = widths[2];
        Ok(ResNet { stem, stages, classifier: classifier_weight(cfg.num_classes, dim, vb)?, dim })
    }
}

impl Classifier for ResNet {
    fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = self.stem.forward_relu(x, train)?;
        for block in &self.stages {
            h = block.forward(&h, train)?;
        }
        // Global average pool over H and W: N×D×H'×W' → N×D.
        super::channel_means(&h)
    }

    fn layer_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut h = self.stem.forward_relu(x, train)?;
        let mut out = vec![super::channel_means(&h)?];
        for block in &self.stages {
            h = block.forward(&h, train)?;
            out.push(super::channel_means(&h)?);
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
        test_support::check_shapes(ModelKind::Resnet, 64);
    }

    #[test]
    fn sgd_step_lowers_loss() {
        test_support::check_sgd_step_lowers_loss(ModelKind::Resnet, 0.01);
    }

    #[test]
    fn batch_norm_updates_running_stats_only_in_train_mode() {
        let cfg = ModelConfig::new(ModelKind::Resnet, 1, 8, 8, 3);
        let (vm, model) = test_support::build_seeded(&cfg, 5);
        let (x, _) = test_support::batch(6, 1, 8, 8, 3);
        let mean = || vm.data().lock().unwrap()["stem.bn.running_mean"].as_tensor().to_vec1::<f32>().unwrap();
        let m0 = mean();
        model.features(&x, false).unwrap();
        assert_eq!(mean(), m0);
        let eval_a = model.features(&x, false).unwrap();
        model.features(&x, true).unwrap();
        assert_ne!(mean(), m0);
        let eval_b = model.features(&x, false).unwrap();
        let d = (eval_a - eval_b).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() > 0.0);
    }
}
