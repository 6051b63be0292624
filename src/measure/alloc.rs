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
