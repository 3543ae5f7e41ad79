//! Tables: one row per grid point of an experiment, final-epoch metrics as mean ± std over
//! seeds (or ± a per-run interval, with the spread over seeds beside it), the document's numbers
//! beside ours, and the cells each row comes from; or one row per task of one run (`tasks`).

use super::summary::{self, fmt_stat, fmt_value, Stat};
use crate::frames::Frames;
use std::collections::BTreeMap;

use crate::params::Params;
use crate::spec::{Experiment, RefValue, TableDecl};

/// A computed table.
#[derive(Debug, Clone)]
pub struct Table {
    pub id: String,
    pub title: String,
    pub caption: Option<String>,
    pub row_params: Vec<String>,
    pub metrics: Vec<String>,
    pub reference_label: Option<String>,
    pub reference_note: Option<String>,
    pub rows: Vec<TableRow>,
}

#[derive(Debug, Clone)]
pub struct TableRow {
    pub labels: Vec<String>,
    pub stats: Vec<Option<Stat>>,
    /// Per metric, its interval half-width over the row's runs where the table gives one
    /// (`intervals`): printed as mean ± the mean half-width.
    pub intervals: Vec<Option<Stat>>,
    pub reference: Option<String>,
    /// Published values per metric, printed beside ours.
    pub metric_refs: std::collections::BTreeMap<String, String>,
    /// Cell keys of the runs in this row, and their seeds.
    pub keys: Vec<String>,
    pub seeds: Vec<u64>,
    /// Runs without a usable result, with the reason.
    pub failures: Vec<String>,
}

pub fn build(decl: &TableDecl, exp: &Experiment, frames: &Frames) -> Table {
    let row_params = if decl.rows.is_empty() { exp.axes.clone() } else { decl.rows.clone() };
    let finals = summary::final_rows(frames, &exp.id);
    let rows = summary::group_by(&finals, &row_params)
        .into_iter()
        .map(|(labels, group)| {
            let stats = decl.metrics.iter().map(|m| Stat::of(&summary::values(&group, m))).collect();
            let intervals = decl.metrics.iter().map(|m| decl.intervals.get(m).and_then(|ci| Stat::of(&summary::values(&group, ci)))).collect();
            let published = decl.reference.as_ref().and_then(|r| r.values.get(&labels.join(" / ")).cloned());
            let (reference, metric_refs) = match published {
                Some(RefValue::Row(v)) => (Some(v), Default::default()),
                Some(RefValue::PerMetric(m)) => (None, m),
                None => (None, Default::default()),
            };
            let mut keys: Vec<String> = group.iter().map(|r| r.key.clone()).collect();
            keys.dedup();
            let failures = group.iter().filter(|r| r.status != "ok").map(|r| format!("{}: {}", r.run, r.reason.clone().unwrap_or_else(|| r.status.clone()))).collect();
            TableRow { labels, stats, intervals, reference, metric_refs, keys, seeds: group.iter().map(|r| r.seed).collect(), failures }
        })
        .collect();
    Table {
        id: decl.id.clone(),
        title: decl.title.clone(),
        caption: decl.caption.clone(),
        row_params,
        metrics: decl.metrics.clone(),
        reference_label: decl.reference.as_ref().map(|r| r.label.clone()),
        reference_note: decl.reference.as_ref().and_then(|r| r.note.clone()),
        rows,
    }
}

/// The values a parameter takes over `runs`, each once in run order, joined by ", " (`–` where
/// no run has it: the profile does not run the experiment, or no configuration reads it).
fn param_values(runs: &[Params], p: &str) -> String {
    let mut seen: Vec<String> = Vec::new();
    for v in runs.iter().filter_map(|r| r.get(p)) {
        let v = v.to_string();
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    if seen.is_empty() {
        "–".to_string()
    } else {
        seen.join(", ")
    }
}

/// A parameter table ([`TableDecl::params`]): one row per parameter, the document's value, then
/// the values the experiment's runs take in each profile ([`param_values`]).
pub fn build_params(decl: &TableDecl, profiles: &[(String, BTreeMap<String, Vec<Params>>)]) -> Table {
    let mut row_params = vec!["parameter".to_string()];
    if !decl.document.is_empty() {
        row_params.push("document".to_string());
    }
    row_params.extend(profiles.iter().map(|(name, _)| name.clone()));
    let rows = decl
        .params
        .iter()
        .map(|p| {
            let mut labels = vec![p.clone()];
            if !decl.document.is_empty() {
                labels.push(decl.document.get(p).cloned().unwrap_or_else(|| "–".into()));
            }
            labels.extend(profiles.iter().map(|(_, exps)| param_values(exps.get(&decl.experiment).map_or(&[][..], Vec::as_slice), p)));
            TableRow { labels, stats: Vec::new(), intervals: Vec::new(), reference: None, metric_refs: BTreeMap::new(), keys: Vec::new(), seeds: Vec::new(), failures: Vec::new() }
        })
        .collect();
    Table { id: decl.id.clone(), title: decl.title.clone(), caption: decl.caption.clone(), row_params, metrics: Vec::new(), reference_label: None, reference_note: None, rows }
}

/// A per-task value as a `tasks` table prints it: whole numbers as such, accuracies as
/// percentages, anything else with three decimals.
fn task_value(metric: &str, v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if metric.ends_with("accuracy") {
        fmt_value(metric, v)
    } else {
        format!("{v:.3}")
    }
}

/// A `tasks` table: one row per task of the first seed's run among those `select` picks, at its
/// final epoch; each metric the task's own value, or its classes' values in class order. Tasks
/// that lack a listed value are left out; `limit` keeps the first tasks in task order (the
/// episodes are drawn at random, so a sample of them), and `sort` then orders those.
pub fn build_tasks(decl: &TableDecl, exp: &Experiment, frames: &Frames) -> Table {
    let runs = summary::task_runs(frames, &exp.id, decl.select.as_ref(), decl.set.as_deref());
    let mut row_params = Vec::new();
    if decl.set.is_none() {
        row_params.push("set".to_string());
    }
    row_params.push("task".to_string());
    row_params.extend(decl.metrics.iter().cloned());
    let empty = |caption: Option<String>| Table {
        id: decl.id.clone(),
        title: decl.title.clone(),
        caption,
        row_params: row_params.clone(),
        metrics: Vec::new(),
        reference_label: None,
        reference_note: None,
        rows: Vec::new(),
    };
    let Some(first) = runs.iter().min_by_key(|r| r.run.seed) else { return empty(decl.caption.clone()) };
    let mut tasks: BTreeMap<(&str, i64), Vec<&crate::frames::TaskRow>> = BTreeMap::new();
    for t in &first.tasks {
        tasks.entry((t.set.as_str(), t.task)).or_default().push(t);
    }
    let mut rows: Vec<(Option<f64>, TableRow)> = tasks
        .into_iter()
        .filter_map(|((set, task), mut rs)| {
            rs.sort_by_key(|r| r.class);
            let own = rs.iter().find(|r| r.class.is_none());
            let mut labels = Vec::new();
            if decl.set.is_none() {
                labels.push(set.to_string());
            }
            labels.push(task.to_string());
            for m in &decl.metrics {
                let text = match own.and_then(|r| r.value(m)) {
                    Some(v) => task_value(m, v),
                    None => {
                        let per_class: Vec<String> = rs.iter().filter(|r| r.class.is_some()).filter_map(|r| r.value(m)).map(|v| task_value(m, v)).collect();
                        if per_class.is_empty() {
                            return None;
                        }
                        per_class.join(" ")
                    }
                };
                labels.push(text);
            }
            let key = decl.sort.as_ref().and_then(|s| own.and_then(|r| r.value(s)));
            let row = TableRow {
                labels,
                stats: Vec::new(),
                intervals: Vec::new(),
                reference: None,
                metric_refs: BTreeMap::new(),
                keys: vec![first.run.key.clone()],
                seeds: vec![first.run.seed],
                failures: Vec::new(),
            };
            Some((key, row))
        })
        .collect();
    let total = rows.len();
    rows.truncate(decl.limit.unwrap_or(usize::MAX));
    if decl.sort.is_some() {
        rows.sort_by(|a, b| a.0.unwrap_or(f64::INFINITY).total_cmp(&b.0.unwrap_or(f64::INFINITY)));
    }
    let sorted = decl.sort.as_ref().map(|s| format!(", sorted by {s}")).unwrap_or_default();
    let source = format!("Run `{}` (cell `{}`): the first {} of its {total} tasks with these values{sorted}.", first.run.run, short(&first.run.key), rows.len());
    let caption = Some(match &decl.caption {
        Some(c) => format!("{source} {c}"),
        None => source,
    });
    Table { rows: rows.into_iter().map(|(_, r)| r).collect(), ..empty(caption) }
}

fn cell_text(t: &Table, row: &TableRow, j: usize) -> String {
    let m = &t.metrics[j];
    let ours = match (&row.stats[j], row.intervals.get(j).copied().flatten()) {
        (Some(s), Some(ci)) if s.n > 1 => format!("{} ± {} (sd {})", fmt_value(m, s.mean), fmt_value(m, ci.mean), fmt_value(m, s.std)),
        (Some(s), Some(ci)) => format!("{} ± {}", fmt_value(m, s.mean), fmt_value(m, ci.mean)),
        (Some(s), None) => fmt_stat(&t.metrics[j], s),
        (None, _) if !row.failures.is_empty() => "failed".to_string(),
        (None, _) => "–".to_string(),
    };
    match row.metric_refs.get(&t.metrics[j]) {
        Some(r) => format!("{ours} (doc {r})"),
        None => ours,
    }
}

/// Whether a table shows a separate reference column (one published value per row).
fn has_ref_column(t: &Table) -> bool {
    t.reference_label.is_some() && t.rows.iter().any(|r| r.reference.is_some())
}

fn short(key: &str) -> &str {
    key.get(..8).unwrap_or(key)
}

fn headers(t: &Table) -> Vec<String> {
    let mut h = t.row_params.clone();
    h.extend(t.metrics.iter().cloned());
    if let Some(r) = t.reference_label.as_ref().filter(|_| has_ref_column(t)) {
        h.push(r.clone());
    }
    h
}

/// Markdown (GitHub-flavoured table); the last column names the cells.
pub fn markdown(t: &Table) -> String {
    if t.rows.is_empty() {
        return format!("**Table {}: {}** — no runs in this profile.\n", t.id, t.title);
    }
    // A parameter table comes from no cell.
    let cells_column = !t.metrics.is_empty();
    let mut h = headers(t);
    if cells_column {
        h.push("cells".into());
    }
    let mut out = format!("**Table {}: {}**\n\n| {} |\n|{}|\n", t.id, t.title, h.join(" | "), vec!["---"; h.len()].join("|"));
    for row in &t.rows {
        let mut cells = row.labels.clone();
        cells.extend((0..t.metrics.len()).map(|j| cell_text(t, row, j)));
        if has_ref_column(t) {
            cells.push(row.reference.clone().unwrap_or_else(|| "–".into()));
        }
        if cells_column {
            cells.push(row.keys.iter().map(|k| format!("`{}`", short(k))).collect::<Vec<_>>().join(" "));
        }
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    if let Some(c) = &t.caption {
        out.push_str(&format!("\n{c}\n"));
    }
    if let Some(n) = &t.reference_note {
        out.push_str(&format!("\n{n}\n"));
    }
    out
}

/// Escape text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// HTML; every number's tooltip names its cells, seeds and the profile.
pub fn html(t: &Table, profile: &str) -> String {
    if t.rows.is_empty() {
        return format!("<p><b>Table {}: {}</b> — no runs in the <code>{}</code> profile.</p>", esc(&t.id), esc(&t.title), esc(profile));
    }
    let mut out = format!("<figure class=\"table\" id=\"table-{}\"><figcaption><b>Table {}:</b> {}</figcaption><table><thead><tr>", esc(&t.id), esc(&t.id), esc(&t.title));
    for h in headers(t) {
        out.push_str(&format!("<th>{}</th>", esc(&h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in &t.rows {
        out.push_str("<tr>");
        for l in &row.labels {
            out.push_str(&format!("<td>{}</td>", esc(l)));
        }
        let seeds: Vec<String> = row.seeds.iter().map(|s| s.to_string()).collect();
        let tip = format!("cells {}; seeds {}; profile {}", row.keys.join(", "), seeds.join(", "), profile);
        for j in 0..t.metrics.len() {
            out.push_str(&format!("<td class=\"num\" title=\"{}\">{}</td>", esc(&tip), esc(&cell_text(t, row, j))));
        }
        if has_ref_column(t) {
            out.push_str(&format!("<td class=\"ref\">{}</td>", esc(&row.reference.clone().unwrap_or_else(|| "–".into()))));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    for extra in [&t.caption, &t.reference_note].into_iter().flatten() {
        out.push_str(&format!("<p class=\"caption\">{}</p>", esc(extra)));
    }
    out.push_str("</figure>");
    out
}

/// CSV: labels, then mean, std and n per metric, the reference, and the cell keys.
pub fn csv(t: &Table) -> String {
    let q = |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let mut h: Vec<String> = t.row_params.clone();
    let with_ci: Vec<bool> = (0..t.metrics.len()).map(|j| t.rows.iter().any(|r| r.intervals.get(j).is_some_and(Option::is_some))).collect();
    for (m, ci) in t.metrics.iter().zip(&with_ci) {
        h.extend([format!("{m}_mean"), format!("{m}_std"), format!("{m}_n")]);
        if *ci {
            h.push(format!("{m}_interval"));
        }
        h.push(format!("{m}_document"));
    }
    h.extend(["reference".to_string(), "cells".to_string()]);
    let mut out = h.iter().map(|s| q(s)).collect::<Vec<_>>().join(",") + "\n";
    for row in &t.rows {
        let mut cells: Vec<String> = row.labels.clone();
        for (j, (s, m)) in row.stats.iter().zip(&t.metrics).enumerate() {
            match s {
                Some(s) => cells.extend([format!("{}", s.mean), format!("{}", s.std), s.n.to_string()]),
                None => cells.extend([String::new(), String::new(), "0".into()]),
            }
            if with_ci[j] {
                cells.push(row.intervals.get(j).copied().flatten().map(|ci| format!("{}", ci.mean)).unwrap_or_default());
            }
            cells.push(row.metric_refs.get(m).cloned().unwrap_or_default());
        }
        cells.push(row.reference.clone().unwrap_or_default());
        cells.push(row.keys.join(" "));
        out.push_str(&(cells.iter().map(|s| q(s)).collect::<Vec<_>>().join(",") + "\n"));
    }
    out
}
