//! Fetching against an HTTP server on loopback that each test starts itself: whole, truncated
//! and corrupted downloads, resume, pinning, and destinations that would leave the project.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::*;

/// How the server answers for one path.
#[derive(Clone, Default)]
struct Route {
    body: Vec<u8>,
    /// Announce the whole length but close after this many bytes, on the next request only.
    truncate_next: Option<usize>,
    /// Flip one byte of every answer.
    corrupt: bool,
    /// Ignore `Range` headers (answer 200 with the whole file).
    no_ranges: bool,
}

/// Each request's path and `Range` header, in order.
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A small HTTP/1.1 server on 127.0.0.1 that serves `Route`s, honours `Range: bytes=N-`, and
/// records each request's path and range header.
struct Server {
    addr: String,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    log: RequestLog,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let log: RequestLog = Arc::default();
        let (r, l) = (routes.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, l) = (r.clone(), l.clone());
                std::thread::spawn(move || serve(stream, &r, &l));
            }
        });
        Server { addr, routes, log }
    }

    fn route(&self, path: &str, route: Route) -> String {
        self.routes.lock().unwrap().insert(path.to_string(), route);
        format!("{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, routes: &Mutex<HashMap<String, Route>>, log: &Mutex<Vec<(String, Option<String>)>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push((path.clone(), range.clone()));
    let route = {
        let mut routes = routes.lock().unwrap();
        match routes.get_mut(&path) {
            Some(r) => {
                let out = r.clone();
                r.truncate_next = None;
                Some(out)
            }
            None => None,
        }
    };
    let mut out = stream;
    let Some(route) = route else {
        let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let mut body = route.body.clone();
    if route.corrupt {
        let mid = body.len() / 2;
        body[mid] ^= 0x5a;
    }
    let start = range.as_deref().filter(|_| !route.no_ranges).and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse::<usize>().ok());
    let (status, head, slice) = match start {
        Some(s) if s >= body.len() => {
            let _ = out.write_all(format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
            return;
        }
        Some(s) => ("206 Partial Content", format!("Content-Range: bytes {s}-{}/{}\r\n", body.len() - 1, body.len()), &body[s..]),
        None => ("200 OK", String::new(), &body[..]),
    };
    let sent = route.truncate_next.map_or(slice.len(), |n| n.min(slice.len()));
    let _ = out.write_all(format!("HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n", slice.len()).as_bytes());
    let _ = out.write_all(&slice[..sent]);
    let _ = out.flush();
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A project folder with `data-manifests/test.toml` naming `files` as (path, sha256, url).
fn project(files: &[(&str, &str, &str)]) -> (tempfile::TempDir, Manifest) {
    project_with(files, &[])
}

/// As [`project`], with `members[k]` (when given) as file `k`'s archive member.
fn project_with(files: &[(&str, &str, &str)], members: &[&str]) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data-manifests")).unwrap();
    let mut text = String::from(
        "# A test manifest; this comment must survive pinning.\nname = \"test\"\ndescription = \"d\"\nclasses = [\"a\", \"b\"]\nlicence = \"l\"\nsource = \"s\"\ncitation = \"c\"\n\n[format]\nkind = \"idx\"\n",
    );
    for (k, (path, hash, url)) in files.iter().enumerate() {
        text += &format!("\n[[files]]\npath = \"{path}\"\nsha256 = \"{hash}\"\nrole = \"r{}\"\nurl = \"{url}\"\n", path.len());
        if let Some(member) = members.get(k) {
            text += &format!("member = \"{member}\"\n");
        }
    }
    let path = dir.path().join("data-manifests/test.toml");
    std::fs::write(&path, text).unwrap();
    let m = Manifest::load(&path).unwrap();
    (dir, m)
}

fn quiet() -> FetchOptions {
    FetchOptions { pin: false, progress: false }
}

/// Every file under `dir`, relative, sorted (to see that nothing stray was left).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn downloads_every_file_checks_it_and_skips_what_is_there() {
    let server = Server::start();
    let (a, b) = (data(70_000, 1), data(1_000, 2));
    let ua = server.route("/a.bin", Route { body: a.clone(), ..Route::default() });
    let ub = server.route("/b.bin", Route { body: b.clone(), ..Route::default() });
    let (dir, m) = project(&[("data/x/a.bin", &sha(&a), &ua), ("data/b.bin", &sha(&b), &ub)]);
    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(out, vec![(PathBuf::from("data/x/a.bin"), Outcome::Fetched), (PathBuf::from("data/b.bin"), Outcome::Fetched)]);
    assert_eq!(std::fs::read(dir.path().join("data/x/a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.path().join("data/b.bin")).unwrap(), b);
    assert_eq!(files_under(&dir.path().join("data")), vec!["b.bin", "x/a.bin"]);
    m.verify(dir.path()).unwrap();
    // A second fetch downloads nothing.
    let requests = server.requests().len();
    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert!(out.iter().all(|(_, o)| *o == Outcome::Present), "{out:?}");
    assert_eq!(server.requests().len(), requests);
}

#[test]
fn a_truncated_download_is_not_placed_and_the_next_fetch_resumes_it() {
    let server = Server::start();
    let a = data(50_000, 3);
    let url = server.route("/a.bin", Route { body: a.clone(), truncate_next: Some(20_000), ..Route::default() });
    let (dir, m) = project(&[("data/a.bin", &sha(&a), &url)]);
    let e = fetch_manifest(dir.path(), &m, quiet()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, FetchError::Http { .. }) && text.contains(&url) && text.contains("resumes"), "{text}");
    assert!(!dir.path().join("data/a.bin").exists(), "a partial file under the final name");
    assert_eq!(std::fs::metadata(dir.path().join("data/.a.bin.part")).unwrap().len(), 20_000);

    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(out, vec![(PathBuf::from("data/a.bin"), Outcome::Fetched)]);
    assert_eq!(std::fs::read(dir.path().join("data/a.bin")).unwrap(), a);
    assert_eq!(files_under(&dir.path().join("data")), vec!["a.bin"]);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].1.as_deref(), Some("bytes=20000-"), "the second request asks for the rest only");
}

#[test]
fn a_server_that_ignores_ranges_sends_the_whole_file_again() {
    let server = Server::start();
    let a = data(30_000, 4);
    let url = server.route("/a.bin", Route { body: a.clone(), truncate_next: Some(10_000), no_ranges: true, ..Route::default() });
    let (dir, m) = project(&[("data/a.bin", &sha(&a), &url)]);
    fetch_manifest(dir.path(), &m, quiet()).unwrap_err();
    fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("data/a.bin")).unwrap(), a);
}

#[test]
fn a_corrupted_download_is_refused_and_leaves_no_file() {
    let server = Server::start();
    let a = data(40_000, 5);
    let url = server.route("/a.bin", Route { body: a.clone(), corrupt: true, ..Route::default() });
    let (dir, m) = project(&[("data/a.bin", &sha(&a), &url)]);
    let e = fetch_manifest(dir.path(), &m, quiet()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, FetchError::HashMismatch { .. }), "{text}");
    assert!(text.contains(&url) && text.contains(&sha(&a)), "{text}");
    assert_eq!(files_under(&dir.path().join("data")), Vec::<String>::new(), "nothing kept");
    // A corrupted part left by an earlier run is not trusted either: resuming onto it fails the
    // check, and the part is removed so that the next fetch starts afresh.
    server.route("/a.bin", Route { body: a.clone(), ..Route::default() });
    std::fs::write(dir.path().join("data/.a.bin.part"), data(10_000, 9)).unwrap();
    assert!(matches!(fetch_manifest(dir.path(), &m, quiet()), Err(FetchError::HashMismatch { .. })));
    assert!(!dir.path().join("data/a.bin").exists());
    fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("data/a.bin")).unwrap(), a);
}

#[test]
fn http_errors_and_unreachable_servers_name_the_url() {
    let server = Server::start();
    let missing = format!("{}/missing.bin", server.addr);
    let (dir, m) = project(&[("data/a.bin", &sha(b"x"), &missing)]);
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains(&missing) && text.contains("404"), "{text}");
    // A port nothing listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/a.bin", l.local_addr().unwrap())
    };
    let (dir, m) = project(&[("data/a.bin", &sha(b"x"), &closed)]);
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains(&closed), "{text}");
    assert!(!dir.path().join("data/a.bin").exists());
}

#[test]
fn unpinned_files_are_fetched_and_pinned_only_on_request() {
    let server = Server::start();
    let a = data(5_000, 6);
    let url = server.route("/a.bin", Route { body: a.clone(), ..Route::default() });
    let (dir, m) = project(&[("data/a.bin", "unpinned", &url)]);
    let before = std::fs::read_to_string(&m.path).unwrap();
    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(out, vec![(PathBuf::from("data/a.bin"), Outcome::Unpinned)]);
    assert!(server.requests().is_empty() && !dir.path().join("data/a.bin").exists());
    assert_eq!(std::fs::read_to_string(&m.path).unwrap(), before);

    let out = fetch_manifest(dir.path(), &m, FetchOptions { pin: true, progress: false }).unwrap();
    assert_eq!(out, vec![(PathBuf::from("data/a.bin"), Outcome::Pinned(sha(&a)))]);
    let after = std::fs::read_to_string(&m.path).unwrap();
    assert!(after.starts_with("# A test manifest; this comment must survive pinning.") && after.contains(&format!("sha256 = \"{}\"", sha(&a))), "{after}");
    let pinned = Manifest::load(&m.path).unwrap();
    assert_eq!(pinned.files[0].sha256, sha(&a));
    pinned.verify(dir.path()).unwrap();
    assert_eq!(files_under(&dir.path().join("data-manifests")), vec!["test.toml"]);
}

#[test]
fn a_file_already_there_with_other_bytes_is_left_alone() {
    let server = Server::start();
    let a = data(1_000, 7);
    let url = server.route("/a.bin", Route { body: a.clone(), ..Route::default() });
    let (dir, m) = project(&[("data/a.bin", &sha(&a), &url)]);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/a.bin"), b"mine").unwrap();
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains("remove it"), "{text}");
    assert_eq!(std::fs::read(dir.path().join("data/a.bin")).unwrap(), b"mine");
    assert!(server.requests().is_empty());
}

#[test]
fn files_without_a_url_are_reported_not_fetched() {
    let (dir, mut m) = project(&[("data/a.bin", &sha(b"x"), "http://127.0.0.1:9/a")]);
    m.files[0].url = None;
    assert_eq!(fetch_manifest(dir.path(), &m, quiet()).unwrap(), vec![(PathBuf::from("data/a.bin"), Outcome::NoUrl)]);
}

#[cfg(unix)]
#[test]
fn downloads_stay_inside_the_project() {
    let server = Server::start();
    let a = data(1_000, 8);
    let url = server.route("/a.bin", Route { body: a.clone(), ..Route::default() });
    let outside = tempfile::tempdir().unwrap();
    let (dir, m) = project(&[("data/a.bin", &sha(&a), &url)]);
    std::os::unix::fs::symlink(outside.path(), dir.path().join("data")).unwrap();
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains("leads outside the project"), "{text}");
    assert_eq!(files_under(outside.path()), Vec::<String>::new());
    // The file itself a symlink to a file outside: not written through.
    std::fs::remove_file(dir.path().join("data")).unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("target"), dir.path().join("data/a.bin")).unwrap();
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains("symlink"), "{text}");
    assert!(!outside.path().join("target").exists());
    assert!(server.requests().is_empty());
    // And a manifest cannot name a path with `..` or an absolute one.
    for bad in ["../a.bin", "/tmp/a.bin"] {
        let text = std::fs::read_to_string(&m.path).unwrap().replace("data/a.bin", bad);
        assert!(Manifest::from_toml_str(&text, &m.path).is_err(), "{bad}");
    }
}

#[test]
fn urls_must_be_http_or_https() {
    let (_dir, m) = project(&[("data/a.bin", &sha(b"x"), "https://example.org/a.bin")]);
    let text = std::fs::read_to_string(&m.path).unwrap();
    for bad in ["file:///etc/passwd", "ftp://example.org/a", "https://", "http:///x", "https://exa mple.org/a"] {
        let e = Manifest::from_toml_str(&text.replace("https://example.org/a.bin", bad), &m.path).unwrap_err().to_string();
        assert!(e.contains("must be an http:// or https:// address"), "{bad}: {e}");
    }
}

/// A gzip-compressed tar archive of `(name, bytes)` regular files (ustar headers; a name over
/// 100 bytes goes through a GNU long-name entry).
fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn header(name: &[u8], size: usize, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }
    fn padded(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    let mut tar = Vec::new();
    for (name, bytes) in files {
        if name.len() > 100 {
            tar.extend_from_slice(&header(b"././@LongLink", name.len() + 1, b'L'));
            padded(&mut tar, format!("{name}\0").as_bytes());
        }
        tar.extend_from_slice(&header(name.as_bytes(), bytes.len(), b'0'));
        padded(&mut tar, bytes);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn files_inside_one_archive_come_from_one_download() {
    let server = Server::start();
    let (a, b) = (data(3_000, 10), data(70_000, 11));
    let long = format!("set/{}/b.bin", "deep".repeat(30));
    let archive = tar_gz(&[("set/readme.txt", b"hello"), ("set/a.bin", &a), (&long, &b)]);
    let url = server.route("/set.tar.gz", Route { body: archive, ..Route::default() });
    let (dir, m) = project_with(&[("data/set/a.bin", &sha(&a), &url), ("data/set/b.bin", &sha(&b), &url)], &["set/a.bin", &long]);
    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(out, vec![(PathBuf::from("data/set/a.bin"), Outcome::Fetched), (PathBuf::from("data/set/b.bin"), Outcome::Fetched)]);
    assert_eq!(std::fs::read(dir.path().join("data/set/a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.path().join("data/set/b.bin")).unwrap(), b);
    assert_eq!(files_under(&dir.path().join("data")), vec!["set/a.bin", "set/b.bin"], "the archive and parts are removed");
    assert_eq!(server.requests().len(), 1);
    // One member removed: fetched again from the archive, the other one left as it is.
    std::fs::remove_file(dir.path().join("data/set/b.bin")).unwrap();
    let out = fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(out[0].1, Outcome::Present);
    assert_eq!(out[1].1, Outcome::Fetched);
}

#[test]
fn a_corrupted_or_incomplete_archive_leaves_no_file() {
    let server = Server::start();
    let a = data(3_000, 12);
    let archive = tar_gz(&[("set/a.bin", &a)]);
    let url = server.route("/set.tar.gz", Route { body: archive.clone(), corrupt: true, ..Route::default() });
    let (dir, m) = project_with(&[("data/set/a.bin", &sha(&a), &url)], &["set/a.bin"]);
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains(&url), "{text}");
    assert_eq!(files_under(&dir.path().join("data")), Vec::<String>::new());
    // A member the archive does not hold is named.
    server.route("/set.tar.gz", Route { body: archive.clone(), ..Route::default() });
    let (dir, m) = project_with(&[("data/set/a.bin", &sha(&a), &url)], &["set/other.bin"]);
    let text = fetch_manifest(dir.path(), &m, quiet()).unwrap_err().to_string();
    assert!(text.contains(&url) && text.contains("no file \"set/other.bin\""), "{text}");
    assert_eq!(files_under(&dir.path().join("data")), Vec::<String>::new());
    // An archive member whose bytes are not the pinned ones.
    let (dir, m) = project_with(&[("data/set/a.bin", &sha(b"other"), &url)], &["set/a.bin"]);
    assert!(matches!(fetch_manifest(dir.path(), &m, quiet()), Err(FetchError::HashMismatch { .. })));
    assert_eq!(files_under(&dir.path().join("data")), Vec::<String>::new());
}

/// The archive reader against what GNU tar writes (the CIFAR archives are GNU tar files), when
/// `tar` is installed.
#[test]
fn members_of_an_archive_written_by_gnu_tar() {
    let src = tempfile::tempdir().unwrap();
    let a = data(12_345, 13);
    let long = format!("batches-bin/{}", "x".repeat(120));
    std::fs::create_dir_all(src.path().join("batches-bin")).unwrap();
    std::fs::write(src.path().join("batches-bin/a.bin"), &a).unwrap();
    std::fs::write(src.path().join(&long), b"long").unwrap();
    let archive = src.path().join("set.tar.gz");
    let made = std::process::Command::new("tar").args(["--format=gnu", "-czf"]).arg(&archive).arg("-C").arg(src.path()).arg("batches-bin").status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("no GNU tar here; skipped");
        return;
    }
    let server = Server::start();
    let url = server.route("/set.tar.gz", Route { body: std::fs::read(&archive).unwrap(), ..Route::default() });
    let (dir, m) = project_with(&[("data/a.bin", &sha(&a), &url), ("data/long.bin", &sha(b"long"), &url)], &["batches-bin/a.bin", &long]);
    fetch_manifest(dir.path(), &m, quiet()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("data/a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.path().join("data/long.bin")).unwrap(), b"long");
}
