//! End-to-end tests of the `reprise` binary on a tiny project (fixtures/tiny): the 8×8 digits,
//! an MLP, two epochs. Each test copies the fixture into its own temporary project.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

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

/// `REPRISE_WAIT` only decides whether idle workers spin or sleep: a passive run with two threads
/// per cell gives the same bytes as the default run, and a value it does not know stops every
/// command before any work.
#[test]
fn wait_policy_is_checked_and_passive_changes_no_result() {
    let (a, b) = (project("e2e-wait-a"), project("e2e-wait-b"));
    let out = reprise_env(b.path(), &["run", "reports/tiny.toml", "--json", "--jobs", "1"], &[("REPRISE_WAIT", "sleepy")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("REPRISE_WAIT=\"sleepy\"") && stderr.contains("`passive`"), "{stderr}");
    assert!(!b.path().join("artifacts").exists(), "nothing may run");
    run_json(a.path(), &[]);
    let out = reprise_env(b.path(), &["run", "reports/tiny.toml", "--json", "--jobs", "1"], &[("REPRISE_WAIT", "passive")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["frames/results.csv", "frames/per_class.csv", "report.md", "lock.json"] {
        let x = std::fs::read(a.path().join("artifacts/tiny").join(f)).unwrap();
        let y = std::fs::read(b.path().join("artifacts/tiny").join(f)).unwrap();
        assert!(x == y, "{f} differs between the default and the passive run");
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
    let edited = text.replace("epochs = 2\nanalyze_freq = 1\n", "# a comment\nanalyze_freq   =   1\n\nepochs = 2 # two\n").replace("[1.0, 0.1]", "[1e0, 0.1]");
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

/// Cell name → key, from `status --json`.
fn keys_by_name(dir: &Path, extra: &[&str]) -> std::collections::BTreeMap<String, String> {
    let mut args = vec!["status", "reports/tiny.toml", "--json"];
    args.extend_from_slice(extra);
    let out = reprise(dir, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["cells"].as_array().unwrap().iter().map(|c| (c["cell"].as_str().unwrap().to_string(), c["key"].as_str().unwrap().to_string())).collect()
}

/// Names whose key differs between two plans (over the names both have).
fn changed(a: &std::collections::BTreeMap<String, String>, b: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    a.iter().filter(|(n, k)| b.get(*n).is_some_and(|k2| k2 != *k)).map(|(n, _)| n.clone()).collect()
}

#[test]
fn every_input_of_a_key_changes_it_and_only_downstream() {
    let p = project("e2e-keys");
    let base = keys_by_name(p.path(), &[]);
    // A parameter of one experiment: that experiment's training cells only.
    let lr = keys_by_name(p.path(), &["--set", "experiments.imb.params.lr=0.01"]);
    assert_eq!(changed(&base, &lr), vec!["train/imb/imbalance=0.1 seed=0", "train/imb/imbalance=1.0 seed=0"]);
    // The seed.
    let seeds = keys_by_name(p.path(), &["--set", "experiments.loss.seeds=[0]", "--set", "experiments.imb.seeds=[7]"]);
    assert!(seeds.keys().any(|n| n.ends_with("seed=7")));
    assert_eq!(seeds.len(), base.len());
    // A profile's overrides (epochs for every run): every training cell, no data cell.
    let long = keys_by_name(p.path(), &["--profile", "long"]);
    let mut expect: Vec<String> = base.keys().filter(|n| n.starts_with("train/")).cloned().collect();
    expect.sort();
    assert_eq!(changed(&base, &long), expect);
    // The data's bytes (and so its pinned hash): every cell, through the Merkle chain.
    let data = p.path().join("data/optdigits_8x8.csv.gz");
    let mut bytes = std::fs::read(&data).unwrap();
    let old_hash = reprise::cache::sha256_hex(&bytes);
    bytes.push(0); // gzip ignores trailing garbage only in some readers; the hash changes regardless
    std::fs::write(&data, &bytes).unwrap();
    let manifest = p.path().join("data-manifests/optdigits-8x8.toml");
    let text = std::fs::read_to_string(&manifest).unwrap().replace(&old_hash, &reprise::cache::sha256_hex(&bytes));
    std::fs::write(&manifest, text).unwrap();
    let new = keys_by_name(p.path(), &[]);
    assert_eq!(changed(&base, &new).len(), base.len());
}

#[test]
fn gc_removes_what_nothing_refers_to_and_render_needs_the_cache() {
    let p = project("e2e-gc");
    run_json(p.path(), &[]);
    let changed = run_json(p.path(), &["--set", "defaults.epochs=3"]);
    assert_eq!(cells(&changed).2, 4);
    let out = reprise(p.path(), &["gc"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed"));
    // The current report is whole; the superseded training cells are gone.
    assert_eq!(cells(&run_json(p.path(), &["--set", "defaults.epochs=3"])).2, 0);
    assert_eq!(cells(&run_json(p.path(), &[])).2, 4);
    // `render` works from the cache alone, and names what is missing when it cannot.
    let out = reprise(p.path(), &["render", "reports/tiny.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = reprise(p.path(), &["render", "reports/tiny.toml", "--set", "defaults.epochs=4"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("train/imb/imbalance=1.0 seed=0"));
}

/// A data set with its own test files (CIFAR-10 layout, written here) keeps them as the test set.
#[test]
fn official_test_split_of_a_cifar_manifest_is_used() {
    let p = project("e2e-cifar");
    let dir = p.path().join("data/tiny-cifar");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |label: u8, v: u8| -> Vec<u8> {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(v, 3072));
        r
    };
    let train: Vec<u8> = (0..40u8).flat_map(|i| record(i % 10, i * 3)).collect();
    let test: Vec<u8> = (0..20u8).flat_map(|i| record(i % 10, 200 - i)).collect();
    std::fs::write(dir.join("train.bin"), &train).unwrap();
    std::fs::write(dir.join("test.bin"), &test).unwrap();
    let sha = |b: &[u8]| reprise::cache::sha256_hex(b);
    let manifest = format!(
        "name = \"tiny-cifar\"\ndescription = \"test\"\nclasses = [\"0\",\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\"]\nlicence = \"test\"\nsource = \"test\"\ncitation = \"test\"\n[format]\nkind = \"cifar-binary\"\nvariant = \"cifar10\"\n[[files]]\npath = \"data/tiny-cifar/train.bin\"\nsha256 = \"{}\"\nrole = \"train\"\n[[files]]\npath = \"data/tiny-cifar/test.bin\"\nsha256 = \"{}\"\nrole = \"test\"\n",
        sha(&train),
        sha(&test)
    );
    std::fs::write(p.path().join("data-manifests/tiny-cifar.toml"), manifest).unwrap();
    let spec = p.path().join("reports/tiny.toml");
    let text =
        std::fs::read_to_string(&spec).unwrap().replace("manifest = \"optdigits-8x8\"", "manifest = \"tiny-cifar\"").replace("grid = { imbalance = [1.0, 0.1] }", "grid = { imbalance = [1.0, 0.5] }");
    std::fs::write(&spec, text).unwrap();
    let v = run_json(p.path(), &["--set", "defaults.imbalance=0.5", "--set", "defaults.model=cnn"]);
    assert_eq!(cells(&v).3, 0, "{v}");
    let lock: Value = serde_json::from_slice(&std::fs::read(p.path().join("artifacts/tiny/lock.json")).unwrap()).unwrap();
    let split = lock["cells"].as_array().unwrap().iter().find(|c| c["name"] == "split/optdigits").unwrap();
    let h = split["outputs"]["split.json"].as_str().unwrap();
    let obj = std::fs::read(p.path().join("artifacts/store/objects").join(&h[..2]).join(h)).unwrap();
    let s: Value = serde_json::from_slice(&obj).unwrap();
    assert_eq!(s["train"].as_array().unwrap().len(), 40);
    assert_eq!(s["test"].as_array().unwrap().len(), 20);
}

/// The raw artifacts let anyone recompute the metrics: the numpy reference script reads the
/// safetensors objects from the cache and must agree with the frames. Needs python3 with numpy
/// (CI installs it); without it the test says so and checks nothing else.
#[test]
fn metrics_recompute_independently_from_the_raw_artifacts() {
    let has_numpy = std::process::Command::new("python3").args(["-c", "import numpy"]).status().is_ok_and(|s| s.success());
    if !has_numpy {
        eprintln!("SKIPPED: python3 with numpy is not installed (pip install numpy); .ci/run installs it");
        return;
    }
    let p = project("e2e-recompute");
    run_json(p.path(), &[]);
    let out = std::process::Command::new("python3")
        .arg(repo().join("tests/reference/recompute_from_artifacts.py"))
        .arg(p.path().join("artifacts/tiny"))
        .arg(p.path().join("artifacts/store"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("recomputed 8 analysis objects, 0 mismatches"), "{text}");
}

/// `reprise bench` against a stand-in reference (tests/fixtures/fake_reference.py answers fixed
/// step times by OMP_WAIT_POLICY): with 2 threads it runs one reference per wait policy, stops
/// and continues them between turns, and compares with the faster.
#[test]
fn bench_compares_each_model_with_the_faster_reference() {
    if !std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no python3");
        return;
    }
    let script = repo().join("tests/fixtures/fake_reference.py");
    let bench = |threads: &str| {
        let script = script.to_str().unwrap();
        let args = ["bench", "--threads", threads, "--models", "mlp", "--steps", "4", "--rounds", "2", "--warmup", "1"];
        let tail = ["--hash-mib", "0", "--python", "python3", "--script", script, "--json"];
        reprise(&repo(), &[&args[..], &tail[..]].concat())
    };
    let out = bench("2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("OMP_WAIT_POLICY active and passive"), "{stdout}");
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let m = &v["models"][0];
    assert_eq!(m["model"], "mlp");
    assert_eq!(m["steps"], 4);
    assert_eq!(m["pytorch_omp_wait"], "passive", "{m}");
    let refs: Vec<(String, f64)> = m["pytorch_references"].as_array().unwrap().iter().map(|r| (r["omp_wait"].as_str().unwrap().to_string(), r["samples_per_s"].as_f64().unwrap())).collect();
    assert_eq!(refs, vec![("active".to_string(), 128.0 / 0.008), ("passive".to_string(), 128.0 / 0.002)]);
    let ours = m["ours_samples_per_s"].as_f64().unwrap();
    assert!((m["ratio"].as_f64().unwrap() - ours / 64_000.0).abs() < 1e-9, "{m}");
    assert_eq!(m["round_ratios"].as_array().unwrap().len(), 2);
    assert_eq!(m["pytorch_round_samples_per_s"], serde_json::json!([64_000.0, 64_000.0]));
    assert_eq!(m["target_ratio"], 2.0);
    assert!(stdout.contains("targets (ours / PyTorch, this run): mlp ≥ 2.0: "), "{stdout}");

    // One thread: one reference, OMP_WAIT_POLICY left unset (the fake's 4 ms).
    let out = bench("1");
    assert!(out.status.success());
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["threads"], 1);
    assert_eq!(v["models"][0]["pytorch_omp_wait"], "default");
    assert_eq!(v["models"][0]["pytorch_samples_per_s"], 128.0 / 0.004);
    assert_eq!(v["device"], "cpu");
}

/// `bench --device cuda` refuses, before any work, what it cannot measure: a build without CUDA,
/// and CPU time (which leaves out the GPU's work).
#[test]
fn bench_on_a_gpu_says_what_it_needs() {
    let run = |extra: &[&str]| {
        let out = reprise(&repo(), &[&["bench", "--no-pytorch", "--hash-mib", "0"][..], extra].concat());
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stdout, stderr) = run(&["--device", "cuda", "--clock", "cpu"]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("use --clock wall with --device cuda:0"), "{stderr}");
    assert!(stdout.is_empty(), "nothing is measured: {stdout}");
    let (code, _, stderr) = run(&["--device", "gpu"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("use cpu, cuda or cuda:N"), "{stderr}");
    if !cfg!(feature = "cuda") {
        let (code, stdout, stderr) = run(&["--device", "cuda:1"]);
        assert_eq!(code, Some(2), "{stdout}{stderr}");
        assert!(stderr.contains("--device cuda:1: this build of reprise has no CUDA support") && stderr.contains("--features cuda"), "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
}
