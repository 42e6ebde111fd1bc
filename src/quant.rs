//! `llmc compile` quantization flags (`--quant`, `--sparsity`, `--keep-fp`, `--calib`,
//! `--calib-tokens`, `--smooth-alpha`, `--report`) and the printed `--report` table. The
//! quantization itself is a phase of `llmc_compiler::compile`.

use std::path::PathBuf;

use clap::Args;
use llmc_compiler::{MatrixReport, QuantConfig};

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
    /// With --quant/--sparsity: the LM head's format (tied to the embedding table or not): a
    /// --quant format, or none to keep it in float. Default: the --quant format for int8/w8a8,
    /// int8 for int4/w4a8 and 2:4 with int8 (as llama-quantize keeps the output matrix at 6-8
    /// bits), none for 2:4 alone.
    #[arg(long = "head-quant", value_name = "FORMAT")]
    pub head_quant: Option<String>,
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

impl QuantArgs {
    /// The library's quantization options (checked by the library).
    pub(crate) fn config(&self) -> QuantConfig {
        QuantConfig {
            quant: self.quant.clone(),
            sparsity: self.sparsity.clone(),
            keep_fp: self.keep_fp.clone(),
            head_quant: self.head_quant.clone(),
            calib: self.calib.clone(),
            calib_tokens: self.calib_tokens,
            smooth_alpha: self.smooth_alpha,
            report: self.report,
        }
    }
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

pub(crate) fn print_report(rows: &[MatrixReport], floats: &[llmc_compiler::FloatWeight]) {
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
    for f in floats {
        println!("{:<44} {:>14} {:>10}  left in float: {}", f.name, "f32", f.shape.trim_matches(['[', ']']).replace(", ", "x"), f.why);
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
