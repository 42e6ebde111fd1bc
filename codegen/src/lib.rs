//! llmc's backends. Each backend lowers a verified graph to code and writes an artifact the runtime
//! loads. `cpu`: x86-64 machine code through Cranelift, one kernel per graph node ([`cpu`]), driven
//! by [`emit`] over the memory [`plan`].

extern crate llmc_abi as abi;
extern crate llmc_ir as ir;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod emit;
pub mod error;
pub mod packed;
pub mod plan;

pub use emit::{compile_cpu, CompileOptions, CompileReport};
pub use error::{CodegenError, Result};

use std::path::Path;

/// A code generator for one target.
pub trait Backend {
    /// The `--target` name.
    fn name(&self) -> &'static str;
    /// Compiles `g` (weights from `weights`) into an artifact at `out`.
    fn compile(&self, g: &ir::Graph, weights: &dyn ir::WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport>;
}

/// The Cranelift x86-64 backend.
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn compile(&self, g: &ir::Graph, weights: &dyn ir::WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
        compile_cpu(g, weights, opts, out)
    }
}

/// The CUDA backend: PTX for sm_80 and sm_90 through MLIR.
#[cfg(feature = "cuda")]
pub struct CudaBackend;

#[cfg(feature = "cuda")]
impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn compile(&self, g: &ir::Graph, weights: &dyn ir::WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
        cuda::compile_cuda(g, weights, opts, out)
    }
}

/// Names of the targets this build can compile for.
#[cfg(not(feature = "cuda"))]
pub const TARGETS: &[&str] = &["cpu"];
/// Names of the targets this build can compile for.
#[cfg(feature = "cuda")]
pub const TARGETS: &[&str] = &["cpu", "cuda"];

/// The backend for `--target NAME`.
pub fn backend(name: &str) -> Result<Box<dyn Backend>> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Box::new(CudaBackend)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(CodegenError::Target(
            "target `cuda` is not available in this build of llmc (built without the `cuda` feature; rebuild with `cargo build --release --features cuda`, which needs LLVM/MLIR 22, see docs/cuda.md); available targets: cpu".into(),
        )),
        other => Err(CodegenError::Target(format!("unknown target `{other}`; available targets: {}", TARGETS.join(", ")))),
    }
}
