//! `reprise gc`: remove store objects and records that no lock file of the project and no
//! recent run refers to.
//!
//! gc takes the store alone (its lock exclusive, see `cache`): while a run, `render` or
//! `status` has the store open it refuses at once rather than wait for a run that may take
//! hours, and removes nothing. `--dry-run` only reads, so it neither waits nor refuses. Every
//! source of references must be readable: a damaged run note or lock file stops gc before it
//! removes anything, and gc runs only from a project root (a folder with `reports/`), whose
//! `artifacts/*/lock.json` it reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{shown, UsageError, EXIT_OK};
use crate::artifacts::Lock;
use crate::cache::StoreError;
use crate::driver::Project;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Cache directory or `s3://bucket/prefix` (default: `artifacts/store`, or $REPRISE_CACHE).
    #[arg(long, value_name = "DIR|URL")]
    pub cache: Option<PathBuf>,
    /// List what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
}

/// The project root gc works for: the current folder, which must hold `reports/`. Anywhere
/// else gc would find no lock files and take every report's objects for garbage.
fn project_root() -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current folder")?;
    if !cwd.join("reports").is_dir() {
        return Err(UsageError(format!(
            "{} is not a project root (it has no reports/ folder); gc keeps what the lock files under the project's artifacts/ name, so run it from the project root",
            cwd.display()
        ))
        .into());
    }
    Ok(cwd)
}

/// Keys and objects named by every `artifacts/*/lock.json` under `root`; an unreadable lock
/// file is an error, since what it would keep is unknown.
fn locked_references(root: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut keys, mut objects) = (Vec::new(), Vec::new());
    let dir = root.join("artifacts");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((keys, objects)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd {
        let p = e.with_context(|| format!("reading {}", dir.display()))?.path();
        if !p.is_dir() {
            continue;
        }
        let lock = Lock::read(&p).context("gc removes nothing while a lock file cannot be read (it names objects a report needs); fix or delete it")?;
        if let Some(lock) = lock {
            for c in lock.cells {
                objects.extend(c.outputs.into_values());
                keys.push(c.key);
            }
        }
    }
    Ok((keys, objects))
}

/// A store in use is a matter of waiting (exit 1); any other refusal is the user's to fix.
fn gc_open_error(e: StoreError) -> anyhow::Error {
    match e {
        e @ StoreError::InUse { .. } => e.into(),
        e => UsageError(e.to_string()).into(),
    }
}

pub fn gc(args: &GcArgs) -> anyhow::Result<i32> {
    let root = project_root()?;
    let project = Project::at(&root);
    let opened =
        if args.dry_run { project.open_store(args.cache.as_deref()).map_err(|e| UsageError(e.to_string()).into()) } else { project.open_store_exclusive(args.cache.as_deref()).map_err(gc_open_error) };
    let store = opened?;
    let dir = store.location();
    let (mut keys, mut objects): (BTreeSet<String>, BTreeSet<String>) = Default::default();
    let (k, o) = store.recent_references()?;
    keys.extend(k);
    objects.extend(o);
    let (k, o) = locked_references(&root)?;
    keys.extend(k);
    objects.extend(o);
    let mut bytes = 0u64;
    let (mut n_obj, mut n_rec) = (0, 0);
    for h in store.list_objects()? {
        if !objects.contains(&h) {
            n_obj += 1;
            bytes += if args.dry_run { store.object_size(&h) } else { store.remove_object(&h)? };
        }
    }
    for k in store.list_records()? {
        if !keys.contains(&k) {
            n_rec += 1;
            if !args.dry_run {
                store.remove_record(&k)?;
            }
        }
    }
    if !args.dry_run {
        // Holding the store alone, no write is in progress: every temporary file is a leftover.
        store.clean_tmp_older_than(Duration::ZERO);
    }
    let verb = if args.dry_run { "would remove" } else { "removed" };
    eprintln!("{verb} {n_obj} objects ({:.1} MB) and {n_rec} cell records from {}", bytes as f64 / 1e6, shown(Path::new(&dir)));
    Ok(EXIT_OK)
}
