//! The plan: a report's cells, their dependencies and their content keys.
//!
//! A cell is a pure function of its inputs. Its key is the sha256 of the canonical JSON of a
//! [`KeyMaterial`]: the cell kind, the version of the code that computes it, its resolved
//! parameters (sorted; floats in canonical text), the keys of its upstream cells (a Merkle
//! chain), its seed, dtype and device class. Nothing else goes in: no paths, no mtimes, no
//! map iteration order, no debug strings. So comments, formatting, key order of the spec, the
//! project's directory and the working directory never change a key, and a changed parameter
//! changes exactly the keys downstream of it.
//!
//! Cells that come out with the same key (the same run used by two experiments) are planned
//! once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::sha256_hex;
use crate::data::{DataError, Manifest};
use crate::methods::{Derive, InputDecl, MethodRef, Pretraining};
use crate::params::Params;
use crate::spec::Spec;

/// Versions of the data cells' code; bump when their output changes.
pub const DATASET_VERSION: u32 = 2;
pub const SPLIT_VERSION: u32 = 1;
pub const SUBSET_VERSION: u32 = 1;
/// Version of the derivation steps other than the long-tailed subset (caps, relabelling, class
/// selection, rotation, resizing).
pub const DERIVE_VERSION: u32 = 1;

/// Everything that determines a cell's output, serialised canonically for its key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyMaterial {
    pub kind: String,
    pub version: u32,
    /// Parameter → canonical text, sorted.
    pub params: BTreeMap<String, String>,
    /// Keys of the upstream cells, in a fixed order per kind.
    pub upstream: Vec<String>,
    pub seed: Option<u64>,
    pub dtype: String,
    pub device: String,
}

impl KeyMaterial {
    /// The key: sha256 of the canonical JSON (struct fields in declaration order, maps sorted).
    pub fn key(&self) -> String {
        // Serialising plain strings, integers and sorted maps cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        sha256_hex(&bytes)
    }
}

/// What a cell computes.
#[derive(Debug, Clone)]
pub enum CellKind {
    /// Load and verify a data set from its manifest.
    Dataset { manifest: Box<Manifest>, root: PathBuf, classes: Option<usize> },
    /// Split into a training pool and a balanced test set. Upstream: dataset.
    Split { test_per_class: usize, seed: u64 },
    /// One derivation step of an input ([`Derive`]; a long-tailed subset is `subset`).
    /// Upstream: the dataset, its split and the input's steps before this one.
    Derive { step: Derive },
    /// A method's pretraining (e.g. a backbone on a balanced source task). Upstream: dataset,
    /// split of the source data.
    Pretrain { method: MethodRef, pretraining: Pretraining },
    /// One training run of a method. Upstream: the cells of each declared input (dataset,
    /// split, derived cell), then the pretraining cell when the method has one.
    Train { method: MethodRef, params: Params, seed: u64 },
}

impl CellKind {
    pub fn name(&self) -> &'static str {
        match self {
            CellKind::Dataset { .. } => "dataset",
            CellKind::Split { .. } => "split",
            CellKind::Derive { step } => step.kind(),
            CellKind::Pretrain { .. } => "pretrain",
            CellKind::Train { .. } => "train",
        }
    }
}

/// One cell of the plan.
#[derive(Debug, Clone)]
pub struct Cell {
    pub key: String,
    /// A readable name, e.g. `train/exp2/imbalance=0.1 seed=0` (the first use, if several).
    pub name: String,
    /// Every readable name this cell serves.
    pub aliases: Vec<String>,
    pub kind: CellKind,
    pub material: KeyMaterial,
    /// Indices of upstream cells in `Plan::cells`.
    pub upstream: Vec<usize>,
}

/// One run of an experiment, pointing at its training cell.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub experiment: String,
    pub label: String,
    pub point: Params,
    pub params: Params,
    pub seed: u64,
    pub cell: usize,
}

/// The cells of one report, upstream before downstream.
#[derive(Debug, Clone)]
pub struct Plan {
    pub report: String,
    /// The project root (never part of a key).
    pub root: PathBuf,
    /// The method of every training cell, resolved when the spec was loaded.
    pub method: MethodRef,
    pub cells: Vec<Cell>,
    pub runs: Vec<PlannedRun>,
}

/// Errors of planning (data manifests, declared inputs).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("data set `{name}`: {source}")]
    Data { name: String, source: DataError },
    #[error("unknown method `{0}`")]
    Method(String),
    /// The method could not declare a run's inputs (e.g. a parameter missing from its schema).
    #[error("{run}: the method's inputs: {message}")]
    Inputs { run: String, message: String },
    /// The method could not say what a run's pretraining is (e.g. an unreadable weights manifest).
    #[error("{run}: its pretraining: {message}")]
    Pretraining { run: String, message: String },
    /// A run's input names a data set the spec does not declare.
    #[error("{run}: input `{input}` needs data set `{dataset}`, which the spec does not declare under [data]; {hint}")]
    UndeclaredData { run: String, input: String, dataset: String, hint: String },
}

impl Plan {
    pub fn cell_by_name(&self, name: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.name == name || c.aliases.iter().any(|a| a == name) || c.key.starts_with(name) && name.len() >= 8)
    }
}

struct Builder {
    cells: Vec<Cell>,
    index: HashMap<String, usize>,
}

impl Builder {
    fn add(&mut self, name: String, kind: CellKind, material: KeyMaterial, upstream: Vec<usize>) -> usize {
        let key = material.key();
        if let Some(&i) = self.index.get(&key) {
            if !self.cells[i].aliases.contains(&name) {
                self.cells[i].aliases.push(name);
            }
            return i;
        }
        self.cells.push(Cell { key: key.clone(), name: name.clone(), aliases: vec![name], kind, material, upstream });
        self.index.insert(key, self.cells.len() - 1);
        self.cells.len() - 1
    }
}

fn material(kind: &str, version: u32, params: BTreeMap<String, String>, upstream: Vec<String>, seed: Option<u64>, device: &str) -> KeyMaterial {
    KeyMaterial { kind: kind.to_string(), version, params, upstream, seed, dtype: "f32".to_string(), device: device.to_string() }
}

/// The data set and split cells of `[data.NAME]`, planned once per name.
fn data_cells(spec: &Spec, b: &mut Builder, memo: &mut HashMap<String, (usize, usize)>, data_name: &str) -> Result<(usize, usize), PlanError> {
    if let Some(&v) = memo.get(data_name) {
        return Ok(v);
    }
    let decl = spec.data.get(data_name).ok_or_else(|| PlanError::Data {
        name: data_name.to_string(),
        source: DataError::Manifest { path: spec.path.clone(), message: format!("data set `{data_name}` is not declared"), hint: None },
    })?;
    let manifest = Manifest::load_named(&spec.root, &decl.manifest).map_err(|source| PlanError::Data { name: data_name.to_string(), source })?;
    let mut p = BTreeMap::new();
    p.insert("content_id".to_string(), manifest.content_id());
    if let Some(c) = decl.classes {
        if c > manifest.classes.len() {
            return Err(PlanError::Data {
                name: data_name.to_string(),
                source: DataError::Manifest {
                    path: manifest_path(&spec.root, &decl.manifest),
                    message: format!("the spec asks for {c} classes but the data set has {}", manifest.classes.len()),
                    hint: Some(format!("set `classes` of [data.{data_name}] to at most {}", manifest.classes.len())),
                },
            });
        }
        p.insert("classes".to_string(), c.to_string());
    }
    let m = material("dataset", DATASET_VERSION, p, vec![], None, "any");
    let ds = b.add(format!("data/{data_name}"), CellKind::Dataset { manifest: Box::new(manifest), root: spec.root.clone(), classes: decl.classes }, m, vec![]);
    let mut p = BTreeMap::new();
    p.insert("test_per_class".to_string(), decl.test_per_class.to_string());
    let m = material("split", SPLIT_VERSION, p, vec![b.cells[ds].key.clone()], Some(decl.split_seed), "any");
    let split = b.add(format!("split/{data_name}"), CellKind::Split { test_per_class: decl.test_per_class, seed: decl.split_seed }, m, vec![ds]);
    memo.insert(data_name.to_string(), (ds, split));
    Ok((ds, split))
}

/// The cells of one declared input, in the order they go upstream of the training cell: the
/// data set, its split, then one cell per step of `decl.steps`, each downstream of all before it.
fn input_cells(spec: &Spec, b: &mut Builder, memo: &mut HashMap<String, (usize, usize)>, decl: &InputDecl) -> Result<Vec<usize>, PlanError> {
    if let Some(k) = decl.steps.iter().position(|s| matches!(s, Derive::Episodes { .. })) {
        if k + 1 != decl.steps.len() {
            let message = format!("input `{}`: episodes must be its last step (a later step renumbers the images they list); declare another input for what follows", decl.name);
            return Err(PlanError::Inputs { run: format!("data/{}", decl.dataset), message });
        }
    }
    let (ds, split) = data_cells(spec, b, memo, &decl.dataset)?;
    let mut cells = vec![ds, split];
    let mut labels = Vec::new();
    for step in &decl.steps {
        let (p, seed) = step.material();
        let version = if matches!(step, Derive::LongTail { .. }) { SUBSET_VERSION } else { DERIVE_VERSION };
        let m = material(step.kind(), version, p, cells.iter().map(|&c| b.cells[c].key.clone()).collect(), seed, "any");
        labels.push(step.label());
        let name = format!("{}/{}/{}", step.kind(), decl.dataset, labels.join("/"));
        let upstream = cells.clone();
        cells.push(b.add(name, CellKind::Derive { step: step.clone() }, m, upstream));
    }
    Ok(cells)
}

/// How many upstream cells [`input_cells`] plans for `decl`: how the executor finds each
/// input's records among a training cell's upstream records.
pub fn input_cell_count(decl: &InputDecl) -> usize {
    2 + decl.steps.len()
}

/// Plan every cell of `spec`. A training cell's upstream cells are those of each input the
/// method declares for the run ([`Method::inputs`](crate::methods::Method::inputs)), in
/// declaration order, then its pretraining cell if it has one.
pub fn plan(spec: &Spec) -> Result<Plan, PlanError> {
    let method = spec.method.clone();
    let mut b = Builder { cells: Vec::new(), index: HashMap::new() };
    let mut memo: HashMap<String, (usize, usize)> = HashMap::new();
    let mut runs = Vec::new();
    for exp in &spec.experiments {
        for run in &exp.runs {
            let name = format!("train/{}/{}", exp.id, run.label());
            let decls = method.inputs(&run.params).map_err(|e| PlanError::Inputs { run: name.clone(), message: e.to_string() })?;
            let mut upstream = Vec::new();
            for decl in &decls {
                if !spec.data.contains_key(&decl.dataset) {
                    let declared: Vec<String> = spec.data.keys().cloned().collect();
                    let hint = if declared.is_empty() { format!("add [data.{}]", decl.dataset) } else { crate::params::suggest(&decl.dataset, &declared) };
                    return Err(PlanError::UndeclaredData { run: name, input: decl.name.clone(), dataset: decl.dataset.clone(), hint });
                }
                upstream.extend(input_cells(spec, &mut b, &mut memo, decl)?);
            }

            // The device class goes into the key on its own: CPU and GPU results differ in the
            // last bits, so they are different cells.
            let device = method.device(&run.params);
            let pretraining = method.pretraining(&run.params, &spec.root).map_err(|e| PlanError::Pretraining { run: name.clone(), message: e.to_string() })?;
            if let Some(pt) = pretraining {
                let (pds, psplit) = data_cells(spec, &mut b, &mut memo, &pt.dataset)?;
                let canon = pt.params.iter().map(|(k, v)| (k.clone(), v.canonical())).collect();
                let m = material(&format!("pretrain:{}", method.name()), method.version(), canon, vec![b.cells[pds].key.clone(), b.cells[psplit].key.clone()], Some(pt.seed), &device);
                let name = format!("pretrain/{}/{}", pt.dataset, &m.key()[..8]);
                upstream.push(b.add(name, CellKind::Pretrain { method: method.clone(), pretraining: pt }, m, vec![pds, psplit]));
            }
            let mut train_params = run.params.clone();
            for k in method.data_params() {
                train_params.remove(*k);
            }
            let canon: BTreeMap<String, String> = train_params.iter().map(|(k, v)| (k.clone(), v.canonical())).collect();
            let up = upstream.iter().map(|&u| b.cells[u].key.clone()).collect();
            let m = material(&format!("train:{}", method.name()), method.version(), canon, up, Some(run.seed), &device);
            let cell = b.add(name, CellKind::Train { method: method.clone(), params: run.params.clone(), seed: run.seed }, m, upstream);
            runs.push(PlannedRun { experiment: exp.id.clone(), label: run.label(), point: run.point.clone(), params: run.params.clone(), seed: run.seed, cell });
        }
    }
    Ok(Plan { report: spec.report.id.clone(), root: spec.root.clone(), method, cells: b.cells, runs })
}

/// `data-manifests/<name>.toml` under the project root.
pub fn manifest_path(root: &Path, name: &str) -> PathBuf {
    root.join("data-manifests").join(format!("{name}.toml"))
}

impl Plan {
    /// The sub-plan of `targets` and everything upstream of them, in plan order.
    pub fn closure(&self, targets: &[usize]) -> Plan {
        let mut keep = vec![false; self.cells.len()];
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if !keep[i] {
                keep[i] = true;
                stack.extend(self.cells[i].upstream.iter().copied());
            }
        }
        let mut new_index = vec![usize::MAX; self.cells.len()];
        let mut cells = Vec::new();
        for (i, c) in self.cells.iter().enumerate().filter(|(i, _)| keep[*i]) {
            new_index[i] = cells.len();
            let mut c = c.clone();
            c.upstream = c.upstream.iter().map(|u| new_index[*u]).collect();
            cells.push(c);
        }
        let runs = self.runs.iter().filter(|r| keep[r.cell]).map(|r| PlannedRun { cell: new_index[r.cell], ..r.clone() }).collect();
        Plan { report: self.report.clone(), root: self.root.clone(), method: self.method.clone(), cells, runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KeyMaterial {
        let mut params = BTreeMap::new();
        params.insert("lr".to_string(), "0.05".to_string());
        material("train:supervised", 1, params, vec!["a".repeat(64)], Some(0), "cpu")
    }

    #[test]
    fn each_field_of_the_key_material_changes_the_key() {
        let k = base().key();
        assert_eq!(k, base().key(), "the key is a pure function of the material");
        type Edit = Box<dyn Fn(&mut KeyMaterial)>;
        let variants: Vec<Edit> = vec![
            Box::new(|m| m.version = 2),
            Box::new(|m| m.seed = Some(1)),
            Box::new(|m| m.dtype = "f16".into()),
            Box::new(|m| m.device = "cuda".into()),
            Box::new(|m| m.upstream = vec!["b".repeat(64)]),
            Box::new(|m| m.kind = "train:other".into()),
            Box::new(|m| {
                m.params.insert("lr".into(), "0.1".into());
            }),
            Box::new(|m| {
                m.params.insert("epochs".into(), "3".into());
            }),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut m = base();
            change(&mut m);
            assert_ne!(m.key(), k, "variant {i} left the key unchanged");
        }
    }

    /// A method whose inputs are whatever `declare` says.
    struct Declares {
        declare: fn(&Params) -> Result<Vec<InputDecl>, crate::methods::MethodError>,
    }

    #[derive(serde::Deserialize)]
    struct NoParams {}

    impl crate::params::ParamStruct for NoParams {
        const SCHEMA: &'static [crate::params::ParamDef] = &[];
    }

    impl crate::methods::Method for Declares {
        fn name(&self) -> &'static str {
            "declares"
        }
        fn version(&self) -> u32 {
            1
        }
        fn schema(&self) -> crate::params::Schema {
            crate::params::Schema::of::<NoParams>()
        }
        fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, crate::methods::MethodError> {
            (self.declare)(params)
        }
        fn run(&self, _: &Params, _: u64, _: &crate::methods::TrainInputs, _: &dyn crate::methods::Progress) -> Result<crate::methods::Outcome, crate::methods::MethodError> {
            Ok(crate::methods::Outcome::Done(BTreeMap::new()))
        }
    }

    /// A spec with one run of `method` and one data set, `mnist`, whose manifest does not exist
    /// (so any attempt to plan its cells fails).
    fn spec_with(method: Declares) -> Spec {
        use crate::spec::{DataDecl, Experiment, ReportSection, RunSpec};
        let report = ReportSection { id: "t".into(), title: "T".into(), document: None, template: "t.md.j2".into(), method: "declares".into(), description: None, claim_seeds: None };
        let mut data = BTreeMap::new();
        data.insert("mnist".to_string(), DataDecl { manifest: "no-such-manifest".into(), test_per_class: 10, split_seed: 0, classes: None });
        let run = RunSpec { point: Params::new(), params: Params::new(), seed: 0 };
        let exp = Experiment { active: true, id: "e".into(), title: "E".into(), description: None, axes: vec![], seeds: vec![0], runs: vec![run] };
        Spec {
            path: PathBuf::from("reports/t.toml"),
            root: std::env::temp_dir().join("reprise-plan-tests-no-project"),
            profile: "quick".into(),
            overrides: vec![],
            report,
            data,
            experiments: vec![exp],
            tables: vec![],
            figures: vec![],
            claims: vec![],
            method: std::sync::Arc::new(method),
            profiles: vec![],
            profile_params: vec![],
        }
    }

    #[test]
    fn a_method_without_inputs_gets_a_training_cell_without_data() {
        let plan = plan(&spec_with(Declares { declare: |_| Ok(Vec::new()) })).expect("plans without reading any manifest");
        assert_eq!(plan.cells.len(), 1, "{:?}", plan.cells.iter().map(|c| &c.name).collect::<Vec<_>>());
        let cell = &plan.cells[0];
        assert!(matches!(cell.kind, CellKind::Train { .. }));
        assert_eq!(cell.name, "train/e/seed=0");
        assert!(cell.upstream.is_empty() && cell.material.upstream.is_empty());
        // No `device` in the schema: the CPU.
        assert_eq!(cell.material.device, "cpu");
        assert_eq!(plan.runs[0].cell, 0);
    }

    #[test]
    fn an_input_naming_an_undeclared_data_set_is_an_error() {
        let declare = |_: &Params| Ok(vec![InputDecl::new("source", "mnits")]);
        let err = plan(&spec_with(Declares { declare })).expect_err("`mnits` is not declared");
        assert!(matches!(&err, PlanError::UndeclaredData { dataset, input, .. } if dataset == "mnits" && input == "source"), "{err:?}");
        assert_eq!(err.to_string(), "train/e/seed=0: input `source` needs data set `mnits`, which the spec does not declare under [data]; did you mean `mnist`?");
    }

    #[test]
    fn episodes_before_another_step_are_an_error() {
        use crate::data::episodes::{EpisodeSpec, Shots};
        let declare = |_: &Params| {
            let spec = EpisodeSpec { count: 1, ways: 2, max_shot: 1, queries: 1, shots: Shots::Fixed, seed: 0 };
            Ok(vec![InputDecl::new("tasks", "mnist").then(Derive::Episodes { spec, from: crate::methods::EpisodePool::Train }).then(Derive::Rotate { degrees: 90.0 })])
        };
        let err = plan(&spec_with(Declares { declare })).expect_err("episodes are not last");
        assert!(err.to_string().contains("input `tasks`: episodes must be its last step"), "{err}");
    }

    #[test]
    fn an_input_reading_a_parameter_outside_the_schema_is_an_error() {
        // `long_tail` reads `dataset`, `imbalance` and `data_seed`; this run has none of them.
        let declare = |p: &Params| Ok(vec![InputDecl::long_tail("data", p)?]);
        let err = plan(&spec_with(Declares { declare })).expect_err("no `dataset` parameter");
        assert!(matches!(err, PlanError::Inputs { .. }), "{err:?}");
        assert!(err.to_string().contains("parameter `dataset`"), "{err}");
    }

    #[test]
    fn key_is_the_sha256_of_canonical_json() {
        // Hand-checkable: the JSON has fields in declaration order and sorted maps.
        let m = base();
        let json = String::from_utf8(serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(json.starts_with("{\"kind\":\"train:supervised\",\"version\":1,\"params\":{\"lr\":\"0.05\"}"), "{json}");
        assert_eq!(m.key(), sha256_hex(json.as_bytes()));
    }
}
