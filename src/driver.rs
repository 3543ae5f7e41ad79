//! The driver: the one place that knows a project's layout and the order of a report's stages,
//! so that the command line, `verify` and notebooks are thin callers and no stage is reached
//! through the command line.
//!
//! A [`Project`] is a folder with `reports/`, `templates/`, `data-manifests/` and `artifacts/`;
//! it resolves the store once (a named folder or `s3://bucket/prefix`, else `$REPRISE_CACHE`,
//! else `artifacts/store`)
//! and a report's output folder (`artifacts/<id>` for the default profile, else
//! `artifacts/<id>-<profile>`). A [`Report`] is a spec loaded with [`Options`], planned, and
//! executed against the store (running what is missing, or looking it up only); it then
//! writes its outputs in one order: frames → rendering from the frames as written → lock file
//! → the store's note of what the run used.

use std::path::{Path, PathBuf};

use crate::artifacts::{Lock, LockError};
use crate::cache::{LocalStore, Location, S3Options, S3Store, S3Url, Store, StoreError, CACHE_ENV};
use crate::exec::{self, CellOutcome, ExecError, ExecOptions, Execution, Executor, LocalThreads};
use crate::frames::{self, FrameError, Frames};
use crate::methods::{Method, Registry};
use crate::plan::{self, Plan, PlanError};
use crate::render::{self, RenderError, Rendered};
use crate::spec::{self, LoadError, Spec, DEFAULT_PROFILE};

/// Errors of the driver. [`DriverError::is_usage`] tells the user's mistakes (a bad spec,
/// data, store folder or option: exit 2 on the command line) from failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Spec(Box<LoadError>),
    /// The report's template cannot render this spec (checked before any cell runs).
    #[error("{spec}: {source}")]
    Template { spec: PathBuf, source: Box<RenderError> },
    #[error("{spec}: {source}")]
    Plan { spec: PathBuf, source: Box<PlanError> },
    /// The store cannot be created or written.
    #[error(transparent)]
    StoreOpen(Box<StoreError>),
    #[error(transparent)]
    Exec(Box<ExecError>),
    #[error(transparent)]
    Missing(Box<MissingCells>),
    #[error(transparent)]
    Frames(Box<FrameError>),
    #[error(transparent)]
    Render(Box<RenderError>),
    #[error(transparent)]
    Lock(Box<LockError>),
    #[error(transparent)]
    Store(Box<StoreError>),
    /// A folder of the report's layout that is a link, or that cannot be made.
    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },
}

// The causes are boxed so that a `Result` of the driver stays small on the happy path.
macro_rules! boxed_from {
    ($($source:ty => $variant:ident),* $(,)?) => {
        $(impl From<$source> for DriverError {
            fn from(e: $source) -> Self {
                DriverError::$variant(Box::new(e))
            }
        })*
    };
}

boxed_from!(LoadError => Spec, ExecError => Exec, MissingCells => Missing, FrameError => Frames, RenderError => Render, LockError => Lock, StoreError => Store);

impl DriverError {
    /// The user's to fix: a spec, data, option or store folder.
    pub fn is_usage(&self) -> bool {
        matches!(self, DriverError::Spec(_) | DriverError::Template { .. } | DriverError::Plan { .. } | DriverError::StoreOpen(_) | DriverError::Layout { .. })
    }
}

/// Cells that a cache-only lookup did not find, each with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{} cell(s) are not in the cache {store}; run `reprise run {spec}{flags}` first:\n{}", cells.len(), cells.join("\n"))]
pub struct MissingCells {
    pub store: String,
    pub spec: String,
    /// The `--profile`, `--set` and `--cache` options that reach the same cells.
    pub flags: String,
    pub cells: Vec<String>,
}

/// How a report is opened: the profile, `key.path=value` overrides (as `--set` takes them) and
/// the store folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Default: `quick`.
    pub profile: String,
    /// Default: none.
    pub sets: Vec<String>,
    /// Default: `$REPRISE_CACHE`, else the project's `artifacts/store`.
    pub cache: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options { profile: DEFAULT_PROFILE.to_string(), sets: Vec::new(), cache: None }
    }
}

impl Options {
    /// The options a user gives again on the command line to reach the same report and store,
    /// quoted for a shell, each preceded by a space; empty for the defaults.
    pub fn as_flags(&self) -> String {
        let mut s = String::new();
        if self.profile != DEFAULT_PROFILE {
            s.push_str(&format!(" --profile {}", shell_quote(&self.profile)));
        }
        for set in &self.sets {
            s.push_str(&format!(" --set {}", shell_quote(set)));
        }
        if let Some(c) = &self.cache {
            s.push_str(&format!(" --cache {}", shell_quote(&c.display().to_string())));
        }
        s
    }
}

/// `s` as one shell word: bare when it holds only safe characters, else in single quotes.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A project folder, its layout and the methods its specs may name.
#[derive(Debug, Clone)]
pub struct Project {
    root: PathBuf,
    registry: Registry,
}

/// Builds a [`Project`]: `Project::builder().with_method(MyMethod).build()`.
#[derive(Debug, Clone)]
pub struct ProjectBuilder {
    root: Option<PathBuf>,
    registry: Registry,
}

impl ProjectBuilder {
    /// The project folder. Default: the current directory.
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Add a method (a spec names it by [`Method::name`] in `report.method`). Default: the
    /// built-in methods only.
    pub fn with_method(mut self, method: impl Method + 'static) -> Self {
        self.registry = self.registry.with(method);
        self
    }

    pub fn build(self) -> Project {
        // An empty path is the current directory, and keeps paths below it relative
        // (`reports/x.toml`, not `./reports/x.toml`).
        Project { root: self.root.unwrap_or_default(), registry: self.registry }
    }
}

impl Project {
    /// A project in the current directory with the built-in methods; see [`ProjectBuilder`].
    pub fn builder() -> ProjectBuilder {
        ProjectBuilder { root: None, registry: Registry::builtin() }
    }

    /// The project at `root`, with the built-in methods.
    pub fn at(root: impl Into<PathBuf>) -> Project {
        Project::builder().root(root).build()
    }

    /// The project a spec belongs to: the folder above its `reports/` (or the spec's own
    /// folder when it is not in one).
    pub fn of_spec(spec_path: &Path) -> Project {
        Project::at(spec::project_root(spec_path))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The methods this project's specs may name.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `reports/`, where the specs are.
    pub fn reports_dir(&self) -> PathBuf {
        self.root.join("reports")
    }

    /// Load and validate a spec with `opts`' profile and overrides and this project's methods,
    /// and check that its template renders it (every `table`, `figure` and `claim` call names a
    /// declared id), so a mistake there stops a command before any cell runs.
    /// The other profiles' templates are checked too (a profile may change what the template
    /// is given), so a mistake in `[profiles.paper]` shows when running `quick`.
    pub fn load(&self, spec_path: &Path, opts: &Options) -> Result<Spec, DriverError> {
        let spec = spec::load_with(spec_path, &opts.profile, &opts.sets, &self.registry)?;
        let template_error = |source| DriverError::Template { spec: spec_path.to_path_buf(), source: Box::new(source) };
        render::check_template(&spec).map_err(template_error)?;
        for other in spec.profiles.iter().filter(|p| **p != spec.profile) {
            let with_other = spec::load_with(spec_path, other, &[], &self.registry)?;
            render::check_template(&with_other).map_err(|e| DriverError::Template { spec: spec_path.to_path_buf(), source: Box::new(RenderError::Unknown(format!("with profile `{other}`: {e}"))) })?;
        }
        Ok(spec)
    }

    /// `artifacts/` of the project: committed reports, and the default store.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// The store's folder: `cache` when named, else `$REPRISE_CACHE` when set and not empty,
    /// else `artifacts/store`.
    pub fn store_dir(&self, cache: Option<&Path>) -> PathBuf {
        match (cache, std::env::var_os(CACHE_ENV)) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(d)) if !d.is_empty() => PathBuf::from(d),
            _ => self.artifacts_dir().join("store"),
        }
    }

    /// Where the store lives: [`Project::store_dir`], a remote store when it reads
    /// `s3://bucket/prefix`.
    pub fn store_location(&self, cache: Option<&Path>) -> Result<Location, DriverError> {
        Location::parse(&self.store_dir(cache)).map_err(|e| DriverError::StoreOpen(Box::new(e)))
    }

    /// How a remote store at `url` is opened from this project: its objects are mirrored under
    /// `$REPRISE_REMOTE_CACHE/<bucket>/<prefix>` when that is set, else under the project's
    /// `artifacts/remote-cache/<bucket>/<prefix>` (the URL's parts are checked to be plain
    /// names, so the mirror stays inside that folder).
    pub fn s3_options(&self, url: &S3Url) -> S3Options {
        let base = match std::env::var_os(REMOTE_CACHE_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => self.artifacts_dir().join("remote-cache"),
        };
        let mut mirror = base.join(&url.bucket);
        for seg in url.prefix.split('/').filter(|s| !s.is_empty()) {
            mirror.push(seg);
        }
        S3Options::with_mirror(mirror)
    }

    /// The store at [`Project::store_location`], opened (created when missing).
    pub fn open_store(&self, cache: Option<&Path>) -> Result<Box<dyn Store>, DriverError> {
        let opened: Result<Box<dyn Store>, StoreError> = match self.store_location(cache)? {
            Location::Local(dir) => LocalStore::open(&dir).map(|s| Box::new(s) as Box<dyn Store>),
            Location::S3(url) => S3Store::open(&url, &self.s3_options(&url)).map(|s| Box::new(s) as Box<dyn Store>),
        };
        opened.map_err(|e| DriverError::StoreOpen(Box::new(e)))
    }

    /// The store at [`Project::store_location`] if it already exists (nothing is created).
    pub fn open_existing_store(&self, cache: Option<&Path>) -> Result<Option<Box<dyn Store>>, DriverError> {
        let opened: Result<Option<Box<dyn Store>>, StoreError> = match self.store_location(cache)? {
            Location::Local(dir) if !dir.join("cells").is_dir() => Ok(None),
            Location::Local(dir) => LocalStore::open(&dir).map(|s| Some(Box::new(s) as Box<dyn Store>)),
            Location::S3(url) => S3Store::open_existing(&url, &self.s3_options(&url)).map(|s| s.map(|s| Box::new(s) as Box<dyn Store>)),
        };
        opened.map_err(|e| DriverError::StoreOpen(Box::new(e)))
    }

    /// The store opened for `gc`: nothing else may have it open ([`StoreError::InUse`]
    /// otherwise). Errors are returned as the store gives them.
    pub fn open_store_exclusive(&self, cache: Option<&Path>) -> Result<Box<dyn Store>, StoreError> {
        match Location::parse(&self.store_dir(cache))? {
            Location::Local(dir) => LocalStore::open_exclusive(&dir).map(|s| Box::new(s) as Box<dyn Store>),
            Location::S3(url) => S3Store::open_exclusive(&url, &self.s3_options(&url)).map(|s| Box::new(s) as Box<dyn Store>),
        }
    }

    /// Where a report's outputs go: `artifacts/<id>` for the default profile, else
    /// `artifacts/<id>-<profile>` (both names are validated when the spec is loaded).
    pub fn out_dir(&self, report_id: &str, profile: &str) -> PathBuf {
        let name = if profile == DEFAULT_PROFILE { report_id.to_string() } else { format!("{report_id}-{profile}") };
        self.artifacts_dir().join(name)
    }
}

/// The environment variable naming where a remote store's objects are mirrored locally.
pub const REMOTE_CACHE_ENV: &str = "REPRISE_REMOTE_CACHE";

/// [`Project::load`] with the built-in methods.
pub fn load(spec_path: &Path, opts: &Options) -> Result<Spec, DriverError> {
    Project::of_spec(spec_path).load(spec_path, opts)
}

/// Where `spec`'s outputs go.
pub fn out_dir(spec: &Spec) -> PathBuf {
    Project::at(&spec.root).out_dir(&spec.report.id, &spec.profile)
}

/// A report: its spec, plan, store and the outcome of every cell.
pub struct Report {
    pub spec: Spec,
    pub plan: Plan,
    pub store: Box<dyn Store>,
    pub exec: Execution,
    /// The options it was opened with.
    pub opts: Options,
    /// The metric frames of the executed cells, as reading them back from their files gives
    /// them (what rendering reads).
    pub frames: Frames,
    /// The same frames as collected from the cells, which [`Report::write`] writes.
    collected: Frames,
}

/// What [`Report::write`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub rendered: Rendered,
    pub frames: Vec<PathBuf>,
    pub out_dir: PathBuf,
}

impl Report {
    /// Plan a loaded spec and execute it against the store: look every cell up and, unless
    /// `exec_opts.cache_only`, compute what is missing.
    pub fn execute(spec: Spec, opts: &Options, exec_opts: &ExecOptions) -> Result<Report, DriverError> {
        Report::execute_with(spec, opts, exec_opts, &LocalThreads)
    }

    /// [`Report::execute`] with the missing cells computed by `executor` (local threads, or
    /// SLURM job arrays).
    pub fn execute_with(spec: Spec, opts: &Options, exec_opts: &ExecOptions, executor: &dyn Executor) -> Result<Report, DriverError> {
        let plan = plan::plan(&spec).map_err(|source| DriverError::Plan { spec: spec.path.clone(), source: Box::new(source) })?;
        let store = Project::at(&spec.root).open_store(opts.cache.as_deref())?;
        if !exec_opts.cache_only {
            store.clean_tmp();
        }
        let exec = executor.execute(&plan, store.as_ref(), exec_opts)?;
        let collected = frames::collect(&plan, &exec, store.as_ref(), plan.method.metrics())?;
        let frames = collected.round_trip()?;
        Ok(Report { spec, plan, store, exec, opts: opts.clone(), frames, collected })
    }

    /// Load (with the built-in methods), plan and look every cell up in the cache without
    /// computing any; a missing cell is a [`MissingCells`] error naming it and the command that
    /// computes it.
    pub fn open_cached(spec_path: &Path, opts: &Options) -> Result<Report, DriverError> {
        Report::open_cached_in(&Project::of_spec(spec_path), spec_path, opts)
    }

    /// [`Report::open_cached`] with `project`'s methods.
    pub fn open_cached_in(project: &Project, spec_path: &Path, opts: &Options) -> Result<Report, DriverError> {
        let spec = project.load(spec_path, opts)?;
        let exec_opts = ExecOptions { cache_only: true, progress: false, ..ExecOptions::with_jobs(None) };
        let r = Report::execute(spec, opts, &exec_opts)?;
        // Before the missing cells: a corrupt file is one reason a cell is missing.
        r.exec.print_corruptions(false);
        let missing: Vec<String> =
            r.plan.cells.iter().zip(&r.exec.outcomes).filter(|(_, o)| matches!(o, CellOutcome::Failed(_))).map(|(c, o)| format!("  {} ({})", c.name, o.failure().unwrap_or_default())).collect();
        if !missing.is_empty() {
            return Err(MissingCells { store: r.store.location(), spec: spec_path.display().to_string(), flags: opts.as_flags(), cells: missing }.into());
        }
        Ok(r)
    }

    /// Where this report's outputs go.
    pub fn out_dir(&self) -> PathBuf {
        out_dir(&self.spec)
    }

    /// Write the outputs into [`Report::out_dir`]: frames, the report rendered from the frames
    /// as written (exactly as `verify` re-renders it), the lock file; then note the cells and
    /// objects used in the store, so `gc` keeps them.
    pub fn write(&self) -> Result<Written, DriverError> {
        let out = self.out_dir();
        let project = Project::at(&self.spec.root);
        check_real_dirs(&project.artifacts_dir(), &out)?;
        // Everything is written into a staging folder beside the report's and moved into place
        // only once it all succeeded: a failure midway (a template that fails on the results,
        // a full disk) leaves the report's folder as it was.
        let staging = Staging::new(&project.artifacts_dir(), &out)?;
        let stage = staging.path();
        let frame_files = self.collected.write(&stage.join("frames"))?;
        let reread = Frames::read(&stage.join("frames"), self.plan.method.metrics())?;
        let rendered = render::render(&self.spec, &reread, stage)?;
        let mut files: Vec<PathBuf> = frame_files.clone();
        files.extend([rendered.markdown.clone(), rendered.html.clone()]);
        files.extend(rendered.figures.iter().cloned());
        files.extend(rendered.tables.iter().cloned());
        let lock = Lock::build(&self.plan, &self.exec, &self.spec.profile, &self.spec.overrides, stage, &files)?;
        let moved = staging.move_into(&out, &files)?;
        lock.write(&out)?;
        let keys: Vec<String> = self.plan.cells.iter().map(|c| c.key.clone()).collect();
        let objects: Vec<String> = exec::outputs_of(&self.exec).into_iter().flat_map(|m| m.into_values()).collect();
        self.store.note_run(&self.spec.report.id, &keys, &objects)?;
        let rendered = Rendered {
            markdown: moved(&rendered.markdown),
            html: moved(&rendered.html),
            figures: rendered.figures.iter().map(|p| moved(p)).collect(),
            tables: rendered.tables.iter().map(|p| moved(p)).collect(),
            claims: rendered.claims,
        };
        Ok(Written { rendered, frames: frame_files.iter().map(|p| moved(p)).collect(), out_dir: out })
    }

    /// Data cells that could not be computed (a missing file, a wrong hash, a malformed file,
    /// a split or subset the data cannot give), each as `name — reason`.
    pub fn data_errors(&self) -> Vec<String> {
        self.plan
            .cells
            .iter()
            .zip(&self.exec.outcomes)
            .filter(|(c, o)| matches!(c.kind, plan::CellKind::Dataset { .. } | plan::CellKind::Split { .. } | plan::CellKind::Derive { .. }) && matches!(o, CellOutcome::Failed(_)))
            .map(|(c, o)| format!("{} — {}", c.name, o.failure().unwrap_or_default()))
            .collect()
    }
}

/// The folders a report is written to, which must not lead elsewhere: `artifacts/`, the
/// report's folder and its `frames/`, `figures/` and `tables/` may be missing but not links
/// (a committed link would make a run write, and `verify` read, outside the project).
pub fn check_real_dirs(artifacts: &Path, out: &Path) -> Result<(), DriverError> {
    let subs = ["frames", "figures", "tables"].map(|s| out.join(s));
    for dir in [artifacts, out].into_iter().chain(subs.iter().map(PathBuf::as_path)) {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(DriverError::Layout { path: dir.to_path_buf(), message: "is a symbolic link; a report's folders must be real folders inside the project (remove the link)".into() })
            }
            Ok(m) if !m.is_dir() => return Err(DriverError::Layout { path: dir.to_path_buf(), message: "is not a folder (remove it)".into() }),
            _ => {}
        }
    }
    Ok(())
}

/// A staging folder inside `artifacts/` (`.<name>.staging-<pid>-<n>`), removed on drop; a killed
/// run's is removed by the next run of the report.
struct Staging(crate::fs::OwnedDir);

impl Staging {
    fn new(artifacts: &Path, out: &Path) -> Result<Staging, DriverError> {
        let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let layout = |path: &Path, e: std::io::Error| DriverError::Layout { path: path.to_path_buf(), message: e.to_string() };
        std::fs::create_dir_all(artifacts).map_err(|e| layout(artifacts, e))?;
        let prefix = format!(".{name}.staging-");
        crate::fs::OwnedDir::remove_stale(artifacts, &prefix);
        crate::fs::OwnedDir::new(artifacts, &prefix).map(Staging).map_err(|e| layout(artifacts, e))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Move `files` (paths inside the staging folder) to the same places under `out`, then
    /// remove the files of `out`'s `frames/`, `figures/` and `tables/` that the report no longer
    /// produces. Returns the map from a staged path to its final one.
    fn move_into(&self, out: &Path, files: &[PathBuf]) -> Result<impl Fn(&Path) -> PathBuf + '_, DriverError> {
        let layout = |path: &Path, e: std::io::Error| DriverError::Layout { path: path.to_path_buf(), message: e.to_string() };
        let mut kept = std::collections::BTreeSet::new();
        for f in files {
            let rel = f.strip_prefix(self.path()).unwrap_or(f);
            let dest = out.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| layout(parent, e))?;
            }
            std::fs::rename(f, &dest).map_err(|e| layout(&dest, e))?;
            kept.insert(dest);
        }
        for sub in ["frames", "figures", "tables"] {
            let Ok(rd) = std::fs::read_dir(out.join(sub)) else { continue };
            for e in rd.flatten() {
                let stale = e.file_type().is_ok_and(|t| t.is_file()) && !kept.contains(&e.path());
                if stale {
                    std::fs::remove_file(e.path()).map_err(|err| layout(&e.path(), err))?;
                }
            }
        }
        let out = out.to_path_buf();
        Ok(move |p: &Path| out.join(p.strip_prefix(self.path()).unwrap_or(p)))
    }
}

/// Look up or compute the one cell of `spec_path` whose key is `key` (what a SLURM task runs),
/// with `threads` threads; its upstream cells must already be in the store.
pub fn compute_cell(project: &Project, spec_path: &Path, opts: &Options, key: &str, threads: usize) -> Result<(String, CellOutcome), DriverError> {
    let spec = project.load(spec_path, opts)?;
    let plan = plan::plan(&spec).map_err(|source| DriverError::Plan { spec: spec.path.clone(), source: Box::new(source) })?;
    let Some(i) = plan.cells.iter().position(|c| c.key == key) else {
        let message = format!("no cell with key {key} in this plan (the spec, profile or overrides differ from the submitting run's)");
        return Err(DriverError::Layout { path: spec_path.to_path_buf(), message });
    };
    let store = project.open_store(opts.cache.as_deref())?;
    let outcome = exec::execute_one(&plan, i, store.as_ref(), threads)?;
    for c in store.take_corruptions() {
        eprintln!("warning: {c}; it was removed and recomputed");
    }
    Ok((plan.cells[i].name.clone(), outcome))
}

/// A path relative to the current directory when it lies below it (for messages and JSON).
pub fn shown(p: &Path) -> String {
    let cwd = std::env::current_dir().ok().and_then(|c| std::fs::canonicalize(c).ok());
    match cwd.and_then(|c| p.strip_prefix(&c).ok().map(Path::to_path_buf)) {
        Some(rel) => rel.display().to_string(),
        None => p.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_quoted_for_a_shell() {
        let opts = Options { profile: "paper".into(), sets: vec!["defaults.epochs=2".into(), "report.title=it's".into()], cache: Some(PathBuf::from("/tmp/my store")) };
        assert_eq!(opts.as_flags(), " --profile paper --set defaults.epochs=2 --set 'report.title=it'\\''s' --cache '/tmp/my store'");
        assert_eq!(Options::default().as_flags(), "");
    }

    #[test]
    fn layout() {
        let p = Project::at("/p");
        assert_eq!(p.out_dir("r", DEFAULT_PROFILE), PathBuf::from("/p/artifacts/r"));
        assert_eq!(p.out_dir("r", "paper"), PathBuf::from("/p/artifacts/r-paper"));
        assert_eq!(p.store_dir(Some(Path::new("/c"))), PathBuf::from("/c"));
    }
}
