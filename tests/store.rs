//! The store's guarantees towards what is not the store (issue 20): `gc` never removes what a
//! live run made or what a damaged note still names, `--cache` on an ordinary folder deletes
//! nothing of the user's, links inside a store are never followed, and corrupt cells are named
//! as such by `status` and `render`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use reprise::cache::{LocalStore, Store};
use serde_json::Value;

/// Training long enough that `gc` lands while the run is still going.
const SLOW: [&str; 2] = ["--set", "defaults.epochs=200"];

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Make `path` look an hour old, older than any age threshold a cleaner uses.
fn age(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
}

/// A store at `dir` holding `objects` (each unreferenced), made through the library; the
/// store is closed again before this returns, so nothing holds it.
fn store_with(dir: &Path, objects: &[&[u8]]) -> Vec<String> {
    let s = LocalStore::open(dir).unwrap();
    objects.iter().map(|b| s.put(b).unwrap()).collect()
}

fn object_path(store: &Path, hash: &str) -> PathBuf {
    store.join("objects").join(&hash[..2]).join(hash)
}

/// An ordinary folder of the user's: files in `tmp/` (an hour old), a `cells/notes.json`, an
/// `objects/` file and a top-level file.
fn users_folder(dir: &Path) -> Vec<PathBuf> {
    let files = [dir.join("tmp/draft.txt"), dir.join("tmp/1-2-3.tmp"), dir.join("cells/notes.json"), dir.join("objects/ab/todo.txt"), dir.join("letter.txt")];
    for f in &files {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"the user's").unwrap();
        age(f);
    }
    files.to_vec()
}

#[test]
fn issue20_gc_refuses_while_a_run_is_live_and_the_run_is_whole() {
    let p = project("store-gc-live");
    let mut child = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args(["run", "reports/tiny.toml", "--jobs", "1", "--json"])
        .args(SLOW)
        .current_dir(p.path())
        .env_remove("REPRISE_CACHE")
        .env_remove("REPRISE_WAIT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run has recorded a cell (its data set): it is under way and its fresh
    // objects are referenced by nothing yet but itself.
    let records = p.path().join("artifacts/store/cells");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_dir(&records).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before recording a cell");
        assert!(Instant::now() < deadline, "no cell recorded in two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A dry run does not wait for the run.
    let dry = reprise(p.path(), &["gc", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let gc = reprise(p.path(), &["gc"]);
    let live = child.try_wait().unwrap().is_none();
    let out = child.wait_with_output().unwrap();
    assert!(live, "the run ended before gc did; the test needs a slower run");
    assert_eq!(gc.status.code(), Some(1), "gc must refuse while a run holds the store: {}", stderr(&gc));
    assert!(stderr(&gc).contains("in use by a run"), "{}", stderr(&gc));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cells(&v).3, 0, "no cell failed: {v}");
    // Every object the report's lock names is in the store.
    let lock: Value = serde_json::from_slice(&std::fs::read(p.path().join("artifacts/tiny/lock.json")).unwrap()).unwrap();
    for c in lock["cells"].as_array().unwrap() {
        for h in c["outputs"].as_object().unwrap().values() {
            let h = h.as_str().unwrap();
            assert!(object_path(&p.path().join("artifacts/store"), h).is_file(), "{h} of {} is gone", c["name"]);
        }
    }
}

#[test]
fn issue20_run_with_cache_on_an_ordinary_folder_is_refused_and_deletes_nothing() {
    let p = project("store-run-folder");
    let home = p.path().join("home");
    let files = users_folder(&home);
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--cache", home.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("is not a reprise store") && err.contains("home") && err.contains("empty or new folder"), "{err}");
    for f in &files {
        assert!(f.is_file(), "{} was deleted", f.display());
    }
    assert!(!home.join("REPRISE-STORE").exists(), "the folder was not claimed");
}

#[test]
fn issue20_gc_with_cache_on_an_ordinary_folder_is_refused_and_deletes_nothing() {
    let p = project("store-gc-folder");
    let home = p.path().join("home");
    let mut files = users_folder(&home);
    // Names that look like the store's own.
    let record = home.join("cells").join(format!("{}.json", "c".repeat(64)));
    std::fs::write(&record, b"{}").unwrap();
    files.push(record);
    let out = reprise(p.path(), &["gc", "--cache", home.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a reprise store"), "{}", stderr(&out));
    for f in &files {
        assert!(f.is_file(), "{} was deleted", f.display());
    }
}

#[test]
fn issue20_gc_and_run_remove_only_names_the_store_made() {
    let p = project("store-own-names");
    let store = p.path().join("cache");
    let hashes = store_with(&store, &[b"unreferenced"]);
    // The user's files dropped into a real store: none of them is the store's to delete.
    let foreign = [store.join("tmp/draft.txt"), store.join("cells/notes.json"), store.join("cells/README"), store.join("objects/ab/todo.txt"), store.join("objects/notes.txt")];
    for f in &foreign {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"the user's").unwrap();
        age(f);
    }
    // A leftover of an interrupted write is the store's own.
    let leftover = store.join("tmp/123-4-5.tmp");
    std::fs::write(&leftover, b"partial").unwrap();
    age(&leftover);
    let out = reprise(p.path(), &["gc", "--cache", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!object_path(&store, &hashes[0]).exists(), "the unreferenced object is removed");
    assert!(!leftover.exists(), "the leftover temporary file is removed");
    for f in &foreign {
        assert!(f.is_file(), "{} was deleted", f.display());
    }
    // `run` cleans old temporary files too, and only its own.
    std::fs::write(&leftover, b"partial").unwrap();
    age(&leftover);
    let s = LocalStore::open(&store).unwrap();
    assert_eq!(s.clean_tmp(), 1);
    assert!(!leftover.exists() && store.join("tmp/draft.txt").is_file());
}

#[test]
fn issue20_links_inside_a_store_are_never_followed() {
    let p = project("store-links");
    let elsewhere = p.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let precious = [elsewhere.join("1-2-3.tmp"), elsewhere.join(format!("{}.json", "d".repeat(64)))];
    for f in &precious {
        std::fs::write(f, b"the user's").unwrap();
        age(f);
    }
    for sub in ["tmp", "cells", "objects"] {
        let store = p.path().join(format!("store-{sub}"));
        store_with(&store, &[]);
        std::fs::remove_dir_all(store.join(sub)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, store.join(sub)).unwrap();
        for args in [vec!["gc"], vec!["run", "reports/tiny.toml"]] {
            let mut a = args.clone();
            a.extend(["--cache", store.to_str().unwrap()]);
            let out = reprise(p.path(), &a);
            assert_eq!(out.status.code(), Some(2), "{a:?}: {}", stderr(&out));
            assert!(stderr(&out).contains("symbolic link"), "{a:?}: {}", stderr(&out));
            for f in &precious {
                assert!(f.is_file(), "{a:?} with a linked {sub}/ deleted {}", f.display());
            }
        }
    }
}

#[test]
fn issue20_a_store_made_before_the_marker_is_still_a_store() {
    let p = project("store-legacy");
    let store = p.path().join("old-store");
    let hashes = store_with(&store, &[b"kept by nothing"]);
    std::fs::remove_file(store.join("REPRISE-STORE")).ok();
    std::fs::remove_file(store.join("gc.lock")).ok();
    let mut names: Vec<String> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["cells", "locks", "objects", "runs", "tmp"], "the layout of a store before the marker");
    let out = reprise(p.path(), &["gc", "--cache", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(store.join("REPRISE-STORE").is_file(), "the store is marked on first use");
    assert!(!object_path(&store, &hashes[0]).exists());
}

#[test]
fn issue20_gc_stops_on_a_damaged_runs_note_and_removes_nothing() {
    let p = project("store-damaged-note");
    let store = p.path().join("cache");
    let hashes = store_with(&store, &[b"named by the note", b"named by nothing"]);
    {
        let s = LocalStore::open(&store).unwrap();
        s.note_run("tiny", &[], &hashes[..1]).unwrap();
    }
    let note = store.join("runs/tiny.json");
    let text = std::fs::read(&note).unwrap();
    std::fs::write(&note, &text[..text.len() / 2]).unwrap();
    let out = reprise(p.path(), &["gc", "--cache", store.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("runs/tiny.json"), "the error names the note: {}", stderr(&out));
    for h in &hashes {
        assert!(object_path(&store, h).is_file(), "gc removed {h} although a note was unreadable");
    }
}

#[test]
fn issue20_gc_dry_run_reports_the_size_it_would_free() {
    let p = project("store-dry-run");
    let store = p.path().join("cache");
    let big = vec![7u8; 1_500_000];
    let hashes = store_with(&store, &[&big]);
    let out = reprise(p.path(), &["gc", "--dry-run", "--cache", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("would remove 1 objects (1.5 MB)"), "{}", stderr(&out));
    assert!(object_path(&store, &hashes[0]).is_file());
}

#[test]
fn issue20_gc_outside_a_project_refuses() {
    let p = project("store-gc-root");
    let store = p.path().join("cache");
    let hashes = store_with(&store, &[b"maybe referenced by a lock file"]);
    let elsewhere = p.path().join("templates");
    let out = reprise(&elsewhere, &["gc", "--cache", store.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("project root"), "{}", stderr(&out));
    assert!(object_path(&store, &hashes[0]).is_file());
}

/// A tiny run, then one byte flipped in a training cell's `metrics.json`: (project, cell name,
/// path of the damaged object).
fn corrupt_one_cell(name: &str) -> (tempfile::TempDir, String, PathBuf) {
    let p = project(name);
    run_json(p.path(), &[]);
    let lock: Value = serde_json::from_slice(&std::fs::read(p.path().join("artifacts/tiny/lock.json")).unwrap()).unwrap();
    let cell = lock["cells"].as_array().unwrap().iter().find(|c| c["name"].as_str().unwrap().starts_with("train/")).unwrap();
    let h = cell["outputs"]["metrics.json"].as_str().unwrap();
    let victim = object_path(&p.path().join("artifacts/store"), h);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&victim, bytes).unwrap();
    (p, cell["name"].as_str().unwrap().to_string(), victim)
}

#[test]
fn issue20_status_calls_a_corrupt_cell_corrupt() {
    let (p, name, victim) = corrupt_one_cell("store-status-corrupt");
    let out = reprise(p.path(), &["status", "reports/tiny.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.ends_with(&name) || l.contains(&format!("{name}  ("))).unwrap_or_else(|| panic!("{name} not listed: {text}"));
    assert!(line.starts_with("corrupt"), "{line}");
    assert!(text.contains("1 corrupt"), "{text}");
    let out = reprise(p.path(), &["status", "reports/tiny.toml", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = v["cells"].as_array().unwrap().iter().find(|c| c["cell"] == name.as_str()).unwrap();
    assert_eq!(row["state"], "corrupt", "{row}");
    // `status` only looks: the damaged file is still there for `run` to replace.
    assert!(victim.is_file());
}

#[test]
fn issue20_render_warns_about_the_corrupt_files_it_removes() {
    let (p, _, victim) = corrupt_one_cell("store-render-corrupt");
    let out = reprise(p.path(), &["render", "reports/tiny.toml"]);
    let err = stderr(&out);
    assert!(err.contains("warning: corrupt cache object") && err.contains(&victim.file_name().unwrap().to_string_lossy().to_string()), "{err}");
    assert!(!victim.exists());
}
