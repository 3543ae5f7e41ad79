//! The pieces of Bayesian TAML: the Conv-4 learner, the set-encoding inference network, the
//! balanced inner loss, the learned step sizes and the modulated initialisation as one bilevel
//! [`Problem`], the reparameterised posterior and its KL divergence.
//!
//! Layout of a task's bilevel problem. θ (adapted in the inner loop): the four convolutions'
//! weights and biases, then the head's weight and bias (10 tensors; the head starts at zero in
//! every task). φ (fixed in the inner loop, differentiated by the hypergradient): the four
//! BatchNorm shifts, then, when the variant has them, Meta-SGD's α (one tensor per θ tensor; the
//! head's α is one row shared by every class), ω (one value per class of the task), γ (conv1..4,
//! dense) and z (z_w and z_b, 4×32 each).

use candle_core::{DType, Device, Result, Tensor, Var, D};

use crate::meta::hypergradient::{Problem, StepSize};
use crate::models::functional::{max_pool2, FunctionalConv4, Init};
use crate::models::kernels::conv::conv2d;
use crate::rng::Rng;

/// Layers with their own γ: conv1..4 and the dense head.
pub const LAYERS: usize = 5;
/// Channels per convolution of the learner.
pub const HIDDEN: usize = 32;
/// Number of θ tensors: 4 × (weight, bias) + head (weight, bias).
pub const THETA: usize = 10;
/// Size of z: a scale and a shift per output channel of each convolution.
pub const Z_DIM: usize = 2 * 4 * HIDDEN;

/// Which of the learned pieces a run has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Meta-SGD's per-parameter step sizes α (else one scalar inner learning rate).
    pub alpha: bool,
    pub omega: bool,
    pub gamma: bool,
    pub z: bool,
    /// Sampled balancing variables with the KL term (else their posterior means, no KL).
    pub bayesian: bool,
}

impl Variant {
    /// Whether the run has an inference network at all.
    pub fn balancing(&self) -> bool {
        self.omega || self.gamma || self.z
    }
}

/// The layer (0..4: conv1..4, dense) of θ tensor `i`.
pub fn layer_of(i: usize) -> usize {
    i / 2
}

/// The Conv-4 learner (l2b's): θ and the BatchNorm shifts kept apart.
pub struct Learner {
    pub net: FunctionalConv4,
    pub way: usize,
    /// Channels, height, width of the inputs.
    pub shape: (usize, usize, usize),
}

impl Learner {
    pub fn new(channels: usize, height: usize, width: usize, way: usize) -> Result<Learner> {
        Ok(Learner { net: FunctionalConv4::new(channels, height, width, HIDDEN, way)?, way, shape: (channels, height, width) })
    }

    /// The meta-learned initial body: (conv weights and biases, 8 tensors; BatchNorm shifts, 4),
    /// truncated normal std 0.02 as in l2b.
    pub fn init(&self, seed: u64, device: &Device, dtype: DType) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let body = self.net.init_body(seed, Init::TruncatedNormal { std: 0.02 }, device, dtype)?;
        let mut conv = Vec::with_capacity(8);
        let mut shifts = Vec::with_capacity(4);
        for b in body.chunks_exact(3) {
            conv.push(b[0].clone());
            conv.push(b[1].clone());
            shifts.push(b[2].clone());
        }
        Ok((conv, shifts))
    }

    /// The zero head every task starts from.
    pub fn zero_head(&self, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
        self.net.zero_head(device, dtype)
    }

    /// Logits at θ (10 tensors) and the BatchNorm shifts (4).
    pub fn logits(&self, theta: &[Tensor], shifts: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let mut params = Vec::with_capacity(14);
        for l in 0..4 {
            params.push(theta[2 * l].clone());
            params.push(theta[2 * l + 1].clone());
            params.push(shifts[l].clone());
        }
        params.push(theta[8].clone());
        params.push(theta[9].clone());
        self.net.forward(&params, x)
    }
}

/// Per-sample cross-entropy of logits (N×way) against one-hot targets (N×way).
pub fn cross_entropy_each(logits: &Tensor, onehot: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (onehot * logp)?.sum(1)?.neg()
}

/// The inner loss: Σ_c softmax(ω)_c · (way/N) Σ_{i∈c} CE_i with ω, else the mean cross-entropy.
pub fn inner_loss(logits: &Tensor, onehot: &Tensor, omega: Option<&Tensor>) -> Result<Tensor> {
    let ce = cross_entropy_each(logits, onehot)?;
    match omega {
        None => ce.mean_all(),
        Some(w) => {
            let (n, way) = onehot.dims2()?;
            let sw = candle_nn::ops::softmax(w, 0)?;
            let per = onehot.matmul(&sw.reshape((way, 1))?)?.reshape(n)?;
            ((per * ce)?.sum_all()? * (way as f64 / n as f64))?.reshape(())
        }
    }
}

/// Where each part of φ sits in the list.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub alpha: Option<usize>,
    pub omega: Option<usize>,
    pub gamma: Option<usize>,
    pub z: Option<usize>,
}

impl Layout {
    pub fn of(v: Variant) -> Layout {
        let mut next = 4;
        let mut take = |on: bool, n: usize| {
            on.then(|| {
                let at = next;
                next += n;
                at
            })
        };
        let alpha = take(v.alpha, THETA);
        let omega = take(v.omega, 1);
        let gamma = take(v.gamma, 1);
        let z = take(v.z, 2);
        Layout { alpha, omega, gamma, z }
    }
}

/// One task: support and query images with one-hot labels.
pub struct Task {
    pub xs: Tensor,
    pub ys: Tensor,
    pub xq: Tensor,
    pub yq: Tensor,
}

/// A task's bilevel problem (module documentation for the layout of θ and φ).
pub struct TaskProblem<'a> {
    pub learner: &'a Learner,
    pub task: &'a Task,
    pub layout: Layout,
    /// The scalar inner learning rate (MAML; without α).
    pub inner_lr: f64,
}

impl Problem for TaskProblem<'_> {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], _step: usize) -> Result<Tensor> {
        let logits = self.learner.logits(theta, &phi[..4], &self.task.xs)?;
        inner_loss(&logits, &self.task.ys, self.layout.omega.map(|i| &phi[i]))
    }

    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor> {
        let logits = self.learner.logits(theta, &phi[..4], &self.task.xq)?;
        cross_entropy_each(&logits, &self.task.yq)?.mean_all()
    }

    fn step_size(&self, phi: &[Tensor]) -> Result<StepSize> {
        let Layout { alpha, gamma, .. } = self.layout;
        if alpha.is_none() && gamma.is_none() {
            return Ok(StepSize::Scalar(self.inner_lr));
        }
        let dev = phi[0].device();
        let dtype = phi[0].dtype();
        let scale = match gamma {
            Some(g) => Some(phi[g].exp()?),
            None => None,
        };
        let mut out = Vec::with_capacity(THETA);
        for i in 0..THETA {
            let base = match alpha {
                Some(a) => phi[a + i].clone(),
                None => Tensor::new(&[self.inner_lr], dev)?.to_dtype(dtype)?,
            };
            out.push(match &scale {
                Some(s) => base.broadcast_mul(&s.narrow(0, layer_of(i), 1)?)?,
                None => base,
            });
        }
        Ok(StepSize::PerTensor(out))
    }

    fn init(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        let Some(z) = self.layout.z else { return Ok(None) };
        Ok(Some(modulate(theta, &phi[z], &phi[z + 1])?))
    }
}

/// θ₀ = T(θ, z): conv_l weight ⊙ (1 + z_w[l, out-channel]), conv_l bias + z_b[l, ·]; the head as
/// it is.
pub fn modulate(theta: &[Tensor], zw: &Tensor, zb: &Tensor) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(theta.len());
    for l in 0..4 {
        let w = &theta[2 * l];
        let c = w.dim(0)?;
        let s = (zw.get(l)? + 1.0)?.reshape((c, 1, 1, 1))?;
        out.push(w.broadcast_mul(&s)?);
        out.push((&theta[2 * l + 1] + zb.get(l)?)?);
    }
    out.extend(theta[8..].iter().cloned());
    Ok(out)
}

/// ln(1 + eˣ), stable for large |x|.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// KL(N(μ, σ²) ‖ N(0, 1)) summed over the elements: Σ ½(μ² + σ²) − ln σ − ½.
pub fn kl_normal(mu: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    let t = ((mu.sqr()? + sigma.sqr()?)? * 0.5)?;
    ((t - sigma.log()?)? - 0.5)?.sum_all()
}

/// Mean and scale of one balancing variable's posterior.
#[derive(Debug, Clone)]
pub struct Gaussian {
    pub mu: Tensor,
    pub sigma: Tensor,
}

impl Gaussian {
    /// μ + σ ⊙ ε with ε from `rng` (reparameterised), or μ when `rng` is `None`.
    pub fn draw(&self, rng: Option<&mut Rng>) -> Result<Tensor> {
        match rng {
            None => Ok(self.mu.clone()),
            Some(r) => {
                let n = self.mu.elem_count();
                let eps: Vec<f64> = (0..n).map(|_| r.normal()).collect();
                let eps = Tensor::from_vec(eps, self.mu.shape(), self.mu.device())?.to_dtype(self.mu.dtype())?;
                &self.mu + (&self.sigma * eps)?
            }
        }
    }
}

/// The posterior over the balancing variables of one task.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// way values.
    pub omega: Gaussian,
    /// LAYERS values.
    pub gamma: Gaussian,
    /// Z_DIM values: z_w (4×32) then z_b (4×32), flattened.
    pub z: Gaussian,
}

impl Posterior {
    /// KL of the enabled variables.
    pub fn kl(&self, v: Variant) -> Result<Tensor> {
        let mut k = Tensor::zeros((), self.omega.mu.dtype(), self.omega.mu.device())?;
        for (on, g) in [(v.omega, &self.omega), (v.gamma, &self.gamma), (v.z, &self.z)] {
            if on {
                k = (k + kl_normal(&g.mu, &g.sigma)?)?;
            }
        }
        Ok(k)
    }
}

/// Tensor names and shapes of the inference network, in order.
fn encoder_shapes(channels: usize, height: usize, width: usize) -> Vec<(&'static str, Vec<usize>)> {
    let f = 10 * (height / 2 / 2) * (width / 2 / 2);
    vec![
        ("conv1.weight", vec![10, channels, 3, 3]),
        ("conv1.bias", vec![10]),
        ("conv2.weight", vec![10, 10, 3, 3]),
        ("conv2.bias", vec![10]),
        ("embed.weight", vec![64, f]),
        ("embed.bias", vec![64]),
        ("stat.weight", vec![4, 3]),
        ("stat.bias", vec![4]),
        ("set1.weight", vec![128, 256]),
        ("set1.bias", vec![128]),
        ("set2.weight", vec![32, 128]),
        ("set2.bias", vec![32]),
        ("pool.weight", vec![4, 3]),
        ("pool.bias", vec![4]),
        ("omega1.weight", vec![64, 256]),
        ("omega1.bias", vec![64]),
        ("omega2.weight", vec![2, 64]),
        ("omega2.bias", vec![2]),
        ("gamma1.weight", vec![64, 128]),
        ("gamma1.bias", vec![64]),
        ("gamma2.weight", vec![2 * LAYERS, 64]),
        ("gamma2.bias", vec![2 * LAYERS]),
        ("z1.weight", vec![64, 128]),
        ("z1.bias", vec![64]),
        ("z2.weight", vec![2 * Z_DIM, 64]),
        ("z2.bias", vec![2 * Z_DIM]),
    ]
}

/// The set-encoding inference network of l2b (`encoder.py`), on the support set only: a small
/// conv net embeds each image (64 features); per class, each feature's [mean, population
/// variance, (n_c − 1)/(max_shot − 1)] goes through a shared dense 3 → 4 with ReLU (s_c, 256
/// values); ω_c comes from s_c; the classes' s_c pass dense 128-ReLU-dense 32, are pooled over
/// classes by the same statistics (mean, variance, mean N) and a dense 3 → 4 with ReLU into v
/// (128 values), from which γ and z come. Each head: dense 64-ReLU-dense to (μ, raw σ), σ =
/// softplus(raw). Weights N(0, 0.02²), biases 0.
pub struct Encoder {
    pub params: Vec<Tensor>,
    pub max_shot: usize,
}

impl Encoder {
    pub fn init(channels: usize, height: usize, width: usize, max_shot: usize, seed: u64, device: &Device, dtype: DType) -> Result<Encoder> {
        let mut rng = Rng::derive(seed, "taml-encoder-init");
        let mut params = Vec::new();
        for (name, shape) in encoder_shapes(channels, height, width) {
            let n: usize = shape.iter().product();
            let v: Vec<f64> = if name.ends_with("bias") { vec![0.0; n] } else { (0..n).map(|_| 0.02 * rng.normal()).collect() };
            params.push(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?);
        }
        Ok(Encoder { params, max_shot })
    }

    /// The same network at other parameter values (e.g. variables).
    pub fn with_params(&self, params: Vec<Tensor>) -> Encoder {
        Encoder { params, max_shot: self.max_shot }
    }

    fn dense(&self, x: &Tensor, at: usize, relu: bool) -> Result<Tensor> {
        let y = x.matmul(&self.params[at].t()?)?.broadcast_add(&self.params[at + 1])?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// [mean, variance, n] of each column of `f` (rows: samples) → ReLU(dense 3 → 4), flattened.
    fn stats(&self, f: &Tensor, n: f64, at: usize) -> Result<Tensor> {
        let cols = f.dim(1)?;
        let mean = f.mean(0)?;
        let var = f.broadcast_sub(&mean)?.sqr()?.mean(0)?;
        let nn = (Tensor::ones(cols, f.dtype(), f.device())? * n)?;
        let t = Tensor::stack(&[mean, var, nn], 1)?; // cols × 3
        self.dense(&t, at, true)?.flatten_all()
    }

    /// The posterior of a task from its support images `xs` and their labels (0..way).
    pub fn forward(&self, xs: &Tensor, labels: &[usize], way: usize) -> Result<Posterior> {
        let p = &self.params;
        let h = conv2d(xs, &p[0], Some(&p[1]), 1, 1, true)?;
        let h = max_pool2(&h)?;
        let h = conv2d(&h, &p[2], Some(&p[3]), 1, 1, true)?;
        let h = max_pool2(&h)?.flatten_from(1)?;
        let e = self.dense(&h, 4, false)?; // N × 64
        let mut s = Vec::with_capacity(way);
        let mut ns = 0.0;
        for c in 0..way {
            let idx: Vec<u32> = labels.iter().enumerate().filter(|(_, &y)| y == c).map(|(i, _)| i as u32).collect();
            let n_c = idx.len();
            let idx = Tensor::from_vec(idx, n_c, xs.device())?;
            let f = e.index_select(&idx, 0)?;
            let nv = if self.max_shot > 1 { (n_c as f64 - 1.0) / (self.max_shot as f64 - 1.0) } else { 0.0 };
            ns += nv / way as f64;
            s.push(self.stats(&f, nv, 6)?);
        }
        let s = Tensor::stack(&s, 0)?; // way × 256
        let o = self.dense(&self.dense(&s, 14, true)?, 16, false)?; // way × 2
        let omega = Gaussian { mu: o.narrow(1, 0, 1)?.flatten_all()?, sigma: softplus(&o.narrow(1, 1, 1)?.flatten_all()?)? };
        let c = self.dense(&self.dense(&s, 8, true)?, 10, false)?; // way × 32
        let v = self.stats(&c, ns, 12)?; // 128
        let v = v.reshape((1, 128))?;
        let g = self.dense(&self.dense(&v, 18, true)?, 20, false)?.flatten_all()?;
        let gamma = Gaussian { mu: g.narrow(0, 0, LAYERS)?, sigma: softplus(&g.narrow(0, LAYERS, LAYERS)?)? };
        let z = self.dense(&self.dense(&v, 22, true)?, 24, false)?.flatten_all()?;
        let z = Gaussian { mu: z.narrow(0, 0, Z_DIM)?, sigma: softplus(&z.narrow(0, Z_DIM, Z_DIM)?)? };
        Ok(Posterior { omega, gamma, z })
    }
}

/// One draw of the enabled balancing variables, shaped as φ wants them: ω (way), γ (LAYERS),
/// z_w and z_b (4×32 each). `rng` `None`: the posterior means.
pub struct Draw {
    pub omega: Option<Tensor>,
    pub gamma: Option<Tensor>,
    pub z: Option<(Tensor, Tensor)>,
}

impl Draw {
    pub fn of(post: &Posterior, v: Variant, mut rng: Option<&mut Rng>) -> Result<Draw> {
        let omega = if v.omega { Some(post.omega.draw(rng.as_deref_mut())?) } else { None };
        let gamma = if v.gamma { Some(post.gamma.draw(rng.as_deref_mut())?) } else { None };
        let z = if v.z {
            let z = post.z.draw(rng)?;
            Some((z.narrow(0, 0, Z_DIM / 2)?.reshape((4, HIDDEN))?, z.narrow(0, Z_DIM / 2, Z_DIM / 2)?.reshape((4, HIDDEN))?))
        } else {
            None
        };
        Ok(Draw { omega, gamma, z })
    }

    /// Its tensors in φ order (after the shifts and α).
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        out.extend(self.omega.iter().cloned());
        out.extend(self.gamma.iter().cloned());
        if let Some((w, b)) = &self.z {
            out.push(w.clone());
            out.push(b.clone());
        }
        out
    }
}

/// Meta-SGD's initial α: `init` everywhere, the head's weight as one row (1×D) and its bias as
/// one value, shared by every class (l2b tiles one column across the classes).
pub fn alpha_init(learner: &Learner, init: f64, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(THETA);
    for spec in learner.net.body_specs().chunks_exact(3) {
        out.push((Tensor::ones(spec[0].shape.as_slice(), dtype, device)? * init)?);
        out.push((Tensor::ones(spec[1].shape.as_slice(), dtype, device)? * init)?);
    }
    out.push((Tensor::ones((1, learner.net.feature_dim()), dtype, device)? * init)?);
    out.push((Tensor::ones(1, dtype, device)? * init)?);
    Ok(out)
}

/// Fresh variables with the values of `ts`.
pub fn vars(ts: &[Tensor]) -> Result<Vec<Var>> {
    ts.iter().map(|t| Var::from_tensor(&t.detach())).collect()
}
