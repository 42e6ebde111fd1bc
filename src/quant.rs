//! `llmc compile` quantization flags: `--quant`, `--sparsity`, `--keep-fp`, `--calib`,
//! `--report`. Appends the `quantize{...}` entry the first three spell to the pipeline (or takes
//! the one `--passes` names), captures calibration activations, builds the calibrated weight
//! source (GPTQ rows, Wanda-pruned values) the artifact is written from, and the per-matrix error
//! report. The algorithms live in `llmc_passes::calibrate`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use llmc_frontend as frontend;
use llmc_ir as ir;
use llmc_passes as passes;
use llmc_runtime as runtime;
use passes::calibrate::{Activations, Calibrated, MatrixReport};
use passes::RegisteredPass;
use tracing::info;

use crate::CliError;

#[derive(Args, Clone, Debug, Default)]
pub(crate) struct QuantArgs {
    /// Quantize matmul weights after the pipeline: int8, int4[:gN][:asym] (group-wise along K,
    /// groups of N (default 32); symmetric unless asym), w8a8 (int8 weights, per-token int8
    /// activations) or w4a8[:gN] (symmetric int4 weights, groups a multiple of 32, int8
    /// activations). Round to nearest unless --calib (GPTQ; SmoothQuant for w8a8).
    #[arg(long, value_name = "FORMAT")]
    pub quant: Option<String>,
    /// 2:4 structured sparsity of matmul weights: 2:4[:magnitude|wanda] (wanda needs --calib);
    /// with --quant int8 the kept values are int8.
    #[arg(long, value_name = "N:M[:METHOD]")]
    pub sparsity: Option<String>,
    /// With --quant/--sparsity: keep weights whose checkpoint name contains PATTERN (or matches
    /// it as a glob with * and ?) in f32 (repeatable; e.g. lm_head).
    #[arg(long = "keep-fp", value_name = "PATTERN")]
    pub keep_fp: Vec<String>,
    /// Calibration text (tokenized with the checkpoint's tokenizer.json): GPTQ for int8/int4,
    /// activation norms for 2:4 wanda, output errors for --report.
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration tokens used from --calib (windows of 128).
    #[arg(long = "calib-tokens", default_value_t = 2048, value_name = "N")]
    pub calib_tokens: usize,
    /// SmoothQuant migration strength α for --quant w8a8 with --calib (0: none, 1: all).
    #[arg(long = "smooth-alpha", default_value_t = 0.5, value_name = "ALPHA")]
    pub smooth_alpha: f32,
    /// Print the per-matrix quantization error table (weight error, output error on the
    /// calibration rows with --calib, bits/weight); with --json, as "report".
    #[arg(long)]
    pub report: bool,
}

/// What quantization did, for the compile report.
pub(crate) struct Plan<'a> {
    pub layout: Option<ir::Layout>,
    /// The `format` and `sparsity` options of the quantize entry (the flags' values as given).
    pub format: Option<String>,
    pub sparsity: Option<String>,
    pub tensors: u64,
    pub params: u64,
    pub source: Option<Calibrated<'a>>,
    pub acts: Option<Activations>,
    pub method: &'static str,
}

const WINDOW: usize = 128;

/// The pipeline's `quantize` entry after the run: its configuration and entry, and what it did.
pub(crate) struct Chosen {
    pub quantize: passes::Quantize,
    pub spec: passes::PassSpec,
    pub tensors: u64,
    pub params: u64,
}

/// Appends the `quantize` entry `--quant`/`--sparsity`/`--keep-fp` spell to `pipeline` (an error
/// when `--passes` names one too) and checks the flags that go with quantization. Returns the
/// configuration of the pipeline's `quantize` entry, if it has one.
pub(crate) fn add_to_pipeline(
    q: &QuantArgs,
    pipeline: &mut passes::Pipeline,
    ctx: &passes::PassContext,
) -> Result<Option<passes::Quantize>, CliError> {
    let from_flags = passes::Quantize::spec_from_flags(q.quant.as_deref(), q.sparsity.as_deref(), &q.keep_fp)?;
    let named = pipeline.iter().filter(|p| p.name == passes::Quantize::NAME).count();
    if named > 1 {
        return Err(CliError::Usage(format!("--passes `{pipeline}` quantizes {named} times; give one quantize entry")));
    }
    if let Some(spec) = from_flags {
        if named > 0 {
            return Err(CliError::Usage(format!(
                "--quant/--sparsity/--keep-fp append `{spec}` to the pipeline, and --passes already has a quantize entry: \
                 give the quantization options in one place"
            )));
        }
        pipeline.push(spec);
    }
    let Some(spec) = pipeline.iter().find(|p| p.name == passes::Quantize::NAME) else {
        for (set, flag) in [(q.calib.is_some(), "--calib"), (q.report, "--report")] {
            if set {
                return Err(CliError::Usage(format!("{flag} needs --quant or --sparsity")));
            }
        }
        return Ok(None);
    };
    let quantize = passes::Quantize::from_spec(spec, ctx)?;
    if !(0.0..=1.0).contains(&q.smooth_alpha) {
        return Err(CliError::Usage(format!("--smooth-alpha {}: must be within 0..=1", q.smooth_alpha)));
    }
    if quantize.wanda && q.calib.is_none() {
        return Err(CliError::Usage("--sparsity 2:4:wanda needs --calib FILE (Wanda weighs |w| by activation norms)".into()));
    }
    if let Some(p) = &q.calib {
        if !p.is_file() {
            return Err(CliError::Usage(format!("--calib {}: no such file", p.display())));
        }
        if q.calib_tokens < WINDOW {
            return Err(CliError::Usage(format!("--calib-tokens {} is below one window of {WINDOW}", q.calib_tokens)));
        }
    }
    Ok(Some(quantize))
}

/// The pipeline's `quantize` entry (as [`add_to_pipeline`] returned it) with the counts its run
/// reported; `stats` is the run's, entry by entry.
pub(crate) fn chosen(
    quantize: Option<passes::Quantize>,
    pipeline: &passes::Pipeline,
    stats: &[(String, passes::PassStats, std::time::Duration)],
) -> Option<Chosen> {
    let quantize = quantize?;
    let at = pipeline.iter().position(|p| p.name == passes::Quantize::NAME)?;
    let st = &stats.get(at)?.1;
    Some(Chosen { quantize, spec: pipeline[at].clone(), tensors: st.get("quantized"), params: st.get("quantized-params") })
}

/// Captures calibration activations and builds the calibrated weight source when `--calib`.
pub(crate) fn calibrate<'a>(q: &QuantArgs, m: &'a frontend::Model, set: Option<Chosen>) -> Result<Plan<'a>, CliError> {
    let Some(Chosen { quantize, spec, tensors, params }) = set else {
        return Ok(Plan {
            layout: None,
            format: None,
            sparsity: None,
            tensors: 0,
            params: 0,
            source: None,
            acts: None,
            method: "none",
        });
    };
    let (layout, wanda) = (quantize.layout, quantize.wanda);
    let sparse = matches!(layout, ir::Layout::Sparse24 { .. });
    let mut plan = Plan {
        layout: Some(layout),
        format: spec.option("format").map(String::from),
        sparsity: spec.option("sparsity").map(String::from),
        tensors,
        params,
        source: None,
        acts: None,
        method: if sparse { "magnitude" } else { "rtn" },
    };
    let Some(path) = &q.calib else { return Ok(plan) };
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("--calib {}: {e}", path.display())))?;
    let tok_path = m.dir.join("tokenizer.json");
    let tok = runtime::Tokenizer::from_file(&tok_path)
        .map_err(|e| CliError::Usage(format!("--calib needs the checkpoint's tokenizer ({}): {e}", tok_path.display())))?;
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(q.calib_tokens);
    let windows: Vec<Vec<i32>> = ids.chunks_exact(WINDOW).map(|w| w.iter().map(|&i| i as i32).collect()).collect();
    if windows.is_empty() {
        return Err(CliError::Usage(format!(
            "--calib {}: {} tokens, fewer than one window of {WINDOW}",
            path.display(),
            ids.len()
        )));
    }
    let t0 = Instant::now();
    let acts = passes::calibrate::capture(&m.graph, &m.checkpoint, &windows)?;
    info!(windows = windows.len(), seconds = t0.elapsed().as_secs_f64(), "calibration activations captured");
    let t1 = Instant::now();
    let w8a8 = layout == ir::Layout::W8A8;
    let alpha = w8a8.then_some(q.smooth_alpha);
    let src = passes::calibrate::calibrate(&m.graph, &m.checkpoint, &acts, !sparse && !w8a8, sparse && wanda, alpha)?;
    info!(gptq = src.rows.len(), wanda = src.values.len(), seconds = t1.elapsed().as_secs_f64(), "calibrated");
    plan.method = if sparse {
        if wanda {
            "wanda"
        } else {
            "magnitude"
        }
    } else if w8a8 {
        "smoothquant"
    } else {
        "gptq"
    };
    plan.source = Some(src);
    plan.acts = Some(acts);
    Ok(plan)
}

/// The `--report` rows for the plan.
pub(crate) fn report(m: &frontend::Model, plan: &Plan<'_>) -> Result<Vec<MatrixReport>, CliError> {
    let src: &dyn ir::WeightSource = match &plan.source {
        Some(s) => s,
        None => &m.checkpoint,
    };
    Ok(passes::calibrate::report(&m.graph, &m.checkpoint, src, plan.acts.as_ref())?)
}

pub(crate) fn report_json(rows: &[MatrixReport]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name, "layout": r.layout.name(), "shape": r.shape, "bits_per_weight": r.bits_per_weight,
                "weight_error": r.weight_error, "output_error": r.output_error,
            })
        })
        .collect()
}

pub(crate) fn print_report(rows: &[MatrixReport]) {
    println!("{:<44} {:>14} {:>10} {:>8} {:>12} {:>12}", "matrix", "layout", "shape", "bits/w", "weight err", "output err");
    let (mut bits, mut n, mut we, mut oe, mut no) = (0.0, 0.0, 0.0, 0.0, 0);
    for r in rows {
        let numel = (r.shape[0] * r.shape[1]) as f64;
        bits += r.bits_per_weight * numel;
        n += numel;
        we += r.weight_error;
        if let Some(o) = r.output_error {
            oe += o;
            no += 1;
        }
        println!(
            "{:<44} {:>14} {:>10} {:>8.3} {:>11.4}% {:>12}",
            r.name,
            r.layout.name(),
            format!("{}x{}", r.shape[0], r.shape[1]),
            r.bits_per_weight,
            100.0 * r.weight_error,
            r.output_error.map_or("-".to_string(), |o| format!("{:.4}%", 100.0 * o))
        );
    }
    if !rows.is_empty() {
        println!(
            "{} matrices, {:.0} weights at {:.3} bits/weight; mean weight error {:.4}%{}",
            rows.len(),
            n,
            bits / n.max(1.0),
            100.0 * we / rows.len() as f64,
            if no > 0 { format!(", mean output error {:.4}%", 100.0 * oe / no as f64) } else { String::new() }
        );
    }
}
