//! Graph-building helpers the architectures share: weight nodes created once per checkpoint
//! tensor, deduplicated constants, thin wrappers over the primitive ops, the norms and `nn.Linear`
//! spelled as primitive ops, the metadata every artifact carries, and the attention cores: the
//! causal one (KV-cache append, grouped-query scores, causal softmax, optional sliding window) that
//! every decoder emits the same way, and the bidirectional one of encoders (no cache, no mask).

use std::collections::HashMap;

use serde_json::Value;

use llmc_ir::{BinaryOp, DType, Dim, Graph, KvLayout, NodeId, Op, ReduceOp, StateDecl, StateKind, TensorType, UnaryOp};

use crate::checkpoint::Checkpoint;
use crate::config::{mul, token_ids};
use crate::error::Result;

/// A graph under construction over one checkpoint.
pub(crate) struct Builder<'c> {
    pub g: Graph,
    ckpt: &'c Checkpoint,
    weights: HashMap<String, NodeId>,
    consts: HashMap<(Vec<u32>, Vec<Dim>), NodeId>,
}

/// Static shape as IR dims.
pub(crate) fn dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::N(d)).collect()
}

/// Sizes of one attention block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// KV-cache rows (the compiled context).
    pub context: usize,
    /// Sliding window: query `p` sees keys `t` with `p - t < window` (Mistral's `sliding_window`).
    pub window: Option<usize>,
}

impl<'c> Builder<'c> {
    pub fn new(name: String, ckpt: &'c Checkpoint) -> Self {
        Builder { g: Graph::new(name), ckpt, weights: HashMap::new(), consts: HashMap::new() }
    }

    /// The weight node for checkpoint tensor `name` (created on first use), typed `f32[shape]`.
    /// Validates existence, dtype and shape, so it is also safe to call before validation.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<NodeId> {
        if let Some(&n) = self.weights.get(name) {
            return Ok(n);
        }
        let stored = self.ckpt.check_tensor(name, shape)?;
        let n = self.g.add(Op::Weight { name: name.to_string(), stored, layout: llmc_ir::Layout::Dense }, &[], Some(TensorType::f32(dims(shape))))?;
        self.weights.insert(name.to_string(), n);
        Ok(n)
    }

    /// A constant `f32[shape]` (deduplicated by value and shape).
    pub fn constant(&mut self, values: Vec<f32>, shape: &[usize]) -> Result<NodeId> {
        let key = (values.iter().map(|v| v.to_bits()).collect(), dims(shape));
        if let Some(&n) = self.consts.get(&key) {
            return Ok(n);
        }
        let n = self.g.add(Op::Const { values }, &[], Some(TensorType::f32(dims(shape))))?;
        self.consts.insert(key, n);
        Ok(n)
    }

    /// A rank-0 constant.
    pub fn scalar(&mut self, v: f32) -> Result<NodeId> {
        self.constant(vec![v], &[])
    }

    pub fn op(&mut self, op: Op, ins: &[NodeId]) -> Result<NodeId> {
        Ok(self.g.add(op, ins, None)?)
    }
    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> Result<NodeId> {
        self.op(Op::Unary(u), &[x])
    }
    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.op(Op::Binary(b), &[x, y])
    }
    pub fn add(&mut self, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Add, x, y)
    }
    pub fn mul(&mut self, x: NodeId, y: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, x, y)
    }
    pub fn mean(&mut self, x: NodeId) -> Result<NodeId> {
        self.op(Op::Reduce(ReduceOp::Mean), &[x])
    }
    pub fn matmul(&mut self, a: NodeId, b: NodeId, transpose_b: bool) -> Result<NodeId> {
        self.op(Op::Matmul { transpose_b }, &[a, b])
    }
    pub fn transpose(&mut self, x: NodeId, perm: &[usize]) -> Result<NodeId> {
        self.op(Op::Transpose { perm: perm.to_vec() }, &[x])
    }
    pub fn reshape(&mut self, x: NodeId, shape: Vec<Dim>) -> Result<NodeId> {
        Ok(self.g.add(Op::Reshape, &[x], Some(TensorType::f32(shape)))?)
    }

    /// Metadata every artifact carries: `architecture`, `vocab_size`, `max_context`, `hidden_size`,
    /// `num_layers`, and `bos_token_id` / `eos_token_id` when the config has them.
    pub fn meta(&mut self, config: &Value, arch: &str, vocab: usize, context: usize, hidden: usize, layers: usize) -> Result<()> {
        let meta = &mut self.g.meta;
        meta.insert("architecture".into(), arch.into());
        meta.insert("vocab_size".into(), vocab.to_string());
        meta.insert("max_context".into(), context.to_string());
        meta.insert("hidden_size".into(), hidden.to_string());
        meta.insert("num_layers".into(), layers.to_string());
        for f in ["bos_token_id", "eos_token_id"] {
            if let Some(v) = token_ids(config, f)? {
                self.g.meta.insert(f.into(), v);
            }
        }
        Ok(())
    }

    /// `x * rsqrt(mean(x^2) + eps) * w`, over the last axis (`w` broadcasts).
    pub fn rms_norm(&mut self, x: NodeId, w: NodeId, eps: f32) -> Result<NodeId> {
        let sq = self.mul(x, x)?;
        let ms = self.mean(sq)?;
        let e = self.scalar(eps)?;
        let ms = self.add(ms, e)?;
        let r = self.unary(UnaryOp::Rsqrt, ms)?;
        let y = self.mul(x, r)?;
        self.mul(y, w)
    }

    /// `(x - mean) * rsqrt(var + eps) * w + b`, over the last axis (biased variance).
    pub fn layer_norm(&mut self, x: NodeId, w: NodeId, bias: NodeId, eps: f32) -> Result<NodeId> {
        let mu = self.mean(x)?;
        let xc = self.binary(BinaryOp::Sub, x, mu)?;
        let sq = self.mul(xc, xc)?;
        let var = self.mean(sq)?;
        let e = self.scalar(eps)?;
        let ve = self.add(var, e)?;
        let r = self.unary(UnaryOp::Rsqrt, ve)?;
        let y = self.mul(xc, r)?;
        let y = self.mul(y, w)?;
        self.add(y, bias)
    }

    /// `x W^T (+ bias)` for an `nn.Linear` named `name` (`{name}.weight` `[out, in]`, `{name}.bias`).
    pub fn linear(&mut self, x: NodeId, name: &str, out: usize, inp: usize, bias: bool) -> Result<NodeId> {
        let w = self.weight(&format!("{name}.weight"), &[out, inp])?;
        let y = self.matmul(x, w, true)?;
        if bias {
            let bb = self.weight(&format!("{name}.bias"), &[out])?;
            self.add(y, bb)
        } else {
            Ok(y)
        }
    }

    /// `x[.., start..end]` along `axis`.
    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> Result<NodeId> {
        self.op(Op::Slice { axis, start, end }, &[x])
    }

    /// The token-id input `i32[S]`.
    pub fn ids(&mut self) -> Result<NodeId> {
        Ok(self.g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![Dim::S])))?)
    }

    /// Attention for layer `layer` over `q f32[S,heads,head_dim]` and `k`, `v f32[S,kv_heads,head_dim]`
    /// (positions already applied): appends `k`, `v` to the layer's KV cache (declaring states
    /// `cache.{layer}.k` / `.v`), then per head `softmax(causal_mask(q k^T * scale)) v`, where query
    /// head `h` reads KV head `h / (heads / kv_heads)` and the mask has `d.window`.
    /// Returns `f32[S, heads*head_dim]`.
    pub fn attention(&mut self, layer: usize, d: AttnDims, q: NodeId, k: NodeId, v: NodeId, scale: Option<f32>) -> Result<NodeId> {
        let AttnDims { heads, kv_heads, head_dim: hd, context, window } = d;
        let group = heads / kv_heads;
        let q_width = mul("heads x head_dim", heads, hd)?;
        mul("context x kv_heads x head_dim", mul("context x kv_heads", context, kv_heads)?, hd)?;
        let state_ty = TensorType::f32(dims(&[context, kv_heads, hd]));
        let (sk, sv) = (format!("cache.{layer}.k"), format!("cache.{layer}.v"));
        // One contiguous buffer of `context` rows per cache (see `KvLayout` for the layouts to come).
        let kind = StateKind::Kv { layout: KvLayout::Contiguous };
        self.g.states.push(StateDecl::new(sk.clone(), state_ty.clone(), kind));
        self.g.states.push(StateDecl::new(sv.clone(), state_ty, kind));
        let kall = self.op(Op::KvConcat { state: sk }, &[k])?; // [T,nkv,hd]
        let vall = self.op(Op::KvConcat { state: sv }, &[v])?;
        let q = self.reshape(q, vec![Dim::S, Dim::N(kv_heads), Dim::N(group), Dim::N(hd)])?;
        let q = self.transpose(q, &[1, 2, 0, 3])?; // [nkv,g,S,hd]
        let kt = self.transpose(kall, &[1, 0, 2])?; // [nkv,T,hd]
        let kt = self.reshape(kt, vec![Dim::N(kv_heads), Dim::N(1), Dim::T, Dim::N(hd)])?;
        let vt = self.transpose(vall, &[1, 0, 2])?;
        let vt = self.reshape(vt, vec![Dim::N(kv_heads), Dim::N(1), Dim::T, Dim::N(hd)])?;
        let mut scores = self.matmul(q, kt, true)?; // [nkv,g,S,T]
        if let Some(s) = scale {
            let c = self.scalar(s)?;
            scores = self.mul(scores, c)?;
        }
        let masked = self.op(Op::CausalMask { window }, &[scores])?;
        let p = self.op(Op::Softmax, &[masked])?;
        let o = self.matmul(p, vt, false)?; // [nkv,g,S,hd]
        let o = self.transpose(o, &[2, 0, 1, 3])?; // [S,nkv,g,hd]
        self.reshape(o, vec![Dim::S, Dim::N(q_width)])
    }

    /// Bidirectional attention (encoders): every query sees every key of the step, no mask and no
    /// KV cache. `q`, `k`, `v f32[S, heads, head_dim]`; per head `softmax(q k^T * scale) v`.
    /// Returns `f32[S, heads*head_dim]`.
    pub fn bidirectional_attention(
        &mut self,
        heads: usize,
        hd: usize,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        scale: f32,
    ) -> Result<NodeId> {
        let width = mul("heads x head_dim", heads, hd)?;
        let q = self.transpose(q, &[1, 0, 2])?; // [H,S,D]
        let k = self.transpose(k, &[1, 0, 2])?;
        let v = self.transpose(v, &[1, 0, 2])?;
        let scores = self.matmul(q, k, true)?; // [H,S,S]
        let c = self.scalar(scale)?;
        let scores = self.mul(scores, c)?;
        let p = self.op(Op::Softmax, &[scores])?;
        let o = self.matmul(p, v, false)?; // [H,S,D]
        let o = self.transpose(o, &[1, 0, 2])?;
        self.reshape(o, vec![Dim::S, Dim::N(width)])
    }

    /// Finishes the graph with `logits` as its single output.
    pub fn finish(mut self, logits: NodeId) -> Graph {
        self.g.outputs = vec![logits];
        self.g
    }
}
