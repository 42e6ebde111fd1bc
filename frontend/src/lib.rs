//! llmc's frontend: a Hugging Face checkpoint (safetensors + `config.json`) to an llmc IR graph.
//!
//! In processing order: [`checkpoint`] maps the safetensors shards and indexes their tensors,
//! [`config`] reads `config.json` with checked fields, and one module per architecture family
//! ([`llama`]: Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, Mixtral; [`gpt2`]; [`neox`]: GPT-NeoX;
//! [`bert`]: BERT encoders) validates every tensor it uses against the shapes the config implies
//! and then emits the forward step as primitive ops (norms, attention and MLPs spelled out; the
//! optimizer fuses them later). See docs/architectures.md for what each supports. Weights stay in the checkpoint: the graph refers to them by name
//! and [`Checkpoint`] supplies them through [`llmc_ir::WeightSource`].

pub mod bert;
mod builder;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gpt2;
pub mod llama;
pub mod neox;

use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, TensorInfo};
pub use error::{FrontendError, Result};

/// The architectures (`config.json`'s `architectures[0]`) llmc compiles.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Phi3ForCausalLM",
    "MixtralForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "BertModel",
];

/// Frontend settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Cap on the compiled context (KV-cache rows). The context is
    /// `min(cap, max_position_embeddings)`, with cap 4096 when unset.
    pub max_context: Option<usize>,
}

/// A loaded model: its graph and the checkpoint that supplies the graph's weights.
#[derive(Debug)]
pub struct Model {
    pub graph: llmc_ir::Graph,
    pub checkpoint: Checkpoint,
    pub config: serde_json::Value,
    /// The directory holding `config.json` (a `tokenizer.json` may be beside it).
    pub dir: PathBuf,
}

/// Reads `config.json` as JSON.
pub fn read_config(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FrontendError::NotFound { path: path.to_path_buf() }
        } else {
            FrontendError::Io { path: path.to_path_buf(), source }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| FrontendError::ConfigNotJson { path: path.to_path_buf(), msg: e.to_string() })
}

/// Builds the graph for an already opened checkpoint and its parsed config.
pub fn build_graph(config: &serde_json::Value, checkpoint: &Checkpoint, opts: &Options) -> Result<llmc_ir::Graph> {
    match config::architecture(config)? {
        "GPT2LMHeadModel" => gpt2::build(config, checkpoint, opts),
        "GPTNeoXForCausalLM" => neox::build(config, checkpoint, opts),
        "BertModel" => bert::build(config, checkpoint, opts),
        name if llama::Family::from_architecture(name).is_some() => llama::build(config, checkpoint, opts),
        other => Err(FrontendError::UnsupportedArchitecture { name: other.to_string() }),
    }
}

/// Loads the model at `path`: a directory, a `.safetensors` file with `config.json` beside it, or a
/// `model.safetensors.index.json`.
pub fn load(path: &Path, opts: &Options) -> Result<Model> {
    let (checkpoint, config_path) = Checkpoint::open(path)?;
    let config = read_config(&config_path)?;
    let mut graph = build_graph(&config, &checkpoint, opts)?;
    let dir = config_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    if config::architecture(&config)? == "BertModel" {
        // Pooling and normalization as the sentence-transformers files beside config.json say.
        let context = graph.meta.get("max_context").and_then(|c| c.parse().ok()).unwrap_or(usize::MAX);
        for (k, v) in bert::SentenceSettings::read(&dir, context)?.meta() {
            graph.meta.insert(k, v);
        }
    }
    Ok(Model { graph, checkpoint, config, dir })
}
