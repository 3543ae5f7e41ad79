//! Computing one cell of each kind from its upstream records.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::CellOutcome;
use crate::cache::{CellRecord, CellStatus, Store, StoreError};
use crate::data::episodes::Episode;
use crate::data::{self, ImageSet};
use crate::methods::{DataInput, Derive, EpisodePool, Outcome, Progress, TrainInputs, PRETRAIN_INPUT};
use crate::plan::{self, CellKind, Plan};

/// Decoded data sets by object hash, so that many training cells share one copy.
#[derive(Default)]
pub struct Memo {
    images: Mutex<HashMap<String, Arc<ImageSet>>>,
}

/// `split.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SplitOutput {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// `subset.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubsetOutput {
    pub train: Vec<usize>,
    pub counts: Vec<usize>,
}

/// A problem computing a cell that is not the store's fault: becomes `CellOutcome::Failed`.
struct CellFailure(String);

impl<E: std::fmt::Display> From<E> for CellFailure {
    fn from(e: E) -> Self {
        CellFailure(e.to_string())
    }
}

fn load_images(store: &dyn Store, memo: &Memo, rec: &CellRecord) -> Result<Arc<ImageSet>, CellFailure> {
    let hash = rec.outputs.get("images.safetensors").ok_or_else(|| CellFailure("data cell has no images".into()))?;
    if let Some(img) = memo.images.lock().ok().and_then(|m| m.get(hash).cloned()) {
        return Ok(img);
    }
    let bytes = store.get(hash)?.ok_or_else(|| CellFailure(format!("object {hash} vanished or is corrupt; run again to recompute it")))?;
    let img = Arc::new(ImageSet::from_safetensors_bytes(&bytes)?);
    if let Ok(mut m) = memo.images.lock() {
        m.insert(hash.clone(), img.clone());
    }
    Ok(img)
}

fn load_json<T: for<'de> Deserialize<'de>>(store: &dyn Store, rec: &CellRecord, name: &str) -> Result<T, CellFailure> {
    let hash = rec.outputs.get(name).ok_or_else(|| CellFailure(format!("upstream cell has no `{name}`")))?;
    let bytes = store.get(hash)?.ok_or_else(|| CellFailure(format!("object {hash} vanished or is corrupt; run again to recompute it")))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, CellFailure> {
    Ok(serde_json::to_vec(v)?)
}

/// The record of `key` if every output it names reads back with its hash. A corrupt output is
/// removed (and reported by the store), so the cell counts as missing and is recomputed.
pub(super) fn intact_record(store: &dyn Store, key: &str) -> Result<Option<CellRecord>, StoreError> {
    let Some(r) = store.get_record(key)? else { return Ok(None) };
    for hash in r.outputs.values() {
        if store.get(hash)?.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(r))
}

/// Look up or compute cell `i`. `inputs` are the records of its upstream cells in order.
pub fn run_cell(plan: &Plan, i: usize, inputs: &[CellRecord], store: &dyn Store, memo: &Memo, progress: &dyn Progress, cache_only: bool) -> Result<CellOutcome, StoreError> {
    let cell = &plan.cells[i];
    if let Some(r) = intact_record(store, &cell.key)? {
        return Ok(CellOutcome::Cached(r));
    }
    if cache_only {
        return Ok(CellOutcome::Failed(format!("not in the cache (key {})", &cell.key[..12])));
    }
    let _lock = store.lock(&cell.key)?;
    // Another process may have computed it while we waited for the lock.
    if let Some(r) = intact_record(store, &cell.key)? {
        return Ok(CellOutcome::Cached(r));
    }
    let start = Instant::now();
    let computed = compute(cell.kind.clone(), inputs, store, memo, progress, &plan.root);
    let (objects, status, reason) = match computed {
        Ok(Outcome::Done(objects)) => (objects, CellStatus::Ok, None),
        Ok(Outcome::Failed { reason, objects }) => (objects, CellStatus::Failed, Some(reason)),
        Err(CellFailure(msg)) => return Ok(CellOutcome::Failed(msg)),
    };
    let mut outputs = BTreeMap::new();
    for (name, bytes) in &objects {
        outputs.insert(name.clone(), store.put(bytes)?);
    }
    let record = CellRecord { key: cell.key.clone(), kind: cell.kind.name().to_string(), status, reason, outputs, seconds: start.elapsed().as_secs_f64() };
    // The record goes last: its presence means every output is in place.
    store.put_record(&record)?;
    Ok(CellOutcome::Ran(record))
}

/// The data after a chain of data cells (dataset, split, derivation steps): the latest images
/// any of them wrote, and the latest training and test indices into them.
struct View {
    images: Arc<ImageSet>,
    train: Vec<usize>,
    test: Vec<usize>,
    episodes: Vec<Episode>,
}

impl View {
    fn input<'a>(&'a self, name: &'a str) -> DataInput<'a> {
        DataInput { name, data: &self.images, train: &self.train, test: &self.test, episodes: &self.episodes }
    }
}

/// `recs` are the records of a chain: a dataset, its split, then derivation steps, in order.
fn view_of(store: &dyn Store, memo: &Memo, recs: &[CellRecord]) -> Result<View, CellFailure> {
    let (Some(ds), Some(split)) = (recs.first(), recs.get(1)) else {
        return Err(CellFailure(format!("a data input needs its data set and split cells, found {} cells", recs.len())));
    };
    let mut images = load_images(store, memo, ds)?;
    let SplitOutput { mut train, mut test } = load_json(store, split, "split.json")?;
    let mut episodes = Vec::new();
    for rec in &recs[2..] {
        if rec.outputs.contains_key("episodes.json") {
            episodes = load_json(store, rec, "episodes.json")?;
        }
        if rec.outputs.contains_key("images.safetensors") {
            images = load_images(store, memo, rec)?;
        }
        if rec.outputs.contains_key("view.json") {
            SplitOutput { train, test } = load_json(store, rec, "view.json")?;
        } else if rec.outputs.contains_key("subset.json") {
            train = load_json::<SubsetOutput>(store, rec, "subset.json")?.train;
        }
    }
    Ok(View { images, train, test, episodes })
}

/// One derivation step applied to `view`: its output objects.
fn derive(step: &Derive, view: &View) -> Result<BTreeMap<String, Vec<u8>>, CellFailure> {
    let images = &view.images;
    let mut objects = BTreeMap::new();
    let put_view = |objects: &mut BTreeMap<String, Vec<u8>>, train: Vec<usize>, test: Vec<usize>| -> Result<(), CellFailure> {
        objects.insert("view.json".to_string(), json(&SplitOutput { train, test })?);
        Ok(())
    };
    // Steps that write images keep only the input's images: its training images, then its test
    // images, at indices 0.. and n_train.. of the new set.
    let compact = |set: ImageSet, n_train: usize, objects: &mut BTreeMap<String, Vec<u8>>| -> Result<(), CellFailure> {
        let n = set.len();
        objects.insert("images.safetensors".to_string(), set.to_safetensors_bytes());
        put_view(objects, (0..n_train).collect(), (n_train..n).collect())
    };
    let both: Vec<usize> = view.train.iter().chain(&view.test).copied().collect();
    match step {
        Derive::LongTail { imbalance, seed } => {
            let train = data::long_tail_subset(&images.labels, &view.train, images.num_classes, *imbalance, *seed)?;
            let mut counts = vec![0usize; images.num_classes];
            for &t in &train {
                counts[images.labels[t] as usize] += 1;
            }
            objects.insert("subset.json".to_string(), json(&SubsetOutput { train, counts })?);
        }
        Derive::Cap { per_class, seed } => {
            let train = data::derived::cap_per_class(&images.labels, &view.train, images.num_classes, *per_class, *seed)?;
            put_view(&mut objects, train, view.test.clone())?;
        }
        Derive::Relabel { map } => {
            let mut set = images.subset(&both);
            (set.labels, set.num_classes) = data::derived::relabel(&set.labels, images.num_classes, map)?;
            compact(set, view.train.len(), &mut objects)?;
        }
        Derive::Classes { classes } => {
            let (train, train_labels) = data::derived::keep_classes(&images.labels, &view.train, images.num_classes, classes)?;
            let (test, test_labels) = data::derived::keep_classes(&images.labels, &view.test, images.num_classes, classes)?;
            let mut set = images.subset(&[train.as_slice(), test.as_slice()].concat());
            set.labels = [train_labels, test_labels].concat();
            set.num_classes = classes.len();
            compact(set, train.len(), &mut objects)?;
        }
        Derive::Episodes { spec, from } => {
            let pool = match from {
                EpisodePool::Train => &view.train,
                EpisodePool::Test => &view.test,
                EpisodePool::All => &both,
            };
            let episodes = data::episodes::sample(&images.labels, pool, images.num_classes, spec).map_err(|e| CellFailure(e.to_string()))?;
            objects.insert("episodes.json".to_string(), json(&episodes)?);
        }
        Derive::Rotate { degrees } => compact(data::transform::rotate(&images.subset(&both), *degrees), view.train.len(), &mut objects)?,
        Derive::Angles { degrees } => {
            if degrees.is_empty() {
                return Err(CellFailure("rotated copies need at least one angle".into()));
            }
            let set = data::transform::angle_classes(&images.subset(&both), degrees);
            // Copy j holds the input's training images, then its test images, at j·n.
            let (n, n_train) = (both.len(), view.train.len());
            let train = (0..degrees.len()).flat_map(|j| j * n..j * n + n_train).collect();
            let test = (0..degrees.len()).flat_map(|j| j * n + n_train..(j + 1) * n).collect();
            objects.insert("images.safetensors".to_string(), set.to_safetensors_bytes());
            put_view(&mut objects, train, test)?;
        }
        Derive::Resize { height, width } => {
            if *height == 0 || *width == 0 {
                return Err(CellFailure(format!("cannot resize to {height}×{width}: both sides must be at least 1")));
            }
            compact(data::transform::resize(&images.subset(&both), *height, *width), view.train.len(), &mut objects)?
        }
    }
    Ok(objects)
}

/// The images of labels 0..k, in their order, as a k-class set.
fn first_classes(images: &ImageSet, k: usize) -> ImageSet {
    let keep: Vec<usize> = (0..images.len()).filter(|&i| (images.labels[i] as usize) < k).collect();
    let mut sub = images.subset(&keep);
    sub.num_classes = k;
    sub
}

fn compute(kind: CellKind, inputs: &[CellRecord], store: &dyn Store, memo: &Memo, progress: &dyn Progress, project_root: &std::path::Path) -> Result<Outcome, CellFailure> {
    let mut objects = BTreeMap::new();
    match kind {
        CellKind::Dataset { manifest, root, classes } => {
            let roles = manifest.roles();
            if roles.contains(&"train") && roles.contains(&"test") {
                // A data set with its own test files keeps them as the test set: the training
                // images come first, then the test images, and `roles.json` says where.
                let mut images = manifest.load_images(&root, Some("train"))?;
                let test = manifest.load_images(&root, Some("test"))?;
                let n_train = images.len();
                images.pixels.extend_from_slice(&test.pixels);
                images.labels.extend_from_slice(&test.labels);
                let split = SplitOutput { train: (0..n_train).collect(), test: (n_train..images.len()).collect() };
                let (images, split) = match classes {
                    Some(k) => {
                        let n_train = split.train.iter().filter(|&&i| (images.labels[i] as usize) < k).count();
                        let sub = first_classes(&images, k);
                        let n = sub.len();
                        (sub, SplitOutput { train: (0..n_train).collect(), test: (n_train..n).collect() })
                    }
                    None => (images, split),
                };
                objects.insert("roles.json".to_string(), json(&split)?);
                objects.insert("images.safetensors".to_string(), images.to_safetensors_bytes());
            } else {
                let mut images = manifest.load_images(&root, None)?;
                if let Some(k) = classes {
                    images = first_classes(&images, k);
                }
                objects.insert("images.safetensors".to_string(), images.to_safetensors_bytes());
            }
        }
        CellKind::Split { test_per_class, seed } => {
            if inputs[0].outputs.contains_key("roles.json") {
                // The data set's own split; `test_per_class` does not apply.
                let split: SplitOutput = load_json(store, &inputs[0], "roles.json")?;
                objects.insert("split.json".to_string(), json(&split)?);
            } else {
                let images = load_images(store, memo, &inputs[0])?;
                let (train, test) = data::balanced_split(&images.labels, images.num_classes, test_per_class, seed)?;
                objects.insert("split.json".to_string(), json(&SplitOutput { train, test })?);
            }
        }
        CellKind::Derive { step } => {
            let view = view_of(store, memo, inputs)?;
            objects = derive(&step, &view)?;
        }
        CellKind::Train { method, params, seed } => {
            let m = method.as_ref();
            // The plan put each declared input's cells upstream in declaration order, then the
            // pretraining cell; the declarations are a pure function of the parameters.
            let decls = m.inputs(&params)?;
            let mut loaded = Vec::with_capacity(decls.len());
            let mut rest = inputs;
            for decl in &decls {
                let n = plan::input_cell_count(decl);
                if rest.len() < n {
                    return Err(CellFailure(format!("input `{}` has {} upstream cells, expected {n}", decl.name, rest.len())));
                }
                let (mine, tail) = rest.split_at(n);
                loaded.push(view_of(store, memo, mine)?);
                rest = tail;
            }
            let pretrained = match rest.first() {
                Some(rec) => {
                    let mut objects = BTreeMap::new();
                    for (name, hash) in &rec.outputs {
                        let bytes = store.get(hash)?.ok_or_else(|| CellFailure(format!("object {hash} vanished or is corrupt; run again to recompute it")))?;
                        objects.insert(name.clone(), bytes);
                    }
                    Some(objects)
                }
                None => None,
            };
            let data = decls.iter().zip(&loaded).map(|(d, l)| l.input(&d.name)).collect();
            let ti = TrainInputs { data, pretrained: pretrained.as_ref(), root: project_root };
            return Ok(m.run(&params, seed, &ti, progress)?);
        }
        CellKind::Pretrain { method, pretraining } => {
            let m = method.as_ref();
            let images = load_images(store, memo, &inputs[0])?;
            let split: SplitOutput = load_json(store, &inputs[1], "split.json")?;
            let data = vec![DataInput { name: PRETRAIN_INPUT, data: &images, train: &split.train, test: &split.test, episodes: &[] }];
            let ti = TrainInputs { data, pretrained: None, root: project_root };
            return Ok(m.pretrain(&pretraining, &ti, progress)?);
        }
    }
    Ok(Outcome::Done(objects))
}
