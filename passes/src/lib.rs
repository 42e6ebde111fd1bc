//! llmc's graph passes and the pass manager that runs them.
//!
//! [`manager`] holds the [`Pass`] trait, the registry ([`all_passes`]), the default pipeline and
//! the [`PassManager`] (verifier after every pass, `--print-ir-after`, `--dump-ir`, statistics).
//! One file per pass: [`dce`], [`cse`], [`constant_fold`]; the e-graph optimizer `optimize` is
//! [`egraph`] with its rule tables in [`rules`]. Each pass is checked by unit tests and
//! by a soundness test: random graphs evaluate to the same bits in the reference interpreter
//! before and after the pass.

pub mod constant_fold;
pub mod cse;
pub mod dce;
pub mod egraph;
pub mod error;
pub mod manager;
pub mod quantize;
pub mod rules;
#[cfg(test)]
mod testutil;

pub use constant_fold::ConstantFold;
pub use cse::Cse;
pub use dce::Dce;
pub use egraph::{explain, Optimize};
pub use error::{PassError, Result};
pub use quantize::Quantize;
pub use manager::{all_passes, default_pipeline, lookup, parse_pipeline, Pass, PassManager, PassStats, PrintAfter};
