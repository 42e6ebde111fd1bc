//! The codegen crate's error type.

use thiserror::Error;

/// Everything that can go wrong while compiling a graph to an artifact.
#[derive(Debug, Error)]
pub enum CodegenError {
    /// A node this backend cannot compile as given; `node` is the op name and node index.
    #[error("codegen: {node}: {msg}")]
    Unsupported { node: String, msg: String },
    /// A graph, target or option this backend does not support; the message names it.
    #[error("{0}")]
    Target(String),
    /// Cranelift rejected a generated kernel (a bug in llmc).
    #[error("codegen: kernel `{kernel}`: cranelift: {msg}")]
    Cranelift { kernel: String, msg: String },
    /// MLIR rejected or could not lower a generated GPU kernel (a bug in llmc); `msg` carries
    /// MLIR's diagnostics.
    #[error("codegen: kernel `{kernel}`: mlir: {msg}")]
    Mlir { kernel: String, msg: String },
    /// The host (or requested) instruction set cannot run generated code.
    #[error("codegen: target ISA: {0}")]
    Isa(String),
    #[error(transparent)]
    Ir(#[from] llmc_ir::IrError),
    /// Writing the artifact or packing a weight failed (the error names the file or the row).
    #[error(transparent)]
    Abi(#[from] llmc_abi::AbiError),
}

pub type Result<T, E = CodegenError> = std::result::Result<T, E>;
