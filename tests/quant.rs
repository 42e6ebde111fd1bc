//! Quantization end to end on the trained `models/seedlm`: `llmc eval` reproduces the f32
//! perplexity that transformers measured (`train_info.json`), `--quant` artifacts are smaller and
//! stay close to it, and the flags refuse bad values with a message naming them.

mod common;

use common::*;

fn seedlm() -> std::path::PathBuf {
    repo().join("models/seedlm")
}

fn eval(art: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let text = seedlm().join("heldout.txt");
    last_json(&ok(llmc()
        .arg("eval")
        .arg(art)
        .arg("--text")
        .arg(&text)
        .args(["--json", "--threads", "2"])
        .args(extra)))
}

#[test]
fn eval_reproduces_train_info_and_quantized_artifacts_stay_close() {
    let d = tmpdir("quant-eval");
    let f32_art = d.join("f32.llmc");
    let j = last_json(&ok(llmc()
        .arg("compile")
        .arg(seedlm())
        .arg("-o")
        .arg(&f32_art)
        .arg("--json")));
    assert_eq!(j["bits_per_weight"].as_f64(), Some(32.0));
    let want = read_json(&seedlm().join("train_info.json"))["heldout_ppl_fp32"]
        .as_f64()
        .unwrap();
    let e = eval(&f32_art, &[]);
    let ppl = e["perplexity"].as_f64().unwrap();
    assert!(
        (ppl / want - 1.0).abs() < 0.005,
        "f32 perplexity {ppl}, transformers measured {want}"
    );
    assert_eq!(e["predicted"].as_u64(), Some(64 * 127));

    let q_art = d.join("int8.llmc");
    let jq = last_json(&ok(llmc()
        .arg("compile")
        .arg(seedlm())
        .arg("-o")
        .arg(&q_art)
        .args(["--quant", "int8", "--json"])));
    assert!(
        jq["file_bytes"].as_u64().unwrap() * 2 < j["file_bytes"].as_u64().unwrap(),
        "int8 artifact not smaller: {jq}"
    );
    assert!(jq["quant"]["tensors"].as_u64().unwrap() > 0);
    let eq = eval(&q_art, &["--reference", f32_art.to_str().unwrap()]);
    let qppl = eq["perplexity"].as_f64().unwrap();
    assert!(
        (qppl / ppl - 1.0).abs() < 0.005,
        "int8 perplexity {qppl} vs f32 {ppl}"
    );
    assert!(
        eq["kl"].as_f64().unwrap() < 0.01 && eq["top1_agreement"].as_f64().unwrap() > 0.95,
        "{eq}"
    );

    // int4 with a partial last group (intermediate 688 = 21 * 32 + 16), lm_head kept in f32 (and
    // named so in the report); the embedding table quantized too.
    let q4 = d.join("int4.llmc");
    let j4 = last_json(&ok(llmc()
        .arg("compile")
        .arg(seedlm())
        .arg("-o")
        .arg(&q4)
        .args(["--quant", "int4:g32:asym", "--keep-fp", "lm_head", "--json"])));
    assert_eq!(
        j4["quant"]["tensors"].as_u64(),
        Some(43),
        "6 layers x 7 matrices and the embedding, lm_head kept: {j4}"
    );
    assert_eq!(
        j4["quant"]["float_weights"],
        serde_json::json!([{ "name": "lm_head.weight", "shape": "[4096, 256]", "why": "--keep-fp `lm_head`" }]),
        "{j4}"
    );
    let e4 = eval(&q4, &[]);
    let p4 = e4["perplexity"].as_f64().unwrap();
    assert!(
        p4 > ppl && p4 < ppl * 1.1,
        "int4 perplexity {p4} vs f32 {ppl}"
    );
}

#[test]
fn quant_flags_are_checked() {
    let d = tmpdir("quant-flags");
    let out = d.join("x.llmc");
    fails_with(
        llmc()
            .arg("compile")
            .arg(seedlm())
            .arg("-o")
            .arg(&out)
            .args(["--quant", "int3"]),
        &["--quant", "int3"],
    );
    fails_with(
        llmc()
            .arg("compile")
            .arg(seedlm())
            .arg("-o")
            .arg(&out)
            .args(["--quant", "int4:g7"]),
        &["group"],
    );
    // --keep-fp without --quant or --sparsity is a usage error.
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--keep-fp", "lm_head"]),
        &["--keep-fp", "--quant"],
    );
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--sparsity", "3:4"]),
        &["--sparsity", "3:4"],
    );
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--sparsity", "2:4:wanda"]),
        &["wanda", "--calib"],
    );
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--sparsity", "2:4", "--quant", "int4"]),
        &["--sparsity", "int8"],
    );
    fails_with(
        llmc()
            .arg("compile")
            .arg(seedlm())
            .arg("-o")
            .arg(&out)
            .args(["--quant", "int4", "--calib", "/nonexistent/calib.txt"]),
        &["--calib", "/nonexistent/calib.txt"],
    );
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--quant", "w4a8:g16"]),
        &["w4a8", "32"],
    );
    fails_with(
        llmc().arg("compile").arg(seedlm()).arg("-o").arg(&out).args(["--quant", "w8a8", "--smooth-alpha", "1.5"]),
        &["--smooth-alpha"],
    );
    assert!(!out.exists());
}

/// W8A8 (SmoothQuant-calibrated) and W4A8 (GPTQ-calibrated): activations quantized per token
/// at run time; perplexity stays close to f32.
#[test]
fn activation_quantized_layouts() {
    let d = tmpdir("quant-a8");
    let calib = seedlm().join("calib.txt");
    let mk = |name: &str, extra: &[&str]| -> (std::path::PathBuf, serde_json::Value) {
        let art = d.join(name);
        let j = last_json(&ok(llmc().arg("compile").arg(seedlm()).arg("-o").arg(&art).arg("--json").args(extra)));
        (art, j)
    };
    let (f32_art, _) = mk("f32.llmc", &[]);
    let ppl = eval(&f32_art, &[])["perplexity"].as_f64().unwrap();
    let (w8, j8) = mk("w8a8.llmc", &["--quant", "w8a8", "--calib", calib.to_str().unwrap()]);
    assert_eq!(j8["quant"]["method"], "smoothquant", "{j8}");
    let p8 = eval(&w8, &[])["perplexity"].as_f64().unwrap();
    assert!(p8 != ppl && (p8 / ppl - 1.0).abs() < 0.01, "w8a8 {p8} vs f32 {ppl}");
    let (w4, j4) = mk("w4a8.llmc", &["--quant", "w4a8", "--calib", calib.to_str().unwrap()]);
    assert_eq!(j4["quant"]["layout"], "w4a8_g32", "{j4}");
    let p4 = eval(&w4, &[])["perplexity"].as_f64().unwrap();
    assert!(p4 > ppl && p4 < ppl * 1.03, "w4a8 {p4} vs f32 {ppl}");
}

/// GPTQ-calibrated int4 g32 beats round-to-nearest and stays within 2% of f32 perplexity;
/// `--report` lists every quantized matrix with its weight and output error.
#[test]
fn calibrated_int4_beats_round_to_nearest() {
    let d = tmpdir("quant-gptq");
    let calib = seedlm().join("calib.txt");
    let mk = |name: &str, extra: &[&str]| -> (std::path::PathBuf, serde_json::Value) {
        let art = d.join(name);
        let j = last_json(&ok(llmc().arg("compile").arg(seedlm()).arg("-o").arg(&art).arg("--json").args(extra)));
        (art, j)
    };
    let (f32_art, _) = mk("f32.llmc", &[]);
    let ppl = eval(&f32_art, &[])["perplexity"].as_f64().unwrap();
    let (rtn, _) = mk("rtn.llmc", &["--quant", "int4"]);
    let p_rtn = eval(&rtn, &[])["perplexity"].as_f64().unwrap();
    let (gq, j) = mk("gptq.llmc", &["--quant", "int4", "--calib", calib.to_str().unwrap(), "--report"]);
    assert_eq!(j["quant"]["method"], "gptq", "{j}");
    let rows = j["report"].as_array().unwrap();
    // 42 products, the embedding table (int4, gathered from: no output error) and the LM head
    // (int8 by default under a 4-bit format).
    assert_eq!(rows.len(), 44, "{j}");
    for r in rows {
        let we = r["weight_error"].as_f64().unwrap();
        assert!(we > 0.0 && we < 0.5, "{r}");
        let embed = r["name"] == "model.embed_tokens.weight";
        assert_eq!(r["output_error"].is_null(), embed, "{r}");
        if let Some(oe) = r["output_error"].as_f64() {
            assert!(oe > 0.0 && oe < 0.5, "{r}");
        }
        let (layout, bits) = if r["name"] == "lm_head.weight" { ("int8", 8.125) } else { ("int4_g32", 4.5) };
        assert_eq!(r["layout"], layout, "{r}");
        assert!((r["bits_per_weight"].as_f64().unwrap() - bits).abs() < 0.1, "{r}");
    }
    assert_eq!(j["quant"]["float_weights"], serde_json::json!([]), "{j}");
    let p_gq = eval(&gq, &["--reference", f32_art.to_str().unwrap()])["perplexity"].as_f64().unwrap();
    assert!(p_gq < p_rtn, "gptq {p_gq} vs rtn {p_rtn}");
    assert!(p_gq <= ppl * 1.02, "gptq {p_gq} vs f32 {ppl}");
}

/// 2:4 sparsity: magnitude and Wanda artifacts run, Wanda (activation-aware) loses less, and
/// 2:4 with int8 kept values is smaller than int8.
#[test]
fn sparse_24_magnitude_and_wanda() {
    let d = tmpdir("quant-24");
    let calib = seedlm().join("calib.txt");
    let mk = |name: &str, extra: &[&str]| -> (std::path::PathBuf, serde_json::Value) {
        let art = d.join(name);
        let j = last_json(&ok(llmc().arg("compile").arg(seedlm()).arg("-o").arg(&art).arg("--json").args(extra)));
        (art, j)
    };
    let (f32_art, _) = mk("f32.llmc", &[]);
    let ppl = eval(&f32_art, &[])["perplexity"].as_f64().unwrap();
    let (mag, jm) = mk("mag.llmc", &["--sparsity", "2:4"]);
    assert_eq!(jm["quant"]["layout"], "sparse24", "{jm}");
    let p_mag = eval(&mag, &[])["perplexity"].as_f64().unwrap();
    let (wa, jw) = mk("wanda.llmc", &["--sparsity", "2:4:wanda", "--calib", calib.to_str().unwrap()]);
    assert_eq!(jw["quant"]["method"], "wanda", "{jw}");
    let p_wa = eval(&wa, &[])["perplexity"].as_f64().unwrap();
    assert!(ppl < p_wa && p_wa < p_mag, "f32 {ppl}, wanda {p_wa}, magnitude {p_mag}");
    let (_, j8) = mk("int8.llmc", &["--quant", "int8"]);
    let (s8, js8) = mk("s8.llmc", &["--sparsity", "2:4", "--quant", "int8"]);
    assert_eq!(js8["quant"]["layout"], "sparse24_int8", "{js8}");
    // The embedding table and the head are not pruned, but take the int8 of `--quant int8`.
    assert_eq!(js8["quant"]["float_weights"], serde_json::json!([]), "{js8}");
    assert_eq!(jm["quant"]["float_weights"].as_array().map(|a| a.len()), Some(2), "2:4 alone: head and table in float: {jm}");
    assert!(js8["weight_bytes"].as_u64() < j8["weight_bytes"].as_u64(), "{js8} vs {j8}");
    let p_s8 = eval(&s8, &[])["perplexity"].as_f64().unwrap();
    assert!(p_s8 > ppl, "2:4+int8 {p_s8} vs f32 {ppl}");
}
