//! MATLAB Level-5 MAT-files (the format `save` writes up to `-v7`), read from the published
//! layout: a 128-byte header, then data elements.
//!
//! The header holds 116 bytes of descriptive text, an 8-byte subsystem-data offset, the version
//! 0x0100 and a 2-byte endian indicator: the characters `IM` when the file was written
//! little-endian, `MI` when big-endian. Both byte orders are read.
//!
//! Each data element starts with a tag: the data type (u32) and the number of bytes (u32), then
//! the data, padded to a multiple of 8 bytes. Elements of at most 4 bytes may use the small form,
//! one 4-byte word holding the byte count (upper 16 bits) and the type (lower 16 bits), followed by
//! the data in the next 4 bytes. `miCOMPRESSED` (15) holds one zlib-compressed element (not
//! padded); `miMATRIX` (14) holds one variable as sub-elements: array flags (`miUINT32`: class and
//! complex/global/logical bits, then nzmax), dimensions (`miINT32`), name (`miINT8`), the real part
//! (stored in any numeric type, whatever the class), and for complex arrays an imaginary part.
//!
//! Only numeric, real, non-sparse arrays are read (that covers the image and label arrays data
//! sets ship); cells, structs, objects, sparse and complex arrays are skipped when not asked for
//! and refused, with the reason, when they are. HDF5-based `-v7.3` files and Level-4 files are
//! recognised and refused with what to do instead.

use std::io::Read;
use std::path::Path;

use super::{DataError, ImageSet};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// Array flag bits (in the first word of the array-flags sub-element).
const FLAG_COMPLEX: u32 = 0x0800;

/// The MATLAB array classes (low byte of the array flags), by code.
fn class_name(class: u8) -> &'static str {
    match class {
        1 => "cell",
        2 => "struct",
        3 => "object",
        4 => "char",
        5 => "sparse",
        6 => "double",
        7 => "single",
        8 => "int8",
        9 => "uint8",
        10 => "int16",
        11 => "uint16",
        12 => "int32",
        13 => "uint32",
        14 => "int64",
        15 => "uint64",
        _ => "unknown",
    }
}

/// The values of a numeric array, in MATLAB's column-major order. `uint8` storage is kept as
/// bytes (an image array is large); every other storage type is converted to `f64`.
#[derive(Debug, Clone, PartialEq)]
pub enum MatValues {
    U8(Vec<u8>),
    F64(Vec<f64>),
}

impl MatValues {
    fn len(&self) -> usize {
        match self {
            MatValues::U8(v) => v.len(),
            MatValues::F64(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> f64 {
        match self {
            MatValues::U8(v) => f64::from(v[i]),
            MatValues::F64(v) => v[i],
        }
    }
}

/// One numeric variable of a MAT-file.
#[derive(Debug, Clone, PartialEq)]
pub struct MatArray {
    pub name: String,
    /// MATLAB's dimensions (at least 2), first index fastest in `values`.
    pub dims: Vec<usize>,
    pub values: MatValues,
}

/// A little- or big-endian cursor over one buffer; every read is bounds-checked and fails with a
/// message naming the byte offset.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    big_endian: bool,
    /// Added to `pos` in messages: where this buffer starts in the file (for the top level), or
    /// the offset of the compressed element it was inflated from.
    origin: String,
}

impl<'a> Cursor<'a> {
    fn where_(&self, at: usize) -> String {
        format!("{}byte offset {at}", self.origin)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("{}: the file ends inside a data element (needs {n} more bytes, {} left)", self.where_(self.pos), self.bytes.len() - self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32_from(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(self.u32_from(b))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Reads a tag and its data: `(type, data, offset of the tag)`. Moves past the padding of
    /// an ordinary element (not of `miCOMPRESSED`, which MATLAB does not pad).
    fn element(&mut self) -> Result<(u32, &'a [u8], usize), String> {
        let start = self.pos;
        let first = self.u32()?;
        if first >> 16 != 0 {
            // Small data element: byte count in the upper 16 bits, type in the lower, data in the
            // next 4 bytes.
            let (ty, n) = (first & 0xffff, (first >> 16) as usize);
            if n > 4 {
                return Err(format!("{}: a small data element claims {n} bytes (at most 4 fit)", self.where_(start)));
            }
            let data = self.take(4)?;
            return Ok((ty, &data[..n], start));
        }
        let n = self.u32()? as usize;
        let data = self.take(n)?;
        if first != MI_COMPRESSED {
            let pad = (8 - n % 8) % 8;
            self.take(pad.min(self.bytes.len() - self.pos))?;
        }
        Ok((first, data, start))
    }
}

/// Converts typed element bytes to `f64`s (or keeps `miUINT8` as bytes).
fn numeric(ty: u32, data: &[u8], big_endian: bool) -> Result<MatValues, String> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {{
            if data.len() % $n != 0 {
                return Err(format!("{} bytes is not a whole number of {}-byte values", data.len(), $n));
            }
            data.chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().expect("chunk size");
                    (if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }) as f64
                })
                .collect::<Vec<f64>>()
        }};
    }
    Ok(match ty {
        MI_UINT8 => MatValues::U8(data.to_vec()),
        MI_INT8 => MatValues::F64(data.iter().map(|&b| f64::from(b as i8)).collect()),
        MI_INT16 => MatValues::F64(conv!(i16, 2)),
        MI_UINT16 => MatValues::F64(conv!(u16, 2)),
        MI_INT32 => MatValues::F64(conv!(i32, 4)),
        MI_UINT32 => MatValues::F64(conv!(u32, 4)),
        MI_SINGLE => MatValues::F64(conv!(f32, 4)),
        MI_DOUBLE => MatValues::F64(conv!(f64, 8)),
        MI_INT64 => MatValues::F64(conv!(i64, 8)),
        MI_UINT64 => MatValues::F64(conv!(u64, 8)),
        other => return Err(format!("data type {other} is not a numeric MAT-file type")),
    })
}

/// A parsed `miMATRIX` element: the variable's name, and either its array or why it cannot be
/// read (kept, so that only a variable actually asked for is refused).
struct Variable {
    name: String,
    array: Result<MatArray, String>,
}

fn parse_matrix(data: &[u8], big_endian: bool, origin: &str) -> Result<Variable, String> {
    let mut c = Cursor { bytes: data, pos: 0, big_endian, origin: origin.to_string() };
    let (ty, flags, at) = c.element()?;
    if ty != MI_UINT32 || flags.len() < 8 {
        return Err(format!("{}: a matrix must start with its array flags (miUINT32, 8 bytes), found type {ty} with {} bytes", c.where_(at), flags.len()));
    }
    let word = c.u32_from(&flags[..4]);
    let class = (word & 0xff) as u8;
    let (ty, dims_bytes, at) = c.element()?;
    if ty != MI_INT32 || dims_bytes.len() % 4 != 0 || dims_bytes.len() < 8 {
        return Err(format!("{}: the dimensions of a matrix must be miINT32 with at least 2 entries, found type {ty} with {} bytes", c.where_(at), dims_bytes.len()));
    }
    let mut dims = Vec::new();
    for d in dims_bytes.chunks_exact(4) {
        let v = c.u32_from(d) as i32;
        dims.push(usize::try_from(v).map_err(|_| format!("{}: negative dimension {v}", c.where_(at)))?);
    }
    let (ty, name_bytes, at) = c.element()?;
    if ty != MI_INT8 {
        return Err(format!("{}: the name of a matrix must be miINT8, found type {ty}", c.where_(at)));
    }
    let name = String::from_utf8_lossy(name_bytes).into_owned();
    let refuse = |why: String| Ok(Variable { name: name.clone(), array: Err(why) });
    if !(6..=15).contains(&class) {
        return refuse(format!("it is a {} array; only numeric arrays are read", class_name(class)));
    }
    if word & FLAG_COMPLEX != 0 {
        return refuse("it is complex; only real arrays are read".into());
    }
    let (ty, real, at) = c.element()?;
    let values = numeric(ty, real, big_endian).map_err(|m| format!("{}: variable {name:?}: {m}", c.where_(at)))?;
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("variable {name:?}: dimensions {dims:?} overflow"))?;
    if values.len() != count {
        return Err(format!("{}: variable {name:?} has dimensions {dims:?} ({count} values) but its data holds {}", c.where_(at), values.len()));
    }
    Ok(Variable { name: name.clone(), array: Ok(MatArray { name, dims, values }) })
}

/// Checks the 128-byte header; returns whether the file is big-endian.
fn check_header(bytes: &[u8]) -> Result<bool, String> {
    // A -v7.3 file is HDF5 with a 512-byte user block whose start looks like a Level-5 header.
    let hdf5 = bytes.get(512..520) == Some(b"\x89HDF\r\n\x1a\n".as_slice());
    if hdf5 || bytes.get(..19).is_some_and(|t| t.starts_with(b"MATLAB 7.3")) {
        return Err("the file was saved with -v7.3 (an HDF5 file), which is not read here; re-save it with `save(..., '-v7')` in MATLAB (or Octave), or convert it (e.g. to Parquet) first".into());
    }
    if bytes.len() < 128 || !bytes.starts_with(b"MATLAB") {
        return Err(format!(
            "not a Level-5 MAT-file: it does not start with a 128-byte header whose text begins \"MATLAB\" (a Level-4 file, saved with -v4, has no such header; re-save with -v7), found {} bytes starting {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
        ));
    }
    let big_endian = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => return Err(format!("byte offset 126: the endian indicator must be \"IM\" or \"MI\", found {other:02x?}; the file is damaged, re-download it")),
    };
    let version = if big_endian { u16::from_be_bytes([bytes[124], bytes[125]]) } else { u16::from_le_bytes([bytes[124], bytes[125]]) };
    if version != 0x0100 {
        return Err(format!("byte offset 124: version 0x{version:04x}, expected 0x0100 (a Level-5 MAT-file); re-save the file with -v7"));
    }
    Ok(big_endian)
}

/// Reads the variables called `names` from the MAT-file bytes; every name must be found.
/// Variables not asked for are skipped whatever their class.
pub fn read_variables(bytes: &[u8], names: &[&str]) -> Result<Vec<MatArray>, String> {
    let big_endian = check_header(bytes)?;
    let mut top = Cursor { bytes, pos: 128, big_endian, origin: String::new() };
    let mut found: Vec<Option<MatArray>> = vec![None; names.len()];
    let mut seen = Vec::new();
    while !top.at_end() && found.iter().any(Option::is_none) {
        let (ty, data, at) = top.element()?;
        let inflated;
        let (data, origin) = match ty {
            MI_MATRIX => (data, format!("matrix at byte offset {at}, ")),
            MI_COMPRESSED => {
                let mut out = Vec::new();
                flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).map_err(|e| format!("byte offset {at}: the compressed element is corrupt or truncated ({e}); re-download the file"))?;
                inflated = out;
                let origin = format!("compressed element at byte offset {at}, ");
                let mut inner = Cursor { bytes: &inflated, pos: 0, big_endian, origin: origin.clone() };
                match inner.element()? {
                    (MI_MATRIX, data, _) => (data, origin),
                    _ => continue,
                }
            }
            _ => continue,
        };
        if data.is_empty() {
            continue; // an empty placeholder matrix
        }
        let var = parse_matrix(data, big_endian, &origin)?;
        seen.push(var.name.clone());
        if let Some(i) = names.iter().position(|n| *n == var.name) {
            if found[i].is_none() {
                found[i] = Some(var.array.map_err(|why| format!("variable {:?} cannot be read: {why}; convert it to a real numeric array (e.g. `double` or `uint8`) and save again", var.name))?);
            }
        }
    }
    names.iter().zip(found).map(|(n, a)| a.ok_or_else(|| format!("no variable {n:?}; the file holds {seen:?}; name the right variable in the manifest's [format] table"))).collect()
}

/// How a MAT-file holds a labelled image set (the manifest's `mat-v5` format table).
#[derive(Debug, Clone, PartialEq)]
pub struct MatLayout {
    /// The image variable: MATLAB dimensions [height, width, channels, N], or [height, width, N]
    /// for grey images; values 0..255 (any numeric class).
    pub images: String,
    /// The label variable: N values, a column [N, 1] or a row [1, N], non-negative integers.
    pub labels: String,
    /// Subtracted from every label first (1 for 1-based labels).
    pub label_offset: i64,
    /// Then every label is taken modulo this (10 for SVHN, whose digit 0 has label 10).
    pub label_modulo: Option<u32>,
}

/// Reads a labelled image set from a MAT-file: MATLAB's column-major `X(row, col, ch, n)`
/// becomes the row-major `N·C·H·W` of an [`ImageSet`], each value divided by 255.
pub fn load_mat_images(path: &Path, layout: &MatLayout) -> Result<ImageSet, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bad = |m: String| DataError::format(path, m);
    let vars = read_variables(&bytes, &[&layout.images, &layout.labels]).map_err(bad)?;
    let (x, y) = (&vars[0], &vars[1]);
    let (h, w, c, n) = match x.dims.as_slice() {
        [h, w, c, n] => (*h, *w, *c, *n),
        [h, w, n] => (*h, *w, 1, *n),
        other => return Err(bad(format!("variable {:?} has dimensions {other:?}; expected [height, width, channels, N] or [height, width, N]", x.name))),
    };
    let label_shape_ok = matches!(y.dims.as_slice(), [a, 1] | [1, a] if *a == n);
    if !label_shape_ok {
        return Err(bad(format!("variable {:?} has dimensions {:?}; expected [{n}, 1] or [1, {n}], one label for each of the {n} images of {:?}", y.name, y.dims, x.name)));
    }
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let v = y.values.get(i);
        let shifted = v - layout.label_offset as f64;
        let ok = v.is_finite() && v.fract() == 0.0 && shifted >= 0.0 && shifted < f64::from(u32::MAX);
        if !ok {
            return Err(bad(format!("variable {:?}, element {i} (0-based): label {v} is not a non-negative integer after subtracting label_offset {}", y.name, layout.label_offset)));
        }
        let mut l = shifted as u32;
        if let Some(m) = layout.label_modulo {
            l %= m;
        }
        labels.push(l);
    }
    let plane = h * w;
    let mut pixels = vec![0f32; n * c * plane];
    for img in 0..n {
        for ch in 0..c {
            for col in 0..w {
                // X(row, col, ch, img) is at row + h·(col + w·(ch + c·img)), column-major.
                let src = h * (col + w * (ch + c * img));
                for row in 0..h {
                    let v = x.values.get(src + row);
                    if !(0.0..=255.0).contains(&v) {
                        return Err(bad(format!("variable {:?}: value {v} at ({}, {}, {}, {}) (1-based) is outside 0..255", x.name, row + 1, col + 1, ch + 1, img + 1)));
                    }
                    pixels[((img * c + ch) * h + row) * w + col] = (v / 255.0) as f32;
                }
            }
        }
    }
    Ok(ImageSet { channels: c, height: h, width: w, pixels, num_classes: super::formats::inferred_classes(&labels), labels })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Fixtures are written byte by byte from the published Level-5 layout, so the reader is
    //! checked against the format description, not against itself.
    use super::*;
    use std::io::Write;

    /// Byte order of a fixture.
    #[derive(Clone, Copy)]
    pub(crate) struct Order {
        big: bool,
    }

    impl Order {
        fn u32(self, v: u32) -> [u8; 4] {
            if self.big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        }
    }

    pub(crate) const LE: Order = Order { big: false };
    const BE: Order = Order { big: true };

    /// The 128-byte header: text padded with spaces to 116 bytes, 8 zero bytes of subsystem
    /// offset, version 0x0100 and the endian indicator, both written in the file's byte order.
    fn header(o: Order, text: &str) -> Vec<u8> {
        let mut h = text.as_bytes().to_vec();
        h.resize(116, b' ');
        h.extend([0u8; 8]);
        h.extend(if o.big { [0x01, 0x00] } else { [0x00, 0x01] });
        h.extend(if o.big { *b"MI" } else { *b"IM" });
        assert_eq!(h.len(), 128);
        h
    }

    /// A data element in the ordinary form: type, byte count, data, zero padding to 8 bytes.
    fn element(o: Order, ty: u32, data: &[u8]) -> Vec<u8> {
        let mut e = o.u32(ty).to_vec();
        e.extend(o.u32(data.len() as u32));
        e.extend(data);
        while !e.len().is_multiple_of(8) {
            e.push(0);
        }
        e
    }

    /// A data element in the small form: one word with the byte count in its upper 16 bits and
    /// the type in its lower 16, then the data padded to 4 bytes.
    fn small_element(o: Order, ty: u32, data: &[u8]) -> Vec<u8> {
        assert!(data.len() <= 4);
        let mut e = o.u32(((data.len() as u32) << 16) | ty).to_vec();
        e.extend(data);
        e.resize(8, 0);
        e
    }

    struct Var<'a> {
        name: &'a str,
        class: u8,
        complex: bool,
        dims: &'a [i32],
        /// The storage type and bytes of the real part.
        ty: u32,
        real: Vec<u8>,
    }

    /// A miMATRIX element: array flags (class in the low byte, complex bit 0x0800; nzmax 0),
    /// dimensions (miINT32), name (miINT8, in the small form when it fits in 4 bytes), real part.
    fn matrix(o: Order, v: &Var) -> Vec<u8> {
        let mut flags = o.u32(u32::from(v.class) | if v.complex { 0x0800 } else { 0 }).to_vec();
        flags.extend(o.u32(0));
        let mut body = element(o, 6, &flags);
        let dims: Vec<u8> = v.dims.iter().flat_map(|&d| o.u32(d as u32)).collect();
        body.extend(element(o, 5, &dims));
        body.extend(if v.name.len() <= 4 { small_element(o, 1, v.name.as_bytes()) } else { element(o, 1, v.name.as_bytes()) });
        body.extend(element(o, v.ty, &v.real));
        if v.complex {
            body.extend(element(o, v.ty, &v.real));
        }
        element(o, 14, &body)
    }

    /// A miCOMPRESSED element holding `inner` (a whole element, tag included), not padded.
    fn compressed(o: Order, inner: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(inner).unwrap();
        let z = z.finish().unwrap();
        let mut e = o.u32(15).to_vec();
        e.extend(o.u32(z.len() as u32));
        e.extend(z);
        e
    }

    /// The hand-made pixel value of X(r, c, ch, n) (0-based indices): distinct for every
    /// position of the [2, 3, 3, 4] fixture, at most 1 + 4 + 20 + 120 = 145.
    fn px(r: usize, c: usize, ch: usize, n: usize) -> u8 {
        (r + 2 * c + 10 * ch + 40 * n) as u8
    }

    /// X as MATLAB stores it: column-major, the first index fastest.
    fn x_column_major() -> Vec<u8> {
        let mut v = Vec::new();
        for n in 0..4 {
            for ch in 0..3 {
                for c in 0..3 {
                    for r in 0..2 {
                        v.push(px(r, c, ch, n));
                    }
                }
            }
        }
        v
    }

    const Y: [f64; 4] = [10.0, 3.0, 1.0, 10.0];

    fn doubles(o: Order, v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| if o.big { x.to_be_bytes() } else { x.to_le_bytes() }).collect()
    }

    pub(crate) fn x_var(o: Order) -> Vec<u8> {
        matrix(o, &Var { name: "X", class: 9, complex: false, dims: &[2, 3, 3, 4], ty: 2, real: x_column_major() })
    }

    pub(crate) fn y_var(o: Order) -> Vec<u8> {
        matrix(o, &Var { name: "y", class: 6, complex: false, dims: &[4, 1], ty: 9, real: doubles(o, &Y) })
    }

    /// A char array (class 4) that the reader must skip.
    fn note_var(o: Order) -> Vec<u8> {
        let text: Vec<u8> = "hi".encode_utf16().flat_map(|u| if o.big { u.to_be_bytes() } else { u.to_le_bytes() }).collect();
        matrix(o, &Var { name: "__note", class: 4, complex: false, dims: &[1, 2], ty: 4, real: text })
    }

    pub(crate) fn file(o: Order, elements: &[Vec<u8>]) -> Vec<u8> {
        let mut f = header(o, "MATLAB 5.0 MAT-file, written by the reprise tests");
        for e in elements {
            f.extend(e);
        }
        f
    }

    pub(crate) fn svhn_layout() -> MatLayout {
        MatLayout { images: "X".into(), labels: "y".into(), label_offset: 0, label_modulo: Some(10) }
    }

    fn load(bytes: &[u8], layout: &MatLayout) -> Result<ImageSet, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fixture.mat");
        std::fs::write(&p, bytes).unwrap();
        load_mat_images(&p, layout)
    }

    fn error(bytes: &[u8], layout: &MatLayout) -> String {
        let e = load(bytes, layout).unwrap_err();
        assert!(matches!(e, DataError::Format { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("fixture.mat"), "{m}");
        m
    }

    /// Every pixel lands at its N·C·H·W position with value/255, and 10 becomes digit 0.
    fn check(set: &ImageSet) {
        assert_eq!((set.len(), set.channels, set.height, set.width), (4, 3, 2, 3));
        assert_eq!(set.labels, vec![0, 3, 1, 0]);
        assert_eq!(set.num_classes, 4);
        assert_eq!(set.pixels.len(), 4 * 3 * 2 * 3);
        for n in 0..4 {
            for ch in 0..3 {
                for r in 0..2 {
                    for c in 0..3 {
                        let at = ((n * 3 + ch) * 2 + r) * 3 + c;
                        assert_eq!(set.pixels[at], f32::from(px(r, c, ch, n)) / 255.0, "X({r},{c},{ch},{n}) 0-based");
                    }
                }
            }
        }
        // Spot checks worked out by hand: the file's second X byte is X(2,1,1,1) (1-based) = 1,
        // which is row 1, column 0 of image 0, channel 0: N·C·H·W offset 3. Image 1, channel 2,
        // row 1, column 2 is offset ((1·3 + 2)·2 + 1)·3 + 2 = 35 and holds 1 + 4 + 20 + 40 = 65.
        assert_eq!(set.pixels[3], 1.0 / 255.0);
        assert_eq!(set.pixels[1], 2.0 / 255.0);
        assert_eq!(set.pixels[35], 65.0 / 255.0);
    }

    #[test]
    fn uncompressed_little_endian() {
        let bytes = file(LE, &[note_var(LE), x_var(LE), y_var(LE)]);
        check(&load(&bytes, &svhn_layout()).unwrap());
    }

    #[test]
    fn compressed_elements() {
        let bytes = file(LE, &[compressed(LE, &note_var(LE)), compressed(LE, &x_var(LE)), compressed(LE, &y_var(LE))]);
        check(&load(&bytes, &svhn_layout()).unwrap());
        // Compressed and plain elements may be mixed, in any order.
        let bytes = file(LE, &[y_var(LE), compressed(LE, &x_var(LE))]);
        check(&load(&bytes, &svhn_layout()).unwrap());
    }

    #[test]
    fn big_endian_file() {
        let bytes = file(BE, &[note_var(BE), compressed(BE, &x_var(BE)), y_var(BE)]);
        check(&load(&bytes, &svhn_layout()).unwrap());
    }

    #[test]
    fn long_names_and_compact_storage() {
        // A double array stored as miUINT8 (MATLAB's compact storage), 1-based labels stored
        // as miINT32, and names too long for the small form.
        let x = matrix(LE, &Var { name: "images", class: 6, complex: false, dims: &[2, 3, 3, 4], ty: 2, real: x_column_major() });
        let y = matrix(LE, &Var { name: "labels", class: 6, complex: false, dims: &[1, 4], ty: 5, real: [11i32, 4, 2, 11].iter().flat_map(|v| v.to_le_bytes()).collect() });
        let layout = MatLayout { images: "images".into(), labels: "labels".into(), label_offset: 1, label_modulo: Some(10) };
        check(&load(&file(LE, &[x, y]), &layout).unwrap());
        // Without a modulo the labels stay as stored (minus the offset).
        let y = matrix(LE, &Var { name: "y", class: 6, complex: false, dims: &[4, 1], ty: 9, real: doubles(LE, &Y) });
        let set = load(&file(LE, &[x_var(LE), y]), &MatLayout { label_modulo: None, ..svhn_layout() }).unwrap();
        assert_eq!((set.labels, set.num_classes), (vec![10, 3, 1, 10], 11));
    }

    #[test]
    fn grey_images_have_three_dimensions() {
        let x = matrix(LE, &Var { name: "X", class: 9, complex: false, dims: &[2, 2, 1], ty: 2, real: vec![0, 255, 51, 102] });
        let y = matrix(LE, &Var { name: "y", class: 6, complex: false, dims: &[1, 1], ty: 9, real: doubles(LE, &[7.0]) });
        let set = load(&file(LE, &[x, y]), &svhn_layout()).unwrap();
        assert_eq!((set.channels, set.height, set.width, set.labels.clone()), (1, 2, 2, vec![7]));
        // Column-major [0 51; 255 102] read row by row.
        assert_eq!(set.pixels, vec![0.0, 0.2, 1.0, 0.4]);
    }

    #[test]
    fn v73_hdf5_files_are_refused_with_what_to_do() {
        let mut bytes = header(LE, "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 2026 HDF5 schema 1.00 .");
        bytes[124..126].copy_from_slice(&[0x00, 0x02]);
        bytes.resize(512, 0);
        bytes.extend(b"\x89HDF\r\n\x1a\n");
        bytes.extend([0u8; 64]);
        let m = error(&bytes, &svhn_layout());
        assert!(m.contains("-v7.3") && m.contains("-v7'") && m.contains("convert"), "{m}");
    }

    #[test]
    fn refusals_name_the_file_and_the_fix() {
        let lay = svhn_layout();
        // Not a MAT-file at all (a Level-4 file has no text header).
        let m = error(&[0u8; 200], &lay);
        assert!(m.contains("not a Level-5 MAT-file") && m.contains("-v7"), "{m}");
        let m = error(b"MATLAB", &lay);
        assert!(m.contains("not a Level-5 MAT-file"), "{m}");
        // A damaged endian indicator.
        let mut bytes = file(LE, &[x_var(LE), y_var(LE)]);
        bytes[126..128].copy_from_slice(b"XX");
        let m = error(&bytes, &lay);
        assert!(m.contains("byte offset 126") && m.contains("endian indicator"), "{m}");
        // A wrong version.
        let mut bytes = file(LE, &[x_var(LE), y_var(LE)]);
        bytes[124..126].copy_from_slice(&[0x00, 0x03]);
        assert!(error(&bytes, &lay).contains("version 0x0300"));
        // A missing variable lists those present.
        let m = error(&file(LE, &[note_var(LE), y_var(LE)]), &lay);
        assert!(m.contains("no variable \"X\"") && m.contains("\"__note\"") && m.contains("[format]"), "{m}");
        // Complex, sparse and cell arrays are refused when asked for, by name.
        let complex = matrix(LE, &Var { name: "X", class: 9, complex: true, dims: &[2, 3, 3, 4], ty: 2, real: x_column_major() });
        let m = error(&file(LE, &[complex, y_var(LE)]), &lay);
        assert!(m.contains("variable \"X\"") && m.contains("complex") && m.contains("real numeric"), "{m}");
        let sparse = matrix(LE, &Var { name: "y", class: 5, complex: false, dims: &[4, 1], ty: 9, real: doubles(LE, &Y) });
        let m = error(&file(LE, &[x_var(LE), sparse]), &lay);
        assert!(m.contains("variable \"y\"") && m.contains("sparse"), "{m}");
        let cell = matrix(LE, &Var { name: "y", class: 1, complex: false, dims: &[1, 1], ty: 9, real: vec![] });
        assert!(error(&file(LE, &[x_var(LE), cell]), &lay).contains("cell array"));
        // A truncated file and a corrupt compressed element.
        let bytes = file(LE, &[x_var(LE), y_var(LE)]);
        let m = error(&bytes[..bytes.len() - 20], &lay);
        assert!(m.contains("ends inside"), "{m}");
        let mut z = compressed(LE, &x_var(LE));
        let last = z.len() - 6;
        z[last] ^= 0xff;
        z.truncate(z.len() - 3);
        let len = (z.len() - 8) as u32;
        z[4..8].copy_from_slice(&len.to_le_bytes());
        let m = error(&file(LE, &[z, y_var(LE)]), &lay);
        assert!(m.contains("compressed element") && m.contains("re-download"), "{m}");
        // Dimensions and values that do not fit the layout.
        let y5 = matrix(LE, &Var { name: "y", class: 6, complex: false, dims: &[5, 1], ty: 9, real: doubles(LE, &[1.0; 5]) });
        let m = error(&file(LE, &[x_var(LE), y5]), &lay);
        assert!(m.contains("[5, 1]") && m.contains("[4, 1] or [1, 4]"), "{m}");
        let x2 = matrix(LE, &Var { name: "X", class: 9, complex: false, dims: &[6, 12], ty: 2, real: x_column_major() });
        assert!(error(&file(LE, &[x2, y_var(LE)]), &lay).contains("[height, width, channels, N]"));
        let yf = matrix(LE, &Var { name: "y", class: 6, complex: false, dims: &[4, 1], ty: 9, real: doubles(LE, &[1.0, 2.5, 3.0, 4.0]) });
        let m = error(&file(LE, &[x_var(LE), yf]), &lay);
        assert!(m.contains("element 1") && m.contains("2.5"), "{m}");
        let xd = matrix(LE, &Var { name: "X", class: 6, complex: false, dims: &[1, 1, 1], ty: 9, real: doubles(LE, &[300.0]) });
        let y1 = matrix(LE, &Var { name: "y", class: 6, complex: false, dims: &[1, 1], ty: 9, real: doubles(LE, &[1.0]) });
        assert!(error(&file(LE, &[xd, y1]), &lay).contains("outside 0..255"));
        let short = matrix(LE, &Var { name: "X", class: 9, complex: false, dims: &[2, 3, 3, 5], ty: 2, real: x_column_major() });
        assert!(error(&file(LE, &[short, y_var(LE)]), &lay).contains("(90 values) but its data holds 72"));
    }

    /// Damaged files are errors, never panics: every truncation, and every byte flipped, of a
    /// plain and a compressed fixture.
    #[test]
    fn damaged_bytes_never_panic() {
        for bytes in [file(LE, &[x_var(LE), y_var(BE)]), file(BE, &[compressed(BE, &x_var(BE)), y_var(BE)])] {
            for cut in 0..bytes.len() {
                let _ = read_variables(&bytes[..cut], &["X", "y"]);
            }
            for i in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut b = bytes.clone();
                    b[i] ^= flip;
                    let _ = read_variables(&b, &["X", "y"]);
                }
            }
        }
    }
}
