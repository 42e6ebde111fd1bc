//! Last-axis reductions (sum, mean, max) and softmax. Work splits over rows; each row is a
//! vector loop with two `f32x4` accumulators plus a scalar tail, then a horizontal combine.
//! Softmax is three passes over the row: max, `e = exp(x - max)` stored and summed, scale by
//! `1 / sum`. A row of all `-inf` gives NaN, as the reference does.

use cranelift_codegen::ir::types::F32;
use cranelift_codegen::ir::{Type, Value};
use cranelift_frontend::Variable;
use llmc_ir::{Graph, NodeId, ReduceOp};

use super::builder::{Kb, V4};
use super::math;

/// Vector accumulators `acc[0..2]` (f32x4) and a scalar one, all starting at `init`.
struct Accs {
    v: [Variable; 2],
    s: Variable,
}

impl Accs {
    fn new(kb: &mut Kb, init: f32) -> Accs {
        let vi = kb.fc(V4, init);
        let si = kb.fc(F32, init);
        Accs { v: [kb.var(V4, vi), kb.var(V4, vi)], s: kb.var(F32, si) }
    }
    fn slot(&self, ty: Type, u: usize) -> Variable {
        if ty == V4 {
            self.v[u]
        } else {
            self.s
        }
    }
}

/// Max of row `x[0..len]`.
fn row_max(kb: &mut Kb, xp: Value, len: Value) -> Value {
    let acc = Accs::new(kb, f32::NEG_INFINITY);
    kb.vloop(len, 2, &mut |kb, ty, i, u| {
        let v = acc.slot(ty, u);
        let x = kb.ld(ty, xp, i);
        let m = kb.get(v);
        let m = kb.fmax(ty, x, m);
        kb.set(v, m);
    });
    let a = kb.get(acc.v[0]);
    let b = kb.get(acc.v[1]);
    let m = kb.fmax(V4, a, b);
    let m = kb.hmax(m);
    let s = kb.get(acc.s);
    kb.fmax(F32, s, m)
}

/// Sum of `f(x[i])` over the row, where `f` may also store.
fn row_sum(kb: &mut Kb, len: Value, f: &mut dyn FnMut(&mut Kb, Type, Value) -> Value) -> Value {
    let acc = Accs::new(kb, 0.0);
    kb.vloop(len, 2, &mut |kb, ty, i, u| {
        let v = acc.slot(ty, u);
        let x = f(kb, ty, i);
        let s = kb.get(v);
        let s = kb.fadd(s, x);
        kb.set(v, s);
    });
    let a = kb.get(acc.v[0]);
    let b = kb.get(acc.v[1]);
    let t = kb.fadd(a, b);
    let t = kb.hsum(t);
    let s = kb.get(acc.s);
    kb.fadd(t, s)
}

/// Rows of the last axis: `(row count, row length)`.
fn row_dims(kb: &mut Kb, g: &Graph, n: NodeId) -> (Value, Value) {
    let x = g.ty(g.inputs(n)[0]);
    let r = x.rank();
    let rows = kb.dims(&x.shape[..r - 1]);
    let len = kb.dim(x.shape[r - 1]);
    (rows, len)
}

pub(crate) fn reduce(kb: &mut Kb, g: &Graph, n: NodeId, op: ReduceOp) {
    let (rows, len) = row_dims(kb, g, n);
    let x = kb.buf(0);
    let o = kb.buf(1);
    let one = kb.ic(1);
    kb.rows(&[rows], &[vec![len], vec![one]], one, &[one, one], None, &mut |kb, offs, _, _| {
        let xp = kb.addr(x, offs[0]);
        let r = match op {
            ReduceOp::Max => row_max(kb, xp, len),
            ReduceOp::Sum | ReduceOp::Mean => {
                let s = row_sum(kb, len, &mut |kb, ty, i| kb.ld(ty, xp, i));
                if op == ReduceOp::Mean {
                    let nf = kb.int_to_f32(len);
                    kb.fdiv(s, nf)
                } else {
                    s
                }
            }
        };
        let op_ = kb.addr(o, offs[1]);
        kb.st_at(r, op_, 0);
    });
}

pub(crate) fn softmax(kb: &mut Kb, g: &Graph, n: NodeId) {
    let (rows, len) = row_dims(kb, g, n);
    let x = kb.buf(0);
    let o = kb.buf(1);
    let one = kb.ic(1);
    kb.rows(&[rows], &[vec![len], vec![len]], one, &[one, one], None, &mut |kb, offs, _, _| {
        let xp = kb.addr(x, offs[0]);
        let op_ = kb.addr(o, offs[1]);
        let m = row_max(kb, xp, len);
        let s = row_sum(kb, len, &mut |kb, ty, i| {
            let v = kb.ld(ty, xp, i);
            let mv = kb.splat(ty, m);
            let d = kb.fsub(v, mv);
            let e = math::exp(kb, ty, d);
            kb.st(e, op_, i);
            e
        });
        let one = kb.fc(F32, 1.0);
        let inv = kb.fdiv(one, s);
        kb.vloop(len, 2, &mut |kb, ty, i, _| {
            let e = kb.ld(ty, op_, i);
            let iv = kb.splat(ty, inv);
            let r = kb.fmul(e, iv);
            kb.st(r, op_, i);
        });
    });
}
