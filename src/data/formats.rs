//! Loaders for the file formats image data sets are distributed in, each ending in an
//! [`ImageSet`].
//!
//! Papers' data come as whatever their authors had: CSV dumps (often gzipped), MNIST's IDX
//! files, CIFAR's fixed-size binary records, or Parquet tables of encoded PNG/JPEG images (the
//! Hugging Face `datasets` layout). Each loader checks the bytes as it reads them and reports a
//! [`DataError`] that names the file and the exact place (line, record, row or byte offset) that
//! broke, never panicking on malformed input: a bad download should cost a reader one error
//! message, not a debugging session.
//!
//! Pixel values are always scaled to `[0, 1]`. Loaders that cannot know the number of classes
//! from the format (CSV, IDX, Parquet) set `num_classes` to the largest label + 1; a manifest then
//! checks the labels against its class list.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use polars::prelude::{DataType, ParquetReader, SerReader};

use super::{DataError, ImageSet};

/// The first two bytes of every gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A label above this, in a format that does not fix the number of classes, is taken to be a
/// misread column rather than a class: no data set here has anywhere near 65,536 classes.
const MAX_INFERRED_CLASSES: u64 = 1 << 16;

/// Reads `path` whole, gunzipping it when it starts with the gzip magic. A `.gz` name on a file
/// without that magic is an error, so a half-finished or mislabelled download is caught here.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let gz_name = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| {
            DataError::format(
                path,
                format!(
                    "gzip stream is corrupt or truncated ({} compressed bytes, failed after \
                         {} decompressed bytes): {e}; re-download the file",
                    raw.len(),
                    out.len()
                ),
            )
        })?;
        Ok(out)
    } else if gz_name {
        Err(DataError::format(
            path,
            format!(
                "byte offset 0: the name ends in .gz but the file does not start with the gzip \
                 magic bytes 1f 8b (found {})",
                hex_prefix(&raw)
            ),
        ))
    } else {
        Ok(raw)
    }
}

/// Up to the first 8 bytes, in hex, for error messages ("empty file" when there are none).
fn hex_prefix(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "an empty file".to_string()
    } else {
        let n = bytes.len().min(8);
        let hex: Vec<String> = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
        hex.join(" ")
    }
}

/// `num_classes` for labels whose class count the format does not state: the largest label + 1.
pub(super) fn inferred_classes(labels: &[u32]) -> usize {
    labels.iter().max().map_or(0, |&m| m as usize + 1)
}

/// How one CSV row maps to an image: `channels·height·width` pixel values, row-major
/// (channel, row, column), then the integer label in the last column. Pixels are divided by
/// `max_value`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CsvLayout {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub max_value: f32,
}

impl CsvLayout {
    fn pixels_per_row(&self, path: &Path) -> Result<usize, DataError> {
        let dim = self.channels.checked_mul(self.height).and_then(|d| d.checked_mul(self.width)).filter(|&d| d > 0);
        let dim = dim.ok_or_else(|| DataError::format(path, format!("invalid CSV layout {}×{}×{}: every dimension must be positive", self.channels, self.height, self.width)))?;
        if !(self.max_value.is_finite() && self.max_value > 0.0) {
            return Err(DataError::format(path, format!("invalid CSV layout: max_value must be a positive number, found {}", self.max_value)));
        }
        Ok(dim)
    }
}

/// Reads a headerless CSV (or gzipped CSV, detected by the `.gz` extension or the gzip magic) with
/// one image per line as described by `layout`. Blank lines are skipped; line numbers in errors
/// count every line from 1.
pub fn load_csv(path: &Path, layout: &CsvLayout) -> Result<ImageSet, DataError> {
    let dim = layout.pixels_per_row(path)?;
    let bytes = read_maybe_gz(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::format(path, format!("byte offset {}: not valid UTF-8 (expected CSV text of numbers)", e.valid_up_to())))?;
    let max = layout.max_value;
    let expected = dim + 1;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != expected {
            return Err(DataError::format(
                path,
                format!(
                    "line {lineno}: expected {expected} comma-separated fields ({}×{}×{} = {dim} \
                     pixels, then the label), found {}",
                    layout.channels,
                    layout.height,
                    layout.width,
                    fields.len()
                ),
            ));
        }
        for (j, field) in fields[..dim].iter().enumerate() {
            let tok = field.trim();
            let v = tok.parse::<f32>().ok().filter(|v| v.is_finite());
            let v = v.ok_or_else(|| {
                DataError::format(
                    path,
                    format!(
                        "line {lineno}, field {}: expected a pixel value (a number from 0 to \
                         {max}), found {tok:?}",
                        j + 1
                    ),
                )
            })?;
            if !(0.0..=max).contains(&v) {
                return Err(DataError::format(
                    path,
                    format!(
                        "line {lineno}, field {}: pixel value {v} is outside 0..={max} (the \
                         layout's max_value)",
                        j + 1
                    ),
                ));
            }
            pixels.push(v / max);
        }
        let tok = fields[dim].trim();
        let label = parse_label(tok).ok_or_else(|| {
            DataError::format(
                path,
                format!(
                    "line {lineno}, field {expected} (the label): expected a non-negative integer \
                     class label below {MAX_INFERRED_CLASSES}, found {tok:?}"
                ),
            )
        })?;
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(DataError::format(path, format!("no rows: expected at least one line of {expected} comma-separated fields")));
    }
    Ok(ImageSet { channels: layout.channels, height: layout.height, width: layout.width, pixels, num_classes: inferred_classes(&labels), labels })
}

/// A class label written as an integer, or as a float with no fractional part ("3.0"), as some
/// exporters do.
fn parse_label(tok: &str) -> Option<u32> {
    let v = match tok.parse::<u64>() {
        Ok(v) => v,
        Err(_) => {
            let f = tok.parse::<f64>().ok()?;
            if !(f >= 0.0 && f.fract() == 0.0 && f < MAX_INFERRED_CLASSES as f64) {
                return None;
            }
            f as u64
        }
    };
    if v < MAX_INFERRED_CLASSES {
        u32::try_from(v).ok()
    } else {
        None
    }
}

/// The dimensions and payload of an IDX file of unsigned bytes with `ndims` dimensions.
fn parse_idx<'a>(path: &Path, bytes: &'a [u8], ndims: u8, what: &str) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let magic = u32::from_be_bytes([0, 0, 0x08, ndims]);
    let head: [u8; 4] = match bytes.get(..4) {
        Some(h) => [h[0], h[1], h[2], h[3]],
        None => {
            return Err(DataError::format(
                path,
                format!(
                    "file is {} bytes, too short for the 4-byte IDX magic (expected {what} magic \
                     0x{magic:08x})",
                    bytes.len()
                ),
            ))
        }
    };
    let found = u32::from_be_bytes(head);
    if found != magic {
        let hint = match found {
            0x0000_0801 => "; this is an IDX labels file: are the images and labels swapped?",
            0x0000_0803 => "; this is an IDX images file: are the images and labels swapped?",
            _ if head[..2] == GZIP_MAGIC => "; this is gzip data that was not decompressed",
            _ => "",
        };
        return Err(DataError::format(
            path,
            format!(
                "byte offset 0: expected the IDX {what} magic 0x{magic:08x} (unsigned bytes, \
                 {ndims} dimension(s)), found 0x{found:08x}{hint}"
            ),
        ));
    }
    let header = 4 + 4 * usize::from(ndims);
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            format!(
                "truncated header: expected {header} bytes (magic and {ndims} dimension sizes), \
                 the file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let shape = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×");
    let payload = &bytes[header..];
    match count {
        Some(count) if count == payload.len() => Ok((dims, payload)),
        Some(count) => Err(DataError::format(
            path,
            format!(
                "expected {header} header bytes + {shape} = {count} data bytes ({} in all), found \
                 {} bytes ({})",
                header + count,
                bytes.len(),
                if payload.len() < count { "the file is truncated" } else { "trailing bytes after the data" }
            ),
        )),
        None => Err(DataError::format(path, format!("header declares an impossible size {shape}"))),
    }
}

/// Reads MNIST-style IDX files: images (magic `0x00000803`, unsigned bytes `N×H×W`) and labels
/// (magic `0x00000801`, unsigned bytes `N`), each raw or gzipped (detected by the magic bytes
/// `1f 8b`). Pixels are divided by 255.
pub fn load_idx(images_path: &Path, labels_path: &Path) -> Result<ImageSet, DataError> {
    let img_bytes = read_maybe_gz(images_path)?;
    let lab_bytes = read_maybe_gz(labels_path)?;
    let (dims, img) = parse_idx(images_path, &img_bytes, 3, "images")?;
    let (ldims, lab) = parse_idx(labels_path, &lab_bytes, 1, "labels")?;
    let (n, height, width) = (dims[0], dims[1], dims[2]);
    if ldims[0] != n {
        return Err(DataError::format(labels_path, format!("holds {} labels but the images file {} holds {n} images", ldims[0], images_path.display())));
    }
    let labels: Vec<u32> = lab.iter().map(|&b| u32::from(b)).collect();
    Ok(ImageSet { channels: 1, height, width, pixels: img.iter().map(|&b| f32::from(b) / 255.0).collect(), num_classes: inferred_classes(&labels), labels })
}

/// Which label of the CIFAR binary format to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CifarVariant {
    /// CIFAR-10: records of 1 label byte + 3072 pixel bytes; 10 classes.
    Cifar10,
    /// CIFAR-100 with its 100 fine labels: records of coarse byte + fine byte + 3072 pixel bytes.
    Cifar100Fine,
    /// CIFAR-100 with its 20 coarse labels (superclasses), same records.
    Cifar100Coarse,
}

/// Pixel bytes per CIFAR record: 3 channels of 32×32, channel-major.
const CIFAR_PIXELS: usize = 3 * 32 * 32;

impl CifarVariant {
    pub fn num_classes(self) -> usize {
        match self {
            CifarVariant::Cifar10 => 10,
            CifarVariant::Cifar100Fine => 100,
            CifarVariant::Cifar100Coarse => 20,
        }
    }

    /// Bytes per record.
    pub fn record_len(self) -> usize {
        match self {
            CifarVariant::Cifar10 => 1 + CIFAR_PIXELS,
            CifarVariant::Cifar100Fine | CifarVariant::Cifar100Coarse => 2 + CIFAR_PIXELS,
        }
    }

    /// Offset of the label this variant reads within a record.
    fn label_offset(self) -> usize {
        match self {
            CifarVariant::Cifar10 | CifarVariant::Cifar100Coarse => 0,
            CifarVariant::Cifar100Fine => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CifarVariant::Cifar10 => "CIFAR-10",
            CifarVariant::Cifar100Fine => "CIFAR-100 (fine labels)",
            CifarVariant::Cifar100Coarse => "CIFAR-100 (coarse labels)",
        }
    }
}

/// Reads CIFAR binary batch files (raw or gzipped) in order and concatenates their records into
/// one 3×32×32 set. Pixels are divided by 255.
pub fn load_cifar(paths: &[PathBuf], variant: CifarVariant) -> Result<ImageSet, DataError> {
    if paths.is_empty() {
        return Err(DataError::format(Path::new("<no files>"), format!("load_cifar needs at least one {} batch file", variant.name())));
    }
    let rec = variant.record_len();
    let classes = variant.num_classes();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = read_maybe_gz(path)?;
        if bytes.is_empty() {
            return Err(DataError::format(path, format!("file is empty: expected {rec}-byte {} records", variant.name())));
        }
        if bytes.len() % rec != 0 {
            let full = bytes.len() / rec;
            return Err(DataError::format(
                path,
                format!(
                    "length {} bytes is not a multiple of the {rec}-byte {} record: record {full} \
                     (byte offset {}) is truncated, {} of {rec} bytes present",
                    bytes.len(),
                    variant.name(),
                    full * rec,
                    bytes.len() % rec
                ),
            ));
        }
        pixels.reserve(bytes.len() / rec * CIFAR_PIXELS);
        for (k, record) in bytes.chunks_exact(rec).enumerate() {
            let label = record[variant.label_offset()];
            if usize::from(label) >= classes {
                return Err(DataError::format(
                    path,
                    format!(
                        "record {k} (byte offset {}): label {label} is out of range for {} \
                         ({classes} classes)",
                        k * rec + variant.label_offset(),
                        variant.name()
                    ),
                ));
            }
            labels.push(u32::from(label));
            let start = rec - CIFAR_PIXELS;
            pixels.extend(record[start..].iter().map(|&b| f32::from(b) / 255.0));
        }
    }
    Ok(ImageSet { channels: 3, height: 32, width: 32, pixels, labels, num_classes: classes })
}

/// One decoded image: 8-bit samples, interleaved (row, column, channel), 1 (grey) or 3 (RGB)
/// channels.
struct Raster {
    channels: usize,
    height: usize,
    width: usize,
    data: Vec<u8>,
}

/// Decodes PNG or JPEG bytes (recognised by their magic numbers) to grey or RGB. Alpha is
/// dropped; palettes and low bit depths are expanded; 16-bit PNGs keep their high byte.
fn decode_image(bytes: &[u8]) -> Result<Raster, String> {
    // Both decoders are meant to return errors on bad input, but a panic on some malformed file
    // must not take the whole run down, so it is turned into an error too.
    let decoded = std::panic::catch_unwind(|| {
        if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
            decode_png(bytes)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            decode_jpeg(bytes)
        } else {
            Err(format!("image bytes are neither PNG (89 50 4e 47) nor JPEG (ff d8 ff): they start with {}", hex_prefix(bytes)))
        }
    });
    let raster = decoded.unwrap_or_else(|_| Err("the image decoder crashed on these (malformed) bytes".into()))?;
    if raster.height == 0 || raster.width == 0 {
        return Err(format!("image is {}×{}, which holds no pixels", raster.height, raster.width));
    }
    Ok(raster)
}

fn decode_png(bytes: &[u8]) -> Result<Raster, String> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| format!("invalid PNG: {e}"))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| format!("invalid PNG: {e}"))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let src_channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("PNG palette was not expanded".into()),
    };
    let channels = if src_channels <= 2 { 1 } else { 3 };
    let row_len = width * src_channels;
    let mut data = Vec::with_capacity(width * height * channels);
    for row in buf.chunks(info.line_size.max(1)).take(height) {
        let row = row.get(..row_len).ok_or_else(|| "PNG row shorter than its width".to_string())?;
        for px in row.chunks_exact(src_channels) {
            data.extend_from_slice(&px[..channels]);
        }
    }
    if data.len() != width * height * channels {
        return Err(format!("PNG holds fewer rows than its height {height}"));
    }
    Ok(Raster { channels, height, width, data })
}

fn decode_jpeg(bytes: &[u8]) -> Result<Raster, String> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    let data = decoder.decode().map_err(|e| format!("invalid JPEG: {e}"))?;
    let info = decoder.info().ok_or_else(|| "JPEG has no frame header".to_string())?;
    let channels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        other => return Err(format!("JPEG pixel format {other:?} is not supported (only 8-bit grey and RGB)")),
    };
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    if data.len() != width * height * channels {
        return Err(format!("JPEG decoded to {} bytes, expected {width}×{height}×{channels}", data.len()));
    }
    Ok(Raster { channels, height, width, data })
}

/// The raster as channel-major `f32` in `[0, 1]` with `channels` channels: RGB becomes grey by
/// ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B), grey becomes RGB by repetition.
fn to_chw(r: &Raster, channels: usize) -> Vec<f32> {
    let plane = r.height * r.width;
    let mut out = vec![0f32; channels * plane];
    for p in 0..plane {
        let px = &r.data[p * r.channels..(p + 1) * r.channels];
        match (r.channels, channels) {
            (1, _) => {
                for c in 0..channels {
                    out[c * plane + p] = f32::from(px[0]) / 255.0;
                }
            }
            (_, 1) => {
                let y = 0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2]);
                out[p] = (y / 255.0).clamp(0.0, 1.0);
            }
            _ => {
                for c in 0..channels {
                    out[c * plane + p] = f32::from(px[c]) / 255.0;
                }
            }
        }
    }
    out
}

/// Bilinear resampling of channel-major planes from `h×w` to `th×tw`, sampling at pixel centres
/// (`src = (dst + 0.5)·scale − 0.5`, clamped to the edge) without antialiasing, like
/// OpenCV's `INTER_LINEAR` and PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
fn resize_bilinear(src: &[f32], channels: usize, (h, w): (usize, usize), (th, tw): (usize, usize)) -> Vec<f32> {
    let coords = |dst_len: usize, src_len: usize| -> Vec<(usize, usize, f32)> {
        let scale = src_len as f32 / dst_len as f32;
        (0..dst_len)
            .map(|d| {
                let s = ((d as f32 + 0.5) * scale - 0.5).clamp(0.0, (src_len - 1) as f32);
                let i0 = s.floor() as usize;
                let i1 = (i0 + 1).min(src_len - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let ys = coords(th, h);
    let xs = coords(tw, w);
    let mut out = Vec::with_capacity(channels * th * tw);
    for c in 0..channels {
        let plane = &src[c * h * w..(c + 1) * h * w];
        for &(y0, y1, fy) in &ys {
            for &(x0, x1, fx) in &xs {
                let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
                let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    out
}

/// Reads a Parquet table of encoded images with polars. `image_column` holds either the PNG/JPEG
/// bytes themselves (Binary) or a Struct with a `bytes` Binary field (the Hugging Face `datasets`
/// `Image` layout); `label_column` holds integer labels.
///
/// Every image is converted to the channel count of the first one (grey or RGB; alpha is
/// dropped). With `size = Some((height, width))` every image is resized to that size by bilinear
/// sampling (see [`resize_bilinear`]: pixel-centre aligned, no antialiasing); without it all
/// images must have the first image's size, and the first one that differs is an error naming
/// its row.
pub fn load_parquet_images(path: &Path, image_column: &str, label_column: &str, size: Option<(usize, usize)>) -> Result<ImageSet, DataError> {
    // polars' Parquet reader can panic on a malformed footer rather than return an error
    // (found by tests/fuzz.rs); a damaged file must be an error naming it, never a crash.
    std::panic::catch_unwind(|| read_parquet_images(path, image_column, label_column, size))
        .unwrap_or_else(|_| Err(DataError::format(path, "malformed Parquet file: the reader failed on its metadata".to_string())))
}

fn read_parquet_images(path: &Path, image_column: &str, label_column: &str, size: Option<(usize, usize)>) -> Result<ImageSet, DataError> {
    let bad = |m: String| DataError::format(path, m);
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = ParquetReader::new(file);
    let schema = reader.schema().map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    for col in [image_column, label_column] {
        if !schema.contains(col) {
            let names: Vec<String> = schema.iter_names().map(|n| format!("{n:?}")).collect();
            return Err(bad(format!("no column {col:?}; the file has columns {}", names.join(", "))));
        }
    }
    if let Some((h, w)) = size {
        if h == 0 || w == 0 {
            return Err(bad(format!("requested image size {h}×{w} must be positive")));
        }
    }
    let columns = vec![image_column.into(), label_column.into()];
    let df = reader.with_columns(Some(columns)).finish().map_err(|e| bad(format!("cannot read Parquet data: {e}")))?;
    let polars_err = |e: polars::error::PolarsError| bad(e.to_string());

    let image_col = df.column(image_column).map_err(polars_err)?;
    let images = match image_col.dtype() {
        DataType::Binary => image_col.binary().map_err(polars_err)?.clone(),
        DataType::Struct(_) => {
            let field = image_col.struct_().map_err(polars_err)?.field_by_name("bytes").map_err(|_| {
                bad(format!(
                    "column {image_column:?} is a struct without a `bytes` field (expected the \
                         Hugging Face datasets Image layout {{bytes, path}})"
                ))
            })?;
            field.binary().map_err(|_| bad(format!("column {image_column:?}: struct field `bytes` has type {}, expected Binary", field.dtype())))?.clone()
        }
        other => {
            return Err(bad(format!(
                "column {image_column:?} has type {other}; expected Binary image bytes or a Struct \
                 with a `bytes` Binary field"
            )))
        }
    };
    let label_col = df.column(label_column).map_err(polars_err)?;
    if !label_col.dtype().is_integer() {
        return Err(bad(format!("column {label_column:?} has type {}; expected integer class labels", label_col.dtype())));
    }
    let label_i64 = label_col.cast(&DataType::Int64).map_err(polars_err)?;
    let label_ca = label_i64.i64().map_err(polars_err)?;

    let mut labels = Vec::with_capacity(df.height());
    for row in 0..label_ca.len() {
        let l = label_ca.get(row).ok_or_else(|| bad(format!("row {row}: label in {label_column:?} is null")))?;
        let l = u32::try_from(l).ok().filter(|&l| u64::from(l) < MAX_INFERRED_CLASSES).ok_or_else(|| {
            bad(format!(
                "row {row}: label {l} in {label_column:?} is not a class index (expected 0 to \
                     {})",
                MAX_INFERRED_CLASSES - 1
            ))
        })?;
        labels.push(l);
    }
    if labels.is_empty() {
        return Err(bad("no rows: the table holds no images".into()));
    }

    let mut shape: Option<(usize, usize, usize)> = None; // (channels, height, width) of the set
    let mut pixels = Vec::new();
    for row in 0..images.len() {
        let bytes = images.get(row).ok_or_else(|| {
            bad(format!(
                "row {row}: no image bytes in {image_column:?} (null; images stored only as a \
                 path are not supported)"
            ))
        })?;
        let raster = decode_image(bytes).map_err(|m| bad(format!("row {row}: {m}")))?;
        let (channels, height, width) = *shape.get_or_insert_with(|| {
            let (h, w) = size.unwrap_or((raster.height, raster.width));
            (raster.channels, h, w)
        });
        let chw = to_chw(&raster, channels);
        if (raster.height, raster.width) == (height, width) {
            pixels.extend_from_slice(&chw);
        } else if size.is_some() {
            pixels.extend(resize_bilinear(&chw, channels, (raster.height, raster.width), (height, width)));
        } else {
            return Err(bad(format!(
                "row {row}: image is {}×{} but row 0 is {height}×{width}; set a size to resize \
                 all images to one size",
                raster.height, raster.width
            )));
        }
    }
    let (channels, height, width) = shape.unwrap_or((0, 0, 0));
    Ok(ImageSet { channels, height, width, pixels, num_classes: inferred_classes(&labels), labels })
}

/// A path written in a list file, checked to stay inside `dir`: relative, without `..`.
fn inside(dir: &Path, written: &str) -> Option<PathBuf> {
    let rel = Path::new(written);
    let plain = !written.is_empty() && rel.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    plain.then(|| dir.join(rel))
}

/// Decodes the image files `items` (path, label, and where the path was written, for errors) to
/// RGB (grey images are repeated over the three channels), resized to `size` by bilinear
/// sampling, or all of the first image's size when `size` is `None`. Decoded in parallel; the
/// first failure in list order is the error.
fn load_image_files(list: &Path, items: Vec<(PathBuf, u32, String)>, size: Option<(usize, usize)>) -> Result<ImageSet, DataError> {
    use rayon::prelude::*;
    let bad = |m: String| DataError::format(list, m);
    if items.is_empty() {
        return Err(bad("the list names no images".into()));
    }
    let decode = |(path, _, at): &(PathBuf, u32, String)| -> Result<Raster, DataError> {
        let bytes = std::fs::read(path).map_err(|e| bad(format!("{at}: cannot read image {}: {e}; the images must be unpacked beside the list (see the manifest's header)", path.display())))?;
        decode_image(&bytes).map_err(|m| bad(format!("{at}: {}: {m}", path.display())))
    };
    let (height, width) = match size {
        Some((h, w)) if h == 0 || w == 0 => return Err(bad(format!("requested image size {h}×{w} must be positive"))),
        Some(s) => s,
        None => {
            let r = decode(&items[0])?;
            (r.height, r.width)
        }
    };
    // Each image is written straight into its slot of the result (no second copy of the set).
    let mut pixels = vec![0f32; items.len() * 3 * height * width];
    let outcomes: Vec<Result<(), DataError>> = pixels
        .par_chunks_mut(3 * height * width)
        .zip(items.par_iter())
        .map(|(slot, item)| {
            let r = decode(item)?;
            let chw = to_chw(&r, 3);
            if (r.height, r.width) == (height, width) {
                slot.copy_from_slice(&chw);
            } else if size.is_some() {
                slot.copy_from_slice(&resize_bilinear(&chw, 3, (r.height, r.width), (height, width)));
            } else {
                return Err(bad(format!("{}: {}: image is {}×{} but the first image is {height}×{width}; set `size` to resize all images to one size", item.2, item.0.display(), r.height, r.width)));
            }
            Ok(())
        })
        .collect();
    outcomes.into_iter().collect::<Result<(), _>>()?;
    let labels: Vec<u32> = items.iter().map(|i| i.1).collect();
    Ok(ImageSet { channels: 3, height, width, pixels, num_classes: inferred_classes(&labels), labels })
}

/// The non-blank lines of a text file, with their 1-based line numbers.
fn text_lines(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::format(path, format!("byte offset {}: not valid UTF-8", e.utf8_error().valid_up_to())))?;
    Ok(text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.trim().to_string())).collect())
}

/// Reads CUB-200-2011 from its own metadata: `images_txt` (`images.txt`, lines "id
/// relative/path.jpg") and `labels_txt` (`image_class_labels.txt`, lines "id label", labels
/// 1..200, which become 0..199), with the images under `images/` beside `images.txt`. Images are
/// in `images.txt` order, RGB, resized to `size`.
pub fn load_cub(images_txt: &Path, labels_txt: &Path, size: Option<(usize, usize)>) -> Result<ImageSet, DataError> {
    let pairs = |path: &Path, what: &str| -> Result<Vec<(u64, String, usize)>, DataError> {
        text_lines(path)?
            .into_iter()
            .map(|(line, l)| match l.split_once(char::is_whitespace) {
                Some((id, rest)) if id.parse::<u64>().is_ok() && !rest.trim().is_empty() => Ok((id.parse().unwrap_or(0), rest.trim().to_string(), line)),
                _ => Err(DataError::format(path, format!("line {line}: expected \"<image id> <{what}>\", found {l:?}"))),
            })
            .collect()
    };
    let images = pairs(images_txt, "relative path")?;
    let labels = pairs(labels_txt, "class label")?;
    let mut label_of = std::collections::HashMap::new();
    for (id, label, line) in &labels {
        let l = label.parse::<u32>().ok().filter(|&l| l >= 1).ok_or_else(|| DataError::format(labels_txt, format!("line {line}: label {label:?} is not a class number (1 or more)")))?;
        if label_of.insert(*id, l - 1).is_some() {
            return Err(DataError::format(labels_txt, format!("line {line}: image id {id} has a second label")));
        }
    }
    let dir = images_txt.parent().unwrap_or(Path::new(".")).join("images");
    let mut items = Vec::with_capacity(images.len());
    for (id, rel, line) in images {
        let at = format!("{} line {line}", images_txt.display());
        let path = inside(&dir, &rel).ok_or_else(|| DataError::format(images_txt, format!("line {line}: image path {rel:?} must be relative, without `..`")))?;
        let label = *label_of
            .get(&id)
            .ok_or_else(|| DataError::format(labels_txt, format!("no label for image id {id} (line {line} of {}); both files must come from the same archive", images_txt.display())))?;
        items.push((path, label, at));
    }
    load_image_files(images_txt, items, size)
}

/// How a CSV list of images is read (the manifest's `image-list` format).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageListLayout {
    /// The folder holding the images, relative to the list file's folder.
    pub image_dir: String,
    /// The header names of the file-name and label columns.
    pub path_column: String,
    pub label_column: String,
    pub size: Option<(usize, usize)>,
}

/// The `(file name, label text, line)` rows of an image list: a CSV whose first line names its
/// columns. Fields are not quoted (file names and class ids hold no commas).
pub fn read_image_list(list: &Path, layout: &ImageListLayout) -> Result<Vec<(String, String, usize)>, DataError> {
    let bad = |m: String| DataError::format(list, m);
    let lines = text_lines(list)?;
    let Some((_, header)) = lines.first() else {
        return Err(bad("the list is empty; expected a header line, then one line per image".into()));
    };
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        names.iter().position(|n| *n == name).ok_or_else(|| bad(format!("line 1: no column {name:?} in the header {names:?}; set `path_column` and `label_column` in the manifest's [format] table")))
    };
    let (pc, lc) = (col(&layout.path_column)?, col(&layout.label_column)?);
    lines[1..]
        .iter()
        .map(|(line, l)| {
            let fields: Vec<&str> = l.split(',').map(str::trim).collect();
            if fields.len() != names.len() {
                return Err(bad(format!("line {line}: expected {} comma-separated fields, found {}", names.len(), fields.len())));
            }
            Ok((fields[pc].to_string(), fields[lc].to_string(), *line))
        })
        .collect()
}

/// Reads the images a CSV list names (see [`read_image_list`]) from `image_dir` beside the list,
/// RGB, resized to `size`; `class_of` maps a label text (e.g. a WordNet id) to its class index.
pub fn load_image_list(list: &Path, layout: &ImageListLayout, class_of: &dyn Fn(&str) -> Option<u32>) -> Result<ImageSet, DataError> {
    let bad = |m: String| DataError::format(list, m);
    let dir = inside(list.parent().unwrap_or(Path::new(".")), &layout.image_dir).ok_or_else(|| bad(format!("image_dir {:?} must be relative, without `..`", layout.image_dir)))?;
    let mut items = Vec::new();
    for (file, label, line) in read_image_list(list, layout)? {
        let path = inside(&dir, &file).ok_or_else(|| bad(format!("line {line}: image path {file:?} must be relative, without `..`")))?;
        let class = class_of(&label).ok_or_else(|| bad(format!("line {line}: label {label:?} is not one of the manifest's classes; list it in `classes`")))?;
        items.push((path, class, format!("{} line {line}", list.display())));
    }
    load_image_files(list, items, layout.size)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use polars::prelude::{DataFrame, IntoSeries, NamedFrom, ParquetWriter, Series, StructChunked};
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// The message of a Format error (which names the file), failing on any other error.
    fn format_message(err: DataError) -> String {
        assert!(matches!(err, DataError::Format { .. }), "expected a Format error, got {err:?}");
        err.to_string()
    }

    // ---- CSV ----

    const LAYOUT: CsvLayout = CsvLayout { channels: 1, height: 2, width: 2, max_value: 4.0 };
    const CSV: &str = "0,1,2,3,1\n4,4,0,0,0\r\n2,2,2,2,2\n\n";

    #[test]
    fn csv_round_trip_plain_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let expected = ImageSet { channels: 1, height: 2, width: 2, pixels: vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], labels: vec![1, 0, 2], num_classes: 3 };
        let plain = write(dir.path(), "a.csv", CSV.as_bytes());
        assert_eq!(load_csv(&plain, &LAYOUT).unwrap(), expected);
        let zipped = write(dir.path(), "a.csv.gz", &gz(CSV.as_bytes()));
        assert_eq!(load_csv(&zipped, &LAYOUT).unwrap(), expected);
        // Gzip is recognised by its magic even without the extension.
        let unnamed = write(dir.path(), "a.data", &gz(CSV.as_bytes()));
        assert_eq!(load_csv(&unnamed, &LAYOUT).unwrap(), expected);
        // Labels written as integral floats are accepted.
        let floats = write(dir.path(), "f.csv", b"0,0,0,0,3.0\n");
        assert_eq!(load_csv(&floats, &LAYOUT).unwrap().labels, vec![3]);
    }

    #[test]
    fn csv_bad_field_names_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad.csv", b"0,1,2,3,1\n4,4,x,0,0\n");
        let msg = format_message(load_csv(&p, &LAYOUT).unwrap_err());
        assert!(msg.contains("bad.csv") && msg.contains("line 2, field 3"), "{msg}");
        assert!(msg.contains("\"x\""), "{msg}");
    }

    #[test]
    fn csv_malformed_cases() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[u8], &str)] = &[
            ("short.csv", b"0,1,2,3,1\n0,1,2\n", "line 2: expected 5 comma-separated fields"),
            ("range.csv", b"0,1,2,5,1\n", "line 1, field 4: pixel value 5 is outside"),
            ("neg.csv", b"0,1,2,3,-1\n", "line 1, field 5 (the label)"),
            ("frac.csv", b"0,1,2,3,1.5\n", "line 1, field 5 (the label)"),
            ("empty.csv", b"", "no rows"),
            ("blank.csv", b"\n  \n", "no rows"),
            ("utf.csv", b"0,1,\xff,3,1\n", "byte offset 4: not valid UTF-8"),
            ("fake.csv.gz", b"0,1,2,3,1\n", "does not start with the gzip magic"),
            ("empty.csv.gz", b"", "does not start with the gzip magic"),
        ];
        for (name, bytes, needle) in cases {
            let p = write(dir.path(), name, bytes);
            let msg = format_message(load_csv(&p, &LAYOUT).unwrap_err());
            assert!(msg.contains(name) && msg.contains(needle), "{name}: {msg}");
        }
    }

    #[test]
    fn csv_truncated_gz_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let full = gz(CSV.repeat(50).as_bytes());
        let p = write(dir.path(), "cut.csv.gz", &full[..full.len() / 2]);
        let msg = format_message(load_csv(&p, &LAYOUT).unwrap_err());
        assert!(msg.contains("cut.csv.gz") && msg.contains("gzip stream is corrupt or truncated"), "{msg}");
    }

    #[test]
    fn csv_missing_file_is_io_error_naming_it() {
        let err = load_csv(Path::new("/nonexistent/x.csv"), &LAYOUT).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/x.csv"));
    }

    // ---- IDX ----

    fn idx_images(n: u32, h: u32, w: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 3];
        for d in [n, h, w] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 1];
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    #[test]
    fn idx_round_trip_raw_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..18).map(|i| (i * 15) as u8).collect(); // 3 images of 2×3
        let images = idx_images(3, 2, 3, &data);
        let labels = idx_labels(&[7, 0, 3]);
        let expected = ImageSet { channels: 1, height: 2, width: 3, pixels: data.iter().map(|&b| f32::from(b) / 255.0).collect(), labels: vec![7, 0, 3], num_classes: 8 };
        let (i, l) = (write(dir.path(), "i.idx", &images), write(dir.path(), "l.idx", &labels));
        assert_eq!(load_idx(&i, &l).unwrap(), expected);
        let (i, l) = (write(dir.path(), "i.idx.gz", &gz(&images)), write(dir.path(), "l-ubyte", &gz(&labels)));
        assert_eq!(load_idx(&i, &l).unwrap(), expected);
    }

    #[test]
    fn idx_malformed_cases() {
        let dir = tempfile::tempdir().unwrap();
        let images = idx_images(3, 2, 2, &[9; 12]);
        let labels = idx_labels(&[1, 2, 3]);
        let img = write(dir.path(), "img", &images);
        let lab = write(dir.path(), "lab", &labels);

        // Swapped files: wrong magic, with a hint.
        let msg = format_message(load_idx(&lab, &img).unwrap_err());
        assert!(msg.contains("byte offset 0") && msg.contains("0x00000803") && msg.contains("swapped"), "{msg}");

        let other = write(dir.path(), "other", b"\x00\x00\x0d\x03rest");
        let msg = format_message(load_idx(&other, &lab).unwrap_err());
        assert!(msg.contains("found 0x00000d03"), "{msg}");

        let cut = write(dir.path(), "cut", &images[..images.len() - 1]);
        let msg = format_message(load_idx(&cut, &lab).unwrap_err());
        assert!(msg.contains("cut") && msg.contains("truncated") && msg.contains("3×2×2 = 12"), "{msg}");

        let head = write(dir.path(), "head", &images[..10]);
        assert!(format_message(load_idx(&head, &lab).unwrap_err()).contains("truncated header"));

        let tiny = write(dir.path(), "tiny", &images[..2]);
        assert!(format_message(load_idx(&tiny, &lab).unwrap_err()).contains("too short"));

        let long = write(dir.path(), "long", &[&images[..], &[0u8]].concat());
        assert!(format_message(load_idx(&long, &lab).unwrap_err()).contains("trailing bytes"));

        let two = write(dir.path(), "two", &idx_labels(&[1, 2]));
        let msg = format_message(load_idx(&img, &two).unwrap_err());
        assert!(msg.contains("holds 2 labels") && msg.contains("3 images"), "{msg}");

        let z = gz(&images);
        let badgz = write(dir.path(), "img.gz", &z[..z.len() - 6]);
        assert!(format_message(load_idx(&badgz, &lab).unwrap_err()).contains("gzip"));
    }

    // ---- CIFAR ----

    fn cifar_record(prefix: &[u8], fill: u8) -> Vec<u8> {
        let mut r = prefix.to_vec();
        r.extend((0..CIFAR_PIXELS).map(|i| fill.wrapping_add((i % 7) as u8)));
        r
    }

    #[test]
    fn cifar10_round_trip_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "data_batch_1.bin", &[cifar_record(&[3], 10), cifar_record(&[9], 20)].concat());
        let b = write(dir.path(), "data_batch_2.bin", &cifar_record(&[0], 30));
        let set = load_cifar(&[a, b], CifarVariant::Cifar10).unwrap();
        assert_eq!((set.len(), set.channels, set.height, set.width, set.num_classes), (3, 3, 32, 32, 10));
        assert_eq!(set.labels, vec![3, 9, 0]);
        let expected: Vec<f32> = [10u8, 20, 30].iter().flat_map(|&f| cifar_record(&[], f)).map(|b| f32::from(b) / 255.0).collect();
        assert_eq!(set.pixels, expected);
    }

    #[test]
    fn cifar100_fine_and_coarse() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "train.bin", &[cifar_record(&[19, 99], 1), cifar_record(&[4, 55], 2)].concat());
        let fine = load_cifar(std::slice::from_ref(&p), CifarVariant::Cifar100Fine).unwrap();
        assert_eq!((fine.labels.clone(), fine.num_classes), (vec![99, 55], 100));
        let coarse = load_cifar(std::slice::from_ref(&p), CifarVariant::Cifar100Coarse).unwrap();
        assert_eq!((coarse.labels.clone(), coarse.num_classes), (vec![19, 4], 20));
        assert_eq!(fine.pixels, coarse.pixels);
    }

    #[test]
    fn cifar_malformed_cases() {
        let dir = tempfile::tempdir().unwrap();
        let good = [cifar_record(&[1], 0), cifar_record(&[2], 0)].concat();
        let cut = write(dir.path(), "cut.bin", &[&good[..], &[1, 2, 3]].concat());
        let msg = format_message(load_cifar(&[cut], CifarVariant::Cifar10).unwrap_err());
        assert!(msg.contains("cut.bin") && msg.contains("not a multiple of the 3073-byte") && msg.contains("record 2 (byte offset 6146)"), "{msg}");

        let bad = write(dir.path(), "label.bin", &[cifar_record(&[1], 0), cifar_record(&[10], 0)].concat());
        let msg = format_message(load_cifar(&[bad], CifarVariant::Cifar10).unwrap_err());
        assert!(msg.contains("record 1 (byte offset 3073): label 10 is out of range"), "{msg}");

        let empty = write(dir.path(), "empty.bin", b"");
        assert!(format_message(load_cifar(&[empty], CifarVariant::Cifar10).unwrap_err()).contains("file is empty"));

        // A CIFAR-10 file read as CIFAR-100 has the wrong record length.
        let ten = write(dir.path(), "ten.bin", &good);
        assert!(format_message(load_cifar(&[ten], CifarVariant::Cifar100Fine).unwrap_err()).contains("3074-byte"));
        assert!(load_cifar(&[], CifarVariant::Cifar10).is_err());
    }

    // ---- Parquet ----

    fn png_bytes(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().unwrap();
            wr.write_image_data(data).unwrap();
        }
        out
    }

    fn binary_series(name: &str, images: &[Vec<u8>]) -> Series {
        let slices: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
        Series::new(name.into(), slices)
    }

    fn write_parquet(path: &Path, columns: Vec<Series>) {
        let mut df = DataFrame::new_infer_height(columns.into_iter().map(Into::into).collect()).unwrap();
        let mut f = std::fs::File::create(path).unwrap();
        ParquetWriter::new(&mut f).finish(&mut df).unwrap();
    }

    /// Three 2×3 grey images with distinct pixels.
    fn grey_images() -> Vec<Vec<u8>> {
        (0..3u8).map(|k| (0..6u8).map(|i| k * 60 + i * 7).collect()).collect()
    }

    #[test]
    fn parquet_binary_png_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let raw = grey_images();
        let pngs: Vec<Vec<u8>> = raw.iter().map(|d| png_bytes(3, 2, png::ColorType::Grayscale, d)).collect();
        let p = dir.path().join("t.parquet");
        write_parquet(&p, vec![binary_series("img", &pngs), Series::new("label".into(), [2i64, 0, 1])]);
        let set = load_parquet_images(&p, "img", "label", None).unwrap();
        let expected = ImageSet { channels: 1, height: 2, width: 3, pixels: raw.concat().iter().map(|&b| f32::from(b) / 255.0).collect(), labels: vec![2, 0, 1], num_classes: 3 };
        assert_eq!(set, expected);
    }

    #[test]
    fn parquet_hf_struct_layout_rgb_and_rgba() {
        let dir = tempfile::tempdir().unwrap();
        // 1×2 images, interleaved RGB(A): pixel 0 = (10, 20, 30), pixel 1 = (40, 50, 60).
        let rgb = png_bytes(2, 1, png::ColorType::Rgb, &[10, 20, 30, 40, 50, 60]);
        let rgba = png_bytes(2, 1, png::ColorType::Rgba, &[10, 20, 30, 0, 40, 50, 60, 255]);
        let bytes = binary_series("bytes", &[rgb, rgba]);
        let paths = Series::new("path".into(), ["a.png", "b.png"]);
        let image = StructChunked::from_series("image".into(), 2, [bytes, paths].iter()).unwrap().into_series();
        let p = dir.path().join("hf.parquet");
        write_parquet(&p, vec![image, Series::new("label".into(), [1u32, 1])]);
        let set = load_parquet_images(&p, "image", "label", None).unwrap();
        assert_eq!((set.channels, set.height, set.width), (3, 1, 2));
        // Channel-major: R plane, G plane, B plane; alpha dropped.
        let one: Vec<f32> = [10u8, 40, 20, 50, 30, 60].iter().map(|&b| f32::from(b) / 255.0).collect();
        assert_eq!(set.pixels, [one.clone(), one].concat());
        assert_eq!(set.labels, vec![1, 1]);
    }

    #[test]
    fn parquet_converts_to_first_images_channels() {
        let dir = tempfile::tempdir().unwrap();
        let grey = png_bytes(1, 1, png::ColorType::Grayscale, &[100]);
        let rgb = png_bytes(1, 1, png::ColorType::Rgb, &[255, 0, 0]);
        let p = dir.path().join("mixed.parquet");
        write_parquet(&p, vec![binary_series("img", &[grey.clone(), rgb.clone()]), Series::new("y".into(), [0i32, 1])]);
        let set = load_parquet_images(&p, "img", "y", None).unwrap();
        assert_eq!(set.channels, 1);
        assert!((set.pixels[1] - 0.299).abs() < 1e-5, "{:?}", set.pixels);

        write_parquet(&p, vec![binary_series("img", &[rgb, grey]), Series::new("y".into(), [0i32, 1])]);
        let set = load_parquet_images(&p, "img", "y", None).unwrap();
        assert_eq!(set.channels, 3);
        assert_eq!(&set.pixels[3..], &[100.0 / 255.0; 3]);
    }

    #[test]
    fn parquet_sizes_must_agree_unless_resized() {
        let dir = tempfile::tempdir().unwrap();
        let small = png_bytes(2, 1, png::ColorType::Grayscale, &[0, 255]);
        let big = png_bytes(4, 1, png::ColorType::Grayscale, &[7, 7, 7, 7]);
        let p = dir.path().join("sizes.parquet");
        write_parquet(&p, vec![binary_series("img", &[big, small]), Series::new("y".into(), [0i64, 1])]);
        let msg = format_message(load_parquet_images(&p, "img", "y", None).unwrap_err());
        assert!(msg.contains("row 1: image is 1×2 but row 0 is 1×4"), "{msg}");
        let set = load_parquet_images(&p, "img", "y", Some((1, 4))).unwrap();
        assert_eq!(set.pixels[..4], [7.0 / 255.0; 4]);
        assert_eq!(set.pixels[4..], [0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn bilinear_resize_is_pixel_centre_aligned() {
        // 2×2 → 4×4: interior samples at 0.25 / 0.75 between neighbours, edges clamped.
        let out = resize_bilinear(&[0.0, 1.0, 0.0, 1.0], 1, (2, 2), (4, 4));
        assert_eq!(&out[..4], &[0.0, 0.25, 0.75, 1.0]);
        // Shrinking a uniform image keeps it uniform; identity is exact.
        let src = vec![0.5f32; 2 * 6 * 6];
        assert!(resize_bilinear(&src, 2, (6, 6), (3, 2)).iter().all(|&v| v == 0.5));
        let ramp: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(resize_bilinear(&ramp, 1, (3, 4), (3, 4)), ramp);
    }

    /// A hand-assembled baseline JPEG: one 8×8 grey block whose only coefficient is DC = 512,
    /// i.e. every pixel 128 + 512/8 = 192. Quantisation is all ones; each Huffman table has a
    /// single 1-bit code ("0": DC category 10, AC end-of-block).
    fn tiny_jpeg() -> Vec<u8> {
        let mut j = vec![0xff, 0xd8]; // SOI
        j.extend([0xff, 0xdb, 0x00, 0x43, 0x00]); // DQT, table 0, 8-bit
        j.extend([1u8; 64]);
        j.extend([0xff, 0xc0, 0x00, 0x0b, 8, 0, 8, 0, 8, 1, 1, 0x11, 0]); // SOF0: 8×8, 1 comp
        let table = |class: u8, symbol: u8| {
            let mut t = vec![0xff, 0xc4, 0x00, 0x14, class, 1];
            t.extend([0u8; 15]);
            t.push(symbol);
            t
        };
        j.extend(table(0x00, 0x0a)); // DC: category 10
        j.extend(table(0x10, 0x00)); // AC: end of block
        j.extend([0xff, 0xda, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0]); // SOS
                                                                  // "0" (DC cat 10) + "1000000000" (+512) + "0" (EOB), padded with ones.
        j.extend([0b0100_0000, 0b0000_1111]);
        j.extend([0xff, 0xd9]); // EOI
        j
    }

    #[test]
    fn parquet_jpeg_and_bad_image_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jpeg.parquet");
        write_parquet(&p, vec![binary_series("img", &[tiny_jpeg()]), Series::new("y".into(), [4i64])]);
        let set = load_parquet_images(&p, "img", "y", None).unwrap();
        assert_eq!((set.channels, set.height, set.width), (1, 8, 8));
        assert!(set.pixels.iter().all(|&v| (v - 192.0 / 255.0).abs() < 1.5 / 255.0), "{:?}", set.pixels);

        let png = png_bytes(1, 1, png::ColorType::Grayscale, &[1]);
        let garbage = b"GIF89a....".to_vec();
        let cut = png[..png.len() - 20].to_vec();
        write_parquet(&p, vec![binary_series("img", &[png.clone(), garbage, cut]), Series::new("y".into(), [0i64, 0, 0])]);
        let msg = format_message(load_parquet_images(&p, "img", "y", None).unwrap_err());
        assert!(msg.contains("row 1: image bytes are neither PNG") && msg.contains("47 49 46 38"), "{msg}");
        write_parquet(&p, vec![binary_series("img", &[png.clone(), png[..png.len() - 20].to_vec()]), Series::new("y".into(), [0i64, 0])]);
        let msg = format_message(load_parquet_images(&p, "img", "y", None).unwrap_err());
        assert!(msg.contains("row 1: invalid PNG"), "{msg}");
    }

    #[test]
    fn parquet_column_errors() {
        let dir = tempfile::tempdir().unwrap();
        let pngs: Vec<Vec<u8>> = grey_images().iter().map(|d| png_bytes(3, 2, png::ColorType::Grayscale, d)).collect();
        let p = dir.path().join("cols.parquet");
        write_parquet(&p, vec![binary_series("img", &pngs), Series::new("label".into(), [0i64, -1, 1])]);
        let msg = format_message(load_parquet_images(&p, "image", "label", None).unwrap_err());
        assert!(msg.contains("cols.parquet") && msg.contains("no column \"image\"") && msg.contains("\"img\""), "{msg}");
        let msg = format_message(load_parquet_images(&p, "img", "labels", None).unwrap_err());
        assert!(msg.contains("no column \"labels\""), "{msg}");
        let msg = format_message(load_parquet_images(&p, "img", "label", None).unwrap_err());
        assert!(msg.contains("row 1: label -1"), "{msg}");
        let msg = format_message(load_parquet_images(&p, "label", "img", None).unwrap_err());
        assert!(msg.contains("column \"label\" has type"), "{msg}");

        let notparquet = write(dir.path(), "x.parquet", b"PAR1 but not really");
        let msg = format_message(load_parquet_images(&notparquet, "img", "label", None).unwrap_err());
        assert!(msg.contains("x.parquet"), "{msg}");
    }

    // ---- Image folders: CUB-200-2011 and CSV image lists ----

    /// Writes the fixture images under `dir`: `a.png` 2×2 RGB with a distinct value per pixel
    /// and channel, `b.png` 1×1 grey 51, `c.png` 4×4 RGB made of four constant 2×2 blocks.
    pub(crate) fn folder_images(dir: &Path) {
        std::fs::create_dir_all(dir.join("001.A")).unwrap();
        std::fs::create_dir_all(dir.join("002.B")).unwrap();
        // Interleaved (row, column, channel): pixel (r, c) channel k holds 10·(2r + c) + k.
        let a: Vec<u8> = (0..4u8).flat_map(|p| (0..3u8).map(move |k| 10 * p + k)).collect();
        write(dir, "001.A/a.png", &png_bytes(2, 2, png::ColorType::Rgb, &a));
        write(dir, "002.B/b.png", &png_bytes(1, 1, png::ColorType::Grayscale, &[51]));
        let block = |r: usize, c: usize| -> [u8; 3] { [[0, 0, 0], [255, 255, 255], [102, 102, 102], [51, 153, 204]][2 * (r / 2) + c / 2] };
        let c: Vec<u8> = (0..16).flat_map(|p| block(p / 4, p % 4)).collect();
        write(dir, "001.A/c.png", &png_bytes(4, 4, png::ColorType::Rgb, &c));
    }

    /// The three fixture images at 2×2, N·C·H·W, worked out by hand: `a` as written, `b`'s grey
    /// 51 = 0.2 repeated over 3 channels and 4 pixels, `c` sampled at source positions 0.5 and
    /// 2.5 (the middle of each constant block) so each output pixel is its block's colour.
    pub(crate) fn folder_expected() -> Vec<Vec<f32>> {
        let a: Vec<f32> = (0..3).flat_map(|k| (0..4).map(move |p| (10 * p + k) as f32 / 255.0)).collect();
        let b = vec![0.2f32; 12];
        let c: Vec<f32> = [[0.0, 1.0, 0.4, 0.2], [0.0, 1.0, 0.4, 0.6], [0.0, 1.0, 0.4, 0.8]].concat();
        vec![a, b, c]
    }

    pub(crate) fn assert_pixels_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-6, "value {i}: {g} != {w}");
        }
    }

    /// A CUB-style folder: `images.txt`, `image_class_labels.txt` and `images/`.
    fn cub_fixture(images_txt: &str, labels_txt: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("CUB_200_2011");
        folder_images(&root.join("images"));
        let i = write(&root, "images.txt", images_txt.as_bytes());
        let l = write(&root, "image_class_labels.txt", labels_txt.as_bytes());
        (dir, i, l)
    }

    const CUB_IMAGES: &str = "1 001.A/a.png\n2 002.B/b.png\n3 001.A/c.png\n";
    // Out of id order on purpose: labels are matched by id, not by line.
    const CUB_LABELS: &str = "3 1\n1 1\n\n2 2\n";

    #[test]
    fn cub_reads_its_metadata_and_images() {
        let (_d, i, l) = cub_fixture(CUB_IMAGES, CUB_LABELS);
        let set = load_cub(&i, &l, Some((2, 2))).unwrap();
        assert_eq!((set.len(), set.channels, set.height, set.width), (3, 3, 2, 2));
        assert_eq!((set.labels.clone(), set.num_classes), (vec![0, 1, 0], 2));
        assert_pixels_close(&set.pixels, &folder_expected().concat());
        // Without a size, images of different sizes are an error naming the image and the fix.
        let msg = format_message(load_cub(&i, &l, None).unwrap_err());
        assert!(msg.contains("images.txt line 2") && msg.contains("b.png") && msg.contains("`size`"), "{msg}");
    }

    #[test]
    fn cub_errors_name_the_file_and_line() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("1 001.A/a.png\n2 002.B/missing.png\n", "1 1\n2 2\n", "images.txt", "line 2: cannot read image"),
            ("1 001.A/a.png\n", "1 0\n", "image_class_labels.txt", "line 1: label \"0\" is not a class number"),
            ("1 001.A/a.png\n2 002.B/b.png\n", "1 1\n", "image_class_labels.txt", "no label for image id 2"),
            ("1 001.A/a.png\n", "1 1\n1 2\n", "image_class_labels.txt", "line 2: image id 1 has a second label"),
            ("1 ../a.png\n", "1 1\n", "images.txt", "line 1: image path \"../a.png\" must be relative"),
            ("one 001.A/a.png\n", "1 1\n", "images.txt", "line 1: expected \"<image id> <relative path>\""),
            ("", "", "images.txt", "the list names no images"),
        ];
        for (images, labels, file, needle) in cases {
            let (_d, i, l) = cub_fixture(images, labels);
            let msg = format_message(load_cub(&i, &l, Some((2, 2))).unwrap_err());
            assert!(msg.contains(file) && msg.contains(needle), "{images:?}/{labels:?}: {msg}");
        }
        let (_d, i, l) = cub_fixture(CUB_IMAGES, CUB_LABELS);
        std::fs::write(i.parent().unwrap().join("images/002.B/b.png"), b"not an image").unwrap();
        let msg = format_message(load_cub(&i, &l, Some((2, 2))).unwrap_err());
        assert!(msg.contains("line 2") && msg.contains("b.png") && msg.contains("neither PNG"), "{msg}");
    }

    fn list_layout() -> ImageListLayout {
        ImageListLayout { image_dir: "pics".into(), path_column: "filename".into(), label_column: "label".into(), size: Some((2, 2)) }
    }

    #[test]
    fn image_list_maps_labels_through_the_class_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let pics = dir.path().join("pics");
        folder_images(&pics);
        let list = write(dir.path(), "train.csv", b"filename,label\n002.B/b.png,n02\n001.A/a.png,n01\n001.A/c.png,n02\n");
        let class_of = |l: &str| ["n01", "n02"].iter().position(|c| *c == l).map(|i| i as u32);
        let set = load_image_list(&list, &list_layout(), &class_of).unwrap();
        assert_eq!((set.labels.clone(), set.channels, set.height, set.width), (vec![1, 0, 1], 3, 2, 2));
        let e = folder_expected();
        assert_pixels_close(&set.pixels, &[e[1].clone(), e[0].clone(), e[2].clone()].concat());
        // Columns are found by their header names, in any order.
        let swapped = write(dir.path(), "swapped.csv", b"label,filename\nn01,001.A/a.png\n");
        assert_eq!(load_image_list(&swapped, &list_layout(), &class_of).unwrap().labels, vec![0]);

        let cases: &[(&[u8], &str)] = &[
            (b"file,label\na.png,n01\n", "line 1: no column \"filename\""),
            (b"filename,label\n001.A/a.png,n09\n", "line 2: label \"n09\" is not one of the manifest's classes"),
            (b"filename,label\n001.A/a.png\n", "line 2: expected 2 comma-separated fields, found 1"),
            (b"filename,label\n/etc/passwd,n01\n", "line 2: image path \"/etc/passwd\" must be relative"),
            (b"filename,label\n001.A/zzz.png,n01\n", "line 2: cannot read image"),
            (b"", "the list is empty"),
            (b"filename,label\n", "the list names no images"),
        ];
        for (i, (text, needle)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("bad{i}.csv"), text);
            let msg = format_message(load_image_list(&p, &list_layout(), &class_of).unwrap_err());
            assert!(msg.contains(&format!("bad{i}.csv")) && msg.contains(needle), "{msg}");
        }
        let up = ImageListLayout { image_dir: "../pics".into(), ..list_layout() };
        assert!(format_message(load_image_list(&list, &up, &class_of).unwrap_err()).contains("image_dir \"../pics\" must be relative"));
    }
}
