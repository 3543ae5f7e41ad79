//! Verification: prove that committed reports still follow from their artifacts.
//!
//! What `verify` expects is worked out from the spec and from rendering, never taken from the
//! lock file under test; the lock must then agree with it entry for entry. For each report:
//! - the lock names this report, the profile verified and the same overrides (otherwise one
//!   line says which `--profile`/`--set` the lock was made with, and nothing else is compared);
//! - the lock holds exactly the planned cells (no missing, extra or repeated name), each with
//!   the spec's key and key material, status `ok` (or `failed` for a training run whose failure
//!   is a recorded result, such as a diverged run); a training cell's status, reason and
//!   analysis objects agree with the committed frames; and where the store holds a record of a
//!   locked key, its status, reason and outputs agree with the lock;
//! - the frames hold exactly the planned runs, and every CSV frame is what its parquet twin
//!   writes;
//! - the lock lists exactly the files the report produces (six frames, `report.md`,
//!   `report.html`, one SVG per declared figure, one CSV per declared table), each committed
//!   file has the listed sha256, and no other file sits in `frames/`, `figures/` or `tables/`;
//! - the report re-renders byte-identically from the committed frames (no training), and every
//!   claim marked `gate = true` holds;
//! - with `--recompute N`, N sampled training cells are recomputed from scratch in a temporary
//!   store and must give bit-identical outputs.
//!
//! Exit 1 naming each failing file, cell or claim. This is an integrity and reproducibility
//! check, not a signature: someone who edits the spec, frames, report and lock consistently is
//! caught only by `--recompute` (or a cold `reprise run` compared with the committed files).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::artifacts::{Lock, LockedCell};
use crate::cache::{sha256_file, CellStatus, LocalStore, RecordCheck};
use crate::driver::{out_dir, DriverError, Options, Project};
use crate::exec::{self, ExecOptions};
use crate::frames::Frames;
use crate::plan::{self, CellKind, Plan};
use crate::render;
use crate::spec::Spec;

pub use scratch::remove_stale as remove_stale_scratch;

/// The frame files a report with these frames writes, relative to its folder.
fn frame_files(frames: &Frames) -> Vec<String> {
    frames.names().iter().flat_map(|n| [format!("frames/{n}.parquet"), format!("frames/{n}.csv")]).collect()
}

/// What [`verify`] found for one report.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Each failing file, cell or claim, one line each; empty when the report verifies.
    pub problems: Vec<String>,
    /// Files and cells the lock lists (for the summary line).
    pub files: usize,
    pub cells: usize,
    /// No lock file was found.
    pub no_lock: bool,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && !self.no_lock
    }
}

/// Verify the committed report of a loaded `spec` (see the module doc); `recompute` sampled
/// training cells are re-trained from scratch when every other check passed.
pub fn verify(spec: &Spec, opts: &Options, recompute: usize) -> Result<Verdict, DriverError> {
    let out = out_dir(spec);
    let lock = match Lock::read(&out) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Ok(Verdict { no_lock: true, ..Default::default() }),
        Err(e) => return Ok(Verdict { problems: vec![e.to_string()], ..Default::default() }),
    };
    let plan = plan::plan(spec).map_err(|source| DriverError::Plan { spec: spec.path.clone(), source: Box::new(source) })?;
    let mut problems = Vec::new();
    if let Err(e) = crate::driver::check_real_dirs(&Project::at(&spec.root).artifacts_dir(), &out) {
        problems.push(e.to_string());
        return Ok(Verdict { problems, files: lock.files.len(), cells: lock.cells.len(), no_lock: false });
    }
    if check_header(spec, &lock, &mut problems) {
        check_cells(&plan, &lock, &mut problems);
        check_against_store(spec, opts, &lock, &mut problems);
        if let Some(frames) = check_frames(spec, &plan, &lock, &out, &mut problems)? {
            check_rendering(spec, &frames, &lock, &out, &mut problems)?;
        }
        if recompute > 0 && problems.is_empty() {
            recompute_cells(spec, &plan, &lock, recompute, &mut problems)?;
        }
    }
    Ok(Verdict { problems, files: lock.files.len(), cells: lock.cells.len(), no_lock: false })
}

/// `--profile X --set a --set b` as a user would type them.
fn flags(profile: &str, overrides: &[String]) -> String {
    let f = Options { profile: profile.to_string(), sets: overrides.to_vec(), cache: None }.as_flags();
    if f.is_empty() {
        "no --profile or --set".to_string()
    } else {
        f.trim_start().to_string()
    }
}

/// The lock's report, profile and overrides against the spec as loaded. A lock made with other
/// overrides differs in every key below them: one line says so and nothing more is compared
/// (returns false).
fn check_header(spec: &Spec, lock: &Lock, problems: &mut Vec<String>) -> bool {
    if lock.report != spec.report.id {
        problems.push(format!("the lock file is for report `{}`, not `{}`", lock.report, spec.report.id));
        return false;
    }
    // The profile's own entries come first in `overrides`; compare the command-line part too.
    if lock.profile != spec.profile || lock.overrides != spec.overrides {
        problems.push(format!(
            "the lock file was made with {} (overrides: {}), this verify uses {} (overrides: {}): verify with the same options, or re-run the report",
            flags(&lock.profile, &lock.overrides),
            list_or_none(&lock.overrides),
            flags(&spec.profile, &spec.overrides),
            list_or_none(&spec.overrides)
        ));
        return false;
    }
    true
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
    }
}

/// The lock holds exactly the planned cells, with the spec's keys and material. A name may serve
/// several cells (long-tailed subsets drawn with different seeds share theirs), so cells are
/// matched by name and key together.
fn check_cells(plan: &Plan, lock: &Lock, problems: &mut Vec<String>) {
    let mut locked: BTreeMap<(&str, &str), &LockedCell> = BTreeMap::new();
    for l in &lock.cells {
        if locked.insert((l.name.as_str(), l.key.as_str()), l).is_some() {
            problems.push(format!("cell {}: listed more than once in the lock file", l.name));
        }
    }
    let planned: BTreeSet<(&str, &str)> = plan.cells.iter().map(|c| (c.name.as_str(), c.key.as_str())).collect();
    let planned_names: BTreeSet<&str> = planned.iter().map(|(n, _)| *n).collect();
    let mut stale_names = BTreeSet::new();
    for (name, key) in locked.keys() {
        if planned.contains(&(*name, *key)) {
            continue;
        }
        if planned_names.contains(name) {
            stale_names.insert(*name);
            problems.push(format!("cell {name}: the spec now gives a different key than the committed lock (re-run the report)"));
        } else {
            problems.push(format!("cell {name}: in the lock file but not planned by the spec"));
        }
    }
    for c in &plan.cells {
        let Some(l) = locked.get(&(c.name.as_str(), c.key.as_str())) else {
            if !stale_names.contains(c.name.as_str()) {
                problems.push(format!("cell {}: planned by the spec but not in the lock file (re-run the report)", c.name));
            }
            continue;
        };
        if l.material != c.material {
            problems.push(format!("cell {}: the lock's key material is not the spec's (its key is; the lock file was edited)", c.name));
        }
        let train = matches!(c.kind, CellKind::Train { .. });
        match (l.status.as_str(), &l.reason) {
            ("ok", None) => {}
            ("ok", Some(r)) => problems.push(format!("cell {}: status ok with a failure reason `{r}`", c.name)),
            ("failed", _) if train => {}
            ("error", r) => problems.push(format!("cell {}: could not be computed when the report was made ({}); re-run the report", c.name, r.as_deref().unwrap_or("no reason"))),
            (s, _) => problems.push(format!("cell {}: status `{s}` is not possible for a {} cell", c.name, c.kind.name())),
        }
    }
}

/// Where the store (as `run` would resolve it) already holds a record of a locked key, the
/// record must agree with the lock. A store that does not exist is not created.
fn check_against_store(spec: &Spec, opts: &Options, lock: &Lock, problems: &mut Vec<String>) {
    let Ok(Some(store)) = Project::at(&spec.root).open_existing_store(opts.cache.as_deref()) else { return };
    for l in &lock.cells {
        // Read-only: a damaged record is named, not removed (`run` removes and recomputes it).
        let r = match store.check_record(&l.key) {
            Ok(RecordCheck::Intact(r)) | Ok(RecordCheck::Incomplete(r)) => r,
            Ok(RecordCheck::Corrupt(bad)) => {
                let what: Vec<String> = bad.iter().map(|c| c.to_string()).collect();
                problems.push(format!("cell {}: its store record cannot be compared with the lock: {} (`reprise run` recomputes it)", l.name, what.join("; ")));
                continue;
            }
            Ok(RecordCheck::Absent) | Err(_) => continue,
        };
        let status = match r.status {
            CellStatus::Ok => "ok",
            CellStatus::Failed => "failed",
        };
        let reason = if r.status == CellStatus::Failed { r.reason.clone().or_else(|| Some("failed".into())) } else { None };
        if status != l.status || reason != l.reason {
            problems.push(format!("cell {}: the lock says {} but the store {} records {status}", l.name, l.status, store.location()));
        }
        if r.outputs != l.outputs {
            let names: BTreeSet<&String> = r.outputs.keys().chain(l.outputs.keys()).filter(|k| r.outputs.get(*k) != l.outputs.get(*k)).collect();
            problems.push(format!("cell {}: the lock's outputs differ from the store's record: {}", l.name, names.into_iter().cloned().collect::<Vec<_>>().join(", ")));
        }
    }
}

/// Read the committed frames and check them against the plan and the lock; `None` when they
/// cannot be read (a problem says why).
fn check_frames(spec: &Spec, plan: &Plan, lock: &Lock, out: &Path, problems: &mut Vec<String>) -> Result<Option<Frames>, DriverError> {
    let frames = match Frames::read(&out.join("frames"), plan.method.metrics()) {
        Ok(f) => f,
        Err(e) => {
            problems.push(format!("cannot read the committed frames: {e}"));
            return Ok(None);
        }
    };
    // Every CSV frame is what its parquet twin writes.
    let scratch = scratch::dir().map_err(scratch_error)?;
    match frames.write(scratch.path()) {
        Ok(_) => {
            for n in frames.names() {
                let rel = format!("{n}.csv");
                let committed = std::fs::read(out.join("frames").join(&rel));
                let fresh = std::fs::read(scratch.path().join(&rel));
                match (committed, fresh) {
                    (Ok(a), Ok(b)) if a == b => {}
                    (Ok(_), Ok(_)) => problems.push(format!("{}: does not agree with frames/{n}.parquet", crate::driver::shown(&out.join("frames").join(&rel)))),
                    (Err(e), _) | (_, Err(e)) => problems.push(format!("{}: {e}", crate::driver::shown(&out.join("frames").join(&rel)))),
                }
            }
        }
        Err(e) => problems.push(format!("cannot write the committed frames back: {e}")),
    }
    // The frames hold exactly the planned runs.
    let planned: BTreeSet<(String, String, String, u64)> = plan.runs.iter().map(|r| (r.experiment.clone(), r.label.clone(), plan.cells[r.cell].key.clone(), r.seed)).collect();
    let framed: BTreeSet<(String, String, String, u64)> = frames.results.iter().map(|r| (r.experiment.clone(), r.run.clone(), r.key.clone(), r.seed)).collect();
    for (e, run, _, seed) in planned.difference(&framed) {
        problems.push(format!("frames/results: run `{e}` {run} seed {seed} is planned by {} but not in the frames", spec.rel_path()));
    }
    for (e, run, key, seed) in framed.difference(&planned) {
        problems.push(format!("frames/results: run `{e}` {run} seed {seed} (cell {}) is not planned by the spec", &key[..12.min(key.len())]));
    }
    // Each training cell's status, reason and analysis objects agree with the lock.
    let locked: BTreeMap<&str, &LockedCell> = lock.cells.iter().map(|l| (l.key.as_str(), l)).collect();
    let mut compared = BTreeSet::new();
    for r in &frames.results {
        let Some(l) = locked.get(r.key.as_str()) else { continue };
        if !compared.insert(r.key.as_str()) {
            continue; // one line per cell, not per epoch row
        }
        let (status, reason) = match r.status.as_str() {
            "failed" => ("failed", r.reason.clone().or_else(|| Some("failed".into()))),
            s => (s, r.reason.clone()),
        };
        if status != l.status || reason != l.reason {
            problems.push(format!("cell {}: the lock says {} but frames/results says {status}", l.name, l.status));
        }
    }
    for o in &frames.objects {
        let Some(l) = locked.get(o.key.as_str()) else {
            problems.push(format!("frames/objects: object `{}` of cell {} is not from a locked cell", o.name, &o.key[..12.min(o.key.len())]));
            continue;
        };
        if l.outputs.get(&o.name) != Some(&o.sha256) {
            problems.push(format!("cell {}: output `{}` is {} in frames/objects but {} in the lock", l.name, o.name, o.sha256, l.outputs.get(&o.name).map_or("missing", String::as_str)));
        }
    }
    // The other way: a training cell's analysis objects in the lock are those the frames name,
    // and a recorded run has its metrics.
    for c in plan.cells.iter().filter(|c| matches!(c.kind, CellKind::Train { .. })) {
        let Some(l) = locked.get(c.key.as_str()) else { continue };
        let framed: BTreeSet<&str> = frames.objects.iter().filter(|o| o.key == c.key).map(|o| o.name.as_str()).collect();
        for name in l.outputs.keys().filter(|n| n.starts_with("analysis/") && !framed.contains(n.as_str())) {
            problems.push(format!("cell {}: output `{name}` is in the lock but not in frames/objects", l.name));
        }
        if l.status != "error" && !l.outputs.contains_key("metrics.json") {
            problems.push(format!("cell {}: the lock lists no metrics.json", l.name));
        }
    }
    Ok(Some(frames))
}

/// Re-render into a scratch folder; the lock lists exactly what that produces, and every
/// committed file has its listed hash and the re-rendered bytes.
fn check_rendering(spec: &Spec, frames: &Frames, lock: &Lock, out: &Path, problems: &mut Vec<String>) -> Result<(), DriverError> {
    let scratch = scratch::dir().map_err(scratch_error)?;
    let rendered = match render::render(spec, frames, scratch.path()) {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!("re-rendering failed: {e}"));
            return Ok(());
        }
    };
    let rel = |p: &Path| p.strip_prefix(scratch.path()).unwrap_or(p).to_string_lossy().replace('\\', "/");
    let mut produced: BTreeSet<String> = [&rendered.markdown, &rendered.html].into_iter().map(|p| rel(p)).collect();
    produced.extend(rendered.figures.iter().chain(&rendered.tables).map(|p| rel(p)));
    let mut expected = produced.clone();
    expected.extend(frame_files(frames));
    for f in &expected {
        let committed = out.join(f);
        match (lock.files.get(f), sha256_file(&committed)) {
            (None, _) => problems.push(format!("{}: produced by the report but not listed in the lock file", crate::driver::shown(&committed))),
            (Some(want), Ok(h)) if &h != want => problems.push(format!("{}: sha256 {h}, lock file says {want}", crate::driver::shown(&committed))),
            (Some(_), Ok(_)) => {}
            (Some(_), Err(e)) => problems.push(e.to_string()),
        }
        if produced.contains(f) {
            match (std::fs::read(&committed), std::fs::read(scratch.path().join(f))) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(_), Ok(_)) => problems.push(format!("{}: re-rendering from the committed frames gives different bytes", crate::driver::shown(&committed))),
                (Err(_), _) => {} // already reported above
                (_, Err(e)) => problems.push(format!("{f}: not produced by re-rendering: {e}")),
            }
        }
    }
    for f in lock.files.keys().filter(|f| !expected.contains(*f)) {
        problems.push(format!("{f}: listed in the lock file, but the report does not produce it"));
    }
    // The report's folder holds its outputs, the lock file and notebooks, nothing else.
    if let Ok(rd) = std::fs::read_dir(out) {
        let mut extra: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !["frames", "figures", "tables", "report.md", "report.html", crate::artifacts::LOCK_FILE].contains(&n.as_str()) && !n.ends_with(".ipynb"))
            .collect();
        extra.sort();
        for f in extra {
            problems.push(format!("{}: not produced by the report (a stale or foreign file; remove it)", crate::driver::shown(&out.join(f))));
        }
    }
    for f in &expected {
        if std::fs::symlink_metadata(out.join(f)).is_ok_and(|m| m.file_type().is_symlink()) {
            problems.push(format!("{}: is a symbolic link, not a committed file", crate::driver::shown(&out.join(f))));
        }
    }
    for sub in ["frames", "figures", "tables"] {
        let Ok(rd) = std::fs::read_dir(out.join(sub)) else { continue };
        let mut extra: Vec<String> = rd.flatten().map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())).filter(|f| !expected.contains(f)).collect();
        extra.sort();
        for f in extra {
            problems.push(format!("{}: not produced by the report (a stale or foreign file; remove it)", crate::driver::shown(&out.join(f))));
        }
    }
    for c in render::claim_results(spec, frames) {
        if c.gate && !c.holds() {
            problems.push(format!("claim {} ({}): {} — {}", c.id, c.text, c.verdict(), c.measured));
        }
    }
    Ok(())
}

/// Recompute `n` sampled training cells (and what they need) from scratch.
fn recompute_cells(spec: &Spec, plan: &Plan, lock: &Lock, n: usize, problems: &mut Vec<String>) -> Result<(), DriverError> {
    let trains: Vec<usize> = plan.cells.iter().enumerate().filter(|(_, c)| matches!(c.kind, CellKind::Train { .. })).map(|(i, _)| i).collect();
    let n = n.min(trains.len());
    // A sample drawn with a fixed seed: the same cells on every run of `verify`, spread over
    // the experiments and backbones rather than the first few in plan order.
    let mut shuffled = trains.clone();
    crate::rng::Rng::derive(0, &spec.report.id).shuffle(&mut shuffled);
    let mut picked: Vec<usize> = shuffled.into_iter().take(n).collect();
    picked.sort();
    let sub = plan.closure(&picked);
    let scratch = scratch::dir().map_err(scratch_error)?;
    let store = LocalStore::open(scratch.path()).map_err(|e| DriverError::StoreOpen(Box::new(e)))?;
    eprintln!("{}: recomputing {n} training cell(s) from scratch…", spec.report.id);
    let exec = exec::execute(&sub, &store, &ExecOptions { progress: true, ..ExecOptions::with_jobs(None) })?;
    // Every cell of the closure: the sampled training cells and the data cells they read.
    for (c, o) in sub.cells.iter().zip(&exec.outcomes) {
        let locked = lock.cells.iter().find(|l| l.key == c.key);
        match (o.record(), locked) {
            (Some(r), Some(l)) if r.outputs == l.outputs => eprintln!("  reproduced {} bit-identically", c.name),
            (Some(r), Some(l)) => {
                let differing: Vec<&String> = l.outputs.keys().filter(|k| r.outputs.get(*k) != l.outputs.get(*k)).collect();
                problems.push(format!("cell {}: recomputed outputs differ from the lock: {}", c.name, differing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")));
            }
            (None, _) => problems.push(format!("cell {}: recomputation failed: {}", c.name, o.failure().unwrap_or_default())),
            (_, None) => problems.push(format!("cell {}: not in the lock file", c.name)),
        }
    }
    Ok(())
}

fn scratch_error(source: std::io::Error) -> DriverError {
    DriverError::Store(Box::new(crate::cache::StoreError::Io { path: std::env::temp_dir(), source }))
}

/// Scratch folders under the system's temporary folder (`reprise-verify-<pid>-<n>`), removed on
/// drop; those of a `verify` that was killed are removed by the next one.
mod scratch {
    use crate::fs::OwnedDir;

    const PREFIX: &str = "reprise-verify-";

    /// A new scratch folder.
    pub fn dir() -> std::io::Result<OwnedDir> {
        OwnedDir::new(&std::env::temp_dir(), PREFIX)
    }

    /// Remove the scratch folders of `verify` processes that no longer run (a killed
    /// `--recompute` leaves its scratch store behind).
    pub fn remove_stale() {
        OwnedDir::remove_stale(&std::env::temp_dir(), PREFIX);
    }
}
