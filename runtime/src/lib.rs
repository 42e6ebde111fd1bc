//! llmc's runtime: loads a compiled artifact and executes it.
//!
//! It depends on no compiler crate, so an application that links a compiled model pulls in this
//! crate (and `llmc-abi`, the format contract it shares with the compiler, without its writer)
//! alone. Order of use: [`artifact`] (the file format, read and verified before any of its code
//! runs), [`exec`] (mapping code executable), [`model`] (a loaded model, sessions), [`step`] (the
//! step contract: a ragged batch of sequences, each with its own KV cache, through an entry point,
//! logits only where asked), [`sample`] (token choice), [`generate`] and [`speculative`]
//! (decoding loops), [`ukernel`] and [`qkernel`] (matrix-product microkernels that generated
//! kernels call), [`embed`] (sentence embeddings from encoder artifacts), [`tokenizer`] (text in
//! and out; the default `tokenizer` feature), [`npy`] (logit dumps).

pub mod akernel;
pub mod amx;
pub mod artifact;
pub mod bandwidth;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod embed;
pub mod error;
pub mod exec;
pub mod generate;
pub mod model;
pub mod npy;
pub mod pool;
pub mod qkernel;
pub mod sample;
mod simd;
pub mod speculative;
pub mod step;
pub mod tokenizer;
pub mod ukernel;

pub use artifact::{Artifact, BufferDecl, EntryPoint, Header, KernelEntry, Step, FORMAT_VERSION, MAGIC};
pub use error::{Result, RuntimeError};
pub use generate::{generate, StopConditions};
pub use model::{GenerateStats, Model, Session};
pub use sample::{Sampler, SamplingParams};
pub use speculative::{generate_speculative, SpeculativeStats};
pub use step::{EntryId, Executor, KvCache, Logits, StepInput, StepOutput};
#[cfg(feature = "tokenizer")]
pub use tokenizer::{ChatMessage, ChatTemplate, TextStream, Tokenizer};
