//! What a spec may name on disk. Ids, experiment, data and profile names become file and folder
//! names (`tables/<id>.csv`, `artifacts/<id>-<profile>/`), and the template and data manifests
//! are read from the project's own folders, so a spec — written by anyone who can open a pull
//! request — must not be able to reach outside them: names are plain words, and files are
//! looked up under their folder with `..`, absolute paths and escaping symlinks refused.

use std::path::{Component, Path, PathBuf};

/// Whether `s` is a plain name: non-empty, of ASCII letters, digits, `-` and `_`. Such a name
/// is safe as a file or folder name on every platform and in an HTML `id` attribute.
pub fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The message for a name that is not plain.
pub fn name_message(what: &str, s: &str) -> String {
    format!("{what} `{}` must be a non-empty name of letters, digits, `-` and `_`", s.escape_debug())
}

/// Why a file could not be found inside its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confined {
    /// The name is empty, absolute, or has `..`, `.` or a backslash in it.
    NotPlain,
    /// Nothing by that name in the folder (or the folder itself is missing).
    NotFound,
    /// The name resolves (through a symlink) to a place outside the folder.
    Escapes(PathBuf),
    /// It is there but is not a regular file (a directory, a device, a FIFO).
    NotAFile,
}

impl Confined {
    /// A message naming `name`, `what` it was meant to be and the folder it must be in.
    pub fn message(&self, what: &str, name: &str, folder: &Path) -> String {
        let name = name.escape_debug();
        match self {
            Confined::NotPlain => format!("{what} `{name}` must be a relative path inside {}, without `..`", folder.display()),
            Confined::NotFound => format!("{what} `{name}` not found in {}", folder.display()),
            Confined::Escapes(to) => format!("{what} `{name}` leads outside {} (to {})", folder.display(), to.display()),
            Confined::NotAFile => format!("{what} `{name}` in {} is not a regular file", folder.display()),
        }
    }
}

/// The file `name` inside `folder`, canonical, provided that `name` is a plain relative path
/// (only normal components, no `..`, `.`, root or backslash) and that the file, symlinks
/// resolved, still lies inside the (canonical) folder and is a regular file.
pub fn resolve_in(folder: &Path, name: &str) -> Result<PathBuf, Confined> {
    let rel = Path::new(name);
    let plain = !name.is_empty() && !name.contains('\\') && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Confined::NotPlain);
    }
    let base = std::fs::canonicalize(folder).map_err(|_| Confined::NotFound)?;
    let file = std::fs::canonicalize(folder.join(rel)).map_err(|_| Confined::NotFound)?;
    if !file.starts_with(&base) {
        return Err(Confined::Escapes(file));
    }
    if !file.is_file() {
        return Err(Confined::NotAFile);
    }
    Ok(file)
}

/// The names of the files in `folder` that end in `suffix`, without it, sorted (for hints).
pub fn names_in(folder: &Path, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> =
        std::fs::read_dir(folder).map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(suffix)).map(String::from)).collect()).unwrap_or_default();
    out.sort();
    out
}

/// What a path that is not a regular file is, for "cannot use the spec: it is a directory";
/// `None` for a regular file (symlinks followed) or a path that does not exist.
pub fn not_regular(path: &Path) -> Option<&'static str> {
    let meta = std::fs::metadata(path).ok()?;
    let ft = meta.file_type();
    if ft.is_file() {
        return None;
    }
    if ft.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return Some("a named pipe (FIFO), not a regular file");
        }
        if ft.is_char_device() || ft.is_block_device() {
            return Some("a device, not a regular file");
        }
        if ft.is_socket() {
            return Some("a socket, not a regular file");
        }
    }
    Some("not a regular file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        for ok in ["exp1", "drift-vs-imbalance", "imagenet_lt", "A9"] {
            assert!(is_name(ok), "{ok}");
        }
        for bad in ["", "../x", "/any/where/x", "a.b", "a b", "x\"y", "é", ".", "a/b"] {
            assert!(!is_name(bad), "{bad}");
        }
    }

    #[test]
    fn files_are_confined_to_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("templates");
        std::fs::create_dir_all(tpl.join("sub")).unwrap();
        std::fs::write(tpl.join("a.md.j2"), "x").unwrap();
        std::fs::write(tpl.join("sub/b.md.j2"), "x").unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        assert!(resolve_in(&tpl, "a.md.j2").is_ok());
        assert!(resolve_in(&tpl, "sub/b.md.j2").is_ok());
        for bad in ["../secret", "/etc/passwd", "", "./a.md.j2", "sub/../a.md.j2", "sub\\b.md.j2"] {
            assert_eq!(resolve_in(&tpl, bad), Err(Confined::NotPlain), "{bad}");
        }
        assert_eq!(resolve_in(&tpl, "missing.md.j2"), Err(Confined::NotFound));
        assert_eq!(resolve_in(&tpl, "sub"), Err(Confined::NotAFile));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), tpl.join("link.md.j2")).unwrap();
            assert!(matches!(resolve_in(&tpl, "link.md.j2"), Err(Confined::Escapes(_))));
        }
        assert_eq!(names_in(&tpl, ".md.j2"), if cfg!(unix) { vec!["a", "link"] } else { vec!["a"] });
    }

    #[test]
    fn what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(not_regular(dir.path()), Some("a directory"));
        assert_eq!(not_regular(&dir.path().join("nothing")), None);
        std::fs::write(dir.path().join("f"), "x").unwrap();
        assert_eq!(not_regular(&dir.path().join("f")), None);
        #[cfg(unix)]
        assert_eq!(not_regular(Path::new("/dev/null")), Some("a device, not a regular file"));
    }
}
