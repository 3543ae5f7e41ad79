//! Image data sets: reading them from the formats papers ship them in, pinning them by hash, and
//! deriving the splits and subsets that experiments train on.
//!
//! A table in a paper is only reproducible if the exact bytes it was computed from are known, so
//! every data set is described by a manifest (`data-manifests/*.toml`) that pins each file by
//! sha256 and names the format it is stored in. Loading always verifies first and ends in one
//! in-memory representation, [`ImageSet`], whatever the source format. Derived data (balanced
//! splits, long-tailed subsets) are pure, seeded functions of the labels, so they need no files of
//! their own and can be recomputed anywhere.
//!
//! - [`formats`]: loaders for CSV (optionally gzipped), MNIST IDX, CIFAR binary, Parquet
//!   image tables, and image folders with their lists (CUB-200-2011's metadata, CSV image lists).
//! - [`mat`]: MATLAB Level-5 MAT-files (SVHN's `.mat`).
//! - [`manifest`]: the TOML manifests, hash verification and the content id used in cache keys.
//! - [`derived`]: seeded splits and long-tail subsets as index lists.

pub mod derived;
pub mod episodes;
pub mod fetch;
pub mod formats;
pub mod manifest;
pub mod mat;
pub mod transform;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use derived::{balanced_split, long_tail_counts, long_tail_subset, DeriveError};
pub use formats::{load_cifar, load_csv, load_idx, load_parquet_images, CifarVariant, CsvLayout};
pub use manifest::{sha256_file, FileEntry, FormatSpec, Manifest};

/// Everything that can go wrong while reading, verifying or deriving data. Every variant that
/// concerns a file names it, so the message alone says where to look.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file's bytes are not the ones the manifest pins.
    #[error(
        "{}: sha256 mismatch: the manifest expects {expected} but the file hashes to {actual}; \
         re-download the file, or if this new version is intended, update its sha256 in the manifest",
        path.display()
    )]
    HashMismatch { path: PathBuf, expected: String, actual: String },

    /// The file's bytes do not follow its format; `message` says where (line, record or byte
    /// offset) and what was expected there.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },

    /// A manifest is malformed or inconsistent; `hint` suggests a fix when one is known.
    #[error("{}: {message}{}", path.display(), hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Manifest { path: PathBuf, message: String, hint: Option<String> },

    /// A derived split or subset cannot be formed from these labels.
    #[error(transparent)]
    Derive(#[from] DeriveError),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn format(path: &Path, message: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), message: message.into() }
    }
}

/// A labelled set of images of one shape, held in memory as `f32` in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `N·C·H·W` values, row-major (image, channel, row, column), scaled to `[0, 1]`.
    pub pixels: Vec<f32>,
    /// One label per image, each below `num_classes`.
    pub labels: Vec<u32>,
    pub num_classes: usize,
}

/// Name under which a set read from bytes (not a file) is reported in errors.
const IN_MEMORY: &str = "<in-memory safetensors>";

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image: `C·H·W`.
    pub fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i` (`C·H·W` values). Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[f32] {
        let d = self.dim();
        &self.pixels[i * d..(i + 1) * d]
    }

    /// The images at `idx`, in that order (repeats allowed). Panics on an index out of range, like
    /// slice indexing: indices come from this set's own splits.
    pub fn subset(&self, idx: &[usize]) -> ImageSet {
        let d = self.dim();
        let mut pixels = Vec::with_capacity(idx.len() * d);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        ImageSet { channels: self.channels, height: self.height, width: self.width, pixels, labels, num_classes: self.num_classes }
    }

    /// Number of images of each class, `num_classes` entries (labels at or above `num_classes`
    /// are not counted; loaders never produce them).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.num_classes];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// The set as one safetensors file: tensors `pixels` (f32 `[N, C, H, W]`) and `labels`
    /// (u32 `[N]`), with `channels`, `height`, `width`, `num_classes` and `len` in the metadata.
    pub fn to_safetensors_bytes(&self) -> Vec<u8> {
        let pixel_bytes: Vec<u8> = self.pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let label_bytes: Vec<u8> = self.labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = self.len();
        // safetensors writes its metadata map in the map's iteration order, which for a
        // HashMap changes from run to run; one entry holding sorted JSON keeps the bytes (and so
        // the cache's content hashes) identical across runs.
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("format", "reprise-imageset-v1".to_string());
        fields.insert("channels", self.channels.to_string());
        fields.insert("height", self.height.to_string());
        fields.insert("width", self.width.to_string());
        fields.insert("num_classes", self.num_classes.to_string());
        fields.insert("len", n.to_string());
        let mut meta = HashMap::new();
        meta.insert("imageset".to_string(), serde_json::to_string(&fields).unwrap_or_default());
        // The views below are built from this set's own vectors with the shapes they have, so
        // `TensorView::new` and `serialize` can only fail if `pixels.len() != N·C·H·W`, which
        // every constructor in this module upholds.
        let pixels = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, self.channels, self.height, self.width], &pixel_bytes).expect("ImageSet invariant: pixels.len() == N*C*H*W");
        let labels = safetensors::tensor::TensorView::new(safetensors::Dtype::U32, vec![n], &label_bytes).expect("labels view always matches its own length");
        safetensors::serialize([("labels", labels), ("pixels", pixels)], Some(meta)).expect("serialising two consistent views cannot fail")
    }

    /// Reads a set written by [`ImageSet::to_safetensors_bytes`].
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<ImageSet, DataError> {
        Self::from_safetensors_bytes_at(bytes, Path::new(IN_MEMORY))
    }

    /// Like [`ImageSet::from_safetensors_bytes`], naming `origin` in errors.
    pub fn from_safetensors_bytes_at(bytes: &[u8], origin: &Path) -> Result<ImageSet, DataError> {
        let bad = |m: String| DataError::format(origin, m);
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a valid safetensors header: {e}")))?;
        let raw = header.metadata().as_ref().and_then(|m| m.get("imageset")).ok_or_else(|| bad("safetensors metadata is missing (expected channels, height, width, num_classes)".into()))?;
        let meta: std::collections::BTreeMap<String, String> = serde_json::from_str(raw).map_err(|e| bad(format!("safetensors metadata `imageset` is not valid JSON: {e}")))?;
        let field = |key: &str| -> Result<usize, DataError> {
            let v = meta.get(key).ok_or_else(|| bad(format!("safetensors metadata lacks `{key}`")))?;
            v.parse::<usize>().map_err(|_| bad(format!("safetensors metadata `{key}` should be a non-negative integer, found {v:?}")))
        };
        let (channels, height, width, num_classes) = (field("channels")?, field("height")?, field("width")?, field("num_classes")?);
        let pixels = st.tensor("pixels").map_err(|e| bad(format!("tensor `pixels`: {e}")))?;
        let labels = st.tensor("labels").map_err(|e| bad(format!("tensor `labels`: {e}")))?;
        if pixels.dtype() != safetensors::Dtype::F32 || labels.dtype() != safetensors::Dtype::U32 {
            return Err(bad(format!("expected `pixels` F32 and `labels` U32, found {:?} and {:?}", pixels.dtype(), labels.dtype())));
        }
        let n = labels.shape().first().copied().unwrap_or(0);
        if labels.shape().len() != 1 || pixels.shape() != [n, channels, height, width] {
            return Err(bad(format!("shapes disagree: `labels` {:?}, `pixels` {:?}, metadata C×H×W = {channels}×{height}×{width}", labels.shape(), pixels.shape())));
        }
        let pixels: Vec<f32> = pixels.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let labels: Vec<u32> = labels.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
            return Err(bad(format!("label {l} of image {i} is out of range for {num_classes} classes")));
        }
        Ok(ImageSet { channels, height, width, pixels, labels, num_classes })
    }

    /// Writes the set to `path` as safetensors.
    pub fn write_safetensors(&self, path: &Path) -> Result<(), DataError> {
        std::fs::write(path, self.to_safetensors_bytes()).map_err(|e| DataError::io(path, e))
    }

    /// Reads a set from a safetensors file written by [`ImageSet::write_safetensors`].
    pub fn read_safetensors(path: &Path) -> Result<ImageSet, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::from_safetensors_bytes_at(&bytes, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ImageSet {
        ImageSet { channels: 1, height: 2, width: 2, pixels: (0..12).map(|v| v as f32 / 11.0).collect(), labels: vec![2, 0, 2], num_classes: 3 }
    }

    #[test]
    fn accessors_and_subset() {
        let s = tiny();
        assert_eq!(s.len(), 3);
        assert!(!s.is_empty());
        assert_eq!(s.dim(), 4);
        assert_eq!(s.class_counts(), vec![1, 0, 2]);
        let sub = s.subset(&[2, 0]);
        assert_eq!(sub.labels, vec![2, 2]);
        assert_eq!(&sub.pixels[..4], s.image(2));
        assert_eq!(&sub.pixels[4..], s.image(0));
    }

    #[test]
    fn safetensors_round_trip() {
        let s = tiny();
        let bytes = s.to_safetensors_bytes();
        assert_eq!(ImageSet::from_safetensors_bytes(&bytes).unwrap(), s);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("set.safetensors");
        s.write_safetensors(&p).unwrap();
        assert_eq!(ImageSet::read_safetensors(&p).unwrap(), s);
    }

    #[test]
    fn safetensors_garbage_is_an_error() {
        let err = ImageSet::from_safetensors_bytes(b"not safetensors").unwrap_err();
        assert!(err.to_string().contains(IN_MEMORY), "{err}");
        let bytes = tiny().to_safetensors_bytes();
        let err = ImageSet::from_safetensors_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{err}");
    }
}
