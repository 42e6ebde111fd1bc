//! The CUDA backend: every node of the optimized graph becomes an MLIR `gpu.module` kernel
//! ([`kernels`], written as MLIR text with [`text`]), lowered in process to PTX for sm_80 and
//! sm_90 ([`lower`]), and written with the same memory plan and step list as the CPU target into
//! an `nvptx-cuda` artifact ([`emit`]). The runtime (feature `cuda`) runs it through the CUDA
//! driver.

#[doc(hidden)]
pub mod emulate;
pub mod backend;
pub mod kernels;
pub mod lower;
pub mod text;
#[cfg(test)]
mod tests;

pub use backend::CudaBackend;
pub use lower::{Lowerer, ARCHS};
