//! The remote store and the SLURM executor against real services on loopback (issue 26): an
//! S3-compatible server (`REPRISE_TEST_S3=http://127.0.0.1:PORT`, with a bucket `reprise-test`;
//! `.ci/s3-server.sh` starts moto's) and a single-node SLURM cluster (`REPRISE_TEST_SLURM=1`;
//! `.ci/slurm-cluster.sh` starts one). Without the variable a test says what it skipped and
//! passes; with it, an unreachable service is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use reprise::cache::{sha256_hex, CellRecord, CellStatus, RecordCheck, S3Options, S3Store, S3Url, Store, StoreError};

const BUCKET: &str = "reprise-test";
/// Training long enough that a run can be killed in its middle.
const SLOW: [&str; 2] = ["--set", "defaults.epochs=40"];

/// Say what was skipped, past the test harness's capture (which would hide it on success).
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped {what}");
}

/// The S3 endpoint, or `None` (and a line saying so) when the tests are not enabled.
fn s3_endpoint(test: &str) -> Option<String> {
    match std::env::var("REPRISE_TEST_S3") {
        Ok(e) if !e.is_empty() => Some(e),
        _ => {
            skipped(&format!("{test}: set REPRISE_TEST_S3=http://127.0.0.1:PORT to an S3-compatible server with a bucket `{BUCKET}` (`.ci/s3-server.sh` starts one)"));
            None
        }
    }
}

fn slurm_enabled(test: &str) -> bool {
    let on = std::env::var("REPRISE_TEST_SLURM").is_ok_and(|v| !v.is_empty());
    if !on {
        skipped(&format!(
            "{test}: set REPRISE_TEST_SLURM=1 with a SLURM cluster whose sbatch, squeue and scontrol are on PATH and whose node sees this folder (`.ci/slurm-cluster.sh` starts one on loopback)"
        ));
    }
    on
}

/// The variables the binary reads to reach the test server.
fn s3_vars(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

/// A fresh prefix of the test bucket, so tests never share a store.
fn fresh_url(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("s3://{BUCKET}/{name}-{}-{nanos}", std::process::id())
}

fn options(endpoint: &str, mirror: &Path) -> S3Options {
    let mut o = S3Options::with_mirror(mirror.to_path_buf());
    o.settings = s3_vars(endpoint).into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    o.poll = Duration::from_millis(100);
    o
}

/// A client of the test bucket of its own, to damage what the store wrote.
fn raw(endpoint: &str) -> (AmazonS3, tokio::runtime::Runtime) {
    let s3 = AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    (s3, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn reprise_s3(cwd: &Path, endpoint: &str, args: &[&str]) -> Output {
    let vars = s3_vars(endpoint);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    reprise_env(cwd, args, &vars)
}

fn ok(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Every file of a report's folder (frames, lock, rendering, figures), by relative path.
fn report_files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = root.join("artifacts/tiny");
    let mut files: Vec<(PathBuf, Vec<u8>)> = walk(&dir).into_iter().map(|p| (p.strip_prefix(&dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap())).collect();
    files.sort();
    files
}

fn assert_same_report(a: &Path, b: &Path) {
    let (fa, fb) = (report_files(a), report_files(b));
    let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb));
    assert!(fa.iter().any(|(p, _)| p.ends_with("lock.json")) && fa.iter().any(|(p, _)| p.starts_with("frames")));
    for ((p, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "{} differs from the local run's", p.display());
    }
}

fn record(key: &str, outputs: &[(&str, &str)], seconds: f64) -> CellRecord {
    CellRecord { key: key.into(), kind: "train".into(), status: CellStatus::Ok, reason: None, outputs: outputs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), seconds }
}

#[test]
fn issue26_s3_store_keeps_the_local_stores_guarantees() {
    let Some(endpoint) = s3_endpoint("issue26_s3_store_keeps_the_local_stores_guarantees") else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = S3Url::parse(&fresh_url("guarantees")).unwrap();
    let opts = options(&endpoint, &dir.path().join("mirror"));
    let s = S3Store::open(&url, &opts).unwrap();
    let (raw, rt) = raw(&endpoint);
    let at = |rel: &str| ObjPath::from(format!("{}/{rel}", url.prefix));

    // The server honours create-only writes: what records rely on.
    let probe = at("probe");
    let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
    rt.block_on(raw.put_opts(&probe, PutPayload::from(b"1".to_vec()), create())).unwrap();
    let again = rt.block_on(raw.put_opts(&probe, PutPayload::from(b"2".to_vec()), create()));
    assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");
    assert_eq!(rt.block_on(async { raw.get(&probe).await.unwrap().bytes().await.unwrap() }).as_ref(), b"1");

    // Objects are named by their sha256 and read back verified, through the mirror.
    let h = s.put(b"hello").unwrap();
    assert_eq!(h, sha256_hex(b"hello"));
    assert!(s.contains(&h));
    assert_eq!(s.get(&h).unwrap().as_deref(), Some(&b"hello"[..]));
    assert!(s.mirror().object_path(&h).is_file(), "a read or write keeps the object locally");

    // A corrupted remote object (not in the mirror) is reported, removed and a miss.
    let obj = at(&format!("objects/{}/{h}", &h[..2]));
    rt.block_on(raw.put(&obj, PutPayload::from(b"hellp".to_vec()))).unwrap();
    std::fs::remove_file(s.mirror().object_path(&h)).unwrap();
    assert_eq!(s.get(&h).unwrap(), None);
    let c = s.take_corruptions();
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].expected.as_str(), c[0].path.display().to_string()), (h.as_str(), format!("{url}/objects/{}/{h}", &h[..2])));
    assert!(!s.contains(&h), "the corrupt object was deleted");
    // A corrupted mirror copy is caught the same way, and the good remote copy used.
    s.put(b"hello").unwrap();
    std::fs::write(s.mirror().object_path(&h), b"hellp").unwrap();
    assert_eq!(s.get(&h).unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(s.take_corruptions().len(), 1);

    // Records are written once: the first writer's stays.
    let key = "a".repeat(64);
    let first = record(&key, &[("x", &h)], 1.5);
    s.put_record(&first).unwrap();
    s.put_record(&record(&key, &[("x", &h)], 2.5)).unwrap();
    assert_eq!(s.get_record(&key).unwrap(), Some(first.clone()));
    assert_eq!(s.check_record(&key).unwrap(), RecordCheck::Intact(first.clone()));
    // ...unless it lost an output: then the newer one replaces it.
    let gone = "f".repeat(64);
    let key2 = "b".repeat(64);
    s.put_record(&record(&key2, &[("x", &gone)], 1.0)).unwrap();
    assert_eq!(s.get_record(&key2).unwrap(), None, "an output is missing");
    s.put_record(&record(&key2, &[("x", &h)], 2.0)).unwrap();
    assert_eq!(s.get_record(&key2).unwrap().map(|r| r.seconds), Some(2.0));
    // A damaged record is reported by check_record without being removed, then removed by a lookup.
    let rec = at(&format!("cells/{key}.json"));
    let text = rt.block_on(async { raw.get(&rec).await.unwrap().bytes().await.unwrap() });
    let damaged = String::from_utf8(text.to_vec()).unwrap().replace("1.5", "9.5");
    rt.block_on(raw.put(&rec, PutPayload::from(damaged.into_bytes()))).unwrap();
    assert!(matches!(s.check_record(&key).unwrap(), RecordCheck::Corrupt(_)));
    assert_eq!(s.get_record(&key).unwrap(), None);
    assert_eq!(s.take_corruptions().len(), 1);
    assert_eq!(s.check_record(&key).unwrap(), RecordCheck::Absent);

    // Listing, run notes and removal see only the store's own names.
    rt.block_on(raw.put(&at("objects/ab/notes.txt"), PutPayload::from(b"x".to_vec()))).unwrap();
    assert_eq!(s.list_objects().unwrap(), vec![h.clone()]);
    assert_eq!(s.list_records().unwrap(), vec![key2.clone()]);
    s.note_run("r", std::slice::from_ref(&key2), std::slice::from_ref(&h)).unwrap();
    assert_eq!(s.recent_references().unwrap(), (vec![key2.clone()], vec![h.clone()]));
    assert_eq!(s.remove_object(&h).unwrap(), 5);
    assert!(!s.contains(&h));

    // gc is refused while the store is open elsewhere, and works once it is not.
    let gc = S3Store::open_exclusive(&url, &opts);
    assert!(matches!(gc, Err(StoreError::InUse { .. })), "{:?}", gc.err());
    drop(s);
    drop(S3Store::open_exclusive(&url, &opts).unwrap());

    // A prefix holding anything but a store is refused and left alone.
    let foreign = S3Url::parse(&fresh_url("foreign")).unwrap();
    rt.block_on(raw.put(&ObjPath::from(format!("{}/letter.txt", foreign.prefix)), PutPayload::from(b"mine".to_vec()))).unwrap();
    let err = S3Store::open(&foreign, &opts).err().unwrap();
    assert!(matches!(err, StoreError::NotAStore { .. }) && err.to_string().contains("`letter.txt`"), "{err}");
    assert!(S3Store::open_existing(&S3Url::parse(&fresh_url("absent")).unwrap(), &opts).unwrap().is_none(), "nothing is created by a look");
}

#[test]
fn issue26_s3_cell_leases_exclude_each_other_and_a_dead_holders_is_taken_over() {
    let Some(endpoint) = s3_endpoint("issue26_s3_cell_leases_exclude_each_other_and_a_dead_holders_is_taken_over") else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = S3Url::parse(&fresh_url("leases")).unwrap();
    let opts = options(&endpoint, &dir.path().join("mirror"));
    let s = S3Store::open(&url, &opts).unwrap();
    let key = "c".repeat(64);
    let held = s.lock(&key).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _second = s.lock(&key).unwrap();
            tx.send(Instant::now()).unwrap();
        });
        std::thread::sleep(Duration::from_millis(1500));
        assert!(rx.try_recv().is_err(), "a second holder got the lease while the first held it");
        let released = Instant::now();
        drop(held);
        assert!(rx.recv_timeout(Duration::from_secs(20)).unwrap() >= released);
    });
    // A lease left by a process of this host that is gone is taken over at once.
    let (raw, rt) = raw(&endpoint);
    let mut child = Command::new("sleep").arg("0").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let note = format!("{{\"host\": {:?}, \"pid\": {dead}, \"expires\": 99999999999}}", hostname());
    let lease = ObjPath::from(format!("{}/locks/{key}.lock", url.prefix));
    rt.block_on(raw.put(&lease, PutPayload::from(note.clone().into_bytes()))).unwrap();
    // A run's start (and gc) removes it...
    assert_eq!(s.clean_tmp(), 1);
    assert!(rt.block_on(raw.head(&lease)).is_err());
    // ...and a run that meets it takes it over.
    rt.block_on(raw.put(&lease, PutPayload::from(note.into_bytes()))).unwrap();
    let start = Instant::now();
    drop(s.lock(&key).unwrap());
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

#[test]
fn issue26_a_report_runs_into_s3_and_comes_out_as_a_local_runs() {
    let Some(endpoint) = s3_endpoint("issue26_a_report_runs_into_s3_and_comes_out_as_a_local_runs") else { return };
    let local = project("remote-local");
    run_json(local.path(), &[]);
    let p = project("remote-s3");
    let url = fresh_url("e2e");
    let v = ok(&reprise_s3(p.path(), &endpoint, &["run", "reports/tiny.toml", "--json", "--jobs", "2", "--cache", &url]));
    let (planned, cached, ran, failed) = cells(&v);
    assert_eq!((cached, ran, failed), (0, planned, 0), "{v}");
    assert_same_report(local.path(), p.path());

    // Again: every cell from the store, the report unchanged.
    let v = ok(&reprise_s3(p.path(), &endpoint, &["run", "reports/tiny.toml", "--json", "--cache", &url]));
    assert_eq!(cells(&v).1, planned, "{v}");
    assert_same_report(local.path(), p.path());

    // A second machine (a fresh copy of the project, an empty mirror) renders from the store
    // alone, keeping what it downloads: with the remote objects then damaged, a second
    // render still succeeds from the mirror without a warning.
    let q = project("remote-s3-other");
    let out = reprise_s3(q.path(), &endpoint, &["render", "reports/tiny.toml", "--cache", &url]);
    ok(&out);
    assert_same_report(local.path(), q.path());
    let mirror = q.path().join("artifacts/remote-cache").join(url.trim_start_matches("s3://"));
    let mirrored: Vec<PathBuf> = walk(&mirror.join("objects"));
    assert!(!mirrored.is_empty());
    let (raw, rt) = raw(&endpoint);
    let prefix = url.trim_start_matches(&format!("s3://{BUCKET}/")).to_string();
    for m in &mirrored {
        let h = m.file_name().unwrap().to_str().unwrap();
        rt.block_on(raw.put(&ObjPath::from(format!("{prefix}/objects/{}/{h}", &h[..2])), PutPayload::from(b"damaged".to_vec()))).unwrap();
    }
    let out = reprise_s3(q.path(), &endpoint, &["render", "reports/tiny.toml", "--cache", &url]);
    ok(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("corrupt"), "{}", String::from_utf8_lossy(&out.stderr));
    // The first copy's mirror was emptied: its run finds the damage, reports it and recomputes.
    std::fs::remove_dir_all(p.path().join("artifacts/remote-cache")).unwrap();
    let out = reprise_s3(p.path(), &endpoint, &["run", "reports/tiny.toml", "--json", "--cache", &url]);
    let v = ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt cache object s3://"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cells(&v).3, 0, "{v}");
    assert_same_report(local.path(), p.path());

    // verify and gc work against the remote store.
    ok(&reprise_s3(p.path(), &endpoint, &["verify", "reports/tiny.toml", "--cache", &url]));
    let out = reprise_s3(p.path(), &endpoint, &["gc", "--cache", &url]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed 0 objects"), "{}", String::from_utf8_lossy(&out.stderr));
    let v = ok(&reprise_s3(p.path(), &endpoint, &["run", "reports/tiny.toml", "--json", "--cache", &url]));
    assert_eq!(cells(&v).1, planned, "gc kept every object the report needs: {v}");
}

#[test]
fn issue26_two_runs_on_one_s3_store_at_once_agree_and_a_killed_run_resumes() {
    let Some(endpoint) = s3_endpoint("issue26_two_runs_on_one_s3_store_at_once_agree_and_a_killed_run_resumes") else { return };
    let local = project("remote-local-slow");
    run_json(local.path(), &SLOW);
    let p = project("remote-twice");
    let url = fresh_url("twice");
    let spawn = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_reprise"));
        c.args(["run", "reports/tiny.toml", "--json", "--jobs", "2", "--cache", &url]).args(SLOW).current_dir(p.path()).env_remove("REPRISE_CACHE").stdout(Stdio::piped()).stderr(Stdio::piped());
        c.envs(s3_vars(&endpoint));
        c.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (va, vb) = (ok(&a), ok(&b));
    assert_eq!((cells(&va).3, cells(&vb).3), (0, 0), "{va} {vb}");
    assert_same_report(local.path(), p.path());

    // A run killed in its middle, twice, then run to the end: the clean report.
    let q = project("remote-killed");
    let url = fresh_url("killed");
    for delay in [700, 1600] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_reprise"));
        c.args(["run", "reports/tiny.toml", "--jobs", "2", "--cache", &url]).args(SLOW).current_dir(q.path()).env_remove("REPRISE_CACHE").stdout(Stdio::null()).stderr(Stdio::null());
        c.envs(s3_vars(&endpoint));
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
    }
    let start = Instant::now();
    let mut args = vec!["run", "reports/tiny.toml", "--json", "--jobs", "2", "--cache", &url];
    args.extend(SLOW);
    let v = ok(&reprise_s3(q.path(), &endpoint, &args));
    assert_eq!(cells(&v).3, 0, "{v}");
    assert!(start.elapsed() < Duration::from_secs(100), "the killed runs' leases were taken over, not waited out");
    assert_same_report(local.path(), q.path());
}

/// The tiny report with `--executor slurm` into `cache`: the same files as a local run, then a
/// rerun that submits nothing.
fn slurm_run_matches_local(cache_of: impl Fn(&Path) -> String, vars: &[(&str, &str)]) {
    let local = project("slurm-local");
    run_json(local.path(), &[]);
    let p = project("slurm-run");
    let cache = cache_of(p.path());
    let mut all: Vec<(&str, &str)> = vec![("REPRISE_SLURM_POLL", "0.5"), ("REPRISE_SLURM_GPUS", "0")];
    all.extend_from_slice(vars);
    let out = reprise_env(p.path(), &["run", "reports/tiny.toml", "--json", "--executor", "slurm", "--cache", &cache, "--time", "10"], &all);
    let v = ok(&out);
    let (planned, cached, ran, failed) = cells(&v);
    assert_eq!((cached, ran, failed), (0, planned, 0), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("slurm: submitted job"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_report(local.path(), p.path());
    let out = reprise_env(p.path(), &["run", "reports/tiny.toml", "--json", "--executor", "slurm", "--cache", &cache], &all);
    let v = ok(&out);
    assert_eq!(cells(&v).1, planned, "{v}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("submitted"), "a rerun submits nothing: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn issue26_slurm_runs_a_report_into_a_shared_folder_as_a_local_run_does() {
    if !slurm_enabled("issue26_slurm_runs_a_report_into_a_shared_folder_as_a_local_run_does") {
        return;
    }
    slurm_run_matches_local(|p| p.join("shared-store").display().to_string(), &[]);
}

#[test]
fn issue26_slurm_runs_a_report_into_s3_as_a_local_run_does() {
    if !slurm_enabled("issue26_slurm_runs_a_report_into_s3_as_a_local_run_does") {
        return;
    }
    let Some(endpoint) = s3_endpoint("issue26_slurm_runs_a_report_into_s3_as_a_local_run_does") else { return };
    let vars = s3_vars(&endpoint);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    slurm_run_matches_local(|_| fresh_url("slurm"), &vars);
}

#[test]
fn issue26_a_failed_slurm_task_is_named_with_its_job_and_log() {
    if !slurm_enabled("issue26_a_failed_slurm_task_is_named_with_its_job_and_log") {
        return;
    }
    let p = project("slurm-fail");
    // The data file the data cell reads is damaged: its task fails and leaves no record.
    let data = p.path().join("data/optdigits_8x8.csv.gz");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let cache = p.path().join("shared-store").display().to_string();
    let out = reprise_env(p.path(), &["run", "reports/tiny.toml", "--executor", "slurm", "--cache", &cache], &[("REPRISE_SLURM_POLL", "0.5")]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SLURM task ") && err.contains("left no record in the store; see its log ") && err.contains("artifacts/.slurm/tiny/"), "{err}");
    let log = err.split("see its log ").nth(1).unwrap().split_whitespace().next().unwrap();
    assert!(Path::new(log).is_file(), "{log}");
}
