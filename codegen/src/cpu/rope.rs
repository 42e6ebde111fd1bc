//! Position-dependent kernels: rotary embedding and the causal mask.
//!
//! RoPE reads `cos`/`sin` from two tables of `[C, R/2]` computed here at compile time from the
//! rope's `inv_freq` constant (`θ = (q as f32) * inv_freq[i]`, the f32 product, then cos/sin in
//! f64 rounded to f32), so the kernel is two loads, two multiplies and two FMAs per pair. Both
//! kernels work one `[.., D]` or `[.., T]` row at a time and are safe in place.

use cranelift_codegen::ir::{InstBuilder, Value};
use llmc_ir::{Dim, Graph, NodeId, Op};

use super::builder::{Kb, Mono};
use crate::error::{CodegenError, Result};

/// The `cos` and `sin` tables (`[max_context, rotary_dim/2]` each, row-major) for `inv_freq`.
pub(crate) fn rope_tables(inv_freq: &[f32], max_context: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(max_context * half);
    let mut sin = Vec::with_capacity(max_context * half);
    for q in 0..max_context {
        for &f in inv_freq {
            let theta = (q as f32) * f;
            let (s, c) = (theta as f64).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    (cos, sin)
}

/// Emits the rope kernel and returns its tables.
pub(crate) fn rope(kb: &mut Kb, g: &Graph, n: NodeId, rotary_dim: usize, max_context: usize) -> Result<Vec<Vec<f32>>> {
    let ins = g.inputs(n);
    let inv_freq = match g.op(ins[1]) {
        Op::Const { values } => values.clone(),
        other => {
            return Err(CodegenError::Unsupported {
                node: format!("rope {}", n.index()),
                msg: format!("inv_freq (operand 1) must be a const, got `{}`", other.name()),
            })
        }
    };
    let half = rotary_dim / 2;
    if inv_freq.len() != half {
        return Err(CodegenError::Unsupported {
            node: format!("rope {}", n.index()),
            msg: format!("inv_freq has {} values, rotary_dim {rotary_dim} needs {half}", inv_freq.len()),
        });
    }
    if max_context == 0 {
        return Err(CodegenError::Unsupported {
            node: format!("rope {}", n.index()),
            msg: "max_context is 0: no positions to build the cos/sin tables for".into(),
        });
    }
    let (cos, sin) = rope_tables(&inv_freq, max_context);
    let x = g.ty(ins[0]).shape.clone();
    let (h, d) = (x[1], x[2]);
    let dn = d.as_const().unwrap_or(rotary_dim);
    let xp = kb.buf(0);
    let op = kb.buf(2);
    let cosp = kb.buf(3);
    let sinp = kb.buf(4);
    let s = kb.s;
    let hv = kb.dim(h);
    let hd = kb.mono(&Mono::prod(&[h, d]));
    let dv = kb.dim(d);
    let halfv = kb.ic(half as i64);
    let passv = kb.ic((dn - rotary_dim) as i64);
    let last = kb.ic(max_context.max(1) as i64 - 1);
    kb.rows(&[s, hv], &[vec![hd, dv], vec![hd, dv]], dv, &[dv, dv], None, &mut |kb, offs, idx, _| {
        // Positions past the table (the runtime never passes any) are clamped to stay in bounds.
        let pos = kb.add(kb.p, idx[0]);
        let pos = kb.min(pos, last);
        let to = kb.mul(pos, halfv);
        let cp = kb.addr(cosp, to);
        let sp = kb.addr(sinp, to);
        let x1p = kb.addr(xp, offs[0]);
        let x2p = kb.addr(x1p, halfv);
        let o1p = kb.addr(op, offs[1]);
        let o2p = kb.addr(o1p, halfv);
        kb.vloop(halfv, 1, &mut |kb, ty, i, _| {
            let x1 = kb.ld(ty, x1p, i);
            let x2 = kb.ld(ty, x2p, i);
            let c = kb.ld(ty, cp, i);
            let s = kb.ld(ty, sp, i);
            let t1 = kb.fmul(x2, s);
            let t1 = kb.b.ins().fneg(t1);
            let o1 = kb.fma(x1, c, t1);
            let t2 = kb.fmul(x1, s);
            let o2 = kb.fma(x2, c, t2);
            kb.st(o1, o1p, i);
            kb.st(o2, o2p, i);
        });
        if dn > rotary_dim {
            let r = kb.ic(rotary_dim as i64);
            let xr = kb.addr(x1p, r);
            let or = kb.addr(o1p, r);
            kb.vloop(passv, 1, &mut |kb, ty, i, _| {
                let v = kb.ld(ty, xr, i);
                kb.st(v, or, i);
            });
        }
    });
    Ok(vec![cos, sin])
}

/// Stores `v` (f32) to `dp[0..len]`.
fn fill(kb: &mut Kb, dp: Value, len: Value, v: f32) {
    kb.vloop(len, 2, &mut |kb, ty, i, _| {
        let c = kb.fc(ty, v);
        kb.st(c, dp, i);
    });
}

pub(crate) fn causal_mask(kb: &mut Kb, g: &Graph, n: NodeId, window: Option<usize>) {
    let x = g.ty(g.inputs(n)[0]).shape.clone();
    let r = x.len();
    let batch = kb.dims(&x[..r - 2]);
    let s = kb.s;
    let t = kb.dim(Dim::T);
    let st = kb.mul(s, t);
    let xp = kb.buf(0);
    let op = kb.buf(1);
    kb.rows(&[batch, s], &[vec![st, t], vec![st, t]], t, &[t, t], None, &mut |kb, offs, idx, _| {
        let q = kb.add(kb.p, idx[1]);
        let hi = kb.addi(q, 1);
        let hi = kb.min(hi, t);
        let lo = match window {
            Some(w) => {
                let l = kb.addi(q, 1 - w as i64);
                let z = kb.ic(0);
                let l = kb.max(l, z);
                kb.min(l, hi)
            }
            None => kb.ic(0),
        };
        let sp = kb.addr(xp, offs[0]);
        let dp = kb.addr(op, offs[1]);
        fill(kb, dp, lo, f32::NEG_INFINITY);
        let vis = kb.sub(hi, lo);
        let spl = kb.addr(sp, lo);
        let dpl = kb.addr(dp, lo);
        kb.vloop(vis, 2, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, spl, i);
            kb.st(v, dpl, i);
        });
        let rest = kb.sub(t, hi);
        let dph = kb.addr(dp, hi);
        fill(kb, dph, rest, f32::NEG_INFINITY);
    });
}
