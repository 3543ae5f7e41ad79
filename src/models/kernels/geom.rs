//! The sizes of one 2-D convolution (NCHW, groups 1, dilation 1) and of its transpose.
//!
//! Both convolution paths read the same geometry: the im2col + GEMM path of [`super::conv`] and
//! the direct kernels of [`super::direct`]. It lives apart from either so that neither imports the
//! other for it: `conv` chooses `direct` where it applies, and `direct` knows nothing of `conv`.

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geom {
    pub(super) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<Geom> {
        let (&[n, c, h, wd], &[o, c2, kh, kw]) = (x, w) else { candle_core::bail!("conv2d: expected a 4-d input and weight, got {x:?} and {w:?}") };
        if c != c2 {
            candle_core::bail!("conv2d: input has {c} channels but the weight expects {c2}");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride and kernel size must be positive");
        }
        if h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!("conv2d: kernel {kh}×{kw} larger than the padded {h}×{wd} input");
        }
        Ok(Geom { n, c, h, w: wd, o, kh, kw, stride, pad, ho: (h + 2 * pad - kh) / stride + 1, wo: (wd + 2 * pad - kw) / stride + 1 })
    }

    /// Rows of the patch matrix: C·kh·kw.
    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per channel: Ho·Wo.
    pub(super) fn p(&self) -> usize {
        self.ho * self.wo
    }

    pub(super) fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub(super) fn out_len(&self) -> usize {
        self.o * self.p()
    }

    /// A 1×1 convolution with stride 1 and no padding: the input already is the patch matrix.
    pub(super) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// The convolution that maps an output gradient (O channels) to the input gradient (C channels)
/// of a stride-1 "same" convolution, and its weight W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j].
pub(super) fn transposed_conv(g: &Geom, w: &[f32]) -> (Geom, Vec<f32>) {
    let gt = Geom { c: g.o, o: g.c, ..*g };
    let (kh, kw) = (g.kh, g.kw);
    let mut wt = vec![0f32; w.len()];
    for o in 0..g.o {
        for c in 0..g.c {
            for i in 0..kh {
                for j in 0..kw {
                    wt[((c * g.o + o) * kh + i) * kw + j] = w[((o * g.c + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                }
            }
        }
    }
    (gt, wt)
}
