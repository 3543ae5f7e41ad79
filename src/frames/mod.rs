//! Frames: every measured number of a report as polars DataFrames, written as parquet (exact,
//! what re-rendering reads) and CSV (for people and other tools) beside the report.
//!
//! - `results`: one row per run and analysis epoch: experiment, run label, cell key, seed,
//!   status, every resolved parameter, every metric (null where not measured);
//! - `per_class`: one row per run, analysis epoch and class: training count, group, test
//!   accuracy, classifier-row norm;
//! - `objects`: the raw tensors kept per analysis epoch (safetensors in the store), by hash;
//! - `per_task`: one row per run, analysis epoch, set and task (e.g. a few-shot test episode),
//!   and one per class of a task, with every value a method records there (null where absent).
//!   Written only when some run records tasks.
//!
//! Frames are built from cell records only; rendering reads frames only.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::cache::{CellRecord, CellStatus, Store, StoreError};
use crate::exec::{read_output, CellOutcome, Execution};
use crate::fs::write_atomic;
use crate::methods::RunRecord;
use crate::params::{ParamValue, Params};
use crate::plan::Plan;

/// Errors of building, writing or reading frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cell {key}: {message}")]
    Cell { key: String, message: String },
    #[error("frame {path}: {message}")]
    Shape { path: PathBuf, message: String },
    /// A finished cell's metrics could not be read back: the run cannot report it.
    #[error("cell {cell} (key {key}): its metrics.json {detail}")]
    MissingMetrics { cell: String, key: String, detail: String },
}

/// One row of `results`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub experiment: String,
    pub run: String,
    pub key: String,
    pub seed: u64,
    pub status: String,
    pub reason: Option<String>,
    pub epoch: Option<i64>,
    pub params: Params,
    pub metrics: BTreeMap<String, Option<f64>>,
}

/// One row of `per_class`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRow {
    pub experiment: String,
    pub run: String,
    pub key: String,
    pub epoch: i64,
    pub class: i64,
    pub train_count: i64,
    pub group: String,
    pub test_accuracy: Option<f64>,
    pub classifier_norm: f64,
    /// Method-specific per-class values (one column each in the frame).
    pub extra: BTreeMap<String, Option<f64>>,
}

/// One row of `objects`.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRow {
    pub key: String,
    pub epoch: i64,
    pub name: String,
    pub sha256: String,
}

/// One row of `per_task`: a task's values, or (with `class`) one class of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub experiment: String,
    pub run: String,
    pub key: String,
    pub seed: u64,
    pub epoch: i64,
    pub set: String,
    pub task: i64,
    pub class: Option<i64>,
    pub values: BTreeMap<String, Option<f64>>,
}

impl TaskRow {
    /// A value by name (`task` and `class` too); `None` where the row has none.
    pub fn value(&self, name: &str) -> Option<f64> {
        match name {
            "task" => Some(self.task as f64),
            "class" => self.class.map(|c| c as f64),
            other => self.values.get(other).copied().flatten(),
        }
    }
}

/// Everything the renderer needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frames {
    pub results: Vec<ResultRow>,
    pub per_class: Vec<ClassRow>,
    pub objects: Vec<ObjectRow>,
    pub per_task: Vec<TaskRow>,
    /// Names of the parameter columns, sorted.
    pub param_names: Vec<String>,
    pub metric_names: Vec<String>,
}

/// Collect frames from the executed plan's training cells.
pub fn collect(plan: &Plan, exec: &Execution, store: &dyn Store, metric_names: &[&str]) -> Result<Frames, FrameError> {
    let mut f = Frames { metric_names: metric_names.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    // Every parameter of any run: a run that leaves one out (the method does not read it in
    // that configuration) has a null there.
    let param_names: std::collections::BTreeSet<String> = plan.runs.iter().flat_map(|r| r.params.keys().cloned()).collect();
    f.param_names = param_names.into_iter().collect();
    let mut seen_objects = std::collections::BTreeSet::new();
    for run in &plan.runs {
        let cell = &plan.cells[run.cell];
        let outcome = &exec.outcomes[run.cell];
        let base = |status: &str, reason: Option<String>, epoch: Option<i64>, metrics: BTreeMap<String, Option<f64>>| ResultRow {
            experiment: run.experiment.clone(),
            run: run.label.clone(),
            key: cell.key.clone(),
            seed: run.seed,
            status: status.to_string(),
            reason,
            epoch,
            params: run.params.clone(),
            metrics,
        };
        let empty: BTreeMap<String, Option<f64>> = f.metric_names.iter().map(|m| (m.clone(), None)).collect();
        let record = match outcome {
            CellOutcome::Failed(reason) => {
                f.results.push(base("error", Some(reason.clone()), None, empty));
                continue;
            }
            CellOutcome::Cached(r) | CellOutcome::Ran(r) => r,
        };
        let bytes = metrics_of(store, record, &cell.name)?;
        let rr: RunRecord = serde_json::from_slice(&bytes).map_err(|e| FrameError::Cell { key: cell.key.clone(), message: format!("metrics.json: {e}") })?;
        let status = if record.status == CellStatus::Failed { "failed" } else { "ok" };
        if rr.epochs.is_empty() {
            f.results.push(base(status, record.reason.clone(), None, empty.clone()));
        }
        for e in &rr.epochs {
            let metrics = f.metric_names.iter().map(|m| (m.clone(), e.metrics.get(m).copied())).collect();
            f.results.push(base(status, record.reason.clone(), Some(e.epoch as i64), metrics));
            for c in &e.per_class {
                f.per_class.push(ClassRow {
                    experiment: run.experiment.clone(),
                    run: run.label.clone(),
                    key: cell.key.clone(),
                    epoch: e.epoch as i64,
                    class: c.class as i64,
                    train_count: c.train_count as i64,
                    group: c.group.clone(),
                    test_accuracy: c.test_accuracy,
                    classifier_norm: c.classifier_norm,
                    extra: c.extra.iter().map(|(k, v)| (k.clone(), Some(*v))).collect(),
                });
            }
            for t in &e.per_task {
                f.per_task.push(TaskRow {
                    experiment: run.experiment.clone(),
                    run: run.label.clone(),
                    key: cell.key.clone(),
                    seed: run.seed,
                    epoch: e.epoch as i64,
                    set: t.set.clone(),
                    task: t.task as i64,
                    class: t.class.map(|c| c as i64),
                    values: t.values.iter().map(|(k, v)| (k.clone(), Some(*v))).collect(),
                });
            }
            if seen_objects.insert((cell.key.clone(), e.epoch)) {
                if let Some(h) = record.outputs.get(&e.analysis_object) {
                    f.objects.push(ObjectRow { key: cell.key.clone(), epoch: e.epoch as i64, name: e.analysis_object.clone(), sha256: h.clone() });
                }
            }
        }
    }
    Ok(f)
}

/// The `metrics.json` of a finished cell. Its absence is an error naming the cell and the
/// object, never a row marked "error": the cell was reported as done, so a report without its
/// numbers would be wrong without saying so.
fn metrics_of(store: &dyn Store, record: &CellRecord, cell: &str) -> Result<Vec<u8>, FrameError> {
    let missing = |detail: String| FrameError::MissingMetrics { cell: cell.to_string(), key: record.key.clone(), detail };
    let Some(hash) = record.outputs.get("metrics.json") else {
        return Err(missing("is not among the outputs its record lists".into()));
    };
    if let Some(bytes) = read_output(store, record, "metrics.json")? {
        return Ok(bytes);
    }
    let detail = match store.take_corruptions().into_iter().find(|c| &c.expected == hash) {
        Some(c) => format!("is damaged: {c}; it was removed, run again to recompute it"),
        None => format!("(object {hash}) vanished from the store {} after the cell finished; run again to recompute it", store.location()),
    };
    Err(missing(detail))
}

/// A parameter read back from its text: a list of integers is written `[0,1,2]` (no name or
/// choice starts with `[`), anything else is a string.
fn text_param(v: &str) -> ParamValue {
    let list = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|inner| if inner.is_empty() { Some(Vec::new()) } else { inner.split(',').map(|x| x.parse::<i64>().ok()).collect() });
    match list {
        Some(l) => ParamValue::IntList(l),
        None => ParamValue::Str(v.to_string()),
    }
}

/// One parameter's column; a run without the parameter has a null. Integers and floats in one
/// column are floats.
fn param_series(name: &str, values: &[Option<&ParamValue>]) -> Column {
    let col = format!("param_{name}");
    let present = || values.iter().flatten();
    let all = |f: fn(&ParamValue) -> bool| present().all(|v| f(v));
    if all(|v| matches!(v, ParamValue::Int(_))) && present().next().is_some() {
        Column::new(col.into(), values.iter().map(|v| v.and_then(ParamValue::as_i64)).collect::<Vec<_>>())
    } else if all(|v| matches!(v, ParamValue::Int(_) | ParamValue::Float(_))) && present().next().is_some() {
        Column::new(col.into(), values.iter().map(|v| v.and_then(ParamValue::as_f64)).collect::<Vec<_>>())
    } else if all(|v| matches!(v, ParamValue::Bool(_))) && present().next().is_some() {
        Column::new(col.into(), values.iter().map(|v| v.and_then(ParamValue::as_bool)).collect::<Vec<_>>())
    } else {
        Column::new(col.into(), values.iter().map(|v| v.map(ParamValue::canonical)).collect::<Vec<_>>())
    }
}

impl Frames {
    /// The `results` frame.
    pub fn results_frame(&self) -> Result<DataFrame, FrameError> {
        let r = &self.results;
        let mut cols = vec![
            Column::new("experiment".into(), r.iter().map(|x| x.experiment.clone()).collect::<Vec<_>>()),
            Column::new("run".into(), r.iter().map(|x| x.run.clone()).collect::<Vec<_>>()),
            Column::new("key".into(), r.iter().map(|x| x.key.clone()).collect::<Vec<_>>()),
            Column::new("seed".into(), r.iter().map(|x| x.seed as i64).collect::<Vec<_>>()),
            Column::new("status".into(), r.iter().map(|x| x.status.clone()).collect::<Vec<_>>()),
            Column::new("reason".into(), r.iter().map(|x| x.reason.clone()).collect::<Vec<_>>()),
            Column::new("epoch".into(), r.iter().map(|x| x.epoch).collect::<Vec<_>>()),
        ];
        for p in &self.param_names {
            let vals: Vec<Option<&ParamValue>> = r.iter().map(|x| x.params.get(p)).collect();
            cols.push(param_series(p, &vals));
        }
        for m in &self.metric_names {
            cols.push(Column::new(m.as_str().into(), r.iter().map(|x| x.metrics.get(m).copied().flatten()).collect::<Vec<_>>()));
        }
        Ok(DataFrame::new_infer_height(cols)?)
    }

    pub fn per_class_frame(&self) -> Result<DataFrame, FrameError> {
        let r = &self.per_class;
        let extras: std::collections::BTreeSet<&String> = r.iter().flat_map(|x| x.extra.keys()).collect();
        let mut cols = vec![
            Column::new("experiment".into(), r.iter().map(|x| x.experiment.clone()).collect::<Vec<_>>()),
            Column::new("run".into(), r.iter().map(|x| x.run.clone()).collect::<Vec<_>>()),
            Column::new("key".into(), r.iter().map(|x| x.key.clone()).collect::<Vec<_>>()),
            Column::new("epoch".into(), r.iter().map(|x| x.epoch).collect::<Vec<_>>()),
            Column::new("class".into(), r.iter().map(|x| x.class).collect::<Vec<_>>()),
            Column::new("train_count".into(), r.iter().map(|x| x.train_count).collect::<Vec<_>>()),
            Column::new("group".into(), r.iter().map(|x| x.group.clone()).collect::<Vec<_>>()),
            Column::new("test_accuracy".into(), r.iter().map(|x| x.test_accuracy).collect::<Vec<_>>()),
            Column::new("classifier_norm".into(), r.iter().map(|x| x.classifier_norm).collect::<Vec<_>>()),
        ];
        for e in extras {
            cols.push(Column::new(e.as_str().into(), r.iter().map(|x| x.extra.get(e).copied().flatten()).collect::<Vec<_>>()));
        }
        Ok(DataFrame::new_infer_height(cols)?)
    }

    pub fn objects_frame(&self) -> Result<DataFrame, FrameError> {
        let r = &self.objects;
        Ok(DataFrame::new_infer_height(vec![
            Column::new("key".into(), r.iter().map(|x| x.key.clone()).collect::<Vec<_>>()),
            Column::new("epoch".into(), r.iter().map(|x| x.epoch).collect::<Vec<_>>()),
            Column::new("name".into(), r.iter().map(|x| x.name.clone()).collect::<Vec<_>>()),
            Column::new("sha256".into(), r.iter().map(|x| x.sha256.clone()).collect::<Vec<_>>()),
        ])?)
    }

    pub fn per_task_frame(&self) -> Result<DataFrame, FrameError> {
        let r = &self.per_task;
        let names: std::collections::BTreeSet<&String> = r.iter().flat_map(|x| x.values.keys()).collect();
        let mut cols = vec![
            Column::new("experiment".into(), r.iter().map(|x| x.experiment.clone()).collect::<Vec<_>>()),
            Column::new("run".into(), r.iter().map(|x| x.run.clone()).collect::<Vec<_>>()),
            Column::new("key".into(), r.iter().map(|x| x.key.clone()).collect::<Vec<_>>()),
            Column::new("seed".into(), r.iter().map(|x| x.seed as i64).collect::<Vec<_>>()),
            Column::new("epoch".into(), r.iter().map(|x| x.epoch).collect::<Vec<_>>()),
            Column::new("set".into(), r.iter().map(|x| x.set.clone()).collect::<Vec<_>>()),
            Column::new("task".into(), r.iter().map(|x| x.task).collect::<Vec<_>>()),
            Column::new("class".into(), r.iter().map(|x| x.class).collect::<Vec<_>>()),
        ];
        for n in names {
            cols.push(Column::new(n.as_str().into(), r.iter().map(|x| x.values.get(n).copied().flatten()).collect::<Vec<_>>()));
        }
        Ok(DataFrame::new_infer_height(cols)?)
    }

    /// The names of the frames these frames write: `per_task` only when some run recorded tasks.
    pub fn names(&self) -> Vec<&'static str> {
        let mut n = vec!["results", "per_class", "objects"];
        if !self.per_task.is_empty() {
            n.push("per_task");
        }
        n
    }

    fn frame(&self, name: &str) -> Result<DataFrame, FrameError> {
        match name {
            "results" => self.results_frame(),
            "per_class" => self.per_class_frame(),
            "objects" => self.objects_frame(),
            _ => self.per_task_frame(),
        }
    }

    /// Write the frames ([`Frames::names`]) as parquet and CSV into `dir`; returns the paths
    /// written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, FrameError> {
        std::fs::create_dir_all(dir).map_err(|source| FrameError::Io { path: dir.to_path_buf(), source })?;
        let mut out = Vec::new();
        for name in self.names() {
            let mut df = self.frame(name)?;
            let pq = dir.join(format!("{name}.parquet"));
            let mut buf = Vec::new();
            ParquetWriter::new(&mut buf).finish(&mut df)?;
            write_atomic(&pq, &buf).map_err(|source| FrameError::Io { path: pq.clone(), source })?;
            out.push(pq);
            let csv = dir.join(format!("{name}.csv"));
            let mut buf = Vec::new();
            CsvWriter::new(&mut buf).include_header(true).finish(&mut df)?;
            write_atomic(&csv, &buf).map_err(|source| FrameError::Io { path: csv.clone(), source })?;
            out.push(csv);
        }
        Ok(out)
    }

    /// Read frames back from the parquet files in `dir` (what re-rendering uses).
    pub fn read(dir: &Path, metric_names: &[&str]) -> Result<Frames, FrameError> {
        let read = |name: &str| -> Result<DataFrame, FrameError> {
            let p = dir.join(format!("{name}.parquet"));
            let file = File::open(&p).map_err(|source| FrameError::Io { path: p.clone(), source })?;
            // polars can panic on a damaged footer; a tampered frame must be an error.
            std::panic::catch_unwind(|| ParquetReader::new(file).finish()).map_err(|_| FrameError::Shape { path: p.clone(), message: "malformed Parquet file".into() })?.map_err(FrameError::from)
        };
        // A report whose runs record no tasks has no `per_task` frame.
        let tasks = if dir.join("per_task.parquet").exists() { Some(read("per_task")?) } else { None };
        Frames::from_dataframes(&read("results")?, &read("per_class")?, &read("objects")?, tasks.as_ref(), metric_names, &dir.join("results.parquet"))
    }

    /// These frames as reading them back from their files gives them (parameter columns
    /// keep one type each, for instance), without writing files: what a report renders from.
    pub fn round_trip(&self) -> Result<Frames, FrameError> {
        let names: Vec<&str> = self.metric_names.iter().map(String::as_str).collect();
        let tasks = if self.per_task.is_empty() { None } else { Some(self.per_task_frame()?) };
        Frames::from_dataframes(&self.results_frame()?, &self.per_class_frame()?, &self.objects_frame()?, tasks.as_ref(), &names, Path::new("results (in memory)"))
    }

    /// Frames from the DataFrames; `path` names the results frame in errors.
    fn from_dataframes(res: &DataFrame, pc: &DataFrame, ob: &DataFrame, pt: Option<&DataFrame>, metric_names: &[&str], path: &Path) -> Result<Frames, FrameError> {
        let p = path.to_path_buf();
        let shape = |m: String| FrameError::Shape { path: p.clone(), message: m };
        let strs = |df: &DataFrame, c: &str| -> Result<Vec<Option<String>>, FrameError> { Ok(df.column(c)?.str()?.iter().map(|o| o.map(String::from)).collect()) };
        let ints = |df: &DataFrame, c: &str| -> Result<Vec<Option<i64>>, FrameError> { Ok(df.column(c)?.i64()?.iter().collect()) };
        let floats = |df: &DataFrame, c: &str| -> Result<Vec<Option<f64>>, FrameError> { Ok(df.column(c)?.f64()?.iter().collect()) };

        let mut frames = Frames { metric_names: metric_names.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        let n = res.height();
        let (exp, run, key, status, reason) = (strs(res, "experiment")?, strs(res, "run")?, strs(res, "key")?, strs(res, "status")?, strs(res, "reason")?);
        let (seed, epoch) = (ints(res, "seed")?, ints(res, "epoch")?);
        let mut params: Vec<Params> = vec![Params::new(); n];
        for col in res.columns() {
            let Some(pname) = col.name().as_str().strip_prefix("param_") else { continue };
            frames.param_names.push(pname.to_string());
            match col.dtype() {
                DataType::Float64 => {
                    for (i, v) in col.f64()?.iter().enumerate() {
                        if let Some(v) = v {
                            params[i].insert(pname.to_string(), ParamValue::Float(v));
                        }
                    }
                }
                DataType::Int64 => {
                    for (i, v) in col.i64()?.iter().enumerate() {
                        if let Some(v) = v {
                            params[i].insert(pname.to_string(), ParamValue::Int(v));
                        }
                    }
                }
                DataType::Boolean => {
                    for (i, v) in col.bool()?.iter().enumerate() {
                        if let Some(v) = v {
                            params[i].insert(pname.to_string(), ParamValue::Bool(v));
                        }
                    }
                }
                _ => {
                    for (i, v) in col.str()?.iter().enumerate() {
                        if let Some(v) = v {
                            params[i].insert(pname.to_string(), text_param(v));
                        }
                    }
                }
            }
        }
        let mut metric_cols = BTreeMap::new();
        for m in &frames.metric_names {
            metric_cols.insert(m.clone(), floats(res, m)?);
        }
        for i in 0..n {
            let get = |v: &Vec<Option<String>>, what: &str| v[i].clone().ok_or_else(|| shape(format!("row {i}: `{what}` is null")));
            frames.results.push(ResultRow {
                experiment: get(&exp, "experiment")?,
                run: get(&run, "run")?,
                key: get(&key, "key")?,
                seed: seed[i].unwrap_or(0).max(0) as u64,
                status: get(&status, "status")?,
                reason: reason[i].clone(),
                epoch: epoch[i],
                params: std::mem::take(&mut params[i]),
                metrics: metric_cols.iter().map(|(m, v)| (m.clone(), v[i])).collect(),
            });
        }
        let (e, r, k, g) = (strs(pc, "experiment")?, strs(pc, "run")?, strs(pc, "key")?, strs(pc, "group")?);
        let (ep, cl, tc) = (ints(pc, "epoch")?, ints(pc, "class")?, ints(pc, "train_count")?);
        let (ta, cn) = (floats(pc, "test_accuracy")?, floats(pc, "classifier_norm")?);
        const FIXED: [&str; 9] = ["experiment", "run", "key", "epoch", "class", "train_count", "group", "test_accuracy", "classifier_norm"];
        let mut extra_cols = Vec::new();
        for col in pc.columns() {
            if !FIXED.contains(&col.name().as_str()) {
                extra_cols.push((col.name().to_string(), floats(pc, col.name().as_str())?));
            }
        }
        for i in 0..pc.height() {
            frames.per_class.push(ClassRow {
                experiment: e[i].clone().unwrap_or_default(),
                run: r[i].clone().unwrap_or_default(),
                key: k[i].clone().unwrap_or_default(),
                epoch: ep[i].unwrap_or(0),
                class: cl[i].unwrap_or(0),
                train_count: tc[i].unwrap_or(0),
                group: g[i].clone().unwrap_or_default(),
                test_accuracy: ta[i],
                classifier_norm: cn[i].unwrap_or(f64::NAN),
                extra: extra_cols.iter().map(|(k, v)| (k.clone(), v[i])).collect(),
            });
        }
        let (k, nm, h) = (strs(ob, "key")?, strs(ob, "name")?, strs(ob, "sha256")?);
        let ep = ints(ob, "epoch")?;
        for i in 0..ob.height() {
            frames.objects.push(ObjectRow { key: k[i].clone().unwrap_or_default(), epoch: ep[i].unwrap_or(0), name: nm[i].clone().unwrap_or_default(), sha256: h[i].clone().unwrap_or_default() });
        }
        if let Some(pt) = pt {
            let (e, r, k, st) = (strs(pt, "experiment")?, strs(pt, "run")?, strs(pt, "key")?, strs(pt, "set")?);
            let (sd, ep, tk, cl) = (ints(pt, "seed")?, ints(pt, "epoch")?, ints(pt, "task")?, ints(pt, "class")?);
            const FIXED: [&str; 8] = ["experiment", "run", "key", "seed", "epoch", "set", "task", "class"];
            let mut value_cols = Vec::new();
            for col in pt.columns() {
                if !FIXED.contains(&col.name().as_str()) {
                    value_cols.push((col.name().to_string(), floats(pt, col.name().as_str())?));
                }
            }
            for i in 0..pt.height() {
                frames.per_task.push(TaskRow {
                    experiment: e[i].clone().unwrap_or_default(),
                    run: r[i].clone().unwrap_or_default(),
                    key: k[i].clone().unwrap_or_default(),
                    seed: sd[i].unwrap_or(0).max(0) as u64,
                    epoch: ep[i].unwrap_or(0),
                    set: st[i].clone().unwrap_or_default(),
                    task: tk[i].unwrap_or(0),
                    class: cl[i],
                    // A row has the values it recorded; a null is a value of other rows only.
                    values: value_cols.iter().filter_map(|(k, v)| v[i].map(|x| (k.clone(), Some(x)))).collect(),
                });
            }
        }
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Corruption, LocalStore};
    use crate::plan::{Cell, CellKind, KeyMaterial, PlannedRun};

    fn supervised() -> crate::methods::MethodRef {
        crate::methods::Registry::builtin().get("supervised").unwrap()
    }

    /// A plan of one training cell whose record names `metrics` as its `metrics.json`.
    fn one_cell(metrics: &str) -> (Plan, Execution) {
        let key = "e".repeat(64);
        let material = KeyMaterial { kind: "train:supervised".into(), version: 1, params: BTreeMap::new(), upstream: vec![], seed: Some(0), dtype: "f32".into(), device: "cpu".into() };
        let cell = Cell {
            key: key.clone(),
            name: "train/imb/imbalance=1.0 seed=0".into(),
            aliases: vec![],
            kind: CellKind::Train { method: supervised(), params: Params::new(), seed: 0 },
            material,
            upstream: vec![],
        };
        let run = PlannedRun { experiment: "imb".into(), label: "imbalance=1.0".into(), point: Params::new(), params: Params::new(), seed: 0, cell: 0 };
        let plan = Plan { report: "tiny".into(), root: PathBuf::from("."), method: supervised(), cells: vec![cell], runs: vec![run] };
        let record = CellRecord { key, kind: "train".into(), status: CellStatus::Ok, reason: None, outputs: BTreeMap::from([("metrics.json".to_string(), metrics.to_string())]), seconds: 1.0 };
        let exec = Execution { outcomes: vec![CellOutcome::Ran(record)], seconds: 1.0, corruptions: Vec::<Corruption>::new() };
        (plan, exec)
    }

    #[test]
    fn issue20_metrics_missing_at_collection_is_an_error_naming_the_cell_and_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        // The object was there when the cell finished; something removed it since.
        let hash = store.put(b"{\"epochs\": []}").unwrap();
        store.remove_object(&hash).unwrap();
        let (plan, exec) = one_cell(&hash);
        let err = collect(&plan, &exec, &store, &["accuracy"]).expect_err("a missing metrics file is an error");
        let text = err.to_string();
        assert!(matches!(err, FrameError::MissingMetrics { .. }), "{text}");
        assert!(text.contains("train/imb/imbalance=1.0 seed=0") && text.contains(&hash) && text.contains("metrics.json"), "{text}");
    }

    #[test]
    fn issue20_corrupt_metrics_at_collection_is_an_error_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let hash = store.put(b"{\"epochs\": []}").unwrap();
        std::fs::write(store.object_path(&hash), b"{\"epochs\": [1]}").unwrap();
        let (plan, exec) = one_cell(&hash);
        let text = collect(&plan, &exec, &store, &["accuracy"]).expect_err("corrupt metrics are an error").to_string();
        assert!(text.contains("is damaged: corrupt cache object") && text.contains(&hash), "{text}");
    }

    #[test]
    fn intact_metrics_make_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let rr = serde_json::to_vec(&RunRecord { epochs: vec![], train_counts: vec![], failure: None }).unwrap();
        let hash = store.put(&rr).unwrap();
        let (plan, exec) = one_cell(&hash);
        let f = collect(&plan, &exec, &store, &["accuracy"]).unwrap();
        assert_eq!(f.results.len(), 1);
        assert_eq!(f.results[0].status, "ok");
    }

    #[test]
    fn a_parameter_that_some_runs_leave_out_is_a_column_with_nulls_there() {
        let row = |run: &str, params: Params| ResultRow {
            experiment: "opt".into(),
            run: run.into(),
            key: "k".into(),
            seed: 0,
            status: "ok".into(),
            reason: None,
            epoch: Some(1),
            params,
            metrics: BTreeMap::from([("accuracy".to_string(), Some(50.0))]),
        };
        let sgd = Params::from([("optimizer".to_string(), ParamValue::Str("sgd".into())), ("momentum".to_string(), ParamValue::Float(0.9)), ("classes".to_string(), ParamValue::IntList(vec![3, 1]))]);
        let adam = Params::from([("optimizer".to_string(), ParamValue::Str("adam".into()))]);
        let frames = Frames {
            results: vec![row("adam", adam.clone()), row("sgd", sgd.clone())],
            param_names: vec!["classes".into(), "momentum".into(), "optimizer".into()],
            metric_names: vec!["accuracy".into()],
            ..Default::default()
        };
        let df = frames.results_frame().unwrap();
        let momentum: Vec<Option<f64>> = df.column("param_momentum").unwrap().f64().unwrap().iter().collect();
        assert_eq!(momentum, vec![None, Some(0.9)]);
        // Read back, each run has exactly its own parameters.
        let back = frames.round_trip().unwrap();
        assert_eq!(back.results[0].params, adam);
        assert_eq!(back.results[1].params, sgd);
    }
}
