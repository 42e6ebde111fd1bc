//! The machine's memory read bandwidth, measured the way decode reads weights: every thread
//! streams through its own buffer, larger than any cache, with 1, 2, 4, 8 and 16 concurrent read
//! streams (equal sub-ranges walked side by side), and the best rate counts. `llmc bench
//! --roofline` runs it in the same process as the decode it compares with, because this VM's
//! bandwidth moves from run to run; `bench/bw_probe` runs it alone.

use std::time::Instant;

/// Stream counts per thread the probe tries.
pub const STREAMS: [usize; 5] = [1, 2, 4, 8, 16];

/// Bytes each thread reads per pass: well beyond the last-level cache of the machines here
/// (32 MiB L3 on a Zen 4/5 CCD, 105 MiB on a Sapphire Rapids socket).
pub const DEFAULT_BYTES_PER_THREAD: usize = 256 << 20;

/// One measured configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub streams: usize,
    /// Bytes read per second by all threads together (the best of the passes).
    pub bytes_per_s: f64,
}

/// The probe's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub threads: usize,
    pub bytes_per_thread: usize,
    /// Every stream count tried, in [`STREAMS`] order.
    pub rates: Vec<Rate>,
}

impl Probe {
    /// The best configuration.
    pub fn best(&self) -> Rate {
        self.rates.iter().copied().max_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s)).unwrap_or(Rate { streams: 0, bytes_per_s: 0.0 })
    }
}

/// Measures read bandwidth with `threads` threads reading `bytes_per_thread` bytes each, `passes`
/// times per stream count (the best pass counts).
pub fn probe(threads: usize, bytes_per_thread: usize, passes: usize) -> Probe {
    let threads = threads.max(1);
    // Whole 64-byte lines, a multiple of every stream count.
    let lines = (bytes_per_thread / 64).max(16) / 16 * 16;
    // Each thread's buffer is allocated and written by that thread (first touch: its own memory
    // node where there are several), before any timing.
    let mut bufs: Vec<Vec<u64>> = Vec::with_capacity(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|t| s.spawn(move || (0..lines * 8).map(|i| (i as u64) ^ t as u64).collect::<Vec<u64>>())).collect();
        for h in hs {
            bufs.push(h.join().expect("bandwidth probe thread"));
        }
    });
    let mut rates = Vec::with_capacity(STREAMS.len());
    for streams in STREAMS {
        let mut best = 0.0f64;
        for _ in 0..passes.max(1) {
            let barrier = std::sync::Barrier::new(threads);
            let mut sink = 0u64;
            std::thread::scope(|s| {
                let hs: Vec<_> = bufs
                    .iter()
                    .map(|b| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let t = Instant::now();
                            let x = read_streams(b, streams);
                            (x, t.elapsed().as_secs_f64())
                        })
                    })
                    .collect();
                let mut slowest = 0.0f64;
                for h in hs {
                    let (x, secs) = h.join().expect("bandwidth probe thread");
                    sink ^= x;
                    slowest = slowest.max(secs);
                }
                // Every thread's bytes over the slowest thread's time: the rate all of them held.
                let rate = (threads * lines * 64) as f64 / slowest.max(1e-9);
                best = best.max(rate);
            });
            std::hint::black_box(sink);
        }
        rates.push(Rate { streams, bytes_per_s: best });
    }
    Probe { threads, bytes_per_thread: lines * 64, rates }
}

/// Reads all of `buf` as `streams` equal sub-ranges walked side by side, one 64-byte line of
/// each per round (`buf` holds a multiple of `streams` lines); returns a value that depends on
/// every word read (so no read is elided).
fn read_streams(buf: &[u64], streams: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { read_streams_avx512(buf, streams) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { read_streams_avx2(buf, streams) };
        }
    }
    read_streams_portable(buf, streams)
}

/// The loop of [`read_streams`]: XOR of every word, per stream, line by line. Compiled for each
/// vector width below (the compiler vectorizes the 8-word line into one or two loads).
#[inline(always)]
fn read_streams_portable(buf: &[u64], streams: usize) -> u64 {
    let lines = buf.len() / 8;
    let per = lines / streams;
    let mut acc = [[0u64; 8]; 16];
    let streams = streams.min(16);
    for i in 0..per {
        for (s, a) in acc.iter_mut().enumerate().take(streams) {
            let o = (s * per + i) * 8;
            let line: &[u64; 8] = buf[o..o + 8].try_into().expect("a whole line");
            for k in 0..8 {
                a[k] ^= line[k];
            }
        }
    }
    acc.iter().flatten().fold(0, |x, &y| x ^ y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_streams_avx512(buf: &[u64], streams: usize) -> u64 {
    read_streams_portable(buf, streams)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_streams_avx2(buf: &[u64], streams: usize) -> u64 {
    read_streams_portable(buf, streams)
}

/// The CPU's model name from `/proc/cpuinfo` (every bandwidth or speed figure names its machine).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Bytes a decode step reads per token: every data buffer a step uses (weights, constant
/// tables), except that a table only gathered from (an untied embedding) counts one row, plus
/// the KV-cache rows at `mean_context` positions.
pub fn decode_read_bytes(h: &crate::Header, mean_context: f64) -> f64 {
    use crate::BufferDecl;
    // For every data buffer: read whole by some step, or only gathered (one row per token).
    let mut whole = vec![false; h.buffers.len()];
    let mut gathered = vec![false; h.buffers.len()];
    for s in &h.steps {
        let gather = s.label.ends_with("= gather");
        for (i, &b) in s.args.iter().enumerate() {
            let Some(w) = whole.get_mut(b as usize) else { continue };
            if gather && i == 0 {
                gathered[b as usize] = true;
            } else {
                *w = true;
            }
        }
    }
    let row = |bytes: u64| bytes as f64 / h.vocab_size.max(1) as f64;
    let weights: f64 = h
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            BufferDecl::Data { bytes, .. } if whole[i] => *bytes as f64,
            BufferDecl::Data { bytes, .. } if gathered[i] => row(*bytes),
            _ => 0.0,
        })
        .sum();
    let kv_row = h.states.iter().map(|s| s.bytes).sum::<u64>() as f64 / h.max_context.max(1) as f64;
    weights + kv_row * mean_context
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_count_reads_every_word() {
        // The XOR of all words is the same however the buffer is cut into streams.
        let buf: Vec<u64> = (0..16 * 8 * 5).map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let want = buf.iter().fold(0, |x, &y| x ^ y);
        for s in STREAMS {
            assert_eq!(read_streams(&buf, s), want, "{s} streams");
            assert_eq!(read_streams_portable(&buf, s), want, "{s} streams, portable");
        }
    }

    #[test]
    fn probe_reports_every_stream_count() {
        let p = probe(2, 1 << 20, 1);
        assert_eq!(p.rates.iter().map(|r| r.streams).collect::<Vec<_>>(), STREAMS);
        assert!(p.rates.iter().all(|r| r.bytes_per_s > 0.0 && r.bytes_per_s.is_finite()), "{p:?}");
        assert_eq!(p.best().bytes_per_s, p.rates.iter().map(|r| r.bytes_per_s).fold(0.0, f64::max));
        assert_eq!(p.bytes_per_thread, 1 << 20);
    }
}
