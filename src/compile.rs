//! The compiler commands of the CLI: `compile`, `dump-ir` and `passes`. Flags become a
//! [`llmc_compiler::CompileConfig`]; the library's progress events become progress bars; the
//! [`llmc_compiler::CompileReport`] becomes the summary line on stderr or the `--json` object.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use indicatif::ProgressBar;
use llmc_compiler::{self as compiler, CompileConfig, CompileReport, Emit, PipelineConfig, Progress, Target, WeightsDtype};

use crate::{progress, quant, CliError};

#[derive(Args)]
pub(crate) struct PipelineArgs {
    /// Pass pipeline, comma-separated, each pass with optional options in braces:
    /// `dce,optimize{target=cuda},quantize{format=int4:g64}` (default: the standard pipeline;
    /// `llmc passes` lists the passes and their options).
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
pub(crate) struct CompileArgs {
    /// Model directory, `.safetensors` file (config.json beside it) or `model.safetensors.index.json`.
    model: PathBuf,
    /// Code generation target.
    #[arg(long, default_value = "cpu")]
    target: String,
    /// Output: the artifact file, or with `--emit lib` the directory to write.
    #[arg(short, long)]
    output: PathBuf,
    /// What to write: `artifact` (default), `lib`, or `ptx DIR` (with --target cuda: the artifact
    /// and every kernel's PTX, for sm_80 and sm_90, plus its MLIR, in DIR).
    #[arg(long, num_args = 1..=2, value_names = ["KIND", "DIR"], default_values = ["artifact"])]
    emit: Vec<String>,
    /// Element type of float weights in the artifact: f32, f16, bf16, or keep (as the checkpoint
    /// stores each). Default: f16 for --target cuda, keep for the CPU (16-bit product weights, and
    /// a tied embedding/head, stay 16-bit; norms, biases and untied embeddings are f32).
    /// Activations and accumulation are f32 either way; a value beyond f16's range is an error
    /// naming the weight.
    #[arg(long = "weights-dtype", value_name = "TYPE")]
    weights_dtype: Option<String>,
    /// How the KV cache stores keys and values: f32 (default) or int8 (int8 codes with one f32
    /// scale per token and KV head: a quarter of the bytes, so decode at long context reads a
    /// quarter of the cache; `llmc eval --reference` measures the change). CPU target only.
    #[arg(long = "kv-dtype", value_name = "TYPE")]
    kv_dtype: Option<String>,
    /// Threads for compile-time work (checkpoint conversion, calibration). Default: every core.
    /// The artifact is byte-identical at any count.
    #[arg(long)]
    threads: Option<usize>,
    /// Largest number of tokens per forward step; longer prompts are processed in chunks.
    #[arg(long = "max-chunk")]
    max_chunk: Option<usize>,
    /// Leave out the checkpoint's tokenizer.json and chat template (the artifact then takes ids only).
    #[arg(long = "no-tokenizer")]
    no_tokenizer: bool,
    /// Run every product in generated code instead of the runtime's GEMM microkernels (weights
    /// stay row-major): for comparisons.
    #[arg(long = "no-microkernels")]
    no_microkernels: bool,
    /// Print the compile report as one JSON line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    q: quant::QuantArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

#[derive(Args)]
pub(crate) struct DumpIrArgs {
    /// Model directory, `.safetensors` file or sharded index.
    model: PathBuf,
    /// `all` prints the IR before and after every pass; a pass name prints after that pass.
    #[arg(long)]
    after: Option<String>,
    /// Pass pipeline, as `llmc compile --passes` takes it (default: the standard pipeline).
    #[arg(long)]
    passes: Option<String>,
    /// The target whose cost model `optimize` uses unless an entry says `optimize{target=...}`.
    #[arg(long, default_value = "cpu")]
    target: String,
    #[arg(long = "max-context")]
    max_context: Option<usize>,
    /// Print one JSON object {"passes": [...], "ir": TEXT} instead of the text.
    #[arg(long)]
    json: bool,
    /// Explain why the optimizer's extracted form of VALUE won (its cost against the alternatives
    /// in its e-class). VALUE (e.g. `%42`) names a value of the IR as it reaches the `optimize`
    /// pass: print that IR with `--after` and the pass before `optimize` in the pipeline.
    #[arg(long, value_name = "VALUE")]
    explain: Option<String>,
}

#[derive(Args)]
pub(crate) struct PassesArgs {
    /// Print one JSON object: every pass with its summary, and the default pipeline.
    #[arg(long)]
    json: bool,
}

/// `--emit KIND [DIR]` as the library's [`Emit`].
fn emit(words: &[String]) -> Result<Emit, CliError> {
    match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["artifact"] => Ok(Emit::Artifact),
        ["lib"] => Ok(Emit::Lib),
        ["ptx", dir] => Ok(Emit::Ptx(PathBuf::from(dir))),
        ["ptx"] => Err(CliError::Usage("--emit ptx needs a directory: --emit ptx DIR".into())),
        [kind, extra] if kind != "ptx" => {
            Err(CliError::Usage(format!("--emit {kind} takes no directory (got `{extra}`); only `--emit ptx DIR` does")))
        }
        _ => Err(CliError::Usage(format!("--emit `{}`: expected artifact, lib or ptx DIR", words.join(" ")))),
    }
}

impl CompileArgs {
    fn config(&self) -> Result<CompileConfig, CliError> {
        // The target first: an unknown target is the error to report before any other.
        let target = Target::parse(&self.target)?;
        Ok(CompileConfig {
            target,
            output: self.output.clone(),
            emit: emit(&self.emit)?,
            max_context: self.pipeline.max_context,
            max_chunk: self.max_chunk,
            no_tokenizer: self.no_tokenizer,
            no_microkernels: self.no_microkernels,
            weights_dtype: self.weights_dtype.as_deref().map(WeightsDtype::parse).transpose().map_err(llmc_compiler::Error::from)?,
            kv_dtype: self.kv_dtype.clone(),
            threads: self.threads,
            runtime_lib: None,
            quant: self.q.config(),
            pipeline: PipelineConfig {
                passes: self.pipeline.passes.clone(),
                print_ir_after: self.pipeline.print_ir_after.clone(),
                print_ir_after_all: self.pipeline.print_ir_after_all,
                dump_ir: self.pipeline.dump_ir.clone(),
                pass_stats: self.pipeline.pass_stats,
            },
        })
    }
}

/// A compile allocates and frees a buffer per weight (tens to hundreds of MiB each). glibc hands
/// buffers that large back to the kernel on every free, so the next one costs fresh page faults
/// and zeroing (a fifth of the weight pipeline's CPU time): keep them in the heap for reuse
/// instead. The peak stays that of the largest few weights in flight.
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the compile's threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

pub(crate) fn compile(a: CompileArgs, quiet: bool) -> Result<(), CliError> {
    reuse_freed_memory();
    let config = a.config()?;
    let mut bar = ProgressBar::hidden();
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::PassesDone { passes, .. } if a.pipeline.pass_stats => {
            for r in passes {
                let counters: Vec<String> = r.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                eprintln!("pass {:<16} {:>9.3} ms  changed={}  {}", r.name, r.seconds * 1e3, r.changed, counters.join(" "));
            }
        }
        Progress::Codegen { tensors } => {
            bar = progress(quiet, tensors as u64, "writing weights [{bar:30}] {pos}/{len} tensors {elapsed}");
        }
        Progress::Tensor { .. } => bar.inc(1),
        Progress::Written { .. } => bar.finish_and_clear(),
        _ => {}
    };
    let r = compiler::compile(&a.model, &config, &mut on_progress, &mut std::io::stdout().lock())?;
    for n in &r.notes {
        eprintln!("warning: {n}");
    }
    if a.json {
        println!("{}", report_json(&r));
    } else if !quiet {
        print_summary(&r);
    }
    if let (Some(rows), false) = (&r.matrices, a.json) {
        quant::print_report(rows, r.quant.as_ref().map_or(&[][..], |q| &q.float_weights));
        println!("artifact: {:.3} bits/weight over all {} parameters", r.bits_per_weight(), r.params);
    }
    Ok(())
}

/// The `--json` object of `llmc compile`.
fn report_json(r: &CompileReport) -> serde_json::Value {
    let mut j = serde_json::json!({
        "output": r.output.display().to_string(), "target": r.target, "nodes": r.nodes, "steps": r.steps,
        "kernels": r.kernels, "code_bytes": r.code_bytes, "weight_bytes": r.weight_bytes,
        "arena_bytes": r.arena_bytes, "kv_cache_bytes": r.kv_cache_bytes, "file_bytes": r.file_bytes,
        "max_chunk": r.max_chunk, "max_context": r.max_context, "seconds": r.timings.total,
        "tokenizer": r.tokenizer, "chat_template": r.chat_template,
        "emit": if r.library.is_some() { "lib" } else { "artifact" },
    });
    j["params"] = r.params.into();
    if !r.ptx_files.is_empty() {
        j["ptx_files"] = r.ptx_files.len().into();
    }
    j["bits_per_weight"] = r.bits_per_weight().into();
    if let Some(q) = &r.quant {
        j["quant"] = serde_json::json!({
            "format": q.format, "sparsity": q.sparsity, "layout": q.layout.name(), "method": q.method,
            "tensors": q.tensors, "params": q.params,
            "float_weights": q.float_weights.iter()
                .map(|f| serde_json::json!({ "name": f.name, "shape": f.shape, "why": f.why }))
                .collect::<Vec<_>>(),
        });
    }
    if let Some(rows) = &r.matrices {
        j["report"] = quant::report_json(rows);
    }
    if let Some(l) = &r.library {
        j["artifact"] = r.artifact.display().to_string().into();
        j["library"] = l.library.display().to_string().into();
        j["header"] = l.header.display().to_string().into();
        j["runtime_library"] = l.runtime.display().to_string().into();
    }
    j
}

/// The summary of `llmc compile` on stderr.
fn print_summary(r: &CompileReport) {
    eprintln!(
        "compiled {} -> {} ({} target): {} nodes, {} steps, {} distinct kernels ({} KiB code), {:.1} MiB weights, \
         peak activations {:.2} MiB (chunk {} tokens), KV cache {:.2} MiB ({} tokens), tokenizer {}, {:.2} s",
        r.model.display(), r.artifact.display(), r.target, r.nodes, r.steps, r.kernels, r.code_bytes / 1024,
        r.weight_bytes as f64 / 1048576.0, r.arena_bytes as f64 / 1048576.0, r.max_chunk,
        r.kv_cache_bytes as f64 / 1048576.0, r.max_context,
        match (r.tokenizer, r.chat_template) {
            (true, true) => "and chat template included",
            (true, false) => "included",
            _ => "not included",
        },
        r.timings.total
    );
    if let Some(q) = &r.quant {
        eprintln!("quantized {} weight matrices ({} parameters), {}", q.tensors, q.params, float_summary(&q.float_weights));
    }
    if let Some(l) = &r.library {
        eprintln!(
            "library {} and header {}; link with: cc app.c -I {} -L {} -lllmc_model -lpthread -ldl -lm",
            l.library.display(), l.header.display(), r.output.display(), r.output.display()
        );
    }
}

/// The weight matrices quantization left in float, grouped by reason (a few names each).
fn float_summary(floats: &[compiler::FloatWeight]) -> String {
    if floats.is_empty() {
        return "none left in float (norm vectors and biases stay f32)".into();
    }
    let mut by_why: Vec<(&str, Vec<&compiler::FloatWeight>)> = Vec::new();
    for f in floats {
        match by_why.iter_mut().find(|(w, _)| *w == f.why) {
            Some((_, v)) => v.push(f),
            None => by_why.push((&f.why, vec![f])),
        }
    }
    let groups: Vec<String> = by_why
        .iter()
        .map(|(why, v)| {
            let names: Vec<String> = v.iter().take(3).map(|f| format!("{} {}", f.name, f.shape)).collect();
            let more = if v.len() > 3 { format!(" and {} more", v.len() - 3) } else { String::new() };
            format!("{} ({}{more}): {why}", v.len(), names.join(", "))
        })
        .collect();
    format!("{} left in float: {}", floats.len(), groups.join("; "))
}

pub(crate) fn dump_ir(a: DumpIrArgs) -> Result<(), CliError> {
    let cfg = compiler::DumpIrConfig {
        passes: a.passes.clone(),
        after: match a.after.as_deref() {
            None => compiler::DumpAfter::Pipeline,
            Some("all") => compiler::DumpAfter::All,
            Some(p) => compiler::DumpAfter::Pass(p.to_string()),
        },
        target: Target::by_name(&a.target)?,
        max_context: a.max_context,
    };
    let entries = compiler::pipeline(a.passes.as_deref())?;
    if let Some(value) = &a.explain {
        print!("{}", compiler::explain(&a.model, &cfg, value)?);
        return Ok(());
    }
    if a.json {
        let mut buf = Vec::new();
        compiler::dump_ir(&a.model, &cfg, &mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let j = serde_json::json!({ "passes": entries, "after": a.after, "ir": text });
        println!("{j}");
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    compiler::dump_ir(&a.model, &cfg, &mut out)?;
    out.flush()?;
    Ok(())
}

pub(crate) fn list_passes(a: PassesArgs) -> Result<(), CliError> {
    let default = compiler::default_pipeline();
    let passes = compiler::passes();
    if a.json {
        let list: Vec<serde_json::Value> = passes
            .iter()
            .map(|p| {
                let options: Vec<serde_json::Value> = p
                    .options
                    .iter()
                    .map(|o| serde_json::json!({ "name": o.name, "values": o.values, "default": o.default, "summary": o.summary }))
                    .collect();
                serde_json::json!({ "name": p.name, "summary": p.summary, "default": p.default, "options": options })
            })
            .collect();
        println!("{}", serde_json::json!({ "passes": list, "default_pipeline": default }));
        return Ok(());
    }
    for p in &passes {
        let mark = if p.default { "*" } else { " " };
        println!("{mark} {:<18} {}", p.name, p.summary);
        for o in p.options {
            println!("      {}={}\n          {}; default: {}", o.name, o.values, o.summary, o.default);
        }
    }
    println!("\n* in the default pipeline: {}", default.join(","));
    println!("Options go in braces after a pass: --passes 'dce,optimize{{target=cuda,iterations=12}},quantize{{format=int4:g64}}';");
    println!("quote a value that holds whitespace or any of , {{ }} = \" \\ (keep-fp=\"a,b\").");
    Ok(())
}
