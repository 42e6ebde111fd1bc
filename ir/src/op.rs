//! The op set, with each op's semantics and type rule.
//!
//! Ops are *primitive* where the optimizer is meant to discover structure (norms and attention are
//! sequences of elementwise, reduce, softmax and matmul ops), and fused where a primitive form would
//! only obscure the computation (RoPE, the causal mask, the KV-cache append).
//! All tensors are row-major and contiguous. Adding an op: one variant here, then the exhaustive
//! matches in `infer_type`, `print`, `parse`, `interp` and each backend (see docs/adding-an-op.md).

use crate::error::{type_err, Result};
use crate::types::{DType, Dim, Layout, TensorType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    /// `x * sigmoid(x)`
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`)
    GeluTanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 9] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
        }
    }
    /// Scalar reference semantics (f64 internally where it costs nothing).
    pub fn eval(self, x: f32) -> f32 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Gelu => {
                let x = x as f64;
                (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
            }
            UnaryOp::GeluTanh => {
                let x = x as f64;
                let c = (2.0 / std::f64::consts::PI).sqrt();
                (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
            }
        }
    }
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 4] = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
    pub fn eval(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
        }
    }
}

/// One operation. Operands are the node's incoming edges in operand order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Graph input: token ids, `i32[S]`. No operands.
    Input { name: String },
    /// Absolute positions of this step's tokens, `i32[S]`, value `P + s`. No operands.
    Positions,
    /// A checkpoint tensor, referenced by name and loaded lazily; computed in f32, `stored` is the
    /// checkpoint's element type. No operands. A packed `layout` (2-D weights only) makes the value
    /// the round-to-nearest dequantized tensor ([`crate::quant::fake_quant`]).
    Weight { name: String, stored: DType, layout: Layout },
    /// A small literal tensor (scales, epsilons, RoPE frequencies); `values.len()` equals the
    /// element count of the (static) result type. No operands.
    Const { values: Vec<f32> },
    /// `(table f32[V,H], ids i32[..]) -> f32[.., H]`: rows of `table`.
    Gather,
    /// Elementwise, same shape.
    Unary(UnaryOp),
    /// Elementwise with NumPy broadcasting (shapes right-aligned, size-1 dims stretch).
    Binary(BinaryOp),
    /// Reduction over the last axis, kept as size 1: `[.., n] -> [.., 1]`.
    Reduce(ReduceOp),
    /// Softmax over the last axis.
    Softmax,
    /// `a[.., M, K] x b[.., K, N] -> [.., M, N]`; with `transpose_b`, `b` is `[.., N, K]`.
    /// Batch dimensions broadcast as NumPy does.
    Matmul { transpose_b: bool },
    /// `out.shape[i] = in.shape[perm[i]]`.
    Transpose { perm: Vec<usize> },
    /// Same elements, shape taken from the result type.
    Reshape,
    /// `x[.., start..end, ..]` along `axis` (a constant dimension).
    Slice { axis: usize, start: usize, end: usize },
    /// Rotary embedding, half-rotation form (HF Llama/NeoX `rotate_half`):
    /// `(x f32[S, H, D], inv_freq f32[R/2]) -> f32[S, H, D]` with `R = rotary_dim <= D`.
    /// For the token at position `p = P + s` and `i < R/2`, `θ = p * inv_freq[i]` (an f32 product),
    /// `out[i] = x[i] cos θ - x[i+R/2] sin θ`, `out[i+R/2] = x[i+R/2] cos θ + x[i] sin θ`;
    /// channels `>= R` pass through.
    Rope { rotary_dim: usize },
    /// `x[.., S, T]` with `-inf` where key `t` is not visible to query `s` (absolute `P + s`):
    /// visible iff `t <= P + s` and, with a window `w`, `P + s - t < w`.
    CausalMask { window: Option<usize> },
    /// KV-cache append: `x f32[S, ..]` is written into state rows `P..P+S`; the result is the state's
    /// rows `0..T`, `f32[T, ..]`. The state's type is `f32[C, ..]` with `C` the context length.
    KvConcat { state: String },
    /// Concatenation of `n` operands along `axis`; all other dimensions equal.
    Concat { axis: usize, n: usize },
    /// Sparse mixture of experts (Mixtral's MLP):
    /// `(x f32[.., H], router f32[E, H], gate_up f32[E, 2I, H], down f32[E, H, I]) -> f32[.., H]`.
    /// Per row `x`: router logits `l = router x`; the experts with the `top_k` largest logits are
    /// chosen (equal logits: the lower expert index first) with weights `w = softmax(l[chosen])`,
    /// which equals transformers' softmax over all experts, top-k, renormalize;
    /// `out = sum_chosen w_e * down[e] (act(g) * u)` where `g`, `u` are rows `0..I` and `I..2I` of
    /// `gate_up[e] x`. Only the chosen experts are computed. `1 <= top_k <= E`.
    Moe { top_k: usize, act: UnaryOp },

    // ---- Fused ops: produced by the optimizer, never by the frontend. ----
    /// Scaled-dot-product attention with grouped KV heads (flash-style in backends: tiles over
    /// the keys with an online softmax, no `S x T` buffer).
    /// `(q f32[S, NH, D], k f32[K, NKV, D], v f32[K, NKV, D]) -> f32[S, NH, D]`, `NKV` divides `NH`;
    /// query head `h` reads KV head `h / (NH / NKV)`.
    /// - `causal` (decoders): `K = T` (the KV cache); for query `s` (absolute position `P + s`),
    ///   key `t` is visible iff `t <= P + s` and, with a window `w`, `P + s - t < w`.
    /// - not `causal` (encoders, printed `bidirectional`): `K` is `S` or `T`, every key is visible,
    ///   and there is no window.
    ///
    /// `out[s,h] = sum_t softmax_t(scale * q[s,h] . k[t]) v[t]` over visible `t`.
    Attention { scale: f32, window: Option<usize>, causal: bool },
    /// RMSNorm over the last axis: `(x f32[.., H], w f32[H]) -> x / sqrt(mean(x^2) + eps) * w`.
    RmsNorm { eps: f32 },
    /// LayerNorm over the last axis: `(x f32[.., H], w f32[H], b f32[H])`,
    /// `(x - mean) / sqrt(var + eps) * w + b` with the biased variance.
    LayerNorm { eps: f32 },
    /// Matmul with a fused epilogue: `act(a x b + bias) + residual`, `b` as in `matmul` (2-D,
    /// `[N, K]` with `transpose_b`, else `[K, N]`), `a f32[.., K]`. Operands: `a`, `b`, then `bias f32[N]`
    /// if `bias`, then `residual` (the result's shape) if `residual`.
    Linear { transpose_b: bool, bias: bool, act: Option<UnaryOp>, residual: bool },
    /// Gated linear unit (SwiGLU with `silu`, GeGLU with `gelu_tanh`) over merged weights:
    /// `(a f32[.., K], w f32[2N, K]) -> f32[.., N]`, `u = a x w^T`, `out[j] = act(u[j]) * u[N + j]`.
    GatedLinear { act: UnaryOp },
}

impl Op {
    /// The op's name in the text IR.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Positions => "positions",
            Op::Weight { .. } => "weight",
            Op::Const { .. } => "const",
            Op::Gather => "gather",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Reduce(r) => r.name(),
            Op::Softmax => "softmax",
            Op::Matmul { .. } => "matmul",
            Op::Transpose { .. } => "transpose",
            Op::Reshape => "reshape",
            Op::Slice { .. } => "slice",
            Op::Rope { .. } => "rope",
            Op::CausalMask { .. } => "causal_mask",
            Op::KvConcat { .. } => "kv_concat",
            Op::Concat { .. } => "concat",
            Op::Moe { .. } => "moe",
            Op::Attention { .. } => "attention",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Linear { .. } => "linear",
            Op::GatedLinear { .. } => "gated_linear",
        }
    }

    /// Whether the optimizer introduces this op (the frontend emits only primitive ops).
    pub fn is_fused(&self) -> bool {
        matches!(self, Op::Attention { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } | Op::Linear { .. } | Op::GatedLinear { .. })
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Positions | Op::Weight { .. } | Op::Const { .. } => 0,
            Op::Unary(_)
            | Op::Reduce(_)
            | Op::Softmax
            | Op::Transpose { .. }
            | Op::Reshape
            | Op::Slice { .. }
            | Op::CausalMask { .. }
            | Op::KvConcat { .. } => 1,
            Op::Gather | Op::Binary(_) | Op::Matmul { .. } | Op::Rope { .. } | Op::RmsNorm { .. } | Op::GatedLinear { .. } => 2,
            Op::Attention { .. } | Op::LayerNorm { .. } => 3,
            Op::Moe { .. } => 4,
            Op::Linear { bias, residual, .. } => 2 + *bias as usize + *residual as usize,
            Op::Concat { n, .. } => *n,
        }
    }

    /// Ops whose result type is declared rather than inferred from operands.
    pub fn declares_type(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape)
    }

    /// Whether the op has an effect beyond its result (it must not be removed or merged).
    pub fn has_side_effect(&self) -> bool {
        matches!(self, Op::KvConcat { .. })
    }

    /// Result type from operand types. For ops that [`declare`](Op::declares_type) their type,
    /// `declared` is checked against the operands and returned.
    pub fn infer_type(&self, ins: &[&TensorType], declared: Option<&TensorType>) -> Result<TensorType> {
        let name = self.name();
        if ins.len() != self.arity() {
            return Err(type_err(name, format!("takes {} operands, got {}", self.arity(), ins.len())));
        }
        let need_f32 = |t: &TensorType, what: &str| -> Result<()> {
            if t.dtype != DType::F32 {
                return Err(type_err(name, format!("{what} must be f32, got {t}")));
            }
            Ok(())
        };
        let declared_or = |what: &str| -> Result<TensorType> {
            declared.cloned().ok_or_else(|| type_err(name, format!("needs a declared result type ({what})")))
        };
        Ok(match self {
            Op::Input { .. } => {
                let t = declared_or("token ids")?;
                if t.dtype != DType::I32 || t.shape != vec![Dim::S] {
                    return Err(type_err(name, format!("token ids must be i32[S], got {t}")));
                }
                t
            }
            Op::Positions => TensorType::new(DType::I32, vec![Dim::S]),
            Op::Weight { .. } => {
                let t = declared_or("weight")?;
                need_f32(&t, "weight")?;
                if t.static_numel().is_none() {
                    return Err(type_err(name, format!("weights need static shapes, got {t}")));
                }
                t
            }
            Op::Const { values } => {
                let t = declared_or("const")?;
                need_f32(&t, "const")?;
                match t.static_numel() {
                    Some(n) if n == values.len() => t,
                    Some(n) => {
                        return Err(type_err(name, format!("{} values for type {t} ({n} elements)", values.len())))
                    }
                    None => return Err(type_err(name, format!("consts need static shapes, got {t}"))),
                }
            }
            Op::Gather => {
                let (table, ids) = (ins[0], ins[1]);
                need_f32(table, "table")?;
                if table.rank() != 2 || ids.dtype != DType::I32 {
                    return Err(type_err(name, format!("wants (f32[V,H], i32[..]), got ({table}, {ids})")));
                }
                let mut shape = ids.shape.clone();
                shape.push(table.shape[1]);
                TensorType::f32(shape)
            }
            Op::Unary(_) | Op::Softmax | Op::CausalMask { .. } => {
                need_f32(ins[0], "operand")?;
                if matches!(self, Op::CausalMask { .. }) {
                    let r = ins[0].rank();
                    if r < 2 || ins[0].shape[r - 2] != Dim::S || ins[0].shape[r - 1] != Dim::T {
                        return Err(type_err(name, format!("wants f32[.., S, T], got {}", ins[0])));
                    }
                }
                if matches!(self, Op::Softmax) && ins[0].rank() == 0 {
                    return Err(type_err(name, "operand must have rank >= 1"));
                }
                ins[0].clone()
            }
            Op::Binary(_) => {
                need_f32(ins[0], "lhs")?;
                need_f32(ins[1], "rhs")?;
                TensorType::f32(broadcast(name, &ins[0].shape, &ins[1].shape)?)
            }
            Op::Reduce(_) => {
                need_f32(ins[0], "operand")?;
                let mut shape = ins[0].shape.clone();
                match shape.last_mut() {
                    Some(d) => *d = Dim::N(1),
                    None => return Err(type_err(name, "operand must have rank >= 1")),
                }
                TensorType::f32(shape)
            }
            Op::Matmul { transpose_b } => {
                let (a, b) = (ins[0], ins[1]);
                need_f32(a, "lhs")?;
                need_f32(b, "rhs")?;
                if a.rank() < 2 || b.rank() < 2 {
                    return Err(type_err(name, format!("operands need rank >= 2, got {a} and {b}")));
                }
                let (m, ka) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
                let (kb, n) = if *transpose_b {
                    (b.shape[b.rank() - 1], b.shape[b.rank() - 2])
                } else {
                    (b.shape[b.rank() - 2], b.shape[b.rank() - 1])
                };
                if ka != kb {
                    return Err(type_err(name, format!("contraction mismatch: {a} x {b} (transpose_b={transpose_b})")));
                }
                let mut shape = broadcast(name, &a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])?;
                shape.push(m);
                shape.push(n);
                TensorType::f32(shape)
            }
            Op::Transpose { perm } => {
                let x = ins[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
                    return Err(type_err(name, format!("perm {perm:?} is not a permutation of rank {}", x.rank())));
                }
                TensorType::new(x.dtype, perm.iter().map(|&p| x.shape[p]).collect())
            }
            Op::Reshape => {
                let t = declared_or("reshape")?;
                if t.dtype != ins[0].dtype || t.numel_key() != ins[0].numel_key() {
                    return Err(type_err(name, format!("cannot reshape {} to {t}", ins[0])));
                }
                t
            }
            Op::Slice { axis, start, end } => {
                let x = ins[0];
                let Some(d) = x.shape.get(*axis) else {
                    return Err(type_err(name, format!("axis {axis} out of range for {x}")));
                };
                let Some(n) = d.as_const() else {
                    return Err(type_err(name, format!("axis {axis} of {x} is symbolic")));
                };
                if start >= end || *end > n {
                    return Err(type_err(name, format!("range {start}..{end} invalid for extent {n}")));
                }
                let mut shape = x.shape.clone();
                shape[*axis] = Dim::N(end - start);
                TensorType::new(x.dtype, shape)
            }
            Op::Rope { rotary_dim } => {
                let (x, f) = (ins[0], ins[1]);
                need_f32(x, "operand")?;
                need_f32(f, "inv_freq")?;
                let ok = x.rank() == 3
                    && x.shape[0] == Dim::S
                    && x.shape[2].as_const().is_some_and(|d| *rotary_dim <= d)
                    && *rotary_dim % 2 == 0
                    && *rotary_dim > 0
                    && f.shape == vec![Dim::N(rotary_dim / 2)];
                if !ok {
                    return Err(type_err(name, format!("wants (f32[S,H,D], f32[{}]) with rotary_dim {rotary_dim} <= D, got ({x}, {f})", rotary_dim / 2)));
                }
                x.clone()
            }
            Op::KvConcat { .. } => {
                let x = ins[0];
                need_f32(x, "operand")?;
                if x.shape.first() != Some(&Dim::S) || x.shape[1..].iter().any(|d| !d.is_const()) {
                    return Err(type_err(name, format!("wants f32[S, consts..], got {x}")));
                }
                let mut shape = x.shape.clone();
                shape[0] = Dim::T;
                TensorType::f32(shape)
            }
            Op::Concat { axis, n } => {
                if *n < 1 {
                    return Err(type_err(name, "needs at least one operand"));
                }
                let first = ins[0];
                if *axis >= first.rank() {
                    return Err(type_err(name, format!("axis {axis} out of range for {first}")));
                }
                let mut total = 0;
                for t in ins {
                    let same_others = t.dtype == first.dtype
                        && t.rank() == first.rank()
                        && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                    match (same_others, t.shape[*axis].as_const()) {
                        (true, Some(d)) => total += d,
                        _ => return Err(type_err(name, format!("operands must agree off axis {axis} and be constant on it: {first} vs {t}"))),
                    }
                }
                let mut shape = first.shape.clone();
                shape[*axis] = Dim::N(total);
                TensorType::new(first.dtype, shape)
            }
            Op::Moe { top_k, .. } => {
                let (x, r, gu, dn) = (ins[0], ins[1], ins[2], ins[3]);
                for t in [x, r, gu, dn] {
                    need_f32(t, "operand")?;
                }
                let ok = match (x.shape.last(), &r.shape[..], &gu.shape[..], &dn.shape[..]) {
                    (Some(h), [Dim::N(e), rh], [Dim::N(e2), Dim::N(i2), gh], [Dim::N(e3), dh, Dim::N(i)]) => {
                        rh == h && gh == h && dh == h && e == e2 && e == e3 && *i2 == 2 * i && *i > 0 && (1..=*e).contains(top_k)
                    }
                    _ => false,
                };
                if !ok {
                    return Err(type_err(name, format!("wants (f32[.., H], f32[E, H], f32[E, 2I, H], f32[E, H, I]) with 1 <= top_k ({top_k}) <= E, got ({x}, {r}, {gu}, {dn})")));
                }
                x.clone()
            }
            Op::Attention { window, causal, .. } => {
                let (q, k, v) = (ins[0], ins[1], ins[2]);
                for t in [q, k, v] {
                    need_f32(t, "operand")?;
                }
                if !causal && window.is_some() {
                    return Err(type_err(name, "a bidirectional attention has no window"));
                }
                let keys_ok = k.rank() >= 1 && (k.shape[0] == Dim::T || (!causal && k.shape[0] == Dim::S));
                let ok = q.rank() == 3
                    && k.rank() == 3
                    && q.shape[0] == Dim::S
                    && keys_ok
                    && k.shape == v.shape
                    && q.shape[2] == k.shape[2]
                    && q.shape[1..].iter().all(|d| d.is_const())
                    && k.shape[1..].iter().all(|d| d.is_const())
                    && matches!((q.shape[1], k.shape[1]), (Dim::N(nh), Dim::N(nkv)) if nkv > 0 && nh % nkv == 0);
                if !ok {
                    let keys = if *causal { "T" } else { "S or T" };
                    return Err(type_err(name, format!("wants (f32[S,NH,D], f32[K,NKV,D], f32[K,NKV,D]) with K = {keys} and NKV dividing NH, got ({q}, {k}, {v})")));
                }
                q.clone()
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
                let x = ins[0];
                need_f32(x, "operand")?;
                let Some(&h) = x.shape.last() else {
                    return Err(type_err(name, "operand must have rank >= 1"));
                };
                for p in &ins[1..] {
                    need_f32(p, "parameter")?;
                    if p.shape != vec![h] {
                        return Err(type_err(name, format!("parameters must be f32[{h}], got {p}")));
                    }
                }
                x.clone()
            }
            Op::Linear { transpose_b, bias, residual, .. } => {
                let (a, b) = (ins[0], ins[1]);
                need_f32(a, "lhs")?;
                need_f32(b, "rhs")?;
                if a.rank() < 1 || b.rank() != 2 {
                    return Err(type_err(name, format!("wants a f32[.., K] and a 2-D rhs, got {a} and {b}")));
                }
                let (kb, n) = if *transpose_b { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
                if a.shape[a.rank() - 1] != kb {
                    return Err(type_err(name, format!("contraction mismatch: {a} x {b} (transpose_b={transpose_b})")));
                }
                let mut shape = a.shape.clone();
                *shape.last_mut().expect("rank >= 1") = n;
                let out = TensorType::f32(shape);
                let mut i = 2;
                if *bias {
                    if ins[i].shape != vec![n] || ins[i].dtype != DType::F32 {
                        return Err(type_err(name, format!("bias must be f32[{n}], got {}", ins[i])));
                    }
                    i += 1;
                }
                if *residual && *ins[i] != out {
                    return Err(type_err(name, format!("residual must be {out}, got {}", ins[i])));
                }
                out
            }
            Op::GatedLinear { .. } => {
                let (a, w) = (ins[0], ins[1]);
                need_f32(a, "lhs")?;
                need_f32(w, "weight")?;
                let ok = a.rank() >= 1 && w.rank() == 2 && w.shape[1] == a.shape[a.rank() - 1] && matches!(w.shape[0], Dim::N(n2) if n2 % 2 == 0 && n2 > 0);
                if !ok {
                    return Err(type_err(name, format!("wants (f32[.., K], f32[2N, K]), got ({a}, {w})")));
                }
                let mut shape = a.shape.clone();
                *shape.last_mut().expect("rank >= 1") = Dim::N(w.shape[0].as_const().expect("checked") / 2);
                TensorType::f32(shape)
            }
        })
    }
}

/// NumPy broadcasting of two shapes.
pub fn broadcast(op: &str, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { Dim::N(1) };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { Dim::N(1) };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (Dim::N(1), y) => y,
            (x, Dim::N(1)) => x,
            _ => return Err(type_err(op, format!("cannot broadcast {a:?} with {b:?}"))),
        });
    }
    Ok(out)
}

/// `erf` (Abramowitz & Stegun 7.1.26 is too coarse for a reference; this is the W. J. Cody form
/// via `erfc` continued by a high-order rational, accurate to ~1e-15).
pub fn erf(x: f64) -> f64 {
    // Use the complementary error function with a Chebyshev fit (Numerical Recipes `erfccheb`-style).
    let z = x.abs();
    let t = 2.0 / (2.0 + z);
    let ty = 4.0 * t - 2.0;
    const COF: [f64; 28] = [
        -1.3026537197817094,
        6.4196979235649026e-1,
        1.9476473204185836e-2,
        -9.561514786808631e-3,
        -9.46595344482036e-4,
        3.66839497852761e-4,
        4.2523324806907e-5,
        -2.0278578112534e-5,
        -1.624290004647e-6,
        1.303655835580e-6,
        1.5626441722e-8,
        -8.5238095915e-8,
        6.529054439e-9,
        5.059343495e-9,
        -9.91364156e-10,
        -2.27365122e-10,
        9.6467911e-11,
        2.394038e-12,
        -6.886027e-12,
        8.94487e-13,
        3.13092e-13,
        -1.12708e-13,
        3.81e-16,
        7.106e-15,
        -1.523e-15,
        -9.4e-17,
        1.21e-16,
        -2.8e-17,
    ];
    let (mut d, mut dd) = (0.0f64, 0.0f64);
    for &c in COF.iter().skip(1).rev() {
        let tmp = d;
        d = ty * d - dd + c;
        dd = tmp;
    }
    let erfc = t * (-z * z + 0.5 * (COF[0] + ty * d) - dd).exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [(0.0, 0.0), (0.5, 0.5204998778130465), (1.0, 0.8427007929497149), (-2.0, -0.9953222650189527), (3.0, 0.9999779095030014)] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {} want {want}", erf(x));
        }
    }

    #[test]
    fn moe_type_rule() {
        use Dim::*;
        let (x, r) = (TensorType::f32(vec![S, N(8)]), TensorType::f32(vec![N(4), N(8)]));
        let (gu, dn) = (TensorType::f32(vec![N(4), N(12), N(8)]), TensorType::f32(vec![N(4), N(8), N(6)]));
        let moe = |k| Op::Moe { top_k: k, act: UnaryOp::Silu };
        assert_eq!(moe(2).infer_type(&[&x, &r, &gu, &dn], None).unwrap(), x);
        assert_eq!(moe(4).infer_type(&[&x, &r, &gu, &dn], None).unwrap(), x);
        for k in [0, 5] {
            assert!(moe(k).infer_type(&[&x, &r, &gu, &dn], None).is_err(), "top_k {k}");
        }
        let odd = TensorType::f32(vec![N(4), N(8), N(5)]); // 2 x 5 != 12
        assert!(moe(2).infer_type(&[&x, &r, &gu, &odd], None).is_err());
        let three = TensorType::f32(vec![N(3), N(8)]);
        assert!(moe(2).infer_type(&[&x, &three, &gu, &dn], None).is_err());
    }

    #[test]
    fn attention_type_rule() {
        use Dim::*;
        let q = TensorType::f32(vec![S, N(4), N(8)]);
        let (kt, ks) = (TensorType::f32(vec![T, N(2), N(8)]), TensorType::f32(vec![S, N(2), N(8)]));
        let att = |window, causal| Op::Attention { scale: 0.5, window, causal };
        assert_eq!(att(Some(3), true).infer_type(&[&q, &kt, &kt], None).unwrap(), q);
        assert_eq!(att(None, false).infer_type(&[&q, &ks, &ks], None).unwrap(), q);
        assert_eq!(att(None, false).infer_type(&[&q, &kt, &kt], None).unwrap(), q);
        // Causal attention reads the cache; a bidirectional one has no window.
        assert!(att(None, true).infer_type(&[&q, &ks, &ks], None).is_err());
        let e = att(Some(3), false).infer_type(&[&q, &ks, &ks], None).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        let odd = TensorType::f32(vec![S, N(3), N(8)]); // 3 KV heads do not divide 4
        assert!(att(None, false).infer_type(&[&q, &odd, &odd], None).is_err());
    }

    #[test]
    fn broadcast_rules() {
        use Dim::*;
        assert_eq!(broadcast("t", &[S, N(4)], &[N(4)]).unwrap(), vec![S, N(4)]);
        assert_eq!(broadcast("t", &[S, N(1)], &[N(1), N(3)]).unwrap(), vec![S, N(3)]);
        assert!(broadcast("t", &[S, N(4)], &[N(3)]).is_err());
    }
}
