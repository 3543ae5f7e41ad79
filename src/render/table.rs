//! Tables: one row per grid point of an experiment, final-epoch metrics as mean ± std over
//! seeds, the document's numbers beside ours, and the cells each row comes from.

use super::summary::{self, fmt_stat, Stat};
use crate::frames::Frames;
use crate::spec::{Experiment, TableDecl};

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
    pub reference: Option<String>,
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
            let reference = decl.reference.as_ref().and_then(|r| r.values.get(&labels.join(" / ")).cloned());
            let mut keys: Vec<String> = group.iter().map(|r| r.key.clone()).collect();
            keys.dedup();
            let failures = group.iter().filter(|r| r.status != "ok").map(|r| format!("{}: {}", r.run, r.reason.clone().unwrap_or_else(|| r.status.clone()))).collect();
            TableRow { labels, stats, reference, keys, seeds: group.iter().map(|r| r.seed).collect(), failures }
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

fn cell_text(t: &Table, row: &TableRow, j: usize) -> String {
    match &row.stats[j] {
        Some(s) => fmt_stat(&t.metrics[j], s),
        None if !row.failures.is_empty() => "failed".to_string(),
        None => "–".to_string(),
    }
}

fn short(key: &str) -> &str {
    key.get(..8).unwrap_or(key)
}

fn headers(t: &Table) -> Vec<String> {
    let mut h = t.row_params.clone();
    h.extend(t.metrics.iter().cloned());
    if let Some(r) = &t.reference_label {
        h.push(r.clone());
    }
    h
}

/// Markdown (GitHub-flavoured table); the last column names the cells.
pub fn markdown(t: &Table) -> String {
    let mut h = headers(t);
    h.push("cells".into());
    let mut out = format!("**Table {}: {}**\n\n| {} |\n|{}|\n", t.id, t.title, h.join(" | "), vec!["---"; h.len()].join("|"));
    for row in &t.rows {
        let mut cells = row.labels.clone();
        cells.extend((0..t.metrics.len()).map(|j| cell_text(t, row, j)));
        if t.reference_label.is_some() {
            cells.push(row.reference.clone().unwrap_or_else(|| "–".into()));
        }
        cells.push(row.keys.iter().map(|k| format!("`{}`", short(k))).collect::<Vec<_>>().join(" "));
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
        if t.reference_label.is_some() {
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
    for m in &t.metrics {
        h.extend([format!("{m}_mean"), format!("{m}_std"), format!("{m}_n")]);
    }
    h.extend(["reference".to_string(), "cells".to_string()]);
    let mut out = h.iter().map(|s| q(s)).collect::<Vec<_>>().join(",") + "\n";
    for row in &t.rows {
        let mut cells: Vec<String> = row.labels.clone();
        for s in &row.stats {
            match s {
                Some(s) => cells.extend([format!("{}", s.mean), format!("{}", s.std), s.n.to_string()]),
                None => cells.extend([String::new(), String::new(), "0".into()]),
            }
        }
        cells.push(row.reference.clone().unwrap_or_default());
        cells.push(row.keys.join(" "));
        out.push_str(&(cells.iter().map(|s| q(s)).collect::<Vec<_>>().join(",") + "\n"));
    }
    out
}
