//! Hypergradients through unrolled inner SGD steps.
//!
//! **The computation.** Given parameters θ (a list of tensors), meta-parameters φ (a list of
//! tensors) and a [`Problem`], K inner steps are unrolled from an initialisation that may depend
//! on φ:
//!
//! θ₀ = T(θ, φ),  θ_{k+1} = θ_k − P(φ) ⊙ g_k,  g_k = ∇_θ L_in(θ_k, φ; k),  k = 0..K−1,
//!
//! and the outer objective M(θ_K, φ) is differentiated with respect to φ by reverse mode through
//! the steps. With v_K = ∇_θ M(θ_K, φ) and h = ∂_φ M(θ_K, φ), for k = K−1 down to 0, with the
//! direction u = P ⊙ v_{k+1}:
//!
//! h −= ∂_φ⟨∇_θ L_in(θ_k, φ; k), u⟩ + ∂_φ⟨P(φ), g_k ⊙ v_{k+1}⟩,
//! v_k = v_{k+1} − ∇²_θθ L_in(θ_k, φ; k) u,
//!
//! and finally h += ∂_φ⟨T(θ, φ), v₀⟩, so that h = dM/dφ; the gradient with respect to θ is
//! ∂_θ⟨T(θ, φ), v₀⟩ (v₀ itself when T is the identity). The second term of h's update is there
//! only when P depends on φ (a learned step size), the last only when T does.
//!
//! **Second-order products without double backward.** Candle's fused CPU ops have hand-written
//! backward passes that are not themselves differentiable, so both ∇²_θθ L·u and ∇²_φθ L·u come
//! from one central difference of first-order gradients, taken with respect to θ and φ at once:
//! (∇L(θ_k + εu) − ∇L(θ_k − εu)) / (2ε), ε = `hvp_eps`/‖u‖ (as in DARTS). The error is O(ε²)
//! (none, up to rounding, for a loss quadratic in θ); [`HVP_EPS`] suits f32, and f64 tests use
//! about 10⁻⁵.
//!
//! **Step sizes.** [`StepSize::Scalar`] is one η for all of θ, the cheap case: the products are
//! taken along v_{k+1} itself and multiplied by η afterwards (the same perturbation, since the
//! direction is normalised), and nothing about P is differentiated. [`StepSize::PerTensor`] gives
//! one tensor per θ tensor, broadcastable to it: a one-element tensor is one step size for the
//! whole tensor, a tensor of its shape one per parameter. When [`Problem::step_size`] builds those
//! tensors from φ (they carry φ's gradient graph), the term −∇_θL ⊙ ∂P/∂φ enters h; the g_k are
//! then kept from the forward pass.
//!
//! **Costs.** Forward: K gradient evaluations of L_in and one of M. Reverse: two gradient
//! evaluations of L_in per step (θ and φ at once), plus one small backward pass each through P
//! and T when they depend on φ. Memory: the K + 1 iterates θ_k (and the g_k for a learned P).
//!
//! **dM/dφ alone** ([`Unroll::phi_only`]). When dM/dθ is not wanted and T is the identity, the
//! last reverse step (k = 0) needs no v₀, so only the φ-part of the difference is taken: by
//! linearity, ∂_φ(L_in(θ₀ + εu, φ) − L_in(θ₀ − εu, φ)) / (2ε) is the same product up to rounding,
//! one backward pass to φ of a scalar in which θ± are plain tensors
//! ([`Problem::inner_loss_difference`]). That step then costs two evaluations of L_in, one
//! backward pass through the parts that depend on φ, and nothing through those that depend on θ
//! alone; a problem that overrides the difference also evaluates its φ-only parts (a network of
//! φ) once instead of twice. Steps k > 0 still take the full pair, since they need v_k. With
//! K = 1 (WAMAL's one unrolled step), every reverse pass is of this kind.
//!
//! **Usage.** Implement [`Problem`] for the method's bilevel problem (the batches it reads
//! belong to the implementing type; `step` says which inner step asks), then call
//! [`hypergradient`]. [`unrolled_value`] evaluates M(θ_K(φ), φ) alone, for finite-difference
//! checks; [`unroll`] gives the iterates' end point θ_K.

use candle_core::{DType, Error, Result, Tensor, Var};

/// Relative step of the finite-difference Hessian-vector products: ε‖u‖ = 10⁻² (DARTS's
/// choice; right for f32, where a smaller step loses the difference to rounding).
pub const HVP_EPS: f64 = 1e-2;

/// A bilevel problem: the inner loss the unrolled steps descend, the outer objective, the step
/// sizes and the initialisation. θ and φ arrive as lists of tensors in the order the caller gave
/// them; the functions build their values with ordinary (differentiable) tensor operations, and
/// [`hypergradient`] passes variables wherever it needs a gradient.
pub trait Problem {
    /// L_in(θ, φ) at inner step `step` (0..K−1), a scalar (rank-0) tensor.
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], step: usize) -> Result<Tensor>;

    /// M(θ_K, φ), a scalar (rank-0) tensor.
    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor>;

    /// The step sizes P(φ) of the inner steps (the same at every step).
    fn step_size(&self, phi: &[Tensor]) -> Result<StepSize>;

    /// θ₀ = T(θ, φ), one tensor per θ tensor of the same shape; `None`, the default, is the
    /// identity.
    fn init(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        let _ = (theta, phi);
        Ok(None)
    }

    /// L_in(θ⁺, φ) − L_in(θ⁻, φ) at inner step `step`, a scalar (rank-0) tensor, of which only
    /// the gradient with respect to φ is taken: θ⁺ and θ⁻ arrive as detached tensors. The
    /// default evaluates [`Problem::inner_loss`] twice; a problem may override it to compute
    /// the parts that depend on φ alone once for both (the same value up to rounding). `phi`
    /// are the same variables [`Problem::outer`] received last, so a problem may also reuse
    /// what it computed from them there.
    fn inner_loss_difference(&self, plus: &[Tensor], minus: &[Tensor], phi: &[Tensor], step: usize) -> Result<Tensor> {
        self.inner_loss(plus, phi, step)? - self.inner_loss(minus, phi, step)?
    }
}

/// The step sizes of the inner steps.
#[derive(Debug, Clone)]
pub enum StepSize {
    /// One η for every parameter.
    Scalar(f64),
    /// One tensor per θ tensor, in θ's dtype and broadcastable to its shape; built from φ, it
    /// makes the step size a meta-parameter.
    PerTensor(Vec<Tensor>),
}

/// How to unroll: the number of inner steps K, the relative step of the finite-difference
/// Hessian-vector products (see the module doc), and whether dM/dθ is wanted.
#[derive(Debug, Clone, Copy)]
pub struct Unroll {
    pub steps: usize,
    pub hvp_eps: f64,
    /// Whether [`Hypergradient::theta`] is computed. Off ([`Unroll::phi_only`]), it is left empty,
    /// and the last reverse step (k = 0) with the identity initialisation differentiates only
    /// with respect to φ, with one gradient evaluation of L_in's difference instead of two full
    /// ones (see "Costs" in the module doc).
    pub theta_grad: bool,
}

impl Unroll {
    /// K steps, dM/dφ and dM/dθ.
    pub fn new(steps: usize, hvp_eps: f64) -> Unroll {
        Unroll { steps, hvp_eps, theta_grad: true }
    }

    /// K steps, dM/dφ alone: [`Hypergradient::theta`] is empty.
    pub fn phi_only(steps: usize, hvp_eps: f64) -> Unroll {
        Unroll { steps, hvp_eps, theta_grad: false }
    }
}

/// What [`hypergradient`] computes.
#[derive(Debug, Clone)]
pub struct Hypergradient {
    /// M(θ_K, φ).
    pub value: f64,
    /// dM/dφ, every φ tensor flattened (row-major) in turn, accumulated in f64.
    pub phi: Vec<f64>,
    /// dM/dθ through the unrolled steps and T, one tensor per θ tensor; empty when
    /// [`Unroll::theta_grad`] is off.
    pub theta: Vec<Tensor>,
}

impl Hypergradient {
    /// The Euclidean norm of dM/dφ.
    pub fn norm(&self) -> f64 {
        self.phi.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// dM/dφ as one tensor per φ tensor, with the shapes, dtypes and devices of `phi`.
    pub fn phi_tensors(&self, phi: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(phi.len());
        for p in phi {
            let n = p.elem_count();
            let part = self.phi.get(start..start + n).ok_or_else(|| Error::Msg(format!("the hypergradient has {} values, fewer than φ", self.phi.len())))?;
            out.push(Tensor::from_vec(part.to_vec(), p.dims(), p.device())?.to_dtype(p.dtype())?);
            start += n;
        }
        Ok(out)
    }
}

/// M(θ_K, φ) and its hypergradient with respect to φ (and θ), by reverse mode through
/// `unroll.steps` inner steps (see the module doc). `theta` and `phi` may be variables or plain
/// tensors; they are read, never changed. The problem's functions receive θ and φ as fresh
/// variables wherever a gradient is taken ([`Problem::step_size`] and [`Problem::init`] always,
/// [`Problem::outer`], [`Problem::inner_loss`] in the Hessian-vector products), and as detached
/// tensors in the forward inner steps.
pub fn hypergradient<Q: Problem + ?Sized>(problem: &Q, theta: &[Tensor], phi: &[Tensor], unroll: Unroll) -> Result<Hypergradient> {
    if theta.is_empty() {
        return Err(Error::Msg("a hypergradient needs at least one parameter tensor".into()));
    }
    let phi0 = detached(phi);
    let n = theta.len();
    // P(φ), with φ as variables so that a learned step size keeps its graph.
    let p_vars = as_vars(&phi0)?;
    let p_in = values(&p_vars);
    let steps = Steps::new(problem.step_size(&p_in)?, n)?;
    // θ₀ = T(θ, φ), with θ and φ as variables when T is not the identity.
    let t_vars = as_vars(&detached(theta))?;
    let t_phi = as_vars(&phi0)?;
    let t_out = problem.init(&values(&t_vars), &values(&t_phi))?;
    let start = match &t_out {
        Some(t) if t.len() != n => return Err(Error::Msg(format!("the initialisation gave {} tensors for {n} parameters", t.len()))),
        Some(t) => detached(t),
        None => detached(theta),
    };
    // Forward: the unrolled inner steps, and the gradients g_k where P depends on φ.
    let mut thetas = vec![start];
    let mut grads = Vec::new();
    for k in 0..unroll.steps {
        let cur = &thetas[k];
        let vars = as_vars(cur)?;
        let vt = values(&vars);
        let l = problem.inner_loss(&vt, &phi0, k)?;
        let g = grads_of(&l, &vt)?;
        let next = steps.apply(cur, &g)?;
        if steps.learned() {
            grads.push(g);
        }
        thetas.push(next);
    }
    // The outer objective and its direct gradients.
    let vars = as_vars(&thetas[unroll.steps])?;
    let vt = values(&vars);
    let outer_phi = values(&as_vars(&phi0)?);
    let m = problem.outer(&vt, &outer_phi)?;
    let value = m.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let g = grads_of(&m, &[vt, outer_phi.clone()].concat())?;
    let mut v: Vec<Tensor> = g[..n].to_vec();
    let mut h = flat(&g[n..])?;
    // Σ_k g_k ⊙ v_{k+1}, for a learned P.
    let mut gv: Option<Vec<Tensor>> = None;
    // Reverse through the inner steps.
    for k in (0..unroll.steps).rev() {
        if let Some(gk) = grads.get(k) {
            let prod = gk.iter().zip(&v).map(|(g, v)| g * v).collect::<Result<Vec<_>>>()?;
            gv = Some(match gv {
                None => prod,
                Some(acc) => acc.iter().zip(&prod).map(|(a, p)| a + p).collect::<Result<Vec<_>>>()?,
            });
        }
        let (u, factor) = steps.direction(&v)?;
        let un = norm(&u)?;
        if un == 0.0 {
            // No direction: both products vanish, v_k = v_{k+1}.
            continue;
        }
        let eps = unroll.hvp_eps / un;
        if k == 0 && !unroll.theta_grad && t_out.is_none() {
            // v₀ is not needed (no dM/dθ, T the identity): only ∂_φ of the difference, as one
            // backward pass of L_in(θ₀ + εu, φ) − L_in(θ₀ − εu, φ) to φ, θ± untracked.
            let plus = detached(&axpy(&thetas[k], eps, &u)?);
            let minus = detached(&axpy(&thetas[k], -eps, &u)?);
            // φ: the outer objective's variables again (same values), so that a problem may
            // reuse what it computed from them.
            let d = problem.inner_loss_difference(&plus, &minus, &outer_phi, k)?;
            for (hi, d) in h.iter_mut().zip(flat(&grads_of(&d, &outer_phi)?)?) {
                *hi -= factor * d / (2.0 * eps);
            }
            continue;
        }
        let mut both = Vec::with_capacity(2);
        for sign in [1.0, -1.0] {
            let vars = as_vars(&axpy(&thetas[k], sign * eps, &u)?)?;
            let vt = values(&vars);
            let pv = values(&as_vars(&phi0)?);
            let l = problem.inner_loss(&vt, &pv, k)?;
            both.push(grads_of(&l, &[vt, pv].concat())?);
        }
        let (gp, gm) = (&both[0], &both[1]);
        let dphi_p = flat(&gp[n..])?;
        let dphi_m = flat(&gm[n..])?;
        for (hi, (p, q)) in h.iter_mut().zip(dphi_p.iter().zip(&dphi_m)) {
            *hi -= factor * (p - q) / (2.0 * eps);
        }
        let mut next = Vec::with_capacity(n);
        for i in 0..n {
            let hv = ((&gp[i] - &gm[i])? / (2.0 * eps))?;
            next.push((&v[i] - (hv * factor)?)?.detach());
        }
        v = next;
    }
    // The learned step size: h −= ∂_φ⟨P(φ), Σ_k g_k ⊙ v_{k+1}⟩.
    if let (Some(p), Some(gv)) = (&steps.graph, &gv) {
        let mut s = Tensor::zeros((), p[0].dtype(), p[0].device())?;
        for (p, w) in p.iter().zip(gv) {
            s = (s + p.broadcast_mul(&w.detach())?.sum_all()?)?;
        }
        for (hi, d) in h.iter_mut().zip(flat(&grads_of(&s, &p_in)?)?) {
            *hi -= d;
        }
    }
    // The initialisation: h += ∂_φ⟨T(θ, φ), v₀⟩, and dM/dθ = ∂_θ⟨T(θ, φ), v₀⟩.
    let theta_grad = match &t_out {
        None => v,
        Some(t) => {
            let mut s = Tensor::zeros((), v[0].dtype(), v[0].device())?;
            for (t, v) in t.iter().zip(&v) {
                s = (s + (t * v)?.sum_all()?)?;
            }
            let g = grads_of(&s, &[values(&t_vars), values(&t_phi)].concat())?;
            for (hi, d) in h.iter_mut().zip(flat(&g[n..])?) {
                *hi += d;
            }
            g[..n].to_vec()
        }
    };
    let theta = if unroll.theta_grad { theta_grad } else { Vec::new() };
    Ok(Hypergradient { value, phi: h, theta })
}

/// θ_K: the end of `steps` inner steps from T(θ, φ), without gradients.
pub fn unroll<Q: Problem + ?Sized>(problem: &Q, theta: &[Tensor], phi: &[Tensor], steps: usize) -> Result<Vec<Tensor>> {
    let phi0 = detached(phi);
    let n = theta.len();
    let sizes = Steps::new(problem.step_size(&phi0)?, n)?;
    let theta0 = detached(theta);
    let mut cur = match problem.init(&theta0, &phi0)? {
        Some(t) if t.len() != n => return Err(Error::Msg(format!("the initialisation gave {} tensors for {n} parameters", t.len()))),
        Some(t) => detached(&t),
        None => theta0,
    };
    for k in 0..steps {
        let vars = as_vars(&cur)?;
        let vt = values(&vars);
        let l = problem.inner_loss(&vt, &phi0, k)?;
        let g = grads_of(&l, &vt)?;
        cur = sizes.apply(&cur, &g)?;
    }
    Ok(cur)
}

/// M(θ_K(φ), φ) after `steps` inner steps, without gradients (for finite differences).
pub fn unrolled_value<Q: Problem + ?Sized>(problem: &Q, theta: &[Tensor], phi: &[Tensor], steps: usize) -> Result<f64> {
    let end = unroll(problem, theta, phi, steps)?;
    problem.outer(&end, &detached(phi))?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// The step sizes of one unroll: their values, detached, and for a learned P the tensors with
/// φ's graph.
struct Steps {
    values: StepSize,
    graph: Option<Vec<Tensor>>,
}

impl Steps {
    fn new(p: StepSize, n: usize) -> Result<Steps> {
        match p {
            StepSize::Scalar(eta) => Ok(Steps { values: StepSize::Scalar(eta), graph: None }),
            StepSize::PerTensor(ts) if ts.len() != n => Err(Error::Msg(format!("{} step-size tensors for {n} parameter tensors", ts.len()))),
            StepSize::PerTensor(ts) => {
                let values = StepSize::PerTensor(detached(&ts));
                let graph = ts.iter().any(Tensor::track_op).then_some(ts);
                Ok(Steps { values, graph })
            }
        }
    }

    /// Whether P depends on φ.
    fn learned(&self) -> bool {
        self.graph.is_some()
    }

    /// θ − P ⊙ g, detached. The scalar case is θ + g·(−η).
    fn apply(&self, theta: &[Tensor], g: &[Tensor]) -> Result<Vec<Tensor>> {
        match &self.values {
            StepSize::Scalar(eta) => Ok(detached(&axpy(theta, -eta, g)?)),
            StepSize::PerTensor(p) => theta.iter().zip(g).zip(p).map(|((t, g), p)| Ok((t - g.broadcast_mul(p)?)?.detach())).collect(),
        }
    }

    /// The direction u of the Hessian-vector products and the factor their results are scaled
    /// by: (v, η) for a scalar step size, (P ⊙ v, 1) otherwise.
    fn direction(&self, v: &[Tensor]) -> Result<(Vec<Tensor>, f64)> {
        match &self.values {
            StepSize::Scalar(eta) => Ok((v.to_vec(), *eta)),
            StepSize::PerTensor(p) => Ok((v.iter().zip(p).map(|(v, p)| v.broadcast_mul(p)).collect::<Result<Vec<_>>>()?, 1.0)),
        }
    }
}

/// Gradients of `loss` with respect to `wrt` (zeros where it does not depend on one).
fn grads_of(loss: &Tensor, wrt: &[Tensor]) -> Result<Vec<Tensor>> {
    let gs = loss.backward()?;
    wrt.iter().map(|t| gs.get(t).cloned().map_or_else(|| t.zeros_like(), Ok)).collect()
}

fn detached(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::detach).collect()
}

/// Fresh variables holding the values of `ts`.
fn as_vars(ts: &[Tensor]) -> Result<Vec<Var>> {
    ts.iter().map(|t| Var::from_tensor(&t.detach())).collect()
}

fn values(vars: &[Var]) -> Vec<Tensor> {
    vars.iter().map(|v| v.as_tensor().clone()).collect()
}

/// x + v·a.
fn axpy(x: &[Tensor], a: f64, v: &[Tensor]) -> Result<Vec<Tensor>> {
    x.iter().zip(v).map(|(x, v)| x + (v * a)?).collect()
}

/// The Euclidean norm of a list of tensors, in f64.
fn norm(v: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for t in v {
        s += t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// The values of a list of tensors, flattened in turn, in f64.
fn flat(gs: &[Tensor]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for g in gs {
        out.extend(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    }
    Ok(out)
}
