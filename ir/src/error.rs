//! The IR crate's error type.

use thiserror::Error;

/// Everything that can go wrong while building, checking, parsing or interpreting a graph.
#[derive(Debug, Error)]
pub enum IrError {
    /// Text IR that does not parse; `line` is 1-based.
    #[error("parse error at line {line}: {msg}")]
    Parse { line: usize, msg: String },
    /// Operand types an op does not accept.
    #[error("type error in `{op}`: {msg}")]
    Type { op: String, msg: String },
    /// A graph that breaks an invariant; `node` is the printed value name (`%12`).
    #[error("verifier: {node}: {msg}")]
    Verify { node: String, msg: String },
    /// A runtime failure of the reference interpreter (bad input ids, missing weight, ...).
    #[error("interpreter: {0}")]
    Interp(String),
    /// A weight the graph references could not be produced by its source.
    #[error("weight `{name}`: {msg}")]
    Weight { name: String, msg: String },
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;

pub(crate) fn type_err(op: &str, msg: impl Into<String>) -> IrError {
    IrError::Type { op: op.to_string(), msg: msg.into() }
}
