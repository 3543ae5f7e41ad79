//! The SLURM executor: missing cells run as job arrays on a cluster, each task computing one
//! cell by key through the hidden `reprise cell` subcommand against the shared store.
//!
//! The driver submits in dependency order: every cell whose upstream cells are in the store
//! goes into the next array (one array for the cells that want a GPU, which ask `--gres`, one
//! for the others); it waits for the array to leave the queue, showing how many of its cells
//! the store already holds, then confirms each cell by what the store holds (its record and
//! outputs, re-hashed: a task's zero exit proves nothing) before submitting the cells that
//! read them. A cell with no record is reported with its task id, SLURM's state for it and its
//! log; the cells downstream of it are not submitted. A rerun submits only what is missing.
//!
//! Settings (partition, time limit, GPUs per cell, CPUs per task, extra `sbatch` arguments,
//! how often to look) come from a TOML file, `REPRISE_SLURM_*` variables and the command line,
//! later ones winning ([`SlurmConfig`]). Tasks inherit the submitting environment (`sbatch`'s
//! default), so the `AWS_*` variables of an S3 store reach them; the `reprise` binary, the
//! project folder and a local store must be on a file system the nodes share.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::cells::intact_record;
use super::{CellOutcome, Event, ExecError, ExecOptions, Execution, Executor, UPSTREAM_FAILED};
use crate::cache::{CellStatus, Store};
use crate::plan::{Cell, CellKind, Plan};

/// Errors of the SLURM executor: its configuration, or a command of SLURM's that failed.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("SLURM settings {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{var}={value}: {message}")]
    Env { var: String, value: String, message: String },
    #[error("`{command}` could not be started: {source} (--executor slurm needs SLURM's client commands sbatch, squeue and scontrol on PATH)")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// How cells are submitted. Every field has a default, so an empty file is valid; an unknown
/// field is an error naming it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmConfig {
    /// `--partition`. Default: the cluster's default partition.
    pub partition: Option<String>,
    /// `--time`, SLURM's format (`30`, `2:00:00`, `1-00:00:00`). Default: the partition's.
    pub time: Option<String>,
    /// GPUs a cell that wants one asks for (`--gres=gpu:N`); 0 asks for none. Default: 1.
    pub gpus_per_cell: u32,
    /// `--cpus-per-task`. Default: not given (SLURM's default, one).
    pub cpus_per_task: Option<u32>,
    /// Further `sbatch` arguments, one per item (`--account=x`, `--qos=long`). Default: none.
    pub sbatch_args: Vec<String>,
    /// Seconds between two looks at the queue. Default: 10.
    pub poll_seconds: f64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig { partition: None, time: None, gpus_per_cell: 1, cpus_per_task: None, sbatch_args: Vec::new(), poll_seconds: 10.0 }
    }
}

/// The variables that override a settings file: `REPRISE_SLURM_PARTITION`, `_TIME`, `_GPUS`,
/// `_CPUS`, `_ARGS` (split at whitespace) and `_POLL` (seconds).
pub const SLURM_ENV_PREFIX: &str = "REPRISE_SLURM_";

impl SlurmConfig {
    /// The settings of `file` (TOML, the fields of [`SlurmConfig`]) when given, then the
    /// `REPRISE_SLURM_*` variables over them.
    pub fn load(file: Option<&Path>) -> Result<SlurmConfig, SlurmError> {
        let mut c = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| SlurmError::Io { path: p.to_path_buf(), source })?;
                toml::from_str(&text).map_err(|e| SlurmError::Config { path: p.to_path_buf(), message: e.to_string() })?
            }
            None => SlurmConfig::default(),
        };
        c.apply_env(|name| std::env::var(name).ok())?;
        Ok(c)
    }

    /// Apply the `REPRISE_SLURM_*` variables that `get` finds.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), SlurmError> {
        let var = |suffix: &str| get(&format!("{SLURM_ENV_PREFIX}{suffix}")).filter(|v| !v.trim().is_empty()).map(|v| (format!("{SLURM_ENV_PREFIX}{suffix}"), v));
        let bad = |(var, value): (String, String), message: &str| SlurmError::Env { var, value, message: message.to_string() };
        if let Some((_, v)) = var("PARTITION") {
            self.partition = Some(v);
        }
        if let Some((_, v)) = var("TIME") {
            self.time = Some(v);
        }
        if let Some(kv) = var("GPUS") {
            self.gpus_per_cell = kv.1.trim().parse().map_err(|_| bad(kv.clone(), "GPUs per cell must be a whole number (0 for none)"))?;
        }
        if let Some(kv) = var("CPUS") {
            self.cpus_per_task = Some(kv.1.trim().parse().map_err(|_| bad(kv.clone(), "CPUs per task must be a whole number"))?);
        }
        if let Some((_, v)) = var("ARGS") {
            self.sbatch_args = v.split_whitespace().map(str::to_string).collect();
        }
        if let Some(kv) = var("POLL") {
            self.poll_seconds = kv.1.trim().parse().ok().filter(|s: &f64| *s > 0.0).ok_or_else(|| bad(kv.clone(), "seconds between looks at the queue must be a positive number"))?;
        }
        Ok(())
    }
}

/// How a task computes one cell: `EXE cell SPEC --profile P [--set S]… --cache STORE --key K`,
/// run in the project folder.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskCommand {
    /// The `reprise` binary (or a crate's own binary with the same subcommands).
    pub exe: PathBuf,
    /// The project folder, the tasks' working directory.
    pub root: PathBuf,
    /// The spec, relative to `root` or absolute.
    pub spec: PathBuf,
    pub profile: String,
    pub sets: Vec<String>,
    /// The store as `--cache` takes it (absolute for a local folder).
    pub cache: String,
}

impl TaskCommand {
    /// The command line without the key.
    pub fn argv(&self) -> Vec<String> {
        let mut a = vec![self.exe.display().to_string(), "cell".into(), self.spec.display().to_string(), "--profile".into(), self.profile.clone()];
        for s in &self.sets {
            a.push("--set".into());
            a.push(s.clone());
        }
        a.extend(["--cache".into(), self.cache.clone()]);
        a
    }
}

/// `s` as one word for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script of an array: task `i` computes `keys[i]`.
pub fn batch_script(task: &TaskCommand, keys: &[String]) -> String {
    let argv: Vec<String> = task.argv().iter().map(|a| quote(a)).collect();
    format!("#!/bin/bash\n# reprise: one cell per array task, by key.\nkeys=({})\nexec {} --key \"${{keys[$SLURM_ARRAY_TASK_ID]}}\"\n", keys.join(" "), argv.join(" "))
}

/// The `sbatch` arguments of an array of `tasks` cells; `gpu` when they want a GPU.
pub fn sbatch_args(config: &SlurmConfig, name: &str, log_dir: &Path, root: &Path, tasks: usize, gpu: bool) -> Vec<String> {
    let mut a = vec![
        "--parsable".to_string(),
        format!("--job-name={name}"),
        format!("--array=0-{}", tasks.saturating_sub(1)),
        format!("--output={}/%A_%a.out", log_dir.display()),
        format!("--chdir={}", root.display()),
    ];
    if let Some(p) = &config.partition {
        a.push(format!("--partition={p}"));
    }
    if let Some(t) = &config.time {
        a.push(format!("--time={t}"));
    }
    if gpu && config.gpus_per_cell > 0 {
        a.push(format!("--gres=gpu:{}", config.gpus_per_cell));
    }
    if let Some(c) = config.cpus_per_task {
        a.push(format!("--cpus-per-task={c}"));
    }
    a.extend(config.sbatch_args.iter().cloned());
    a
}

/// Whether a cell asks for a GPU: a training or pretraining cell whose device class is not the
/// CPU. Data cells never do.
pub fn wants_gpu(cell: &Cell) -> bool {
    matches!(cell.kind, CellKind::Train { .. } | CellKind::Pretrain { .. }) && cell.material.device != "cpu"
}

/// Submits a plan's missing cells to SLURM (see the module doc).
#[derive(Debug, Clone)]
pub struct Slurm {
    pub config: SlurmConfig,
    pub task: TaskCommand,
    /// Where the tasks' logs go (`<array id>_<task>.out`); must be on the shared file system.
    pub log_dir: PathBuf,
}

/// One submitted array.
struct Array {
    id: String,
    cells: Vec<usize>,
}

fn run_command(cmd: &mut Command, shown: &str, stdin: Option<&str>) -> Result<String, SlurmError> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| SlurmError::Spawn { command: shown.to_string(), source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|source| SlurmError::Spawn { command: shown.to_string(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| SlurmError::Spawn { command: shown.to_string(), source })?;
    if !out.status.success() {
        let message = format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status);
        return Err(SlurmError::Command { command: shown.to_string(), message });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// SLURM's state and exit code of each task of array `id` still known to the controller
/// (`scontrol show job`; finished jobs are kept for `MinJobAge`, 300 s by default).
fn task_states(id: &str) -> BTreeMap<usize, String> {
    let Ok(text) = run_command(Command::new("scontrol").args(["show", "job", "-o", id]), "scontrol show job", None) else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string);
        if let (Some(task), Some(state)) = (field("ArrayTaskId=").and_then(|t| t.parse().ok()), field("JobState=")) {
            let exit = field("ExitCode=").unwrap_or_default();
            out.insert(task, format!("{state}, exit code {exit}"));
        }
    }
    out
}

/// The last line of a task's log that is not empty, for the message of a failed cell.
fn last_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().map(str::trim).find(|l| !l.is_empty()).map(|l| l.chars().take(500).collect())
}

/// Whether array `id` has tasks pending or running.
fn in_queue(id: &str) -> Result<bool, SlurmError> {
    match run_command(Command::new("squeue").args(["-h", "-j", id, "-o", "%T"]), "squeue", None) {
        Ok(text) => Ok(!text.trim().is_empty()),
        // A job the controller no longer knows has left the queue.
        Err(SlurmError::Command { message, .. }) if message.contains("Invalid job id") => Ok(false),
        Err(e) => Err(e),
    }
}

impl Slurm {
    fn submit(&self, plan: &Plan, cells: &[usize], gpu: bool) -> Result<Array, SlurmError> {
        std::fs::create_dir_all(&self.log_dir).map_err(|source| SlurmError::Io { path: self.log_dir.clone(), source })?;
        let keys: Vec<String> = cells.iter().map(|&i| plan.cells[i].key.clone()).collect();
        let name = format!("reprise-{}", plan.report);
        let args = sbatch_args(&self.config, &name, &self.log_dir, &self.task.root, cells.len(), gpu);
        let out = run_command(Command::new("sbatch").args(&args), "sbatch", Some(&batch_script(&self.task, &keys)))?;
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::Command { command: "sbatch".into(), message: format!("printed `{}`, not a job id", out.trim()) });
        }
        Ok(Array { id, cells: cells.to_vec() })
    }

    /// Wait until every array has left the queue; report each cell as the store confirms it.
    fn wait(&self, plan: &Plan, store: &dyn Store, arrays: &[Array], opts: &ExecOptions, confirmed: &mut [bool], progress: &mut Progress) -> Result<(), ExecError> {
        let poll = Duration::from_secs_f64(self.config.poll_seconds.max(0.05));
        loop {
            let mut queued = false;
            for a in arrays {
                queued |= in_queue(&a.id)?;
            }
            for a in arrays {
                for &i in &a.cells {
                    if !confirmed[i] && store.get_record(&plan.cells[i].key)?.is_some() {
                        confirmed[i] = true;
                        progress.finished(plan, i, "ran", opts);
                    }
                }
            }
            if !queued {
                return Ok(());
            }
            std::thread::sleep(poll);
        }
    }
}

/// Counts ended cells and tells the sink and the terminal.
struct Progress {
    done: usize,
    total: usize,
    shown: bool,
}

impl Progress {
    fn finished(&mut self, plan: &Plan, i: usize, outcome: &'static str, opts: &ExecOptions) {
        self.done += 1;
        opts.emit(&Event::CellFinished { job: 0, cell: &plan.cells[i].name, outcome, done: self.done, cells: self.total });
        if self.shown && outcome != "cached" {
            eprintln!("slurm: {}/{} cells  {outcome}: {}", self.done, self.total, plan.cells[i].name);
        }
    }
}

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn execute(&self, plan: &Plan, store: &dyn Store, opts: &ExecOptions) -> Result<Execution, ExecError> {
        let start = Instant::now();
        let n = plan.cells.len();
        opts.emit(&Event::Started { cells: n, jobs: 0 });
        let mut progress = Progress { done: 0, total: n, shown: opts.progress };
        let mut outcomes: Vec<Option<CellOutcome>> = vec![None; n];
        for (i, cell) in plan.cells.iter().enumerate() {
            if let Some(r) = intact_record(store, &cell.key)? {
                outcomes[i] = Some(CellOutcome::Cached(r));
                progress.finished(plan, i, "cached", opts);
            }
        }
        let usable = |o: &Option<CellOutcome>| o.as_ref().and_then(|o| o.record()).is_some_and(|r| r.status == CellStatus::Ok);
        if opts.cache_only {
            for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                *o = Some(CellOutcome::Failed("not in the cache".into()));
            }
        }
        loop {
            // Cells whose upstream failed fail too, without being submitted.
            for i in 0..n {
                if outcomes[i].is_none() && plan.cells[i].upstream.iter().any(|&u| outcomes[u].is_some() && !usable(&outcomes[u])) {
                    let up: Vec<String> = plan.cells[i].upstream.iter().filter(|&&u| outcomes[u].is_some() && !usable(&outcomes[u])).map(|&u| plan.cells[u].name.clone()).collect();
                    outcomes[i] = Some(CellOutcome::Failed(format!("{UPSTREAM_FAILED}: {}", up.join(", "))));
                    progress.finished(plan, i, "failed", opts);
                }
            }
            let ready: Vec<usize> = (0..n).filter(|&i| outcomes[i].is_none() && plan.cells[i].upstream.iter().all(|&u| usable(&outcomes[u]))).collect();
            if ready.is_empty() {
                break;
            }
            let (gpu, cpu): (Vec<usize>, Vec<usize>) = ready.iter().copied().partition(|&i| wants_gpu(&plan.cells[i]));
            let mut arrays = Vec::new();
            for (cells, wants_gpu) in [(cpu, false), (gpu, true)] {
                if cells.is_empty() {
                    continue;
                }
                let a = self.submit(plan, &cells, wants_gpu)?;
                if opts.progress {
                    eprintln!("slurm: submitted job {} ({} cell(s){}; logs {}/{}_*.out)", a.id, cells.len(), if wants_gpu { ", GPU" } else { "" }, self.log_dir.display(), a.id);
                }
                arrays.push(a);
            }
            let mut confirmed = vec![false; n];
            self.wait(plan, store, &arrays, opts, &mut confirmed, &mut progress)?;
            for a in &arrays {
                let states = task_states(&a.id);
                for (t, &i) in a.cells.iter().enumerate() {
                    // What the store holds decides, re-hashed; SLURM's word only explains a miss.
                    match intact_record(store, &plan.cells[i].key)? {
                        Some(r) => {
                            if !confirmed[i] {
                                progress.finished(plan, i, "ran", opts);
                            }
                            outcomes[i] = Some(CellOutcome::Ran(r));
                        }
                        None => {
                            let state = states.get(&t).cloned().unwrap_or_else(|| "state no longer known to SLURM".into());
                            let log = self.log_dir.join(format!("{}_{t}.out", a.id));
                            let last = last_line(&log).map(|l| format!(" (it ends: {l})")).unwrap_or_default();
                            outcomes[i] = Some(CellOutcome::Failed(format!("SLURM task {}_{t} ({state}) left no record in the store; see its log {}{last}", a.id, log.display())));
                            progress.finished(plan, i, "failed", opts);
                        }
                    }
                }
            }
        }
        opts.emit(&Event::Finished { seconds: start.elapsed().as_secs_f64() });
        let outcomes = outcomes.into_iter().map(|o| o.unwrap_or_else(|| CellOutcome::Failed("not run".into()))).collect();
        Ok(Execution { outcomes, seconds: start.elapsed().as_secs_f64(), corruptions: store.take_corruptions() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskCommand {
        TaskCommand { exe: "/opt/bin/reprise".into(), root: "/p".into(), spec: "reports/it's.toml".into(), profile: "paper".into(), sets: vec!["defaults.epochs=2".into()], cache: "s3://b/x".into() }
    }

    #[test]
    fn the_script_runs_one_cell_per_task_by_key() {
        let s = batch_script(&task(), &["a".repeat(64), "b".repeat(64)]);
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        assert!(s.contains(&format!("keys=({} {})", "a".repeat(64), "b".repeat(64))), "{s}");
        assert!(
            s.contains("exec '/opt/bin/reprise' 'cell' 'reports/it'\\''s.toml' '--profile' 'paper' '--set' 'defaults.epochs=2' '--cache' 's3://b/x' --key \"${keys[$SLURM_ARRAY_TASK_ID]}\""),
            "{s}"
        );
    }

    #[test]
    fn gpu_cells_ask_gres_and_cpu_cells_do_not() {
        let c = SlurmConfig { partition: Some("gpu".into()), time: Some("2:00:00".into()), gpus_per_cell: 2, cpus_per_task: Some(8), sbatch_args: vec!["--qos=long".into()], poll_seconds: 1.0 };
        let gpu = sbatch_args(&c, "reprise-r", Path::new("/p/logs"), Path::new("/p"), 3, true);
        assert_eq!(
            gpu,
            ["--parsable", "--job-name=reprise-r", "--array=0-2", "--output=/p/logs/%A_%a.out", "--chdir=/p", "--partition=gpu", "--time=2:00:00", "--gres=gpu:2", "--cpus-per-task=8", "--qos=long"]
        );
        let cpu = sbatch_args(&c, "reprise-r", Path::new("/p/logs"), Path::new("/p"), 3, false);
        assert!(!cpu.iter().any(|a| a.starts_with("--gres")), "{cpu:?}");
        let none = SlurmConfig { gpus_per_cell: 0, ..c };
        assert!(!sbatch_args(&none, "r", Path::new("/l"), Path::new("/p"), 1, true).iter().any(|a| a.starts_with("--gres")));
    }

    #[test]
    fn settings_come_from_a_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("slurm.toml");
        std::fs::write(&f, "partition = \"cpu\"\ntime = \"10\"\nsbatch_args = [\"--account=ml\"]\n").unwrap();
        let mut c = SlurmConfig::load(Some(&f)).unwrap();
        assert_eq!((c.partition.as_deref(), c.time.as_deref(), c.gpus_per_cell, c.sbatch_args.clone()), (Some("cpu"), Some("10"), 1, vec!["--account=ml".to_string()]));
        let env = BTreeMap::from([("REPRISE_SLURM_PARTITION", "gpu"), ("REPRISE_SLURM_GPUS", "4"), ("REPRISE_SLURM_ARGS", "--qos=x  --mem=8G")]);
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!((c.partition.as_deref(), c.gpus_per_cell, c.sbatch_args.clone()), (Some("gpu"), 4, vec!["--qos=x".to_string(), "--mem=8G".to_string()]));
        let err = c.apply_env(|k| (k == "REPRISE_SLURM_GPUS").then(|| "two".to_string())).unwrap_err();
        assert!(err.to_string().contains("REPRISE_SLURM_GPUS=two"), "{err}");
        std::fs::write(&f, "partiton = \"cpu\"\n").unwrap();
        let err = SlurmConfig::load(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("slurm.toml") && err.contains("partiton") && err.contains("partition"), "{err}");
    }
}
