//! `rms_norm` and `layer_norm` over the last axis. Work splits over rows; a row (`H` floats, a few
//! KiB) stays in L1 across the passes: statistics with two `f32x4` accumulators plus a scalar tail
//! (sum of squares for RMSNorm; for LayerNorm the mean, shifted by the row's first element, then
//! the sum of squared deviations from it, which avoids the cancellation of `E[x^2] - E[x]^2` when
//! the mean is large against the spread), then one pass that writes. The arithmetic follows the reference's rounding order: `(x * r) * w` and
//! `((x - mean) * r) * w + b`, with `r = 1 / sqrt(stat / H + eps)`.

use cranelift_codegen::ir::types::F32;
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use llmc_ir::{Graph, NodeId};

use super::builder::Kb;

/// `sum_i f(i)` over `0..len` (`f` gets the lane type and the index).
pub(crate) fn row_sum(kb: &mut Kb, len: Value, f: &mut dyn FnMut(&mut Kb, Type, Value) -> Value) -> Value {
    kb.vsum(len, &mut |kb, ty, i, s| {
        let x = f(kb, ty, i);
        kb.fadd(s, x)
    })
}

/// `1 / sqrt(stat / h + eps)`.
fn inv_root(kb: &mut Kb, stat: Value, h: Value, eps: f32) -> Value {
    let hf = kb.int_to_f32(h);
    let mean = kb.fdiv(stat, hf);
    let e = kb.fc(F32, eps);
    let v = kb.fadd(mean, e);
    let s = kb.b.ins().sqrt(v);
    let one = kb.fc(F32, 1.0);
    kb.fdiv(one, s)
}

/// `(rows, H)` of the normalized operand, and the buffers `x, params.., out`.
fn setup(kb: &mut Kb, g: &Graph, n: NodeId) -> (Value, Value) {
    let x = g.ty(g.inputs(n)[0]);
    let r = x.rank();
    let rows = kb.dims(&x.shape[..r - 1]);
    let h = kb.dim(x.shape[r - 1]);
    (rows, h)
}

pub(crate) fn rms_norm(kb: &mut Kb, g: &Graph, n: NodeId, eps: f32) {
    let (rows, h) = setup(kb, g, n);
    let x = kb.buf(0);
    let w = kb.buf(1);
    let o = kb.buf(2);
    let one = kb.ic(1);
    kb.rows(&[rows], &[vec![h], vec![h]], one, &[one, one], None, &mut |kb, offs, _, _| {
        let xp = kb.addr(x, offs[0]);
        let op = kb.addr(o, offs[1]);
        let ss = row_sum(kb, h, &mut |kb, ty, i| {
            let v = kb.ld(ty, xp, i);
            kb.fmul(v, v)
        });
        let r = inv_root(kb, ss, h, eps);
        kb.vloop(h, 2, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, xp, i);
            let rv = kb.splat(ty, r);
            let y = kb.fmul(v, rv);
            let wv = kb.ld_ro(ty, w, i);
            let y = kb.fmul(y, wv);
            kb.st(y, op, i);
        });
    });
}

pub(crate) fn layer_norm(kb: &mut Kb, g: &Graph, n: NodeId, eps: f32) {
    let (rows, h) = setup(kb, g, n);
    let x = kb.buf(0);
    let w = kb.buf(1);
    let bias = kb.buf(2);
    let o = kb.buf(3);
    let one = kb.ic(1);
    kb.rows(&[rows], &[vec![h], vec![h]], one, &[one, one], None, &mut |kb, offs, _, _| {
        let xp = kb.addr(x, offs[0]);
        let op = kb.addr(o, offs[1]);
        // mean = x0 + sum(x - x0) / H: the shifted terms are small (exact where x is near x0), so
        // an offset row's mean is accurate to its spread, not to its magnitude.
        let x0 = kb.ld_at(F32, xp, 0);
        let sum = row_sum(kb, h, &mut |kb, ty, i| {
            let v = kb.ld(ty, xp, i);
            let s = kb.splat(ty, x0);
            kb.fsub(v, s)
        });
        let hf = kb.int_to_f32(h);
        let mean = kb.fdiv(sum, hf);
        let mean = kb.fadd(mean, x0);
        let sq = row_sum(kb, h, &mut |kb, ty, i| {
            let v = kb.ld(ty, xp, i);
            let mv = kb.splat(ty, mean);
            let d = kb.fsub(v, mv);
            kb.fmul(d, d)
        });
        let r = inv_root(kb, sq, h, eps);
        kb.vloop(h, 2, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, xp, i);
            let mv = kb.splat(ty, mean);
            let d = kb.fsub(v, mv);
            let rv = kb.splat(ty, r);
            let y = kb.fmul(d, rv);
            let wv = kb.ld_ro(ty, w, i);
            let y = kb.fmul(y, wv);
            let bv = kb.ld_ro(ty, bias, i);
            let y = kb.fadd(y, bv);
            kb.st(y, op, i);
        });
    });
}
