//! `llmc embed`: sentence vectors from an encoder artifact (a compiled `BertModel`), pooled and
//! normalized as the checkpoint's sentence-transformers configuration says (see
//! `llmc_runtime::embed`). Text is tokenized with the artifact's tokenizer, without padding and
//! truncated to the model's `max_seq_length`, as sentence-transformers does.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use llmc_runtime as runtime;
use runtime::embed::{embed as embed_ids, EmbeddingSpec};
use runtime::Tokenizer;

use crate::{new_session, parse_ids, CliError};

#[derive(Args)]
pub(crate) struct EmbedArgs {
    /// Artifact compiled from an encoder checkpoint (BertModel).
    artifact: PathBuf,
    /// Text to embed; repeat for several texts (one vector each).
    #[arg(long, required_unless_present = "input_ids", conflicts_with = "input_ids")]
    text: Vec<String>,
    /// Token ids (special tokens included, e.g. [CLS] ... [SEP]), comma-separated, instead of text.
    #[arg(long = "input-ids", value_name = "IDS")]
    input_ids: Option<String>,
    /// Threads each kernel is split across (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Make the last stdout line one JSON object {"embeddings": [[..], ..], "dim", "pooling",
    /// "normalized", "tokens", "seconds"}; otherwise one line of comma-separated floats per text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn embed(a: EmbedArgs) -> Result<(), CliError> {
    let model = runtime::Model::load(&a.artifact)?;
    let spec = EmbeddingSpec::of(&model)?;
    let inputs: Vec<Vec<u32>> = match &a.input_ids {
        Some(s) => vec![parse_ids(s)?],
        None => {
            let tok = Tokenizer::from_model(&model)?;
            a.text.iter().map(|t| tok.encode_unpadded(t, spec.max_seq_length)).collect::<Result<_, _>>()?
        }
    };
    let mut session = new_session(&model, a.threads)?;
    let t0 = Instant::now();
    let vectors: Vec<Vec<f32>> = inputs.iter().map(|ids| embed_ids(&mut session, ids)).collect::<Result<_, _>>()?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    if a.json {
        let j = serde_json::json!({
            "embeddings": vectors,
            "dim": spec.dim,
            "pooling": model.meta("pooling").unwrap_or("mean"),
            "normalized": spec.normalize,
            "tokens": inputs.iter().map(Vec::len).collect::<Vec<_>>(),
            "seconds": seconds,
        });
        writeln!(out, "{j}")?;
    } else {
        for v in &vectors {
            let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            writeln!(out, "{}", s.join(","))?;
        }
    }
    Ok(())
}
