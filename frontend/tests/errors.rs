//! Every way a checkpoint can be wrong is an error that names the culprit, never a panic.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use llmc_frontend::{load, Checkpoint, FrontendError, Model, Options, SUPPORTED_ARCHITECTURES};
use safetensors::Dtype;
use serde_json::{json, Value};

fn load_err(path: &Path) -> FrontendError {
    match load(path, &Options::default()) {
        Ok(m) => panic!("expected an error, loaded graph {}", m.graph.name),
        Err(e) => e,
    }
}

/// A valid tiny Llama in a fresh dir, with `edit` applied to its config and tensors.
fn llama_with(edit: impl FnOnce(&mut Value, &mut Tensors)) -> (TempDir, FrontendError) {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    let (mut cfg, mut t) = (spec.config(), spec.tensors(1));
    edit(&mut cfg, &mut t);
    write_model(dir.path(), &cfg, &t, Dtype::F32);
    let e = load_err(dir.path());
    (dir, e)
}

fn gpt2_err(edit: impl FnOnce(&mut Value)) -> FrontendError {
    let dir = TempDir::new();
    let spec = Gpt2Spec::default();
    let mut cfg = spec.config();
    edit(&mut cfg);
    write_model(dir.path(), &cfg, &spec.tensors(1), Dtype::F32);
    load_err(dir.path())
}

#[test]
fn the_fixture_itself_loads() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_model(dir.path(), &spec.config(), &spec.tensors(1), Dtype::F32);
    let m: Model = load(dir.path(), &Options::default()).unwrap();
    llmc_ir::verify(&m.graph).unwrap();
}

#[test]
fn missing_path() {
    let dir = TempDir::new();
    let p = dir.path().join("nope");
    match load_err(&p) {
        FrontendError::NotFound { path } => assert_eq!(path, p),
        e => panic!("{e}"),
    }
}

#[test]
fn missing_config_json() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_tensors(&dir.path().join("model.safetensors"), &spec.tensors(1), Dtype::F32);
    for p in [dir.path().to_path_buf(), dir.path().join("model.safetensors")] {
        match load_err(&p) {
            FrontendError::MissingConfig { dir: d } => assert_eq!(d, dir.path()),
            e => panic!("{e}"),
        }
    }
    assert!(load_err(dir.path()).to_string().contains("config.json"));
}

#[test]
fn missing_model_file() {
    let dir = TempDir::new();
    write_config(dir.path(), &LlamaSpec::default().config());
    match load_err(dir.path()) {
        FrontendError::NotFound { path } => assert_eq!(path, dir.path().join("model.safetensors")),
        e => panic!("{e}"),
    }
}

#[test]
fn config_not_json() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_model(dir.path(), &spec.config(), &spec.tensors(1), Dtype::F32);
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 16,").unwrap();
    let e = load_err(dir.path());
    let msg = e.to_string();
    match e {
        FrontendError::ConfigNotJson { path, msg: m } => {
            assert_eq!(path, dir.path().join("config.json"));
            assert!(!m.is_empty());
        }
        e => panic!("{e}"),
    }
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let (_d, e) = llama_with(|c, _| c["architectures"] = json!(["FalconForCausalLM"]));
    let msg = e.to_string();
    assert!(matches!(e, FrontendError::UnsupportedArchitecture { ref name } if name == "FalconForCausalLM"));
    assert!(msg.contains("FalconForCausalLM"), "{msg}");
    for a in SUPPORTED_ARCHITECTURES {
        assert!(msg.contains(a), "{msg}");
    }
}

#[test]
fn missing_tensor() {
    let name = "model.layers.1.mlp.up_proj.weight";
    let (_d, e) = llama_with(|_, t| {
        t.remove(name);
    });
    assert!(e.to_string().contains(name), "{e}");
    assert!(matches!(e, FrontendError::MissingTensor { name: ref n } if n == name));
    // Untied head without lm_head.weight.
    let (_d, e) = llama_with(|_, t| {
        t.remove("lm_head.weight");
    });
    assert!(matches!(e, FrontendError::MissingTensor { ref name } if name == "lm_head.weight"), "{e}");
}

#[test]
fn wrong_shape() {
    let name = "model.layers.0.self_attn.k_proj.weight";
    let (_d, e) = llama_with(|_, t| {
        t.insert(name.into(), (vec![16, 8], vec![0.0; 128]));
    });
    let msg = e.to_string();
    match e {
        FrontendError::ShapeMismatch { name: n, expected, found } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![8, 16]);
            assert_eq!(found, vec![16, 8]);
        }
        e => panic!("{e}"),
    }
    assert!(msg.contains(name) && msg.contains("[8, 16]") && msg.contains("[16, 8]"), "{msg}");
    // The config disagreeing with the checkpoint is the same error (vocab 12 vs 11 rows).
    let (_d, e) = llama_with(|c, _| c["vocab_size"] = json!(12));
    assert!(matches!(e, FrontendError::ShapeMismatch { ref name, .. } if name == "model.embed_tokens.weight"), "{e}");
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_config(dir.path(), &spec.config());
    let t = spec.tensors(1);
    let bad = "model.norm.weight";
    let raw: Vec<_> = t
        .iter()
        .map(|(n, (s, v))| {
            if n == bad {
                (n.clone(), Dtype::I64, s.clone(), v.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect())
            } else {
                (n.clone(), Dtype::F32, s.clone(), encode(v, Dtype::F32))
            }
        })
        .collect();
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let e = load_err(dir.path());
    assert!(matches!(e, FrontendError::UnsupportedDtype { ref name, ref dtype } if name == bad && dtype == "I64"), "{e}");
    let (ck, _) = Checkpoint::open(dir.path()).unwrap();
    assert!(matches!(ck.read_f32(bad), Err(FrontendError::UnsupportedDtype { .. })));
    assert_eq!(ck.info(bad).unwrap().dtype, None);
}

fn write_valid_file(path: &Path) -> Vec<u8> {
    write_tensors(path, &LlamaSpec::default().tensors(1), Dtype::F32);
    std::fs::read(path).unwrap()
}

#[test]
fn truncated_safetensors_file() {
    let dir = TempDir::new();
    write_config(dir.path(), &LlamaSpec::default().config());
    let p = dir.path().join("model.safetensors");
    let bytes = write_valid_file(&p);
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, FrontendError::Safetensors { ref path, .. } if path == &p), "{e}");
    assert!(e.to_string().contains("model.safetensors"));
    // Shorter than the 8-byte length prefix, and empty.
    for n in [5, 0] {
        std::fs::write(&p, &bytes[..n]).unwrap();
        assert!(matches!(load_err(dir.path()), FrontendError::Safetensors { .. }));
    }
}

#[test]
fn header_length_larger_than_file() {
    let dir = TempDir::new();
    write_config(dir.path(), &LlamaSpec::default().config());
    let p = dir.path().join("model.safetensors");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&1000u64.to_le_bytes()).unwrap();
    f.write_all(b"{}").unwrap();
    drop(f);
    let e = load_err(dir.path());
    assert!(matches!(e, FrontendError::Safetensors { ref path, .. } if path == &p), "{e}");
    // A header length beyond safetensors' limit, and one that overflows.
    for n in [200_000_000u64, u64::MAX] {
        std::fs::write(&p, n.to_le_bytes()).unwrap();
        assert!(matches!(load_err(dir.path()), FrontendError::Safetensors { .. }));
    }
    // Offsets pointing past the data.
    let mut bytes = Vec::new();
    let header = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    bytes.extend((header.len() as u64).to_le_bytes());
    bytes.extend(header);
    bytes.extend([0u8; 8]);
    std::fs::write(&p, bytes).unwrap();
    assert!(matches!(load_err(dir.path()), FrontendError::Safetensors { .. }));
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_config(dir.path(), &spec.config());
    let t = spec.tensors(1);
    write_tensors(&dir.path().join("model-00001-of-00002.safetensors"), &t, Dtype::F32);
    let mut map = serde_json::Map::new();
    for (i, n) in t.keys().enumerate() {
        let shard = if i == 0 { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" };
        map.insert(n.clone(), json!(shard));
    }
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    let e = load_err(dir.path());
    let msg = e.to_string();
    match e {
        FrontendError::MissingShard { index: i, shard } => {
            assert_eq!(i, index);
            assert_eq!(shard, dir.path().join("model-00002-of-00002.safetensors"));
        }
        e => panic!("{e}"),
    }
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");

    // An index that places a tensor in the wrong shard, and one that is not an index.
    write_tensors(&dir.path().join("model-00002-of-00002.safetensors"), &Tensors::new(), Dtype::F32);
    assert!(matches!(load_err(dir.path()), FrontendError::InvalidIndex { .. }));
    std::fs::write(&index, "{\"weights\": {}}").unwrap();
    assert!(matches!(load_err(dir.path()), FrontendError::InvalidIndex { .. }));
    std::fs::write(&index, "not json").unwrap();
    assert!(matches!(load_err(dir.path()), FrontendError::ConfigNotJson { .. }));
}

#[test]
fn heads_not_dividing_hidden() {
    let (_d, e) = llama_with(|c, _| c["num_attention_heads"] = json!(5));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "num_attention_heads"), "{e}");
    assert!(e.to_string().contains("must divide hidden_size"), "{e}");
    let (_d, e) = llama_with(|c, _| c["num_key_value_heads"] = json!(3));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "num_key_value_heads"), "{e}");
    let e = gpt2_err(|c| c["n_head"] = json!(3));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "n_head"), "{e}");
}

#[test]
fn zero_negative_and_huge_sizes() {
    let (_d, e) = llama_with(|c, _| c["num_hidden_layers"] = json!(0));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "num_hidden_layers"), "{e}");
    assert!(e.to_string().contains("positive"), "{e}");
    let (_d, e) = llama_with(|c, _| c["hidden_size"] = json!(-16));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "hidden_size"), "{e}");
    let (_d, e) = llama_with(|c, _| c["intermediate_size"] = json!(1u64 << 40));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "intermediate_size"), "{e}");
    let (_d, e) = llama_with(|c, _| c["head_dim"] = json!(1 << 30));
    assert!(matches!(e, FrontendError::ConfigField { .. }), "{e}");
    let (_d, e) = llama_with(|c, _| {
        c.as_object_mut().unwrap().remove("vocab_size");
    });
    assert!(matches!(e, FrontendError::ConfigField { ref field, ref msg } if field == "vocab_size" && msg == "missing"), "{e}");
    // A huge layer count fails on the config bound, not by building a huge graph.
    let (_d, e) = llama_with(|c, _| c["num_hidden_layers"] = json!(2_000_000_000));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "num_hidden_layers"), "{e}");
    // A plausible but wrong layer count fails on the first missing layer.
    let (_d, e) = llama_with(|c, _| c["num_hidden_layers"] = json!(500));
    assert!(matches!(e, FrontendError::MissingTensor { ref name } if name.starts_with("model.layers.2.")), "{e}");
    let e = gpt2_err(|c| c["n_layer"] = json!(0));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "n_layer"), "{e}");
    // max_context 0 is an invalid option.
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_model(dir.path(), &spec.config(), &spec.tensors(1), Dtype::F32);
    let e = load(dir.path(), &Options { max_context: Some(0) }).unwrap_err();
    assert!(matches!(e, FrontendError::InvalidOption { ref name, .. } if name == "max_context"), "{e}");
}

#[test]
fn unsupported_settings_are_named() {
    let (_d, e) = llama_with(|c, _| c["hidden_act"] = json!("gelu"));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "hidden_act"), "{e}");
    assert!(e.to_string().contains("gelu"));
    let (_d, e) = llama_with(|c, _| c["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0}));
    assert!(e.to_string().contains("dynamic") && e.to_string().contains("rope_scaling.rope_type"), "{e}");
    let (_d, e) = llama_with(|c, _| c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0}));
    assert!(e.to_string().contains("low_freq_factor"), "{e}");
    let (_d, e) = llama_with(|c, _| c["rms_norm_eps"] = json!("small"));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "rms_norm_eps"), "{e}");
    for f in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        let e = gpt2_err(|c| c[f] = json!(true));
        assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == f), "{e}");
    }
    let e = gpt2_err(|c| c["activation_function"] = json!("relu"));
    assert!(e.to_string().contains("relu"), "{e}");
    let e = gpt2_err(|c| c["architectures"] = json!("GPT2LMHeadModel"));
    assert!(matches!(e, FrontendError::ConfigField { ref field, .. } if field == "architectures"), "{e}");
}

#[test]
fn weight_source_checks_element_counts() {
    use llmc_ir::{Dim, TensorType, WeightSource};
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_model(dir.path(), &spec.config(), &spec.tensors(1), Dtype::F32);
    let (ck, _) = Checkpoint::open(dir.path()).unwrap();
    let e = ck.load("model.norm.weight", &TensorType::f32(vec![Dim::N(17)])).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    assert_eq!(ck.load("model.norm.weight", &TensorType::f32(vec![Dim::N(4), Dim::N(4)])).unwrap().len(), 16);
}
