//! llmc's compile pipeline as a library, in the manner of Cranelift's `Context::compile`: the
//! `llmc` command line turns its flags into a [`CompileConfig`], calls [`compile`], draws
//! progress from the [`Progress`] events and prints the [`CompileReport`]; tests and other tools
//! call the same function.
//!
//! The phases of [`compile`], in order:
//! 1. validation of the [`CompileConfig`] ([`CompileConfig::validate`]), before any file is read;
//! 2. loading the checkpoint (`llmc-frontend`) and the pass pipeline (`llmc-passes`, with the
//!    compile target in its context and the `quantize{...}` entry that [`QuantConfig`]'s format
//!    options spell appended), printing or dumping IR as [`PipelineConfig`] asks ([`optimize`]
//!    runs these two alone);
//! 3. calibration ([`calibrate`], a phase of this library, not a pass), after the `quantize` entry
//!    set the layouts: activations captured in the reference interpreter, GPTQ rows, Wanda-pruned
//!    or SmoothQuant-scaled weights, and the `--report` error rows;
//! 4. text assets: tokenizer.json, the chat template, generation_config.json's eos ids;
//! 5. code generation and the artifact (`llmc-codegen`), weights streamed from the checkpoint or
//!    the calibrated source; with [`Emit::Ptx`] the CUDA kernels' PTX as files;
//! 6. with [`Emit::Lib`], the static library and C header ([`emit_lib`]).
//!
//! Besides: [`dump_ir`] and [`explain`] (`llmc dump-ir`), [`passes`] and [`default_pipeline`]
//! (`llmc passes`). Errors are one [`Error`] enum wrapping the other crates' errors unchanged.

mod assets;
pub mod calibrate;
mod compile;
mod config;
pub mod emit_lib;
mod error;
mod pipeline;
mod quant;

pub use calibrate::MatrixReport;
pub use compile::{compile, CompileReport, Progress, Timings};
pub use config::{pipeline, CompileConfig, Emit, PipelineConfig, QuantConfig, Target, WeightsDtype, CALIB_WINDOW};
pub use emit_lib::LibOutput;
pub use error::{Error, Result};
pub use pipeline::{
    default_pipeline, dump_ir, explain, optimize, passes, DumpAfter, DumpIrConfig, Model, Optimized, PassInfo, PassOption, PassRecord,
};
pub use quant::{FloatWeight, QuantSummary};

/// The weight layout named in [`QuantSummary`] and [`MatrixReport`] rows (`Layout::name`).
pub use llmc_ir::Layout;
