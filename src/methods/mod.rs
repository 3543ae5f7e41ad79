//! Methods: the papers' algorithms, each one module behind [`Method`].
//!
//! A method declares its parameters (a schema the spec layer validates against), the metrics
//! it records, and how to train one run. The executor only ever calls through the trait, so a
//! new paper's algorithm is a new module and one line in [`get`].

pub mod supervised;

use std::collections::BTreeMap;

use crate::data::ImageSet;
use crate::params::{ParamDef, Params};

/// Names of the known methods.
pub const NAMES: &[&str] = &["supervised"];

/// The data a training cell receives from its upstream cells.
pub struct TrainInputs<'a> {
    pub data: &'a ImageSet,
    /// Indices of the (long-tailed) training subset.
    pub train: &'a [usize],
    /// Indices of the balanced test set.
    pub test: &'a [usize],
}

/// Progress reports from inside a cell (epochs), shown by the executor's progress bars.
pub trait Progress: Sync {
    fn epoch(&self, done: usize, total: usize, note: &str);
}

/// A progress sink that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn epoch(&self, _: usize, _: usize, _: &str) {}
}

/// What a finished training cell produced.
pub enum Outcome {
    /// Named output objects (e.g. `metrics.json`, `analysis/e010.safetensors`).
    Done(BTreeMap<String, Vec<u8>>),
    /// The run finished but its result is a failure inherent to the configuration (e.g. the
    /// loss diverged): recorded and cached like a result, shown as failed in the report.
    /// `objects` holds whatever was measured before the failure.
    Failed { reason: String, objects: BTreeMap<String, Vec<u8>> },
}

/// Errors that stop a cell without a recordable result (a bug, a resource problem).
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Invalid(String),
}

/// One paper's algorithm.
pub trait Method: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever a change alters results; part of every training cell's key.
    fn version(&self) -> u32;
    fn schema(&self) -> &'static [ParamDef];
    /// Metric columns this method records per analysis epoch.
    fn metrics(&self) -> &'static [&'static str];
    /// Cross-parameter checks: Err((parameter, message, hint)).
    fn check_run(&self, params: &Params) -> Result<(), (String, String, Option<String>)>;
    /// Parameters that only shape the upstream data cells, left out of the training key.
    fn data_params(&self) -> &'static [&'static str];
    /// Train and analyse one run.
    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError>;
}

/// The method called `name`.
pub fn get(name: &str) -> Option<&'static dyn Method> {
    match name {
        "supervised" => Some(&supervised::Supervised),
        _ => None,
    }
}

pub fn schema(name: &str) -> Option<&'static [ParamDef]> {
    get(name).map(|m| m.schema())
}

pub fn metrics(name: &str) -> &'static [&'static str] {
    get(name).map_or(&[], |m| m.metrics())
}

pub fn check_run(name: &str, params: &Params) -> Result<(), (String, String, Option<String>)> {
    match get(name) {
        Some(m) => m.check_run(params),
        None => Ok(()),
    }
}
