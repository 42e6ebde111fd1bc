//! The error type of the artifact and packed-weight formats.

use std::path::PathBuf;

use thiserror::Error;

use crate::qformat::QFormat;

/// What can be wrong with an artifact (reading, verifying, writing) or a packed weight row.
/// Every variant names the file or the row it is about.
#[derive(Debug, Error)]
pub enum AbiError {
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
    #[error("{path}: artifact needs CPU feature `{feature}`, which this CPU lacks")]
    CpuFeature { path: PathBuf, feature: String },
    /// The writer could not serialize a header or it outgrew the space reserved for it (a bug in
    /// the producer).
    #[error("{0}")]
    Header(String),
    /// A packed row whose parts or bytes do not fit its format (a bug in the producer, or a
    /// format the row kernels cannot read).
    #[error("packed {format} row of {k} elements: {msg}")]
    Row { format: QFormat, k: usize, msg: String },
}

pub type Result<T, E = AbiError> = std::result::Result<T, E>;
