//! `GPT2LMHeadModel`: config, tensor inventory and the primitive-op graph of one forward step.
//!
//! Follows transformers' `modeling_gpt2.py`: learned absolute position embeddings, pre-LayerNorm
//! blocks, a fused `c_attn` projection sliced into q, k, v, and an output head tied to `wte`.
//! GPT-2's `Conv1D` stores weights `[in, out]`, so its projections are `x W` (no transpose).
//! Tensor names carry a `transformer.` prefix when saved by transformers and none in the original
//! OpenAI-converted checkpoints; the prefix is detected from `transformer.wte.weight`.
//! Buffers such as `attn.bias` / `attn.masked_bias` (the causal mask) are ignored.

use serde_json::Value;

use llmc_ir::{Dim, Graph, NodeId, Op, UnaryOp};

use crate::builder::{AttnDims, Builder};
use crate::checkpoint::Checkpoint;
use crate::config::{context_len, graph_name, mul, token_ids, Cfg};
use crate::error::{field_err, Result};
use crate::Options;

/// The parts of a GPT-2 `config.json` the graph depends on, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    /// The MLP activation (`gelu_new` / `gelu_pytorch_tanh` -> `GeluTanh`, `gelu` -> `Gelu`).
    pub activation: UnaryOp,
    pub scale_attn_weights: bool,
}

impl Gpt2Config {
    /// Reads and checks the config; defaults are transformers' `GPT2Config` defaults.
    pub fn from_json(config: &Value) -> Result<Self> {
        let c = Cfg::new(config);
        let n_embd = c.size("n_embd")?;
        let n_head = c.size("n_head")?;
        if n_embd % n_head != 0 {
            return Err(field_err("n_head", format!("n_head ({n_head}) must divide n_embd ({n_embd})")));
        }
        mul("3 x n_embd", 3, n_embd)?;
        let default_inner = mul("4 x n_embd", 4, n_embd)?;
        let act = c.string_opt("activation_function")?.unwrap_or("gelu_new");
        let activation = match act {
            "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
            "gelu" => UnaryOp::Gelu,
            other => {
                return Err(field_err(
                    "activation_function",
                    format!("`{other}` is not supported (supported: gelu_new, gelu_pytorch_tanh, gelu)"),
                ))
            }
        };
        for f in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            if c.flag_or(f, false)? {
                return Err(field_err(f, "`true` is not supported by llmc"));
            }
        }
        let layer_norm_epsilon = c.number_or("layer_norm_epsilon", 1e-5)?;
        if layer_norm_epsilon < 0.0 {
            return Err(field_err("layer_norm_epsilon", format!("must not be negative, got {layer_norm_epsilon}")));
        }
        Ok(Gpt2Config {
            n_embd,
            n_layer: c.size("n_layer")?,
            n_head,
            n_positions: c.size("n_positions")?,
            vocab_size: c.size("vocab_size")?,
            n_inner: c.size_or("n_inner", default_inner)?,
            layer_norm_epsilon,
            activation,
            scale_attn_weights: c.flag_or("scale_attn_weights", true)?,
        })
    }

    /// The tensor-name prefix this checkpoint uses: `"transformer."` or `""`.
    pub fn prefix(ckpt: &Checkpoint) -> &'static str {
        if ckpt.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        }
    }

    /// Embedding and final-norm tensors with their implied shapes.
    pub fn global_tensors(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let h = self.n_embd;
        vec![
            (format!("{prefix}wte.weight"), vec![self.vocab_size, h]),
            (format!("{prefix}wpe.weight"), vec![self.n_positions, h]),
            (format!("{prefix}ln_f.weight"), vec![h]),
            (format!("{prefix}ln_f.bias"), vec![h]),
        ]
    }

    /// The tensors of block `i` with their implied shapes.
    pub fn layer_tensors(&self, prefix: &str, i: usize) -> Vec<(String, Vec<usize>)> {
        let (h, im) = (self.n_embd, self.n_inner);
        let p = format!("{prefix}h.{i}");
        vec![
            (format!("{p}.ln_1.weight"), vec![h]),
            (format!("{p}.ln_1.bias"), vec![h]),
            (format!("{p}.attn.c_attn.weight"), vec![h, 3 * h]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * h]),
            (format!("{p}.attn.c_proj.weight"), vec![h, h]),
            (format!("{p}.attn.c_proj.bias"), vec![h]),
            (format!("{p}.ln_2.weight"), vec![h]),
            (format!("{p}.ln_2.bias"), vec![h]),
            (format!("{p}.mlp.c_fc.weight"), vec![h, im]),
            (format!("{p}.mlp.c_fc.bias"), vec![im]),
            (format!("{p}.mlp.c_proj.weight"), vec![im, h]),
            (format!("{p}.mlp.c_proj.bias"), vec![h]),
        ]
    }

    /// Checks every tensor the graph uses against its implied shape, block by block.
    pub fn validate(&self, ckpt: &Checkpoint, prefix: &str) -> Result<()> {
        ckpt.check_layered(self.global_tensors(prefix), self.n_layer, |i| self.layer_tensors(prefix, i))
    }
}

/// `x W + bias` for a `Conv1D` weight `[in, out]`.
fn conv1d(b: &mut Builder<'_>, x: NodeId, name: &str, inp: usize, out: usize) -> Result<NodeId> {
    let w = b.weight(&format!("{name}.weight"), &[inp, out])?;
    let bias = b.weight(&format!("{name}.bias"), &[out])?;
    let y = b.matmul(x, w, false)?;
    b.add(y, bias)
}

/// Builds the forward-step graph of a `GPT2LMHeadModel` checkpoint.
pub fn build(config: &Value, ckpt: &Checkpoint, opts: &Options) -> Result<Graph> {
    let c = Gpt2Config::from_json(config)?;
    let context = context_len(opts, c.n_positions)?;
    let prefix = Gpt2Config::prefix(ckpt);
    c.validate(ckpt, prefix)?;

    let mut b = Builder::new(graph_name(config, "gpt2")?, ckpt);
    let meta = &mut b.g.meta;
    meta.insert("architecture".into(), "GPT2LMHeadModel".into());
    meta.insert("vocab_size".into(), c.vocab_size.to_string());
    meta.insert("max_context".into(), context.to_string());
    meta.insert("hidden_size".into(), c.n_embd.to_string());
    meta.insert("num_layers".into(), c.n_layer.to_string());
    for f in ["bos_token_id", "eos_token_id"] {
        if let Some(v) = token_ids(config, f)? {
            b.g.meta.insert(f.into(), v);
        }
    }

    let (h, v, nh, im) = (c.n_embd, c.vocab_size, c.n_head, c.n_inner);
    let hd = h / nh;
    let eps = c.layer_norm_epsilon as f32;
    let dims = AttnDims { heads: nh, kv_heads: nh, head_dim: hd, context, window: None };
    let scale = c.scale_attn_weights.then(|| (hd as f64).powf(-0.5) as f32);
    let norm = |b: &mut Builder<'_>, x: NodeId, name: String| -> Result<NodeId> {
        let w = b.weight(&format!("{name}.weight"), &[h])?;
        let bias = b.weight(&format!("{name}.bias"), &[h])?;
        b.layer_norm(x, w, bias, eps)
    };

    let ids = b.ids()?;
    let wte = b.weight(&format!("{prefix}wte.weight"), &[v, h])?;
    let wpe = b.weight(&format!("{prefix}wpe.weight"), &[c.n_positions, h])?;
    let tok = b.op(Op::Gather, &[wte, ids])?;
    let pos = b.op(Op::Positions, &[])?;
    let pos = b.op(Op::Gather, &[wpe, pos])?;
    let mut x = b.add(tok, pos)?;

    for i in 0..c.n_layer {
        let p = format!("{prefix}h.{i}");
        let hn = norm(&mut b, x, format!("{p}.ln_1"))?;
        let qkv = conv1d(&mut b, hn, &format!("{p}.attn.c_attn"), h, 3 * h)?;
        let mut heads = Vec::with_capacity(3);
        for j in 0..3 {
            let s = b.op(Op::Slice { axis: 1, start: j * h, end: (j + 1) * h }, &[qkv])?;
            heads.push(b.reshape(s, vec![Dim::S, Dim::N(nh), Dim::N(hd)])?);
        }
        let o = b.attention(i, dims, heads[0], heads[1], heads[2], scale)?;
        let o = conv1d(&mut b, o, &format!("{p}.attn.c_proj"), h, h)?;
        x = b.add(x, o)?;
        let hn = norm(&mut b, x, format!("{p}.ln_2"))?;
        let m = conv1d(&mut b, hn, &format!("{p}.mlp.c_fc"), h, im)?;
        let m = b.unary(c.activation, m)?;
        let m = conv1d(&mut b, m, &format!("{p}.mlp.c_proj"), im, h)?;
        x = b.add(x, m)?;
    }

    let hn = norm(&mut b, x, format!("{prefix}ln_f"))?;
    let logits = b.matmul(hn, wte, true)?;
    Ok(b.finish(logits))
}
