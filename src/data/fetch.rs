//! Downloading the files a manifest names (`reprise fetch`).
//!
//! Each file with a `url` is downloaded into a temporary file beside its destination
//! (`.<name>.part`), hashed, and renamed into place only when its sha256 is the one the manifest
//! pins: no partial or wrong file is ever visible under the final name. A download that stops
//! half-way keeps its temporary file, and the next fetch asks the server for the rest (an HTTP
//! `Range` request; a server that ignores it sends the whole file again). A file whose bytes do
//! not match is refused and its temporary file removed. A file the manifest leaves `unpinned`
//! is downloaded only when the caller asks to pin it, and its hash is then written into the
//! manifest.
//!
//! Files that a data set publishes inside one tar archive (CIFAR's `.tar.gz`) share the archive's
//! `url` and each name its `member`: the archive is downloaded once (and resumed like any
//! download), the members are written to their files' temporary names and checked and renamed
//! as above, and the archive is removed. Member names are only compared, never used as paths.
//!
//! Destinations are confined to the project root: the manifest's paths are relative without
//! `..` (checked when it is parsed), and no folder on the way may be a symlink that leads out of
//! the root, nor the file itself a symlink.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::manifest::{sha256_file, Manifest, UNPINNED};

/// Errors of fetching; each names the URL or the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server could not be reached, answered with an error, or the transfer broke off.
    #[error("downloading {url}: {message}")]
    Http { url: String, message: String },
    /// The downloaded bytes are not the ones the manifest pins; nothing was kept.
    #[error(
        "{url}: sha256 mismatch: the manifest expects {expected} but the download hashes to {actual}; the download was removed and {} left untouched (check the url, or if the source changed its file on purpose, update the sha256 in {})",
        path.display(),
        manifest.display()
    )]
    HashMismatch { url: String, path: PathBuf, manifest: PathBuf, expected: String, actual: String },
    /// A file is already there with other bytes than the manifest pins; it is not overwritten.
    #[error("{}: the file is already there but hashes to {actual}, not the {expected} that {} pins (remove it to download it again)", path.display(), manifest.display())]
    PresentMismatch { path: PathBuf, manifest: PathBuf, expected: String, actual: String },
    /// The destination would lie outside the project root.
    #[error("{}: {message}", path.display())]
    Unsafe { path: PathBuf, message: String },
    /// Reading or writing a local file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest could not be rewritten with a pinned hash.
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_path_buf(), source }
}

/// What became of one file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already in place with the pinned hash; nothing downloaded.
    Present,
    /// Downloaded and checked against the pinned hash.
    Fetched,
    /// Downloaded (or found in place) and its hash written into the manifest (`--pin`).
    Pinned(String),
    /// The manifest pins no hash and pinning was not asked for: nothing downloaded.
    Unpinned,
    /// Not in place, and the manifest gives no `url`: obtain it from the manifest's `source`.
    NoUrl,
}

/// What fetching does beyond downloading pinned files.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchOptions {
    /// Download unpinned files and write their sha256 into the manifest.
    pub pin: bool,
    /// Show a progress bar per download (on a terminal only).
    pub progress: bool,
}

/// Downloads what is missing of `manifest`'s files under the project `root` and returns each
/// file's path (relative to `root`) and outcome, in manifest order. Stops at the first error.
pub fn fetch_manifest(root: &Path, manifest: &Manifest, opts: FetchOptions) -> Result<Vec<(PathBuf, Outcome)>, FetchError> {
    let root = std::fs::canonicalize(root).map_err(io(root))?;
    let mut out: Vec<Option<Outcome>> = vec![None; manifest.files.len()];
    let mut pins: Vec<(usize, String)> = Vec::new();
    let mut fetcher: Option<Fetcher> = None;
    // Files taken out of an archive, by the archive's url: (file index, destination).
    let mut archives: Vec<(&str, Vec<(usize, PathBuf)>)> = Vec::new();
    for (i, f) in manifest.files.iter().enumerate() {
        let unpinned = f.sha256 == UNPINNED;
        let dest = destination(&root, &f.path)?;
        if dest.exists() {
            let actual = sha256_file(&dest).map_err(|e| FetchError::Manifest { path: dest.clone(), message: e.to_string() })?;
            out[i] = Some(if unpinned {
                if opts.pin {
                    pins.push((i, actual.clone()));
                    Outcome::Pinned(actual)
                } else {
                    Outcome::Unpinned
                }
            } else if actual == f.sha256 {
                Outcome::Present
            } else {
                return Err(FetchError::PresentMismatch { path: dest, manifest: manifest.path.clone(), expected: f.sha256.clone(), actual });
            });
            continue;
        }
        let Some(url) = &f.url else {
            out[i] = Some(Outcome::NoUrl);
            continue;
        };
        if unpinned && !opts.pin {
            out[i] = Some(Outcome::Unpinned);
            continue;
        }
        if f.member.is_some() {
            match archives.iter_mut().find(|(u, _)| *u == url.as_str()) {
                Some((_, files)) => files.push((i, dest)),
                None => archives.push((url, vec![(i, dest)])),
            }
            continue;
        }
        if fetcher.is_none() {
            fetcher = Some(Fetcher::new(opts.progress)?);
        }
        let fetcher = fetcher.as_ref().expect("created above");
        let part = part_path(&dest);
        fetcher.download(url, &part, &f.path)?;
        out[i] = Some(place(manifest, i, url, &part, &dest, &mut pins)?);
    }
    for (url, files) in archives {
        if fetcher.is_none() {
            fetcher = Some(Fetcher::new(opts.progress)?);
        }
        let fetcher = fetcher.as_ref().expect("created above");
        // The archive is kept beside its first member until every member is in place.
        let first = &files[0].1;
        let name: String = url.rsplit('/').next().unwrap_or("").chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).collect();
        let archive = first.with_file_name(format!(".{}.part", if name.trim_matches('.').is_empty() { "archive" } else { &name }));
        fetcher.download(url, &archive, Path::new(url.rsplit('/').next().unwrap_or(url)))?;
        let wanted: Vec<(&str, PathBuf)> = files.iter().map(|(i, dest)| (manifest.files[*i].member.as_deref().expect("grouped by member"), part_path(dest))).collect();
        let unpack = extract(&archive, &wanted).map_err(|message| FetchError::Http { url: url.to_string(), message: format!("unpacking the download: {message}") });
        if let Err(e) = unpack {
            let _ = std::fs::remove_file(&archive);
            wanted.iter().for_each(|(_, part)| drop(std::fs::remove_file(part)));
            return Err(e);
        }
        for (i, dest) in &files {
            let placed = place(manifest, *i, url, &part_path(dest), dest, &mut pins);
            if placed.is_err() {
                // A member that does not match condemns the archive it came from.
                let _ = std::fs::remove_file(&archive);
                wanted.iter().for_each(|(_, part)| drop(std::fs::remove_file(part)));
            }
            out[*i] = Some(placed?);
        }
        let _ = std::fs::remove_file(&archive);
    }
    if !pins.is_empty() {
        pin_hashes(&manifest.path, &pins)?;
    }
    Ok(manifest.files.iter().zip(out).map(|(f, o)| (f.path.clone(), o.expect("every file has an outcome"))).collect())
}

/// Hashes the downloaded `part` of file `i` and renames it to `dest` when the hash is the
/// pinned one (or, for an unpinned file, records the hash to pin); a mismatch removes `part`.
fn place(manifest: &Manifest, i: usize, url: &str, part: &Path, dest: &Path, pins: &mut Vec<(usize, String)>) -> Result<Outcome, FetchError> {
    let f = &manifest.files[i];
    let actual = sha256_file(part).map_err(|e| FetchError::Manifest { path: part.to_path_buf(), message: e.to_string() })?;
    if f.sha256 != UNPINNED && actual != f.sha256 {
        let _ = std::fs::remove_file(part);
        return Err(FetchError::HashMismatch { url: url.to_string(), path: dest.to_path_buf(), manifest: manifest.path.clone(), expected: f.sha256.clone(), actual });
    }
    std::fs::rename(part, dest).map_err(io(dest))?;
    if f.sha256 == UNPINNED {
        pins.push((i, actual.clone()));
        return Ok(Outcome::Pinned(actual));
    }
    Ok(Outcome::Fetched)
}

/// Writes each `(member, to)` of the tar archive at `archive` (gzip-compressed or not) to the
/// file `to`. Only regular files are read; member names are only compared, never used as paths.
/// A member the archive lacks is an error naming it.
fn extract(archive: &Path, wanted: &[(&str, PathBuf)]) -> Result<(), String> {
    use std::io::Read;
    let file = std::fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut magic = [0u8; 2];
    let gz = std::fs::File::open(archive).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b];
    let mut reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))) } else { Box::new(std::io::BufReader::new(file)) };
    let mut found = vec![false; wanted.len()];
    let mut long_name: Option<String> = None;
    let mut header = [0u8; 512];
    loop {
        if let Err(e) = reader.read_exact(&mut header) {
            return Err(format!("not a complete tar archive: {e}"));
        }
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |from: usize, to: usize| -> String {
            let bytes = &header[from..to];
            String::from_utf8_lossy(&bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]).into_owned()
        };
        let size_text = field(124, 136);
        let size = u64::from_str_radix(size_text.trim_matches(|c: char| c == ' ' || c == '\0'), 8).map_err(|_| format!("a tar header with the size {size_text:?}"))?;
        let kind = header[156];
        let name = match long_name.take() {
            Some(n) => n,
            None if &header[257..262] == b"ustar" && header[345] != 0 => format!("{}/{}", field(345, 500), field(0, 100)),
            None => field(0, 100),
        };
        let padded = size.div_ceil(512) * 512;
        let mut body = (&mut reader).take(padded);
        if kind == b'L' {
            let mut text = Vec::new();
            body.read_to_end(&mut text).map_err(|e| format!("not a complete tar archive: {e}"))?;
            text.truncate(size as usize);
            long_name = Some(String::from_utf8_lossy(&text).trim_end_matches('\0').to_string());
            continue;
        }
        let member = name.trim_start_matches("./");
        let hit = if matches!(kind, b'0' | 0) { wanted.iter().position(|(m, _)| *m == member) } else { None };
        if let Some(k) = hit {
            let to = &wanted[k].1;
            let mut out = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
            let copied = std::io::copy(&mut (&mut body).take(size), &mut out).map_err(|e| format!("{member}: {e}"))?;
            if copied != size {
                return Err(format!("{member}: the archive ends inside it"));
            }
            out.sync_all().map_err(|e| format!("{}: {e}", to.display()))?;
            found[k] = true;
        }
        std::io::copy(&mut body, &mut std::io::sink()).map_err(|e| format!("not a complete tar archive: {e}"))?;
    }
    match found.iter().position(|f| !f) {
        Some(k) => Err(format!("the archive holds no file {:?}", wanted[k].0)),
        None => Ok(()),
    }
}

/// The temporary file a download of `dest` goes to: `.<name>.part` in the same folder, so that
/// the rename into place stays on one file system.
fn part_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// `root/rel`, with the folders on the way created, provided that nothing on the way is a
/// symlink leading outside `root` (canonical) and that the file itself is not a symlink.
fn destination(root: &Path, rel: &Path) -> Result<PathBuf, FetchError> {
    let unsafe_path = |message: String| FetchError::Unsafe { path: root.join(rel), message };
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(unsafe_path("the path must be relative, inside the project, without `..`".into()));
    }
    let parts: Vec<&std::ffi::OsStr> = rel.components().filter_map(|c| if let Component::Normal(p) = c { Some(p) } else { None }).collect();
    let Some((file, folders)) = parts.split_last() else {
        return Err(unsafe_path("the path names no file".into()));
    };
    let mut dir = root.to_path_buf();
    for part in folders {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::canonicalize(&dir).map_err(io(&dir))?;
                if !to.starts_with(root) || !to.is_dir() {
                    return Err(unsafe_path(format!("{} is a symlink that leads outside the project (to {}); downloads stay inside {}", dir.display(), to.display(), root.display())));
                }
            }
            Ok(_) => return Err(unsafe_path(format!("{} is in the way: it is not a folder", dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&dir).map_err(io(&dir))?,
            Err(e) => return Err(FetchError::Io { path: dir, source: e }),
        }
    }
    let dest = dir.join(file);
    if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(unsafe_path("the destination is a symlink; remove it so that the file can be downloaded in its place".into()));
    }
    Ok(dest)
}

/// Writes each `(file index, sha256)` into the manifest at `path`, keeping its comments and
/// layout; the new text replaces the old by a rename.
fn pin_hashes(path: &Path, pins: &[(usize, String)]) -> Result<(), FetchError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| FetchError::Manifest { path: path.to_path_buf(), message: e.to_string() })?;
    let files = doc.get_mut("files").and_then(|f| f.as_array_of_tables_mut()).ok_or_else(|| FetchError::Manifest { path: path.to_path_buf(), message: "no [[files]] tables to pin".into() })?;
    for (i, hash) in pins {
        let table = files.get_mut(*i).ok_or_else(|| FetchError::Manifest { path: path.to_path_buf(), message: format!("files[{i}] is gone; was the manifest edited meanwhile?") })?;
        table["sha256"] = toml_edit::value(hash.as_str());
    }
    let new_text = doc.to_string();
    // What is written must still be a valid manifest.
    Manifest::from_toml_str(&new_text, path).map_err(|e| FetchError::Manifest { path: path.to_path_buf(), message: e.to_string() })?;
    let tmp = part_path(path);
    std::fs::write(&tmp, new_text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// An HTTP client on a small runtime of its own.
struct Fetcher {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    progress: bool,
}

impl Fetcher {
    fn new(progress: bool) -> Result<Fetcher, FetchError> {
        // The TLS library is built without a default crypto provider; install the one the
        // object store's client uses too (a second install is refused, harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io(Path::new(".")))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("reprise/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| FetchError::Http { url: String::new(), message: format!("cannot create the HTTP client: {e}") })?;
        Ok(Fetcher { rt, client, progress })
    }

    /// Downloads `url` into `part`, continuing after the bytes already there when the server
    /// allows ranges. `shown` names the file in the progress bar.
    fn download(&self, url: &str, part: &Path, shown: &Path) -> Result<(), FetchError> {
        let http = |message: String| FetchError::Http { url: url.to_string(), message };
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        self.rt.block_on(async {
            let mut request = self.client.get(url);
            if have > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let mut response = request.send().await.map_err(|e| http(cause_chain(&e)))?;
            let status = response.status();
            let start = if have > 0 && status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                // The earlier download already holds every byte (or more: the hash decides).
                return Ok(());
            } else if have > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT {
                let range = response.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                if !range.starts_with(&format!("bytes {have}-")) {
                    return Err(http(format!("asked for the bytes from {have} on, the server sent the range {range:?}")));
                }
                have
            } else if status.is_success() {
                0
            } else {
                return Err(http(format!("the server answered {status}")));
            };
            let mut file = if start > 0 { std::fs::OpenOptions::new().append(true).open(part) } else { std::fs::File::create(part) }.map_err(io(part))?;
            let total = response.content_length().map(|n| n + start);
            let bar = self.bar(total, shown);
            bar.set_position(start);
            let mut written = start;
            loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => {
                        bar.abandon();
                        let _ = file.sync_all();
                        return Err(http(format!("the transfer stopped after {written} bytes: {}; the part is kept in {}, and fetching again resumes it", cause_chain(&e), part.display())));
                    }
                };
                file.write_all(&chunk).map_err(io(part))?;
                written += chunk.len() as u64;
                bar.set_position(written);
            }
            file.sync_all().map_err(io(part))?;
            bar.finish_and_clear();
            if let Some(total) = total {
                if written != total {
                    return Err(http(format!("the server announced {total} bytes but sent {written}; the part is kept in {}, and fetching again resumes it", part.display())));
                }
            }
            Ok(())
        })
    }

    fn bar(&self, total: Option<u64>, shown: &Path) -> ProgressBar {
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        };
        if !self.progress {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        bar.set_message(shown.display().to_string());
        bar
    }
}

/// An error and its sources, `: `-separated (reqwest's own message rarely says what failed).
fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests;
