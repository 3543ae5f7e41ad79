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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diag::LineIndex;
pub use diag::{Diagnostic, Origin, SpecError};
use locate::Locator;

use crate::methods::{self, MethodRef, Registry};
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
/// seeds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableDecl {
    pub id: String,
    pub experiment: String,
    pub title: String,
    /// Parameters that label the rows. Default: the experiment's grid axes.
    #[serde(default)]
    pub rows: Vec<String>,
    pub metrics: Vec<String>,
    #[serde(default)]
    pub reference: Option<ReferenceDecl>,
    #[serde(default)]
    pub caption: Option<String>,
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
    for other in others.iter().filter(|n| confine::is_name(n)) {
        let Err(e) = parse_one(text, path, root, Some(other), &[], registry) else { continue };
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
        Ok(spec) if diags.is_empty() => Ok(spec),
        _ => Err(SpecError { diagnostics: diags }),
    }
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
fn parse_one(text: &str, path: &Path, root: &Path, profile: Option<&str>, sets: &[String], registry: &Registry) -> Result<Spec, SpecError> {
    let selected = profile;
    let profile = profile.unwrap_or(DEFAULT_PROFILE);
    let shown = path.display().to_string();
    let lines = LineIndex::new(text);
    let locator = Locator::new(text);

    // 1. The file itself, typed: syntax, unknown keys and wrong types, with toml's span.
    let file: SpecFile = toml::from_str(text).map_err(|e| SpecError { diagnostics: vec![toml_error(&e, &shown, &lines)] })?;
    let mut diags = Vec::new();
    let data_names: Vec<String> = file.data.keys().cloned().collect();
    let Some(method) = registry.get(&file.report.method) else {
        let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
        return Err(SpecError {
            diagnostics: vec![Diagnostic {
                origin: lines.origin(&shown, locator.span(&segs("report.method"))),
                message: format!("unknown method `{}`", file.report.method),
                hint: Some(params::suggest(&file.report.method, &names)),
            }],
        });
    };
    let schema: &[ParamDef] = method.schema().defs;

    // 2. Overrides: the profile's entries, then --set, applied to the document tree.
    let mut overrides = Vec::new();
    if selected.is_some() && (profile != DEFAULT_PROFILE || file.profiles.contains_key(profile)) {
        match file.profiles.get(profile) {
            Some(entries) => {
                for (k, v) in entries {
                    let span = locator.key_span(&[String::from("profiles"), profile.to_string(), k.clone()]);
                    let (line, col, _) = lines.locate(span.map_or(0, |s| s.start));
                    overrides.push(Override {
                        path: segs(k),
                        value: v.clone(),
                        origin: Origin::Profile { name: profile.to_string(), path: shown.clone(), line, col },
                        text: format!("{k}={}", inline_value(v)),
                    });
                }
            }
            None => {
                let mut names: Vec<String> = file.profiles.keys().cloned().collect();
                if !names.iter().any(|n| n == DEFAULT_PROFILE) {
                    names.insert(0, DEFAULT_PROFILE.to_string());
                }
                return Err(SpecError {
                    diagnostics: vec![Diagnostic {
                        origin: Origin::Argument { arg: format!("--profile {profile}") },
                        message: format!("unknown profile `{profile}`: {shown} has no `[profiles.{profile}]`"),
                        hint: Some(params::suggest(profile, &names)),
                    }],
                });
            }
        }
    }
    for s in sets {
        match parse_set(s) {
            Ok((path, value)) => overrides.push(Override { path, value, origin: Origin::Override { arg: s.clone() }, text: s.clone() }),
            Err((message, hint)) => diags.push(Diagnostic { origin: Origin::Override { arg: s.clone() }, message, hint: Some(hint) }),
        }
    }
    if !diags.is_empty() {
        return Err(SpecError { diagnostics: diags });
    }

    let file = if overrides.is_empty() {
        file
    } else {
        let mut tree: toml::Value = toml::from_str(text).map_err(|e| SpecError { diagnostics: vec![toml_error(&e, &shown, &lines)] })?;
        for o in &overrides {
            if let Err((msg, hint)) = apply_override(&mut tree, o, schema) {
                diags.push(Diagnostic { origin: o.origin.clone(), message: msg, hint });
            }
        }
        if !diags.is_empty() {
            return Err(SpecError { diagnostics: diags });
        }
        match SpecFile::deserialize(tree) {
            Ok(f) => f,
            Err(e) => {
                // Blame each override that alone makes the document ill-typed; where only their
                // combination does, the last one.
                let base: toml::Value = toml::from_str(text).map_err(|e| SpecError { diagnostics: vec![toml_error(&e, &shown, &lines)] })?;
                for o in &overrides {
                    let mut one = base.clone();
                    if apply_override(&mut one, o, schema).is_ok() {
                        if let Err(e) = SpecFile::deserialize(one) {
                            diags.push(Diagnostic { origin: o.origin.clone(), message: format!("after applying the override: {}", e.message()), hint: None });
                        }
                    }
                }
                if diags.is_empty() {
                    let origin = overrides.last().map(|o| o.origin.clone()).unwrap_or(Origin::FileOnly { path: shown.clone() });
                    diags.push(Diagnostic { origin, message: format!("after applying the overrides: {}", e.message()), hint: None });
                }
                return Err(SpecError { diagnostics: diags });
            }
        }
    };

    // 3. Semantics, every problem at once. Places changed by an override are blamed on it.
    let place = |path: &[String], key: bool| -> Origin {
        for o in overrides.iter().rev() {
            let n = o.path.len().min(path.len());
            if o.path[..n] == path[..n] {
                return o.origin.clone();
            }
        }
        let span = if key { locator.key_span(path) } else { locator.span(path) };
        lines.origin(&shown, span)
    };
    let mut diags = Vec::new();
    let mut err = |path: Vec<String>, key: bool, message: String, hint: Option<String>| {
        diags.push(Diagnostic { origin: place(&path, key), message, hint });
    };

    // Names that become file and folder names, or HTML ids: plain words only (see `confine`).
    if !confine::is_name(&file.report.id) {
        err(segs("report.id"), false, confine::name_message("report id", &file.report.id), Some("it names the report's folder under artifacts/".into()));
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
            err(vec![section.to_string(), name.clone()], true, confine::name_message(what, name), Some(hint.into()));
        }
    }
    for (what, ids) in
        [("tables", file.tables.iter().map(|t| &t.id).collect::<Vec<_>>()), ("figures", file.figures.iter().map(|f| &f.id).collect()), ("claims", file.claims.iter().map(|c| &c.id).collect())]
    {
        for (i, id) in ids.into_iter().enumerate().filter(|(_, id)| !confine::is_name(id)) {
            let kind = &what[..what.len() - 1];
            let hint = match what {
                "claims" => "it is the claim's anchor in report.html".to_string(),
                _ => format!("it names the file `{what}/<id>.{}` of the report", if what == "tables" { "csv" } else { "svg" }),
            };
            err(vec![what.to_string(), i.to_string(), "id".into()], false, confine::name_message(&format!("{kind} id"), id), Some(hint));
        }
    }
    let declared_profiles: Vec<String> = std::iter::once(DEFAULT_PROFILE.to_string()).chain(file.profiles.keys().filter(|n| *n != DEFAULT_PROFILE).cloned()).collect();
    for (id, ef) in &file.experiments {
        for (i, p) in ef.profiles.iter().enumerate() {
            if !declared_profiles.contains(p) {
                err(vec!["experiments".into(), id.clone(), "profiles".into(), i.to_string()], false, format!("unknown profile `{p}`"), Some(params::suggest(p, &declared_profiles)));
            }
        }
    }

    // The template and the manifests are read from the project's own folders, nowhere else.
    let templates = root.join("templates");
    if let Err(why) = confine::resolve_in(&templates, &file.report.template) {
        let known = confine::names_in(&templates, ".md.j2").into_iter().map(|n| format!("{n}.md.j2")).collect::<Vec<_>>();
        let hint = match why {
            confine::Confined::NotFound if !known.is_empty() => params::suggest(&file.report.template, &known),
            _ => "name a template file inside templates/, e.g. `report.md.j2`".to_string(),
        };
        err(segs("report.template"), false, why.message("template", &file.report.template, &templates), Some(hint));
    }
    let manifests = root.join("data-manifests");
    for (name, d) in &file.data {
        let at = vec!["data".into(), name.clone(), "manifest".into()];
        if !confine::is_name(&d.manifest) {
            err(at, false, confine::name_message("manifest name", &d.manifest), Some("write the manifest's name, `data-manifests/<name>.toml` without folder or extension".into()));
        } else if let Err(why) = confine::resolve_in(&manifests, &format!("{}.toml", d.manifest)) {
            let message = match why {
                confine::Confined::NotFound => format!("unknown manifest `{}`: no {}", d.manifest, manifests.join(format!("{}.toml", d.manifest)).display()),
                other => other.message("manifest", &format!("{}.toml", d.manifest), &manifests),
            };
            let known = confine::names_in(&manifests, ".toml");
            let hint = if known.is_empty() { "add the manifest under data-manifests/".to_string() } else { params::suggest(&d.manifest, &known) };
            err(at, false, message, Some(hint));
        }
    }
    for (name, d) in &file.data {
        if d.test_per_class == 0 {
            err(vec!["data".into(), name.clone(), "test_per_class".into()], false, "`test_per_class` must be at least 1".into(), None);
        }
        if d.classes.is_some_and(|c| c < 2) {
            err(vec!["data".into(), name.clone(), "classes".into()], false, "`classes` must be at least 2".into(), None);
        }
    }

    // Defaults: schema defaults overlaid with [defaults].
    let mut base = Params::new();
    for def in schema {
        base.insert(def.name.to_string(), def.default.value());
    }
    check_params(&file.defaults, &["defaults"], schema, &data_names, &mut base, &mut err);

    let mut experiments = Vec::new();
    for (id, ef) in &file.experiments {
        let at = |rest: &str| -> Vec<String> {
            let mut v = vec!["experiments".to_string(), id.clone()];
            v.extend(segs(rest));
            v
        };
        let mut params = base.clone();
        check_params(&ef.params, &["experiments", id, "params"], schema, &data_names, &mut params, &mut err);
        if ef.seeds.is_empty() {
            err(at("seeds"), false, format!("experiment `{id}` has an empty list of seeds"), Some("give at least one seed, e.g. `seeds = [0]`".into()));
        }
        let mut axes: Vec<(String, Vec<ParamValue>)> = Vec::new();
        for (k, v) in &ef.grid {
            let Some(def) = schema.iter().find(|d| d.name == k) else {
                err(at(&format!("grid.{k}")), true, format!("unknown parameter `{k}` in the grid of `{id}`"), Some(params::suggest(k, &schema_names(schema))));
                continue;
            };
            let Some(list) = v.as_array() else {
                err(at(&format!("grid.{k}")), false, format!("grid entry `{k}` must be a list of values"), Some(format!("write `{k} = [a, b, ...]`")));
                continue;
            };
            if list.is_empty() {
                err(at(&format!("grid.{k}")), false, format!("grid entry `{k}` of `{id}` is empty: the experiment would have no runs"), Some("list at least one value".into()));
                continue;
            }
            let mut vals = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let path = at(&format!("grid.{k}.{i}"));
                match params::from_toml(item) {
                    Some(pv) => match def.check(&pv, &data_names) {
                        Ok(ok) => vals.push(ok),
                        Err((m, h)) => err(path, false, m, h),
                    },
                    None => err(path, false, format!("grid values of `{k}` must be plain values"), None),
                }
            }
            axes.push((k.clone(), vals));
        }
        let mut explicit: Vec<Params> = Vec::new();
        for (i, table) in ef.points.iter().enumerate() {
            let mut p = Params::new();
            check_params(table, &["experiments", id, "points", &i.to_string()], schema, &data_names, &mut p, &mut err);
            for k in p.keys() {
                if ef.grid.contains_key(k) {
                    err(at(&format!("points.{i}.{k}")), true, format!("`{k}` is both a grid axis and set by a point of `{id}`"), Some("keep each parameter in one place".into()));
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
        let grid_axes: Vec<(String, Vec<ParamValue>)> = axes.iter().filter(|(_, v)| !v.is_empty()).cloned().collect();
        let mut runs = Vec::new();
        for point in cartesian(&grid_axes).into_iter().flat_map(|g| {
            explicit.iter().map(move |e| {
                let mut q = g.clone();
                q.extend(e.clone());
                q
            })
        }) {
            for &seed in &ef.seeds {
                let mut p = params.clone();
                for (k, v) in &point {
                    p.insert(k.clone(), v.clone());
                }
                // What this configuration does not read leaves the run (and its key); runs that
                // differed only there are one run.
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
        let active = ef.profiles.is_empty() || ef.profiles.iter().any(|p| p == profile);
        if !active {
            runs.clear();
        }
        experiments.push(Experiment {
            active,
            id: id.clone(),
            title: ef.title.clone(),
            description: ef.description.clone(),
            axes: axes.iter().map(|(k, _)| k.clone()).collect(),
            seeds: ef.seeds.clone(),
            runs,
        });
    }
    // Method-specific checks that involve several parameters at once.
    for e in &experiments {
        for r in &e.runs {
            let problems = method.check_run(&r.params);
            for pr in &problems {
                let path = if e.axes.contains(&pr.param) { vec!["experiments".into(), e.id.clone(), "grid".into(), pr.param.clone()] } else { vec!["experiments".into(), e.id.clone()] };
                err(path, true, format!("experiment `{}` ({}): {}", e.id, r.label(), pr.message), pr.hint.clone());
            }
            if !problems.is_empty() {
                break;
            }
        }
    }

    let exp_ids: Vec<String> = experiments.iter().map(|e| e.id.clone()).collect();
    let metric_names: Vec<String> = method.metrics().iter().map(|s| s.to_string()).collect();
    let param_names = schema_names(schema);
    let (mut table_ids, mut figure_ids, mut claim_ids) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let check_exp = |path: Vec<String>, e: &str, err: &mut dyn FnMut(Vec<String>, bool, String, Option<String>)| -> bool {
        if exp_ids.iter().any(|x| x == e) {
            true
        } else {
            err(path, false, format!("unknown experiment `{e}`"), Some(params::suggest(e, &exp_ids)));
            false
        }
    };
    let check_metric = |path: Vec<String>, m: &str, err: &mut dyn FnMut(Vec<String>, bool, String, Option<String>)| {
        if !metric_names.iter().any(|x| x == m) {
            err(path, false, format!("unknown metric `{m}`"), Some(params::suggest(m, &metric_names)));
        }
    };
    let check_param = |path: Vec<String>, p: &str, err: &mut dyn FnMut(Vec<String>, bool, String, Option<String>)| {
        if !param_names.iter().any(|x| x == p) {
            err(path, false, format!("unknown parameter `{p}`"), Some(params::suggest(p, &param_names)));
        }
    };
    for (i, t) in file.tables.iter().enumerate() {
        let at = |rest: &str| segs(&format!("tables.{i}.{rest}"));
        if !table_ids.insert(t.id.clone()) {
            err(at("id"), false, format!("duplicate table id `{}`", t.id), None);
        }
        check_exp(at("experiment"), &t.experiment, &mut err);
        if t.metrics.is_empty() {
            err(at("metrics"), false, format!("table `{}` lists no metrics", t.id), None);
        }
        for (j, m) in t.metrics.iter().enumerate() {
            check_metric(at(&format!("metrics.{j}")), m, &mut err);
        }
        for (j, r) in t.rows.iter().enumerate() {
            check_param(at(&format!("rows.{j}")), r, &mut err);
        }
    }
    for (i, f) in file.figures.iter().enumerate() {
        let at = |rest: &str| segs(&format!("figures.{i}.{rest}"));
        if !figure_ids.insert(f.id.clone()) {
            err(at("id"), false, format!("duplicate figure id `{}`", f.id), None);
        }
        check_exp(at("experiment"), &f.experiment, &mut err);
        for (j, m) in f.y.to_vec().iter().enumerate() {
            if f.kind == FigureKind::ClassEpochs {
                let names = methods::class_metrics(method.as_ref());
                if !names.iter().any(|n| n == m) {
                    err(at(&format!("y.{j}")), false, format!("unknown per-class value `{m}`"), Some(params::suggest(m, &names)));
                }
            } else {
                check_metric(at(&format!("y.{j}")), m, &mut err);
            }
        }
        if f.kind != FigureKind::Classes && f.y.to_vec().is_empty() {
            err(at("kind"), false, format!("figure `{}` needs `y`, the metric(s) to plot", f.id), None);
        }
        if f.kind == FigureKind::Line && f.x.is_none() {
            err(at("kind"), false, format!("line figure `{}` needs `x`, the parameter on the horizontal axis", f.id), None);
        }
        if let Some(x) = &f.x {
            check_param(at("x"), x, &mut err);
        }
        for (j, s) in f.series.as_ref().map(OneOrMany::to_vec).unwrap_or_default().iter().enumerate() {
            check_param(at(&format!("series.{j}")), s, &mut err);
        }
    }
    for (i, c) in file.claims.iter().enumerate() {
        let at = |rest: &str| segs(&format!("claims.{i}.{rest}"));
        if !claim_ids.insert(c.id.clone()) {
            err(at("id"), false, format!("duplicate claim id `{}`", c.id), None);
        }
        check_exp(at("experiment"), &c.experiment, &mut err);
        check_metric(at("metric"), &c.metric, &mut err);
        match c.kind {
            ClaimKind::Trend => {
                match &c.x {
                    Some(x) => check_param(at("x"), x, &mut err),
                    None => err(at("kind"), false, format!("trend claim `{}` needs `x`", c.id), None),
                }
                if !matches!(c.direction.as_deref(), Some("increasing") | Some("decreasing")) {
                    err(at("direction"), false, format!("trend claim `{}` needs `direction = \"increasing\"` or `\"decreasing\"`", c.id), None);
                }
            }
            ClaimKind::Compare => {
                for (side, sel) in [("a", &c.a), ("b", &c.b)] {
                    match sel {
                        None => err(at("kind"), false, format!("compare claim `{}` needs `{side}`, a selection such as `{{ loss = \"ce\" }}`", c.id), None),
                        Some(t) => {
                            for k in t.keys() {
                                check_param(at(&format!("{side}.{k}")), k, &mut err);
                            }
                        }
                    }
                }
            }
            ClaimKind::Change => {}
        }
        if c.min.is_none() && c.max.is_none() && c.kind != ClaimKind::Trend {
            err(at("kind"), false, format!("claim `{}` needs `min` and/or `max`", c.id), None);
        }
    }
    if !diags.is_empty() {
        return Err(SpecError { diagnostics: diags });
    }

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
    })
}

fn schema_names(schema: &[ParamDef]) -> Vec<String> {
    schema.iter().map(|d| d.name.to_string()).collect()
}

/// Check a table of parameters against the schema, writing valid values into `out`.
fn check_params(table: &toml::Table, at: &[&str], schema: &[ParamDef], data_names: &[String], out: &mut Params, err: &mut dyn FnMut(Vec<String>, bool, String, Option<String>)) {
    for (k, v) in table {
        let mut path: Vec<String> = at.iter().map(|s| s.to_string()).collect();
        path.push(k.clone());
        let Some(def) = schema.iter().find(|d| d.name == k) else {
            err(path, true, format!("unknown parameter `{k}`"), Some(params::suggest(k, &schema_names(schema))));
            continue;
        };
        match params::from_toml(v) {
            Some(pv) => match def.check(&pv, data_names) {
                Ok(ok) => {
                    out.insert(k.clone(), ok);
                }
                Err((m, h)) => err(path, false, m, h),
            },
            None => err(path, false, format!("`{k}` must be a single value"), Some("lists of values belong in an experiment's `grid`".into())),
        }
    }
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
        ["report"] => &["document", "method", "description"],
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
