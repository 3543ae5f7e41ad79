//! Filesystem helpers the report's outputs share (the store has its own, inside the store).

use std::path::{Path, PathBuf};

/// Write a file atomically: a temporary file beside it, then a rename. Two runs of one report
/// at once, or a run killed mid-write, never leave a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Whether process `pid` is alive. Where `/proc` is not available every process counts as
/// alive, so that nothing of a live process is ever removed.
pub fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// A folder `<parent>/<prefix><pid>-<n>` owned by this process and removed on drop. Folders of
/// that name whose process is gone (a killed run or verify) are removed by [`OwnedDir::remove_stale`].
pub struct OwnedDir(PathBuf);

impl OwnedDir {
    /// Create the folder (the first free `n`).
    pub fn new(parent: &Path, prefix: &str) -> std::io::Result<OwnedDir> {
        for n in 0..1000u32 {
            let p = parent.join(format!("{prefix}{}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(OwnedDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!("cannot create a folder {prefix}… in {}", parent.display())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Remove the folders `<parent>/<prefix><pid>-<n>` of processes that no longer run. Only
    /// folders of exactly that name are touched, and a link is never followed.
    pub fn remove_stale(parent: &Path, prefix: &str) {
        let Ok(rd) = std::fs::read_dir(parent) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name.strip_prefix(prefix).and_then(|r| r.split_once('-')).and_then(|(p, n)| n.parse::<u32>().ok().and(p.parse::<u32>().ok()));
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && pid.is_some_and(|p| p != std::process::id() && !process_alive(p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A failed write (the folder is gone) leaves nothing and says so.
        assert!(write_atomic(&dir.path().join("missing/b.txt"), b"x").is_err());
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
    }
}
