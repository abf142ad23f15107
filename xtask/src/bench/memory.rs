//! Peak resident memory of this process on Linux, for the CPU backend: the
//! kernel's high-water mark (`VmHWM`), reset before each workload through
//! `/proc/self/clear_refs`. GPU memory is not visible this way and is not
//! reported.

use std::fs;

/// Resets the high-water mark to the current resident size. Returns whether
/// the kernel allowed it (then [`peak_bytes`] covers only what follows).
pub fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The high-water mark of resident memory, in bytes.
pub fn peak_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_covers_a_fresh_allocation() {
        if !reset_peak() {
            return; // not Linux, or clear_refs not allowed: nothing to measure
        }
        let before = peak_bytes().expect("VmHWM on Linux");
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let after = peak_bytes().unwrap();
        assert!(after >= before + (60 << 20), "{before} -> {after}");
    }
}
