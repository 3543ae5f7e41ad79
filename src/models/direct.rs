//! Direct convolution for stride 1 and "same" padding (kernel 2·pad + 1), with no patch matrix.
//!
//! Each sample's channels are copied into zero-padded planes of width Wp = W + 2·pad. In that
//! layout the input of output pixel (y, x) under kernel tap (i, j) sits at q + i·Wp + j, where
//! q = y·Wp + x is the pixel's "wide" index. A block of consecutive wide indices therefore reads
//! one contiguous run of each padded plane per tap, so a register tile of 4 output channels × 24
//! wide pixels is accumulated straight from the planes, Σ over (channel, tap) of weight × run:
//! the im2col copy (nine times the input) and the GEMM's own packing pass both disappear. Wide
//! indices with x ≥ W are computed and thrown away (2·pad of every Wp columns).
//!
//! The same tile computes the input gradient (a "same" convolution of the padded output gradient
//! with the flipped, transposed kernel). The weight gradient is Σ_q g[o, q] · x[c, q + tap] over
//! wide indices, with g zero on the columns x ≥ W and past the last row, so that the thrown-away
//! pixels add nothing; it is accumulated over all samples of a task in registers.
//!
//! The kernels use AVX2 and FMA, detected at run time; [`Plan::new`] returns `None` without
//! them (or for other geometries), and the caller keeps the im2col + GEMM path. Sums run in a
//! different order than that path's GEMM, so results agree with it to rounding, not bit for bit.

use super::conv::Geom;

/// The instruction set of the kernels, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// 16 vector registers of 8 lanes: tiles of 4 channels × 16 pixels (two vectors; three, with
    /// the loaded pixels and the broadcast weight, need more than 16 registers and spill).
    Avx2,
    /// 32 registers of 16 lanes: tiles of 8 channels × 32 pixels.
    Avx512,
}

impl Isa {
    /// Output channels per forward tile (weights are packed in blocks of this many rows).
    fn mr(self) -> usize {
        match self {
            Isa::Avx2 => 4,
            Isa::Avx512 => 8,
        }
    }

    /// Wide pixels per forward tile.
    fn nr(self) -> usize {
        match self {
            Isa::Avx2 => 16,
            Isa::Avx512 => 32,
        }
    }
}

/// The padded-plane layout of one convolution geometry (channel counts are per call).
#[derive(Debug, Clone)]
pub(super) struct Plan {
    h: usize,
    w: usize,
    pad: usize,
    /// Padded row width W + 2·pad.
    wp: usize,
    /// Floats per padded plane: rows pad + H + pad + extra, where the extra zero rows keep every
    /// read of the weight gradient's last tile inside its own plane.
    plane: usize,
    /// Wide pixels computed per plane: H·Wp rounded up to whole tiles.
    qr: usize,
    /// Offset i·Wp + j of every kernel tap, in weight order (i, j).
    taps: Vec<usize>,
    isa: Isa,
}

/// The best kernels this CPU runs, if any. `REPRISE_DIRECT_ISA=avx2` keeps AVX-512 CPUs on the
/// AVX2 kernels (to compare the two).
fn cpu_isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) {
            return None;
        }
        let forced = std::env::var("REPRISE_DIRECT_ISA").is_ok_and(|v| v == "avx2");
        Some(if has!("avx512f") && !forced {
            Isa::Avx512
        } else {
            Isa::Avx2
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

impl Plan {
    /// The plan for `g`, if it is a stride-1 "same" convolution (kernel > 1) and the CPU has
    /// AVX2 and FMA.
    pub(super) fn new(g: &Geom) -> Option<Plan> {
        let same = g.stride == 1
            && g.kh == 2 * g.pad + 1
            && g.kw == 2 * g.pad + 1
            && g.pad > 0
            && g.h > 0
            && g.w > 0;
        if !same {
            return None;
        }
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        let isa = (*ISA.get_or_init(cpu_isa))?;
        Some(Self::layout(g, isa))
    }

    fn layout(g: &Geom, isa: Isa) -> Plan {
        let wp = g.w + 2 * g.pad;
        let nr = isa.nr();
        let qr = (g.h * wp).div_ceil(nr) * nr;
        // The weight gradient reads g[pad·Wp + pad + q] for q < qr inside one plane, and those
        // past the image rows must be padding (zero).
        let extra = (qr - g.h * wp + 2 * g.pad).div_ceil(wp);
        let plane = (g.h + 2 * g.pad + extra) * wp;
        let taps = (0..g.kh)
            .flat_map(|i| (0..g.kw).map(move |j| i * wp + j))
            .collect();
        Plan {
            h: g.h,
            w: g.w,
            pad: g.pad,
            wp,
            plane,
            qr,
            taps,
            isa,
        }
    }

    /// Floats of one sample's padded buffer with `ch` channels. The slack after the last plane
    /// holds the reads of the forward tiles' last columns (their results are thrown away).
    pub(super) fn padded_len(&self, ch: usize) -> usize {
        ch * self.plane + 2 * self.wp
    }

    /// Floats of one sample's wide output with `ch` channels (rounded up to whole tiles).
    pub(super) fn wide_len(&self, ch: usize) -> usize {
        ch.div_ceil(self.isa.mr()) * self.isa.mr() * self.qr
    }

    /// Copy one sample (`ch`×H×W) into `dst` (`padded_len(ch)`), zeros around it. Every element of
    /// `dst` is written.
    pub(super) fn pad_into(&self, src: &[f32], dst: &mut [f32]) {
        let (h, w, pad, wp) = (self.h, self.w, self.pad, self.wp);
        let ch = src.len() / (h * w);
        debug_assert_eq!(dst.len(), self.padded_len(ch));
        let top = pad * wp;
        for (s, d) in src
            .chunks_exact(h * w)
            .zip(dst.chunks_exact_mut(self.plane))
        {
            d[..top + pad].fill(0.0);
            for (y, row) in s.chunks_exact(w).enumerate() {
                let at = top + y * wp + pad;
                d[at..at + w].copy_from_slice(row);
                let end = (at + w + 2 * pad).min(d.len());
                d[at + w..end].fill(0.0);
            }
            d[top + h * wp + pad..].fill(0.0);
        }
        dst[ch * self.plane..].fill(0.0);
    }

    /// The image (`ch`×H×W) inside a wide result (`wide_len(ch)`).
    pub(super) fn compact(&self, wide: &[f32], dst: &mut [f32]) {
        let (h, w, wp) = (self.h, self.w, self.wp);
        for (d, s) in dst.chunks_exact_mut(h * w).zip(wide.chunks_exact(self.qr)) {
            for (drow, srow) in d.chunks_exact_mut(w).zip(s.chunks(wp)) {
                drow.copy_from_slice(&srow[..w]);
            }
        }
    }

    /// Offset of pixel (0, 0) inside a padded plane: a padded gradient read from here is the
    /// wide gradient (zero on the thrown-away columns and rows).
    fn origin(&self) -> usize {
        self.pad * self.wp + self.pad
    }

    /// Weights `rows`×K (row-major) in the forward tile's order: blocks of `mr` rows, K-major
    /// inside, rows past the end zero.
    pub(super) fn pack_weights(&self, w: &[f32], rows: usize) -> Vec<f32> {
        let (k, mr) = (w.len() / rows.max(1), self.isa.mr());
        let blocks = rows.div_ceil(mr);
        let mut out = vec![0f32; blocks * k * mr];
        for (r, row) in w.chunks_exact(k).enumerate() {
            let (b, lane) = (r / mr, r % mr);
            for (kk, &v) in row.iter().enumerate() {
                out[(b * k + kk) * mr + lane] = v;
            }
        }
        out
    }

    /// `wide` (`wide_len(o)`) = the convolution of one padded sample `src` (`cin` channels) with
    /// the packed weights of `o` output channels.
    pub(super) fn conv(&self, src: &[f32], cin: usize, packed: &[f32], o: usize, wide: &mut [f32]) {
        let k = cin * self.taps.len();
        assert!(
            src.len() >= self.padded_len(cin)
                && packed.len() == o.div_ceil(self.isa.mr()) * k * self.isa.mr()
                && wide.len() == self.wide_len(o),
            "direct conv: inconsistent buffer sizes"
        );
        // SAFETY: the CPU has the plan's instructions (checked when the plan was made); the
        // assert above and the layout bound every access: tile reads reach at most
        // (cin−1)·plane + qr − 1 + taps.last() < cin·plane, and writes stay in wide's
        // o_round × qr floats.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let blocks = o.div_ceil(self.isa.mr());
            match self.isa {
                Isa::Avx2 => avx::conv(self, src, cin, packed, blocks, wide),
                Isa::Avx512 => avx512::conv(self, src, cin, packed, blocks, wide),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct conv without a plan")
    }

    /// `gw` (O×K) += Σ over the samples of Σ_q g[o, q] · x[c, q + tap], where `gpad` holds the
    /// padded output gradients (`o` channels, `padded_len(o)` per sample) and `xpad` the padded
    /// inputs (`cin` channels, `padded_len(cin)` per sample) of `samples` samples.
    pub(super) fn weight_grad(
        &self,
        gpad: &[f32],
        o: usize,
        xpad: &[f32],
        cin: usize,
        samples: usize,
        gw: &mut [f32],
    ) {
        let k = cin * self.taps.len();
        assert!(
            gpad.len() >= samples * self.padded_len(o)
                && xpad.len() >= samples * self.padded_len(cin)
                && gw.len() == o * k,
            "direct conv: inconsistent buffer sizes"
        );
        // SAFETY: as in `conv`; gradient reads reach origin + (o−1)·plane + qr − 1 < o·plane.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx::weight_grad(self, gpad, o, xpad, cin, samples, gw)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct conv without a plan")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Isa, Plan};

    const MR: usize = 4;
    const NR: usize = 16;
    use std::arch::x86_64::*;

    /// One 4-channel × 16-pixel tile, accumulated in eight named registers (arrays of vectors
    /// were kept on the stack by the compiler).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn conv_tile(
        src: *const f32,
        plane: usize,
        cin: usize,
        taps: &[usize],
        w: *const f32,
        dst: *mut f32,
        ld: usize,
    ) {
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
        let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
        let mut wk = w;
        for c in 0..cin {
            let base = src.wrapping_add(c * plane);
            for &t in taps {
                let at = base.wrapping_add(t);
                let x0 = load(at);
                let x1 = load(at.wrapping_add(8));
                let w0 = bcast(wk);
                c00 = _mm256_fmadd_ps(w0, x0, c00);
                c01 = _mm256_fmadd_ps(w0, x1, c01);
                let w1 = bcast(wk.wrapping_add(1));
                c10 = _mm256_fmadd_ps(w1, x0, c10);
                c11 = _mm256_fmadd_ps(w1, x1, c11);
                let w2 = bcast(wk.wrapping_add(2));
                c20 = _mm256_fmadd_ps(w2, x0, c20);
                c21 = _mm256_fmadd_ps(w2, x1, c21);
                let w3 = bcast(wk.wrapping_add(3));
                c30 = _mm256_fmadd_ps(w3, x0, c30);
                c31 = _mm256_fmadd_ps(w3, x1, c31);
                wk = wk.wrapping_add(MR);
            }
        }
        for (r, (a0, a1)) in [(c00, c01), (c10, c11), (c20, c21), (c30, c31)]
            .into_iter()
            .enumerate()
        {
            let d = dst.wrapping_add(r * ld);
            store(d, a0);
            store(d.wrapping_add(8), a1);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn conv(
        p: &Plan,
        src: &[f32],
        cin: usize,
        packed: &[f32],
        blocks: usize,
        wide: &mut [f32],
    ) {
        let k = cin * p.taps.len();
        let (s, out) = (src.as_ptr(), wide.as_mut_ptr());
        // Pixel tiles outside: a tile's input window stays in L1 across the channel blocks.
        for q0 in (0..p.qr).step_by(NR) {
            for b in 0..blocks {
                let wb = packed.as_ptr().wrapping_add(b * k * MR);
                let dst = out.wrapping_add(b * MR * p.qr + q0);
                conv_tile(s.wrapping_add(q0), p.plane, cin, &p.taps, wb, dst, p.qr);
            }
        }
    }

    // Debug builds check pointer arithmetic and copies at run time, including inside the std
    // intrinsics `_mm256_loadu_ps` / `_mm256_storeu_ps` (a `copy_nonoverlapping` through the
    // stack), which made these loops several times slower in the dev profile. So: wrapping
    // pointer arithmetic, and loads, stores and broadcasts through an alignment-1 wrapper.

    /// An unaligned 8-lane vector in memory.
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned(__m256);

    /// The eight floats at `p`.
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        (*(p as *const Unaligned)).0
    }

    /// Write eight floats at `p`.
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        *(p as *mut Unaligned) = Unaligned(v);
    }

    /// `*p` in all eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bcast(p: *const f32) -> __m256 {
        _mm256_broadcastss_ps(_mm_load_ss(p))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The sum of 16 lanes held as two halves, in one fixed order. Every weight-gradient kernel
    /// (AVX2 or AVX-512) accumulates wide pixel q in lane q mod 16, in the same sequence, and
    /// ends here, so the gradient is bit-identical whichever instruction set ran it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum16(lo: __m256, hi: __m256) -> f32 {
        hsum(_mm256_add_ps(lo, hi))
    }

    /// Offset of weight column `kk` (channel, tap) inside a padded sample.
    pub(super) fn column(p: &Plan, kk: usize) -> usize {
        let nt = p.taps.len();
        (kk / nt) * p.plane + p.taps[kk % nt]
    }

    /// Gradient rows [o0, o0 + R) × weight columns [k0, k0 + T), summed over all samples (the
    /// edges; [`wtile22`] and the AVX-512 tile are the common cases).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wtile<const R: usize, const T: usize>(
        p: &Plan,
        g: *const f32,
        gstride: usize,
        x: *const f32,
        xstride: usize,
        samples: usize,
        o0: usize,
        k0: usize,
        gw: &mut [f32],
        k: usize,
    ) {
        let xoff: [usize; T] = std::array::from_fn(|j| column(p, k0 + j));
        let z = _mm256_setzero_ps();
        let mut acc = [[(z, z); T]; R];
        for s in 0..samples {
            let gs = g.wrapping_add(s * gstride + p.origin() + o0 * p.plane);
            let xs = x.wrapping_add(s * xstride);
            let mut q = 0;
            while q < p.qr {
                for (r, row) in acc.iter_mut().enumerate() {
                    let gr = gs.wrapping_add(r * p.plane + q);
                    let (glo, ghi) = (load(gr), load(gr.wrapping_add(8)));
                    for (j, (lo, hi)) in row.iter_mut().enumerate() {
                        let xr = xs.wrapping_add(xoff[j] + q);
                        *lo = _mm256_fmadd_ps(glo, load(xr), *lo);
                        *hi = _mm256_fmadd_ps(ghi, load(xr.wrapping_add(8)), *hi);
                    }
                }
                q += 16;
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, &(lo, hi)) in row.iter().enumerate() {
                gw[(o0 + r) * k + k0 + j] += hsum16(lo, hi);
            }
        }
    }

    /// [`wtile`] for 2 rows × 2 columns, 16 lanes each as two halves: eight named registers.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wtile22(
        p: &Plan,
        g: *const f32,
        gstride: usize,
        x: *const f32,
        xstride: usize,
        samples: usize,
        o0: usize,
        k0: usize,
        gw: &mut [f32],
        k: usize,
    ) {
        let (f0, f1) = (column(p, k0), column(p, k0 + 1));
        let z = _mm256_setzero_ps();
        let (mut a00, mut b00, mut a01, mut b01) = (z, z, z, z);
        let (mut a10, mut b10, mut a11, mut b11) = (z, z, z, z);
        let pl = p.plane;
        for s in 0..samples {
            let gs = g.wrapping_add(s * gstride + p.origin() + o0 * pl);
            let xs = x.wrapping_add(s * xstride);
            let (x0p, x1p) = (xs.wrapping_add(f0), xs.wrapping_add(f1));
            let mut q = 0;
            while q < p.qr {
                let (x0, y0) = (load(x0p.wrapping_add(q)), load(x0p.wrapping_add(q + 8)));
                let (x1, y1) = (load(x1p.wrapping_add(q)), load(x1p.wrapping_add(q + 8)));
                let (g0, h0) = (load(gs.wrapping_add(q)), load(gs.wrapping_add(q + 8)));
                a00 = _mm256_fmadd_ps(g0, x0, a00);
                b00 = _mm256_fmadd_ps(h0, y0, b00);
                a01 = _mm256_fmadd_ps(g0, x1, a01);
                b01 = _mm256_fmadd_ps(h0, y1, b01);
                let g1p = gs.wrapping_add(pl + q);
                let (g1, h1) = (load(g1p), load(g1p.wrapping_add(8)));
                a10 = _mm256_fmadd_ps(g1, x0, a10);
                b10 = _mm256_fmadd_ps(h1, y0, b10);
                a11 = _mm256_fmadd_ps(g1, x1, a11);
                b11 = _mm256_fmadd_ps(h1, y1, b11);
                q += 16;
            }
        }
        gw[o0 * k + k0] += hsum16(a00, b00);
        gw[o0 * k + k0 + 1] += hsum16(a01, b01);
        gw[(o0 + 1) * k + k0] += hsum16(a10, b10);
        gw[(o0 + 1) * k + k0 + 1] += hsum16(a11, b11);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad(
        p: &Plan,
        gpad: &[f32],
        o: usize,
        xpad: &[f32],
        cin: usize,
        samples: usize,
        gw: &mut [f32],
    ) {
        let k = cin * p.taps.len();
        let (g, x) = (gpad.as_ptr(), xpad.as_ptr());
        let (gs, xs) = (p.padded_len(o), p.padded_len(cin));
        for o0 in (0..o).step_by(4) {
            let rows = (o - o0).min(4);
            let mut k0 = 0;
            while k0 < k {
                if rows == 4 && p.isa == Isa::Avx512 && k - k0 >= 4 {
                    super::avx512::wtile44(p, g, gs, x, xs, samples, o0, k0, gw, k);
                    k0 += 4;
                    continue;
                }
                let t = (k - k0).min(2);
                let mut r0 = o0;
                while r0 < o0 + rows {
                    let rr = (o0 + rows - r0).min(2);
                    match (rr, t) {
                        (2, 2) => wtile22(p, g, gs, x, xs, samples, r0, k0, gw, k),
                        (2, _) => wtile::<2, 1>(p, g, gs, x, xs, samples, r0, k0, gw, k),
                        (_, 2) => wtile::<1, 2>(p, g, gs, x, xs, samples, r0, k0, gw, k),
                        _ => wtile::<1, 1>(p, g, gs, x, xs, samples, r0, k0, gw, k),
                    }
                    r0 += rr;
                }
                k0 += t;
            }
        }
    }
}

/// The AVX-512 kernels: as in [`avx`], with 16-lane vectors and twice the registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Plan;
    use std::arch::x86_64::*;

    const MR: usize = 8;
    const NR: usize = 32;

    /// An unaligned 16-lane vector in memory (see [`super::avx`] on why not `_mm512_loadu_ps`).
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned(__m512);

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        (*(p as *const Unaligned)).0
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        *(p as *mut Unaligned) = Unaligned(v);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn bcast(p: *const f32) -> __m512 {
        _mm512_broadcastss_ps(_mm_load_ss(p))
    }

    /// One 8-channel × 32-pixel tile in sixteen named registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn conv_tile(
        src: *const f32,
        plane: usize,
        cin: usize,
        taps: &[usize],
        w: *const f32,
        dst: *mut f32,
        ld: usize,
    ) {
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
        let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
        let (mut c40, mut c41, mut c50, mut c51) = (z, z, z, z);
        let (mut c60, mut c61, mut c70, mut c71) = (z, z, z, z);
        let mut wk = w;
        for c in 0..cin {
            let base = src.wrapping_add(c * plane);
            for &t in taps {
                let at = base.wrapping_add(t);
                let x0 = load(at);
                let x1 = load(at.wrapping_add(16));
                let w0 = bcast(wk);
                c00 = _mm512_fmadd_ps(w0, x0, c00);
                c01 = _mm512_fmadd_ps(w0, x1, c01);
                let w1 = bcast(wk.wrapping_add(1));
                c10 = _mm512_fmadd_ps(w1, x0, c10);
                c11 = _mm512_fmadd_ps(w1, x1, c11);
                let w2 = bcast(wk.wrapping_add(2));
                c20 = _mm512_fmadd_ps(w2, x0, c20);
                c21 = _mm512_fmadd_ps(w2, x1, c21);
                let w3 = bcast(wk.wrapping_add(3));
                c30 = _mm512_fmadd_ps(w3, x0, c30);
                c31 = _mm512_fmadd_ps(w3, x1, c31);
                let w4 = bcast(wk.wrapping_add(4));
                c40 = _mm512_fmadd_ps(w4, x0, c40);
                c41 = _mm512_fmadd_ps(w4, x1, c41);
                let w5 = bcast(wk.wrapping_add(5));
                c50 = _mm512_fmadd_ps(w5, x0, c50);
                c51 = _mm512_fmadd_ps(w5, x1, c51);
                let w6 = bcast(wk.wrapping_add(6));
                c60 = _mm512_fmadd_ps(w6, x0, c60);
                c61 = _mm512_fmadd_ps(w6, x1, c61);
                let w7 = bcast(wk.wrapping_add(7));
                c70 = _mm512_fmadd_ps(w7, x0, c70);
                c71 = _mm512_fmadd_ps(w7, x1, c71);
                wk = wk.wrapping_add(MR);
            }
        }
        let rows = [
            (c00, c01),
            (c10, c11),
            (c20, c21),
            (c30, c31),
            (c40, c41),
            (c50, c51),
            (c60, c61),
            (c70, c71),
        ];
        for (r, (a0, a1)) in rows.into_iter().enumerate() {
            let d = dst.wrapping_add(r * ld);
            store(d, a0);
            store(d.wrapping_add(16), a1);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv(
        p: &Plan,
        src: &[f32],
        cin: usize,
        packed: &[f32],
        blocks: usize,
        wide: &mut [f32],
    ) {
        let k = cin * p.taps.len();
        let (s, out) = (src.as_ptr(), wide.as_mut_ptr());
        for q0 in (0..p.qr).step_by(NR) {
            for b in 0..blocks {
                let wb = packed.as_ptr().wrapping_add(b * k * MR);
                let dst = out.wrapping_add(b * MR * p.qr + q0);
                conv_tile(s.wrapping_add(q0), p.plane, cin, &p.taps, wb, dst, p.qr);
            }
        }
    }

    /// Weight-gradient rows [o0, o0 + 4) × columns [k0, k0 + 4), summed over all samples, in
    /// sixteen named registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn wtile44(
        p: &Plan,
        g: *const f32,
        gstride: usize,
        x: *const f32,
        xstride: usize,
        samples: usize,
        o0: usize,
        k0: usize,
        gw: &mut [f32],
        k: usize,
    ) {
        let f: [usize; 4] = std::array::from_fn(|j| super::avx::column(p, k0 + j));
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
        let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
        let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
        let (mut c30, mut c31, mut c32, mut c33) = (z, z, z, z);
        let pl = p.plane;
        for s in 0..samples {
            let gs = g.wrapping_add(s * gstride + p.origin() + o0 * pl);
            let xs = x.wrapping_add(s * xstride);
            let (x0p, x1p) = (xs.wrapping_add(f[0]), xs.wrapping_add(f[1]));
            let (x2p, x3p) = (xs.wrapping_add(f[2]), xs.wrapping_add(f[3]));
            let mut q = 0;
            while q < p.qr {
                let x0 = load(x0p.wrapping_add(q));
                let x1 = load(x1p.wrapping_add(q));
                let x2 = load(x2p.wrapping_add(q));
                let x3 = load(x3p.wrapping_add(q));
                let g0 = load(gs.wrapping_add(q));
                c00 = _mm512_fmadd_ps(g0, x0, c00);
                c01 = _mm512_fmadd_ps(g0, x1, c01);
                c02 = _mm512_fmadd_ps(g0, x2, c02);
                c03 = _mm512_fmadd_ps(g0, x3, c03);
                let g1 = load(gs.wrapping_add(pl + q));
                c10 = _mm512_fmadd_ps(g1, x0, c10);
                c11 = _mm512_fmadd_ps(g1, x1, c11);
                c12 = _mm512_fmadd_ps(g1, x2, c12);
                c13 = _mm512_fmadd_ps(g1, x3, c13);
                let g2 = load(gs.wrapping_add(2 * pl + q));
                c20 = _mm512_fmadd_ps(g2, x0, c20);
                c21 = _mm512_fmadd_ps(g2, x1, c21);
                c22 = _mm512_fmadd_ps(g2, x2, c22);
                c23 = _mm512_fmadd_ps(g2, x3, c23);
                let g3 = load(gs.wrapping_add(3 * pl + q));
                c30 = _mm512_fmadd_ps(g3, x0, c30);
                c31 = _mm512_fmadd_ps(g3, x1, c31);
                c32 = _mm512_fmadd_ps(g3, x2, c32);
                c33 = _mm512_fmadd_ps(g3, x3, c33);
                q += 16;
            }
        }
        let rows = [
            [c00, c01, c02, c03],
            [c10, c11, c12, c13],
            [c20, c21, c22, c23],
            [c30, c31, c32, c33],
        ];
        for (r, row) in rows.iter().enumerate() {
            for (j, &a) in row.iter().enumerate() {
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                gw[(o0 + r) * k + k0 + j] += super::avx::hsum16(lo, hi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn geom(n: usize, c: usize, h: usize, w: usize, o: usize, k: usize) -> Geom {
        Geom::new(&[n, c, h, w], &[o, c, k, k], 1, k / 2).unwrap()
    }

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The convolution by its definition, in f64: out[o, y, x] = Σ w[o, c, i, j] · x[c, y+i−p, x+j−p].
    fn naive(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; g.o * g.h * g.w];
        for o in 0..g.o {
            for y in 0..g.h {
                for xx in 0..g.w {
                    let mut s = 0f64;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let (iy, ix) = (y + i, xx + j);
                                if iy < g.pad
                                    || ix < g.pad
                                    || iy >= g.h + g.pad
                                    || ix >= g.w + g.pad
                                {
                                    continue;
                                }
                                let xv = x[(c * g.h + iy - g.pad) * g.w + ix - g.pad] as f64;
                                s += w[((o * g.c + c) * g.kh + i) * g.kw + j] as f64 * xv;
                            }
                        }
                    }
                    out[(o * g.h + y) * g.w + xx] = s;
                }
            }
        }
        out
    }

    #[test]
    fn forward_and_weight_gradient_match_the_definition() {
        let Some(best) = cpu_isa() else {
            eprintln!("skipped: no AVX2/FMA on this CPU");
            return;
        };
        let isas: &[Isa] = match best {
            Isa::Avx512 => &[Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => &[Isa::Avx2],
        };
        let results: Vec<Vec<Vec<u32>>> = isas.iter().map(|&isa| check_isa(isa)).collect();
        // Both instruction sets sum in the same order: the same bits (reports recompute
        // bit-identically on AVX2-only and AVX-512 machines).
        if let [a, b] = &results[..] {
            assert!(a == b, "AVX2 and AVX-512 kernels differ in their bits");
        }
    }

    /// Check the kernels of `isa` against the definition; returns the bits of every output and
    /// weight gradient computed.
    fn check_isa(isa: Isa) -> Vec<Vec<u32>> {
        let mut bits = Vec::new();
        let mut rng = Rng::new(11);
        // Odd sizes exercise partial tiles, channel counts not a multiple of 4, 3×3 and 5×5.
        for &(c, h, w, o, k) in &[
            (1, 28, 28, 16, 3),
            (3, 7, 7, 5, 3),
            (2, 5, 9, 6, 5),
            (16, 14, 14, 32, 3),
            (5, 1, 3, 2, 3),
        ] {
            let g = geom(2, c, h, w, o, k);
            assert!(Plan::new(&g).is_some());
            let p = Plan::layout(&g, isa);
            let xs: Vec<Vec<f32>> = (0..2).map(|_| rand(&mut rng, c * h * w)).collect();
            let wt = rand(&mut rng, o * c * k * k);
            let packed = p.pack_weights(&wt, o);
            let mut xpad = vec![f32::NAN; 2 * p.padded_len(c)];
            for (x, d) in xs.iter().zip(xpad.chunks_exact_mut(p.padded_len(c))) {
                p.pad_into(x, d);
            }
            let mut wide = vec![f32::NAN; p.wide_len(o)];
            let mut got = vec![0f32; o * h * w];
            p.conv(&xpad[..p.padded_len(c)], c, &packed, o, &mut wide);
            p.compact(&wide, &mut got);
            let want = naive(&g, &xs[0], &wt);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{isa:?} {c} {h} {w} {o} {k}: {a} vs {b}"
                );
            }
            // Weight gradient of Σ gy·y over both samples: Σ_n Σ gy[o,y,x] · x[c, y+i−p, x+j−p].
            let gys: Vec<Vec<f32>> = (0..2).map(|_| rand(&mut rng, o * h * w)).collect();
            let mut gpad = vec![f32::NAN; 2 * p.padded_len(o)];
            for (gy, d) in gys.iter().zip(gpad.chunks_exact_mut(p.padded_len(o))) {
                p.pad_into(gy, d);
            }
            let kk = c * k * k;
            let mut gw = vec![0.5f32; o * kk];
            p.weight_grad(&gpad, o, &xpad, c, 2, &mut gw);
            bits.push(got.iter().chain(&gw).map(|v| v.to_bits()).collect());
            // d(Σ gy·y)/dw[o, c, i, j] = Σ_n Σ_(y,x) gy[n, o, y, x] · x[n, c, y+i−p, x+j−p].
            for oo in 0..o {
                for ci in 0..kk {
                    let (c0, i, j) = (ci / (k * k), ci / k % k, ci % k);
                    let mut want = 0.5f64;
                    for (x, gy) in xs.iter().zip(&gys) {
                        for y in 0..h {
                            for xx in 0..w {
                                let (iy, ix) = (y + i, xx + j);
                                if iy < g.pad || ix < g.pad || iy >= h + g.pad || ix >= w + g.pad {
                                    continue;
                                }
                                let xv = x[(c0 * h + iy - g.pad) * w + ix - g.pad] as f64;
                                want += gy[(oo * h + y) * w + xx] as f64 * xv;
                            }
                        }
                    }
                    let got = gw[oo * kk + ci] as f64;
                    let msg = format!("{isa:?} gw {oo},{ci}: {got} vs {want}");
                    assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{msg}");
                }
            }
        }
        bits
    }
}
