//! `BertModel` encoders (sentence-transformers models such as all-MiniLM-L6-v2): config, tensor
//! inventory, the primitive-op graph of one encoder pass, and the sentence-transformers pooling
//! settings read from beside `config.json`.
//!
//! Follows transformers' `modeling_bert.py`: word + token-type (type 0) + absolute position
//! embeddings, LayerNorm; per layer bidirectional multi-head attention (every token sees every
//! token of the step: no mask, no KV cache), then post-LayerNorm residual blocks
//! `LN(x + attn(x))`, `LN(x + W2 act(W1 x))` with biases everywhere. The graph's output is the
//! last hidden state `f32[S, hidden_size]` (the artifact's "vocab" is then `hidden_size`; the
//! token vocabulary is the `vocab_size` meta). The graph declares no KV state, so it carries
//! `max_context` in its meta; one encoder pass must be one step (the runtime's embedding API
//! checks the input fits one chunk).
//!
//! Pooling and normalization are not part of the graph: they are metadata the runtime applies
//! ([`SentenceSettings`]: `pooling`, `normalize`, `max_seq_length`), taken from the
//! sentence-transformers files `modules.json`, `1_Pooling/config.json` (or whatever directory the
//! Pooling module names) and `sentence_bert_config.json`; without them, mean pooling and no
//! normalization.

use std::path::Path;

use serde_json::Value;

use llmc_ir::{Dim, Graph, NodeId, Op, UnaryOp};

use crate::builder::Builder;
use crate::checkpoint::Checkpoint;
use crate::config::{context_len, graph_name, mul, Cfg};
use crate::error::{field_err, FrontendError, Result};
use crate::Options;

/// Metadata key: what the artifact computes (`embedding` for encoders).
pub const TASK_META: &str = "task";
/// Metadata key: the pooling mode (`mean`, `cls`, `max`, `mean_sqrt_len`).
pub const POOLING_META: &str = "pooling";
/// Metadata key: `true` when the pooled vector is L2-normalized.
pub const NORMALIZE_META: &str = "normalize";
/// Metadata key: longest token sequence the tokenizer keeps (sentence-transformers' `max_seq_length`).
pub const MAX_SEQ_META: &str = "max_seq_length";

/// The parts of a BERT `config.json` the graph depends on, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// `gelu` (erf) -> `Gelu`, `gelu_new` / `gelu_pytorch_tanh` -> `GeluTanh`.
    pub activation: UnaryOp,
}

impl BertConfig {
    /// Reads and checks the config; defaults are transformers' `BertConfig` defaults.
    pub fn from_json(config: &Value) -> Result<Self> {
        let c = Cfg::new(config);
        let hidden_size = c.size("hidden_size")?;
        let num_heads = c.size("num_attention_heads")?;
        c.head_dim(hidden_size, num_heads, "num_attention_heads")?;
        let act = c.string_opt("hidden_act")?.unwrap_or("gelu");
        let activation = match act {
            "gelu" => UnaryOp::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
            other => {
                return Err(field_err(
                    "hidden_act",
                    format!("`{other}` is not supported for BertModel (supported: gelu, gelu_new, gelu_pytorch_tanh)"),
                ))
            }
        };
        match c.string_opt("position_embedding_type")?.unwrap_or("absolute") {
            "absolute" => {}
            other => {
                return Err(field_err(
                    "position_embedding_type",
                    format!("`{other}` is not supported (only `absolute`)"),
                ))
            }
        }
        if c.flag_or("is_decoder", false)? {
            return Err(field_err("is_decoder", "`true` is not supported: BertModel is compiled as an encoder"));
        }
        let layer_norm_eps = c.number_or("layer_norm_eps", 1e-12)?;
        if layer_norm_eps < 0.0 {
            return Err(field_err("layer_norm_eps", format!("must not be negative, got {layer_norm_eps}")));
        }
        let intermediate_size = c.size("intermediate_size")?;
        mul("hidden_size x intermediate_size", hidden_size, intermediate_size)?;
        Ok(BertConfig {
            hidden_size,
            num_layers: c.size("num_hidden_layers")?,
            num_heads,
            intermediate_size,
            vocab_size: c.size("vocab_size")?,
            max_position_embeddings: c.size_or("max_position_embeddings", 512)?,
            type_vocab_size: c.size_or("type_vocab_size", 2)?,
            layer_norm_eps,
            activation,
        })
    }

    /// The tensor-name prefix: `"bert."` when the checkpoint was saved from a task model
    /// (`BertForMaskedLM`, ...), else `""`.
    pub fn prefix(ckpt: &Checkpoint) -> &'static str {
        if ckpt.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        }
    }

    /// Embedding tensors with their implied shapes.
    pub fn global_tensors(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let e = format!("{prefix}embeddings");
        vec![
            (format!("{e}.word_embeddings.weight"), vec![self.vocab_size, h]),
            (format!("{e}.position_embeddings.weight"), vec![self.max_position_embeddings, h]),
            (format!("{e}.token_type_embeddings.weight"), vec![self.type_vocab_size, h]),
            (format!("{e}.LayerNorm.weight"), vec![h]),
            (format!("{e}.LayerNorm.bias"), vec![h]),
        ]
    }

    /// The tensors of layer `i` with their implied shapes.
    pub fn layer_tensors(&self, prefix: &str, i: usize) -> Vec<(String, Vec<usize>)> {
        let (h, im) = (self.hidden_size, self.intermediate_size);
        let p = format!("{prefix}encoder.layer.{i}");
        let mut t = Vec::new();
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", im, h),
            ("output.dense", h, im),
        ] {
            t.push((format!("{p}.{name}.weight"), vec![out, inp]));
            t.push((format!("{p}.{name}.bias"), vec![out]));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.push((format!("{p}.{name}.weight"), vec![h]));
            t.push((format!("{p}.{name}.bias"), vec![h]));
        }
        t
    }

    /// Checks every tensor the graph uses against its implied shape, layer by layer.
    pub fn validate(&self, ckpt: &Checkpoint, prefix: &str) -> Result<()> {
        ckpt.check_layered(self.global_tensors(prefix), self.num_layers, |i| self.layer_tensors(prefix, i))
    }
}

/// Builds the encoder graph of a `BertModel` checkpoint: token ids to the last hidden state.
pub fn build(config: &Value, ckpt: &Checkpoint, opts: &Options) -> Result<Graph> {
    let c = BertConfig::from_json(config)?;
    let context = context_len(opts, c.max_position_embeddings)?;
    let prefix = BertConfig::prefix(ckpt);
    c.validate(ckpt, prefix)?;

    let mut b = Builder::new(graph_name(config, "bert")?, ckpt);
    b.meta(config, "BertModel", c.vocab_size, context, c.hidden_size, c.num_layers)?;
    let defaults = SentenceSettings { max_seq_length: context, ..SentenceSettings::default() };
    for (k, v) in defaults.meta() {
        b.g.meta.insert(k, v);
    }

    let (h, nh, im) = (c.hidden_size, c.num_heads, c.intermediate_size);
    let hd = h / nh;
    let eps = c.layer_norm_eps as f32;
    let scale = (hd as f64).powf(-0.5) as f32;
    let norm = |b: &mut Builder<'_>, x: NodeId, name: &str| -> Result<NodeId> {
        let w = b.weight(&format!("{name}.weight"), &[h])?;
        let bias = b.weight(&format!("{name}.bias"), &[h])?;
        b.layer_norm(x, w, bias, eps)
    };

    let e = format!("{prefix}embeddings");
    let ids = b.ids()?;
    let words = b.weight(&format!("{e}.word_embeddings.weight"), &[c.vocab_size, h])?;
    let x = b.op(Op::Gather, &[words, ids])?;
    // Token type 0 for every token: row 0 of the table, broadcast over the tokens.
    let types = b.weight(&format!("{e}.token_type_embeddings.weight"), &[c.type_vocab_size, h])?;
    let type0 = b.slice(types, 0, 0, 1)?;
    let x = b.add(x, type0)?;
    let table = b.weight(&format!("{e}.position_embeddings.weight"), &[c.max_position_embeddings, h])?;
    let pos = b.op(Op::Positions, &[])?;
    let pos = b.op(Op::Gather, &[table, pos])?;
    let x = b.add(x, pos)?;
    let mut x = norm(&mut b, x, &format!("{e}.LayerNorm"))?;

    for i in 0..c.num_layers {
        let p = format!("{prefix}encoder.layer.{i}");
        let heads = |b: &mut Builder<'_>, x: NodeId, name: &str| -> Result<NodeId> {
            let y = b.linear(x, &format!("{p}.attention.self.{name}"), h, h, true)?;
            b.reshape(y, vec![Dim::S, Dim::N(nh), Dim::N(hd)])
        };
        let q = heads(&mut b, x, "query")?;
        let k = heads(&mut b, x, "key")?;
        let v = heads(&mut b, x, "value")?;
        let o = b.bidirectional_attention(nh, hd, q, k, v, scale)?;
        let o = b.linear(o, &format!("{p}.attention.output.dense"), h, h, true)?;
        let y = b.add(o, x)?;
        x = norm(&mut b, y, &format!("{p}.attention.output.LayerNorm"))?;
        let m = b.linear(x, &format!("{p}.intermediate.dense"), im, h, true)?;
        let m = b.unary(c.activation, m)?;
        let m = b.linear(m, &format!("{p}.output.dense"), h, im, true)?;
        let y = b.add(m, x)?;
        x = norm(&mut b, y, &format!("{p}.output.LayerNorm"))?;
    }
    Ok(b.finish(x))
}

/// How token states become one sentence vector (sentence-transformers' Pooling and Normalize
/// modules, and its `max_seq_length`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentenceSettings {
    /// `mean`, `cls`, `max` or `mean_sqrt_len`.
    pub pooling: String,
    pub normalize: bool,
    pub max_seq_length: usize,
}

impl Default for SentenceSettings {
    fn default() -> Self {
        SentenceSettings { pooling: "mean".into(), normalize: false, max_seq_length: 512 }
    }
}

impl SentenceSettings {
    /// The settings as artifact metadata (plus `task = embedding`).
    pub fn meta(&self) -> Vec<(String, String)> {
        vec![
            (TASK_META.into(), "embedding".into()),
            (POOLING_META.into(), self.pooling.clone()),
            (NORMALIZE_META.into(), self.normalize.to_string()),
            (MAX_SEQ_META.into(), self.max_seq_length.to_string()),
        ]
    }

    /// Reads the sentence-transformers files in `dir` (the directory holding `config.json`);
    /// files that are absent leave the defaults (`max_seq_length` defaults to `context`).
    pub fn read(dir: &Path, context: usize) -> Result<SentenceSettings> {
        let mut s = SentenceSettings { max_seq_length: context, ..SentenceSettings::default() };
        if let Some(v) = read_json(&dir.join("sentence_bert_config.json"))? {
            let path = dir.join("sentence_bert_config.json");
            if let Some(m) = v.get("max_seq_length").filter(|m| !m.is_null()) {
                match m.as_u64() {
                    Some(n) if n > 0 => s.max_seq_length = (n as usize).min(context),
                    _ => return Err(bad(&path, format!("`max_seq_length` must be a positive integer, got {m}"))),
                }
            }
        }
        let modules_path = dir.join("modules.json");
        let Some(modules) = read_json(&modules_path)? else {
            return Ok(s);
        };
        let Some(list) = modules.as_array() else {
            return Err(bad(&modules_path, "must be a list of modules"));
        };
        let kind = |m: &Value| m.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        for m in list {
            let t = kind(m);
            if t.ends_with(".Normalize") {
                s.normalize = true;
            } else if t.ends_with(".Pooling") {
                let sub = m.get("path").and_then(Value::as_str).unwrap_or("");
                if sub.contains("..") || sub.starts_with('/') {
                    return Err(bad(&modules_path, format!("module path `{sub}` leaves the model directory")));
                }
                let path = dir.join(sub).join("config.json");
                let Some(p) = read_json(&path)? else {
                    return Err(bad(&path, "the Pooling module's config is missing"));
                };
                s.pooling = pooling_mode(&path, &p)?;
            } else if t.ends_with(".Transformer") {
                // The encoder itself.
            } else {
                return Err(bad(
                    &modules_path,
                    format!("module `{t}` is not supported (supported: Transformer, Pooling, Normalize)"),
                ));
            }
        }
        Ok(s)
    }
}

/// The one pooling mode a Pooling config enables.
fn pooling_mode(path: &Path, p: &Value) -> Result<String> {
    let modes = [
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ];
    let on: Vec<&str> =
        modes.iter().filter(|(k, _)| p.get(*k).and_then(Value::as_bool) == Some(true)).map(|(_, m)| *m).collect();
    for k in ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"] {
        if p.get(k).and_then(Value::as_bool) == Some(true) {
            return Err(bad(path, format!("`{k}` is not supported (supported: mean, cls, max, mean_sqrt_len)")));
        }
    }
    match on[..] {
        [m] => Ok(m.to_string()),
        [] => Err(bad(path, "no pooling mode is enabled")),
        _ => Err(bad(path, format!("several pooling modes at once ({}) are not supported", on.join(", ")))),
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> FrontendError {
    FrontendError::SentenceConfig { path: path.to_path_buf(), msg: msg.into() }
}

/// The JSON in `path`, or `None` when the file does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| FrontendError::ConfigNotJson { path: path.to_path_buf(), msg: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FrontendError::Io { path: path.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir_with(files: &[(&str, Value)]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("llmc-bert-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for (name, v) in files {
            let p = d.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v.to_string()).unwrap();
        }
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn modules(pool_dir: &str, normalize: bool) -> Value {
        let mut m = vec![
            json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
            json!({"idx": 1, "name": "1", "path": pool_dir, "type": "sentence_transformers.models.Pooling"}),
        ];
        if normalize {
            m.push(
                json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}),
            );
        }
        Value::Array(m)
    }

    #[test]
    fn sentence_transformers_settings() {
        let d = dir_with(&[
            ("modules.json", modules("1_Pooling", true)),
            ("1_Pooling/config.json", json!({"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false})),
            ("sentence_bert_config.json", json!({"max_seq_length": 256, "do_lower_case": false})),
        ]);
        let s = SentenceSettings::read(&d, 512).unwrap();
        assert_eq!(s, SentenceSettings { pooling: "mean".into(), normalize: true, max_seq_length: 256 });
        // Capped by the compiled context.
        assert_eq!(SentenceSettings::read(&d, 128).unwrap().max_seq_length, 128);
        // Nothing there: defaults.
        let empty = dir_with(&[]);
        assert_eq!(
            SentenceSettings::read(&empty, 64).unwrap(),
            SentenceSettings { pooling: "mean".into(), normalize: false, max_seq_length: 64 }
        );
        let cls = dir_with(&[
            ("modules.json", modules("pool", false)),
            ("pool/config.json", json!({"pooling_mode_cls_token": true})),
        ]);
        assert_eq!(SentenceSettings::read(&cls, 64).unwrap().pooling, "cls");
    }

    #[test]
    fn unsupported_settings_name_the_file() {
        for (pool, what) in [
            (json!({"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}), "several"),
            (json!({"pooling_mode_lasttoken": true}), "pooling_mode_lasttoken"),
            (json!({}), "no pooling mode"),
        ] {
            let d = dir_with(&[("modules.json", modules("p", false)), ("p/config.json", pool)]);
            let e = SentenceSettings::read(&d, 64).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("config.json"), "{e}");
        }
        let d = dir_with(&[("modules.json", modules("../x", false))]);
        assert!(SentenceSettings::read(&d, 64).unwrap_err().to_string().contains("leaves"));
        let d =
            dir_with(&[("modules.json", json!([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))]);
        assert!(SentenceSettings::read(&d, 64).unwrap_err().to_string().contains("Dense"));
        let d = dir_with(&[("sentence_bert_config.json", json!({"max_seq_length": 0}))]);
        assert!(SentenceSettings::read(&d, 64).unwrap_err().to_string().contains("max_seq_length"));
    }

    #[test]
    fn config_checks() {
        let base = json!({"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100});
        let c = BertConfig::from_json(&base).unwrap();
        assert_eq!((c.max_position_embeddings, c.type_vocab_size, c.activation), (512, 2, UnaryOp::Gelu));
        for (k, v, needle) in [
            ("hidden_act", json!("relu"), "relu"),
            ("position_embedding_type", json!("relative_key"), "relative_key"),
            ("is_decoder", json!(true), "is_decoder"),
            ("num_attention_heads", json!(5), "num_attention_heads"),
        ] {
            let mut bad = base.clone();
            bad[k] = v;
            let e = BertConfig::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
