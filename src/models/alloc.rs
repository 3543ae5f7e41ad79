//! Keep freed tensor buffers in the process instead of returning them to the kernel (glibc).
//!
//! A training step allocates and frees dozens of activation-sized buffers (layer outputs,
//! gradients, and the zero-filled accumulators candle's backward pass creates for every node).
//! With glibc's defaults, buffers above the dynamic mmap threshold are mapped fresh and unmapped
//! on free, and the top of the heap is trimmed back to the kernel, so every step pays for page
//! faults and zeroing of new pages: about a fifth of a CNN's step on the 2-core benchmark machine.
//! [`keep_freed_memory`] raises both thresholds once per process, so those buffers are reused from
//! the heap; peak memory is unchanged, freed memory is simply not handed back until exit. On other
//! platforms and C libraries it does nothing.

use std::sync::Once;

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
