//! Bad input gets a clear error naming the thing, exit code 1, and no panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A copy of a fixture model directory (config.json + model.safetensors) to damage.
fn copy_model(case: &str, name: &str) -> PathBuf {
    let src = fixture(case);
    let dst = tmpdir(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn compile_cmd(model: &Path, out: &Path) -> std::process::Command {
    let mut c = llmc();
    c.arg("compile").arg(model).arg("--target").arg("cpu").arg("-o").arg(out);
    c
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v = read_json(&p);
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites model.safetensors keeping the tensors `keep` accepts.
fn filter_tensors(dir: &Path, keep: impl Fn(&str) -> bool) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&p, out).unwrap();
}

#[test]
fn missing_config_json() {
    let d = copy_model("llama_mha", "bad-noconfig");
    std::fs::remove_file(d.join("config.json")).unwrap();
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["config.json"]);
}

#[test]
fn config_not_json() {
    let d = copy_model("llama_mha", "bad-configjson");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["config.json"]);
}

#[test]
fn missing_model_path() {
    let d = tmpdir("bad-nopath");
    fails_with(&mut compile_cmd(&d.join("nope"), &d.join("o.llmc")), &["nope"]);
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_list() {
    let d = copy_model("llama_mha", "bad-arch");
    edit_config(&d, |v| v["architectures"] = serde_json::json!(["FancyNetForCausalLM"]));
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["FancyNetForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel"]);
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_model("llama_mha", "bad-missing-tensor");
    filter_tensors(&d, |n| n != "model.layers.1.mlp.up_proj.weight");
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["model.layers.1.mlp.up_proj.weight"]);
}

#[test]
fn shape_disagreeing_with_config_is_named() {
    let d = copy_model("llama_mha", "bad-shape");
    edit_config(&d, |v| {
        let i = v["intermediate_size"].as_u64().unwrap();
        v["intermediate_size"] = serde_json::json!(i + 8);
    });
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["mlp", "proj.weight"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_model("llama_mha", "bad-truncated");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["model.safetensors"]);
}

#[test]
fn corrupt_safetensors_header() {
    let d = copy_model("llama_mha", "bad-header");
    let p = d.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&p, &bytes).unwrap();
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["model.safetensors"]);
}

#[test]
fn header_length_larger_than_file() {
    let d = copy_model("llama_mha", "bad-headerlen");
    let p = d.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    fails_with(&mut compile_cmd(&d, &d.join("o.llmc")), &["model.safetensors"]);
}

#[test]
fn unknown_target_is_an_error() {
    let d = tmpdir("bad-target");
    let mut c = llmc();
    c.arg("compile").arg(fixture("llama_mha")).arg("--target").arg("tpu").arg("-o").arg(d.join("o.llmc"));
    fails_with(&mut c, &["tpu", "cpu"]);
}

/// One compiled artifact shared by the runtime bad-input tests.
fn artifact(name: &str, extra: &[&str]) -> PathBuf {
    let d = tmpdir(name);
    let art = d.join("m.llmc");
    compile(&fixture("llama_mha"), &art, extra);
    art
}

#[test]
fn token_id_out_of_range() {
    let art = artifact("bad-token", &[]);
    let mut c = llmc();
    c.arg("run").arg(&art).arg("--input-ids").arg("1,2,256").arg("--max-new-tokens").arg("2");
    fails_with(&mut c, &["token id 256", "vocabulary has 256"]);
    let mut c = llmc();
    c.arg("run").arg(&art).arg("--input-ids").arg("1,-3").arg("--max-new-tokens").arg("2");
    fails_with(&mut c, &["-3"]);
}

#[test]
fn prompt_longer_than_context() {
    let art = artifact("bad-context", &["--max-context", "16"]);
    let ids: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let mut c = llmc();
    c.arg("run").arg(&art).arg("--input-ids").arg(ids.join(",")).arg("--max-new-tokens").arg("1");
    fails_with(&mut c, &["context of 16"]);
    // Prompt fits but prompt + generation does not.
    let mut c = llmc();
    c.arg("run").arg(&art).arg("--input-ids").arg("1,2,3,4,5,6,7,8,9,10").arg("--max-new-tokens").arg("10");
    fails_with(&mut c, &["context of 16"]);
}

#[test]
fn corrupt_artifacts_are_refused_before_running() {
    let art = artifact("bad-artifact", &[]);
    let bytes = std::fs::read(&art).unwrap();
    let d = art.parent().unwrap();
    let run = |p: &Path, needles: &[&str]| {
        let mut c = llmc();
        c.arg("run").arg(p).arg("--input-ids").arg("1,2").arg("--max-new-tokens").arg("1");
        fails_with(&mut c, needles);
    };
    // Not an artifact at all.
    let p = d.join("not.llmc");
    std::fs::write(&p, b"hello, I am not an artifact").unwrap();
    run(&p, &["not.llmc", "bad magic"]);
    // Truncated.
    let p = d.join("trunc.llmc");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
    run(&p, &["trunc.llmc", "corrupt artifact"]);
    // A bit flipped in the header, the code and the data.
    let header_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let v = serde_json::from_slice::<serde_json::Value>(&bytes[32..32 + header_len]).unwrap();
    let code_off = v["code_offset"].as_u64().unwrap() as usize;
    let data_off = v["data_offset"].as_u64().unwrap() as usize;
    for (what, at) in [("header", 40), ("code", code_off + 5), ("data", data_off + 100)] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        let p = d.join(format!("flip-{what}.llmc"));
        std::fs::write(&p, &b).unwrap();
        run(&p, &["checksum", what]);
    }
    // Another format version.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    let p = d.join("v99.llmc");
    std::fs::write(&p, &b).unwrap();
    run(&p, &["version 99"]);
}

#[test]
fn artifact_requiring_a_missing_cpu_feature_is_refused() {
    // Rewrite the header of a valid artifact to require a feature name no CPU has, with a correct
    // header checksum, so only the feature check can refuse it.
    let art = artifact("bad-feature", &[]);
    let bytes = std::fs::read(&art).unwrap();
    let header_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let code_off = {
        let v: serde_json::Value = serde_json::from_slice(&bytes[32..32 + header_len]).unwrap();
        v["code_offset"].as_u64().unwrap() as usize
    };
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[32..32 + header_len]).unwrap();
    v["cpu_features"].as_array_mut().unwrap().push(serde_json::json!("amx-tile-imaginary"));
    let json = serde_json::to_vec(&v).unwrap();
    assert!(32 + json.len() <= code_off);
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
    b[24..32].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    b[32..32 + json.len()].copy_from_slice(&json);
    for x in &mut b[32 + json.len()..code_off] {
        *x = b' ';
    }
    let p = art.parent().unwrap().join("feature.llmc");
    std::fs::write(&p, &b).unwrap();
    let mut c = llmc();
    c.arg("run").arg(&p).arg("--input-ids").arg("1").arg("--max-new-tokens").arg("1");
    fails_with(&mut c, &["amx-tile-imaginary"]);
}
