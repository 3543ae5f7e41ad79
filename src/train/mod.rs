//! What turns a network and a batch into an update: the losses (with the class-prior
//! corrections the long-tail methods compare) and the optimisers, with PyTorch's update rules so
//! that hyper-parameters from papers carry over unchanged.

pub mod loss;
pub mod optim;
pub mod schedule;

pub use loss::{drift_penalty, loss, LossKind};
pub use optim::{OptimConfig, Optimizer, OptimizerKind};
