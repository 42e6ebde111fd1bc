//! Executable memory for an artifact's kernels and the kernel ABI.

use memmap2::{Mmap, MmapMut};

/// The kernel ABI every backend-generated CPU kernel follows, and the CPU-feature check an
/// artifact's `cpu_features` go through (both defined in `llmc-abi`).
pub use llmc_abi::{cpu_has, KernelFn};

use crate::error::{Result, RuntimeError};

/// A read-only, executable copy of an artifact's code section.
pub struct CodeMemory {
    map: Mmap,
}

impl CodeMemory {
    /// Copies `code` into fresh pages and maps them read+execute (never writable and executable at once).
    pub fn new(code: &[u8]) -> Result<Self> {
        let mut m = MmapMut::map_anon(code.len().max(1))
            .map_err(|e| RuntimeError::Other(format!("cannot map code memory: {e}")))?;
        m[..code.len()].copy_from_slice(code);
        let map = m.make_exec().map_err(|e| RuntimeError::Other(format!("cannot make code executable: {e}")))?;
        Ok(CodeMemory { map })
    }

    /// The kernel starting at `offset`.
    ///
    /// # Safety
    /// `offset` must be the start of a function compiled for [`KernelFn`]'s ABI.
    pub unsafe fn kernel(&self, offset: usize) -> KernelFn {
        let ptr = self.map.as_ptr().add(offset);
        std::mem::transmute::<*const u8, KernelFn>(ptr)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
