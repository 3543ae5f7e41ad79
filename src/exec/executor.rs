//! Where missing cells run: an [`Executor`] takes a plan and a store and returns every cell's
//! outcome. [`LocalThreads`] computes them in this process (the default); [`super::Slurm`]
//! submits them to a SLURM cluster as job arrays. Whatever runs them, a cell counts as done only
//! when the store holds its record and outputs, re-hashed.

use super::{execute, ExecError, ExecOptions, Execution};
use crate::cache::Store;
use crate::plan::Plan;

/// Runs the missing cells of a plan against a store.
pub trait Executor {
    /// For messages: `local` or `slurm`.
    fn name(&self) -> &'static str;
    /// Look every cell up in `store` and have the missing ones computed into it; one outcome per
    /// plan cell, in plan order.
    fn execute(&self, plan: &Plan, store: &dyn Store, opts: &ExecOptions) -> Result<Execution, ExecError>;
}

/// Worker threads in this process, `opts.jobs` cells at a time ([`execute`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalThreads;

impl Executor for LocalThreads {
    fn name(&self) -> &'static str {
        "local"
    }

    fn execute(&self, plan: &Plan, store: &dyn Store, opts: &ExecOptions) -> Result<Execution, ExecError> {
        execute(plan, store, opts)
    }
}
