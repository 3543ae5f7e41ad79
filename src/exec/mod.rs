//! Execution: look every cell up in the store, compute what is missing (in parallel where the
//! graph allows), and record the results.
//!
//! A worker takes a cell whose upstream cells are done, locks its key in the store (so two
//! processes never compute the same cell at once), looks again (the other process may just
//! have finished it), computes, writes the outputs and then the record. A crash at any point
//! leaves either no record (the cell is recomputed next time) or a complete one.
//! Progress bars (cells done / total, each worker's cell and epoch) show on a terminal and stay
//! silent otherwise.

mod awake;
mod cells;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use awake::{install_awake, wait_policy, WaitPolicy, WAIT_ENV};

use crate::cache::{CellRecord, CellStatus, Corruption, Store, StoreError};
use crate::methods::Progress;
use crate::plan::Plan;

/// How to execute.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Cells computed at once. Default: the number of cores.
    pub jobs: usize,
    /// Threads each cell's tensor operations use. Default: cores / jobs, at least 1.
    pub threads_per_job: usize,
    /// Draw progress bars (only honoured on a terminal).
    pub progress: bool,
    /// Do not compute anything: a missing cell is an error (rendering from the cache only).
    pub cache_only: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ExecOptions { jobs: cores, threads_per_job: 1, progress: true, cache_only: false }
    }
}

impl ExecOptions {
    pub fn with_jobs(jobs: Option<usize>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let jobs = jobs.unwrap_or(cores).max(1);
        ExecOptions { jobs, threads_per_job: (cores / jobs).max(1), ..Default::default() }
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

/// Progress of one worker, drawn as a bar.
struct BarProgress {
    bar: ProgressBar,
    name: String,
}

impl Progress for BarProgress {
    fn epoch(&self, done: usize, total: usize, note: &str) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.set_message(format!("{} {note}", self.name));
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

    std::thread::scope(|scope| {
        for w in 0..opts.jobs.max(1).min(n.max(1)) {
            let (shared, wake, multi, total, memo) = (&shared, &wake, &multi, &total, &memo);
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
                    let progress = BarProgress { bar: bar.clone(), name: cell.name.clone() };
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
                    wake.notify_all();
                }
                bar.finish_and_clear();
            });
        }
    });
    total.finish_and_clear();
    let s = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = s.fatal {
        return Err(ExecError::Store(e));
    }
    let outcomes = s.outcomes.into_iter().map(|o| o.unwrap_or_else(|| CellOutcome::Failed("not run".into()))).collect();
    Ok(Execution { outcomes, seconds: start.elapsed().as_secs_f64(), corruptions: store.take_corruptions() })
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
