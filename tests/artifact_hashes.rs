//! Artifact stability: the code and data sections of the artifacts llmc writes for the bundled
//! model, every golden fixture and a 125M-parameter Llama shape are byte-identical to the ones
//! recorded in `tests/artifact_hashes.txt` (xxh3-64 of each section, the checksums the header
//! carries). A refactor of the compiler must not change what it emits; a deliberate change of
//! the emitted bytes re-records the list with `LLMC_BLESS=1 cargo test --test artifact_hashes`
//! and says why in its commit.
//!
//! Machine code depends on the ISA features Cranelift finds on the host: the list records the
//! host's feature set, and on a host with another set only the data sections are compared (the
//! code hashes are printed for a new record). Header fields (offsets, checksums, entry lists)
//! may change freely and are not compared.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

const LIST: &str = "tests/artifact_hashes.txt";

/// One compilation through the library: a name, the model and the config (the `llmc compile`
/// flags it stands for in the comments).
struct Case {
    name: &'static str,
    model: PathBuf,
    config: CompileConfig,
}

/// `--quant FORMAT` and `--sparsity PATTERN` as a config.
fn quant(format: Option<&str>, sparsity: Option<&str>) -> QuantConfig {
    QuantConfig { quant: format.map(String::from), sparsity: sparsity.map(String::from), ..Default::default() }
}

fn cases(big: &Path) -> Vec<Case> {
    let mut v = Vec::new();
    for f in [
        "bert_tiny",
        "gemma",
        "gpt2",
        "llama_gqa_llama3",
        "llama_mha",
        "llama_sharded_f16",
        "llama_tied_bf16",
        "mistral_sliding",
        "mixtral",
        "neox",
        "neox_sequential",
        "phi3",
        "qwen2",
        "qwen3",
    ] {
        v.push(Case { name: f, model: fixture(f), config: CompileConfig::default() });
    }
    let seed = repo().join("models/seedlm");
    let calib = || Some(repo().join("models/seedlm/calib.txt"));
    let d = CompileConfig::default;
    for (name, config) in [
        ("seedlm", d()),
        // --no-tokenizer
        ("seedlm-no-tokenizer", CompileConfig { no_tokenizer: true, ..d() }),
        // --max-chunk 64 --max-context 256
        ("seedlm-chunk64", CompileConfig { max_chunk: Some(64), max_context: Some(256), ..d() }),
        // --no-microkernels
        ("seedlm-no-microkernels", CompileConfig { no_microkernels: true, ..d() }),
        // --quant int8
        ("seedlm-int8", CompileConfig { quant: quant(Some("int8"), None), ..d() }),
        // --quant int4
        ("seedlm-int4", CompileConfig { quant: quant(Some("int4"), None), ..d() }),
        // --quant int4:g64:asym
        ("seedlm-int4-g64-asym", CompileConfig { quant: quant(Some("int4:g64:asym"), None), ..d() }),
        // --quant w8a8
        ("seedlm-w8a8", CompileConfig { quant: quant(Some("w8a8"), None), ..d() }),
        // --quant w4a8:g128
        ("seedlm-w4a8-g128", CompileConfig { quant: quant(Some("w4a8:g128"), None), ..d() }),
        // --sparsity 2:4
        ("seedlm-2:4", CompileConfig { quant: quant(None, Some("2:4")), ..d() }),
        // --sparsity 2:4 --quant int8
        ("seedlm-2:4-int8", CompileConfig { quant: quant(Some("int8"), Some("2:4")), ..d() }),
        // --quant int4 --keep-fp lm_head
        ("seedlm-int4-keep-lm_head", CompileConfig { quant: QuantConfig { keep_fp: vec!["lm_head".into()], ..quant(Some("int4"), None) }, ..d() }),
        // --quant int4 --calib models/seedlm/calib.txt --calib-tokens 256
        ("seedlm-int4-gptq", CompileConfig { quant: QuantConfig { calib: calib(), calib_tokens: 256, ..quant(Some("int4"), None) }, ..d() }),
        // --quant w8a8 --calib models/seedlm/calib.txt --calib-tokens 256
        ("seedlm-w8a8-smoothquant", CompileConfig { quant: QuantConfig { calib: calib(), calib_tokens: 256, ..quant(Some("w8a8"), None) }, ..d() }),
    ] {
        v.push(Case { name, model: seed.clone(), config });
    }
    v.push(Case { name: "llama-125m", model: big.to_path_buf(), config: d() });
    // --quant int8
    v.push(Case { name: "llama-125m-int8", model: big.to_path_buf(), config: CompileConfig { quant: quant(Some("int8"), None), ..d() } });
    v
}

/// A deterministic 125M-parameter Llama checkpoint (the benchmark shape of
/// `scripts/gen_bench_model.py`: hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab
/// 32000, untied head) with pseudo-random f32 weights, so that no Python is needed.
fn write_125m(dir: &Path) {
    use safetensors::tensor::{Dtype, TensorView};
    let (h, layers, heads, kv, mlp, vocab) = (768usize, 12usize, 12usize, 4usize, 2048usize, 32000usize);
    let hd = h / heads;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![heads * hd, h]),
            ("self_attn.k_proj.weight", vec![kv * hd, h]),
            ("self_attn.v_proj.weight", vec![kv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, heads * hd]),
            ("mlp.gate_proj.weight", vec![mlp, h]),
            ("mlp.up_proj.weight", vec![mlp, h]),
            ("mlp.down_proj.weight", vec![h, mlp]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![vocab, h]));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let datas: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(name, s)| {
            let n: usize = s.iter().product();
            let norm = name.ends_with("norm.weight");
            let mut b = Vec::with_capacity(n * 4);
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // [-0.5, 0.5)
                let x = if norm { 1.0 + 0.1 * u } else { 0.08 * u };
                b.extend_from_slice(&x.to_le_bytes());
            }
            b
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        shapes.iter().zip(&datas).map(|((n, s), d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

#[test]
fn artifacts_are_byte_identical_to_the_recorded_list() {
    let tmp = tmpdir("artifact-hashes");
    let big = tmp.join("llama-125m");
    std::fs::create_dir_all(&big).unwrap();
    write_125m(&big);
    let mut got = BTreeMap::new();
    let mut features = String::new();
    for c in cases(&big) {
        let art = tmp.join(format!("{}.llmc", c.name.replace(':', "_")));
        compile_with(&c.model, &art, c.config);
        let (f, code, data) = section_hashes(&art);
        features = f;
        got.insert(c.name.to_string(), (code, data));
        let _ = std::fs::remove_file(&art);
    }
    check_hash_list(LIST, "`llmc compile` artifacts; tests/artifact_hashes.rs", ("features", "ISA features"), &features, &got);
}

/// Busy loops beside the compile (machine load must not change an artifact); killed on drop.
struct Busy(Vec<std::process::Child>);

impl Busy {
    fn start(n: usize) -> Busy {
        Busy((0..n).map(|_| std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh")).collect())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Deterministic builds: the bundled model, a 125M Llama shape (12 identical layers, so the
/// optimizer's region reuse is in play) and a GPTQ-calibrated compile give the same artifact,
/// byte for byte (header included), with `--threads 1`, with `--threads 2`, and with two
/// busy-loop processes running beside the compile: every bound of the optimizer is fuel, and
/// parallel work combines its parts in a fixed order.
#[test]
fn artifacts_are_identical_at_any_thread_count_and_under_load() {
    let tmp = tmpdir("artifact-determinism");
    let big = tmp.join("llama-125m");
    std::fs::create_dir_all(&big).unwrap();
    write_125m(&big);
    let seed = repo().join("models/seedlm");
    let calibrated = || CompileConfig {
        quant: QuantConfig { calib: Some(seed.join("calib.txt")), ..quant(Some("int4"), None) },
        ..Default::default()
    };
    for (name, model, config) in [
        ("seedlm", seed.clone(), CompileConfig::default()),
        ("125m", big.clone(), CompileConfig::default()),
        ("seedlm-int4-gptq", seed.clone(), calibrated()),
    ] {
        let mut reference: Option<Vec<u8>> = None;
        for (how, threads, busy) in [("1 thread", 1, 0), ("2 threads", 2, 0), ("2 threads, 2 busy loops", 2, 2)] {
            let art = tmp.join(format!("{name}-{threads}-{busy}.llmc"));
            let _load = Busy::start(busy);
            compile_with(&model, &art, CompileConfig { threads: Some(threads), ..config.clone() });
            let bytes = std::fs::read(&art).unwrap();
            let _ = std::fs::remove_file(&art);
            match &reference {
                None => reference = Some(bytes),
                Some(r) => assert!(*r == bytes, "{name}: the artifact compiled with {how} differs from the one with 1 thread"),
            }
        }
    }
    llmc_ir::threads::set_max(0);
}
