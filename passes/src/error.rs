//! The passes crate's error type: one enum, every variant naming the pass, flag or file at fault.

use std::path::PathBuf;

use llmc_ir::IrError;
use thiserror::Error;

/// Everything that can go wrong while building or running a pipeline.
#[derive(Debug, Error)]
pub enum PassError {
    /// A pipeline spec that does not follow the grammar (`crate::pipeline`): an unbalanced brace,
    /// an option without a value, an unquoted value holding `,`, ...; `column` is 1-based.
    #[error("pipeline `{pipeline}`, column {column}: {why}")]
    Syntax { pipeline: String, column: usize, why: String },
    /// A pipeline names a pass the registry does not have.
    #[error("unknown pass `{name}`; known passes: {known}")]
    UnknownPass { name: String, known: String },
    /// A pipeline entry gives an option its pass does not declare; `known` lists the declared
    /// ones with their values (`its options: target=cpu|cuda, ...`).
    #[error("pass `{pass}` has no option `{option}`; {known}")]
    UnknownOption { pass: String, option: String, known: String },
    /// A pipeline entry gives an option a value the pass rejects.
    #[error("pass `{pass}`, option `{option}={value}`: {why} (allowed: {allowed})")]
    BadOption { pass: String, option: String, value: String, why: String, allowed: String },
    /// A pipeline entry's options as a whole are wrong (a required one missing, two that do not
    /// combine, one given twice).
    #[error("pass `{pass}`: {why}")]
    PassOptions { pass: String, why: String },
    /// A target with no cost model (`--target`, `optimize{target=...}`).
    #[error("no cost model for target `{name}` (known: cpu, cuda)")]
    UnknownTarget { name: String },
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
