//! How many threads compile-time work may use (`llmc compile --threads`): the checkpoint's
//! conversion to f32, calibration's per-row work. Process-wide, default every core. No result
//! depends on it: parallel work is split into parts whose results are combined in a fixed order,
//! so an artifact is byte-identical at any thread count (tests/artifact_hashes.rs checks it).

use std::sync::atomic::{AtomicUsize, Ordering};

static MAX: AtomicUsize = AtomicUsize::new(0);

/// Caps compile-time work at `n` threads from now on (0: every core).
pub fn set_max(n: usize) {
    MAX.store(n, Ordering::Relaxed);
}

/// Threads compile-time work may use now: the cap set by [`set_max`], else every core.
pub fn available() -> usize {
    match MAX.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |t| t.get()),
        n => n,
    }
}
