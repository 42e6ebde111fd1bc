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
/// The data section's checksum granule ([`Header::data_chunk_checksums`]).
pub const DATA_CHUNK_BYTES: u64 = 64 << 20;
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

/// A persistent state tensor (a KV cache), zeroed when a cache is made. Every sequence has its
/// own copy of every state (`llmc_runtime::step::KvCache`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateEntry {
    pub name: String,
    pub bytes: u64,
    /// How the state's rows are stored (the IR's `KvLayout`); absent in artifacts written
    /// before Redesign I, whose states are all contiguous.
    #[serde(default)]
    pub layout: StateLayout,
}

/// The layout of a KV-cache state in the artifact (the IR's `KvLayout`, which lists the
/// layouts to come). A layout this runtime does not know is refused when the header is read,
/// with an error naming it; it is never run as if it were contiguous.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum StateLayout {
    /// `bytes` of rows, row `t` holding token `t`: one plain buffer, bound whole to the kernels.
    #[default]
    Contiguous,
    /// `bytes` of int8 codes and their f32 scales (the IR's `KvLayout::Int8`): also one plain
    /// buffer bound whole; only the kernels the compiler wrote for it read it.
    Int8,
}

impl StateLayout {
    pub fn name(self) -> &'static str {
        match self {
            StateLayout::Contiguous => "contiguous",
            StateLayout::Int8 => "int8",
        }
    }
}

impl TryFrom<String> for StateLayout {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<StateLayout, String> {
        match name.as_str() {
            "contiguous" => Ok(StateLayout::Contiguous),
            "int8" => Ok(StateLayout::Int8),
            _ => Err(format!("unknown KV-cache layout `{name}` (this runtime runs: contiguous, int8)")),
        }
    }
}

impl From<StateLayout> for String {
    fn from(l: StateLayout) -> String {
        l.name().to_string()
    }
}

/// The entry point every artifact has: one forward step of the model, token ids in, logits out.
pub const FORWARD_ENTRY: &str = "forward";

/// A named way into the artifact: the steps to run for a batch of token ids and the buffers the
/// ids go into and the logits come out of. Entry points share the weights, the activation arena
/// and the states: a second entry (a self-speculative draft running the first layers and a head)
/// reads and writes the same KV caches as `forward`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EntryPoint {
    pub name: String,
    /// Ranges of the header's step list, run in order (`forward`: one range, all steps).
    pub steps: Vec<std::ops::Range<u32>>,
    /// Buffer of the token ids, `i32[S]` (an arena buffer of at least `max_chunk` ids).
    pub input: u32,
    /// Buffer of the logits, `f32[S, vocab_size]` (an arena buffer of at least `max_chunk` rows).
    pub output: u32,
    /// The logits head, when the compiler found one: the entry's last steps, which compute each
    /// token's logits from that token's row of one buffer alone (the final norm, the LM head).
    /// A step that wants no logits skips them; one that wants only the last token's runs them for
    /// that row alone. Absent: every step computes every row's logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<LogitsHead>,
}

/// The row-wise tail of an entry point ([`EntryPoint::head`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogitsHead {
    /// Index into the entry's run order ([`EntryPoint::step_indices`]) of the head's first step;
    /// every later step belongs to the head.
    pub first: u32,
    /// The arena buffer the head reads its rows from, read by no step before `first`.
    pub input: u32,
    /// Bytes of one token's row of `input`.
    pub row_bytes: u64,
}

impl EntryPoint {
    /// Indices into the header's step list, in run order.
    pub fn step_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps.iter().flat_map(|r| r.start as usize..r.end as usize)
    }
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
    /// xxh3-64 of each [`DATA_CHUNK_BYTES`] piece of the data section in order (the last one may
    /// be shorter), as 16 hex digits each. The loader verifies these, on every core at once,
    /// instead of `data_checksum` (kept for readers that predate them), so a large artifact's
    /// weights are read once at load, in parallel. Absent in artifacts written before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_chunk_checksums: Vec<String>,
    pub kernels: Vec<KernelEntry>,
    pub buffers: Vec<BufferDecl>,
    pub states: Vec<StateEntry>,
    pub steps: Vec<Step>,
    /// The entry points (at least [`FORWARD_ENTRY`]); artifacts written before Redesign I have
    /// top-level `input`/`output` buffers instead, read as one `forward` entry over every step.
    #[serde(default)]
    pub entries: Vec<EntryPoint>,
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

impl Header {
    /// The entry point called `name`.
    pub fn entry(&self, name: &str) -> Option<&EntryPoint> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// The `input`/`output` fields of a header written before entry points.
#[derive(Deserialize)]
struct LegacyIo {
    input: Option<u32>,
    output: Option<u32>,
}

/// Gives a header written before entry points (no `entries`) its one `forward` entry: every step,
/// the top-level `input` and `output` buffers. Headers with entries are returned unchanged.
fn upgrade_legacy(mut h: Header, json: &[u8]) -> std::result::Result<Header, String> {
    if !h.entries.is_empty() {
        return Ok(h);
    }
    let io: LegacyIo = serde_json::from_slice(json).map_err(|e| format!("header: {e}"))?;
    let (Some(input), Some(output)) = (io.input, io.output) else {
        return Err("header has no entry points".into());
    };
    let steps = u32::try_from(h.steps.len()).map_err(|_| "header has more than 2^32 steps".to_string())?;
    h.entries.push(EntryPoint { name: FORWARD_ENTRY.into(), steps: vec![0..steps], input, output, head: None });
    Ok(h)
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
    let header = upgrade_legacy(header, hbytes).map_err(corrupt)?;
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
    if header.data_chunk_checksums.is_empty() {
        if checksum_hex(xxhash_rust::xxh3::xxh3_64(data)) != header.data_checksum {
            return Err(AbiError::Checksum { path: pb, section: "data" });
        }
    } else {
        let chunks = data.len().div_ceil(DATA_CHUNK_BYTES as usize);
        if header.data_chunk_checksums.len() != chunks {
            return Err(corrupt(format!(
                "{} data chunk checksums for a data section of {} chunks of {DATA_CHUNK_BYTES} bytes",
                header.data_chunk_checksums.len(),
                chunks
            )));
        }
        if let Some(i) = first_bad_chunk(data, &header.data_chunk_checksums) {
            let at = i as u64 * DATA_CHUNK_BYTES;
            return Err(corrupt(format!(
                "checksum mismatch in the data section, chunk {i} (bytes {at}..{} of the section)",
                (at + DATA_CHUNK_BYTES).min(data.len() as u64)
            )));
        }
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

/// The xxh3-64 of each [`DATA_CHUNK_BYTES`] piece of `data`, as [`Header::data_chunk_checksums`]
/// spells them (the writer streams the same sums).
pub fn data_chunk_sums(data: &[u8]) -> Vec<String> {
    let chunks: Vec<&[u8]> = data.chunks(DATA_CHUNK_BYTES as usize).collect();
    map_in_parallel(chunks.len(), |i| checksum_hex(xxhash_rust::xxh3::xxh3_64(chunks[i])))
}

/// The lowest index whose chunk of `data` does not hash to `sums[i]`, checked on every core.
fn first_bad_chunk(data: &[u8], sums: &[String]) -> Option<usize> {
    let chunks: Vec<&[u8]> = data.chunks(DATA_CHUNK_BYTES as usize).collect();
    map_in_parallel(chunks.len(), |i| checksum_hex(xxhash_rust::xxh3::xxh3_64(chunks[i])) == sums[i])
        .iter()
        .position(|ok| !ok)
}

/// `[f(0), .., f(n - 1)]`, computed in contiguous runs (so each thread's reads stream) on up to
/// `available_parallelism` scoped threads; the caller's thread alone when that is one.
fn map_in_parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(threads);
    let run = |t: usize| (t * per..((t + 1) * per).min(n)).map(&f).collect::<Vec<T>>();
    std::thread::scope(|s| {
        let rest: Vec<_> = (1..threads).map(|t| s.spawn(move || run(t))).collect();
        let mut out = run(0);
        for h in rest {
            // A panicking `f` is a bug; re-raise it on the caller's thread.
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        out
    })
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
    if h.entry(FORWARD_ENTRY).is_none() {
        return Err(format!("no `{FORWARD_ENTRY}` entry point"));
    }
    for (i, e) in h.entries.iter().enumerate() {
        let name = &e.name;
        if name.is_empty() || h.entries[..i].iter().any(|o| &o.name == name) {
            return Err(format!("entry point {i} (`{name}`) has an empty or repeated name"));
        }
        for r in &e.steps {
            if r.start > r.end || r.end as usize > h.steps.len() {
                return Err(format!("entry point `{name}`: step range {}..{} lies outside the {} steps", r.start, r.end, h.steps.len()));
            }
        }
        if e.steps.iter().all(|r| r.start == r.end) {
            return Err(format!("entry point `{name}` runs no steps"));
        }
        if let Some(hd) = &e.head {
            let steps = e.steps.iter().map(|r| (r.end - r.start) as u64).sum::<u64>();
            if hd.first as u64 >= steps {
                return Err(format!("entry point `{name}`: its logits head starts at step {} of {steps}", hd.first));
            }
            match h.buffers.get(hd.input as usize) {
                Some(BufferDecl::Arena { bytes, .. }) if hd.row_bytes > 0 && hd.row_bytes.saturating_mul(h.max_chunk) <= *bytes => {}
                _ => {
                    return Err(format!(
                        "entry point `{name}`: its logits head reads buffer {}, which is not an arena buffer of {} rows of {} bytes",
                        hd.input, h.max_chunk, hd.row_bytes
                    ))
                }
            }
        }
        for (what, b) in [("input", e.input), ("output", e.output)] {
            match h.buffers.get(b as usize) {
                Some(BufferDecl::Arena { bytes, .. }) => {
                    let per_token = if what == "input" { 4 } else { 4 * h.vocab_size };
                    if *bytes < per_token.saturating_mul(h.max_chunk) {
                        return Err(format!("entry point `{name}`: {what} buffer {b} is smaller than {} tokens", h.max_chunk));
                    }
                }
                _ => return Err(format!("entry point `{name}`: {what} buffer {b} must be an arena buffer")),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A consistent CUDA-target header (verifiable on any host): two kernels' worth of steps,
    /// an arena with the token ids and logits, one state, a `forward` entry over both steps.
    fn header() -> Header {
        let launch = Launch { block: 32, per_item: 1, coef: 1, s_pow: 1, p_pow: 0, t_pow: 0 };
        let kernel = |name: &str| KernelEntry {
            name: name.into(),
            offset: 0,
            len: 8,
            launch: Some(launch),
            variants: vec![CodeVariant { arch: "sm_80".into(), offset: 0, len: 8 }],
        };
        Header {
            target: TARGET_CUDA.into(),
            cpu_features: vec![],
            meta: Default::default(),
            vocab_size: 4,
            max_context: 8,
            max_chunk: 2,
            code_offset: 0,
            code_len: 8,
            data_offset: 0,
            data_len: 0,
            code_checksum: String::new(),
            data_checksum: String::new(),
            data_chunk_checksums: vec![],
            kernels: vec![kernel("a"), kernel("b")],
            buffers: vec![
                BufferDecl::Arena { offset: 0, bytes: 64 },
                BufferDecl::Arena { offset: 64, bytes: 64 },
                BufferDecl::State { index: 0 },
            ],
            states: vec![StateEntry { name: "cache.0.k".into(), bytes: 256, layout: StateLayout::Contiguous }],
            steps: vec![Step { kernel: 0, args: vec![0, 2], label: String::new() }, Step { kernel: 1, args: vec![2, 1], label: String::new() }],
            entries: vec![EntryPoint { name: FORWARD_ENTRY.into(), steps: vec![0..2], input: 0, output: 1, head: None }],
            arena_bytes: 128,
            blobs: vec![],
        }
    }

    /// `validate`'s message for `h`, which must be refused.
    fn refused(h: &Header) -> String {
        validate(h).expect_err("a corrupt header passed validation")
    }

    #[test]
    fn entry_points_are_validated() {
        validate(&header()).unwrap();
        let edit = |f: &dyn Fn(&mut Header)| {
            let mut h = header();
            f(&mut h);
            refused(&h)
        };
        let e = edit(&|h| h.entries[0].steps = vec![0..3]);
        assert!(e.contains("entry point `forward`") && e.contains("step range 0..3") && e.contains("2 steps"), "{e}");
        #[allow(clippy::reversed_empty_ranges)]
        let e = edit(&|h| h.entries[0].steps = vec![2..1]);
        assert!(e.contains("step range 2..1"), "{e}");
        let e = edit(&|h| h.entries[0].steps = vec![1..1]);
        assert!(e.contains("`forward` runs no steps"), "{e}");
        let e = edit(&|h| h.entries[0].input = 9);
        assert!(e.contains("entry point `forward`: input buffer 9 must be an arena buffer"), "{e}");
        let e = edit(&|h| h.entries[0].output = 2);
        assert!(e.contains("output buffer 2 must be an arena buffer"), "{e}");
        let e = edit(&|h| h.buffers[1] = BufferDecl::Arena { offset: 64, bytes: 16 });
        assert!(e.contains("output buffer 1 is smaller than 2 tokens"), "{e}");
        let e = edit(&|h| h.entries[0].name = "draft".into());
        assert!(e.contains("no `forward` entry point"), "{e}");
        let e = edit(&|h| h.entries.clear());
        assert!(e.contains("no `forward` entry point"), "{e}");
        // A logits head: within the entry's steps, reading an arena buffer of max_chunk rows.
        let head = |first, input, row_bytes| Some(LogitsHead { first, input, row_bytes });
        let mut h = header();
        h.entries[0].head = head(1, 0, 32);
        validate(&h).unwrap();
        let e = edit(&|h| h.entries[0].head = head(2, 0, 32));
        assert!(e.contains("logits head starts at step 2 of 2"), "{e}");
        let e = edit(&|h| h.entries[0].head = head(1, 2, 4));
        assert!(e.contains("logits head reads buffer 2, which is not an arena buffer"), "{e}");
        let e = edit(&|h| h.entries[0].head = head(1, 0, 33));
        assert!(e.contains("not an arena buffer of 2 rows of 33 bytes"), "{e}");
        let e = edit(&|h| h.entries[0].head = head(1, 0, 0));
        assert!(e.contains("rows of 0 bytes"), "{e}");
        // A second entry is checked like the first.
        let second = |steps: Vec<std::ops::Range<u32>>, name: &str| EntryPoint { name: name.into(), steps, input: 0, output: 1, head: None };
        let mut h = header();
        h.entries.push(second(vec![0..1, 1..2], "draft"));
        validate(&h).unwrap();
        let e = edit(&|h| h.entries.push(second(vec![0..1, 1..5], "draft")));
        assert!(e.contains("entry point `draft`: step range 1..5"), "{e}");
        let e = edit(&|h| h.entries.push(second(vec![0..1], "forward")));
        assert!(e.contains("entry point 1 (`forward`) has an empty or repeated name"), "{e}");
    }

    #[cfg(feature = "writer")]
    /// Writes `h` (with 8 bytes of code) and returns the artifact's bytes.
    fn write(h: &Header, name: &str) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("llmc-artifact-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let w = ArtifactWriter::create(&path, header_size_bound(h) + 4096, &[0u8; 8]).unwrap();
        w.finish(h.clone()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        bytes
    }

    #[cfg(feature = "writer")]
    /// `bytes` with its header JSON replaced by `json` (checksum recomputed).
    fn with_header_json(bytes: &[u8], json: &serde_json::Value) -> Vec<u8> {
        let code = serde_json::from_slice::<Header>(&bytes[PREAMBLE..PREAMBLE + u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize])
            .unwrap()
            .code_offset as usize;
        let j = serde_json::to_vec(json).unwrap();
        let mut b = bytes.to_vec();
        b[16..24].copy_from_slice(&(j.len() as u64).to_le_bytes());
        b[24..32].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&j).to_le_bytes());
        b[PREAMBLE..PREAMBLE + j.len()].copy_from_slice(&j);
        b[PREAMBLE + j.len()..code].fill(b' ');
        b
    }

    #[cfg(feature = "writer")]
    fn header_json(bytes: &[u8]) -> serde_json::Value {
        let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        serde_json::from_slice(&bytes[PREAMBLE..PREAMBLE + n]).unwrap()
    }

    #[cfg(feature = "writer")]
    #[test]
    fn a_bad_entry_is_a_corrupt_artifact() {
        let mut h = header();
        h.entries[0].steps = vec![0..7];
        let bytes = write(&h, "bad-entry.llmc");
        match verify_bytes(Path::new("bad-entry.llmc"), &bytes) {
            Err(e @ AbiError::Corrupt { .. }) => {
                let m = e.to_string();
                assert!(m.contains("bad-entry.llmc: corrupt artifact: entry point `forward`: step range 0..7"), "{m}");
            }
            other => panic!("expected a corrupt-artifact error, got {other:?}"),
        }
    }

    #[cfg(feature = "writer")]
    #[test]
    fn entries_and_state_layouts_round_trip_and_old_headers_still_read() {
        let h = header();
        let bytes = write(&h, "ok.llmc");
        let back = verify_bytes(Path::new("ok.llmc"), &bytes).unwrap();
        assert_eq!(back.entries, h.entries);
        assert_eq!(back.states, h.states);
        let json = header_json(&bytes);
        assert_eq!(json["states"][0]["layout"], "contiguous");
        assert_eq!(json["entries"][0]["steps"], serde_json::json!([{"start": 0, "end": 2}]));

        // A header from before entry points and state layouts: top-level input/output.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("entries");
        old["states"][0].as_object_mut().unwrap().remove("layout");
        old["input"] = serde_json::json!(0);
        old["output"] = serde_json::json!(1);
        let read = verify_bytes(Path::new("old.llmc"), &with_header_json(&bytes, &old)).unwrap();
        assert_eq!(read.entries, h.entries, "one `forward` entry over every step");
        assert_eq!(read.states[0].layout, StateLayout::Contiguous);
        // Neither entries nor input/output: refused.
        old.as_object_mut().unwrap().remove("input");
        let e = verify_bytes(Path::new("old.llmc"), &with_header_json(&bytes, &old)).unwrap_err().to_string();
        assert!(e.contains("corrupt artifact: header has no entry points"), "{e}");

        // A layout this runtime does not know is refused by name, never run as contiguous.
        let mut paged = json.clone();
        paged["states"][0]["layout"] = serde_json::json!("paged");
        let e = verify_bytes(Path::new("paged.llmc"), &with_header_json(&bytes, &paged)).unwrap_err().to_string();
        assert!(e.contains("corrupt artifact") && e.contains("unknown KV-cache layout `paged`"), "{e}");
    }

    #[cfg(feature = "writer")]
    #[test]
    fn data_chunks_are_checksummed_each_and_a_flip_names_its_chunk() {
        let dir = std::env::temp_dir().join(format!("llmc-artifact-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chunks.llmc");
        let h = header();
        let mut w = ArtifactWriter::create(&path, header_size_bound(&h) + 4096, &[0u8; 8]).unwrap();
        // Two buffers whose padding and bytes straddle the first chunk boundary.
        let a: Vec<u8> = (0..DATA_CHUNK_BYTES as usize - 10).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..1000).map(|i| (i % 13) as u8).collect();
        assert_eq!(w.push_data(&a).unwrap(), 0);
        assert_eq!(w.push_data(&b).unwrap(), DATA_CHUNK_BYTES);
        w.finish(h).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let back = verify_bytes(Path::new("chunks.llmc"), &bytes).unwrap();
        let data = &bytes[back.data_offset as usize..][..back.data_len as usize];
        assert_eq!(back.data_len, DATA_CHUNK_BYTES + 1000);
        assert_eq!(back.data_chunk_checksums.len(), 2);
        assert_eq!(back.data_chunk_checksums, data_chunk_sums(data), "the writer streams the loader's sums");
        assert_eq!(back.data_checksum, checksum_hex(xxhash_rust::xxh3::xxh3_64(data)), "the whole-section sum stays");

        for (at, chunk) in [(5u64, 0), (DATA_CHUNK_BYTES - 1, 0), (DATA_CHUNK_BYTES, 1), (DATA_CHUNK_BYTES + 999, 1)] {
            let mut flipped = bytes.clone();
            flipped[(back.data_offset + at) as usize] ^= 0x10;
            let e = verify_bytes(Path::new("chunks.llmc"), &flipped).unwrap_err().to_string();
            assert!(e.contains(&format!("checksum mismatch in the data section, chunk {chunk} ")), "byte {at}: {e}");
        }
        // A chunk list that does not cover the section is refused by count.
        let mut json = header_json(&bytes);
        json["data_chunk_checksums"].as_array_mut().unwrap().pop();
        let e = verify_bytes(Path::new("short.llmc"), &with_header_json(&bytes, &json)).unwrap_err().to_string();
        assert!(e.contains("1 data chunk checksums for a data section of 2 chunks"), "{e}");
        // Without chunk sums (an artifact written before them) the whole-section sum is checked.
        json.as_object_mut().unwrap().remove("data_chunk_checksums");
        let old = with_header_json(&bytes, &json);
        verify_bytes(Path::new("old.llmc"), &old).unwrap();
        let mut flipped = old.clone();
        flipped[(back.data_offset + DATA_CHUNK_BYTES + 3) as usize] ^= 1;
        let e = verify_bytes(Path::new("old.llmc"), &flipped).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch in the data section"), "{e}");
    }
}
