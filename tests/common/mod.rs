//! Helpers the integration tests share: a fresh copy of the tiny fixture project, and running
//! the `reprise` binary in it.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    Command::new(env!("CARGO_BIN_EXE_reprise")).args(args).current_dir(cwd).env_remove("REPRISE_CACHE").output().unwrap()
}
