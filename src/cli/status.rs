//! `reprise status`: what is cached, stale or missing, and why; `--explain CELL` prints the
//! struct a cell's key is the hash of.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{load_spec, open_store, out_dir, SpecOpts, UsageError, EXIT_OK};
use crate::artifacts::Lock;
use crate::cache::{CellStatus, RecordCheck};
use crate::driver::Project;
use crate::plan;

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub spec: PathBuf,
    #[command(flatten)]
    pub opts: SpecOpts,
    /// A cell name (as `status` lists it), or a key prefix of at least 8 characters.
    #[arg(long, value_name = "CELL")]
    pub explain: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Which parameters differ between two key materials, as readable text.
fn diff(old: &plan::KeyMaterial, new: &plan::KeyMaterial) -> String {
    let mut parts = Vec::new();
    for (k, v) in &new.params {
        match old.params.get(k) {
            Some(o) if o != v => parts.push(format!("{k}: {o} → {v}")),
            None => parts.push(format!("{k}: (none) → {v}")),
            _ => {}
        }
    }
    for k in old.params.keys().filter(|k| !new.params.contains_key(*k)) {
        parts.push(format!("{k} removed"));
    }
    if old.version != new.version {
        parts.push(format!("code version {} → {}", old.version, new.version));
    }
    if old.seed != new.seed {
        parts.push(format!("seed {:?} → {:?}", old.seed, new.seed));
    }
    if old.upstream != new.upstream && parts.is_empty() {
        parts.push("an upstream cell changed".into());
    }
    if parts.is_empty() {
        "key inputs changed".into()
    } else {
        parts.join(", ")
    }
}

pub fn status(args: &StatusArgs, project: &Project) -> anyhow::Result<i32> {
    let spec = load_spec(&args.spec, &args.opts, project)?;
    let plan = plan::plan(&spec).map_err(|e| UsageError(e.to_string()))?;
    let store = open_store(&spec.root, &args.opts)?;
    let lock = Lock::read(&out_dir(&spec))?;
    if let Some(q) = &args.explain {
        let cell = plan.cell_by_name(q).ok_or_else(|| UsageError(format!("no cell `{q}` in {}; `reprise status {}` lists them", spec.path.display(), spec.path.display())))?;
        let check = store.check_record(&cell.key)?;
        let cached = matches!(check, RecordCheck::Intact(_));
        let corrupt = matches!(check, RecordCheck::Corrupt(_));
        let v = json!({ "name": cell.name, "aliases": cell.aliases, "key": cell.key, "cached": cached, "corrupt": corrupt, "key_material": cell.material });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(EXIT_OK);
    }
    let mut rows = Vec::new();
    for c in &plan.cells {
        // Every output re-hashed, nothing removed: status only looks (`run` replaces what is
        // corrupt and says so).
        let check = store.check_record(&c.key)?;
        let previous = lock.as_ref().and_then(|l| l.cells.iter().find(|x| x.name == c.name));
        let (state, why) = match (&check, previous) {
            (RecordCheck::Corrupt(bad), _) => {
                let files: Vec<String> = bad.iter().map(|b| b.to_string()).collect();
                ("corrupt", format!("{}; `reprise run` recomputes it", files.join("; ")))
            }
            (RecordCheck::Intact(r), _) if r.status == CellStatus::Failed => ("failed", r.reason.clone().unwrap_or_default()),
            (RecordCheck::Intact(_), _) => ("cached", String::new()),
            (_, Some(p)) if p.key != c.key => ("stale", diff(&p.material, &c.material)),
            (_, Some(_)) => ("missing", "in the lock file but not in this cache".to_string()),
            (_, None) => ("missing", "never computed".to_string()),
        };
        rows.push((c, state, why));
    }
    if args.json {
        let v: Vec<_> = rows.iter().map(|(c, s, w)| json!({"cell": c.name, "key": c.key, "state": s, "why": w})).collect();
        println!("{}", serde_json::to_string_pretty(&json!({"report": spec.report.id, "cells": v}))?);
    } else {
        for (c, s, w) in &rows {
            let why = if w.is_empty() { String::new() } else { format!("  ({w})") };
            println!("{s:<8} {}  {}{why}", &c.key[..12], c.name);
        }
        let count = |s: &str| rows.iter().filter(|r| r.1 == s).count();
        let corrupt = match count("corrupt") {
            0 => String::new(),
            n => format!(", {n} corrupt"),
        };
        println!("{} cells: {} cached, {} stale, {} missing, {} failed{corrupt} (cache {})", rows.len(), count("cached"), count("stale"), count("missing"), count("failed"), store.location());
    }
    Ok(EXIT_OK)
}
