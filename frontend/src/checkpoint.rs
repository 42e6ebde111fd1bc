//! Checkpoint access: memory-mapped safetensors shards and an index from tensor name to
//! (shard, dtype, shape, byte range).
//!
//! A checkpoint is given as a directory (`config.json` plus `model.safetensors` or
//! `model.safetensors.index.json`), a single `.safetensors` file with `config.json` beside it, or a
//! sharded index file. Every shard is mapped with `memmap2` and its header parsed by
//! `safetensors`, which rejects oversized headers, truncated data and bad offsets; tensor data is
//! only touched when a tensor is read, one tensor at a time, and the pages a read touched are
//! handed back to the kernel right after it, so a model is never resident in RAM as a whole.
//! Every weight read is checked for NaN and infinity, reported with the tensor's name.
//! [`Checkpoint::from_bytes`] indexes a safetensors file already in memory (used by the fuzzers).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use half::{bf16, f16};
use llmc_ir::{DType, IrError, Prefetch, TensorType, WeightSource};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use crate::error::{FrontendError, Result};

/// Name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Largest accepted `config.json` or index file: real ones are a few KiB (an index of a model with
/// a million tensors would be ~100 MiB). Bigger files are refused before being read.
pub const MAX_JSON_FILE: u64 = 128 << 20;

/// What the checkpoint says about one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The stored element type, or `None` when it is not one llmc reads (F32, F16, BF16).
    pub dtype: Option<DType>,
    /// The safetensors name of the stored element type (`"BF16"`, `"I64"`, ...), for messages.
    pub stored: String,
    pub shape: Vec<usize>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    data: ShardData,
    /// The open file behind a mapped shard (for [`WeightSource::prefetch`]'s read-ahead).
    file: Option<File>,
}

/// A shard's bytes: a read-only file mapping, or a buffer given to [`Checkpoint::from_bytes`].
#[derive(Debug)]
enum ShardData {
    Map(Mmap),
    Bytes(Vec<u8>),
}

impl ShardData {
    fn bytes(&self) -> &[u8] {
        match self {
            ShardData::Map(m) => m,
            ShardData::Bytes(b) => b,
        }
    }

    /// Drops the pages of `range` from this process's resident set (mapped files only). The
    /// mapping is read-only and file-backed, so the next access simply reads the file again.
    fn release(&self, range: std::ops::Range<usize>) {
        if let ShardData::Map(m) = self {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping discards no data: the
            // contents stay those of the file (re-read on the next access); the range is in bounds
            // (checked when the shard was indexed). Failure only means the pages stay resident.
            let _ = unsafe { m.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) };
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the shard's mapping (header included in the offset).
    start: usize,
    end: usize,
}

/// An opened checkpoint. The mappings are read-only; as with any memory map, the files must not be
/// modified while the checkpoint is open.
#[derive(Debug)]
pub struct Checkpoint {
    shards: Vec<Shard>,
    index: BTreeMap<String, Entry>,
    /// Bytes of tensor data read so far (including the tensors being read): how far a prefetch
    /// may run ahead is measured from it.
    loaded: Arc<AtomicU64>,
}

fn io_err(path: &Path, source: std::io::Error) -> FrontendError {
    if source.kind() == std::io::ErrorKind::NotFound {
        FrontendError::NotFound { path: path.to_path_buf() }
    } else {
        FrontendError::Io { path: path.to_path_buf(), source }
    }
}

fn ir_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens the checkpoint at `path` and returns it with the path of its `config.json`.
    pub fn open(path: &Path) -> Result<(Checkpoint, PathBuf)> {
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        let (dir, files) = if meta.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (dir, Some(path.to_path_buf()))
        };
        let config = dir.join(CONFIG_FILE);
        if !config.is_file() {
            return Err(FrontendError::MissingConfig { dir });
        }
        check_json_size(&config)?;
        let file = match files {
            Some(f) => f,
            None => {
                let index = dir.join(INDEX_FILE);
                if index.is_file() {
                    index
                } else {
                    dir.join(SINGLE_FILE)
                }
            }
        };
        let is_index = file.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"));
        let ckpt = if is_index { Self::open_index(&file)? } else { Self::open_files(&[file])? };
        Ok((ckpt, config))
    }

    /// Opens a sharded checkpoint from its index; every shard the `weight_map` names is mapped, and
    /// each mapping is checked against the shard's actual contents.
    fn open_index(index: &Path) -> Result<Checkpoint> {
        let bad = |msg: String| FrontendError::InvalidIndex { index: index.to_path_buf(), msg };
        check_json_size(index)?;
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| FrontendError::ConfigNotJson { path: index.to_path_buf(), msg: e.to_string() })?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(bad("no `weight_map` object".into()));
        };
        let dir = index.parent().unwrap_or_else(|| Path::new("."));
        let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(map.len());
        let mut names = BTreeSet::new();
        for (tensor, shard) in map {
            let Some(shard) = shard.as_str() else {
                return Err(bad(format!("weight_map entry `{tensor}` is not a file name")));
            };
            wanted.push((tensor, shard));
            names.insert(shard);
        }
        if names.is_empty() {
            return Err(bad("`weight_map` is empty".into()));
        }
        let mut files = Vec::with_capacity(names.len());
        for name in &names {
            let p = dir.join(name);
            if !p.is_file() {
                return Err(FrontendError::MissingShard { index: index.to_path_buf(), shard: p });
            }
            files.push(p);
        }
        let ckpt = Self::open_files(&files).map_err(|e| match e {
            FrontendError::InvalidIndex { msg, .. } => bad(msg),
            e => e,
        })?;
        for (tensor, shard) in wanted {
            let p = dir.join(shard);
            match ckpt.index.get(tensor) {
                Some(e) if ckpt.shards.get(e.shard).is_some_and(|s| s.path == p) => {}
                _ => return Err(bad(format!("weight_map puts `{tensor}` in {shard}, which does not hold it"))),
            }
        }
        Ok(ckpt)
    }

    /// Maps each file and indexes its tensors; a name held by two shards is an error.
    fn open_files(files: &[PathBuf]) -> Result<Checkpoint> {
        let mut ckpt = Checkpoint { shards: Vec::with_capacity(files.len()), index: BTreeMap::new(), loaded: Arc::default() };
        for path in files {
            let file = File::open(path).map_err(|e| io_err(path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint file modified while open is outside
            // what llmc supports (as for every reader of memory-mapped weights).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
            // Each tensor is read front to back, once: ask for large read-ahead on page faults.
            // (No MADV_WILLNEED on the whole map: Linux caps it at one read-ahead window, a few
            // MiB at the file's start; [`WeightSource::prefetch`] reads ahead in the order the
            // tensors are used instead.) Advice only: failure changes nothing.
            let _ = map.advise(memmap2::Advice::Sequential);
            ckpt.add_shard(path, ShardData::Map(map), Some(file))?;
        }
        Ok(ckpt)
    }

    /// A one-shard checkpoint from a safetensors file already in memory, checked exactly as
    /// [`open`](Self::open) checks a file; `path` only names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Checkpoint> {
        let mut ckpt = Checkpoint { shards: Vec::new(), index: BTreeMap::new(), loaded: Arc::default() };
        ckpt.add_shard(path, ShardData::Bytes(bytes), None)?;
        Ok(ckpt)
    }

    /// Parses a shard's header, indexes its tensors and keeps the shard.
    fn add_shard(&mut self, path: &Path, data: ShardData, file: Option<File>) -> Result<()> {
        let bytes = data.bytes();
        let st_err = |msg: String| FrontendError::Safetensors { path: path.to_path_buf(), msg };
        let (n, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| st_err(explain(bytes, e.to_string())))?;
        let data_start = n.checked_add(8).ok_or_else(|| st_err("header length overflows".into()))?;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let (s, e) = info.data_offsets;
            let (Some(start), Some(end)) = (data_start.checked_add(s), data_start.checked_add(e)) else {
                return Err(st_err(format!("offsets of `{name}` overflow")));
            };
            if start > end || end > bytes.len() {
                return Err(st_err(format!("offsets of `{name}` lie outside the file")));
            }
            let entry = Entry { shard, dtype: info.dtype, shape: info.shape.clone(), start, end };
            if let Some(prev) = self.index.insert(name.clone(), entry) {
                let other = self.shards.get(prev.shard).map(|s| s.path.display().to_string()).unwrap_or_default();
                return Err(FrontendError::InvalidIndex {
                    index: path.to_path_buf(),
                    msg: format!("tensor `{name}` appears in both {other} and {}", path.display()),
                });
            }
        }
        self.shards.push(Shard { path: path.to_path_buf(), data, file });
        Ok(())
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Dtype and shape of `name`, without reading its data.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.index.get(name).map(|e| TensorInfo { dtype: ir_dtype(e.dtype), stored: e.dtype.to_string(), shape: e.shape.clone() })
    }

    /// The shard file holding `name`.
    pub fn shard_path(&self, name: &str) -> Option<&Path> {
        self.index.get(name).and_then(|e| self.shards.get(e.shard)).map(|s| s.path.as_path())
    }
    /// Checks the model-wide tensors, then each layer's, layer by layer: a layer count that
    /// disagrees with the checkpoint fails on the first missing layer, before later layers'
    /// tensor lists are even built.
    pub fn check_layered(
        &self,
        globals: Vec<(String, Vec<usize>)>,
        layers: usize,
        layer: impl Fn(usize) -> Vec<(String, Vec<usize>)>,
    ) -> Result<()> {
        for (name, shape) in globals {
            self.check_tensor(&name, &shape)?;
        }
        for i in 0..layers {
            for (name, shape) in layer(i) {
                self.check_tensor(&name, &shape)?;
            }
        }
        Ok(())
    }


    /// Checks that `name` exists, is stored as F32/F16/BF16 and has shape `expected`; returns its
    /// stored dtype.
    pub fn check_tensor(&self, name: &str, expected: &[usize]) -> Result<DType> {
        let e = self.index.get(name).ok_or_else(|| FrontendError::MissingTensor { name: name.to_string() })?;
        let dtype = ir_dtype(e.dtype)
            .ok_or_else(|| FrontendError::UnsupportedDtype { name: name.to_string(), dtype: e.dtype.to_string() })?;
        if e.shape != expected {
            return Err(FrontendError::ShapeMismatch { name: name.to_string(), expected: expected.to_vec(), found: e.shape.clone() });
        }
        Ok(dtype)
    }

    /// Reads `name` converted to f32, row-major. The pages the read touched are released from
    /// the resident set afterwards, so streaming every tensor once keeps at most one in RAM.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.index.get(name).ok_or_else(|| FrontendError::MissingTensor { name: name.to_string() })?;
        let shard = self.shards.get(e.shard);
        let bytes = shard
            .and_then(|s| s.data.bytes().get(e.start..e.end))
            .ok_or_else(|| FrontendError::Tensor { name: name.to_string(), msg: "byte range outside its shard".into() })?;
        let size = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            d => return Err(FrontendError::UnsupportedDtype { name: name.to_string(), dtype: d.to_string() }),
        };
        // Counted before reading: a prefetch may run ahead of the end of the tensor being read.
        self.loaded.fetch_add((e.end - e.start) as u64, Ordering::Relaxed);
        let values = to_f32(bytes, e.dtype, size);
        if let Some(s) = shard {
            s.data.release(e.start..e.end);
        }
        Ok(values)
    }
}

/// How far (bytes of tensor data) a prefetch runs ahead of the reads.
const PREFETCH_AHEAD: u64 = 64 << 20;
/// Bytes per read-ahead request: at most the 2 MiB Linux reads per step, and within the cap
/// (`max(read_ahead_kb, max_sectors_kb)`) it puts on one request on common devices.
const PREFETCH_STEP: u64 = 1 << 20;

/// The background reading of [`Checkpoint`]'s [`WeightSource::prefetch`]: a thread that asks the
/// kernel to read the tensors' byte ranges into the page cache (`readahead(2)`: no copy, nothing
/// mapped), in the order the tensors will be used, staying at most [`PREFETCH_AHEAD`] bytes ahead
/// of the reads. It ends when every range was requested, on the first refused request, or when
/// dropped.
struct Prefetcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            // The thread never panics (no indexing, no unwrap); a join error changes nothing.
            let _ = t.join();
        }
    }
}

#[cfg(target_os = "linux")]
fn prefetch_ranges(files: Vec<File>, ranges: Vec<(usize, u64, u64)>, loaded: Arc<AtomicU64>) -> Prefetch {
    use std::os::fd::AsRawFd;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let base = loaded.load(Ordering::Relaxed);
    let run = move || {
        let mut issued = 0u64;
        for (f, start, end) in ranges {
            let Some(file) = files.get(f) else { return };
            let mut off = start;
            while off < end {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let read = loaded.load(Ordering::Relaxed).saturating_sub(base);
                if issued > read + PREFETCH_AHEAD {
                    std::thread::park_timeout(std::time::Duration::from_millis(1));
                    continue;
                }
                let len = PREFETCH_STEP.min(end - off);
                // SAFETY: a plain system call on an open descriptor; it only schedules reads of
                // the file into the page cache.
                let r = unsafe { libc::readahead(file.as_raw_fd(), off as libc::off64_t, len as usize) };
                if r != 0 {
                    return; // not supported here (or the file changed): prefetch is advice only
                }
                off += len;
                issued += len;
            }
        }
    };
    match std::thread::Builder::new().name("llmc-prefetch".into()).spawn(run) {
        Ok(t) => Prefetch::new(Prefetcher { stop, thread: Some(t) }),
        Err(_) => Prefetch::none(),
    }
}

#[cfg(not(target_os = "linux"))]
fn prefetch_ranges(_: Vec<File>, _: Vec<(usize, u64, u64)>, _: Arc<AtomicU64>) -> Prefetch {
    Prefetch::none()
}

/// Size from which [`to_f32`] splits a tensor over threads.
const CONVERT_PARALLEL_BYTES: usize = 4 << 20;

/// `bytes` (elements of `size` bytes, `dtype` F32, F16 or BF16) as f32; large tensors are
/// converted on all cores (each thread also takes the page faults of its part of the mapping).
fn to_f32(bytes: &[u8], dtype: Dtype, size: usize) -> Vec<f32> {
    fn convert(dst: &mut [f32], src: &[u8], dtype: Dtype) {
        match dtype {
            Dtype::F32 => dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(d, c)| *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, c)| *d = f16::from_le_bytes([c[0], c[1]]).to_f32()),
            _ => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, c)| *d = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        }
    }
    let mut v = vec![0.0f32; bytes.len() / size];
    let threads = if bytes.len() >= CONVERT_PARALLEL_BYTES { llmc_ir::threads::available().min(8) } else { 1 };
    if threads <= 1 {
        convert(&mut v, bytes, dtype);
        return v;
    }
    // Thread `t` takes blocks t, t + threads, ...: together the threads move through the tensor
    // front to back, which keeps the kernel's read-ahead on a file not yet in memory sequential.
    const BLOCK: usize = 256 << 10; // elements
    let mut work: Vec<Vec<(&mut [f32], &[u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, part) in v.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK * size)).enumerate() {
        work[i % threads].push(part);
    }
    std::thread::scope(|sc| {
        let mut work = work.into_iter();
        let first = work.next();
        for parts in work {
            sc.spawn(move || parts.into_iter().for_each(|(d, s)| convert(d, s, dtype)));
        }
        first.into_iter().flatten().for_each(|(d, s)| convert(d, s, dtype));
    });
    v
}

/// Refuses a JSON file larger than [`MAX_JSON_FILE`] before reading it.
fn check_json_size(path: &Path) -> Result<()> {
    let len = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
    if len > MAX_JSON_FILE {
        let msg = format!("{len} bytes is larger than the {MAX_JSON_FILE}-byte limit for JSON files");
        return Err(FrontendError::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg) });
    }
    Ok(())
}

/// `msg`, safetensors' error for `bytes`, made specific where it does not name the tensor at fault
/// (sizes that disagree with dtype and shape, offsets outside the data or overlapping).
fn explain(bytes: &[u8], msg: String) -> String {
    let header = bytes
        .get(..8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| Some((n, bytes.get(8..8usize.checked_add(n)?)?)));
    let Some((n, header)) = header else { return msg };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(header) else { return msg };
    let data_len = (bytes.len() - 8 - n) as u64;
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, t) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let offs: Option<Vec<u64>> = t.get("data_offsets").and_then(|o| o.as_array()).map(|a| a.iter().filter_map(|x| x.as_u64()).collect());
        let Some(&[s, e]) = offs.as_deref() else { continue };
        if e < s {
            return format!("tensor `{name}`: data_offsets [{s}, {e}] end before they start");
        }
        if e > data_len {
            return format!("tensor `{name}`: data_offsets [{s}, {e}] lie outside the {data_len}-byte data section");
        }
        let bits = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => Some(64u64),
            Some("F32" | "I32" | "U32") => Some(32),
            Some("F16" | "BF16" | "I16" | "U16") => Some(16),
            Some("I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => Some(8),
            _ => None,
        };
        let shape: Option<Vec<u64>> = t.get("shape").and_then(|o| o.as_array()).map(|a| a.iter().filter_map(|x| x.as_u64()).collect());
        let need = shape.as_ref().and_then(|sh| sh.iter().try_fold(bits?, |a, &d| a.checked_mul(d))).map(|b| b / 8);
        if let (Some(need), Some(sh)) = (need, &shape) {
            if need != e - s {
                let dtype = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
                return format!("tensor `{name}`: {dtype} {sh:?} needs {need} bytes, but data_offsets [{s}, {e}] hold {}", e - s);
            }
        }
        spans.push((s, e, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        let ((s0, e0, a), (s1, e1, b)) = (w[0], w[1]);
        if s1 < e0 {
            return format!("tensors `{a}` [{s0}, {e0}] and `{b}` [{s1}, {e1}] overlap");
        }
    }
    msg
}

/// The index and value of the first NaN or infinity in `v`, if any.
pub fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    // A branch-free test per block (vectorized), the exact position only in a block that fails.
    const BLOCK: usize = 1024;
    let bad = |x: &f32| (x.to_bits() & 0x7f80_0000 == 0x7f80_0000) as u32;
    let b = v.chunks(BLOCK).position(|c| c.iter().map(bad).fold(0, |a, b| a | b) != 0)?;
    let i = b * BLOCK + v[b * BLOCK..].iter().position(|x| !x.is_finite())?;
    Some((i, v[i]))
}

/// The row-major multi-index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    for (a, &d) in at.iter_mut().zip(shape).rev() {
        if d > 0 {
            *a = i % d;
            i /= d;
        }
    }
    at
}

/// Weights for the interpreter and the compiler: checks the element count against the graph's
/// type, converts to f32, and refuses a tensor holding NaN or infinity (naming the first one).
impl WeightSource for Checkpoint {
    fn load(&self, name: &str, ty: &TensorType) -> llmc_ir::Result<Vec<f32>> {
        let werr = |msg: String| IrError::Weight { name: name.to_string(), msg };
        let e = self.index.get(name).ok_or_else(|| werr("not found in the checkpoint".into()))?;
        let have = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match (have, ty.static_numel()) {
            (Some(h), Some(w)) if h == w => {}
            _ => return Err(werr(format!("checkpoint shape {:?} does not fit type {ty}", e.shape))),
        }
        let v = self.read_f32(name).map_err(|err| werr(err.to_string()))?;
        if let Some((i, x)) = first_non_finite(&v) {
            let at = unravel(i, &e.shape);
            return Err(werr(format!("element {at:?} (flat index {i}) is {x}: the checkpoint holds non-finite weights")));
        }
        Ok(v)
    }

    /// Reads the tensors' bytes into the page cache on a background thread, in `names`' order,
    /// a bounded distance ahead of [`load`](WeightSource::load); unknown names and names given
    /// twice are skipped. Checkpoints from memory and systems other than Linux prefetch nothing.
    fn prefetch(&self, names: &[&str]) -> Prefetch {
        let mut seen = BTreeSet::new();
        let mut files: Vec<File> = Vec::new();
        let mut fd_of: BTreeMap<usize, usize> = BTreeMap::new();
        let mut ranges = Vec::new();
        for &name in names {
            let Some(e) = self.index.get(name) else { continue };
            if !seen.insert(name) || e.start == e.end {
                continue;
            }
            let f = match fd_of.get(&e.shard) {
                Some(&f) => f,
                None => {
                    let Some(dup) = self.shards.get(e.shard).and_then(|s| s.file.as_ref()).and_then(|f| f.try_clone().ok()) else {
                        continue;
                    };
                    files.push(dup);
                    fd_of.insert(e.shard, files.len() - 1);
                    files.len() - 1
                }
            };
            ranges.push((f, e.start as u64, e.end as u64));
        }
        if ranges.is_empty() {
            return Prefetch::none();
        }
        prefetch_ranges(files, ranges, self.loaded.clone())
    }
}
