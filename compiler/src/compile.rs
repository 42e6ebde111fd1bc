//! [`compile`]: checkpoint to artifact (or static library), phase by phase: validate the config,
//! load and run the pass pipeline, quantize and calibrate, gather the text assets, generate code
//! and write the artifact, then with [`Emit::Lib`] pack it with the runtime's C library. Each
//! phase reports a [`Progress`] event; the result is a [`CompileReport`].

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use llmc_codegen as codegen;
use llmc_ir as ir;
use llmc_runtime as runtime;
use tracing::info;

use crate::calibrate::MatrixReport;
use crate::config::{CompileConfig, Emit};
use crate::emit_lib::{self, LibOutput};
use crate::error::{Error, Result};
use crate::pipeline::{run_pipeline, PassRecord};
use crate::quant::{self, QuantSummary};

/// A phase of [`compile`] finished (or, for `Tensor`, advanced). Events come in this order;
/// `Calibrated` only with calibration and `Library` only with [`Emit::Lib`].
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// The checkpoint is mapped and its graph built.
    Loaded { nodes: usize, seconds: f64 },
    /// The pass pipeline ran; `passes` holds each pass's record.
    PassesDone { nodes: usize, seconds: f64, passes: &'a [PassRecord] },
    /// Calibration activations were captured over `windows` windows and the calibrated weights
    /// computed (`method`: `gptq`, `wanda` or `smoothquant`).
    Calibrated { method: &'static str, windows: usize, seconds: f64 },
    /// Code generation starts; the artifact will hold `tensors` distinct weights.
    Codegen { tensors: usize },
    /// A weight was read to be written: the `index`-th read (1-based) of about `total`.
    Tensor { index: usize, total: usize },
    /// The artifact is written.
    Written { path: &'a Path, seconds: f64 },
    /// [`Emit::Lib`]: the static library and header are written.
    Library { output: &'a LibOutput, seconds: f64 },
    /// The compile is complete.
    Done { seconds: f64 },
}

/// Seconds spent per phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    pub load: f64,
    pub passes: f64,
    /// Calibration and the `--report` rows (the pipeline's `quantize` entry sets the layouts).
    pub quantize: f64,
    /// Code generation and writing the artifact.
    pub codegen: f64,
    /// The static library ([`Emit::Lib`]).
    pub library: f64,
    /// The whole compile.
    pub total: f64,
}

/// What a compile produced: what `llmc compile` prints in its summary and its `--json` object.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileReport {
    /// The checkpoint path as given.
    pub model: PathBuf,
    /// [`CompileConfig::output`]: the artifact, or the directory with [`Emit::Lib`].
    pub output: PathBuf,
    /// The artifact written.
    pub artifact: PathBuf,
    /// The target name (`cpu`, `cuda`).
    pub target: &'static str,
    /// Graph nodes compiled (after the pipeline and quantization).
    pub nodes: usize,
    pub steps: usize,
    /// Distinct kernels and their code bytes.
    pub kernels: usize,
    pub code_bytes: u64,
    /// Bytes of stored weights (packed where quantized).
    pub weight_bytes: u64,
    /// Peak activation arena and KV cache bytes.
    pub arena_bytes: u64,
    pub kv_cache_bytes: u64,
    pub file_bytes: u64,
    pub max_chunk: usize,
    pub max_context: usize,
    /// Elements of every distinct weight (bits per weight = stored weight bits / this).
    pub params: u64,
    /// Whether the artifact carries tokenizer.json, and a chat template.
    pub tokenizer: bool,
    pub chat_template: bool,
    /// What quantization did (`None` without `--quant`/`--sparsity`).
    pub quant: Option<QuantSummary>,
    /// The `--report` rows (`None` unless asked).
    pub matrices: Option<Vec<MatrixReport>>,
    /// Each pass of the pipeline.
    pub passes: Vec<PassRecord>,
    /// [`Emit::Lib`]'s files.
    pub library: Option<LibOutput>,
    /// [`Emit::Ptx`]'s files, one per kernel and architecture.
    pub ptx_files: Vec<PathBuf>,
    /// Warnings that did not stop the compile (a tokenizer larger than the vocabulary).
    pub notes: Vec<String>,
    pub timings: Timings,
}

impl CompileReport {
    /// Stored weight bits per parameter.
    pub fn bits_per_weight(&self) -> f64 {
        self.weight_bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// A weight source that reports a [`Progress::Tensor`] per tensor read.
struct ProgressWeights<'a, 'p> {
    inner: &'a dyn ir::WeightSource,
    progress: &'a RefCell<&'p mut dyn FnMut(Progress<'_>)>,
    read: std::cell::Cell<usize>,
    total: usize,
}

impl ir::WeightSource for ProgressWeights<'_, '_> {
    fn load(&self, name: &str, ty: &ir::TensorType) -> ir::Result<Vec<f32>> {
        let v = self.inner.load(name, ty)?;
        let index = self.read.get() + 1;
        self.read.set(index);
        (self.progress.borrow_mut())(Progress::Tensor { index, total: self.total });
        Ok(v)
    }
    fn quantized(&self, name: &str, layout: ir::Layout) -> Option<Vec<ir::quant::QRow>> {
        self.inner.quantized(name, layout)
    }
    fn prefetch(&self, names: &[&str]) -> ir::Prefetch {
        self.inner.prefetch(names)
    }
}

/// The token vocabulary of a graph: the `vocab_size` meta (an encoder's output is its hidden
/// size), else the logits' width.
fn vocab_of(g: &ir::Graph) -> usize {
    match g.outputs.first().map(|&o| g.ty(o).shape.clone()).as_deref() {
        _ if g.meta.contains_key("vocab_size") => g.meta["vocab_size"].parse().unwrap_or(usize::MAX),
        Some([_, ir::Dim::N(v)]) => *v,
        _ => usize::MAX,
    }
}

/// Compiles the checkpoint at `model` as `config` says (see the crate docs for the phases).
/// `progress` receives each phase's event; `--print-ir-after[-all]` text and the `--pass-stats`
/// table go to `ir_out` as the passes run (give `std::io::sink()` to drop them). On error nothing
/// is left at the artifact path (the writer's partial file is removed).
pub fn compile(model: &Path, config: &CompileConfig, progress: &mut dyn FnMut(Progress<'_>), ir_out: &mut dyn Write) -> Result<CompileReport> {
    let t0 = Instant::now();
    let checked = config.check()?;
    ir::threads::set_max(config.threads.unwrap_or(0));
    let mut backend = checked.backend;
    let artifact = match config.emit {
        Emit::Artifact | Emit::Ptx(_) => config.output.clone(),
        Emit::Lib => {
            std::fs::create_dir_all(&config.output).map_err(|source| Error::Io { path: config.output.clone(), source })?;
            config.output.join("model.llmc")
        }
    };

    let o = run_pipeline(model, config.max_context, &checked.pipeline, &checked.ctx, &config.pipeline, ir_out)?;
    progress(Progress::Loaded { nodes: o.loaded_nodes, seconds: o.load_seconds });
    progress(Progress::PassesDone { nodes: o.model.graph.node_count(), seconds: o.passes_seconds, passes: &o.passes });
    let (mut m, passes) = (o.model, o.passes);

    let vocab = vocab_of(&m.graph);
    let assets = if config.no_tokenizer { Default::default() } else { crate::assets::text_assets(&mut m, vocab)? };
    let mut opts = codegen::CompileOptions { max_chunk: config.max_chunk, weights_dtype: config.weights_dtype, ..Default::default() };
    if let Some(t) = &assets.tokenizer {
        opts.blobs.push((runtime::tokenizer::TOKENIZER_BLOB.to_string(), t.clone()));
    }
    // Parameters: elements of every distinct weight.
    let mut params = 0u64;
    let mut weights = BTreeSet::new();
    for n in m.graph.g.node_indices() {
        if let ir::Op::Weight { name, .. } = m.graph.op(n) {
            if weights.insert(name.as_str()) {
                params += m.graph.ty(n).static_numel().unwrap_or(0) as u64;
            }
        }
    }
    let tensors = weights.len();
    drop(weights);

    // The pipeline's quantize entry, with the counts its run reported.
    let tq = Instant::now();
    let plan = match &checked.quantize {
        Some((at, quantize)) => {
            let counts = passes.get(*at).map_or((0, 0), |r| (r.counter("quantized"), r.counter("quantized-params")));
            let tc = Instant::now();
            let plan = quant::calibrate(&config.quant, &m, quantize, &checked.pipeline[*at], counts)?;
            if let Some(s) = plan.summary.as_ref().filter(|_| plan.source.is_some()) {
                progress(Progress::Calibrated { method: s.method, windows: s.calib_windows, seconds: tc.elapsed().as_secs_f64() });
            }
            plan
        }
        None => quant::Plan { summary: None, source: None, acts: None },
    };
    let matrices = if config.quant.report { Some(quant::report(&m, &plan)?) } else { None };
    let quantize_seconds = tq.elapsed().as_secs_f64();

    progress(Progress::Codegen { tensors });
    let inner: &dyn ir::WeightSource = match &plan.source {
        Some(s) => s,
        None => &m.checkpoint,
    };
    let t1 = Instant::now();
    let cell = RefCell::new(progress);
    let source = ProgressWeights { inner, progress: &cell, read: Default::default(), total: tensors };
    let r = codegen::drive(&mut *backend, &m.graph, &source, &opts, &artifact)?;
    drop(source);
    let progress = cell.into_inner();
    let codegen_seconds = t1.elapsed().as_secs_f64();
    info!(output = %artifact.display(), steps = r.steps, kernels = r.kernels, file_bytes = r.file_bytes, seconds = codegen_seconds, "artifact written");
    progress(Progress::Written { path: &artifact, seconds: codegen_seconds });

    let mut library_seconds = 0.0;
    let library = match config.emit {
        Emit::Lib => {
            let t2 = Instant::now();
            let lib = emit_lib::write(&config.output, &artifact, config.runtime_lib.as_deref()).map_err(Error::Library)?;
            library_seconds = t2.elapsed().as_secs_f64();
            info!(library = %lib.library.display(), runtime = %lib.runtime.display(), seconds = library_seconds, "library written");
            progress(Progress::Library { output: &lib, seconds: library_seconds });
            Some(lib)
        }
        Emit::Artifact | Emit::Ptx(_) => None,
    };
    let total = t0.elapsed().as_secs_f64();
    progress(Progress::Done { seconds: total });
    Ok(CompileReport {
        model: model.to_path_buf(),
        output: config.output.clone(),
        artifact,
        target: backend.name(),
        nodes: r.nodes,
        steps: r.steps,
        kernels: r.kernels,
        code_bytes: r.code_bytes,
        weight_bytes: r.weight_bytes,
        arena_bytes: r.arena_bytes,
        kv_cache_bytes: r.state_bytes,
        file_bytes: r.file_bytes,
        max_chunk: r.max_chunk,
        max_context: r.max_context,
        params,
        tokenizer: assets.tokenizer.is_some(),
        chat_template: assets.chat_template,
        quant: plan.summary,
        matrices,
        passes,
        library,
        ptx_files: r.ptx_files,
        notes: assets.notes,
        timings: Timings {
            load: o.load_seconds,
            passes: o.passes_seconds,
            quantize: quantize_seconds,
            codegen: codegen_seconds,
            library: library_seconds,
            total,
        },
    })
}
