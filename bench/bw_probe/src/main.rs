//! `bw_probe [THREADS] [MIB_PER_THREAD]`: the best read bandwidth of THREADS threads (default 2)
//! each streaming MIB_PER_THREAD MiB (default 256) with 1, 2, 4, 8 and 16 read streams, every
//! configuration three times; one line per stream count, then the best as JSON.
//!
//! `cargo run --release -p llmc-bw-probe -- 2`

use llmc_runtime::bandwidth::{cpu_name, probe, DEFAULT_BYTES_PER_THREAD};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, what: &str, default: usize| -> usize {
        match args.get(i) {
            None => default,
            Some(a) => a.parse().ok().filter(|&n: &usize| n > 0).unwrap_or_else(|| {
                eprintln!("bw_probe: {what} `{a}` is not a positive integer\nusage: bw_probe [THREADS] [MIB_PER_THREAD]");
                std::process::exit(2)
            }),
        }
    };
    let threads = num(0, "THREADS", 2);
    let mib = num(1, "MIB_PER_THREAD", DEFAULT_BYTES_PER_THREAD >> 20);
    let p = probe(threads, mib << 20, 3);
    let cpu = cpu_name();
    println!("{cpu}: {threads} threads x {} MiB", p.bytes_per_thread >> 20);
    for r in &p.rates {
        println!("{:>2} streams per thread: {:>6.1} GB/s", r.streams, r.bytes_per_s / 1e9);
    }
    let b = p.best();
    println!(
        "{}",
        serde_json_line(&cpu, threads, b.streams, b.bytes_per_s, &p.rates.iter().map(|r| r.bytes_per_s).collect::<Vec<_>>())
    );
}

/// The result as one JSON object (no JSON crate needed for five fields).
fn serde_json_line(cpu: &str, threads: usize, streams: usize, bps: f64, rates: &[f64]) -> String {
    let rates: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    format!(
        "{{\"cpu\":{:?},\"threads\":{threads},\"best_streams\":{streams},\"read_bytes_per_s\":{bps:.0},\"bytes_per_s_by_streams\":[{}]}}",
        cpu,
        rates.join(",")
    )
}
