//! Helpers shared by the integration tests: a fresh copy of the tiny fixture project, and
//! running the `reprise` binary in it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh project: the fixture's reports and templates, the real base template, manifest and
/// data file.
pub fn project(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let p = dir.path();
    for sub in ["reports", "templates", "data-manifests", "data"] {
        std::fs::create_dir_all(p.join(sub)).unwrap();
    }
    let fx = repo().join("tests/fixtures/tiny");
    std::fs::copy(fx.join("reports/tiny.toml"), p.join("reports/tiny.toml")).unwrap();
    std::fs::copy(fx.join("templates/tiny.md.j2"), p.join("templates/tiny.md.j2")).unwrap();
    std::fs::copy(repo().join("templates/base.html.j2"), p.join("templates/base.html.j2")).unwrap();
    std::fs::copy(repo().join("data-manifests/optdigits-8x8.toml"), p.join("data-manifests/optdigits-8x8.toml")).unwrap();
    std::fs::copy(repo().join("data/optdigits_8x8.csv.gz"), p.join("data/optdigits_8x8.csv.gz")).unwrap();
    dir
}

pub fn reprise(cwd: &Path, args: &[&str]) -> Output {
    reprise_env(cwd, args, &[])
}

/// `reprise` with these environment variables set (and no `REPRISE_CACHE` or `REPRISE_WAIT` from
/// the caller's environment unless given here).
pub fn reprise_env(cwd: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reprise"));
    c.args(args).current_dir(cwd).env_remove("REPRISE_CACHE").env_remove("REPRISE_WAIT");
    c.envs(vars.iter().copied());
    c.output().unwrap()
}

pub fn run_json(cwd: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["run", "reports/tiny.toml", "--json", "--jobs", "2"];
    args.extend_from_slice(extra);
    let out = reprise(cwd, &args);
    assert!(out.status.success(), "run failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn cells(v: &Value) -> (u64, u64, u64, u64) {
    let c = &v["cells"];
    (c["planned"].as_u64().unwrap(), c["cached"].as_u64().unwrap(), c["run"].as_u64().unwrap(), c["failed"].as_u64().unwrap())
}

/// Every file below `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
