//! The artifact file format: one file holding a header, machine code and weights.
//!
//! The format (header types, constants, the reader and verifier) is defined in `llmc-abi`
//! ([`llmc_abi::artifact`]) and re-exported here; [`verify_bytes`] reports with the runtime's
//! error type, and [`Artifact`]'s errors convert into it (`?`). The writer (`ArtifactWriter`) is
//! the compiler's: it appears here only in builds that enable `llmc-abi`'s `writer` feature.

use std::path::Path;

pub use llmc_abi::artifact::*;

use crate::error::Result;

/// Verifies the artifact `bytes` (named `path` in errors) as [`Artifact::open`] does and returns
/// its header: magic, version, header length and checksum, section bounds, code and data
/// checksums, internal consistency, target and CPU features, in that order. Nothing is allocated
/// beyond the parsed header.
pub fn verify_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    Ok(llmc_abi::artifact::verify_bytes(path, bytes)?)
}
