//! A loaded model and its sessions.
//!
//! A [`Model`] is an opened artifact with its code mapped executable; it is immutable and shared.
//! A [`Session`] is one conversation: an [`Executor`] (activation arena, thread pool, kernel
//! calls) and one [`KvCache`]; its `forward` is a step of the step contract ([`crate::step`])
//! with a batch of one.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::artifact::{Artifact, Header, FORWARD_ENTRY};
use crate::error::{Result, RuntimeError};
use crate::exec::{CodeMemory, KernelFn};
use crate::step::{check_sequence, EntryId, Executor, KvCache, Logits, StepInput};

/// All cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
use crate::sample::argmax;

/// A loaded, verified, executable model.
pub struct Model {
    pub(crate) artifact: Artifact,
    _code: CodeMemory,
    pub(crate) kernels: Vec<KernelFn>,
    /// The `forward` entry point's index.
    forward: usize,
    /// A CUDA artifact's kernels and weights on the GPU.
    #[cfg(feature = "cuda")]
    pub(crate) gpu: Option<crate::cuda::DeviceModel>,
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
        let forward = artifact.header.entries.iter().position(|e| e.name == FORWARD_ENTRY).ok_or_else(|| {
            RuntimeError::Corrupt { path: artifact.path.clone(), msg: format!("no `{FORWARD_ENTRY}` entry point") }
        })?;
        if artifact.header.target == crate::artifact::TARGET_CUDA {
            return Self::from_cuda_artifact(artifact, forward);
        }
        let code = CodeMemory::new(artifact.code())?;
        // SAFETY: offsets were validated against the code section and name functions compiled for
        // the kernel ABI by the compiler that wrote this checksummed artifact.
        let kernels = artifact.header.kernels.iter().map(|k| unsafe { code.kernel(k.offset as usize) }).collect();
        Ok(Arc::new(Model {
            artifact,
            _code: code,
            kernels,
            forward,
            #[cfg(feature = "cuda")]
            gpu: None,
        }))
    }

    #[cfg(feature = "cuda")]
    fn from_cuda_artifact(artifact: Artifact, forward: usize) -> Result<Arc<Model>> {
        let gpu = crate::cuda::DeviceModel::load(&artifact)?;
        Ok(Arc::new(Model { _code: CodeMemory::new(&[])?, kernels: Vec::new(), forward, gpu: Some(gpu), artifact }))
    }

    #[cfg(not(feature = "cuda"))]
    fn from_cuda_artifact(artifact: Artifact, _forward: usize) -> Result<Arc<Model>> {
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
    /// The entry point called `name` (see [`crate::artifact::EntryPoint`]).
    pub fn entry(&self, name: &str) -> Option<EntryId> {
        self.header().entries.iter().position(|e| e.name == name).map(EntryId)
    }
    /// The `forward` entry point, which every artifact has.
    pub fn forward_entry(&self) -> EntryId {
        EntryId(self.forward)
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

/// One conversation: an [`Executor`] and one [`KvCache`]. Its [`forward`](Self::forward) is a
/// step of the `forward` entry point with a batch of one; `generate`, speculative decoding,
/// embeddings, evaluation and the C API all run through it.
pub struct Session {
    exec: Executor,
    cache: KvCache,
    forward: EntryId,
}

impl Session {
    /// A session running kernels on all available cores.
    pub fn new(model: Arc<Model>) -> Result<Session> {
        Session::with_threads(model, default_threads())
    }

    /// A session running each kernel split across `threads` threads (1: the caller's alone).
    pub fn with_threads(model: Arc<Model>, threads: usize) -> Result<Session> {
        let cache = KvCache::new(&model)?;
        let forward = model.forward_entry();
        Ok(Session { exec: Executor::new(model, threads)?, cache, forward })
    }

    /// Threads each kernel is split across.
    pub fn threads(&self) -> usize {
        self.exec.threads()
    }

    pub fn model(&self) -> &Arc<Model> {
        self.exec.model()
    }

    /// Tokens in the KV cache.
    pub fn past(&self) -> usize {
        self.cache.len()
    }

    /// The session's executor and cache, for steps of other entry points or with more
    /// sequences (other caches of the same model) in the batch.
    pub fn parts(&mut self) -> (&mut Executor, &mut KvCache) {
        (&mut self.exec, &mut self.cache)
    }

    /// Forgets all but the first `len` cached tokens (see [`KvCache::truncate`]).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.cache.reset();
    }

    /// Checks ids against the vocabulary and the context before anything runs.
    pub fn check_input(&self, ids: &[u32]) -> Result<()> {
        check_sequence(self.exec.model(), self.cache.len(), ids, &Logits::Last)
    }

    /// Appends `ids` to the conversation and returns logits: every position's (`[n, vocab]`) when
    /// `all_logits`, else only the last position's (`[vocab]`). Long inputs run in chunks.
    pub fn forward(&mut self, ids: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let logits = if all_logits { Logits::All } else { Logits::Last };
        let mut batch = [StepInput { cache: &mut self.cache, tokens: ids, logits }];
        let out = self.exec.step(self.forward, &mut batch)?;
        Ok(out.into_logits().into_iter().next().unwrap_or_default())
    }

    /// Runs `ids` (at most `max_chunk` tokens) as one forward step like [`forward`](Self::forward),
    /// timing each kernel launch separately (all threads, one launch at a time, so the times add
    /// up to a little more than a normal step). Returns `(step label, kernel name, seconds)` in
    /// step order; the conversation advances as with `forward`.
    pub fn profile_step(&mut self, ids: &[u32]) -> Result<Vec<(String, String, f64)>> {
        self.exec.profile(self.forward, &mut self.cache, ids)
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
        let vocab = self.model().vocab_size();
        let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
        // The last new token is never fed back, so generation needs `max_new - 1` more rows.
        let needed = self.past() + prompt.len() + max_new.saturating_sub(1);
        let max_context = self.model().max_context();
        if needed > max_context {
            return Err(RuntimeError::ContextOverflow { needed, max_context });
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
    use crate::artifact::{ArtifactWriter, BufferDecl, CodeVariant, KernelEntry, Launch, TARGET_CUDA};

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
            data_chunk_checksums: vec![],
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
            entries: vec![crate::artifact::EntryPoint { name: "forward".into(), steps: vec![0..1], input: 0, output: 1, head: None }],
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
