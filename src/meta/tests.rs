//! The hypergradient against a closed form (a linear-quadratic problem) and against finite
//! differences of the whole unrolled objective (a small network), in f64.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::*;
use crate::rng::Rng;

type Mat = Vec<Vec<f64>>;

fn mat_mul(a: &Mat, b: &Mat) -> Mat {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    (0..n).map(|i| (0..m).map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum()).collect()).collect()
}

fn mat_vec(a: &Mat, x: &[f64]) -> Vec<f64> {
    a.iter().map(|r| r.iter().zip(x).map(|(a, x)| a * x).sum()).collect()
}

fn transpose(a: &Mat) -> Mat {
    (0..a[0].len()).map(|j| a.iter().map(|r| r[j]).collect()).collect()
}

fn identity(n: usize) -> Mat {
    (0..n).map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect()).collect()
}

fn mat_add(a: &Mat, b: &Mat) -> Mat {
    a.iter().zip(b).map(|(r, s)| r.iter().zip(s).map(|(x, y)| x + y).collect()).collect()
}

fn random_mat(rng: &mut Rng, n: usize, m: usize, scale: f64) -> Mat {
    (0..n).map(|_| (0..m).map(|_| scale * rng.normal()).collect()).collect()
}

fn tensor(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn mat_tensor(a: &Mat) -> Tensor {
    tensor(&a.concat(), &[a.len(), a[0].len()])
}

fn values_of(ts: &[Tensor]) -> Vec<f64> {
    ts.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect()
}

/// Tensors shaped like `like` holding `v` (flattened in turn).
fn shaped(v: &[f64], like: &[Tensor]) -> Vec<Tensor> {
    let mut start = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            start += n;
            tensor(&v[start - n..start], t.dims())
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

// ---------------------------------------------------------------------------------------------
// 1. A linear-quadratic problem with a closed form.
//
// θ ∈ ℝ⁵ is two tensors (a vector of 3 and a 1×2 matrix), φ ∈ ℝ³ two tensors (2 and 1 values);
// flattened in turn they are the vectors below. L_in(θ, φ) = ½θᵀAθ − φᵀBθ (A symmetric positive
// definite), M(θ, φ) = ½‖θ − c‖² + ½λ‖φ‖², T(θ, φ) = θ + Cφ (C = 0: the identity).
//
// Derivation. ∇_θ L_in = Aθ − Bᵀφ, so with constant step sizes D = diag(P) one step is
// θ_{k+1} = θ_k − D(Aθ_k − Bᵀφ) = Gθ_k + DBᵀφ, G = I − DA. By induction from θ₀ = θ + Cφ,
// θ_K = G^K(θ + Cφ) + Σ_{j<K} G^j DBᵀφ: linear in φ with Jacobian J = G^K C + Σ_{j<K} G^j DBᵀ,
// and in θ with Jacobian G^K. The chain rule through M gives
// dM/dφ = Jᵀ(θ_K − c) + λφ and dM/dθ = (G^K)ᵀ(θ_K − c).
// With a learned step size D(φ) (P₁ = p₁·exp(κφ₀) on the first tensor, P₂ = p₂·exp(κφ₂) on the
// second) θ_K is no longer linear in φ; differentiating the step itself gives the exact
// recursion J_{k+1} = G J_k + DBᵀ − diag(g_k) ∂D/∂φ, J₀ = C, with g_k = Aθ_k − Bᵀφ and
// ∂D_jj/∂φ_l = κ D_jj when φ_l scales parameter j, 0 otherwise; then dM/dφ = J_Kᵀ(θ_K − c) + λφ
// as before (dM/dθ is unchanged: θ enters only linearly).
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum ToyStep {
    Scalar(f64),
    /// A step size per parameter of the first tensor and one for the whole second tensor.
    PerParam([f64; 3], f64),
    /// As `PerParam`, scaled by exp(κφ₀) and exp(κφ₂).
    Learned([f64; 3], f64, f64),
}

struct Quadratic {
    a: Mat,
    b: Mat,
    c: Vec<f64>,
    lambda: f64,
    step: ToyStep,
    init: Option<Mat>,
}

impl Quadratic {
    fn new(step: ToyStep, with_init: bool) -> Quadratic {
        let mut rng = Rng::new(5);
        let l = random_mat(&mut rng, 5, 5, 0.5);
        let a = mat_add(&mat_mul(&l, &transpose(&l)), &identity(5));
        let b = random_mat(&mut rng, 3, 5, 1.0);
        let c = (0..5).map(|_| rng.normal()).collect();
        let init = with_init.then(|| random_mat(&mut rng, 5, 3, 0.7));
        Quadratic { a, b, c, lambda: 0.1, step, init }
    }

    fn flat(ts: &[Tensor]) -> Result<Tensor> {
        Tensor::cat(&ts.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)
    }

    /// The step sizes D_jj at φ, in plain numbers.
    fn diag(&self, phi: &[f64]) -> Vec<f64> {
        match self.step {
            ToyStep::Scalar(eta) => vec![eta; 5],
            ToyStep::PerParam(p, q) => vec![p[0], p[1], p[2], q, q],
            ToyStep::Learned(p, q, k) => {
                let (s, t) = ((k * phi[0]).exp(), (k * phi[2]).exp());
                vec![p[0] * s, p[1] * s, p[2] * s, q * t, q * t]
            }
        }
    }

    /// The closed form (constant P) or the exact forward-sensitivity recursion (learned P):
    /// M, dM/dφ, dM/dθ.
    fn reference(&self, theta: &[f64], phi: &[f64], steps: usize) -> (f64, Vec<f64>, Vec<f64>) {
        let d = self.diag(phi);
        let da: Mat = (0..5).map(|i| self.a[i].iter().map(|a| d[i] * a).collect()).collect();
        let g: Mat = mat_add(&identity(5), &da.iter().map(|r| r.iter().map(|x| -x).collect()).collect());
        let dbt: Mat = (0..5).map(|i| (0..3).map(|l| d[i] * self.b[l][i]).collect()).collect();
        let c0 = self.init.clone().unwrap_or_else(|| vec![vec![0.0; 3]; 5]);
        let theta0: Vec<f64> = mat_vec(&c0, phi).iter().zip(theta).map(|(x, t)| x + t).collect();
        let (theta_k, jac) = match self.step {
            ToyStep::Learned(_, _, kappa) => {
                let (mut th, mut j) = (theta0, c0);
                let bt_phi = mat_vec(&transpose(&self.b), phi);
                for _ in 0..steps {
                    let grad: Vec<f64> = mat_vec(&self.a, &th).iter().zip(&bt_phi).map(|(x, y)| x - y).collect();
                    let mut next = mat_add(&mat_mul(&g, &j), &dbt);
                    for (i, row) in next.iter_mut().enumerate() {
                        let l = if i < 3 { 0 } else { 2 };
                        row[l] -= grad[i] * kappa * d[i];
                    }
                    j = next;
                    th = th.iter().zip(&grad).zip(&d).map(|((t, g), d)| t - d * g).collect();
                }
                (th, j)
            }
            _ => {
                // θ_K = G^K θ₀' + (Σ_{j<K} G^j) DBᵀφ with θ₀' = θ + Cφ; J = G^K C + (Σ_{j<K} G^j) DBᵀ.
                let mut gk = identity(5);
                let mut sum = vec![vec![0.0; 5]; 5];
                for _ in 0..steps {
                    sum = mat_add(&sum, &gk);
                    gk = mat_mul(&g, &gk);
                }
                let jac = mat_add(&mat_mul(&gk, &c0), &mat_mul(&sum, &dbt));
                let th: Vec<f64> = mat_vec(&gk, theta).iter().zip(&mat_vec(&jac, phi)).map(|(x, y)| x + y).collect();
                (th, jac)
            }
        };
        let r: Vec<f64> = theta_k.iter().zip(&self.c).map(|(t, c)| t - c).collect();
        let value = 0.5 * r.iter().map(|x| x * x).sum::<f64>() + 0.5 * self.lambda * phi.iter().map(|x| x * x).sum::<f64>();
        let dphi: Vec<f64> = mat_vec(&transpose(&jac), &r).iter().zip(phi).map(|(x, p)| x + self.lambda * p).collect();
        let mut gk = identity(5);
        for _ in 0..steps {
            gk = mat_mul(&g, &gk);
        }
        let dtheta = mat_vec(&transpose(&gk), &r);
        (value, dphi, dtheta)
    }
}

impl Problem for Quadratic {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], _step: usize) -> Result<Tensor> {
        let th = Self::flat(theta)?.unsqueeze(1)?;
        let quad = th.t()?.matmul(&mat_tensor(&self.a).matmul(&th)?)?;
        let lin = Self::flat(phi)?.unsqueeze(0)?.matmul(&mat_tensor(&self.b))?.matmul(&th)?;
        ((quad * 0.5)? - lin)?.reshape(())
    }

    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor> {
        let r = Self::flat(theta)?.sub(&tensor(&self.c, &[5]))?;
        (r.sqr()?.sum_all()? * 0.5)? + (Self::flat(phi)?.sqr()?.sum_all()? * (0.5 * self.lambda))?
    }

    fn step_size(&self, phi: &[Tensor]) -> Result<StepSize> {
        Ok(match self.step {
            ToyStep::Scalar(eta) => StepSize::Scalar(eta),
            ToyStep::PerParam(p, q) => StepSize::PerTensor(vec![tensor(&p, &[3]), tensor(&[q], &[1])]),
            ToyStep::Learned(p, q, k) => {
                let s = (phi[0].narrow(0, 0, 1)? * k)?.exp()?;
                let t = (&phi[1] * k)?.exp()?;
                StepSize::PerTensor(vec![tensor(&p, &[3]).broadcast_mul(&s)?, (t * q)?])
            }
        })
    }

    fn init(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        let Some(c) = &self.init else { return Ok(None) };
        let shift = mat_tensor(c).matmul(&Self::flat(phi)?.unsqueeze(1)?)?.squeeze(1)?;
        let t0 = (Self::flat(theta)? + shift)?;
        Ok(Some(vec![t0.narrow(0, 0, 3)?, t0.narrow(0, 3, 2)?.reshape((1, 2))?]))
    }
}

#[test]
fn hypergradient_of_a_linear_quadratic_problem_matches_its_closed_form() {
    let theta = vec![tensor(&[0.3, -0.2, 0.5], &[3]), tensor(&[-0.4, 0.1], &[1, 2])];
    let phi = vec![tensor(&[0.2, -0.3], &[2]), tensor(&[0.15], &[1])];
    let (th, ph) = (values_of(&theta), values_of(&phi));
    let cases = [
        ("scalar η", ToyStep::Scalar(0.15), false),
        ("per-parameter P", ToyStep::PerParam([0.1, 0.2, 0.05], 0.12), false),
        ("scalar η, T(θ, φ) = θ + Cφ", ToyStep::Scalar(0.15), true),
        ("per-parameter P, T(θ, φ) = θ + Cφ", ToyStep::PerParam([0.1, 0.2, 0.05], 0.12), true),
        ("learned P(φ)", ToyStep::Learned([0.1, 0.2, 0.05], 0.12, 0.8), false),
        ("learned P(φ), T(θ, φ) = θ + Cφ", ToyStep::Learned([0.1, 0.2, 0.05], 0.12, 0.8), true),
    ];
    for (name, step, with_init) in cases {
        let q = Quadratic::new(step, with_init);
        for steps in [1, 3] {
            let hg = hypergradient(&q, &theta, &phi, Unroll::new(steps, 1e-5)).unwrap();
            let (value, dphi, dtheta) = q.reference(&th, &ph, steps);
            let e_phi = max_abs_diff(&hg.phi, &dphi);
            let e_theta = max_abs_diff(&values_of(&hg.theta), &dtheta);
            eprintln!("{name}, K = {steps}: |ΔM| {:.1e}, max |Δ dM/dφ| {e_phi:.1e}, max |Δ dM/dθ| {e_theta:.1e}", (hg.value - value).abs());
            assert!((hg.value - value).abs() < 1e-10, "{name}, K = {steps}: M = {} against {value}", hg.value);
            assert!(e_phi < 1e-6, "{name}, K = {steps}: dM/dφ {:?} against {dphi:?}", hg.phi);
            assert!(e_theta < 1e-6, "{name}, K = {steps}: dM/dθ against {dtheta:?}");
            // The unrolled value alone and the gradient's tensor form.
            assert!((unrolled_value(&q, &theta, &phi, steps).unwrap() - value).abs() < 1e-10);
            let shaped = hg.phi_tensors(&phi).unwrap();
            assert_eq!(shaped.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>(), vec![vec![2], vec![1]]);
            assert_eq!(values_of(&shaped), hg.phi);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Finite differences of the whole unrolled objective on a small network.
// ---------------------------------------------------------------------------------------------

/// A 3→4→3 tanh network on 8 training points (inner step k reads the 5 points from 2k on,
/// cyclically) and 6 meta points. φ: per-sample loss weights w (8, as log-weights), a per-class
/// logit offset o (3) of the training loss, and in the `learned` variant two log step sizes
/// (one per layer) and o as the initial output bias as well.
struct Mlp {
    train_x: Tensor,
    train_y: Vec<u32>,
    meta_x: Tensor,
    meta_y: Tensor,
    eta: f64,
    learned: bool,
}

const BATCH: usize = 5;

impl Mlp {
    fn new(learned: bool) -> Mlp {
        let mut rng = Rng::new(11);
        let mut points = |n: usize| tensor(&(0..n * 3).map(|_| rng.normal()).collect::<Vec<_>>(), &[n, 3]);
        let (train_x, meta_x) = (points(8), points(6));
        let train_y = (0..8).map(|i| (i % 3) as u32).collect();
        let meta_y = Tensor::from_vec((0..6).map(|i| ((i + 1) % 3) as u32).collect::<Vec<_>>(), 6, &Device::Cpu).unwrap();
        Mlp { train_x, train_y, meta_x, meta_y, eta: 0.5, learned }
    }

    fn theta() -> Vec<Tensor> {
        let mut rng = Rng::new(12);
        let mut t = |dims: &[usize], s: f64| tensor(&(0..dims.iter().product::<usize>()).map(|_| s * rng.normal()).collect::<Vec<_>>(), dims);
        vec![t(&[4, 3], 0.8), t(&[4], 0.2), t(&[3, 4], 0.8), t(&[3], 0.2)]
    }

    fn phi(&self) -> Vec<Tensor> {
        let mut rng = Rng::new(13);
        let mut phi = vec![tensor(&(0..8).map(|_| 0.3 * rng.normal()).collect::<Vec<_>>(), &[8]), tensor(&[0.2, -0.1, 0.05], &[3])];
        if self.learned {
            phi.push(tensor(&[0.1, -0.2], &[2]));
        }
        phi
    }

    fn logits(theta: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&theta[0].t()?)?.broadcast_add(&theta[1])?.tanh()?;
        h.matmul(&theta[2].t()?)?.broadcast_add(&theta[3])
    }

    fn ce(z: &Tensor, y: &Tensor) -> Result<Tensor> {
        candle_nn::ops::log_softmax(z, D::Minus1)?.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }
}

impl Problem for Mlp {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], step: usize) -> Result<Tensor> {
        let idx: Vec<u32> = (0..BATCH).map(|j| ((2 * step + j) % 8) as u32).collect();
        let y = Tensor::from_vec(idx.iter().map(|&i| self.train_y[i as usize]).collect::<Vec<_>>(), BATCH, &Device::Cpu)?;
        let idx = Tensor::from_vec(idx, BATCH, &Device::Cpu)?;
        let z = Self::logits(theta, &self.train_x.index_select(&idx, 0)?)?.broadcast_add(&phi[1])?;
        let w = phi[0].exp()?.index_select(&idx, 0)?;
        (Self::ce(&z, &y)? * w)?.sum_all()? / BATCH as f64
    }

    fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor> {
        let m = Self::ce(&Self::logits(theta, &self.meta_x)?, &self.meta_y)?.mean_all()?;
        (m + (phi[1].sqr()?.sum_all()? * 0.01)?)? + (phi[0].sqr()?.sum_all()? * 0.005)?
    }

    fn step_size(&self, phi: &[Tensor]) -> Result<StepSize> {
        if !self.learned {
            return Ok(StepSize::Scalar(self.eta));
        }
        let lr = (phi[2].exp()? * self.eta)?;
        let (first, second) = (lr.narrow(0, 0, 1)?, lr.narrow(0, 1, 1)?);
        Ok(StepSize::PerTensor(vec![first.clone(), first, second.clone(), second]))
    }

    fn init(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        if !self.learned {
            return Ok(None);
        }
        Ok(Some(vec![theta[0].clone(), theta[1].clone(), theta[2].clone(), (&theta[3] + &phi[1])?]))
    }
}

/// Compares the hypergradient with central differences of M(θ_K(φ), φ) in every φ and θ
/// component, and the f32 default difference step with the accurate one.
///
/// Tolerance: both sides carry O(δ²) truncation errors (δ = 10⁻⁵ for the outer differences and
/// ε‖u‖ = 10⁻⁵ for the Hessian-vector products; third derivatives here are O(1), so ~10⁻¹⁰) and
/// rounding errors of f64 values of size O(1) divided by the step (~10⁻¹¹), amplified at most by
/// the K = 3 steps of size ≤ 0.7: about 10⁻⁹ in all. 10⁻⁶ of the gradient's scale leaves a
/// margin of three orders of magnitude and still catches any missing or mis-scaled term (each
/// is at least 10⁻³ of the scale here).
fn check_network(learned: bool, steps: usize) {
    let problem = Mlp::new(learned);
    let (theta, phi) = (Mlp::theta(), problem.phi());
    let hg = hypergradient(&problem, &theta, &phi, Unroll::new(steps, 1e-5)).unwrap();
    assert!((hg.value - unrolled_value(&problem, &theta, &phi, steps).unwrap()).abs() < 1e-12);
    let scale = hg.phi.iter().chain(&values_of(&hg.theta)).fold(0.0f64, |m, x| m.max(x.abs())).max(1.0);
    let delta = 1e-5;
    let fd = |base: &[Tensor], at: &dyn Fn(Vec<Tensor>) -> f64| -> Vec<f64> {
        let v = values_of(base);
        (0..v.len())
            .map(|i| {
                let (mut up, mut down) = (v.clone(), v.clone());
                up[i] += delta;
                down[i] -= delta;
                (at(shaped(&up, base)) - at(shaped(&down, base))) / (2.0 * delta)
            })
            .collect()
    };
    let fd_phi = fd(&phi, &|p| unrolled_value(&problem, &theta, &p, steps).unwrap());
    let fd_theta = fd(&theta, &|t| unrolled_value(&problem, &t, &phi, steps).unwrap());
    let (e_phi, e_theta) = (max_abs_diff(&hg.phi, &fd_phi), max_abs_diff(&values_of(&hg.theta), &fd_theta));
    let coarse = hypergradient(&problem, &theta, &phi, Unroll::new(steps, HVP_EPS)).unwrap();
    let e_coarse = max_abs_diff(&coarse.phi, &hg.phi);
    let direct = hypergradient(&problem, &theta, &phi, Unroll::new(0, 1e-5)).unwrap();
    let indirect = max_abs_diff(&direct.phi, &hg.phi);
    eprintln!(
        "network (learned P and T: {learned}), K = {steps}: scale {scale:.3}, max |Δ dM/dφ| {e_phi:.1e}, max |Δ dM/dθ| {e_theta:.1e}, with ε‖u‖ = 10⁻² {e_coarse:.1e}; the unroll changes dM/dφ by up to {indirect:.2}"
    );
    assert!(e_phi < 1e-6 * scale, "dM/dφ {:?} against finite differences {fd_phi:?}", hg.phi);
    assert!(e_theta < 1e-6 * scale, "dM/dθ against finite differences {fd_theta:?}");
    // The f32 step: O(ε²) relative error with ε‖u‖ = 10⁻².
    assert!(e_coarse < 1e-2 * scale, "the default difference step is off by {e_coarse}");
    assert!(indirect > 1e-3 * scale, "no gradient flows through the inner steps");
}

#[test]
fn hypergradient_of_a_small_network_matches_finite_differences() {
    check_network(false, 1);
    check_network(false, 3);
    check_network(true, 3);
}

/// In f32 (the dtype of the methods' runs) the hypergradient keeps θ's dtype and agrees with
/// the f64 computation to f32 accuracy.
#[test]
fn hypergradient_in_f32_follows_f64() {
    let problem = Mlp::new(true);
    let (theta, phi) = (Mlp::theta(), problem.phi());
    let hg = hypergradient(&problem, &theta, &phi, Unroll::new(2, HVP_EPS)).unwrap();
    let f32s = |ts: &[Tensor]| ts.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect::<Vec<_>>();
    let single = Mlp { train_x: problem.train_x.to_dtype(DType::F32).unwrap(), meta_x: problem.meta_x.to_dtype(DType::F32).unwrap(), ..Mlp::new(true) };
    let hs = hypergradient(&single, &f32s(&theta), &f32s(&phi), Unroll::new(2, HVP_EPS)).unwrap();
    assert!(hs.theta.iter().all(|t| t.dtype() == DType::F32));
    let scale = hg.phi.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1.0);
    let e = max_abs_diff(&hs.phi, &hg.phi);
    eprintln!("f32 against f64: max |Δ dM/dφ| {e:.1e} (scale {scale:.3})");
    assert!(e < 1e-3 * scale, "f32 {:?} against f64 {:?}", hs.phi, hg.phi);
}

// ---------------------------------------------------------------------------------------------
// 3. dM/dφ alone (`Unroll::phi_only`): the last reverse step differentiates the difference of
// the inner losses with respect to φ only. The same products by linearity, so the φ-only result
// must equal the full one's φ part up to rounding (f64: rounding of O(1) gradients divided by
// 2ε ~ 10⁻⁵/‖u‖, about 10⁻¹¹; the tolerance 10⁻⁹ of the scale leaves a margin and still catches
// a product missing or mis-scaled by anything but rounding).
// ---------------------------------------------------------------------------------------------

fn assert_phi_only_matches_full<Q: Problem>(name: &str, problem: &Q, theta: &[Tensor], phi: &[Tensor], steps: usize) -> Hypergradient {
    let full = hypergradient(problem, theta, phi, Unroll::new(steps, 1e-5)).unwrap();
    let only = hypergradient(problem, theta, phi, Unroll::phi_only(steps, 1e-5)).unwrap();
    let scale = full.phi.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1.0);
    let e = max_abs_diff(&only.phi, &full.phi);
    eprintln!("{name}, K = {steps}: φ-only against full, max |Δ dM/dφ| {e:.1e} (scale {scale:.3})");
    assert!(e < 1e-9 * scale, "{name}, K = {steps}: φ-only {:?} against full {:?}", only.phi, full.phi);
    assert_eq!(only.value.to_bits(), full.value.to_bits(), "{name}, K = {steps}: the value");
    assert!(only.theta.is_empty(), "{name}: dM/dθ was not asked for");
    assert!(!full.theta.is_empty());
    only
}

#[test]
fn phi_only_hypergradient_of_the_linear_quadratic_problem_matches_the_full_one_and_the_closed_form() {
    let theta = vec![tensor(&[0.3, -0.2, 0.5], &[3]), tensor(&[-0.4, 0.1], &[1, 2])];
    let phi = vec![tensor(&[0.2, -0.3], &[2]), tensor(&[0.15], &[1])];
    let (th, ph) = (values_of(&theta), values_of(&phi));
    let cases = [
        ("scalar η", ToyStep::Scalar(0.15), false),
        ("per-parameter P", ToyStep::PerParam([0.1, 0.2, 0.05], 0.12), false),
        ("learned P(φ)", ToyStep::Learned([0.1, 0.2, 0.05], 0.12, 0.8), false),
        // T depends on φ: v₀ is needed, no step takes the shortcut.
        ("scalar η, T(θ, φ) = θ + Cφ", ToyStep::Scalar(0.15), true),
        ("learned P(φ), T(θ, φ) = θ + Cφ", ToyStep::Learned([0.1, 0.2, 0.05], 0.12, 0.8), true),
    ];
    for (name, step, with_init) in cases {
        let q = Quadratic::new(step, with_init);
        // K = 1: the only reverse step takes the shortcut; K = 2: step 1 keeps the full pair.
        for steps in [1, 2] {
            let only = assert_phi_only_matches_full(name, &q, &theta, &phi, steps);
            let (_, dphi, _) = q.reference(&th, &ph, steps);
            assert!(max_abs_diff(&only.phi, &dphi) < 1e-6, "{name}, K = {steps}: dM/dφ {:?} against the closed form {dphi:?}", only.phi);
        }
    }
}

/// The small network: φ-only against the full hypergradient and against central differences
/// of M(θ_K(φ), φ) (tolerance as in `check_network`).
#[test]
fn phi_only_hypergradient_of_a_small_network_matches_the_full_one_and_finite_differences() {
    for (learned, steps) in [(false, 1), (false, 2), (true, 1), (true, 2)] {
        let problem = Mlp::new(learned);
        let (theta, phi) = (Mlp::theta(), problem.phi());
        let only = assert_phi_only_matches_full(&format!("network (learned P and T: {learned})"), &problem, &theta, &phi, steps);
        let delta = 1e-5;
        let v = values_of(&phi);
        let fd: Vec<f64> = (0..v.len())
            .map(|i| {
                let (mut up, mut down) = (v.clone(), v.clone());
                up[i] += delta;
                down[i] -= delta;
                (unrolled_value(&problem, &theta, &shaped(&up, &phi), steps).unwrap() - unrolled_value(&problem, &theta, &shaped(&down, &phi), steps).unwrap()) / (2.0 * delta)
            })
            .collect();
        let scale = only.phi.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1.0);
        let e = max_abs_diff(&only.phi, &fd);
        eprintln!("network (learned P and T: {learned}), K = {steps}: φ-only against finite differences {e:.1e}");
        assert!(e < 1e-6 * scale, "dM/dφ {:?} against finite differences {fd:?}", only.phi);
    }
}

/// A problem whose difference of inner losses is its own (a different but equal formula) is
/// read through it: scaling the override's result scales the shortcut's product, and nothing
/// else.
#[test]
fn phi_only_reads_the_problems_difference_of_inner_losses() {
    struct Doubled(Mlp);
    impl Problem for Doubled {
        fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], step: usize) -> Result<Tensor> {
            self.0.inner_loss(theta, phi, step)
        }
        fn outer(&self, theta: &[Tensor], phi: &[Tensor]) -> Result<Tensor> {
            self.0.outer(theta, phi)
        }
        fn step_size(&self, phi: &[Tensor]) -> Result<StepSize> {
            self.0.step_size(phi)
        }
        fn inner_loss_difference(&self, plus: &[Tensor], minus: &[Tensor], phi: &[Tensor], step: usize) -> Result<Tensor> {
            (self.0.inner_loss(plus, phi, step)? - self.0.inner_loss(minus, phi, step)?)? * 2.0
        }
    }
    let problem = Mlp::new(false);
    let (theta, phi) = (Mlp::theta(), problem.phi());
    let base = hypergradient(&problem, &theta, &phi, Unroll::phi_only(1, 1e-5)).unwrap();
    let doubled = hypergradient(&Doubled(Mlp::new(false)), &theta, &phi, Unroll::phi_only(1, 1e-5)).unwrap();
    // ∂_φ M(θ₁, φ) at the end point: dM/dφ = direct − product, so doubling the product gives
    // direct − 2·(direct − base).
    let end = unroll(&problem, &theta, &phi, 1).unwrap();
    let vars: Vec<Var> = phi.iter().map(|p| Var::from_tensor(p).unwrap()).collect();
    let pv: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = problem.outer(&end, &pv).unwrap().backward().unwrap();
    let direct = values_of(&pv.iter().map(|p| grads.get(p).unwrap().clone()).collect::<Vec<_>>());
    let mut moved = 0.0f64;
    for ((d, b), x) in doubled.phi.iter().zip(&base.phi).zip(&direct) {
        assert!((d - (x - 2.0 * (x - b))).abs() < 1e-9, "{d} against {}", x - 2.0 * (x - b));
        moved = moved.max((d - b).abs());
    }
    assert!(moved > 1e-3, "the product is not read from the override");
}
