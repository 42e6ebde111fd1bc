//! llmc's ABI: everything the compiler writes and the runtime reads, defined once.
//!
//! - [`artifact`]: the file format (preamble, JSON [`Header`], code and data sections), the
//!   reader and verifier ([`Artifact`], [`verify_bytes`]), the kernel entry point [`KernelFn`];
//!   the writer `ArtifactWriter` behind the `writer` feature (the compiler's; the runtime and
//!   its C library do not carry it).
//! - [`qformat`]: the packed quantized row formats ([`QFormat`]): encode, decode, sizes.
//! - [`panel`]: the panel layout of f32 weights for the runtime's panel GEMM, and its packer.
//! - [`ukernel`]: the microkernel table's slots, signatures and [`ukernel::ABI_VERSION`].
//! - [`cpu`]: the CPU-feature check the verifier applies.
//!
//! It depends on no compiler crate, so the runtime can depend on it.

pub mod artifact;
pub mod cpu;
pub mod error;
pub mod panel;
pub mod qformat;
pub mod ukernel;
#[cfg(feature = "writer")]
pub mod writer;

pub use artifact::{
    verify_bytes, Artifact, BlobEntry, BufferDecl, CodeVariant, Header, KernelEntry, KernelFn, Launch, StateEntry, Step,
    DATA_ALIGN, FORMAT_VERSION, MAGIC,
};
pub use cpu::cpu_has;
pub use error::{AbiError, Result};
pub use qformat::{QFormat, Row, RowBuf};
#[cfg(feature = "writer")]
pub use writer::ArtifactWriter;
