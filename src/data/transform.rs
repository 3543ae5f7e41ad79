//! Image transforms that derived-data cells apply to every image of a set: rotation and
//! resampling to another size. Pure functions of the pixels, summed in `f64`, so a cell's output
//! is the same bits on every machine.

use super::ImageSet;

/// Every image rotated by `degrees` counter-clockwise (as displayed) about its centre, sampled
/// bilinearly; what comes from outside the source image is 0. A multiple of 90° on a square
/// image moves pixels exactly.
pub fn rotate(images: &ImageSet, degrees: f64) -> ImageSet {
    let (h, w) = (images.height, images.width);
    let (sin, cos) = degrees.to_radians().sin_cos();
    // Snap the trigonometry of right angles, so that 90° is an exact permutation.
    let snap = |v: f64| if (v - v.round()).abs() < 1e-12 { v.round() } else { v };
    let (sin, cos) = (snap(sin), snap(cos));
    // For each output pixel, where it comes from in the source (row, column), shared by images.
    let mut source = Vec::with_capacity(h * w);
    for r in 0..h {
        for c in 0..w {
            // Centred coordinates with y pointing up.
            let x = c as f64 + 0.5 - w as f64 / 2.0;
            let y = h as f64 / 2.0 - (r as f64 + 0.5);
            let (xs, ys) = (x * cos + y * sin, -x * sin + y * cos);
            source.push((h as f64 / 2.0 - ys - 0.5, xs + w as f64 / 2.0 - 0.5));
        }
    }
    map_planes(images, h, w, |plane, out| {
        for (o, &(row, col)) in out.iter_mut().zip(&source) {
            *o = bilinear(plane, h, w, row, col) as f32;
        }
    })
}

/// One copy of every image per angle of `degrees` ([`rotate`]d; 0° leaves the pixels as they
/// are), the j-th angle's copies after the (j−1)-th's; class c of the j-th copy becomes class
/// j·C + c, so every (class, angle) pair is a class of its own.
pub fn angle_classes(images: &ImageSet, degrees: &[f64]) -> ImageSet {
    let c = images.num_classes;
    let n = degrees.len();
    let mut out = ImageSet {
        channels: images.channels,
        height: images.height,
        width: images.width,
        pixels: Vec::with_capacity(n * images.pixels.len()),
        labels: Vec::with_capacity(n * images.len()),
        num_classes: c * n,
    };
    for (j, &d) in degrees.iter().enumerate() {
        if d == 0.0 {
            out.pixels.extend_from_slice(&images.pixels);
        } else {
            out.pixels.extend(rotate(images, d).pixels);
        }
        // A rotation keeps every image's label.
        out.labels.extend(images.labels.iter().map(|&l| (j * c) as u32 + l));
    }
    out
}

/// The value at fractional (row, column) of an `h`×`w` plane, 0 outside.
fn bilinear(plane: &[f32], h: usize, w: usize, row: f64, col: f64) -> f64 {
    let (r0, c0) = (row.floor(), col.floor());
    let (fr, fc) = (row - r0, col - c0);
    let at = |r: f64, c: f64| -> f64 {
        if r < 0.0 || c < 0.0 || r >= h as f64 || c >= w as f64 {
            0.0
        } else {
            f64::from(plane[r as usize * w + c as usize])
        }
    };
    let mut v = 0.0;
    for (dr, wr) in [(0.0, 1.0 - fr), (1.0, fr)] {
        for (dc, wc) in [(0.0, 1.0 - fc), (1.0, fc)] {
            if wr * wc != 0.0 {
                v += wr * wc * at(r0 + dr, c0 + dc);
            }
        }
    }
    v
}

/// Every image resampled to `height`×`width` by area averaging: an output pixel is the mean of
/// the source over its footprint, partly covered source pixels weighted by the overlap. Works
/// both ways (down: a box filter; up: each source pixel spread over the output pixels it covers).
pub fn resize(images: &ImageSet, height: usize, width: usize) -> ImageSet {
    let (wy, wx) = (overlaps(images.height, height), overlaps(images.width, width));
    map_planes(images, height, width, |plane, out| {
        // Rows first (out_rows × in_width), then columns.
        let mut rows = vec![0f64; height * images.width];
        for (o, weights) in wy.iter().enumerate() {
            for &(i, f) in weights {
                for c in 0..images.width {
                    rows[o * images.width + c] += f * f64::from(plane[i * images.width + c]);
                }
            }
        }
        for r in 0..height {
            for (o, weights) in wx.iter().enumerate() {
                out[r * width + o] = weights.iter().map(|&(i, f)| f * rows[r * images.width + i]).sum::<f64>() as f32;
            }
        }
    })
}

/// For each of `n_out` output cells over `n_in` source cells: the source cells it covers and the
/// share of its footprint each covers (summing to 1).
fn overlaps(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let (lo, hi) = (o as f64 * scale, (o + 1) as f64 * scale);
            (lo.floor() as usize..(hi.ceil() as usize).min(n_in)).map(|i| (i, ((hi.min(i as f64 + 1.0) - lo.max(i as f64)) / scale))).filter(|&(_, f)| f > 0.0).collect()
        })
        .collect()
}

/// A set of the same labels whose every (image, channel) plane is `f(plane, out)` at `h`×`w`.
fn map_planes(images: &ImageSet, h: usize, w: usize, f: impl Fn(&[f32], &mut [f32])) -> ImageSet {
    let plane_in = images.height * images.width;
    let mut pixels = vec![0f32; images.len() * images.channels * h * w];
    for (src, dst) in images.pixels.chunks(plane_in.max(1)).zip(pixels.chunks_mut((h * w).max(1))) {
        f(src, dst);
    }
    ImageSet { channels: images.channels, height: h, width: w, pixels, labels: images.labels.clone(), num_classes: images.num_classes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(h: usize, w: usize, pixels: Vec<f32>) -> ImageSet {
        ImageSet { channels: 1, height: h, width: w, pixels, labels: vec![0], num_classes: 1 }
    }

    #[test]
    fn right_angles_permute_pixels_exactly() {
        let n = 5;
        let img: Vec<f32> = (0..n * n).map(|i| i as f32 / 25.0).collect();
        let s = set(n, n, img.clone());
        assert_eq!(rotate(&s, 0.0).pixels, img);
        assert_eq!(rotate(&s, 360.0).pixels, img);
        // Counter-clockwise by 90°: the right column becomes the top row.
        let r = rotate(&s, 90.0).pixels;
        for row in 0..n {
            for col in 0..n {
                assert_eq!(r[row * n + col], img[col * n + (n - 1 - row)], "({row}, {col})");
            }
        }
        // Four quarter turns, and two half turns, are the identity.
        let mut q = s.clone();
        for _ in 0..4 {
            q = rotate(&q, 90.0);
        }
        assert_eq!(q.pixels, img);
        assert_eq!(rotate(&rotate(&s, 180.0), 180.0).pixels, img);
    }

    #[test]
    fn a_small_angle_interpolates_between_neighbours() {
        // A 3×3 image with one lit centre pixel keeps its centre under any rotation; 45° spreads
        // the corners' zero mass in, leaving the centre at 1.
        let mut img = vec![0f32; 9];
        img[4] = 1.0;
        let r = rotate(&set(3, 3, img), 45.0).pixels;
        assert_eq!(r[4], 1.0);
        // A 2×2 image lit at the top left, rotated by 45°. The top-left output centre, (x, y) =
        // (−0.5, 0.5) with y up, comes from (x cos + y sin, −x sin + y cos) = (0, √2/2): source
        // row 1 − √2/2 − 0.5 ≈ −0.207, column 0.5. Bilinear weights: rows −1 (outside, 0) and 0
        // (weight row + 1), columns 0 and 1 (weight ½ each); only pixel (0, 0) is lit.
        let r = rotate(&set(2, 2, vec![1.0, 0.0, 0.0, 0.0]), 45.0).pixels;
        let row = 1.0 - 2f64.sqrt() / 2.0 - 0.5;
        let expect = (row + 1.0) * 0.5;
        assert!((f64::from(r[0]) - expect).abs() < 1e-6, "{} vs {expect}", r[0]);
    }

    #[test]
    fn resizing_averages_areas_down_and_spreads_them_up() {
        // 4×4 → 2×2: each output is the mean of a 2×2 block.
        let img: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let down = resize(&set(4, 4, img.clone()), 2, 2).pixels;
        assert_eq!(down, vec![2.5, 4.5, 10.5, 12.5]);
        // 3 → 2 on one axis: outputs cover [0, 1.5) and [1.5, 3).
        let row = resize(&set(1, 3, vec![0.0, 3.0, 6.0]), 1, 2).pixels;
        assert_eq!(row, vec![1.0, 5.0]); // (0 + 0.5·3)/1.5, (0.5·3 + 6)/1.5
                                         // Up 2 → 4: each source pixel is copied into the two it covers; the mean is kept.
        let up = resize(&set(2, 2, vec![1.0, 2.0, 3.0, 4.0]), 4, 4).pixels;
        assert_eq!(&up[..4], &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&up[12..], &[3.0, 3.0, 4.0, 4.0]);
        // Same size is the identity.
        assert_eq!(resize(&set(4, 4, img.clone()), 4, 4).pixels, img);
    }
}
