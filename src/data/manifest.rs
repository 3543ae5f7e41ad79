//! Data manifests: one TOML file per data set that pins its files by sha256 and says how to read
//! them.
//!
//! A result is only reproducible if the data it came from is exactly known. A manifest names the
//! files of a data set (relative to the project root), their hashes, their format and its
//! parameters, the class names, and where the data came from (licence, source, citation).
//! Loading through a manifest always verifies the hashes first, and [`Manifest::content_id`]
//! condenses everything that determines the loaded bytes (but nothing cosmetic: not paths, not
//! descriptions) into one hash for cache keys.
//!
//! Manifests are parsed strictly: an unknown key is an error with its line and column and, when a
//! known key is a typo away, a "did you mean" hint.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::formats::{self, CifarVariant, CsvLayout};
use super::mat;
use super::{DataError, ImageSet};

/// How the files of a data set are stored. `kind` selects the variant; the other keys of the
/// TOML `format` table are that kind's parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FormatSpec {
    /// Headerless CSV, optionally gzipped: one image per row, pixels then the label
    /// (see [`formats::load_csv`]).
    CsvGz { channels: usize, height: usize, width: usize, max_value: f32 },
    /// MNIST IDX: files with role `images` and `labels`, or `<split>-images` and `<split>-labels`.
    Idx {},
    /// CIFAR binary batches.
    CifarBinary { variant: CifarVariant },
    /// Parquet table of encoded PNG/JPEG images; `size = [height, width]` resizes them all.
    ParquetImages {
        image_column: String,
        label_column: String,
        #[serde(default)]
        size: Option<[usize; 2]>,
    },
    /// MATLAB Level-5 MAT-file (`save -v7` or older, compressed or not; see [`mat`]): the image
    /// variable `images` ([height, width, channels, N] or [height, width, N], values 0..255) and
    /// the label variable `labels` (N values). Each label has `label_offset` subtracted, then is
    /// taken modulo `label_modulo` when given (SVHN: `label_modulo = 10`, its digit 0 is 10).
    #[serde(rename = "mat-v5")]
    MatV5 {
        images: String,
        labels: String,
        #[serde(default)]
        label_offset: i64,
        #[serde(default)]
        label_modulo: Option<u32>,
    },
    /// CUB-200-2011 as its archive unpacks: a file with role `images` (`images.txt`) and one with
    /// role `labels` (`image_class_labels.txt`), or `<split>-images` and `<split>-labels`; the
    /// images under `images/` beside `images.txt`, read as RGB and resized to `size`.
    #[serde(rename = "cub-200")]
    Cub200 {
        #[serde(default)]
        size: Option<[usize; 2]>,
    },
    /// CSV lists of images (a header line, then one image a line), one file per role; the images
    /// are in `image_dir` beside the list, read as RGB and resized to `size`. Labels are class
    /// names looked up in `classes`; a manifest that only numbers its classes (`num_classes`)
    /// numbers the labels by first appearance over all its lists, in manifest order.
    ImageList {
        #[serde(default = "default_image_dir")]
        image_dir: String,
        #[serde(default = "default_path_column")]
        path_column: String,
        #[serde(default = "default_label_column")]
        label_column: String,
        #[serde(default)]
        size: Option<[usize; 2]>,
    },
}

fn default_image_dir() -> String {
    "images".into()
}

fn default_path_column() -> String {
    "filename".into()
}

fn default_label_column() -> String {
    "label".into()
}

impl FormatSpec {
    /// The `kind` as written in a manifest.
    pub fn kind(&self) -> &'static str {
        match self {
            FormatSpec::CsvGz { .. } => "csv-gz",
            FormatSpec::Idx {} => "idx",
            FormatSpec::CifarBinary { .. } => "cifar-binary",
            FormatSpec::ParquetImages { .. } => "parquet-images",
            FormatSpec::MatV5 { .. } => "mat-v5",
            FormatSpec::Cub200 { .. } => "cub-200",
            FormatSpec::ImageList { .. } => "image-list",
        }
    }

    /// One `key=value` line per parameter in a fixed order: the format's part of the content id.
    fn canonical(&self) -> String {
        let mut s = format!("format.kind={}\n", self.kind());
        match self {
            FormatSpec::CsvGz { channels, height, width, max_value } => {
                s += &format!(
                    "format.channels={channels}\nformat.height={height}\nformat.width={width}\n\
                     format.max_value={max_value:?}\n"
                );
            }
            FormatSpec::Idx {} => {}
            FormatSpec::CifarBinary { variant } => {
                s += &format!("format.variant={}\n", variant.name());
            }
            FormatSpec::ParquetImages { image_column, label_column, .. } => {
                s += &format!("format.image_column={image_column:?}\nformat.label_column={label_column:?}\n");
            }
            FormatSpec::MatV5 { images, labels, label_offset, label_modulo } => {
                s += &format!("format.images={images:?}\nformat.labels={labels:?}\nformat.label_offset={label_offset}\n");
                if let Some(m) = label_modulo {
                    s += &format!("format.label_modulo={m}\n");
                }
            }
            FormatSpec::Cub200 { .. } => {}
            FormatSpec::ImageList { image_dir, path_column, label_column, .. } => {
                s += &format!("format.image_dir={image_dir:?}\nformat.path_column={path_column:?}\nformat.label_column={label_column:?}\n");
            }
        }
        if let Some((h, w)) = self.size() {
            s += &format!("format.size={h}x{w}\n");
        }
        s
    }

    /// The size every image is resized to, for the formats that decode image files.
    pub fn size(&self) -> Option<(usize, usize)> {
        match self {
            FormatSpec::ParquetImages { size, .. } | FormatSpec::Cub200 { size } | FormatSpec::ImageList { size, .. } => size.map(|[h, w]| (h, w)),
            _ => None,
        }
    }
}

/// One file of a data set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the project root.
    pub path: PathBuf,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// What the file holds, e.g. `all`, `train`, `test`, `images`, `labels`, `train-images`.
    pub role: String,
    /// Where `reprise fetch` downloads the file from (`http://` or `https://`). Optional: a file
    /// without one is obtained by hand from the manifest's `source`. Not part of the content
    /// id: a mirror serves the same bytes, and the sha256 checks that it does.
    #[serde(default)]
    pub url: Option<String>,
    /// When `url` is a tar archive (gzip-compressed or not): the path of this file inside it.
    /// Files of one archive share its `url`, and one download serves them all.
    #[serde(default)]
    pub member: Option<String>,
}

/// A parsed, validated data manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub format: FormatSpec,
    pub files: Vec<FileEntry>,
    /// Class names; label `i` is `classes[i]`. May be left empty when `num_classes` is given
    /// (the names are then "0", "1", …).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Number of classes, for data sets with too many to list (e.g. 1,000).
    #[serde(default)]
    pub num_classes: Option<usize>,
    pub licence: String,
    pub source: String,
    pub citation: String,
    /// Where the manifest was read from (for error messages); not a TOML key.
    #[serde(skip)]
    pub path: PathBuf,
}

use crate::params::levenshtein as edit_distance;

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    // A strict prefix of a candidate ("csv" for "csv-gz") counts as close, whatever its distance.
    candidates.into_iter().map(|c| (edit_distance(word, c), c)).filter(|&(d, c)| d > 0 && (d <= limit || (word.len() >= 3 && c.starts_with(word)))).min_by_key(|&(d, _)| d).map(|(_, c)| c)
}

/// The backquoted words of a serde message after `marker` (e.g. the field names after
/// "expected one of").
fn backquoted_after<'a>(message: &'a str, marker: &str) -> Vec<&'a str> {
    let Some(pos) = message.find(marker) else {
        return Vec::new();
    };
    message[pos + marker.len()..].split('`').skip(1).step_by(2).collect()
}

/// A "did you mean" hint for serde's "unknown field/variant `x`, expected one of ..." messages.
fn typo_hint(message: &str) -> Option<String> {
    let unknown = ["unknown field", "unknown variant"].iter().find_map(|m| backquoted_after(message, m).first().copied())?;
    let known = backquoted_after(message, "expected");
    let best = closest(unknown, known.iter().copied())?;
    Some(format!("did you mean `{best}`?"))
}

/// Where the unknown key of an "unknown field `x`" message is written, at or after `from`. The
/// parser reports such errors at the start of the enclosing table; the key itself is more useful.
fn key_position(text: &str, from: usize, message: &str) -> Option<usize> {
    let key = *backquoted_after(message, "unknown field").first()?;
    let mut offset = from.min(text.len());
    for line in text.get(offset..)?.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(offset + (line.len() - trimmed.len()));
            }
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The lower-case hex sha256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DataError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Reads the manifest called `name`: `data-manifests/<name>.toml` under the project `root`,
    /// and nothing else. A name with `..`, `/` or any character but letters, digits, `-` and
    /// `_`, or a file that a symlink leads out of the folder, is an error naming the known
    /// manifests, so a spec cannot make the planner read a file from anywhere.
    pub fn load_named(root: &Path, name: &str) -> Result<Manifest, DataError> {
        use crate::spec::confine;
        let dir = root.join("data-manifests");
        let known = confine::names_in(&dir, ".toml");
        let hint = (!known.is_empty()).then(|| crate::params::suggest(name, &known));
        if !confine::is_name(name) {
            return Err(DataError::Manifest { path: dir, message: confine::name_message("manifest name", name), hint });
        }
        let file = format!("{name}.toml");
        let path = confine::resolve_in(&dir, &file).map_err(|why| DataError::Manifest { path: dir.join(&file), message: why.message("manifest", &file, &dir), hint })?;
        Self::load(&path)
    }

    /// Every `*.toml` manifest in `dir`, sorted by name.
    pub fn load_all(dir: &Path) -> Result<Vec<Manifest>, DataError> {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
            let p = entry.map_err(|e| DataError::io(dir, e))?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                paths.push(p);
            }
        }
        let mut out = paths.iter().map(|p| Manifest::load(p)).collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Parses and validates manifest text; `path` is only used in errors and kept in the result.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Manifest, DataError> {
        let mut m: Manifest = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            let at = match e.span() {
                Some(span) => {
                    let start = key_position(text, span.start, &message).unwrap_or(span.start);
                    let (line, col) = line_col(text, start);
                    format!("line {line}, column {col}: ")
                }
                None => String::new(),
            };
            DataError::Manifest { path: path.to_path_buf(), hint: typo_hint(&message), message: format!("{at}{message}") }
        })?;
        m.path = path.to_path_buf();
        if m.classes.is_empty() {
            if let Some(n) = m.num_classes {
                m.classes = (0..n).map(|i| i.to_string()).collect();
            }
        }
        if let Some(n) = m.num_classes {
            if n != m.classes.len() {
                return Err(m.error(format!("`num_classes` = {n} but `classes` lists {}", m.classes.len()), Some("give one of the two, or make them agree".into())));
            }
        }
        m.validate()?;
        Ok(m)
    }

    fn error(&self, message: String, hint: Option<String>) -> DataError {
        DataError::Manifest { path: self.path.clone(), message, hint }
    }

    /// Checks what serde cannot: non-empty lists, well-formed hashes and paths, sane parameters.
    fn validate(&self) -> Result<(), DataError> {
        if self.name.trim().is_empty() {
            return Err(self.error("`name` is empty".into(), None));
        }
        if self.files.is_empty() {
            return Err(self.error("`files` is empty".into(), Some("add [[files]] tables with path, sha256 and role".into())));
        }
        if self.classes.is_empty() {
            return Err(self.error("`classes` is empty".into(), None));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if self.classes[..i].contains(c) {
                return Err(self.error(format!("class name {c:?} appears twice in `classes`"), None));
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            let shown = f.path.display();
            if !is_sha256_hex(&f.sha256) && f.sha256 != UNPINNED {
                return Err(self.error(format!("files[{i}] ({shown}): sha256 must be 64 lower-case hex digits, found {:?}", f.sha256), Some(format!("compute it with `sha256sum {shown}`"))));
            }
            let escapes = f.path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
            if escapes || f.path.as_os_str().is_empty() {
                return Err(self.error(format!("files[{i}]: path {shown:?} must be relative, inside the project"), Some("paths are relative to the project root, without `..`".into())));
            }
            if f.role.trim().is_empty() {
                return Err(self.error(format!("files[{i}] ({shown}): `role` is empty"), None));
            }
            if let Some(url) = &f.url {
                let plain = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
                if !plain || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.error(
                        format!("files[{i}] ({shown}): url {url:?} must be an http:// or https:// address"),
                        Some("write the file's download address, e.g. \"https://example.org/data/train.bin\"".into()),
                    ));
                }
            }
        }
        match &self.format {
            FormatSpec::CsvGz { channels, height, width, max_value } => {
                if *channels == 0 || *height == 0 || *width == 0 {
                    return Err(self.error(format!("format: channels, height and width must be positive, found {channels}×{height}×{width}"), None));
                }
                if !(max_value.is_finite() && *max_value > 0.0) {
                    return Err(self.error(format!("format: max_value must be positive, found {max_value}"), Some("it is the largest pixel value, e.g. 255".into())));
                }
            }
            FormatSpec::Idx {} => {}
            FormatSpec::CifarBinary { variant } => {
                if self.classes.len() != variant.num_classes() {
                    return Err(self.error(format!("{} has {} classes but `classes` lists {}", variant.name(), variant.num_classes(), self.classes.len()), None));
                }
            }
            FormatSpec::ParquetImages { .. } | FormatSpec::Cub200 { .. } => {}
            FormatSpec::MatV5 { images, labels, label_modulo, .. } => {
                if images.is_empty() || labels.is_empty() {
                    return Err(self.error("format: `images` and `labels` must name the MAT-file's variables".into(), Some("e.g. images = \"X\", labels = \"y\"".into())));
                }
                if *label_modulo == Some(0) {
                    return Err(self.error("format: label_modulo must be positive".into(), Some("leave it out to keep the labels as they are".into())));
                }
            }
            FormatSpec::ImageList { image_dir, .. } => {
                let dir = Path::new(image_dir);
                if image_dir.is_empty() || dir.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
                    return Err(
                        self.error(format!("format: image_dir {image_dir:?} must be a relative folder without `..`"), Some("it is relative to the folder of each list file, e.g. \"images\"".into()))
                    );
                }
            }
        }
        if let Some((h, w)) = self.format.size().filter(|&(h, w)| h == 0 || w == 0) {
            return Err(self.error(format!("format: size must be positive, found [{h}, {w}]"), None));
        }
        Ok(())
    }

    /// Hashes every file (under `root`) and compares with the manifest.
    pub fn verify(&self, root: &Path) -> Result<(), DataError> {
        self.files.iter().try_for_each(|f| verify_file(root, f))
    }

    /// The roles of the files, in manifest order, without repeats.
    pub fn roles(&self) -> Vec<&str> {
        let mut roles: Vec<&str> = Vec::new();
        for f in &self.files {
            if !roles.contains(&f.role.as_str()) {
                roles.push(&f.role);
            }
        }
        roles
    }

    fn files_with_role(&self, role: &str) -> Result<Vec<&FileEntry>, DataError> {
        let found: Vec<&FileEntry> = self.files.iter().filter(|f| f.role == role).collect();
        if found.is_empty() {
            let roles = self.roles();
            let hint = closest(role, roles.iter().copied()).map(|r| format!("did you mean {r:?}?"));
            return Err(self.error(format!("no file with role {role:?}; the roles here are {roles:?}"), hint));
        }
        Ok(found)
    }

    /// Verifies and loads the data set's images (paths relative to `root`).
    ///
    /// `role` selects files: `None` reads every file, `Some(r)` the files whose role is `r`,
    /// concatenated in manifest order. For `idx` and `cub-200` manifests, `None` reads the files
    /// with roles `images` and `labels`, and `Some(split)` those with `<split>-images` and
    /// `<split>-labels`.
    /// Only the files read are hashed. Labels are checked against `classes`, and the result's
    /// `num_classes` is `classes.len()`.
    pub fn load_images(&self, root: &Path, role: Option<&str>) -> Result<ImageSet, DataError> {
        if let FormatSpec::Idx {} | FormatSpec::Cub200 { .. } = self.format {
            let (ri, rl) = match role {
                Some(split) => (format!("{split}-images"), format!("{split}-labels")),
                None => ("images".to_string(), "labels".to_string()),
            };
            let one = |r: &str| -> Result<&FileEntry, DataError> {
                match self.files_with_role(r)?.as_slice() {
                    [f] => Ok(f),
                    _ => Err(self.error(format!("more than one file has role {r:?}"), None)),
                }
            };
            let (fi, fl) = (one(&ri)?, one(&rl)?);
            verify_file(root, fi)?;
            verify_file(root, fl)?;
            let set = match &self.format {
                FormatSpec::Cub200 { .. } => formats::load_cub(&root.join(&fi.path), &root.join(&fl.path), self.format.size())?,
                _ => formats::load_idx(&root.join(&fi.path), &root.join(&fl.path))?,
            };
            return self.check_labels(set, &root.join(&fl.path));
        }

        let selected: Vec<&FileEntry> = match role {
            Some(r) => self.files_with_role(r)?,
            None => self.files.iter().collect(),
        };
        for f in &selected {
            verify_file(root, f)?;
        }
        let class_of = self.list_classes(root)?;
        let mut out: Option<ImageSet> = None;
        for f in selected {
            let path = root.join(&f.path);
            let set = match &self.format {
                FormatSpec::CsvGz { channels, height, width, max_value } => formats::load_csv(&path, &CsvLayout { channels: *channels, height: *height, width: *width, max_value: *max_value })?,
                FormatSpec::ParquetImages { image_column, label_column, .. } => formats::load_parquet_images(&path, image_column, label_column, self.format.size())?,
                FormatSpec::CifarBinary { variant } => formats::load_cifar(std::slice::from_ref(&path), *variant)?,
                FormatSpec::MatV5 { images, labels, label_offset, label_modulo } => {
                    mat::load_mat_images(&path, &mat::MatLayout { images: images.clone(), labels: labels.clone(), label_offset: *label_offset, label_modulo: *label_modulo })?
                }
                FormatSpec::ImageList { .. } => {
                    let layout = self.list_layout().expect("an image-list format");
                    formats::load_image_list(&path, &layout, &|l: &str| class_of.get(l).copied())?
                }
                // Read in image/label pairs above, before this loop; kept as an error rather
                // than a panic should that branch ever change.
                FormatSpec::Idx {} | FormatSpec::Cub200 { .. } => return Err(self.error(format!("{} files are read in pairs, not one by one", self.format.kind()), None)),
            };
            let set = self.check_labels(set, &path)?;
            out = Some(match out {
                None => set,
                Some(acc) => append(acc, set, &path)?,
            });
        }
        // `selected` is never empty: `files` is non-empty (validated) and a role with no file is
        // an error above.
        out.ok_or_else(|| self.error("no files selected".into(), None))
    }

    fn list_layout(&self) -> Option<formats::ImageListLayout> {
        match &self.format {
            FormatSpec::ImageList { image_dir, path_column, label_column, .. } => {
                Some(formats::ImageListLayout { image_dir: image_dir.clone(), path_column: path_column.clone(), label_column: label_column.clone(), size: self.format.size() })
            }
            _ => None,
        }
    }

    /// For `image-list` manifests, the class index of each label text: its position in
    /// `classes`, or, when the manifest only numbers its classes (`num_classes`, names "0", "1",
    /// …) and the labels are not those numbers, its order of first appearance over all the manifest's lists in manifest order (so a
    /// split keeps its indices whichever role is loaded; every list is then verified and read).
    /// Empty for other formats.
    fn list_classes(&self, root: &Path) -> Result<std::collections::HashMap<String, u32>, DataError> {
        let mut map = std::collections::HashMap::new();
        let Some(layout) = self.list_layout() else {
            return Ok(map);
        };
        map.extend(self.classes.iter().enumerate().map(|(i, c)| (c.clone(), i as u32)));
        let numbered = self.classes.iter().enumerate().all(|(i, c)| *c == i.to_string());
        if !numbered {
            return Ok(map);
        }
        let mut first = std::collections::HashMap::new();
        for f in &self.files {
            verify_file(root, f)?;
            for (_, label, _) in formats::read_image_list(&root.join(&f.path), &layout)? {
                let next = first.len() as u32;
                first.entry(label).or_insert(next);
            }
        }
        // Labels that are the class numbers themselves keep them.
        Ok(if first.keys().all(|l| map.contains_key(l)) { map } else { first })
    }

    /// Checks every label of `set` (read from `path`) against `classes` and sets `num_classes`.
    fn check_labels(&self, mut set: ImageSet, path: &Path) -> Result<ImageSet, DataError> {
        let k = self.classes.len();
        if let Some((i, l)) = set.labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            return Err(DataError::format(
                path,
                format!(
                    "image {i} (0-based) has label {l}, out of range for the {k} classes of \
                     manifest {}",
                    self.path.display()
                ),
            ));
        }
        set.num_classes = k;
        Ok(set)
    }

    /// A hash of everything that determines the loaded data: the format and its parameters, the
    /// number of classes, and each file's role and sha256 in order. Paths, names, descriptions
    /// and provenance are left out, so moving or re-describing a data set keeps its cache entries.
    pub fn content_id(&self) -> String {
        let mut text = String::from("reprise-data-manifest-v1\n");
        text += &self.format.canonical();
        text += &format!("classes={}\n", self.classes.len());
        for f in &self.files {
            text += &format!("file role={:?} sha256={}\n", f.role, f.sha256);
        }
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

/// The `sha256` of a file that this project could not obtain to hash (a data set too large to
/// ship, with no published sha256). Such a manifest plans and keys normally but refuses to load
/// until a user who has the file pins its hash.
pub const UNPINNED: &str = "unpinned";

fn verify_file(root: &Path, f: &FileEntry) -> Result<(), DataError> {
    let path = root.join(&f.path);
    if !path.is_file() {
        let how = match &f.url {
            Some(url) => format!("data file not found: download it from {url} with `reprise fetch SPEC --profile PROFILE`"),
            None => "data file not found: obtain it from the manifest's `source` and place it at this path".to_string(),
        };
        return Err(DataError::Io { path: path.clone(), source: std::io::Error::new(std::io::ErrorKind::NotFound, how) });
    }
    let actual = sha256_file(&path)?;
    if f.sha256 == UNPINNED {
        return Err(DataError::Manifest {
            path: path.clone(),
            message: format!("the manifest pins no sha256 for this file; its sha256 is {actual}"),
            hint: Some(format!("check the file against its source, then write `sha256 = \"{actual}\"` into the manifest")),
        });
    }
    if actual != f.sha256 {
        return Err(DataError::HashMismatch { path, expected: f.sha256.clone(), actual });
    }
    Ok(())
}

/// `acc` followed by `next` (read from `path`); both must have the same image shape.
fn append(mut acc: ImageSet, next: ImageSet, path: &Path) -> Result<ImageSet, DataError> {
    let a = (acc.channels, acc.height, acc.width);
    let b = (next.channels, next.height, next.width);
    if a != b {
        return Err(DataError::format(path, format!("images are {}×{}×{} but the data set's earlier files hold {}×{}×{}", b.0, b.1, b.2, a.0, a.1, a.2)));
    }
    acc.pixels.extend(next.pixels);
    acc.labels.extend(next.labels);
    acc.num_classes = acc.num_classes.max(next.num_classes);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    fn manifest_path(name: &str) -> PathBuf {
        crate_root().join("data-manifests").join(name)
    }

    /// Issue 20, defect 4: a manifest name cannot lead out of `data-manifests/`.
    #[test]
    fn issue_20_named_manifests_stay_in_their_folder() {
        let m = Manifest::load_named(crate_root(), "optdigits-8x8").unwrap();
        assert_eq!(m.name, "optdigits-8x8");
        for bad in ["../reports/neural-collapse", "/etc/passwd", "a.b", ""] {
            let e = Manifest::load_named(crate_root(), bad).unwrap_err().to_string();
            assert!(e.contains("must be a non-empty name"), "{bad}: {e}");
        }
        let e = Manifest::load_named(crate_root(), "optdigits-8x9").unwrap_err().to_string();
        assert!(e.contains("not found") && e.contains("did you mean `optdigits-8x8`?"), "{e}");
    }

    #[test]
    fn embedded_mnist_5k_loads_balanced() {
        let m = Manifest::load(&manifest_path("mnist-5k.toml")).unwrap();
        assert_eq!(m.name, "mnist-5k");
        m.verify(crate_root()).unwrap();
        let set = m.load_images(crate_root(), None).unwrap();
        assert_eq!((set.len(), set.channels, set.height, set.width), (5000, 1, 28, 28));
        assert_eq!(set.num_classes, 10);
        assert_eq!(set.class_counts(), vec![500; 10]);
        assert!(set.pixels.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(set.pixels.iter().cloned().fold(0.0f32, f32::max), 1.0);
        assert_eq!(m.load_images(crate_root(), Some("all")).unwrap(), set);
    }

    #[test]
    fn embedded_optdigits_loads() {
        let m = Manifest::load(&manifest_path("optdigits-8x8.toml")).unwrap();
        let set = m.load_images(crate_root(), None).unwrap();
        assert_eq!((set.len(), set.channels, set.height, set.width), (1797, 1, 8, 8));
        let counts = set.class_counts();
        assert_eq!(counts.len(), 10);
        assert!(counts.iter().all(|&c| (174..=183).contains(&c)), "{counts:?}");
        assert!(set.pixels.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(set.pixels.iter().cloned().fold(0.0f32, f32::max), 1.0);
    }

    #[test]
    fn load_all_finds_both_embedded_manifests() {
        let all = Manifest::load_all(&crate_root().join("data-manifests")).unwrap();
        let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        assert!(names.contains(&"mnist-5k") && names.contains(&"optdigits-8x8"), "{names:?}");
    }

    #[test]
    fn altered_hash_is_a_mismatch_naming_both_hashes() {
        let text = std::fs::read_to_string(manifest_path("optdigits-8x8.toml")).unwrap();
        let real = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";
        let fake = "00f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";
        assert!(text.contains(real));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("altered.toml");
        std::fs::write(&p, text.replace(real, fake)).unwrap();
        let m = Manifest::load(&p).unwrap();
        let err = m.load_images(crate_root(), None).unwrap_err();
        let msg = err.to_string();
        match err {
            DataError::HashMismatch { path, expected, actual } => {
                assert!(path.ends_with("data/optdigits_8x8.csv.gz"));
                assert_eq!((expected.as_str(), actual.as_str()), (fake, real));
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        assert!(msg.contains(real) && msg.contains(fake) && msg.contains("optdigits_8x8.csv.gz"), "{msg}");
        assert!(msg.contains("re-download") && msg.contains("update"), "{msg}");
        assert!(matches!(m.verify(crate_root()), Err(DataError::HashMismatch { .. })));
    }

    const MINIMAL: &str = r#"
name = "tiny"
description = "three 2x2 images"
classes = ["a", "b", "c"]
licence = "CC0"
source = "made up in a test"
citation = "none"

[format]
kind = "csv-gz"
channels = 1
height = 2
width = 2
max_value = 4.0

[[files]]
path = "d/tiny.csv"
sha256 = "SHA"
role = "train"
"#;

    /// A tempdir holding `d/tiny.csv` with `csv`, and MINIMAL pointing at it.
    fn tiny_setup(csv: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let p = dir.path().join("d/tiny.csv");
        std::fs::write(&p, csv).unwrap();
        let text = MINIMAL.replace("SHA", &sha256_file(&p).unwrap());
        (dir, text)
    }

    fn manifest_error(text: &str) -> (String, Option<String>) {
        match Manifest::from_toml_str(text, Path::new("m/x.toml")).unwrap_err() {
            e @ DataError::Manifest { .. } => {
                let msg = e.to_string();
                assert!(msg.starts_with("m/x.toml: "), "{msg}");
                let DataError::Manifest { hint, .. } = e else { unreachable!() };
                (msg, hint)
            }
            other => panic!("expected a Manifest error, got {other:?}"),
        }
    }

    #[test]
    fn loads_a_minimal_manifest_by_role() {
        let (dir, text) = tiny_setup("0,1,2,3,1\n4,4,0,0,0\n");
        let m = Manifest::from_toml_str(&text, Path::new("tiny.toml")).unwrap();
        let set = m.load_images(dir.path(), Some("train")).unwrap();
        assert_eq!((set.len(), set.num_classes), (2, 3));
        assert_eq!(set.class_counts(), vec![1, 1, 0]);
        let err = m.load_images(dir.path(), Some("trian")).unwrap_err();
        assert!(matches!(&err, DataError::Manifest { hint: Some(h), .. } if h.contains("\"train\"")), "{err}");
    }

    #[test]
    fn labels_beyond_the_class_list_are_an_error() {
        let (dir, text) = tiny_setup("0,1,2,3,1\n4,4,0,0,3\n");
        let m = Manifest::from_toml_str(&text, Path::new("tiny.toml")).unwrap();
        let msg = m.load_images(dir.path(), None).unwrap_err().to_string();
        assert!(msg.contains("tiny.csv") && msg.contains("image 1") && msg.contains("label 3"), "{msg}");
    }

    #[test]
    fn unknown_keys_name_line_column_and_suggest() {
        let (_dir, text) = tiny_setup("0,0,0,0,0\n");
        let (msg, hint) = manifest_error(&text.replace("licence =", "licnce ="));
        assert!(msg.contains("line 5, column 1") && msg.contains("unknown field `licnce`"), "{msg}");
        assert_eq!(hint.as_deref(), Some("did you mean `licence`?"));
        assert!(msg.contains("did you mean `licence`?"), "{msg}");

        // Reported where the key is written (line 11), not at the `[format]` header.
        let (msg, hint) = manifest_error(&text.replace("channels =", "chanels ="));
        assert!(msg.contains("line 11, column 1: unknown field `chanels`"), "{msg}");
        assert_eq!(hint.as_deref(), Some("did you mean `channels`?"));

        let (msg, hint) = manifest_error(&text.replace("role =", "rol ="));
        assert!(msg.contains("rol"), "{msg}");
        assert_eq!(hint.as_deref(), Some("did you mean `role`?"));

        let (msg, hint) = manifest_error(&text.replace("\"csv-gz\"", "\"csv-zg\""));
        assert!(msg.contains("csv-zg"), "{msg}");
        assert_eq!(hint.as_deref(), Some("did you mean `csv-gz`?"));

        let (_, hint) = manifest_error(&text.replace("\"csv-gz\"", "\"csv\""));
        assert_eq!(hint.as_deref(), Some("did you mean `csv-gz`?"));

        let (_, hint) = manifest_error(&text.replace("licence =", "frobnicate ="));
        assert_eq!(hint, None);
        let (msg, _) = manifest_error(&text.replace("citation = \"none\"", ""));
        assert!(msg.contains("citation"), "{msg}");
    }

    #[test]
    fn validation_errors() {
        let (_dir, text) = tiny_setup("0,0,0,0,0\n");
        let sha = text.lines().find(|l| l.starts_with("sha256")).unwrap().to_string();
        let (msg, hint) = manifest_error(&text.replace(&sha, "sha256 = \"abc\""));
        assert!(msg.contains("files[0] (d/tiny.csv): sha256 must be 64"), "{msg}");
        assert!(hint.unwrap().contains("sha256sum d/tiny.csv"));
        let (msg, _) = manifest_error(&text.replace("d/tiny.csv", "../tiny.csv"));
        assert!(msg.contains("must be relative"), "{msg}");
        let (msg, _) = manifest_error(&text.replace("max_value = 4.0", "max_value = 0.0"));
        assert!(msg.contains("max_value"), "{msg}");
        let (msg, _) = manifest_error(&text.replace("[\"a\", \"b\", \"c\"]", "[\"a\", \"a\"]"));
        assert!(msg.contains("appears twice"), "{msg}");
    }

    #[test]
    fn content_id_ignores_cosmetics_but_not_content() {
        let (_dir, text) = tiny_setup("0,0,0,0,0\n");
        let id = |t: &str| Manifest::from_toml_str(t, Path::new("x.toml")).unwrap().content_id();
        let base = id(&text);
        assert_eq!(base.len(), 64);
        assert_eq!(id(&text.replace("d/tiny.csv", "elsewhere/tiny.csv")), base);
        assert_eq!(id(&text.replace("three 2x2 images", "other words")), base);
        assert_eq!(id(&text.replace("name = \"tiny\"", "name = \"renamed\"")), base);
        assert_ne!(id(&text.replace("max_value = 4.0", "max_value = 5.0")), base);
        assert_ne!(id(&text.replace("role = \"train\"", "role = \"test\"")), base);
        let sha = text.lines().find(|l| l.starts_with("sha256")).unwrap().to_string();
        assert_ne!(id(&text.replace(&sha, &format!("sha256 = \"{}\"", "0".repeat(64)))), base);
        let real = Manifest::load(&manifest_path("mnist-5k.toml")).unwrap();
        assert_eq!(real.content_id(), real.content_id());
        assert_ne!(real.content_id(), base);
    }

    #[test]
    fn idx_manifest_reads_split_roles() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1];
        images.extend([0u8, 255]);
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 1, 0];
        std::fs::write(dir.path().join("ti"), &images).unwrap();
        std::fs::write(dir.path().join("tl"), &labels).unwrap();
        let sha = |n: &str| sha256_file(&dir.path().join(n)).unwrap();
        let text = format!(
            r#"name = "idx"
description = ""
classes = ["x", "y"]
licence = ""
source = ""
citation = ""
format = {{ kind = "idx" }}
files = [
  {{ path = "ti", sha256 = "{}", role = "train-images" }},
  {{ path = "tl", sha256 = "{}", role = "train-labels" }},
]
"#,
            sha("ti"),
            sha("tl")
        );
        let m = Manifest::from_toml_str(&text, Path::new("idx.toml")).unwrap();
        let set = m.load_images(dir.path(), Some("train")).unwrap();
        assert_eq!((set.labels.clone(), set.pixels.clone(), set.num_classes), (vec![1, 0], vec![0.0, 1.0], 2));
        let err = m.load_images(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("no file with role \"images\""), "{err}");
        let (msg, _) = manifest_error(&text.replace("kind = \"idx\"", "kind = \"idx\", extra = 1"));
        assert!(msg.contains("extra"), "{msg}");
    }

    #[test]
    fn cifar_manifest_selects_files_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let record = |label: u8| {
            let mut r = vec![label];
            r.extend([label; 3072]);
            r
        };
        std::fs::write(dir.path().join("b1"), [record(1), record(2)].concat()).unwrap();
        std::fs::write(dir.path().join("b2"), record(3)).unwrap();
        std::fs::write(dir.path().join("t"), record(9)).unwrap();
        let sha = |n: &str| sha256_file(&dir.path().join(n)).unwrap();
        let classes: Vec<String> = (0..10).map(|i| format!("\"c{i}\"")).collect();
        let text = format!(
            r#"name = "cifar"
description = ""
classes = [{}]
licence = ""
source = ""
citation = ""
format = {{ kind = "cifar-binary", variant = "cifar10" }}
files = [
  {{ path = "b1", sha256 = "{}", role = "train" }},
  {{ path = "b2", sha256 = "{}", role = "train" }},
  {{ path = "t", sha256 = "{}", role = "test" }},
]
"#,
            classes.join(", "),
            sha("b1"),
            sha("b2"),
            sha("t")
        );
        let m = Manifest::from_toml_str(&text, Path::new("cifar.toml")).unwrap();
        assert_eq!(m.roles(), vec!["train", "test"]);
        let train = m.load_images(dir.path(), Some("train")).unwrap();
        assert_eq!((train.labels.clone(), train.num_classes), (vec![1, 2, 3], 10));
        assert_eq!(train.pixels.len(), 3 * 3072);
        assert_eq!(m.load_images(dir.path(), Some("test")).unwrap().labels, vec![9]);
        assert_eq!(m.load_images(dir.path(), None).unwrap().len(), 4);
        let (msg, _) = manifest_error(&text.replace("\"cifar10\"", "\"cifar100-fine\""));
        assert!(msg.contains("100 classes but `classes` lists 10"), "{msg}");
    }

    #[test]
    fn sha256_of_known_bytes_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let err = sha256_file(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("nope"));
    }

    #[test]
    fn edit_distance_and_closest() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(closest("widht", ["width", "height"]), Some("width"));
        assert_eq!(closest("zzzzzz", ["width", "height"]), None);
    }

    // ---- The paper formats: mat-v5, cub-200, image-list ----

    /// A manifest of `format` over `files` (path, role) in `dir`, each pinned to its sha256.
    fn pinned_manifest(dir: &Path, classes: &str, format: &str, files: &[(&str, &str)]) -> Manifest {
        let entries: Vec<String> = files.iter().map(|(p, r)| format!("{{ path = \"{p}\", sha256 = \"{}\", role = \"{r}\" }}", sha256_file(&dir.join(p)).unwrap())).collect();
        let text = format!("name = \"t\"\ndescription = \"\"\n{classes}\nlicence = \"\"\nsource = \"\"\ncitation = \"\"\nformat = {format}\nfiles = [\n{}\n]\n", entries.join(",\n"));
        Manifest::from_toml_str(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn paper_manifests_parse_and_wait_for_their_files() {
        let svhn = Manifest::load_named(crate_root(), "svhn").unwrap();
        assert_eq!(svhn.format, FormatSpec::MatV5 { images: "X".into(), labels: "y".into(), label_offset: 0, label_modulo: Some(10) });
        assert_eq!((svhn.classes.len(), svhn.roles()), (10, vec!["train", "test"]));
        assert!(svhn.classes.iter().enumerate().all(|(i, c)| *c == i.to_string()));
        let cub = Manifest::load_named(crate_root(), "cub-200").unwrap();
        assert_eq!((cub.format.kind(), cub.classes.len(), cub.roles()), ("cub-200", 200, vec!["images", "labels"]));
        assert_eq!(cub.format, FormatSpec::Cub200 { size: Some([84, 84]) });
        let mini = Manifest::load_named(crate_root(), "mini-imagenet").unwrap();
        assert_eq!((mini.format.kind(), mini.classes.len(), mini.roles()), ("image-list", 100, vec!["train", "valid", "test"]));
        for m in [&svhn, &cub, &mini] {
            assert!(m.files.iter().all(|f| f.sha256 == UNPINNED), "{}", m.name);
            // Not shipped: loading says where the file is missing (and how to get it when it has a url).
            let e = m.load_images(crate_root(), None).unwrap_err().to_string();
            assert!(e.contains("data file not found") || e.contains("pins no sha256"), "{e}");
        }
        let e = svhn.load_images(crate_root(), Some("test")).unwrap_err().to_string();
        assert!(e.contains("test_32x32.mat") && e.contains("reprise fetch"), "{e}");
    }

    #[test]
    fn mat_manifest_reads_svhn_style_files() {
        use super::super::mat::tests as fx;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.mat"), fx::file(fx::LE, &[fx::x_var(fx::LE), fx::y_var(fx::LE)])).unwrap();
        let classes: Vec<String> = (0..10).map(|i| format!("\"{i}\"")).collect();
        let classes = format!("classes = [{}]", classes.join(", "));
        let m = pinned_manifest(dir.path(), &classes, "{ kind = \"mat-v5\", images = \"X\", labels = \"y\", label_modulo = 10 }", &[("a.mat", "test")]);
        let set = m.load_images(dir.path(), Some("test")).unwrap();
        assert_eq!((set.labels.clone(), set.num_classes, set.channels, set.height, set.width), (vec![0, 3, 1, 0], 10, 3, 2, 3));
        // Without the modulo, label 10 is out of range for 10 classes: an error, not a wrap.
        let m = pinned_manifest(dir.path(), &classes, "{ kind = \"mat-v5\", images = \"X\", labels = \"y\" }", &[("a.mat", "test")]);
        let e = m.load_images(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("a.mat") && e.contains("label 10"), "{e}");
        // A variable the file lacks.
        let m = pinned_manifest(dir.path(), &classes, "{ kind = \"mat-v5\", images = \"images\", labels = \"y\" }", &[("a.mat", "test")]);
        let e = m.load_images(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("a.mat") && e.contains("no variable \"images\""), "{e}");
    }

    #[test]
    fn cub_manifest_reads_the_list_pair() {
        use super::super::formats::tests as fx;
        let dir = tempfile::tempdir().unwrap();
        let cub = dir.path().join("CUB_200_2011");
        fx::folder_images(&cub.join("images"));
        std::fs::write(cub.join("images.txt"), "1 001.A/a.png\n2 002.B/b.png\n3 001.A/c.png\n").unwrap();
        std::fs::write(cub.join("image_class_labels.txt"), "1 1\n2 2\n3 1\n").unwrap();
        let files = [("CUB_200_2011/images.txt", "images"), ("CUB_200_2011/image_class_labels.txt", "labels")];
        let m = pinned_manifest(dir.path(), "num_classes = 200", "{ kind = \"cub-200\", size = [2, 2] }", &files);
        let set = m.load_images(dir.path(), None).unwrap();
        assert_eq!((set.labels.clone(), set.num_classes), (vec![0, 1, 0], 200));
        fx::assert_pixels_close(&set.pixels, &fx::folder_expected().concat());
        // Split pairs are `<split>-images` and `<split>-labels`, as for idx.
        let split = [("CUB_200_2011/images.txt", "test-images"), ("CUB_200_2011/image_class_labels.txt", "test-labels")];
        let m = pinned_manifest(dir.path(), "num_classes = 200", "{ kind = \"cub-200\", size = [2, 2] }", &split);
        assert_eq!(m.load_images(dir.path(), Some("test")).unwrap().len(), 3);
        assert!(m.load_images(dir.path(), None).unwrap_err().to_string().contains("no file with role \"images\""));
        // Labels beyond the manifest's classes.
        let m = pinned_manifest(dir.path(), "classes = [\"a\"]", "{ kind = \"cub-200\", size = [2, 2] }", &files);
        let e = m.load_images(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("image_class_labels.txt") && e.contains("label 1"), "{e}");
    }

    #[test]
    fn image_list_manifest_numbers_classes_by_name_or_first_appearance() {
        use super::super::formats::tests as fx;
        let dir = tempfile::tempdir().unwrap();
        fx::folder_images(&dir.path().join("lists/images"));
        std::fs::write(dir.path().join("lists/train.csv"), "filename,label\n001.A/a.png,n05\n002.B/b.png,n03\n").unwrap();
        std::fs::write(dir.path().join("lists/test.csv"), "filename,label\n001.A/c.png,n01\n001.A/a.png,n03\n").unwrap();
        let files = [("lists/train.csv", "train"), ("lists/test.csv", "test")];
        let format = "{ kind = \"image-list\", size = [2, 2] }";
        // Numbered classes: first appearance over all lists in manifest order (n05 0, n03 1, n01 2),
        // the same whichever role is loaded.
        let m = pinned_manifest(dir.path(), "num_classes = 3", format, &files);
        assert_eq!(m.load_images(dir.path(), Some("test")).unwrap().labels, vec![2, 1]);
        let all = m.load_images(dir.path(), None).unwrap();
        assert_eq!((all.labels.clone(), all.num_classes), (vec![0, 1, 2, 1], 3));
        let e = fx::folder_expected();
        fx::assert_pixels_close(&all.pixels, &[e[0].clone(), e[1].clone(), e[2].clone(), e[0].clone()].concat());
        // Named classes: the position in `classes`.
        let m = pinned_manifest(dir.path(), "classes = [\"n01\", \"n03\", \"n05\"]", format, &files);
        assert_eq!(m.load_images(dir.path(), None).unwrap().labels, vec![2, 1, 0, 1]);
        let m = pinned_manifest(dir.path(), "classes = [\"n01\", \"n05\"]", format, &files);
        let e = m.load_images(dir.path(), Some("train")).unwrap_err().to_string();
        assert!(e.contains("train.csv") && e.contains("line 3") && e.contains("\"n03\""), "{e}");
        // Numbered labels keep their numbers.
        std::fs::write(dir.path().join("lists/num.csv"), "filename,label\n001.A/a.png,2\n002.B/b.png,0\n").unwrap();
        let m = pinned_manifest(dir.path(), "num_classes = 3", format, &[("lists/num.csv", "all")]);
        assert_eq!(m.load_images(dir.path(), None).unwrap().labels, vec![2, 0]);
        // Too few numbered classes for the labels found.
        let m = pinned_manifest(dir.path(), "num_classes = 2", format, &files);
        assert!(m.load_images(dir.path(), None).unwrap_err().to_string().contains("label 2"));
    }

    #[test]
    fn paper_format_parameters_are_validated_and_keyed() {
        let base = |format: &str| {
            format!("name = \"t\"\ndescription = \"\"\nnum_classes = 10\nlicence = \"\"\nsource = \"\"\ncitation = \"\"\nformat = {format}\nfiles = [{{ path = \"a\", sha256 = \"unpinned\", role = \"all\" }}]\n")
        };
        let (msg, hint) = manifest_error(&base("{ kind = \"mat-v5\", images = \"X\", labels = \"y\", label_modulo = 0 }"));
        assert!(msg.contains("label_modulo must be positive") && hint.is_some(), "{msg}");
        let (msg, _) = manifest_error(&base("{ kind = \"mat-v5\", images = \"\", labels = \"y\" }"));
        assert!(msg.contains("must name the MAT-file's variables"), "{msg}");
        let (msg, _) = manifest_error(&base("{ kind = \"mat-v5\", images = \"X\" }"));
        assert!(msg.contains("labels"), "{msg}");
        let (msg, hint) = manifest_error(&base("{ kind = \"mat-v5\", images = \"X\", labels = \"y\", label_modulus = 10 }"));
        assert!(msg.contains("label_modulus"), "{msg}");
        assert_eq!(hint.as_deref(), Some("did you mean `label_modulo`?"));
        let (_, hint) = manifest_error(&base("{ kind = \"mat-v7\", images = \"X\", labels = \"y\" }"));
        assert_eq!(hint.as_deref(), Some("did you mean `mat-v5`?"));
        let (msg, _) = manifest_error(&base("{ kind = \"cub-200\", size = [0, 84] }"));
        assert!(msg.contains("size must be positive"), "{msg}");
        let (msg, _) = manifest_error(&base("{ kind = \"image-list\", image_dir = \"../elsewhere\" }"));
        assert!(msg.contains("image_dir \"../elsewhere\""), "{msg}");

        let id = |format: &str| Manifest::from_toml_str(&base(format), Path::new("x.toml")).unwrap().content_id();
        let svhn = id("{ kind = \"mat-v5\", images = \"X\", labels = \"y\", label_modulo = 10 }");
        assert_ne!(svhn, id("{ kind = \"mat-v5\", images = \"X\", labels = \"y\" }"));
        assert_ne!(svhn, id("{ kind = \"mat-v5\", images = \"X\", labels = \"y\", label_modulo = 10, label_offset = 1 }"));
        assert_eq!(svhn, id("{ kind = \"mat-v5\", labels = \"y\", label_modulo = 10, images = \"X\", label_offset = 0 }"));
        assert_ne!(id("{ kind = \"cub-200\", size = [84, 84] }"), id("{ kind = \"cub-200\" }"));
        let list = id("{ kind = \"image-list\" }");
        assert_eq!(list, id("{ kind = \"image-list\", image_dir = \"images\", path_column = \"filename\", label_column = \"label\" }"));
        assert_ne!(list, id("{ kind = \"image-list\", image_dir = \"jpg\" }"));
    }

    /// CIFAR-FS's class lists: every name is the CIFAR-100 fine class at its index, and the
    /// three lists are disjoint, 64 / 16 / 20 classes, all 100 together.
    #[test]
    fn cifar_fs_split_lists_match_cifar100() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Split {
            names: Vec<String>,
            indices: Vec<usize>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Splits {
            train: Split,
            valid: Split,
            test: Split,
        }
        let text = std::fs::read_to_string(manifest_path("splits/cifar-fs.toml")).unwrap();
        let splits: Splits = toml::from_str(&text).unwrap();
        let cifar = Manifest::load_named(crate_root(), "cifar100").unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for (split, size) in [(&splits.train, 64), (&splits.valid, 16), (&splits.test, 20)] {
            assert_eq!((split.names.len(), split.indices.len()), (size, size));
            for (name, &i) in split.names.iter().zip(&split.indices) {
                assert_eq!(&cifar.classes[i], name, "index {i}");
                assert!(seen.insert(i), "class {name} ({i}) is in two lists");
            }
        }
        assert_eq!(seen.len(), 100);
        // Spot checks against the published lists.
        assert_eq!((splits.train.names[0].as_str(), splits.valid.names[0].as_str(), splits.test.names[19].as_str()), ("train", "otter", "worm"));
    }
}
