//! The Llama family: `LlamaForCausalLM` and the decoders that differ from it only in a few
//! switches, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `GemmaForCausalLM`,
//! `Phi3ForCausalLM` and `MixtralForCausalLM`: config, tensor inventory, RoPE frequencies (as
//! transformers computes them) and the primitive-op graph of one forward step.
//!
//! The graph follows transformers' `modeling_llama.py`: RMSNorm as `x * rsqrt(mean(x^2) + eps) * w`,
//! grouped-query attention with rotary embeddings on q and k, a SiLU-gated MLP, and an output head
//! that is either `lm_head.weight` or, with `tie_word_embeddings`, the embedding node itself.
//! The members differ in ([`Family`]):
//! - Mistral: a sliding attention window (`sliding_window`, 4096 when the key is absent);
//! - Qwen2: biases on q, k and v (not o); Qwen2 and Qwen3 take per-layer windows from
//!   `layer_types` (or `use_sliding_window` + `max_window_layers`);
//! - Qwen3: RMSNorm over each head's `head_dim` channels of q and k (`q_norm`, `k_norm`) before RoPE;
//! - Gemma: embeddings scaled by `sqrt(hidden_size)` (an f32, as transformers' buffer), RMSNorm
//!   weights applied as `(1 + w)`, a GeGLU MLP (`gelu_pytorch_tanh`), a tied head;
//! - Phi-3: fused `qkv_proj` and `gate_up_proj` weights whose matmul outputs are sliced, partial
//!   rotary embeddings (`partial_rotary_factor`), optional `sliding_window`;
//! - Mixtral: the MLP is a sparse mixture of experts, one `moe` op per layer (router softmax, top-k,
//!   renormalized weights; only the chosen experts run).

use serde_json::Value;

use llmc_ir::{BinaryOp, Dim, Graph, NodeId, Op, UnaryOp};

use crate::builder::{AttnDims, Builder};
use crate::checkpoint::Checkpoint;
use crate::config::{architecture, context_len, graph_name, mul, Cfg};
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

/// A member of the Llama family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Phi3,
    Mixtral,
}

impl Family {
    pub const ALL: [Family; 7] =
        [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma, Family::Phi3, Family::Mixtral];

    /// The `architectures` entry naming this member.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
        }
    }

    /// transformers' `model_type` for this member.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
        }
    }

    pub fn from_architecture(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.architecture() == name)
    }

    /// Defaults of transformers' config class: `(rms_norm_eps, max_position_embeddings,
    /// tie_word_embeddings, rope_theta)`.
    fn defaults(self) -> (f64, usize, bool, f64) {
        match self {
            Family::Llama => (1e-6, 2048, false, 10000.0),
            Family::Mistral => (1e-6, 131072, false, 10000.0),
            Family::Qwen2 | Family::Qwen3 => (1e-6, 32768, false, 10000.0),
            Family::Gemma => (1e-6, 8192, true, 10000.0),
            Family::Phi3 => (1e-5, 4096, false, 10000.0),
            Family::Mixtral => (1e-5, 131072, false, 1000000.0),
        }
    }
}

/// Mixture-of-experts sizes (Mixtral's `num_local_experts`, `num_experts_per_tok`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
}

/// The parts of a Llama-family `config.json` the graph depends on, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
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
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm of q and k.
    pub qk_norm: bool,
    /// The MLP's gate activation.
    pub activation: UnaryOp,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Channels of each head that RoPE rotates (`head_dim` unless partial).
    pub rotary_dim: usize,
    /// Each layer's sliding attention window (`None`: full causal attention).
    pub windows: Vec<Option<usize>>,
    /// Mixtral's sparse MLP.
    pub moe: Option<MoeConfig>,
}

impl LlamaConfig {
    /// Reads and checks the config of the member `architectures` names; defaults are those of
    /// transformers' config class for that member.
    pub fn from_json(config: &Value) -> Result<Self> {
        let arch = architecture(config)?;
        let family = Family::from_architecture(arch)
            .ok_or_else(|| field_err("architectures", format!("`{arch}` is not a Llama-family architecture")))?;
        Self::from_json_for(family, config)
    }

    /// Reads and checks `config` as a `family` config.
    pub fn from_json_for(family: Family, config: &Value) -> Result<Self> {
        let c = Cfg::new(config);
        let (default_eps, default_max_pos, default_tie, default_theta) = family.defaults();
        let hidden_size = c.size("hidden_size")?;
        let num_layers = c.size("num_hidden_layers")?;
        let num_heads = c.size("num_attention_heads")?;
        let num_kv_heads = c.size_or("num_key_value_heads", num_heads)?;
        let default_head_dim = match family {
            Family::Qwen3 => Some(128),
            Family::Gemma => Some(256),
            _ => None,
        };
        let head_dim = match c.size_opt("head_dim")?.or(default_head_dim) {
            Some(d) => d,
            None => c.head_dim(hidden_size, num_heads, "num_attention_heads")?,
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
        let q_width = mul("num_attention_heads x head_dim", num_heads, head_dim)?;
        let kv_width = mul("num_key_value_heads x head_dim", num_kv_heads, head_dim)?;
        let intermediate_size = c.size("intermediate_size")?;
        if family == Family::Phi3 {
            // The fused projections' widths.
            mul("2 x intermediate_size", 2, intermediate_size)?;
            mul("qkv_proj width (q + 2 x kv)", 1, q_width + 2 * kv_width)?;
        }
        let activation = activation(&c, family)?;
        let rms_norm_eps = c.number_or("rms_norm_eps", default_eps)?;
        if rms_norm_eps < 0.0 {
            return Err(field_err("rms_norm_eps", format!("must not be negative, got {rms_norm_eps}")));
        }
        let (rope_theta, rope_scaling) = rope(&c, default_theta)?;
        let rotary_dim = match family {
            Family::Phi3 => partial_rotary_dim(&c, head_dim)?,
            _ => head_dim,
        };
        let attention_bias = c.flag_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match family {
            Family::Llama | Family::Qwen3 | Family::Gemma => (attention_bias, attention_bias),
            Family::Qwen2 => (true, false),
            Family::Mistral | Family::Phi3 | Family::Mixtral => (false, false),
        };
        if family == Family::Gemma && c.flag_or("use_bidirectional_attention", false)? {
            return Err(field_err("use_bidirectional_attention", "`true` is not supported by llmc"));
        }
        let windows = layer_windows(config, &c, family, num_layers)?;
        let moe = match family {
            Family::Mixtral => {
                let num_experts = c.size_or("num_local_experts", 8)?;
                let top_k = c.size_or("num_experts_per_tok", 2)?;
                if top_k > num_experts {
                    return Err(field_err(
                        "num_experts_per_tok",
                        format!("{top_k} is more than num_local_experts ({num_experts})"),
                    ));
                }
                mul(
                    "num_local_experts x 2 x intermediate_size",
                    num_experts,
                    mul("2 x intermediate_size", 2, intermediate_size)?,
                )?;
                Some(MoeConfig { num_experts, top_k })
            }
            _ => None,
        };
        Ok(LlamaConfig {
            family,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            vocab_size: c.size("vocab_size")?,
            rms_norm_eps,
            max_position_embeddings: c.size_or("max_position_embeddings", default_max_pos)?,
            tie_word_embeddings: c.flag_or("tie_word_embeddings", default_tie)?,
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && c.flag_or("mlp_bias", false)?,
            qk_norm: family == Family::Qwen3,
            activation,
            rope_theta,
            rope_scaling,
            rotary_dim,
            windows,
            moe,
        })
    }

    /// Every tensor the graph reads, with the shape the config implies. Layer tensors come from
    /// [`layer_tensors`](Self::layer_tensors).
    pub fn global_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut t =
            vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
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
            (format!("{p}.self_attn.o_proj.weight"), vec![h, qw]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ];
        if self.family == Family::Phi3 {
            t.push((format!("{p}.self_attn.qkv_proj.weight"), vec![qw + 2 * kw, h]));
        } else {
            for (n, w) in [("q_proj", qw), ("k_proj", kw), ("v_proj", kw)] {
                t.push((format!("{p}.self_attn.{n}.weight"), vec![w, h]));
            }
        }
        if self.qkv_bias {
            for (n, w) in [("q_proj", qw), ("k_proj", kw), ("v_proj", kw)] {
                t.push((format!("{p}.self_attn.{n}.bias"), vec![w]));
            }
        }
        if self.o_bias {
            t.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        if self.qk_norm {
            t.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            t.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        match (self.family, self.moe) {
            (_, Some(m)) => {
                let q = format!("{p}.block_sparse_moe");
                t.push((format!("{q}.gate.weight"), vec![m.num_experts, h]));
                for e in 0..m.num_experts {
                    t.push((format!("{q}.experts.{e}.w1.weight"), vec![im, h]));
                    t.push((format!("{q}.experts.{e}.w3.weight"), vec![im, h]));
                    t.push((format!("{q}.experts.{e}.w2.weight"), vec![h, im]));
                }
            }
            (Family::Phi3, None) => {
                t.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * im, h]));
                t.push((format!("{p}.mlp.down_proj.weight"), vec![h, im]));
            }
            (_, None) => {
                t.push((format!("{p}.mlp.gate_proj.weight"), vec![im, h]));
                t.push((format!("{p}.mlp.up_proj.weight"), vec![im, h]));
                t.push((format!("{p}.mlp.down_proj.weight"), vec![h, im]));
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
        ckpt.check_layered(self.global_tensors(), self.num_layers, |i| self.layer_tensors(i))
    }

    /// The RoPE inverse frequencies, `f32[rotary_dim/2]`.
    pub fn inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.rope_theta, self.rotary_dim, &self.rope_scaling)
    }
}

/// The MLP activation: SiLU, or for Gemma the tanh GELU (transformers maps Gemma's legacy
/// `gelu` to `gelu_pytorch_tanh` too).
fn activation(c: &Cfg<'_>, family: Family) -> Result<UnaryOp> {
    let arch = family.architecture();
    if family == Family::Gemma {
        let act = c.string_opt("hidden_act")?.unwrap_or("gelu_pytorch_tanh");
        return match act {
            "gelu" | "gelu_pytorch_tanh" | "gelu_new" => Ok(UnaryOp::GeluTanh),
            other => Err(field_err(
                "hidden_act",
                format!("`{other}` is not supported for {arch} (supported: gelu_pytorch_tanh, gelu, gelu_new)"),
            )),
        };
    }
    let act = c.string_opt("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(field_err("hidden_act", format!("`{act}` is not supported for {arch} (only `silu`)")));
    }
    Ok(UnaryOp::Silu)
}

/// `int(head_dim * partial_rotary_factor)` as transformers computes it, from
/// `rope_parameters.partial_rotary_factor` or the top-level key (default 1).
pub(crate) fn partial_rotary_dim(c: &Cfg<'_>, head_dim: usize) -> Result<usize> {
    let nested = c.object("rope_parameters")?.map(|p| p.number_opt("partial_rotary_factor")).transpose()?.flatten();
    let (field, f) = match nested {
        Some(f) => ("rope_parameters.partial_rotary_factor", f),
        None => ("partial_rotary_factor", c.number_or("partial_rotary_factor", 1.0)?),
    };
    rotary_dim_of(field, head_dim, f)
}

/// `int(head_dim * factor)`, checked to be even, positive and at most `head_dim`.
pub(crate) fn rotary_dim_of(field: &str, head_dim: usize, factor: f64) -> Result<usize> {
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(field_err(field, format!("must be in (0, 1], got {factor}")));
    }
    let d = (head_dim as f64 * factor) as usize;
    if d == 0 || !d.is_multiple_of(2) {
        return Err(field_err(
            field,
            format!("{factor} x head_dim {head_dim} = {d} rotary channels; must be even and positive"),
        ));
    }
    Ok(d)
}

/// Each layer's attention window. Mistral's `sliding_window` applies to every layer (4096 when
/// the key is absent, none when it is `null`); Phi-3's and Mixtral's likewise (none when absent).
/// Qwen2/Qwen3 use it only with `use_sliding_window`, on the layers `layer_types` marks
/// `sliding_attention` (without `layer_types`: layers `>= max_window_layers`).
fn layer_windows(config: &Value, c: &Cfg<'_>, family: Family, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = match family {
        Family::Llama | Family::Gemma => None,
        Family::Mistral => match config.get("sliding_window") {
            None => Some(4096),
            Some(_) => c.size_opt("sliding_window")?,
        },
        Family::Phi3 | Family::Mixtral => c.size_opt("sliding_window")?,
        Family::Qwen2 | Family::Qwen3 => {
            if c.flag_or("use_sliding_window", false)? {
                Some(c.size_or("sliding_window", 4096)?)
            } else {
                None
            }
        }
    };
    if !matches!(family, Family::Qwen2 | Family::Qwen3) {
        return Ok(vec![window; layers]);
    }
    match c.get("layer_types") {
        None => {
            let first = c.size_or("max_window_layers", 28)?;
            Ok((0..layers).map(|i| if i >= first { window } else { None }).collect())
        }
        Some(Value::Array(types)) if types.len() == layers => types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => Ok(window),
                _ => Err(field_err(
                    "layer_types",
                    format!("entries must be \"full_attention\" or \"sliding_attention\", got {t}"),
                )),
            })
            .collect(),
        Some(v) => Err(field_err("layer_types", format!("must be a list of {layers} layer types, got {v}"))),
    }
}

/// RoPE theta and scaling from either spelling: transformers 4's `rope_theta` + `rope_scaling`
/// (`rope_type` or legacy `type`), or transformers 5's `rope_parameters` holding both.
pub(crate) fn rope(c: &Cfg<'_>, default_theta: f64) -> Result<(f64, RopeScaling)> {
    let params = c.object("rope_parameters")?;
    let theta = match c.number_opt("rope_theta")? {
        Some(t) => Some(t),
        None => params.map(|p| p.number_opt("rope_theta")).transpose()?.flatten(),
    };
    let theta = c.positive("rope_theta", theta.unwrap_or(default_theta))?;
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
            let (factor, low, band) =
                (factor as f32, low_freq_factor as f32, (high_freq_factor - low_freq_factor) as f32);
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

/// Builds the forward-step graph of a Llama-family checkpoint (the member `architectures` names).
pub fn build(config: &Value, ckpt: &Checkpoint, opts: &Options) -> Result<Graph> {
    let c = LlamaConfig::from_json(config)?;
    let context = context_len(opts, c.max_position_embeddings)?;
    c.validate(ckpt)?;

    let mut b = Builder::new(graph_name(config, c.family.model_type())?, ckpt);
    b.meta(config, c.family.architecture(), c.vocab_size, context, c.hidden_size, c.num_layers)?;

    let (h, v, hd, nh, nkv, im) =
        (c.hidden_size, c.vocab_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
    let (qw, kw) = (nh * hd, nkv * hd);
    let eps = c.rms_norm_eps as f32;
    let scale = (hd as f64).powf(-0.5) as f32;
    let gemma = c.family == Family::Gemma;
    // Gemma's norms scale by `1 + w`.
    let norm = |b: &mut Builder<'_>, x: NodeId, name: &str| -> Result<NodeId> {
        let mut w = b.weight(name, &[h])?;
        if gemma {
            let one = b.scalar(1.0)?;
            w = b.add(w, one)?;
        }
        b.rms_norm(x, w, eps)
    };

    let ids = b.ids()?;
    let embed = b.weight("model.embed_tokens.weight", &[v, h])?;
    let mut x = b.op(Op::Gather, &[embed, ids])?;
    if gemma {
        // transformers keeps `hidden_size ** 0.5` in an f32 buffer.
        let s = b.scalar((h as f64).sqrt() as f32)?;
        x = b.mul(x, s)?;
    }
    let inv_freq = b.constant(c.inv_freq(), &[c.rotary_dim / 2])?;
    let rope = Op::Rope { rotary_dim: c.rotary_dim };

    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        // Attention block.
        let hn = norm(&mut b, x, &format!("{p}.input_layernorm.weight"))?;
        let (q, k, vv) = if c.family == Family::Phi3 {
            let qkv = b.linear(hn, &format!("{p}.self_attn.qkv_proj"), qw + 2 * kw, h, false)?;
            (b.slice(qkv, 1, 0, qw)?, b.slice(qkv, 1, qw, qw + kw)?, b.slice(qkv, 1, qw + kw, qw + 2 * kw)?)
        } else {
            (
                b.linear(hn, &format!("{p}.self_attn.q_proj"), qw, h, c.qkv_bias)?,
                b.linear(hn, &format!("{p}.self_attn.k_proj"), kw, h, c.qkv_bias)?,
                b.linear(hn, &format!("{p}.self_attn.v_proj"), kw, h, c.qkv_bias)?,
            )
        };
        let mut q = b.reshape(q, vec![Dim::S, Dim::N(nh), Dim::N(hd)])?;
        let mut k = b.reshape(k, vec![Dim::S, Dim::N(nkv), Dim::N(hd)])?;
        let vv = b.reshape(vv, vec![Dim::S, Dim::N(nkv), Dim::N(hd)])?;
        if c.qk_norm {
            let wq = b.weight(&format!("{p}.self_attn.q_norm.weight"), &[hd])?;
            let wk = b.weight(&format!("{p}.self_attn.k_norm.weight"), &[hd])?;
            q = b.rms_norm(q, wq, eps)?;
            k = b.rms_norm(k, wk, eps)?;
        }
        let q = b.op(rope.clone(), &[q, inv_freq])?;
        let k = b.op(rope.clone(), &[k, inv_freq])?;
        let dims = AttnDims { heads: nh, kv_heads: nkv, head_dim: hd, context, window: c.windows[i] };
        let o = b.attention(i, dims, q, k, vv, Some(scale))?;
        let o = b.linear(o, &format!("{p}.self_attn.o_proj"), h, qw, c.o_bias)?;
        x = b.add(x, o)?;
        // MLP block.
        let hn = norm(&mut b, x, &format!("{p}.post_attention_layernorm.weight"))?;
        let d = match c.moe {
            Some(m) => moe_block(&mut b, hn, &format!("{p}.block_sparse_moe"), m, h, im, c.activation)?,
            None => {
                let (gate, up) = if c.family == Family::Phi3 {
                    let gu = b.linear(hn, &format!("{p}.mlp.gate_up_proj"), 2 * im, h, false)?;
                    (b.slice(gu, 1, 0, im)?, b.slice(gu, 1, im, 2 * im)?)
                } else {
                    (
                        b.linear(hn, &format!("{p}.mlp.gate_proj"), im, h, c.mlp_bias)?,
                        b.linear(hn, &format!("{p}.mlp.up_proj"), im, h, c.mlp_bias)?,
                    )
                };
                let a = b.unary(c.activation, gate)?;
                let m = b.binary(BinaryOp::Mul, a, up)?;
                b.linear(m, &format!("{p}.mlp.down_proj"), h, im, c.mlp_bias)?
            }
        };
        x = b.add(x, d)?;
    }

    let hn = norm(&mut b, x, "model.norm.weight")?;
    let head = if c.tie_word_embeddings { embed } else { b.weight("lm_head.weight", &[v, h])? };
    let logits = b.matmul(hn, head, true)?;
    Ok(b.finish(logits))
}

/// Mixtral's sparse MLP over `x f32[S, H]`: one `moe` op whose operands are the router
/// `{p}.gate.weight [E, H]`, the experts' gate and up projections stacked as `[E, 2I, H]` (expert
/// `e`'s rows `w1` then `w3`, a compile-time concat of the checkpoint tensors) and their down
/// projections stacked as `[E, H, I]`.
fn moe_block(
    b: &mut Builder<'_>,
    x: NodeId,
    p: &str,
    m: MoeConfig,
    h: usize,
    im: usize,
    act: UnaryOp,
) -> Result<NodeId> {
    let router = b.weight(&format!("{p}.gate.weight"), &[m.num_experts, h])?;
    let mut gate_up = Vec::with_capacity(2 * m.num_experts);
    let mut down = Vec::with_capacity(m.num_experts);
    for e in 0..m.num_experts {
        gate_up.push(b.weight(&format!("{p}.experts.{e}.w1.weight"), &[im, h])?);
        gate_up.push(b.weight(&format!("{p}.experts.{e}.w3.weight"), &[im, h])?);
        down.push(b.weight(&format!("{p}.experts.{e}.w2.weight"), &[h, im])?);
    }
    let gu = b.op(Op::Concat { axis: 0, n: gate_up.len() }, &gate_up)?; // [E*2I, H]
    let gu = b.reshape(gu, vec![Dim::N(m.num_experts), Dim::N(2 * im), Dim::N(h)])?;
    let dn = b.op(Op::Concat { axis: 0, n: down.len() }, &down)?; // [E*H, I]
    let dn = b.reshape(dn, vec![Dim::N(m.num_experts), Dim::N(h), Dim::N(im)])?;
    b.op(Op::Moe { top_k: m.top_k, act }, &[x, router, gu, dn])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(arch: &str, extra: Value) -> Value {
        let mut v = json!({
            "architectures": [arch],
            "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn parse(arch: &str, extra: Value) -> Result<LlamaConfig> {
        LlamaConfig::from_json(&cfg(arch, extra))
    }

    #[test]
    fn every_member_is_named_and_found_by_model_type() {
        for f in Family::ALL {
            assert_eq!(Family::from_architecture(f.architecture()), Some(f));
            assert!(crate::SUPPORTED_ARCHITECTURES.contains(&f.architecture()));
            let by_type = architecture(&json!({"model_type": f.model_type()})).unwrap();
            assert_eq!(by_type, f.architecture());
            assert_eq!(parse(f.architecture(), json!({})).unwrap().family, f);
        }
    }

    #[test]
    fn mistral_window_defaults_to_4096_and_null_disables_it() {
        assert_eq!(parse("MistralForCausalLM", json!({})).unwrap().windows, vec![Some(4096); 3]);
        assert_eq!(parse("MistralForCausalLM", json!({"sliding_window": null})).unwrap().windows, vec![None; 3]);
        assert_eq!(parse("MistralForCausalLM", json!({"sliding_window": 8})).unwrap().windows, vec![Some(8); 3]);
        assert!(parse("MistralForCausalLM", json!({"sliding_window": 0})).is_err());
        assert_eq!(parse("LlamaForCausalLM", json!({"sliding_window": 8})).unwrap().windows, vec![None; 3]);
    }

    #[test]
    fn qwen_windows_follow_layer_types() {
        let q = |extra| parse("Qwen2ForCausalLM", extra).map(|c| c.windows);
        // Released Qwen2 configs: a window given but not used.
        assert_eq!(q(json!({"sliding_window": 4096, "use_sliding_window": false})).unwrap(), vec![None; 3]);
        assert_eq!(
            q(json!({"sliding_window": 6, "use_sliding_window": true, "max_window_layers": 1})).unwrap(),
            vec![None, Some(6), Some(6)]
        );
        let types = json!(["sliding_attention", "full_attention", "sliding_attention"]);
        assert_eq!(
            q(json!({"sliding_window": 6, "use_sliding_window": true, "layer_types": types})).unwrap(),
            vec![Some(6), None, Some(6)]
        );
        for bad in [json!(["full_attention"]), json!(["full_attention", "local", "full_attention"]), json!("full")] {
            let e = q(json!({"use_sliding_window": true, "layer_types": bad})).unwrap_err().to_string();
            assert!(e.contains("layer_types"), "{e}");
        }
    }

    #[test]
    fn member_switches() {
        let q2 = parse("Qwen2ForCausalLM", json!({})).unwrap();
        assert_eq!((q2.qkv_bias, q2.o_bias, q2.qk_norm), (true, false, false));
        let q3 = parse("Qwen3ForCausalLM", json!({"head_dim": 32})).unwrap();
        assert_eq!((q3.qkv_bias, q3.o_bias, q3.qk_norm, q3.head_dim), (false, false, true, 32));
        assert_eq!(parse("Qwen3ForCausalLM", json!({})).unwrap().head_dim, 128);
        let g = parse("GemmaForCausalLM", json!({})).unwrap();
        assert_eq!((g.head_dim, g.tie_word_embeddings, g.activation), (256, true, UnaryOp::GeluTanh));
        assert_eq!(parse("GemmaForCausalLM", json!({"hidden_act": "gelu"})).unwrap().activation, UnaryOp::GeluTanh);
        let e = parse("GemmaForCausalLM", json!({"hidden_act": "relu"})).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
        let e = parse("GemmaForCausalLM", json!({"use_bidirectional_attention": true})).unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let m = parse("MixtralForCausalLM", json!({"num_local_experts": 4, "num_experts_per_tok": 2})).unwrap();
        assert_eq!((m.moe, m.rope_theta), (Some(MoeConfig { num_experts: 4, top_k: 2 }), 1e6));
        let e = parse("MixtralForCausalLM", json!({"num_local_experts": 2, "num_experts_per_tok": 3})).unwrap_err();
        assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
    }

    #[test]
    fn phi3_partial_rotary() {
        let p = |f| {
            parse("Phi3ForCausalLM", json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": f}}))
        };
        assert_eq!(p(json!(0.75)).unwrap().rotary_dim, 12); // head_dim 16
        assert_eq!(p(json!(0.3)).unwrap().rotary_dim, 4); // int(4.8)
        assert_eq!(parse("Phi3ForCausalLM", json!({})).unwrap().rotary_dim, 16);
        for bad in [json!(0.1), json!(1.5), json!(0)] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("partial_rotary_factor"), "{e}");
        }
        let e = parse("Phi3ForCausalLM", json!({"rope_scaling": {"rope_type": "longrope"}})).unwrap_err().to_string();
        assert!(e.contains("longrope"), "{e}");
        assert_eq!(parse("Phi3ForCausalLM", json!({})).unwrap().inv_freq().len(), 8);
    }
}
