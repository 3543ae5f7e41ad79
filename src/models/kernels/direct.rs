//! Direct convolution for stride 1 and "same" padding (kernel 2·pad + 1), and for stride 2 with
//! odd kernels and padding ⌊k/2⌋, with no patch matrix.
//!
//! Each sample's channels are copied into zero-padded planes of width Wp = W + 2·pad. In that
//! layout the input of output pixel (y, x) under kernel tap (i, j) sits at q + i·Wp + j, where
//! q = y·Wp + x is the pixel's "wide" index. A block of consecutive wide indices therefore reads
//! one contiguous run of each padded plane per tap, so a register tile of 4 output channels × 16
//! wide pixels (AVX-512: 8 × 32) is accumulated straight from the planes, Σ over (channel, tap)
//! of weight × run: the im2col copy (nine times the input) and the GEMM's own packing pass both
//! disappear. Wide indices with x ≥ W are computed and thrown away (2·pad of every Wp columns).
//! With AVX2, and on small planes with AVX-512, the forward pass instead puts 16 output channels
//! in the vector lanes and broadcasts the input of 6 real pixels ([`Plan::conv_into`]): the same
//! sums in the same order (the same bits), no thrown-away columns.
//!
//! The same kernels compute the input gradient (a "same" convolution of the padded output
//! gradient with the flipped, transposed kernel). Stride 2 splits the padded input into its four
//! row/column parity phases, so every tap again reads runs of consecutive wide indices. The
//! weight gradient is Σ over output pixels (y, x) of
//! g[o, y, x] · x[c, q + tap] with q = y·Wp + x (only real pixels, none thrown away): the output
//! gradient is transposed to pixel-major order so that a vector holds 8 output channels, each
//! input value is broadcast, and every gradient is one running sum in one lane (no horizontal
//! sums), continued over all samples of a task.
//!
//! The kernels use AVX2 and FMA, detected at run time; [`Plan::new`] returns `None` without
//! them (or for other geometries), and the caller keeps the im2col + GEMM path. Sums run in a
//! different order than that path's GEMM, so results agree with it to rounding, not bit for bit.

use super::geom::Geom;

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
    stride: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    /// Width of a wide output row (and of the planes the taps read): W + 2·pad for stride 1,
    /// ⌈(W + 2·pad) / 2⌉ (one phase's width) for stride 2.
    wq: usize,
    /// Floats per input channel: one padded plane (stride 1) or one plane per phase (stride 2).
    cplane: usize,
    /// Floats per phase plane (stride 2, whose kernels are > 1, so all four row/column parities
    /// occur; equal to `cplane` for stride 1).
    phase: usize,
    /// Wide pixels computed per channel: Ho·wq rounded up to whole tiles.
    qr: usize,
    /// Offset of every kernel tap (i, j) inside a channel, in weight order.
    taps: Vec<usize>,
    /// The wide index y·wq + x of every output pixel (y, x), in order.
    pixels: Vec<usize>,
    /// Whether the forward pass and the input gradient run with channels in lanes
    /// ([`lanes_path`]; the bit-identity test flips it to run the other path).
    lanes: bool,
    /// Weight columns per weight-gradient tile: [`WGRAD_COLS`] (tests try narrower tiles).
    wgrad_cols: usize,
    /// Stride 2: the layout of the input gradient's passes.
    up: Option<Up>,
    isa: Isa,
}

/// Stride 2's input gradient, one pass per phase (a, b) of the input: at padded input position
/// (2r + a, 2s + b) it is Σ_o Σ over taps i ≡ a, j ≡ b (mod 2) of w[o, c, i, j] ·
/// g[o, r − ⌊i/2⌋, s − ⌊j/2⌋], a stride-1 correlation of the output gradient (padded by
/// e = ⌊k/2⌋ on each side, rows of width wg) with the phase's taps.
#[derive(Debug, Clone)]
struct Up {
    e: usize,
    /// Row width of the padded output gradient and of every phase's wide result: wq + e.
    wg: usize,
    /// Phase rows: ⌈(H + 2·pad) / 2⌉.
    hq: usize,
    /// Floats per padded output-gradient channel.
    plane: usize,
    /// Wide pixels per phase result: hq·wg rounded up to whole tiles.
    qr: usize,
    /// Per phase: its parities (a, b), its taps (i, j) in weight order, and their read offsets
    /// (e − ⌊i/2⌋)·wg + e − ⌊j/2⌋.
    phases: Vec<PhaseTaps>,
}

#[derive(Debug, Clone)]
struct PhaseTaps {
    parity: (usize, usize),
    taps: Vec<(usize, usize)>,
    offsets: Vec<usize>,
    /// The input pixels of this phase: their wide indices r·wg + s in the phase's result and
    /// their positions iy·W + ix in an input plane (for the lanes path).
    pixels: Vec<(usize, usize)>,
}

/// One pass of the forward tiles: input channels of `plane` floats, read at `taps` + q for wide
/// pixels q < `qr`.
pub(super) struct Sweep<'a> {
    plane: usize,
    taps: &'a [usize],
    qr: usize,
}

/// One forward register tile: (input at the tile's first pixel, channel stride, channels, tap
/// offsets, packed weights of the channel block, output at the tile, output row stride).
#[cfg(target_arch = "x86_64")]
type TileFn = unsafe fn(*const f32, usize, usize, &[usize], *const f32, *mut f32, usize);

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
        Some(if has!("avx512f") && !forced { Isa::Avx512 } else { Isa::Avx2 })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

impl Plan {
    /// The plan for `g`, if it is a stride-1 "same" convolution (kernel > 1) or a stride-2 one
    /// with an odd square kernel > 1 and padding ⌊kernel / 2⌋ (the downsampling layers), and
    /// the CPU has AVX2 and FMA. 1×1 stride-2 layers (shortcuts) stay on im2col + GEMM: with
    /// one tap per channel the tiles are too short to pay for their set-up.
    pub(super) fn new(g: &Geom) -> Option<Plan> {
        let same = g.stride == 1 && g.kh == 2 * g.pad + 1 && g.kw == 2 * g.pad + 1 && g.pad > 0;
        let down = g.stride == 2 && g.kh == g.kw && g.kh % 2 == 1 && g.kh > 1 && g.pad == g.kh / 2;
        if !(same || down) || g.h == 0 || g.w == 0 || g.ho == 0 || g.wo == 0 {
            return None;
        }
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        let isa = (*ISA.get_or_init(cpu_isa))?;
        Some(Self::layout(g, isa))
    }

    fn layout(g: &Geom, isa: Isa) -> Plan {
        let nr = isa.nr();
        if g.stride == 1 {
            let wp = g.w + 2 * g.pad;
            let qr = (g.h * wp).div_ceil(nr) * nr;
            // The tiles read up to 2·pad·Wp + 2·pad + q for q < qr: rows past the padding keep
            // those reads inside the plane (their results are thrown away).
            let extra = (qr - g.h * wp + 2 * g.pad).div_ceil(wp);
            let plane = (g.h + 2 * g.pad + extra) * wp;
            return Plan {
                h: g.h,
                w: g.w,
                pad: g.pad,
                stride: 1,
                kh: g.kh,
                kw: g.kw,
                ho: g.h,
                wo: g.w,
                wq: wp,
                cplane: plane,
                phase: plane,
                qr,
                taps: (0..g.kh).flat_map(|i| (0..g.kw).map(move |j| i * wp + j)).collect(),
                pixels: pixels(g.h, g.w, wp),
                lanes: lanes_path(isa, qr, g.h * g.w),
                wgrad_cols: WGRAD_COLS,
                up: None,
                isa,
            };
        }
        // Stride 2: the padded input splits into phases by row and column parity; tap (i, j) of
        // output (y, x) reads padded (2y + i, 2x + j) = phase (i mod 2, j mod 2) at
        // (y + i/2, x + j/2), so each tap again reads runs of consecutive wide indices.
        let (hp, wpad) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
        let wq = wpad.div_ceil(2);
        let qr = (g.ho * wq).div_ceil(nr) * nr;
        let reach = (g.kh - 1) / 2 * wq + (g.kw - 1) / 2;
        // Every read (tap offset + q, q < qr) stays inside its own phase plane.
        let phase = (hp.div_ceil(2) * wq).max(qr + reach);
        let taps = (0..g.kh).flat_map(|i| (0..g.kw).map(move |j| ((i % 2) * 2 + j % 2) * phase + i / 2 * wq + j / 2)).collect();
        Plan {
            h: g.h,
            w: g.w,
            pad: g.pad,
            stride: 2,
            kh: g.kh,
            kw: g.kw,
            ho: g.ho,
            wo: g.wo,
            wq,
            cplane: 4 * phase,
            phase,
            qr,
            taps,
            pixels: pixels(g.ho, g.wo, wq),
            lanes: lanes_path(isa, qr, g.ho * g.wo),
            wgrad_cols: WGRAD_COLS,
            up: Some(Self::up(g, wq, nr)),
            isa,
        }
    }

    fn up(g: &Geom, wq: usize, nr: usize) -> Up {
        let e = g.kh / 2;
        let wg = wq + e;
        let hq = (g.h + 2 * g.pad).div_ceil(2);
        let qr = (hq * wg).div_ceil(nr) * nr;
        let reach = e * wg + e;
        let plane = ((hq + 2 * e) * wg).max(qr + reach);
        let phases = (0..2)
            .flat_map(|a| (0..2).map(move |b| (a, b)))
            .map(|(a, b)| {
                let taps: Vec<(usize, usize)> = (0..g.kh).flat_map(|i| (0..g.kw).map(move |j| (i, j))).filter(|&(i, j)| i % 2 == a && j % 2 == b).collect();
                let offsets = taps.iter().map(|&(i, j)| (e - i / 2) * wg + e - j / 2).collect();
                // Padded input (2r + a, 2s + b) is input (2r + a − pad, 2s + b − pad).
                let inside = |v: usize, len: usize| v.checked_sub(g.pad).filter(|&u| u < len);
                let pixels = (0..hq)
                    .filter_map(|r| inside(2 * r + a, g.h).map(|iy| (r, iy)))
                    .flat_map(|(r, iy)| (0..wg).filter_map(move |s| inside(2 * s + b, g.w).map(|ix| (r * wg + s, iy * g.w + ix))))
                    .collect();
                PhaseTaps { parity: (a, b), taps, offsets, pixels }
            })
            .collect();
        Up { e, wg, hq, plane, qr, phases }
    }

    /// Floats of one sample's input layout with `ch` channels. The slack after the last plane
    /// holds the reads of the stride-1 forward tiles' last columns (results thrown away).
    pub(super) fn input_len(&self, ch: usize) -> usize {
        ch * self.cplane + 2 * self.wq
    }

    /// Floats of one sample's output gradient with `ch` channels laid out for
    /// [`Plan::weight_grad`] by [`Plan::grad_t_into`]: pixel-major, channels padded to [`lanes`].
    pub(super) fn grad_t_len(&self, ch: usize) -> usize {
        self.ho * self.wo * lanes(ch)
    }

    /// Whether the input gradient runs through [`Plan::conv`] (stride 1: a "same" convolution of
    /// the padded output gradient); stride 2 leaves it to GEMM + col2im.
    pub(super) fn transposable(&self) -> bool {
        self.stride == 1
    }

    /// Scratch floats [`Plan::input_grad`] needs: the padded output gradient (`o` channels) and
    /// one phase's wide result (`c` channels). Zero for stride 1.
    pub(super) fn input_grad_scratch(&self, o: usize, c: usize) -> (usize, usize) {
        match &self.up {
            Some(up) => (o * up.plane, self.tile_rows(c).max(lanes(c)) * up.qr),
            None => (0, 0),
        }
    }

    /// The weights of each stride-2 input-gradient pass, packed: phase by phase, `c` rows of
    /// K = o·(taps of the phase), w[o, c, i, j] at column o·taps + t. Empty for stride 1.
    pub(super) fn input_grad_weights(&self, w: &[f32], o: usize, c: usize) -> Vec<Vec<f32>> {
        let Some(up) = &self.up else {
            return Vec::new();
        };
        let (kh, kw) = (self.kh, self.kw);
        assert_eq!(w.len(), o * c * kh * kw, "direct conv: weight shape");
        up.phases
            .iter()
            .map(|ph| {
                let nt = ph.taps.len();
                let mut m = vec![0f32; c * o * nt];
                for ch in 0..c {
                    for oo in 0..o {
                        for (t, &(i, j)) in ph.taps.iter().enumerate() {
                            m[(ch * o + oo) * nt + t] = w[((oo * c + ch) * kh + i) * kw + j];
                        }
                    }
                }
                self.pack_conv(&m, c)
            })
            .collect()
    }

    /// Stride 2: one sample's input gradient `gx` (`c`×H×W) from its output gradient `go`
    /// (`o`×Ho×Wo), with the packs of [`Plan::input_grad_weights`] and the scratch sizes of
    /// [`Plan::input_grad_scratch`]. Every element of `gx` is written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn input_grad(&self, go: &[f32], o: usize, packs: &[Vec<f32>], c: usize, gp: &mut [f32], wide: &mut [f32], gx: &mut [f32]) {
        let up = self.up.as_ref().expect("input_grad is for stride-2 plans");
        let (ho, wo, wg, e) = (self.ho, self.wo, up.wg, up.e);
        gp.fill(0.0);
        for (src, dst) in go.chunks_exact(ho * wo).zip(gp.chunks_exact_mut(up.plane)) {
            for (y, row) in src.chunks_exact(wo).enumerate() {
                let at = (y + e) * wg + e;
                dst[at..at + wo].copy_from_slice(row);
            }
        }
        let (h, w, pad) = (self.h, self.w, self.pad);
        if self.lanes {
            let l = lanes(c);
            for (ph, pack) in up.phases.iter().zip(packs) {
                let n = ph.pixels.len();
                assert!(gp.len() >= o * up.plane && pack.len() == o * ph.offsets.len() * l && wide.len() >= n * l, "direct conv: inconsistent buffer sizes");
                // SAFETY: AVX2 and FMA are present (checked when the plan was made); every read of
                // `gp` stays inside its o planes (asserted; a wide index below qr plus a phase
                // offset stays inside `up.plane`, see `Plan::up`), `pack` holds o·taps rows of l
                // lanes and `wide` n rows of l (asserted).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx::lanes_sweep(gp.as_ptr(), up.plane, o, &ph.offsets, n, |i| ph.pixels[i].0, pack.as_ptr(), l, wide.as_mut_ptr())
                }
                for (i, &(_, at)) in ph.pixels.iter().enumerate() {
                    for (ch, plane) in gx.chunks_exact_mut(h * w).enumerate() {
                        plane[at] = wide[i * l + ch];
                    }
                }
            }
            return;
        }
        for (ph, pack) in up.phases.iter().zip(packs) {
            let sweep = Sweep { plane: up.plane, taps: &ph.offsets, qr: up.qr };
            self.sweep(&sweep, gp, o, pack, c, wide);
            let (a, b) = ph.parity;
            // Padded input (2r + a, 2s + b) is input (2r + a − pad, 2s + b − pad).
            let rows = (0..up.hq).filter_map(|r| (2 * r + a).checked_sub(pad).filter(|&y| y < h));
            let s0 = (pad + 1 - b) / 2; // first s with 2s + b ≥ pad
            for (ch, plane) in gx.chunks_exact_mut(h * w).enumerate() {
                let res = &wide[ch * up.qr..(ch + 1) * up.qr];
                for iy in rows.clone() {
                    let r = (iy + pad - a) / 2;
                    let src = &res[r * wg + s0..];
                    let x0 = 2 * s0 + b - pad;
                    let dst = &mut plane[iy * w..(iy + 1) * w];
                    for (d, &v) in dst[x0..].iter_mut().step_by(2).zip(src) {
                        *d = v;
                    }
                }
            }
        }
    }

    /// Floats of one sample's wide output with `ch` channels (rounded up to whole tiles).
    pub(super) fn wide_len(&self, ch: usize) -> usize {
        (self.tile_rows(ch) * self.qr).max(self.ho * self.wo * lanes(ch))
    }

    /// `ch` output channels rounded up to whole forward tiles (weights and results are padded
    /// with zero rows to that).
    fn tile_rows(&self, ch: usize) -> usize {
        ch.div_ceil(self.isa.mr()) * self.isa.mr()
    }

    /// Copy one sample (`ch`×H×W) into the input layout `dst` (`input_len(ch)`): zero-padded
    /// planes, split into phases for stride 2. Every element of `dst` is written.
    pub(super) fn pad_into(&self, src: &[f32], dst: &mut [f32]) {
        let (h, w, pad) = (self.h, self.w, self.pad);
        let ch = src.len() / (h * w);
        debug_assert_eq!(dst.len(), self.input_len(ch));
        if self.stride == 2 {
            dst.fill(0.0);
            for (s, d) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(self.cplane)) {
                for (y, row) in s.chunks_exact(w).enumerate() {
                    let py = y + pad;
                    let row_at = |b: usize| (py % 2 * 2 + b) * self.phase + py / 2 * self.wq;
                    // x = 2m lands in column m + ⌊pad/2⌋ of phase pad mod 2, x = 2m + 1 in
                    // column m + ⌊(pad+1)/2⌋ of the other phase: one pass over the pairs.
                    let even = row_at(pad % 2) + pad / 2;
                    let odd = row_at((pad + 1) % 2) + pad.div_ceil(2);
                    let pairs = row.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        d[even + w / 2] = *last;
                    }
                    let n = w / 2;
                    let (de, dodd) = if even < odd {
                        let (lo, hi) = d.split_at_mut(odd);
                        (&mut lo[even..even + n], &mut hi[..n])
                    } else {
                        let (lo, hi) = d.split_at_mut(even);
                        (&mut hi[..n], &mut lo[odd..odd + n])
                    };
                    for ((e, o), pair) in de.iter_mut().zip(dodd.iter_mut()).zip(pairs) {
                        *e = pair[0];
                        *o = pair[1];
                    }
                }
            }
            return;
        }
        let wp = self.wq;
        let top = pad * wp;
        for (s, d) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(self.cplane)) {
            d[..top + pad].fill(0.0);
            for (y, row) in s.chunks_exact(w).enumerate() {
                let at = top + y * wp + pad;
                d[at..at + w].copy_from_slice(row);
                let end = (at + w + 2 * pad).min(d.len());
                d[at + w..end].fill(0.0);
            }
            d[top + h * wp + pad..].fill(0.0);
        }
        dst[ch * self.cplane..].fill(0.0);
    }

    /// Transpose one sample's output gradient `src` (`ch`×Ho×Wo) into `dst` (`grad_t_len(ch)`):
    /// pixel p's `ch` channels at p·lanes(ch), the padding lanes zero. Every element is written.
    pub(super) fn grad_t_into(&self, src: &[f32], ch: usize, dst: &mut [f32]) {
        let (px, l) = (self.ho * self.wo, lanes(ch));
        assert!(src.len() == ch * px && dst.len() == px * l, "direct conv: gradient size");
        transpose(src, ch, px, px, dst, l);
        if ch < l {
            for d in dst.chunks_exact_mut(l) {
                d[ch..].fill(0.0);
            }
        }
    }

    /// The image (`ch`×Ho×Wo) inside a wide result (`wide_len(ch)`).
    pub(super) fn compact(&self, wide: &[f32], dst: &mut [f32]) {
        let (ho, wo, wq) = (self.ho, self.wo, self.wq);
        for (d, s) in dst.chunks_exact_mut(ho * wo).zip(wide.chunks_exact(self.qr)) {
            for (drow, srow) in d.chunks_exact_mut(wo).zip(s.chunks(wq)) {
                drow.copy_from_slice(&srow[..wo]);
            }
        }
    }

    /// Weights `rows`×K (row-major) in the forward tile's order: blocks of `mr` rows, K-major
    /// inside, rows past the end zero.
    pub(super) fn pack_weights(&self, w: &[f32], rows: usize) -> Vec<f32> {
        let (k, mr) = (w.len() / rows.max(1), self.isa.mr());
        let mut out = vec![0f32; self.tile_rows(rows) * k];
        for (r, row) in w.chunks_exact(k).enumerate() {
            let (b, lane) = (r / mr, r % mr);
            for (kk, &v) in row.iter().enumerate() {
                out[(b * k + kk) * mr + lane] = v;
            }
        }
        out
    }

    /// Weights `rows`×K (row-major) in the layout [`Plan::conv_into`] reads: the forward tiles'
    /// ([`Plan::pack_weights`]), or K rows of `lanes(rows)` output channels on the lanes path.
    pub(super) fn pack_conv(&self, w: &[f32], rows: usize) -> Vec<f32> {
        if !self.lanes {
            return self.pack_weights(w, rows);
        }
        let (k, l) = (w.len() / rows.max(1), lanes(rows));
        let mut out = vec![0f32; k * l];
        transpose(w, rows, k, k, &mut out, l);
        out
    }

    /// `dst` (`o`×Ho×Wo) = the convolution of one padded sample `src` (`cin` channels) with
    /// weights from [`Plan::pack_conv`], through the scratch `wide` (`wide_len(o)`). Either path
    /// sums each output over (channel, tap) in weight order from zero, one FMA per term: the
    /// same bits.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_into(&self, src: &[f32], cin: usize, packed: &[f32], o: usize, wide: &mut [f32], dst: &mut [f32]) {
        if !self.lanes {
            self.conv(src, cin, packed, o, wide);
            return self.compact(wide, dst);
        }
        let (px, l, k) = (self.ho * self.wo, lanes(o), cin * self.taps.len());
        let reach = self.taps.iter().max().map_or(0, |t| t + (self.ho - 1) * self.wq + self.wo);
        assert!(packed.len() == k * l && wide.len() >= px * l && dst.len() == o * px && (cin == 0 || (cin - 1) * self.cplane + reach <= src.len()), "direct conv: inconsistent buffer sizes");
        // SAFETY: the CPU has AVX2 and FMA (checked when the plan was made); the assert bounds
        // the reads of `src` (channel cin−1's last tap at the last pixel), `packed` (k rows of
        // l lanes) and the writes to `wide` (px rows of l lanes).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx::lanes_sweep(src.as_ptr(), self.cplane, cin, &self.taps, px, |i| self.pixels[i], packed.as_ptr(), l, wide.as_mut_ptr())
        }
        transpose(&wide[..px * l], px, o, l, dst, px);
    }

    /// `wide` (`wide_len(o)`) = the convolution of one padded sample `src` (`cin` channels) with
    /// the packed weights of `o` output channels.
    pub(super) fn conv(&self, src: &[f32], cin: usize, packed: &[f32], o: usize, wide: &mut [f32]) {
        assert!(src.len() >= self.input_len(cin) && wide.len() == self.wide_len(o), "direct conv: inconsistent buffer sizes");
        let sweep = Sweep { plane: self.cplane, taps: &self.taps, qr: self.qr };
        // The layout bounds every read: at most (cin−1)·cplane + taps.last() + qr − 1, below
        // cin·cplane (stride 1: the extra rows; stride 2: each phase plane holds qr + the
        // largest in-phase tap offset).
        self.sweep(&sweep, src, cin, packed, o, wide);
    }

    /// Run the forward tiles of `sweep` over `src` (`cin` channels of `sweep.plane` floats) into
    /// `wide` (⌈o/mr⌉·mr × sweep.qr). The caller guarantees that every tap offset + q < qr lies
    /// inside `src`, which the first assert checks for the last channel.
    fn sweep(&self, sweep: &Sweep, src: &[f32], cin: usize, packed: &[f32], o: usize, wide: &mut [f32]) {
        let (k, mr) = (cin * sweep.taps.len(), self.isa.mr());
        let reach = sweep.taps.iter().max().map_or(0, |t| t + sweep.qr);
        assert!(cin == 0 || (cin - 1) * sweep.plane + reach <= src.len(), "direct conv: reads past the input");
        assert!(packed.len() == self.tile_rows(o) * k && wide.len() >= self.tile_rows(o) * sweep.qr, "direct conv: inconsistent buffer sizes");
        // SAFETY: the CPU has the plan's instructions (checked when the plan was made); the
        // asserts bound every read (above) and write (o_round × qr floats of `wide`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let blocks = o.div_ceil(mr);
            let tile: TileFn = match self.isa {
                Isa::Avx2 => avx::conv_tile,
                Isa::Avx512 => avx512::conv_tile,
            };
            let (k, nr) = (cin * sweep.taps.len(), self.isa.nr());
            let (s, out) = (src.as_ptr(), wide.as_mut_ptr());
            // Pixel tiles outside: a tile's input window stays in L1 across the channel blocks.
            for q0 in (0..sweep.qr).step_by(nr) {
                for b in 0..blocks {
                    let wb = packed.as_ptr().wrapping_add(b * k * mr);
                    let dst = out.wrapping_add(b * mr * sweep.qr + q0);
                    tile(s.wrapping_add(q0), sweep.plane, cin, sweep.taps, wb, dst, sweep.qr);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct conv without a plan")
    }

    /// `gw` (O×K) += Σ over the samples, the output pixels (y, x) in order, of
    /// g[o, y, x] · x[c, q + tap] with q = y·wq + x, where `gt` holds the output gradients of
    /// `samples` samples (`o` channels, from [`Plan::grad_t_into`]) and `xpad` their inputs (`cin`
    /// channels, `input_len(cin)` per sample, from [`Plan::pad_into`]). Every gradient is one
    /// running sum in one vector lane (the lanes are output channels), the same on every
    /// instruction set and for every tile shape.
    pub(super) fn weight_grad(&self, gt: &[f32], o: usize, xpad: &[f32], cin: usize, samples: usize, gw: &mut [f32]) {
        let k = cin * self.taps.len();
        let reach = self.taps.iter().max().map_or(0, |t| t + (self.ho - 1) * self.wq + self.wo);
        assert!(
            gt.len() >= samples * self.grad_t_len(o) && xpad.len() >= samples * self.input_len(cin) && (cin == 0 || (cin - 1) * self.cplane + reach <= self.input_len(cin)) && gw.len() == o * k,
            "direct conv: inconsistent buffer sizes"
        );
        let l = lanes(o);
        let mut acc = vec![0f32; k * l];
        // SAFETY: the CPU has AVX2 and FMA (checked when the plan was made); the assert bounds
        // every read: gradients below samples·grad_t_len(o), inputs below (s+1)·input_len(cin)
        // for sample s (the largest offset, channel cin−1's last tap at the last pixel, is
        // checked above), and `acc` holds k·l floats.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx::weight_grad(self, gt, l, xpad, cin, samples, &mut acc, self.wgrad_cols)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct conv without a plan");
        for (oo, row) in gw.chunks_exact_mut(k.max(1)).enumerate().take(o) {
            for (kk, v) in row.iter_mut().enumerate() {
                *v += acc[kk * l + oo];
            }
        }
    }
}

/// Output-channel lanes of the weight gradient's layouts: `ch` rounded up to whole 8-lane vectors.
pub(super) fn lanes(ch: usize) -> usize {
    ch.div_ceil(8) * 8
}

/// Whether [`Plan::conv_into`] puts output channels in the vector lanes (tiles of 16 channels × 6
/// real pixels) instead of running the wide-pixel tiles, for `qr` wide pixels (rounded to whole
/// tiles) holding `real` output pixels. With AVX2 it is faster on every ResNet plane (Zen 3, one
/// thread: 7×7 1.1–1.2×, 14×14 about 1.05–1.1×, 28×28 1.04×), as it computes no thrown-away
/// columns; with AVX-512 (not measured: no such CPU was at hand) it is taken where those columns
/// and the tile rounding are 20 % or more of the pixels (7×7: 64 wide pixels for 49).
fn lanes_path(isa: Isa, qr: usize, real: usize) -> bool {
    isa == Isa::Avx2 || 5 * qr >= 6 * real
}

/// The wide index y·wq + x of each pixel of an ho × wo image, row by row.
fn pixels(ho: usize, wo: usize, wq: usize) -> Vec<usize> {
    (0..ho).flat_map(|y| (0..wo).map(move |x| y * wq + x)).collect()
}

/// `dst[j·dst_ld + i] = src[i·src_ld + j]` for i < `rows`, j < `cols`: blocks of 8×8 in AVX2
/// registers, the edges element by element.
fn transpose(src: &[f32], rows: usize, cols: usize, src_ld: usize, dst: &mut [f32], dst_ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_ld + cols <= src.len() && (cols - 1) * dst_ld + rows <= dst.len(), "transpose: buffers too small");
    let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        for i in (0..rb).step_by(8) {
            for j in (0..cb).step_by(8) {
                // SAFETY: AVX2 is present; the block's reads (rows i..i+8, columns j..j+8) and
                // writes (rows j..j+8, columns i..i+8) lie inside the asserted extents.
                unsafe { avx::transpose8(src.as_ptr().add(i * src_ld + j), src_ld, dst.as_mut_ptr().add(j * dst_ld + i), dst_ld) }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let (rb, cb) = (0, 0);
    for i in 0..rows {
        let from = if i < rb { cb } else { 0 };
        for j in from..cols {
            dst[j * dst_ld + i] = src[i * src_ld + j];
        }
    }
}

/// Weight columns per weight-gradient tile (two rows of 8 output channels × 6 columns: twelve
/// accumulators); a test checks that narrower tiles give the same bits.
const WGRAD_COLS: usize = 6;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx {
    use super::Plan;

    const MR: usize = 4;
    use std::arch::x86_64::*;

    /// One 4-channel × 16-pixel tile, accumulated in eight named registers (arrays of vectors
    /// were kept on the stack by the compiler).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn conv_tile(src: *const f32, plane: usize, cin: usize, taps: &[usize], w: *const f32, dst: *mut f32, ld: usize) {
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
        for (r, (a0, a1)) in [(c00, c01), (c10, c11), (c20, c21), (c30, c31)].into_iter().enumerate() {
            let d = dst.wrapping_add(r * ld);
            store(d, a0);
            store(d.wrapping_add(8), a1);
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
    pub(in crate::models) unsafe fn load(p: *const f32) -> __m256 {
        (*(p as *const Unaligned)).0
    }

    /// Write eight floats at `p`.
    #[inline(always)]
    pub(in crate::models) unsafe fn store(p: *mut f32, v: __m256) {
        *(p as *mut Unaligned) = Unaligned(v);
    }

    /// `*p` in all eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bcast(p: *const f32) -> __m256 {
        _mm256_broadcastss_ps(_mm_load_ss(p))
    }

    /// Transpose the 8×8 block at `src` (rows `ss` floats apart) into `dst` (rows `ds` apart):
    /// dst[j·ds + i] = src[i·ss + j].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| load(src.wrapping_add(i * ss)));
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, v) in out.into_iter().enumerate() {
            store(dst.wrapping_add(j * ds), v);
        }
    }

    /// A convolution with output channels in lanes over `cin` planes of `plane` floats at `x`
    /// (tap offsets `taps`), for `px` real pixels (wide index `q(i)` of pixel i, no thrown-away
    /// columns): `out[i·l + o]`, in tiles of 16 (or 8) lanes × up to 6 pixels, with the weights
    /// `w` in K rows of `l` lanes.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lanes_sweep(x: *const f32, plane: usize, cin: usize, taps: &[usize], px: usize, q: impl Fn(usize) -> usize, w: *const f32, l: usize, out: *mut f32) {
        let mut qs = [0usize; 6];
        for o0 in (0..l).step_by(16) {
            let two = l - o0 >= 16;
            for p0 in (0..px).step_by(6) {
                let t = (px - p0).min(6);
                for (j, v) in qs[..t].iter_mut().enumerate() {
                    *v = q(p0 + j);
                }
                let (q, wo, d) = (&qs[..t], w.wrapping_add(o0), out.wrapping_add(p0 * l + o0));
                macro_rules! tile {
                    ($($t:literal)*) => {
                        match (two, t) {
                            $((true, $t) => ftile::<2, $t>(x, q, plane, cin, taps, wo, l, d),
                              (false, $t) => ftile::<1, $t>(x, q, plane, cin, taps, wo, l, d),)*
                            _ => unreachable!("forward tile of {t} pixels"),
                        }
                    };
                }
                tile!(1 2 3 4 5 6);
            }
        }
    }

    /// Lanes [o0, o0 + 8·V) (`w` at lane o0 of K rows of `l`) × the `T` pixels at wide indices
    /// `q`: Σ over the channels c < `cin` (planes of `plane` floats) and `taps` of
    /// w[c·taps + t, o] · x[c·plane + taps[t] + q], from zero in weight order, written to `d`
    /// (rows of `l`).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn ftile<const V: usize, const T: usize>(x: *const f32, q: &[usize], plane: usize, cin: usize, taps: &[usize], w: *const f32, l: usize, d: *mut f32) {
        let mut base: [*const f32; T] = std::array::from_fn(|j| x.wrapping_add(q[j]));
        let mut a = [[_mm256_setzero_ps(); V]; T];
        let mut wk = w;
        for _ in 0..cin {
            for &t in taps {
                rank1(&mut a, wk, &base, t);
                wk = wk.wrapping_add(l);
            }
            for b in base.iter_mut() {
                *b = b.wrapping_add(plane);
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (v, &av) in aj.iter().enumerate() {
                store(d.wrapping_add(j * l + 8 * v), av);
            }
        }
    }

    /// `a[j][v]` += vector v at `lanes` × the float at `base[j] + off`, for every j and v: the
    /// step shared by the lanes tiles (weights × inputs) and the weight-gradient tiles
    /// (gradients × inputs).
    /// Always inlined into its callers (which enable AVX2 and FMA), so that the accumulators
    /// stay in registers; with `#[inline]` alone the weight-gradient tile slowed by 20–40 %.
    #[inline(always)]
    unsafe fn rank1<const V: usize, const T: usize>(a: &mut [[__m256; V]; T], lanes: *const f32, base: &[*const f32; T], off: usize) {
        let m: [__m256; V] = std::array::from_fn(|v| load(lanes.wrapping_add(8 * v)));
        for j in 0..T {
            let b = bcast(base[j].wrapping_add(off));
            for v in 0..V {
                a[j][v] = _mm256_fmadd_ps(m[v], b, a[j][v]);
            }
        }
    }

    /// Bytes of the sample groups of [`weight_grad`].
    const WGRAD_GROUP_BYTES: usize = 256 << 10;

    /// Offset of weight column `kk` (channel, tap) inside a padded sample.
    fn column(p: &Plan, kk: usize) -> usize {
        let nt = p.taps.len();
        (kk / nt) * p.cplane + p.taps[kk % nt]
    }

    /// Weight-gradient lanes [o0, o0 + 8·V) × columns [k0, k0 + T) (at input offsets `f`):
    /// `acc[kk·l + o]` += Σ over the samples and their output pixels in order of
    /// g[o, p] · x[f[kk − k0] + q(p)], one running
    /// FMA sum per lane. `V` vectors of gradients are loaded and `T` inputs broadcast per pixel;
    /// with V = 2, T = 6 that is 8 loads for 12 FMAs and no horizontal sums.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wtile<const V: usize, const T: usize>(p: &Plan, gt: *const f32, l: usize, x: *const f32, xstride: usize, samples: usize, o0: usize, f: &[usize], k0: usize, acc: *mut f32) {
        let f: [usize; T] = std::array::from_fn(|j| f[j]);
        let at = |j: usize, v: usize| acc.wrapping_add((k0 + j) * l + o0 + 8 * v);
        let mut a: [[__m256; V]; T] = std::array::from_fn(|j| std::array::from_fn(|v| load(at(j, v))));
        let gstride = p.ho * p.wo * l;
        for s in 0..samples {
            let mut gp = gt.wrapping_add(s * gstride + o0);
            let xs = x.wrapping_add(s * xstride);
            for y in 0..p.ho {
                let row = xs.wrapping_add(y * p.wq);
                let base: [*const f32; T] = std::array::from_fn(|j| row.wrapping_add(f[j]));
                for xx in 0..p.wo {
                    rank1(&mut a, gp, &base, xx);
                    gp = gp.wrapping_add(l);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (v, &av) in aj.iter().enumerate() {
                store(at(j, v), av);
            }
        }
    }

    /// The weight gradient of [`Plan::weight_grad`] into `acc` (K × `l` lanes, transposed), in
    /// tiles of 16 (or 8, at the edge) lanes × up to `cols` (1–6) columns. Both instruction sets
    /// run these kernels, so the bits do not depend on which one the CPU has.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weight_grad(p: &Plan, gt: &[f32], l: usize, xpad: &[f32], cin: usize, samples: usize, acc: &mut [f32], cols: usize) {
        let cols = cols.clamp(1, super::WGRAD_COLS);
        let k = cin * p.taps.len();
        let (g, x, a) = (gt.as_ptr(), xpad.as_ptr(), acc.as_mut_ptr());
        let xs = p.input_len(cin);
        let offsets: Vec<usize> = (0..k).map(|kk| column(p, kk)).collect();
        // Samples in groups whose gradients and inputs fit in half of a 512 KiB L2 (so they stay
        // there across the tiles); each tile resumes its lanes' running sums from `acc`, so the
        // grouping leaves the order of every sum unchanged.
        let gs = p.ho * p.wo * l;
        let group = (WGRAD_GROUP_BYTES / (4 * (gs + xs)).max(1)).clamp(1, samples.max(1));
        for s in (0..samples).step_by(group) {
            let n = group.min(samples - s);
            let (g, x) = (g.wrapping_add(s * gs), x.wrapping_add(s * xs));
            for o0 in (0..l).step_by(16) {
                let two = l - o0 >= 16;
                let mut k0 = 0;
                while k0 < k {
                    let t = (k - k0).min(cols);
                    macro_rules! tile {
                        ($($t:literal)*) => {
                            match (two, t) {
                                $((true, $t) => wtile::<2, $t>(p, g, l, x, xs, n, o0, &offsets[k0..k0 + $t], k0, a),
                                  (false, $t) => wtile::<1, $t>(p, g, l, x, xs, n, o0, &offsets[k0..k0 + $t], k0, a),)*
                                _ => unreachable!("weight-gradient tile of {t} columns"),
                            }
                        };
                    }
                    tile!(1 2 3 4 5 6);
                    k0 += t;
                }
            }
        }
    }
}

/// The AVX-512 kernels: as in [`avx`], with 16-lane vectors and twice the registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const MR: usize = 8;

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
    pub(super) unsafe fn conv_tile(src: *const f32, plane: usize, cin: usize, taps: &[usize], w: *const f32, dst: *mut f32, ld: usize) {
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
        let rows = [(c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51), (c60, c61), (c70, c71)];
        for (r, (a0, a1)) in rows.into_iter().enumerate() {
            let d = dst.wrapping_add(r * ld);
            store(d, a0);
            store(d.wrapping_add(16), a1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The input pixel under output (y, x) and tap (i, j), if it is not padding.
    fn source(g: &Geom, y: usize, x: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let (iy, ix) = (y * g.stride + i, x * g.stride + j);
        let inside = iy >= g.pad && ix >= g.pad && iy < g.h + g.pad && ix < g.w + g.pad;
        inside.then(|| (iy - g.pad, ix - g.pad))
    }

    /// The convolution by its definition, in f64:
    /// out[o, y, x] = Σ w[o, c, i, j] · x[c, y·s + i − p, x·s + j − p].
    fn naive(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; g.o * g.ho * g.wo];
        for o in 0..g.o {
            for y in 0..g.ho {
                for xx in 0..g.wo {
                    let mut s = 0f64;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                if let Some((iy, ix)) = source(g, y, xx, i, j) {
                                    let xv = x[(c * g.h + iy) * g.w + ix] as f64;
                                    s += w[((o * g.c + c) * g.kh + i) * g.kw + j] as f64 * xv;
                                }
                            }
                        }
                    }
                    out[(o * g.ho + y) * g.wo + xx] = s;
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

    #[test]
    fn other_geometries_have_no_plan() {
        for (k, stride, pad) in [(3, 1, 0), (1, 1, 0), (3, 2, 0), (2, 2, 1), (3, 3, 1), (1, 2, 0)] {
            let g = Geom::new(&[1, 2, 9, 9], &[2, 2, k, k], stride, pad).unwrap();
            assert!(Plan::new(&g).is_none(), "{k}×{k} stride {stride} pad {pad}");
        }
    }

    /// Check the kernels of `isa` against the definition; returns the bits of every output and
    /// weight gradient computed.
    fn check_isa(isa: Isa) -> Vec<Vec<u32>> {
        let mut bits = Vec::new();
        let mut rng = Rng::new(11);
        // Odd sizes exercise partial tiles, channel counts not a multiple of 4, 3×3 and 5×5
        // kernels, stride 1 and 2 (odd and even input sizes for stride 2).
        for &(c, h, w, o, k, stride) in &[
            (1, 28, 28, 16, 3, 1),
            (3, 7, 7, 5, 3, 1),
            (2, 5, 9, 6, 5, 1),
            (16, 14, 14, 32, 3, 1),
            (5, 1, 3, 2, 3, 1),
            (16, 28, 28, 32, 3, 2),
            (3, 7, 9, 5, 3, 2),
            (5, 14, 14, 7, 3, 2),
            (2, 2, 3, 3, 3, 2),
            (2, 9, 7, 4, 5, 2),
        ] {
            let g = Geom::new(&[2, c, h, w], &[o, c, k, k], stride, k / 2).unwrap();
            assert!(Plan::new(&g).is_some());
            let p = Plan::layout(&g, isa);
            let (ho, wo) = (g.ho, g.wo);
            let xs: Vec<Vec<f32>> = (0..2).map(|_| rand(&mut rng, c * h * w)).collect();
            let wt = rand(&mut rng, o * c * k * k);
            let packed = p.pack_weights(&wt, o);
            // NaN-filled buffers: anything the layouts fail to write shows up in the results.
            let xl = p.input_len(c);
            let mut xpad = vec![f32::NAN; 2 * xl];
            for (x, d) in xs.iter().zip(xpad.chunks_exact_mut(xl)) {
                p.pad_into(x, d);
            }
            let mut wide = vec![f32::NAN; p.wide_len(o)];
            let mut got = vec![0f32; o * ho * wo];
            p.conv(&xpad[..xl], c, &packed, o, &mut wide);
            p.compact(&wide, &mut got);
            let want = naive(&g, &xs[0], &wt);
            let case = format!("{isa:?} c{c} {h}×{w} o{o} k{k} s{stride}");
            // The other path (channels in lanes, or the wide-pixel tiles): the same sums in the
            // same order, so the same bits, forward and (stride 2) input gradient.
            let other = Plan { lanes: !p.lanes, ..p.clone() };
            let run = |p: &Plan, gy: &[f32]| {
                let mut wide = vec![f32::NAN; p.wide_len(o)];
                let mut y = vec![f32::NAN; o * ho * wo];
                p.conv_into(&xpad[..xl], c, &p.pack_conv(&wt, o), o, &mut wide, &mut y);
                let mut gx = Vec::new();
                if stride == 2 {
                    let (gpl, wl) = p.input_grad_scratch(o, c);
                    let (mut gp, mut wide) = (vec![f32::NAN; gpl], vec![f32::NAN; wl]);
                    gx = vec![f32::NAN; c * h * w];
                    p.input_grad(gy, o, &p.input_grad_weights(&wt, o, c), c, &mut gp, &mut wide, &mut gx);
                }
                y.iter().chain(&gx).map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let gy0 = rand(&mut rng, o * ho * wo);
            let mine = run(&p, &gy0);
            assert!(mine == run(&other, &gy0), "{case}: the lanes path and the tiles differ");
            assert!(mine[..o * ho * wo] == got.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()[..]);
            for (a, b) in got.iter().zip(&want) {
                let ok = (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs());
                assert!(ok, "{case}: {a} vs {b}");
            }
            // Weight gradient of Σ gy·y over both samples.
            let gys: Vec<Vec<f32>> = (0..2).map(|_| rand(&mut rng, o * ho * wo)).collect();
            let tl = p.grad_t_len(o);
            let mut gt = vec![f32::NAN; 2 * tl];
            for (gy, d) in gys.iter().zip(gt.chunks_exact_mut(tl)) {
                p.grad_t_into(gy, o, d);
            }
            let kk = c * k * k;
            let mut gw = vec![0.5f32; o * kk];
            p.weight_grad(&gt, o, &xpad, c, 2, &mut gw);
            // Narrower tiles sum every gradient in the same order, so they give the same bits.
            for cols in 1..WGRAD_COLS {
                let mut narrow = vec![0.5f32; o * kk];
                Plan { wgrad_cols: cols, ..p.clone() }.weight_grad(&gt, o, &xpad, c, 2, &mut narrow);
                let same = narrow.iter().zip(&gw).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{case}: weight-gradient tiles of {cols} columns differ");
            }
            bits.push(got.iter().chain(&gw).map(|v| v.to_bits()).collect());
            if stride == 2 {
                // Input gradient of Σ gy·y for sample 0: Σ over the outputs that read x[c, iy, ix].
                let packs = p.input_grad_weights(&wt, o, c);
                let (gpl, wl) = p.input_grad_scratch(o, c);
                let (mut gp, mut wide) = (vec![f32::NAN; gpl], vec![f32::NAN; wl]);
                let mut gx = vec![f32::NAN; c * h * w];
                p.input_grad(&gys[0], o, &packs, c, &mut gp, &mut wide, &mut gx);
                let mut want = vec![0f64; c * h * w];
                for oo in 0..o {
                    for y in 0..ho {
                        for xx in 0..wo {
                            let gv = gys[0][(oo * ho + y) * wo + xx] as f64;
                            for ci in 0..c * k * k {
                                let (c0, i, j) = (ci / (k * k), ci / k % k, ci % k);
                                if let Some((iy, ix)) = source(&g, y, xx, i, j) {
                                    let wv = wt[oo * c * k * k + ci] as f64;
                                    want[(c0 * h + iy) * w + ix] += wv * gv;
                                }
                            }
                        }
                    }
                }
                for (t, (a, b)) in gx.iter().zip(&want).enumerate() {
                    let ok = (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs());
                    assert!(ok, "{case} gx[{t}]: {a} vs {b}");
                }
                bits.push(gx.iter().map(|v| v.to_bits()).collect());
            }
            // d(Σ gy·y)/dw[o, c, i, j] = Σ_n Σ_(y,x) gy[n, o, y, x] · x[n, c, y·s+i−p, x·s+j−p].
            for oo in 0..o {
                for ci in 0..kk {
                    let (c0, i, j) = (ci / (k * k), ci / k % k, ci % k);
                    let mut want = 0.5f64;
                    for (x, gy) in xs.iter().zip(&gys) {
                        for y in 0..ho {
                            for xx in 0..wo {
                                if let Some((iy, ix)) = source(&g, y, xx, i, j) {
                                    let xv = x[(c0 * h + iy) * w + ix] as f64;
                                    want += gy[(oo * ho + y) * wo + xx] as f64 * xv;
                                }
                            }
                        }
                    }
                    let got = gw[oo * kk + ci] as f64;
                    let ok = (got - want).abs() < 1e-4 * (1.0 + want.abs());
                    assert!(ok, "{case} gw {oo},{ci}: {got} vs {want}");
                }
            }
        }
        bits
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::rng::Rng;

    fn best(reps: usize, mut f: impl FnMut()) -> f64 {
        (0..reps)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }

    /// Each pass of the direct kernels over a batch of 128 in tasks of 8 samples, one thread,
    /// best of 10: forward, input gradient, weight gradient (GFLOP/s of each). Run with
    /// `cargo test --lib -- --ignored --nocapture direct_pass_speed`.
    #[test]
    #[ignore]
    fn direct_pass_speed() {
        let Some(isa) = cpu_isa() else { return };
        let mut rng = Rng::new(5);
        for &(name, c, hw, o, stride) in &[("res.s1", 16, 28, 16, 1), ("res.s2.conv1", 16, 28, 32, 2), ("res.s2.conv2", 32, 14, 32, 1), ("res.s3.conv1", 32, 14, 64, 2), ("res.s3.conv2", 64, 7, 64, 1)]
        {
            let (n, per) = (128, 8);
            let g = Geom::new(&[n, c, hw, hw], &[o, c, 3, 3], stride, 1).unwrap();
            let p = Plan::layout(&g, isa);
            let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.normal() as f32).collect();
            let gy: Vec<f32> = (0..n * o * g.ho * g.wo).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..o * c * 9).map(|_| rng.normal() as f32).collect();
            let packed = p.pack_conv(&w, o);
            let (xl, gl) = (p.input_len(c), p.input_len(o));
            let mut xpad = vec![0f32; per * xl];
            let mut gpad = vec![0f32; gl];
            let mut wide = vec![0f32; p.wide_len(o).max(p.wide_len(c)).max(p.input_grad_scratch(o, c).1)];
            let mut out = vec![0f32; o * g.ho * g.wo];
            let mut gx = vec![0f32; c * hw * hw];
            let fwd = best(30, || {
                for s in 0..n {
                    p.pad_into(&x[s * c * hw * hw..(s + 1) * c * hw * hw], &mut xpad[..xl]);
                    p.conv_into(&xpad[..xl], c, &packed, o, &mut wide[..p.wide_len(o)], &mut out);
                }
            });
            let ol = o * g.ho * g.wo;
            let igrad = if stride == 1 {
                let wt = p.pack_conv(&super::super::geom::transposed_conv(&g, &w).1, c);
                best(30, || {
                    for s in 0..n {
                        p.pad_into(&gy[s * ol..(s + 1) * ol], &mut gpad);
                        p.conv_into(&gpad, o, &wt, c, &mut wide[..p.wide_len(c)], &mut gx);
                    }
                })
            } else {
                let packs = p.input_grad_weights(&w, o, c);
                let (gpl, wl) = p.input_grad_scratch(o, c);
                let mut up = vec![0f32; gpl];
                best(30, || {
                    for s in 0..n {
                        p.input_grad(&gy[s * ol..(s + 1) * ol], o, &packs, c, &mut up, &mut wide[..wl], &mut gx);
                    }
                })
            };
            let tl = p.grad_t_len(o);
            let mut gt = vec![0f32; per * tl];
            let mut gw = vec![0f32; o * c * 9];
            let wgrad = best(30, || {
                for t in 0..n / per {
                    for i in 0..per {
                        let s = t * per + i;
                        p.grad_t_into(&gy[s * ol..(s + 1) * ol], o, &mut gt[i * tl..(i + 1) * tl]);
                        p.pad_into(&x[s * c * hw * hw..(s + 1) * c * hw * hw], &mut xpad[i * xl..(i + 1) * xl]);
                    }
                    p.weight_grad(&gt, o, &xpad, c, per, &mut gw);
                }
            });
            let gf = 2.0 * (n * o * c * 9 * g.ho * g.wo) as f64 / 1e9;
            println!("{name:13} fwd {:6.2} ms ({:4.1})  igrad {:6.2} ms ({:4.1})  wgrad {:6.2} ms ({:4.1} GFLOP/s)", fwd * 1e3, gf / fwd, igrad * 1e3, gf / igrad, wgrad * 1e3, gf / wgrad);
        }
    }
}
