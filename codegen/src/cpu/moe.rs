//! `moe`: a sparse mixture-of-experts layer, `(x [.., H], router [E, H], gate_up [E, 2I, H],
//! down [E, H, I]) -> [.., H]`, computing only the experts each token chose.
//!
//! A work item is one token row. Per row:
//! 1. the `E` router logits `router[e] . x`, into a stack buffer;
//! 2. top-k by repeated argmax over the logits (a strict `>` scan in index order, so equal logits
//!    choose the lower expert first, as the reference does), each chosen logit replaced by `-inf`;
//! 3. the weights, a softmax over the chosen logits (the first chosen is the largest);
//! 4. the output row zeroed, then per chosen expert `e` with weight `w`, in blocks of [`IB`]
//!    intermediate rows: `h[r] = act(gate_up[e][r] . x) * (gate_up[e][I + r] . x)` into a stack
//!    block (the two dot products share the loads of `x`), then `out[c] += w * (down[e][c, block] .
//!    h)` for every output channel `c` (a contiguous slice of `down`'s row `c`).
//!
//! The stack holds `E + 3 top_k + IB` floats, independent of `H` and (beyond `IB`) of `I`.
//! Tokens are not grouped by expert: during a prefill each token streams its chosen experts'
//! weights again (the weights, not the activations, dominate the traffic).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value};
use llmc_ir::{Graph, NodeId, UnaryOp};

use super::builder::{Kb, V4};
use super::math;
use super::unsupported;
use crate::error::Result;

/// Intermediate rows per block of `h`.
const IB: usize = 256;

fn stack(kb: &mut Kb, bytes: usize) -> Value {
    let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes.max(16) as u32, 6));
    kb.b.ins().stack_addr(I64, slot, 0)
}

/// `(a . x, b . x)` over `0..len`, sharing the loads of `x`; `a`, `b` read-only.
fn dot2(kb: &mut Kb, a: Value, b: Value, x: Value, len: Value) -> (Value, Value) {
    let zv = kb.fc(V4, 0.0);
    let zs = kb.fc(F32, 0.0);
    let (va, vb) = (kb.var(V4, zv), kb.var(V4, zv));
    let (sa, sb) = (kb.var(F32, zs), kb.var(F32, zs));
    kb.vloop(len, 1, &mut |kb, ty, i, _| {
        let (ta, tb) = if ty == V4 { (va, vb) } else { (sa, sb) };
        let xv = kb.ld(ty, x, i);
        let av = kb.ld_ro(ty, a, i);
        let bv = kb.ld_ro(ty, b, i);
        let s = kb.get(ta);
        let s = kb.fma(av, xv, s);
        kb.set(ta, s);
        let s = kb.get(tb);
        let s = kb.fma(bv, xv, s);
        kb.set(tb, s);
    });
    let total = |kb: &mut Kb, v, s| {
        let t = kb.get(v);
        let t = kb.hsum(t);
        let s = kb.get(s);
        kb.fadd(t, s)
    };
    (total(kb, va, sa), total(kb, vb, sb))
}

pub(crate) fn moe(kb: &mut Kb, g: &Graph, n: NodeId, top_k: usize, act: UnaryOp) -> Result<()> {
    let ins = g.inputs(n);
    let (xt, rt, dt) = (g.ty(ins[0]), g.ty(ins[1]), g.ty(ins[3]));
    let (Some(e), Some(h), Some(im)) = (rt.shape[0].as_const(), rt.shape[1].as_const(), dt.shape[2].as_const()) else {
        return Err(unsupported(g, n, "expert count and sizes must be constants"));
    };
    if top_k == 0 || top_k > e || h == 0 || im == 0 {
        return Err(unsupported(g, n, format!("unsupported expert layout E={e} top_k={top_k} H={h} I={im}")));
    }
    let rows = kb.dims(&xt.shape[..xt.rank() - 1]);
    let (x, r, gu, dn, o) = (kb.buf(0), kb.buf(1), kb.buf(2), kb.buf(3), kb.buf(4));
    let ib = IB.min(im);
    let logits = stack(kb, e * 4);
    let chosen_l = stack(kb, top_k * 4);
    let chosen_e = stack(kb, top_k * 8);
    let hblk = stack(kb, ib * 4);
    let flags = MemFlagsData::trusted();
    let one = kb.ic(1);
    let hv = kb.ic(h as i64);
    kb.rows(&[rows], &[vec![hv], vec![hv]], one, &[one, one], None, &mut |kb, offs, _, _| {
        let xp = kb.addr(x, offs[0]);
        let op = kb.addr(o, offs[1]);
        let z = kb.ic(0);
        let ev = kb.ic(e as i64);
        // 1. Router logits.
        kb.for_steps(z, ev, 1, &mut |kb, j| {
            let ro = kb.muli(j, h as i64);
            let rp = kb.addr(r, ro);
            let l = kb.dot(rp, xp, hv);
            kb.st(l, logits, j);
        });
        // 2. Top-k by repeated argmax.
        let ninf = kb.fc(F32, f32::NEG_INFINITY);
        for t in 0..top_k {
            let best = kb.var(F32, ninf);
            let bi = kb.var(I64, z);
            kb.for_steps(z, ev, 1, &mut |kb, j| {
                let l = kb.ld(F32, logits, j);
                let b = kb.get(best);
                let gt = kb.b.ins().fcmp(FloatCC::GreaterThan, l, b);
                let nb = kb.b.ins().select(gt, l, b);
                let cur = kb.get(bi);
                let ni = kb.b.ins().select(gt, j, cur);
                kb.set(best, nb);
                kb.set(bi, ni);
            });
            let bl = kb.get(best);
            let bidx = kb.get(bi);
            kb.st_at(bl, chosen_l, (4 * t) as i32);
            kb.b.ins().store(flags, bidx, chosen_e, (8 * t) as i32);
            kb.st(ninf, logits, bidx);
        }
        // 3. Weights: softmax over the chosen logits (the first is the largest).
        let m = kb.ld_at(F32, chosen_l, 0);
        let mut sum = kb.fc(F32, 0.0);
        let mut ex = Vec::with_capacity(top_k);
        for t in 0..top_k {
            let l = kb.ld_at(F32, chosen_l, (4 * t) as i32);
            let d = kb.fsub(l, m);
            let v = math::exp(kb, F32, d);
            sum = kb.fadd(sum, v);
            ex.push(v);
        }
        for (t, v) in ex.into_iter().enumerate() {
            let w = kb.fdiv(v, sum);
            kb.st_at(w, chosen_l, (4 * t) as i32);
        }
        // 4. The chosen experts, accumulated into the zeroed output row.
        kb.vloop(hv, 1, &mut |kb, ty, i, _| {
            let zf = kb.fc(ty, 0.0);
            kb.st(zf, op, i);
        });
        let kv = kb.ic(top_k as i64);
        let nblk = kb.ic(im.div_ceil(ib) as i64);
        kb.for_steps(z, kv, 1, &mut |kb, t| {
            let t8 = kb.b.ins().ishl_imm_s(t, 3);
            let ea = kb.add(chosen_e, t8);
            let eidx = kb.b.ins().load(I64, flags, ea, 0);
            let w = kb.ld(F32, chosen_l, t);
            let go = kb.muli(eidx, (2 * im * h) as i64);
            let gbase = kb.addr(gu, go);
            let dno = kb.muli(eidx, (h * im) as i64);
            let dbase = kb.addr(dn, dno);
            kb.for_steps(z, nblk, 1, &mut |kb, bi| {
                let r0 = kb.muli(bi, ib as i64);
                let imv = kb.ic(im as i64);
                let left = kb.sub(imv, r0);
                let ibv = kb.ic(ib as i64);
                let len = kb.min(left, ibv);
                kb.for_steps(z, len, 1, &mut |kb, rr| {
                    let row = kb.add(r0, rr);
                    let go = kb.muli(row, h as i64);
                    let gp = kb.addr(gbase, go);
                    let uo = kb.addi(go, (im * h) as i64);
                    let up = kb.addr(gbase, uo);
                    let (gd, ud) = dot2(kb, gp, up, xp, hv);
                    let a = math::unary(kb, F32, act, gd);
                    let hval = kb.fmul(a, ud);
                    kb.st(hval, hblk, rr);
                });
                kb.for_steps(z, hv, 1, &mut |kb, c| {
                    let co = kb.muli(c, im as i64);
                    let co = kb.add(co, r0);
                    let dp = kb.addr(dbase, co);
                    let d = kb.dot(dp, hblk, len);
                    let cur = kb.ld(F32, op, c);
                    let nv = kb.fma(w, d, cur);
                    kb.st(nv, op, c);
                });
            });
        });
    });
    Ok(())
}
