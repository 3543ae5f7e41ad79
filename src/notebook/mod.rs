//! Notebooks: a report opened from the cache as a Rust value, for exploring results in Jupyter
//! through the evcxr kernel, and `reprise notebook`'s export of a report as an `.ipynb` file.
//!
//! [`Report::open`] loads the spec, plans it and looks every cell up in the cache without
//! computing anything (a missing cell is an error that says to run `reprise run` first), then
//! gathers the metric frames exactly as rendering reads them. Tables, figures, claims, frames
//! and the cell list come back as small wrappers whose `evcxr_display` method prints
//! `EVCXR_BEGIN_CONTENT <mime>` blocks, so the last expression of a cell shows as HTML (and plain
//! text) in Jupyter: tables and claims with the same markup as the HTML report, figures as the
//! same inline SVG. Outside evcxr the same content is available from `bundle()`.

mod display;
mod export;

use std::ops::Deref;
use std::path::{Path, PathBuf};

use polars::prelude::DataFrame;

pub use display::Bundle;
pub use export::{notebook_path, write_notebook};

use crate::cache::CellStatus;
pub use crate::driver::Report;
use crate::driver::{DriverError, Options, Project};
use crate::frames::{FrameError, Frames};
use crate::plan::Plan;
use crate::render::{self, claims::ClaimResult, Part, RenderError};
use crate::spec::{Spec, DEFAULT_PROFILE};

/// Errors of opening a report or computing one of its parts; each names the spec, the frame or
/// the id involved.
#[derive(Debug, thiserror::Error)]
pub enum NotebookError {
    /// Loading the spec, planning it, or finding its cells in the cache (the text says which,
    /// and what to run).
    #[error("{spec}: {message}")]
    Open { spec: PathBuf, message: String },
    #[error(transparent)]
    Frames(#[from] FrameError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("{spec}: no frame `{name}` (the frames are results, per_class, objects and per_task)")]
    UnknownFrame { spec: PathBuf, name: String },
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// The frames a report has, by name (as written to `frames/<name>.parquet`).
pub const FRAME_NAMES: [&str; 4] = ["results", "per_class", "objects", "per_task"];

/// What a notebook does with a report opened from the cache (see the module doc).
impl Report {
    /// Open `spec` with the default profile, no overrides and the default cache
    /// ($REPRISE_CACHE, else the project's `artifacts/store`).
    pub fn open(spec: impl AsRef<Path>) -> Result<Report, NotebookError> {
        Report::open_with(spec, DEFAULT_PROFILE, &[], None)
    }

    /// Open `spec` with a profile, `key.path=value` overrides (as `--set` takes them) and a
    /// cache directory (None: $REPRISE_CACHE, else the project's `artifacts/store`). Nothing is
    /// computed: every cell must be in the cache.
    pub fn open_with(spec: impl AsRef<Path>, profile: &str, sets: &[&str], cache: Option<&Path>) -> Result<Report, NotebookError> {
        let path = spec.as_ref();
        let opts = Options { profile: profile.to_string(), sets: sets.iter().map(|s| s.to_string()).collect(), cache: cache.map(Path::to_path_buf) };
        Report::open_cached(path, &opts).map_err(|e| NotebookError::Open { spec: path.to_path_buf(), message: e.to_string() })
    }

    pub fn id(&self) -> &str {
        &self.spec.report.id
    }

    pub fn title(&self) -> &str {
        &self.spec.report.title
    }

    pub fn profile(&self) -> &str {
        &self.spec.profile
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The cache the cells were read from: a folder, or `s3://bucket/prefix`.
    pub fn store_dir(&self) -> PathBuf {
        PathBuf::from(self.store.location())
    }

    /// The cache when it is not the project's default one.
    pub fn named_store(&self) -> Option<PathBuf> {
        let default = Project::at(&self.spec.root).artifacts_dir().join("store");
        let dir = self.store_dir();
        (dir != default).then_some(dir)
    }

    /// The typed rows of the three frames.
    pub fn frames(&self) -> &Frames {
        &self.frames
    }

    /// Every cell of the plan with its kind, key and recorded status.
    pub fn cells(&self) -> Cells {
        let rows = self
            .plan
            .cells
            .iter()
            .zip(&self.exec.outcomes)
            .map(|(c, o)| {
                let record = o.record();
                let status = match (record, o.failure()) {
                    (Some(r), Some(reason)) if r.status == CellStatus::Failed => format!("failed: {reason}"),
                    (Some(_), _) => "cached".to_string(),
                    (None, reason) => format!("missing: {}", reason.unwrap_or_default()),
                };
                CellInfo { name: c.name.clone(), kind: c.kind.name(), key: c.key.clone(), status, seconds: record.map(|r| r.seconds) }
            })
            .collect();
        Cells(rows)
    }

    /// A metric frame (`results`, `per_class`, `objects` or `per_task`) as a polars DataFrame.
    pub fn frame(&self, name: &str) -> Result<Frame, NotebookError> {
        let df = match name {
            "results" => self.frames.results_frame()?,
            "per_class" => self.frames.per_class_frame()?,
            "objects" => self.frames.objects_frame()?,
            "per_task" => self.frames.per_task_frame()?,
            _ => return Err(NotebookError::UnknownFrame { spec: self.spec.path.clone(), name: name.to_string() }),
        };
        Ok(Frame { name: name.to_string(), df })
    }

    /// Ids of the tables the spec declares, in spec order.
    pub fn table_ids(&self) -> Vec<&str> {
        self.spec.tables.iter().map(|t| t.id.as_str()).collect()
    }

    /// Ids of the figures the spec declares, in spec order.
    pub fn figure_ids(&self) -> Vec<&str> {
        self.spec.figures.iter().map(|f| f.id.as_str()).collect()
    }

    /// One table, as the report shows it.
    pub fn table(&self, id: &str) -> Result<Table, NotebookError> {
        Ok(Table { table: render::table(&self.spec, &self.frames, id)?, profile: self.spec.profile.clone() })
    }

    /// One figure, as the report shows it (SVG).
    pub fn figure(&self, id: &str) -> Result<Figure, NotebookError> {
        let (decl, svg) = render::figure(&self.spec, &self.frames, id)?;
        Ok(Figure { id: decl.id, title: decl.title, svg })
    }

    /// One claim's verdict with the measured value.
    pub fn claim(&self, id: &str) -> Result<Claim, NotebookError> {
        Ok(Claim(render::claim(&self.spec, &self.frames, id)?))
    }

    /// Every claim's verdict, in spec order.
    pub fn claims(&self) -> Claims {
        Claims(render::claim_results(&self.spec, &self.frames))
    }

    /// The report in template order: prose between table, figure and claim calls.
    pub fn parts(&self) -> Result<Vec<Part>, NotebookError> {
        Ok(render::parts(&self.spec, &self.frames)?)
    }

    /// Re-render the report into its folder from the cache, as `reprise render` does: frames,
    /// Markdown, HTML, figures, tables and lock file.
    pub fn render(&self) -> Result<Rendered, NotebookError> {
        let r = self.write().map_err(|e: DriverError| NotebookError::Write { path: self.out_dir(), message: e.to_string() })?;
        Ok(Rendered { rendered: r.rendered, frames: r.frames })
    }
}

/// One cell of a report's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct CellInfo {
    pub name: String,
    pub kind: &'static str,
    pub key: String,
    /// `cached`, or `failed: reason` for a recorded failure (a diverged run).
    pub status: String,
    /// Seconds the cell took when it was computed.
    pub seconds: Option<f64>,
}

/// The cells of a report.
#[derive(Debug, Clone)]
pub struct Cells(pub Vec<CellInfo>);

impl Deref for Cells {
    type Target = Vec<CellInfo>;
    fn deref(&self) -> &Vec<CellInfo> {
        &self.0
    }
}

/// A metric frame: a polars DataFrame (through `Deref`, or [`Frame::into_inner`]) that shows
/// as an HTML table of its first rows.
#[derive(Debug, Clone)]
pub struct Frame {
    pub name: String,
    df: DataFrame,
}

impl Frame {
    pub fn into_inner(self) -> DataFrame {
        self.df
    }

    /// The first `n` rows.
    pub fn head(&self, n: usize) -> Frame {
        Frame { name: self.name.clone(), df: self.df.head(Some(n)) }
    }
}

impl Deref for Frame {
    type Target = DataFrame;
    fn deref(&self) -> &DataFrame {
        &self.df
    }
}

/// A computed table of the report.
#[derive(Debug, Clone)]
pub struct Table {
    pub table: render::table::Table,
    profile: String,
}

impl Table {
    /// The table as the report's `tables/<id>.csv` holds it.
    pub fn csv(&self) -> String {
        render::table::csv(&self.table)
    }
}

/// A figure of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub id: String,
    pub title: String,
    /// The SVG document, as the report's `figures/<id>.svg` holds it.
    pub svg: String,
}

/// One claim's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim(pub ClaimResult);

/// Every claim's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Vec<ClaimResult>);

/// What [`Report::render`] wrote.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub rendered: render::Rendered,
    pub frames: Vec<PathBuf>,
}
