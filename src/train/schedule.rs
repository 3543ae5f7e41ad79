//! Training-loop pieces beyond the optimiser's update: learning-rate schedules, gradient
//! clipping, and a loop counted in iterations (meta-learning's outer steps) rather than epochs.
//! Each follows PyTorch's definition, so a paper's settings carry over unchanged.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::methods::{EpochRecord, Progress};

/// A learning-rate schedule over steps (epochs or iterations, as the caller counts them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    /// PyTorch's `CosineAnnealingLR` with `eta_min = 0`: base · ½(1 + cos(π t / total)).
    Cosine {
        total: usize,
    },
    /// PyTorch's `StepLR`: base · gamma^⌊t / every⌋.
    Step {
        every: usize,
        gamma: f64,
    },
}

impl Schedule {
    /// The learning rate at step `t` (counted from 0) for base rate `base`.
    pub fn lr(&self, base: f64, t: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Cosine { total } => base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(total) as f64 / total.max(1) as f64).cos()),
            Schedule::Step { every, gamma } => base * gamma.powi((t / every.max(1)) as i32),
        }
    }
}

/// The gradients of `vars` in `grads` scaled so that their global L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: the factor is max_norm / (norm + 1e-6), applied only when below
/// 1). Returns the norm before clipping. Variables without a gradient are skipped.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * factor)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Every gradient element of `vars` clamped to [−clip, clip] (PyTorch's `clip_grad_value_`).
pub fn clip_grad_value(grads: &mut GradStore, vars: &[Var], clip: f64) -> candle_core::Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let clamped: Tensor = g.clamp(-clip, clip)?;
            grads.insert(v.as_tensor(), clamped);
        }
    }
    Ok(())
}

/// What one iteration of an [`Iterations`] loop reports.
pub enum Step {
    Continue,
    /// The run cannot go on (e.g. a non-finite loss): the reason.
    Stop(String),
}

/// A loop of `total` iterations that evaluates every `every` iterations and after the last,
/// recording each evaluation with its iteration number in `EpochRecord::epoch`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iterations {
    pub total: usize,
    pub every: usize,
}

impl Iterations {
    /// The iterations (1-based) after which [`Iterations::run`] evaluates.
    pub fn evaluated(&self) -> Vec<usize> {
        let every = self.every.max(1);
        (1..=self.total).filter(|i| i % every == 0 || *i == self.total).collect()
    }

    /// Run `step(i)` for i = 1..=total and `eval(i)` after each evaluated iteration, reporting
    /// progress per iteration. Returns the records and, if a step stopped the loop, its reason
    /// (the records hold the evaluations before it).
    pub fn run<E>(
        &self,
        progress: &dyn Progress,
        mut step: impl FnMut(usize) -> Result<Step, E>,
        mut eval: impl FnMut(usize) -> Result<EpochRecord, E>,
    ) -> Result<(Vec<EpochRecord>, Option<String>), E> {
        let every = self.every.max(1);
        let mut records = Vec::new();
        for i in 1..=self.total {
            if let Step::Stop(reason) = step(i)? {
                return Ok((records, Some(reason)));
            }
            if i % every == 0 || i == self.total {
                records.push(eval(i)?);
            }
            progress.epoch(i, self.total, "iterations");
        }
        Ok((records, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::BTreeMap;

    #[test]
    fn schedules_by_hand() {
        let step = Schedule::Step { every: 50, gamma: 0.5 };
        assert_eq!([0, 49, 50, 99, 100, 149].map(|t| step.lr(0.1, t)), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]);
        let cos = Schedule::Cosine { total: 4 };
        assert_eq!(cos.lr(1.0, 0), 1.0);
        assert!((cos.lr(1.0, 2) - 0.5).abs() < 1e-15);
        assert!((cos.lr(1.0, 1) - (0.5 + 0.5 * std::f64::consts::FRAC_1_SQRT_2)).abs() < 1e-15);
        assert_eq!(cos.lr(1.0, 4), 0.0);
        assert_eq!(Schedule::Constant.lr(0.3, 1000), 0.3);
    }

    fn grads_of(values: &[&[f64]]) -> (GradStore, Vec<Var>) {
        let vars: Vec<Var> = values.iter().map(|v| Var::from_slice(v, v.len(), &Device::Cpu).unwrap()).collect();
        // loss = Σ_k ⟨g_k, θ_k⟩ has gradient g_k at θ_k.
        let mut loss = Tensor::new(0f64, &Device::Cpu).unwrap();
        for (v, g) in vars.iter().zip(values) {
            let g = Tensor::from_slice(g, g.len(), &Device::Cpu).unwrap();
            loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        (loss.backward().unwrap(), vars)
    }

    fn grad(grads: &GradStore, v: &Var) -> Vec<f64> {
        grads.get(v.as_tensor()).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn norm_clipping_scales_all_gradients_by_one_factor() {
        // Norm of [3, 4] and [12] together: √(9 + 16 + 144) = 13.
        let (mut g, vars) = grads_of(&[&[3.0, 4.0], &[12.0]]);
        let norm = clip_grad_norm(&mut g, &vars, 1.0).unwrap();
        assert_eq!(norm, 13.0);
        let f = 1.0 / (13.0 + 1e-6);
        assert_eq!(grad(&g, &vars[0]), vec![3.0 * f, 4.0 * f]);
        assert_eq!(grad(&g, &vars[1]), vec![12.0 * f]);
        // Below the limit nothing changes.
        let (mut g, vars) = grads_of(&[&[0.3, 0.4]]);
        assert_eq!(clip_grad_norm(&mut g, &vars, 1.0).unwrap(), 0.5);
        assert_eq!(grad(&g, &vars[0]), vec![0.3, 0.4]);
    }

    #[test]
    fn value_clipping_clamps_each_element() {
        let (mut g, vars) = grads_of(&[&[-5.0, 2.0, 3.5]]);
        clip_grad_value(&mut g, &vars, 3.0).unwrap();
        assert_eq!(grad(&g, &vars[0]), vec![-3.0, 2.0, 3.0]);
    }

    struct Count(std::sync::Mutex<Vec<(usize, usize)>>);

    impl Progress for Count {
        fn epoch(&self, done: usize, total: usize, _: &str) {
            self.0.lock().unwrap().push((done, total));
        }
    }

    #[test]
    fn an_iteration_loop_evaluates_on_its_schedule_and_stops_on_request() {
        let record = |i: usize| Ok::<_, String>(EpochRecord { epoch: i, metrics: BTreeMap::new(), per_class: Vec::new(), analysis_object: String::new(), per_task: Vec::new() });
        let progress = Count(Default::default());
        let looped = Iterations { total: 25, every: 10 };
        assert_eq!(looped.evaluated(), vec![10, 20, 25]);
        let (records, stopped) = looped.run(&progress, |_| Ok(Step::Continue), record).unwrap();
        assert_eq!(records.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![10, 20, 25]);
        assert_eq!(stopped, None);
        assert_eq!(progress.0.lock().unwrap().len(), 25);
        let (records, stopped) = looped.run(&progress, |i| Ok(if i == 15 { Step::Stop("loss is NaN".into()) } else { Step::Continue }), record).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(stopped.as_deref(), Some("loss is NaN"));
    }
}
