//! The store in S3-compatible object storage (`--cache s3://bucket/prefix`), with the local
//! store's guarantees kept by other means.
//!
//! Layout under `prefix` in the bucket (the same names as a local store's, see the parent
//! module):
//! - `REPRISE-STORE` — the marker; a prefix is used only if it holds the marker or nothing at all;
//! - `objects/ab/abcdef…` — output bytes named by their sha256, written with one PUT (an object
//!   store never shows a partial PUT, so there is no `tmp/`); every read re-hashes the bytes and
//!   a mismatch is reported, deleted and treated as a miss;
//! - `cells/<key>.json` — the sealed record, written create-only (`If-None-Match: *`): the first
//!   writer of a key wins, a second finds it and keeps it when it is intact and complete;
//! - `runs/<report>.json` — the objects each recent run referred to, which `gc` keeps;
//! - `locks/<key>.lock` — a lease (created create-only, renewed while held, deleted on release)
//!   so that two runs rarely compute one cell twice; a lease whose holder stopped renewing it
//!   (or, on the same host, whose process is gone) is taken over. Leases only save work: two
//!   holders at once compute the same bytes, and the create-only record keeps one;
//! - `open/<holder>.json` — one lease per open store (a run, `render`, a SLURM task), and
//!   `gc/<holder>.json` while `gc` runs: a run registers itself, then waits while a live `gc`
//!   lease exists; `gc` registers itself, then refuses while any live `open/` lease exists.
//!   Each side writes before it reads, so at least one of them sees the other.
//!
//! Credentials, region and endpoint come from the usual `AWS_*` environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP=true` for a server without TLS). Objects read are kept in a local store (the
//! mirror, a [`LocalStore`] holding objects only), so a re-render downloads nothing twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{parse_record, parse_run_note, record_bytes, sha256_hex, valid_hash, CellLock, CellRecord, Corruption, LocalStore, RecordCheck, Store, StoreError, MARKER, MARKER_TEXT};

/// The scheme of a remote store's location.
pub const S3_SCHEME: &str = "s3://";

/// A parsed `s3://bucket/prefix` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Slash-separated segments, none empty, `.` or `..`; empty for the bucket's root.
    pub prefix: String,
}

impl S3Url {
    /// Parse `s3://bucket[/prefix]`. The bucket follows S3's naming rules (3–63 of `a-z0-9.-`);
    /// the prefix's segments are made of `A-Za-z0-9._-` (they also name the mirror's folders).
    pub fn parse(url: &str) -> Result<S3Url, StoreError> {
        let bad = |message: &str| StoreError::BadLocation { location: url.to_string(), message: message.to_string() };
        let rest = url.strip_prefix(S3_SCHEME).ok_or_else(|| bad("a remote store is named `s3://bucket/prefix`"))?;
        let rest = rest.trim_end_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len()) && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(bad("the bucket name must be 3 to 63 characters of a-z, 0-9, `.` and `-`"));
        }
        if !prefix.is_empty() {
            for seg in prefix.split('/') {
                let ok = !seg.is_empty() && seg != "." && seg != ".." && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(bad("each part of the prefix must be made of A-Z, a-z, 0-9, `.`, `_` and `-` (no empty part, `.` or `..`)"));
                }
            }
        }
        Ok(S3Url { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "{S3_SCHEME}{}", self.bucket)
        } else {
            write!(f, "{S3_SCHEME}{}/{}", self.bucket, self.prefix)
        }
    }
}

/// How a remote store is opened. Defaults suit a cluster: leases of two minutes, renewed every
/// thirty seconds.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Where downloaded objects are kept (a local store, created when missing).
    pub mirror: PathBuf,
    /// How long a lease lives without renewal. Default: 120 s.
    pub lease: Duration,
    /// How long to wait between two looks at a lease held by another process. Default: 1 s.
    pub poll: Duration,
    /// Settings applied over the `AWS_*` environment variables, as object_store names them
    /// (`aws_endpoint`, `aws_allow_http`, …). Default: none.
    pub settings: Vec<(String, String)>,
}

impl S3Options {
    pub fn with_mirror(mirror: PathBuf) -> S3Options {
        S3Options { mirror, lease: Duration::from_secs(120), poll: Duration::from_secs(1), settings: Vec::new() }
    }
}

/// The content of a lease object.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseNote {
    host: String,
    pid: u32,
    /// Seconds since the epoch after which the lease is stale unless renewed.
    expires: u64,
}

/// What both the store and its renewing thread use.
struct Inner {
    s3: AmazonS3,
    rt: tokio::runtime::Runtime,
    url: S3Url,
    lease: Duration,
    /// Leases this process holds, renewed until released.
    held: Mutex<BTreeSet<String>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// How an open store registers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Run,
    Gc,
}

/// A store under a prefix of an S3 bucket (see the module doc). Open it for a command's whole
/// run: while open it holds its `open/` lease (renewed by a thread of its own).
pub struct S3Store {
    inner: Arc<Inner>,
    mirror: LocalStore,
    corruptions: Mutex<Vec<Corruption>>,
    /// This store's own `open/` or `gc/` lease.
    own: String,
    renewer: Option<std::thread::JoinHandle<()>>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes a NUL-terminated name.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).to_string()
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 checks for existence only.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Inner {
    fn path(&self, rel: &str) -> ObjPath {
        if self.url.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.url.prefix))
        }
    }

    fn shown(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("{}/{rel}", self.url))
    }

    fn err(&self, rel: &str, e: object_store::Error) -> StoreError {
        StoreError::Remote { location: format!("{}/{rel}", self.url), message: e.to_string() }
    }

    /// The bytes of `rel`, or `None` when there is no such object.
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.path(rel);
        let got = self.rt.block_on(async {
            let r = self.s3.get(&p).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Write `rel` whole, replacing what is there.
    fn write(&self, rel: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let p = self.path(rel);
        self.rt.block_on(self.s3.put(&p, PutPayload::from(bytes))).map(|_| ()).map_err(|e| self.err(rel, e))
    }

    /// Write `rel` only if nothing is there: `Ok(false)` when something is.
    fn create(&self, rel: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let p = self.path(rel);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.rt.block_on(self.s3.put_opts(&p, PutPayload::from(bytes), opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    fn size(&self, rel: &str) -> Result<Option<u64>, StoreError> {
        match self.rt.block_on(self.s3.head(&self.path(rel))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    fn delete(&self, rel: &str) -> Result<(), StoreError> {
        match self.rt.block_on(self.s3.delete(&self.path(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Names (relative to the store's prefix) of every object below `dir`, sorted.
    fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let base = self.path(dir);
        let metas: Vec<object_store::ObjectMeta> = self.rt.block_on(self.s3.list(Some(&base)).try_collect()).map_err(|e| self.err(dir, e))?;
        let skip = if self.url.prefix.is_empty() { 0 } else { self.url.prefix.len() + 1 };
        let mut names: Vec<String> = metas.iter().map(|m| m.location.as_ref().get(skip..).unwrap_or("").to_string()).collect();
        names.sort();
        Ok(names)
    }

    fn lease_note(&self) -> Vec<u8> {
        let note = LeaseNote { host: host_name(), pid: std::process::id(), expires: now_secs() + self.lease.as_secs().max(1) };
        serde_json::to_vec(&note).unwrap_or_default()
    }

    /// Whether the lease at `rel` has lapsed: unreadable, expired, or held by a process of this
    /// host that is gone.
    fn stale(&self, rel: &str) -> Result<bool, StoreError> {
        let Some(bytes) = self.read(rel)? else { return Ok(true) };
        let Ok(note) = serde_json::from_slice::<LeaseNote>(&bytes) else { return Ok(true) };
        let gone = note.host == host_name() && note.pid != std::process::id() && !process_alive(note.pid);
        Ok(gone || now_secs() > note.expires)
    }

    /// Live leases under `dir`, other than `except`; stale ones are removed.
    fn live_leases(&self, dir: &str, except: &str) -> Result<Vec<String>, StoreError> {
        let mut live = Vec::new();
        for name in self.list(dir)? {
            if name == except {
                continue;
            }
            if self.stale(&name)? {
                self.delete(&name)?;
            } else {
                live.push(name);
            }
        }
        Ok(live)
    }

    /// Renew every held lease each quarter of the lease time until stopped.
    fn renew_loop(&self) {
        let every = (self.lease / 4).max(Duration::from_millis(200));
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            stop = match self.wake.wait_timeout(stop, every) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            if *stop {
                return;
            }
            let held: Vec<String> = self.held.lock().map(|h| h.iter().cloned().collect()).unwrap_or_default();
            for rel in held {
                // A failed renewal is retried at the next turn; the lease outlives a few.
                let _ = self.write(&rel, self.lease_note());
            }
        }
    }
}

/// A cell's lease, released on drop.
struct LeaseGuard {
    inner: Arc<Inner>,
    rel: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Ok(mut h) = self.inner.held.lock() {
            h.remove(&self.rel);
        }
        let _ = self.inner.delete(&self.rel);
    }
}

impl S3Store {
    /// Open (creating when the prefix is empty) the store at `url` and register this process
    /// as using it, waiting while a `gc` runs.
    pub fn open(url: &S3Url, opts: &S3Options) -> Result<S3Store, StoreError> {
        Self::open_as(url, opts, Role::Run, true)
    }

    /// Open the store at `url` only if it exists (has its marker): `None` otherwise. Nothing is
    /// written to a prefix that is not a store.
    pub fn open_existing(url: &S3Url, opts: &S3Options) -> Result<Option<S3Store>, StoreError> {
        match Self::open_as(url, opts, Role::Run, false) {
            Ok(s) => Ok(Some(s)),
            Err(StoreError::NotAStore { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Open for `gc`: [`StoreError::InUse`] at once while any other process has it open.
    pub fn open_exclusive(url: &S3Url, opts: &S3Options) -> Result<S3Store, StoreError> {
        Self::open_as(url, opts, Role::Gc, true)
    }

    fn open_as(url: &S3Url, opts: &S3Options, role: Role, create: bool) -> Result<S3Store, StoreError> {
        let location = url.to_string();
        let mut builder = AmazonS3Builder::from_env();
        for (k, v) in &opts.settings {
            let key: AmazonS3ConfigKey = k.parse().map_err(|e| StoreError::BadLocation { location: location.clone(), message: format!("setting `{k}`: {e}") })?;
            builder = builder.with_config(key, v);
        }
        let s3 = builder
            .with_bucket_name(&url.bucket)
            // A server that cannot be reached is an error within seconds, not minutes.
            .with_retry(RetryConfig { backoff: BackoffConfig::default(), max_retries: 3, retry_timeout: Duration::from_secs(30) })
            .build()
            .map_err(|e| StoreError::BadLocation {
                location: location.clone(),
                message: format!("{e} (set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for a server other than AWS)"),
            })?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| StoreError::Io { path: PathBuf::from(&location), source })?;
        let inner = Arc::new(Inner { s3, rt, url: url.clone(), lease: opts.lease, held: Mutex::new(BTreeSet::new()), stop: Mutex::new(false), wake: Condvar::new() });
        check_marker(&inner, create)?;
        let mirror = LocalStore::open(&opts.mirror)?;
        let holder = format!("{}-{}-{}", host_name(), std::process::id(), super::TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let own = match role {
            Role::Run => format!("open/{holder}.json"),
            Role::Gc => format!("gc/{holder}.json"),
        };
        inner.write(&own, inner.lease_note())?;
        if let Ok(mut h) = inner.held.lock() {
            h.insert(own.clone());
        }
        let renewer = {
            let inner = inner.clone();
            std::thread::Builder::new().name("reprise-s3-lease".into()).spawn(move || inner.renew_loop()).ok()
        };
        let store = S3Store { inner, mirror, corruptions: Mutex::new(Vec::new()), own, renewer };
        match role {
            Role::Run => {
                // Written before looking, so a gc starting now sees this store (see the module doc).
                while !store.inner.live_leases("gc", "")?.is_empty() {
                    std::thread::sleep(opts.poll);
                }
            }
            Role::Gc => {
                if !store.inner.live_leases("open", "")?.is_empty() || !store.inner.live_leases("gc", &store.own)?.is_empty() {
                    return Err(StoreError::InUse { path: PathBuf::from(location) });
                }
            }
        }
        Ok(store)
    }

    pub fn url(&self) -> &S3Url {
        &self.inner.url
    }

    /// The local store that keeps the objects read.
    pub fn mirror(&self) -> &LocalStore {
        &self.mirror
    }

    fn note_corruption(&self, c: Corruption) {
        if let Ok(mut v) = self.corruptions.lock() {
            v.push(c);
        }
    }

    fn record_rel(key: &str) -> String {
        format!("cells/{key}.json")
    }

    fn object_rel(hash: &str) -> String {
        format!("objects/{}/{hash}", hash.get(..2).unwrap_or("xx"))
    }

    /// The object's bytes from the bucket, verified; a mismatch is reported and deleted.
    fn fetch(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rel = Self::object_rel(hash);
        let Some(bytes) = self.inner.read(&rel)? else { return Ok(None) };
        let actual = sha256_hex(&bytes);
        if actual != hash {
            self.note_corruption(Corruption { path: self.inner.shown(&rel), expected: hash.to_string(), actual });
            self.inner.delete(&rel)?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

/// Check that the prefix is a store: its marker, or nothing at all (then, when `create`, the
/// marker is written).
fn check_marker(inner: &Inner, create: bool) -> Result<(), StoreError> {
    if inner.size(MARKER)?.is_some() {
        return Ok(());
    }
    let base = if inner.url.prefix.is_empty() { None } else { Some(inner.path("")) };
    let listed = inner.rt.block_on(inner.s3.list_with_delimiter(base.as_ref())).map_err(|e| inner.err("", e))?;
    let mut found: Vec<String> = listed.common_prefixes.iter().chain(listed.objects.iter().map(|m| &m.location)).map(|p| p.filename().unwrap_or("").to_string()).collect();
    found.sort();
    // Another run may have written the marker between the check above and the listing.
    if found.iter().any(|n| n == MARKER) && inner.size(MARKER)?.is_some() {
        return Ok(());
    }
    if !found.is_empty() || !create {
        let shown: Vec<String> = found.iter().take(5).map(|n| format!("`{n}`")).collect();
        let found = if shown.is_empty() { "nothing".to_string() } else { shown.join(", ") };
        return Err(StoreError::NotAStore { path: PathBuf::from(inner.url.to_string()), found });
    }
    // `false`: another run created it first, which is as good.
    inner.create(MARKER, MARKER_TEXT.as_bytes().to_vec())?;
    Ok(())
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Ok(mut stop) = self.inner.stop.lock() {
            *stop = true;
        }
        self.inner.wake.notify_all();
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let _ = self.inner.delete(&self.own);
    }
}

impl Store for S3Store {
    fn put(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = sha256_hex(bytes);
        // One PUT replaces the object whole: the same bytes under the same name, or a damaged
        // copy replaced by the right one.
        self.inner.write(&Self::object_rel(&hash), bytes.to_vec())?;
        self.mirror.put(bytes)?;
        Ok(hash)
    }

    fn get(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !valid_hash(hash) {
            return Ok(None);
        }
        if let Some(bytes) = self.mirror.get(hash)? {
            return Ok(Some(bytes));
        }
        let Some(bytes) = self.fetch(hash)? else { return Ok(None) };
        self.mirror.put(&bytes)?;
        Ok(Some(bytes))
    }

    fn contains(&self, hash: &str) -> bool {
        valid_hash(hash) && self.inner.size(&Self::object_rel(hash)).is_ok_and(|s| s.is_some())
    }

    fn put_record(&self, record: &CellRecord) -> Result<(), StoreError> {
        let rel = Self::record_rel(&record.key);
        let bytes = record_bytes(record).map_err(|e| StoreError::Remote { location: self.inner.shown(&rel).display().to_string(), message: e.to_string() })?;
        if self.inner.create(&rel, bytes.clone())? {
            return Ok(());
        }
        // Another run wrote this key's record first: keep it when it is whole, else replace it
        // (a damaged record, or one whose outputs were removed).
        if self.get_record(&record.key)?.is_some() {
            return Ok(());
        }
        self.inner.delete(&rel)?;
        self.inner.create(&rel, bytes)?;
        Ok(())
    }

    fn get_record(&self, key: &str) -> Result<Option<CellRecord>, StoreError> {
        let rel = Self::record_rel(key);
        let Some(bytes) = self.inner.read(&rel)? else { return Ok(None) };
        let record = match parse_record(&bytes, key) {
            Ok(r) => r,
            Err((expected, actual)) => {
                self.note_corruption(Corruption { path: self.inner.shown(&rel), expected, actual });
                self.inner.delete(&rel)?;
                return Ok(None);
            }
        };
        if !record.outputs.values().all(|h| self.contains(h)) {
            return Ok(None);
        }
        Ok(Some(record))
    }

    fn lock(&self, key: &str) -> Result<CellLock, StoreError> {
        let rel = format!("locks/{key}.lock");
        loop {
            if self.inner.create(&rel, self.inner.lease_note())? {
                if let Ok(mut h) = self.inner.held.lock() {
                    h.insert(rel.clone());
                }
                return Ok(CellLock::guard(Box::new(LeaseGuard { inner: self.inner.clone(), rel })));
            }
            if self.inner.stale(&rel)? {
                self.inner.delete(&rel)?;
                continue;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn take_corruptions(&self) -> Vec<Corruption> {
        let mut v = self.corruptions.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        v.extend(self.mirror.take_corruptions());
        v
    }

    fn location(&self) -> String {
        self.inner.url.to_string()
    }

    fn check_record(&self, key: &str) -> Result<RecordCheck, StoreError> {
        let rel = Self::record_rel(key);
        let Some(bytes) = self.inner.read(&rel)? else { return Ok(RecordCheck::Absent) };
        let record = match parse_record(&bytes, key) {
            Ok(r) => r,
            Err((expected, actual)) => return Ok(RecordCheck::Corrupt(vec![Corruption { path: self.inner.shown(&rel), expected, actual }])),
        };
        let mut bad = Vec::new();
        let mut missing = false;
        for hash in record.outputs.values() {
            let orel = Self::object_rel(hash);
            match self.inner.read(&orel)? {
                Some(b) => {
                    let actual = sha256_hex(&b);
                    if &actual != hash {
                        bad.push(Corruption { path: self.inner.shown(&orel), expected: hash.clone(), actual });
                    }
                }
                None => missing = true,
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

    fn list_objects(&self) -> Result<Vec<String>, StoreError> {
        let own = |name: &String| {
            let mut parts = name.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("objects"), Some(prefix), Some(h), None) => valid_hash(h) && h.starts_with(prefix) && prefix.len() == 2,
                _ => false,
            }
        };
        Ok(self.inner.list("objects")?.into_iter().filter(own).filter_map(|n| n.rsplit('/').next().map(str::to_string)).collect())
    }

    fn list_records(&self) -> Result<Vec<String>, StoreError> {
        let key = |name: &str| name.strip_prefix("cells/").and_then(|n| n.strip_suffix(".json")).filter(|k| valid_hash(k)).map(str::to_string);
        Ok(self.inner.list("cells")?.iter().filter_map(|n| key(n)).collect())
    }

    fn object_size(&self, hash: &str) -> u64 {
        self.inner.size(&Self::object_rel(hash)).ok().flatten().unwrap_or(0)
    }

    fn remove_object(&self, hash: &str) -> Result<u64, StoreError> {
        let rel = Self::object_rel(hash);
        if !valid_hash(hash) {
            return Err(StoreError::Link { path: self.inner.shown(&rel) });
        }
        let len = self.inner.size(&rel)?.unwrap_or(0);
        self.inner.delete(&rel)?;
        Ok(len)
    }

    fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        let rel = Self::record_rel(key);
        if !valid_hash(key) {
            return Err(StoreError::Link { path: self.inner.shown(&rel) });
        }
        self.inner.delete(&rel)
    }

    fn note_run(&self, report: &str, keys: &[String], objects: &[String]) -> Result<(), StoreError> {
        let body = serde_json::json!({ "report": report, "cells": keys, "objects": objects });
        self.inner.write(&format!("runs/{report}.json"), serde_json::to_vec_pretty(&body).unwrap_or_default())
    }

    fn recent_references(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let (mut keys, mut objs) = (Vec::new(), Vec::new());
        for name in self.inner.list("runs")? {
            let path = self.inner.shown(&name);
            let bytes = self.inner.read(&name)?.unwrap_or_default();
            let (k, o) = parse_run_note(&path, &bytes)?;
            keys.extend(k);
            objs.extend(o);
        }
        Ok((keys, objs))
    }

    /// The mirror's leftovers, and the cell leases of runs that stopped without releasing
    /// them (stale by [`Inner::stale`], whatever `age`).
    fn clean_tmp_older_than(&self, age: Duration) -> usize {
        let before = self.inner.list("locks").map_or(0, |l| l.len());
        let live = self.inner.live_leases("locks", "").map_or(before, |l| l.len());
        self.mirror.clean_tmp_older_than(age) + before.saturating_sub(live)
    }

    fn local_root(&self) -> Option<&Path> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_plain_prefix() {
        let u = S3Url::parse("s3://my-bucket/team/reprise/").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("my-bucket", "team/reprise"));
        assert_eq!(u.to_string(), "s3://my-bucket/team/reprise");
        assert_eq!(S3Url::parse("s3://my-bucket").unwrap().prefix, "");
        for bad in ["s3://", "s3://ab", "s3://My_Bucket/x", "s3://b-1/../etc", "s3://b-1/a//b", "s3://b-1/./a", "s3://b-1/a b", "gs://b-1/x"] {
            let err = S3Url::parse(bad).err().unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(matches!(err, StoreError::BadLocation { .. }) && err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn a_location_is_remote_only_with_the_scheme() {
        use super::super::Location;
        assert_eq!(Location::parse(Path::new("s3://b-1/p")).unwrap(), Location::S3(S3Url { bucket: "b-1".into(), prefix: "p".into() }));
        assert_eq!(Location::parse(Path::new("artifacts/s3:/x")).unwrap(), Location::Local(PathBuf::from("artifacts/s3:/x")));
        assert!(Location::parse(Path::new("s3://b-1/../x")).is_err());
    }
}
