//! A report's committed artifacts: the lock file that pins every cell's key and output hashes,
//! and the hashes of the frames and rendered files committed beside it.
//!
//! `artifacts/<report>/lock.json` lists, for every cell of the plan, its name, key, key
//! material, status and outputs (name → sha256), plus the sha256 of each frame file and each
//! rendered file. Large objects (checkpoints, raw features) stay in the store, out of git; the
//! lock names them so they can be recomputed and checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{sha256_file, StoreError};
use crate::exec::Execution;
use crate::fs::write_atomic;
use crate::plan::{KeyMaterial, Plan};

/// One cell in the lock file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedCell {
    pub name: String,
    pub key: String,
    pub material: KeyMaterial,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    pub outputs: BTreeMap<String, String>,
}

/// `lock.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lock {
    pub report: String,
    pub profile: String,
    pub overrides: Vec<String>,
    pub cells: Vec<LockedCell>,
    /// Path relative to the report folder → sha256.
    pub files: BTreeMap<String, String>,
}

/// Errors reading or writing lock files.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid lock file: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub const LOCK_FILE: &str = "lock.json";

impl Lock {
    /// Build from an executed plan and the files written in `out_dir` (paths under it).
    pub fn build(plan: &Plan, exec: &Execution, profile: &str, overrides: &[String], out_dir: &Path, files: &[PathBuf]) -> Result<Lock, LockError> {
        let cells = plan
            .cells
            .iter()
            .zip(&exec.outcomes)
            .map(|(c, o)| LockedCell {
                name: c.name.clone(),
                key: c.key.clone(),
                material: c.material.clone(),
                status: match (o.record(), o.failure()) {
                    (Some(_), None) => "ok".to_string(),
                    (Some(_), Some(_)) => "failed".to_string(),
                    (None, _) => "error".to_string(),
                },
                reason: o.failure(),
                outputs: o.record().map(|r| r.outputs.clone()).unwrap_or_default(),
            })
            .collect();
        let mut hashes = BTreeMap::new();
        for f in files {
            let rel = f.strip_prefix(out_dir).unwrap_or(f).to_string_lossy().replace('\\', "/");
            hashes.insert(rel, sha256_file(f)?);
        }
        Ok(Lock { report: plan.report.clone(), profile: profile.to_string(), overrides: overrides.to_vec(), cells, files: hashes })
    }

    pub fn write(&self, out_dir: &Path) -> Result<PathBuf, LockError> {
        let p = out_dir.join(LOCK_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| LockError::Invalid { path: p.clone(), message: e.to_string() })?;
        bytes.push(b'\n');
        write_atomic(&p, &bytes).map_err(|source| LockError::Io { path: p.clone(), source })?;
        Ok(p)
    }

    pub fn read(out_dir: &Path) -> Result<Option<Lock>, LockError> {
        let p = out_dir.join(LOCK_FILE);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LockError::Io { path: p, source }),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| LockError::Invalid { path: p, message: e.to_string() })
    }
}
