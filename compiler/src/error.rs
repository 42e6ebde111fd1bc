//! The compiler library's error type: the frontend's, the passes', codegen's and the runtime's
//! errors wrapped transparently (their messages unchanged), plus the library's own: invalid
//! options, files it reads or writes itself, calibration and `Emit::Lib` failures.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in [`crate::compile`], [`crate::dump_ir`] and their helpers.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Frontend(#[from] llmc_frontend::FrontendError),
    #[error(transparent)]
    Pass(#[from] llmc_passes::PassError),
    #[error(transparent)]
    Codegen(#[from] llmc_codegen::CodegenError),
    /// The tokenizer (tokenizer.json at compile time, calibration text) or the artifact format.
    #[error(transparent)]
    Runtime(#[from] llmc_runtime::RuntimeError),
    /// The reference interpreter failed during calibration (or another IR-level failure).
    #[error(transparent)]
    Ir(#[from] llmc_ir::IrError),
    /// An invalid option or combination of options in a [`crate::CompileConfig`]; the message
    /// names the option by its command-line flag (`--keep-fp needs --quant or --sparsity`).
    #[error("{0}")]
    Config(String),
    /// Calibration or quantization failed (GPTQ on a layout it does not apply to, a Hessian that
    /// is not positive definite).
    #[error("quantize: {0}")]
    Quant(String),
    /// An input beside the checkpoint is unusable (calibration text, a JSON file such as
    /// generation_config.json); the message names the file.
    #[error("{0}")]
    Input(String),
    /// A file or directory the library reads or creates itself (the `Emit::Lib` output directory).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `Emit::Lib` could not find the runtime library or write the static library or header.
    #[error("{0}")]
    Library(String),
    /// Writing IR text (or another report) to the caller's writer failed.
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
}

/// The compiler library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
