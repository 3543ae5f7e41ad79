//! Property test: mutated specs, manifests and data files give errors, never panics.
//!
//! Seeded mutations (byte flips, truncations, insertions, deletions, token swaps) of valid
//! inputs, for a bounded number of cases and seconds per target, so CI runs it every time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reprise::data::{load_cifar, load_csv, load_idx, load_parquet_images, CifarVariant, CsvLayout, Manifest};
use reprise::rng::Rng;

const CASES: usize = 400;
const BUDGET: Duration = Duration::from_secs(8);

/// One random mutation of `input`.
fn mutate(rng: &mut Rng, input: &[u8], tokens: &[&[u8]]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(rng.next_u64() as u8);
            continue;
        }
        match rng.below(6) {
            0 => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.truncate(rng.below(v.len())),
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next_u64() as u8);
            }
            3 => {
                let i = rng.below(v.len());
                let j = (i + 1 + rng.below(16)).min(v.len());
                v.drain(i..j);
            }
            4 if !tokens.is_empty() => {
                let i = rng.below(v.len() + 1);
                let t = tokens[rng.below(tokens.len())];
                v.splice(i..i, t.iter().copied());
            }
            _ => {
                let i = rng.below(v.len());
                let j = rng.below(v.len());
                v.swap(i, j);
            }
        }
    }
    v
}

/// Run `f` on mutations of `input`; return the inputs that panicked.
fn fuzz(name: &str, seed: u64, input: &[u8], tokens: &[&[u8]], f: impl Fn(&[u8])) -> usize {
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut panics = 0;
    let mut cases = 0;
    while cases < CASES && start.elapsed() < BUDGET {
        let m = mutate(&mut rng, input, tokens);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&m))).is_err() {
            panics += 1;
            eprintln!("{name}: panic on case {cases} ({} bytes)", m.len());
        }
        cases += 1;
    }
    eprintln!("{name}: {cases} cases, {panics} panics");
    panics
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(tag).tempdir().unwrap()
}

#[test]
fn mutated_specs_never_panic() {
    let root = repo();
    let tokens: &[&[u8]] = &[b"[", b"]", b"=", b"\"", b"{", b"}", b",", b"\n", b"[[tables]]\n", b"grid = {", b"1e999", b"-1", b"nan", b"\xff", b"\"\"\"", b"experiments.", b"."];
    let mut panics = 0;
    for (i, spec) in ["reports/neural-collapse.toml", "tests/fixtures/tiny/reports/tiny.toml"].iter().enumerate() {
        let text = std::fs::read(root.join(spec)).unwrap();
        panics += fuzz(spec, 11 + i as u64, &text, tokens, |bytes| {
            let text = String::from_utf8_lossy(bytes);
            let _ = reprise::spec::parse(&text, Path::new("reports/x.toml"), &root, "quick", &[]);
            let _ = reprise::spec::parse(&text, Path::new("reports/x.toml"), &root, "paper", &["defaults.epochs=2".into(), "experiments.exp2.grid.imbalance=[0.5]".into()]);
        });
    }
    // Mutated overrides on a valid spec.
    let text = std::fs::read_to_string(root.join("tests/fixtures/tiny/reports/tiny.toml")).unwrap();
    panics += fuzz("--set", 17, b"experiments.imb.grid.imbalance=[1.0, 0.1]", &[b"=", b".", b"[", b"\""], |bytes| {
        let set = String::from_utf8_lossy(bytes).to_string();
        let _ = reprise::spec::parse(&text, Path::new("reports/x.toml"), &root, "quick", &[set]);
    });
    assert_eq!(panics, 0);
}

#[test]
fn mutated_manifests_never_panic() {
    let text = std::fs::read(repo().join("data-manifests/cifar10.toml")).unwrap();
    let panics = fuzz("manifest", 23, &text, &[b"kind = \"idx\"", b"sha256", b"[[files]]\n", b"\""], |bytes| {
        let _ = Manifest::from_toml_str(&String::from_utf8_lossy(bytes), Path::new("data-manifests/x.toml"));
    });
    assert_eq!(panics, 0);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn mutated_data_files_never_panic() {
    let dir = scratch("fuzz-data");
    let mut panics = 0;

    // csv.gz: three 2×2 images.
    let csv = b"0,1,2,3,0\n4,5,6,7,1\n8,9,10,11,2\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(csv).unwrap();
    let gz = gz.finish().unwrap();
    let layout = CsvLayout { channels: 1, height: 2, width: 2, max_value: 16.0 };
    for (name, input) in [("x.csv", csv.to_vec()), ("x.csv.gz", gz)] {
        panics += fuzz(name, 31, &input, &[b",", b"\n", b"-", b"1e9"], |bytes| {
            let p = write(dir.path(), name, bytes);
            let _ = load_csv(&p, &layout);
        });
    }

    // MNIST IDX: two 2×3 images and their labels.
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    images.extend(0u8..12);
    let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 7, 3];
    panics += fuzz("idx images", 37, &images, &[], |bytes| {
        let i = write(dir.path(), "i.idx", bytes);
        let l = write(dir.path(), "l.idx", &labels);
        let _ = load_idx(&i, &l);
    });
    panics += fuzz("idx labels", 41, &labels, &[], |bytes| {
        let i = write(dir.path(), "i2.idx", &images);
        let l = write(dir.path(), "l2.idx", bytes);
        let _ = load_idx(&i, &l);
    });

    // CIFAR-10 and CIFAR-100 records.
    let mut c10 = Vec::new();
    for k in 0..3u8 {
        c10.push(k);
        c10.extend(std::iter::repeat_n(k * 7, 3072));
    }
    panics += fuzz("cifar10", 43, &c10, &[], |bytes| {
        let p = write(dir.path(), "c10.bin", bytes);
        let _ = load_cifar(&[p], CifarVariant::Cifar10);
    });
    let mut c100 = Vec::new();
    for k in 0..2u8 {
        c100.extend([k, k + 50]);
        c100.extend(std::iter::repeat_n(k, 3072));
    }
    panics += fuzz("cifar100", 47, &c100, &[], |bytes| {
        let p = write(dir.path(), "c100.bin", bytes);
        let _ = load_cifar(&[p], CifarVariant::Cifar100Fine);
    });

    // Parquet with PNG bytes.
    let pq = parquet_with_png(dir.path());
    panics += fuzz("parquet", 53, &pq, &[b"PAR1", b"\x89PNG"], |bytes| {
        let p = write(dir.path(), "x.parquet", bytes);
        let _ = load_parquet_images(&p, "image", "label", Some((4, 4)));
    });
    assert_eq!(panics, 0);
}

/// A valid parquet file: a binary column of 4×4 grey PNGs and an integer label column.
fn parquet_with_png(dir: &Path) -> Vec<u8> {
    use polars::prelude::*;
    let mut pngs: Vec<Vec<u8>> = Vec::new();
    for k in 0..3u8 {
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, 4, 4);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[k * 20; 16]).unwrap();
        }
        pngs.push(buf);
    }
    let images = Column::new("image".into(), pngs.iter().map(|b| b.as_slice()).collect::<Vec<&[u8]>>());
    let labels = Column::new("label".into(), vec![0i64, 1, 2]);
    let mut df = DataFrame::new_infer_height(vec![images, labels]).unwrap();
    let path = dir.join("valid.parquet");
    ParquetWriter::new(std::fs::File::create(&path).unwrap()).finish(&mut df).unwrap();
    std::fs::read(path).unwrap()
}

/// Every file below `dir` with its bytes (what must not change outside the project).
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p.clone());
                out.insert(p, Vec::new());
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// Run the binary; it must end with one of its exit codes, never a panic or a signal.
fn run_bin(cwd: &Path, args: &[&str], store: &Path) -> i32 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reprise")).args(args).current_dir(cwd).env("REPRISE_CACHE", store).env_remove("REPRISE_WAIT").output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!([0, 1, 2].contains(&code), "{args:?} ended with {:?}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    code
}

/// Ids, profile names, the template and manifest names, and lock files rewritten with paths
/// that point elsewhere (relative, absolute, through a symlink): nothing is read from or
/// written to outside the project and its store.
#[test]
fn hostile_paths_in_specs_and_locks_stay_inside_the_project() {
    let base = scratch("fuzz-paths");
    let proj = base.path().join("proj");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    const SECRET: &str = "SECRET-OUTSIDE-THE-PROJECT";
    std::fs::write(outside.join("secret.md.j2"), format!("{SECRET}\n")).unwrap();
    std::fs::write(outside.join("secret.toml"), format!("# {SECRET}\n")).unwrap();
    for sub in ["reports", "templates", "data-manifests", "data"] {
        std::fs::create_dir_all(proj.join(sub)).unwrap();
    }
    let fx = repo().join("tests/fixtures/tiny");
    std::fs::copy(fx.join("templates/tiny.md.j2"), proj.join("templates/tiny.md.j2")).unwrap();
    std::fs::copy(repo().join("templates/base.html.j2"), proj.join("templates/base.html.j2")).unwrap();
    std::fs::copy(repo().join("data-manifests/optdigits-8x8.toml"), proj.join("data-manifests/optdigits-8x8.toml")).unwrap();
    std::fs::copy(repo().join("data/optdigits_8x8.csv.gz"), proj.join("data/optdigits_8x8.csv.gz")).unwrap();
    // A symlink inside templates/ that leads out of it.
    std::os::unix::fs::symlink(outside.join("secret.md.j2"), proj.join("templates/link.md.j2")).unwrap();
    let store = proj.join("artifacts/store");
    let spec = std::fs::read_to_string(fx.join("reports/tiny.toml")).unwrap();
    let abs_target = base.path().join("abs-target");
    let abs = abs_target.to_string_lossy().to_string();
    let hostile: Vec<String> = vec!["../../outside/x".into(), "../../../outside/x".into(), format!("{abs}/x"), "a/../../x".into(), "..".into(), ".".into(), "x/y".into(), "x\\\\y".into()];
    // (what to replace in the spec, the replacement's template with {} for a hostile value)
    type Rewrite = Box<dyn Fn(&str) -> String>;
    let sites: Vec<(&str, Rewrite)> = vec![
        ("id = \"imb\"\nexperiment", Box::new(|h: &str| format!("id = \"{h}\"\nexperiment"))),
        ("id = \"drift\"\nexperiment = \"imb\"\nkind = \"line\"", Box::new(|h: &str| format!("id = \"{h}\"\nexperiment = \"imb\"\nkind = \"line\""))),
        ("id = \"drift\"\ntext", Box::new(|h: &str| format!("id = \"{h}\"\ntext"))),
        ("id = \"tiny\"", Box::new(|h: &str| format!("id = \"{h}\""))),
        ("[profiles.long]", Box::new(|h: &str| format!("[profiles.\"{h}\"]"))),
        ("[experiments.imb]", Box::new(|h: &str| format!("[experiments.\"{h}\"]"))),
        ("template = \"tiny.md.j2\"", Box::new(|h: &str| format!("template = \"{h}.md.j2\""))),
        ("manifest = \"optdigits-8x8\"", Box::new(|h: &str| format!("manifest = \"{h}\""))),
    ];
    let mut cases: Vec<(String, Option<String>)> = Vec::new();
    for (site, make) in &sites {
        for h in &hostile {
            cases.push((spec.replace(site, &make(h)), None));
        }
    }
    cases.push((spec.replace("template = \"tiny.md.j2\"", "template = \"link.md.j2\""), None));
    cases.push((spec.replace("template = \"tiny.md.j2\"", &format!("template = \"{}\"", outside.join("secret.md.j2").display())), None));
    cases.push((spec.replace("manifest = \"optdigits-8x8\"", "manifest = \"../../outside/secret\""), None));
    // Hostile profile names declared in the spec and chosen on the command line.
    for h in &hostile {
        cases.push((spec.replace("[profiles.long]", &format!("[profiles.\"{h}\"]")), Some(h.clone())));
    }
    let before = snapshot(&outside);
    let start = Instant::now();
    for (i, (text, profile)) in cases.iter().enumerate() {
        if start.elapsed() > Duration::from_secs(240) {
            eprintln!("stopped after {i} of {} cases (time budget)", cases.len());
            break;
        }
        std::fs::write(proj.join("reports/tiny.toml"), text).unwrap();
        let mut args = vec!["run", "reports/tiny.toml"];
        if let Some(p) = profile {
            args.extend(["--profile", p]);
        }
        let code = run_bin(&proj, &args, &store);
        eprintln!("case {i}: run exited {code}");
        run_bin(&proj, &["verify", "reports/tiny.toml"], &store);
        assert_eq!(snapshot(&outside), before, "case {i} changed a file outside the project");
        assert!(!abs_target.exists(), "case {i} wrote to {abs}");
        let names: Vec<_> = std::fs::read_dir(base.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
        assert!(names.iter().all(|n| n == "proj" || n == "outside"), "case {i} wrote beside the project: {names:?}");
        for (p, bytes) in snapshot(&proj.join("artifacts")) {
            assert!(!String::from_utf8_lossy(&bytes).contains(SECRET), "case {i}: {} holds a file read from outside the project", p.display());
        }
    }

    // A valid report, then its lock file mutated with hostile names: verify reads and writes
    // nothing outside the project and never panics.
    std::fs::write(proj.join("reports/tiny.toml"), &spec).unwrap();
    assert_eq!(run_bin(&proj, &["run", "reports/tiny.toml"], &store), 0);
    let lock_path = proj.join("artifacts/tiny/lock.json");
    let lock = std::fs::read(&lock_path).unwrap();
    let tokens: Vec<Vec<u8>> = hostile.iter().map(|h| format!("\"{h}\"").into_bytes()).chain([b"\"../../outside/secret.md.j2\": \"00\",".to_vec(), b"\"name\": \"../x\"".to_vec()]).collect();
    let token_refs: Vec<&[u8]> = tokens.iter().map(|t| t.as_slice()).collect();
    let mut rng = Rng::new(59);
    let start = Instant::now();
    let mut n = 0;
    while n < 60 && start.elapsed() < Duration::from_secs(60) {
        std::fs::write(&lock_path, mutate(&mut rng, &lock, &token_refs)).unwrap();
        run_bin(&proj, &["verify", "reports/tiny.toml"], &store);
        assert_eq!(snapshot(&outside), before, "a mutated lock file changed a file outside the project");
        n += 1;
    }
    eprintln!("lock files: {n} cases");
}
