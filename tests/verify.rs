//! `verify` takes nothing from the lock file on trust, and a run that ends in a usage or data
//! error leaves the committed report as it was. Each test is a reproduction of a defect that
//! `verify` or `run` once let through.

mod common;

use std::path::Path;

use common::{project, reprise, reprise_env, run_json};
use serde_json::Value;

fn verify(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["verify", "reports/tiny.toml"];
    args.extend_from_slice(extra);
    let out = reprise(dir, &args);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn lock_path(dir: &Path) -> std::path::PathBuf {
    dir.join("artifacts/tiny/lock.json")
}

fn read_lock(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(lock_path(dir)).unwrap()).unwrap()
}

fn write_lock(dir: &Path, v: &Value) {
    std::fs::write(lock_path(dir), serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn sha256(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Apply `edit` to the lock of a freshly verified report; `verify` must fail and name `expect`.
fn lock_edit_fails(name: &str, expect: &str, edit: impl Fn(&mut Value)) {
    let p = project(name);
    run_json(p.path(), &[]);
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(0), "{err}");
    let mut lock = read_lock(p.path());
    edit(&mut lock);
    write_lock(p.path(), &lock);
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{name}: verify passed an edited lock:\n{err}");
    assert!(err.contains(expect), "{name}: expected `{expect}` in:\n{err}");
}

#[test]
fn a_file_dropped_from_the_lock_is_still_checked() {
    let p = project("verify-drop");
    run_json(p.path(), &[]);
    let mut lock = read_lock(p.path());
    lock["files"].as_object_mut().unwrap().remove("report.md");
    write_lock(p.path(), &lock);
    let md = p.path().join("artifacts/tiny/report.md");
    let text = std::fs::read_to_string(&md).unwrap();
    std::fs::write(&md, text.replace("does not hold", "holds").replace("inconclusive", "holds")).unwrap();
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("report.md: produced by the report but not listed in the lock file"), "{err}");
}

#[test]
fn an_empty_file_list_fails() {
    lock_edit_fails("verify-nofiles", "report.html: produced by the report but not listed", |l| {
        l["files"] = serde_json::json!({});
    });
}

#[test]
fn an_extra_file_entry_fails() {
    lock_edit_fails("verify-extrafile", "figures/bogus.svg: listed in the lock file, but the report does not produce it", |l| {
        l["files"]["figures/bogus.svg"] = Value::from("0".repeat(64));
    });
}

#[test]
fn edited_cell_fields_fail() {
    lock_edit_fails("verify-outputs", "the lock's outputs", |l| {
        // A training cell's metrics: the frames' objects do not name metrics.json, so the store
        // (filled by the run) is what catches this.
        let cell = l["cells"].as_array_mut().unwrap().iter_mut().find(|c| c["name"].as_str().unwrap().starts_with("train/")).unwrap();
        cell["outputs"]["metrics.json"] = Value::from("1".repeat(64));
    });
    lock_edit_fails("verify-status", "status `weird`", |l| {
        l["cells"][0]["status"] = Value::from("weird");
    });
    lock_edit_fails("verify-reason", "status ok with a failure reason", |l| {
        l["cells"][0]["reason"] = Value::from("made up");
    });
    lock_edit_fails("verify-material", "key material is not the spec's", |l| {
        l["cells"][0]["material"]["seed"] = Value::from(12345);
    });
    lock_edit_fails("verify-profile", "the lock file was made with --profile long", |l| {
        l["profile"] = Value::from("long");
    });
    lock_edit_fails("verify-overrides", "`defaults.epochs=9`", |l| {
        l["overrides"] = serde_json::json!(["defaults.epochs=9"]);
    });
    lock_edit_fails("verify-bogus", "cell train/bogus: in the lock file but not planned by the spec", |l| {
        let mut bogus = l["cells"][0].clone();
        bogus["name"] = Value::from("train/bogus");
        l["cells"].as_array_mut().unwrap().push(bogus);
    });
    lock_edit_fails("verify-duplicate-cell", "listed more than once in the lock file", |l| {
        let again = l["cells"][0].clone();
        l["cells"].as_array_mut().unwrap().push(again);
    });
    lock_edit_fails("verify-missing-cell", "planned by the spec but not in the lock file", |l| {
        l["cells"].as_array_mut().unwrap().pop();
    });
}

#[test]
fn a_csv_frame_must_agree_with_its_parquet_even_with_its_hash_updated() {
    let p = project("verify-csv");
    run_json(p.path(), &[]);
    let csv = p.path().join("artifacts/tiny/frames/results.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let edited = text.replacen(",ok,", ",failed,", 1);
    assert_ne!(edited, text, "the frame has an ok row");
    std::fs::write(&csv, edited).unwrap();
    let mut lock = read_lock(p.path());
    lock["files"]["frames/results.csv"] = Value::from(sha256(&csv));
    write_lock(p.path(), &lock);
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("results.csv: does not agree with frames/results.parquet"), "{err}");
}

#[test]
fn a_stray_file_beside_the_report_fails() {
    let p = project("verify-stray");
    run_json(p.path(), &[]);
    std::fs::write(p.path().join("artifacts/tiny/figures/old.svg"), "<svg/>").unwrap();
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("figures/old.svg: not produced by the report"), "{err}");
}

#[test]
fn a_lock_made_with_overrides_is_named_in_one_line() {
    let p = project("verify-overrides");
    run_json(p.path(), &["--set", "defaults.epochs=1"]);
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--set 'defaults.epochs=1'") || err.contains("--set defaults.epochs=1"), "{err}");
    assert_eq!(err.lines().filter(|l| l.trim_start().starts_with("- ")).count(), 1, "one problem line, not one per cell:\n{err}");
    let (code, err) = verify(p.path(), &["--set", "defaults.epochs=1"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_data_error_leaves_the_committed_report_as_it_was() {
    let p = project("verify-dataerr");
    run_json(p.path(), &[]);
    let out_dir = p.path().join("artifacts/tiny");
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = common::walk(&out_dir)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect();
    // The data file goes missing; a new store makes the data cell read it again.
    std::fs::remove_file(p.path().join("data/optdigits_8x8.csv.gz")).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--cache", "fresh-store"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing was rendered"), "{err}");
    for (f, bytes) in &before {
        assert_eq!(&std::fs::read(f).unwrap(), bytes, "{} changed", f.display());
    }
    assert_eq!(common::walk(&out_dir).len(), before.len());
}

#[test]
fn zero_jobs_is_a_usage_error() {
    let p = project("verify-jobs");
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--jobs", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jobs 0"));
}

#[test]
fn the_render_hint_repeats_set_and_cache() {
    let p = project("verify-hint");
    let out = reprise(p.path(), &["render", "reports/tiny.toml", "--set", "defaults.epochs=1", "--cache", "elsewhere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("run `reprise run reports/tiny.toml --set defaults.epochs=1 --cache elsewhere` first"), "{err}");
}

#[test]
fn a_spec_that_is_not_a_file_says_what_it_is() {
    let p = project("verify-notfile");
    let out = reprise(p.path(), &["run", "reports"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a directory"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = reprise(p.path(), &["verify", "/dev/null"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a regular file"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_killed_recompute_leaves_no_scratch_store_behind_for_long() {
    let p = project("verify-scratch");
    run_json(p.path(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    // A process that has ended: its scratch folder is a leftover of a killed verify.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = tmp.path().join(format!("reprise-verify-{dead}-0"));
    std::fs::create_dir_all(stale.join("objects")).unwrap();
    // A folder of a live process and a foreign folder stay.
    let live = tmp.path().join(format!("reprise-verify-{}-0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let foreign = tmp.path().join("reprise-verify-notes");
    std::fs::create_dir_all(&foreign).unwrap();
    let out = reprise_env(p.path(), &["verify", "reports/tiny.toml"], &[("TMPDIR", tmp.path().to_str().unwrap())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stale.exists(), "the dead process's scratch store is removed");
    assert!(live.exists() && foreign.exists());
    // verify's own scratch folders are gone when it ends.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn a_template_error_stops_the_run_before_any_cell_and_is_printed_once() {
    let p = project("verify-template");
    let tpl = p.path().join("templates/tiny.md.j2");
    let text = std::fs::read_to_string(&tpl).unwrap();
    std::fs::write(&tpl, text.replace("{{ table(\"imb\") }}", "{{ table(\"imbalance\") }}")).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("imbalance").count().min(1), 1, "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("no table") || l.contains("`imbalance`")).count(), 1, "one message, once:\n{err}");
    let objects = p.path().join("artifacts/store/objects");
    assert!(!objects.exists() || common::walk(&objects).is_empty(), "a cell ran before the template was checked");
    assert!(!p.path().join("artifacts/tiny").exists());
}

#[test]
fn cells_that_share_a_name_verify() {
    // Subsets drawn with different data seeds are different cells with one name.
    let p = project("verify-shared-names");
    let spec = p.path().join("reports/tiny.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace("grid = { imbalance = [1.0, 0.1] }", "grid = { imbalance = [1.0, 0.1], data_seed = [0, 1] }");
    std::fs::write(&spec, text).unwrap();
    run_json(p.path(), &[]);
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(0), "{err}");
}

/// Every file below `dir` with its bytes.
fn contents(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = common::walk(dir)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_linked_output_folder_is_refused_by_run_and_verify() {
    let base = tempfile::tempdir().unwrap();
    let p = project("verify-linked");
    run_json(p.path(), &[]);
    let tables = p.path().join("artifacts/tiny/tables");
    std::fs::remove_dir_all(&tables).unwrap();
    std::os::unix::fs::symlink(base.path(), &tables).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0, "nothing written through the link");
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
}

#[test]
fn a_template_that_fails_on_the_results_leaves_the_report_as_it_was() {
    let p = project("verify-late-template");
    run_json(p.path(), &[]);
    let before = contents(&p.path().join("artifacts/tiny"));
    // The id is computed from the results, so only rendering the real results finds it wrong.
    let tpl = p.path().join("templates/tiny.md.j2");
    let mut text = std::fs::read_to_string(&tpl).unwrap();
    text.push_str("{% if claims[0].measured != \"\" %}{{ table(\"im\" ~ \"bx\") }}{% endif %}\n");
    std::fs::write(&tpl, text).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--set", "defaults.epochs=3"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(contents(&p.path().join("artifacts/tiny")), before, "the report's folder changed");
    let left: Vec<_> = std::fs::read_dir(p.path().join("artifacts")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("staging")), "{left:?}");
}

#[test]
fn a_split_the_data_cannot_give_leaves_the_report_as_it_was() {
    let p = project("verify-split");
    run_json(p.path(), &[]);
    let before = contents(&p.path().join("artifacts/tiny"));
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--set", "data.optdigits.test_per_class=175"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(contents(&p.path().join("artifacts/tiny")), before, "the report's folder changed");
}

#[test]
fn a_foreign_file_in_the_report_folder_fails() {
    let p = project("verify-foreign");
    run_json(p.path(), &[]);
    std::fs::write(p.path().join("artifacts/tiny/index.html"), "<script>alert(1)</script>").unwrap();
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("index.html: not produced by the report"), "{err}");
}

#[test]
fn a_corrupt_store_record_is_named_and_kept() {
    let p = project("verify-corrupt-record");
    run_json(p.path(), &[]);
    let cells = p.path().join("artifacts/store/cells");
    let victim = std::fs::read_dir(&cells).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.extend_from_slice(b"x");
    std::fs::write(&victim, &bytes).unwrap();
    let (code, err) = verify(p.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("store record cannot be compared"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), bytes, "verify does not touch the store");
}

#[test]
fn recompute_checks_the_data_cells_a_sampled_run_reads() {
    let p = project("verify-recompute-data");
    run_json(p.path(), &[]);
    // Without a store, only recomputation can tell an edited output hash of a data cell.
    std::fs::remove_dir_all(p.path().join("artifacts/store")).unwrap();
    let mut lock = read_lock(p.path());
    let split = lock["cells"].as_array_mut().unwrap().iter_mut().find(|c| c["name"].as_str().unwrap().starts_with("split/")).unwrap();
    let name = split["outputs"].as_object().unwrap().keys().next().unwrap().clone();
    split["outputs"][&name] = Value::from("0".repeat(64));
    write_lock(p.path(), &lock);
    let (code, err) = verify(p.path(), &["--recompute", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("split/") && err.contains("recomputed outputs differ"), "{err}");
}

#[test]
fn another_profiles_template_calls_are_checked_too() {
    let p = project("verify-profile-template");
    let spec = p.path().join("reports/tiny.toml");
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text.push_str("\n[profiles.other]\n\"claims.0.id\" = \"zz\"\n");
    std::fs::write(&spec, text).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("with profile `other`"), "{err}");
}

#[test]
fn a_killed_runs_staging_folder_is_removed_by_the_next_run() {
    let p = project("verify-staging");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = p.path().join(format!("artifacts/.tiny.staging-{dead}-0"));
    std::fs::create_dir_all(stale.join("frames")).unwrap();
    run_json(p.path(), &[]);
    assert!(!stale.exists());
}
