//! Faults: a killed process, a damaged store, two runs at once, an unusable cache directory, a
//! diverging run. Each test ends with a usable cache and the correct report.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

/// Longer training so that a kill lands in the middle of cells.
const SLOW: [&str; 2] = ["--set", "defaults.epochs=40"];

/// Settings under which the `loss` experiment's runs diverge within the first epoch.
const DIVERGE: [&str; 6] = ["--set", "experiments.loss.params.lr=10.0", "--set", "experiments.loss.params.weight_decay=1.0", "--set", "experiments.loss.params.lr_schedule=constant"];

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Every object in the store is named by the sha256 of its bytes: nothing partial is in place.
fn assert_store_objects_whole(root: &Path) {
    for f in walk(&root.join("artifacts/store/objects")) {
        assert_eq!(f.file_name().unwrap().to_string_lossy(), sha256(&f), "partial object {}", f.display());
    }
}

fn results(root: &Path) -> Vec<u8> {
    std::fs::read(root.join("artifacts/tiny/frames/results.csv")).unwrap()
}

#[test]
fn sigkill_at_random_points_then_resume_gives_the_clean_report() {
    let p = project("faults-kill");
    // A fixed sequence of kill delays spread over the run (SplitMix-style, seeded).
    let mut state: u64 = 0x5eed;
    for _ in 0..10 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay_ms = 30 + (state >> 33) % 900;
        let mut child =
            Command::new(env!("CARGO_BIN_EXE_reprise")).args(["run", "reports/tiny.toml", "--jobs", "2"]).args(SLOW).current_dir(p.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        assert_store_objects_whole(p.path());
    }
    let v = run_json(p.path(), &SLOW);
    let (planned, cached, ran, failed) = cells(&v);
    assert_eq!(failed, 0, "{v}");
    assert_eq!(cached + ran, planned);
    // Identical to a run that was never interrupted.
    let clean = project("faults-clean");
    run_json(clean.path(), &SLOW);
    assert!(results(p.path()) == results(clean.path()), "resumed report differs from a clean one");
    // Nothing left in the store's temporary folder that a later run could mistake for data.
    let out = reprise(p.path(), &["verify", "reports/tiny.toml", SLOW[0], SLOW[1]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn flipped_or_truncated_store_files_are_detected_and_recomputed() {
    let p = project("faults-damage");
    run_json(p.path(), &[]);
    let before = results(p.path());
    let store = p.path().join("artifacts/store");
    // Truncate every cell record and flip a byte in every object: each must be detected.
    for f in walk(&store.join("cells")) {
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    }
    for f in walk(&store.join("objects")) {
        let mut bytes = std::fs::read(&f).unwrap();
        let i = bytes.len() / 3;
        bytes[i] ^= 0x01;
        std::fs::write(&f, bytes).unwrap();
    }
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (planned, cached, ran, _) = cells(&v);
    assert_eq!((cached, ran), (0, planned), "every cell recomputed: {v}");
    assert!(results(p.path()) == before, "recomputed report differs");
    assert_store_objects_whole(p.path());

    // A truncated object alone (record intact) is caught on read as well.
    let victim = walk(&store.join("objects")).into_iter().max_by_key(|f| std::fs::metadata(f).unwrap().len()).unwrap();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 1]).unwrap();
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--json"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt cache object"));
    assert!(results(p.path()) == before);
}

#[test]
fn two_runs_at_once_compute_each_cell_once_and_agree() {
    let p = project("faults-concurrent");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_reprise"))
            .args(["run", "reports/tiny.toml", "--json", "--jobs", "2"])
            .args(SLOW)
            .current_dir(p.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    let (pa, _, ra, fa) = cells(&va);
    let (_, _, rb, fb) = cells(&vb);
    assert_eq!((fa, fb), (0, 0));
    assert_eq!(ra + rb, pa, "each cell computed exactly once across both runs: {va} {vb}");
    assert_store_objects_whole(p.path());
    let clean = project("faults-concurrent-clean");
    run_json(clean.path(), &SLOW);
    assert!(results(p.path()) == results(clean.path()));
}

#[test]
fn unwritable_cache_is_a_clear_error_with_nothing_left_behind() {
    let p = project("faults-unwritable");
    let blocker = p.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let cache = blocker.join("store");
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--cache", cache.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not writable") && err.contains("a-file"), "{err}");
    assert!(!p.path().join("artifacts/tiny").exists(), "no report was half-written");
}

#[test]
fn full_cache_is_a_clear_error_with_nothing_half_written() {
    let p = project("faults-full");
    let mnt = p.path().join("small-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    // A 256 KiB filesystem: the cached data set alone (≈460 KB) cannot fit.
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&mnt).status().is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--cache", mnt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let tmp_left: Vec<_> = walk(&mnt.join("tmp"));
    let objects: Vec<_> = walk(&mnt.join("objects"));
    let whole = objects.iter().all(|f| f.file_name().unwrap().to_string_lossy() == sha256(f));
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device") || err.contains("space"), "{err}");
    assert!(tmp_left.is_empty(), "temporary files left: {tmp_left:?}");
    assert!(whole, "a partial object was left in place");
}

#[test]
fn a_diverging_run_is_recorded_as_failed_and_the_report_still_renders() {
    let p = project("faults-nan");
    // An absurd learning rate and weight decay for one experiment only: the loss becomes NaN.
    let v = run_json(p.path(), &DIVERGE);
    let (_, _, _, failed) = cells(&v);
    assert!(failed >= 1, "{v}");
    let reasons: Vec<String> = v["failures"].as_array().unwrap().iter().map(|f| f["reason"].as_str().unwrap().to_string()).collect();
    assert!(reasons.iter().any(|r| r.contains("diverged")), "{reasons:?}");
    let md = std::fs::read_to_string(p.path().join("artifacts/tiny/report.md")).unwrap();
    assert!(md.contains("## Failed runs") && md.contains("diverged"), "{md}");
    // The other experiment is unaffected: its table has numbers.
    assert!(!md.contains("| 1.0 | failed"), "{md}");
    // A failure is a result: cached like one.
    let again = run_json(p.path(), &DIVERGE);
    assert_eq!(cells(&again).2, 0);
}
