//! Elementwise kernels: unary ops over the flat tensor, binary ops with NumPy broadcasting.
//!
//! Binary broadcasting is planned at compile time: output dims of extent 1 are dropped, and
//! adjacent dims merge when each operand is either contiguous across both or broadcast across
//! both. What remains is a short list of dims; the innermost one is a vector loop in which each
//! operand is either contiguous or a splatted scalar, and the outer ones are walked by the
//! builder's odometer. Rows are cut into chunks so that one long row still splits across parts.
//! Both kernels read each element before writing the same index, so they are safe in place.

use cranelift_codegen::ir::types::F32;
use cranelift_codegen::ir::Value;
use llmc_ir::{BinaryOp, Dim, Graph, NodeId, UnaryOp};

use super::builder::{Kb, Mono};
use super::math;

/// Elements per work item for streaming kernels.
pub(crate) const CHUNK: i64 = 8192;

pub(crate) fn unary(kb: &mut Kb, g: &Graph, n: NodeId, op: UnaryOp) {
    let len = kb.dims(&g.ty(n).shape);
    let x = kb.buf(0);
    let o = kb.buf(1);
    let one = kb.ic(1);
    let unroll = if matches!(op, UnaryOp::Neg | UnaryOp::Sqrt | UnaryOp::Rsqrt) { 2 } else { 1 };
    kb.rows(&[], &[vec![], vec![]], len, &[one, one], Some(CHUNK), &mut |kb, offs, _, len| {
        let xp = kb.addr(x, offs[0]);
        let op_ = kb.addr(o, offs[1]);
        kb.vloop(len, unroll, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, xp, i);
            let r = math::unary(kb, ty, op, v);
            kb.st(r, op_, i);
        });
    });
}

fn apply(kb: &mut Kb, op: BinaryOp, a: Value, b: Value) -> Value {
    match op {
        BinaryOp::Add => kb.fadd(a, b),
        BinaryOp::Sub => kb.fsub(a, b),
        BinaryOp::Mul => kb.fmul(a, b),
        BinaryOp::Div => kb.fdiv(a, b),
    }
}

/// One dim of a collapsed broadcast plan: its extent and each operand's stride (`None`: broadcast).
#[derive(Clone, Debug)]
pub(crate) struct PlanDim {
    pub size: Mono,
    pub strides: Vec<Option<Mono>>,
}

/// Collapses `out` with operands `ins` (NumPy right-aligned broadcasting) into the fewest dims.
/// Always returns at least one dim.
pub(crate) fn broadcast_plan(out: &[Dim], ins: &[&[Dim]]) -> Vec<PlanDim> {
    let r = out.len();
    let mut dims: Vec<PlanDim> = Vec::new();
    for (i, &od) in out.iter().enumerate() {
        if od == Dim::N(1) {
            continue;
        }
        let strides = ins
            .iter()
            .map(|sh| {
                let off = r - sh.len();
                if i < off || sh[i - off] == Dim::N(1) {
                    None
                } else {
                    Some(Mono::prod(&sh[i - off + 1..]))
                }
            })
            .collect::<Vec<_>>();
        let d = PlanDim { size: Mono::of(od), strides };
        if let Some(last) = dims.last_mut() {
            let same = last.strides.iter().zip(&d.strides).all(|(a, b)| a.is_some() == b.is_some());
            if same {
                last.size = last.size.mul(&d.size);
                last.strides = d.strides;
                continue;
            }
        }
        dims.push(d);
    }
    if dims.is_empty() {
        dims.push(PlanDim { size: Mono::one(), strides: ins.iter().map(|_| Some(Mono::one())).collect() });
    }
    dims
}

pub(crate) fn binary(kb: &mut Kb, g: &Graph, n: NodeId, op: BinaryOp) {
    let ins = g.inputs(n);
    let out = g.ty(n).shape.clone();
    let (sa, sb) = (g.ty(ins[0]).shape.clone(), g.ty(ins[1]).shape.clone());
    let plan = broadcast_plan(&out, &[&sa, &sb]);
    let a = kb.buf(0);
    let b = kb.buf(1);
    let o = kb.buf(2);
    // Output strides (contiguous) of each plan dim.
    let nd = plan.len();
    let mut ostr = vec![Mono::one(); nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        ostr[d] = ostr[d + 1].mul(&plan[d + 1].size);
    }
    let zero = kb.ic(0);
    let one = kb.ic(1);
    let mut outer = Vec::new();
    let mut strides = vec![Vec::new(), Vec::new(), Vec::new()];
    for (d, pd) in plan[..nd - 1].iter().enumerate() {
        outer.push(kb.mono(&pd.size));
        for (st, ps) in strides.iter_mut().zip(&pd.strides) {
            let s = match ps {
                Some(m) => kb.mono(m),
                None => zero,
            };
            st.push(s);
        }
        let s = kb.mono(&ostr[d]);
        strides[2].push(s);
    }
    let last = &plan[nd - 1];
    let inner = kb.mono(&last.size);
    let (ca, cb) = (last.strides[0].is_some(), last.strides[1].is_some());
    let inner_strides = [if ca { one } else { zero }, if cb { one } else { zero }, one];
    kb.rows(&outer, &strides, inner, &inner_strides, Some(CHUNK), &mut |kb, offs, _, len| {
        let ap = kb.addr(a, offs[0]);
        let bp = kb.addr(b, offs[1]);
        let op_ = kb.addr(o, offs[2]);
        match (ca, cb) {
            (true, true) => kb.vloop(len, 2, &mut |kb, ty, i, _| {
                let x = kb.ld(ty, ap, i);
                let y = kb.ld(ty, bp, i);
                let r = apply(kb, op, x, y);
                kb.st(r, op_, i);
            }),
            (true, false) => {
                let ys = kb.ld_at(F32, bp, 0);
                kb.vloop(len, 2, &mut |kb, ty, i, _| {
                    let x = kb.ld(ty, ap, i);
                    let y = kb.splat(ty, ys);
                    let r = apply(kb, op, x, y);
                    kb.st(r, op_, i);
                })
            }
            (false, true) => {
                let xs = kb.ld_at(F32, ap, 0);
                kb.vloop(len, 2, &mut |kb, ty, i, _| {
                    let x = kb.splat(ty, xs);
                    let y = kb.ld(ty, bp, i);
                    let r = apply(kb, op, x, y);
                    kb.st(r, op_, i);
                })
            }
            (false, false) => {
                let xs = kb.ld_at(F32, ap, 0);
                let ys = kb.ld_at(F32, bp, 0);
                let rs = apply(kb, op, xs, ys);
                kb.vloop(len, 2, &mut |kb, ty, i, _| {
                    let r = kb.splat(ty, rs);
                    kb.st(r, op_, i);
                })
            }
        }
    });
}
