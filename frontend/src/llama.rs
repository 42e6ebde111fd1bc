//! `LlamaForCausalLM`: config, tensor inventory, RoPE frequencies (as transformers computes them)
//! and the primitive-op graph of one forward step.
//!
//! The graph follows transformers' `modeling_llama.py`: RMSNorm as `x * rsqrt(mean(x^2) + eps) * w`,
//! grouped-query attention with rotary embeddings on q and k, a SiLU-gated MLP, and an output head
//! that is either `lm_head.weight` or, with `tie_word_embeddings`, the embedding node itself.

use serde_json::Value;

use llmc_ir::{BinaryOp, Dim, Graph, NodeId, Op, UnaryOp};

use crate::builder::{AttnDims, Builder};
use crate::checkpoint::Checkpoint;
use crate::config::{context_len, graph_name, mul, token_ids, Cfg};
use crate::error::{field_err, Result};
use crate::Options;

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain `1 / theta^(2i/d)`.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling (transformers' `_compute_llama3_parameters`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The parts of a Llama `config.json` the graph depends on, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
}

impl LlamaConfig {
    /// Reads and checks the config; defaults are transformers' `LlamaConfig` defaults.
    pub fn from_json(config: &Value) -> Result<Self> {
        let c = Cfg::new(config);
        let hidden_size = c.size("hidden_size")?;
        let num_layers = c.size("num_hidden_layers")?;
        let num_heads = c.size("num_attention_heads")?;
        let num_kv_heads = c.size_or("num_key_value_heads", num_heads)?;
        let head_dim = match c.size_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads != 0 => {
                return Err(field_err(
                    "num_attention_heads",
                    format!("num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size})"),
                ))
            }
            None => hidden_size / num_heads,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(field_err(
                "num_key_value_heads",
                format!("{num_kv_heads} must divide num_attention_heads ({num_heads})"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(field_err("head_dim", format!("must be even for rotary embeddings, got {head_dim}")));
        }
        mul("num_attention_heads x head_dim", num_heads, head_dim)?;
        let act = c.string_opt("hidden_act")?.unwrap_or("silu");
        if act != "silu" {
            return Err(field_err("hidden_act", format!("`{act}` is not supported for LlamaForCausalLM (only `silu`)")));
        }
        let rms_norm_eps = c.number_or("rms_norm_eps", 1e-6)?;
        if rms_norm_eps < 0.0 {
            return Err(field_err("rms_norm_eps", format!("must not be negative, got {rms_norm_eps}")));
        }
        let (rope_theta, rope_scaling) = rope(&c)?;
        Ok(LlamaConfig {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: c.size("intermediate_size")?,
            vocab_size: c.size("vocab_size")?,
            rms_norm_eps,
            max_position_embeddings: c.size_or("max_position_embeddings", 2048)?,
            tie_word_embeddings: c.flag_or("tie_word_embeddings", false)?,
            attention_bias: c.flag_or("attention_bias", false)?,
            mlp_bias: c.flag_or("mlp_bias", false)?,
            rope_theta,
            rope_scaling,
        })
    }

    /// Every tensor the graph reads, with the shape the config implies. Layer tensors come from
    /// [`layer_tensors`](Self::layer_tensors).
    pub fn global_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        t
    }

    /// The tensors of layer `i` with their implied shapes.
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let (h, hd, im) = (self.hidden_size, self.head_dim, self.intermediate_size);
        // Products were checked in `from_json`.
        let (qw, kw) = (self.num_heads * hd, self.num_kv_heads * hd);
        let p = format!("model.layers.{i}");
        let mut t = vec![
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![qw, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kw, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kw, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, qw]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![im, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![im, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, im]),
        ];
        if self.attention_bias {
            for (n, w) in [("q_proj", qw), ("k_proj", kw), ("v_proj", kw), ("o_proj", h)] {
                t.push((format!("{p}.self_attn.{n}.bias"), vec![w]));
            }
        }
        if self.mlp_bias {
            for (n, w) in [("gate_proj", im), ("up_proj", im), ("down_proj", h)] {
                t.push((format!("{p}.mlp.{n}.bias"), vec![w]));
            }
        }
        t
    }

    /// Checks every tensor the graph uses against its implied shape, layer by layer.
    pub fn validate(&self, ckpt: &Checkpoint) -> Result<()> {
        for (name, shape) in self.global_tensors() {
            ckpt.check_tensor(&name, &shape)?;
        }
        for i in 0..self.num_layers {
            for (name, shape) in self.layer_tensors(i) {
                ckpt.check_tensor(&name, &shape)?;
            }
        }
        Ok(())
    }

    /// The RoPE inverse frequencies, `f32[head_dim/2]`.
    pub fn inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.rope_theta, self.head_dim, &self.rope_scaling)
    }
}

/// RoPE theta and scaling from either spelling: transformers 4's `rope_theta` + `rope_scaling`
/// (`rope_type` or legacy `type`), or transformers 5's `rope_parameters` holding both.
fn rope(c: &Cfg<'_>) -> Result<(f64, RopeScaling)> {
    let params = c.object("rope_parameters")?;
    let theta = match c.number_opt("rope_theta")? {
        Some(t) => Some(t),
        None => params.map(|p| p.number_opt("rope_theta")).transpose()?.flatten(),
    };
    let theta = c.positive("rope_theta", theta.unwrap_or(10000.0))?;
    let Some(s) = c.object("rope_scaling")?.or(params) else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = match s.string_opt("rope_type")? {
        Some(t) => Some(t),
        None => s.string_opt("type")?,
    };
    let scaling = match kind.unwrap_or("default") {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: s.positive("factor", s.number("factor")?)? },
        "llama3" => {
            let low = s.positive("low_freq_factor", s.number("low_freq_factor")?)?;
            let high = s.positive("high_freq_factor", s.number("high_freq_factor")?)?;
            if high <= low {
                return Err(s.err("high_freq_factor", format!("must exceed low_freq_factor ({high} <= {low})")));
            }
            RopeScaling::Llama3 {
                factor: s.positive("factor", s.number("factor")?)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: s.size("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(s.err(
                if s.get("rope_type").is_some() { "rope_type" } else { "type" },
                format!("unsupported RoPE type `{other}` (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// RoPE inverse frequencies for rotary dimension `dim`, in f32 operation by operation as
/// transformers computes them (`1 / theta^(2i/dim)`, then the scaling). PyTorch's `a / tensor`
/// is `reciprocal(tensor) * a`, and Python scalars are rounded to f32 before each tensor op; both
/// are mirrored so the frequencies match bit for bit where the platform `powf` agrees.
pub fn rope_inv_freq(theta: f64, dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32)).collect();
    match *scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv.iter().map(|&f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = (old / low_freq_factor) as f32;
            let high_wavelen = (old / high_freq_factor) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let (factor, low, band) = (factor as f32, low_freq_factor as f32, (high_freq_factor - low_freq_factor) as f32);
            inv.iter()
                .map(|&f| {
                    let wavelen = (1.0 / f) * two_pi;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // `~(w < high) * ~(w > low)` as transformers writes it (NaN-safe the same way).
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = ((1.0 / wavelen) * old as f32 - low) / band;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `x * rsqrt(mean(x^2) + eps) * w`, over the last axis.
fn rms_norm(b: &mut Builder<'_>, x: NodeId, w: NodeId, eps: f32) -> Result<NodeId> {
    let sq = b.mul(x, x)?;
    let ms = b.mean(sq)?;
    let e = b.scalar(eps)?;
    let ms = b.add(ms, e)?;
    let r = b.unary(UnaryOp::Rsqrt, ms)?;
    let y = b.mul(x, r)?;
    b.mul(y, w)
}

/// `x W^T (+ bias)` for an `nn.Linear` weight `[out, in]`.
fn linear(b: &mut Builder<'_>, x: NodeId, name: &str, out: usize, inp: usize, bias: bool) -> Result<NodeId> {
    let w = b.weight(&format!("{name}.weight"), &[out, inp])?;
    let y = b.matmul(x, w, true)?;
    if bias {
        let bb = b.weight(&format!("{name}.bias"), &[out])?;
        b.add(y, bb)
    } else {
        Ok(y)
    }
}

/// Builds the forward-step graph of a `LlamaForCausalLM` checkpoint.
pub fn build(config: &Value, ckpt: &Checkpoint, opts: &Options) -> Result<Graph> {
    let c = LlamaConfig::from_json(config)?;
    let context = context_len(opts, c.max_position_embeddings)?;
    c.validate(ckpt)?;

    let mut b = Builder::new(graph_name(config, "llama")?, ckpt);
    let meta = &mut b.g.meta;
    meta.insert("architecture".into(), "LlamaForCausalLM".into());
    meta.insert("vocab_size".into(), c.vocab_size.to_string());
    meta.insert("max_context".into(), context.to_string());
    meta.insert("hidden_size".into(), c.hidden_size.to_string());
    meta.insert("num_layers".into(), c.num_layers.to_string());
    for f in ["bos_token_id", "eos_token_id"] {
        if let Some(v) = token_ids(config, f)? {
            b.g.meta.insert(f.into(), v);
        }
    }

    let (h, v, hd, nh, nkv, im) = (c.hidden_size, c.vocab_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
    let (qw, kw) = (nh * hd, nkv * hd);
    let eps = c.rms_norm_eps as f32;
    let dims = AttnDims { heads: nh, kv_heads: nkv, head_dim: hd, context };
    let scale = (hd as f64).powf(-0.5) as f32;

    let ids = b.ids()?;
    let embed = b.weight("model.embed_tokens.weight", &[v, h])?;
    let mut x = b.op(Op::Gather, &[embed, ids])?;
    let inv_freq = b.constant(c.inv_freq(), &[hd / 2])?;

    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        // Attention block.
        let w = b.weight(&format!("{p}.input_layernorm.weight"), &[h])?;
        let hn = rms_norm(&mut b, x, w, eps)?;
        let q = linear(&mut b, hn, &format!("{p}.self_attn.q_proj"), qw, h, c.attention_bias)?;
        let k = linear(&mut b, hn, &format!("{p}.self_attn.k_proj"), kw, h, c.attention_bias)?;
        let vv = linear(&mut b, hn, &format!("{p}.self_attn.v_proj"), kw, h, c.attention_bias)?;
        let q = b.reshape(q, vec![Dim::S, Dim::N(nh), Dim::N(hd)])?;
        let k = b.reshape(k, vec![Dim::S, Dim::N(nkv), Dim::N(hd)])?;
        let vv = b.reshape(vv, vec![Dim::S, Dim::N(nkv), Dim::N(hd)])?;
        let q = b.op(Op::Rope { rotary_dim: hd }, &[q, inv_freq])?;
        let k = b.op(Op::Rope { rotary_dim: hd }, &[k, inv_freq])?;
        let o = b.attention(i, dims, q, k, vv, Some(scale))?;
        let o = linear(&mut b, o, &format!("{p}.self_attn.o_proj"), h, qw, c.attention_bias)?;
        x = b.add(x, o)?;
        // MLP block.
        let w = b.weight(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        let hn = rms_norm(&mut b, x, w, eps)?;
        let gate = linear(&mut b, hn, &format!("{p}.mlp.gate_proj"), im, h, c.mlp_bias)?;
        let up = linear(&mut b, hn, &format!("{p}.mlp.up_proj"), im, h, c.mlp_bias)?;
        let a = b.unary(UnaryOp::Silu, gate)?;
        let m = b.binary(BinaryOp::Mul, a, up)?;
        let d = linear(&mut b, m, &format!("{p}.mlp.down_proj"), h, im, c.mlp_bias)?;
        x = b.add(x, d)?;
    }

    let w = b.weight("model.norm.weight", &[h])?;
    let hn = rms_norm(&mut b, x, w, eps)?;
    let head = if c.tie_word_embeddings { embed } else { b.weight("lm_head.weight", &[v, h])? };
    let logits = b.matmul(hn, head, true)?;
    Ok(b.finish(logits))
}
