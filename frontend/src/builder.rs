//! Graph-building helpers the architectures share: weight nodes created once per checkpoint
//! tensor, deduplicated constants, thin wrappers over the primitive ops, and the attention core
//! (KV-cache append, grouped-query scores, causal softmax) that every decoder emits the same way.

use std::collections::HashMap;

use llmc_ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, StateDecl, TensorType, UnaryOp};

use crate::checkpoint::Checkpoint;
use crate::config::mul;
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
        let n = self.g.add(Op::Weight { name: name.to_string(), stored }, &[], Some(TensorType::f32(dims(shape))))?;
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

    /// The token-id input `i32[S]`.
    pub fn ids(&mut self) -> Result<NodeId> {
        Ok(self.g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![Dim::S])))?)
    }

    /// Attention for layer `layer` over `q f32[S,heads,head_dim]` and `k`, `v f32[S,kv_heads,head_dim]`
    /// (positions already applied): appends `k`, `v` to the layer's KV cache (declaring states
    /// `cache.{layer}.k` / `.v`), then per head `softmax(causal_mask(q k^T * scale)) v`, where query
    /// head `h` reads KV head `h / (heads / kv_heads)`. Returns `f32[S, heads*head_dim]`.
    pub fn attention(&mut self, layer: usize, d: AttnDims, q: NodeId, k: NodeId, v: NodeId, scale: Option<f32>) -> Result<NodeId> {
        let AttnDims { heads, kv_heads, head_dim: hd, context } = d;
        let group = heads / kv_heads;
        let q_width = mul("heads x head_dim", heads, hd)?;
        mul("context x kv_heads x head_dim", mul("context x kv_heads", context, kv_heads)?, hd)?;
        let state_ty = TensorType::f32(dims(&[context, kv_heads, hd]));
        let (sk, sv) = (format!("cache.{layer}.k"), format!("cache.{layer}.v"));
        self.g.states.push(StateDecl { name: sk.clone(), ty: state_ty.clone() });
        self.g.states.push(StateDecl { name: sv.clone(), ty: state_ty });
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
        let masked = self.op(Op::CausalMask { window: None }, &[scores])?;
        let p = self.op(Op::Softmax, &[masked])?;
        let o = self.matmul(p, vt, false)?; // [nkv,g,S,hd]
        let o = self.transpose(o, &[2, 0, 1, 3])?; // [S,nkv,g,hd]
        self.reshape(o, vec![Dim::S, Dim::N(q_width)])
    }

    /// Finishes the graph with `logits` as its single output.
    pub fn finish(mut self, logits: NodeId) -> Graph {
        self.g.outputs = vec![logits];
        self.g
    }
}
