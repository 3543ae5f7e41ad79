//! Keep freed tensor buffers in the process instead of returning them to the kernel (glibc).
//!
//! A training step allocates and frees dozens of activation-sized buffers (layer outputs and
//! gradients).
//! With glibc's defaults, buffers above the dynamic mmap threshold are mapped fresh and unmapped
//! on free, and the top of the heap is trimmed back to the kernel, so every step pays for page
//! faults and zeroing of new pages: about a fifth of a CNN's step on the 2-core benchmark machine.
//! [`keep_freed_memory`] raises both thresholds once per process, so those buffers are reused from
//! the heap; peak memory is unchanged, freed memory is simply not handed back until exit. On other
//! platforms and C libraries it does nothing.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use rayon::prelude::*;

/// glibc's largest allowed mmap threshold on 64-bit targets (32 MiB): buffers up to this size
/// come from the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is returned to the kernel only above this (1 GiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Raise glibc's mmap and trim thresholds once per process (no effect elsewhere).
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only adjusts allocator parameters; both values are within glibc's
        // documented ranges, and a refusal (return value 0) leaves the defaults in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    });
}

/// A zero-filled f32 buffer whose zeroing is left to the parallel tasks that fill it.
///
/// `vec![0.0; n]` zeroes on the calling thread before a parallel loop starts; for the layer
/// outputs and input gradients of a convolutional model that serial memset was about 4 % of a
/// two-thread ResNet step, with the other core idle. Here each task zeroes its own chunk first
/// ([`UninitChunk::zeroed`]), on its own core and just before writing it (while it is in
/// cache). The buffer becomes a `Vec` only once every chunk has been zeroed, which
/// [`ZeroedLater::into_vec`] checks, so no uninitialised element can be read.
pub(crate) struct ZeroedLater {
    buf: Vec<f32>,
    len: usize,
    zeroed: AtomicUsize,
}

/// One chunk of a [`ZeroedLater`], not yet initialised.
pub(crate) struct UninitChunk<'a> {
    mem: &'a mut [MaybeUninit<f32>],
    zeroed: &'a AtomicUsize,
}

impl<'a> UninitChunk<'a> {
    /// Zero the chunk and hand it out as initialised memory.
    pub(crate) fn zeroed(self) -> &'a mut [f32] {
        let (p, n) = (self.mem.as_mut_ptr().cast::<f32>(), self.mem.len());
        self.zeroed.fetch_add(n, Ordering::Relaxed);
        // SAFETY: `p..p+n` is the exclusively borrowed chunk; after `write_bytes` every element
        // holds the all-zero bit pattern, which is 0.0f32, so the slice is initialised.
        unsafe {
            std::ptr::write_bytes(p, 0, n);
            std::slice::from_raw_parts_mut(p, n)
        }
    }
}

impl ZeroedLater {
    pub(crate) fn new(len: usize) -> Self {
        ZeroedLater { buf: Vec::with_capacity(len), len, zeroed: AtomicUsize::new(0) }
    }

    /// The buffer in chunks of `size` elements (the last one shorter; `size` ≥ 1). Calling it
    /// again starts the count over: only the chunks of the last call count as zeroed.
    pub(crate) fn chunks(&mut self, size: usize) -> Vec<UninitChunk<'_>> {
        let ZeroedLater { buf, len, zeroed } = self;
        *zeroed.get_mut() = 0;
        let zeroed = &*zeroed;
        buf.spare_capacity_mut()[..*len].chunks_mut(size.max(1)).map(|mem| UninitChunk { mem, zeroed }).collect()
    }

    /// The buffer, once every chunk has been zeroed (panics otherwise).
    pub(crate) fn into_vec(mut self) -> Vec<f32> {
        let done = self.zeroed.load(Ordering::Relaxed);
        assert!(done == self.len, "ZeroedLater: {done} of {} elements were initialised", self.len);
        // SAFETY: the capacity is at least `len`. The counter counts only the chunks of the last
        // `chunks` call (which resets it), which partition the first `len` elements, and each is
        // counted at most once (`zeroed` consumes the chunk); so a count of `len` means every
        // element was zeroed.
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}

/// A zero-filled buffer of `len` elements, filled in parallel by `f(chunk index, chunk)` over
/// chunks of `size` elements, each zeroed by its own task (see [`ZeroedLater`]).
pub(crate) fn par_zeroed(len: usize, size: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut z = ZeroedLater::new(len);
    z.chunks(size).into_par_iter().enumerate().for_each(|(i, c)| f(i, c.zeroed()));
    z.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_later_hands_out_zeroed_chunks_that_cover_the_buffer() {
        for (len, size) in [(0usize, 3usize), (10, 3), (12, 4), (5, 8), (7, 1)] {
            // Reuse freed memory that held non-zero values, so that a chunk left unzeroed shows.
            drop(vec![7f32; len.max(1) * 4]);
            let v = par_zeroed(len, size, |i, c| {
                assert!(c.iter().all(|&x| x.to_bits() == 0), "chunk {i} not zeroed");
                c[0] = i as f32 + 1.0;
            });
            assert_eq!(v.len(), len);
            for (j, &x) in v.iter().enumerate() {
                let want = if j % size == 0 { (j / size) as f32 + 1.0 } else { 0.0 };
                assert_eq!(x, want, "{len}/{size} at {j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "2 of 4 elements were initialised")]
    fn chunks_zeroed_in_an_earlier_round_do_not_count_again() {
        let mut z = ZeroedLater::new(4);
        for c in z.chunks(2) {
            c.zeroed();
        }
        // A second round where only the first chunk is zeroed: the count must not reach 4.
        z.chunks(2).into_iter().next().unwrap().zeroed();
        z.into_vec();
    }

    #[test]
    #[should_panic(expected = "2 of 6 elements were initialised")]
    fn a_chunk_left_unzeroed_stops_the_conversion() {
        let mut z = ZeroedLater::new(6);
        let mut chunks = z.chunks(2);
        chunks.pop();
        chunks.pop();
        for c in chunks {
            c.zeroed();
        }
        z.into_vec();
    }
}
