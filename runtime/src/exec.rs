//! Executable memory for an artifact's kernels and the kernel ABI.

use memmap2::{Mmap, MmapMut};

use crate::error::{Result, RuntimeError};

/// The kernel ABI every backend-generated CPU kernel follows:
/// `bufs[0..arity]` operands, `bufs[arity]` output, then constant tables; `s` tokens this step,
/// `p` tokens already cached; the kernel does share `part` of `nparts` of its work.
pub type KernelFn = unsafe extern "sysv64" fn(bufs: *const *mut u8, s: i64, p: i64, part: i64, nparts: i64);

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

/// Whether this CPU has the named x86 feature (names as `is_x86_feature_detected!` spells them).
/// `None` for a name this runtime does not know.
pub fn cpu_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse2" => has!("sse2"),
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "sse4.1" => has!("sse4.1"),
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "cmpxchg16b" => has!("cmpxchg16b"),
            "movbe" => has!("movbe"),
            "avx512cd" => has!("avx512cd"),
            "avx512ifma" => has!("avx512ifma"),
            "avx512vbmi2" => has!("avx512vbmi2"),
            "avx512bf16" => has!("avx512bf16"),
            "avx512fp16" => has!("avx512fp16"),
            "gfni" => has!("gfni"),
            "vaes" => has!("vaes"),
            "vpclmulqdq" => has!("vpclmulqdq"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "f16c" => has!("f16c"),
            "avx512f" => has!("avx512f"),
            "avx512vl" => has!("avx512vl"),
            "avx512dq" => has!("avx512dq"),
            "avx512bw" => has!("avx512bw"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512vpopcntdq" => has!("avx512vpopcntdq"),
            "avxvnni" => has!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        Some(false)
    }
}
