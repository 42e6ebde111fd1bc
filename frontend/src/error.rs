//! The frontend's error type. Every variant names what was wrong: the file, the config field, the
//! tensor, the architecture — so a user can fix the checkpoint without reading llmc's source.

use std::path::PathBuf;

use thiserror::Error;

use crate::SUPPORTED_ARCHITECTURES;

/// Everything that can go wrong while reading a checkpoint and building its graph.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// The model path (or a file it implies, such as `model.safetensors`) does not exist.
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },
    /// Reading or mapping a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model directory has no `config.json`.
    #[error("{}: no config.json in this directory", dir.display())]
    MissingConfig { dir: PathBuf },
    /// `config.json` (or an index file) is not valid JSON.
    #[error("{}: not valid JSON: {msg}", path.display())]
    ConfigNotJson { path: PathBuf, msg: String },
    /// A config field is missing, of the wrong type, or out of range.
    #[error("config.json: `{field}`: {msg}")]
    ConfigField { field: String, msg: String },
    /// The config names an architecture llmc cannot compile.
    #[error("unsupported architecture `{name}` (supported: {})", SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture { name: String },
    /// A safetensors file whose header or data is invalid or truncated.
    #[error("{}: invalid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    /// A sharded index (`model.safetensors.index.json`) that is malformed or disagrees with its shards.
    #[error("{}: invalid safetensors index: {msg}", index.display())]
    InvalidIndex { index: PathBuf, msg: String },
    /// A sharded index names a shard file that does not exist.
    #[error("{}: weight_map names shard {}, which does not exist", index.display(), shard.display())]
    MissingShard { index: PathBuf, shard: PathBuf },
    /// A tensor the graph needs is not in the checkpoint.
    #[error("tensor `{name}` not found in the checkpoint")]
    MissingTensor { name: String },
    /// A tensor's shape disagrees with the shape the config implies.
    #[error("tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor stored in an element type other than F32, F16 or BF16.
    #[error("tensor `{name}` has dtype {dtype}; supported dtypes are F32, F16 and BF16")]
    UnsupportedDtype { name: String, dtype: String },
    /// A tensor read asked for a different element count than the tensor holds.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// A sentence-transformers file beside `config.json` (`modules.json`, a Pooling config) that
    /// llmc cannot follow.
    #[error("{}: {msg}", path.display())]
    SentenceConfig { path: PathBuf, msg: String },
    /// An invalid frontend option (for example `max_context = 0`).
    #[error("option `{name}`: {msg}")]
    InvalidOption { name: String, msg: String },
    /// Building the graph failed a type check: a bug in the frontend, reported rather than panicking.
    #[error("building the graph: {0}")]
    Ir(#[from] llmc_ir::IrError),
}

pub type Result<T, E = FrontendError> = std::result::Result<T, E>;

/// A config-field error.
pub(crate) fn field_err(field: &str, msg: impl Into<String>) -> FrontendError {
    FrontendError::ConfigField { field: field.to_string(), msg: msg.into() }
}
