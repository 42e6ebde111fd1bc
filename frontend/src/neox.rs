//! `GPTNeoXForCausalLM` (Pythia, GPT-NeoX-20B): config, tensor inventory and the primitive-op
//! graph of one forward step.
//!
//! Follows transformers' `modeling_gpt_neox.py`: LayerNorm (with bias) before attention and MLP,
//! a fused `query_key_value` projection whose output is interleaved per head (`[S, heads, 3,
//! head_dim]`: q, k, v of head 0, then of head 1, ...), rotary embeddings on the first
//! `rotary_dim = int(head_dim * rotary_pct)` channels of each head, a GELU MLP with biases, and
//! the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))` (`use_parallel_residual`, the default)
//! or the sequential `y = x + attn(ln1(x)); y + mlp(ln2(y))`. The head is `embed_out.weight`
//! (transformers 5 calls the module `lm_head` but saves hub names), or `embed_in` when tied.
//! The RoPE settings come from hub spellings (`rotary_pct`, `rotary_emb_base`) or transformers 5's
//! `rope_parameters` (`partial_rotary_factor`, `rope_theta`).

use serde_json::Value;

use llmc_ir::{Dim, Graph, NodeId, Op, UnaryOp};

use crate::builder::{AttnDims, Builder};
use crate::checkpoint::Checkpoint;
use crate::config::{context_len, graph_name, mul, Cfg};
use crate::error::{field_err, Result};
use crate::llama::{rope, rope_inv_freq, rotary_dim_of, RopeScaling};
use crate::Options;

/// Prefix of the base model's tensors.
const PREFIX: &str = "gpt_neox.";

/// The parts of a GPT-NeoX `config.json` the graph depends on, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct NeoxConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    /// The MLP activation (`gelu` -> `Gelu`, `gelu_new` / `gelu_pytorch_tanh` -> `GeluTanh`).
    pub activation: UnaryOp,
    pub use_parallel_residual: bool,
    pub tie_word_embeddings: bool,
    /// Biases on `query_key_value` and `dense`.
    pub attention_bias: bool,
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
}

impl NeoxConfig {
    /// Reads and checks the config; defaults are transformers' `GPTNeoXConfig` defaults.
    pub fn from_json(config: &Value) -> Result<Self> {
        let c = Cfg::new(config);
        let hidden_size = c.size("hidden_size")?;
        let num_heads = c.size("num_attention_heads")?;
        c.head_dim(hidden_size, num_heads, "num_attention_heads")?;
        mul("3 x hidden_size", 3, hidden_size)?;
        let head_dim = hidden_size / num_heads;
        let act = c.string_opt("hidden_act")?.unwrap_or("gelu");
        let activation = match act {
            "gelu" => UnaryOp::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
            other => {
                return Err(field_err(
                    "hidden_act",
                    format!(
                    "`{other}` is not supported for GPTNeoXForCausalLM (supported: gelu, gelu_new, gelu_pytorch_tanh)"
                ),
                ))
            }
        };
        let layer_norm_eps = c.number_or("layer_norm_eps", 1e-5)?;
        if layer_norm_eps < 0.0 {
            return Err(field_err("layer_norm_eps", format!("must not be negative, got {layer_norm_eps}")));
        }
        // The rotary fraction: `rope_parameters.partial_rotary_factor`, else the hub's `rotary_pct`.
        let params = c.object("rope_parameters")?;
        let (field, factor) = match params.map(|p| p.number_opt("partial_rotary_factor")).transpose()?.flatten() {
            Some(f) => ("rope_parameters.partial_rotary_factor", f),
            None => ("rotary_pct", c.number_or("rotary_pct", 0.25)?),
        };
        let rotary_dim = rotary_dim_of(field, head_dim, factor)?;
        let base = c.number_or("rotary_emb_base", 10000.0)?;
        let (rope_theta, rope_scaling) = rope(&c, base)?;
        Ok(NeoxConfig {
            hidden_size,
            num_layers: c.size("num_hidden_layers")?,
            num_heads,
            head_dim,
            intermediate_size: c.size("intermediate_size")?,
            vocab_size: c.size("vocab_size")?,
            max_position_embeddings: c.size_or("max_position_embeddings", 2048)?,
            layer_norm_eps,
            activation,
            use_parallel_residual: c.flag_or("use_parallel_residual", true)?,
            tie_word_embeddings: c.flag_or("tie_word_embeddings", false)?,
            attention_bias: c.flag_or("attention_bias", true)?,
            rotary_dim,
            rope_theta,
            rope_scaling,
        })
    }

    /// Embedding, final-norm and head tensors with their implied shapes.
    pub fn global_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut t = vec![
            (format!("{PREFIX}embed_in.weight"), vec![v, h]),
            (format!("{PREFIX}final_layer_norm.weight"), vec![h]),
            (format!("{PREFIX}final_layer_norm.bias"), vec![h]),
        ];
        if !self.tie_word_embeddings {
            t.push(("embed_out.weight".to_string(), vec![v, h]));
        }
        t
    }

    /// The tensors of layer `i` with their implied shapes.
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let (h, im) = (self.hidden_size, self.intermediate_size);
        let p = format!("{PREFIX}layers.{i}");
        let mut t = vec![
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.input_layernorm.bias"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.bias"), vec![h]),
            (format!("{p}.attention.query_key_value.weight"), vec![3 * h, h]),
            (format!("{p}.attention.dense.weight"), vec![h, h]),
            (format!("{p}.mlp.dense_h_to_4h.weight"), vec![im, h]),
            (format!("{p}.mlp.dense_h_to_4h.bias"), vec![im]),
            (format!("{p}.mlp.dense_4h_to_h.weight"), vec![h, im]),
            (format!("{p}.mlp.dense_4h_to_h.bias"), vec![h]),
        ];
        if self.attention_bias {
            t.push((format!("{p}.attention.query_key_value.bias"), vec![3 * h]));
            t.push((format!("{p}.attention.dense.bias"), vec![h]));
        }
        t
    }

    /// Checks every tensor the graph uses against its implied shape, layer by layer.
    pub fn validate(&self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.check_layered(self.global_tensors(), self.num_layers, |i| self.layer_tensors(i))
    }
}

/// Builds the forward-step graph of a `GPTNeoXForCausalLM` checkpoint.
pub fn build(config: &Value, ckpt: &Checkpoint, opts: &Options) -> Result<Graph> {
    let c = NeoxConfig::from_json(config)?;
    let context = context_len(opts, c.max_position_embeddings)?;
    c.validate(ckpt)?;

    let mut b = Builder::new(graph_name(config, "gpt_neox")?, ckpt);
    b.meta(config, "GPTNeoXForCausalLM", c.vocab_size, context, c.hidden_size, c.num_layers)?;

    let (h, v, nh, hd, im) = (c.hidden_size, c.vocab_size, c.num_heads, c.head_dim, c.intermediate_size);
    let eps = c.layer_norm_eps as f32;
    let dims = AttnDims { heads: nh, kv_heads: nh, head_dim: hd, context, window: None };
    let scale = (hd as f64).powf(-0.5) as f32;
    let norm = |b: &mut Builder<'_>, x: NodeId, name: &str| -> Result<NodeId> {
        let w = b.weight(&format!("{name}.weight"), &[h])?;
        let bias = b.weight(&format!("{name}.bias"), &[h])?;
        b.layer_norm(x, w, bias, eps)
    };
    let mlp = |b: &mut Builder<'_>, x: NodeId, p: &str| -> Result<NodeId> {
        let m = b.linear(x, &format!("{p}.mlp.dense_h_to_4h"), im, h, true)?;
        let m = b.unary(c.activation, m)?;
        b.linear(m, &format!("{p}.mlp.dense_4h_to_h"), h, im, true)
    };

    let ids = b.ids()?;
    let embed = b.weight(&format!("{PREFIX}embed_in.weight"), &[v, h])?;
    let mut x = b.op(Op::Gather, &[embed, ids])?;
    let inv_freq = b.constant(rope_inv_freq(c.rope_theta, c.rotary_dim, &c.rope_scaling), &[c.rotary_dim / 2])?;
    let rope_op = Op::Rope { rotary_dim: c.rotary_dim };

    for i in 0..c.num_layers {
        let p = format!("{PREFIX}layers.{i}");
        let hn = norm(&mut b, x, &format!("{p}.input_layernorm"))?;
        let qkv = b.linear(hn, &format!("{p}.attention.query_key_value"), 3 * h, h, c.attention_bias)?;
        // Per head: q, k, v of `head_dim` channels each.
        let qkv = b.reshape(qkv, vec![Dim::S, Dim::N(nh), Dim::N(3 * hd)])?;
        let q = b.slice(qkv, 2, 0, hd)?;
        let k = b.slice(qkv, 2, hd, 2 * hd)?;
        let vv = b.slice(qkv, 2, 2 * hd, 3 * hd)?;
        let q = b.op(rope_op.clone(), &[q, inv_freq])?;
        let k = b.op(rope_op.clone(), &[k, inv_freq])?;
        let o = b.attention(i, dims, q, k, vv, Some(scale))?;
        let o = b.linear(o, &format!("{p}.attention.dense"), h, h, c.attention_bias)?;
        if c.use_parallel_residual {
            let hn = norm(&mut b, x, &format!("{p}.post_attention_layernorm"))?;
            let m = mlp(&mut b, hn, &p)?;
            let mo = b.add(m, o)?;
            x = b.add(mo, x)?;
        } else {
            let y = b.add(o, x)?;
            let hn = norm(&mut b, y, &format!("{p}.post_attention_layernorm"))?;
            let m = mlp(&mut b, hn, &p)?;
            x = b.add(m, y)?;
        }
    }

    let hn = norm(&mut b, x, &format!("{PREFIX}final_layer_norm"))?;
    let head = if c.tie_word_embeddings { embed } else { b.weight("embed_out.weight", &[v, h])? };
    let logits = b.matmul(hn, head, true)?;
    Ok(b.finish(logits))
}
