//! WAMAL's pieces against hand-computed values, closed forms and finite differences (f64).

use candle_core::{DType, Device, Tensor, Var};

use super::hierarchy::{blocks, masks, Hierarchy, CIFAR100_COARSE};
use super::losses::{focal, log2_weight, masked_softmax, neg_entropy, weight};
use super::nets::{self, Arch, Batch, Losses, MetaProblem, Variant, PART};
use super::*;
use crate::meta::{hypergradient, unrolled_value, Problem, StepSize, Unroll};

fn t(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn v2(x: &Tensor) -> Vec<Vec<f64>> {
    x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn scalar(x: &Tensor) -> f64 {
    x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central finite differences of `f` at `x` (flattened), step `h`.
fn fd(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[i] += h;
            b[i] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y} (all: {a:?} vs {b:?})");
    }
}

#[test]
fn masked_softmax_is_the_softmax_of_the_block() {
    // Two rows, 4 auxiliary classes, blocks [0, 2) and [2, 4).
    let a = t(&[1.0, 2.0, 30.0, -1.0, 0.5, 0.5, 0.0, 3.0], &[2, 4]);
    let m = t(&masks(&[2, 2], &[0, 1]), &[2, 4]);
    let y = v2(&masked_softmax(&a, &m).unwrap());
    let e = 1f64.exp() + 2f64.exp();
    close(&y[0], &[1f64.exp() / e, 2f64.exp() / e, 0.0, 0.0], 1e-10);
    let e = 1.0 + 3f64.exp();
    close(&y[1], &[0.0, 0.0, 1.0 / e, 3f64.exp() / e], 1e-10);
    for r in &y {
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-10);
    }
    assert_eq!(y[0][2], 0.0);
    assert_eq!(y[1][0], 0.0);
}

#[test]
fn weight_map_spans_two_to_the_plus_minus_r() {
    let s = t(&[0.0, 0.25, 0.5, 0.75, 1.0], &[5]);
    let w = weight(&s, 15.0).unwrap().to_vec1::<f64>().unwrap();
    close(&w, &[2f64.powi(-15), 2f64.powf(-7.5), 1.0, 2f64.powf(7.5), 2f64.powi(15)], 1e-12);
    assert_eq!(w[2], 1.0, "s = ½ gives exactly w = 1");
    assert!(w.windows(2).all(|p| p[0] < p[1]), "monotone");
    close(&log2_weight(&s, 15.0).unwrap().to_vec1::<f64>().unwrap(), &[-15.0, -7.5, 0.0, 7.5, 15.0], 1e-12);
}

#[test]
fn focal_loss_hand_value_and_gradients() {
    // Two classes, logits (0, ln 3): p = (¼, ¾); target (0.2, 0.8):
    // ℓ = −0.2 (¾)² ln ¼ − 0.8 (¼)² ln ¾.
    let z = t(&[0.0, 3f64.ln()], &[1, 2]);
    let tg = t(&[0.2, 0.8], &[1, 2]);
    let want = -0.2 * 0.5625 * 0.25f64.ln() - 0.8 * 0.0625 * 0.75f64.ln();
    assert!((scalar(&focal(&z, &tg, 2.0).unwrap().sum_all().unwrap()) - want).abs() < 1e-12);
    // γ = 0 is cross-entropy.
    let ce = -0.2 * 0.25f64.ln() - 0.8 * 0.75f64.ln();
    assert!((scalar(&focal(&z, &tg, 0.0).unwrap().sum_all().unwrap()) - ce).abs() < 1e-12);
    // Gradients with respect to the logits and the targets, against finite differences.
    let logits = [0.3, -1.2, 0.7, 2.0, 0.1, -0.4];
    let targets = [0.1, 0.6, 0.3, 0.0, 0.5, 0.5];
    let value = |l: &[f64], g: &[f64]| scalar(&focal(&t(l, &[2, 3]), &t(g, &[2, 3]), 2.0).unwrap().sum_all().unwrap());
    let (lv, tv) = (Var::from_tensor(&t(&logits, &[2, 3])).unwrap(), Var::from_tensor(&t(&targets, &[2, 3])).unwrap());
    let grads = focal(lv.as_tensor(), tv.as_tensor(), 2.0).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    close(&flat(grads.get(lv.as_tensor()).unwrap()), &fd(&logits, 1e-6, |l| value(l, &targets)), 1e-7);
    close(&flat(grads.get(tv.as_tensor()).unwrap()), &fd(&targets, 1e-6, |g| value(&logits, g)), 1e-7);
}

#[test]
fn negative_entropy_is_minus_log_k_at_uniform_and_has_the_right_gradient() {
    let u = t(&[0.25; 8], &[2, 4]);
    assert!((scalar(&neg_entropy(&u).unwrap()) + 4f64.ln()).abs() < 1e-12);
    // Rows that each put their mass on one class, but on different classes: the mean is
    // uniform, so the term is still −log K (it rewards spread *across* samples).
    let spread = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
    assert!((scalar(&neg_entropy(&spread).unwrap()) + 2f64.ln()).abs() < 1e-12);
    let x = [0.2, 0.5, 0.3, 0.6, 0.1, 0.3];
    let var = Var::from_tensor(&t(&x, &[2, 3])).unwrap();
    let g = neg_entropy(var.as_tensor()).unwrap().backward().unwrap();
    let got = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    close(&got, &fd(&x, 1e-6, |v| scalar(&neg_entropy(&t(v, &[2, 3])).unwrap())), 1e-7);
}

/// L1 = ½‖θ1 − Aθ2‖², M = ½‖θ1⁺ − b‖².
struct LinearQuadratic {
    a: Tensor,
    b: Tensor,
    alpha: f64,
}

impl Problem for LinearQuadratic {
    fn inner_loss(&self, theta: &[Tensor], phi: &[Tensor], _: usize) -> candle_core::Result<Tensor> {
        let r = (&theta[0] - self.a.matmul(&phi[0].unsqueeze(1)?)?.squeeze(1)?)?;
        r.sqr()?.sum_all()? * 0.5
    }
    fn outer(&self, theta: &[Tensor], _: &[Tensor]) -> candle_core::Result<Tensor> {
        (&theta[0] - &self.b)?.sqr()?.sum_all()? * 0.5
    }
    fn step_size(&self, _: &[Tensor]) -> candle_core::Result<StepSize> {
        Ok(StepSize::Scalar(self.alpha))
    }
}

#[test]
fn hypergradient_matches_the_linear_quadratic_closed_form() {
    // A is 3×2, θ1 ∈ ℝ³, θ2 ∈ ℝ²: θ1⁺ = θ1 − α(θ1 − Aθ2), dM/dθ2 = α Aᵀ(θ1⁺ − b).
    let a = [[1.0, 0.5], [-0.3, 2.0], [0.7, -1.1]];
    let (th1, th2, b, alpha) = ([0.4, -0.2, 1.3], [0.9, -0.6], [0.1, 0.2, -0.5], 0.3);
    let p = LinearQuadratic { a: t(&a.concat(), &[3, 2]), b: t(&b, &[3]), alpha };
    let h = hypergradient(&p, &[t(&th1, &[3])], &[t(&th2, &[2])], Unroll::new(1, 1e-5)).unwrap();
    let plus: Vec<f64> = (0..3).map(|i| th1[i] - alpha * (th1[i] - (a[i][0] * th2[0] + a[i][1] * th2[1]))).collect();
    let want: Vec<f64> = (0..2).map(|j| alpha * (0..3).map(|i| a[i][j] * (plus[i] - b[i])).sum::<f64>()).collect();
    close(&h.phi, &want, 1e-9);
    let m = 0.5 * plus.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    assert!((h.value - m).abs() < 1e-12);
}

fn tiny_arch() -> Arch {
    Arch { input: 5, hidden: 4, features: 3, primary: 2, aux: 4, generated: 4 }
}

fn tiny_batch(arch: &Arch, psi: &[usize]) -> Batch {
    let mut rng = crate::rng::Rng::derive(7, "wamal-test-batch");
    let n = 6;
    let x: Vec<f64> = (0..n * arch.input).map(|_| rng.normal()).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    let x = t(&x, &[n, arch.input]);
    let primary = crate::train::loss::one_hot(&labels, arch.primary, x.device(), x.dtype()).unwrap();
    let aux = t(&masks(psi, &labels), &[n, psi.iter().sum()]);
    Batch { x, primary, aux }
}

fn losses_of(variant: Variant) -> Losses {
    Losses { variant, focal_gamma: 2.0, range: 15.0, entropy_weight: 0.2 }
}

#[test]
fn hypergradient_of_the_meta_objective_matches_finite_differences() {
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    let theta = arch.init_learner(1, &Device::Cpu, DType::F64).unwrap();
    let mut phi = arch.init_generator(2, &Device::Cpu, DType::F64).unwrap();
    // Weights of order 1 (s near ½ gives w near 1 at R = 15 otherwise hardly varies).
    phi[2 * PART + 2] = (&phi[2 * PART + 2] * 0.1).unwrap();
    let problem = MetaProblem::new(losses_of(Variant::Wamal), &b, 0.5);
    let h = hypergradient(&problem, &theta, &phi, Unroll::new(1, 1e-5)).unwrap();
    let flat: Vec<f64> = phi.iter().flat_map(|p| p.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect();
    let rebuild = |v: &[f64]| {
        let mut start = 0;
        phi.iter()
            .map(|p| {
                let n = p.elem_count();
                let out = t(&v[start..start + n], p.dims());
                start += n;
                out
            })
            .collect::<Vec<_>>()
    };
    let want = fd(&flat, 1e-6, |v| unrolled_value(&problem, &theta, &rebuild(v), 1).unwrap());
    let err = h.phi.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(err < 1e-4, "relative error {err}");
    // dM/dφ alone, as the level-2 step takes it (the generator once per difference).
    let only = hypergradient(&problem, &theta, &phi, Unroll::phi_only(1, 1e-5)).unwrap();
    let err = only.phi.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(err < 1e-4, "φ-only: relative error {err}");
    // The weight head's gradient is not zero: the meta objective reaches w.
    assert!(h.phi[flat.len() - 1].abs() > 0.0);
}

fn tiny_config(variant: Variant, psi: &[usize]) -> Config {
    Config {
        losses: losses_of(variant),
        meta: variant.generates().then(|| MetaConfig {
            psi: psi.to_vec(),
            order: Order::Interleaved,
            inner_lr: 0.1,
            inner_rule: InnerRule::Repo,
            gen_lr: 0.05,
            gen_weight_decay: 5e-4,
            hvp_eps: 0.01,
            freeze_weight_head: false,
        }),
        hidden: 4,
        features: 3,
        epochs: 1,
        batch_size: 6,
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-3,
        lr_step: 50,
        lr_gamma: 0.5,
    }
}

fn bits(v: &[Tensor]) -> Vec<u64> {
    v.iter().flat_map(|p| p.flatten_all().unwrap().to_vec1::<f64>().unwrap()).map(f64::to_bits).collect()
}

#[test]
fn maxl_is_wamal_with_the_weight_head_frozen_at_one_half() {
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    let theta = arch.init_learner(3, &Device::Cpu, DType::F64).unwrap();
    let mut phi = arch.init_generator(4, &Device::Cpu, DType::F64).unwrap();
    // The weight head's last layer at zero: s = sigmoid(0) = ½ for every sample, w = 1.
    phi[2 * PART + 2] = phi[2 * PART + 2].zeros_like().unwrap();
    phi[2 * PART + 3] = phi[2 * PART + 3].zeros_like().unwrap();
    let maxl = tiny_config(Variant::Maxl, &[2, 2]);
    let mut wamal = tiny_config(Variant::Wamal, &[2, 2]);
    if let Some(m) = wamal.meta.as_mut() {
        m.freeze_weight_head = true;
    }
    let (mut a, mut c) = (State::new(theta.clone(), phi.clone()), State::new(theta, phi));
    for _ in 0..3 {
        let (la, lc) = (a.level1(&maxl, &b, 0.1).unwrap(), c.level1(&wamal, &b, 0.1).unwrap());
        assert_eq!(la.total.to_bits(), lc.total.to_bits());
        let ma = a.level2(&maxl, maxl.meta.as_ref().unwrap(), &b, 0.1, 0.05).unwrap();
        let mc = c.level2(&wamal, wamal.meta.as_ref().unwrap(), &b, 0.1, 0.05).unwrap();
        assert_eq!(ma.to_bits(), mc.to_bits());
    }
    assert_eq!(bits(&a.theta), bits(&c.theta));
    assert_eq!(bits(&a.phi), bits(&c.phi));
    // And the label head did move (the test compares something that changes).
    assert_ne!(bits(&a.phi[PART..2 * PART]), bits(&tiny_arch().init_generator(4, &Device::Cpu, DType::F64).unwrap()[PART..2 * PART]));
}

#[test]
fn stl_gives_the_auxiliary_head_no_gradient() {
    let arch = Arch { aux: 1, ..tiny_arch() };
    let b = tiny_batch(&arch, &[2, 2]);
    let theta = arch.init_learner(5, &Device::Cpu, DType::F64).unwrap();
    let vars: Vec<Var> = theta.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let vt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let l = losses_of(Variant::Stl).level1(&vt, &[], &b).unwrap();
    assert!(l.aux.is_none());
    let g = l.total.backward().unwrap();
    for v in &vt[2 * PART..] {
        assert!(g.get(v).is_none_or(|x| x.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() == 0.0));
    }
    assert!(g.get(&vt[PART]).is_some(), "the primary head does get one");
    // A step of the STL run leaves the auxiliary head exactly where it was.
    let mut s = State::new(theta.clone(), Vec::new());
    s.level1(&tiny_config(Variant::Stl, &[]), &b, 0.1).unwrap();
    assert_eq!(bits(&s.theta[2 * PART..]), bits(&theta[2 * PART..]));
    assert_ne!(bits(&s.theta[..PART]), bits(&theta[..PART]));
}

#[test]
fn hierarchies_and_blocks() {
    assert_eq!(Hierarchy::Mod5.map(), vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    assert_eq!(Hierarchy::Pairs.map(), vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    assert_eq!(Hierarchy::Parity.primary_classes(), 2);
    assert_eq!(Hierarchy::Mod5.primary_classes(), 5);
    let b = blocks(&[2, 2, 2, 2, 2]);
    assert_eq!(b, vec![0..2, 2..4, 4..6, 6..8, 8..10]);
    assert_eq!(blocks(&[1, 3, 2]), vec![0..1, 1..4, 4..6]);
    assert_eq!(masks(&[1, 3, 2], &[1]), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    // CIFAR-100: 20 superclasses of 5 fine classes each; aquarium fish (1) and flatfish (32)
    // are fish (1), apple (0) is fruit and vegetables (4).
    let mut n = [0; 20];
    for &c in &CIFAR100_COARSE {
        n[c as usize] += 1;
    }
    assert_eq!(n, [5; 20]);
    assert_eq!((CIFAR100_COARSE[0], CIFAR100_COARSE[1], CIFAR100_COARSE[32]), (4, 1, 1));
}

#[test]
fn step_lr_and_the_public_codes_inner_rate_at_epochs_48_to_51() {
    let cfg = tiny_config(Variant::Wamal, &[2, 2]);
    let meta = |rule| MetaConfig { inner_lr: 0.01, inner_rule: rule, ..cfg.meta.clone().unwrap() };
    let at = |f: &dyn Fn(usize) -> f64| (48..52).map(f).collect::<Vec<_>>();
    // StepLR (0-based epochs): halved from epoch 50.
    close(&at(&|e| cfg.lr_at(0.01, e)), &[0.01, 0.01, 0.005, 0.005], 1e-15);
    // The public code halves α when (epoch + 1) % 50 == 0 at the start of epoch 49: one early.
    close(&at(&|e| cfg.inner_lr_at(&meta(InnerRule::Repo), e)), &[0.01, 0.005, 0.005, 0.005], 1e-15);
    close(&at(&|e| cfg.inner_lr_at(&meta(InnerRule::StepLr), e)), &[0.01, 0.01, 0.005, 0.005], 1e-15);
}

#[test]
fn quantiles_and_normalised_entropy() {
    let v = [1.0, 2.0, 3.0, 4.0, 5.0];
    assert_eq!(quantile(&v, 0.5), 3.0);
    assert_eq!(quantile(&v, 0.25), 2.0);
    assert!((quantile(&v, 0.1) - 1.4).abs() < 1e-12);
    assert!((normalised_entropy(&[2.0, 2.0, 2.0]) - 1.0).abs() < 1e-12);
    assert_eq!(normalised_entropy(&[3.0, 0.0]), 0.0);
}

#[test]
fn the_generator_never_reads_the_primary_label() {
    // Same images, different labels: the label logits and s are the same; only the mask moves.
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    let phi = arch.init_generator(6, &Device::Cpu, DType::F64).unwrap();
    let (a, s) = nets::generator(&phi, &b.x).unwrap();
    let (a2, s2) = nets::generator(&phi, &b.x).unwrap();
    assert_eq!(bits(&[a, s]), bits(&[a2, s2]));
    // And the learner's outputs do not depend on the labels either (it takes only x).
    let theta = arch.init_learner(6, &Device::Cpu, DType::F64).unwrap();
    let flipped = Batch { x: b.x.clone(), primary: b.primary.clone(), aux: t(&masks(&[2, 2], &[1, 0, 1, 0, 1, 0]), &[6, 4]) };
    let l0 = scalar(&losses_of(Variant::Wamal).level1(&theta, &phi, &b).unwrap().primary);
    let l1 = scalar(&losses_of(Variant::Wamal).level1(&theta, &phi, &flipped).unwrap().primary);
    assert_eq!(l0.to_bits(), l1.to_bits());
}

#[test]
fn cifar100_fine_to_coarse_map_matches_the_records_coarse_bytes() {
    use crate::data::formats::{load_cifar, CifarVariant};
    // Records (coarse byte, fine byte) whose pairs follow from the class names, not from the
    // map under test: apple → fruit and vegetables (4), aquarium fish → fish (1), baby → people
    // (14), bicycle → vehicles 1 (18), whale → aquatic mammals (0), worm → non-insect
    // invertebrates (13).
    let pairs: [(u8, u8); 6] = [(4, 0), (1, 1), (14, 2), (18, 8), (0, 95), (13, 99)];
    let bytes: Vec<u8> = pairs.iter().flat_map(|&(c, f)| [vec![c, f], vec![0u8; 3 * 32 * 32]].concat()).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.bin");
    std::fs::write(&path, bytes).unwrap();
    let fine = load_cifar(std::slice::from_ref(&path), CifarVariant::Cifar100Fine).unwrap();
    let coarse = load_cifar(std::slice::from_ref(&path), CifarVariant::Cifar100Coarse).unwrap();
    let (relabelled, n) = crate::data::derived::relabel(&fine.labels, fine.num_classes, &Hierarchy::Cifar100Coarse.map()).unwrap();
    assert_eq!(n, 20);
    assert_eq!(relabelled, coarse.labels);
}

/// The meta step's own difference of the inner losses (the generator once, the focal loss's
/// targets once) is L1(θ⁺) − L1(θ⁻), for every variant.
#[test]
fn level1_difference_is_the_difference_of_the_level1_losses() {
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    let plus = arch.init_learner(7, &Device::Cpu, DType::F64).unwrap();
    let minus = arch.init_learner(8, &Device::Cpu, DType::F64).unwrap();
    let phi = arch.init_generator(9, &Device::Cpu, DType::F64).unwrap();
    for variant in [Variant::Stl, Variant::Human, Variant::Maxl, Variant::Wamal] {
        let l = losses_of(variant);
        let want = (l.level1(&plus, &phi, &b).unwrap().total - l.level1(&minus, &phi, &b).unwrap().total).unwrap().to_scalar::<f64>().unwrap();
        let got = l.level1_difference(&plus, &minus, &phi, &b).unwrap().to_scalar::<f64>().unwrap();
        assert!(want.abs() > 1e-6, "{variant:?}: the two points give the same loss");
        assert!((got - want).abs() < 1e-12 * want.abs().max(1.0), "{variant:?}: {got} against {want}");
    }
}

/// The level-2 step reads dM/dθ2 alone (`Unroll::phi_only`): its update equals the one from
/// the full hypergradient (both routes' products, in f64, agree to rounding), for WAMAL and
/// MAXL.
#[test]
fn level2_follows_the_full_hypergradient() {
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    for variant in [Variant::Maxl, Variant::Wamal] {
        let cfg = tiny_config(variant, &[2, 2]);
        let meta = cfg.meta.clone().unwrap();
        let theta = arch.init_learner(10, &Device::Cpu, DType::F64).unwrap();
        let mut phi = arch.init_generator(11, &Device::Cpu, DType::F64).unwrap();
        phi[2 * PART + 2] = (&phi[2 * PART + 2] * 0.1).unwrap();
        let full = hypergradient(&MetaProblem::new(cfg.losses, &b, 0.1), &theta, &phi, Unroll::new(1, meta.hvp_eps)).unwrap();
        let mut state = State::new(theta, phi.clone());
        let m = state.level2(&cfg, &meta, &b, 0.1, 0.05).unwrap();
        assert!((m - full.value).abs() < 1e-12);
        let trained = if variant == Variant::Wamal { 3 * PART } else { 2 * PART };
        let (mut err, mut scale) = (0.0f64, 0.0f64);
        for (i, (p, g)) in phi.iter().zip(full.phi_tensors(&phi).unwrap()).enumerate() {
            let want = if i < trained { (p - ((&g + (p * meta.gen_weight_decay).unwrap()).unwrap() * 0.05).unwrap()).unwrap() } else { p.clone() };
            let d = (&state.phi[i] - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            err = err.max(d);
            scale = scale.max(g.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() * 0.05);
        }
        assert!(scale > 1e-6, "{variant:?}: the step moves nothing");
        assert!(err < 1e-9 * scale.max(1.0), "{variant:?}: level 2 is off the full hypergradient's step by {err}");
    }
}

/// A level-2 step right after a level-1 step on the same batch reads the generator's outputs
/// that level 1 computed: the same bits as computing them again.
#[test]
fn level2_reuses_level1s_generator_outputs_bit_for_bit() {
    let arch = tiny_arch();
    let b = tiny_batch(&arch, &[2, 2]);
    let cfg = tiny_config(Variant::Wamal, &[2, 2]);
    let meta = cfg.meta.clone().unwrap();
    let theta = arch.init_learner(12, &Device::Cpu, DType::F64).unwrap();
    let phi = arch.init_generator(13, &Device::Cpu, DType::F64).unwrap();
    let (mut a, mut c) = (State::new(theta.clone(), phi.clone()), State::new(theta, phi));
    for _ in 0..3 {
        a.level1(&cfg, &b, 0.1).unwrap();
        c.level1(&cfg, &b, 0.1).unwrap();
        assert!(a.generated.is_some());
        c.generated = None;
        let (ma, mc) = (a.level2(&cfg, &meta, &b, 0.1, 0.05).unwrap(), c.level2(&cfg, &meta, &b, 0.1, 0.05).unwrap());
        assert_eq!(ma.to_bits(), mc.to_bits());
        assert_eq!(bits(&a.phi), bits(&c.phi));
    }
    assert_eq!(bits(&a.theta), bits(&c.theta));
    // Another batch's outputs are not read: level 2 on a batch of other images recomputes them.
    let other = Batch { x: (&b.x * 0.5).unwrap(), primary: b.primary.clone(), aux: b.aux.clone() };
    a.level1(&cfg, &b, 0.1).unwrap();
    c.level1(&cfg, &b, 0.1).unwrap();
    c.generated = None;
    a.level2(&cfg, &meta, &other, 0.1, 0.05).unwrap();
    c.level2(&cfg, &meta, &other, 0.1, 0.05).unwrap();
    assert_eq!(bits(&a.phi), bits(&c.phi));
}
