//! What a compile is asked to do: [`CompileConfig`] (target, output, emission, step and context
//! sizes, text assets, quantization, pass pipeline) and its validation.
//!
//! Every field is plain data with a `Default` matching `llmc compile`'s defaults. Combinations
//! that cannot work (`Emit::Lib` for CUDA, `--keep-fp` without a quantization format, a missing
//! calibration file, ...) are rejected by [`CompileConfig::validate`] before the checkpoint is
//! read; the messages name the command-line flags, since the CLI is the main user.

use std::path::PathBuf;

use llmc_codegen as codegen;
pub use llmc_codegen::WeightsDtype;
use llmc_passes as passes;

use crate::error::{Error, Result};

/// Calibration windows are this many tokens; `calib_tokens` must cover one.
pub const CALIB_WINDOW: usize = 128;

/// The code generation target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// x86-64 machine code through Cranelift (artifact target `x86_64-cpu`).
    #[default]
    Cpu,
    /// PTX for sm_80 and sm_90 through MLIR; only in builds with the `cuda` feature (a build
    /// without it rejects this target with an error saying how to get it).
    Cuda,
}

impl Target {
    /// The `--target` name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Cuda => "cuda",
        }
    }

    /// The target named `name` that this build can compile for (`llmc compile --target`); an
    /// unknown name, or `cuda` in a build without the `cuda` feature, is an error listing the
    /// targets this build has.
    pub fn parse(name: &str) -> Result<Target> {
        let b = codegen::backend(name, &Default::default())?;
        Ok(if b.name() == "cuda" { Target::Cuda } else { Target::Cpu })
    }

    /// The target named `name` whose cost model the passes know (`llmc dump-ir --target`), in any
    /// build; an unknown name is an error listing the known ones.
    pub fn by_name(name: &str) -> Result<Target> {
        let ctx = passes::PassContext::for_target(name)?;
        Ok(if ctx.target.name == "cuda" { Target::Cuda } else { Target::Cpu })
    }

    /// What every pass of a pipeline for this target shares.
    pub(crate) fn pass_context(self) -> Result<passes::PassContext> {
        Ok(passes::PassContext::for_target(self.name())?)
    }

    /// Names of the targets this build can compile for.
    pub fn available() -> &'static [&'static str] {
        codegen::TARGETS
    }
}

/// What a compile writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Emit {
    /// One artifact file at [`CompileConfig::output`].
    #[default]
    Artifact,
    /// A directory at [`CompileConfig::output`]: `libllmc_model.a` (the runtime's C library with
    /// the artifact linked in), `model.h` (the C API) and `model.llmc` (the artifact). CPU only.
    Lib,
    /// The artifact, and every kernel's PTX (per architecture) and MLIR in this directory. CUDA
    /// only.
    Ptx(PathBuf),
}

/// Weight quantization and sparsity (`llmc compile --quant ...`); off by default. `quant`,
/// `sparsity` and `keep_fp` spell a `quantize{format=...,sparsity=...,keep-fp=...}` entry that is
/// appended to the pipeline; a pipeline may instead name that entry itself (then these three stay
/// unset). `calib`, `calib_tokens`, `smooth_alpha` and `report` apply to whichever entry it is.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// `--quant`: `int8`, `int4[:gN][:asym]`, `w8a8` or `w4a8[:gN]`.
    pub quant: Option<String>,
    /// `--sparsity`: `2:4[:magnitude|wanda]` (wanda needs `calib`); combines with `int8` only.
    pub sparsity: Option<String>,
    /// `--keep-fp`: weights whose checkpoint name contains a pattern (or matches it as a glob
    /// with `*` and `?`) stay f32.
    pub keep_fp: Vec<String>,
    /// `--head-quant`: the LM head's format (tied to the embedding table or not), or `none`;
    /// by default the `quant` format for int8/w8a8 and int8 for the 4-bit formats.
    pub head_quant: Option<String>,
    /// `--calib`: calibration text (tokenized with the checkpoint's tokenizer.json) for GPTQ,
    /// SmoothQuant (w8a8), Wanda and the report's output errors.
    pub calib: Option<PathBuf>,
    /// `--calib-tokens`: calibration tokens used from `calib` (windows of [`CALIB_WINDOW`]).
    pub calib_tokens: usize,
    /// `--smooth-alpha`: SmoothQuant migration strength for w8a8 with `calib` (0..=1).
    pub smooth_alpha: f32,
    /// `--report`: compute the per-matrix error rows ([`crate::CompileReport::matrices`]).
    pub report: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            quant: None,
            sparsity: None,
            keep_fp: Vec::new(),
            head_quant: None,
            calib: None,
            calib_tokens: 2048,
            smooth_alpha: 0.5,
            report: false,
        }
    }
}

/// The pass pipeline and what to show of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineConfig {
    /// `--passes`: the pipeline in its text form, entries with options in braces
    /// (`dce,optimize{target=cuda},quantize{format=int4:g64}`); `None`: the default pipeline
    /// ([`crate::default_pipeline`]).
    pub passes: Option<String>,
    /// `--print-ir-after`: print the IR after each run of these passes (to the caller's writer).
    pub print_ir_after: Vec<String>,
    /// `--print-ir-after-all`.
    pub print_ir_after_all: bool,
    /// `--dump-ir DIR`: the input IR and the IR after every pass, one numbered file each.
    pub dump_ir: Option<PathBuf>,
    /// `--pass-stats`: the statistics table goes to the caller's writer after the pipeline (the
    /// per-pass records are in the report either way).
    pub pass_stats: bool,
}

impl PipelineConfig {
    /// The parsed pipeline (the default one when `passes` is `None`).
    pub(crate) fn parsed(&self) -> Result<passes::Pipeline> {
        parse_pipeline(self.passes.as_deref())
    }
}

fn parse_pipeline(spec: Option<&str>) -> Result<passes::Pipeline> {
    Ok(match spec {
        Some(s) => passes::Pipeline::parse(s)?,
        None => passes::default_pipeline(),
    })
}

/// The entries of the pipeline `spec` (`--passes` syntax; the default pipeline when `None`), each
/// in its canonical spelling (`optimize{target=cuda}`); a spec that does not parse is an error
/// pointing at the column.
pub fn pipeline(spec: Option<&str>) -> Result<Vec<String>> {
    Ok(parse_pipeline(spec)?.iter().map(|p| p.to_string()).collect())
}

/// Everything [`crate::compile`] needs besides the checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileConfig {
    pub target: Target,
    /// The artifact file, or with [`Emit::Lib`] the directory to write (created if missing).
    pub output: PathBuf,
    pub emit: Emit,
    /// Cap on the compiled context (KV-cache rows); default `min(max_position_embeddings, 4096)`.
    pub max_context: Option<usize>,
    /// Largest number of tokens per forward step; default `min(512, max_context)`.
    pub max_chunk: Option<usize>,
    /// Leave out tokenizer.json and the chat template (the artifact then takes ids only).
    pub no_tokenizer: bool,
    /// CPU only: every product in generated code instead of the runtime's GEMM microkernels.
    pub no_microkernels: bool,
    /// `--weights-dtype`: element type of float weights in the artifact; `None`: the target's
    /// default (`keep` on the CPU, f16 for CUDA). On the CPU the setting applies to the weights
    /// of products (the panel weights, read by the 16-bit panel GEMMs); other weights stay f32.
    pub weights_dtype: Option<WeightsDtype>,
    /// `--kv-dtype`: how the KV cache stores keys and values, `f32` or `int8` (codes with a scale
    /// per token and KV head: the `kv-cache{dtype=..}` pass appended to the pipeline); `None`:
    /// f32. CPU target only.
    pub kv_dtype: Option<String>,
    /// `--threads`: threads compile-time work uses (checkpoint conversion, calibration); `None`:
    /// every core. Process-wide while a compile runs (`llmc_ir::threads`); the artifact is the
    /// same at any count.
    pub threads: Option<usize>,
    /// [`Emit::Lib`]: the runtime's C library to pack (`libllmc_capi.a`); `None`: `$LLMC_CAPI_LIB`,
    /// else the newest one cargo built beside the running executable.
    pub runtime_lib: Option<PathBuf>,
    pub quant: QuantConfig,
    pub pipeline: PipelineConfig,
}

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig {
            target: Target::Cpu,
            output: PathBuf::from("model.llmc"),
            emit: Emit::Artifact,
            max_context: None,
            max_chunk: None,
            no_tokenizer: false,
            no_microkernels: false,
            weights_dtype: None,
            kv_dtype: None,
            threads: None,
            runtime_lib: None,
            quant: QuantConfig::default(),
            pipeline: PipelineConfig::default(),
        }
    }
}

/// A validated config's derived settings.
pub(crate) struct Checked {
    pub backend: Box<dyn codegen::Backend>,
    /// The pipeline's shared context: the compile target.
    pub ctx: passes::PassContext,
    /// The pipeline to run, with the `quantize` entry the quantization flags spell appended.
    pub pipeline: passes::Pipeline,
    /// The pipeline's `quantize` entry (at most one), built.
    pub quantize: Option<(usize, passes::Quantize)>,
}

impl CompileConfig {
    /// Checks the options and their combinations without reading the checkpoint; the error
    /// names the flag (`--emit lib links the CPU runtime: use it with --target cpu`).
    pub fn validate(&self) -> Result<()> {
        self.check().map(|_| ())
    }

    pub(crate) fn check(&self) -> Result<Checked> {
        let options = codegen::BackendOptions {
            cpu: codegen::CpuOptions { no_microkernels: self.no_microkernels },
            cuda: codegen::CudaOptions {
                ptx_dir: match &self.emit {
                    Emit::Ptx(dir) => Some(dir.clone()),
                    _ => None,
                },
            },
        };
        if self.threads == Some(0) {
            return Err(Error::Config("--threads 0: give at least 1 thread".into()));
        }
        let backend = codegen::backend(self.target.name(), &options)?;
        let cuda = backend.name() == "cuda";
        if matches!(self.emit, Emit::Ptx(_)) && !cuda {
            return Err(Error::Config("--emit ptx DIR needs --target cuda".into()));
        }
        if self.no_microkernels && cuda {
            return Err(Error::Config("--no-microkernels applies to --target cpu only (the CUDA target has no microkernels)".into()));
        }

        if self.emit == Emit::Lib && backend.name() != "cpu" {
            return Err(Error::Config("--emit lib links the CPU runtime: use it with --target cpu".into()));
        }
        // The pipeline's passes see the compile target.
        let ctx = passes::PassContext::for_target(backend.name())?;
        let mut pipeline = self.pipeline.parsed()?;
        let quantize = self.quant.add_to_pipeline(&mut pipeline, &ctx)?;
        if let Some(dtype) = &self.kv_dtype {
            use passes::RegisteredPass;
            let layout = passes::KvCache::layout_of(dtype).map_err(|e| Error::Config(format!("--kv-dtype: {e} (expected f32 or int8)")))?;
            if layout != llmc_ir::KvLayout::Contiguous && cuda {
                return Err(Error::Config(format!(
                    "--kv-dtype {dtype}: the CUDA kernels read an f32 KV cache only; use it with --target cpu"
                )));
            }
            if pipeline.iter().any(|p| p.name == passes::KvCache::NAME) {
                return Err(Error::Config(format!(
                    "--kv-dtype appends `kv-cache{{dtype={dtype}}}` to the pipeline, and --passes already has a kv-cache entry: give it in one place"
                )));
            }
            pipeline.push(passes::PassSpec::new(passes::KvCache::NAME).with("dtype", dtype));
        }
        Ok(Checked { backend, ctx, pipeline, quantize })
    }
}

impl QuantConfig {
    /// Appends the `quantize` entry `quant`/`sparsity`/`keep_fp` spell to `pipeline` (an error when
    /// the pipeline names one too) and checks the options that go with quantization. Returns the
    /// pipeline's `quantize` entry, built, and its index, if it has one.
    pub(crate) fn add_to_pipeline(
        &self,
        pipeline: &mut passes::Pipeline,
        ctx: &passes::PassContext,
    ) -> Result<Option<(usize, passes::Quantize)>> {
        use passes::RegisteredPass;
        let from_flags = passes::Quantize::spec_from_flags_with_head(
            self.quant.as_deref(),
            self.sparsity.as_deref(),
            self.head_quant.as_deref(),
            &self.keep_fp,
        )?;
        let named = pipeline.iter().filter(|p| p.name == passes::Quantize::NAME).count();
        if named > 1 {
            return Err(Error::Config(format!("--passes `{pipeline}` quantizes {named} times; give one quantize entry")));
        }
        if let Some(spec) = from_flags {
            if named > 0 {
                return Err(Error::Config(format!(
                    "--quant/--sparsity/--keep-fp/--head-quant append `{spec}` to the pipeline, and --passes already has a quantize entry: \
                     give the quantization options in one place"
                )));
            }
            pipeline.push(spec);
        }
        let Some(at) = pipeline.iter().position(|p| p.name == passes::Quantize::NAME) else {
            for (set, flag) in [(self.calib.is_some(), "--calib"), (self.report, "--report")] {
                if set {
                    return Err(Error::Config(format!("{flag} needs --quant or --sparsity")));
                }
            }
            return Ok(None);
        };
        let quantize = passes::Quantize::from_spec(&pipeline[at], ctx)?;
        if !(0.0..=1.0).contains(&self.smooth_alpha) {
            return Err(Error::Config(format!("--smooth-alpha {}: must be within 0..=1", self.smooth_alpha)));
        }
        if quantize.wanda && self.calib.is_none() {
            return Err(Error::Config("--sparsity 2:4:wanda needs --calib FILE (Wanda weighs |w| by activation norms)".into()));
        }
        if let Some(p) = &self.calib {
            if !p.is_file() {
                return Err(Error::Config(format!("--calib {}: no such file", p.display())));
            }
            if self.calib_tokens < CALIB_WINDOW {
                return Err(Error::Config(format!("--calib-tokens {} is below one window of {CALIB_WINDOW}", self.calib_tokens)));
            }
        }
        Ok(Some((at, quantize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmc_ir as ir;

    fn err_of(c: &CompileConfig) -> String {
        match c.validate() {
            Ok(()) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn quant(q: QuantConfig) -> CompileConfig {
        CompileConfig { quant: q, ..Default::default() }
    }

    fn q(quant: Option<&str>, sparsity: Option<&str>) -> QuantConfig {
        QuantConfig { quant: quant.map(String::from), sparsity: sparsity.map(String::from), ..Default::default() }
    }

    /// The checked pipeline's entries and its quantize entry's index and layout.
    fn checked(c: &CompileConfig) -> (Vec<String>, Option<(usize, ir::Layout, bool)>) {
        let k = c.check().unwrap_or_else(|e| panic!("{e}"));
        (k.pipeline.iter().map(|p| p.to_string()).collect(), k.quantize.map(|(i, q)| (i, q.layout, q.wanda)))
    }

    #[test]
    fn defaults_are_valid_and_match_the_cli() {
        let c = CompileConfig::default();
        let (entries, quantize) = checked(&c);
        assert_eq!((entries, quantize), (crate::default_pipeline(), None));
        assert_eq!((c.target, &c.emit, c.quant.calib_tokens, c.quant.smooth_alpha), (Target::Cpu, &Emit::Artifact, 2048, 0.5));
        assert_eq!(pipeline(Some(" dce, optimize{ target = cuda }")).unwrap(), vec!["dce", "optimize{target=cuda}"]);
        let e = pipeline(Some("dce,optimize{target=cuda")).unwrap_err().to_string();
        assert!(e.contains("never closed"), "{e}");
    }

    #[test]
    fn targets_parse_by_name() {
        assert_eq!(Target::parse("cpu").unwrap(), Target::Cpu);
        let e = Target::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown target `tpu`") && e.contains("available targets: cpu"), "{e}");
        match Target::parse("cuda") {
            Ok(t) => assert!(cfg!(feature = "cuda") && t == Target::Cuda),
            Err(e) => assert!(!cfg!(feature = "cuda") && e.to_string().contains("not available in this build"), "{e}"),
        }
        assert_eq!(Target::available().contains(&"cuda"), cfg!(feature = "cuda"));
        // The passes know both cost models in every build.
        assert_eq!((Target::by_name("cpu").unwrap(), Target::by_name("cuda").unwrap()), (Target::Cpu, Target::Cuda));
        let e = Target::by_name("tpu").unwrap_err().to_string();
        assert!(e.contains("target `tpu`") && e.contains("cpu, cuda"), "{e}");
    }

    #[test]
    fn emission_and_target_combinations() {
        let ptx = CompileConfig { emit: Emit::Ptx("p".into()), ..Default::default() };
        assert_eq!(err_of(&ptx), "--emit ptx DIR needs --target cuda");
        for d in [WeightsDtype::F32, WeightsDtype::F16, WeightsDtype::BF16, WeightsDtype::Keep] {
            CompileConfig { weights_dtype: Some(d), ..Default::default() }.validate().unwrap();
        }
        CompileConfig { emit: Emit::Lib, ..Default::default() }.validate().unwrap();
        let lib_cuda = CompileConfig { target: Target::Cuda, emit: Emit::Lib, ..Default::default() };
        let e = err_of(&lib_cuda);
        if cfg!(feature = "cuda") {
            assert_eq!(e, "--emit lib links the CPU runtime: use it with --target cpu");
            let ok = CompileConfig { target: Target::Cuda, emit: Emit::Ptx("p".into()), weights_dtype: Some(WeightsDtype::F32), ..Default::default() };
            let ukernels = CompileConfig { target: Target::Cuda, no_microkernels: true, ..Default::default() };
            assert!(err_of(&ukernels).starts_with("--no-microkernels applies to --target cpu only"));
            let kv8 = CompileConfig { target: Target::Cuda, kv_dtype: Some("int8".into()), ..Default::default() };
            assert!(err_of(&kv8).starts_with("--kv-dtype int8: the CUDA kernels read an f32 KV cache only"), "{}", err_of(&kv8));
            CompileConfig { target: Target::Cuda, kv_dtype: Some("f32".into()), ..Default::default() }.validate().unwrap();
            // The pipeline's passes see the compile target.
            assert_eq!(ok.check().unwrap().ctx.target.name, "cuda");
        } else {
            assert!(e.contains("target `cuda` is not available"), "{e}");
        }
        assert_eq!(CompileConfig::default().check().unwrap().ctx.target.name, "cpu");
        // --kv-dtype appends the kv-cache pass.
        let (p, _) = checked(&CompileConfig { kv_dtype: Some("int8".into()), ..Default::default() });
        assert_eq!(p.last().map(String::as_str), Some("kv-cache{dtype=int8}"));
    }

    #[test]
    fn quantization_options_need_a_quantize_entry() {
        let keep = QuantConfig { keep_fp: vec!["lm_head".into()], ..Default::default() };
        assert_eq!(err_of(&quant(keep)), "quantize: --keep-fp needs --quant or --sparsity");
        for (q, flag) in [
            (QuantConfig { calib: Some("c.txt".into()), ..Default::default() }, "--calib"),
            (QuantConfig { report: true, ..Default::default() }, "--report"),
        ] {
            assert_eq!(err_of(&quant(q)), format!("{flag} needs --quant or --sparsity"));
        }
        // Without quantization, the other values are not looked at.
        quant(QuantConfig { smooth_alpha: 7.0, calib_tokens: 0, ..Default::default() }).validate().unwrap();
        // A quantize entry in the pipeline is quantization too.
        let entry = CompileConfig {
            quant: QuantConfig { report: true, ..Default::default() },
            pipeline: PipelineConfig { passes: Some("dce,quantize{format=int8}".into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(checked(&entry), (vec!["dce".into(), "quantize{format=int8}".into()], Some((1, ir::Layout::Int8, false))));
    }

    #[test]
    fn quantization_flags_append_one_quantize_entry() {
        let c = CompileConfig { quant: QuantConfig { keep_fp: vec!["lm_head".into(), "emb*".into()], ..q(Some("int4:g64"), None) }, ..Default::default() };
        let (entries, quantize) = checked(&c);
        let last = entries.last().unwrap();
        assert!(last.starts_with("quantize{format=int4:g64,keep-fp=") && last.contains("lm_head;emb*"), "{last}");
        assert_eq!(quantize, Some((entries.len() - 1, ir::Layout::Int4 { group: 64, asym: false }, false)));
        let both = CompileConfig { pipeline: PipelineConfig { passes: Some("quantize{format=int8}".into()), ..Default::default() }, ..c };
        let e = err_of(&both);
        assert!(e.contains("--passes already has a quantize entry"), "{e}");
        let twice = CompileConfig {
            pipeline: PipelineConfig { passes: Some("quantize{format=int8},quantize{format=int8}".into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(err_of(&twice), "--passes `quantize{format=int8},quantize{format=int8}` quantizes 2 times; give one quantize entry");
    }

    #[test]
    fn quantization_specs_and_values_are_checked() {
        let e = err_of(&quant(q(Some("int3"), None)));
        assert!(e.contains("--quant `int3`") && e.contains("unknown format"), "{e}");
        let e = err_of(&quant(q(Some("w4a8:g16"), None)));
        assert!(e.contains("multiple of 32"), "{e}");
        let e = err_of(&quant(q(None, Some("3:4"))));
        assert!(e.contains("--sparsity `3:4`") && e.contains("only 2:4"), "{e}");
        let e = err_of(&quant(q(Some("int4"), Some("2:4"))));
        assert!(e.contains("combines with --quant int8 only"), "{e}");
        assert_eq!(
            err_of(&quant(q(None, Some("2:4:wanda")))),
            "--sparsity 2:4:wanda needs --calib FILE (Wanda weighs |w| by activation norms)"
        );
        let alpha = QuantConfig { smooth_alpha: 1.5, ..q(Some("w8a8"), None) };
        assert_eq!(err_of(&quant(alpha)), "--smooth-alpha 1.5: must be within 0..=1");
        let missing = QuantConfig { calib: Some("/nonexistent/calib.txt".into()), ..q(Some("int8"), None) };
        assert_eq!(err_of(&quant(missing)), "--calib /nonexistent/calib.txt: no such file");
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let few = QuantConfig { calib: Some(here.clone()), calib_tokens: 100, ..q(Some("int8"), None) };
        assert_eq!(err_of(&quant(few)), "--calib-tokens 100 is below one window of 128");
        let ok = QuantConfig { calib: Some(here), keep_fp: vec!["lm_head".into()], report: true, ..q(None, Some("2:4:wanda")) };
        let (entries, quantize) = checked(&quant(ok));
        assert_eq!(quantize, Some((entries.len() - 1, ir::Layout::Sparse24 { int8: false }, true)));
        let (_, quantize) = checked(&quant(q(Some("int8"), Some("2:4"))));
        assert_eq!(quantize.map(|(_, l, w)| (l, w)), Some((ir::Layout::Sparse24 { int8: true }, false)));
    }
}
