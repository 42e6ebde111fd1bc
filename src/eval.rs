//! `llmc eval`: perplexity of an artifact on a text file, measured as `models/seedlm/README.md`
//! describes `train_info.json`'s figure: the text tokenized with the artifact's tokenizer
//! (special tokens as the tokenizer adds them), its first `--max-tokens` ids cut into windows of
//! `--window` tokens, each window run from an empty cache, the loss taken over positions
//! `1..window` (every token predicted from the ones before it in its window). With `--reference`,
//! the same positions are compared with another artifact's logits: mean KL(reference || this) and
//! top-1 agreement. Quantization error is measured here; kernel exactness is a codegen test.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use llmc_runtime as runtime;
use runtime::Tokenizer;

use crate::{new_session, CliError};

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Artifact to evaluate (compiled with its tokenizer).
    artifact: PathBuf,
    /// Text file to measure perplexity on.
    #[arg(long)]
    text: PathBuf,
    /// Artifact to compare logits with (usually the f32 compile of the same checkpoint).
    #[arg(long, value_name = "F32_ARTIFACT")]
    reference: Option<PathBuf>,
    /// Use at most this many tokens of the text.
    #[arg(long = "max-tokens", default_value_t = 8192)]
    max_tokens: usize,
    /// Tokens per window (each window starts from an empty KV cache).
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Threads each kernel is split across (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Make the last stdout line one JSON object {"perplexity", "nll", "tokens", "windows", ...}.
    #[arg(long)]
    json: bool,
}

/// log-softmax of one row of logits, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

pub(crate) fn eval(a: EvalArgs) -> Result<(), CliError> {
    if a.window < 2 {
        return Err(CliError::Usage("--window must be at least 2".into()));
    }
    let model = runtime::Model::load(&a.artifact)?;
    let text = std::fs::read_to_string(&a.text).map_err(|e| CliError::Usage(format!("{}: {e}", a.text.display())))?;
    let tok = Tokenizer::from_model(&model)?;
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(a.max_tokens);
    let windows = ids.len() / a.window;
    if windows == 0 {
        return Err(CliError::Usage(format!(
            "{}: {} tokens, fewer than one window of {}",
            a.text.display(),
            ids.len(),
            a.window
        )));
    }
    let reference = match &a.reference {
        Some(p) => {
            let r = runtime::Model::load(p)?;
            if r.vocab_size() != model.vocab_size() {
                return Err(CliError::Usage(format!(
                    "--reference {}: vocabulary {} differs from {}",
                    p.display(),
                    r.vocab_size(),
                    model.vocab_size()
                )));
            }
            Some(new_session(&r, a.threads)?)
        }
        None => None,
    };
    let mut reference = reference;
    let mut sess = new_session(&model, a.threads)?;
    let vocab = model.vocab_size();
    let t0 = Instant::now();
    let (mut nll, mut kl, mut agree, mut count) = (0.0f64, 0.0f64, 0u64, 0u64);
    for w in ids.chunks_exact(a.window) {
        sess.reset();
        let logits = sess.forward(w, true)?;
        let ref_logits = match &mut reference {
            Some(r) => {
                r.reset();
                Some(r.forward(w, true)?)
            }
            None => None,
        };
        for j in 1..w.len() {
            let row = &logits[(j - 1) * vocab..j * vocab];
            let lp = log_softmax(row);
            nll -= lp[w[j] as usize];
            if let Some(rl) = &ref_logits {
                let rrow = &rl[(j - 1) * vocab..j * vocab];
                let rp = log_softmax(rrow);
                kl += rp.iter().zip(&lp).map(|(&r, &q)| r.exp() * (r - q)).sum::<f64>();
                agree += (argmax(rrow) == argmax(row)) as u64;
            }
            count += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let params: Option<u64> = model.meta("params").and_then(|p| p.parse().ok());
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut j = serde_json::json!({
            "perplexity": ppl, "nll": mean, "tokens": ids.len(), "windows": windows, "predicted": count,
            "file_bytes": model.file_len(), "seconds": seconds,
        });
        if let Some(p) = params {
            j["params"] = p.into();
        }
        if reference.is_some() {
            j["kl"] = (kl / count as f64).into();
            j["top1_agreement"] = (agree as f64 / count as f64).into();
        }
        writeln!(out, "{j}")?;
    } else {
        writeln!(
            out,
            "perplexity {ppl:.4} (mean nll {mean:.5}) over {count} predictions in {windows} windows of {}",
            a.window
        )?;
        if reference.is_some() {
            writeln!(
                out,
                "vs reference: mean KL {:.6}, top-1 agreement {:.4}",
                kl / count as f64,
                agree as f64 / count as f64
            )?;
        }
        writeln!(out, "artifact {} bytes, {seconds:.1} s", model.file_len())?;
    }
    Ok(())
}
