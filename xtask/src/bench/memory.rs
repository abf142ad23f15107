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

/// Live and peak byte counts.
pub struct Counters {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl Counters {
    /// Nothing counted yet.
    pub const fn new() -> Self {
        Self { live: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    fn grew(&self, bytes: usize) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn reset_peak(&self) {
        self.peak.store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed) as u64
    }

    fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) as u64
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// What the xtask binary's allocator counts.
pub static COUNTERS: Counters = Counters::new();

/// A global allocator that counts live bytes around the allocator `A`.
pub struct CountingAllocator<A: 'static> {
    /// The allocator that does the work.
    pub inner: A,
    /// Where the bytes are counted ([`COUNTERS`] for the binary's allocator).
    pub counters: &'static Counters,
}

// SAFETY: every call is forwarded to `A` unchanged; only counters are added.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            self.counters.grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            self.counters.grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.inner.dealloc(ptr, layout) };
        self.counters.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.counters.shrank(layout.size());
            self.counters.grew(new_size);
        }
        p
    }
}

/// Starts a new peak at the bytes alive now.
pub fn reset_peak() {
    COUNTERS.reset_peak();
}

/// The bytes alive now.
pub fn live_bytes() -> u64 {
    COUNTERS.live_bytes()
}

/// The most bytes alive at once since [`reset_peak`].
pub fn peak_bytes() -> u64 {
    COUNTERS.peak_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_covers_a_block_freed_before_reading() {
        // Counters of its own: the binary's allocator counts the other
        // tests' allocations too, which run on other threads meanwhile.
        let counters: &'static Counters = Box::leak(Box::default());
        let counting = CountingAllocator { inner: std::alloc::System, counters };
        let layout = Layout::from_size_align(64 << 20, 64).unwrap();
        // SAFETY: a non-zero layout, freed with the same layout.
        unsafe {
            let small = counting.alloc(Layout::from_size_align(100, 8).unwrap());
            let p = counting.alloc(layout);
            assert!(!p.is_null() && !small.is_null());
            counting.dealloc(p, layout);
            assert_eq!(counters.live_bytes(), 100);
            assert_eq!(counters.peak_bytes(), 100 + (64 << 20));
            counters.reset_peak();
            assert_eq!(counters.peak_bytes(), 100);
            counting.dealloc(small, Layout::from_size_align(100, 8).unwrap());
        }
        assert_eq!(counters.live_bytes(), 0);
    }
}
