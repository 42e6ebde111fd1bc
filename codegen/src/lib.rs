//! llmc's backends. Each backend lowers a verified graph to code and writes an artifact the runtime
//! loads, through one shared driver ([`driver::drive`]: memory [`plan`], kernel and table
//! deduplication, header, streamed data section) and a target's [`Backend`] hooks. `cpu`: x86-64
//! machine code through Cranelift, one kernel per graph node ([`cpu`]); `cuda` (feature `cuda`):
//! PTX through MLIR.

extern crate llmc_abi as abi;
extern crate llmc_ir as ir;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod driver;
pub mod error;
pub mod packed;
pub mod plan;

pub use cpu::backend::{CpuBackend, CpuOptions};
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
pub use driver::{drive, Backend, CompileOptions, CompileReport, GraphIo, NodeKernel, Storage, WeightsDtype};
pub use error::{CodegenError, Result};

use std::path::{Path, PathBuf};

/// Compiles `g` for the host CPU and writes the artifact to `out`.
pub fn compile_cpu(g: &ir::Graph, weights: &dyn ir::WeightSource, opts: &CompileOptions, cpu: CpuOptions, out: &Path) -> Result<CompileReport> {
    drive(&mut CpuBackend::new(cpu), g, weights, opts, out)
}

/// Options of the CUDA target (defined in every build, so that a config can name them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Also write every kernel's PTX (per architecture) and MLIR into this directory
    /// (`--emit ptx DIR`).
    pub ptx_dir: Option<PathBuf>,
}

/// Every backend's own options; [`backend`] hands each backend its part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendOptions {
    pub cpu: CpuOptions,
    pub cuda: CudaOptions,
}

/// Names of the targets this build can compile for.
#[cfg(not(feature = "cuda"))]
pub const TARGETS: &[&str] = &["cpu"];
/// Names of the targets this build can compile for.
#[cfg(feature = "cuda")]
pub const TARGETS: &[&str] = &["cpu", "cuda"];

/// The backend for `--target NAME` with its options from `opts`.
pub fn backend(name: &str, opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend::new(opts.cpu.clone()))),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Box::new(CudaBackend::new(opts.cuda.clone()))),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(CodegenError::Target(
            "target `cuda` is not available in this build of llmc (built without the `cuda` feature; rebuild with `cargo build --release --features cuda`, which needs LLVM/MLIR 22, see docs/cuda.md); available targets: cpu".into(),
        )),
        other => Err(CodegenError::Target(format!("unknown target `{other}`; available targets: {}", TARGETS.join(", ")))),
    }
}
