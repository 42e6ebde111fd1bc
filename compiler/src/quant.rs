//! The quantization phase of a compile (`--calib`, `--report`), after the pipeline's `quantize`
//! entry (the one `--quant`/`--sparsity`/`--keep-fp` append, or one `--passes` names) has set the
//! layouts: captures calibration activations, builds the calibrated weight source the artifact is
//! written from (GPTQ rows, Wanda-pruned values, SmoothQuant-scaled weights) and the per-matrix
//! error rows. The algorithms are in [`crate::calibrate`].

use std::time::Instant;

use llmc_frontend as frontend;
use llmc_ir as ir;
use llmc_passes as passes;
use llmc_runtime as runtime;
use tracing::info;

use crate::calibrate::{self, Activations, Calibrated, MatrixReport};
use crate::config::{QuantConfig, CALIB_WINDOW};
use crate::error::{Error, Result};

/// What quantization did, for the compile report.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSummary {
    /// The `format` and `sparsity` options of the quantize entry (`--quant`/`--sparsity` as given).
    pub format: Option<String>,
    pub sparsity: Option<String>,
    /// The layout set on the quantized weights (`int4_g32`, `sparse24_int8`, ...).
    pub layout: ir::Layout,
    /// How the quantized values were chosen: `rtn`, `magnitude`, `gptq`, `wanda` or `smoothquant`.
    pub method: &'static str,
    /// Weights quantized and their parameters.
    pub tensors: u64,
    pub params: u64,
    /// Calibration windows of [`CALIB_WINDOW`] tokens used (0 without `--calib`).
    pub calib_windows: usize,
    /// Every weight matrix left in floating point, and why (norm vectors and biases are not listed).
    pub float_weights: Vec<FloatWeight>,
}

/// A weight matrix quantization left in floating point.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatWeight {
    pub name: String,
    /// `[R, K]` as printed.
    pub shape: String,
    pub why: String,
}

/// Every 2-D weight of `g` the pass left dense, with the pass's reason ([`passes::Quantize::decide`]).
pub(crate) fn float_weights(g: &ir::Graph, quantize: &passes::Quantize) -> Vec<FloatWeight> {
    let mut seen = std::collections::HashSet::new();
    let mut v: Vec<FloatWeight> = g
        .g
        .node_indices()
        .filter_map(|n| {
            let ir::Op::Weight { name, layout: ir::Layout::Dense, .. } = g.op(n) else { return None };
            let t = g.ty(n);
            if t.rank() != 2 || !seen.insert(name.clone()) {
                return None;
            }
            let passes::quantize::Decision::Float(why) = quantize.decide(g, n) else { return None };
            let dims: Vec<String> = t.shape.iter().map(|d| d.as_const().map_or("?".into(), |v| v.to_string())).collect();
            Some(FloatWeight { name: name.clone(), shape: format!("[{}]", dims.join(", ")), why })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The quantization plan: the summary and the weight source to write the artifact from.
pub(crate) struct Plan<'a> {
    pub summary: Option<QuantSummary>,
    pub source: Option<Calibrated<'a>>,
    pub acts: Option<Activations>,
}

/// Captures calibration activations and builds the calibrated weight source when `q.calib`, for
/// the layouts the pipeline's `quantize` entry `spec` (built as `quantize`) set on `tensors`
/// weights of `params` parameters.
pub(crate) fn calibrate<'a>(
    q: &QuantConfig,
    m: &'a frontend::Model,
    quantize: &passes::Quantize,
    spec: &passes::PassSpec,
    (tensors, params): (u64, u64),
) -> Result<Plan<'a>> {
    let (layout, wanda) = (quantize.layout, quantize.wanda);
    let sparse = matches!(layout, ir::Layout::Sparse24 { .. });
    let mut summary = QuantSummary {
        format: spec.option("format").map(String::from),
        sparsity: spec.option("sparsity").map(String::from),
        layout,
        method: if sparse { "magnitude" } else { "rtn" },
        tensors,
        params,
        calib_windows: 0,
        float_weights: float_weights(&m.graph, quantize),
    };
    let Some(path) = &q.calib else { return Ok(Plan { summary: Some(summary), source: None, acts: None }) };
    let text = std::fs::read_to_string(path).map_err(|e| Error::Input(format!("--calib {}: {e}", path.display())))?;
    let tok_path = m.dir.join("tokenizer.json");
    let tok = runtime::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::Input(format!("--calib needs the checkpoint's tokenizer ({}): {e}", tok_path.display())))?;
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(q.calib_tokens);
    let windows: Vec<Vec<i32>> = ids.chunks_exact(CALIB_WINDOW).map(|w| w.iter().map(|&i| i as i32).collect()).collect();
    if windows.is_empty() {
        return Err(Error::Input(format!(
            "--calib {}: {} tokens, fewer than one window of {CALIB_WINDOW}",
            path.display(),
            ids.len()
        )));
    }
    let t0 = Instant::now();
    let acts = calibrate::capture(&m.graph, &m.checkpoint, &windows)?;
    info!(windows = windows.len(), seconds = t0.elapsed().as_secs_f64(), "calibration activations captured");
    let t1 = Instant::now();
    let w8a8 = layout == ir::Layout::W8A8;
    let alpha = w8a8.then_some(q.smooth_alpha);
    let src = calibrate::calibrate(&m.graph, &m.checkpoint, &acts, !sparse && !w8a8, sparse && wanda, alpha)?;
    info!(gptq = src.rows.len(), wanda = src.values.len(), seconds = t1.elapsed().as_secs_f64(), "calibrated");
    summary.method = if sparse {
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
    summary.calib_windows = windows.len();
    Ok(Plan { summary: Some(summary), source: Some(src), acts: Some(acts) })
}

/// The `--report` rows for the plan: every quantized matrix as the artifact stores it.
pub(crate) fn report(m: &frontend::Model, plan: &Plan<'_>) -> Result<Vec<MatrixReport>> {
    let src: &dyn ir::WeightSource = match &plan.source {
        Some(s) => s,
        None => &m.checkpoint,
    };
    calibrate::report(&m.graph, &m.checkpoint, src, plan.acts.as_ref())
}
