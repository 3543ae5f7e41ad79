//! Report specs: TOML files under `reports/`, parsed, overridden (profiles, `--set`) and
//! validated into a [`Spec`] that the planner consumes.
//!
//! A spec names a report (`[report]`), the data sets it uses (`[data.NAME]`), default training
//! parameters (`[defaults]`), experiments that sweep parameter grids over seeds
//! (`[experiments.ID]`), and the tables, figures and claims its template shows. Profiles
//! (`[profiles.NAME]`) are nothing but parameter overrides written as dotted paths, applied in
//! the same way as `--set key.path=value` on the command line, and validated like the file.
//! Every problem is reported with its place (file:line:col, or the override that caused it),
//! a message and a hint, all at once.

pub mod confine;
pub mod diag;
pub mod locate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diag::LineIndex;
pub use diag::{Diagnostic, Origin, SpecError};
use locate::Locator;

use crate::methods::{self, Method, MethodRef, Registry};
use crate::params::{self, ParamDef, ParamValue, Params};

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "quick";

/// `[report]`: what the report is and how it is drawn.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportSection {
    /// Short name; also the folder of its committed outputs under `artifacts/`.
    pub id: String,
    pub title: String,
    /// The research document the report reproduces (informational).
    #[serde(default)]
    pub document: Option<String>,
    /// Template under `templates/`.
    pub template: String,
    /// The method (algorithm) that trains this report's runs. Default `supervised`.
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The fewest seeds every run a claim reads gets, for claims without their own `seeds`:
    /// the planner adds the missing seeds (0, 1, 2, … not yet there) to those runs.
    #[serde(default)]
    pub claim_seeds: Option<usize>,
}

fn default_method() -> String {
    "supervised".to_string()
}

/// `[data.NAME]`: a data set from a manifest and how it is split.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataDecl {
    /// Manifest name: `data-manifests/<manifest>.toml`.
    pub manifest: String,
    /// Images per class held out as the balanced test set. Ignored when the manifest has its
    /// own test files (roles `train` and `test`).
    #[serde(default = "default_test_per_class")]
    pub test_per_class: usize,
    /// Seed of the train/test split. Default 0.
    #[serde(default)]
    pub split_seed: u64,
    /// Use only the first N classes (labels 0..N). Default: all of the manifest's classes.
    #[serde(default)]
    pub classes: Option<usize>,
}

fn default_test_per_class() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    params: toml::Table,
    #[serde(default)]
    grid: toml::Table,
    /// Explicit parameter combinations (e.g. an optimiser with its own learning rate),
    /// combined with every grid point.
    #[serde(default)]
    points: Vec<toml::Table>,
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    /// Profiles this experiment runs in (default: all). Elsewhere it is planned with no runs
    /// and its tables say so.
    #[serde(default)]
    profiles: Vec<String>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// One value or a list of them (`y = "nc1"` or `y = ["nc1", "nc3"]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Published numbers printed beside ours in a table, by row label.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceDecl {
    /// Column header, e.g. "document (CIFAR-10-LT, ResNet-32)".
    pub label: String,
    /// Row label (the values of the table's row parameters joined by " / ") → the published
    /// value as printed, or a table of metric → published value printed beside each of ours.
    pub values: BTreeMap<String, RefValue>,
    #[serde(default)]
    pub note: Option<String>,
}

/// A published value: one for the row, or one per metric.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RefValue {
    Row(String),
    PerMetric(BTreeMap<String, String>),
}

/// `[[tables]]`: final-epoch metrics of one experiment, one row per grid point, mean ± std over
/// seeds; or, with `params` instead of `metrics`, a parameter table: one row per parameter, the
/// document's value (`document`) beside the value the experiment's runs take in each profile.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableDecl {
    pub id: String,
    pub experiment: String,
    pub title: String,
    /// Parameters that label the rows. Default: the experiment's grid axes.
    #[serde(default)]
    pub rows: Vec<String>,
    #[serde(default)]
    pub metrics: Vec<String>,
    /// A parameter table's rows (instead of `metrics`).
    #[serde(default)]
    pub params: Vec<String>,
    /// A parameter table's document column: parameter → the document's value, as it prints it.
    #[serde(default)]
    pub document: BTreeMap<String, String>,
    #[serde(default)]
    pub reference: Option<ReferenceDecl>,
    #[serde(default)]
    pub caption: Option<String>,
    /// `runs` (the default): one row per grid point. `tasks`: one row per task of one run (the
    /// first seed of the runs `select` picks), its `metrics` read from the `per_task` frame: a
    /// task's own value, or its classes' values in class order.
    #[serde(default)]
    pub kind: TableKind,
    /// The runs a `tasks` table reads (the first seed of them is shown).
    #[serde(default)]
    pub select: Option<toml::Table>,
    /// The task set a `tasks` table reads (e.g. `id`); default: every set.
    #[serde(default)]
    pub set: Option<String>,
    /// The task value a `tasks` table sorts by (ascending); default: task order.
    #[serde(default)]
    pub sort: Option<String>,
    /// The most tasks a `tasks` table shows.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Metric → the metric holding its interval half-width per run (e.g. a 95 % interval over
    /// test episodes): the table prints the mean over seeds ± the mean half-width, and the spread
    /// over seeds beside it.
    #[serde(default)]
    pub intervals: BTreeMap<String, String>,
}

/// Kinds of table.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    #[default]
    Runs,
    Tasks,
}

/// Kinds of figure.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FigureKind {
    /// Final-epoch metric against a parameter (`x`), one line per `series` value.
    Line,
    /// Metric against epoch, one line per run (or per `series` value, averaged over seeds).
    Epochs,
    /// Bars of the training count per class, coloured by group.
    Classes,
    /// A per-class value (`y`) across epochs, one line per class, coloured by group.
    #[serde(rename = "class_epochs")]
    ClassEpochs,
    /// Per-task values (the `per_task` frame) of the runs `select` picks: `y` against `x`, one
    /// series per `y`, every task of every seed a point.
    Scatter,
}

/// `[[figures]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FigureDecl {
    pub id: String,
    pub experiment: String,
    pub title: String,
    pub kind: FigureKind,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub x_log: bool,
    #[serde(default)]
    pub y_log: bool,
    /// Metric(s); several make a panel each.
    #[serde(default = "default_y")]
    pub y: OneOrMany,
    #[serde(default)]
    /// Parameter(s) whose values make the lines; one line per combination.
    pub series: Option<OneOrMany>,
    #[serde(default)]
    pub caption: Option<String>,
    /// The runs a `scatter` figure reads (default: every run of the experiment).
    #[serde(default)]
    pub select: Option<toml::Table>,
    /// The task set a `scatter` figure reads (e.g. `id`); default: every set.
    #[serde(default)]
    pub set: Option<String>,
}

fn default_y() -> OneOrMany {
    OneOrMany::Many(Vec::new())
}

/// Kinds of claim check.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClaimKind {
    /// Spearman rank correlation of the final `metric` with parameter `x` over the runs has the
    /// sign of `direction` and magnitude ≥ `min_strength`.
    Trend,
    /// mean(metric | a) − mean(metric | b) lies in [min, max].
    Compare,
    /// metric at the last analysis epoch − metric at the first, averaged over the runs, lies in
    /// [min, max].
    Change,
    /// The final metric, averaged over the runs (those matching `a`, if given), lies in
    /// [min, max].
    Level,
    /// (mean(metric | a) − mean(metric | b)) − (mean(metric2 | a) − mean(metric2 | b)) lies in
    /// [min, max]: a difference of differences, e.g. "the gain is larger out of distribution".
    /// Each run contributes metric − metric2 (both from its final row), so the interval is
    /// Welch's on those per-run differences.
    Interaction,
    /// Spearman's ρ between two per-task values (`x` and `metric`, from the `per_task` frame)
    /// within each run (those matching `a`), averaged over the runs, lies in [min, max]. With
    /// `within = "task"`, ρ is taken over the classes of each task and averaged over the tasks
    /// first (tasks where either value is constant are left out).
    Association,
}

/// `[[claims]]`: a statement of the document checked on our numbers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClaimDecl {
    pub id: String,
    /// The claim in words, as the report prints it.
    pub text: String,
    pub experiment: String,
    pub kind: ClaimKind,
    pub metric: String,
    /// The second metric of an `interaction` claim.
    #[serde(default)]
    pub metric2: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    /// `increasing` or `decreasing` (trend claims).
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub min_strength: Option<f64>,
    /// Selections of runs by parameter values (compare claims).
    #[serde(default)]
    pub a: Option<toml::Table>,
    #[serde(default)]
    pub b: Option<toml::Table>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Whether `reprise verify` fails when the claim does not hold. Default false: most claims
    /// are findings to report, not guarantees.
    #[serde(default)]
    pub gate: bool,
    /// Where the claim comes from: the document, the literature, or ours.
    pub source: ClaimSource,
    /// The section or sentence of the document, or the citation (printed beside the claim).
    #[serde(default)]
    pub cite: Option<String>,
    /// The fewest seeds each run this claim reads gets (overrides `[report] claim_seeds`).
    #[serde(default)]
    pub seeds: Option<usize>,
    /// The task set an `association` claim reads (e.g. `id`); default: every set.
    #[serde(default)]
    pub set: Option<String>,
    /// `task`: an `association` claim's ρ is taken over the classes of each task.
    #[serde(default)]
    pub within: Option<String>,
}

impl ClaimDecl {
    /// Whether the claim reads a run with these parameters: a comparison or an interaction both of its sides, a
    /// level its selection `a` (every run without one), a trend or change every run.
    pub fn reads(&self, p: &Params) -> bool {
        match self.kind {
            ClaimKind::Compare | ClaimKind::Interaction => [&self.a, &self.b].iter().any(|sel| sel.as_ref().is_some_and(|t| selects(t, p))),
            ClaimKind::Level | ClaimKind::Association => self.a.as_ref().is_none_or(|t| selects(t, p)),
            ClaimKind::Trend | ClaimKind::Change => true,
        }
    }
}

/// Whether a selection such as `{ loss = "ce", lr = 0.1 }` picks a run with parameters `p`:
/// every key present with an equal value (numbers compared as numbers).
pub fn selects(sel: &toml::Table, p: &Params) -> bool {
    sel.iter().all(|(k, v)| match (params::from_toml(v), p.get(k)) {
        (Some(want), Some(have)) => match (want.as_f64(), have.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => want.canonical() == have.canonical(),
        },
        _ => false,
    })
}

/// The most seeds a claim may ask for.
const MAX_CLAIM_SEEDS: usize = 1000;

/// Adds seeds to the runs the claims read, so that each has at least the claim's `seeds` (or
/// `[report] claim_seeds`): for every configuration a claim reads, the seeds 0, 1, 2, … it does
/// not have yet, in that order, until it has enough. The new runs follow the experiment's own.
fn add_claim_seeds(experiments: &mut [Experiment], claims: &[ClaimDecl], default: Option<usize>) {
    for c in claims {
        let Some(want) = c.seeds.or(default) else { continue };
        let Some(e) = experiments.iter_mut().find(|e| e.id == c.experiment) else { continue };
        let mut added = Vec::new();
        for r in e.runs.iter().filter(|r| c.reads(&r.params)) {
            if added.iter().chain(&e.runs).any(|o: &RunSpec| o.params == r.params && o.seed < r.seed) {
                continue; // one pass per configuration, from its first run
            }
            let mut have: BTreeSet<u64> = e.runs.iter().chain(&added).filter(|o| o.params == r.params).map(|o| o.seed).collect();
            let mut next = 0u64;
            while have.len() < want {
                if have.insert(next) {
                    added.push(RunSpec { point: r.point.clone(), params: r.params.clone(), seed: next });
                }
                next += 1;
            }
        }
        e.runs.extend(added);
    }
}

/// Where a claim comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimSource {
    /// The research document the report reproduces.
    Document,
    /// Published work other than the document.
    Literature,
    /// This report's own question.
    Ours,
}

impl ClaimSource {
    pub fn name(self) -> &'static str {
        match self {
            ClaimSource::Document => "document",
            ClaimSource::Literature => "literature",
            ClaimSource::Ours => "ours",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    report: ReportSection,
    #[serde(default)]
    data: BTreeMap<String, DataDecl>,
    #[serde(default)]
    defaults: toml::Table,
    #[serde(default)]
    experiments: BTreeMap<String, ExperimentFile>,
    #[serde(default)]
    tables: Vec<TableDecl>,
    #[serde(default)]
    figures: Vec<FigureDecl>,
    #[serde(default)]
    claims: Vec<ClaimDecl>,
    #[serde(default)]
    profiles: BTreeMap<String, toml::Table>,
}

/// One training run: a grid point of an experiment with one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The grid point's values for the experiment's axes, e.g. {imbalance: 0.1}.
    pub point: Params,
    /// Every parameter of the method, resolved.
    pub params: Params,
    pub seed: u64,
}

impl RunSpec {
    /// "imbalance=0.1 seed=0".
    pub fn label(&self) -> String {
        let mut parts: Vec<String> = self.point.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("seed={}", self.seed));
        parts.join(" ")
    }
}

/// An experiment with its grid expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    /// False when the experiment is limited to other profiles: it then has no runs.
    pub active: bool,
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    /// Grid parameters, in the order the spec lists them.
    pub axes: Vec<String>,
    pub seeds: Vec<u64>,
    pub runs: Vec<RunSpec>,
}

/// A validated spec with one profile and the overrides applied.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The spec file as given on the command line (for messages only; never hashed).
    pub path: PathBuf,
    /// Project root: the folder holding `reports/`, `templates/`, `data-manifests/`.
    pub root: PathBuf,
    pub profile: String,
    /// The overrides applied, as `key.path=value` text (profile entries first, then `--set`).
    pub overrides: Vec<String>,
    pub report: ReportSection,
    pub data: BTreeMap<String, DataDecl>,
    pub experiments: Vec<Experiment>,
    pub tables: Vec<TableDecl>,
    pub figures: Vec<FigureDecl>,
    pub claims: Vec<ClaimDecl>,
    /// The method named by `report.method`, resolved when the spec was loaded.
    pub method: MethodRef,
    /// Every profile the spec declares (`[profiles.NAME]`), sorted.
    pub profiles: Vec<String>,
    /// The parameters of each experiment's runs in each profile that loads: the default profile
    /// first, then the declared ones (parameter tables show them side by side). The selected
    /// profile's entry includes the `--set` overrides.
    pub profile_params: Vec<(String, BTreeMap<String, Vec<Params>>)>,
}

impl Spec {
    /// The spec's path relative to the project root (`reports/x.toml`), for printed text that
    /// must not depend on where the command was run from.
    pub fn rel_path(&self) -> String {
        let abs = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        abs.strip_prefix(&self.root).map(|p| p.to_string_lossy().replace('\\', "/")).unwrap_or_else(|_| self.path.display().to_string())
    }

    pub fn experiment(&self, id: &str) -> Option<&Experiment> {
        self.experiments.iter().find(|e| e.id == id)
    }
}

/// Errors of loading a spec.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read spec {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The path exists but is a directory, a device or a FIFO (reading a FIFO would block).
    #[error("cannot read spec {path}: it is {what}")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("{0}")]
    Invalid(#[from] SpecError),
}

/// An override: a dotted path and a value.
#[derive(Debug, Clone)]
struct Override {
    path: Vec<String>,
    value: toml::Value,
    origin: Origin,
    text: String,
}

/// Load and validate `path` with `profile` and the command-line overrides (`key.path=value`),
/// with the built-in methods.
pub fn load(path: &Path, profile: &str, sets: &[String]) -> Result<Spec, LoadError> {
    load_with(path, profile, sets, &Registry::builtin())
}

/// [`load`] with the methods of `registry`.
pub fn load_with(path: &Path, profile: &str, sets: &[String], registry: &Registry) -> Result<Spec, LoadError> {
    check_regular(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    let root = project_root(path);
    Ok(parse_with(&text, path, &root, profile, sets, registry)?)
}

/// An error when `path` exists but is not a regular file (symlinks followed): a directory,
/// `/dev/null`, a FIFO. A path that does not exist passes; reading it then says "not found".
pub fn check_regular(path: &Path) -> Result<(), LoadError> {
    match confine::not_regular(path) {
        Some(what) => Err(LoadError::NotAFile { path: path.to_path_buf(), what }),
        None => Ok(()),
    }
}

/// The project root of a spec: the parent of its `reports/` folder, or its own folder.
pub fn project_root(spec_path: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(spec_path).unwrap_or_else(|_| spec_path.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "reports") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Parse and validate spec text (see [`load`]).
///
/// Besides the selected profile, every other profile of the spec is validated too (a typo in
/// `[profiles.paper]` is an error when running `quick`), and a problem that only the `--set`
/// overrides cause is blamed on the `--set` even where it shows at a line of the spec.
pub fn parse(text: &str, path: &Path, root: &Path, profile: &str, sets: &[String]) -> Result<Spec, SpecError> {
    parse_with(text, path, root, profile, sets, &Registry::builtin())
}

/// [`parse`] with the methods of `registry`.
pub fn parse_with(text: &str, path: &Path, root: &Path, profile: &str, sets: &[String], registry: &Registry) -> Result<Spec, SpecError> {
    // The profile names a folder (`artifacts/<id>-<profile>/`), so it is checked before use.
    if !confine::is_name(profile) {
        return Err(SpecError {
            diagnostics: vec![Diagnostic {
                origin: Origin::Argument { arg: format!("--profile {profile}") },
                message: confine::name_message("profile name", profile),
                hint: Some("a profile is a `[profiles.NAME]` section of the spec".into()),
            }],
        });
    }
    let outer = parse_one(text, path, root, Some(profile), sets, registry);
    let mut diags = match &outer {
        Ok(_) => Vec::new(),
        Err(e) => e.diagnostics.clone(),
    };
    if !diags.is_empty() && !sets.is_empty() {
        blame_sets(&mut diags, text, path, root, profile, sets, registry);
    }
    // Problems of the other profiles: what each adds to the spec without any profile.
    let others: Vec<String> = toml::from_str::<SpecFile>(text).map(|f| f.profiles.into_keys().filter(|n| n != profile).collect()).unwrap_or_default();
    let mut baseline: Option<Vec<Diagnostic>> = None;
    // What the other profiles run, kept for parameter tables ([`Spec::profile_params`]).
    let mut other_runs = BTreeMap::new();
    for other in others.iter().filter(|n| confine::is_name(n)) {
        let e = match parse_one(text, path, root, Some(other), &[], registry) {
            Ok(s) => {
                other_runs.insert(other.clone(), runs_by_experiment(&s));
                continue;
            }
            Err(e) => e,
        };
        let base = baseline.get_or_insert_with(|| parse_one(text, path, root, None, &[], registry).err().map(|e| e.diagnostics).unwrap_or_default());
        for mut d in e.diagnostics {
            if base.contains(&d) || diags.contains(&d) {
                continue;
            }
            if !matches!(&d.origin, Origin::Profile { name, .. } if name == other) {
                d.message = format!("with profile `{other}`: {}", d.message);
            }
            diags.push(d);
        }
    }
    match outer {
        Ok(mut spec) if diags.is_empty() => {
            spec.profile_params = profile_params(&spec, other_runs, text, path, root, registry);
            Ok(spec)
        }
        _ => Err(SpecError { diagnostics: diags }),
    }
}

/// The parameters of every run of each experiment of `s`.
fn runs_by_experiment(s: &Spec) -> BTreeMap<String, Vec<Params>> {
    s.experiments.iter().map(|e| (e.id.clone(), e.runs.iter().map(|r| r.params.clone()).collect())).collect()
}

/// [`Spec::profile_params`]: the parameters of every experiment's runs, per profile: the
/// selected one from `spec`, the other declared ones from the parses that validated them
/// (`other_runs`), the default one parsed here when it is neither.
fn profile_params(
    spec: &Spec,
    mut other_runs: BTreeMap<String, BTreeMap<String, Vec<Params>>>,
    text: &str,
    path: &Path,
    root: &Path,
    registry: &Registry,
) -> Vec<(String, BTreeMap<String, Vec<Params>>)> {
    let mut names = vec![DEFAULT_PROFILE.to_string()];
    names.extend(spec.profiles.iter().filter(|n| n.as_str() != DEFAULT_PROFILE).cloned());
    names
        .into_iter()
        .filter_map(|name| {
            if name == spec.profile {
                return Some((name, runs_by_experiment(spec)));
            }
            if let Some(runs) = other_runs.remove(&name) {
                return Some((name, runs));
            }
            // The default profile, when the spec does not declare it: the spec as written.
            let selected = (name != DEFAULT_PROFILE).then_some(name.as_str());
            parse_one(text, path, root, selected, &[], registry).ok().map(|s| (name, runs_by_experiment(&s)))
        })
        .collect()
}

/// Re-blame on a `--set` the problems that appear only with the `--set`s but are placed at a line
/// of the spec (a value overridden in `defaults` that breaks an experiment's runs, say): the line
/// is where the problem shows, the `--set` is what to change.
fn blame_sets(diags: &mut [Diagnostic], text: &str, path: &Path, root: &Path, profile: &str, sets: &[String], registry: &Registry) {
    let without = parse_one(text, path, root, Some(profile), &[], registry).err().map(|e| e.diagnostics).unwrap_or_default();
    for d in diags.iter_mut() {
        if !matches!(d.origin, Origin::File { .. } | Origin::FileOnly { .. }) || without.contains(d) {
            continue;
        }
        // With several `--set`s, the first that alone causes the same message; else the last.
        let culprit = if sets.len() == 1 {
            &sets[0]
        } else {
            sets.iter()
                .find(|s| parse_one(text, path, root, Some(profile), std::slice::from_ref(*s), registry).err().is_some_and(|e| e.diagnostics.iter().any(|x| x.message == d.message)))
                .unwrap_or(&sets[sets.len() - 1])
        };
        let place = match &d.origin {
            Origin::File { path, line, col, .. } => format!(" (it shows at {path}:{line}:{col})"),
            _ => String::new(),
        };
        d.message = format!("{}{place}", d.message);
        d.origin = Origin::Override { arg: culprit.clone() };
    }
}

/// One parse with one profile (`None`: no profile's overrides at all, the spec as written).
///
/// The first steps stop at their problem (nothing else can be checked without the typed file,
/// its method and a known profile); from the overrides on, every problem is collected.
fn parse_one(text: &str, path: &Path, root: &Path, profile: Option<&str>, sets: &[String], registry: &Registry) -> Result<Spec, SpecError> {
    let selected = profile;
    let profile = profile.unwrap_or(DEFAULT_PROFILE);
    let src = Source::new(text, path);

    // 1. The file itself, typed, and its method.
    let file = src.read()?;
    let method = src.resolve_method(&file, registry)?;

    // 2. Overrides: the profile's entries, then --set, applied to the document tree.
    let overrides = src.collect_overrides(&file, selected, sets)?;
    let mut cx = Checker::new(src, method.schema().defs, &file);
    let file = cx.apply_overrides(file, overrides)?;

    // 3. Semantics, every problem at once. Places changed by an override are blamed on it.
    cx.check_names(&file);
    cx.check_ids(&file);
    cx.check_experiment_profiles(&file);
    cx.check_template(&file.report, root);
    cx.check_manifests(&file.data, root);
    cx.check_data(&file.data);
    let base = cx.resolve_defaults(&file.defaults);
    let experiments: Vec<Experiment> = file.experiments.iter().map(|(id, ef)| cx.expand_experiment(id, ef, &base, method.as_ref(), profile)).collect();
    cx.check_runs(&experiments, method.as_ref());
    let known = Known::new(&experiments, method.as_ref(), cx.schema);
    cx.check_tables(&file.tables, &known);
    cx.check_figures(&file.figures, &known);
    cx.check_claims(&file.claims, &known);
    cx.check_claim_seeds(&file);
    let mut experiments = experiments;
    add_claim_seeds(&mut experiments, &file.claims, file.report.claim_seeds);
    let overrides = cx.finish()?;

    Ok(Spec {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        profile: profile.to_string(),
        overrides: overrides.iter().map(|o| o.text.clone()).collect(),
        report: file.report,
        data: file.data,
        experiments,
        tables: file.tables,
        figures: file.figures,
        claims: file.claims,
        method,
        profiles: file.profiles.keys().cloned().collect(),
        profile_params: Vec::new(),
    })
}

/// The spec text and how to point into it (file:line:col of a dotted path).
struct Source<'t> {
    text: &'t str,
    /// The spec's path as messages show it.
    shown: String,
    lines: LineIndex<'t>,
    locator: Locator,
}

impl<'t> Source<'t> {
    fn new(text: &'t str, path: &Path) -> Self {
        Source { text, shown: path.display().to_string(), lines: LineIndex::new(text), locator: Locator::new(text) }
    }

    /// The place of `path` in the file: its key with `key`, else its value (where the path ends
    /// early, the deepest part of it that exists).
    fn origin(&self, path: &[String], key: bool) -> Origin {
        let span = if key { self.locator.key_span(path) } else { self.locator.span(path) };
        self.lines.origin(&self.shown, span)
    }

    /// A toml syntax or type error as the one problem of the spec.
    fn toml_error(&self, e: &toml::de::Error) -> SpecError {
        SpecError { diagnostics: vec![toml_error(e, &self.shown, &self.lines)] }
    }

    /// The file, typed: syntax, unknown keys and wrong types, each at toml's span. A problem here
    /// stops the parse.
    fn read(&self) -> Result<SpecFile, SpecError> {
        toml::from_str(self.text).map_err(|e| self.toml_error(&e))
    }

    /// The document tree, untyped: what overrides are applied to.
    fn tree(&self) -> Result<toml::Value, SpecError> {
        toml::from_str(self.text).map_err(|e| self.toml_error(&e))
    }

    /// The method named by `report.method`. An unknown one stops the parse: its parameters are
    /// what the rest is checked against.
    fn resolve_method(&self, file: &SpecFile, registry: &Registry) -> Result<MethodRef, SpecError> {
        registry.get(&file.report.method).ok_or_else(|| {
            let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
            SpecError {
                diagnostics: vec![Diagnostic {
                    origin: self.origin(&segs("report.method"), false),
                    message: format!("unknown method `{}`", file.report.method),
                    hint: Some(params::suggest(&file.report.method, &names)),
                }],
            }
        })
    }

    /// The overrides to apply, in order: the selected profile's entries (none without a
    /// selected profile, nor for the default profile where the spec does not declare it), then
    /// every `--set`, parsed. A `--set` that is not `key.path=value` with one value is its own
    /// problem, kept in its place among the others. An unknown profile stops the parse.
    fn collect_overrides(&self, file: &SpecFile, selected: Option<&str>, sets: &[String]) -> Result<Vec<Result<Override, Diagnostic>>, SpecError> {
        let profile = selected.unwrap_or(DEFAULT_PROFILE);
        let mut overrides = Vec::new();
        if selected.is_some() && (profile != DEFAULT_PROFILE || file.profiles.contains_key(profile)) {
            let Some(entries) = file.profiles.get(profile) else {
                let mut names: Vec<String> = file.profiles.keys().cloned().collect();
                if !names.iter().any(|n| n == DEFAULT_PROFILE) {
                    names.insert(0, DEFAULT_PROFILE.to_string());
                }
                return Err(SpecError {
                    diagnostics: vec![Diagnostic {
                        origin: Origin::Argument { arg: format!("--profile {profile}") },
                        message: format!("unknown profile `{profile}`: {} has no `[profiles.{profile}]`", self.shown),
                        hint: Some(params::suggest(profile, &names)),
                    }],
                });
            };
            for (k, v) in entries {
                let span = self.locator.key_span(&[String::from("profiles"), profile.to_string(), k.clone()]);
                let (line, col, _) = self.lines.locate(span.map_or(0, |s| s.start));
                overrides.push(Ok(Override {
                    path: segs(k),
                    value: v.clone(),
                    origin: Origin::Profile { name: profile.to_string(), path: self.shown.clone(), line, col },
                    text: format!("{k}={}", inline_value(v)),
                }));
            }
        }
        for s in sets {
            let origin = Origin::Override { arg: s.clone() };
            overrides.push(match parse_set(s) {
                Ok((path, value)) => Ok(Override { path, value, origin, text: s.clone() }),
                Err((message, hint)) => Err(Diagnostic { origin, message, hint: Some(hint) }),
            });
        }
        // The method is resolved from the file before any override (its schema is what the
        // overrides are checked against), so an override of it would be silently ignored.
        for o in overrides.iter_mut() {
            if let Ok(ov) = o {
                if ov.path == segs("report.method") {
                    *o = Err(Diagnostic {
                        origin: ov.origin.clone(),
                        message: "`report.method` cannot be overridden: the method's schema is what every other parameter is checked against".into(),
                        hint: Some("copy the spec and change `report.method` in the copy".into()),
                    });
                }
            }
        }
        Ok(overrides)
    }
}

/// The checks of one parse once the file is typed and its method known: what they check
/// against, the overrides applied (a problem at a place an override changed is blamed on the
/// override), and every problem found so far.
struct Checker<'t> {
    src: Source<'t>,
    /// The method's parameters.
    schema: &'static [ParamDef],
    /// The spec's data sets as written (what a `dataset` parameter may name).
    data_names: Vec<String>,
    /// The overrides applied, in order.
    applied: Vec<Override>,
    diags: Vec<Diagnostic>,
}

impl<'t> Checker<'t> {
    fn new(src: Source<'t>, schema: &'static [ParamDef], file: &SpecFile) -> Self {
        Checker { src, schema, data_names: file.data.keys().cloned().collect(), applied: Vec::new(), diags: Vec::new() }
    }

    /// Where a problem at `path` is: the last applied override that set the path, a part of it
    /// or a section holding it; else its place in the file (see [`Source::origin`]).
    fn place(&self, path: &[String], key: bool) -> Origin {
        for o in self.applied.iter().rev() {
            let n = o.path.len().min(path.len());
            if o.path[..n] == path[..n] {
                return o.origin.clone();
            }
        }
        self.src.origin(path, key)
    }

    /// Records a problem at `path` (placed by [`Checker::place`]).
    fn err(&mut self, path: Vec<String>, key: bool, message: String, hint: Option<String>) {
        let origin = self.place(&path, key);
        self.diags.push(Diagnostic { origin, message, hint });
    }

    /// The applied overrides when no problem was found; else every problem, in the order found.
    fn finish(self) -> Result<Vec<Override>, SpecError> {
        if self.diags.is_empty() {
            Ok(self.applied)
        } else {
            Err(SpecError { diagnostics: self.diags })
        }
    }

    /// Applies the overrides to the document tree, in order, and types the spec again. Each
    /// wrong override is a problem of its own and is left out, so that the others are still
    /// applied and the spec still checked: a `--set` that did not parse, a path to a key the
    /// spec does not have (or to an unknown parameter), and an override that alone makes the
    /// spec ill-typed (see [`Checker::drop_ill_typed`]).
    fn apply_overrides(&mut self, file: SpecFile, overrides: Vec<Result<Override, Diagnostic>>) -> Result<SpecFile, SpecError> {
        if !overrides.iter().any(Result::is_ok) {
            self.diags.extend(overrides.into_iter().filter_map(Result::err));
            return Ok(file);
        }
        let base = self.src.tree()?;
        let mut tree = base.clone();
        let mut applied = Vec::new();
        for o in overrides {
            let o = match o {
                Ok(o) => o,
                Err(d) => {
                    self.diags.push(d);
                    continue;
                }
            };
            // On a copy: an override that fails half-way leaves nothing behind.
            let mut next = tree.clone();
            match apply_override(&mut next, &o, self.schema) {
                Ok(()) => {
                    tree = next;
                    applied.push(o);
                }
                Err((message, hint)) => self.diags.push(Diagnostic { origin: o.origin.clone(), message, hint }),
            }
        }
        match SpecFile::deserialize(tree) {
            Ok(f) => {
                self.applied = applied;
                Ok(f)
            }
            Err(e) => self.drop_ill_typed(&base, applied, e),
        }
    }

    /// The spec typed again where the `applied` overrides make it ill-typed (`e`): each override
    /// that alone does is a problem, blamed on it, and left out. Where no one alone does, or the
    /// rest is still ill-typed without them, the parse stops with the combination blamed on the
    /// last override; where the rest no longer applies without them, with their problems.
    fn drop_ill_typed(&mut self, base: &toml::Value, applied: Vec<Override>, e: toml::de::Error) -> Result<SpecFile, SpecError> {
        let count = applied.len();
        let mut fine = Vec::new();
        for o in applied {
            match typed_with(base, std::slice::from_ref(&o), self.schema) {
                Some(Err(e)) => self.diags.push(Diagnostic { origin: o.origin.clone(), message: format!("after applying the override: {}", e.message()), hint: None }),
                _ => fine.push(o),
            }
        }
        let rest = if fine.len() < count { typed_with(base, &fine, self.schema) } else { Some(Err(e)) };
        match rest {
            Some(Ok(f)) => {
                self.applied = fine;
                return Ok(f);
            }
            Some(Err(e)) => {
                let origin = fine.last().map(|o| o.origin.clone()).unwrap_or(Origin::FileOnly { path: self.src.shown.clone() });
                self.diags.push(Diagnostic { origin, message: format!("after applying the overrides: {}", e.message()), hint: None });
            }
            // The rest needs one of those left out: their problems say what to fix first.
            None => {}
        }
        Err(SpecError { diagnostics: std::mem::take(&mut self.diags) })
    }

    /// Names that become file and folder names: the report id and the names of experiments,
    /// data sets and profiles must be plain words (see [`confine`]).
    fn check_names(&mut self, file: &SpecFile) {
        if !confine::is_name(&file.report.id) {
            self.err(segs("report.id"), false, confine::name_message("report id", &file.report.id), Some("it names the report's folder under artifacts/".into()));
        }
        for (section, names, hint) in [
            ("experiments", file.experiments.keys().collect::<Vec<_>>(), "it names the experiment's runs and cells"),
            ("data", file.data.keys().collect(), "it names the data set's cells"),
            ("profiles", file.profiles.keys().collect(), "it names the report's folder, `artifacts/<id>-<profile>/`"),
        ] {
            for name in names.into_iter().filter(|n| !confine::is_name(n)) {
                let what = match section {
                    "experiments" => "experiment id",
                    "data" => "data set name",
                    _ => "profile name",
                };
                self.err(vec![section.to_string(), name.clone()], true, confine::name_message(what, name), Some(hint.into()));
            }
        }
    }

    /// The ids of tables, figures and claims must be plain words: they name the report's files
    /// (`tables/<id>.csv`, `figures/<id>.svg`) and the claims' anchors in report.html.
    fn check_ids(&mut self, file: &SpecFile) {
        for (what, ids) in
            [("tables", file.tables.iter().map(|t| &t.id).collect::<Vec<_>>()), ("figures", file.figures.iter().map(|f| &f.id).collect()), ("claims", file.claims.iter().map(|c| &c.id).collect())]
        {
            for (i, id) in ids.into_iter().enumerate().filter(|(_, id)| !confine::is_name(id)) {
                let kind = &what[..what.len() - 1];
                let hint = match what {
                    "claims" => "it is the claim's anchor in report.html".to_string(),
                    _ => format!("it names the file `{what}/<id>.{}` of the report", if what == "tables" { "csv" } else { "svg" }),
                };
                self.err(vec![what.to_string(), i.to_string(), "id".into()], false, confine::name_message(&format!("{kind} id"), id), Some(hint));
            }
        }
    }

    /// Every profile an experiment is limited to is declared (or is the default profile): an
    /// experiment limited to an unknown one would silently never run.
    fn check_experiment_profiles(&mut self, file: &SpecFile) {
        let declared: Vec<String> = std::iter::once(DEFAULT_PROFILE.to_string()).chain(file.profiles.keys().filter(|n| *n != DEFAULT_PROFILE).cloned()).collect();
        for (id, ef) in &file.experiments {
            for (i, p) in ef.profiles.iter().enumerate() {
                if !declared.contains(p) {
                    self.err(vec!["experiments".into(), id.clone(), "profiles".into(), i.to_string()], false, format!("unknown profile `{p}`"), Some(params::suggest(p, &declared)));
                }
            }
        }
    }

    /// The template is a file inside the project's `templates/` folder, nowhere else.
    fn check_template(&mut self, report: &ReportSection, root: &Path) {
        let templates = root.join("templates");
        if let Err(why) = confine::resolve_in(&templates, &report.template) {
            let known = confine::names_in(&templates, ".md.j2").into_iter().map(|n| format!("{n}.md.j2")).collect::<Vec<_>>();
            let hint = match why {
                confine::Confined::NotFound if !known.is_empty() => params::suggest(&report.template, &known),
                _ => "name a template file inside templates/, e.g. `report.md.j2`".to_string(),
            };
            self.err(segs("report.template"), false, why.message("template", &report.template, &templates), Some(hint));
        }
    }

    /// Each data set's manifest is a plain name whose file `data-manifests/<name>.toml` exists
    /// inside the project's `data-manifests/` folder (its content is read by the planner).
    fn check_manifests(&mut self, data: &BTreeMap<String, DataDecl>, root: &Path) {
        let manifests = root.join("data-manifests");
        for (name, d) in data {
            let at = vec!["data".into(), name.clone(), "manifest".into()];
            if !confine::is_name(&d.manifest) {
                self.err(at, false, confine::name_message("manifest name", &d.manifest), Some("write the manifest's name, `data-manifests/<name>.toml` without folder or extension".into()));
            } else if let Err(why) = confine::resolve_in(&manifests, &format!("{}.toml", d.manifest)) {
                let message = match why {
                    confine::Confined::NotFound => format!("unknown manifest `{}`: no {}", d.manifest, manifests.join(format!("{}.toml", d.manifest)).display()),
                    other => other.message("manifest", &format!("{}.toml", d.manifest), &manifests),
                };
                let known = confine::names_in(&manifests, ".toml");
                let hint = if known.is_empty() { "add the manifest under data-manifests/".to_string() } else { params::suggest(&d.manifest, &known) };
                self.err(at, false, message, Some(hint));
            }
        }
    }

    /// Each data set's numbers: at least one test image per class, and at least two classes.
    fn check_data(&mut self, data: &BTreeMap<String, DataDecl>) {
        for (name, d) in data {
            if d.test_per_class == 0 {
                self.err(vec!["data".into(), name.clone(), "test_per_class".into()], false, "`test_per_class` must be at least 1".into(), None);
            }
            if d.classes.is_some_and(|c| c < 2) {
                self.err(vec!["data".into(), name.clone(), "classes".into()], false, "`classes` must be at least 2".into(), None);
            }
        }
    }

    /// Every parameter of the method: the schema's defaults overlaid with the valid entries of
    /// `[defaults]`, each entry checked.
    fn resolve_defaults(&mut self, defaults: &toml::Table) -> Params {
        let mut base = Params::new();
        for def in self.schema {
            base.insert(def.name.to_string(), def.default.value());
        }
        self.check_params(defaults, &["defaults"], &mut base);
        base
    }

    /// Checks a table of parameters against the schema (a known name, one valid value each),
    /// writing the valid values into `out`.
    fn check_params(&mut self, table: &toml::Table, at: &[&str], out: &mut Params) {
        for (k, v) in table {
            let mut path: Vec<String> = at.iter().map(|s| s.to_string()).collect();
            path.push(k.clone());
            let Some(def) = self.schema.iter().find(|d| d.name == k) else {
                self.err(path, true, format!("unknown parameter `{k}`"), Some(params::suggest(k, &schema_names(self.schema))));
                continue;
            };
            match params::from_toml(v) {
                Some(pv) => match def.check(&pv, &self.data_names) {
                    Ok(ok) => {
                        out.insert(k.clone(), ok);
                    }
                    Err((m, h)) => self.err(path, false, m, h),
                },
                None if matches!(def.kind, params::ParamKind::IntList { .. }) => self.err(path, false, format!("`{k}` must be a list of integers"), Some(format!("write `{k} = [0, 1, 2]`"))),
                None => self.err(path, false, format!("`{k}` must be a single value"), Some("lists of values belong in an experiment's `grid`".into())),
            }
        }
    }

    /// One experiment with its grid expanded: its `params` checked over the defaults (`base`),
    /// its seeds, grid and points checked, and its runs (none where it is limited to profiles
    /// other than `profile`).
    fn expand_experiment(&mut self, id: &str, ef: &ExperimentFile, base: &Params, method: &dyn Method, profile: &str) -> Experiment {
        let mut params = base.clone();
        self.check_params(&ef.params, &["experiments", id, "params"], &mut params);
        if ef.seeds.is_empty() {
            self.err(experiment_path(id, "seeds"), false, format!("experiment `{id}` has an empty list of seeds"), Some("give at least one seed, e.g. `seeds = [0]`".into()));
        }
        let mut axes = self.check_grid(id, &ef.grid);
        let explicit = self.check_points(id, ef, &mut axes);
        let active = ef.profiles.is_empty() || ef.profiles.iter().any(|p| p == profile);
        Experiment {
            active,
            id: id.to_string(),
            title: ef.title.clone(),
            description: ef.description.clone(),
            axes: axes.iter().map(|(k, _)| k.clone()).collect(),
            seeds: ef.seeds.clone(),
            runs: if active { expand_runs(&params, &axes, &explicit, &ef.seeds, method) } else { Vec::new() },
        }
    }

    /// The axes of an experiment's grid, in the order the spec lists them, each with its valid
    /// values. An unknown parameter, an entry that is not a list and an empty list are problems
    /// (and no axis); so is each value the schema refuses (left out of its axis).
    fn check_grid(&mut self, id: &str, grid: &toml::Table) -> Vec<(String, Vec<ParamValue>)> {
        let mut axes = Vec::new();
        for (k, v) in grid {
            let at = experiment_path(id, &format!("grid.{k}"));
            let Some(def) = self.schema.iter().find(|d| d.name == k) else {
                self.err(at, true, format!("unknown parameter `{k}` in the grid of `{id}`"), Some(params::suggest(k, &schema_names(self.schema))));
                continue;
            };
            let Some(list) = v.as_array() else {
                self.err(at, false, format!("grid entry `{k}` must be a list of values"), Some(format!("write `{k} = [a, b, ...]`")));
                continue;
            };
            if list.is_empty() {
                self.err(at, false, format!("grid entry `{k}` of `{id}` is empty: the experiment would have no runs"), Some("list at least one value".into()));
                continue;
            }
            let mut vals = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let path = experiment_path(id, &format!("grid.{k}.{i}"));
                match params::from_toml(item) {
                    Some(pv) => match def.check(&pv, &self.data_names) {
                        Ok(ok) => vals.push(ok),
                        Err((m, h)) => self.err(path, false, m, h),
                    },
                    None if matches!(def.kind, params::ParamKind::IntList { .. }) => {
                        self.err(path, false, format!("grid values of `{k}` must be lists of integers"), Some(format!("a grid of lists: `{k} = [[0, 1], [2, 3]]`")))
                    }
                    None => self.err(path, false, format!("grid values of `{k}` must be plain values"), None),
                }
            }
            axes.push((k.clone(), vals));
        }
        axes
    }

    /// An experiment's explicit points, each checked like `params`. A parameter a point sets
    /// becomes an axis (with no grid values) and must not also be a grid axis. With no points,
    /// one empty point, so that the grid alone makes the runs.
    fn check_points(&mut self, id: &str, ef: &ExperimentFile, axes: &mut Vec<(String, Vec<ParamValue>)>) -> Vec<Params> {
        let mut explicit: Vec<Params> = Vec::new();
        for (i, table) in ef.points.iter().enumerate() {
            let mut p = Params::new();
            self.check_params(table, &["experiments", id, "points", &i.to_string()], &mut p);
            for k in p.keys() {
                if ef.grid.contains_key(k) {
                    self.err(experiment_path(id, &format!("points.{i}.{k}")), true, format!("`{k}` is both a grid axis and set by a point of `{id}`"), Some("keep each parameter in one place".into()));
                }
                if !axes.iter().any(|(a, _)| a == k) {
                    axes.push((k.clone(), Vec::new()));
                }
            }
            explicit.push(p);
        }
        if explicit.is_empty() {
            explicit.push(Params::new());
        }
        explicit
    }

    /// The method's checks that involve several parameters at once ([`Method::check_run`]): for
    /// each experiment, every problem of its first run that has any, located at the grid axis
    /// the problem names (else at the experiment) and naming the run.
    fn check_runs(&mut self, experiments: &[Experiment], method: &dyn Method) {
        for e in experiments {
            for r in &e.runs {
                let problems = method.check_run(&r.params);
                for pr in &problems {
                    let path = if e.axes.contains(&pr.param) { vec!["experiments".into(), e.id.clone(), "grid".into(), pr.param.clone()] } else { vec!["experiments".into(), e.id.clone()] };
                    self.err(path, true, format!("experiment `{}` ({}): {}", e.id, r.label(), pr.message), pr.hint.clone());
                }
                if !problems.is_empty() {
                    break;
                }
            }
        }
    }

    /// `name` is one of `known`; else "unknown {what} `name`", with the nearest known name as
    /// the hint.
    fn check_known(&mut self, path: Vec<String>, name: &str, known: &[String], what: &str) {
        if !known.iter().any(|x| x == name) {
            self.err(path, false, format!("unknown {what} `{name}`"), Some(params::suggest(name, known)));
        }
    }

    /// `[[tables]]`: unique ids, a known experiment, at least one metric, known metrics and
    /// known row parameters.
    fn check_tables(&mut self, tables: &[TableDecl], known: &Known) {
        let mut ids = BTreeSet::new();
        for (i, t) in tables.iter().enumerate() {
            let at = |rest: &str| segs(&format!("tables.{i}.{rest}"));
            if !ids.insert(t.id.clone()) {
                self.err(at("id"), false, format!("duplicate table id `{}`", t.id), None);
            }
            self.check_known(at("experiment"), &t.experiment, &known.experiments, "experiment");
            match (t.metrics.is_empty(), t.params.is_empty()) {
                (true, true) => self.err(at("metrics"), false, format!("table `{}` lists no metrics (or `params`, for a parameter table)", t.id), None),
                (false, false) => self.err(
                    at("params"),
                    false,
                    format!("table `{}` lists both metrics and parameters", t.id),
                    Some("a table shows either measured metrics or the runs' parameters: split it in two".into()),
                ),
                _ => {}
            }
            for (j, p) in t.params.iter().enumerate() {
                self.check_known(at(&format!("params.{j}")), p, &known.params, "parameter");
            }
            for p in t.document.keys() {
                if !t.params.contains(p) {
                    self.err(at(&format!("document.{p}")), false, format!("table `{}` gives the document's value of `{p}`, which is not one of its `params`", t.id), None);
                }
            }
            let tasks = t.kind == TableKind::Tasks;
            for (j, m) in t.metrics.iter().enumerate() {
                if tasks {
                    self.check_known(at(&format!("metrics.{j}")), m, &known.task_values, "per-task value");
                } else {
                    self.check_known(at(&format!("metrics.{j}")), m, &known.metrics, "metric");
                }
            }
            for (j, r) in t.rows.iter().enumerate() {
                self.check_known(at(&format!("rows.{j}")), r, &known.params, "parameter");
            }
            if !tasks && (t.select.is_some() || t.set.is_some() || t.sort.is_some() || t.limit.is_some()) {
                self.err(at("kind"), false, format!("table `{}`: `select`, `set`, `sort` and `limit` belong to `tasks` tables", t.id), Some("add `kind = \"tasks\"`, or remove them".into()));
            }
            if let Some(sort) = &t.sort {
                self.check_known(at("sort"), sort, &known.task_values, "per-task value");
            }
            for k in t.select.iter().flat_map(|t| t.keys()) {
                self.check_known(at(&format!("select.{k}")), k, &known.params, "parameter");
            }
            for (m, ci) in &t.intervals {
                if tasks || !t.metrics.contains(m) {
                    self.err(at(&format!("intervals.{m}")), false, format!("table `{}` gives an interval for `{m}`, which is not one of its metrics", t.id), None);
                }
                self.check_known(at(&format!("intervals.{m}")), ci, &known.metrics, "metric");
            }
        }
    }

    /// `[[figures]]`: unique ids, a known experiment, known metrics (per-class values for
    /// `class_epochs`) and parameters, and what each kind needs (`y` but for `classes`, `x` for
    /// `line`).
    fn check_figures(&mut self, figures: &[FigureDecl], known: &Known) {
        let mut ids = BTreeSet::new();
        for (i, f) in figures.iter().enumerate() {
            let at = |rest: &str| segs(&format!("figures.{i}.{rest}"));
            if !ids.insert(f.id.clone()) {
                self.err(at("id"), false, format!("duplicate figure id `{}`", f.id), None);
            }
            self.check_known(at("experiment"), &f.experiment, &known.experiments, "experiment");
            for (j, m) in f.y.to_vec().iter().enumerate() {
                if f.kind == FigureKind::ClassEpochs {
                    self.check_known(at(&format!("y.{j}")), m, &known.class_metrics, "per-class value");
                } else if f.kind == FigureKind::Scatter {
                    self.check_known(at(&format!("y.{j}")), m, &known.task_values, "per-task value");
                } else {
                    self.check_known(at(&format!("y.{j}")), m, &known.metrics, "metric");
                }
            }
            if f.kind != FigureKind::Classes && f.y.to_vec().is_empty() {
                self.err(at("kind"), false, format!("figure `{}` needs `y`, the metric(s) to plot", f.id), None);
            }
            if matches!(f.kind, FigureKind::Line | FigureKind::Scatter) && f.x.is_none() {
                let what = if f.kind == FigureKind::Line { "parameter" } else { "per-task value" };
                self.err(at("kind"), false, format!("{} figure `{}` needs `x`, the {what} on the horizontal axis", if f.kind == FigureKind::Line { "line" } else { "scatter" }, f.id), None);
            }
            match (&f.x, f.kind) {
                (Some(x), FigureKind::Scatter) => self.check_known(at("x"), x, &known.task_values, "per-task value"),
                (Some(x), _) => self.check_known(at("x"), x, &known.params, "parameter"),
                (None, _) => {}
            }
            if f.kind != FigureKind::Scatter && (f.select.is_some() || f.set.is_some()) {
                self.err(at("select"), false, format!("figure `{}`: `select` and `set` belong to `scatter` figures", f.id), None);
            }
            for k in f.select.iter().flat_map(|t| t.keys()) {
                self.check_known(at(&format!("select.{k}")), k, &known.params, "parameter");
            }
            for (j, s) in f.series.as_ref().map(OneOrMany::to_vec).unwrap_or_default().iter().enumerate() {
                self.check_known(at(&format!("series.{j}")), s, &known.params, "parameter");
            }
        }
    }

    /// `[report] claim_seeds` and each claim's `seeds`: between 1 and [`MAX_CLAIM_SEEDS`].
    fn check_claim_seeds(&mut self, file: &SpecFile) {
        let mut at = vec![(segs("report.claim_seeds"), file.report.claim_seeds)];
        at.extend(file.claims.iter().enumerate().map(|(i, c)| (segs(&format!("claims.{i}.seeds")), c.seeds)));
        for (path, n) in at {
            if let Some(n) = n.filter(|&n| n == 0 || n > MAX_CLAIM_SEEDS) {
                self.err(
                    path,
                    false,
                    format!("{n} seeds per claim: give between 1 and {MAX_CLAIM_SEEDS}"),
                    Some("3 seeds separate most effects from seed noise; the power note of an inconclusive claim says how many more".into()),
                );
            }
        }
    }

    /// `[[claims]]`: unique ids, a known experiment and metric, and what each kind needs (a
    /// known `x` and a `direction` for a trend, selections `a` and `b` of known parameters for a
    /// comparison, `min` and/or `max` but for a trend).
    fn check_claims(&mut self, claims: &[ClaimDecl], known: &Known) {
        let mut ids = BTreeSet::new();
        for (i, c) in claims.iter().enumerate() {
            let at = |rest: &str| segs(&format!("claims.{i}.{rest}"));
            if !ids.insert(c.id.clone()) {
                self.err(at("id"), false, format!("duplicate claim id `{}`", c.id), None);
            }
            self.check_known(at("experiment"), &c.experiment, &known.experiments, "experiment");
            if c.kind == ClaimKind::Association {
                self.check_known(at("metric"), &c.metric, &known.task_values, "per-task value");
            } else {
                self.check_known(at("metric"), &c.metric, &known.metrics, "metric");
                for (field, set) in [("set", c.set.is_some()), ("within", c.within.is_some())] {
                    if set {
                        self.err(at(field), false, format!("claim `{}`: `{field}` belongs to `association` claims", c.id), None);
                    }
                }
            }
            match c.kind {
                ClaimKind::Trend => {
                    match &c.x {
                        Some(x) => self.check_known(at("x"), x, &known.params, "parameter"),
                        None => self.err(at("kind"), false, format!("trend claim `{}` needs `x`", c.id), None),
                    }
                    if !matches!(c.direction.as_deref(), Some("increasing") | Some("decreasing")) {
                        self.err(at("direction"), false, format!("trend claim `{}` needs `direction = \"increasing\"` or `\"decreasing\"`", c.id), None);
                    }
                }
                ClaimKind::Compare | ClaimKind::Interaction => {
                    if c.kind == ClaimKind::Interaction {
                        match &c.metric2 {
                            Some(m) => self.check_known(at("metric2"), m, &known.metrics, "metric"),
                            None => self.err(at("kind"), false, format!("interaction claim `{}` needs `metric2`, the metric the difference is compared with", c.id), None),
                        }
                    }
                    for (side, sel) in [("a", &c.a), ("b", &c.b)] {
                        match sel {
                            None => {
                                let kind = if c.kind == ClaimKind::Interaction { "interaction" } else { "compare" };
                                self.err(at("kind"), false, format!("{kind} claim `{}` needs `{side}`, a selection such as `{{ loss = \"ce\" }}`", c.id), None)
                            }
                            Some(t) => {
                                for k in t.keys() {
                                    self.check_known(at(&format!("{side}.{k}")), k, &known.params, "parameter");
                                }
                            }
                        }
                    }
                }
                ClaimKind::Change => {}
                ClaimKind::Association => {
                    match &c.x {
                        Some(x) => self.check_known(at("x"), x, &known.task_values, "per-task value"),
                        None => self.err(at("kind"), false, format!("association claim `{}` needs `x`, the per-task value `metric` is ranked against", c.id), None),
                    }
                    if c.within.as_deref().is_some_and(|w| w != "task") {
                        self.err(at("within"), false, format!("association claim `{}`: `within` can only be \"task\" (ρ over each task's classes)", c.id), None);
                    }
                    for k in c.a.iter().flat_map(|t| t.keys()) {
                        self.check_known(at(&format!("a.{k}")), k, &known.params, "parameter");
                    }
                }
                ClaimKind::Level => {
                    for k in c.a.iter().flat_map(|t| t.keys()) {
                        self.check_known(at(&format!("a.{k}")), k, &known.params, "parameter");
                    }
                }
            }
            if c.min.is_none() && c.max.is_none() && c.kind != ClaimKind::Trend {
                self.err(at("kind"), false, format!("claim `{}` needs `min` and/or `max`", c.id), None);
            }
        }
    }
}

/// The names that tables, figures and claims may refer to.
struct Known {
    experiments: Vec<String>,
    metrics: Vec<String>,
    params: Vec<String>,
    /// The per-class values a `class_epochs` figure may plot.
    class_metrics: Vec<String>,
    /// The per-task values of the `per_task` frame (`task` and `class` too).
    task_values: Vec<String>,
}

impl Known {
    fn new(experiments: &[Experiment], method: &dyn Method, schema: &[ParamDef]) -> Self {
        Known {
            experiments: experiments.iter().map(|e| e.id.clone()).collect(),
            metrics: method.metrics().iter().map(|s| s.to_string()).collect(),
            params: schema_names(schema),
            class_metrics: methods::class_metrics(method),
            task_values: ["task", "class"].iter().chain(method.task_values()).map(|s| s.to_string()).collect(),
        }
    }
}

/// The runs of an experiment: every point of the grid (the axes with values) combined with
/// every explicit point, with every seed, over `params`. What a run's configuration does not
/// read ([`Method::inactive`]) leaves the run and its point, and runs that then differ in
/// nothing are one run.
fn expand_runs(params: &Params, axes: &[(String, Vec<ParamValue>)], explicit: &[Params], seeds: &[u64], method: &dyn Method) -> Vec<RunSpec> {
    let grid_axes: Vec<(String, Vec<ParamValue>)> = axes.iter().filter(|(_, v)| !v.is_empty()).cloned().collect();
    let mut runs = Vec::new();
    for point in cartesian(&grid_axes).into_iter().flat_map(|g| {
        explicit.iter().map(move |e| {
            let mut q = g.clone();
            q.extend(e.clone());
            q
        })
    }) {
        for &seed in seeds {
            let mut p = params.clone();
            for (k, v) in &point {
                p.insert(k.clone(), v.clone());
            }
            // What this configuration does not read leaves the run (and its key).
            for k in method.inactive(&p) {
                p.remove(k);
            }
            let mut point = point.clone();
            point.retain(|k, _| p.contains_key(k));
            if !runs.iter().any(|r: &RunSpec| r.params == p && r.seed == seed) {
                runs.push(RunSpec { point, params: p, seed });
            }
        }
    }
    runs
}

/// The spec typed with `overrides` applied to `base`; `None` where one of them does not apply.
fn typed_with(base: &toml::Value, overrides: &[Override], schema: &[ParamDef]) -> Option<Result<SpecFile, toml::de::Error>> {
    let mut tree = base.clone();
    for o in overrides {
        apply_override(&mut tree, o, schema).ok()?;
    }
    Some(SpecFile::deserialize(tree))
}

/// `experiments.<id>.<rest>` as a path.
fn experiment_path(id: &str, rest: &str) -> Vec<String> {
    let mut v = vec!["experiments".to_string(), id.to_string()];
    v.extend(segs(rest));
    v
}

fn schema_names(schema: &[ParamDef]) -> Vec<String> {
    schema.iter().map(|d| d.name.to_string()).collect()
}

/// Every combination of the axes' values, in order (the last axis varies fastest).
fn cartesian(axes: &[(String, Vec<ParamValue>)]) -> Vec<Params> {
    let mut out = vec![Params::new()];
    for (k, vals) in axes {
        let mut next = Vec::with_capacity(out.len() * vals.len());
        for p in &out {
            for v in vals {
                let mut q = p.clone();
                q.insert(k.clone(), v.clone());
                next.push(q);
            }
        }
        out = next;
    }
    out
}

fn segs(path: &str) -> Vec<String> {
    path.split('.').map(String::from).collect()
}

fn inline_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `key.path=value`: the value is read as TOML (`5`, `0.1`, `true`, `[1, 2]`, `"x"`), or as a
/// bare string when it is a plain word that is not TOML (`--set defaults.model=cnn`). A value
/// that starts like a number, list, table or quoted string but is not valid TOML (`[1,2`,
/// `1e400`) is an error rather than a string, and so is a line break, which would otherwise
/// end the value early.
fn parse_set(s: &str) -> Result<(Vec<String>, toml::Value), (String, String)> {
    let form = || "write `--set section.key=value`, e.g. `--set defaults.epochs=5`".to_string();
    let (k, v) = s.split_once('=').ok_or_else(|| (format!("`{s}` is not of the form key.path=value"), form()))?;
    let k = k.trim();
    if k.is_empty() || k.split('.').any(str::is_empty) {
        return Err((format!("`{k}` is not a dotted key path"), form()));
    }
    let v = v.trim();
    let bad = |message: String| (message, "give one TOML value (`5`, `0.1`, `true`, `[1, 2]`, `\"text\"`) or a plain word".to_string());
    if v.contains(['\n', '\r']) {
        return Err(bad(format!("the value of `{k}` contains a line break; give a value on one line")));
    }
    // TOML calls `1e400` an invalid float and `99999999999999999999` an invalid integer; both
    // are numbers that do not fit, which is what the user needs to hear.
    let digits = v.replace('_', "");
    let number_like = digits.strip_prefix(['+', '-']).unwrap_or(&digits).starts_with(|c: char| c.is_ascii_digit());
    if number_like && digits.parse::<f64>().is_ok_and(|x| x.is_infinite()) {
        return Err(bad(format!("the value `{v}` of `{k}` is out of range for a number")));
    }
    if number_like && digits.strip_prefix(['+', '-']).unwrap_or(&digits).chars().all(|c| c.is_ascii_digit()) && digits.parse::<i64>().is_err() {
        return Err(bad(format!("the value `{v}` of `{k}` is out of range for an integer (at most {})", i64::MAX)));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(e) if v.starts_with(|c: char| c.is_ascii_digit() || "[{\"'+-.".contains(c)) => {
            let why = e.message().lines().next().unwrap_or("invalid value").trim().to_string();
            return Err(bad(format!("the value `{v}` of `{k}` is not a valid TOML value ({why})")));
        }
        Err(_) => toml::Value::String(v.to_string()),
    };
    if let Some(x) = non_finite(&value) {
        if !v.contains("inf") && !v.contains("nan") {
            return Err(bad(format!("the value `{v}` of `{k}` is out of range for a number (it reads as {x})")));
        }
    }
    Ok((segs(k), value))
}

/// The first infinite or NaN float in a value (a literal such as `1e400` overflows to infinity).
fn non_finite(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some(*f),
        toml::Value::Array(a) => a.iter().find_map(non_finite),
        toml::Value::Table(t) => t.values().find_map(non_finite),
        _ => None,
    }
}

/// Apply one override to the document tree. The path must name an existing key, or a parameter
/// of the method inside `defaults`, an experiment's `params` or `grid`.
fn apply_override(tree: &mut toml::Value, o: &Override, schema: &[ParamDef]) -> Result<(), (String, Option<String>)> {
    let shown = o.path.join(".");
    let (last, parents) = o.path.split_last().ok_or_else(|| ("empty key path".to_string(), None))?;
    let param_section = matches!(parents.first().map(String::as_str), Some("defaults")) || (parents.len() == 3 && parents[0] == "experiments" && (parents[2] == "params" || parents[2] == "grid"));
    let mut node = tree;
    for (i, seg) in parents.iter().enumerate() {
        let here = o.path[..i].join(".");
        node = match node {
            toml::Value::Table(t) => {
                if !t.contains_key(seg) {
                    // Sections a spec may leave out are created on demand.
                    let creatable = (i == 0 && seg == "defaults") || (i == 2 && param_section);
                    if !creatable {
                        let known: Vec<String> = t.keys().cloned().collect();
                        let place = if here.is_empty() { "the spec".to_string() } else { format!("`{here}`") };
                        return Err((format!("`{shown}`: {place} has no key `{seg}`"), Some(params::suggest(seg, &known))));
                    }
                    t.insert(seg.clone(), toml::Value::Table(toml::Table::new()));
                }
                t.get_mut(seg).ok_or_else(|| (format!("`{shown}`: cannot reach `{seg}`"), None))?
            }
            toml::Value::Array(a) => {
                let idx: usize = seg.parse().map_err(|_| (format!("`{shown}`: `{here}` is a list; index it with a number"), None))?;
                let len = a.len();
                a.get_mut(idx).ok_or_else(|| (format!("`{shown}`: `{here}` has {len} entries"), None))?
            }
            _ => return Err((format!("`{shown}`: `{here}` is a value, not a section"), None)),
        };
    }
    let toml::Value::Table(t) = node else {
        return Err((format!("`{shown}`: the parent of `{last}` is not a section"), None));
    };
    if param_section {
        if !schema.iter().any(|d| d.name == last) {
            return Err((format!("`{shown}`: unknown parameter `{last}`"), Some(params::suggest(last, &schema_names(schema)))));
        }
    } else if !t.contains_key(last) && !optional_fields(parents).contains(&last.as_str()) {
        let mut known: Vec<String> = t.keys().cloned().collect();
        known.extend(optional_fields(parents).iter().map(|s| s.to_string()));
        known.sort();
        known.dedup();
        return Err((format!("`{shown}`: no key `{last}` to override"), Some(params::suggest(last, &known))));
    }
    t.insert(last.clone(), o.value.clone());
    Ok(())
}

/// Fields a section may leave out that an override may still set.
fn optional_fields(parents: &[String]) -> &'static [&'static str] {
    match parents.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["experiments", _] => &["description", "params", "grid", "points", "seeds", "profiles"],
        ["data", _] => &["test_per_class", "split_seed", "classes"],
        ["report"] => &["document", "method", "description", "claim_seeds"],
        _ => &[],
    }
}

/// A toml parse or type error as a diagnostic, with "did you mean" for unknown keys.
fn toml_error(e: &toml::de::Error, path: &str, lines: &LineIndex) -> Diagnostic {
    let msg = e.message().trim().to_string();
    let mut hint = None;
    // serde's wording: "unknown field `lne`, expected one of `a`, `b`" (or "expected `a`").
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((word, tail)) = rest.split_once('`') {
            let cands: Vec<String> = tail.split('`').skip(1).step_by(2).map(String::from).collect();
            if !cands.is_empty() {
                hint = Some(params::suggest(word, &cands));
            }
        }
    } else if msg.contains("unknown variant `") {
        if let Some(rest) = msg.split("unknown variant `").nth(1) {
            if let Some((word, tail)) = rest.split_once('`') {
                let cands: Vec<String> = tail.split('`').skip(1).step_by(2).map(String::from).collect();
                if !cands.is_empty() {
                    hint = Some(params::suggest(word, &cands));
                }
            }
        }
    } else if msg.starts_with("missing field") {
        hint = Some("add the field; see the README's spec reference".into());
    }
    let message = msg.lines().next().unwrap_or("invalid TOML").to_string();
    Diagnostic { origin: lines.origin(path, e.span()), message, hint }
}

#[cfg(test)]
mod tests;
