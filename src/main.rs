//! `llmc`: the command-line driver. Thin by design: it parses arguments and calls the crates in
//! processing order (frontend -> passes -> codegen -> runtime).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use llmc_codegen as codegen;
use llmc_frontend as frontend;
use llmc_passes as passes;
use llmc_runtime as runtime;

#[derive(Parser)]
#[command(name = "llmc", version, about = "Ahead-of-time compiler for transformer language models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a checkpoint (directory, .safetensors file or sharded index) into an artifact.
    Compile(CompileArgs),
    /// Run an artifact: prefill the prompt, then decode greedily.
    Run(RunArgs),
    /// Print the text IR of a checkpoint (after the default pipeline unless --after says otherwise).
    DumpIr(DumpIrArgs),
    /// List the passes with a one-line summary each.
    Passes,
}

#[derive(Args)]
struct PipelineArgs {
    /// Comma-separated pass pipeline (default: the standard pipeline; `llmc passes` lists them).
    #[arg(long)]
    passes: Option<String>,
    /// Print the IR after the named pass (repeatable).
    #[arg(long = "print-ir-after", value_name = "PASS")]
    print_ir_after: Vec<String>,
    /// Print the IR after every pass.
    #[arg(long = "print-ir-after-all")]
    print_ir_after_all: bool,
    /// Write the IR after every pass to DIR, one numbered file per pass.
    #[arg(long = "dump-ir", value_name = "DIR")]
    dump_ir: Option<PathBuf>,
    /// Print per-pass statistics (time, node counts, rewrite counters) to stderr.
    #[arg(long = "pass-stats")]
    pass_stats: bool,
    /// Cap on the compiled context length (KV-cache rows); default min(max_position_embeddings, 4096).
    #[arg(long = "max-context")]
    max_context: Option<usize>,
}

#[derive(Args)]
struct CompileArgs {
    /// Model directory, `.safetensors` file (config.json beside it) or `model.safetensors.index.json`.
    model: PathBuf,
    /// Code generation target.
    #[arg(long, default_value = "cpu")]
    target: String,
    /// Output artifact path.
    #[arg(short, long)]
    output: PathBuf,
    /// Largest number of tokens per forward step; longer prompts are processed in chunks.
    #[arg(long = "max-chunk")]
    max_chunk: Option<usize>,
    /// Print the compile report as one JSON line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Artifact written by `llmc compile`.
    artifact: PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long = "input-ids", value_name = "IDS")]
    input_ids: String,
    /// Tokens to generate.
    #[arg(long = "max-new-tokens", default_value_t = 32)]
    max_new_tokens: usize,
    /// Write the logits of every prompt position as a float32 .npy of shape [prompt_len, vocab].
    #[arg(long = "logits-out", value_name = "FILE.npy")]
    logits_out: Option<PathBuf>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
    /// Make the last stdout line one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DumpIrArgs {
    /// Model directory, `.safetensors` file or sharded index.
    model: PathBuf,
    /// `all` prints the IR before and after every pass; a pass name prints after that pass.
    #[arg(long)]
    after: Option<String>,
    /// Comma-separated pass pipeline (default: the standard pipeline).
    #[arg(long)]
    passes: Option<String>,
    #[arg(long = "max-context")]
    max_context: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Frontend(#[from] frontend::FrontendError),
    #[error(transparent)]
    Pass(#[from] passes::PassError),
    #[error(transparent)]
    Codegen(#[from] codegen::CodegenError),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("{0}")]
    Usage(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Compile(a) => compile(a),
        Cmd::Run(a) => run(a),
        Cmd::DumpIr(a) => dump_ir(a),
        Cmd::Passes => list_passes(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let t = s.to_string();
                if !msg.contains(&t) {
                    msg.push_str(&format!("\n  caused by: {t}"));
                }
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn pipeline(spec: &Option<String>) -> Vec<String> {
    match spec {
        Some(s) => passes::parse_pipeline(s),
        None => passes::default_pipeline().iter().map(|s| s.to_string()).collect(),
    }
}

/// Loads the model and runs the pass pipeline, printing IR where asked (to stdout).
fn optimize(model: &Path, p: &PipelineArgs) -> Result<frontend::Model, CliError> {
    let mut m = frontend::load(model, &frontend::Options { max_context: p.max_context })?;
    let print = if p.print_ir_after_all {
        passes::PrintAfter::All
    } else if !p.print_ir_after.is_empty() {
        passes::PrintAfter::Passes(p.print_ir_after.clone())
    } else {
        passes::PrintAfter::None
    };
    let pm = passes::PassManager::new(&pipeline(&p.passes))?
        .print_after(print)
        .dump_dir(p.dump_ir.clone())
        .stats(p.pass_stats);
    let stdout = std::io::stdout();
    let stats = pm.run(&mut m.graph, &mut stdout.lock())?;
    if p.pass_stats {
        for (name, st, dt) in &stats {
            let counters: Vec<String> = st.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!("pass {name:<16} {:>9.3} ms  changed={}  {}", dt.as_secs_f64() * 1e3, st.changed, counters.join(" "));
        }
    }
    Ok(m)
}

fn compile(a: CompileArgs) -> Result<(), CliError> {
    let t0 = Instant::now();
    let backend = codegen::backend(&a.target)?;
    let m = optimize(&a.model, &a.pipeline)?;
    let opts = codegen::CompileOptions { max_chunk: a.max_chunk };
    let r = backend.compile(&m.graph, &m.checkpoint, &opts, &a.output)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "output": a.output.display().to_string(), "target": backend.name(), "nodes": r.nodes, "steps": r.steps,
            "kernels": r.kernels, "code_bytes": r.code_bytes, "weight_bytes": r.weight_bytes,
            "arena_bytes": r.arena_bytes, "kv_cache_bytes": r.state_bytes, "file_bytes": r.file_bytes,
            "max_chunk": r.max_chunk, "max_context": r.max_context, "seconds": secs,
        });
        println!("{j}");
    } else {
        eprintln!(
            "compiled {} -> {} ({} target): {} nodes, {} steps, {} distinct kernels ({} KiB code), {:.1} MiB weights, \
             peak activations {:.2} MiB (chunk {} tokens), KV cache {:.2} MiB ({} tokens), {:.2} s",
            a.model.display(), a.output.display(), backend.name(), r.nodes, r.steps, r.kernels, r.code_bytes / 1024,
            r.weight_bytes as f64 / 1048576.0, r.arena_bytes as f64 / 1048576.0, r.max_chunk,
            r.state_bytes as f64 / 1048576.0, r.max_context, secs
        );
    }
    Ok(())
}

fn parse_ids(s: &str) -> Result<Vec<u32>, CliError> {
    s.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| match t.parse::<i64>() {
            Ok(v) if v >= 0 && v <= u32::MAX as i64 => Ok(v as u32),
            Ok(v) => Err(CliError::Usage(format!("--input-ids: token id {v} is out of range (ids are non-negative)"))),
            Err(_) => Err(CliError::Usage(format!("--input-ids: `{t}` is not an integer token id"))),
        })
        .collect()
}

fn run(a: RunArgs) -> Result<(), CliError> {
    let ids = parse_ids(&a.input_ids)?;
    let model = runtime::Model::load(&a.artifact)?;
    let mut session = runtime::Session::new(model.clone())?;
    let stop = if a.ignore_eos { vec![] } else { model.eos_ids() };
    let (new, logits, st) = session.generate(&ids, a.max_new_tokens, &stop, a.logits_out.is_some(), |_| {})?;
    if let (Some(path), Some(l)) = (&a.logits_out, &logits) {
        runtime::npy::write_f32(path, &[ids.len(), model.vocab_size()], l)?;
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let j = serde_json::json!({
            "prompt_ids": ids, "generated_ids": new,
            "prompt_tokens": st.prompt_tokens, "generated_tokens": st.generated_tokens,
            "prefill_seconds": st.prefill_seconds, "decode_seconds": st.decode_seconds,
            "prefill_tokens_per_s": st.prefill_tokens_per_s(), "decode_tokens_per_s": st.decode_tokens_per_s(),
        });
        writeln!(out, "{j}")?;
    } else {
        let s: Vec<String> = new.iter().map(|i| i.to_string()).collect();
        writeln!(out, "{}", s.join(","))?;
        eprintln!(
            "prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s",
            st.prompt_tokens, st.prefill_tokens_per_s(), st.generated_tokens, st.decode_tokens_per_s()
        );
    }
    Ok(())
}

fn dump_ir(a: DumpIrArgs) -> Result<(), CliError> {
    let p = PipelineArgs {
        passes: a.passes.clone(),
        print_ir_after: match a.after.as_deref() {
            Some("all") | None => vec![],
            Some(p) => vec![p.to_string()],
        },
        print_ir_after_all: a.after.as_deref() == Some("all"),
        dump_ir: None,
        pass_stats: false,
        max_context: a.max_context,
    };
    let m = optimize(&a.model, &p)?;
    if a.after.is_none() {
        print!("{}", llmc_ir::print(&m.graph));
    }
    Ok(())
}

fn list_passes() -> Result<(), CliError> {
    let default = passes::default_pipeline();
    for p in passes::all_passes() {
        let mark = if default.contains(&p.name()) { "*" } else { " " };
        println!("{mark} {:<18} {}", p.name(), p.summary());
    }
    println!("\n* in the default pipeline: {}", default.join(","));
    Ok(())
}
