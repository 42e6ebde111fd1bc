//! `llmc`: the command-line driver. Thin by design: it parses arguments, hands the compiler
//! commands to the compile library (`llmc_compiler`, in [`compile`]) and runs artifacts through
//! the runtime (`run`, `bench`, [`embed`], [`eval`]). Progress bars go to stderr (hidden when it is
//! not a terminal or with `--quiet`), `--json` makes the last stdout line one JSON object on every
//! command, and `RUST_LOG` turns on `tracing` logs of the main phases.

mod compile;
mod embed;
mod eval;
mod quant;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use llmc_runtime as runtime;
use runtime::{Sampler, SamplingParams, Session, StopConditions, Tokenizer};
use tracing::info;

#[derive(Parser)]
#[command(name = "llmc", version, about = "Ahead-of-time compiler for transformer language models")]
struct Cli {
    /// No progress bars and no summaries on stderr (errors still print).
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a checkpoint (directory, .safetensors file or sharded index) into an artifact, or
    /// with `--emit lib` into a static library and C header.
    Compile(compile::CompileArgs),
    /// Run an artifact: prefill the prompt (ids or text), then decode (greedy unless sampling
    /// options are given; speculative with --draft).
    Run(RunArgs),
    /// Measure prefill and decode speed and peak memory (optionally speculative decoding's gain).
    Bench(BenchArgs),
    /// Sentence embeddings from an encoder artifact (BertModel), pooled and normalized as the
    /// checkpoint's sentence-transformers configuration says.
    Embed(embed::EmbedArgs),
    /// Perplexity of an artifact on a text file (and KL / top-1 agreement against --reference).
    Eval(eval::EvalArgs),
    /// Print the text IR of a checkpoint (after the default pipeline unless --after says otherwise).
    DumpIr(compile::DumpIrArgs),
    /// List the passes with a one-line summary each.
    Passes(compile::PassesArgs),
}

#[derive(Args)]
struct SamplingArgs {
    /// Softmax temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long = "top-k", default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P (1: all).
    #[arg(long = "top-p", default_value_t = 1.0, allow_hyphen_values = true)]
    top_p: f32,
    /// Penalize tokens already in the sequence (Hugging Face's rule; 1: off, 1.1-1.3 typical).
    #[arg(long = "repetition-penalty", default_value_t = 1.0, allow_hyphen_values = true)]
    repetition_penalty: f32,
    /// Seed of the sampler (the same seed gives the same text); default: from the clock, reported.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Artifact written by `llmc compile`.
    artifact: PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long = "input-ids", value_name = "IDS", required_unless_present = "prompt", conflicts_with = "prompt")]
    input_ids: Option<String>,
    /// Prompt text, tokenized with the tokenizer the artifact carries; the generated text streams
    /// to stdout.
    #[arg(long)]
    prompt: Option<String>,
    /// Format --prompt as a user message with the checkpoint's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate.
    #[arg(long = "max-new-tokens", default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Also stop after this token: an id or a token string such as `<|im_end|>` (repeatable).
    #[arg(long, value_name = "TOKEN")]
    stop: Vec<String>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
    /// Draft model (an artifact with the same vocabulary) for speculative decoding; it runs on
    /// one thread (a small model's steps are too short to split).
    #[arg(long, value_name = "ARTIFACT")]
    draft: Option<PathBuf>,
    /// Tokens the draft proposes per round.
    #[arg(long, value_name = "K", default_value_t = 4, requires = "draft")]
    speculate: usize,
    /// Threads each kernel is split across (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the logits of every prompt position as a float32 .npy of shape [prompt_len, vocab].
    #[arg(long = "logits-out", value_name = "FILE.npy", conflicts_with = "draft")]
    logits_out: Option<PathBuf>,
    /// Make the last stdout line one JSON object (the text is then not streamed).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Artifact written by `llmc compile`.
    artifact: PathBuf,
    /// Prompt length in tokens (fixed pseudo-random ids).
    #[arg(long = "prompt-len", default_value_t = 128)]
    prompt_len: usize,
    /// Use this text (tokenized) as the prompt instead of pseudo-random ids.
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate per repetition (greedy, end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    gen: usize,
    /// Timed repetitions (after one warm-up); the reported rates are their medians.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Threads each kernel is split across (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also time every kernel launch of one prefill step and one decode step (launches run one
    /// at a time) and print the time per op kind, largest first.
    #[arg(long)]
    profile: bool,
    /// Draft model: also measure speculative decoding (acceptance rate, speedup over the target
    /// alone); it runs on one thread.
    #[arg(long, value_name = "ARTIFACT")]
    draft: Option<PathBuf>,
    /// Tokens the draft proposes per round.
    #[arg(long, value_name = "K", default_value_t = 4, requires = "draft")]
    speculate: usize,
    /// CPU artifacts: also measure this machine's read bandwidth in the same run (the
    /// `bench/bw_probe` loop, before and after the timed runs, the best of 1, 2, 4, 8 and 16 read
    /// streams per thread, as many threads as the runs) and print the bytes a decode step reads
    /// per token, the decode roofline they imply and the fraction of it reached.
    #[arg(long)]
    roofline: bool,
    /// Make the last stdout line one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Compile(#[from] llmc_compiler::Error),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("{0}")]
    Usage(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let quiet = cli.quiet;
    let res = match cli.cmd {
        Cmd::Compile(a) => compile::compile(a, quiet),
        Cmd::Run(a) => run(a, quiet),
        Cmd::Bench(a) => bench(a, quiet),
        Cmd::Embed(a) => embed::embed(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::DumpIr(a) => compile::dump_ir(a),
        Cmd::Passes(a) => compile::list_passes(a),
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

/// `tracing` output on stderr, filtered by `RUST_LOG` (e.g. `RUST_LOG=info` or `llmc=debug`);
/// nothing when it is unset.
fn init_tracing() {
    let Ok(spec) = std::env::var("RUST_LOG") else { return };
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::OFF.into())
        .parse_lossy(spec);
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// A progress bar on stderr: hidden when stderr is not a terminal or with `--quiet`.
fn progress(quiet: bool, len: u64, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
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

/// The tokenizer the artifact carries, if any (parse errors are errors; absence is not).
fn maybe_tokenizer(model: &runtime::Model) -> Result<Option<Tokenizer>, CliError> {
    match model.blob(runtime::tokenizer::TOKENIZER_BLOB) {
        Some(_) => Ok(Some(Tokenizer::from_model(model)?)),
        None => Ok(None),
    }
}

/// Stop ids: the model's end-of-sequence ids unless `ignore_eos`, plus each `--stop` (an id or a
/// token string).
fn stop_ids(model: &runtime::Model, tok: Option<&Tokenizer>, extra: &[String], ignore_eos: bool) -> Result<Vec<u32>, CliError> {
    let mut stop = if ignore_eos { vec![] } else { model.eos_ids() };
    for s in extra {
        let id = match (s.parse::<u32>(), tok) {
            (Ok(id), _) => id,
            (Err(_), Some(t)) => t
                .token_to_id(s)
                .ok_or_else(|| CliError::Usage(format!("--stop: `{s}` is not a token of the vocabulary (give a single token or an id)")))?,
            (Err(_), None) => {
                return Err(CliError::Usage(format!(
                    "--stop: `{s}` is not a token id, and the artifact carries no tokenizer to look it up"
                )))
            }
        };
        if id as usize >= model.vocab_size() {
            return Err(CliError::Usage(format!("--stop: token id {id} is out of range: the vocabulary has {} tokens", model.vocab_size())));
        }
        stop.push(id);
    }
    Ok(stop)
}

fn new_session(model: &std::sync::Arc<runtime::Model>, threads: Option<usize>) -> Result<Session, CliError> {
    let n = threads.unwrap_or_else(runtime::model::default_threads);
    if n == 0 {
        return Err(CliError::Usage("--threads must be at least 1".into()));
    }
    Ok(Session::with_threads(model.clone(), n)?)
}

fn run(a: RunArgs, quiet: bool) -> Result<(), CliError> {
    let t0 = Instant::now();
    let model = runtime::Model::load(&a.artifact)?;
    info!(artifact = %a.artifact.display(), file_bytes = model.file_len(), seconds = t0.elapsed().as_secs_f64(), "artifact loaded");
    if model.meta("task") == Some("embedding") {
        return Err(CliError::Usage(format!("{} is an embedding model: use `llmc embed`", a.artifact.display())));
    }
    // A text prompt needs the tokenizer (an error says why it is missing); ids use it for `text`.
    let tok = match a.prompt {
        Some(_) => Some(Tokenizer::from_model(&model)?),
        None => maybe_tokenizer(&model)?,
    };
    let mut prompt_text = None;
    let ids = match (&a.input_ids, &a.prompt) {
        (Some(s), _) => parse_ids(s)?,
        (None, Some(text)) => {
            let t = tok.as_ref().ok_or_else(|| CliError::Usage("--prompt needs a tokenizer".into()))?;
            if a.chat {
                let tmpl = runtime::ChatTemplate::from_model(&model)?;
                let mut msgs = Vec::new();
                if let Some(sys) = &a.system {
                    msgs.push(runtime::ChatMessage::new("system", sys));
                }
                msgs.push(runtime::ChatMessage::new("user", text));
                let rendered = tmpl.render(&msgs, true)?;
                let ids = t.encode(&rendered, false)?;
                prompt_text = Some(rendered);
                ids
            } else {
                t.encode(text, true)?
            }
        }
        (None, None) => return Err(CliError::Usage("give the prompt with --input-ids or --prompt".into())),
    };
    info!(tokens = ids.len(), "prompt tokenized");
    let stop = StopConditions { max_new: a.max_new_tokens, stop: stop_ids(&model, tok.as_ref(), &a.stop, a.ignore_eos)? };
    let params = a.sampling.params();
    let mut sampler = Sampler::new(params.clone())?;
    let mut session = new_session(&model, a.threads)?;

    // Stream text to stdout when a text prompt is given and the output is not JSON.
    let stream_text = a.prompt.is_some() && !a.json;
    let mut stream = if stream_text { tok.as_ref().map(|t| t.stream(true)) } else { None };
    let mut stream_err: Option<CliError> = None;
    let mut out = std::io::stdout().lock();
    let bar = if stream_text { ProgressBar::hidden() } else { progress(quiet, a.max_new_tokens as u64, "generating [{bar:30}] {pos}/{len} tokens {per_sec}") };
    let mut on_token = |id: u32| {
        bar.inc(1);
        if let Some(s) = stream.as_mut() {
            let r = s.push(id).map_err(CliError::from).and_then(|p| {
                out.write_all(p.as_bytes())?;
                out.flush()?;
                Ok(())
            });
            if let (Err(e), None) = (r, &stream_err) {
                stream_err = Some(e);
            }
        }
    };
    let mut spec_json = serde_json::Value::Null;
    let (new, logits, st) = match &a.draft {
        None => runtime::generate(&mut session, &ids, &stop, &mut sampler, a.logits_out.is_some(), &mut on_token)?,
        Some(draft_path) => {
            let draft = runtime::Model::load(draft_path)?;
            let mut dsession = new_session(&draft, Some(1))?;
            let (new, sst) = runtime::generate_speculative(&mut session, &mut dsession, &ids, a.speculate, &stop, &mut sampler, &mut on_token)?;
            info!(rounds = sst.rounds, proposed = sst.proposed, accepted = sst.accepted, "speculative decoding done");
            spec_json = serde_json::json!({
                "draft": draft_path.display().to_string(), "k": a.speculate, "rounds": sst.rounds,
                "proposed": sst.proposed, "accepted": sst.accepted, "acceptance_rate": sst.acceptance_rate(),
                "tokens_per_round": sst.tokens_per_round(),
            });
            (new, None, sst.generate)
        }
    };
    bar.finish_and_clear();
    info!(generated = new.len(), prefill_seconds = st.prefill_seconds, decode_seconds = st.decode_seconds, "generation done");
    if let Some(e) = stream_err {
        return Err(e);
    }
    if let Some(s) = stream.as_mut() {
        out.write_all(s.finish()?.as_bytes())?;
        writeln!(out)?;
    }
    if let (Some(path), Some(l)) = (&a.logits_out, &logits) {
        runtime::npy::write_f32(path, &[ids.len(), model.vocab_size()], l)?;
    }
    let stop_reason = match new.last() {
        Some(t) if stop.stop.contains(t) => "stop_token",
        _ => "max_new_tokens",
    };
    if a.json {
        let text = match &tok {
            Some(t) => serde_json::Value::from(t.decode(&new, true)?),
            None => serde_json::Value::Null,
        };
        let j = serde_json::json!({
            "prompt_ids": ids, "generated_ids": new,
            "prompt_tokens": st.prompt_tokens, "generated_tokens": st.generated_tokens,
            "prefill_seconds": st.prefill_seconds, "decode_seconds": st.decode_seconds,
            "prefill_tokens_per_s": st.prefill_tokens_per_s(), "decode_tokens_per_s": st.decode_tokens_per_s(),
            "text": text, "prompt_text": prompt_text, "stop_reason": stop_reason, "threads": session.threads(),
            "sampling": {
                "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "repetition_penalty": params.repetition_penalty,
                "seed": if params.is_greedy() { None } else { Some(params.seed) },
            },
            "speculative": spec_json,
        });
        writeln!(out, "{j}")?;
    } else {
        if !stream_text {
            let s: Vec<String> = new.iter().map(|i| i.to_string()).collect();
            writeln!(out, "{}", s.join(","))?;
        }
        if !quiet {
            // The first new token comes from the prefill's logits: N tokens are N - 1 decode steps.
            let decode = match st.generated_tokens {
                0 => "no token generated".to_string(),
                1 => "1 token generated (from the prefill; no decode step)".to_string(),
                n => format!("decode {n} tokens at {:.1} tok/s", st.decode_tokens_per_s()),
            };
            eprintln!("prefill {} tokens at {:.1} tok/s, {decode}", st.prompt_tokens, st.prefill_tokens_per_s());
            if !spec_json.is_null() {
                eprintln!(
                    "speculative: {} of {} drafted tokens accepted ({:.0}%), {:.2} tokens per target step",
                    spec_json["accepted"], spec_json["proposed"],
                    100.0 * spec_json["acceptance_rate"].as_f64().unwrap_or(0.0),
                    spec_json["tokens_per_round"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Peak resident memory of this process (`VmHWM` in /proc/self/status), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn bench(a: BenchArgs, quiet: bool) -> Result<(), CliError> {
    if a.reps == 0 || a.gen == 0 {
        return Err(CliError::Usage("--reps and --gen must be at least 1".into()));
    }
    let model = runtime::Model::load(&a.artifact)?;
    let prompt: Vec<u32> = match &a.prompt {
        Some(text) => Tokenizer::from_model(&model)?.encode(text, true)?,
        None => {
            if a.prompt_len == 0 {
                return Err(CliError::Usage("--prompt-len must be at least 1".into()));
            }
            let mut rng = runtime::sample::Pcg32::new(a.prompt_len as u64, 1);
            (0..a.prompt_len).map(|_| rng.next_u32() % model.vocab_size() as u32).collect()
        }
    };
    let needed = prompt.len() + a.gen - 1;
    if needed > model.max_context() {
        return Err(CliError::Usage(format!(
            "--prompt-len {} plus --gen {} do not fit the compiled context of {} tokens",
            prompt.len(), a.gen, model.max_context()
        )));
    }
    let stop = StopConditions { max_new: a.gen, stop: vec![] };
    let mut session = new_session(&model, a.threads)?;
    let draft = match &a.draft {
        Some(p) => {
            let d = runtime::Model::load(p)?;
            let s = new_session(&d, Some(1))?;
            Some(s)
        }
        None => None,
    };
    // The probe's buffers (256 MiB a thread) are freed when it returns; the peak-memory figure
    // is the model's own: the high-water mark is reset after the first probe and read before the
    // second.
    let probe_threads = session.threads();
    let probe = || {
        let p = runtime::bandwidth::probe(probe_threads, runtime::bandwidth::DEFAULT_BYTES_PER_THREAD, 3);
        let _ = std::fs::write("/proc/self/clear_refs", "5"); // VmHWM := VmRSS (Linux)
        p
    };
    if a.roofline && model.gpu_device().is_some() && !quiet {
        eprintln!("note: --roofline measures host memory for CPU artifacts; for this CUDA artifact the HBM roofline below is the one that applies");
    }
    let probe_first = (a.roofline && model.gpu_device().is_none()).then(probe);
    let runs = a.reps + 1;
    let total = runs * if draft.is_some() { 2 } else { 1 };
    let bar = progress(quiet, total as u64, "benchmarking [{bar:30}] {pos}/{len} runs {elapsed}");
    let (mut prefill, mut decode) = (vec![], vec![]);
    let mut plain_ids = vec![];
    for rep in 0..runs {
        session.reset();
        let (ids, _, st) = runtime::generate(&mut session, &prompt, &stop, &mut Sampler::greedy(), false, |_| {})?;
        bar.inc(1);
        info!(rep, prefill_tokens_per_s = st.prefill_tokens_per_s(), decode_tokens_per_s = st.decode_tokens_per_s(), "bench run");
        if rep > 0 {
            prefill.push(st.prefill_tokens_per_s());
            decode.push(st.decode_tokens_per_s());
        }
        plain_ids = ids;
    }
    let (p_med, d_med) = (median(&prefill), median(&decode));
    let peak_before_probe = peak_rss_bytes();
    let probe_last = probe_first.as_ref().map(|_| probe());
    let mut profile_lines = vec![];
    if a.profile {
        let chunk = model.header().max_chunk as usize;
        session.reset();
        let mut fill = vec![];
        for part in prompt.chunks(chunk) {
            fill.extend(session.profile_step(part)?);
        }
        let dec = session.profile_step(&plain_ids[..1])?;
        for (what, steps) in [("prefill", fill), ("decode", dec)] {
            let total: f64 = steps.iter().map(|s| s.2).sum();
            let mut by: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
            for (_, kernel, t) in &steps {
                let op = kernel.rsplit_once('_').map_or(kernel.as_str(), |(o, _)| o).to_string();
                let e = by.entry(op).or_default();
                e.0 += t;
                e.1 += 1;
            }
            let mut v: Vec<_> = by.into_iter().collect();
            v.sort_by(|x, y| y.1 .0.total_cmp(&x.1 .0));
            profile_lines.push(format!("profile {what}: {:.2} ms over {} launches", total * 1e3, steps.len()));
            for (op, (t, n)) in v {
                profile_lines.push(format!("  {op:<16} {:>8.3} ms {:>5.1}%  ({n} launches)", t * 1e3, 100.0 * t / total));
            }
        }
    }
    let mut spec = serde_json::Value::Null;
    if let Some(mut dsession) = draft {
        let mut sdecode = vec![];
        let mut last = None;
        for rep in 0..runs {
            let (ids, sst) = runtime::generate_speculative(&mut session, &mut dsession, &prompt, a.speculate, &stop, &mut Sampler::greedy(), |_| {})?;
            bar.inc(1);
            if rep > 0 {
                sdecode.push(sst.generate.decode_tokens_per_s());
            }
            last = Some((ids, sst));
        }
        let (ids, sst) = last.expect("at least one run");
        let s_med = median(&sdecode);
        spec = serde_json::json!({
            "draft": a.draft.as_ref().map(|p| p.display().to_string()), "k": a.speculate,
            "acceptance_rate": sst.acceptance_rate(), "tokens_per_round": sst.tokens_per_round(),
            "decode_tokens_per_s": s_med, "speedup": if d_med > 0.0 { s_med / d_med } else { 0.0 },
            "identical_output": ids == plain_ids,
        });
    }
    bar.finish_and_clear();
    let peak = match (peak_before_probe, peak_rss_bytes()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: prompt {} tokens, {} generated, {} threads, median of {} runs",
        a.artifact.display(), prompt.len(), a.gen, session.threads(), a.reps
    )?;
    writeln!(out, "prefill  {p_med:>10.1} tokens/s")?;
    writeln!(out, "decode   {d_med:>10.1} tokens/s")?;
    for l in &profile_lines {
        writeln!(out, "{l}")?;
    }
    if let Some(p) = peak {
        writeln!(out, "peak memory {:.1} MiB (VmHWM)", p as f64 / 1048576.0)?;
    }
    if !spec.is_null() {
        writeln!(
            out,
            "speculative (k={}): acceptance {:.1}%, {:.2} tokens per target step, decode {:.1} tokens/s, speedup {:.2}x, output {}",
            a.speculate,
            100.0 * spec["acceptance_rate"].as_f64().unwrap_or(0.0),
            spec["tokens_per_round"].as_f64().unwrap_or(0.0),
            spec["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            spec["speedup"].as_f64().unwrap_or(0.0),
            if spec["identical_output"] == true { "identical to the target alone" } else { "DIFFERS from the target alone" },
        )?;
    }
    // Decode is bound by reading the weights and the KV cache once per token: the roofline is
    // the read bandwidth over those bytes (KV at the run's mean context).
    let per_token = runtime::bandwidth::decode_read_bytes(model.header(), prompt.len() as f64 + a.gen as f64 / 2.0);
    let mut cpu_roof = serde_json::Value::Null;
    if let (Some(first), Some(last)) = (&probe_first, &probe_last) {
        let (b0, b1) = (first.best(), last.best());
        let best = if b1.bytes_per_s > b0.bytes_per_s { b1 } else { b0 };
        let roof = best.bytes_per_s / per_token.max(1.0);
        let cpu = runtime::bandwidth::cpu_name();
        writeln!(
            out,
            "read bandwidth {:.1} GB/s ({} threads, best of 1/2/4/8/16 streams per thread: {} streams; {:.1} GB/s before the runs, {:.1} after) on {}",
            best.bytes_per_s / 1e9, first.threads, best.streams, b0.bytes_per_s / 1e9, b1.bytes_per_s / 1e9, cpu
        )?;
        writeln!(
            out,
            "roofline (decode) {roof:>10.1} tokens/s: {:.2} MiB read per token; measured {d_med:.1} tokens/s = {:.1}% of roofline",
            per_token / 1048576.0, 100.0 * d_med / roof.max(1e-9)
        )?;
        cpu_roof = serde_json::json!({
            "cpu": cpu, "read_bytes_per_s": best.bytes_per_s, "best_streams": best.streams,
            "read_bytes_per_s_before": b0.bytes_per_s, "read_bytes_per_s_after": b1.bytes_per_s,
            "bytes_per_decode_token": per_token, "roofline_decode_tokens_per_s": roof,
            "fraction_of_roofline": d_med / roof.max(1e-9),
        });
    }
    let mut gpu = serde_json::Value::Null;
    if let Some((device, arch)) = model.gpu_device() {
        let bw = model.gpu_peak_bandwidth();
        let roof = bw.map(|b| b / per_token.max(1.0));
        match (bw, roof) {
            (Some(b), Some(r)) => writeln!(
                out,
                "HBM roofline (decode) {r:>10.1} tokens/s: {:.1} MiB read per token at {:.0} GB/s peak on {device} ({arch}); measured {d_med:.1} tokens/s = {:.1}% of roofline",
                per_token / 1048576.0, b / 1e9, 100.0 * d_med / r
            )?,
            _ => writeln!(out, "HBM roofline (decode): the driver does not report {device}'s memory bandwidth")?,
        }
        gpu = serde_json::json!({
            "device": device, "arch": arch, "peak_bandwidth_bytes_per_s": bw, "bytes_per_decode_token": per_token,
            "roofline_decode_tokens_per_s": roof,
        });
    }
    if a.json {
        let mut j = serde_json::json!({
            "artifact": a.artifact.display().to_string(), "prompt_tokens": prompt.len(), "gen_tokens": a.gen,
            "reps": a.reps, "threads": session.threads(),
            "prefill_tokens_per_s": p_med, "decode_tokens_per_s": d_med,
            "prefill_tokens_per_s_runs": prefill, "decode_tokens_per_s_runs": decode,
            "peak_rss_bytes": peak, "speculative": spec,
        });
        if !gpu.is_null() {
            j["gpu"] = gpu;
        }
        if !cpu_roof.is_null() {
            j["roofline"] = cpu_roof;
        }
        writeln!(out, "{j}")?;
    }
    Ok(())
}
