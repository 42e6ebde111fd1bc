//! The runtime's error type.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is not an llmc artifact, or its structure is damaged.
    #[error("{path}: corrupt artifact: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    /// A checksum did not match: the named section was modified or truncated.
    #[error("{path}: corrupt artifact: checksum mismatch in the {section} section")]
    Checksum { path: PathBuf, section: &'static str },
    #[error("{path}: artifact format version {found}, this runtime reads version {expected}")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("{path}: artifact was compiled for target `{target}`, which this runtime cannot run")]
    Target { path: PathBuf, target: String },
    /// A CUDA artifact cannot run here (no `cuda` feature in this build, no driver, no GPU).
    #[error("{path}: cannot run this CUDA artifact: {msg}")]
    Gpu { path: PathBuf, msg: String },
    #[error("{path}: artifact needs CPU feature `{feature}`, which this CPU lacks")]
    CpuFeature { path: PathBuf, feature: String },
    #[error("token id {id} at position {index} is out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange { id: i64, index: usize, vocab: usize },
    #[error("{needed} tokens do not fit the compiled context of {max_context} tokens")]
    ContextOverflow { needed: usize, max_context: usize },
    #[error("empty input: at least one token id is needed")]
    EmptyInput,
    /// Text could not be tokenized or decoded, the artifact carries no tokenizer, or a chat
    /// template failed; the message names what.
    #[error("{0}")]
    Tokenizer(String),
    /// A caller-supplied setting is out of range (a sampling parameter, a speculation length);
    /// the message names the setting.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// The format's errors as the runtime's, variant for variant (the same messages).
impl From<llmc_abi::AbiError> for RuntimeError {
    fn from(e: llmc_abi::AbiError) -> Self {
        use llmc_abi::AbiError as A;
        match e {
            A::Io { path, source } => RuntimeError::Io { path, source },
            A::Corrupt { path, msg } => RuntimeError::Corrupt { path, msg },
            A::Checksum { path, section } => RuntimeError::Checksum { path, section },
            A::Version { path, found, expected } => RuntimeError::Version { path, found, expected },
            A::Target { path, target } => RuntimeError::Target { path, target },
            A::CpuFeature { path, feature } => RuntimeError::CpuFeature { path, feature },
            e @ (A::Header(_) | A::Row { .. }) => RuntimeError::Other(e.to_string()),
        }
    }
}
