//! The artifact file format: one file holding a header, machine code and weights.
//!
//! ```text
//! 0      8 bytes   magic "LLMCART\0"
//! 8      u32 LE    format version (FORMAT_VERSION)
//! 12     u32 LE    reserved, 0
//! 16     u64 LE    header length in bytes
//! 24     u64 LE    xxh3-64 of the header bytes
//! 32     header    JSON (`Header`), padded with spaces to the code offset
//! code   kernels   machine code, `code_len` bytes at `code_offset` (64-aligned)
//! data   buffers   weights, constants, tables at `data_offset` (4096-aligned), each 64-aligned
//! ```
//! The header records xxh3-64 checksums of the code and data sections; [`Artifact::open`] checks all
//! three, the format version, the target and the CPU features before any code is mapped executable.
//! [`verify_bytes`] runs the same checks on an artifact already in memory (used by the fuzzers).
//! The writer, `ArtifactWriter` (feature `writer`, see `crate::writer`), produces exactly this layout.
//!
//! The checksums catch corruption (truncation, flipped bits, a half-written file), not malice: an
//! artifact is native code, and one written to pass every check runs with the caller's rights.
//! Even so, no header value can make the loader read outside the file or allocate more than
//! the header's buffers need: every offset, length and index is checked against its section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::cpu::cpu_has;
use crate::error::{AbiError, Result};
#[cfg(feature = "writer")]
pub use crate::writer::{header_size_bound, ArtifactWriter};

pub const MAGIC: &[u8; 8] = b"LLMCART\0";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the header JSON.
pub const PREAMBLE: usize = 32;
/// The target string of Cranelift x86-64 artifacts.
pub const TARGET_X86_64: &str = "x86_64-cpu";
/// The target string of CUDA artifacts: the code section holds PTX text, one module per kernel
/// and architecture ([`KernelEntry::variants`]); the runtime loads it through the CUDA driver.
pub const TARGET_CUDA: &str = "nvptx-cuda";
/// Largest accepted header JSON. A real header is well under a megabyte (a few entries per layer).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;
/// Largest accepted activation arena or state tensor (1 TiB), and of all of them together.
pub const MAX_RUNTIME_BYTES: u64 = 1 << 40;
/// Alignment of every data buffer inside the data section (what `ArtifactWriter::push_data` writes).
pub const DATA_ALIGN: u64 = 64;

/// The entry point of every kernel in an x86-64 artifact's code section (the kernel ABI):
/// `bufs[0..arity]` operands, `bufs[arity]` output, then constant tables (and, for a kernel that
/// calls microkernels, the table of [`crate::ukernel`]); `s` tokens this step, `p` tokens already
/// cached; the kernel does share `part` of `nparts` of its work.
pub type KernelFn = unsafe extern "sysv64" fn(bufs: *const *mut u8, s: i64, p: i64, part: i64, nparts: i64);

/// One compiled kernel: `len` bytes at `offset` within the code section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelEntry {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// GPU kernels: how to launch it (absent in CPU artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// GPU kernels: the same kernel's PTX per architecture (`sm_80`, `sm_90`), each a range of
    /// the code section; `offset`/`len` is the first (the oldest architecture).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<CodeVariant>,
}

/// A GPU kernel's launch shape as a function of the step's `s` (tokens) and `p` (cached tokens):
/// `items = coef * s^s_pow * p^p_pow * (s+p)^t_pow` work items of `per_item` threads each, in
/// blocks of `block` threads: `grid = ceil(items * per_item / block)`. The kernel takes its
/// buffers (as 64-bit device pointers) in step order, then `s` and `p` as i64, and guards
/// threads past its work.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Launch {
    pub block: u32,
    pub per_item: u32,
    pub coef: u64,
    pub s_pow: u8,
    pub p_pow: u8,
    pub t_pow: u8,
}

impl Launch {
    /// Work items for a step of `s` new and `p` cached tokens (saturating).
    pub fn items(&self, s: u64, p: u64) -> u64 {
        let pow = |b: u64, e: u8| (0..e).fold(1u64, |a, _| a.saturating_mul(b));
        self.coef.saturating_mul(pow(s, self.s_pow)).saturating_mul(pow(p, self.p_pow)).saturating_mul(pow(s + p, self.t_pow))
    }
    /// Blocks in the grid.
    pub fn grid(&self, s: u64, p: u64) -> u64 {
        self.items(s, p).saturating_mul(self.per_item as u64).div_ceil(self.block.max(1) as u64)
    }
}

/// A kernel's code for one GPU architecture: `len` bytes of PTX at `offset` in the code section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CodeVariant {
    pub arch: String,
    pub offset: u64,
    pub len: u64,
}

/// Where a tensor lives while the model runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferDecl {
    /// Read-only bytes in the data section (weights, constants, kernel tables).
    Data { name: String, offset: u64, bytes: u64 },
    /// Activations: `bytes` (at the largest step) at `offset` in the session's arena.
    Arena { offset: u64, bytes: u64 },
    /// A whole persistent state tensor (KV cache), `states[index]`.
    State { index: u32 },
    /// The runtime's microkernel function table (the slots of [`crate::ukernel::TABLE`]) for
    /// table layout version `abi` ([`crate::ukernel::ABI_VERSION`]): kernels that call runtime
    /// microkernels receive it as a buffer.
    Microkernels { abi: u32 },
}

/// A persistent state tensor (a KV cache), zeroed when a session starts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateEntry {
    pub name: String,
    pub bytes: u64,
}

/// One kernel launch: `args` are buffer indices in the kernel ABI's order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub kernel: u32,
    pub args: Vec<u32>,
    /// The IR value this step computes (for profiles and errors).
    #[serde(default)]
    pub label: String,
}

/// Everything the runtime needs besides the code and data bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub target: String,
    pub cpu_features: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub vocab_size: u64,
    pub max_context: u64,
    /// The largest number of tokens one step processes; longer prompts run in chunks.
    pub max_chunk: u64,
    pub code_offset: u64,
    pub code_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
    /// xxh3-64 of the code section, as 16 hex digits.
    pub code_checksum: String,
    /// xxh3-64 of the data section, as 16 hex digits.
    pub data_checksum: String,
    pub kernels: Vec<KernelEntry>,
    pub buffers: Vec<BufferDecl>,
    pub states: Vec<StateEntry>,
    pub steps: Vec<Step>,
    /// Buffer of the token ids (i32[S]) and of the logits (f32[S, vocab]).
    pub input: u32,
    pub output: u32,
    pub arena_bytes: u64,
    /// Non-tensor bytes carried in the data section and covered by its checksum (for example
    /// `tokenizer.json`); absent in artifacts that carry none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<BlobEntry>,
}

/// Named bytes at `offset` within the data section (see [`Artifact::blob`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlobEntry {
    pub name: String,
    pub offset: u64,
    pub bytes: u64,
}

/// A section checksum as the header spells it: 16 lowercase hex digits.
pub fn checksum_hex(h: u64) -> String {
    format!("{h:016x}")
}

/// An opened, verified artifact (memory-mapped).
pub struct Artifact {
    pub path: PathBuf,
    pub header: Header,
    map: Mmap,
}

impl Artifact {
    /// Opens and verifies an artifact: magic, version, header checksum, section bounds, code and
    /// data checksums, kernel and buffer bounds, target and CPU features.
    pub fn open(path: &Path) -> Result<Artifact> {
        let pb = path.to_path_buf();
        let file = std::fs::File::open(path).map_err(|source| AbiError::Io { path: pb.clone(), source })?;
        // SAFETY: the map is read-only; a concurrent truncation of the file is outside our contract.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| AbiError::Io { path: pb.clone(), source })?;
        let header = verify_bytes(path, &map)?;
        Ok(Artifact { path: pb, header, map })
    }

    /// Verifies an artifact held in memory (for example one linked into a program) and keeps a
    /// page-aligned copy of it, so `bytes` need not outlive the call; `name` stands for the
    /// path in errors.
    pub fn from_bytes(name: &Path, bytes: &[u8]) -> Result<Artifact> {
        let header = verify_bytes(name, bytes)?;
        let io = |source| AbiError::Io { path: name.to_path_buf(), source };
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().map_err(io)?;
        Ok(Artifact { path: name.to_path_buf(), header, map })
    }

    /// The blob named `name` (see [`Header::blobs`]), if the artifact carries one.
    pub fn blob(&self, name: &str) -> Option<&[u8]> {
        let b = self.header.blobs.iter().find(|b| b.name == name)?;
        self.data().get(b.offset as usize..(b.offset + b.bytes) as usize)
    }

    pub fn code(&self) -> &[u8] {
        let h = &self.header;
        &self.map[h.code_offset as usize..(h.code_offset + h.code_len) as usize]
    }

    pub fn data(&self) -> &[u8] {
        let h = &self.header;
        &self.map[h.data_offset as usize..(h.data_offset + h.data_len) as usize]
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> usize {
        self.map.len()
    }
}

/// Verifies the artifact `bytes` (named `path` in errors) as [`Artifact::open`] does and returns
/// its header: magic, version, header length and checksum, section bounds, code and data
/// checksums, internal consistency, target and CPU features, in that order. Nothing is allocated
/// beyond the parsed header.
pub fn verify_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    let pb = path.to_path_buf();
    let corrupt = |msg: String| AbiError::Corrupt { path: pb.clone(), msg };
    if !bytes.starts_with(MAGIC) {
        return Err(corrupt("not an llmc artifact (bad magic)".into()));
    }
    let Some(pre) = bytes.get(..PREAMBLE) else {
        return Err(corrupt(format!("truncated: {} bytes, shorter than the {PREAMBLE}-byte preamble", bytes.len())));
    };
    let word = |at: usize| u64::from_le_bytes(pre[at..at + 8].try_into().unwrap_or([0; 8]));
    let version = word(8) as u32;
    if version != FORMAT_VERSION {
        return Err(AbiError::Version { path: pb, found: version, expected: FORMAT_VERSION });
    }
    let (hlen, hsum) = (word(16), word(24));
    if hlen > MAX_HEADER_BYTES {
        return Err(corrupt(format!("header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    let hend = (PREAMBLE as u64 + hlen) as usize;
    let Some(hbytes) = bytes.get(PREAMBLE..hend) else {
        return Err(corrupt(format!("header length {hlen} exceeds the file ({} bytes)", bytes.len())));
    };
    if xxhash_rust::xxh3::xxh3_64(hbytes) != hsum {
        return Err(AbiError::Checksum { path: pb, section: "header" });
    }
    let header: Header = serde_json::from_slice(hbytes).map_err(|e| corrupt(format!("header: {e}")))?;
    let section = |off: u64, len: u64, what: &str| -> Result<&[u8]> {
        match off.checked_add(len) {
            Some(end) if off >= hend as u64 && end <= bytes.len() as u64 => Ok(&bytes[off as usize..end as usize]),
            _ => Err(corrupt(format!("{what} section {off}+{len} lies outside the file ({} bytes)", bytes.len()))),
        }
    };
    let code = section(header.code_offset, header.code_len, "code")?;
    let data = section(header.data_offset, header.data_len, "data")?;
    if checksum_hex(xxhash_rust::xxh3::xxh3_64(code)) != header.code_checksum {
        return Err(AbiError::Checksum { path: pb, section: "code" });
    }
    if checksum_hex(xxhash_rust::xxh3::xxh3_64(data)) != header.data_checksum {
        return Err(AbiError::Checksum { path: pb, section: "data" });
    }
    validate(&header).map_err(corrupt)?;
    if header.target == TARGET_CUDA {
        // PTX is never mapped executable on the host; whether a GPU can run it is decided when
        // the model is loaded (`Model::from_artifact`).
        return Ok(header);
    }
    if header.target != TARGET_X86_64 || !cfg!(target_arch = "x86_64") {
        return Err(AbiError::Target { path: pb, target: header.target.clone() });
    }
    for f in &header.cpu_features {
        if cpu_has(f) != Some(true) {
            return Err(AbiError::CpuFeature { path: pb, feature: f.clone() });
        }
    }
    Ok(header)
}

/// Internal consistency of a header whose bytes passed the checksum (a defence against
/// artifacts written by a buggy or hostile producer: no index or range may escape its section).
/// The message says which entry is wrong.
pub fn validate(h: &Header) -> std::result::Result<(), String> {
    for k in &h.kernels {
        if k.offset.checked_add(k.len).is_none_or(|e| e > h.code_len) || k.len == 0 {
            return Err(format!("kernel `{}` lies outside the code section", k.name));
        }
        for v in &k.variants {
            if v.offset.checked_add(v.len).is_none_or(|e| e > h.code_len) || v.len == 0 {
                return Err(format!("kernel `{}` ({}) lies outside the code section", k.name, v.arch));
            }
        }
        if h.target == TARGET_CUDA && k.launch.is_none_or(|l| l.block == 0 || l.block > 1024 || l.per_item == 0) {
            return Err(format!("GPU kernel `{}` has no valid launch shape", k.name));
        }
    }
    for (i, b) in h.buffers.iter().enumerate() {
        match b {
            BufferDecl::Data { name, offset, bytes } => {
                if offset.checked_add(*bytes).is_none_or(|e| e > h.data_len) {
                    return Err(format!("buffer {i} (`{name}`) lies outside the data section"));
                }
                if offset % DATA_ALIGN != 0 {
                    return Err(format!("buffer {i} (`{name}`) is not {DATA_ALIGN}-byte aligned"));
                }
            }
            BufferDecl::Arena { offset, bytes } => {
                if offset.checked_add(*bytes).is_none_or(|e| e > h.arena_bytes) {
                    return Err(format!("buffer {i} lies outside the arena"));
                }
            }
            BufferDecl::State { index } => {
                if *index as usize >= h.states.len() {
                    return Err(format!("buffer {i} names state {index}, which does not exist"));
                }
            }
            BufferDecl::Microkernels { abi } => {
                if *abi != crate::ukernel::ABI_VERSION {
                    return Err(format!(
                        "buffer {i} is microkernel table version {abi}; this runtime provides version {}",
                        crate::ukernel::ABI_VERSION
                    ));
                }
            }
        }
    }
    for b in &h.blobs {
        if b.offset.checked_add(b.bytes).is_none_or(|e| e > h.data_len) {
            return Err(format!("blob `{}` lies outside the data section", b.name));
        }
    }
    let nb = h.buffers.len();
    for (i, s) in h.steps.iter().enumerate() {
        if s.kernel as usize >= h.kernels.len() || s.args.iter().any(|&a| a as usize >= nb) {
            return Err(format!("step {i} names a kernel or buffer that does not exist"));
        }
    }
    for (what, b) in [("input", h.input), ("output", h.output)] {
        match h.buffers.get(b as usize) {
            Some(BufferDecl::Arena { bytes, .. }) => {
                let per_token = if what == "input" { 4 } else { 4 * h.vocab_size };
                if *bytes < per_token.saturating_mul(h.max_chunk) {
                    return Err(format!("{what} buffer is smaller than {} tokens", h.max_chunk));
                }
            }
            _ => return Err(format!("{what} buffer must be an arena buffer")),
        }
    }
    if h.max_chunk == 0 || h.max_context == 0 || h.vocab_size == 0 || h.max_chunk > h.max_context {
        return Err("max_chunk, max_context and vocab_size must be positive, max_chunk <= max_context".into());
    }
    let total = h.states.iter().try_fold(h.arena_bytes, |a, s| a.checked_add(s.bytes));
    if total.is_none_or(|t| t > MAX_RUNTIME_BYTES) {
        return Err(format!("arena and state sizes add up to more than the {MAX_RUNTIME_BYTES}-byte limit"));
    }
    // The arena is exactly as large as its buffers need (slots are 64-byte aligned): a larger
    // `arena_bytes` would only make a session allocate memory nothing uses.
    let arena_end = h
        .buffers
        .iter()
        .filter_map(|b| match b {
            BufferDecl::Arena { offset, bytes } => Some(offset + round_up((*bytes).max(1), 64)),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    if h.arena_bytes > round_up(arena_end, 64) {
        return Err(format!("arena of {} bytes is larger than its buffers need ({arena_end} bytes)", h.arena_bytes));
    }
    Ok(())
}

/// `x` rounded up to a multiple of `a` (`a > 0`).
pub fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}
