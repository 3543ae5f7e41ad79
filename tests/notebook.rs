//! Notebooks: `reprise notebook` on the tiny fixture project writes a valid nbformat-4
//! notebook for the evcxr kernel without training, and the library API it calls shows the same
//! tables, figures and claims as the HTML report. Every notebook committed under `artifacts/`
//! is validated too. (CI runs a generated notebook under evcxr itself: `.ci/notebook.sh`.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use polars::prelude::{ParquetReader, SerReader};
use serde_json::Value;

use common::{project, repo, reprise};
use reprise::notebook::Report;

fn run(p: &Path) {
    let out = reprise(p, &["run", "reports/tiny.toml", "--jobs", "2"]);
    assert!(out.status.success(), "run failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The checks of nbformat 4's schema that matter to Jupyter and evcxr, with the reason for each
/// problem; empty when the notebook is valid.
fn problems(nb: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if nb["nbformat"] != 4 {
        p.push(format!("nbformat is {}, not 4", nb["nbformat"]));
    }
    let minor = nb["nbformat_minor"].as_u64().unwrap_or(0);
    if minor < 4 {
        p.push(format!("nbformat_minor {minor} < 4"));
    }
    let ks = &nb["metadata"]["kernelspec"];
    if ks["name"] != "rust" || ks["language"] != "rust" || !ks["display_name"].is_string() {
        p.push(format!("kernelspec is {ks}, not the evcxr kernel's (name and language `rust`)"));
    }
    if nb["metadata"]["language_info"]["name"] != "rust" {
        p.push("language_info.name is not `rust`".into());
    }
    let Some(cells) = nb["cells"].as_array() else {
        p.push("no `cells` list".into());
        return p;
    };
    let mut ids = BTreeSet::new();
    for (i, c) in cells.iter().enumerate() {
        let kind = c["cell_type"].as_str().unwrap_or("");
        if !["markdown", "code", "raw"].contains(&kind) {
            p.push(format!("cell {i}: cell_type {}", c["cell_type"]));
        }
        if !c["metadata"].is_object() {
            p.push(format!("cell {i}: metadata is not an object"));
        }
        let source_ok = c["source"].is_string() || c["source"].as_array().is_some_and(|l| l.iter().all(Value::is_string));
        if !source_ok {
            p.push(format!("cell {i}: source is neither a string nor a list of strings"));
        }
        if let Some(lines) = c["source"].as_array() {
            // Every line but the last ends in a newline (nbformat joins them with "").
            let n = lines.len();
            if lines.iter().take(n.saturating_sub(1)).any(|l| !l.as_str().unwrap_or("").ends_with('\n')) {
                p.push(format!("cell {i}: a source line other than the last lacks its newline"));
            }
        }
        if minor >= 5 {
            let id = c["id"].as_str().unwrap_or("");
            let id_ok = (1..=64).contains(&id.len()) && id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
            if !id_ok || !ids.insert(id.to_string()) {
                p.push(format!("cell {i}: id {} is missing, malformed or repeated", c["id"]));
            }
        }
        match kind {
            "code" => {
                if !c["outputs"].is_array() {
                    p.push(format!("cell {i}: a code cell without an outputs list"));
                }
                if !(c["execution_count"].is_null() || c["execution_count"].is_u64()) || c.get("execution_count").is_none() {
                    p.push(format!("cell {i}: execution_count must be present, null or a count"));
                }
            }
            _ => {
                if c.get("outputs").is_some() || c.get("execution_count").is_some() {
                    p.push(format!("cell {i}: a {kind} cell with outputs or an execution count"));
                }
            }
        }
    }
    p
}

fn source(c: &Value) -> String {
    match &c["source"] {
        Value::String(s) => s.clone(),
        Value::Array(l) => l.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn notebook_command_writes_a_valid_evcxr_notebook_next_to_the_report() {
    let p = project("nb-cli");
    run(p.path());
    let out = reprise(p.path(), &["notebook", "reports/tiny.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(printed, "artifacts/tiny/tiny.ipynb");
    let nb_path = p.path().join(&printed);
    let nb = read_json(&nb_path);
    assert_eq!(problems(&nb), Vec::<String>::new());
    assert_eq!(nb["nbformat"], 4);
    assert_eq!(nb["metadata"]["kernelspec"]["display_name"], "Rust");

    let cells = nb["cells"].as_array().unwrap();
    let code: Vec<String> = cells.iter().filter(|c| c["cell_type"] == "code").map(source).collect();
    let markdown: Vec<String> = cells.iter().filter(|c| c["cell_type"] == "markdown").map(source).collect();
    // The first code cell adds this crate by a path that resolves from the notebook's folder
    // (the kernel's working directory).
    let dep = code[0].strip_prefix(":dep reprise = { path = \"").and_then(|s| s.strip_suffix("\" }")).unwrap_or_else(|| panic!("first cell: {}", code[0]));
    let crate_dir = nb_path.parent().unwrap().join(dep);
    assert_eq!(std::fs::canonicalize(crate_dir).unwrap(), std::fs::canonicalize(repo()).unwrap());
    assert!(code[1].contains("Report::open_with(\"../../reports/tiny.toml\", \"quick\", &[], None)?"), "{}", code[1]);
    // The template's calls, in order, each in its own cell; its prose in Markdown cells.
    let calls: Vec<&str> = code.iter().filter(|c| c.starts_with("report.") && c.ends_with(")?")).map(String::as_str).collect();
    assert_eq!(calls, ["report.table(\"imb\")?", "report.figure(\"drift\")?", "report.claim(\"drift\")?"]);
    assert!(markdown.iter().any(|m| m.starts_with("# Tiny")), "{markdown:?}");
    assert!(markdown.iter().any(|m| m.contains("## Provenance")));
    // Writing it again gives the same bytes (the notebook can be committed beside the report).
    let before = std::fs::read(&nb_path).unwrap();
    assert!(reprise(p.path(), &["notebook", "reports/tiny.toml"]).status.success());
    assert_eq!(std::fs::read(&nb_path).unwrap(), before);
}

#[test]
fn notebook_without_a_cache_trains_nothing_and_says_to_run_first() {
    let p = project("nb-empty");
    let out = reprise(p.path(), &["notebook", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `reprise run reports/tiny.toml` first") && err.contains("train/imb/imbalance=0.1 seed=0"), "{err}");
    assert!(!p.path().join("artifacts/tiny/tiny.ipynb").exists());
    let records = std::fs::read_dir(p.path().join("artifacts/store/cells")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(records, 0, "a cell was computed");
}

#[test]
fn the_library_shows_what_the_html_report_shows() {
    let p = project("nb-lib");
    run(p.path());
    let spec = p.path().join("reports/tiny.toml");
    let store = p.path().join("artifacts/store");
    let report = Report::open_with(&spec, "quick", &[], Some(&store)).unwrap();
    let out = p.path().join("artifacts/tiny");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();

    let t = report.table("imb").unwrap();
    assert!(html.contains(&reprise::render::table::html(&t.table, "quick")), "the table differs from the report's");
    let b = t.bundle();
    assert!(b.get("text/html").unwrap().contains("<table>") && b.get("text/plain").unwrap().contains("| imbalance | accuracy | drift_norm | cells |"));
    let text = b.evcxr_text();
    assert!(text.starts_with("EVCXR_BEGIN_CONTENT text/html\n") && text.ends_with("EVCXR_END_CONTENT\n") && text.contains("EVCXR_BEGIN_CONTENT text/plain\n"), "{text}");
    assert_eq!(t.csv(), std::fs::read_to_string(out.join("tables/imb.csv")).unwrap());

    let f = report.figure("drift").unwrap();
    assert_eq!(f.svg, std::fs::read_to_string(out.join("figures/drift.svg")).unwrap());
    assert!(html.contains(&reprise::render::figure_html(&f.id, &f.title, &f.svg)), "the figure differs from the report's");
    assert!(f.bundle().get("text/html").unwrap().contains("<svg"));

    let c = report.claim("drift").unwrap();
    assert!(html.contains(&reprise::render::claims::html(&c.0)));
    assert_eq!(report.claims().0.len(), 1);

    let results = report.frame("results").unwrap();
    let committed = ParquetReader::new(std::fs::File::open(out.join("frames/results.parquet")).unwrap()).finish().unwrap();
    assert!(results.equals_missing(&committed), "the results frame differs from frames/results.parquet");
    assert!(results.bundle().get("text/html").unwrap().contains("rows ×"));
    assert!(report.frame("per_class").unwrap().height() > 0);

    let cells = report.cells();
    assert_eq!(cells.len(), 9);
    assert!(cells.iter().all(|c| c.status == "cached"), "{:?}", cells.0);
    assert!(report.bundle().get("text/html").unwrap().contains("Tiny"));

    // Unknown ids name what exists.
    let e = report.table("nope").unwrap_err().to_string();
    assert!(e.contains("no table `nope`") && e.contains("imb") && e.contains("tiny.toml"), "{e}");
    assert!(report.frame("nope").unwrap_err().to_string().contains("results, per_class, objects and per_task"));

    // Re-rendering from the cache gives the committed bytes again.
    let md = std::fs::read(out.join("report.md")).unwrap();
    let r = report.render().unwrap();
    assert_eq!(std::fs::read(&r.rendered.markdown).unwrap(), md);
    assert_eq!(std::fs::read_to_string(&r.rendered.html).unwrap(), html);
}

#[test]
fn opening_without_the_cells_is_an_error_naming_the_command() {
    let p = project("nb-missing");
    let spec = p.path().join("reports/tiny.toml");
    let store = p.path().join("artifacts/store");
    let e = Report::open_with(&spec, "quick", &[], Some(&store)).err().expect("opened without a cache").to_string();
    assert!(e.contains("not in the cache") && e.contains("reprise run"), "{e}");
}

/// The notebooks `reprise notebook` wrote under the repository's `artifacts/`: `<id>/<id>.ipynb`
/// beside each report. Executed copies (`*.executed.ipynb` from nbexec, `*.jupyter.ipynb` from
/// nbconvert) carry the kernel's own metadata and are not ours to validate.
fn committed_notebooks() -> Vec<PathBuf> {
    let Ok(dirs) = std::fs::read_dir(repo().join("artifacts")) else { return Vec::new() };
    let mut found: Vec<PathBuf> = dirs.filter_map(|d| d.ok()).map(|d| d.path().join(format!("{}.ipynb", d.file_name().to_string_lossy()))).filter(|f| f.is_file()).collect();
    found.sort();
    found
}

#[test]
fn every_committed_notebook_is_valid() {
    for nb in committed_notebooks() {
        assert_eq!(problems(&read_json(&nb)), Vec::<String>::new(), "{}", nb.display());
    }
}

#[test]
fn the_validator_catches_what_jupyter_rejects() {
    let bad: Value = serde_json::json!({
        "nbformat": 3, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python", "language": "python"}},
        "cells": [
            {"cell_type": "code", "id": "a", "metadata": {}, "source": ["x\n", "y"]},
            {"cell_type": "markdown", "id": "a", "metadata": {}, "source": [1], "outputs": []},
        ]
    });
    let p = problems(&bad);
    for want in ["nbformat is 3", "kernelspec", "language_info", "without an outputs list", "execution_count", "source is neither", "repeated", "markdown cell with outputs"] {
        assert!(p.iter().any(|x| x.contains(want)), "no `{want}` in {p:?}");
    }
}

/// The main report's notebook, from its committed frames: the calls in template order, each
/// prose piece as report.md has it.
#[test]
fn the_neural_collapse_template_splits_into_prose_and_its_calls() {
    use reprise::render::{self, Call, Part};
    let spec = reprise::spec::load(&repo().join("reports/neural-collapse.toml"), "quick", &[]).unwrap();
    let plan = reprise::plan::plan(&spec).unwrap();
    let out = repo().join("artifacts/neural-collapse");
    let frames = reprise::frames::Frames::read(&out.join("frames"), plan.method.metrics()).unwrap();
    let parts = render::parts(&spec, &frames).unwrap();

    let template = std::fs::read_to_string(repo().join("templates/neural-collapse.md.j2")).unwrap();
    let mut in_template = Vec::new();
    for piece in template.split("{{ ").skip(1) {
        for call in [Call::Table, Call::Figure, Call::Claim] {
            if let Some(rest) = piece.strip_prefix(&format!("{}(\"", call.name())) {
                in_template.push((call, rest.split('"').next().unwrap().to_string()));
            }
        }
    }
    let calls: Vec<(Call, String)> = parts.iter().filter_map(|p| if let Part::Call(c, id) = p { Some((*c, id.clone())) } else { None }).collect();
    assert_eq!(calls, in_template);
    assert_eq!(calls.iter().filter(|c| c.0 == Call::Table).count(), spec.tables.len());
    assert_eq!(calls.iter().filter(|c| c.0 == Call::Figure).count(), spec.figures.len());

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for p in &parts {
        if let Part::Prose(text) = p {
            assert!(md.contains(text.as_str()), "prose not in report.md:\n{text}");
        }
    }
    assert!(matches!(&parts[0], Part::Prose(t) if t.starts_with("# Neural Collapse in Imbalanced Learning")));
    assert!(matches!(parts.last(), Some(Part::Prose(t)) if t.contains("## Provenance")));
}
