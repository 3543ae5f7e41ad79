//! `reprise fetch` end to end: the tiny project's data file served from loopback, fetched for a
//! profile, a corrupted copy refused, and an unpinned file pinned only with `--pin`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{project, reprise};

/// Serves `body` at every path on 127.0.0.1 (one byte flipped while `corrupt` is set); returns
/// the base address.
fn serve(body: Vec<u8>, corrupt: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let mut body = body.clone();
            if corrupt.load(Ordering::SeqCst) {
                body[100] ^= 1;
            }
            let _ = stream.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    addr
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The tiny project with its data file removed and the manifest's file given `url`.
fn without_data(url: &str, sha256: Option<&str>) -> (tempfile::TempDir, Vec<u8>) {
    let dir = project("fetch");
    let data = dir.path().join("data/optdigits_8x8.csv.gz");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::remove_file(&data).unwrap();
    let manifest = dir.path().join("data-manifests/optdigits-8x8.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap().replace("role = \"all\"", &format!("role = \"all\"\nurl = \"{url}\""));
    if let Some(hash) = sha256 {
        let at = text.find("sha256 = \"").unwrap() + "sha256 = \"".len();
        text.replace_range(at..at + 64, hash);
    }
    std::fs::write(&manifest, text).unwrap();
    (dir, bytes)
}

fn data_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("data")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn fetch_downloads_a_profiles_data_and_refuses_a_corrupted_copy() {
    let corrupt = Arc::new(AtomicBool::new(true));
    let bytes = std::fs::read(common::repo().join("data/optdigits_8x8.csv.gz")).unwrap();
    let url = format!("{}/optdigits_8x8.csv.gz", serve(bytes.clone(), corrupt.clone()));
    let (dir, _) = without_data(&url, None);

    let out = reprise(dir.path(), &["fetch", "reports/tiny.toml", "--profile", "long"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&url) && stderr(&out).contains("sha256 mismatch"), "{}", stderr(&out));
    assert_eq!(data_files(dir.path()), Vec::<String>::new(), "the corrupted download was kept");

    corrupt.store(false, Ordering::SeqCst);
    let out = reprise(dir.path(), &["fetch", "reports/tiny.toml", "--profile", "long"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("fetched  data/optdigits_8x8.csv.gz"), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("data/optdigits_8x8.csv.gz")).unwrap(), bytes);
    assert_eq!(data_files(dir.path()), vec!["optdigits_8x8.csv.gz"]);

    let out = reprise(dir.path(), &["fetch", "reports/tiny.toml", "--profile", "long"]);
    assert!(out.status.success() && stderr(&out).contains("ok       data/optdigits_8x8.csv.gz"), "{}", stderr(&out));
}

#[test]
fn fetch_pins_an_unpinned_file_only_with_pin() {
    let bytes = std::fs::read(common::repo().join("data/optdigits_8x8.csv.gz")).unwrap();
    let url = format!("{}/optdigits_8x8.csv.gz", serve(bytes.clone(), Arc::new(AtomicBool::new(false))));
    let (dir, _) = without_data(&url, Some("unpinned"));
    let manifest = dir.path().join("data-manifests/optdigits-8x8.toml");

    let out = reprise(dir.path(), &["fetch", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--pin"), "{}", stderr(&out));
    assert!(data_files(dir.path()).is_empty());
    assert!(std::fs::read_to_string(&manifest).unwrap().contains("sha256 = \"unpinned\""));

    let out = reprise(dir.path(), &["fetch", "reports/tiny.toml", "--pin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hash = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";
    assert!(std::fs::read_to_string(&manifest).unwrap().contains(&format!("sha256 = \"{hash}\"")));
    assert_eq!(std::fs::read(dir.path().join("data/optdigits_8x8.csv.gz")).unwrap(), bytes);
}
