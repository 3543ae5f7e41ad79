//! Rendering: a report's frames and its spec's table, figure and claim declarations, through
//! its minijinja template, into Markdown, one self-contained HTML file, SVG figures and CSV
//! tables. Rendering reads frames only — it never trains and never reads the store — so a
//! report re-renders byte-identically from its committed frames.
//!
//! The template is Markdown with calls: `{{ table("id") }}`, `{{ figure("id") }}`,
//! `{{ claim("id") }}`, plus `report`, `profile`, `overrides`, `experiments` and `claims`
//! variables. It is rendered twice: once with Markdown snippets, once with HTML snippets that
//! the Markdown-to-HTML pass keeps as they are. A notebook renders it a third time with a
//! marker at each call and splits the text there ([`parts`]); [`table`], [`figure`], [`claim`]
//! and [`figure_html`] give one piece as the report shows it.

pub mod claims;
pub mod figure;
pub mod stats;
pub mod summary;
pub mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{context, Environment, Value};
use serde::Serialize;

use crate::frames::Frames;
use crate::fs::write_atomic;
use crate::spec::confine;
use crate::spec::{FigureDecl, Spec, TableDecl};
use claims::ClaimResult;
use table::esc;

/// Errors of rendering, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {path}: {source}")]
    Template { path: PathBuf, source: minijinja::Error },
    /// The template named by the spec is not a file inside `templates/`.
    #[error("{message}")]
    TemplatePath { message: String },
    /// Calls of the template that name no table, figure or claim of the spec, all of them.
    #[error("template {path} calls what the spec does not declare:\n{}", .problems.join("\n"))]
    UnknownCalls { path: PathBuf, problems: Vec<String> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Figure(#[from] figure::FigureError),
    #[error("{0}")]
    Unknown(String),
}

/// Paths of everything rendered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rendered {
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub figures: Vec<PathBuf>,
    pub tables: Vec<PathBuf>,
    pub claims: Vec<ClaimSummary>,
}

/// A claim's verdict, for `--json` and `verify`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClaimSummary {
    pub id: String,
    /// `document`, `literature` or `ours`.
    pub source: String,
    /// `holds`, `does not hold`, `inconclusive` or `not measured`.
    pub verdict: String,
    /// Seeds per side or per point (the smallest).
    pub n: usize,
    pub value: Option<f64>,
    /// The 95 % interval of `value`, [lo, hi].
    pub interval: Option<[f64; 2]>,
    pub measured: String,
    pub gate: bool,
}

/// Everything computed from the frames before any text is written.
struct Computed {
    tables: BTreeMap<String, table::Table>,
    figures: BTreeMap<String, (String, String)>, // id → (title, svg)
    claims: Vec<ClaimResult>,
}

fn compute(spec: &Spec, frames: &Frames) -> Result<Computed, RenderError> {
    let mut tables = BTreeMap::new();
    for t in &spec.tables {
        tables.insert(t.id.clone(), build_table(spec, t, frames)?);
    }
    let mut figures = BTreeMap::new();
    for f in &spec.figures {
        figures.insert(f.id.clone(), (f.title.clone(), build_figure(spec, f, frames)?));
    }
    let claims = claim_results(spec, frames);
    Ok(Computed { tables, figures, claims })
}

fn build_table(spec: &Spec, t: &TableDecl, frames: &Frames) -> Result<table::Table, RenderError> {
    let exp = spec.experiment(&t.experiment).ok_or_else(|| RenderError::Unknown(format!("table `{}`: unknown experiment `{}`", t.id, t.experiment)))?;
    if !t.params.is_empty() {
        return Ok(table::build_params(t, &spec.profile_params));
    }
    if t.kind == crate::spec::TableKind::Tasks {
        return Ok(table::build_tasks(t, exp, frames));
    }
    Ok(table::build(t, exp, frames))
}

fn build_figure(spec: &Spec, f: &FigureDecl, frames: &Frames) -> Result<String, RenderError> {
    let exp = spec.experiment(&f.experiment).ok_or_else(|| RenderError::Unknown(format!("figure `{}`: unknown experiment `{}`", f.id, f.experiment)))?;
    Ok(figure::svg(f, exp, frames)?)
}

/// The error for an id the spec does not declare, listing those it does.
fn unknown_id(spec: &Spec, what: &str, id: &str, known: Vec<&str>) -> RenderError {
    RenderError::Unknown(format!("{}: no {what} `{id}` (declared: {})", spec.path.display(), if known.is_empty() { "none".to_string() } else { known.join(", ") }))
}

/// One table of the report, computed from `frames` exactly as the report shows it.
pub fn table(spec: &Spec, frames: &Frames, id: &str) -> Result<table::Table, RenderError> {
    let decl = spec.tables.iter().find(|t| t.id == id).ok_or_else(|| unknown_id(spec, "table", id, spec.tables.iter().map(|t| t.id.as_str()).collect()))?;
    build_table(spec, decl, frames)
}

/// One figure of the report as SVG text, with its declaration (id, title).
pub fn figure(spec: &Spec, frames: &Frames, id: &str) -> Result<(FigureDecl, String), RenderError> {
    let decl = spec.figures.iter().find(|f| f.id == id).ok_or_else(|| unknown_id(spec, "figure", id, spec.figures.iter().map(|f| f.id.as_str()).collect()))?;
    Ok((decl.clone(), build_figure(spec, decl, frames)?))
}

/// One claim's verdict.
pub fn claim(spec: &Spec, frames: &Frames, id: &str) -> Result<ClaimResult, RenderError> {
    let decl = spec.claims.iter().find(|c| c.id == id).ok_or_else(|| unknown_id(spec, "claim", id, spec.claims.iter().map(|c| c.id.as_str()).collect()))?;
    Ok(claims::evaluate(decl, frames))
}

/// A figure as the HTML report shows it: the SVG inline (without its XML declaration) in a
/// `<figure>` with its caption.
pub fn figure_html(id: &str, title: &str, svg: &str) -> String {
    let svg = svg.trim_start_matches(|ch| ch != '<');
    let svg = svg.strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>").unwrap_or(svg);
    let id = esc(id);
    format!("<figure class=\"figure\" id=\"figure-{id}\">{}<figcaption><b>Figure {id}:</b> {}</figcaption></figure>", one_block(svg), esc(title))
}

/// The claims' verdicts alone (for `verify`).
pub fn claim_results(spec: &Spec, frames: &Frames) -> Vec<ClaimResult> {
    spec.claims.iter().map(|c| claims::evaluate(c, frames)).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Markdown,
    Html,
    /// Markdown prose with a marker at each call, split into [`Part`]s afterwards.
    Notebook,
}

/// A template call: what a notebook shows in a code cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Table,
    Figure,
    Claim,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Table => "table",
            Call::Figure => "figure",
            Call::Claim => "claim",
        }
    }
}

/// A piece of a report in template order: Markdown prose, or one table, figure or claim.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Prose(String),
    Call(Call, String),
}

/// Bytes that cannot occur in a template's prose, around a call's kind and id.
const MARK: char = '\u{1}';

fn marker(call: Call, id: &str) -> String {
    format!("{MARK}{}:{id}{MARK}", call.name())
}

/// The report in template order, as a notebook shows it: prose (Markdown, with the claims
/// summary and the appendix) between the table, figure and claim calls. Blank prose between
/// two calls is dropped.
pub fn parts(spec: &Spec, frames: &Frames) -> Result<Vec<Part>, RenderError> {
    let computed = Arc::new(compute(spec, frames)?);
    let text = render_template(spec, frames, &computed, Mode::Notebook)?;
    let mut parts = Vec::new();
    for (i, piece) in text.split(MARK).enumerate() {
        if i % 2 == 0 {
            if !piece.trim().is_empty() {
                parts.push(Part::Prose(piece.trim().to_string()));
            }
            continue;
        }
        let (kind, id) = piece.split_once(':').ok_or_else(|| RenderError::Unknown(format!("malformed call marker `{piece}`")))?;
        let call = [Call::Table, Call::Figure, Call::Claim].into_iter().find(|c| c.name() == kind).ok_or_else(|| RenderError::Unknown(format!("unknown call `{kind}`")))?;
        parts.push(Part::Call(call, id.to_string()));
    }
    Ok(parts)
}

/// Drop blank lines so that an HTML snippet stays one HTML block inside Markdown.
fn one_block(s: &str) -> String {
    s.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("\n")
}

/// A file of `templates/`, refused when the name leads outside the folder (the spec is checked
/// the same way at load; this guards every other way a `Spec` can be made).
fn template_file(spec: &Spec, name: &str) -> Result<PathBuf, RenderError> {
    let folder = spec.root.join("templates");
    confine::resolve_in(&folder, name).map_err(|why| RenderError::TemplatePath { message: why.message("template", name, &folder) })
}

/// Text from the spec for Markdown that becomes HTML: `&`, `<`, `>` and `"` as entities, so no
/// spec string can open an HTML tag (Markdown passes raw HTML through). Markdown decodes the
/// entities and writes text the same way either way, so ordinary text renders to the same bytes.
fn md_esc(s: &str) -> String {
    esc(s)
}

/// An empty minijinja environment for a report template: undefined variables are errors and, in
/// the HTML pass, every value that is not one of our snippets is escaped (see [`md_esc`]).
fn template_env(mode: Mode) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    if mode == Mode::Html {
        env.set_formatter(|out, state, value| {
            if value.is_safe() {
                return minijinja::escape_formatter(out, state, value);
            }
            out.write_str(&md_esc(&value.to_string())).map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "cannot write the template's output"))
        });
    }
    env
}

/// The template's variables: `report`, `profile`, `overrides`, `experiments` and `claims`.
fn template_context(spec: &Spec, claims: Vec<Value>) -> Value {
    let experiments: Vec<Value> = spec
        .experiments
        .iter()
        .map(|e| Value::from_serialize(serde_json::json!({"id": e.id, "title": e.title, "description": e.description, "axes": e.axes, "runs": e.runs.len(), "seeds": e.seeds})))
        .collect();
    context! {
        report => Value::from_serialize(&spec.report),
        profile => spec.profile.clone(),
        overrides => spec.overrides.clone(),
        experiments => experiments,
        claims => claims,
    }
}

/// Check `spec`'s template before anything runs, so that a broken template fails in a second,
/// not after the training: it must be a file inside `templates/`, parse, render against the
/// spec (with empty tables, figures and claims), and every `table("…")`, `figure("…")` and
/// `claim("…")` it calls — with a literal id anywhere in its text, or any id on the path
/// that rendering takes — must name an id the spec declares. Every unknown call is reported.
/// `templates/base.html.j2`, the HTML page, must be there and parse.
pub fn check_template(spec: &Spec) -> Result<(), RenderError> {
    // The HTML page around the report, which `render` reads last.
    let base_path = template_file(spec, "base.html.j2")?;
    let base = std::fs::read_to_string(&base_path).map_err(|source| RenderError::Io { path: base_path.clone(), source })?;
    Environment::new().add_template_owned("base.html.j2", base).map_err(|source| RenderError::Template { path: base_path.clone(), source })?;

    let tpl_path = template_file(spec, &spec.report.template)?;
    let source = std::fs::read_to_string(&tpl_path).map_err(|source| RenderError::Io { path: tpl_path.clone(), source })?;
    let calls: Arc<std::sync::Mutex<Vec<(Call, String)>>> = Arc::default();
    let mut env = template_env(Mode::Markdown);
    for call in [Call::Table, Call::Figure, Call::Claim] {
        let calls = calls.clone();
        env.add_function(call.name(), move |id: String| -> Value {
            if let Ok(mut c) = calls.lock() {
                c.push((call, id));
            }
            Value::from_safe_string(String::new())
        });
    }
    let fail = |source| RenderError::Template { path: tpl_path.clone(), source };
    env.add_template_owned(spec.report.template.clone(), source.clone()).map_err(fail)?;
    let claims: Vec<Value> = spec
        .claims
        .iter()
        .map(|c| Value::from_serialize(serde_json::json!({"id": c.id, "text": c.text, "source": c.source.name(), "cite": c.cite, "verdict": "not measured", "n": 0, "measured": "", "power": null})))
        .collect();
    env.get_template(&spec.report.template).and_then(|t| t.render(template_context(spec, claims))).map_err(fail)?;

    let mut found: Vec<(Call, String, Option<usize>)> = literal_calls(&source).into_iter().map(|(c, id, line)| (c, id, Some(line))).collect();
    for (c, id) in calls.lock().map(|v| v.clone()).unwrap_or_default() {
        if !found.iter().any(|(fc, fid, _)| *fc == c && *fid == id) {
            found.push((c, id, None));
        }
    }
    let mut problems = Vec::new();
    for (call, id, line) in found {
        let declared: Vec<String> = match call {
            Call::Table => spec.tables.iter().map(|t| t.id.clone()).collect(),
            Call::Figure => spec.figures.iter().map(|f| f.id.clone()).collect(),
            Call::Claim => spec.claims.iter().map(|c| c.id.clone()).collect(),
        };
        if declared.contains(&id) {
            continue;
        }
        let at = line.map_or(String::new(), |l| format!("line {l}: "));
        let hint = if declared.is_empty() { format!("the spec declares no {}s", call.name()) } else { crate::params::suggest(&id, &declared) };
        problems.push(format!("  {at}{}(\"{id}\"): no {} `{id}` in {}; {hint}", call.name(), call.name(), spec.path.display()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RenderError::UnknownCalls { path: tpl_path, problems })
    }
}

/// The calls `table("…")`, `figure("…")`, `claim("…")` with a literal id in a template's text,
/// with their 1-based line, in order.
fn literal_calls(source: &str) -> Vec<(Call, String, usize)> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        for call in [Call::Table, Call::Figure, Call::Claim] {
            let name = call.name();
            for (at, _) in line.match_indices(name) {
                // A whole word: `subtable(` or `my_claim(` is another function.
                if line[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                    continue;
                }
                let rest = line[at + name.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('(') else { continue };
                let rest = rest.trim_start();
                let Some(quote) = rest.chars().next().filter(|q| *q == '"' || *q == '\'') else { continue };
                let Some((id, tail)) = rest[1..].split_once(quote) else { continue };
                if tail.trim_start().starts_with(')') {
                    out.push((call, id.to_string(), n + 1));
                }
            }
        }
    }
    out
}

fn render_template(spec: &Spec, frames: &Frames, c: &Arc<Computed>, mode: Mode) -> Result<String, RenderError> {
    let tpl_path = template_file(spec, &spec.report.template)?;
    let source = std::fs::read_to_string(&tpl_path).map_err(|source| RenderError::Io { path: tpl_path.clone(), source })?;
    let mut env = template_env(mode);
    let profile = spec.profile.clone();
    {
        let c = c.clone();
        env.add_function("table", move |id: String| -> Result<Value, minijinja::Error> {
            let t = c.tables.get(&id).ok_or_else(|| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("no table `{id}` in the spec")))?;
            Ok(Value::from_safe_string(match mode {
                Mode::Markdown => table::markdown(t),
                Mode::Html => format!("\n{}\n", one_block(&table::html(t, &profile))),
                Mode::Notebook => marker(Call::Table, &id),
            }))
        });
    }
    {
        let c = c.clone();
        env.add_function("figure", move |id: String| -> Result<Value, minijinja::Error> {
            let (title, svg) = c.figures.get(&id).ok_or_else(|| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("no figure `{id}` in the spec")))?;
            Ok(Value::from_safe_string(match mode {
                Mode::Markdown => format!("![{title}](figures/{id}.svg)\n\n*Figure {id}: {title}*\n"),
                Mode::Html => format!("\n{}\n", figure_html(&id, title, svg)),
                Mode::Notebook => marker(Call::Figure, &id),
            }))
        });
    }
    {
        let c = c.clone();
        env.add_function("claim", move |id: String| -> Result<Value, minijinja::Error> {
            let r = c.claims.iter().find(|r| r.id == id).ok_or_else(|| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("no claim `{id}` in the spec")))?;
            Ok(Value::from_safe_string(match mode {
                Mode::Markdown => claims::markdown(r),
                Mode::Html => format!("\n{}\n", claims::html(r)),
                Mode::Notebook => marker(Call::Claim, &id),
            }))
        });
    }
    env.add_template_owned(spec.report.template.clone(), source).map_err(|source| RenderError::Template { path: tpl_path.clone(), source })?;
    let tpl = env.get_template(&spec.report.template).map_err(|source| RenderError::Template { path: tpl_path.clone(), source })?;
    let claims: Vec<Value> = c
        .claims
        .iter()
        .map(|r| {
            Value::from_serialize(
                serde_json::json!({"id": r.id, "text": r.text, "source": claims::source_text(r), "cite": r.cite, "verdict": r.verdict(), "n": r.n, "measured": r.measured, "power": r.power}),
            )
        })
        .collect();
    let body = tpl.render(template_context(spec, claims)).map_err(|source| RenderError::Template { path: tpl_path.clone(), source })?;
    Ok(format!("{}\n{}", body.trim_end(), appendix(spec, frames, mode)))
}

/// Sections every report ends with: failed runs, then where each number came from.
fn appendix(spec: &Spec, frames: &Frames, mode: Mode) -> String {
    // Run labels, reasons and overrides are spec or user text: escaped for the HTML pass.
    let t = |s: &str| if mode == Mode::Html { md_esc(s) } else { s.to_string() };
    let mut out = String::new();
    // The first row of each run (experiment and run label), in frame order.
    let mut runs: Vec<&crate::frames::ResultRow> = Vec::new();
    for r in &frames.results {
        if !runs.iter().any(|x| x.experiment == r.experiment && x.run == r.run) {
            runs.push(r);
        }
    }
    let failed: Vec<_> = runs.iter().filter(|r| r.status != "ok").collect();
    if !failed.is_empty() {
        out.push_str("\n## Failed runs\n\nThese runs produced no usable result; the tables and figures above leave them out.\n\n");
        for r in failed {
            out.push_str(&format!("- `{}` {} (cell `{}`): {}\n", t(&r.experiment), t(&r.run), t(r.key.get(..12).unwrap_or(&r.key)), t(r.reason.as_deref().unwrap_or("failed"))));
        }
    }
    out.push_str(&format!(
        "\n## Provenance\n\nProfile `{}`{}. Every number above comes from the training cells below; a cell's key is the sha256 of everything that determines it (`reprise status {} --explain KEY` prints it).\n\n",
        t(&spec.profile),
        if spec.overrides.is_empty() { String::new() } else { format!(", overrides `{}`", t(&spec.overrides.join("`, `"))) },
        t(&spec.rel_path())
    ));
    if mode == Mode::Html {
        out.push_str("<details><summary>Cells</summary>\n\n");
    }
    out.push_str("| experiment | run | seed | status | cell key |\n|---|---|---|---|---|\n");
    for r in &runs {
        out.push_str(&format!("| {} | {} | {} | {} | `{}` |\n", t(&r.experiment), t(&r.run), r.seed, t(&r.status), t(&r.key)));
    }
    if mode == Mode::Html {
        out.push_str("\n</details>\n");
    }
    out
}

/// A link or image whose address would run script when followed (`javascript:`, `vbscript:`,
/// `data:`), as Markdown in a spec string can write, points nowhere instead.
fn defuse_link(event: pulldown_cmark::Event<'_>) -> pulldown_cmark::Event<'_> {
    use pulldown_cmark::{Event, Tag};
    let unsafe_url = |url: &str| {
        let scheme: String = url.chars().filter(|c| !c.is_whitespace() && !c.is_control()).take_while(|c| *c != ':').collect::<String>().to_ascii_lowercase();
        url.contains(':') && ["javascript", "vbscript", "data"].contains(&scheme.as_str())
    };
    match event {
        Event::Start(Tag::Link { link_type, dest_url, title, id }) if unsafe_url(&dest_url) => Event::Start(Tag::Link { link_type, dest_url: "#".into(), title, id }),
        Event::Start(Tag::Image { link_type, dest_url, title, id }) if unsafe_url(&dest_url) => Event::Start(Tag::Image { link_type, dest_url: "#".into(), title, id }),
        other => other,
    }
}

/// Styles of the HTML page itself.
const PAGE_CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.5;color:#222}";

/// Styles of tables, figures and claims, which a notebook's HTML outputs carry too.
pub const COMPONENT_CSS: &str = "table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f4f4f4}\
td.num{text-align:right;font-variant-numeric:tabular-nums}td.ref{color:#555;font-style:italic}\
figure{margin:1.2em 0}figcaption{font-size:.92em;color:#333;margin:.3em 0}svg{max-width:100%;height:auto}\
.claim{border-left:4px solid #999;padding:.4em .8em;margin:.6em 0;background:#fafafa}.claim.holds{border-color:#2a9d3a}.claim.fails{border-color:#c62828}\
code{background:#f4f4f4;padding:0 .2em}p.caption{font-size:.9em;color:#555}";

/// Render `spec`'s report from `frames` into `out_dir`.
pub fn render(spec: &Spec, frames: &Frames, out_dir: &Path) -> Result<Rendered, RenderError> {
    let computed = Arc::new(compute(spec, frames)?);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RenderError::Io { path, source }
    };
    for sub in ["figures", "tables"] {
        std::fs::create_dir_all(out_dir.join(sub)).map_err(io(&out_dir.join(sub)))?;
    }
    let mut rendered = Rendered::default();
    for (id, (_, svg)) in &computed.figures {
        let p = out_dir.join("figures").join(format!("{id}.svg"));
        write_atomic(&p, svg.as_bytes()).map_err(io(&p))?;
        rendered.figures.push(p);
    }
    for (id, t) in &computed.tables {
        let p = out_dir.join("tables").join(format!("{id}.csv"));
        write_atomic(&p, table::csv(t).as_bytes()).map_err(io(&p))?;
        rendered.tables.push(p);
    }
    let md = render_template(spec, frames, &computed, Mode::Markdown)?;
    let p = out_dir.join("report.md");
    write_atomic(&p, md.as_bytes()).map_err(io(&p))?;
    rendered.markdown = p;

    let html_md = render_template(spec, frames, &computed, Mode::Html)?;
    let mut opts = pulldown_cmark::Options::empty();
    opts.insert(pulldown_cmark::Options::ENABLE_TABLES);
    let parser = pulldown_cmark::Parser::new_ext(&html_md, opts).map(defuse_link);
    let mut body = String::new();
    pulldown_cmark::html::push_html(&mut body, parser);
    let base_path = template_file(spec, "base.html.j2")?;
    let base = std::fs::read_to_string(&base_path).map_err(io(&base_path))?;
    let mut env = Environment::new();
    env.add_template_owned("base.html.j2", base).map_err(|source| RenderError::Template { path: base_path.clone(), source })?;
    let html = env
        .get_template("base.html.j2")
        .and_then(|t| {
            t.render(
                context! { title => Value::from_safe_string(esc(&spec.report.title)), css => Value::from_safe_string(format!("{PAGE_CSS}{COMPONENT_CSS}")), body => Value::from_safe_string(body) },
            )
        })
        .map_err(|source| RenderError::Template { path: base_path.clone(), source })?;
    let p = out_dir.join("report.html");
    write_atomic(&p, html.as_bytes()).map_err(io(&p))?;
    rendered.html = p;
    rendered.claims = computed
        .claims
        .iter()
        .map(|r| ClaimSummary {
            id: r.id.clone(),
            source: r.source.clone(),
            verdict: r.verdict().to_string(),
            n: r.n,
            value: r.value,
            interval: r.interval.map(|(lo, hi)| [lo, hi]),
            measured: r.measured.clone(),
            gate: r.gate,
        })
        .collect();
    Ok(rendered)
}

#[cfg(test)]
mod task_tests;
#[cfg(test)]
mod tests;
