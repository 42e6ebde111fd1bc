//! A loaded model and its sessions.
//!
//! A [`Model`] is an opened artifact with its code mapped executable; it is immutable and shared.
//! A [`Session`] owns what one conversation mutates: the activation arena (sized by the compile-time
//! memory plan) and the KV-cache state. Running a step is a walk over the compile-time step list,
//! each step one call of a compiled kernel with precomputed buffer pointers.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::artifact::{Artifact, BufferDecl, Header};
use crate::error::{Result, RuntimeError};
use crate::exec::{CodeMemory, KernelFn};
use crate::pool::{Call, Pool};

/// All cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
use crate::sample::argmax;

/// A loaded, verified, executable model.
pub struct Model {
    artifact: Artifact,
    _code: CodeMemory,
    kernels: Vec<KernelFn>,
    /// A CUDA artifact's kernels and weights on the GPU.
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::DeviceModel>,
}

// SAFETY: the model is immutable after loading; kernels are pure functions of their buffers.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Opens `path`, verifies it (see [`Artifact::open`]) and maps its code.
    pub fn load(path: &Path) -> Result<Arc<Model>> {
        Self::from_artifact(Artifact::open(path)?)
    }

    /// Verifies and loads an artifact held in memory (see [`Artifact::from_bytes`]: the bytes are
    /// copied, so they need not outlive the call); `name` stands for its path in errors.
    pub fn load_bytes(name: &str, bytes: &[u8]) -> Result<Arc<Model>> {
        Self::from_artifact(Artifact::from_bytes(Path::new(name), bytes)?)
    }

    /// Maps the code of a verified artifact.
    pub fn from_artifact(artifact: Artifact) -> Result<Arc<Model>> {
        if artifact.header.target == crate::artifact::TARGET_CUDA {
            return Self::from_cuda_artifact(artifact);
        }
        let code = CodeMemory::new(artifact.code())?;
        // SAFETY: offsets were validated against the code section and name functions compiled for
        // the kernel ABI by the compiler that wrote this checksummed artifact.
        let kernels = artifact.header.kernels.iter().map(|k| unsafe { code.kernel(k.offset as usize) }).collect();
        Ok(Arc::new(Model {
            artifact,
            _code: code,
            kernels,
            #[cfg(feature = "cuda")]
            gpu: None,
        }))
    }

    #[cfg(feature = "cuda")]
    fn from_cuda_artifact(artifact: Artifact) -> Result<Arc<Model>> {
        let gpu = crate::cuda::DeviceModel::load(&artifact)?;
        Ok(Arc::new(Model { _code: CodeMemory::new(&[])?, kernels: Vec::new(), gpu: Some(gpu), artifact }))
    }

    #[cfg(not(feature = "cuda"))]
    fn from_cuda_artifact(artifact: Artifact) -> Result<Arc<Model>> {
        Err(RuntimeError::Gpu {
            path: artifact.path.clone(),
            msg: "this build of llmc has no CUDA support (rebuild with `--features cuda`; see docs/cuda.md)".into(),
        })
    }

    /// For a CUDA artifact: the GPU's name and the PTX architecture loaded for it.
    pub fn gpu_device(&self) -> Option<(String, String)> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some((g.device.clone(), g.arch.clone()));
        }
        None
    }

    /// For a CUDA artifact: the GPU's peak memory bandwidth in bytes/s, when the driver reports it.
    pub fn gpu_peak_bandwidth(&self) -> Option<f64> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return crate::cuda::peak_bandwidth(g);
        }
        None
    }

    pub fn header(&self) -> &Header {
        &self.artifact.header
    }
    pub fn vocab_size(&self) -> usize {
        self.header().vocab_size as usize
    }
    /// Token ids must be below this: the `vocab_size` meta when present (an encoder's output
    /// width, [`vocab_size`](Self::vocab_size), is its hidden size), else the output width.
    pub fn token_vocab_size(&self) -> usize {
        self.meta("vocab_size").and_then(|v| v.parse().ok()).unwrap_or_else(|| self.vocab_size())
    }
    pub fn max_context(&self) -> usize {
        self.header().max_context as usize
    }
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.header().meta.get(key).map(|s| s.as_str())
    }
    /// End-of-sequence token ids recorded from the checkpoint's config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.meta("eos_token_id")
            .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
    pub fn file_len(&self) -> usize {
        self.artifact.file_len()
    }
    /// The artifact's path (or the name it was loaded under).
    pub fn path(&self) -> &Path {
        &self.artifact.path
    }
    /// A blob the artifact carries (`tokenizer.json`), see [`Artifact::blob`].
    pub fn blob(&self, name: &str) -> Option<&[u8]> {
        self.artifact.blob(name)
    }
}

/// 64-byte aligned, zeroed heap memory.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(bytes: usize) -> Result<Self> {
        let layout = Layout::from_size_align(bytes.max(64), 64).map_err(|e| RuntimeError::Other(e.to_string()))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(RuntimeError::Other(format!("out of memory allocating {bytes} bytes")));
        }
        Ok(AlignedBuf { ptr, layout })
    }
    fn zero(&mut self) {
        // SAFETY: ptr is valid for layout.size() bytes.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Timings of a [`Session::generate`] call.
#[derive(Clone, Debug, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl GenerateStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }
    /// Decode rate over the tokens produced by decode steps (the first new token comes from prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_seconds)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// One conversation: activation arena, KV cache, and the number of cached tokens.
pub struct Session {
    model: Arc<Model>,
    _arena: AlignedBuf,
    states: Vec<AlignedBuf>,
    /// Per step, the kernel-ABI pointer array (`calls` points into these).
    _ptrs: Vec<Vec<*mut u8>>,
    calls: Vec<Call>,
    pool: Pool,
    input: *mut i32,
    output: *const f32,
    past: usize,
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::DeviceSession>,
}

// SAFETY: the raw pointers point into memory the session owns (arena, states) or the model's
// read-only map, which the session keeps alive through its Arc.
unsafe impl Send for Session {}

impl Session {
    /// A session running kernels on all available cores.
    pub fn new(model: Arc<Model>) -> Result<Session> {
        Session::with_threads(model, default_threads())
    }

    /// A session running each kernel split across `threads` threads (1: the caller's alone).
    pub fn with_threads(model: Arc<Model>, threads: usize) -> Result<Session> {
        #[cfg(feature = "cuda")]
        if let Some(dm) = &model.gpu {
            let gpu = crate::cuda::DeviceSession::new(dm, &model.artifact)?;
            return Ok(Session {
                _arena: AlignedBuf::new(64)?,
                states: Vec::new(),
                _ptrs: Vec::new(),
                calls: Vec::new(),
                pool: Pool::new(1),
                input: std::ptr::null_mut(),
                output: std::ptr::null(),
                past: 0,
                gpu: Some(gpu),
                model,
            });
        }
        let h = model.header();
        let arena = AlignedBuf::new(h.arena_bytes as usize)?;
        let states = h.states.iter().map(|s| AlignedBuf::new(s.bytes as usize)).collect::<Result<Vec<_>>>()?;
        let data = model.artifact.data().as_ptr();
        let buf_ptr = |i: u32| -> *mut u8 {
            match &h.buffers[i as usize] {
                // SAFETY (all three): offsets were validated against their regions at load.
                BufferDecl::Data { offset, .. } => unsafe { data.add(*offset as usize) as *mut u8 },
                BufferDecl::Arena { offset, .. } => unsafe { arena.ptr.add(*offset as usize) },
                BufferDecl::State { index } => states[*index as usize].ptr,
                // Read only: kernels load function pointers from it.
                BufferDecl::Microkernels { .. } => crate::ukernel::table().as_ptr() as *mut u8,
            }
        };
        let ptrs: Vec<Vec<*mut u8>> = h.steps.iter().map(|s| s.args.iter().map(|&a| buf_ptr(a)).collect()).collect();
        let calls = h.steps.iter().zip(&ptrs).map(|(s, p)| Call { kernel: model.kernels[s.kernel as usize], args: p.as_ptr() }).collect();
        let input = buf_ptr(h.input) as *mut i32;
        let output = buf_ptr(h.output) as *const f32;
        let pool = Pool::new(threads);
        Ok(Session {
            model,
            _arena: arena,
            states,
            _ptrs: ptrs,
            calls,
            pool,
            input,
            output,
            past: 0,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// Threads each kernel is split across.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens in the KV cache.
    pub fn past(&self) -> usize {
        self.past
    }

    /// Forgets all but the first `len` cached tokens (no effect when `len >= past`), as when
    /// speculative decoding rejects drafted tokens. Nothing is cleared: the next forward writes
    /// its KV rows from position `len` on, and no kernel reads rows at or past `past + S`.
    pub fn truncate(&mut self, len: usize) {
        self.past = self.past.min(len);
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        for s in &mut self.states {
            s.zero();
        }
        #[cfg(feature = "cuda")]
        if let (Some(g), Some(dm)) = (&mut self.gpu, &self.model.gpu) {
            // A failed clear leaves stale rows that no kernel reads (rows past `past + S`).
            let _ = g.reset(dm);
        }
        self.past = 0;
    }

    /// Checks ids against the vocabulary and the context before anything runs.
    pub fn check_input(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let vocab = self.model.token_vocab_size();
        if let Some((index, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(RuntimeError::TokenOutOfRange { id: id as i64, index, vocab });
        }
        let needed = self.past + ids.len();
        if needed > self.model.max_context() {
            return Err(RuntimeError::ContextOverflow { needed, max_context: self.model.max_context() });
        }
        Ok(())
    }

    /// Appends `ids` to the conversation and returns logits: every position's (`[n, vocab]`) when
    /// `all_logits`, else only the last position's (`[vocab]`). Long inputs run in chunks.
    pub fn forward(&mut self, ids: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.check_input(ids)?;
        let vocab = self.model.vocab_size();
        let chunk = self.model.header().max_chunk as usize;
        let mut out = Vec::with_capacity(if all_logits { ids.len() * vocab } else { vocab });
        for (ci, part) in ids.chunks(chunk).enumerate() {
            let s = part.len();
            #[cfg(feature = "cuda")]
            if let (Some(g), Some(dm)) = (&mut self.gpu, &self.model.gpu) {
                let logits = g.run(dm, part, self.past, vocab)?;
                self.past += s;
                if all_logits {
                    out.extend_from_slice(&logits);
                } else if (ci + 1) * chunk >= ids.len() {
                    out.extend_from_slice(&logits[(s - 1) * vocab..]);
                }
                continue;
            }
            // SAFETY: the input buffer holds max_chunk i32s (validated at load); s <= max_chunk.
            unsafe {
                for (i, &id) in part.iter().enumerate() {
                    *self.input.add(i) = id as i32;
                }
            }
            // SAFETY: pointers cover each buffer at its largest size; s + past <= max_context.
            unsafe { self.pool.run(&self.calls, s as i64, self.past as i64) };
            self.past += s;
            // SAFETY: the output buffer holds s * vocab f32s after the steps ran.
            let logits = unsafe { std::slice::from_raw_parts(self.output, s * vocab) };
            if all_logits {
                out.extend_from_slice(logits);
            } else if (ci + 1) * chunk >= ids.len() {
                out.extend_from_slice(&logits[(s - 1) * vocab..]);
            }
        }
        Ok(out)
    }

    /// Runs `ids` (at most `max_chunk` tokens) as one forward step like [`forward`](Self::forward),
    /// timing each kernel launch separately (all threads, one launch at a time, so the times add
    /// up to a little more than a normal step). Returns `(step label, kernel name, seconds)` in
    /// step order; the conversation advances as with `forward`.
    pub fn profile_step(&mut self, ids: &[u32]) -> Result<Vec<(String, String, f64)>> {
        self.check_input(ids)?;
        let chunk = self.model.header().max_chunk as usize;
        if ids.len() > chunk {
            return Err(RuntimeError::Other(format!("profile_step takes at most {chunk} tokens, got {}", ids.len())));
        }
        // SAFETY: as in `forward`.
        unsafe {
            for (i, &id) in ids.iter().enumerate() {
                *self.input.add(i) = id as i32;
            }
        }
        let h = self.model.header();
        let mut out = Vec::with_capacity(self.calls.len());
        for (i, step) in h.steps.iter().enumerate() {
            let t = Instant::now();
            // SAFETY: as in `forward`; steps run in order, one at a time.
            unsafe { self.pool.run(&self.calls[i..i + 1], ids.len() as i64, self.past as i64) };
            let name = h.kernels[step.kernel as usize].name.clone();
            out.push((step.label.clone(), name, t.elapsed().as_secs_f64()));
        }
        self.past += ids.len();
        Ok(out)
    }

    /// Greedy generation: runs `prompt`, then up to `max_new` tokens, stopping after any id in
    /// `stop`. Returns the new ids, the prompt's logits (`[prompt, vocab]`) when asked, and timings.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        want_prompt_logits: bool,
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, Option<Vec<f32>>, GenerateStats)> {
        let vocab = self.model.vocab_size();
        let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
        // The last new token is never fed back, so generation needs `max_new - 1` more rows.
        let needed = self.past + prompt.len() + max_new.saturating_sub(1);
        if needed > self.model.max_context() {
            return Err(RuntimeError::ContextOverflow { needed, max_context: self.model.max_context() });
        }
        let t0 = Instant::now();
        let logits = self.forward(prompt, want_prompt_logits)?;
        stats.prefill_seconds = t0.elapsed().as_secs_f64();
        let last = &logits[logits.len() - vocab..];
        let mut new = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok((new, want_prompt_logits.then_some(logits), stats));
        }
        let mut next = argmax(last) as u32;
        let t1 = Instant::now();
        loop {
            new.push(next);
            on_token(next);
            if new.len() >= max_new || stop.contains(&next) {
                break;
            }
            let l = self.forward(&[next], false)?;
            next = argmax(&l) as u32;
        }
        stats.decode_seconds = t1.elapsed().as_secs_f64();
        stats.generated_tokens = new.len();
        Ok((new, want_prompt_logits.then_some(logits), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{ArtifactWriter, CodeVariant, KernelEntry, Launch, TARGET_CUDA};

    /// A CUDA artifact opens (its checks pass) but loading it where it cannot run is an error
    /// naming the file and the reason, never a panic.
    #[test]
    fn cuda_artifact_without_gpu_support_is_a_clear_error() {
        #[cfg(feature = "cuda")]
        if crate::cuda::unavailable_reason().is_none() {
            eprintln!("SKIP: a GPU is present");
            return;
        }
        let dir = std::env::temp_dir().join(format!("llmc-cuda-nogpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-cuda.llmc");
        let code = b".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() { ret; }\n".to_vec();
        let len = code.len() as u64;
        let launch = Launch { block: 32, per_item: 1, coef: 1, s_pow: 1, p_pow: 0, t_pow: 0 };
        let h = Header {
            target: TARGET_CUDA.into(),
            cpu_features: vec![],
            meta: Default::default(),
            vocab_size: 4,
            max_context: 4,
            max_chunk: 1,
            code_offset: 0,
            code_len: 0,
            data_offset: 0,
            data_len: 0,
            code_checksum: String::new(),
            data_checksum: String::new(),
            kernels: vec![KernelEntry {
                name: "k".into(),
                offset: 0,
                len,
                launch: Some(launch),
                variants: vec![CodeVariant { arch: "sm_80".into(), offset: 0, len }],
            }],
            buffers: vec![BufferDecl::Arena { offset: 0, bytes: 64 }, BufferDecl::Arena { offset: 64, bytes: 64 }],
            states: vec![],
            steps: vec![crate::artifact::Step { kernel: 0, args: vec![0, 1], label: String::new() }],
            input: 0,
            output: 1,
            arena_bytes: 128,
            blobs: vec![],
        };
        let w = ArtifactWriter::create(&path, crate::artifact::header_size_bound(&h), &code).unwrap();
        w.finish(h).unwrap();
        let a = Artifact::open(&path).expect("a CUDA artifact passes the file checks");
        assert_eq!(a.header.target, TARGET_CUDA);
        match Model::load(&path) {
            Err(e @ RuntimeError::Gpu { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("tiny-cuda.llmc") && msg.contains("cannot run this CUDA artifact"), "{msg}");
                #[cfg(not(feature = "cuda"))]
                assert!(msg.contains("no CUDA support"), "{msg}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a CUDA artifact loaded without a GPU"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
