//! End-to-end tests of the `reprise` binary on a tiny project (fixtures/tiny): the 8×8 digits,
//! an MLP, two epochs. Each test copies the fixture into its own temporary project.

mod common;

use std::path::{Path, PathBuf};

use common::{project, reprise};

use serde_json::Value;

fn run_json(cwd: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["run", "reports/tiny.toml", "--json", "--jobs", "2"];
    args.extend_from_slice(extra);
    let out = reprise(cwd, &args);
    assert!(out.status.success(), "run failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn cells(v: &Value) -> (u64, u64, u64, u64) {
    let c = &v["cells"];
    (c["planned"].as_u64().unwrap(), c["cached"].as_u64().unwrap(), c["run"].as_u64().unwrap(), c["failed"].as_u64().unwrap())
}

#[test]
fn run_then_cached_then_one_parameter_reruns_only_its_cells() {
    let p = project("e2e-run");
    let v = run_json(p.path(), &[]);
    // 1 data set, 1 split, 3 subsets (imbalance 1.0, 0.1 and the default 0.01), 4 training cells.
    assert_eq!(cells(&v), (9, 0, 9, 0), "{v}");
    for key in ["markdown", "html"] {
        assert!(p.path().join(v["outputs"][key].as_str().unwrap()).is_file());
    }
    assert_eq!(v["outputs"]["figures"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"]["frames"].as_array().unwrap().len(), 6);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);

    let again = run_json(p.path(), &[]);
    assert_eq!(cells(&again), (9, 9, 0, 0));

    // One parameter of one experiment: only that experiment's changed training cell reruns.
    let changed = run_json(p.path(), &["--set", "experiments.loss.grid.loss=[\"ce\",\"focal\"]"]);
    assert_eq!(cells(&changed), (9, 8, 1, 0), "{changed}");

    // status explains a key.
    let out = reprise(p.path(), &["status", "reports/tiny.toml", "--explain", "train/imb/imbalance=0.1 seed=0"]);
    assert!(out.status.success());
    let ex: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ex["key_material"]["params"]["loss"], "ce");
    assert_eq!(ex["key_material"]["kind"], "train:supervised");

    let md = std::fs::read_to_string(p.path().join("artifacts/tiny/report.md")).unwrap();
    assert!(md.contains("| imbalance | accuracy | drift_norm | cells |"), "{md}");
    assert!(md.contains("## Provenance"));
    let html = std::fs::read_to_string(p.path().join("artifacts/tiny/report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("<table>") && html.contains("title=\"cells "));
}

#[test]
fn cold_runs_in_two_caches_and_two_folders_agree_bit_for_bit() {
    let (a, b) = (project("e2e-a"), project("e2e-b"));
    // Different project folders, different caches, different working directories.
    run_json(a.path(), &[]);
    let sub = b.path().join("reports");
    let out = reprise(&sub, &["run", "tiny.toml", "--json", "--jobs", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["frames/results.csv", "frames/per_class.csv", "frames/objects.csv", "report.md", "lock.json"] {
        let x = std::fs::read(a.path().join("artifacts/tiny").join(f)).unwrap();
        let y = std::fs::read(b.path().join("artifacts/tiny").join(f)).unwrap();
        assert!(x == y, "{f} differs between the two cold runs");
    }
}

#[test]
fn spec_formatting_comments_and_key_order_do_not_change_keys() {
    let p = project("e2e-fmt");
    let keys = |dir: &Path| -> Vec<String> {
        let out = reprise(dir, &["status", "reports/tiny.toml", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut k: Vec<String> = v["cells"].as_array().unwrap().iter().map(|c| c["key"].as_str().unwrap().to_string()).collect();
        k.sort();
        k
    };
    let before = keys(p.path());
    let spec = p.path().join("reports/tiny.toml");
    let text = std::fs::read_to_string(&spec).unwrap();
    // Reorder keys, add comments and blank lines, write 1.0 as 1e0.
    let edited = text
        .replace("epochs = 2\nanalyze_freq = 1\n", "# a comment\nanalyze_freq   =   1\n\nepochs = 2 # two\n")
        .replace("[1.0, 0.1]", "[1e0, 0.1]");
    assert_ne!(edited, text);
    std::fs::write(&spec, edited).unwrap();
    assert_eq!(keys(p.path()), before);
    // A real change changes keys.
    let changed = std::fs::read_to_string(&spec).unwrap().replace("epochs = 2", "epochs = 3");
    std::fs::write(&spec, changed).unwrap();
    assert_ne!(keys(p.path()), before);
}

#[test]
fn bad_spec_exits_2_with_location_and_hint() {
    let p = project("e2e-bad");
    let spec = p.path().join("reports/tiny.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace("loss = [\"ce\", \"balanced_softmax\"]", "loss = [\"ce\", \"balanced_sofmax\"]");
    std::fs::write(&spec, text).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown loss `balanced_sofmax`"), "{err}");
    assert!(err.contains("reports/tiny.toml:23:"), "{err}");
    assert!(err.contains("did you mean `balanced_softmax`?"), "{err}");

    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--set", "defaults.nope=1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = reprise(p.path(), &["run", "reports/missing.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn wrong_data_hash_is_an_error_naming_both_hashes() {
    let p = project("e2e-hash");
    let m = p.path().join("data-manifests/optdigits-8x8.toml");
    let text = std::fs::read_to_string(&m).unwrap().replace("09f66e6d", "19f66e6d");
    std::fs::write(&m, text).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("19f66e6d") && err.contains("09f66e6d"), "{err}");
}

#[test]
fn corrupt_store_object_is_detected_and_recomputed() {
    let p = project("e2e-corrupt");
    run_json(p.path(), &[]);
    // Flip a byte in every stored metrics object of one cell: find objects by walking the store.
    let store = p.path().join("artifacts/store/objects");
    let mut files: Vec<PathBuf> = walk(&store);
    files.sort();
    let victim = files.iter().max_by_key(|f| std::fs::metadata(f).unwrap().len()).unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt cache object"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(cells(&v).2 >= 1, "something was recomputed: {v}");
    // The report is the same as before.
    let again = run_json(p.path(), &[]);
    assert_eq!(cells(&again).2, 0);
}

#[test]
fn verify_passes_then_catches_a_tampered_file() {
    let p = project("e2e-verify");
    run_json(p.path(), &[]);
    let out = reprise(p.path(), &["verify", "reports/tiny.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = p.path().join("artifacts/tiny/tables/imb.csv");
    let text = std::fs::read_to_string(&table).unwrap();
    std::fs::write(&table, text.replace('0', "1")).unwrap();
    let out = reprise(p.path(), &["verify", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tables/imb.csv"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
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
