//! The `.ipynb` export: a report as a Jupyter notebook (nbformat 4.5) for the evcxr Rust
//! kernel, written next to the rendered report.
//!
//! The template's prose becomes Markdown cells, split where it calls `table()`, `figure()` or
//! `claim()`; each call becomes a code cell that shows that table, figure or claim. The first
//! code cells add this crate with `:dep` and open the report from the cache (so running the
//! notebook never trains). Paths in the code are relative to the notebook's folder, which is
//! the kernel's working directory, whenever the crate and the notebook share a folder, so the
//! notebook keeps working in another clone of the project.

use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use super::{NotebookError, Report};
use crate::render::Part;

/// Where the notebook of `report` goes: `<report folder>/<report folder name>.ipynb`, e.g.
/// `artifacts/neural-collapse/neural-collapse.ipynb`.
pub fn notebook_path(report: &Report) -> PathBuf {
    let dir = report.out_dir();
    let name = dir.file_name().map_or_else(|| report.id().to_string(), |n| n.to_string_lossy().to_string());
    dir.join(format!("{name}.ipynb"))
}

/// Write the notebook of `report`, whose first cell adds the crate at `crate_dir` with `:dep`;
/// returns its path.
pub fn write_notebook(report: &Report, crate_dir: &Path) -> Result<PathBuf, NotebookError> {
    let path = notebook_path(report);
    let write_err = |message: String| NotebookError::Write { path: path.clone(), message };
    let doc = notebook(report, crate_dir)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NotebookError::Write { path: dir.to_path_buf(), message: e.to_string() })?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| write_err(e.to_string()))?;
    Ok(path)
}

/// `target` as seen from the folder `from`: relative when the two share a folder below the
/// file-system root, else `target` itself. Both are absolute.
fn relative(from: &Path, target: &Path) -> PathBuf {
    let (f, t): (Vec<Component>, Vec<Component>) = (from.components().collect(), target.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let shares_folder = f.iter().take(common).any(|c| matches!(c, Component::Normal(_)));
    if !shares_folder {
        return target.to_path_buf();
    }
    let mut rel: PathBuf = f[common..].iter().map(|_| Component::ParentDir).collect();
    rel.extend(&t[common..]);
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    rel
}

/// A path as text with forward slashes (Rust and TOML string contents need no other escaping
/// than what `{:?}` and [`toml_string`] give).
fn slashed(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Notebook source: a list of lines, each but the last ending in a newline.
fn source(text: &str) -> Value {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    json!(lines)
}

struct Cells(Vec<Value>);

impl Cells {
    fn markdown(&mut self, text: &str) {
        let id = format!("md-{:03}", self.0.len());
        self.0.push(json!({"cell_type": "markdown", "id": id, "metadata": {}, "source": source(text)}));
    }

    /// A code cell; `shows` names what its last expression displays (for checks that run it).
    fn code(&mut self, text: &str, shows: Option<String>) {
        let id = format!("code-{:03}", self.0.len());
        let metadata = match shows {
            Some(s) => json!({"reprise": {"shows": s}}),
            None => json!({}),
        };
        self.0.push(json!({"cell_type": "code", "execution_count": null, "id": id, "metadata": metadata, "outputs": [], "source": source(text)}));
    }
}

fn notebook(report: &Report, crate_dir: &Path) -> Result<Value, NotebookError> {
    let dir = report.out_dir();
    let spec = report.spec();
    let spec_abs = spec.root.join(spec.rel_path());
    let spec_rel = slashed(&relative(&dir, &spec_abs));
    let crate_abs = std::fs::canonicalize(crate_dir).unwrap_or_else(|_| crate_dir.to_path_buf());
    let crate_rel = slashed(&relative(&dir, &crate_abs));
    let sets: Vec<String> = report.opts.sets.iter().map(|s| format!("{s:?}")).collect();
    let cache = match report.named_store() {
        Some(p) => format!("Some(std::path::Path::new({:?}))", slashed(&p)),
        None => "None".to_string(),
    };
    let shown_spec = spec.rel_path();

    let mut cells = Cells(Vec::new());
    cells.markdown(&format!(
        "*Written by `reprise notebook {shown_spec}` for the evcxr Rust kernel. It reads the report's cells from the cache and never trains: \
         run `reprise run {shown_spec}` from the project root first. The first code cell compiles the `reprise` crate inside the kernel, \
         which takes several minutes the first time (see `docs/notebooks.md`).*"
    ));
    cells.code(&format!(":dep reprise = {{ path = {} }}", toml_string(&crate_rel)), None);
    cells.code(&format!("use reprise::notebook::Report;\n\nlet report = Report::open_with({spec_rel:?}, {:?}, &[{}], {cache})?;\nreport", report.profile(), sets.join(", ")), Some("report".into()));
    for part in report.parts()? {
        match part {
            Part::Prose(text) => cells.markdown(&text),
            Part::Call(call, id) => cells.code(&format!("report.{}({id:?})?", call.name()), Some(format!("{}:{id}", call.name()))),
        }
    }
    cells.markdown(
        "## Explore\n\nThe report's pieces are Rust values: `report.frame(\"results\")` is a polars DataFrame with one row per run and analysis epoch \
         (`per_class` and `objects` are the other frames), `report.cells()` lists the cells with their status, `report.table(id)`, \
         `report.figure(id)` and `report.claims()` compute any table, figure or claim, and `report.render()` re-renders the report from the cache.",
    );
    cells.code("report.cells()", Some("cells".into()));
    cells.code("let results = report.frame(\"results\")?;\nresults.head(10)", Some("frame:results".into()));

    Ok(json!({
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "rust", "display_name": "Rust", "language": "rust"},
            "language_info": {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust", "pygment_lexer": "rust", "codemirror_mode": "rust"},
            "reprise": {"report": report.id(), "profile": report.profile(), "spec": shown_spec},
        },
        "cells": cells.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_shared_folder() {
        assert_eq!(relative(Path::new("/w/repo/artifacts/r"), Path::new("/w/repo")), PathBuf::from("../.."));
        assert_eq!(relative(Path::new("/w/repo/artifacts/r"), Path::new("/w/repo/reports/r.toml")), PathBuf::from("../../reports/r.toml"));
        assert_eq!(relative(Path::new("/w/a/b"), Path::new("/w/crate")), PathBuf::from("../../crate"));
        assert_eq!(relative(Path::new("/tmp/p/artifacts/r"), Path::new("/work/crate")), PathBuf::from("/work/crate"));
        assert_eq!(relative(Path::new("/w/x"), Path::new("/w/x")), PathBuf::from("."));
    }

    #[test]
    fn source_keeps_newlines_on_every_line_but_the_last() {
        assert_eq!(source("a\nb\n\nc"), json!(["a\n", "b\n", "\n", "c"]));
        assert_eq!(source("one"), json!(["one"]));
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
