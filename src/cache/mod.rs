//! The content-addressed store: every cell's outputs, named by the sha256 of their bytes, and
//! one record per cell key listing them.
//!
//! Layout under the store's root (default `artifacts/store`, or `--cache DIR`, or the
//! environment variable `REPRISE_CACHE`):
//! - `objects/ab/abcdef…` — output bytes, named by their sha256;
//! - `cells/<key>.json` — the record of a finished cell (its outputs' names and hashes): a first
//!   line with the sha256 of the JSON body that follows it, so a damaged record is detected
//!   byte for byte (no re-serialisation, whose float printing could differ);
//! - `tmp/` — writes in progress: every write goes to a temporary file there, is flushed and
//!   synced, then renamed into place, so a crash never leaves a partial object under its name;
//! - `locks/<key>.lock` — advisory locks so that two runs on one store never compute the same
//!   cell at once;
//! - `runs/` — the objects each recent run referred to, which `gc` keeps.
//!
//! Every read re-hashes the bytes; a mismatch is reported and treated as a miss (the cell is
//! recomputed), never used. The [`Store`] trait is what a remote backend would implement.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The environment variable that points the store elsewhere.
pub const CACHE_ENV: &str = "REPRISE_CACHE";

/// Errors of the store; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O error at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache directory {path} is not writable: {source} (point --cache or {CACHE_ENV} at a writable directory)")]
    NotWritable { path: PathBuf, source: io::Error },
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

/// Storage of objects and cell records. Local today; a remote object store can implement it.
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
}

/// An advisory lock on one cell key.
pub struct CellLock {
    _file: Option<File>,
}

/// A store in a local directory.
pub struct LocalStore {
    root: PathBuf,
    corruptions: Mutex<Vec<Corruption>>,
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

impl LocalStore {
    /// Open (creating if needed) a store at `root`; fails with a clear error if the directory
    /// cannot be created or written.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["objects", "cells", "tmp", "locks", "runs"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| StoreError::NotWritable { path: p.clone(), source })?;
        }
        // Probe writability now rather than after an hour of training.
        let probe = root.join("tmp").join(format!("probe-{}", std::process::id()));
        File::create(&probe).and_then(|mut f| f.write_all(b"ok")).map_err(|source| StoreError::NotWritable { path: root.to_path_buf(), source })?;
        let _ = fs::remove_file(&probe);
        Ok(LocalStore { root: root.to_path_buf(), corruptions: Mutex::new(Vec::new()) })
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

    /// Every object hash present.
    pub fn list_objects(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let dir = self.root.join("objects");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if e.path().is_dir() {
                for f in fs::read_dir(e.path()).map_err(io_err(&e.path()))? {
                    let f = f.map_err(io_err(&dir))?;
                    if let Some(name) = f.file_name().to_str() {
                        if valid_hash(name) {
                            out.push(name.to_string());
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every cell key with a record.
    pub fn list_records(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("cells");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if let Some(k) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
                out.push(k.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn remove_object(&self, hash: &str) -> Result<u64, StoreError> {
        let p = self.object_path(hash);
        let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&p).map_err(io_err(&p))?;
        Ok(len)
    }

    pub fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        let p = self.record_path(key);
        fs::remove_file(&p).map_err(io_err(&p))
    }

    /// Remember the keys and objects a run used, so `gc` keeps them. One file per report,
    /// replaced on each run.
    pub fn note_run(&self, report: &str, keys: &[String], objects: &[String]) -> Result<(), StoreError> {
        let body = serde_json::json!({ "report": report, "cells": keys, "objects": objects });
        let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        self.write_atomic(&self.root.join("runs").join(format!("{report}.json")), &bytes)
    }

    /// Keys and objects named by the `runs/` notes.
    pub fn recent_references(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let dir = self.root.join("runs");
        let (mut keys, mut objs) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let p = e.map_err(io_err(&dir))?.path();
            let Ok(bytes) = fs::read(&p) else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            for (field, out) in [("cells", &mut keys), ("objects", &mut objs)] {
                if let Some(a) = v.get(field).and_then(|a| a.as_array()) {
                    out.extend(a.iter().filter_map(|s| s.as_str().map(String::from)));
                }
            }
        }
        Ok((keys, objs))
    }

    /// Remove leftovers of interrupted writes older than a minute (a live writer's temporary
    /// file is younger).
    pub fn clean_tmp(&self) -> usize {
        let dir = self.root.join("tmp");
        let mut n = 0;
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 60);
                if old && fs::remove_file(e.path()).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }
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
            let _ = fs::remove_file(&p);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    fn contains(&self, hash: &str) -> bool {
        valid_hash(hash) && self.object_path(hash).is_file()
    }

    fn put_record(&self, record: &CellRecord) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Io { path: self.record_path(&record.key), source: io::Error::other(e) })?;
        let mut bytes = format!("{}\n", sha256_hex(&body)).into_bytes();
        bytes.extend_from_slice(&body);
        self.write_atomic(&self.record_path(&record.key), &bytes)
    }

    fn get_record(&self, key: &str) -> Result<Option<CellRecord>, StoreError> {
        let p = self.record_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: p, source }),
        };
        let (seal, body) = match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => (String::from_utf8_lossy(&bytes[..i]).to_string(), &bytes[i + 1..]),
            None => (String::new(), &bytes[..]),
        };
        let actual = sha256_hex(body);
        let record: Option<CellRecord> = if actual == seal { serde_json::from_slice(body).ok() } else { None };
        let Some(record) = record.filter(|r| r.key == key) else {
            self.note_corruption(Corruption { path: p.clone(), expected: seal, actual });
            let _ = fs::remove_file(&p);
            return Ok(None);
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
        Ok(CellLock { _file: Some(f) })
    }

    fn take_corruptions(&self) -> Vec<Corruption> {
        self.corruptions.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }

    fn location(&self) -> String {
        self.root.display().to_string()
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
    fn unwritable_root_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = LocalStore::open(&file.join("store")).err().unwrap();
        assert!(err.to_string().contains("not writable"), "{err}");
    }
}
