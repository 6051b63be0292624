//! A counting global allocator: every byte candle's CPU tensors hold comes through it (they are
//! `Vec`s), so current and peak bytes are exact, not sampled RSS.
//!
//! The binary installs it with `#[global_allocator]`; in a process that did not, `installed()`
//! is false and measurements say so instead of reporting zeros.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);
/// Counting on (the default) or off: off only for benchmarking the allocator's own overhead.
static COUNTING: AtomicBool = AtomicBool::new(true);

/// Environment variable that switches counting off for the whole run (`main` reads it once), so
/// `scripts/bench.sh` can time the same binary with and without the counting allocator's work.
/// Memory figures are meaningless then, and verify says so.
pub const NO_COUNT_ENV: &str = "TRUESIZE_NO_ALLOC_COUNT";

pub struct CountingAlloc;

#[inline]
fn add(n: usize) {
    if !COUNTING.load(Relaxed) {
        return;
    }
    let now = CURRENT.fetch_add(n as u64, Relaxed) + n as u64;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn sub(n: usize) {
    if !COUNTING.load(Relaxed) {
        return;
    }
    CURRENT.fetch_sub(n as u64, Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only count sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Count the new block before releasing the old one: a moving realloc holds both.
            add(new_size);
            sub(layout.size());
        }
        p
    }
}

/// Whether the counting allocator is the process's global allocator.
pub fn installed() -> bool {
    if !SEEN.load(Relaxed) {
        let probe = Box::new([0u8; 64]);
        std::hint::black_box(&probe);
        let seen = CURRENT.load(Relaxed) > 0 || PEAK.load(Relaxed) > 0;
        SEEN.store(seen, Relaxed);
    }
    SEEN.load(Relaxed)
}

/// Bytes allocated and not yet freed.
pub fn current() -> u64 {
    CURRENT.load(Relaxed)
}

/// Highest `current()` since the last `reset_peak()`.
pub fn peak() -> u64 {
    PEAK.load(Relaxed)
}

/// Start a new phase: the peak restarts from what is allocated now.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
}

/// Stop counting for the rest of the process (benchmarks of the allocator's overhead only).
/// Call it first thing in `main`, after `installed()`, so no block is counted in and not out.
pub fn disable_counting() {
    COUNTING.store(false, Relaxed);
}

/// Whether allocations are being counted.
pub fn counting() -> bool {
    COUNTING.load(Relaxed)
}

/// Make glibc's malloc keep every freed tensor buffer in its heap and reuse it, instead of
/// mapping fresh zeroed pages for each one and unmapping them on free.
///
/// Why: candle and the lean step allocate a new buffer for every op output and gradient. By
/// default glibc serves blocks above its (dynamic, at most 32 MiB) mmap threshold with `mmap`,
/// so each op pays page faults and kernel page zeroing: `perf` put 15–17% of a GPT-2 124M
/// training step in the kernel (`clear_page_erms`, `exc_page_fault`, `unmap_page_range`).
/// Raising the threshold to its 32 MiB maximum took that step (one thread, batch 1, seq 256)
/// from 6.2–6.4 s to 3.5–4.0 s, but left every larger block (the logits, the [V, d] head and
/// embedding gradients) on `mmap`, and a heap top above the trim threshold went back to the OS
/// at the end of each step: still ~146k page faults (≈ 600 MB of fresh pages) per step. So no
/// block is mapped on its own (`M_MMAP_MAX` 0: the heap serves all, glibc still falls back to
/// `mmap` when the heap cannot grow) and the heap is never trimmed: ~13k page faults a step, and
/// that step (two threads) 1.80 s → 1.45 s together with the kernels' changes. Counted bytes are unchanged
/// (the counting allocator sees the requested sizes); the process's resident set stays at its
/// high-water mark until it exits.
/// Call once at the start of `main`; a no-op on other platforms.
pub fn keep_large_blocks_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation parameters; called before any threads.
    unsafe {
        // One arena: the command runs on a spawned thread, whose own arena would be a chain of
        // 64 MiB mapped heaps (a block above that is mapped on its own whatever M_MMAP_MAX says).
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: trimming off (malloc(3), M_TRIM_THRESHOLD).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
