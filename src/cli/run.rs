//! `reprise run` and `reprise render`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::{find_specs, load_spec, open_store, out_dir, shown, SpecOpts, EXIT_FAILED, EXIT_OK};
use crate::artifacts::Lock;
use crate::cache::{LocalStore, Store};

use crate::exec::{self, CellOutcome, ExecOptions, Execution};
use crate::frames::{self, Frames};
use crate::plan::{self, CellKind, Plan};
use crate::render::{self, Rendered};
use crate::spec::Spec;
use crate::methods;

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
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    pub spec: PathBuf,
    #[command(flatten)]
    pub opts: SpecOpts,
}

/// The outcome of one report's run.
pub struct ReportRun {
    pub spec: Spec,
    pub plan: Plan,
    pub exec: Execution,
    pub rendered: Rendered,
    pub frames: Vec<PathBuf>,
    pub out_dir: PathBuf,
}

/// Frames, render and lock for an executed plan.
pub fn finish(spec: Spec, plan: Plan, exec: Execution, store: &LocalStore) -> anyhow::Result<ReportRun> {
    let out = out_dir(&spec);
    let metric_names = methods::metrics(plan.method);
    let collected = frames::collect(&plan, &exec, store, metric_names).context("collecting metrics into frames")?;
    let frame_dir = out.join("frames");
    let frame_files = collected.write(&frame_dir).with_context(|| format!("writing frames to {}", frame_dir.display()))?;
    // Render from the frames as written, exactly as `verify` will.
    let reread = Frames::read(&frame_dir, metric_names).context("reading the frames back")?;
    let rendered = render::render(&spec, &reread, &out).context("rendering the report")?;
    let mut files: Vec<PathBuf> = frame_files.clone();
    files.push(rendered.markdown.clone());
    files.push(rendered.html.clone());
    files.extend(rendered.figures.iter().cloned());
    files.extend(rendered.tables.iter().cloned());
    let lock = Lock::build(&plan, &exec, &spec.profile, &spec.overrides, &out, &files)?;
    lock.write(&out)?;
    let keys: Vec<String> = plan.cells.iter().map(|c| c.key.clone()).collect();
    let objects: Vec<String> = exec::outputs_of(&exec).into_iter().flat_map(|m| m.into_values()).collect();
    store.note_run(&spec.report.id, &keys, &objects)?;
    Ok(ReportRun { spec, plan, exec, rendered, frames: frame_files, out_dir: out })
}

fn report_json(r: &ReportRun) -> serde_json::Value {
    let (planned, cached, ran, failed) = r.exec.count();
    let p = |x: &Path| shown(x);
    json!({
        "report": r.spec.report.id,
        "profile": r.spec.profile,
        "cells": { "planned": planned, "cached": cached, "run": ran, "failed": failed },
        "outputs": {
            "markdown": p(&r.rendered.markdown),
            "html": p(&r.rendered.html),
            "figures": r.rendered.figures.iter().map(|x| p(x)).collect::<Vec<_>>(),
            "tables": r.rendered.tables.iter().map(|x| p(x)).collect::<Vec<_>>(),
            "frames": r.frames.iter().map(|x| p(x)).collect::<Vec<_>>(),
        },
        "claims": r.rendered.claims,
        "failures": failures(r),
        "seconds": r.exec.seconds,
    })
}

fn failures(r: &ReportRun) -> Vec<serde_json::Value> {
    r.plan.cells.iter().zip(&r.exec.outcomes).filter_map(|(c, o)| o.failure().map(|f| json!({"cell": c.name, "key": c.key, "reason": f}))).collect()
}

/// Cells that could not be computed (errors, not recorded results such as a diverged run).
fn errors(r: &ReportRun) -> usize {
    r.exec.outcomes.iter().filter(|o| matches!(o, CellOutcome::Failed(_))).count()
}

fn print_corruptions(exec: &Execution) {
    for c in &exec.corruptions {
        eprintln!("warning: corrupt cache object {} (expected sha256 {}, found {}); it was removed and recomputed", c.path.display(), c.expected, c.actual);
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<i32> {
    let start = Instant::now();
    if args.jobs == Some(0) {
        return Err(super::UsageError("--jobs 0: at least one cell must run at a time (default: one per core)".into()).into());
    }
    let specs = find_specs(&args.specs)?;
    let mut runs = Vec::new();
    // Validate every spec before computing anything.
    let loaded: Vec<Spec> = specs.iter().map(|p| load_spec(p, &args.opts)).collect::<anyhow::Result<_>>()?;
    for spec in loaded {
        let plan = plan::plan(&spec).map_err(|e| super::UsageError(e.to_string()))?;
        let store = open_store(&spec.root, &args.opts)?;
        store.clean_tmp();
        let opts = ExecOptions::with_jobs(args.jobs);
        let exec = exec::execute(&plan, &store, &opts).with_context(|| format!("running {}", spec.path.display()))?;
        print_corruptions(&exec);
        // Bad input data (a missing file, a wrong hash, a malformed file) is the user's to fix
        // (exit 2), and a report rendered without its data would only overwrite the committed
        // one with failures: the report's folder is left as it was.
        let data_errors: Vec<String> = plan
            .cells
            .iter()
            .zip(&exec.outcomes)
            .filter(|(c, o)| matches!(c.kind, CellKind::Dataset { .. }) && matches!(o, CellOutcome::Failed(_)))
            .map(|(c, o)| format!("  {} — {}", c.name, o.failure().unwrap_or_default()))
            .collect();
        if !data_errors.is_empty() {
            return Err(super::UsageError(format!(
                "{}: {} data set(s) could not be loaded, so nothing was rendered and {} is unchanged:\n{}",
                spec.report.id,
                data_errors.len(),
                shown(&out_dir(&spec)),
                data_errors.join("\n")
            ))
            .into());
        }
        let r = finish(spec, plan, exec, &store)?;
        if !args.json {
            let (planned, cached, ran, failed) = r.exec.count();
            eprintln!(
                "{}: {planned} cells ({cached} cached, {ran} run, {failed} failed) in {:.1} s → {}",
                r.spec.report.id,
                r.exec.seconds,
                shown(&r.rendered.markdown)
            );
            // Root causes in full; cells that failed only because an upstream cell did, counted.
            let all = failures(&r);
            let mut downstream = 0;
            for f in &all {
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
        runs.push(r);
    }
    let code = if runs.iter().any(|r| errors(r) > 0) { EXIT_FAILED } else { EXIT_OK };
    if args.json {
        let v = if runs.len() == 1 {
            let mut v = report_json(&runs[0]);
            v["seconds"] = json!(start.elapsed().as_secs_f64());
            v
        } else {
            let sum = |i: usize| runs.iter().map(|r| { let c = r.exec.count(); [c.0, c.1, c.2, c.3][i] }).sum::<usize>();
            json!({
                "cells": { "planned": sum(0), "cached": sum(1), "run": sum(2), "failed": sum(3) },
                "reports": runs.iter().map(report_json).collect::<Vec<_>>(),
                "seconds": start.elapsed().as_secs_f64(),
            })
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(code)
}

/// A report planned and looked up in the cache alone: nothing was computed.
pub struct Cached {
    pub spec: Spec,
    pub plan: Plan,
    pub exec: Execution,
    pub store: LocalStore,
}

/// Cells that a cache-only lookup did not find, each with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{} cell(s) are not in the cache {store}; run `reprise run {spec}{flags}` first:\n{}", cells.len(), cells.join("\n"))]
pub struct MissingCells {
    pub store: String,
    pub spec: String,
    /// The `--profile`, `--set` and `--cache` options that reach the same cells.
    pub flags: String,
    pub cells: Vec<String>,
}

/// Load, plan and look every cell up in the cache without computing any; a missing cell is a
/// [`MissingCells`] error (what `render` and notebooks open reports with).
pub fn from_cache(spec_path: &Path, opts: &SpecOpts) -> anyhow::Result<Cached> {
    let spec = load_spec(spec_path, opts)?;
    let plan = plan::plan(&spec).map_err(|e| super::UsageError(e.to_string()))?;
    let store = open_store(&spec.root, opts)?;
    let exec_opts = ExecOptions { cache_only: true, progress: false, ..ExecOptions::with_jobs(None) };
    let exec = exec::execute(&plan, &store, &exec_opts)?;
    let missing: Vec<String> = plan.cells.iter().zip(&exec.outcomes).filter(|(_, o)| matches!(o, CellOutcome::Failed(_))).map(|(c, o)| format!("  {} ({})", c.name, o.failure().unwrap_or_default())).collect();
    if !missing.is_empty() {
        return Err(MissingCells { store: store.location(), spec: spec_path.display().to_string(), flags: super::repeat_flags(opts), cells: missing }.into());
    }
    Ok(Cached { spec, plan, exec, store })
}

pub fn render_only(args: &RenderArgs) -> anyhow::Result<i32> {
    let c = from_cache(&args.spec, &args.opts)?;
    let r = finish(c.spec, c.plan, c.exec, &c.store)?;
    eprintln!("rendered {}", shown(&r.rendered.markdown));
    Ok(EXIT_OK)
}
