//! The first two phases of a compile, also usable alone: loading a checkpoint and running the
//! pass pipeline ([`optimize`]), and what `llmc dump-ir` and `llmc passes` show ([`dump_ir`],
//! [`explain`], [`passes`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use llmc_frontend as frontend;
use llmc_passes as passes;
use tracing::info;

use crate::config::{PipelineConfig, Target};
use crate::error::{Error, Result};

pub use frontend::Model;
pub use passes::PassOption;

/// What one pass of the pipeline did.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRecord {
    /// The pass name (`dce`).
    pub name: String,
    /// Wall time of the pass (without the verifier).
    pub seconds: f64,
    /// Whether the pass changed the graph.
    pub changed: bool,
    /// The pass's named counters (`("removed", 12)`), in the order it reported them.
    pub counters: Vec<(String, u64)>,
    /// Free-text remarks (limits hit, rewrites declined).
    pub notes: Vec<String>,
}

impl PassRecord {
    /// The value of counter `name`, 0 when the pass did not report it.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
    }
}

/// A loaded and optimized model with what it took.
#[derive(Debug)]
pub struct Optimized {
    /// The graph after the pipeline, and the checkpoint that supplies its weights.
    pub model: Model,
    pub passes: Vec<PassRecord>,
    /// Graph nodes right after loading.
    pub loaded_nodes: usize,
    pub load_seconds: f64,
    pub passes_seconds: f64,
}

/// Loads the checkpoint at `model` (a directory, a `.safetensors` file with `config.json` beside
/// it, or a sharded index) with the context capped at `max_context`, and runs the pipeline of `p`
/// with `target`'s pass context (`optimize` uses its cost model unless an entry says otherwise).
/// `--print-ir-after[-all]` text and the `--pass-stats` table go to `ir_out` as the passes run
/// (a graph the verifier rejects is printed before the error).
pub fn optimize(model: &Path, target: Target, max_context: Option<usize>, p: &PipelineConfig, ir_out: &mut dyn Write) -> Result<Optimized> {
    run_pipeline(model, max_context, &p.parsed()?, &target.pass_context()?, p, ir_out)
}

/// [`optimize`] with the pipeline parsed and its context built: `p` says only what to print,
/// dump and count.
pub(crate) fn run_pipeline(
    model: &Path,
    max_context: Option<usize>,
    pipeline: &passes::Pipeline,
    ctx: &passes::PassContext,
    p: &PipelineConfig,
    ir_out: &mut dyn Write,
) -> Result<Optimized> {
    let t0 = Instant::now();
    let mut m = frontend::load(model, &frontend::Options { max_context })?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let loaded_nodes = m.graph.node_count();
    info!(model = %model.display(), nodes = loaded_nodes, seconds = load_seconds, "checkpoint loaded");
    let print = if p.print_ir_after_all {
        passes::PrintAfter::All
    } else if !p.print_ir_after.is_empty() {
        passes::PrintAfter::Passes(p.print_ir_after.clone())
    } else {
        passes::PrintAfter::None
    };
    let pm = passes::PassManager::new(pipeline, ctx)?.print_after(print).dump_dir(p.dump_ir.clone()).stats(p.pass_stats);
    let t1 = Instant::now();
    let stats = pm.run(&mut m.graph, ir_out)?;
    let passes_seconds = t1.elapsed().as_secs_f64();
    info!(passes = stats.len(), nodes = m.graph.node_count(), seconds = passes_seconds, "passes done");
    let passes = stats
        .into_iter()
        .map(|(name, st, dt)| PassRecord { name, seconds: dt.as_secs_f64(), changed: st.changed, counters: st.counters, notes: st.notes })
        .collect();
    Ok(Optimized { model: m, passes, loaded_nodes, load_seconds, passes_seconds })
}

/// Which IR `llmc dump-ir` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DumpAfter {
    /// The IR after the whole pipeline.
    #[default]
    Pipeline,
    /// The IR after every pass.
    All,
    /// The IR after each run of this pass.
    Pass(String),
}

/// What [`dump_ir`] prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpIrConfig {
    /// The pipeline in `--passes` syntax; `None`: the default pipeline.
    pub passes: Option<String>,
    pub after: DumpAfter,
    /// Whose cost model `optimize` uses unless an entry says `optimize{target=...}`.
    pub target: Target,
    pub max_context: Option<usize>,
}

/// Loads `model`, runs the pipeline and writes its IR to `out`: after every pass (each with a
/// `; ---- IR after PASS ----` header), after the named pass, or the final graph.
pub fn dump_ir(model: &Path, cfg: &DumpIrConfig, out: &mut dyn Write) -> Result<()> {
    let p = PipelineConfig {
        passes: cfg.passes.clone(),
        print_ir_after: match &cfg.after {
            DumpAfter::Pass(p) => vec![p.clone()],
            DumpAfter::All | DumpAfter::Pipeline => vec![],
        },
        print_ir_after_all: cfg.after == DumpAfter::All,
        dump_ir: None::<PathBuf>,
        pass_stats: false,
    };
    let o = optimize(model, cfg.target, cfg.max_context, &p, out)?;
    if cfg.after == DumpAfter::Pipeline {
        out.write_all(llmc_ir::print(&o.model.graph).as_bytes()).map_err(Error::Output)?;
    }
    Ok(())
}

/// Why the optimizer's extracted form of `value` (`%42`, a value of the IR as it reaches the
/// first `optimize` entry of `cfg.passes`, i.e. after the passes before it) won: its cost against
/// the alternatives in its e-class, as text, under that entry's options (a bare `optimize` when
/// the pipeline has none). `cfg.after` is not used.
pub fn explain(model: &Path, cfg: &DumpIrConfig, value: &str) -> Result<String> {
    use passes::RegisteredPass;
    let ctx = cfg.target.pass_context()?;
    let pipeline = PipelineConfig { passes: cfg.passes.clone(), ..Default::default() }.parsed()?;
    let at = pipeline.iter().position(|p| p.name == "optimize");
    let before = &pipeline[..at.unwrap_or(pipeline.len())];
    let spec = at.map_or_else(|| passes::PassSpec::new("optimize"), |i| pipeline[i].clone());
    let opt = passes::Optimize::from_spec(&spec, &ctx)?;
    let mut m = frontend::load(model, &frontend::Options { max_context: cfg.max_context })?;
    passes::PassManager::new(before, &ctx)?.run(&mut m.graph, &mut std::io::sink())?;
    Ok(opt.explain(&m.graph, value)?)
}

/// A pass `--passes` can name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassInfo {
    pub name: &'static str,
    /// Its one-line summary.
    pub summary: &'static str,
    /// Whether the default pipeline runs it.
    pub default: bool,
    /// The options it takes in braces (`optimize{target=cuda}`).
    pub options: &'static [PassOption],
}

/// Every pass, in registry order.
pub fn passes() -> Vec<PassInfo> {
    let default = passes::default_pipeline();
    passes::all_passes()
        .iter()
        .map(|p| PassInfo {
            name: p.name(),
            summary: p.summary(),
            default: default.iter().any(|e| e.name == p.name()),
            options: p.options(),
        })
        .collect()
}

/// The entries of the pipeline a compile runs when none is given, in order.
pub fn default_pipeline() -> Vec<String> {
    passes::default_pipeline().iter().map(|p| p.to_string()).collect()
}
