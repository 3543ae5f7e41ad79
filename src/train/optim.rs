//! Optimisers with PyTorch's update rules (SGD with momentum, Adam, AdamW, RMSprop).
//!
//! Papers quote PyTorch hyper-parameters; reproducing them needs the same update equations,
//! including PyTorch's quirks (SGD's momentum buffer starts at the first gradient, Adam's weight
//! decay is an L2 term added to the gradient while AdamW's is decoupled, RMSprop adds eps outside
//! the square root). candle-nn ships only SGD without momentum and AdamW, hence this module.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

/// Which update rule to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
    Rmsprop,
}

/// Optimiser hyper-parameters. In a spec only `kind` and `lr` are required; the other fields
/// default to PyTorch's values for that kind (see each field).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawOptimConfig")]
pub struct OptimConfig {
    /// Update rule (required).
    pub kind: OptimizerKind,
    /// Learning rate (required, ≥ 0).
    pub lr: f64,
    /// Momentum for SGD and RMSprop (ignored by Adam/AdamW). Default 0.9 for SGD, 0 for RMSprop.
    pub momentum: f64,
    /// Weight decay: an L2 term wd·θ added to the gradient for SGD, Adam and RMSprop, decoupled
    /// (θ ← θ − lr·wd·θ) for AdamW. Default 0, except 0.01 for AdamW (PyTorch's defaults).
    pub weight_decay: f64,
    /// Adam/AdamW first-moment decay. Default 0.9.
    pub beta1: f64,
    /// Adam/AdamW second-moment decay. Default 0.999.
    pub beta2: f64,
    /// Denominator guard for Adam, AdamW and RMSprop. Default 1e-8.
    pub eps: f64,
    /// RMSprop smoothing constant of the squared-gradient average. Default 0.99.
    pub alpha: f64,
}

/// The serialised form, with optional fields filled per kind and values validated.
#[derive(serde::Deserialize)]
struct RawOptimConfig {
    kind: OptimizerKind,
    lr: f64,
    momentum: Option<f64>,
    weight_decay: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    alpha: Option<f64>,
}

impl TryFrom<RawOptimConfig> for OptimConfig {
    type Error = String;

    fn try_from(raw: RawOptimConfig) -> Result<Self, String> {
        let d = OptimConfig::new(raw.kind, raw.lr);
        let cfg = OptimConfig {
            kind: raw.kind,
            lr: raw.lr,
            momentum: raw.momentum.unwrap_or(d.momentum),
            weight_decay: raw.weight_decay.unwrap_or(d.weight_decay),
            beta1: raw.beta1.unwrap_or(d.beta1),
            beta2: raw.beta2.unwrap_or(d.beta2),
            eps: raw.eps.unwrap_or(d.eps),
            alpha: raw.alpha.unwrap_or(d.alpha),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl OptimConfig {
    /// `kind` with learning rate `lr` and PyTorch's defaults for everything else.
    pub fn new(kind: OptimizerKind, lr: f64) -> Self {
        OptimConfig {
            kind,
            lr,
            momentum: if kind == OptimizerKind::Sgd { 0.9 } else { 0.0 },
            weight_decay: if kind == OptimizerKind::Adamw { 0.01 } else { 0.0 },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            alpha: 0.99,
        }
    }

    /// SGD with momentum 0.9, no weight decay.
    pub fn sgd(lr: f64) -> Self {
        Self::new(OptimizerKind::Sgd, lr)
    }

    /// Adam with β = (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> Self {
        Self::new(OptimizerKind::Adam, lr)
    }

    /// AdamW with β = (0.9, 0.999), eps 1e-8, decoupled weight decay 0.01.
    pub fn adamw(lr: f64) -> Self {
        Self::new(OptimizerKind::Adamw, lr)
    }

    /// RMSprop with α 0.99, eps 1e-8, no momentum, no weight decay.
    pub fn rmsprop(lr: f64) -> Self {
        Self::new(OptimizerKind::Rmsprop, lr)
    }

    /// Check that every hyper-parameter is in its valid range.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str, v: f64| {
            if ok {
                Ok(())
            } else {
                Err(format!("optimizer: {what} = {v} is out of range"))
            }
        };
        check(self.lr.is_finite() && self.lr >= 0.0, "lr", self.lr)?;
        check(self.momentum.is_finite() && self.momentum >= 0.0, "momentum", self.momentum)?;
        check(self.weight_decay.is_finite() && self.weight_decay >= 0.0, "weight_decay", self.weight_decay)?;
        check((0.0..1.0).contains(&self.beta1), "beta1", self.beta1)?;
        check((0.0..1.0).contains(&self.beta2), "beta2", self.beta2)?;
        check(self.eps.is_finite() && self.eps > 0.0, "eps", self.eps)?;
        check((0.0..1.0).contains(&self.alpha), "alpha", self.alpha)
    }
}

/// Per-variable optimiser state.
struct Slot {
    var: Var,
    /// Updates applied to this variable so far (PyTorch counts steps per parameter).
    steps: u64,
    /// SGD/RMSprop momentum buffer, or Adam's first moment.
    first: Option<Tensor>,
    /// Adam's second moment or RMSprop's squared-gradient average.
    second: Option<Tensor>,
}

/// An optimiser over a fixed set of variables.
pub struct Optimizer {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    /// Update f32 CPU variables of SGD in place (see [`sgd_in_place`]); off only in the test
    /// that compares it with the tensor-operation path.
    in_place: bool,
}

impl Optimizer {
    /// An optimiser updating `vars` with the rule and hyper-parameters in `cfg`.
    pub fn new(vars: Vec<Var>, cfg: &OptimConfig) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let slots = vars.into_iter().map(|var| Slot { var, steps: 0, first: None, second: None }).collect();
        Ok(Optimizer { cfg: cfg.clone(), slots, in_place: true })
    }

    /// Apply one update to every variable that has a gradient in `grads`; the others (e.g.
    /// BatchNorm running statistics) are left alone and keep their step count.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let cfg = &self.cfg;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let theta = slot.var.as_detached_tensor();
            let mut g = grad.detach();
            slot.steps += 1;
            let new_theta = match cfg.kind {
                OptimizerKind::Sgd if self.in_place && in_place_ok(&theta, &g, slot.first.as_ref()) => {
                    sgd_in_place(&theta, &g, &mut slot.first, cfg)?;
                    continue;
                }
                OptimizerKind::Sgd => {
                    if cfg.weight_decay != 0.0 {
                        g = (g + (&theta * cfg.weight_decay)?)?;
                    }
                    if cfg.momentum != 0.0 {
                        let b = match &slot.first {
                            None => g,
                            Some(b) => ((b * cfg.momentum)? + g)?,
                        };
                        slot.first = Some(b.clone());
                        g = b;
                    }
                    (theta - (g * cfg.lr)?)?
                }
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let theta = if cfg.kind == OptimizerKind::Adamw {
                        (&theta * (1.0 - cfg.lr * cfg.weight_decay))?
                    } else {
                        if cfg.weight_decay != 0.0 {
                            g = (g + (&theta * cfg.weight_decay)?)?;
                        }
                        theta
                    };
                    let m = match &slot.first {
                        None => (&g * (1.0 - cfg.beta1))?,
                        Some(m) => ((m * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?,
                    };
                    let v = match &slot.second {
                        None => (g.sqr()? * (1.0 - cfg.beta2))?,
                        Some(v) => ((v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?,
                    };
                    let t = slot.steps as i32;
                    let bc1 = 1.0 - cfg.beta1.powi(t);
                    let bc2 = 1.0 - cfg.beta2.powi(t);
                    // PyTorch: denom = √v / √bc2 + eps; θ −= (lr / bc1) · m / denom.
                    let denom = ((v.sqrt()? * (1.0 / bc2.sqrt()))? + cfg.eps)?;
                    let update = (m.div(&denom)? * (cfg.lr / bc1))?;
                    slot.first = Some(m);
                    slot.second = Some(v);
                    (theta - update)?
                }
                OptimizerKind::Rmsprop => {
                    if cfg.weight_decay != 0.0 {
                        g = (g + (&theta * cfg.weight_decay)?)?;
                    }
                    let sq = match &slot.second {
                        None => (g.sqr()? * (1.0 - cfg.alpha))?,
                        Some(s) => ((s * cfg.alpha)? + (g.sqr()? * (1.0 - cfg.alpha))?)?,
                    };
                    let scaled = g.div(&(sq.sqrt()? + cfg.eps)?)?;
                    slot.second = Some(sq);
                    let step = if cfg.momentum != 0.0 {
                        // PyTorch starts this buffer at zero, so its first value is `scaled`.
                        let b = match &slot.first {
                            None => scaled,
                            Some(b) => ((b * cfg.momentum)? + scaled)?,
                        };
                        slot.first = Some(b.clone());
                        b
                    } else {
                        scaled
                    };
                    (theta - (step * cfg.lr)?)?
                }
            };
            slot.var.set(&new_theta)?;
        }
        Ok(())
    }

    /// Change the learning rate (for schedules); the optimiser state is kept.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// The hyper-parameters in use (with the current learning rate).
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// `loss.backward()` then [`Optimizer::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}

/// Whether SGD can update this variable in place: f32 tensors on the CPU, contiguous, of one
/// shape (other devices and dtypes take the tensor-operation path).
fn in_place_ok(theta: &Tensor, g: &Tensor, buffer: Option<&Tensor>) -> bool {
    let ok = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() && t.shape() == theta.shape();
    ok(theta) && ok(g) && buffer.is_none_or(ok)
}

/// SGD's update without temporary tensors: one pass over the momentum buffer, one over the
/// variable. The arithmetic is that of the tensor-operation path, operation for operation
/// (candle's scalar multiply is `x * c + 0`, kept here because `+ 0` turns −0 into +0), so both
/// give the same bits; a test checks it.
fn sgd_in_place(theta: &Tensor, g: &Tensor, first: &mut Option<Tensor>, cfg: &OptimConfig) -> candle_core::Result<()> {
    let (lr, momentum, wd) = (cfg.lr as f32, cfg.momentum as f32, cfg.weight_decay as f32);
    let decay = cfg.weight_decay != 0.0;
    if cfg.momentum == 0.0 {
        return theta.inplace_op2(g, &Descend { lr, wd: decay.then_some(wd) });
    }
    match first {
        Some(b) => {
            b.inplace_op3(g, theta, &Momentum { momentum, wd: decay.then_some(wd) })?;
            theta.inplace_op2(b, &Descend { lr, wd: None })
        }
        None => {
            // PyTorch's buffer starts at the first (decayed) gradient; a copy of its own, since
            // later steps update it in place.
            let b = if decay { (g + (theta * cfg.weight_decay)?)? } else { g.copy()? };
            theta.inplace_op2(&b, &Descend { lr, wd: None })?;
            *first = Some(b);
            Ok(())
        }
    }
}

/// Variables of at least this many elements are updated on all of rayon's threads.
const PAR_UPDATE_MIN: usize = 1 << 16;

/// `f(dst[i], a[i], b[i])` for every i, in chunks on rayon's threads for large variables (an MLP's
/// first layer has 400 Ki weights: updated on one thread, the other core waited). Element by
/// element, so the result does not depend on the split.
fn par_update(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(&mut f32, f32, f32) + Sync) {
    const CHUNK: usize = 1 << 14;
    let run = |(d, (a, b)): (&mut [f32], (&[f32], &[f32]))| d.iter_mut().zip(a.iter().zip(b)).for_each(|(d, (&a, &b))| f(d, a, b));
    if dst.len() >= PAR_UPDATE_MIN && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(run);
    } else {
        run((dst, (a, b)));
    }
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("sgd: the variable must be a contiguous f32 tensor"),
    }
}

/// θ ← θ − lr·(d + wd·θ), where d is the second operand (the gradient or the momentum buffer).
struct Descend {
    lr: f32,
    wd: Option<f32>,
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "sgd-descend"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let d = crate::models::kernels::cpu_f32(s2, l2, "sgd", "update")?;
        let theta = f32_mut(s1, l1)?;
        let lr = self.lr;
        match self.wd {
            None => par_update(theta, d, d, |t, d, _| *t -= d * lr + 0.0),
            Some(wd) => par_update(theta, d, d, |t, d, _| {
                let g = d + (*t * wd + 0.0);
                *t -= g * lr + 0.0
            }),
        }
        Ok(())
    }
}

/// b ← momentum·b + (g + wd·θ), with operands (b; g, θ).
struct Momentum {
    momentum: f32,
    wd: Option<f32>,
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<()> {
        let g = crate::models::kernels::cpu_f32(s2, l2, "sgd", "gradient")?;
        let theta = crate::models::kernels::cpu_f32(s3, l3, "sgd", "variable")?;
        let b = f32_mut(s1, l1)?;
        let m = self.momentum;
        match self.wd {
            None => par_update(b, g, theta, |b, g, _| *b = (*b * m + 0.0) + g),
            Some(wd) => par_update(b, g, theta, |b, g, t| *b = (*b * m + 0.0) + (g + (t * wd + 0.0))),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Run `steps` updates of θ (starting at `theta0`) with the fixed gradient `grad`
    /// (the gradient of the loss θ·grad), returning θ after each step.
    fn run(cfg: &OptimConfig, theta0: &[f64], grad: &[f64], steps: usize) -> Vec<Vec<f64>> {
        let var = Var::new(theta0, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![var.clone()], cfg).unwrap();
        let g = Tensor::new(grad, &Device::Cpu).unwrap();
        (0..steps)
            .map(|_| {
                let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
                var.as_tensor().to_vec1::<f64>().unwrap()
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    /// The in-place SGD gives the bits of the tensor-operation path, with and without momentum
    /// and weight decay, over several steps (first step included), on values that include −0.
    #[test]
    fn sgd_in_place_matches_tensor_operations_bit_for_bit() {
        // 1000: one pass on the calling thread; the larger size is updated in parallel chunks
        // (with a partial last chunk) inside a pool of two threads.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for n in [1000, 2 * PAR_UPDATE_MIN + 37] {
            pool.install(|| sgd_in_place_matches_tensor_operations(n));
        }
    }

    fn sgd_in_place_matches_tensor_operations(n: usize) {
        let mut rng = crate::rng::Rng::new(7);
        let theta0: Vec<f32> = (0..n).map(|i| if i % 97 == 0 { -0.0 } else { rng.next_f64() as f32 * 2.0 - 1.0 }).collect();
        let grads: Vec<Vec<f32>> = (0..4).map(|_| (0..n).map(|i| if i % 89 == 0 { -0.0 } else { rng.next_f64() as f32 - 0.5 }).collect()).collect();
        for (momentum, wd) in [(0.0, 0.0), (0.9, 0.0), (0.0, 5e-4), (0.9, 5e-4), (0.5, 0.05)] {
            let mut cfg = OptimConfig::sgd(0.05);
            cfg.momentum = momentum;
            cfg.weight_decay = wd;
            let mut finals = Vec::new();
            for in_place in [true, false] {
                let var = Var::from_slice(&theta0, n, &Device::Cpu).unwrap();
                let mut opt = Optimizer::new(vec![var.clone()], &cfg).unwrap();
                opt.in_place = in_place;
                for g in &grads {
                    let g = Tensor::from_slice(g, n, &Device::Cpu).unwrap();
                    let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
                    opt.backward_step(&loss).unwrap();
                }
                finals.push(var.as_tensor().to_vec1::<f32>().unwrap());
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&finals[0]), bits(&finals[1]), "n {n}, momentum {momentum}, weight decay {wd}");
        }
    }

    #[test]
    fn sgd_momentum_and_weight_decay() {
        // lr 0.1, μ 0.9, no decay, θ0 = [1, −2], g = [0.5, 1].
        // Step 1: b = g = [0.5, 1];              θ = [1 − 0.05, −2 − 0.1] = [0.95, −2.1].
        // Step 2: b = 0.9·b + g = [0.95, 1.9];   θ = [0.95 − 0.095, −2.1 − 0.19] = [0.855, −2.29].
        // Step 3: b = [1.355, 2.71];             θ = [0.7195, −2.561].
        let mut cfg = OptimConfig::sgd(0.1);
        let th = run(&cfg, &[1.0, -2.0], &[0.5, 1.0], 3);
        close(&th[0], &[0.95, -2.1]);
        close(&th[1], &[0.855, -2.29]);
        close(&th[2], &[0.7195, -2.561]);
        // With wd 0.1, θ0 = [1], g = [0.5]:
        // Step 1: g' = 0.5 + 0.1·1 = 0.6; b = 0.6; θ = 1 − 0.06 = 0.94.
        // Step 2: g' = 0.5 + 0.094 = 0.594; b = 0.54 + 0.594 = 1.134; θ = 0.94 − 0.1134 = 0.8266.
        cfg.weight_decay = 0.1;
        let th = run(&cfg, &[1.0], &[0.5], 2);
        close(&th[0], &[0.94]);
        close(&th[1], &[0.8266]);
        // No momentum: plain gradient steps, θ = 1 − 0.1·0.6 = 0.94, then 0.94 − 0.1·0.594 = 0.8806.
        cfg.momentum = 0.0;
        let th = run(&cfg, &[1.0], &[0.5], 2);
        close(&th[1], &[0.8806]);
    }

    #[test]
    fn adam_bias_corrected() {
        // lr 0.1, β = (0.9, 0.999), eps 1e-8, θ0 = [1, 1], g = [0.5, −2].
        // With a constant gradient, m_t = (1 − 0.9^t) g and v_t = (1 − 0.999^t) g², so the
        // bias-corrected ratio is m̂/(√v̂ + eps) = g / (|g| + eps) at every step:
        // θ_t = θ0 − 0.1·t·g/(|g| + 1e-8).
        let cfg = OptimConfig::adam(0.1);
        let th = run(&cfg, &[1.0, 1.0], &[0.5, -2.0], 3);
        for (t, theta) in th.iter().enumerate() {
            let t = (t + 1) as f64;
            close(theta, &[1.0 - 0.1 * t * 0.5 / (0.5 + 1e-8), 1.0 + 0.1 * t * 2.0 / (2.0 + 1e-8)]);
        }
        // Adam with L2 wd 0.5, θ0 = [1], g = [0.5], lr 0.1:
        // Step 1: g' = 0.5 + 0.5 = 1; m = 0.1, v = 0.001; m̂ = 1, v̂ = 1; θ = 1 − 0.1·1/(1 + 1e-8).
        // Step 2: θ1 = 0.9 + 1e-9 (approx.), g' = 0.5 + 0.5·θ1;
        //   m = 0.9·0.1 + 0.1·g', v = 0.999·0.001 + 0.001·g'²;
        //   θ2 = θ1 − 0.1 · (m / 0.19) / (√(v / 0.001999) + 1e-8).
        let mut cfg = OptimConfig::adam(0.1);
        cfg.weight_decay = 0.5;
        let th = run(&cfg, &[1.0], &[0.5], 2);
        let t1 = 1.0 - 0.1 / (1.0 + 1e-8);
        close(&th[0], &[t1]);
        let g2 = 0.5 + 0.5 * t1;
        let m = 0.09 + 0.1 * g2;
        let v = 0.999 * 0.001 + 0.001 * g2 * g2;
        close(&th[1], &[t1 - 0.1 * (m / 0.19) / ((v / 0.001999).sqrt() + 1e-8)]);
    }

    #[test]
    fn adamw_decoupled_decay() {
        // lr 0.1, wd 0.5, θ0 = [2], g = [1].
        // Step 1: θ = 2·(1 − 0.05) = 1.9; Adam step (ratio 1/(1+1e-8)): θ = 1.9 − 0.1/(1+1e-8).
        // Step 2: θ = θ1·0.95 − 0.1/(1+1e-8)   (the gradient is constant, so the ratio is again
        // g/(|g| + eps); the decay never enters the moments).
        let mut cfg = OptimConfig::adamw(0.1);
        cfg.weight_decay = 0.5;
        let th = run(&cfg, &[2.0], &[1.0], 2);
        let r = 0.1 / (1.0 + 1e-8);
        let t1 = 1.9 - r;
        close(&th[0], &[t1]);
        close(&th[1], &[t1 * 0.95 - r]);
    }

    #[test]
    fn rmsprop_plain_and_momentum() {
        // lr 0.01, α 0.99, eps 1e-8, θ0 = [1], g = [2].
        // Step 1: v = 0.01·4 = 0.04;           θ = 1 − 0.01·2/(0.2 + 1e-8).
        // Step 2: v = 0.99·0.04 + 0.04 = 0.0796; θ −= 0.01·2/(√0.0796 + 1e-8).
        let cfg = OptimConfig::rmsprop(0.01);
        let th = run(&cfg, &[1.0], &[2.0], 2);
        let s1 = 2.0 / (0.2 + 1e-8);
        let s2 = 2.0 / (0.0796f64.sqrt() + 1e-8);
        close(&th[0], &[1.0 - 0.01 * s1]);
        close(&th[1], &[1.0 - 0.01 * s1 - 0.01 * s2]);
        // Momentum 0.5: b1 = s1, b2 = 0.5·s1 + s2; θ2 = 1 − 0.01·b1 − 0.01·b2.
        let mut cfg = OptimConfig::rmsprop(0.01);
        cfg.momentum = 0.5;
        let th = run(&cfg, &[1.0], &[2.0], 2);
        close(&th[1], &[1.0 - 0.01 * s1 - 0.01 * (0.5 * s1 + s2)]);
        // Weight decay 0.1: g' = 2 + 0.1·1 = 2.1, v = 0.01·4.41 = 0.0441, θ = 1 − 0.01·2.1/(0.21 + 1e-8).
        let mut cfg = OptimConfig::rmsprop(0.01);
        cfg.weight_decay = 0.1;
        let th = run(&cfg, &[1.0], &[2.0], 1);
        close(&th[0], &[1.0 - 0.01 * 2.1 / (0.21 + 1e-8)]);
    }

    #[test]
    fn vars_without_grad_are_skipped_and_lr_can_change() {
        let a = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let b = Var::new(&[5.0f64], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![a.clone(), b.clone()], &OptimConfig::sgd(0.1)).unwrap();
        opt.set_lr(1.0);
        assert_eq!(opt.lr(), 1.0);
        let loss = (a.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f64>().unwrap(), vec![-2.0]);
        assert_eq!(b.as_tensor().to_vec1::<f64>().unwrap(), vec![5.0]);
    }

    #[test]
    fn config_serde_defaults_depend_on_kind() {
        let sgd: OptimConfig = serde_json::from_str(r#"{"kind":"sgd","lr":0.1}"#).unwrap();
        assert_eq!(sgd, OptimConfig::sgd(0.1));
        assert_eq!(sgd.momentum, 0.9);
        let rms: OptimConfig = serde_json::from_str(r#"{"kind":"rmsprop","lr":0.01}"#).unwrap();
        assert_eq!(rms.momentum, 0.0);
        assert_eq!(rms.alpha, 0.99);
        let aw: OptimConfig = serde_json::from_str(r#"{"kind":"adamw","lr":0.001,"weight_decay":0.05}"#).unwrap();
        assert_eq!(aw.weight_decay, 0.05);
        let back: OptimConfig = serde_json::from_str(&serde_json::to_string(&aw).unwrap()).unwrap();
        assert_eq!(back, aw);
        assert!(serde_json::from_str::<OptimConfig>(r#"{"kind":"adam","lr":-1}"#).is_err());
    }
}
