//! `llmc-example-rust ARTIFACT PROMPT [MAX_NEW] [TEMPERATURE SEED]`: streams the generated text,
//! then prints the generated ids. Built on `llmc-runtime` alone (see `lib.rs`).

use std::io::Write;
use std::process::ExitCode;

use llmc_runtime::SamplingParams;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} ARTIFACT PROMPT [MAX_NEW] [TEMPERATURE SEED]", args[0]);
        return ExitCode::from(2);
    }
    let num = |i: usize, default: f64| args.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(default);
    let params = SamplingParams { temperature: num(4, 0.0) as f32, seed: num(5, 0.0) as u64, ..Default::default() };
    let mut out = std::io::stdout();
    let r = llmc_example_rust::generate(std::path::Path::new(&args[1]), &args[2], num(3, 32.0) as usize, params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    });
    match r {
        Ok(g) => {
            println!("\n{}", g.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
