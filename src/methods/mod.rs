//! Methods: the papers' algorithms, each one module behind [`Method`].
//!
//! A method declares its parameters (a schema the spec layer validates against), the metrics
//! it records, and how to train one run. Methods are looked up by name in a [`Registry`] once,
//! when a spec is loaded; the spec, its plan and every cell carry the method from then on, so
//! the executor only ever calls through the trait. The built-in methods are registered like any
//! other ([`Registry::builtin`]); a crate outside this one adds its own with
//! [`Registry::with`] (or `Project::with_method`) without editing this one.

pub mod class_aware_lora;
pub mod group_dro;
pub mod supervised;
pub mod taml;
pub mod wamal;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::data::episodes::{Episode, EpisodeSpec};
use crate::data::ImageSet;
use serde::{Deserialize, Serialize};

use crate::params::{ParamStruct, ParamValue, Params, Schema};

/// The data of one declared input, as a training cell receives it from its upstream cells.
pub struct DataInput<'a> {
    /// The name the method declared it under ([`InputDecl::name`]).
    pub name: &'a str,
    pub data: &'a ImageSet,
    /// Indices of the training images (the input's [`Derive`] steps say which).
    pub train: &'a [usize],
    /// Indices of the balanced test set.
    pub test: &'a [usize],
    /// The episodes of the input's last [`Derive::Episodes`] step (none without one).
    pub episodes: &'a [Episode],
}

/// What a training cell receives from its upstream cells.
pub struct TrainInputs<'a> {
    /// The inputs the run declared ([`Method::inputs`]), in declaration order.
    pub data: Vec<DataInput<'a>>,
    /// The outputs of the run's pretraining cell, by name (see [`Method::pretraining`]).
    pub pretrained: Option<&'a BTreeMap<String, Vec<u8>>>,
    /// The project root (where `data-manifests/` lives).
    pub root: &'a std::path::Path,
}

impl<'a> TrainInputs<'a> {
    /// The input declared as `name`.
    pub fn input(&self, name: &str) -> Result<&DataInput<'a>, MethodError> {
        self.data.iter().find(|d| d.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.data.iter().map(|d| d.name).collect();
            MethodError::Invalid(format!("no input `{name}` (declared: {})", if names.is_empty() { "none".to_string() } else { names.join(", ") }))
        })
    }
}

/// The name of a pretraining cell's one input in [`TrainInputs`]: the split of
/// [`Pretraining::dataset`], training on its whole training pool.
pub const PRETRAIN_INPUT: &str = "pretrain";

/// One data input a run needs, declared by the method ([`Method::inputs`]). The plan turns it
/// into cells: the data set, its split into a training pool and a balanced test set, then one
/// cell per derivation step ([`Derive`]), each keyed like any cell by its step and everything
/// upstream of it (so changing a cap reruns only what reads it). Several inputs may name the
/// same data set; cells with the same key are planned once.
#[derive(Debug, Clone, PartialEq)]
pub struct InputDecl {
    /// The name the method reads it by ([`TrainInputs::input`]); never part of a key.
    pub name: String,
    /// The `[data.NAME]` set it comes from.
    pub dataset: String,
    /// What is derived from the split, in order; none: the split as it is.
    pub steps: Vec<Derive>,
}

/// One derivation step: what it does to the images, labels, training and test indices that
/// the step before it (or the split) produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Derive {
    /// A long-tailed subset of the training images: n_i = floor(n_max·imbalance^(i/(C−1))) of
    /// class i, n_max the smallest class count, picked by a per-class shuffle seeded with
    /// `seed`. Test images unchanged.
    LongTail { imbalance: f64, seed: u64 },
    /// At most `per_class` training images of each class, picked by a per-class shuffle seeded
    /// with `seed`. Test images unchanged.
    Cap { per_class: usize, seed: u64 },
    /// New labels, training and test alike: class c becomes `map[c]` (one entry per class; the
    /// number of classes becomes max(map) + 1), e.g. fine → coarse classes.
    Relabel { map: Vec<u32> },
    /// Only the images of `classes` (training and test), relabelled 0, 1, … in the listed order:
    /// disjoint class lists give disjoint tasks (meta-train / meta-test classes).
    Classes { classes: Vec<u32> },
    /// Every image rotated by `degrees` counter-clockwise about its centre (bilinear; 0 outside).
    Rotate { degrees: f64 },
    /// Every image resampled to `height`×`width` by area averaging (down or up).
    Resize { height: usize, width: usize },
    /// One copy of every image per angle, rotated as [`Derive::Rotate`] does: class c of the
    /// j-th angle's copy becomes class j·C + c, so each (class, angle) pair is a class (C·|angles|
    /// classes). Training and test images stay training and test images in every copy.
    Angles { degrees: Vec<f64> },
    /// Few-shot episodes drawn once from the input's training images, test images or both
    /// (`from`); images and indices pass through unchanged and the run gets the episodes as
    /// [`DataInput::episodes`]. Only as an input's last step (planning refuses others). See
    /// [`crate::data::episodes`].
    Episodes { spec: EpisodeSpec, from: EpisodePool },
}

/// The images an [`Derive::Episodes`] step draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpisodePool {
    Train,
    Test,
    /// Training and test images alike (a class set used only for meta-testing).
    All,
}

impl EpisodePool {
    pub fn name(self) -> &'static str {
        match self {
            EpisodePool::Train => "train",
            EpisodePool::Test => "test",
            EpisodePool::All => "all",
        }
    }
}

impl Derive {
    /// The cell kind's name: the key's kind and the first part of the cell's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Derive::LongTail { .. } => "subset",
            Derive::Cap { .. } => "cap",
            Derive::Relabel { .. } => "relabel",
            Derive::Classes { .. } => "classes",
            Derive::Rotate { .. } => "rotate",
            Derive::Resize { .. } => "resize",
            Derive::Angles { .. } => "angles",
            Derive::Episodes { .. } => "episodes",
        }
    }

    /// What goes into the key besides the upstream keys: canonical text of each setting, and
    /// the seed of a random step.
    pub fn material(&self) -> (BTreeMap<String, String>, Option<u64>) {
        let list = |v: &[u32]| format!("[{}]", v.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        let one = |k: &str, v: String| BTreeMap::from([(k.to_string(), v)]);
        match self {
            Derive::LongTail { imbalance, seed } => (one("imbalance", ParamValue::Float(*imbalance).canonical()), Some(*seed)),
            Derive::Cap { per_class, seed } => (one("per_class", per_class.to_string()), Some(*seed)),
            Derive::Relabel { map } => (one("map", list(map)), None),
            Derive::Classes { classes } => (one("classes", list(classes)), None),
            Derive::Rotate { degrees } => (one("degrees", ParamValue::Float(*degrees).canonical()), None),
            Derive::Resize { height, width } => (BTreeMap::from([("height".to_string(), height.to_string()), ("width".to_string(), width.to_string())]), None),
            Derive::Angles { degrees } => (one("degrees", format!("[{}]", degrees.iter().map(|d| ParamValue::Float(*d).canonical()).collect::<Vec<_>>().join(","))), None),
            Derive::Episodes { spec, from } => {
                let m = [
                    ("count", spec.count.to_string()),
                    ("ways", spec.ways.to_string()),
                    ("max_shot", spec.max_shot.to_string()),
                    ("queries", spec.queries.to_string()),
                    ("shots", spec.shots.name().to_string()),
                    ("from", from.name().to_string()),
                ];
                (m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), Some(spec.seed))
            }
        }
    }

    /// Its settings as a cell name's last part, e.g. `imbalance=0.01`.
    pub fn label(&self) -> String {
        let (m, _) = self.material();
        m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    /// Whether the step writes new images or labels (the others write indices only).
    pub fn changes_images(&self) -> bool {
        !matches!(self, Derive::LongTail { .. } | Derive::Cap { .. } | Derive::Episodes { .. })
    }
}

impl InputDecl {
    /// Input `name`: the split of `dataset` as it is; add steps with [`InputDecl::then`].
    pub fn new(name: &str, dataset: &str) -> InputDecl {
        InputDecl { name: name.to_string(), dataset: dataset.to_string(), steps: Vec::new() }
    }

    /// This input with `step` after its other steps.
    pub fn then(mut self, step: Derive) -> InputDecl {
        self.steps.push(step);
        self
    }

    /// Input `name`: `dataset` with a long-tailed subset of imbalance `imbalance` drawn with
    /// seed `seed` (see [`Derive::LongTail`]).
    pub fn long_tail_of(name: &str, dataset: &str, imbalance: f64, seed: u64) -> InputDecl {
        InputDecl::new(name, dataset).then(Derive::LongTail { imbalance, seed })
    }

    /// The input `name` that most runs declare: the data set named by the run's `dataset`
    /// parameter, with a long-tailed subset of imbalance `imbalance` drawn with seed
    /// `data_seed`. Each of the three must be in the method's schema (the spec layer then fills
    /// its default); a missing one is an error, not a default.
    pub fn long_tail(name: &str, params: &Params) -> Result<InputDecl, MethodError> {
        let missing = |k: &str, what: &str| MethodError::Invalid(format!("input `{name}` reads the parameter `{k}` ({what}), which the run does not have; add it to the method's schema"));
        let dataset = params.get("dataset").and_then(ParamValue::as_str).ok_or_else(|| missing("dataset", "a data set name"))?;
        let imbalance = params.get("imbalance").and_then(ParamValue::as_f64).ok_or_else(|| missing("imbalance", "a number"))?;
        let seed = params.get("data_seed").and_then(ParamValue::as_i64).and_then(|s| u64::try_from(s).ok()).ok_or_else(|| missing("data_seed", "an integer ≥ 0"))?;
        Ok(InputDecl::long_tail_of(name, dataset, imbalance, seed))
    }
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

/// A problem with one run's combination of parameters ([`Method::check_run`]), blamed on one
/// of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RunProblem {
    /// The parameter the message is located at.
    pub param: String,
    pub message: String,
    pub hint: Option<String>,
}

impl RunProblem {
    pub fn new(param: &str, message: impl Into<String>) -> RunProblem {
        RunProblem { param: param.to_string(), message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> RunProblem {
        self.hint = Some(hint.into());
        self
    }
}

/// A run's parameters as the method's typed struct.
pub fn params<T: ParamStruct>(p: &Params) -> Result<T, MethodError> {
    T::decode(p).map_err(MethodError::Invalid)
}

/// A record (e.g. a [`RunRecord`]) as the pretty JSON of a `metrics.json` object.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, MethodError> {
    serde_json::to_vec_pretty(v).map_err(|e| MethodError::Invalid(format!("cannot serialise metrics: {e}")))
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

/// One analysis epoch's measurements. Every method writes its `metrics.json` as a
/// [`RunRecord`], which the frames stage reads. Build it with `..Default::default()` for the
/// parts a method does not record, so that fields added later need no change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Metric name → value (absent metrics, e.g. minority cosine with one tail class, are left out).
    pub metrics: BTreeMap<String, f64>,
    /// Per class: training count, test accuracy (%), classifier row norm.
    pub per_class: Vec<ClassRecord>,
    /// Name of the safetensors object with this epoch's raw tensors (empty if none).
    #[serde(default)]
    pub analysis_object: String,
    /// Per task (e.g. each few-shot test episode) and per class of a task: values by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_task: Vec<TaskRecord>,
}

/// One task's values (e.g. a test episode's size, accuracy and learned per-layer scales), or one
/// class of a task (`class` set: its shots, its learned weight). The frames stage puts them in
/// the `per_task` frame, which `association` claims, `scatter` figures and `tasks` tables read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRecord {
    /// The set of tasks it belongs to (e.g. `id`, `ood`).
    pub set: String,
    pub task: usize,
    /// The class within the task, for a per-class row; `None` for the task's own row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<usize>,
    pub values: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassRecord {
    pub class: usize,
    pub train_count: usize,
    pub group: String,
    pub test_accuracy: Option<f64>,
    pub classifier_norm: f64,
    /// Method-specific per-class values (e.g. a learned per-class factor), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// Everything a training cell records besides its raw tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub epochs: Vec<EpochRecord>,
    pub train_counts: Vec<usize>,
    pub failure: Option<String>,
}

/// A pretraining cell a run needs (e.g. a backbone trained on a balanced source task). Every run
/// with the same data set, parameters and seed shares its one output.
#[derive(Debug, Clone, PartialEq)]
pub struct Pretraining {
    /// The `[data.NAME]` set it trains on (its training split).
    pub dataset: String,
    /// Everything that determines the pretrained weights (goes into the cell's key).
    pub params: Params,
    pub seed: u64,
}

/// One paper's algorithm.
pub trait Method: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever a change alters results; part of every training cell's key.
    fn version(&self) -> u32;
    /// The parameters: `Schema::of::<MyParams>()` for the method's [`ParamStruct`].
    fn schema(&self) -> Schema;
    /// Metric columns this method records per analysis epoch. Default: none.
    fn metrics(&self) -> &'static [&'static str] {
        &[]
    }
    /// Method-specific per-class values it records (`ClassRecord::extra`), which `class_epochs`
    /// figures can plot besides `test_accuracy` and `classifier_norm`.
    fn class_metrics(&self) -> &'static [&'static str] {
        &[]
    }
    /// The values it records per task and per class of a task ([`TaskRecord::values`]), which
    /// `association` claims, `scatter` figures and `tasks` tables read. Default: none.
    fn task_values(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks that involve several parameters of one run, each problem blamed on one parameter.
    /// Default: none.
    fn check_run(&self, _params: &Params) -> Vec<RunProblem> {
        Vec::new()
    }
    /// Parameters this run's configuration does not read (e.g. `momentum` with Adam). The spec
    /// layer drops them from the run, so they are in neither its cell key nor its frame row, and
    /// two runs that differ only in them are one run. Their fields are `Option`s. Default: none.
    fn inactive(&self, _params: &Params) -> Vec<&'static str> {
        Vec::new()
    }
    /// Parameters that only shape the upstream data cells (or the device), left out of the
    /// training key: they reach it through the upstream keys (and the device class). Default:
    /// none (they then enter the training key twice, which is harmless).
    fn data_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// The data inputs a run needs, by name, in the order their cells go upstream of the
    /// training cell. Default: none (the run gets no data cells). An input may only read
    /// parameters of the method's schema, e.g. [`InputDecl::long_tail`].
    fn inputs(&self, _params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        Ok(Vec::new())
    }
    /// The device class of a run's training and pretraining cells (part of their keys: CPU and
    /// GPU results differ in the last bits). Default: the run's `device` parameter if the
    /// schema has one (its schema default if the run lacks it), else `cpu`.
    fn device(&self, params: &Params) -> String {
        let Some(def) = self.schema().defs.iter().find(|d| d.name == "device") else { return "cpu".to_string() };
        match params.get("device") {
            Some(v) => v.canonical(),
            None => def.default.value().canonical(),
        }
    }
    /// The pretraining this run needs, if any. `root` is the project root (for files such as
    /// weights manifests whose pinned hashes belong in the key).
    /// An error (e.g. an unreadable weights manifest) stops planning with the run named.
    fn pretraining(&self, _params: &Params, _root: &std::path::Path) -> Result<Option<Pretraining>, MethodError> {
        Ok(None)
    }
    /// Compute a pretraining cell: its objects become `TrainInputs::pretrained` of the runs.
    /// `inputs` holds one input, [`PRETRAIN_INPUT`].
    fn pretrain(&self, _p: &Pretraining, _inputs: &TrainInputs, _progress: &dyn Progress) -> Result<Outcome, MethodError> {
        Err(MethodError::Invalid(format!("method `{}` has no pretraining", self.name())))
    }
    /// Train and analyse one run.
    fn run(&self, params: &Params, seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError>;
}

/// A method as specs, plans and cells hold it.
pub type MethodRef = Arc<dyn Method>;

impl std::fmt::Debug for dyn Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Method({} v{})", self.name(), self.version())
    }
}

/// The methods a project knows, by name.
#[derive(Clone, Debug)]
pub struct Registry {
    methods: BTreeMap<&'static str, MethodRef>,
}

impl Default for Registry {
    /// The built-in methods.
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    /// No method at all.
    pub fn empty() -> Registry {
        Registry { methods: BTreeMap::new() }
    }

    /// The methods this crate ships: `supervised`, `class_aware_lora`, `group_dro`, `wamal` and `taml`.
    pub fn builtin() -> Registry {
        Registry::empty().with(supervised::Supervised).with(class_aware_lora::ClassAwareLora).with(group_dro::GroupDro).with(wamal::Wamal).with(taml::Taml)
    }

    /// This registry with `method` added under its name (replacing a method of the same name).
    ///
    /// # Panics
    /// When the method's schema and its parameter struct disagree ([`Schema::check`]): a bug in
    /// the method, shown the first time any program or test registers it.
    pub fn with(mut self, method: impl Method + 'static) -> Registry {
        if let Err(e) = method.schema().check() {
            panic!("method `{}`: its schema and its parameter struct disagree: {e}", method.name());
        }
        self.methods.insert(method.name(), Arc::new(method));
        self
    }

    /// The method called `name`.
    pub fn get(&self, name: &str) -> Option<MethodRef> {
        self.methods.get(name).cloned()
    }

    /// The names of every method, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.methods.keys().copied().collect()
    }
}

/// Per-class columns a `class_epochs` figure may plot for `method`.
pub fn class_metrics(method: &dyn Method) -> Vec<String> {
    let mut v: Vec<String> = ["test_accuracy", "classifier_norm", "train_count"].iter().map(|s| s.to_string()).collect();
    v.extend(method.class_metrics().iter().map(|s| s.to_string()));
    v
}
