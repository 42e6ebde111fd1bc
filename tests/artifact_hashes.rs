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

/// `(cpu_features, code_checksum, data_checksum)` from an artifact's header.
fn section_hashes(art: &Path) -> (String, String, String) {
    let bytes = std::fs::read(art).unwrap();
    let hlen = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[32..32 + hlen]).unwrap();
    let feats: Vec<&str> = h["cpu_features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    (feats.join(","), h["code_checksum"].as_str().unwrap().into(), h["data_checksum"].as_str().unwrap().into())
}

#[test]
fn artifacts_are_byte_identical_to_the_recorded_list() {
    let tmp = tmpdir("artifact-hashes");
    let big = tmp.join("llama-125m");
    std::fs::create_dir_all(&big).unwrap();
    write_125m(&big);
    let mut got: BTreeMap<&str, (String, String, String)> = BTreeMap::new();
    for c in cases(&big) {
        let art = tmp.join(format!("{}.llmc", c.name.replace(':', "_")));
        compile_with(&c.model, &art, c.config);
        got.insert(c.name, section_hashes(&art));
        let _ = std::fs::remove_file(&art);
    }
    let features = got.values().next().map(|v| v.0.clone()).unwrap_or_default();
    let list_path = repo().join(LIST);
    if std::env::var_os("LLMC_BLESS").is_some() {
        let mut s = format!(
            "# Code and data section checksums (xxh3-64) of `llmc compile` artifacts; tests/artifact_hashes.rs.\n\
             # Recorded on a host with these ISA features (machine code depends on them):\n# features {features}\n"
        );
        for (name, (_, code, data)) in &got {
            s.push_str(&format!("{name} {code} {data}\n"));
        }
        std::fs::write(&list_path, s).unwrap();
        eprintln!("recorded {} artifacts in {LIST}", got.len());
        return;
    }
    let text = std::fs::read_to_string(&list_path).unwrap();
    let recorded_features = text.lines().find_map(|l| l.strip_prefix("# features ")).unwrap_or("").to_string();
    let want: BTreeMap<&str, (&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{LIST}: bad line {l:?}");
            (f[0], (f[1], f[2]))
        })
        .collect();
    let same_isa = recorded_features == features;
    if !same_isa {
        eprintln!("NOTE: this host's ISA features differ from the recorded host's: comparing data sections only\n  here:     {features}\n  recorded: {recorded_features}");
    }
    let mut bad = vec![];
    for (name, (_, code, data)) in &got {
        let Some((wcode, wdata)) = want.get(name) else {
            bad.push(format!("{name}: not in {LIST}"));
            continue;
        };
        if data != wdata {
            bad.push(format!("{name}: data section {data}, recorded {wdata}"));
        }
        if same_isa && code != wcode {
            bad.push(format!("{name}: code section {code}, recorded {wcode}"));
        } else if !same_isa {
            eprintln!("{name}: code {code} (recorded on the other host: {wcode})");
        }
    }
    assert_eq!(want.len(), got.len(), "{LIST} lists {} artifacts, the test compiles {}", want.len(), got.len());
    assert!(bad.is_empty(), "artifacts changed:\n{}", bad.join("\n"));
}
