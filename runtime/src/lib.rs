//! llmc's runtime: loads a compiled artifact and executes it.
//!
//! It depends on no compiler crate, so an application that links a compiled model pulls in this
//! crate alone. Order of use: [`artifact`] (the file format, read and verified before any of its
//! code runs), [`exec`] (mapping code executable), [`model`] (a loaded model, sessions with their
//! KV cache and activation arena), [`sample`] (token choice), [`npy`] (logit dumps).

pub mod artifact;
pub mod error;
pub mod exec;
pub mod model;
pub mod npy;
pub mod sample;

pub use artifact::{Artifact, BufferDecl, Header, KernelEntry, Step, FORMAT_VERSION, MAGIC};
pub use error::{Result, RuntimeError};
pub use model::{GenerateStats, Model, Session};
