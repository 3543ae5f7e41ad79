//! The content-addressed store: every cell's outputs, named by the sha256 of their bytes, and
//! one record per cell key listing them.
//!
//! Layout under the store's root (default `artifacts/store`, or `--cache DIR`, or the
//! environment variable `REPRISE_CACHE`):
//! - `REPRISE-STORE` — the marker: a short text saying what the folder is. A folder is used as
//!   a store only if it has the marker, is empty (a new store: the marker is written), or holds
//!   nothing but the store's own subfolders below, with `objects/` and `cells/` among them (a
//!   store made before the marker existed: the marker is written on first use). Any other
//!   folder is refused, so that `--cache ~` cannot make `run` or `gc` delete the user's files;
//! - `gc.lock` — the store-wide lock: every open store holds it shared for as long as it is
//!   open (a whole `run`, `render`, `status`…), `gc` holds it exclusive and refuses to start
//!   while anything else has the store open, so it never removes what a live run just made;
//! - `objects/ab/abcdef…` — output bytes, named by their sha256;
//! - `cells/<key>.json` — the record of a finished cell (its outputs' names and hashes): a first
//!   line with the sha256 of the JSON body that follows it, so a damaged record is detected
//!   byte for byte (no re-serialisation, whose float printing could differ);
//! - `tmp/` — writes in progress, named `<pid>-<thread>-<n>.tmp` (and `probe-<pid>` for the
//!   writability check): every write goes to a temporary file there, is flushed and synced,
//!   then renamed into place, so a crash never leaves a partial object under its name;
//! - `locks/<key>.lock` — advisory locks so that two runs on one store never compute the same
//!   cell at once;
//! - `runs/<report>.json` — the objects each recent run referred to, which `gc` keeps.
//!
//! Every read re-hashes the bytes; a mismatch is reported and treated as a miss (the cell is
//! recomputed), never used. The store deletes only names it makes itself (a 64-hex object
//! under its two-letter folder, a `<64 hex>.json` record, a temporary file of the pattern
//! above) and follows no symbolic link inside the store: a linked subfolder is an error. The
//! root itself may be a link (a cache on another disk).
//!
//! The [`Store`] trait is the seam between the cells and where they are kept: [`LocalStore`]
//! here, and [`S3Store`] (`s3.rs`) in S3-compatible object storage, chosen by [`Location`].

use std::collections::BTreeMap;
use std::fs::{self, File, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod s3;

pub use s3::{S3Options, S3Store, S3Url, S3_SCHEME};

/// The environment variable that points the store elsewhere.
pub const CACHE_ENV: &str = "REPRISE_CACHE";

/// The marker file that makes a folder a store (see the module doc).
pub const MARKER: &str = "REPRISE-STORE";

/// The store-wide lock file: shared while a store is open, exclusive for `gc`.
pub const STORE_LOCK: &str = "gc.lock";

/// The store's own subfolders.
const SUBDIRS: [&str; 5] = ["objects", "cells", "tmp", "locks", "runs"];

const MARKER_TEXT: &str = "This folder is a reprise store: the content-addressed cache of report cells.\n\
reprise writes and deletes files here (`reprise gc`, leftovers in tmp/); keep nothing else in it.\n\
Deleting the whole folder is safe: `reprise run` recomputes what it needs.\n";

/// Errors of the store; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O error at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache directory {path} is not writable: {source} (point --cache or {CACHE_ENV} at a writable directory)")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error("cache directory {path} is not a reprise store: it holds {found} and no {MARKER} file, and a store deletes files in its folders. Point --cache or {CACHE_ENV} at an empty or new folder, or at an existing store")]
    NotAStore { path: PathBuf, found: String },
    #[error("{path} is a symbolic link or not a folder; a store follows no link inside itself, so that nothing outside it is ever deleted. Replace it with a real folder of that name, or point --cache or {CACHE_ENV} at an empty or new folder")]
    Link { path: PathBuf },
    #[error("the store {path} is in use by a run (or another command that reads it) and gc would remove what it is making; run gc again when it has finished (`gc --dry-run` does not wait)")]
    InUse { path: PathBuf },
    #[error("damaged run note {path}: {message}; gc removes nothing while a note cannot be read, since it names objects a report still needs. Run that report again to rewrite the note, or delete the file")]
    DamagedRunNote { path: PathBuf, message: String },
    /// A remote store's request failed (after the client's retries).
    #[error("remote store error at {location}: {message} (check the AWS_* variables and that the server is reachable)")]
    Remote { location: String, message: String },
    /// A store location that cannot be used as written.
    #[error("store location `{location}`: {message}")]
    BadLocation { location: String, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Status of a finished cell.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CellStatus {
    Ok,
    /// A result inherent to the configuration (e.g. a diverged run), recorded like a result.
    Failed,
}

/// What the store knows of a finished cell.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellRecord {
    pub key: String,
    pub kind: String,
    pub status: CellStatus,
    #[serde(default)]
    pub reason: Option<String>,
    /// Output name → sha256 of its bytes.
    pub outputs: BTreeMap<String, String>,
    /// Wall-clock seconds the cell took when it was computed (informational).
    pub seconds: f64,
}

/// A problem found while reading (a corrupt object), reported to the user and then recomputed.
#[derive(Debug, Clone, PartialEq)]
pub struct Corruption {
    pub path: PathBuf,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for Corruption {
    /// `corrupt cache object PATH (expected sha256 …, found …)`; callers add what became of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "corrupt cache object {} (expected sha256 {}, found {})", self.path.display(), self.expected, self.actual)
    }
}

/// What [`LocalStore::check_record`] found for a key, without changing anything.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordCheck {
    /// No record.
    Absent,
    /// The record and every output read back with their hashes.
    Intact(CellRecord),
    /// An intact record with outputs missing (removed by `gc`, say): a miss.
    Incomplete(CellRecord),
    /// The record or outputs do not match their hashes: `run` removes and recomputes them.
    Corrupt(Vec<Corruption>),
}

/// Storage of objects and cell records: a local folder ([`LocalStore`]) or a prefix of an
/// S3-compatible bucket ([`S3Store`]), with the same guarantees (see the module docs).
pub trait Store: Send + Sync {
    /// Store bytes; returns their sha256 (hex).
    fn put(&self, bytes: &[u8]) -> Result<String, StoreError>;
    /// The bytes of `hash`, verified; `None` when missing or corrupt (corruption is logged
    /// through [`Store::take_corruptions`] and the bad file removed).
    fn get(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether `hash` is present (not verified).
    fn contains(&self, hash: &str) -> bool;
    fn put_record(&self, record: &CellRecord) -> Result<(), StoreError>;
    /// The record of `key` if present, intact, and every output it names is present.
    fn get_record(&self, key: &str) -> Result<Option<CellRecord>, StoreError>;
    /// Block until no other process computes `key`; the lock is released on drop.
    fn lock(&self, key: &str) -> Result<CellLock, StoreError>;
    /// Corruptions met since the last call.
    fn take_corruptions(&self) -> Vec<Corruption>;
    /// Where the store lives, for messages.
    fn location(&self) -> String;

    /// What the store holds for `key`, every output re-hashed, without removing anything (what
    /// `status` and `verify` report; [`Store::get_record`] is the lookup that removes what is
    /// corrupt).
    fn check_record(&self, key: &str) -> Result<RecordCheck, StoreError>;
    /// Every object hash present (only names the store makes), sorted.
    fn list_objects(&self) -> Result<Vec<String>, StoreError>;
    /// Every cell key with a record, sorted.
    fn list_records(&self) -> Result<Vec<String>, StoreError>;
    /// Size in bytes of object `hash` (0 when absent).
    fn object_size(&self, hash: &str) -> u64;
    /// Remove object `hash`; returns the bytes freed.
    fn remove_object(&self, hash: &str) -> Result<u64, StoreError>;
    /// Remove the record of `key`.
    fn remove_record(&self, key: &str) -> Result<(), StoreError>;
    /// Remember the keys and objects a run used, so `gc` keeps them (one note per report).
    fn note_run(&self, report: &str, keys: &[String], objects: &[String]) -> Result<(), StoreError>;
    /// Keys and objects named by the run notes; a damaged note is an error.
    fn recent_references(&self) -> Result<(Vec<String>, Vec<String>), StoreError>;
    /// Remove leftovers of interrupted writes older than `age`; returns how many.
    fn clean_tmp_older_than(&self, age: Duration) -> usize;
    /// Remove leftovers of interrupted writes older than a minute (a live writer's temporary
    /// file is younger).
    fn clean_tmp(&self) -> usize {
        self.clean_tmp_older_than(Duration::from_secs(60))
    }
    /// The folder of a local store; `None` for a remote one.
    fn local_root(&self) -> Option<&Path>;
}

/// Where a store lives: a local folder, or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3(S3Url),
}

impl Location {
    /// `s3://…` is a remote store (checked here); anything else a local folder.
    pub fn parse(path: &Path) -> Result<Location, StoreError> {
        match path.to_str() {
            Some(s) if s.starts_with(S3_SCHEME) => Ok(Location::S3(S3Url::parse(s)?)),
            _ => Ok(Location::Local(path.to_path_buf())),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(u) => write!(f, "{u}"),
        }
    }
}

/// An advisory lock on one cell key, released on drop.
pub struct CellLock {
    _file: Option<File>,
    _guard: Option<Box<dyn Send>>,
}

impl CellLock {
    /// A lock held by `guard` until it is dropped (a remote store's lease).
    pub fn guard(guard: Box<dyn Send>) -> CellLock {
        CellLock { _file: None, _guard: Some(guard) }
    }
}

/// How an open store holds the store-wide lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Held for as long as the store is open; waits while `gc` runs (it is short).
    Shared,
    /// `gc`: nothing else may have the store open; refused, not waited for, when it has.
    Exclusive,
}

/// A store in a local directory. While it is open it holds the store-wide lock (`gc.lock`)
/// shared, so `gc` cannot remove what it is making: keep it open for a command's whole run.
pub struct LocalStore {
    root: PathBuf,
    corruptions: Mutex<Vec<Corruption>>,
    /// The store-wide lock, released when the store is dropped.
    _held: File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 of a file, streamed, hex.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Whether `name` is a temporary file the store makes: `<pid>-<thread>-<n>.tmp` or
/// `probe-<pid>`.
fn is_tmp_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(pid) = name.strip_prefix("probe-") {
        return digits(pid);
    }
    match name.strip_suffix(".tmp") {
        Some(stem) => {
            let parts: Vec<&str> = stem.split('-').collect();
            parts.len() == 3 && parts.iter().all(|p| digits(p))
        }
        None => false,
    }
}

/// Whether `path` is a real folder (not a link to one).
fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The names in `dir`, sorted, for messages and the marker check.
fn names_in(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        names.push(e.map_err(io_err(dir))?.file_name().to_string_lossy().to_string());
    }
    names.sort();
    Ok(names)
}

/// Make `root` a store or check that it is one (see the module doc): the marker, then the
/// subfolders, none of them a link.
fn prepare(root: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(root).map_err(|source| StoreError::NotWritable { path: root.to_path_buf(), source })?;
    let marker = root.join(MARKER);
    match fs::symlink_metadata(&marker) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(StoreError::Link { path: marker }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => adopt(root)?,
        Err(source) => return Err(StoreError::Io { path: marker, source }),
    }
    for sub in SUBDIRS {
        let p = root.join(sub);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::Link { path: p }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Another process may create it at the same moment: what counts is that a real
                // folder is there afterwards.
                if let Err(source) = fs::create_dir(&p) {
                    if !is_real_dir(&p) {
                        return Err(StoreError::NotWritable { path: p, source });
                    }
                }
            }
            Err(source) => return Err(StoreError::Io { path: p, source }),
        }
    }
    Ok(())
}

/// Write the marker into an unmarked `root` if it is empty or a store made before markers;
/// refuse any other folder.
fn adopt(root: &Path) -> Result<(), StoreError> {
    let names = names_in(root)?;
    // A marker seen now was written by a process opening the same new store at this moment.
    let raced = names.iter().any(|n| n == MARKER);
    let own = |n: &String| (SUBDIRS.contains(&n.as_str()) && is_real_dir(&root.join(n))) || n == STORE_LOCK;
    let old_store = names.iter().any(|n| n == "objects") && names.iter().any(|n| n == "cells") && names.iter().all(own);
    if !(raced || names.is_empty() || old_store) {
        let mut shown: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
        if names.len() > 5 {
            shown.push(format!("{} more", names.len() - 5));
        }
        return Err(StoreError::NotAStore { path: root.to_path_buf(), found: shown.join(", ") });
    }
    let marker = root.join(MARKER);
    match File::options().write(true).create_new(true).open(&marker) {
        Ok(mut f) => f.write_all(MARKER_TEXT.as_bytes()).map_err(|source| StoreError::NotWritable { path: marker.clone(), source }),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::NotWritable { path: marker, source }),
    }
}

impl LocalStore {
    /// Open (creating if needed) a store at `root` and hold its store-wide lock shared until
    /// the store is dropped (waiting while a `gc` runs). Fails with a clear error if the
    /// directory cannot be created or written, is not a store (see the module doc), or has a
    /// linked subfolder.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_as(root, Access::Shared)
    }

    /// Open a store for `gc`: the store-wide lock exclusive, or [`StoreError::InUse`] at once
    /// while anything else has the store open.
    pub fn open_exclusive(root: &Path) -> Result<Self, StoreError> {
        Self::open_as(root, Access::Exclusive)
    }

    fn open_as(root: &Path, access: Access) -> Result<Self, StoreError> {
        prepare(root)?;
        let lock_path = root.join(STORE_LOCK);
        if fs::symlink_metadata(&lock_path).is_ok_and(|m| !m.is_file()) {
            return Err(StoreError::Link { path: lock_path });
        }
        let held = File::options().create(true).truncate(false).read(true).write(true).open(&lock_path).map_err(|source| StoreError::NotWritable { path: lock_path.clone(), source })?;
        match access {
            Access::Shared => held.lock_shared().map_err(io_err(&lock_path))?,
            Access::Exclusive => match held.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(StoreError::InUse { path: root.to_path_buf() }),
                Err(TryLockError::Error(source)) => return Err(StoreError::Io { path: lock_path, source }),
            },
        }
        // Probe writability now rather than after an hour of training.
        let probe = root.join("tmp").join(format!("probe-{}", std::process::id()));
        File::create(&probe).and_then(|mut f| f.write_all(b"ok")).map_err(|source| StoreError::NotWritable { path: root.to_path_buf(), source })?;
        let _ = fs::remove_file(&probe);
        Ok(LocalStore { root: root.to_path_buf(), corruptions: Mutex::new(Vec::new()), _held: held })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of an object.
    pub fn object_path(&self, hash: &str) -> PathBuf {
        let prefix = hash.get(..2).unwrap_or("xx");
        self.root.join("objects").join(prefix).join(hash)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("cells").join(format!("{key}.json"))
    }

    /// Write `bytes` to `dest` atomically: temporary file in the store, sync, rename.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        // A linked prefix folder would put the object outside the store.
        if let Some(parent) = dest.parent() {
            if fs::symlink_metadata(parent).is_ok_and(|m| !m.is_dir()) {
                return Err(StoreError::Link { path: parent.to_path_buf() });
            }
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}-{}-{n}.tmp", std::process::id(), thread_id()));
        let result = (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, dest)
        })();
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp); // nothing half-written stays behind
            return Err(StoreError::Io { path: dest.to_path_buf(), source });
        }
        Ok(())
    }

    fn note_corruption(&self, c: Corruption) {
        if let Ok(mut v) = self.corruptions.lock() {
            v.push(c);
        }
    }

    /// Every object hash present: files named by a hash in the real folder of their prefix
    /// (anything else under `objects/`, or behind a link, is not the store's).
    pub fn list_objects(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let dir = self.root.join("objects");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let prefix = e.file_name().to_string_lossy().to_string();
            // DirEntry::file_type does not follow links.
            if !e.file_type().is_ok_and(|t| t.is_dir()) || prefix.len() != 2 {
                continue;
            }
            for f in fs::read_dir(e.path()).map_err(io_err(&e.path()))? {
                let f = f.map_err(io_err(&e.path()))?;
                if let Some(name) = f.file_name().to_str() {
                    if valid_hash(name) && name.starts_with(&prefix) && f.file_type().is_ok_and(|t| t.is_file()) {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every cell key with a record: files named `<64 hex>.json`.
    pub fn list_records(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("cells");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if let Some(k) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
                if valid_hash(k) && e.file_type().is_ok_and(|t| t.is_file()) {
                    out.push(k.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Size in bytes of object `hash` (0 when absent).
    pub fn object_size(&self, hash: &str) -> u64 {
        fs::symlink_metadata(self.object_path(hash)).map(|m| m.len()).unwrap_or(0)
    }

    /// Remove object `hash`; returns the bytes freed. Only a file the store names, in a real
    /// prefix folder: anything else is an error and stays.
    pub fn remove_object(&self, hash: &str) -> Result<u64, StoreError> {
        let p = self.object_path(hash);
        let own = valid_hash(hash) && p.parent().is_some_and(is_real_dir) && fs::symlink_metadata(&p).is_ok_and(|m| m.is_file());
        if !own {
            return Err(StoreError::Link { path: p });
        }
        let len = self.object_size(hash);
        fs::remove_file(&p).map_err(io_err(&p))?;
        Ok(len)
    }

    /// Remove the record of `key` (a `<64 hex>.json` file, never a link).
    pub fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        let p = self.record_path(key);
        if !(valid_hash(key) && fs::symlink_metadata(&p).is_ok_and(|m| m.is_file())) {
            return Err(StoreError::Link { path: p });
        }
        fs::remove_file(&p).map_err(io_err(&p))
    }

    /// Remember the keys and objects a run used, so `gc` keeps them. One file per report,
    /// replaced on each run.
    fn note_run_local(&self, report: &str, keys: &[String], objects: &[String]) -> Result<(), StoreError> {
        let body = serde_json::json!({ "report": report, "cells": keys, "objects": objects });
        let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        self.write_atomic(&self.root.join("runs").join(format!("{report}.json")), &bytes)
    }

    /// Keys and objects named by the `runs/` notes. A note that cannot be read or parsed, or
    /// anything in `runs/` that is not a note, is an error: what it would have kept is unknown.
    fn recent_references_local(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let dir = self.root.join("runs");
        let (mut keys, mut objs) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let p = e.path();
            let damaged = |message: String| StoreError::DamagedRunNote { path: p.clone(), message };
            let is_note = e.file_name().to_str().is_some_and(|n| n.ends_with(".json")) && e.file_type().is_ok_and(|t| t.is_file());
            if !is_note {
                return Err(damaged("not a run note (reprise writes only regular `<report>.json` files there)".into()));
            }
            let bytes = fs::read(&p).map_err(|e| damaged(e.to_string()))?;
            let (k, o) = parse_run_note(&p, &bytes)?;
            keys.extend(k);
            objs.extend(o);
        }
        Ok((keys, objs))
    }

    /// Remove the store's own temporary files (by name, never through a link) older than
    /// `age`. `gc`, which holds the store alone, removes them at any age.
    pub fn clean_tmp_older_than(&self, age: Duration) -> usize {
        let dir = self.root.join("tmp");
        let mut n = 0;
        if !is_real_dir(&dir) {
            return 0;
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let own = e.file_name().to_str().is_some_and(is_tmp_name) && e.file_type().is_ok_and(|t| t.is_file());
                let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a >= age);
                if own && old && fs::remove_file(e.path()).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// [`Store::check_record`] of a local store.
    fn check_record_local(&self, key: &str) -> Result<RecordCheck, StoreError> {
        let p = self.record_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RecordCheck::Absent),
            Err(source) => return Err(StoreError::Io { path: p, source }),
        };
        let record = match parse_record(&bytes, key) {
            Ok(r) => r,
            Err((expected, actual)) => return Ok(RecordCheck::Corrupt(vec![Corruption { path: p, expected, actual }])),
        };
        let mut bad = Vec::new();
        let mut missing = false;
        for hash in record.outputs.values() {
            let op = self.object_path(hash);
            match fs::read(&op) {
                Ok(b) => {
                    let actual = sha256_hex(&b);
                    if &actual != hash {
                        bad.push(Corruption { path: op, expected: hash.clone(), actual });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
                Err(source) => return Err(StoreError::Io { path: op, source }),
            }
        }
        Ok(if !bad.is_empty() {
            RecordCheck::Corrupt(bad)
        } else if missing {
            RecordCheck::Incomplete(record)
        } else {
            RecordCheck::Intact(record)
        })
    }
}

/// The keys and objects a run note names; a note that does not parse is a
/// [`StoreError::DamagedRunNote`] naming `path`.
fn parse_run_note(path: &Path, bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let damaged = |message: String| StoreError::DamagedRunNote { path: path.to_path_buf(), message };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))?;
    let (mut keys, mut objs) = (Vec::new(), Vec::new());
    for (field, out) in [("cells", &mut keys), ("objects", &mut objs)] {
        let list = v.get(field).and_then(|a| a.as_array()).ok_or_else(|| damaged(format!("no `{field}` list")))?;
        for item in list {
            out.push(item.as_str().ok_or_else(|| damaged(format!("`{field}` holds {item}, not a hash")))?.to_string());
        }
    }
    Ok((keys, objs))
}

/// A record as stored: the sha256 of its JSON body on the first line, then the body.
fn record_bytes(record: &CellRecord) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec_pretty(record)?;
    let mut bytes = format!("{}\n", sha256_hex(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// A sealed record's body for `key`, or (seal, actual hash) when it does not check out.
fn parse_record(bytes: &[u8], key: &str) -> Result<CellRecord, (String, String)> {
    let (seal, body) = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&bytes[..i]).to_string(), &bytes[i + 1..]),
        None => (String::new(), bytes),
    };
    let actual = sha256_hex(body);
    let record: Option<CellRecord> = if actual == seal { serde_json::from_slice(body).ok() } else { None };
    record.filter(|r| r.key == key).ok_or((seal, actual))
}

fn thread_id() -> String {
    let id = format!("{:?}", std::thread::current().id());
    id.chars().filter(char::is_ascii_digit).collect()
}

impl Store for LocalStore {
    fn put(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = sha256_hex(bytes);
        let dest = self.object_path(&hash);
        // An object already in place is kept only if it reads back with its hash: a damaged
        // copy of the same length must not survive a recomputation.
        let intact = fs::read(&dest).is_ok_and(|old| sha256_hex(&old) == hash);
        if !intact {
            self.write_atomic(&dest, bytes)?;
        }
        Ok(hash)
    }

    fn get(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !valid_hash(hash) {
            return Ok(None);
        }
        let p = self.object_path(hash);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: p, source }),
        };
        let actual = sha256_hex(&bytes);
        if actual != hash {
            self.note_corruption(Corruption { path: p.clone(), expected: hash.to_string(), actual });
            if p.parent().is_some_and(is_real_dir) {
                let _ = fs::remove_file(&p);
            }
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    fn contains(&self, hash: &str) -> bool {
        valid_hash(hash) && self.object_path(hash).is_file()
    }

    fn put_record(&self, record: &CellRecord) -> Result<(), StoreError> {
        let bytes = record_bytes(record).map_err(|e| StoreError::Io { path: self.record_path(&record.key), source: io::Error::other(e) })?;
        self.write_atomic(&self.record_path(&record.key), &bytes)
    }

    fn get_record(&self, key: &str) -> Result<Option<CellRecord>, StoreError> {
        let p = self.record_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: p, source }),
        };
        let record = match parse_record(&bytes, key) {
            Ok(r) => r,
            Err((expected, actual)) => {
                self.note_corruption(Corruption { path: p.clone(), expected, actual });
                let _ = fs::remove_file(&p);
                return Ok(None);
            }
        };
        if !record.outputs.values().all(|h| self.contains(h)) {
            return Ok(None);
        }
        Ok(Some(record))
    }

    fn lock(&self, key: &str) -> Result<CellLock, StoreError> {
        let p = self.root.join("locks").join(format!("{key}.lock"));
        let f = File::options().create(true).truncate(false).write(true).open(&p).map_err(io_err(&p))?;
        f.lock().map_err(io_err(&p))?;
        Ok(CellLock { _file: Some(f), _guard: None })
    }

    fn take_corruptions(&self) -> Vec<Corruption> {
        self.corruptions.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn check_record(&self, key: &str) -> Result<RecordCheck, StoreError> {
        self.check_record_local(key)
    }

    fn list_objects(&self) -> Result<Vec<String>, StoreError> {
        LocalStore::list_objects(self)
    }

    fn list_records(&self) -> Result<Vec<String>, StoreError> {
        LocalStore::list_records(self)
    }

    fn object_size(&self, hash: &str) -> u64 {
        LocalStore::object_size(self, hash)
    }

    fn remove_object(&self, hash: &str) -> Result<u64, StoreError> {
        LocalStore::remove_object(self, hash)
    }

    fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        LocalStore::remove_record(self, key)
    }

    fn note_run(&self, report: &str, keys: &[String], objects: &[String]) -> Result<(), StoreError> {
        self.note_run_local(report, keys, objects)
    }

    fn recent_references(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        self.recent_references_local()
    }

    fn clean_tmp_older_than(&self, age: Duration) -> usize {
        LocalStore::clean_tmp_older_than(self, age)
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_roundtrip_and_corruption_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let h = s.put(b"hello").unwrap();
        assert_eq!(h, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(s.get(&h).unwrap().unwrap(), b"hello");
        // Flip a byte: the read detects it, reports it and treats it as missing.
        fs::write(s.object_path(&h), b"hellp").unwrap();
        assert_eq!(s.get(&h).unwrap(), None);
        let c = s.take_corruptions();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].expected, h);
        assert!(!s.contains(&h));
    }

    #[test]
    fn records_are_sealed_and_need_their_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let h = s.put(b"out").unwrap();
        let mut outputs = BTreeMap::new();
        outputs.insert("x".to_string(), h.clone());
        let key = "a".repeat(64);
        let r = CellRecord { key: key.clone(), kind: "train".into(), status: CellStatus::Ok, reason: None, outputs, seconds: 1.5 };
        s.put_record(&r).unwrap();
        assert_eq!(s.get_record(&key).unwrap(), Some(r.clone()));
        // A tampered record is rejected.
        let p = s.record_path(&key);
        let text = fs::read_to_string(&p).unwrap().replace("1.5", "2.5");
        fs::write(&p, text).unwrap();
        assert_eq!(s.get_record(&key).unwrap(), None);
        // A record whose output vanished is a miss.
        s.put_record(&r).unwrap();
        s.remove_object(&h).unwrap();
        assert_eq!(s.get_record(&key).unwrap(), None);
    }

    #[test]
    fn a_run_holds_the_store_shared_and_gc_is_refused_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let run = LocalStore::open(dir.path()).unwrap();
        let other_run = LocalStore::open(dir.path()).unwrap();
        let err = LocalStore::open_exclusive(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by a run"), "{err}");
        drop(run);
        assert!(LocalStore::open_exclusive(dir.path()).is_err(), "one holder is enough to refuse");
        drop(other_run);
        let gc = LocalStore::open_exclusive(dir.path()).unwrap();
        drop(gc);
        LocalStore::open(dir.path()).unwrap();
    }

    #[test]
    fn a_new_store_is_marked_and_an_ordinary_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new");
        drop(LocalStore::open(&root).unwrap());
        assert!(fs::read_to_string(root.join(MARKER)).unwrap().contains("reprise store"));
        // An empty existing folder becomes a store too.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        drop(LocalStore::open(&empty).unwrap());
        assert!(empty.join(MARKER).is_file());
        // A folder with anything else in it is refused, and left as it was.
        let home = dir.path().join("home");
        fs::create_dir_all(home.join("tmp")).unwrap();
        fs::write(home.join("tmp/notes.txt"), b"x").unwrap();
        let err = LocalStore::open(&home).err().unwrap();
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
        assert!(err.to_string().contains("`tmp`") && err.to_string().contains("empty or new folder"), "{err}");
        assert_eq!(fs::read_dir(&home).unwrap().count(), 1);
        assert!(home.join("tmp/notes.txt").is_file());
    }

    #[test]
    fn a_store_from_before_the_marker_is_adopted_but_not_a_look_alike() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        for sub in SUBDIRS {
            fs::create_dir_all(old.join(sub)).unwrap();
        }
        drop(LocalStore::open(&old).unwrap());
        assert!(old.join(MARKER).is_file());
        // The same names plus one file of the user's: not a store.
        let look = dir.path().join("look-alike");
        for sub in SUBDIRS {
            fs::create_dir_all(look.join(sub)).unwrap();
        }
        fs::write(look.join("notes.txt"), b"x").unwrap();
        assert!(matches!(LocalStore::open(&look), Err(StoreError::NotAStore { .. })));
        // A `tmp` folder alone (a home folder's, say) is not a store either.
        let home = dir.path().join("home");
        fs::create_dir_all(home.join("tmp")).unwrap();
        assert!(matches!(LocalStore::open(&home), Err(StoreError::NotAStore { .. })));
    }

    #[test]
    fn linked_subfolders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        for sub in SUBDIRS {
            let root = dir.path().join(format!("store-{sub}"));
            drop(LocalStore::open(&root).unwrap());
            fs::remove_dir(root.join(sub)).unwrap();
            std::os::unix::fs::symlink(&elsewhere, root.join(sub)).unwrap();
            let err = LocalStore::open(&root).err().unwrap();
            assert!(matches!(err, StoreError::Link { .. }), "{sub}: {err}");
        }
        // A linked prefix folder under objects/ is neither listed nor written through.
        let root = dir.path().join("store-prefix");
        let s = LocalStore::open(&root).unwrap();
        let h = sha256_hex(b"x");
        std::os::unix::fs::symlink(&elsewhere, root.join("objects").join(&h[..2])).unwrap();
        assert!(s.put(b"x").is_err());
        assert!(!elsewhere.join(&h).exists());
        fs::write(elsewhere.join(&h), b"x").unwrap();
        assert!(s.list_objects().unwrap().is_empty());
        assert!(s.remove_object(&h).is_err());
        assert!(elsewhere.join(&h).is_file());
    }

    #[test]
    fn only_the_stores_own_names_are_listed_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let h = s.put(b"object").unwrap();
        let key = "b".repeat(64);
        s.put_record(&CellRecord { key: key.clone(), kind: "split".into(), status: CellStatus::Ok, reason: None, outputs: BTreeMap::new(), seconds: 0.0 }).unwrap();
        for f in ["cells/notes.json", "cells/README", "objects/notes.txt"] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        fs::write(s.object_path(&h).with_file_name("todo.txt"), b"x").unwrap();
        assert_eq!(s.list_objects().unwrap(), vec![h]);
        assert_eq!(s.list_records().unwrap(), vec![key]);
        assert!(s.remove_record("notes").is_err());
        let tmp = dir.path().join("tmp");
        for f in ["1-2-3.tmp", "probe-42", "draft.txt", "1-2.tmp", "a-2-3.tmp"] {
            fs::write(tmp.join(f), b"x").unwrap();
        }
        assert_eq!(s.clean_tmp(), 0, "nothing is older than a minute");
        assert_eq!(s.clean_tmp_older_than(Duration::ZERO), 2);
        assert_eq!(names_in(&tmp).unwrap(), ["1-2.tmp", "a-2-3.tmp", "draft.txt"]);
    }

    #[test]
    fn a_damaged_run_note_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.note_run("r", &["k".into()], &["o".into()]).unwrap();
        assert_eq!(s.recent_references().unwrap(), (vec!["k".to_string()], vec!["o".to_string()]));
        let note = dir.path().join("runs/r.json");
        let damages: [&[u8]; 3] = [b"{\"cells\": [\"k\"], \"obj", b"{\"cells\": []}", b"{\"cells\": [], \"objects\": [1]}"];
        for damage in damages {
            fs::write(&note, damage).unwrap();
            let err = s.recent_references().err().unwrap();
            assert!(matches!(err, StoreError::DamagedRunNote { .. }) && err.to_string().contains("r.json"), "{err}");
        }
    }

    #[test]
    fn check_record_names_corruption_without_removing_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let h = s.put(b"out").unwrap();
        let key = "c".repeat(64);
        let r = CellRecord { key: key.clone(), kind: "train".into(), status: CellStatus::Ok, reason: None, outputs: BTreeMap::from([("x".to_string(), h.clone())]), seconds: 1.0 };
        assert_eq!(s.check_record(&key).unwrap(), RecordCheck::Absent);
        s.put_record(&r).unwrap();
        assert_eq!(s.check_record(&key).unwrap(), RecordCheck::Intact(r.clone()));
        fs::write(s.object_path(&h), b"oUt").unwrap();
        match s.check_record(&key).unwrap() {
            RecordCheck::Corrupt(c) => assert_eq!(c[0].path, s.object_path(&h)),
            other => panic!("{other:?}"),
        }
        assert!(s.object_path(&h).is_file(), "checking removes nothing");
        fs::remove_file(s.object_path(&h)).unwrap();
        assert_eq!(s.check_record(&key).unwrap(), RecordCheck::Incomplete(r));
    }

    #[test]
    fn unwritable_root_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = LocalStore::open(&file.join("store")).err().unwrap();
        assert!(err.to_string().contains("not writable"), "{err}");
    }
}
