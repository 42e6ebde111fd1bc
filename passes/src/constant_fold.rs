//! `constant-fold`: evaluates ops whose operands are all `const` into a `const`, and applies the
//! algebraic identities that are exact in IEEE f32 for every input (the rule table below).
//!
//! Folding uses the reference interpreter on a one-op subgraph, so a folded value is bit-for-bit
//! what the unfolded graph computes. Only results with a static shape of at most
//! [`MAX_FOLD_ELEMENTS`] elements are folded, so a fold never bloats the artifact. Ops that read
//! the step (`rope`, `causal_mask`) or have an effect (`kv_concat`) are never folded.
//!
//! Operands orphaned by a rewrite are left for `dce`.

use llmc_ir::{self as ir, BinaryOp, Graph, NodeId, Op};

use crate::error::Result;
use crate::manager::{Pass, PassStats};
use crate::registry::{PassContext, PassOptions, RegisteredPass};

/// The largest result (in elements) that is folded into a `const`.
pub const MAX_FOLD_ELEMENTS: usize = 4096;

/// Folds constant subexpressions and exact identities.
pub struct ConstantFold;

/// What a rule does to the node it matched.
enum Rewrite {
    /// Every use of the node becomes a use of this value; the node is removed.
    Replace(NodeId),
    /// The node becomes `op` applied to the single operand `operand` (its type is unchanged).
    Rebuild { op: Op, operand: NodeId },
}

type Rule = fn(&Graph, NodeId) -> Option<Rewrite>;

/// The identities, tried in order on every node that was not folded. Each is exact for all f32
/// inputs, NaN, infinities and signed zeros included. `x + 0.0 -> x` is deliberately absent:
/// `-0.0 + 0.0` is `+0.0`, so only `x + -0.0` folds (LLVM's rule without `nsz`).
const RULES: &[(&str, Rule)] = &[
    ("mul-one", mul_one),                         // x * 1 -> x, 1 * x -> x   (no broadcast)
    ("div-one", div_one),                         // x / 1 -> x
    ("add-neg-zero", add_neg_zero),               // x + -0.0 -> x, -0.0 + x -> x
    ("sub-zero", sub_zero),                       // x - 0.0 -> x
    ("reshape-identity", reshape_identity),       // reshape x : type(x) -> x
    ("reshape-reshape", reshape_reshape),         // reshape (reshape x) -> reshape x
    ("transpose-identity", transpose_identity),   // transpose x {perm = [0, 1, ..]} -> x
    ("transpose-transpose", transpose_transpose), // transpose (transpose x p) q -> transpose x {p[q[i]]}
];

/// Whether `n` is a const whose every element has exactly the bits of `v`.
fn is_splat(g: &Graph, n: NodeId, v: f32) -> bool {
    matches!(g.op(n), Op::Const { values } if values.iter().all(|x| x.to_bits() == v.to_bits()))
}

/// For `x op c` (or `c op x` when `commutes`) with `c` a splat of `v`: `x`, provided the result
/// has `x`'s type (so dropping `c` loses no broadcast).
fn binary_identity(g: &Graph, n: NodeId, op: BinaryOp, v: f32, commutes: bool) -> Option<Rewrite> {
    if g.op(n) != &Op::Binary(op) {
        return None;
    }
    let ins = g.inputs(n);
    let (a, b) = (ins[0], ins[1]);
    if is_splat(g, b, v) && g.ty(a) == g.ty(n) {
        return Some(Rewrite::Replace(a));
    }
    if commutes && is_splat(g, a, v) && g.ty(b) == g.ty(n) {
        return Some(Rewrite::Replace(b));
    }
    None
}

fn mul_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    binary_identity(g, n, BinaryOp::Mul, 1.0, true)
}
fn div_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    binary_identity(g, n, BinaryOp::Div, 1.0, false)
}
fn add_neg_zero(g: &Graph, n: NodeId) -> Option<Rewrite> {
    binary_identity(g, n, BinaryOp::Add, -0.0, true)
}
fn sub_zero(g: &Graph, n: NodeId) -> Option<Rewrite> {
    binary_identity(g, n, BinaryOp::Sub, 0.0, false)
}

fn reshape_identity(g: &Graph, n: NodeId) -> Option<Rewrite> {
    if g.op(n) != &Op::Reshape {
        return None;
    }
    let x = g.inputs(n)[0];
    (g.ty(x) == g.ty(n)).then_some(Rewrite::Replace(x))
}

fn reshape_reshape(g: &Graph, n: NodeId) -> Option<Rewrite> {
    if g.op(n) != &Op::Reshape {
        return None;
    }
    let inner = g.inputs(n)[0];
    if g.op(inner) != &Op::Reshape {
        return None;
    }
    let x = g.inputs(inner)[0];
    if g.ty(x) == g.ty(n) {
        return Some(Rewrite::Replace(x));
    }
    Some(Rewrite::Rebuild { op: Op::Reshape, operand: x })
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

fn transpose_identity(g: &Graph, n: NodeId) -> Option<Rewrite> {
    match g.op(n) {
        Op::Transpose { perm } if is_identity(perm) => Some(Rewrite::Replace(g.inputs(n)[0])),
        _ => None,
    }
}

fn transpose_transpose(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Transpose { perm: q } = g.op(n) else { return None };
    let inner = g.inputs(n)[0];
    let Op::Transpose { perm: p } = g.op(inner) else { return None };
    let x = g.inputs(inner)[0];
    // out.shape[i] = inner.shape[q[i]] = x.shape[p[q[i]]]
    let perm: Vec<usize> = q.iter().map(|&i| p[i]).collect();
    if is_identity(&perm) {
        return Some(Rewrite::Replace(x));
    }
    Some(Rewrite::Rebuild { op: Op::Transpose { perm }, operand: x })
}

/// Whether `n` may be evaluated at compile time: every operand a const, a static result of at
/// most [`MAX_FOLD_ELEMENTS`] elements, and no dependence on the step or effect.
fn foldable(g: &Graph, n: NodeId) -> bool {
    let op = g.op(n);
    if op.arity() == 0
        || op.has_side_effect()
        || matches!(op, Op::Rope { .. } | Op::CausalMask { .. } | Op::KvConcat { .. })
    {
        return false;
    }
    let ty = g.ty(n);
    if ty.dtype != ir::DType::F32 || ty.static_numel().is_none_or(|k| k > MAX_FOLD_ELEMENTS) {
        return false;
    }
    g.inputs(n).iter().all(|&i| matches!(g.op(i), Op::Const { .. }))
}

/// Evaluates `n` (whose operands are consts) with the reference interpreter.
fn evaluate(g: &Graph, n: NodeId) -> Result<Vec<f32>> {
    let mut sub = Graph::new("fold");
    let ins: Vec<NodeId> = g
        .inputs(n)
        .iter()
        .map(|&i| {
            let node = g.node(i);
            sub.add_typed(node.op.clone(), &[], node.ty.clone())
        })
        .collect();
    let node = g.node(n);
    let out = sub.add_typed(node.op.clone(), &ins, node.ty.clone());
    sub.outputs = vec![out];
    let none = std::collections::HashMap::<String, Vec<f32>>::new();
    let mut res = ir::Interpreter::new(&none).run(&sub, &[])?;
    Ok(res.remove(0).data)
}

impl RegisteredPass for ConstantFold {
    const NAME: &'static str = "constant-fold";
    const SUMMARY: &'static str = "evaluate ops on consts (<= 4096 elements); exact identities (x*1, x+-0, reshape/transpose chains)";
    fn from_options(_: &PassOptions<'_>, _: &PassContext) -> Result<Self> {
        Ok(ConstantFold)
    }
}

impl Pass for ConstantFold {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn summary(&self) -> &'static str {
        Self::SUMMARY
    }
    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut st = PassStats::default();
        let mut kept_add_zero = 0;
        for n in g.topo_order()? {
            if foldable(g, n) {
                let values = evaluate(g, n)?;
                let ty = g.ty(n).clone();
                let c = g.add_typed(Op::Const { values }, &[], ty);
                g.replace_all_uses(n, c);
                g.remove(n);
                st.bump("folded", 1);
                continue;
            }
            let Some((name, rw)) = RULES.iter().find_map(|(name, rule)| rule(g, n).map(|rw| (*name, rw))) else {
                if g.op(n) == &Op::Binary(BinaryOp::Add) && g.inputs(n).iter().any(|&i| is_splat(g, i, 0.0)) {
                    kept_add_zero += 1;
                }
                continue;
            };
            match rw {
                Rewrite::Replace(x) => {
                    g.replace_all_uses(n, x);
                    g.remove(n);
                }
                Rewrite::Rebuild { op, operand } => {
                    let old = g.inputs(n)[0];
                    let e = g.g.find_edge(old, n).expect("operand edge of a unary op");
                    g.g.remove_edge(e);
                    g.g.add_edge(operand, n, 0);
                    g.g[n].op = op;
                }
            }
            st.bump(name, 1);
        }
        if kept_add_zero > 0 {
            st.notes
                .push(format!("{kept_add_zero} `add x, 0.0` kept: not exact when x is -0.0 (only `x + -0.0` folds)"));
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::Dce;
    use ir::{Dim, ReduceOp, TensorType, UnaryOp};

    fn consts_of(g: &Graph, n: NodeId) -> Vec<f32> {
        match g.op(n) {
            Op::Const { values } => values.clone(),
            o => panic!("expected a const, got {o:?}"),
        }
    }

    #[test]
    fn folds_const_arithmetic_chains() {
        let mut g = Graph::new("t");
        let (_, x) = embed(&mut g, 8, 4);
        let a = constant(&mut g, &[4], vec![1.0, 2.0, 3.0, 4.0]);
        let b = constant(&mut g, &[1], vec![0.5]);
        let m = g.add(Op::Binary(BinaryOp::Mul), &[a, b], None).unwrap();
        let e = g.add(Op::Unary(UnaryOp::Neg), &[m], None).unwrap();
        let r = g.add(Op::Reduce(ReduceOp::Sum), &[e], None).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[x, e], None).unwrap();
        g.outputs = vec![y, r];
        let before = g.clone();
        let st = ConstantFold.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("folded"), 3);
        let ins = g.inputs(y);
        assert_eq!(consts_of(&g, ins[1]), vec![-0.5, -1.0, -1.5, -2.0]);
        assert_eq!(consts_of(&g, g.outputs[1]), vec![-5.0]);
        Dce.run(&mut g).unwrap();
        // ids, embed, gather, the folded const, add, the folded sum.
        assert_eq!(g.node_count(), 6, "{}", ir::print(&g));
        assert_same_outputs(&before, &g, &[3, 1]);
    }

    #[test]
    fn does_not_fold_large_or_symbolic_results() {
        let mut g = Graph::new("t");
        let (_, x) = embed(&mut g, 8, 4);
        let big = constant(&mut g, &[65, 64], vec![1.5; 65 * 64]);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[big], None).unwrap();
        let small = constant(&mut g, &[64, 64], vec![1.5; 64 * 64]);
        let e2 = g.add(Op::Unary(UnaryOp::Exp), &[small], None).unwrap();
        let y = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        g.outputs = vec![e, e2, y];
        let st = ConstantFold.run(&mut g).unwrap();
        assert_eq!(st.get("folded"), 1);
        assert_eq!(g.op(g.outputs[0]), &Op::Unary(UnaryOp::Exp));
        assert!(matches!(g.op(g.outputs[1]), Op::Const { .. }));
        assert_eq!(g.outputs[2], y);
    }

    #[test]
    fn identities_on_elementwise_ops() {
        let mut g = Graph::new("t");
        let (_, x) = embed(&mut g, 8, 4);
        let one = constant(&mut g, &[4], vec![1.0; 4]);
        let one_b = constant(&mut g, &[2, 4], vec![1.0; 8]);
        let nz = constant(&mut g, &[1], vec![-0.0]);
        let pz = constant(&mut g, &[1], vec![0.0]);
        let m1 = g.add(Op::Binary(BinaryOp::Mul), &[x, one], None).unwrap(); // -> x
        let m2 = g.add(Op::Binary(BinaryOp::Mul), &[one, m1], None).unwrap(); // -> x
        let d = g.add(Op::Binary(BinaryOp::Div), &[m2, one], None).unwrap(); // -> x
        let d2 = g.add(Op::Binary(BinaryOp::Div), &[one, d], None).unwrap(); // 1/x: kept
        let a = g.add(Op::Binary(BinaryOp::Add), &[nz, d2], None).unwrap(); // -> d2
        let a2 = g.add(Op::Binary(BinaryOp::Add), &[a, pz], None).unwrap(); // kept (+0.0)
        let s = g.add(Op::Binary(BinaryOp::Sub), &[a2, pz], None).unwrap(); // -> a2
        let s2 = g.add(Op::Binary(BinaryOp::Sub), &[s, nz], None).unwrap(); // kept (x - -0 = x + 0)
        let w = weight(&mut g, "w", &[4]);
        let bc = g.add(Op::Binary(BinaryOp::Mul), &[w, one_b], None).unwrap(); // kept: broadcasts
        g.outputs = vec![s2, bc];
        let before = g.clone();
        let st = ConstantFold.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("mul-one"), 2);
        assert_eq!(st.get("div-one"), 1);
        assert_eq!(st.get("add-neg-zero"), 1);
        assert_eq!(st.get("sub-zero"), 1);
        assert_eq!(st.get("folded"), 0);
        assert_eq!(st.notes.len(), 1, "{:?}", st.notes);
        assert_eq!(g.inputs(d2), vec![one, x]);
        assert_eq!(g.inputs(a2), vec![d2, pz]);
        assert_eq!(g.inputs(s2), vec![a2, nz]);
        assert_eq!(g.outputs, vec![s2, bc]);
        assert_same_outputs(&before, &g, &[3, 2]);
    }

    #[test]
    fn add_positive_zero_would_change_negative_zero() {
        // The reason `add-zero` is not a rule: the identity fails for x = -0.0.
        assert_eq!((-0.0f32 + 0.0).to_bits(), 0.0f32.to_bits());
        assert_ne!((-0.0f32 + 0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!((-0.0f32 + -0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!((-0.0f32 - 0.0).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn reshape_and_transpose_chains() {
        let mut g = Graph::new("t");
        let w = weight(&mut g, "w", &[2, 3, 4]);
        let r0 = g.add(Op::Reshape, &[w], Some(TensorType::f32(vec![Dim::N(2), Dim::N(3), Dim::N(4)]))).unwrap(); // -> w
        let r1 = g.add(Op::Reshape, &[r0], Some(TensorType::f32(vec![Dim::N(6), Dim::N(4)]))).unwrap();
        let r2 = g.add(Op::Reshape, &[r1], Some(TensorType::f32(vec![Dim::N(24)]))).unwrap(); // -> reshape w
        let r3 = g.add(Op::Reshape, &[r2], Some(TensorType::f32(vec![Dim::N(2), Dim::N(3), Dim::N(4)]))).unwrap(); // -> w
        let t0 = g.add(Op::Transpose { perm: vec![0, 1, 2] }, &[r3], None).unwrap(); // -> w
        let t1 = g.add(Op::Transpose { perm: vec![1, 2, 0] }, &[t0], None).unwrap(); // [3,4,2]
        let t2 = g.add(Op::Transpose { perm: vec![2, 0, 1] }, &[t1], None).unwrap(); // composed: identity -> w
        let t3 = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[t1], None).unwrap(); // composed: [1,0,2]
        let e = g.add(Op::Unary(UnaryOp::Exp), &[t2], None).unwrap();
        g.outputs = vec![e, t3, r2];
        let before = g.clone();
        let st = ConstantFold.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("reshape-identity"), 1, "{:?}", st.counters);
        assert_eq!(st.get("reshape-reshape"), 2);
        assert_eq!(st.get("transpose-identity"), 1);
        assert_eq!(st.get("transpose-transpose"), 2);
        assert_eq!(g.inputs(e), vec![w]);
        assert_eq!(g.op(t3), &Op::Transpose { perm: vec![1, 0, 2] });
        assert_eq!(g.inputs(t3), vec![w]);
        assert_eq!(g.inputs(r2), vec![w]);
        assert_eq!(g.ty(t3).shape, vec![Dim::N(3), Dim::N(2), Dim::N(4)]);
        assert_same_outputs(&before, &g, &[1]);
    }

    #[test]
    fn folds_reshape_transpose_matmul_softmax_slice_of_consts() {
        let mut g = Graph::new("t");
        let (_, x) = embed(&mut g, 8, 4);
        let a = constant(&mut g, &[2, 3], vec![1.0, -2.0, 3.0, f32::INFINITY, 0.5, -0.0]);
        let t = g.add(Op::Transpose { perm: vec![1, 0] }, &[a], None).unwrap();
        let r = g.add(Op::Reshape, &[t], Some(TensorType::f32(vec![Dim::N(2), Dim::N(3)]))).unwrap();
        let m = g.add(Op::Matmul { transpose_b: true }, &[r, a], None).unwrap();
        let s = g.add(Op::Softmax, &[m], None).unwrap();
        let sl = g.add(Op::Slice { axis: 1, start: 1, end: 2 }, &[s], None).unwrap();
        let b = g.add(Op::Reshape, &[sl], Some(TensorType::f32(vec![Dim::N(1), Dim::N(2)]))).unwrap();
        let w = weight(&mut g, "w", &[4, 2]);
        let xw = g.add(Op::Matmul { transpose_b: false }, &[x, w], None).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Mul), &[xw, b], None).unwrap();
        g.outputs = vec![y];
        let before = g.clone();
        let st = ConstantFold.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("folded"), 6, "{}", ir::print(&g));
        assert!(matches!(g.op(g.inputs(y)[1]), Op::Const { .. }));
        assert_same_outputs(&before, &g, &[3, 2]);
    }

    #[test]
    fn never_folds_step_dependent_or_effectful_ops() {
        // `rope` on consts would need a static [S,H,D] shape, which its type rule forbids;
        // the guard is still checked directly.
        let mut g = Graph::new("t");
        let (_, x) = embed(&mut g, 8, 4);
        let r = g.add(Op::Reshape, &[x], Some(TensorType::f32(vec![Dim::S, Dim::N(2), Dim::N(2)]))).unwrap();
        let f = constant(&mut g, &[1], vec![0.25]);
        let rope = g.add(Op::Rope { rotary_dim: 2 }, &[r, f], None).unwrap();
        g.outputs = vec![rope];
        assert!(!foldable(&g, rope));
        let st = ConstantFold.run(&mut g).unwrap();
        assert!(!st.changed);
    }

    #[test]
    fn sound_on_random_graphs() {
        let mut total = PassStats::default();
        for seed in 0..300 {
            let before = random_graph(seed);
            let mut g = before.clone();
            let st = ConstantFold.run(&mut g).unwrap();
            for (k, v) in &st.counters {
                total.bump(k, *v);
            }
            ir::verify(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", ir::print(&g)));
            assert_same_outputs(&before, &g, &[3, 2]);
            let mut g2 = g.clone();
            Dce.run(&mut g2).unwrap();
            assert_same_outputs(&before, &g2, &[3, 2]);
        }
        // Every rewrite fires somewhere, so each is covered by this check.
        for name in ["folded"].iter().chain(RULES.iter().map(|(n, _)| n)) {
            assert!(total.get(name) > 0, "`{name}` never fired on random graphs: {:?}", total.counters);
        }
    }
}
