//! `reprise verify`: prove that committed reports still follow from their artifacts.
//!
//! For each report: every committed file matches the hash in its lock file; the spec still
//! plans exactly the locked cells; the report re-renders byte-identically from the committed
//! frames (no training); every claim marked `gate = true` holds; and with `--recompute N`,
//! N sampled training cells are recomputed from scratch in a temporary store and must give
//! bit-identical outputs. Exit 1 naming each failing file, cell or claim.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{find_specs, load_spec, out_dir, shown, SpecOpts, UsageError, EXIT_FAILED, EXIT_OK};
use crate::artifacts::Lock;
use crate::cache::{sha256_file, LocalStore};
use crate::exec::{self, ExecOptions};
use crate::frames::Frames;
use crate::methods;
use crate::plan::{self, CellKind};
use crate::render;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Spec files (default: every reports/*.toml).
    pub specs: Vec<PathBuf>,
    #[command(flatten)]
    pub opts: SpecOpts,
    /// Recompute this many sampled training cells from scratch and compare their outputs.
    #[arg(long, default_value_t = 0)]
    pub recompute: usize,
}

fn compare_dir(committed: &Path, fresh: &Path, rel: &str, problems: &mut Vec<String>) {
    match (std::fs::read(committed.join(rel)), std::fs::read(fresh.join(rel))) {
        (Ok(a), Ok(b)) if a == b => {}
        (Ok(_), Ok(_)) => problems.push(format!("{}: re-rendering from the committed frames gives different bytes", shown(&committed.join(rel)))),
        (Err(e), _) => problems.push(format!("{}: {e}", shown(&committed.join(rel)))),
        (_, Err(e)) => problems.push(format!("{rel}: not produced by re-rendering: {e}")),
    }
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<i32> {
    let specs = find_specs(&args.specs)?;
    let mut failed = false;
    for path in specs {
        let spec = load_spec(&path, &args.opts)?;
        let out = out_dir(&spec);
        let mut problems = Vec::new();
        let Some(lock) = Lock::read(&out)? else {
            eprintln!("FAIL {}: no lock file in {} — run `reprise run {}` and commit {}", spec.report.id, shown(&out), path.display(), shown(&out));
            failed = true;
            continue;
        };
        // 1. Committed files match their hashes.
        for (rel, want) in &lock.files {
            let p = out.join(rel);
            match sha256_file(&p) {
                Ok(h) if &h == want => {}
                Ok(h) => problems.push(format!("{}: sha256 {h}, lock file says {want}", shown(&p))),
                Err(e) => problems.push(format!("{}: {e}", shown(&p))),
            }
        }
        // 2. The spec still plans the locked cells.
        let plan = plan::plan(&spec).map_err(|e| UsageError(e.to_string()))?;
        for c in &plan.cells {
            match lock.cells.iter().find(|l| l.name == c.name) {
                Some(l) if l.key == c.key => {}
                Some(_) => problems.push(format!("cell {}: the spec now gives a different key than the committed lock (re-run the report)", c.name)),
                None => problems.push(format!("cell {}: planned by the spec but not in the lock file (re-run the report)", c.name)),
            }
        }
        // 3. Byte-identical re-render from the committed frames, into a scratch folder.
        let metric_names = methods::metrics(plan.method);
        match Frames::read(&out.join("frames"), metric_names) {
            Ok(frames) => {
                let scratch = tempdir()?;
                match render::render(&spec, &frames, scratch.path()) {
                    Ok(_) => {
                        for rel in lock.files.keys().filter(|r| !r.starts_with("frames/")) {
                            compare_dir(&out, scratch.path(), rel, &mut problems);
                        }
                    }
                    Err(e) => problems.push(format!("re-rendering failed: {e}")),
                }
                // 4. Gated claims hold.
                for c in render::claim_results(&spec, &frames) {
                    if c.gate && c.holds != Some(true) {
                        problems.push(format!("claim {} ({}): {} — {}", c.id, c.text, c.verdict(), c.measured));
                    }
                }
            }
            Err(e) => problems.push(format!("cannot read the committed frames: {e}")),
        }
        // 5. Recompute a sample of training cells from scratch.
        if args.recompute > 0 && problems.is_empty() {
            let trains: Vec<usize> = plan.cells.iter().enumerate().filter(|(_, c)| matches!(c.kind, CellKind::Train { .. })).map(|(i, _)| i).collect();
            let n = args.recompute.min(trains.len());
            // A sample drawn with a fixed seed: the same cells on every run of `verify`, spread
            // over the experiments and backbones rather than the first few in plan order.
            let mut shuffled = trains.clone();
            crate::rng::Rng::derive(0, &spec.report.id).shuffle(&mut shuffled);
            let mut picked: Vec<usize> = shuffled.into_iter().take(n).collect();
            picked.sort();
            let sub = plan.closure(&picked);
            let scratch = tempdir()?;
            let store = LocalStore::open(scratch.path())?;
            eprintln!("{}: recomputing {n} training cell(s) from scratch…", spec.report.id);
            let exec = exec::execute(&sub, &store, &ExecOptions { progress: true, ..ExecOptions::with_jobs(None) })?;
            for (c, o) in sub.cells.iter().zip(&exec.outcomes) {
                if !matches!(c.kind, CellKind::Train { .. }) {
                    continue;
                }
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
        }
        if problems.is_empty() {
            eprintln!("ok   {}: {} files match, re-render identical, {} cells locked", spec.report.id, lock.files.len(), lock.cells.len());
        } else {
            failed = true;
            eprintln!("FAIL {}:", spec.report.id);
            for p in problems {
                eprintln!("  - {p}");
            }
        }
    }
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}

fn tempdir() -> anyhow::Result<tempfile_lite::TempDir> {
    Ok(tempfile_lite::TempDir::new()?)
}

/// A scratch directory removed on drop (std only, so the binary needs no extra crate).
mod tempfile_lite {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let base = std::env::temp_dir();
            for n in 0..1000u32 {
                let p = base.join(format!("reprise-{}-{n}", std::process::id()));
                if std::fs::create_dir(&p).is_ok() {
                    return Ok(TempDir(p));
                }
            }
            Err(std::io::Error::other("cannot create a scratch directory"))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
