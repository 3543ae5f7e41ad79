//! `reprise gc`: remove store objects and records that no lock file of the project and no
//! recent run refers to.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;

use super::{shown, EXIT_OK};
use crate::artifacts::Lock;
use crate::cache::{LocalStore, CACHE_ENV};

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Cache directory (default: `artifacts/store`, or $REPRISE_CACHE).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// List what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn gc(args: &GcArgs) -> anyhow::Result<i32> {
    let dir = match (&args.cache, std::env::var_os(CACHE_ENV)) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("artifacts").join("store"),
    };
    let store = LocalStore::open(&dir)?;
    let (mut keys, mut objects): (BTreeSet<String>, BTreeSet<String>) = Default::default();
    let (k, o) = store.recent_references()?;
    keys.extend(k);
    objects.extend(o);
    // Every lock file under artifacts/ keeps its cells.
    if let Ok(rd) = std::fs::read_dir("artifacts") {
        for e in rd.flatten() {
            if let Ok(Some(lock)) = Lock::read(&e.path()) {
                for c in lock.cells {
                    objects.extend(c.outputs.into_values());
                    keys.insert(c.key);
                }
            }
        }
    }
    let mut freed = 0u64;
    let (mut n_obj, mut n_rec) = (0, 0);
    for h in store.list_objects()? {
        if !objects.contains(&h) {
            n_obj += 1;
            if !args.dry_run {
                freed += store.remove_object(&h)?;
            }
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
    let verb = if args.dry_run { "would remove" } else { "removed" };
    eprintln!("{verb} {n_obj} objects ({:.1} MB) and {n_rec} cell records from {}", freed as f64 / 1e6, shown(&dir));
    Ok(EXIT_OK)
}
