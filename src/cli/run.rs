//! `reprise run` and `reprise render`: thin callers of the library's driver
//! ([`crate::driver::Report`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::{find_specs, load_spec, shown, SpecOpts, UsageError, EXIT_FAILED, EXIT_OK};
use crate::driver::{Project, Report, Written};
use crate::exec::{self, CellOutcome, ExecOptions, Execution};
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
    let mut runs = Vec::new();
    for spec in loaded {
        let path = spec.path.clone();
        let report = Report::execute(spec, &opts, &ExecOptions::with_jobs(args.jobs)).with_context(|| format!("running {}", path.display()))?;
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
