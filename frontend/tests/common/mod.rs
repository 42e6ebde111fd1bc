//! Shared test fixtures: a self-removing temp directory, a deterministic RNG, and writers for tiny
//! Llama and GPT-2 checkpoints (config.json + safetensors) in any stored dtype.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "llmc-frontend-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic uniform floats.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in `[-a, a)`.
    pub fn uniform(&mut self, a: f32) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        (r as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
    pub fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(a)).collect()
    }
}

/// Checkpoint contents: name -> (shape, f32 values).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Encodes f32 values as `dtype` (F32, F16 or BF16) little-endian bytes.
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        d => panic!("test encoder does not handle {d}"),
    }
}

/// Writes raw tensors (name, dtype, shape, bytes) as a safetensors file.
pub fn write_raw(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("valid view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Writes `tensors` stored as `dtype` to `path`.
pub fn write_tensors(path: &Path, tensors: &Tensors, dtype: Dtype) {
    let raw: Vec<_> = tensors.iter().map(|(n, (s, v))| (n.clone(), dtype, s.clone(), encode(v, dtype))).collect();
    write_raw(path, &raw);
}

pub fn write_config(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).expect("json")).expect("write config");
}

/// A checkpoint directory: config.json + model.safetensors.
pub fn write_model(dir: &Path, config: &Value, tensors: &Tensors, dtype: Dtype) {
    write_config(dir, config);
    write_tensors(&dir.join("model.safetensors"), tensors, dtype);
}

/// Values after a round trip through `dtype` (what the model computes with).
pub fn rounded(tensors: &Tensors, dtype: Dtype) -> Tensors {
    tensors
        .iter()
        .map(|(n, (s, v))| {
            let r = match dtype {
                Dtype::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
                Dtype::BF16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
                _ => v.clone(),
            };
            (n.clone(), (s.clone(), r))
        })
        .collect()
}

/// A tiny Llama.
#[derive(Clone, Debug)]
pub struct LlamaSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written to the config when set; otherwise `hidden / heads`.
    pub head_dim: Option<usize>,
    pub inter: usize,
    pub vocab: usize,
    pub tie: bool,
    pub attn_bias: bool,
    pub mlp_bias: bool,
    pub eps: f64,
    pub rope_theta: f64,
    pub max_pos: usize,
}

impl Default for LlamaSpec {
    fn default() -> Self {
        LlamaSpec {
            hidden: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            inter: 24,
            vocab: 11,
            tie: false,
            attn_bias: false,
            mlp_bias: false,
            eps: 1e-5,
            rope_theta: 10000.0,
            max_pos: 64,
        }
    }
}

impl LlamaSpec {
    pub fn hd(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    pub fn config(&self) -> Value {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.inter,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_pos,
            "tie_word_embeddings": self.tie,
            "attention_bias": self.attn_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32"
        });
        if let Some(d) = self.head_dim {
            c["head_dim"] = json!(d);
        }
        c
    }

    pub fn tensors(&self, seed: u64) -> Tensors {
        let mut r = Rng::new(seed);
        let (h, hd, im, v) = (self.hidden, self.hd(), self.inter, self.vocab);
        let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
        let mut t = Tensors::new();
        let put = |t: &mut Tensors, r: &mut Rng, n: String, s: Vec<usize>, a: f32, off: f32| {
            let len = s.iter().product();
            let vals = r.vec(len, a).into_iter().map(|x| x + off).collect();
            t.insert(n, (s, vals));
        };
        put(&mut t, &mut r, "model.embed_tokens.weight".into(), vec![v, h], 1.0, 0.0);
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            put(&mut t, &mut r, format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
            put(&mut t, &mut r, format!("{p}.self_attn.q_proj.weight"), vec![qw, h], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.self_attn.k_proj.weight"), vec![kw, h], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.self_attn.v_proj.weight"), vec![kw, h], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.self_attn.o_proj.weight"), vec![h, qw], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
            put(&mut t, &mut r, format!("{p}.mlp.gate_proj.weight"), vec![im, h], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.up_proj.weight"), vec![im, h], 0.4, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.down_proj.weight"), vec![h, im], 0.4, 0.0);
            if self.attn_bias {
                for (n, w) in [("q_proj", qw), ("k_proj", kw), ("v_proj", kw), ("o_proj", h)] {
                    put(&mut t, &mut r, format!("{p}.self_attn.{n}.bias"), vec![w], 0.3, 0.0);
                }
            }
            if self.mlp_bias {
                for (n, w) in [("gate_proj", im), ("up_proj", im), ("down_proj", h)] {
                    put(&mut t, &mut r, format!("{p}.mlp.{n}.bias"), vec![w], 0.3, 0.0);
                }
            }
        }
        put(&mut t, &mut r, "model.norm.weight".into(), vec![h], 0.2, 1.0);
        if !self.tie {
            put(&mut t, &mut r, "lm_head.weight".into(), vec![v, h], 0.5, 0.0);
        }
        t
    }
}

/// A tiny GPT-2.
#[derive(Clone, Debug)]
pub struct Gpt2Spec {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab: usize,
    /// Names prefixed `transformer.` (transformers' save) or bare (original checkpoints).
    pub prefixed: bool,
}

impl Default for Gpt2Spec {
    fn default() -> Self {
        Gpt2Spec { n_embd: 8, n_layer: 2, n_head: 2, n_positions: 16, vocab: 13, prefixed: true }
    }
}

impl Gpt2Spec {
    pub fn prefix(&self) -> &'static str {
        if self.prefixed {
            "transformer."
        } else {
            ""
        }
    }

    pub fn config(&self) -> Value {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "vocab_size": self.vocab,
            "n_inner": null,
            "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new",
            "scale_attn_weights": true,
            "bos_token_id": 0,
            "eos_token_id": 0
        })
    }

    pub fn tensors(&self, seed: u64) -> Tensors {
        let mut r = Rng::new(seed);
        let (h, im, p0) = (self.n_embd, 4 * self.n_embd, self.prefix());
        let mut t = Tensors::new();
        let put = |t: &mut Tensors, r: &mut Rng, n: String, s: Vec<usize>, a: f32, off: f32| {
            let len = s.iter().product();
            let vals = r.vec(len, a).into_iter().map(|x| x + off).collect();
            t.insert(n, (s, vals));
        };
        put(&mut t, &mut r, format!("{p0}wte.weight"), vec![self.vocab, h], 1.0, 0.0);
        put(&mut t, &mut r, format!("{p0}wpe.weight"), vec![self.n_positions, h], 0.5, 0.0);
        for i in 0..self.n_layer {
            let p = format!("{p0}h.{i}");
            put(&mut t, &mut r, format!("{p}.ln_1.weight"), vec![h], 0.2, 1.0);
            put(&mut t, &mut r, format!("{p}.ln_1.bias"), vec![h], 0.2, 0.0);
            put(&mut t, &mut r, format!("{p}.attn.c_attn.weight"), vec![h, 3 * h], 0.5, 0.0);
            put(&mut t, &mut r, format!("{p}.attn.c_attn.bias"), vec![3 * h], 0.2, 0.0);
            put(&mut t, &mut r, format!("{p}.attn.c_proj.weight"), vec![h, h], 0.5, 0.0);
            put(&mut t, &mut r, format!("{p}.attn.c_proj.bias"), vec![h], 0.2, 0.0);
            put(&mut t, &mut r, format!("{p}.ln_2.weight"), vec![h], 0.2, 1.0);
            put(&mut t, &mut r, format!("{p}.ln_2.bias"), vec![h], 0.2, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.c_fc.weight"), vec![h, im], 0.5, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.c_fc.bias"), vec![im], 0.2, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.c_proj.weight"), vec![im, h], 0.5, 0.0);
            put(&mut t, &mut r, format!("{p}.mlp.c_proj.bias"), vec![h], 0.2, 0.0);
            // The causal-mask buffer original checkpoints carry; the frontend ignores it.
            let n = self.n_positions;
            let mask: Vec<f32> = (0..n * n).map(|k| if k % n <= k / n { 1.0 } else { 0.0 }).collect();
            t.insert(format!("{p}.attn.bias"), (vec![1, 1, n, n], mask));
        }
        put(&mut t, &mut r, format!("{p0}ln_f.weight"), vec![h], 0.2, 1.0);
        put(&mut t, &mut r, format!("{p0}ln_f.bias"), vec![h], 0.2, 0.0);
        t
    }
}
