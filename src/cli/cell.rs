//! `reprise cell SPEC --key KEY` (hidden): compute one cell of a plan into the store, what each
//! task of `run --executor slurm` runs. Its upstream cells must already be in the store. Exit 0
//! when the store holds the cell's record afterwards (a recorded failure, such as a diverged
//! run, included), 1 otherwise; the driver trusts the store, not this code.

use std::path::PathBuf;

use clap::Args;

use super::{SpecOpts, EXIT_FAILED, EXIT_OK};
use crate::driver::{self, Project};
use crate::exec::CellOutcome;

#[derive(Args, Debug)]
pub struct CellArgs {
    pub spec: PathBuf,
    #[command(flatten)]
    pub opts: SpecOpts,
    /// The cell's key (64 hex digits).
    #[arg(long)]
    pub key: String,
}

/// Threads for the cell: the CPUs SLURM gave the task, else every core.
fn threads() -> usize {
    let given = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|v| v.parse::<usize>().ok());
    given.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

pub fn cell(args: &CellArgs, project: &Project) -> anyhow::Result<i32> {
    let (name, outcome) = driver::compute_cell(project, &args.spec, &args.opts.options(), &args.key, threads())?;
    match outcome {
        CellOutcome::Cached(_) => eprintln!("{name}: already in the store"),
        CellOutcome::Ran(r) => eprintln!("{name}: computed in {:.1} s", r.seconds),
        CellOutcome::Failed(reason) => {
            eprintln!("{name}: failed: {reason}");
            return Ok(EXIT_FAILED);
        }
    }
    Ok(EXIT_OK)
}
