//! The passes crate's error type: one enum, every variant naming the pass, flag or file at fault.

use std::path::PathBuf;

use llmc_ir::IrError;
use thiserror::Error;

/// Everything that can go wrong while building or running a pipeline.
#[derive(Debug, Error)]
pub enum PassError {
    /// A pipeline names a pass the registry does not have.
    #[error("unknown pass `{name}`; known passes: {known}")]
    UnknownPass { name: String, known: String },
    /// `--print-ir-after` names a pass that is unknown or not in the pipeline.
    #[error("--print-ir-after names `{name}`, {why}")]
    PrintAfter { name: String, why: String },
    /// The graph handed to the pipeline fails the verifier before any pass ran.
    #[error("input graph fails verification (before any pass): {source}")]
    InvalidInput {
        #[source]
        source: IrError,
    },
    /// The verifier rejected the graph a pass produced: a bug in that pass.
    #[error("verifier failed after pass `{pass}`: {source}")]
    Verify {
        pass: String,
        #[source]
        source: IrError,
    },
    /// A pass itself returned an error.
    #[error("pass `{pass}` failed: {source}")]
    Pass {
        pass: String,
        #[source]
        source: Box<PassError>,
    },
    /// An IR-level failure inside a pass (cycle found, interpreter error while folding, ...).
    #[error(transparent)]
    Ir(#[from] IrError),
    /// Writing a `--dump-ir` file (or creating its directory) failed.
    #[error("cannot write `{}`: {source}", path.display())]
    Dump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The e-graph optimizer (`optimize`) failed: an unsound rule (a type conflict), an `--explain`
    /// value that does not exist, or an internal inconsistency; the message says which.
    #[error("optimize: {0}")]
    Optimize(String),
    /// A bad `--quant` format or an impossible quantization request.
    #[error("quantize: {0}")]
    Quant(String),
    /// Writing `--print-ir-after` or statistics output failed.
    #[error("cannot write pass output: {0}")]
    Output(#[source] std::io::Error),
}

pub type Result<T, E = PassError> = std::result::Result<T, E>;
