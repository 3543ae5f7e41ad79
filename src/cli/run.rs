//! `reprise run` and `reprise render`: thin callers of the library's driver
//! ([`crate::driver::Report`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;

use super::{find_specs, load_spec, shown, SpecOpts, UsageError, EXIT_FAILED, EXIT_OK};
use crate::cache::Location;
use crate::driver::{Project, Report, Written};
use crate::exec::{self, CellOutcome, ExecOptions, Execution, Executor, LocalThreads, Slurm, SlurmConfig, TaskCommand};
use crate::spec::Spec;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Spec files (default: every reports/*.toml).
    pub specs: Vec<PathBuf>,
    #[command(flatten)]
    pub opts: SpecOpts,
    /// Cells computed at once (default: the number of cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print one JSON object with cell counts, output paths and seconds.
    #[arg(long)]
    pub json: bool,
    /// Where missing cells run: `local` threads, or `slurm` job arrays on a cluster (each task
    /// computes one cell into the shared store; see the README's cluster section).
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    #[command(flatten)]
    pub slurm: SlurmArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

/// `--executor slurm` settings; each overrides the settings file and the `REPRISE_SLURM_*`
/// variables.
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "SLURM (with --executor slurm)")]
pub struct SlurmArgs {
    /// A TOML file of settings: partition, time, gpus_per_cell, cpus_per_task, sbatch_args,
    /// poll_seconds.
    #[arg(long, value_name = "FILE")]
    pub slurm_config: Option<PathBuf>,
    /// `--partition` of every job.
    #[arg(long)]
    pub partition: Option<String>,
    /// `--time` of every job, SLURM's format (e.g. 2:00:00).
    #[arg(long, value_name = "LIMIT")]
    pub time: Option<String>,
    /// GPUs a cell that wants one asks for (`--gres=gpu:N`; default 1, 0 for none).
    #[arg(long, value_name = "N")]
    pub gpus_per_cell: Option<u32>,
    /// A further `sbatch` argument (repeatable), e.g. `--sbatch-arg=--account=ml`.
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
}

impl SlurmArgs {
    /// The settings: file, then environment, then these options.
    fn config(&self) -> anyhow::Result<SlurmConfig> {
        let mut c = SlurmConfig::load(self.slurm_config.as_deref()).map_err(|e| UsageError(e.to_string()))?;
        if let Some(p) = &self.partition {
            c.partition = Some(p.clone());
        }
        if let Some(t) = &self.time {
            c.time = Some(t.clone());
        }
        if let Some(g) = self.gpus_per_cell {
            c.gpus_per_cell = g;
        }
        c.sbatch_args.extend(self.sbatch_args.iter().cloned());
        Ok(c)
    }
}

/// The SLURM executor for `spec`: tasks run this binary in the project folder against the
/// same store, named so that every node finds it (absolute paths).
fn slurm_for(spec: &Spec, opts: &crate::driver::Options, config: SlurmConfig) -> anyhow::Result<Slurm> {
    let here = |p: &Path| if p.as_os_str().is_empty() { Path::new(".").to_path_buf() } else { p.to_path_buf() };
    let root = std::path::absolute(here(&spec.root)).with_context(|| format!("resolving {}", spec.root.display()))?;
    let cache = match Project::at(&spec.root).store_location(opts.cache.as_deref())? {
        Location::Local(dir) => std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))?.display().to_string(),
        Location::S3(url) => url.to_string(),
    };
    let exe = std::env::current_exe().context("finding this program, which the tasks run")?;
    let task = TaskCommand { exe, root: root.clone(), spec: PathBuf::from(spec.rel_path()), profile: spec.profile.clone(), sets: opts.sets.clone(), cache };
    Ok(Slurm { config, task, log_dir: root.join("artifacts").join(".slurm").join(&spec.report.id) })
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    pub spec: PathBuf,
    #[command(flatten)]
    pub opts: SpecOpts,
}

/// A report executed and written.
struct ReportRun {
    report: Report,
    written: Written,
}

fn report_json(r: &ReportRun) -> serde_json::Value {
    let c = r.report.exec.count();
    let p = |x: &Path| shown(x);
    let w = &r.written;
    json!({
        "report": r.report.spec.report.id,
        "profile": r.report.spec.profile,
        "cells": { "planned": c.planned, "cached": c.cached, "run": c.ran, "failed": c.failed },
        "outputs": {
            "markdown": p(&w.rendered.markdown),
            "html": p(&w.rendered.html),
            "figures": w.rendered.figures.iter().map(|x| p(x)).collect::<Vec<_>>(),
            "tables": w.rendered.tables.iter().map(|x| p(x)).collect::<Vec<_>>(),
            "frames": w.frames.iter().map(|x| p(x)).collect::<Vec<_>>(),
        },
        "claims": w.rendered.claims,
        "failures": failures(&r.report),
        "seconds": r.report.exec.seconds,
    })
}

fn failures(r: &Report) -> Vec<serde_json::Value> {
    r.plan.cells.iter().zip(&r.exec.outcomes).filter_map(|(c, o)| o.failure().map(|f| json!({"cell": c.name, "key": c.key, "reason": f}))).collect()
}

/// Cells that could not be computed (errors, not recorded results such as a diverged run).
fn errors(exec: &Execution) -> usize {
    exec.outcomes.iter().filter(|o| matches!(o, CellOutcome::Failed(_))).count()
}

/// One line per report, and the root causes of its failures in full.
fn print_summary(r: &ReportRun) {
    let c = r.report.exec.count();
    eprintln!("{}: {} cells ({} cached, {} run, {} failed) in {:.1} s → {}", r.report.spec.report.id, c.planned, c.cached, c.ran, c.failed, r.report.exec.seconds, shown(&r.written.rendered.markdown));
    // Cells that failed only because an upstream cell did are counted, not listed.
    let mut downstream = 0;
    for f in &failures(&r.report) {
        let reason = f["reason"].as_str().unwrap_or("");
        if reason.starts_with(exec::UPSTREAM_FAILED) {
            downstream += 1;
        } else {
            eprintln!("  failed: {} — {reason}", f["cell"].as_str().unwrap_or(""));
        }
    }
    if downstream > 0 {
        eprintln!("  ({downstream} more cell(s) not run because an upstream cell failed)");
    }
}

pub fn run(args: &RunArgs, project: &Project) -> anyhow::Result<i32> {
    let start = Instant::now();
    if args.jobs == Some(0) {
        return Err(UsageError("--jobs 0: at least one cell must run at a time (default: one per core)".into()).into());
    }
    let specs = find_specs(&args.specs, project)?;
    let opts = args.opts.options();
    // Every spec and its template are checked before anything is computed.
    let loaded: Vec<Spec> = specs.iter().map(|p| load_spec(p, &args.opts, project)).collect::<anyhow::Result<_>>()?;
    let slurm_config = match args.executor {
        ExecutorKind::Slurm => Some(args.slurm.config()?),
        ExecutorKind::Local => None,
    };
    let mut runs = Vec::new();
    for spec in loaded {
        let path = spec.path.clone();
        let executor: Box<dyn Executor> = match &slurm_config {
            Some(c) => Box::new(slurm_for(&spec, &opts, c.clone())?),
            None => Box::new(LocalThreads),
        };
        let report = Report::execute_with(spec, &opts, &ExecOptions::with_jobs(args.jobs), executor.as_ref()).with_context(|| format!("running {}", path.display()))?;
        report.exec.print_corruptions(true);
        // Bad input data (a missing file, a wrong hash, a malformed file) is the user's to fix
        // (exit 2), and a report rendered without its data would only overwrite the committed
        // one with failures: the report's folder is left as it was.
        let data_errors = report.data_errors();
        if !data_errors.is_empty() {
            return Err(UsageError(format!(
                "{}: {} data set(s) could not be loaded, so nothing was rendered and {} is unchanged:\n  {}",
                report.spec.report.id,
                data_errors.len(),
                shown(&report.out_dir()),
                data_errors.join("\n  ")
            ))
            .into());
        }
        let written = report.write().with_context(|| format!("writing the report of {}", path.display()))?;
        let r = ReportRun { report, written };
        if !args.json {
            print_summary(&r);
        }
        runs.push(r);
    }
    let code = if runs.iter().any(|r| errors(&r.report.exec) > 0) { EXIT_FAILED } else { EXIT_OK };
    if args.json {
        let v = if runs.len() == 1 {
            let mut v = report_json(&runs[0]);
            v["seconds"] = json!(start.elapsed().as_secs_f64());
            v
        } else {
            let counts: Vec<_> = runs.iter().map(|r| r.report.exec.count()).collect();
            json!({
                "cells": {
                    "planned": counts.iter().map(|c| c.planned).sum::<usize>(),
                    "cached": counts.iter().map(|c| c.cached).sum::<usize>(),
                    "run": counts.iter().map(|c| c.ran).sum::<usize>(),
                    "failed": counts.iter().map(|c| c.failed).sum::<usize>(),
                },
                "reports": runs.iter().map(report_json).collect::<Vec<_>>(),
                "seconds": start.elapsed().as_secs_f64(),
            })
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(code)
}

pub fn render_only(args: &RenderArgs, project: &Project) -> anyhow::Result<i32> {
    let report = Report::open_cached_in(project, &args.spec, &args.opts.options())?;
    let written = report.write()?;
    eprintln!("rendered {}", shown(&written.rendered.markdown));
    Ok(EXIT_OK)
}
