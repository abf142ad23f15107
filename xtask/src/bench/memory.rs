//! Peak heap memory of a case's timed iterations, for the CPU backend.
//!
//! The xtask binary allocates through [`CountingAllocator`], which counts
//! the bytes alive. The bench counts what a preset's cases hold between
//! iterations (the bytes their construction and warm-up left alive: model,
//! inputs, optimizer state) and adds the most bytes any one timed iteration
//! allocated on top of what was alive when it started. Every tensor buffer
//! of the CPU backend is a heap allocation, so this is the memory the case
//! holds at its worst, the model and its inputs included, whatever other
//! presets' cases are alive beside it. (The resident high-water
//! mark cannot serve: the allocator keeps freed memory mapped for reuse, so
//! resident size only grows over the run.) GPU memory is not counted.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that counts live bytes around the allocator `A`.
pub struct CountingAllocator<A>(pub A);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `A` unchanged; only counters are added.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Starts a new peak at the bytes alive now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The bytes alive now.
pub fn live_bytes() -> u64 {
    LIVE.load(Ordering::Relaxed) as u64
}

/// The most bytes alive at once since [`reset_peak`].
pub fn peak_bytes() -> u64 {
    PEAK.load(Ordering::Relaxed) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_covers_a_block_freed_before_reading() {
        // Unit tests run on the default allocator, so drive the counters
        // through a `CountingAllocator` of the system allocator directly.
        let counting = CountingAllocator(std::alloc::System);
        reset_peak();
        let before = peak_bytes();
        let layout = Layout::from_size_align(64 << 20, 64).unwrap();
        // SAFETY: a non-zero layout, freed with the same layout.
        unsafe {
            let p = counting.alloc(layout);
            assert!(!p.is_null());
            counting.dealloc(p, layout);
        }
        assert!(peak_bytes() >= before + (64 << 20));
        reset_peak();
        assert!(peak_bytes() < before + (64 << 20));
    }
}
