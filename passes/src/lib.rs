//! llmc's graph passes and the pass manager that runs them.
//!
//! [`pipeline`] parses and prints pipeline specs in MLIR's spelling
//! (`dce,optimize{target=cuda},quantize{format=int4:g64}`); [`registry`] builds each entry from its
//! options and the [`PassContext`] (the target) and lists every pass with its options
//! ([`all_passes`]) and the default pipeline; [`manager`] holds the [`Pass`] trait and the
//! [`PassManager`] (verifier after every pass, `--print-ir-after`, `--dump-ir`, statistics).
//! One file per pass: [`dce`], [`cse`], [`constant_fold`], [`kv_cache`]; the e-graph optimizer `optimize` is
//! [`egraph`] with its rule tables in [`rules`]. Each pass is checked by unit tests and
//! by a soundness test: random graphs evaluate to the same bits in the reference interpreter
//! before and after the pass.

pub mod constant_fold;
pub mod cse;
pub mod dce;
pub mod egraph;
pub mod error;
pub mod kv_cache;
pub mod manager;
pub mod pipeline;
pub mod quantize;
pub mod registry;
pub mod rules;
#[cfg(test)]
mod testutil;

pub use constant_fold::ConstantFold;
pub use cse::Cse;
pub use dce::Dce;
pub use egraph::{explain, Optimize};
pub use error::{PassError, Result};
pub use kv_cache::KvCache;
pub use quantize::Quantize;
pub use manager::{Pass, PassManager, PassStats, PrintAfter};
pub use pipeline::{PassSpec, Pipeline};
pub use registry::{all_passes, default_pipeline, lookup, PassContext, PassDef, PassOption, PassOptions, RegisteredPass};
