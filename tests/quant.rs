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

    // int4 with a partial last group (intermediate 688 = 21 * 32 + 16), lm_head kept in f32.
    let q4 = d.join("int4.llmc");
    let j4 = last_json(&ok(llmc()
        .arg("compile")
        .arg(seedlm())
        .arg("-o")
        .arg(&q4)
        .args(["--quant", "int4:g32:asym", "--keep-fp", "lm_head", "--json"])));
    assert_eq!(
        j4["quant"]["tensors"].as_u64(),
        Some(42),
        "6 layers x 7 matrices, lm_head kept: {j4}"
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
    // --keep-fp without --quant is a usage error (clap's exit code 2).
    let o = llmc()
        .arg("compile")
        .arg(seedlm())
        .arg("-o")
        .arg(&out)
        .args(["--keep-fp", "lm_head"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--quant"), "{}", stderr(&o));
}
