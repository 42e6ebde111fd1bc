//! The e-graph language: one e-node kind per IR op, with the op's attributes (permutations,
//! reshape targets, flags, scales) held in leaf e-nodes of their own ([`Attr`]) so that rule
//! patterns can bind them (`(transpose ?x ?perm)`) and guards can read them, as Tensat does.
//! Values without operands (weights, consts, the token ids, positions, values computed before the
//! optimized region) are [`Leaf`] e-nodes referring to the region's leaf table (see
//! [`analysis::LeafInfo`](super::analysis::LeafInfo)); names live in that table, so a transformer
//! layer's e-graph does not depend on which layer it is.
//!
//! [`to_ir`] and [`from_ir`] convert between an e-node (with its attribute children resolved) and
//! an [`Op`]; they are the only places that know the operand order of each e-node.

use std::fmt;
use std::str::FromStr;

use egg::{define_language, Id};
use llmc_ir::{BinaryOp, DType, Dim, Op, ReduceOp, TensorType, UnaryOp};

/// A reference to entry `.0` of the region's leaf table. Written `$3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Leaf(pub u32);

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.0)
    }
}

impl FromStr for Leaf {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.strip_prefix('$').and_then(|n| n.parse().ok()).map(Leaf).ok_or_else(|| format!("`{s}` is not a leaf ($N)"))
    }
}

/// An attribute value. Text forms (used in rule patterns): `none`, `true`, `false`, `3`, `[1,0,2]`,
/// `0.125f` (an f32), an activation name (`silu`), a type (`f32[S,8,8]`), a state slot (`@2`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attr {
    /// An absent optional operand or attribute (no bias, no window, no activation).
    None,
    Bool(bool),
    Int(i64),
    Ints(Vec<i64>),
    /// An f32 by its bits (so that `-0.0` and NaNs compare exactly).
    F32(u32),
    /// An activation, as its index in [`UnaryOp::ALL`].
    Act(u8),
    /// A tensor type: dtype index (in [`DTYPES`]) and shape.
    Type(u8, Vec<Dim>),
    /// The `n`-th KV-cache state the region writes.
    State(u32),
}

/// Element types by the index [`Attr::Type`] stores.
pub const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::I32];

impl Attr {
    pub fn f32(x: f32) -> Attr {
        Attr::F32(x.to_bits())
    }
    pub fn act(u: Option<UnaryOp>) -> Attr {
        match u {
            None => Attr::None,
            Some(u) => Attr::Act(UnaryOp::ALL.iter().position(|&x| x == u).expect("UnaryOp::ALL lists every op") as u8),
        }
    }
    pub fn ty(t: &TensorType) -> Attr {
        Attr::Type(DTYPES.iter().position(|&d| d == t.dtype).expect("DTYPES lists every dtype") as u8, t.shape.clone())
    }
    pub fn usizes(v: &[usize]) -> Attr {
        Attr::Ints(v.iter().map(|&x| x as i64).collect())
    }
    pub fn window(w: Option<usize>) -> Attr {
        w.map_or(Attr::None, |w| Attr::Int(w as i64))
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Attr::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_usize(&self) -> Option<usize> {
        match self {
            Attr::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_usizes(&self) -> Option<Vec<usize>> {
        match self {
            Attr::Ints(v) => v.iter().map(|&i| usize::try_from(i).ok()).collect(),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match self {
            Attr::F32(b) => Some(f32::from_bits(*b)),
            _ => None,
        }
    }
    /// `Some(None)` for [`Attr::None`], `Some(Some(op))` for an activation.
    pub fn as_act(&self) -> Option<Option<UnaryOp>> {
        match self {
            Attr::None => Some(None),
            Attr::Act(i) => UnaryOp::ALL.get(*i as usize).map(|&u| Some(u)),
            _ => None,
        }
    }
    pub fn as_type(&self) -> Option<TensorType> {
        match self {
            Attr::Type(d, shape) => DTYPES.get(*d as usize).map(|&dt| TensorType::new(dt, shape.clone())),
            _ => None,
        }
    }
    /// `Some(None)` for no window, `Some(Some(w))` for a window of `w`.
    pub fn as_window(&self) -> Option<Option<usize>> {
        match self {
            Attr::None => Some(None),
            Attr::Int(_) => self.as_usize().map(Some),
            _ => None,
        }
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::None => f.write_str("none"),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Int(i) => write!(f, "{i}"),
            Attr::Ints(v) => {
                let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", s.join(","))
            }
            Attr::F32(b) => write!(f, "{:?}f", f32::from_bits(*b)),
            Attr::Act(i) => f.write_str(UnaryOp::ALL.get(*i as usize).map_or("?act", |u| u.name())),
            Attr::Type(..) => match self.as_type() {
                Some(t) => write!(f, "{t}"),
                None => f.write_str("?type"),
            },
            Attr::State(s) => write!(f, "@{s}"),
        }
    }
}

fn parse_dim(s: &str) -> Option<Dim> {
    Some(match s {
        "S" => Dim::S,
        "P" => Dim::P,
        "T" => Dim::T,
        n => Dim::N(n.parse().ok()?),
    })
}

impl FromStr for Attr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an attribute");
        Ok(match s {
            "none" => Attr::None,
            "true" => Attr::Bool(true),
            "false" => Attr::Bool(false),
            _ if s.starts_with('@') => Attr::State(s[1..].parse().map_err(|_| bad())?),
            _ if s.starts_with('[') && s.ends_with(']') => {
                let inner = &s[1..s.len() - 1];
                let v: Result<Vec<i64>, _> =
                    if inner.is_empty() { Ok(vec![]) } else { inner.split(',').map(|x| x.trim().parse()).collect() };
                Attr::Ints(v.map_err(|_| bad())?)
            }
            _ if s.len() > 1 && s.ends_with('f') && s[..s.len() - 1].parse::<f32>().is_ok() => {
                Attr::f32(s[..s.len() - 1].parse().map_err(|_| bad())?)
            }
            _ => {
                if let Ok(i) = s.parse::<i64>() {
                    return Ok(Attr::Int(i));
                }
                if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == s) {
                    return Ok(Attr::act(Some(*u)));
                }
                let (dt, rest) = s.split_once('[').ok_or_else(bad)?;
                let dt = DType::from_name(dt).ok_or_else(bad)?;
                let dims = rest.strip_suffix(']').ok_or_else(bad)?;
                let shape: Option<Vec<Dim>> =
                    if dims.is_empty() { Some(vec![]) } else { dims.split(',').map(parse_dim).collect() };
                Attr::ty(&TensorType::new(dt, shape.ok_or_else(bad)?))
            }
        })
    }
}

define_language! {
    /// One e-node per IR op. Operand order: the op's value operands, then its attributes (see
    /// each variant); `linear`'s optional bias and residual are `none` when absent.
    pub enum Tn {
        "gather" = Gather([Id; 2]),
        "neg" = Neg(Id),
        "exp" = Exp(Id),
        "sqrt" = Sqrt(Id),
        "rsqrt" = Rsqrt(Id),
        "tanh" = Tanh(Id),
        "sigmoid" = Sigmoid(Id),
        "silu" = Silu(Id),
        "gelu" = Gelu(Id),
        "gelu_tanh" = GeluTanh(Id),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "reduce_sum" = ReduceSum(Id),
        "reduce_mean" = ReduceMean(Id),
        "reduce_max" = ReduceMax(Id),
        "softmax" = Softmax(Id),
        // a, b, transpose_b
        "matmul" = Matmul([Id; 3]),
        // x, perm
        "transpose" = Transpose([Id; 2]),
        // x, result type
        "reshape" = Reshape([Id; 2]),
        // x, axis, start, end
        "slice" = Slice([Id; 4]),
        // x, inv_freq, rotary_dim
        "rope" = Rope([Id; 3]),
        // x, window
        "causal_mask" = CausalMask([Id; 2]),
        // x, state
        "kv_concat" = KvConcat([Id; 2]),
        // axis, x1 .. xn
        "concat" = Concat(Box<[Id]>),
        // q, k, v, scale, window, causal
        "attention" = Attention([Id; 6]),
        // x, w, eps
        "rms_norm" = RmsNorm([Id; 3]),
        // x, w, b, eps
        "layer_norm" = LayerNorm([Id; 4]),
        // a, b, transpose_b, act, bias|none, residual|none
        "linear" = Linear([Id; 6]),
        // a, w, act
        "gated_linear" = GatedLinear([Id; 3]),
        // x, router, gate_up, down, top_k, act
        "moe" = Moe([Id; 6]),
        Leaf(Leaf),
        Attr(Attr),
    }
}

/// Each unary op with its e-node constructor.
type UnaryCtor = (UnaryOp, fn(Id) -> Tn);

const UNARY: [UnaryCtor; 9] = [
    (UnaryOp::Neg, Tn::Neg),
    (UnaryOp::Exp, Tn::Exp),
    (UnaryOp::Sqrt, Tn::Sqrt),
    (UnaryOp::Rsqrt, Tn::Rsqrt),
    (UnaryOp::Tanh, Tn::Tanh),
    (UnaryOp::Sigmoid, Tn::Sigmoid),
    (UnaryOp::Silu, Tn::Silu),
    (UnaryOp::Gelu, Tn::Gelu),
    (UnaryOp::GeluTanh, Tn::GeluTanh),
];

/// The IR op of `node` and its value operands (attribute children resolved through `attr`);
/// `None` for leaves, attributes, or an attribute child that does not hold the expected kind.
pub fn to_ir(node: &Tn, attr: impl Fn(Id) -> Option<Attr>) -> Option<(Op, Vec<Id>)> {
    use Tn::*;
    let un = |u: UnaryOp, x: &Id| Some((Op::Unary(u), vec![*x]));
    let bin = |b: BinaryOp, x: &[Id; 2]| Some((Op::Binary(b), x.to_vec()));
    let red = |r: ReduceOp, x: &Id| Some((Op::Reduce(r), vec![*x]));
    match node {
        Leaf(_) | Attr(_) => None,
        Gather(c) => Some((Op::Gather, c.to_vec())),
        Neg(x) => un(UnaryOp::Neg, x),
        Exp(x) => un(UnaryOp::Exp, x),
        Sqrt(x) => un(UnaryOp::Sqrt, x),
        Rsqrt(x) => un(UnaryOp::Rsqrt, x),
        Tanh(x) => un(UnaryOp::Tanh, x),
        Sigmoid(x) => un(UnaryOp::Sigmoid, x),
        Silu(x) => un(UnaryOp::Silu, x),
        Gelu(x) => un(UnaryOp::Gelu, x),
        GeluTanh(x) => un(UnaryOp::GeluTanh, x),
        Add(c) => bin(BinaryOp::Add, c),
        Sub(c) => bin(BinaryOp::Sub, c),
        Mul(c) => bin(BinaryOp::Mul, c),
        Div(c) => bin(BinaryOp::Div, c),
        ReduceSum(x) => red(ReduceOp::Sum, x),
        ReduceMean(x) => red(ReduceOp::Mean, x),
        ReduceMax(x) => red(ReduceOp::Max, x),
        Softmax(x) => Some((Op::Softmax, vec![*x])),
        Matmul([a, b, tb]) => Some((Op::Matmul { transpose_b: attr(*tb)?.as_bool()? }, vec![*a, *b])),
        Transpose([x, p]) => Some((Op::Transpose { perm: attr(*p)?.as_usizes()? }, vec![*x])),
        Reshape([x, _]) => Some((Op::Reshape, vec![*x])),
        Slice([x, a, s, e]) => Some((
            Op::Slice { axis: attr(*a)?.as_usize()?, start: attr(*s)?.as_usize()?, end: attr(*e)?.as_usize()? },
            vec![*x],
        )),
        Rope([x, f, r]) => Some((Op::Rope { rotary_dim: attr(*r)?.as_usize()? }, vec![*x, *f])),
        CausalMask([x, w]) => Some((Op::CausalMask { window: attr(*w)?.as_window()? }, vec![*x])),
        KvConcat([x, s]) => match attr(*s)? {
            self::Attr::State(i) => Some((Op::KvConcat { state: i.to_string() }, vec![*x])),
            _ => None,
        },
        Concat(c) => {
            let (axis, xs) = c.split_first()?;
            Some((Op::Concat { axis: attr(*axis)?.as_usize()?, n: xs.len() }, xs.to_vec()))
        }
        Attention([q, k, v, s, w, c]) => Some((
            Op::Attention { scale: attr(*s)?.as_f32()?, window: attr(*w)?.as_window()?, causal: attr(*c)?.as_bool()? },
            vec![*q, *k, *v],
        )),
        RmsNorm([x, w, e]) => Some((Op::RmsNorm { eps: attr(*e)?.as_f32()? }, vec![*x, *w])),
        LayerNorm([x, w, b, e]) => Some((Op::LayerNorm { eps: attr(*e)?.as_f32()? }, vec![*x, *w, *b])),
        Linear([a, b, tb, act, bias, res]) => {
            let is_value = |id: &Id| !matches!(attr(*id), Some(self::Attr::None));
            let (has_bias, has_res) = (is_value(bias), is_value(res));
            let mut ins = vec![*a, *b];
            if has_bias {
                ins.push(*bias);
            }
            if has_res {
                ins.push(*res);
            }
            Some((
                Op::Linear {
                    transpose_b: attr(*tb)?.as_bool()?,
                    bias: has_bias,
                    act: attr(*act)?.as_act()?,
                    residual: has_res,
                },
                ins,
            ))
        }
        GatedLinear([a, w, act]) => Some((Op::GatedLinear { act: attr(*act)?.as_act()?? }, vec![*a, *w])),
        Moe([x, r, gu, dn, k, act]) => {
            Some((Op::Moe { top_k: attr(*k)?.as_usize()?, act: attr(*act)?.as_act()?? }, vec![*x, *r, *gu, *dn]))
        }
    }
}

/// The e-node for `op` over value operands `ins` (in operand order); `attr` adds an attribute leaf
/// and returns its id, `declared` is the result type (used by `reshape`), `state` maps a
/// `kv_concat` state name to its slot. `None` for ops without operands (they are leaves).
pub fn from_ir(
    op: &Op,
    ins: &[Id],
    declared: &TensorType,
    mut attr: impl FnMut(Attr) -> Id,
    state: impl Fn(&str) -> u32,
) -> Option<Tn> {
    use Tn::*;
    let x = || ins[0];
    let two = || [ins[0], ins[1]];
    Some(match op {
        Op::Input { .. } | Op::Positions | Op::Weight { .. } | Op::Const { .. } => return None,
        Op::Gather => Gather(two()),
        Op::Unary(u) => UNARY.iter().find(|(v, _)| v == u).map(|(_, f)| f(x()))?,
        Op::Binary(BinaryOp::Add) => Add(two()),
        Op::Binary(BinaryOp::Sub) => Sub(two()),
        Op::Binary(BinaryOp::Mul) => Mul(two()),
        Op::Binary(BinaryOp::Div) => Div(two()),
        Op::Reduce(ReduceOp::Sum) => ReduceSum(x()),
        Op::Reduce(ReduceOp::Mean) => ReduceMean(x()),
        Op::Reduce(ReduceOp::Max) => ReduceMax(x()),
        Op::Softmax => Softmax(x()),
        Op::Matmul { transpose_b } => Matmul([ins[0], ins[1], attr(self::Attr::Bool(*transpose_b))]),
        Op::Transpose { perm } => Transpose([x(), attr(self::Attr::usizes(perm))]),
        Op::Reshape => Reshape([x(), attr(self::Attr::ty(declared))]),
        Op::Slice { axis, start, end } => Slice([
            x(),
            attr(self::Attr::Int(*axis as i64)),
            attr(self::Attr::Int(*start as i64)),
            attr(self::Attr::Int(*end as i64)),
        ]),
        Op::Rope { rotary_dim } => Rope([ins[0], ins[1], attr(self::Attr::Int(*rotary_dim as i64))]),
        Op::CausalMask { window } => CausalMask([x(), attr(self::Attr::window(*window))]),
        Op::KvConcat { state: s } => KvConcat([x(), attr(self::Attr::State(state(s)))]),
        Op::Concat { axis, .. } => {
            let mut c = vec![attr(self::Attr::Int(*axis as i64))];
            c.extend_from_slice(ins);
            Concat(c.into_boxed_slice())
        }
        Op::Attention { scale, window, causal } => Attention([
            ins[0],
            ins[1],
            ins[2],
            attr(self::Attr::f32(*scale)),
            attr(self::Attr::window(*window)),
            attr(self::Attr::Bool(*causal)),
        ]),
        Op::RmsNorm { eps } => RmsNorm([ins[0], ins[1], attr(self::Attr::f32(*eps))]),
        Op::LayerNorm { eps } => LayerNorm([ins[0], ins[1], ins[2], attr(self::Attr::f32(*eps))]),
        Op::Linear { transpose_b, bias, act, residual } => {
            let none = attr(self::Attr::None);
            let b = if *bias { ins[2] } else { none };
            let r = if *residual { ins[2 + *bias as usize] } else { none };
            Linear([ins[0], ins[1], attr(self::Attr::Bool(*transpose_b)), attr(self::Attr::act(*act)), b, r])
        }
        Op::GatedLinear { act } => GatedLinear([ins[0], ins[1], attr(self::Attr::act(Some(*act)))]),
        Op::Moe { top_k, act } => Moe([
            ins[0],
            ins[1],
            ins[2],
            ins[3],
            attr(self::Attr::Int(*top_k as i64)),
            attr(self::Attr::act(Some(*act))),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_print_and_parse_back() {
        let t = TensorType::f32(vec![Dim::S, Dim::N(8), Dim::T]);
        for a in [
            Attr::None,
            Attr::Bool(true),
            Attr::Int(-3),
            Attr::Ints(vec![1, 0, 2]),
            Attr::Ints(vec![]),
            Attr::f32(0.35355338),
            Attr::f32(-0.0),
            Attr::f32(1e-6),
            Attr::act(Some(UnaryOp::GeluTanh)),
            Attr::ty(&t),
            Attr::ty(&TensorType::new(DType::I32, vec![])),
            Attr::State(4),
        ] {
            let s = a.to_string();
            assert_eq!(s.parse::<Attr>(), Ok(a.clone()), "{s}");
        }
        assert!("f32[S,x]".parse::<Attr>().is_err());
        assert_eq!("$12".parse::<Leaf>(), Ok(Leaf(12)));
    }

    #[test]
    fn patterns_parse_with_attribute_literals() {
        for p in [
            "(matmul ?a ?b true)",
            "(linear ?a ?b ?tb silu none none)",
            "(transpose ?x [1,0,2])",
            "(reshape ?x f32[S,4,2])",
            "(concat 0 ?a ?b)",
            "(attention ?q ?k ?v 0.125f none true)",
        ] {
            p.parse::<egg::Pattern<Tn>>().unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        // `silu` with one operand is the op; alone it is the activation attribute.
        let e: egg::RecExpr<Tn> = "(silu silu)".parse().unwrap();
        assert!(matches!(e.as_ref()[0], Tn::Attr(Attr::Act(_))));
        assert!(matches!(e.as_ref()[1], Tn::Silu(_)));
    }
}
