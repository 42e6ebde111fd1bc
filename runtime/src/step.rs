//! The step contract: one call runs a ragged batch of sequences through an entry point.
//!
//! A step takes, for each sequence of the batch, its new tokens, its own KV cache ([`KvCache`]:
//! the state buffers of one sequence and the number of tokens they hold) and which logit rows
//! to return ([`Logits`]); it appends the tokens to each cache and returns the rows asked for
//! ([`StepOutput`]). An [`Executor`] owns what a step needs besides the caches: the activation
//! arena, the thread pool and, per entry point of the artifact, the kernel calls with their
//! argument arrays. Entry points share weights and states ([`crate::artifact::EntryPoint`]);
//! `forward` is the one every artifact has.
//!
//! ```text
//! Executor::step(forward, [ {cache A, tokens a0..a6, Logits::Last},     prefill of A
//!                           {cache B, tokens b9,     Logits::All } ])   decode of B
//!   check every sequence (nothing runs if one is refused)
//!   for each sequence: bind its cache's state buffers into the state arguments,
//!                      run its tokens in chunks of max_chunk, copy out the rows asked for
//! ```
//!
//! What runs today: the sequences of a batch run one after another inside the step, each in
//! chunks of at most `max_chunk` tokens through the entry's whole step list, with the state
//! arguments of the kernel calls re-pointed at that sequence's cache (nothing else is rebuilt);
//! every kernel computes all `S` logit rows of a chunk and only the requested rows are copied
//! out. Caches are contiguous, one buffer per state and sequence. Batched products over the
//! tokens of every sequence of a step, paged caches in a shared pool, and computing only the
//! requested logit rows are the serving work's; the contract does not change for them.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use crate::artifact::{BufferDecl, StateLayout};
use crate::error::{Result, RuntimeError};
use crate::model::Model;
use crate::pool::{Call, Pool};

/// Page-aligned, zeroed memory from an anonymous mapping: the kernel hands out zero pages as
/// they are first touched, so a KV cache sized for the whole context costs nothing until its rows
/// are written (a 1.7B model's 4096-token cache is 1.5 GiB; zeroing it eagerly took longer than
/// verifying the artifact), and resetting one gives its pages back instead of writing zeros.
pub(crate) struct AlignedBuf {
    pub(crate) ptr: *mut u8,
    map: memmap2::MmapMut,
}

impl AlignedBuf {
    pub(crate) fn new(bytes: usize) -> Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(64))
            .map_err(|e| RuntimeError::Other(format!("out of memory mapping {bytes} bytes: {e}")))?;
        Ok(AlignedBuf { ptr: map.as_mut_ptr(), map })
    }

    /// Zeroes the buffer: its pages are released, and read as zeros when next touched.
    fn zero(&mut self) {
        // SAFETY: the mapping is private and anonymous, so MADV_DONTNEED zero-fills it on the next
        // access; no reference into it is live (`&mut self`; the kernels' pointers are only used
        // during a step, which holds the cache mutably).
        if unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }.is_err() {
            self.map.fill(0);
        }
    }
}

/// An entry point of a loaded model ([`Model::entry`], [`Model::forward_entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId(pub(crate) usize);

impl EntryId {
    /// Its index in the header's entry list.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Which logit rows of a sequence's tokens a step returns. Positions count from the first token
/// of this step (`0..tokens.len()`), whatever the cache already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logits {
    /// No rows (a prefill whose next token is not wanted yet).
    None,
    /// The last token's row: the next-token distribution.
    Last,
    /// Every token's row, in order.
    All,
    /// These tokens' rows, in the order given (repeats allowed).
    Positions(Vec<usize>),
}

impl Logits {
    /// How many rows a sequence of `n` tokens returns.
    pub fn rows(&self, n: usize) -> usize {
        match self {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => n,
            Logits::Positions(p) => p.len(),
        }
    }

    /// The `k`-th row returned for `n` tokens: the position it comes from.
    fn position(&self, k: usize, n: usize) -> usize {
        match self {
            Logits::None => unreachable!("no rows are returned"),
            Logits::Last => n - 1,
            Logits::All => k,
            Logits::Positions(p) => p[k],
        }
    }
}

/// One sequence of a step: its cache, its new tokens, the logit rows wanted.
pub struct StepInput<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// The logits a step returned: per sequence of the batch, in batch order, the rows its
/// [`Logits`] asked for, row-major `[rows, vocab]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    pub vocab: usize,
    pub logits: Vec<Vec<f32>>,
}

impl StepOutput {
    /// The `k`-th returned row of sequence `seq`.
    pub fn row(&self, seq: usize, k: usize) -> Option<&[f32]> {
        self.logits.get(seq)?.get(k * self.vocab..(k + 1) * self.vocab)
    }
    pub fn into_logits(self) -> Vec<Vec<f32>> {
        self.logits
    }
}

/// Where a cache's state buffers live.
enum CacheStore {
    Host(Vec<AlignedBuf>),
    #[cfg(feature = "cuda")]
    Device(crate::cuda::DeviceCache),
}

/// One sequence's KV cache: a buffer per state of the artifact (zeroed when made) and the number
/// of tokens they hold. It belongs to the model it was made for; a step of another model's
/// executor refuses it. For a CUDA artifact the buffers are in device memory.
pub struct KvCache {
    model: Arc<Model>,
    store: CacheStore,
    len: usize,
}

// SAFETY: the buffers are owned by the cache and only touched through `&mut KvCache` (or by the
// kernels of a step that holds it).
unsafe impl Send for KvCache {}

impl KvCache {
    /// An empty cache for `model`: one zeroed buffer per state, each as large as the header says.
    pub fn new(model: &Arc<Model>) -> Result<KvCache> {
        #[cfg(feature = "cuda")]
        if let Some(dm) = &model.gpu {
            let store = CacheStore::Device(crate::cuda::DeviceCache::new(dm, &model.artifact)?);
            return Ok(KvCache { model: model.clone(), store, len: 0 });
        }
        let bufs = model
            .header()
            .states
            .iter()
            .map(|s| match s.layout {
                // One buffer of every row, bound whole to the kernels' state arguments.
                StateLayout::Contiguous | StateLayout::Int8 => AlignedBuf::new(s.bytes as usize),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { model: model.clone(), store: CacheStore::Host(bufs), len: 0 })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens cached: the `P` of this sequence's next step.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets all but the first `len` cached tokens (no effect when `len >= self.len()`), as
    /// when speculative decoding rejects drafted tokens. Nothing is cleared: the next step writes
    /// its rows from position `len` on, and no kernel reads rows at or past `P + S`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The host buffers, or `None` for a device cache.
    fn host(&self) -> Option<&[AlignedBuf]> {
        match &self.store {
            CacheStore::Host(bufs) => Some(bufs),
            #[cfg(feature = "cuda")]
            CacheStore::Device(_) => None,
        }
    }

    /// Empties the cache and zeroes its buffers, ready for a new sequence.
    pub fn reset(&mut self) {
        match &mut self.store {
            CacheStore::Host(bufs) => bufs.iter_mut().for_each(AlignedBuf::zero),
            #[cfg(feature = "cuda")]
            CacheStore::Device(c) => {
                if let Some(dm) = &self.model.gpu {
                    // A failed clear leaves stale rows that no kernel reads (rows past `P + S`).
                    let _ = c.reset(dm);
                }
            }
        }
        self.len = 0;
    }
}

/// Checks one sequence against `model` before anything runs: tokens present and in the
/// vocabulary, room in the context, logit positions among the tokens. The errors are the ones a
/// single sequence has always had.
pub(crate) fn check_sequence(model: &Model, cached: usize, tokens: &[u32], logits: &Logits) -> Result<()> {
    if tokens.is_empty() {
        return Err(RuntimeError::EmptyInput);
    }
    let vocab = model.token_vocab_size();
    if let Some((index, &id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(RuntimeError::TokenOutOfRange { id: id as i64, index, vocab });
    }
    let needed = cached + tokens.len();
    if needed > model.max_context() {
        return Err(RuntimeError::ContextOverflow { needed, max_context: model.max_context() });
    }
    if let Logits::Positions(p) = logits {
        if let Some(&bad) = p.iter().find(|&&i| i >= tokens.len()) {
            return Err(RuntimeError::InvalidArgument(format!(
                "logits position {bad} is past the {} tokens of this step (positions count from its first token)",
                tokens.len()
            )));
        }
    }
    Ok(())
}

/// One entry point's kernel calls on the CPU.
struct CpuEntry {
    calls: Vec<Call>,
    /// Per call, its kernel-ABI pointer array (`calls[i].args` points into `args[i]`, whose
    /// memory never moves; cells, so state arguments can be re-pointed through a shared
    /// reference while the calls keep pointing at them).
    args: Vec<Box<[Cell<*mut u8>]>>,
    /// `(call, argument, state)` for every argument that is a state buffer.
    state_args: Vec<(usize, usize, usize)>,
    /// The header step of each call (for profiles).
    steps: Vec<usize>,
    input: *mut i32,
    output: *const f32,
    /// The logits head ([`abi::artifact::LogitsHead`]): its first call, the buffer it reads its
    /// rows from, and the bytes of one row.
    head: Option<(usize, *mut u8, usize)>,
}

impl CpuEntry {
    /// Points every state argument at `states`' buffers.
    fn bind(&self, states: &[AlignedBuf]) {
        for &(c, a, s) in &self.state_args {
            self.args[c][a].set(states[s].ptr);
        }
    }
}

/// Runs steps of one model: the activation arena, the thread pool and every entry point's kernel
/// calls. Caches are not part of it: any number of [`KvCache`]s of the same model run through one
/// executor, one step at a time.
pub struct Executor {
    model: Arc<Model>,
    _arena: AlignedBuf,
    entries: Vec<CpuEntry>,
    pool: Pool,
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::DeviceExecutor>,
}

// SAFETY: the raw pointers point into memory the executor owns (arena, argument arrays), the
// model's read-only map (kept alive through the Arc), or a cache's buffers, bound only for the
// duration of a step that borrows the cache mutably.
unsafe impl Send for Executor {}

impl Executor {
    /// An executor running each kernel split across `threads` threads (1: the caller's alone).
    pub fn new(model: Arc<Model>, threads: usize) -> Result<Executor> {
        #[cfg(feature = "cuda")]
        if let Some(dm) = &model.gpu {
            let gpu = crate::cuda::DeviceExecutor::new(dm, &model.artifact)?;
            return Ok(Executor { _arena: AlignedBuf::new(64)?, entries: Vec::new(), pool: Pool::new(1), gpu: Some(gpu), model });
        }
        let h = model.header();
        let arena = AlignedBuf::new(h.arena_bytes as usize)?;
        let data = model.artifact.data().as_ptr();
        // State arguments stay null until a cache is bound.
        let buf_ptr = |i: u32| -> *mut u8 {
            match &h.buffers[i as usize] {
                // SAFETY (both): offsets were validated against their regions at load.
                BufferDecl::Data { offset, .. } => unsafe { data.add(*offset as usize) as *mut u8 },
                BufferDecl::Arena { offset, .. } => unsafe { arena.ptr.add(*offset as usize) },
                BufferDecl::State { .. } => std::ptr::null_mut(),
                // Read only: kernels load function pointers from it.
                BufferDecl::Microkernels { .. } => crate::ukernel::table().as_ptr() as *mut u8,
            }
        };
        let mut entries = Vec::with_capacity(h.entries.len());
        for e in &h.entries {
            let steps: Vec<usize> = e.step_indices().collect();
            let args: Vec<Box<[Cell<*mut u8>]>> =
                steps.iter().map(|&i| h.steps[i].args.iter().map(|&a| Cell::new(buf_ptr(a))).collect()).collect();
            let mut state_args = Vec::new();
            for (c, &i) in steps.iter().enumerate() {
                for (a, &b) in h.steps[i].args.iter().enumerate() {
                    if let BufferDecl::State { index } = h.buffers[b as usize] {
                        state_args.push((c, a, index as usize));
                    }
                }
            }
            let calls = steps
                .iter()
                .zip(&args)
                .map(|(&i, a)| Call { kernel: model.kernels[h.steps[i].kernel as usize], args: a.as_ptr() as *const *mut u8 })
                .collect();
            let (input, output) = (buf_ptr(e.input) as *mut i32, buf_ptr(e.output) as *const f32);
            let head = e.head.map(|hd| (hd.first as usize, buf_ptr(hd.input), hd.row_bytes as usize));
            entries.push(CpuEntry { calls, args, state_args, steps, input, output, head });
        }
        Ok(Executor {
            model,
            _arena: arena,
            entries,
            pool: Pool::new(threads),
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Threads each kernel is split across.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Checks a batch as [`step`](Self::step) does before running anything: the entry exists,
    /// every cache belongs to this model, and every sequence passes the single-sequence checks
    /// (tokens present and in the vocabulary, room in the context, logit positions among the
    /// tokens). In a batch of more than one, the error names the sequence
    /// ([`RuntimeError::Sequence`]); a batch of one gets the sequence's own error.
    pub fn check(&self, entry: EntryId, batch: &[StepInput<'_>]) -> Result<()> {
        if entry.0 >= self.model.header().entries.len() {
            return Err(RuntimeError::InvalidArgument(format!(
                "entry point {} does not exist: {} has {}",
                entry.0,
                self.model.path().display(),
                self.model.header().entries.len()
            )));
        }
        let one = batch.len() == 1;
        for (index, seq) in batch.iter().enumerate() {
            let r = if !Arc::ptr_eq(&seq.cache.model, &self.model) {
                Err(RuntimeError::InvalidArgument(format!(
                    "the KV cache was made for another loaded model ({}), not for {}",
                    seq.cache.model.path().display(),
                    self.model.path().display()
                )))
            } else {
                check_sequence(&self.model, seq.cache.len, seq.tokens, &seq.logits)
            };
            r.map_err(|e| if one { e } else { RuntimeError::Sequence { index, source: Box::new(e) } })?;
        }
        Ok(())
    }

    /// Runs one step of entry point `entry`: appends each sequence's tokens to its cache and
    /// returns the logit rows each asked for. Every sequence is checked first
    /// ([`check`](Self::check)); when one is refused nothing runs and no cache changes.
    ///
    /// Today the sequences run one after another, each in chunks of at most `max_chunk` tokens
    /// through the entry's steps with the kernels' state arguments pointed at its cache; every
    /// chunk computes all its logit rows and the requested ones are copied out (see the module
    /// documentation for what later work changes underneath).
    pub fn step(&mut self, entry: EntryId, batch: &mut [StepInput<'_>]) -> Result<StepOutput> {
        self.check(entry, batch)?;
        let vocab = self.model.vocab_size();
        let mut logits = Vec::with_capacity(batch.len());
        for seq in batch.iter_mut() {
            logits.push(self.run_sequence(entry, seq.cache, seq.tokens, &seq.logits)?);
        }
        Ok(StepOutput { vocab, logits })
    }

    /// Runs one checked sequence; returns its requested rows.
    fn run_sequence(&mut self, entry: EntryId, cache: &mut KvCache, tokens: &[u32], want: &Logits) -> Result<Vec<f32>> {
        let vocab = self.model.vocab_size();
        let chunk = self.model.header().max_chunk as usize;
        let n = tokens.len();
        let nrows = want.rows(n);
        let mut out = vec![0f32; nrows * vocab];
        for (ci, part) in tokens.chunks(chunk).enumerate() {
            let start = ci * chunk;
            let s = part.len();
            // (row of `out`, row of this chunk's logits) for the requested rows in this chunk.
            let rows: Vec<(usize, usize)> = (0..nrows)
                .map(|k| (k, want.position(k, n)))
                .filter(|&(_, p)| p >= start && p < start + s)
                .map(|(k, p)| (k, p - start))
                .collect();
            #[cfg(feature = "cuda")]
            if let Some(g) = &mut self.gpu {
                let (Some(dm), CacheStore::Device(dc)) = (&self.model.gpu, &cache.store) else {
                    return Err(RuntimeError::Other("bug: a CUDA executor was given a host cache".into()));
                };
                let chunk_rows: Vec<usize> = rows.iter().map(|&(_, r)| r).collect();
                let got = g.run(dm, entry.0, dc, part, cache.len, vocab, &chunk_rows)?;
                cache.len += s;
                for (j, &(k, _)) in rows.iter().enumerate() {
                    out[k * vocab..(k + 1) * vocab].copy_from_slice(&got[j * vocab..(j + 1) * vocab]);
                }
                continue;
            }
            let e = &self.entries[entry.0];
            let Some(states) = cache.host() else {
                return Err(RuntimeError::Other("bug: a CPU executor was given a device cache".into()));
            };
            if ci == 0 {
                e.bind(states);
            }
            // SAFETY: the input buffer holds max_chunk i32s (validated at load); s <= max_chunk.
            unsafe {
                for (i, &id) in part.iter().enumerate() {
                    *e.input.add(i) = id as i32;
                }
            }
            // The logits head (final norm, LM head) is row-wise: a chunk that wants no rows skips
            // it, one of several tokens that wants only its last row runs it for that row alone,
            // moved to row 0 (a one-token step runs it with the rest: one job, not two).
            let head = e.head.filter(|_| rows.iter().all(|&(_, r)| r + 1 == s) && (s > 1 || rows.is_empty()));
            // SAFETY: every pointer covers its buffer at the largest step (the state arguments
            // point at this cache's buffers, sized by the header); P + S <= max_context. The
            // head's input buffer holds max_chunk rows of `row` bytes (validated at load), and
            // only the head reads it, so its row 0 may be overwritten once the body has run.
            unsafe {
                match head {
                    Some((first, x, row)) => {
                        self.pool.run(&e.calls[..first], s as i64, cache.len as i64);
                        if !rows.is_empty() {
                            if s > 1 {
                                std::ptr::copy_nonoverlapping(x.add((s - 1) * row), x, row);
                            }
                            self.pool.run(&e.calls[first..], 1, (cache.len + s - 1) as i64);
                        }
                    }
                    None => self.pool.run(&e.calls, s as i64, cache.len as i64),
                }
            }
            cache.len += s;
            // SAFETY: the output buffer holds s * vocab f32s after the steps ran (the head's one
            // row at row 0 when it ran for the last row alone).
            let logits = unsafe { std::slice::from_raw_parts(e.output, s * vocab) };
            for &(k, r) in &rows {
                let r = if head.is_some() { 0 } else { r };
                out[k * vocab..(k + 1) * vocab].copy_from_slice(&logits[r * vocab..(r + 1) * vocab]);
            }
        }
        Ok(out)
    }

    /// Runs `tokens` (at most `max_chunk`) of one sequence through `entry` like a step, timing
    /// each kernel launch separately (all threads, one launch at a time, so the times add up to
    /// a little more than a normal step). Returns `(step label, kernel name, seconds)` in step
    /// order; the cache advances as with a step. CPU artifacts only.
    pub fn profile(&mut self, entry: EntryId, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<(String, String, f64)>> {
        self.check(entry, &[StepInput { cache: &mut *cache, tokens, logits: Logits::None }])?;
        let chunk = self.model.header().max_chunk as usize;
        if tokens.len() > chunk {
            return Err(RuntimeError::Other(format!("profile_step takes at most {chunk} tokens, got {}", tokens.len())));
        }
        let e = &self.entries[entry.0];
        let Some(states) = cache.host() else {
            return Err(RuntimeError::InvalidArgument("per-kernel profiles are for CPU artifacts only".into()));
        };
        e.bind(states);
        // SAFETY: as in `run_sequence`.
        unsafe {
            for (i, &id) in tokens.iter().enumerate() {
                *e.input.add(i) = id as i32;
            }
        }
        let h = self.model.header();
        let mut out = Vec::with_capacity(e.calls.len());
        for (c, &i) in e.steps.iter().enumerate() {
            let t = Instant::now();
            // SAFETY: as in `run_sequence`; steps run in order, one at a time.
            unsafe { self.pool.run(&e.calls[c..c + 1], tokens.len() as i64, cache.len as i64) };
            let step = &h.steps[i];
            out.push((step.label.clone(), h.kernels[step.kernel as usize].name.clone(), t.elapsed().as_secs_f64()));
        }
        cache.len += tokens.len();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    /// Resident pages of `buf` (mincore), out of its `pages`.
    fn resident(buf: &AlignedBuf, bytes: usize) -> usize {
        let page = 4096;
        let pages = bytes.div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: the range is the buffer's own page-aligned mapping; `v` has one byte per page.
        let r = unsafe { libc::mincore(buf.ptr as *mut libc::c_void, bytes, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore failed");
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn a_cache_buffer_costs_nothing_until_written_and_reset_gives_pages_back() {
        let bytes = 64 << 20;
        let mut buf = AlignedBuf::new(bytes).unwrap();
        assert_eq!(buf.ptr as usize % 4096, 0, "page-aligned (the kernels need 64)");
        assert_eq!(resident(&buf, bytes), 0, "a fresh buffer touches no page");
        // SAFETY: within the buffer.
        let s = unsafe { std::slice::from_raw_parts_mut(buf.ptr, bytes) };
        assert!(s.iter().step_by(4096).all(|&b| b == 0), "reads as zeros");
        s[..3 * 4096].fill(7);
        s[bytes - 1] = 9;
        assert!(resident(&buf, bytes) >= 4);
        buf.zero();
        assert!(resident(&buf, bytes) < 4, "reset released the written pages");
        // SAFETY: within the buffer.
        let s = unsafe { std::slice::from_raw_parts(buf.ptr, bytes) };
        assert!(s[..3 * 4096].iter().all(|&b| b == 0) && s[bytes - 1] == 0, "and they read as zeros again");
    }
}
