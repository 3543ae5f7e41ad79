//! Execution: look every cell up in the store, compute what is missing (in parallel where the
//! graph allows), and record the results.
//!
//! A worker takes a cell whose upstream cells are done, locks its key in the store (so two
//! processes never compute the same cell at once), looks again (the other process may just
//! have finished it), computes, writes the outputs and then the record. A crash at any point
//! leaves either no record (the cell is recomputed next time) or a complete one.
//! Progress bars (cells done / total, each worker's cell and epoch) show on a terminal and stay
//! silent otherwise; a [`ProgressSink`] in the options receives the same events as values (a
//! notebook, a log, a cluster driver).

mod awake;
mod cells;
mod executor;
mod slurm;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use awake::{install_awake, wait_policy, WaitPolicy, WAIT_ENV};
pub use executor::{Executor, LocalThreads};
pub use slurm::{batch_script, sbatch_args, Slurm, SlurmConfig, SlurmError, TaskCommand, SLURM_ENV_PREFIX};

use crate::cache::{CellRecord, CellStatus, Corruption, Store, StoreError};
use crate::methods::Progress;
use crate::plan::Plan;

/// What execution reports as it goes, to a [`ProgressSink`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// Execution begins: `cells` in the plan, run by up to `jobs` workers.
    Started { cells: usize, jobs: usize },
    /// Worker `job` took `cell` (a cached cell finishes at once).
    CellStarted { job: usize, cell: &'a str },
    /// Inside a computed cell: `done` of `total` epochs, with the method's note.
    Epoch { job: usize, cell: &'a str, done: usize, total: usize, note: &'a str },
    /// `cell` ended: `outcome` is `cached`, `ran` or `failed`; `done` of `cells` have ended.
    CellFinished { job: usize, cell: &'a str, outcome: &'static str, done: usize, cells: usize },
    /// Every cell has ended (or a store error stopped execution), after `seconds`.
    Finished { seconds: f64 },
}

/// Receives [`Event`]s from every worker thread (so it must be `Sync`); it should return
/// quickly, as the worker waits for it.
pub trait ProgressSink: Send + Sync {
    fn event(&self, event: &Event);
}

/// A sink that keeps every event as a line of text (for tests and logs).
#[derive(Debug, Default)]
pub struct EventLog(pub Mutex<Vec<String>>);

impl ProgressSink for EventLog {
    fn event(&self, event: &Event) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(format!("{event:?}"));
        }
    }
}

/// How to execute.
#[derive(Clone)]
pub struct ExecOptions {
    /// Cells computed at once. Default: the number of cores.
    pub jobs: usize,
    /// Threads each cell's tensor operations use. Default: cores / jobs, at least 1.
    pub threads_per_job: usize,
    /// Draw progress bars (only honoured on a terminal).
    pub progress: bool,
    /// Do not compute anything: a missing cell is an error (rendering from the cache only).
    pub cache_only: bool,
    /// Where events go besides the bars. Default: nowhere.
    pub sink: Option<Arc<dyn ProgressSink>>,
}

impl std::fmt::Debug for ExecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecOptions")
            .field("jobs", &self.jobs)
            .field("threads_per_job", &self.threads_per_job)
            .field("progress", &self.progress)
            .field("cache_only", &self.cache_only)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl Default for ExecOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ExecOptions { jobs: cores, threads_per_job: 1, progress: true, cache_only: false, sink: None }
    }
}

impl ExecOptions {
    pub fn with_jobs(jobs: Option<usize>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let jobs = jobs.unwrap_or(cores).max(1);
        ExecOptions { jobs, threads_per_job: (cores / jobs).max(1), ..Default::default() }
    }

    /// These options with `sink` receiving the events.
    pub fn with_sink(mut self, sink: Arc<dyn ProgressSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    fn emit(&self, event: &Event) {
        if let Some(s) = &self.sink {
            s.event(event);
        }
    }
}

/// How the failure of a cell whose upstream failed begins.
pub const UPSTREAM_FAILED: &str = "upstream cell failed";

/// What happened to one cell.
#[derive(Debug, Clone, PartialEq)]
pub enum CellOutcome {
    /// Found in the store.
    Cached(CellRecord),
    /// Computed now.
    Ran(CellRecord),
    /// Not available: an error while computing, a failed upstream cell, or (cache-only) missing.
    Failed(String),
}

impl CellOutcome {
    pub fn record(&self) -> Option<&CellRecord> {
        match self {
            CellOutcome::Cached(r) | CellOutcome::Ran(r) => Some(r),
            CellOutcome::Failed(_) => None,
        }
    }

    /// A reason why the cell has no usable result (errors, and recorded failures such as a
    /// diverged run).
    pub fn failure(&self) -> Option<String> {
        match self {
            CellOutcome::Failed(r) => Some(r.clone()),
            CellOutcome::Cached(r) | CellOutcome::Ran(r) if r.status == CellStatus::Failed => r.reason.clone().or_else(|| Some("failed".into())),
            _ => None,
        }
    }
}

/// How many cells of a plan were found in the cache, computed, or have no usable result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub planned: usize,
    pub cached: usize,
    pub ran: usize,
    /// Errors and recorded failures (a diverged run) alike.
    pub failed: usize,
}

/// The result of executing a plan.
#[derive(Debug, Clone)]
pub struct Execution {
    /// One outcome per plan cell, in plan order.
    pub outcomes: Vec<CellOutcome>,
    pub seconds: f64,
    pub corruptions: Vec<Corruption>,
}

impl Execution {
    pub fn count(&self) -> Counts {
        Counts {
            planned: self.outcomes.len(),
            cached: self.outcomes.iter().filter(|o| matches!(o, CellOutcome::Cached(_))).count(),
            ran: self.outcomes.iter().filter(|o| matches!(o, CellOutcome::Ran(_))).count(),
            failed: self.outcomes.iter().filter(|o| o.failure().is_some()).count(),
        }
    }

    /// One warning per corrupt store file met (each was removed): `recomputed` when the run
    /// computed the cell again, otherwise (a cache-only lookup: `render`, notebooks) the hint
    /// that `reprise run` will.
    pub fn corruption_warnings(&self, recomputed: bool) -> Vec<String> {
        let then = if recomputed { "it was removed and recomputed" } else { "it was removed; `reprise run` recomputes it" };
        self.corruptions.iter().map(|c| format!("warning: {c}; {then}")).collect()
    }

    /// Print [`Execution::corruption_warnings`] on stderr.
    pub fn print_corruptions(&self, recomputed: bool) {
        for w in self.corruption_warnings(recomputed) {
            eprintln!("{w}");
        }
    }
}

/// Errors that stop execution as a whole (the store itself failing).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Slurm(#[from] SlurmError),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
}

struct Shared {
    states: Vec<State>,
    outcomes: Vec<Option<CellOutcome>>,
    fatal: Option<StoreError>,
}

/// Progress of one worker, drawn as a bar and sent to the sink.
struct BarProgress<'a> {
    bar: ProgressBar,
    name: String,
    job: usize,
    opts: &'a ExecOptions,
}

impl Progress for BarProgress<'_> {
    fn epoch(&self, done: usize, total: usize, note: &str) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.set_message(format!("{} {note}", self.name));
        self.opts.emit(&Event::Epoch { job: self.job, cell: &self.name, done, total, note });
    }
}

/// Execute `plan` against `store`.
pub fn execute(plan: &Plan, store: &dyn Store, opts: &ExecOptions) -> Result<Execution, ExecError> {
    let start = Instant::now();
    limit_tensor_threads(opts.threads_per_job);
    let n = plan.cells.len();
    let shared = Mutex::new(Shared { states: vec![State::Waiting; n], outcomes: vec![None; n], fatal: None });
    let wake = Condvar::new();
    let draw = opts.progress && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if draw { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    let total = multi.add(ProgressBar::new(n as u64));
    total.set_style(ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} cells  {elapsed_precise}  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    total.set_prefix("reprise");
    if draw {
        total.enable_steady_tick(Duration::from_millis(500));
    }
    let memo = cells::Memo::default();
    let jobs = opts.jobs.max(1).min(n.max(1));
    opts.emit(&Event::Started { cells: n, jobs });
    let ended = std::sync::atomic::AtomicUsize::new(0);

    std::thread::scope(|scope| {
        for w in 0..jobs {
            let (shared, wake, multi, total, memo, ended) = (&shared, &wake, &multi, &total, &memo, &ended);
            scope.spawn(move || {
                let bar = multi.add(ProgressBar::new(1));
                bar.set_style(ProgressStyle::with_template("{prefix:>8} [{bar:30}] epoch {pos}/{len}  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
                bar.set_prefix(format!("job {}", w + 1));
                let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads_per_job.max(1)).build().ok();
                loop {
                    let next = {
                        let mut s = match shared.lock() {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                        loop {
                            if s.fatal.is_some() {
                                break None;
                            }
                            // Cells whose upstream failed fail too, without running.
                            let mut changed = false;
                            for i in 0..n {
                                if s.states[i] == State::Waiting && plan.cells[i].upstream.iter().any(|&u| s.states[u] == State::Failed) {
                                    s.states[i] = State::Failed;
                                    let up: Vec<String> = plan.cells[i].upstream.iter().filter(|&&u| s.states[u] == State::Failed).map(|&u| plan.cells[u].name.clone()).collect();
                                    s.outcomes[i] = Some(CellOutcome::Failed(format!("{UPSTREAM_FAILED}: {}", up.join(", "))));
                                    total.inc(1);
                                    let done = ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                                    opts.emit(&Event::CellFinished { job: w + 1, cell: &plan.cells[i].name, outcome: "failed", done, cells: n });
                                    changed = true;
                                }
                            }
                            if changed {
                                wake.notify_all();
                            }
                            let ready = (0..n).find(|&i| s.states[i] == State::Waiting && plan.cells[i].upstream.iter().all(|&u| s.states[u] == State::Done));
                            if let Some(i) = ready {
                                s.states[i] = State::Running;
                                break Some(i);
                            }
                            if !s.states.contains(&State::Waiting) {
                                break None;
                            }
                            s = match wake.wait_timeout(s, Duration::from_millis(200)) {
                                Ok((g, _)) => g,
                                Err(p) => p.into_inner().0,
                            };
                        }
                    };
                    let Some(i) = next else { break };
                    let cell = &plan.cells[i];
                    let progress = BarProgress { bar: bar.clone(), name: cell.name.clone(), job: w + 1, opts };
                    opts.emit(&Event::CellStarted { job: w + 1, cell: &cell.name });
                    bar.set_message(cell.name.clone());
                    bar.set_position(0);
                    let inputs: Vec<CellRecord> = {
                        let s = match shared.lock() {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                        cell.upstream.iter().filter_map(|&u| s.outcomes[u].as_ref().and_then(|o| o.record().cloned())).collect()
                    };
                    let work = || cells::run_cell(plan, i, &inputs, store, memo, &progress, opts.cache_only);
                    let result = match &pool {
                        // With more than one thread per job, the pool's other workers stay awake
                        // for the cell (a sleeping worker wakes too late for a layer's GEMM).
                        Some(p) => install_awake(p, work),
                        None => work(),
                    };
                    let mut s = match shared.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    let shown = match &result {
                        Ok(CellOutcome::Cached(r)) | Ok(CellOutcome::Ran(r)) if r.status != CellStatus::Ok => "failed",
                        Ok(CellOutcome::Cached(_)) => "cached",
                        Ok(CellOutcome::Ran(_)) => "ran",
                        _ => "failed",
                    };
                    match result {
                        Ok(outcome) => {
                            let usable = outcome.record().is_some_and(|r| r.status == CellStatus::Ok);
                            s.states[i] = if usable { State::Done } else { State::Failed };
                            if !usable {
                                total.set_message(format!("failed: {}", cell.name));
                            }
                            s.outcomes[i] = Some(outcome);
                        }
                        Err(e) => {
                            s.states[i] = State::Failed;
                            s.fatal = Some(e);
                        }
                    }
                    total.inc(1);
                    let done = ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    drop(s);
                    opts.emit(&Event::CellFinished { job: w + 1, cell: &cell.name, outcome: shown, done, cells: n });
                    wake.notify_all();
                }
                bar.finish_and_clear();
            });
        }
    });
    total.finish_and_clear();
    opts.emit(&Event::Finished { seconds: start.elapsed().as_secs_f64() });
    let s = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = s.fatal {
        return Err(ExecError::Store(e));
    }
    let outcomes = s.outcomes.into_iter().map(|o| o.unwrap_or_else(|| CellOutcome::Failed("not run".into()))).collect();
    Ok(Execution { outcomes, seconds: start.elapsed().as_secs_f64(), corruptions: store.take_corruptions() })
}

/// Look up or compute the one cell `i` of `plan` (a SLURM task's work), with every core of
/// this process (`threads`) for its tensor operations; its upstream cells must be in the store.
/// Epochs are printed on stderr, which a cluster keeps in the task's log.
pub fn execute_one(plan: &Plan, i: usize, store: &dyn Store, threads: usize) -> Result<CellOutcome, ExecError> {
    limit_tensor_threads(threads);
    let cell = &plan.cells[i];
    let mut inputs = Vec::new();
    for &u in &cell.upstream {
        match cells::intact_record(store, &plan.cells[u].key)? {
            Some(r) if r.status == CellStatus::Ok => inputs.push(r),
            Some(_) => return Ok(CellOutcome::Failed(format!("{UPSTREAM_FAILED}: {}", plan.cells[u].name))),
            None => return Ok(CellOutcome::Failed(format!("upstream cell {} is not in the store {}; its task must finish first", plan.cells[u].name, store.location()))),
        }
    }
    struct Log<'a>(&'a str);
    impl Progress for Log<'_> {
        fn epoch(&self, done: usize, total: usize, note: &str) {
            eprintln!("{}: epoch {done}/{total} {note}", self.0);
        }
    }
    let memo = cells::Memo::default();
    let work = || cells::run_cell(plan, i, &inputs, store, &memo, &Log(&cell.name), false);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().ok();
    let outcome = match &pool {
        Some(p) => install_awake(p, work),
        None => work(),
    }?;
    Ok(outcome)
}

/// candle sizes its CPU kernels' parallelism from `RAYON_NUM_THREADS` (read once); with several
/// cells at once, more threads than cores make small models several times slower (its worker
/// threads spin while they wait). Set it before the first tensor operation unless the user did.
fn limit_tensor_threads(n: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Runs before any worker thread of ours exists (environment writes are not
        // thread-safe); candle reads the variables lazily afterwards.
        crate::models::set_cpu_threads(n);
    });
}

/// Read a cell's named output from the store.
pub fn read_output(store: &dyn Store, record: &CellRecord, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match record.outputs.get(name) {
        Some(h) => store.get(h),
        None => Ok(None),
    }
}

/// Output name → hash of every cell, for lock files.
pub fn outputs_of(exec: &Execution) -> Vec<BTreeMap<String, String>> {
    exec.outcomes.iter().map(|o| o.record().map(|r| r.outputs.clone()).unwrap_or_default()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LocalStore;
    use crate::methods::{Method, MethodError, Outcome, Registry, TrainInputs};
    use crate::params::{ParamDef, ParamStruct, Params, Schema};

    /// A method with no data and no parameters whose run reports two epochs.
    struct Counter;

    #[derive(serde::Deserialize)]
    struct NoParams {}

    impl ParamStruct for NoParams {
        const SCHEMA: &'static [ParamDef] = &[];
    }

    impl Method for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn version(&self) -> u32 {
            1
        }
        fn schema(&self) -> Schema {
            Schema::of::<NoParams>()
        }
        fn run(&self, _: &Params, seed: u64, _: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
            progress.epoch(1, 2, "first");
            progress.epoch(2, 2, "");
            Ok(Outcome::Done(BTreeMap::from([("metrics.json".to_string(), format!("{{\"seed\": {seed}}}").into_bytes())])))
        }
    }

    fn events(plan: &Plan, store: &LocalStore) -> Vec<String> {
        let log = Arc::new(EventLog::default());
        let opts = ExecOptions { progress: false, ..ExecOptions::with_jobs(Some(2)) }.with_sink(log.clone());
        execute(plan, store, &opts).unwrap();
        let lines = log.0.lock().unwrap().clone();
        lines
    }

    #[test]
    fn a_sink_receives_every_cell_and_epoch_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("templates")).unwrap();
        std::fs::write(dir.path().join("templates/t.md.j2"), "x").unwrap();
        let text = "[report]\nid = \"c\"\ntitle = \"C\"\ntemplate = \"t.md.j2\"\nmethod = \"counter\"\n\n[experiments.e]\ntitle = \"E\"\nseeds = [0, 1, 2]\n";
        let registry = Registry::empty().with(Counter);
        let spec = crate::spec::parse_with(text, std::path::Path::new("reports/c.toml"), dir.path(), "quick", &[], &registry).unwrap();
        let plan = crate::plan::plan(&spec).unwrap();
        let store = LocalStore::open(&dir.path().join("store")).unwrap();

        let first = events(&plan, &store);
        assert_eq!(first.first().unwrap(), "Started { cells: 3, jobs: 2 }", "{first:#?}");
        assert!(first.last().unwrap().starts_with("Finished"), "{first:#?}");
        for cell in plan.cells.iter().map(|c| &c.name) {
            let of = |what: &str| first.iter().filter(|l| l.starts_with(what) && l.contains(&format!("cell: {cell:?}"))).count();
            assert_eq!((of("CellStarted"), of("Epoch"), of("CellFinished")), (1, 2, 1), "{cell}: {first:#?}");
            assert!(first.iter().any(|l| l.contains(&format!("cell: {cell:?}, done: 1, total: 2, note: \"first\""))), "{first:#?}");
        }
        let finished: Vec<&String> = first.iter().filter(|l| l.starts_with("CellFinished")).collect();
        assert!(finished.iter().all(|l| l.contains("outcome: \"ran\"")), "{finished:#?}");
        // `done` counts the ended cells, whichever worker ended them.
        let mut done: Vec<usize> = finished.iter().map(|l| l.split("done: ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap()).collect();
        done.sort();
        assert_eq!(done, vec![1, 2, 3]);

        // Again: every cell is cached, and no epoch runs.
        let second = events(&plan, &store);
        assert_eq!(second.iter().filter(|l| l.contains("outcome: \"cached\"")).count(), 3, "{second:#?}");
        assert!(!second.iter().any(|l| l.starts_with("Epoch")), "{second:#?}");
    }

    /// A method whose one run declares a chain of derivation steps on the optical digits and a
    /// plain long-tailed input, and records what it received.
    struct Peek {
        cap: usize,
    }

    const CHAIN: &[u32] = &[3, 7, 1];

    fn chain(cap: usize) -> crate::methods::InputDecl {
        use crate::methods::{Derive, InputDecl};
        InputDecl::new("chain", "digits")
            .then(Derive::Classes { classes: CHAIN.to_vec() })
            .then(Derive::Cap { per_class: cap, seed: 1 })
            .then(Derive::Rotate { degrees: 90.0 })
            .then(Derive::Resize { height: 4, width: 4 })
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Seen {
        num_classes: usize,
        side: (usize, usize),
        train_counts: Vec<usize>,
        test_counts: Vec<usize>,
        first_train: Vec<f32>,
        plain_train: usize,
        /// Test episodes of the input `eps`, with its test indices and labels.
        episodes: Vec<crate::data::episodes::Episode>,
        eps_test: Vec<usize>,
        eps_labels: Vec<u32>,
    }

    impl Method for Peek {
        fn name(&self) -> &'static str {
            "peek"
        }
        fn version(&self) -> u32 {
            1
        }
        fn schema(&self) -> Schema {
            Schema::of::<NoParams>()
        }
        fn inputs(&self, _: &Params) -> Result<Vec<crate::methods::InputDecl>, MethodError> {
            use crate::data::episodes::{EpisodeSpec, Shots};
            let spec = EpisodeSpec { count: 20, ways: 3, max_shot: 5, queries: 3, shots: Shots::Mixed, seed: 2 };
            let eps = crate::methods::InputDecl::new("eps", "digits")
                .then(crate::methods::Derive::Classes { classes: vec![0, 2, 4, 5, 6, 8] })
                .then(crate::methods::Derive::Episodes { spec, from: crate::methods::EpisodePool::Test });
            Ok(vec![chain(self.cap), crate::methods::InputDecl::long_tail_of("plain", "digits", 0.1, 0), eps])
        }
        fn run(&self, _: &Params, _: u64, inputs: &TrainInputs, _: &dyn Progress) -> Result<Outcome, MethodError> {
            let c = inputs.input("chain")?;
            let counts = |idx: &[usize]| {
                let mut n = vec![0; c.data.num_classes];
                idx.iter().for_each(|&i| n[c.data.labels[i] as usize] += 1);
                n
            };
            let seen = Seen {
                num_classes: c.data.num_classes,
                side: (c.data.height, c.data.width),
                train_counts: counts(c.train),
                test_counts: counts(c.test),
                first_train: c.data.image(c.train[0]).to_vec(),
                plain_train: inputs.input("plain")?.train.len(),
                episodes: inputs.input("eps")?.episodes.to_vec(),
                eps_test: inputs.input("eps")?.test.to_vec(),
                eps_labels: inputs.input("eps")?.data.labels.clone(),
            };
            Ok(Outcome::Done(BTreeMap::from([("seen.json".to_string(), serde_json::to_vec(&seen).unwrap())])))
        }
    }

    #[test]
    fn a_chain_of_derivation_steps_reaches_the_run_and_each_step_is_its_own_cell() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = "[report]\nid = \"p\"\ntitle = \"P\"\ntemplate = \"neural-collapse.md.j2\"\nmethod = \"peek\"\n\n[data.digits]\nmanifest = \"optdigits-8x8\"\ntest_per_class = 10\n\n[experiments.e]\ntitle = \"E\"\n";
        let registry = Registry::empty().with(Peek { cap: 20 });
        let spec = crate::spec::parse_with(text, &root.join("reports/p.toml"), root, "quick", &[], &registry).unwrap();
        let plan = crate::plan::plan(&spec).unwrap();
        let names: Vec<&str> = plan.cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "data/digits",
                "split/digits",
                "classes/digits/classes=[3,7,1]",
                "cap/digits/classes=[3,7,1]/per_class=20",
                "rotate/digits/classes=[3,7,1]/per_class=20/degrees=90.0",
                "resize/digits/classes=[3,7,1]/per_class=20/degrees=90.0/height=4,width=4",
                "subset/digits/imbalance=0.1",
                "classes/digits/classes=[0,2,4,5,6,8]",
                "episodes/digits/classes=[0,2,4,5,6,8]/count=20,from=test,max_shot=5,queries=3,shots=mixed,ways=3",
                "train/e/seed=0",
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let exec = execute(&plan, &store, &ExecOptions { progress: false, ..ExecOptions::with_jobs(Some(1)) }).unwrap();
        let train = exec.outcomes.last().and_then(|o| o.record()).unwrap_or_else(|| panic!("{:?}", exec.outcomes));
        let seen: Seen = serde_json::from_slice(&store.get(&train.outputs["seen.json"]).unwrap().unwrap()).unwrap();

        // What the steps should give, computed here from the data set and split alone.
        let ds = exec.outcomes[0].record().unwrap();
        let images = crate::data::ImageSet::from_safetensors_bytes(&store.get(&ds.outputs["images.safetensors"]).unwrap().unwrap()).unwrap();
        let split: cells::SplitOutput = serde_json::from_slice(&store.get(&exec.outcomes[1].record().unwrap().outputs["split.json"]).unwrap().unwrap()).unwrap();
        let in_pool = |class: u32, idx: &[usize]| idx.iter().filter(|&&i| images.labels[i] == class).count();
        assert_eq!(seen.num_classes, 3);
        assert_eq!(seen.side, (4, 4));
        assert_eq!(seen.train_counts, CHAIN.iter().map(|&c| in_pool(c, &split.train).min(20)).collect::<Vec<_>>());
        assert_eq!(seen.test_counts, vec![10, 10, 10]);
        // The first training image, followed through the steps: the class selection keeps the
        // split's training images of the three classes in index order, relabelled 0, 1, 2; the
        // cap picks among those positions by the new labels.
        let (kept, relabelled) = crate::data::derived::keep_classes(&images.labels, &split.train, images.num_classes, CHAIN).unwrap();
        let capped = crate::data::derived::cap_per_class(&relabelled, &(0..kept.len()).collect::<Vec<_>>(), 3, 20, 1).unwrap();
        let first = images.subset(&[kept[capped[0]]]);
        let expect = crate::data::transform::resize(&crate::data::transform::rotate(&first, 90.0), 4, 4);
        assert_eq!(seen.first_train, expect.pixels);
        assert!(seen.plain_train > 0);
        // The episodes: drawn from the selected classes' test images, labels 0..6.
        assert_eq!(seen.episodes.len(), 20);
        for e in &seen.episodes {
            assert_eq!(e.classes.len(), 3);
            assert!(e.classes.iter().all(|&c| c < 6));
            for (k, &c) in e.classes.iter().enumerate() {
                assert!(e.support[k].iter().chain(&e.query[k]).all(|i| seen.eps_test.contains(i) && seen.eps_labels[*i] == c));
                assert!((1..=5).contains(&e.support[k].len()) && e.query[k].len() == 3);
            }
        }

        // Changing the cap changes its cell and those after it, nothing before.
        let plan21 = crate::plan::plan(&crate::spec::parse_with(text, &root.join("reports/p.toml"), root, "quick", &[], &Registry::empty().with(Peek { cap: 21 })).unwrap()).unwrap();
        let same: Vec<bool> = plan.cells.iter().zip(&plan21.cells).map(|(a, b)| a.key == b.key).collect();
        assert_eq!(same, [true, true, true, false, false, false, true, true, true, false]);
    }

    /// A method that reads one input through `Angles` and `Episodes` over all of its images.
    struct AnglePeek;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct AngleSeen {
        num_classes: usize,
        labels: Vec<u32>,
        pixels: Vec<f32>,
        train: Vec<usize>,
        test: Vec<usize>,
        episodes: Vec<crate::data::episodes::Episode>,
    }

    impl Method for AnglePeek {
        fn name(&self) -> &'static str {
            "angle-peek"
        }
        fn version(&self) -> u32 {
            1
        }
        fn schema(&self) -> Schema {
            Schema::of::<NoParams>()
        }
        fn inputs(&self, _: &Params) -> Result<Vec<crate::methods::InputDecl>, MethodError> {
            use crate::data::episodes::{EpisodeSpec, Shots};
            use crate::methods::{Derive, EpisodePool, InputDecl};
            let spec = EpisodeSpec { count: 30, ways: 4, max_shot: 3, queries: 2, shots: Shots::Mixed, seed: 5 };
            Ok(vec![InputDecl::new("set", "digits")
                .then(Derive::Classes { classes: vec![1, 7] })
                .then(Derive::Angles { degrees: vec![0.0, 90.0] })
                .then(Derive::Episodes { spec, from: EpisodePool::All })])
        }
        fn run(&self, _: &Params, _: u64, inputs: &TrainInputs, _: &dyn Progress) -> Result<Outcome, MethodError> {
            let c = inputs.input("set")?;
            let seen = AngleSeen {
                num_classes: c.data.num_classes,
                labels: c.data.labels.clone(),
                pixels: c.data.pixels.clone(),
                train: c.train.to_vec(),
                test: c.test.to_vec(),
                episodes: c.episodes.to_vec(),
            };
            Ok(Outcome::Done(BTreeMap::from([("seen.json".to_string(), serde_json::to_vec(&seen).unwrap())])))
        }
    }

    #[test]
    fn rotated_copies_make_a_class_per_angle_and_episodes_can_draw_from_every_image() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = "[report]\nid = \"p\"\ntitle = \"P\"\ntemplate = \"neural-collapse.md.j2\"\nmethod = \"angle-peek\"\n\n[data.digits]\nmanifest = \"optdigits-8x8\"\ntest_per_class = 10\n\n[experiments.e]\ntitle = \"E\"\n";
        let spec = crate::spec::parse_with(text, &root.join("reports/p.toml"), root, "quick", &[], &Registry::empty().with(AnglePeek)).unwrap();
        let plan = crate::plan::plan(&spec).unwrap();
        let names: Vec<&str> = plan.cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[3], "angles/digits/classes=[1,7]/degrees=[0.0,90.0]");
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let exec = execute(&plan, &store, &ExecOptions { progress: false, ..ExecOptions::with_jobs(Some(1)) }).unwrap();
        let train = exec.outcomes.last().and_then(|o| o.record()).unwrap_or_else(|| panic!("{:?}", exec.outcomes));
        let seen: AngleSeen = serde_json::from_slice(&store.get(&train.outputs["seen.json"]).unwrap().unwrap()).unwrap();
        // The class selection's images (its training images, then its test images), computed
        // here from the data set and split alone.
        let ds = exec.outcomes[0].record().unwrap();
        let images = crate::data::ImageSet::from_safetensors_bytes(&store.get(&ds.outputs["images.safetensors"]).unwrap().unwrap()).unwrap();
        let split: cells::SplitOutput = serde_json::from_slice(&store.get(&exec.outcomes[1].record().unwrap().outputs["split.json"]).unwrap().unwrap()).unwrap();
        let (tr, tr_l) = crate::data::derived::keep_classes(&images.labels, &split.train, images.num_classes, &[1, 7]).unwrap();
        let (te, te_l) = crate::data::derived::keep_classes(&images.labels, &split.test, images.num_classes, &[1, 7]).unwrap();
        let mut base = images.subset(&[tr.as_slice(), te.as_slice()].concat());
        base.labels = [tr_l, te_l].concat();
        base.num_classes = 2;
        let n = base.len();
        // Copy 0 is the images as they are, labels 0, 1; copy 1 the 90° rotation, labels 2, 3.
        assert_eq!(seen.num_classes, 4);
        assert_eq!(seen.pixels[..base.pixels.len()], base.pixels[..]);
        assert_eq!(seen.pixels[base.pixels.len()..], crate::data::transform::rotate(&base, 90.0).pixels[..]);
        assert_eq!(seen.labels[..n], base.labels[..]);
        assert!(seen.labels[n..].iter().zip(&base.labels).all(|(a, b)| *a == b + 2));
        // Training images stay training images in both copies.
        let expect_train: Vec<usize> = (0..tr.len()).chain(n..n + tr.len()).collect();
        assert_eq!(seen.train, expect_train);
        assert_eq!(seen.test.len(), 2 * te.len());
        // The episodes are those drawn from every image, and some use test images.
        let all: Vec<usize> = (0..2 * n).collect();
        let spec = crate::data::episodes::EpisodeSpec { count: 30, ways: 4, max_shot: 3, queries: 2, shots: crate::data::episodes::Shots::Mixed, seed: 5 };
        assert_eq!(seen.episodes, crate::data::episodes::sample(&seen.labels, &all, 4, &spec).unwrap());
        assert!(seen.episodes.iter().flat_map(|e| e.support.iter().chain(&e.query).flatten()).any(|i| seen.test.contains(i)));
    }
}
