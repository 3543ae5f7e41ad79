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
use crate::methods::{MethodRef, Pretraining};
use crate::params::{ParamValue, Params};
use crate::spec::Spec;

/// Versions of the data cells' code; bump when their output changes.
pub const DATASET_VERSION: u32 = 2;
pub const SPLIT_VERSION: u32 = 1;
pub const SUBSET_VERSION: u32 = 1;

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
    /// Long-tailed subset of the training pool. Upstream: dataset, split.
    Subset { imbalance: f64, seed: u64 },
    /// A method's pretraining (e.g. a backbone on a balanced source task). Upstream: dataset,
    /// split of the source data.
    Pretrain { method: MethodRef, pretraining: Pretraining },
    /// One training run of a method. Upstream: dataset, split, subset, and the pretraining
    /// cell when the method has one.
    Train { method: MethodRef, params: Params, seed: u64 },
}

impl CellKind {
    pub fn name(&self) -> &'static str {
        match self {
            CellKind::Dataset { .. } => "dataset",
            CellKind::Split { .. } => "split",
            CellKind::Subset { .. } => "subset",
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

/// Errors of planning (data manifests).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("data set `{name}`: {source}")]
    Data { name: String, source: DataError },
    #[error("unknown method `{0}`")]
    Method(String),
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

/// Plan every cell of `spec`.
pub fn plan(spec: &Spec) -> Result<Plan, PlanError> {
    let method = spec.method.clone();
    let mut b = Builder { cells: Vec::new(), index: HashMap::new() };
    let mut memo: HashMap<String, (usize, usize)> = HashMap::new();
    let mut runs = Vec::new();
    for exp in &spec.experiments {
        for run in &exp.runs {
            let data_name = run.params.get("dataset").and_then(ParamValue::as_str).unwrap_or_default().to_string();
            let (ds, split) = data_cells(spec, &mut b, &mut memo, &data_name)?;
            let imbalance = run.params.get("imbalance").and_then(ParamValue::as_f64).unwrap_or(1.0);
            let data_seed = run.params.get("data_seed").and_then(ParamValue::as_i64).unwrap_or(0).max(0) as u64;
            let mut p = BTreeMap::new();
            p.insert("imbalance".to_string(), ParamValue::Float(imbalance).canonical());
            let m = material("subset", SUBSET_VERSION, p, vec![b.cells[ds].key.clone(), b.cells[split].key.clone()], Some(data_seed), "any");
            let subset = b.add(format!("subset/{data_name}/imbalance={}", ParamValue::Float(imbalance)), CellKind::Subset { imbalance, seed: data_seed }, m, vec![ds, split]);

            // The device class goes into the key on its own: CPU and GPU results differ in the
            // last bits, so they are different cells.
            let device = run.params.get("device").and_then(ParamValue::as_str).unwrap_or("cpu").to_string();
            let mut upstream = vec![ds, split, subset];
            if let Some(pt) = method.pretraining(&run.params, &spec.root) {
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
            let name = format!("train/{}/{}", exp.id, run.label());
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
        let variants: Vec<Box<dyn Fn(&mut KeyMaterial)>> = vec![
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

    #[test]
    fn key_is_the_sha256_of_canonical_json() {
        // Hand-checkable: the JSON has fields in declaration order and sorted maps.
        let m = base();
        let json = String::from_utf8(serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(json.starts_with("{\"kind\":\"train:supervised\",\"version\":1,\"params\":{\"lr\":\"0.05\"}"), "{json}");
        assert_eq!(m.key(), sha256_hex(json.as_bytes()));
    }
}
