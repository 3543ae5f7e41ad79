//! `reprise bench`: training speed against PyTorch, the store's hashing throughput, and
//! (optionally) the cold and warm time of a report.
//!
//! Speed claims about the training loop are only meaningful next to a reference measured on the
//! same machine at the same time, so this command trains each model on the embedded MNIST images
//! and then runs `bench/pytorch_reference.py`, which builds the same architectures in PyTorch and
//! trains them on the same batches with the same optimiser and thread count. The script stays
//! running and the two sides alternate rounds of steps, so that both see the same load from other
//! processes; every step is timed separately after a warm-up and the medians are compared (robust
//! to the odd slow step on a shared machine). The table gives samples/s for each, their ratio and
//! the range of the per-round ratios, and flags a model where a side's speed changed between
//! rounds. With more than one thread PyTorch runs twice, with `OMP_WAIT_POLICY=active` and
//! `passive` (one process each, stopped between its turns), and each model is compared with the
//! faster: which is faster depends on the model, by up to 10× (see [`OmpWait`]). `conv4-maml`
//! and `mlp-maml` time a meta-learning step instead of a supervised one: the functional Conv-4
//! or MLP of `models::functional`, one first-order MAML step per batch ([`MamlLearner`]).
//! Run it from the project root (it reads `data-manifests/mnist-5k.toml`). `bench/README.md`
//! records the latest figures.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use super::{UsageError, EXIT_OK};
use crate::data::{ImageSet, Manifest};
use crate::exec::install_awake;
use crate::methods::wamal;
use crate::models::functional::{sgd_fast_weights, FunctionalConv4, FunctionalMlp, Init};
use crate::models::{self, ModelConfig, ModelKind, MODEL_DTYPE};
use crate::train::{OptimConfig, Optimizer};

/// Environment variable that turns on the report timings (like `--reports`).
pub const REPORTS_ENV: &str = "REPRISE_BENCH_REPORTS";

const BATCH: usize = 128;
const LR: f64 = 0.05;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Threads for candle, rayon and PyTorch (default: $RAYON_NUM_THREADS, else the number of
    /// cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed training steps per model and side (after the warm-up). Default: as many as take
    /// about `--seconds` of our training, at least 20 (a fast model gets more steps, so that its
    /// medians are not at the mercy of a few noisy ones).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Without `--steps`: about how long our timed steps of each model should take, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The timed steps are split into this many rounds, alternating between us and PyTorch, so
    /// that both see the same machine load; the table gives the range of the per-round ratios
    /// and flags a side whose speed changed between rounds.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Models to time, comma-separated (default: all of mlp-512, mlp, cnn, resnet, vit, conv4,
    /// conv4-maml, mlp-maml).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_pytorch: bool,
    /// Python interpreter with PyTorch (Debian: `apt-get install python3-torch`).
    #[arg(long, default_value = "/usr/bin/python3")]
    pub python: PathBuf,
    /// The PyTorch reference script.
    #[arg(long, default_value = "bench/pytorch_reference.py")]
    pub script: PathBuf,
    /// Size in MiB of the temporary file whose hashing is timed (0 skips).
    #[arg(long, default_value_t = 1024)]
    pub hash_mib: usize,
    /// Also time `reprise run` of the reports, cold (empty cache) and warm (all cached), in a
    /// temporary copy of the project; takes minutes. Also on with REPRISE_BENCH_REPORTS=1.
    #[arg(long)]
    pub reports: bool,
    /// A report timed by `--reports` (repeatable; default: every `reports/*.toml`).
    #[arg(long)]
    pub report: Vec<PathBuf>,
    /// What a step's time is: `wall` (elapsed time, the default) or `cpu` (CPU time of the whole
    /// process, all threads; with --threads 1 it ignores the time other processes hold the core,
    /// which makes comparisons on a busy machine steadier).
    #[arg(long, value_enum, default_value_t = Clock::Wall)]
    pub clock: Clock,
    /// OMP_WAIT_POLICY of the PyTorch reference, comma-separated for several (one process each;
    /// each model is compared with the fastest). Default: `active,passive` with more than one
    /// thread, libgomp's default with one.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub omp_wait: Vec<OmpWait>,
    /// Where both sides train: `cpu` (the default), or `cuda` / `cuda:N` (GPU N, 0 by default;
    /// needs a build with `--features cuda`, and PyTorch with CUDA for the reference). Each step
    /// is timed up to the end of the GPU's work. The speed targets are for the CPU and are not
    /// checked on a GPU.
    #[arg(long, default_value = "cpu")]
    pub device: BenchDevice,
    /// Print one JSON object with every measurement after the table.
    #[arg(long)]
    pub json: bool,
}

/// Where the benchmark trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchDevice {
    Cpu,
    /// The CUDA GPU of this index.
    Cuda(usize),
}

impl std::str::FromStr for BenchDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BenchDevice::Cpu),
            "cuda" => Ok(BenchDevice::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(BenchDevice::Cuda).ok_or_else(|| format!("unknown device {s:?}: use cpu, cuda or cuda:N (N = the GPU's index)")),
        }
    }
}

impl std::fmt::Display for BenchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchDevice::Cpu => f.write_str("cpu"),
            BenchDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl BenchDevice {
    /// candle's device for our side.
    fn open(self) -> anyhow::Result<Device> {
        match self {
            BenchDevice::Cpu => Ok(Device::Cpu),
            BenchDevice::Cuda(n) => models::cuda_device(n).with_context(|| format!("opening CUDA device {n} (is there an NVIDIA GPU and driver?)"))?.ok_or_else(|| {
                UsageError(format!(
                    "--device {self}: this build of reprise has no CUDA support; build it with \
                         `cargo build --release --features cuda` (docs/cuda.md), or leave out --device"
                ))
                .into()
            }),
        }
    }
}

/// How steps are timed.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Wall,
    Cpu,
}

impl Clock {
    fn name(self) -> &'static str {
        match self {
            Clock::Wall => "wall",
            Clock::Cpu => "cpu",
        }
    }

    /// Seconds on this clock since an arbitrary origin.
    fn now(self, origin: Instant) -> f64 {
        match self {
            Clock::Wall => origin.elapsed().as_secs_f64(),
            Clock::Cpu => process_cpu_seconds(),
        }
    }
}

/// CPU time of this process (all threads), in seconds.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// What a benchmark model's step trains: one of the engine's classifiers (a supervised step), or
/// a functional network of meta-learning (a first-order MAML step, [`MamlLearner`]).
#[derive(Debug, Clone)]
enum BenchModel {
    Classifier(ModelConfig),
    Conv4Maml,
    MlpMaml,
    /// Report 002's WAMAL training step ([`WamalLearner`]).
    Wamal,
}

/// A model of the benchmark: its name (shared with the PyTorch script), a description and what
/// it is built from (28×28×1 input, 10 classes).
fn bench_model(name: &str) -> Option<(&'static str, BenchModel)> {
    let cfg = |kind| BenchModel::Classifier(ModelConfig::new(kind, 1, 28, 28, 10));
    Some(match name {
        "mlp-512" => ("MLP 784-512-256-10", BenchModel::Classifier(ModelConfig { width_mult: 2, ..ModelConfig::new(ModelKind::Mlp, 1, 28, 28, 10) })),
        "mlp" => ("MLP 784-256-128-10 (report)", cfg(ModelKind::Mlp)),
        "cnn" => ("CNN conv32-pool-conv64-pool-fc128", cfg(ModelKind::Cnn)),
        "resnet" => ("small ResNet (16/32/64)", cfg(ModelKind::Resnet)),
        "vit" => ("tiny ViT (dim 64, 2 blocks)", cfg(ModelKind::Vit)),
        "conv4" => ("Conv-4 (32 channels)", cfg(ModelKind::Conv4)),
        "conv4-maml" => ("functional Conv-4, first-order MAML step", BenchModel::Conv4Maml),
        "mlp-maml" => ("functional MLP 784-256-128-10, MAML step", BenchModel::MlpMaml),
        "wamal" => ("WAMAL step (MLP 784-128-64 ×2, both levels)", BenchModel::Wamal),
        _ => return None,
    })
}

/// The meta step of `conv4-maml`: each batch of [`BATCH`] is one task, its first half the support
/// set and its second half the query set.
const SUPPORT: usize = BATCH / 2;
/// Inner (fast-weight) learning rate of `conv4-maml`: MAML's 0.5 in Bayesian TAML's run files.
const INNER_LR: f64 = 0.5;
/// Inner learning rate of `mlp-maml`, whose every parameter takes the inner step.
const MLP_INNER_LR: f64 = 0.1;
/// The widths of `mlp-maml`: the report MLP's, with biases and its classifier as the last layer.
const MLP_WIDTHS: [usize; 4] = [784, 256, 128, 10];

/// Pause before each side's round (see the loop in [`bench`]).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// Untimed steps after the pause, before a side's timed round: at least one, and at least this
/// long. After an idle pause the first steps run slow (PyTorch's at 2 threads for up to ~15
/// steps of the MLP, 5× slower: its OpenMP and OpenBLAS threads waking up), and one untimed step
/// left those in the timed round, which understated PyTorch.
const REWARM: std::time::Duration = std::time::Duration::from_millis(250);

/// Run `step` until [`REWARM`] has passed (at least once).
fn rewarm(mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        step()?;
        if start.elapsed() >= REWARM {
            return Ok(());
        }
    }
}

const ALL_MODELS: &[&str] = &["mlp-512", "mlp", "cnn", "resnet", "vit", "conv4", "conv4-maml", "mlp-maml", "wamal"];

/// One model's timing on one side.
#[derive(Debug, Clone)]
struct Timing {
    median_step_s: f64,
    samples_per_s: f64,
    /// Median step time of each round, in round order.
    round_medians_s: Vec<f64>,
}

/// The smallest and largest of `v` (∞ and 0 when empty).
fn extremes(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The median of `v` (the upper one for an even count); `None` when empty.
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl Timing {
    /// From the step times of each round.
    fn from_rounds(rounds: &[Vec<f64>]) -> Option<Self> {
        let median_step_s = median(&rounds.concat())?;
        Some(Timing { median_step_s, samples_per_s: BATCH as f64 / median_step_s, round_medians_s: rounds.iter().filter_map(|r| median(r)).collect() })
    }

    /// Samples/s of the fastest round's median.
    fn best_round_samples_per_s(&self) -> f64 {
        BATCH as f64 / extremes(&self.round_medians_s).0
    }

    /// Slowest round median over fastest: 1 for a steady side.
    fn round_spread(&self) -> f64 {
        let (lo, hi) = extremes(&self.round_medians_s);
        hi / lo
    }
}

/// The speed the project aims for, as ours / PyTorch's samples/s: every backbone at least as fast
/// as PyTorch, the MLPs twice as fast (README, "Training speed").
fn target_ratio(model: &str) -> f64 {
    if model.starts_with("mlp") {
        2.0
    } else {
        1.0
    }
}

/// One line saying which models meet their [`target_ratio`] by this run's ratio, the ones that
/// do not named with their ratios; `None` when nothing was compared.
fn target_summary(measured: &[(String, f64)]) -> Option<String> {
    if measured.is_empty() {
        return None;
    }
    let mut groups = Vec::new();
    for target in [1.0, 2.0] {
        let of: Vec<&(String, f64)> = measured.iter().filter(|(m, _)| target_ratio(m) == target).collect();
        if of.is_empty() {
            continue;
        }
        let missed: Vec<String> = of.iter().filter(|(_, r)| *r < target).map(|(m, r)| format!("{m} {r:.2}")).collect();
        let names: Vec<&str> = of.iter().map(|(m, _)| m.as_str()).collect();
        groups.push(if missed.is_empty() { format!("{} ≥ {target:.1}: met", names.join(", ")) } else { format!("{} ≥ {target:.1}: not met ({})", names.join(", "), missed.join(", ")) });
    }
    Some(format!("targets (ours / PyTorch, this run): {}", groups.join("; ")))
}

/// The fewest timed steps per model and side when `--steps` is not given.
const MIN_STEPS: usize = 20;

/// Steps whose time adds up to about `seconds`, from the fastest warm-up step (if any; the first
/// steps run slower than the rest), at least [`MIN_STEPS`].
fn auto_steps(warm_fastest_s: Option<f64>, seconds: f64) -> usize {
    match warm_fastest_s {
        Some(t) if t > 0.0 => ((seconds / t).ceil() as usize).max(MIN_STEPS),
        _ => MIN_STEPS,
    }
}

/// A side whose round medians differ by more than this factor changed speed during the run
/// (PyTorch's slow phase at 2 threads, see bench/README.md): the table flags the model and also
/// gives the ratio against that side's fastest round.
const PHASE_SPREAD: f64 = 1.5;

/// Our speed over PyTorch's in each round (rounds alternate, so round r of both sides saw
/// about the same machine load).
fn round_ratios(ours: &Timing, theirs: &Timing) -> Vec<f64> {
    ours.round_medians_s.iter().zip(&theirs.round_medians_s).map(|(o, t)| t / o).collect()
}

pub fn bench(a: &BenchArgs) -> anyhow::Result<i32> {
    let threads = set_threads(a.threads)?;
    let names: Vec<String> = if a.models.is_empty() { ALL_MODELS.iter().map(|s| s.to_string()).collect() } else { a.models.clone() };
    for n in &names {
        if bench_model(n).is_none() {
            return Err(UsageError(format!("unknown model {n:?}; known: {}", ALL_MODELS.join(", "))).into());
        }
    }
    if a.steps == Some(0) {
        return Err(UsageError("--steps must be at least 1".into()).into());
    }
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(UsageError(format!("--seconds must be a positive number of seconds, not {}", a.seconds)).into());
    }
    if a.rounds == 0 {
        return Err(UsageError("--rounds must be at least 1".into()).into());
    }
    if a.device != BenchDevice::Cpu && a.clock == Clock::Cpu {
        return Err(UsageError(format!("--clock cpu counts only the CPU's time, not the GPU's work: use --clock wall with --device {}", a.device)).into());
    }
    let device = a.device.open()?;
    // Read once: the table's header and the JSON describe the same machine.
    let (cpu, id, features, cores) = (cpu_model(), cpu_id(), cpu_features(), num_cores());
    println!("machine: {cpu} ({id}; {}) ({cores} cores), {threads} threads, load average {}", features.join(" "), load_average());
    let data = Manifest::load(Path::new("data-manifests/mnist-5k.toml"))
        .and_then(|m| m.load_images(Path::new("."), None))
        .context("loading the embedded MNIST images (run `reprise bench` from the project root)")?;
    let batches = make_batches(&data, &device)?;
    let policies = omp_policies(a, threads);
    let mut torch: Vec<Reference> = Vec::new();
    if !a.no_pytorch {
        for policy in policies {
            match Torch::start(a, threads, policy) {
                Ok(t) => torch.push(Reference { policy, torch: t, ok: true }),
                Err(e) => println!("PyTorch reference ({}) unavailable ({e:#}): skipped", policy.label()),
            }
        }
        if torch.is_empty() {
            println!("no PyTorch reference: ratios skipped");
        }
    }
    if let Some(r) = torch.first() {
        let labels: Vec<&str> = torch.iter().map(|r| r.policy.label()).collect();
        println!(
            "PyTorch {} ({} {}){}, OMP_WAIT_POLICY {}{}",
            r.torch.version,
            a.python.display(),
            a.script.display(),
            r.torch.device_name.as_ref().map_or(String::new(), |d| format!(" on {d}")),
            labels.join(" and "),
            if torch.len() > 1 { " (one process each; each model is compared with the faster)" } else { "" }
        );
    }
    if device.is_cuda() {
        println!("device: {} (candle's CUDA backend; each step timed to the end of the GPU's work)", a.device);
    }
    println!(
        "training step: batch {BATCH}, SGD lr {LR} momentum 0.9, cross-entropy; median {} time of {} per side \
         in {} rounds (alternating) after {} warm-up\n",
        a.clock.name(),
        a.steps.map_or(format!("the steps that take about {} s of ours (at least {MIN_STEPS})", a.seconds), |n| format!("{n} steps")),
        a.rounds,
        a.warmup
    );
    if names.iter().any(|n| n == "conv4-maml") {
        println!(
            "conv4-maml: each batch of {BATCH} is a task, support = its first {SUPPORT}, query = the other {}; one step = \
             forward/backward on the support set from a zero head, fast weights θ' = θ − {INNER_LR}·g (first order: g \
             is a constant), forward/backward of the query loss at θ' to θ, SGD as above on θ (not the head)\n",
            BATCH - SUPPORT
        );
    }
    if names.iter().any(|n| n == "mlp-maml") {
        println!(
            "mlp-maml: the same task split; the functional MLP {MLP_WIDTHS:?} (biases, no zero head: every parameter \
             takes the inner step θ' = θ − {MLP_INNER_LR}·g and is meta-learned), first order\n"
        );
    }
    if names.iter().any(|n| n == "wamal") {
        println!(
            "wamal: report 002's step on the batch (primary task = digit mod 5, ψ = 2): a level-1 SGD step of the \
             multi-task network on L1, then a level-2 step of the generator through one unrolled step (second order: \
             ours by finite-difference Hessian-vector products, PyTorch by create_graph)\n"
        );
    }
    println!(
        "{:<10} {:<41} {:>6} {:>12} {:>12} {:>7} {:>13}  {}",
        "model",
        "",
        "steps",
        "ours/s",
        "PyTorch/s",
        "ratio",
        "round ratios",
        if torch.len() > 1 { "PyTorch's OMP_WAIT_POLICY (the other's samples/s)" } else { "" }
    );
    // Our steps run inside a pool of `threads` workers, as `reprise run` runs each cell
    // (`exec::execute`): the step's own thread is one of the workers, so rayon's tasks start by
    // work stealing instead of waking a pool from outside and blocking the caller.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the benchmark's thread pool")?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut measured: Vec<(String, f64)> = Vec::new();
    for name in &names {
        let Some((desc, model)) = bench_model(name) else { continue };
        let mut ours = Trainer::new(&model, a.clock, &device).with_context(|| format!("building {name}"))?;
        let warm = ours.run(&pool, &batches, a.warmup).with_context(|| format!("training {name}"))?;
        let per_round = a.steps.unwrap_or_else(|| auto_steps(warm.iter().copied().reduce(f64::min), a.seconds)).div_ceil(a.rounds);
        for r in torch.iter_mut() {
            r.ok = true;
            if let Err(e) = r.torch.turn(|t| t.steps(name, a.warmup)) {
                eprintln!("PyTorch reference ({}) for {name} failed: {e:#}", r.policy.label());
                r.ok = false;
            }
        }
        let mut ours_steps = Vec::new();
        let mut theirs_steps = vec![Vec::new(); torch.len()];
        for _ in 0..a.rounds {
            // Each side's idle thread pool (OpenBLAS, rayon) spins for a while after its last
            // step and would steal the other side's cores: let it fall asleep, then take untimed
            // steps for REWARM so caches, pools and clocks are warm again.
            std::thread::sleep(SETTLE);
            rewarm(|| ours.run(&pool, &batches, 1).map(drop)).with_context(|| format!("training {name}"))?;
            ours_steps.push(ours.run(&pool, &batches, per_round).with_context(|| format!("training {name}"))?);
            for (r, steps) in torch.iter_mut().zip(&mut theirs_steps).filter(|(r, _)| r.ok) {
                std::thread::sleep(SETTLE);
                let round = r.torch.turn(|t| rewarm(|| t.steps(name, 1).map(drop)).and_then(|_| t.steps(name, per_round)));
                match round {
                    Ok(v) => steps.push(v),
                    Err(e) => {
                        eprintln!("PyTorch reference ({}) for {name} failed: {e:#}", r.policy.label());
                        r.ok = false;
                    }
                }
            }
        }
        let ours = Timing::from_rounds(&ours_steps).context("no steps timed")?;
        // Every reference that ran to the end (one that failed part-way is left out, so no round
        // ratio pairs rounds of different times), and the fastest of them (by the median).
        let references: Vec<(OmpWait, Timing)> = torch.iter().zip(&theirs_steps).filter(|(r, _)| r.ok).filter_map(|(r, steps)| Some((r.policy, Timing::from_rounds(steps)?))).collect();
        let best = references.iter().max_by(|x, y| x.1.samples_per_s.total_cmp(&y.1.samples_per_s));
        let theirs = best.map(|b| b.1.clone());
        let ratio = theirs.as_ref().map(|t| ours.samples_per_s / t.samples_per_s);
        let ratios = theirs.as_ref().map(|t| round_ratios(&ours, t)).unwrap_or_default();
        let (lo, hi) = extremes(&ratios);
        let phased = theirs.as_ref().is_some_and(|t| t.round_spread().max(ours.round_spread()) > PHASE_SPREAD);
        let others: Vec<String> = references.iter().filter(|r| Some(r.0) != best.map(|b| b.0)).map(|(p, t)| format!("{} {:.0}", p.label(), t.samples_per_s)).collect();
        println!(
            "{:<10} {:<41} {:>6} {:>12.0} {:>12} {:>7} {:>13}  {}",
            name,
            desc,
            per_round * a.rounds,
            ours.samples_per_s,
            theirs.as_ref().map_or("-".into(), |t| format!("{:.0}", t.samples_per_s)),
            ratio.map_or("-".into(), |r| format!("{r:.2}{}", if phased { "*" } else { "" })),
            if ratios.is_empty() { "-".into() } else { format!("{lo:.2}–{hi:.2}") },
            match (best, others.is_empty()) {
                (Some(b), false) => format!("{} (else {})", b.0.label(), others.join(", ")),
                _ => String::new(),
            },
        );
        if let Some(r) = ratio {
            measured.push((name.clone(), r));
        }
        if let (true, Some(t)) = (phased, &theirs) {
            notes.push(format!(
                "* {name}: the slowest round's median step over the fastest was {:.1}× for us and {:.1}× for \
                 PyTorch (a side changed speed between rounds: load from elsewhere, or a slow phase, see \
                 bench/README.md); against PyTorch's fastest round ({:.0} samples/s) the ratio is {:.2}",
                ours.round_spread(),
                t.round_spread(),
                t.best_round_samples_per_s(),
                ours.samples_per_s / t.best_round_samples_per_s(),
            ));
        }
        rows.push(json!({
            "model": name,
            "description": desc,
            "ours_samples_per_s": ours.samples_per_s,
            "ours_median_step_ms": ours.median_step_s * 1e3,
            "pytorch_samples_per_s": theirs.as_ref().map(|t| t.samples_per_s),
            "pytorch_median_step_ms": theirs.as_ref().map(|t| t.median_step_s * 1e3),
            "ratio": ratio,
            "steps": per_round * a.rounds,
            "pytorch_omp_wait": best.map(|b| b.0.label()),
            "pytorch_references": references
                .iter()
                .map(|(p, t)| json!({"omp_wait": p.label(), "samples_per_s": t.samples_per_s, "median_step_ms": t.median_step_s * 1e3}))
                .collect::<Vec<_>>(),
            "ours_round_samples_per_s": ours.round_medians_s.iter().map(|m| BATCH as f64 / m).collect::<Vec<_>>(),
            "pytorch_round_samples_per_s": theirs.as_ref().map(|t| t.round_medians_s.iter().map(|m| BATCH as f64 / m).collect::<Vec<_>>()),
            "round_ratios": ratios,
            "ratio_vs_pytorch_best_round": theirs.as_ref().map(|t| ours.samples_per_s / t.best_round_samples_per_s()),
            "phase_change": phased,
            "target_ratio": (!device.is_cuda()).then(|| target_ratio(name)),
        }));
    }
    let torch_version = torch.first().map(|r| r.torch.version.clone());
    let torch_device = torch.first().and_then(|r| r.torch.device_name.clone());
    drop(torch);
    for n in &notes {
        println!("{n}");
    }
    if device.is_cuda() {
        println!("(the speed targets are for the CPU; none is checked on {})", a.device);
    } else if let Some(line) = target_summary(&measured) {
        println!("{line}");
    }
    println!("load average after the training steps: {}", load_average());
    let hash = if a.hash_mib > 0 {
        let gbps = time_hashing(a.hash_mib).context("timing the store's hashing")?;
        println!("\nstore hashing (sha256_file, {} MiB in the page cache): {gbps:.2} GB/s", a.hash_mib);
        Some(gbps)
    } else {
        None
    };
    let reports_on = a.reports || std::env::var(REPORTS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let report = if reports_on {
        let specs = super::find_specs(&a.report, &crate::driver::Project::builder().build())?;
        let mut timed = Vec::new();
        for spec in &specs {
            let (cold, warm) = time_report(spec)?;
            println!("report {}: cold {:.1} s (empty cache), warm {:.2} s (all cached)", spec.display(), cold.as_secs_f64(), warm.as_secs_f64());
            timed.push(json!({"report": spec.display().to_string(), "cold_s": cold.as_secs_f64(), "warm_s": warm.as_secs_f64()}));
        }
        Some(serde_json::Value::Array(timed))
    } else {
        println!("(report cold/warm times: pass --reports or set {REPORTS_ENV}=1; takes minutes)");
        None
    };
    if a.json {
        let out = json!({
            "cpu": cpu,
            "cpu_id": id,
            "cpu_features": features,
            "cores": cores,
            "threads": threads,
            "pytorch": torch_version,
            "device": a.device.to_string(),
            "pytorch_device_name": torch_device,
            "steps": a.steps,
            "seconds": a.steps.is_none().then_some(a.seconds),
            "clock": a.clock.name(),
            "warmup": a.warmup,
            "models": rows,
            "hash_gb_per_s": hash,
            "reports": report,
        });
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(EXIT_OK)
}

/// Fix the thread count of rayon (our convolution, candle's kernels) and of candle's GEMM, which
/// reads RAYON_NUM_THREADS; must run before either is first used.
fn set_threads(requested: Option<usize>) -> anyhow::Result<usize> {
    let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let threads = requested.or(from_env).unwrap_or_else(num_cores).max(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    crate::models::set_cpu_threads(threads);
    if rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().is_err() && rayon::current_num_threads() != threads {
        bail!("rayon's thread pool was already started with {} threads", rayon::current_num_threads());
    }
    Ok(threads)
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The value of the first `name : value` line of /proc/cpuinfo (Linux), if any.
fn cpuinfo_field(name: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))?;
    line.split(':').nth(1).map(|v| v.trim().to_string())
}

/// The CPU's model name from /proc/cpuinfo (Linux), else "unknown CPU".
fn cpu_model() -> String {
    cpuinfo_field("model name").unwrap_or_else(|| "unknown CPU".into())
}

/// "family F model M" from /proc/cpuinfo (Linux): model names of virtual machines are often
/// generic ("AMD EPYC"), while the family and model tell the CPU generation apart.
fn cpu_id() -> String {
    match (cpuinfo_field("cpu family"), cpuinfo_field("model")) {
        (Some(f), Some(m)) => format!("family {f} model {m}"),
        _ => "family unknown".into(),
    }
}

/// The vector instruction sets that decide which kernels run (and so the speed): the direct
/// convolutions need AVX2 and FMA and use AVX-512 where present.
fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        [("avx2", has!("avx2")), ("fma", has!("fma")), ("avx512f", has!("avx512f"))].into_iter().filter_map(|(name, on)| on.then_some(name)).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The first ⌊N/128⌋ full batches in file order, scaled to [−1, 1] as the supervised method does.
fn make_batches(data: &ImageSet, device: &Device) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
    let dim = data.dim();
    let shape = (BATCH, data.channels, data.height, data.width);
    (0..data.len() / BATCH)
        .map(|b| {
            let r = b * BATCH..(b + 1) * BATCH;
            let px: Vec<f32> = data.pixels[r.start * dim..r.end * dim].iter().map(|v| v * 2.0 - 1.0).collect();
            let x = Tensor::from_vec(px, shape, device)?;
            let y = Tensor::from_vec(data.labels[r].to_vec(), BATCH, device)?;
            Ok((x, y))
        })
        .collect()
}

/// What our side trains.
enum Learner {
    /// An engine classifier, a supervised step.
    Supervised {
        model: Box<dyn models::Classifier>,
        _varmap: VarMap,
    },
    Maml(MamlLearner),
    Wamal(WamalLearner),
}

/// `wamal`: report 002's training step as its method runs it (`methods::wamal::State`), one
/// level-1 step (θ1 by SGD on L1) and one level-2 step (θ2 by the hypergradient through one
/// unrolled step) per batch, the document's interleaved order. The primary task is the digit
/// mod 5 with ψ = 2 auxiliary classes per primary class, as in the report.
struct WamalLearner {
    cfg: wamal::Config,
    state: wamal::State,
}

/// The widths of the report's WAMAL backbones (`reports/wamal.toml`).
const WAMAL_HIDDEN: usize = 128;
const WAMAL_FEATURES: usize = 64;

impl WamalLearner {
    fn new(device: &Device) -> anyhow::Result<Self> {
        let cfg = wamal::bench_config(WAMAL_HIDDEN, WAMAL_FEATURES)?;
        let meta = cfg.meta.as_ref().context("the WAMAL configuration has no generator settings")?;
        let generated = meta.psi.iter().sum();
        let arch = wamal::nets::Arch { input: 28 * 28, hidden: WAMAL_HIDDEN, features: WAMAL_FEATURES, primary: meta.psi.len(), aux: generated, generated };
        let state = wamal::State::new(arch.init_learner(0, device, MODEL_DTYPE)?, arch.init_generator(0, device, MODEL_DTYPE)?);
        Ok(WamalLearner { cfg, state })
    }

    fn step(&mut self, x: &Tensor, y: &Tensor) -> anyhow::Result<()> {
        let meta = self.cfg.meta.as_ref().context("the WAMAL configuration has no generator settings")?;
        let primary: Vec<u32> = y.to_vec1::<u32>()?.iter().map(|d| d % meta.psi.len() as u32).collect();
        let x = x.flatten_from(1)?;
        let k: usize = meta.psi.iter().sum();
        let aux = Tensor::from_vec(wamal::hierarchy::masks(&meta.psi, &primary), (primary.len(), k), x.device())?.to_dtype(x.dtype())?;
        let batch = wamal::nets::Batch { primary: crate::train::loss::one_hot(&primary, meta.psi.len(), x.device(), x.dtype())?, aux, x };
        self.state.level1(&self.cfg, &batch, self.cfg.lr)?;
        self.state.level2(&self.cfg, meta, &batch, meta.inner_lr, meta.gen_lr)?;
        Ok(())
    }
}

/// The network of a first-order MAML step.
enum MamlNet {
    /// `conv4-maml`: Bayesian TAML's learner (32 channels); a zero head per task.
    Conv4(FunctionalConv4),
    /// `mlp-maml`: every parameter meta-learned.
    Mlp(FunctionalMlp),
}

/// `conv4-maml` and `mlp-maml`: a functional network whose `body` (the optimiser's variables) is
/// meta-learned; the Conv-4 adds a zero head per task.
struct MamlLearner {
    net: MamlNet,
    body: Vec<Var>,
}

impl MamlLearner {
    fn new(model: &BenchModel, device: &Device) -> anyhow::Result<Self> {
        let (net, body) = match model {
            BenchModel::MlpMaml => {
                let net = FunctionalMlp::new(&MLP_WIDTHS)?;
                let body = net.init(0, device, MODEL_DTYPE)?;
                (MamlNet::Mlp(net), body)
            }
            _ => {
                let net = FunctionalConv4::new(1, 28, 28, 32, 10)?;
                let body = net.init_body(0, Init::PytorchDefault, device, MODEL_DTYPE)?;
                (MamlNet::Conv4(net), body)
            }
        };
        let body = body.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(MamlLearner { net, body })
    }

    fn forward(&self, params: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.net {
            MamlNet::Conv4(net) => net.forward(params, x),
            MamlNet::Mlp(net) => net.forward(params, x),
        }
    }

    /// The query loss of one first-order MAML step on the task (x, y), to be backpropagated to
    /// the body: support loss at θ (the body, and for the Conv-4 a zero head), its gradient g,
    /// query loss at θ − α·g.
    fn query_loss(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let (xs, ys) = (x.narrow(0, 0, SUPPORT)?, y.narrow(0, 0, SUPPORT)?);
        let (xq, yq) = (x.narrow(0, SUPPORT, n - SUPPORT)?, y.narrow(0, SUPPORT, n - SUPPORT)?);
        let mut theta: Vec<Tensor> = self.body.iter().map(|v| v.as_tensor().clone()).collect();
        let lr = match &self.net {
            MamlNet::Conv4(net) => {
                // The head is a variable too, so that the support loss has a gradient with respect to it.
                for h in net.zero_head(x.device(), MODEL_DTYPE)? {
                    theta.push(Var::from_tensor(&h)?.as_tensor().clone());
                }
                INNER_LR
            }
            MamlNet::Mlp(_) => MLP_INNER_LR,
        };
        let support = candle_nn::loss::cross_entropy(&self.forward(&theta, &xs)?, &ys)?;
        let fast = sgd_fast_weights(&theta, &support.backward()?, lr)?;
        candle_nn::loss::cross_entropy(&self.forward(&fast, &xq)?, &yq)
    }
}

/// Our side: one model, its optimiser and its position in the batch sequence.
struct Trainer {
    learner: Learner,
    opt: Optimizer,
    step: usize,
    clock: Clock,
    device: Device,
}

impl Trainer {
    fn new(model: &BenchModel, clock: Clock, device: &Device) -> anyhow::Result<Self> {
        let (learner, vars) = match model {
            BenchModel::Classifier(cfg) => {
                let varmap = VarMap::new();
                let model = models::build(cfg, VarBuilder::from_varmap(&varmap, MODEL_DTYPE, device))?;
                models::seeded_init(&varmap, 0)?;
                let vars = varmap.all_vars();
                (Learner::Supervised { model, _varmap: varmap }, vars)
            }
            BenchModel::Conv4Maml | BenchModel::MlpMaml => {
                let m = MamlLearner::new(model, device)?;
                let vars = m.body.clone();
                (Learner::Maml(m), vars)
            }
            // Its state updates itself; the optimiser below has nothing to do.
            BenchModel::Wamal => (Learner::Wamal(WamalLearner::new(device)?), Vec::new()),
        };
        let opt = Optimizer::new(vars, &OptimConfig::sgd(LR))?;
        Ok(Trainer { learner, opt, step: 0, clock, device: device.clone() })
    }

    /// Train `steps` steps in `pool`; the wall time of each, in seconds (on a GPU, up to the end
    /// of the step's work there: candle's CUDA calls return before the GPU has run them). The
    /// steps run as `reprise run` runs a cell with more than one thread: the pool's other workers
    /// kept awake (unless REPRISE_WAIT=passive).
    fn run(&mut self, pool: &rayon::ThreadPool, batches: &[(Tensor, Tensor)], steps: usize) -> anyhow::Result<Vec<f64>> {
        install_awake(pool, || self.steps(batches, steps))
    }

    fn steps(&mut self, batches: &[(Tensor, Tensor)], steps: usize) -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let (x, y) = &batches[self.step % batches.len()];
            self.step += 1;
            let origin = Instant::now();
            let t0 = self.clock.now(origin);
            let loss = match &mut self.learner {
                Learner::Supervised { model, .. } => Some(candle_nn::loss::cross_entropy(&model.forward(x, true)?.1, y)?),
                Learner::Maml(m) => Some(m.query_loss(x, y)?),
                Learner::Wamal(w) => {
                    w.step(x, y)?;
                    None
                }
            };
            if let Some(loss) = loss {
                self.opt.backward_step(&loss)?;
            }
            self.device.synchronize()?;
            times.push(self.clock.now(origin) - t0);
        }
        Ok(times)
    }
}

/// How PyTorch's OpenMP threads wait between parallel regions (`OMP_WAIT_POLICY`, read when the
/// process starts). Which is faster depends on the model, and the difference is large at 2
/// threads on 2 cores, where PyTorch's OpenMP threads and OpenBLAS's own threads share the cores:
/// spinning OpenMP threads starve OpenBLAS's GEMMs (the MLPs and the ViT ran 1.3–10× faster with
/// `passive`), sleeping ones wake late for oneDNN's convolutions (the ResNet and Conv-4 ran
/// 1.1–1.6× faster with `active`, the CNN about even); measured by this command at 2 threads on 2
/// cores, bench/README.md.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OmpWait {
    /// Leave OMP_WAIT_POLICY unset (libgomp's default: spin a while, then sleep).
    Default,
    Active,
    Passive,
}

impl OmpWait {
    fn label(self) -> &'static str {
        match self {
            OmpWait::Default => "default",
            OmpWait::Active => "active",
            OmpWait::Passive => "passive",
        }
    }
}

/// The OpenMP wait policies to run PyTorch with: as asked, else `active` and `passive` (one
/// process each) when there is more than one thread, and libgomp's default with one thread
/// (where there is nothing to wait for).
fn omp_policies(a: &BenchArgs, threads: usize) -> Vec<OmpWait> {
    if a.omp_wait.is_empty() {
        // On a GPU PyTorch's CPU threads only launch kernels: one reference is enough.
        return if threads > 1 && a.device == BenchDevice::Cpu { vec![OmpWait::Active, OmpWait::Passive] } else { vec![OmpWait::Default] };
    }
    let mut p: Vec<OmpWait> = Vec::new();
    for &w in &a.omp_wait {
        if !p.contains(&w) {
            p.push(w);
        }
    }
    p
}

#[derive(Clone, Copy)]
enum Pause {
    Stop,
    Continue,
}

/// One running PyTorch reference and whether it is still usable for the current model.
struct Reference {
    policy: OmpWait,
    torch: Torch,
    ok: bool,
}

/// The PyTorch side: `bench/pytorch_reference.py --serve`, kept running for the whole benchmark.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
    /// The GPU's name, when the reference trains on one.
    device_name: Option<String>,
}

impl Torch {
    fn start(a: &BenchArgs, threads: usize, policy: OmpWait) -> anyhow::Result<Self> {
        if !a.script.is_file() {
            bail!("{} not found (run from the project root)", a.script.display());
        }
        let mut cmd = Command::new(&a.python);
        match policy {
            OmpWait::Default => cmd.env_remove("OMP_WAIT_POLICY"),
            OmpWait::Active | OmpWait::Passive => cmd.env("OMP_WAIT_POLICY", policy.label()),
        };
        let mut child = cmd
            .arg(&a.script)
            .args(["--serve", "--threads", &threads.to_string(), "--batch", &BATCH.to_string(), "--data", "data/mnist_5k.csv.gz"])
            .args(["--clock", a.clock.name()])
            // Only for a GPU, so that the CPU benchmark runs any script that takes the other options.
            .args(if a.device == BenchDevice::Cpu { vec![] } else { vec!["--device".to_string(), a.device.to_string()] })
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("OPENBLAS_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", a.python.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("no pipes to the PyTorch script");
        };
        let mut t = Torch { child, stdin, stdout: BufReader::new(stdout), version: String::new(), device_name: None };
        let hello = t.reply()?;
        t.version = hello["torch"].as_str().unwrap_or("?").to_string();
        t.device_name = hello["device_name"].as_str().map(str::to_string);
        t.signal(Pause::Stop);
        Ok(t)
    }

    /// Stop or continue the process. Between its turns a reference is stopped: with
    /// `OMP_WAIT_POLICY=active` its idle OpenMP threads spin without end and would hold cores
    /// while the other side runs.
    fn signal(&self, p: Pause) {
        #[cfg(unix)]
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            let sig = match p {
                Pause::Stop => libc::SIGSTOP,
                Pause::Continue => libc::SIGCONT,
            };
            // SAFETY: kill(2) with a valid signal on our own child's pid; it touches no memory.
            // A failure (the child has exited) shows at its next reply.
            unsafe { libc::kill(pid, sig) };
        }
        #[cfg(not(unix))]
        let _ = p;
    }

    /// Run `f` on this reference with the process continued, then stop it again.
    fn turn<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.signal(Pause::Continue);
        let r = f(self);
        self.signal(Pause::Stop);
        r
    }

    fn reply(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the PyTorch script exited");
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("reading the PyTorch script's answer")?;
        if let Some(e) = v.get("error") {
            bail!("{e}");
        }
        Ok(v)
    }

    /// Run `steps` more steps of `model`; the wall time of each, in seconds.
    fn steps(&mut self, model: &str, steps: usize) -> anyhow::Result<Vec<f64>> {
        writeln!(self.stdin, "{model} {steps}")?;
        self.stdin.flush()?;
        let v = self.reply()?;
        Ok(v["step_s"].as_array().context("no step times")?.iter().filter_map(|s| s.as_f64()).collect())
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        // The script only waits for requests; stop it and reap it so that it does not outlive us.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 1-minute load average (Linux), to say how busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().map(str::to_string)).unwrap_or_else(|| "unknown".into())
}

/// Hash a `mib` MiB file (just written, so in the page cache) three times; the median, in GB/s.
fn time_hashing(mib: usize) -> anyhow::Result<f64> {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let path = std::env::temp_dir().join(format!("reprise-bench-hash-{}.bin", std::process::id()));
    let guard = Remove(path.clone());
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            f.write_all(&chunk)?;
        }
        f.flush()?;
    }
    // Read it once so that the timings measure hashing, not the disk.
    let mut f = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    let mut secs = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        crate::cache::sha256_file(&path)?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    drop(guard);
    secs.sort_by(f64::total_cmp);
    Ok((mib << 20) as f64 / secs[1] / 1e9)
}

/// Cold and warm wall time of `reprise run <report> --cache <empty dir>` in a temporary copy of
/// the project (so the committed artifacts are not touched).
fn time_report(report: &Path) -> anyhow::Result<(Duration, Duration)> {
    let tmp = std::env::temp_dir().join(format!("reprise-bench-report-{}", std::process::id()));
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = RemoveDir(tmp.clone());
    for dir in ["reports", "templates", "data", "data-manifests"] {
        if Path::new(dir).is_dir() {
            copy_dir(Path::new(dir), &tmp.join(dir))?;
        }
    }
    let exe = std::env::current_exe().context("locating the reprise binary")?;
    let cache = tmp.join("store");
    let run = || -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        // The report runs with its own defaults (one thread per cell, as many cells as cores),
        // not with the thread count this benchmark set for itself.
        let status = Command::new(&exe).env_remove("RAYON_NUM_THREADS").current_dir(&tmp).arg("run").arg(report).arg("--cache").arg(&cache).stdout(std::process::Stdio::null()).status()?;
        if !status.success() {
            bail!("`reprise run {}` failed ({status})", report.display());
        }
        Ok(t0.elapsed())
    };
    let cold = run().context("cold run")?;
    let warm = run().context("warm run")?;
    Ok((cold, warm))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_statistics_by_hand() {
        // Ours: steady at 10 ms (rounds' medians 10, 10). PyTorch: 20 ms, then a slow round at
        // 60 ms (medians 20 and 60; the median of all six steps is 60 — the upper middle).
        let ours = Timing::from_rounds(&[vec![0.010, 0.011, 0.009], vec![0.010, 0.012, 0.008]]).unwrap();
        let theirs = Timing::from_rounds(&[vec![0.020, 0.021, 0.019], vec![0.060, 0.059, 0.061]]).unwrap();
        assert_eq!(ours.round_medians_s, vec![0.010, 0.010]);
        assert_eq!(theirs.round_medians_s, vec![0.020, 0.060]);
        assert_eq!(theirs.median_step_s, 0.059);
        assert!((ours.round_spread() - 1.0).abs() < 1e-12);
        assert!((theirs.round_spread() - 3.0).abs() < 1e-12);
        assert!(theirs.round_spread() > PHASE_SPREAD && ours.round_spread() <= PHASE_SPREAD);
        let r = round_ratios(&ours, &theirs);
        assert!((r[0] - 2.0).abs() < 1e-12 && (r[1] - 6.0).abs() < 1e-12, "{r:?}");
        assert!((theirs.best_round_samples_per_s() - 128.0 / 0.020).abs() < 1e-9);
        // A side with fewer rounds (it failed part-way) pairs only the rounds both have.
        let short = Timing::from_rounds(&[vec![0.020]]).unwrap();
        assert_eq!(round_ratios(&ours, &short).len(), 1);
        assert!(Timing::from_rounds(&[]).is_none());
    }

    #[test]
    fn device_names() {
        for (s, d) in [("cpu", BenchDevice::Cpu), ("cuda", BenchDevice::Cuda(0)), ("cuda:0", BenchDevice::Cuda(0)), ("cuda:3", BenchDevice::Cuda(3))] {
            assert_eq!(s.parse::<BenchDevice>(), Ok(d), "{s}");
        }
        assert_eq!(BenchDevice::Cuda(3).to_string(), "cuda:3");
        assert_eq!(BenchDevice::Cpu.to_string(), "cpu");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let e = bad.parse::<BenchDevice>().unwrap_err();
            assert!(e.contains("use cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn target_lines() {
        assert_eq!(target_summary(&[]), None);
        let m = |v: &[(&str, f64)]| v.iter().map(|(n, r)| (n.to_string(), *r)).collect::<Vec<_>>();
        assert_eq!(
            target_summary(&m(&[("mlp", 1.3), ("cnn", 1.4), ("resnet", 0.98)])).unwrap(),
            "targets (ours / PyTorch, this run): cnn, resnet ≥ 1.0: not met (resnet 0.98); mlp ≥ 2.0: not met (mlp 1.30)"
        );
        assert_eq!(target_summary(&m(&[("resnet", 1.0), ("mlp-512", 2.0)])).unwrap(), "targets (ours / PyTorch, this run): resnet ≥ 1.0: met; mlp-512 ≥ 2.0: met");
    }

    /// The MAML step trains the body: every body variable moves, nothing becomes NaN, and the
    /// head is not among the optimiser's variables.
    #[test]
    fn maml_step_moves_the_body() {
        let mut rng = crate::rng::Rng::new(1);
        let batches: Vec<(Tensor, Tensor)> = (0..2)
            .map(|_| {
                let x: Vec<f32> = (0..BATCH * 28 * 28).map(|_| rng.normal() as f32).collect();
                let y: Vec<u32> = (0..BATCH).map(|_| rng.below(10) as u32).collect();
                (Tensor::from_vec(x, (BATCH, 1, 28, 28), &Device::Cpu).unwrap(), Tensor::from_vec(y, BATCH, &Device::Cpu).unwrap())
            })
            .collect();
        let mut t = Trainer::new(&BenchModel::Conv4Maml, Clock::Wall, &Device::Cpu).unwrap();
        let Learner::Maml(m) = &t.learner else { panic!("not the MAML learner") };
        let before: Vec<Vec<f32>> = m.body.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
        assert_eq!(before.len(), FunctionalConv4::BODY_PARAMS);
        let times = t.steps(&batches, 2).unwrap();
        assert_eq!(times.len(), 2);
        let Learner::Maml(m) = &t.learner else { unreachable!() };
        for (k, (v, b)) in m.body.iter().zip(&before).enumerate() {
            let a: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().all(|x| x.is_finite()), "body tensor {k}");
            // The conv biases' gradients are rounding noise (BatchNorm cancels them): skip them.
            if k % 3 != 1 {
                assert_ne!(&a, b, "body tensor {k} did not move");
            }
        }
        // WAMAL: both networks move, and stay finite.
        let mut t = Trainer::new(&BenchModel::Wamal, Clock::Wall, &Device::Cpu).unwrap();
        let Learner::Wamal(w) = &t.learner else { panic!("not the WAMAL learner") };
        let flat = |v: &[Tensor]| -> Vec<Vec<f32>> { v.iter().map(|t| t.flatten_all().unwrap().to_vec1().unwrap()).collect() };
        let (theta0, phi0) = (flat(&w.state.theta), flat(&w.state.phi));
        t.steps(&batches, 2).unwrap();
        let Learner::Wamal(w) = &t.learner else { unreachable!() };
        let (theta1, phi1) = (flat(&w.state.theta), flat(&w.state.phi));
        assert!(theta1.iter().chain(&phi1).flatten().all(|v| v.is_finite()));
        assert_ne!(theta0, theta1, "θ1 did not move");
        assert_ne!(phi0, phi1, "θ2 did not move");
        // The MLP: every parameter is meta-learned and moves.
        let mut t = Trainer::new(&BenchModel::MlpMaml, Clock::Wall, &Device::Cpu).unwrap();
        let Learner::Maml(m) = &t.learner else { panic!("not the MAML learner") };
        let before: Vec<Vec<f32>> = m.body.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
        assert_eq!(before.len(), 2 * (MLP_WIDTHS.len() - 1));
        t.steps(&batches, 2).unwrap();
        let Learner::Maml(m) = &t.learner else { unreachable!() };
        for (k, (v, b)) in m.body.iter().zip(&before).enumerate() {
            let a: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().all(|x| x.is_finite()) && &a != b, "MLP tensor {k}");
        }
    }

    #[test]
    fn automatic_step_counts() {
        // 2 s of 2.5 ms steps is 800 steps; slow models and a missing warm-up get the minimum.
        assert_eq!(auto_steps(Some(0.0025), 2.0), 800);
        assert_eq!(auto_steps(Some(0.3), 2.0), MIN_STEPS);
        assert_eq!(auto_steps(None, 2.0), MIN_STEPS);
        assert_eq!(auto_steps(Some(0.0), 2.0), MIN_STEPS);
    }
}
