//! Checks of Bayesian TAML's pieces against closed forms and finite differences (f64).

use candle_core::{DType, Device, Result, Tensor, Var};

use super::model::{self, Draw, Encoder, Gaussian, Layout, Learner, Posterior, Task, TaskProblem, LAYERS, THETA};
use super::{episode_ci, probe, task_records, variant, Config, Meta, ProbeRow, LAYER_NAMES};
use crate::meta::hypergradient::{hypergradient, unroll, unrolled_value, Problem, StepSize, Unroll};
use crate::rng::Rng;

const DEV: Device = Device::Cpu;

fn t(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &DEV).unwrap()
}

fn vals(x: &Tensor) -> Vec<f64> {
    x.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

/// L_in = ½(θ−a)ᵀA(θ−a), L_out = ½‖θ' − b‖², one step of size α.
struct Quad {
    a: Tensor,
    am: Tensor,
    b: Tensor,
    alpha: f64,
}

impl Problem for Quad {
    fn inner_loss(&self, theta: &[Tensor], _phi: &[Tensor], _step: usize) -> Result<Tensor> {
        let d = (&theta[0] - &self.a)?.reshape((3, 1))?;
        (d.t()?.matmul(&self.am.matmul(&d)?)? * 0.5)?.reshape(())
    }
    fn outer(&self, theta: &[Tensor], _phi: &[Tensor]) -> Result<Tensor> {
        (&theta[0] - &self.b)?.sqr()?.sum_all()? * 0.5
    }
    fn step_size(&self, _phi: &[Tensor]) -> Result<StepSize> {
        Ok(StepSize::Scalar(self.alpha))
    }
}

#[test]
fn one_step_maml_matches_its_closed_form_on_a_quadratic() {
    let a = [0.3, -1.0, 2.0];
    let am = [2.0, 0.5, 0.1, 0.3, 1.5, -0.2, 0.0, 0.4, 1.0]; // not symmetric on purpose: ∇L_in = ½(A + Aᵀ)(θ − a)
    let b = [1.0, 0.0, -1.0];
    let theta = [0.5, 0.7, -0.4];
    let alpha = 0.1;
    let q = Quad { a: t(&a, &[3]), am: t(&am, &[3, 3]), b: t(&b, &[3]), alpha };
    let phi = [t(&[0.0], &[1])];
    let hg = hypergradient(&q, &[t(&theta, &[3])], &phi, Unroll::new(1, 1e-5)).unwrap();
    // S = ½(A + Aᵀ); θ' = θ − αS(θ − a); ∇θ = (I − αS)ᵀ(θ' − b).
    let s = |i: usize, j: usize| 0.5 * (am[i * 3 + j] + am[j * 3 + i]);
    let tp: Vec<f64> = (0..3).map(|i| theta[i] - alpha * (0..3).map(|j| s(i, j) * (theta[j] - a[j])).sum::<f64>()).collect();
    let want: Vec<f64> = (0..3).map(|j| (0..3).map(|i| (if i == j { 1.0 } else { 0.0 } - alpha * s(i, j)) * (tp[i] - b[i])).sum::<f64>()).collect();
    let got = vals(&hg.theta[0]);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

/// A tiny task: `way` classes, 6×6 single-channel images, the given shots, 2 queries per class.
fn tiny_task(way: usize, shots: &[usize], seed: u64) -> (Task, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut img = |n: usize, c: usize| -> Vec<f64> { (0..n * 36).map(|i| rng.normal() * 0.5 + if (i % 36) % way == c { 1.0 } else { 0.0 }).collect() };
    let (mut xs, mut ys, mut labels, mut xq, mut yq) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (c, &n) in shots.iter().enumerate() {
        xs.extend(img(n, c));
        for _ in 0..n {
            labels.push(c);
            ys.extend((0..way).map(|k| if k == c { 1.0 } else { 0.0 }));
        }
        xq.extend(img(2, c));
        for _ in 0..2 {
            yq.extend((0..way).map(|k| if k == c { 1.0 } else { 0.0 }));
        }
    }
    let n = labels.len();
    let task = Task { xs: t(&xs, &[n, 1, 6, 6]), ys: t(&ys, &[n, way]), xq: t(&xq, &[2 * way, 1, 6, 6]), yq: t(&yq, &[2 * way, way]) };
    (task, labels)
}

fn cfg(v: &str) -> Config {
    Config {
        variant: variant(v).unwrap(),
        way: 3,
        max_shot: 4,
        query: 2,
        inner_steps: 2,
        test_inner_steps: 2,
        inner_lr: 0.5,
        alpha_init: 0.05,
        meta_batch: 1,
        meta_lr: 1e-3,
        grad_clip: 3.0,
        iterations: 1,
        log_every: 1,
        mc_samples: 3,
        probe_tasks: 1,
    }
}

fn meta(v: &str, seed: u64) -> Meta {
    let c = cfg(v);
    let learner = Learner::new(1, 6, 6, 3).unwrap();
    let m = Meta::new(learner, &c, seed, &DEV, DType::F64).unwrap();
    // Larger initial weights than l2b's 0.02, so that every path carries a visible gradient.
    for (v, f) in m.conv.iter().map(|v| (v, 20.0)).chain(m.encoder_vars.iter().map(|v| (v, 4.0))) {
        let x = v.as_tensor().copy().unwrap();
        v.set(&(x * f).unwrap()).unwrap();
    }
    m
}

/// The whole objective of one task with a fixed ε: outer CE after K steps + KL/(N+M).
fn objective(m: &Meta, task: &Task, labels: &[usize], steps: usize) -> f64 {
    let post = m.posterior(task, labels).unwrap();
    let mut rng = Rng::new(7);
    let draw = post.as_ref().map(|p| Draw::of(p, m.variant, if m.variant.bayesian { Some(&mut rng) } else { None }).unwrap());
    let phi = m.phi(draw.as_ref());
    let mut v = unrolled_value(&m.problem(task), &m.theta().unwrap(), &phi, steps).unwrap();
    if let (Some(p), true) = (&post, m.variant.bayesian) {
        let n = (task.xs.dim(0).unwrap() + task.xq.dim(0).unwrap()) as f64;
        v += p.kl(m.variant).unwrap().to_scalar::<f64>().unwrap() / n;
    }
    v
}

/// ⟨∇F, d⟩ against the central difference of F along d, for random directions d in each of the
/// meta-parameters `which`.
fn check_var_gradients(m: &Meta, vars: &[Var], what: &str, task: &Task, labels: &[usize], steps: usize) {
    let g = m.task_grad(task, labels, steps, 1e-5, &mut Rng::new(7)).unwrap();
    let grads = g.surrogate.backward().unwrap();
    let mut rng = Rng::new(11);
    for (i, v) in vars.iter().enumerate() {
        let x = v.as_tensor().copy().unwrap();
        let d: Vec<f64> = (0..x.elem_count()).map(|_| rng.normal()).collect();
        let d = Tensor::from_vec(d, x.shape(), &DEV).unwrap();
        let an = grads.get(v.as_tensor()).map(|g| (g * &d).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).unwrap_or(0.0);
        // A small step: the objective has kinks (ReLU, max-pooling) that a step of 1e-5 can cross.
        let h = 1e-6;
        v.set(&(&x + (&d * h).unwrap()).unwrap()).unwrap();
        let fp = objective(m, task, labels, steps);
        v.set(&(&x - (&d * h).unwrap()).unwrap()).unwrap();
        let fm = objective(m, task, labels, steps);
        v.set(&x).unwrap();
        let fd = (fp - fm) / (2.0 * h);
        assert!((an - fd).abs() <= 1e-5 * (1.0 + fd.abs()), "{what} tensor {i}: analytic {an} vs finite difference {fd}");
    }
}

#[test]
fn k_step_meta_gradients_match_finite_differences_of_the_unrolled_objective() {
    let (task, labels) = tiny_task(3, &[1, 3, 2], 1);
    for name in ["maml", "meta_sgd", "taml", "taml_deterministic"] {
        let m = meta(name, 3);
        // The head's two θ tensors are not meta-learned (a zero head per task): conv only.
        check_var_gradients(&m, &m.conv, &format!("{name} θ"), &task, &labels, 3);
        check_var_gradients(&m, &m.shifts, &format!("{name} BN shifts"), &task, &labels, 3);
        check_var_gradients(&m, &m.alpha, &format!("{name} α"), &task, &labels, 3);
        check_var_gradients(&m, &m.encoder_vars, &format!("{name} encoder"), &task, &labels, 3);
    }
}

#[test]
fn hypergradients_with_respect_to_omega_gamma_z_match_finite_differences() {
    let (task, labels) = tiny_task(3, &[2, 1, 3], 2);
    let m = meta("taml", 5);
    let post = m.posterior(&task, &labels).unwrap().unwrap();
    let draw = Draw::of(&post, m.variant, Some(&mut Rng::new(3))).unwrap();
    let phi = m.phi(Some(&draw));
    let theta = m.theta().unwrap();
    let p = m.problem(&task);
    let hg = hypergradient(&p, &theta, &phi, Unroll::new(3, 1e-5)).unwrap();
    let hp = hg.phi_tensors(&phi).unwrap();
    let lay = Layout::of(m.variant);
    let mut rng = Rng::new(4);
    for (name, at) in [("ω", lay.omega.unwrap()), ("γ", lay.gamma.unwrap()), ("z_w", lay.z.unwrap()), ("z_b", lay.z.unwrap() + 1)] {
        let d: Vec<f64> = (0..phi[at].elem_count()).map(|_| rng.normal()).collect();
        let d = Tensor::from_vec(d, phi[at].shape(), &DEV).unwrap();
        let h = 1e-6;
        let mut pp = phi.clone();
        pp[at] = (&phi[at] + (&d * h).unwrap()).unwrap();
        let fp = unrolled_value(&p, &theta, &pp, 3).unwrap();
        pp[at] = (&phi[at] - (&d * h).unwrap()).unwrap();
        let fm = unrolled_value(&p, &theta, &pp, 3).unwrap();
        let fd = (fp - fm) / (2.0 * h);
        let an = (&hp[at] * &d).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        if name == "z_b" {
            // The conv bias (and so its shift z_b) is followed by a batch-statistics BatchNorm,
            // which subtracts the channel mean: no effect, no gradient (as in l2b).
            assert!(an.abs() < 1e-6 && fd.abs() < 1e-6, "z_b: {an} {fd}");
            continue;
        }
        assert!(fd.abs() > 1e-8, "{name}: the objective does not depend on it");
        assert!((an - fd).abs() <= 1e-5 * (1.0 + fd.abs()), "{name}: analytic {an} vs finite difference {fd}");
    }
}

#[test]
fn inner_loss_identities() {
    let logits = t(&[0.2, -1.0, 0.5, 1.0, 0.0, -0.3, 0.1, 0.1, 0.9, -2.0, 0.3, 0.0], &[4, 3]);
    let labels = [0usize, 1, 1, 2];
    let oh: Vec<f64> = labels.iter().flat_map(|&l| (0..3).map(move |k| if k == l { 1.0 } else { 0.0 })).collect();
    let oh = t(&oh, &[4, 3]);
    let ce = vals(&model::cross_entropy_each(&logits, &oh).unwrap());
    let mean = ce.iter().sum::<f64>() / 4.0;
    // Uniform ω (any constant) is the mean cross-entropy.
    let uni = model::inner_loss(&logits, &oh, Some(&t(&[0.7, 0.7, 0.7], &[3]))).unwrap().to_scalar::<f64>().unwrap();
    assert!((uni - mean).abs() < 1e-12);
    let off = model::inner_loss(&logits, &oh, None).unwrap().to_scalar::<f64>().unwrap();
    assert!((off - mean).abs() < 1e-12);
    // One-hot softmax(ω) on class 1: (way/N)·Σ_{i∈1} CE_i.
    let one = model::inner_loss(&logits, &oh, Some(&t(&[-60.0, 60.0, -60.0], &[3]))).unwrap().to_scalar::<f64>().unwrap();
    assert!((one - 3.0 / 4.0 * (ce[1] + ce[2])).abs() < 1e-12, "{one}");
}

#[test]
fn gamma_scales_each_layers_step_and_z_modulates_the_init() {
    let (task, _) = tiny_task(3, &[1, 2, 2], 3);
    let m = meta("taml", 1);
    let p = TaskProblem { learner: &m.learner, task: &task, layout: Layout::of(m.variant), inner_lr: 0.0 };
    let lay = p.layout;
    let post = m.posterior(&task, &[0, 1, 1, 2, 2]).unwrap().unwrap();
    let draw = Draw::of(&post, m.variant, None).unwrap();
    let mut phi = m.phi(Some(&draw));
    let g = lay.gamma.unwrap();
    let sizes = |phi: &[Tensor]| -> Vec<Vec<f64>> {
        match p.step_size(phi).unwrap() {
            StepSize::PerTensor(ts) => ts.iter().map(vals).collect(),
            StepSize::Scalar(_) => panic!("per-tensor step sizes expected"),
        }
    };
    phi[g] = t(&[0.0; LAYERS], &[LAYERS]);
    let base = sizes(&phi);
    let alpha: Vec<Vec<f64>> = m.alpha.iter().map(|v| vals(v.as_tensor())).collect();
    assert_eq!(base, alpha, "γ = 0 leaves Meta-SGD's α as it is");
    phi[g] = t(&[0.0, std::f64::consts::LN_2, 0.0, 0.0, 0.0], &[LAYERS]);
    let doubled = sizes(&phi);
    for i in 0..THETA {
        let f = if model::layer_of(i) == 1 { 2.0 } else { 1.0 };
        close(&doubled[i], &base[i].iter().map(|x| x * f).collect::<Vec<_>>(), 1e-12, "γ_2 = ln 2");
    }
    // MAML with γ = 0: the scalar step.
    let maml = TaskProblem { learner: &m.learner, task: &task, layout: Layout::of(variant("maml").unwrap()), inner_lr: 0.5 };
    assert!(matches!(maml.step_size(&phi[..4]).unwrap(), StepSize::Scalar(x) if x == 0.5));
    // z = 0 leaves θ unchanged; z_w[l, c] scales only channel c's filters of conv l.
    let theta = m.theta().unwrap();
    let zero = Tensor::zeros((4, 32), DType::F64, &DEV).unwrap();
    let same = model::modulate(&theta, &zero, &zero).unwrap();
    for (a, b) in theta.iter().zip(&same) {
        assert_eq!(vals(a), vals(b));
    }
    let mut zw = vec![0.0; 128];
    zw[32 + 5] = 1.0; // conv2, channel 5, doubled
    let moved = model::modulate(&theta, &t(&zw, &[4, 32]), &zero).unwrap();
    let before = theta[2].flatten_from(1).unwrap().to_vec2::<f64>().unwrap();
    let after = moved[2].flatten_from(1).unwrap().to_vec2::<f64>().unwrap();
    for (c, (b, a)) in before.iter().zip(&after).enumerate() {
        let f = if c == 5 { 2.0 } else { 1.0 };
        close(a, &b.iter().map(|x| x * f).collect::<Vec<_>>(), 1e-12, "z_w");
    }
    assert_eq!(vals(&theta[0]), vals(&moved[0]));
}

#[test]
fn the_zero_head_leaves_the_body_unchanged_by_the_first_inner_step() {
    let (task, _) = tiny_task(3, &[2, 2, 1], 4);
    for name in ["maml", "meta_sgd"] {
        let m = meta(name, 2);
        let theta = m.theta().unwrap();
        let phi = m.phi(None);
        let one = unroll(&m.problem(&task), &theta, &phi, 1).unwrap();
        for i in 0..8 {
            assert_eq!(vals(&theta[i]), vals(&one[i]), "{name}: conv tensor {i} moved");
        }
        assert!(vals(&one[8]).iter().any(|x| *x != 0.0), "{name}: the head did not move");
        let two = unroll(&m.problem(&task), &theta, &phi, 2).unwrap();
        assert!(vals(&two[0]) != vals(&theta[0]), "{name}: the second step moves the body");
    }
}

#[test]
fn kl_matches_its_closed_form_and_a_monte_carlo_estimate() {
    let zero = model::kl_normal(&t(&[0.0; 4], &[4]), &t(&[1.0; 4], &[4])).unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(zero, 0.0);
    let (mu, sigma) = (0.7, 0.4);
    let kl = model::kl_normal(&t(&[mu], &[1]), &t(&[sigma], &[1])).unwrap().to_scalar::<f64>().unwrap();
    // E_q[log q(x) − log p(x)] by Monte Carlo.
    let mut rng = Rng::new(9);
    let n = 400_000;
    let mut s = 0.0;
    for _ in 0..n {
        let e = rng.normal();
        let x = mu + sigma * e;
        s += (-0.5 * e * e - sigma.ln()) - (-0.5 * x * x);
    }
    let mc = s / n as f64;
    assert!((kl - mc).abs() < 5e-3, "closed form {kl} vs Monte Carlo {mc}");
    assert!((kl - (0.5 * (mu * mu + sigma * sigma) - sigma.ln() - 0.5)).abs() < 1e-15);
}

#[test]
fn the_set_encoder_is_invariant_to_sample_order_and_equivariant_to_class_order() {
    let (task, labels) = tiny_task(3, &[1, 3, 2], 5);
    let m = meta("taml", 4);
    let enc = m.encoder.as_ref().unwrap();
    let post = enc.forward(&task.xs, &labels, 3).unwrap();
    // Reverse the support samples.
    let n = labels.len();
    let rev: Vec<u32> = (0..n as u32).rev().collect();
    let idx = Tensor::from_vec(rev.clone(), n, &DEV).unwrap();
    let xs_rev = task.xs.index_select(&idx, 0).unwrap();
    let labels_rev: Vec<usize> = rev.iter().map(|&i| labels[i as usize]).collect();
    let p2 = enc.forward(&xs_rev, &labels_rev, 3).unwrap();
    for (a, b) in [(&post.omega.mu, &p2.omega.mu), (&post.gamma.mu, &p2.gamma.mu), (&post.z.sigma, &p2.z.sigma)] {
        close(&vals(a), &vals(b), 1e-10, "sample order");
    }
    // Relabel classes by the permutation c → perm[c]: ω is permuted, γ and z unchanged.
    let perm = [2usize, 0, 1];
    let relabelled: Vec<usize> = labels.iter().map(|&c| perm[c]).collect();
    let p3 = enc.forward(&task.xs, &relabelled, 3).unwrap();
    let w = vals(&post.omega.mu);
    let w3 = vals(&p3.omega.mu);
    for c in 0..3 {
        assert!((w[c] - w3[perm[c]]).abs() < 1e-10);
    }
    close(&vals(&post.gamma.mu), &vals(&p3.gamma.mu), 1e-10, "γ under class order");
    // ω depends on the shots: not all equal here.
    assert!(w.iter().any(|x| (x - w[0]).abs() > 1e-9));
}

#[test]
fn prediction_with_vanishing_posterior_scale_equals_the_mean_prediction() {
    let (task, labels) = tiny_task(3, &[2, 1, 3], 6);
    let mut m = meta("taml", 8);
    // σ = softplus(raw): raw biases of −40 make every σ ≈ 4e−18.
    for (at, start, len) in [(17usize, 1usize, 1usize), (21, LAYERS, LAYERS), (25, model::Z_DIM, model::Z_DIM)] {
        let v = &m.encoder_vars[at];
        let mut b = vals(v.as_tensor());
        for x in &mut b[start..start + len] {
            *x = -40.0;
        }
        v.set(&t(&b, &[b.len()])).unwrap();
    }
    let sampled = m.predict(&task, &labels, 2, 4, &mut Rng::new(1)).unwrap();
    m.variant.bayesian = false;
    let mean = m.predict(&task, &labels, 2, 4, &mut Rng::new(1)).unwrap();
    close(&vals(&sampled), &vals(&mean), 1e-9, "σ → 0");
}

#[test]
fn posterior_draws_are_reparameterised() {
    let g = Gaussian { mu: t(&[1.0, -2.0], &[2]), sigma: t(&[0.5, 2.0], &[2]) };
    let mut a = Rng::new(3);
    let x = vals(&g.draw(Some(&mut a)).unwrap());
    let mut b = Rng::new(3);
    let (e0, e1) = (b.normal(), b.normal());
    close(&x, &[1.0 + 0.5 * e0, -2.0 + 2.0 * e1], 1e-15, "μ + σε");
    assert_eq!(vals(&g.draw(None).unwrap()), vec![1.0, -2.0]);
    let _ = (Posterior { omega: g.clone(), gamma: g.clone(), z: g }, Encoder::init(1, 6, 6, 4, 0, &DEV, DType::F64).unwrap());
}

#[test]
fn episode_intervals_use_the_population_standard_deviation() {
    // 1.96·std(ddof 0)/√n: values 40, 60, 80, 100 → mean 70, std √500.
    let (m, ci) = episode_ci(&[40.0, 60.0, 80.0, 100.0]);
    assert_eq!(m, 70.0);
    assert!((ci - 1.96 * 500f64.sqrt() / 2.0).abs() < 1e-12);
}

/// Three probe tasks: one of each kind of ω trend, one balanced task.
fn probe_rows() -> Vec<ProbeRow> {
    vec![
        ProbeRow { n: 10, gamma: vec![1.0, 1.0, 1.0, 1.0, 3.0], shots: vec![1, 2, 7], omega: vec![0.5, 0.3, 0.2] },
        ProbeRow { n: 20, gamma: vec![2.0, 1.5, 1.1, 2.0, 2.0], shots: vec![4, 4, 4], omega: vec![0.34, 0.33, 0.33] },
        ProbeRow { n: 30, gamma: vec![3.0, 1.7, 1.2, 0.5, 1.0], shots: vec![5, 1, 1], omega: vec![0.2, 0.5, 0.3] },
    ]
}

#[test]
fn probe_statistics_by_hand() {
    let rows = probe_rows();
    let mut out = std::collections::BTreeMap::new();
    probe(&rows, "", &mut out);
    assert_eq!(out["rho_gamma_conv1"], 1.0);
    assert_eq!(out["rho_gamma_conv4"], -0.5);
    assert_eq!(out["rho_gamma_dense"], -1.0);
    assert!((out["rho_gamma_conv"] - (1.0 + 1.0 + 1.0 - 0.5) / 4.0).abs() < 1e-12);
    // Task 1: ρ(shots, ω) = −1; task 3: shots (5, 1, 1) ranks (3, 1.5, 1.5), ω ranks (1, 3, 2) → −0.866.
    let rho3 = crate::render::summary::spearman(&[5.0, 1.0, 1.0], &[0.2, 0.5, 0.3]).unwrap();
    assert!((out["omega_rho"] - (-1.0 + rho3) / 2.0).abs() < 1e-12);
    assert_eq!(out["omega_rarest"], 100.0);
    assert!((out["omega_balanced_dev"] - (0.34 - 1.0 / 3.0)).abs() < 1e-12);
}

#[test]
fn task_records_give_the_engine_the_same_associations_as_the_probe_statistics() {
    let rows = probe_rows();
    let mut out = std::collections::BTreeMap::new();
    probe(&rows, "init_", &mut out);
    // Balanced-task deviation is kept for the untrained network too (the T7 control).
    assert!((out["init_omega_balanced_dev"] - (0.34 - 1.0 / 3.0)).abs() < 1e-12);
    let mut full = std::collections::BTreeMap::new();
    probe(&rows, "", &mut full);
    let records: Vec<crate::methods::TaskRecord> = rows.iter().enumerate().flat_map(|(k, r)| task_records("id", k, Some(50.0), r)).collect();
    // One task row and three class rows per task.
    assert_eq!(records.len(), 12);
    assert_eq!(records[0].values["n"], 10.0);
    assert_eq!(records[0].values["gamma_dense"], 3.0);
    assert_eq!((records[1].class, records[1].values["shots"], records[1].values["omega"]), (Some(0), 1.0, 0.5));
    let tasks: Vec<crate::frames::TaskRow> = records
        .iter()
        .map(|r| crate::frames::TaskRow {
            experiment: "e".into(),
            run: "r".into(),
            key: "k".into(),
            seed: 0,
            epoch: 1,
            set: r.set.clone(),
            task: r.task as i64,
            class: r.class.map(|c| c as i64),
            values: r.values.iter().map(|(k, v)| (k.clone(), Some(*v))).collect(),
        })
        .collect();
    let refs: Vec<&crate::frames::TaskRow> = tasks.iter().collect();
    use crate::render::summary::task_association;
    for (l, name) in LAYER_NAMES.iter().enumerate() {
        let rho = task_association(&refs, "n", &format!("gamma_{name}"), false).unwrap();
        assert!((rho - full[&format!("rho_gamma_{name}")]).abs() < 1e-12, "layer {l}");
    }
    assert!((task_association(&refs, "shots", "omega", true).unwrap() - full["omega_rho"]).abs() < 1e-12);
}
