//! Single-precision GEMM over strided matrix views, on one thread or split between rayon's
//! threads with the same bits.
//!
//! Every GEMM of the kernels goes through here: the convolution's im2col path, the fused linear
//! layer and attention's per-head products. [`Mat`] views a slice as a strided matrix (a
//! transpose or one head's columns cost nothing), [`matmul`] and [`matmul_rows`] run the `gemm`
//! crate on it after checking that every element lies inside its slice, and [`matmul_par`] cuts
//! the product between threads only where the sums stay those of the single-threaded product.

use rayon::prelude::*;

/// A read-only strided matrix over a slice: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(super) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// Element (r, c) at `data[r·rs + c·cs]`: e.g. one head's columns of a wider row-major matrix.
    pub(super) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Mat { data, rows, cols, rs, cs }
    }

    pub(super) fn t(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Rows `r0..r0 + rows` (r0 < self.rows).
    fn sub_rows(self, r0: usize, rows: usize) -> Self {
        Mat { data: &self.data[r0 * self.rs..], rows, ..self }
    }

    /// Columns `c0..c0 + cols` (c0 < self.cols).
    fn sub_cols(self, c0: usize, cols: usize) -> Self {
        Mat { data: &self.data[c0 * self.cs..], cols, ..self }
    }

    /// Every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.rs).zip((self.cols - 1).checked_mul(self.cs)).and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|i| i < self.data.len())
    }
}

/// `dst` (row-major a.rows × b.cols) = a·b, or dst + a·b when `accumulate`.
pub(super) fn matmul(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, par: gemm::Parallelism) {
    assert!(dst.len() == a.rows * b.cols, "conv matmul: inconsistent shapes");
    matmul_rows(dst, b.cols, a, b, accumulate, par);
}

/// [`matmul`] into a.rows × b.cols elements of `dst` whose rows start `dst_rs` (≥ b.cols) apart.
pub(super) fn matmul_rows(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, accumulate: bool, par: gemm::Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    // Invariant of every call site (sizes derive from one `Geom` or one attention shape);
    // checking it here is what makes the raw-pointer call below sound, so a violation must stop
    // rather than read or write out of bounds.
    let dst_end = (m - 1).checked_mul(dst_rs).and_then(|v| v.checked_add(n));
    assert!(b.rows == k && dst_rs >= n && dst_end.is_some_and(|end| end <= dst.len()) && a.in_bounds() && b.in_bounds(), "conv matmul: inconsistent shapes");
    // SAFETY: all three matrices lie inside their slices (asserted above), `dst` is exclusively
    // borrowed and does not alias `a` or `b`.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, a, b, accumulate, par) }
}

/// `gemm` of a.rows × b.cols elements at `dst`, rows `dst_rs` apart (= a·b, or += with
/// `accumulate`).
///
/// # Safety
/// `a` and `b` lie inside their slices, `b.rows == a.cols`, and every element written
/// (`dst + r·dst_rs + c`) is valid for writes and read or written by no one else during the call.
unsafe fn gemm_raw(dst: *mut f32, dst_rs: usize, a: Mat, b: Mat, accumulate: bool, par: gemm::Parallelism) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

/// Below this many multiply-adds a GEMM is not split between threads (the tasks' start-up would
/// cost more than they save).
const SPLIT_MIN_FMAS: usize = 1 << 18;

/// [`matmul`] on all of rayon's threads: `dst` is cut into one block of whole rows or whole
/// columns per thread and each block is one single-threaded GEMM.
///
/// `gemm`'s own threading (`Parallelism::Rayon`) hands out many small jobs with a barrier between
/// packing and computing; on the MLP's shapes (batch 128) two threads ran a training step slower
/// than one. One task per thread keeps both cores in the FMA kernel. The cut goes along the longer
/// side of `dst` where it can, so what every task packs again is the smaller operand (columns:
/// all of `a`; rows: all of `b`).
///
/// The result must be bit-identical to the single-threaded GEMM (a cell's key does not name its
/// thread count). Each element of `dst` is one sum over k, but `gemm` cuts k into blocks whose
/// size depends on the shape's class ([`gemm_shape_class`]), so a cut is made only where every
/// block falls in the class of the whole product; otherwise the GEMM runs on one thread. A test
/// checks the bits for the shapes of every model.
pub(super) fn matmul_par(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = rayon::current_num_threads();
    let fmas = m.saturating_mul(k).saturating_mul(n);
    if threads <= 1 || fmas < SPLIT_MIN_FMAS {
        return matmul(dst, a, b, accumulate, gemm::Parallelism::None);
    }
    let (rows, cols) = (split_len(m, threads), split_len(n, threads));
    let whole = gemm_shape_class(m, n);
    let rows_ok = m > rows && block_lens(m, rows).iter().all(|&mb| gemm_shape_class(mb, n) == whole);
    let cols_ok = n > cols && block_lens(n, cols).iter().all(|&nb| gemm_shape_class(m, nb) == whole);
    if !(rows_ok || cols_ok) {
        return matmul(dst, a, b, accumulate, gemm::Parallelism::None);
    }
    assert!(dst.len() == m * n && b.rows == k && a.in_bounds() && b.in_bounds(), "conv matmul: inconsistent shapes");
    if rows_ok && (m >= n || !cols_ok) {
        dst.par_chunks_mut(rows * n).enumerate().for_each(|(i, block)| {
            let r0 = i * rows;
            let part = a.sub_rows(r0, block.len() / n);
            matmul_rows(block, n, part, b, accumulate, gemm::Parallelism::None);
        });
    } else {
        let dst_ptr = SharedDst(dst.as_mut_ptr());
        (0..n.div_ceil(cols)).into_par_iter().for_each(|i| {
            let c0 = i * cols;
            let part = b.sub_cols(c0, cols.min(n - c0));
            let dst_ptr = &dst_ptr;
            // SAFETY: `dst` holds m × n elements (asserted above) and is exclusively borrowed for
            // this call; task i writes only columns c0..c0 + part.cols of each row, and the tasks'
            // column ranges are disjoint. The operands lie inside their slices (asserted above;
            // `sub_cols` keeps that) and do not alias `dst`.
            unsafe { gemm_raw(dst_ptr.0.add(c0), n, a, part, accumulate, gemm::Parallelism::None) }
        });
    }
}

/// Blocks of a split GEMM are whole multiples of this many rows or columns (two AVX2 registers
/// of f32, the height of gemm's f32 microkernel), so that no task ends in a narrow partial tile.
const SPLIT_ALIGN: usize = 16;

/// How `gemm` 0.19 (`gemm_basic_generic`) cuts k for an m×n product: one block of up to 1024
/// for products of at most 16×16 elements, blocks of min(k, 512) when m and n are both ≤ 64,
/// else blocks sized from the cache sizes and k alone. Products of one class sum every element
/// over the same k blocks (up to 512, all of them use one block, but the smallest products also
/// run other kernels, so classes are kept apart there too).
fn gemm_shape_class(m: usize, n: usize) -> u8 {
    if m * n <= 16 * 16 {
        0
    } else if m <= 64 && n <= 64 {
        1
    } else {
        2
    }
}

/// The distinct lengths of the blocks of `block` (the last may be shorter) that cover `len`.
fn block_lens(len: usize, block: usize) -> [usize; 2] {
    let last = len - (len.div_ceil(block.max(1)).max(1) - 1) * block;
    [block.min(len), last]
}

/// Length of each of `parts` blocks covering `len`, rounded up to [`SPLIT_ALIGN`].
fn split_len(len: usize, parts: usize) -> usize {
    len.div_ceil(parts).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN
}

/// The destination pointer of a column-split GEMM, shared by its tasks (which write disjoint
/// columns).
struct SharedDst(*mut f32);
// SAFETY: the tasks of `matmul_par` write disjoint columns through it while `dst` is exclusively
// borrowed by that call.
unsafe impl Sync for SharedDst {}

/// The split GEMM against the single-threaded one, bit for bit.
#[cfg(test)]
mod split_tests {
    use super::*;
    use crate::rng::Rng;

    /// (m, k, n, transposed a, transposed b): the fused linear layer's three GEMMs on the MLP's
    /// shapes (forward x·Wᵀ, input gradient gy·W, weight gradient gyᵀ·x), the CNN's 3136 → 128
    /// layer (forward, weight gradient), and odd sizes that leave partial blocks in both split
    /// directions.
    const SHAPES: &[(usize, usize, usize, bool, bool)] = &[
        (128, 784, 512, false, true),
        (128, 256, 512, false, false),
        (512, 128, 784, true, false),
        (128, 512, 256, false, true),
        (128, 3136, 128, false, true),
        (128, 128, 3136, true, false),
        (2176, 64, 192, false, true),
        (192, 2176, 64, true, false),
        (64, 2176, 128, true, false),
        (2176, 128, 64, false, false),
        (37, 129, 301, false, true),
        (301, 65, 37, true, false),
        (97, 3, 2000, false, false),
        (33, 1000, 33, true, true),
    ];

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn operand(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Mat<'_> {
        if transposed {
            Mat::row_major(data, cols, rows).t()
        } else {
            Mat::row_major(data, rows, cols)
        }
    }

    #[test]
    fn split_matmul_is_bit_identical_to_one_thread() {
        let mut rng = Rng::new(21);
        for threads in [2, 3, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &(m, k, n, ta, tb) in SHAPES {
                let (av, bv) = (random(&mut rng, m * k), random(&mut rng, k * n));
                let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, tb));
                for accumulate in [false, true] {
                    let start = random(&mut rng, m * n);
                    let mut one = start.clone();
                    matmul(&mut one, a, b, accumulate, gemm::Parallelism::None);
                    let mut split = start.clone();
                    pool.install(|| matmul_par(&mut split, a, b, accumulate));
                    let same = one.iter().zip(&split).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{m}x{k}x{n} (t {ta} {tb}), accumulate {accumulate}, {threads} threads");
                    // Not the same as a GEMM that leaves an element out (the check can fail).
                    assert!(one.iter().zip(&start).any(|(x, y)| x != y));
                }
            }
        }
    }

    #[test]
    fn split_lengths_cover_and_align() {
        for (len, parts) in [(512, 2), (784, 2), (100, 3), (33, 2), (16, 4)] {
            let l = split_len(len, parts);
            assert_eq!(l % SPLIT_ALIGN, 0);
            assert!(l * parts >= len && l < len + SPLIT_ALIGN, "{len} {parts} -> {l}");
        }
    }

    /// Time of the MLP's and the CNN's linear GEMMs, one thread against the split on two, best
    /// of 50. Run with
    /// `cargo test --lib -- --ignored --nocapture split_matmul_speed`.
    #[test]
    #[ignore]
    fn split_matmul_speed() {
        let mut rng = Rng::new(3);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, k, n, ta, tb) in &SHAPES[..6] {
            let (av, bv) = (random(&mut rng, m * k), random(&mut rng, k * n));
            let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, tb));
            let mut dst = vec![0f32; m * n];
            let best = |f: &mut dyn FnMut()| {
                (0..50)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let one = best(&mut || matmul(&mut dst, a, b, false, gemm::Parallelism::None));
            let gemm2 = best(&mut || pool.install(|| matmul(&mut dst, a, b, false, gemm::Parallelism::Rayon(2))));
            let split = best(&mut || pool.install(|| matmul_par(&mut dst, a, b, false)));
            let gf = 2.0 * (m * k * n) as f64 / 1e9;
            println!("{m}x{k}x{n}: 1 thread {:.3} ms ({:.0} GFLOP/s), gemm Rayon(2) {:.3} ms, split {:.3} ms ({:.2}x)", one * 1e3, gf / one, gemm2 * 1e3, split * 1e3, one / split);
        }
    }
}
