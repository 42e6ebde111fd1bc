//! Packed quantized weights: which weights are stored packed, and the kernels for
//! `matmul {transpose_b}`, `linear {transpose_b}` and `gated_linear` whose right-hand side is a
//! packed `[N, K]` weight.
//!
//! The byte format (one self-contained record per row: scales, zero points, codes) is
//! `llmc_abi::qformat` ([`QFormat`]); [`crate::packed`] maps IR layouts to it and packs weights.
//! Every value decodes as `(q - zero) as f32 * scale` in f32, exactly as `ir::quant` (the
//! interpreter) computes it.
//!
//! Kernel: parts split the `N` output columns; per column the packed row (rows `j` and `N + j`
//! when gated) is dequantized in registers (i8 -> i16 -> i32 -> f32 widening; nibble masks and
//! shifts for int4; the scale of each 16-element chunk) into an f32 row on the stack, then dotted
//! with every row of `a` (f32x4 FMAs), the epilogue (bias, activation, residual, gate) applied to
//! each sum before its store. Decode (`M = 1`) is a GEMV that reads 1 (int8) or ~0.5 (int4)
//! bytes per weight instead of 4. Int4 layouts with a group that is not a multiple of 16 are not
//! packed (stored as dequantized f32 and run by the f32 kernels). Where the runtime has them, the
//! products go through its quantized microkernels (`abi::ukernel` slots `QGEMV`, `QGEMV_A8`,
//! `QGEMM`, and `QGEMM_A8` for a block of W8A8 / W4A8 rows).

use abi::panel::PANEL;
use abi::ukernel::{self, QGEMM_A8_SIG, QGEMM_SIG, QGEMV_SIG};
use abi::QFormat;
use cranelift_codegen::ir::types::{F32, I8, I8X16, I16X8, I32, I32X4, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Type, Value};
use llmc_ir::{Graph, Layout, NodeId, Op, UnaryOp};

use super::builder::{Kb, V4};
use super::math;
use crate::packed::packable;

/// The row format of `layout`; callers here pass only [`packable`] layouts (for any other the
/// sizes are int8's, and nothing is read).
fn qformat(layout: Layout) -> QFormat {
    crate::packed::qformat(layout).unwrap_or(QFormat::Int8)
}

fn groups(layout: Layout, k: usize) -> usize {
    qformat(layout).groups(k)
}

fn sparse_idx_at(int8: bool, k: usize) -> usize {
    QFormat::sparse_idx_at(int8, k)
}

/// Byte offset of the codes in a row record.
fn codes_at(layout: Layout, k: usize) -> usize {
    qformat(layout).codes_at(k)
}

/// Bytes of one packed row of `k` elements.
fn row_bytes(layout: Layout, k: usize) -> usize {
    qformat(layout).row_bytes(k)
}

/// Activation rows from which a weight-only product takes the runtime's tiled product
/// (`ukernel::QGEMM`) instead of a GEMV per row.
const QGEMM_MIN_ROWS: i64 = 4;

/// `x` appears among `u`'s operands only as the right-hand side of a row-wise product.
fn rhs_use(g: &Graph, u: NodeId, x: NodeId) -> bool {
    let ok = matches!(
        g.op(u),
        Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } | Op::GatedLinear { .. }
    );
    ok && g.ty(x).rank() == 2 && g.inputs(u).iter().enumerate().all(|(s, &i)| i != x || s == 1)
}

/// The layout of a packed `concat {axis = 0}` of weights: all parts share one packable layout
/// and every use is a row-wise product's right-hand side.
fn concat_layout(g: &Graph, c: NodeId) -> Option<Layout> {
    let Op::Concat { axis: 0, .. } = g.op(c) else {
        return None;
    };
    let mut layout = None;
    for i in g.inputs(c) {
        let Op::Weight { layout: l, .. } = g.op(i) else {
            return None;
        };
        if !packable(*l) || layout.is_some_and(|x| x != *l) {
            return None;
        }
        layout = Some(*l);
    }
    (!g.outputs.contains(&c) && g.users(c).iter().all(|&u| rhs_use(g, u, c))).then_some(layout?)
}

/// `x` appears among `u`'s operands only as a gather's table.
fn table_use(g: &Graph, u: NodeId, x: NodeId) -> bool {
    matches!(g.op(u), Op::Gather) && g.inputs(u).iter().enumerate().all(|(s, &i)| i != x || s == 0)
}

/// How the data node `x` (a weight or a concat of weights) is stored: `Some(layout)` when packed,
/// `None` when as f32 (dequantized for a non-packable or mixed use). A packed weight may also be
/// a gather's table (a tied embedding and LM head): [`gather_packed`] dequantizes its rows.
pub fn packed_layout(g: &Graph, x: NodeId) -> Option<Layout> {
    match g.op(x) {
        Op::Weight { layout, .. } if packable(*layout) && g.ty(x).rank() == 2 => {
            let ok = !g.outputs.contains(&x)
                && g.users(x).iter().all(|&u| {
                    rhs_use(g, u, x)
                        || table_use(g, u, x)
                        || (matches!(g.op(u), Op::Concat { .. }) && concat_layout(g, u).is_some())
                });
            ok.then_some(*layout)
        }
        Op::Concat { .. } => concat_layout(g, x),
        _ => None,
    }
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// What is applied to each finished sum.
pub(crate) enum Epi {
    Plain,
    /// `act(x + bias[j]) + res[r, j]`: `bias` the `f32[N]` base, `res` the residual base.
    Linear {
        bias: Option<Value>,
        act: Option<UnaryOp>,
        res: Option<Value>,
    },
    /// `act(x_j) * x_{N + j}`.
    Gated {
        act: UnaryOp,
    },
}

/// Visits every kept value of a packed 2:4 row of `k` elements: `f(kb, v, e, slot)` with `v` the
/// value as f32 (the int8 code, unscaled), `e` its element index (i64) and `slot` in `0..4` (its
/// position among the four kept values of a pair of groups, for independent accumulators).
fn sparse_each(kb: &mut Kb, int8: bool, k: usize, prow: Value, f: &mut dyn FnMut(&mut Kb, Value, Value, usize)) {
    let codes = kb.addi(prow, 4 * int8 as i64);
    let idxp = kb.addi(codes, sparse_idx_at(int8, k) as i64);
    let ng = k / 4;
    let mut pair = |kb: &mut Kb, bi: Value, groups: usize| {
        let pb = kb.add(idxp, bi);
        let byte = kb.b.ins().uload8(I64, flags(), pb, 0);
        for h in 0..groups {
            let nib = if h == 0 { byte } else { kb.b.ins().ushr_imm_s(byte, 4) };
            let a = kb.b.ins().band_imm_s(nib, 3);
            let b = kb.b.ins().ushr_imm_s(nib, 2);
            let b = kb.b.ins().band_imm_s(b, 3);
            let e0 = kb.muli(bi, 8);
            let e0 = kb.addi(e0, 4 * h as i64);
            let t0 = kb.muli(bi, 4);
            for (s, l) in [(0usize, a), (1, b)] {
                let t = kb.addi(t0, (2 * h + s) as i64);
                let v = if int8 {
                    let pc = kb.add(codes, t);
                    let q = kb.b.ins().sload8(I32, flags(), pc, 0);
                    kb.b.ins().fcvt_from_sint(F32, q)
                } else {
                    kb.ld_ro(F32, codes, t)
                };
                let e = kb.add(e0, l);
                f(kb, v, e, 2 * h + s);
            }
        }
    };
    let z = kb.ic(0);
    let np = kb.ic((ng / 2) as i64);
    kb.for_steps(z, np, 1, &mut |kb, bi| pair(kb, bi, 2));
    if ng % 2 == 1 {
        let bi = kb.ic((ng / 2) as i64);
        pair(kb, bi, 1);
    }
}

/// The 16 int8 codes at `pc` as four `f32x4` (elements 0..4, 4..8, 8..12, 12..16), unscaled.
fn int8x16_to_f32(kb: &mut Kb, pc: Value) -> [Value; 4] {
    let v = kb.b.ins().load(I8X16, flags(), pc, 0);
    let (lo, hi) = (kb.b.ins().swiden_low(v), kb.b.ins().swiden_high(v));
    [kb.b.ins().swiden_low(lo), kb.b.ins().swiden_high(lo), kb.b.ins().swiden_low(hi), kb.b.ins().swiden_high(hi)]
        .map(|w| kb.b.ins().fcvt_from_sint(V4, w))
}

/// Dequantizes packed row `prow` (`k` elements) into the f32 buffer `dst`.
///
/// W8A8 and W4A8 rows decode as their weight formats (int8, symmetric int4): the codes start at
/// `codes_at(layout)`, the scales where int8's and int4's do. `dst` must hold `k` rounded up to
/// 32 floats for int4 layouts (whole blocks are written).
fn dequant_row(kb: &mut Kb, layout: Layout, k: usize, prow: Value, dst: Value) {
    let codes = kb.addi(prow, codes_at(layout, k) as i64);
    match layout.weight_format() {
        Layout::Int8 => {
            let s = kb.b.ins().load(F32, flags(), prow, 0);
            let sv = kb.splat(V4, s);
            let z = kb.ic(0);
            let kv = kb.ic(k as i64);
            let e = kb.for_steps(z, kv, 16, &mut |kb, c| {
                let pc = kb.add(codes, c);
                for (i, f) in int8x16_to_f32(kb, pc).into_iter().enumerate() {
                    let f = kb.fmul(f, sv);
                    let idx = kb.addi(c, 4 * i as i64);
                    kb.st(f, dst, idx);
                }
            });
            kb.for_steps(e, kv, 1, &mut |kb, c| {
                let pc = kb.add(codes, c);
                let q = kb.b.ins().sload8(I32, flags(), pc, 0);
                let f = kb.b.ins().fcvt_from_sint(F32, q);
                let f = kb.fmul(f, s);
                kb.st(f, dst, c);
            });
        }
        Layout::Int4 { group, asym } => {
            let g = groups(layout, k);
            let mask = kb.b.ins().iconst(I8, 0x0f);
            let mask = kb.b.ins().splat(I8X16, mask);
            // One 32-element block at element `e0` (a value); `halves` of its two 16-element halves.
            let block = |kb: &mut Kb, blk: Value, halves: usize| {
                let pc = kb.muli(blk, 16);
                let pc = kb.add(codes, pc);
                let v = kb.b.ins().load(I8X16, flags(), pc, 0);
                let lo = kb.b.ins().band(v, mask);
                let hi = kb.b.ins().ushr_imm_s(v, 4);
                let hi = kb.b.ins().band(hi, mask);
                let e0 = kb.muli(blk, 32);
                for (h, &nib) in [lo, hi][..halves].iter().enumerate() {
                    let eh = kb.addi(e0, 16 * h as i64);
                    let gi = kb.b.ins().udiv_imm_s(eh, group as i64);
                    let s = kb.ld_f16(prow, gi);
                    let z = if asym {
                        let gz = kb.addi(gi, g as i64);
                        kb.ld_f16(prow, gz)
                    } else {
                        kb.b.ins().f32const(8.0)
                    };
                    let sv = kb.splat(V4, s);
                    let zv = kb.splat(V4, z);
                    let w16 = [kb.b.ins().uwiden_low(nib), kb.b.ins().uwiden_high(nib)];
                    for (wi, &w) in w16.iter().enumerate() {
                        debug_assert_eq!(kb.b.func.dfg.value_type(w), I16X8);
                        let w32 = [kb.b.ins().uwiden_low(w), kb.b.ins().uwiden_high(w)];
                        for (qi, &q) in w32.iter().enumerate() {
                            debug_assert_eq!(kb.b.func.dfg.value_type(q), I32X4);
                            let f = kb.b.ins().fcvt_from_sint(V4, q);
                            let f = kb.fsub(f, zv);
                            let f = kb.fmul(f, sv);
                            let idx = kb.addi(eh, (8 * wi + 4 * qi) as i64);
                            kb.st(f, dst, idx);
                        }
                    }
                }
            };
            let full = k / 32;
            let z = kb.ic(0);
            let nf = kb.ic(full as i64);
            kb.for_steps(z, nf, 1, &mut |kb, blk| block(kb, blk, 2));
            let rest = k % 32;
            if rest > 0 {
                let blk = kb.ic(full as i64);
                block(kb, blk, if rest > 16 { 2 } else { 1 });
            }
        }
        Layout::W8A8 | Layout::W4A8 { .. } => unreachable!("weight_format() maps these to int8 and int4"),
        Layout::Sparse24 { int8 } => {
            let zero = kb.fc(V4, 0.0);
            let z = kb.ic(0);
            let kv = kb.ic(k as i64);
            kb.for_steps(z, kv, 4, &mut |kb, c| kb.st(zero, dst, c));
            let scale = if int8 { kb.b.ins().load(F32, flags(), prow, 0) } else { kb.fc(F32, 1.0) };
            sparse_each(kb, int8, k, prow, &mut |kb, v, e, _| {
                let v = if int8 { kb.fmul(v, scale) } else { v };
                kb.st(v, dst, e);
            });
        }
        Layout::Dense => {}
    }
}

/// `gather` from a packed `[V, H]` table (a tied embedding and LM head): each id's row record is
/// dequantized into a stack row (whole int4 blocks), then its `H` values copied out. Parts split
/// the ids. Ids are in range: the runtime checks them before a step.
pub(crate) fn gather_packed(kb: &mut Kb, g: &Graph, n: NodeId, layout: Layout) {
    let ins = g.inputs(n);
    let h = g.ty(ins[0]).shape[1].as_const().unwrap_or(0);
    let nids = kb.dims(&g.ty(ins[1]).shape);
    let rb = row_bytes(layout, h) as i64;
    let (table, ids, out) = (kb.buf(0), kb.buf(1), kb.buf(2));
    let padded = h.div_ceil(32) * 32;
    let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (padded * 4) as u32, 6));
    let hv = kb.ic(h as i64);
    let one = kb.ic(1);
    kb.rows(&[nids], &[vec![one], vec![hv]], hv, &[one, one], None, &mut |kb, offs, _, len| {
        let ip = kb.addr(ids, offs[0]);
        let id = kb.b.ins().sload32(flags(), ip, 0);
        let ro = kb.muli(id, rb);
        let prow = kb.add(table, ro);
        let row = kb.b.ins().stack_addr(I64, slot, 0);
        dequant_row(kb, layout, h, prow, row);
        let dp = kb.addr(out, offs[1]);
        kb.vloop(len, 2, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, row, i);
            kb.st(v, dp, i);
        });
    });
}

/// `sum_k a[k] * w[k]` for one packed row `prow` and one row `a` of `k` f32s, dequantizing in
/// registers without a stored row (the decode path: a GEMV reads each packed byte once). The
/// scale multiplies per-chunk partial sums (int8: the whole row's), so this differs from the
/// dequantized row's dot product only in f32 rounding.
fn fused_dot(kb: &mut Kb, layout: Layout, k: usize, prow: Value, a: Value) -> Value {
    let codes = kb.addi(prow, codes_at(layout, k) as i64);
    let zv = kb.fc(V4, 0.0);
    let zs = kb.fc(F32, 0.0);
    match layout {
        Layout::Int8 => {
            let acc: Vec<_> = (0..4).map(|_| kb.var(V4, zv)).collect();
            let z = kb.ic(0);
            let kv = kb.ic(k as i64);
            let e = kb.for_steps(z, kv, 16, &mut |kb, c| {
                let pc = kb.add(codes, c);
                for (i, q) in int8x16_to_f32(kb, pc).into_iter().enumerate() {
                    let idx = kb.addi(c, 4 * i as i64);
                    let av = kb.ld_ro(V4, a, idx);
                    let x = kb.get(acc[i]);
                    let y = kb.fma(q, av, x);
                    kb.set(acc[i], y);
                }
            });
            let tail = kb.var(F32, zs);
            kb.for_steps(e, kv, 1, &mut |kb, c| {
                let pc = kb.add(codes, c);
                let q = kb.b.ins().sload8(I32, flags(), pc, 0);
                let q = kb.b.ins().fcvt_from_sint(F32, q);
                let av = kb.ld_ro(F32, a, c);
                let x = kb.get(tail);
                let y = kb.fma(q, av, x);
                kb.set(tail, y);
            });
            let v: Vec<Value> = acc.iter().map(|&x| kb.get(x)).collect();
            let s01 = kb.fadd(v[0], v[1]);
            let s23 = kb.fadd(v[2], v[3]);
            let s = kb.fadd(s01, s23);
            let s = kb.hsum(s);
            let t = kb.get(tail);
            let s = kb.fadd(s, t);
            let scale = kb.b.ins().load(F32, flags(), prow, 0);
            kb.fmul(s, scale)
        }
        Layout::Int4 { group, asym } => {
            let g = groups(layout, k);
            let mask = kb.b.ins().iconst(I8, 0x0f);
            let mask = kb.b.ins().splat(I8X16, mask);
            let acc = [kb.var(V4, zv), kb.var(V4, zv)];
            // One block; only the first `halves` halves, and only lanes below `k` of `a` are read
            // (a partial block's padding codes meet zeros, never memory past `a`'s row).
            let block = |kb: &mut Kb, blk: Value, valid: usize| {
                let pc = kb.muli(blk, 16);
                let pc = kb.add(codes, pc);
                let v = kb.b.ins().load(I8X16, flags(), pc, 0);
                let lo = kb.b.ins().band(v, mask);
                let hi = kb.b.ins().ushr_imm_s(v, 4);
                let hi = kb.b.ins().band(hi, mask);
                let e0 = kb.muli(blk, 32);
                // The scale (and zero point) of the group holding element `e`, as f32x4 splats.
                let group_of = |kb: &mut Kb, e: Value| {
                    let gi = kb.b.ins().udiv_imm_s(e, group as i64);
                    let s = kb.ld_f16(prow, gi);
                    let sv = kb.splat(V4, s);
                    let zv = asym.then(|| {
                        let gz = kb.addi(gi, g as i64);
                        let z = kb.ld_f16(prow, gz);
                        kb.splat(V4, z)
                    });
                    (sv, zv)
                };
                // A group covers whole blocks when it is a multiple of 32: one scale per block.
                let shared = group.is_multiple_of(32);
                let block_scale = shared.then(|| group_of(kb, e0));
                let mut part: [Option<Value>; 2] = [None, None];
                for (h, &nib) in [lo, hi].iter().enumerate() {
                    if 16 * h >= valid {
                        break;
                    }
                    let eh = kb.addi(e0, 16 * h as i64);
                    let (sv, zv) = match block_scale {
                        Some(x) => x,
                        None => group_of(kb, eh),
                    };
                    // Symmetric codes are stored as q + 8: subtract in i8 lanes, widen signed.
                    let w16 = match zv {
                        None => {
                            let eight = kb.b.ins().iconst(I8, 8);
                            let eight = kb.b.ins().splat(I8X16, eight);
                            let q = kb.b.ins().isub(nib, eight);
                            [kb.b.ins().swiden_low(q), kb.b.ins().swiden_high(q)]
                        }
                        Some(_) => [kb.b.ins().uwiden_low(nib), kb.b.ins().uwiden_high(nib)],
                    };
                    for (wi, &w) in w16.iter().enumerate() {
                        let w32 = match zv {
                            None => [kb.b.ins().swiden_low(w), kb.b.ins().swiden_high(w)],
                            Some(_) => [kb.b.ins().uwiden_low(w), kb.b.ins().uwiden_high(w)],
                        };
                        for (qi, &q) in w32.iter().enumerate() {
                            let lane0 = 16 * h + 8 * wi + 4 * qi;
                            if lane0 >= valid {
                                continue;
                            }
                            let mut f = kb.b.ins().fcvt_from_sint(V4, q);
                            if let Some(zv) = zv {
                                f = kb.fsub(f, zv);
                            }
                            let idx = kb.addi(eh, (8 * wi + 4 * qi) as i64);
                            let av = if lane0 + 4 <= valid {
                                kb.ld_ro(V4, a, idx)
                            } else {
                                // Fewer than 4 elements left: scalar loads, zeros after.
                                let mut lanes = Vec::new();
                                for l in 0..4 {
                                    if lane0 + l < valid {
                                        let il = kb.addi(idx, l as i64);
                                        lanes.push(kb.ld_ro(F32, a, il));
                                    } else {
                                        lanes.push(kb.b.ins().f32const(0.0));
                                    }
                                }
                                let mut v4 = kb.b.ins().scalar_to_vector(V4, lanes[0]);
                                for (l, &x) in lanes.iter().enumerate().skip(1) {
                                    v4 = kb.b.ins().insertlane(v4, x, l as u8);
                                }
                                v4
                            };
                            let slot = part[wi].unwrap_or_else(|| kb.fc(V4, 0.0));
                            part[wi] = Some(kb.fma(f, av, slot));
                        }
                    }
                    if !shared {
                        // Per-half scale: fold this half's partial sums now.
                        let p = match part {
                            [Some(x), Some(y)] => kb.fadd(x, y),
                            [Some(x), None] | [None, Some(x)] => x,
                            [None, None] => continue,
                        };
                        part = [None, None];
                        let x = kb.get(acc[h]);
                        let y = kb.fma(p, sv, x);
                        kb.set(acc[h], y);
                    }
                }
                if let Some((sv, _)) = block_scale {
                    let p = match part {
                        [Some(x), Some(y)] => Some(kb.fadd(x, y)),
                        [Some(x), None] | [None, Some(x)] => Some(x),
                        [None, None] => None,
                    };
                    if let Some(p) = p {
                        let x = kb.get(acc[0]);
                        let y = kb.fma(p, sv, x);
                        kb.set(acc[0], y);
                    }
                }
            };
            let full = k / 32;
            let z = kb.ic(0);
            let nf = kb.ic(full as i64);
            kb.for_steps(z, nf, 1, &mut |kb, blk| block(kb, blk, 32));
            if !k.is_multiple_of(32) {
                let blk = kb.ic(full as i64);
                block(kb, blk, k % 32);
            }
            let x = kb.get(acc[0]);
            let y = kb.get(acc[1]);
            let s = kb.fadd(x, y);
            kb.hsum(s)
        }
        Layout::W8A8 | Layout::W4A8 { .. } => zs,
        Layout::Sparse24 { int8 } => {
            let acc: Vec<_> = (0..4).map(|_| kb.var(F32, zs)).collect();
            sparse_each(kb, int8, k, prow, &mut |kb, v, e, slot| {
                let x = kb.ld_ro(F32, a, e);
                let s = kb.get(acc[slot]);
                let s = kb.fma(v, x, s);
                kb.set(acc[slot], s);
            });
            let v: Vec<Value> = acc.iter().map(|&x| kb.get(x)).collect();
            let s01 = kb.fadd(v[0], v[1]);
            let s23 = kb.fadd(v[2], v[3]);
            let s = kb.fadd(s01, s23);
            if int8 {
                let scale = kb.b.ins().load(F32, flags(), prow, 0);
                kb.fmul(s, scale)
            } else {
                s
            }
        }
        Layout::Dense => zs,
    }
}

/// The epilogue on the sum `x` of output `(r, j)` at element `oi` (`up`: the gated partner).
fn epilogue(kb: &mut Kb, epi: &Epi, ty: Type, x: Value, up: Option<Value>, j: Value, oi: Value) -> Value {
    match epi {
        Epi::Plain => x,
        Epi::Linear { bias, act, res } => {
            let mut y = x;
            if let Some(p) = bias {
                let bv = kb.ld(ty, *p, j);
                y = kb.fadd(y, bv);
            }
            if let Some(u) = act {
                y = math::unary(kb, ty, *u, y);
            }
            if let Some(p) = res {
                let rv = kb.ld(ty, *p, oi);
                y = kb.fadd(y, rv);
            }
            y
        }
        Epi::Gated { act } => {
            let gate = math::unary(kb, ty, *act, x);
            match up {
                Some(u) => kb.fmul(gate, u),
                None => gate,
            }
        }
    }
}

/// `c + Σ` of `s8[i] · u8[i]` over each 4 lanes (i32x4): the CLIF tree Cranelift lowers to one
/// `vpdpbusd` on VNNI hosts (exact: every i8 · u8 product fits i16).
fn dpbusd(kb: &mut Kb, c: Value, u8s: Value, s8s: Value) -> Value {
    let wl = kb.b.ins().swiden_low(s8s);
    let xl = kb.b.ins().uwiden_low(u8s);
    let lo = kb.b.ins().imul(wl, xl);
    let wh = kb.b.ins().swiden_high(s8s);
    let xh = kb.b.ins().uwiden_high(u8s);
    let hi = kb.b.ins().imul(wh, xh);
    let l0 = kb.b.ins().swiden_low(lo);
    let l1 = kb.b.ins().swiden_high(lo);
    let pl = kb.b.ins().iadd_pairwise(l0, l1);
    let h0 = kb.b.ins().swiden_low(hi);
    let h1 = kb.b.ins().swiden_high(hi);
    let ph = kb.b.ins().iadd_pairwise(h0, h1);
    let t = kb.b.ins().iadd_pairwise(pl, ph);
    kb.b.ins().iadd(t, c)
}

/// `Σ_k (q[k] − 8) · s_g · x[k]` (f32, before the activation scale) for one W4A8 row `prow`
/// (symmetric int4 blocks, codes stored as `q + 8`) and a quantized activation row `x` (i8 in
/// the super-step and step order of `abi::qformat`) with `bsum` holding `-8 ·` each 32-block's
/// code sum (i32, at its `aux` word): per block, the nibbles are the unsigned
/// operand of two `vpdpbusd`s accumulating onto `−8 · bsum[b]` (an exact i32), converted once
/// and multiplied by the block's group scale.
fn w4a8_dot(kb: &mut Kb, group: usize, k: usize, prow: Value, x: Value, bsum: Value) -> Value {
    let layout = Layout::W4A8 { group };
    let codes = kb.addi(prow, codes_at(layout, k) as i64);
    let mask = kb.b.ins().iconst(I8, 0x0f);
    let mask = kb.b.ins().splat(I8X16, mask);
    let zv = kb.fc(V4, 0.0);
    let acc = [kb.var(V4, zv), kb.var(V4, zv)];
    let nb = k.div_ceil(32);
    let per = group / 32;
    // Blocks in the activations' super-steps, then in steps.
    let nsup_blocks = k / 512 * 16;
    let block = |kb: &mut Kb, blk: Value, slot: usize, sup: bool| {
        let pc = kb.muli(blk, 16);
        let pc = kb.add(codes, pc);
        let v = kb.b.ins().load(I8X16, flags(), pc, 0);
        let lo = kb.b.ins().band(v, mask);
        // High nibbles: a 16-bit lane shift (bits crossing a byte boundary are masked off).
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let v16 = kb.b.ins().bitcast(I16X8, le, v);
        let hi = kb.b.ins().ushr_imm_s(v16, 4);
        let hi = kb.b.ins().bitcast(I8X16, le, hi);
        let hi = kb.b.ins().band(hi, mask);
        // The activation side (`abi::qformat`): `-8 · Σ codes` of the block at its `aux` word,
        // its first 16 codes `x0` and last 16 `x1` where its region puts them.
        let (x0, x1, w) = if sup {
            // Super-step `blk / 16`, lane `L`: codes `16h + 4j ..` at `512u + 256h + 64j + 4L`.
            let u = kb.b.ins().ushr_imm_s(blk, 4);
            let b16 = kb.b.ins().band_imm_s(blk, 15);
            let l0 = kb.b.ins().band_imm_s(b16, 3);
            let l0 = kb.muli(l0, 4);
            let l1 = kb.b.ins().ushr_imm_s(b16, 2);
            let lane = kb.add(l0, l1);
            let w = kb.muli(u, 16);
            let w = kb.add(w, lane);
            let base = kb.muli(u, 512);
            let l4 = kb.muli(lane, 4);
            let base = kb.add(base, l4);
            let px = kb.add(x, base);
            let half = |kb: &mut Kb, h: i32| {
                let words: Vec<Value> =
                    (0..4).map(|j| kb.b.ins().load(I32, flags(), px, 256 * h + 64 * j)).collect();
                let mut v = kb.b.ins().scalar_to_vector(I32X4, words[0]);
                for (j, &wj) in words.iter().enumerate().skip(1) {
                    v = kb.b.ins().insertlane(v, wj, j as u8);
                }
                let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
                kb.b.ins().bitcast(I8X16, le, v)
            };
            (half(kb, 0), half(kb, 1), w)
        } else {
            // Steps after the super-steps: the block's first 16 at `128 · (b / 4) + 16 · (b % 4)`
            // (`b` counted from the first step's block), its last 16 64 bytes on.
            let b = kb.addi(blk, -(nsup_blocks as i64));
            let w = kb.muli(b, 4);
            let w = kb.addi(w, nsup_blocks as i64);
            let t = kb.b.ins().ushr_imm_s(b, 2);
            let t = kb.muli(t, 128);
            let i = kb.b.ins().band_imm_s(b, 3);
            let i = kb.muli(i, 16);
            let e0 = kb.add(t, i);
            let e0 = kb.addi(e0, 32 * nsup_blocks as i64);
            let px = kb.add(x, e0);
            let x0 = kb.b.ins().load(I8X16, flags(), px, 0);
            let x1 = kb.b.ins().load(I8X16, flags(), px, 64);
            (x0, x1, w)
        };
        let c = kb.ld(I32, bsum, w);
        let c = kb.b.ins().scalar_to_vector(I32X4, c);
        let d = dpbusd(kb, c, lo, x0);
        let d = dpbusd(kb, d, hi, x1);
        let f = kb.b.ins().fcvt_from_sint(V4, d);
        let gi = if per == 1 { blk } else { kb.b.ins().udiv_imm_s(blk, per as i64) };
        let sg = kb.ld_f16(prow, gi);
        let sv = kb.splat(V4, sg);
        let a = kb.get(acc[slot]);
        let a = kb.fma(f, sv, a);
        kb.set(acc[slot], a);
    };
    // Pairs of blocks (two accumulators) in each region, then an odd last block.
    for (b0, b1, sup) in [(0, nsup_blocks, true), (nsup_blocks, nb, false)] {
        let lo = kb.ic(b0 as i64);
        let pairs = kb.ic((b0 + (b1 - b0) / 2 * 2) as i64);
        kb.for_steps(lo, pairs, 2, &mut |kb, b| {
            block(kb, b, 0, sup);
            let b1 = kb.addi(b, 1);
            block(kb, b1, 1, sup);
        });
        if (b1 - b0) % 2 == 1 {
            let b = kb.ic((b1 - 1) as i64);
            block(kb, b, 0, sup);
        }
    }
    let a0 = kb.get(acc[0]);
    let a1 = kb.get(acc[1]);
    let s = kb.fadd(a0, a1);
    kb.hsum(s)
}

/// `Σ_k w[k] · (u[k] − 128)` as i32 for one W8A8 row `prow` (`k` codes, padded to 16) and the
/// activation codes `u` (u8, `q + 128`, padded with 128): 16 bytes per step through the
/// widening-multiply, pairwise-add tree that Cranelift folds into one `vpdpbusd` on VNNI hosts
/// (exact: each i8·u8 product fits i16), minus `128 · Σ w` (the row's stored code sum).
fn w8a8_dot(kb: &mut Kb, k: usize, prow: Value, u: Value) -> Value {
    let codes = kb.addi(prow, 8);
    let zero = kb.b.ins().iconst(I32, 0);
    let zv = kb.b.ins().splat(I32X4, zero);
    let acc = [kb.var(I32X4, zv), kb.var(I32X4, zv)];
    let steps = k.div_ceil(16);
    let step = |kb: &mut Kb, c: Value, slot: usize| {
        let pw = kb.add(codes, c);
        let w = kb.b.ins().load(I8X16, flags(), pw, 0);
        let pu = kb.add(u, c);
        let x = kb.b.ins().load(I8X16, flags(), pu, 0);
        let a = kb.get(acc[slot]);
        let a = dpbusd(kb, a, x, w);
        kb.set(acc[slot], a);
    };
    let z = kb.ic(0);
    let pairs = kb.ic((steps / 2 * 32) as i64);
    kb.for_steps(z, pairs, 32, &mut |kb, c| {
        step(kb, c, 0);
        let c1 = kb.addi(c, 16);
        step(kb, c1, 1);
    });
    if steps % 2 == 1 {
        let c = kb.ic(((steps - 1) * 16) as i64);
        step(kb, c, 0);
    }
    let a0 = kb.get(acc[0]);
    let a1 = kb.get(acc[1]);
    let v = kb.b.ins().iadd(a0, a1);
    let l: Vec<Value> = (0..4u8).map(|i| kb.b.ins().extractlane(v, i)).collect();
    let s01 = kb.b.ins().iadd(l[0], l[1]);
    let s23 = kb.b.ins().iadd(l[2], l[3]);
    let s = kb.b.ins().iadd(s01, s23);
    let wsum = kb.b.ins().load(I32, flags(), prow, 4);
    let corr = kb.b.ins().imul_imm_s(wsum, 128);
    kb.b.ins().isub(s, corr)
}

/// Activation rows from which a W8A8 / W4A8 product takes the runtime's A8 product of f32 rows
/// (`ukernel::QGEMM_A8_ROWS`, AMX tiles) where the runtime has one.
const A8_ROWS_MIN: i64 = 16;
/// Output columns per call of that product: the runtime quantizes every activation row once
/// per call, so a call takes more columns than the other microkernels' [`QCH`].
const A8_ROWS_CH: i64 = 256;

/// A W8A8 / W4A8 product: through the runtime's A8 product of f32 rows (`qrows`, where it is
/// filled) for a step of [`A8_ROWS_MIN`] rows or more, else [`a8_gemm_blocks`].
#[allow(clippy::too_many_arguments)]
fn a8_gemm(
    kb: &mut Kb,
    layout: Layout,
    m: Value,
    k: usize,
    n: usize,
    a: Value,
    b: Value,
    o: Value,
    epi: &Epi,
    qk: Option<Value>,
    qg: Option<Value>,
    qrows: Option<Value>,
) {
    use cranelift_codegen::ir::condcodes::IntCC;
    let Some(fr) = qrows else {
        return a8_gemm_blocks(kb, layout, m, k, n, a, b, o, epi, qk, qg);
    };
    let have = kb.b.ins().icmp_imm_s(IntCC::NotEqual, fr, 0);
    let big = kb.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, m, A8_ROWS_MIN);
    let go = kb.b.ins().band(have, big);
    let gated = matches!(epi, Epi::Gated { .. });
    kb.if_else(
        go,
        &mut |kb| {
            let nv = kb.ic(n as i64);
            let (lo, hi) = kb.part_range(nv);
            chunks_of(kb, lo, hi, A8_ROWS_CH, &mut |kb, c, cnt| {
                // The tile holds the products with the activation scale applied.
                qgemm_chunk(kb, fr, layout, m, k, n, a, b, c, cnt, gated, &mut |kb, ty, r, j, x, up| {
                    let oi = kb.muli(r, n as i64);
                    let oi = kb.add(oi, j);
                    let y = epilogue(kb, epi, ty, x, up, j, oi);
                    kb.st(y, o, oi);
                })
            })
        },
        &mut |kb| a8_gemm_blocks(kb, layout, m, k, n, a, b, o, epi, qk, qg),
    );
}

/// The W8A8 / W4A8 product. Rows of `a` go in blocks of up to [`a8_block_rows`]: each row of a
/// block is quantized to int8 as `ir::quant::quantize_act` does into a stack buffer laid out as
/// `abi::qformat` defines quantized activation rows (W8A8: stored as `q + 128`, the unsigned
/// operand; W4A8: signed, in step order, with per-32-block code sums), then every output column
/// is an integer dot product scaled by the weight's scale(s) times the row's activation scale.
/// With the runtime's kernels, columns go in chunks of [`QCH`] and each chunk serves every row of
/// the block while its packed rows are in cache: a block of several rows goes through the
/// multi-row product `qg` (each packed row unpacked once for the block's rows), one row through
/// the GEMV `qk`. A prefill reads the weights once per block of rows, not once per row.
#[allow(clippy::too_many_arguments)]
fn a8_gemm_blocks(
    kb: &mut Kb,
    layout: Layout,
    m: Value,
    k: usize,
    n: usize,
    a: Value,
    b: Value,
    o: Value,
    epi: &Epi,
    qk: Option<Value>,
    qg: Option<Value>,
) {
    use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
    let w4 = match layout {
        Layout::W4A8 { group } => Some(group),
        _ => None,
    };
    let f = qformat(layout);
    let (xs, auxs) = (f.act_bytes(k), f.aux_words(k));
    let rows = a8_block_rows(k);
    let gated = matches!(epi, Epi::Gated { .. });
    let stack = |kb: &mut Kb, bytes: usize| {
        let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes.max(16) as u32, 6));
        kb.b.ins().stack_addr(I64, slot, 0)
    };
    // Per block row: its codes (`xs` bytes), its W4A8 block terms (`auxs` words), its activation
    // scale.
    let ubase = stack(kb, rows * xs);
    let bbase = stack(kb, rows * 4 * auxs);
    let sbase = stack(kb, rows * 4);
    // Padding lanes hold code 0 (stored +128 for W8A8): they meet zero weight codes. The
    // quantization below writes every code before `k`.
    let c128 = kb.b.ins().iconst(I8, if w4.is_some() { 0 } else { -128i64 });
    let v128 = kb.b.ins().splat(I8X16, c128);
    let z = kb.ic(0);
    let rv = kb.ic(rows as i64);
    kb.for_steps(z, rv, 1, &mut |kb, i| {
        let ui = kb.muli(i, xs as i64);
        let ui = kb.add(ubase, ui);
        for c in (k / 16 * 16..xs).step_by(16) {
            kb.b.ins().store(flags(), v128, ui, f.act_at(k, c) as i32);
        }
    });
    let bias = if w4.is_some() { 0 } else { 128 };
    let nv = kb.ic(n as i64);
    let (lo, hi) = kb.part_range(nv);
    let kv = kb.ic(k as i64);
    let nblocks = kb.div_ceil(m, rows as i64);
    kb.for_steps(z, nblocks, 1, &mut |kb, blk| {
        let r0 = kb.muli(blk, rows as i64);
        let left = kb.sub(m, r0);
        let rc = kb.min(left, rv);
        // The block's rows, quantized.
        kb.for_steps(z, rc, 1, &mut |kb, i| {
            let r = kb.add(r0, i);
            let ar = kb.muli(r, 4 * k as i64);
            let ar = kb.add(a, ar);
            let u_row = kb.muli(i, xs as i64);
            let u_row = kb.add(ubase, u_row);
            let bsum = kb.muli(i, 4 * auxs as i64);
            let bsum = kb.add(bbase, bsum);
            // max |x| over the row
            let zv = kb.fc(V4, 0.0);
            let zs = kb.fc(F32, 0.0);
            let mv = kb.var(V4, zv);
            let ms = kb.var(F32, zs);
            let e = kb.for_steps(z, kv, 4, &mut |kb, c| {
                let x = kb.ld(V4, ar, c);
                let x = kb.b.ins().fabs(x);
                let cur = kb.get(mv);
                let y = kb.fmax(V4, cur, x);
                kb.set(mv, y);
            });
            kb.for_steps(e, kv, 1, &mut |kb, c| {
                let x = kb.ld(F32, ar, c);
                let x = kb.b.ins().fabs(x);
                let cur = kb.get(ms);
                let y = kb.fmax(F32, cur, x);
                kb.set(ms, y);
            });
            let v = kb.get(mv);
            let hm = kb.hmax(v);
            let s = kb.get(ms);
            let amax = kb.fmax(F32, hm, s);
            let c127 = kb.fc(F32, 127.0);
            let inv = kb.fdiv(c127, amax);
            let pos = kb.b.ins().fcmp(FloatCC::GreaterThan, amax, zs);
            let inv = kb.b.ins().select(pos, inv, zs);
            let sa = kb.fdiv(amax, c127);
            kb.st(sa, sbase, i);
            let invv = kb.splat(V4, inv);
            let i128 = kb.b.ins().iconst(I32, bias);
            let i128v = kb.b.ins().splat(I32X4, i128);
            if w4.is_some() {
                let zi = kb.b.ins().iconst(I32, 0);
                let zi = kb.b.ins().splat(I32X4, zi);
                let nw = kb.ic(auxs as i64);
                kb.for_steps(z, nw, 4, &mut |kb, w| kb.st(zi, bsum, w));
            }
            // W4A8: elements before `sup` go in super-steps, the rest in steps (`abi::qformat`).
            let sup = if w4.is_some() { k / 512 * 512 } else { 0 };
            // Adds `v` (i32) to the term of element `c`'s block (`super_step`: in the super-steps).
            let add_bsum = |kb: &mut Kb, c: Value, v: Value, super_step: bool| {
                let v = kb.b.ins().imul_imm_s(v, -8);
                let bi = kb.b.ins().ushr_imm_s(c, 5);
                let w = if super_step {
                    // 16 words per super-step, block `b % 16` at lane `4 · (b % 4) + (b % 16) / 4`.
                    let u = kb.b.ins().ushr_imm_s(bi, 4);
                    let u = kb.muli(u, 16);
                    let l0 = kb.b.ins().band_imm_s(bi, 3);
                    let l0 = kb.muli(l0, 4);
                    let l1 = kb.b.ins().ushr_imm_s(bi, 2);
                    let l1 = kb.b.ins().band_imm_s(l1, 3);
                    let l = kb.add(l0, l1);
                    kb.add(u, l)
                } else {
                    let w = kb.muli(bi, 4);
                    kb.addi(w, -((sup / 32 * 4) as i64) + (sup / 32) as i64)
                };
                let cur = kb.ld(I32, bsum, w);
                let nv = kb.b.ins().iadd(cur, v);
                kb.st(nv, bsum, w);
            };
            let quantize16 = |kb: &mut Kb, c: Value, super_step: bool| {
                let mut q = Vec::new();
                for j in 0..4 {
                    let cj = kb.addi(c, 4 * j);
                    let x = kb.ld(V4, ar, cj);
                    let x = kb.fmul(x, invv);
                    let x = kb.b.ins().nearest(x);
                    let x = kb.b.ins().fcvt_to_sint_sat(I32X4, x);
                    q.push(if w4.is_some() { x } else { kb.b.ins().iadd(x, i128v) });
                }
                let h0 = kb.b.ins().snarrow(q[0], q[1]);
                let h1 = kb.b.ins().snarrow(q[2], q[3]);
                let bytes = if w4.is_some() { kb.b.ins().snarrow(h0, h1) } else { kb.b.ins().unarrow(h0, h1) };
                if super_step {
                    // Codes `16h + 4j ..` of block `b` (lane `L` of super-step `u`) at
                    // `512u + 256h + 64j + 4L`: four 32-bit stores.
                    let u = kb.b.ins().ushr_imm_s(c, 9);
                    let u = kb.muli(u, 512);
                    let h = kb.b.ins().ushr_imm_s(c, 4);
                    let h = kb.b.ins().band_imm_s(h, 1);
                    let h = kb.muli(h, 256);
                    let bi = kb.b.ins().ushr_imm_s(c, 5);
                    let l0 = kb.b.ins().band_imm_s(bi, 3);
                    let l0 = kb.muli(l0, 16);
                    let l1 = kb.b.ins().ushr_imm_s(bi, 2);
                    let l1 = kb.b.ins().band_imm_s(l1, 3);
                    let l1 = kb.muli(l1, 4);
                    let at = kb.add(u, h);
                    let at = kb.add(at, l0);
                    let at = kb.add(at, l1);
                    let pu = kb.add(u_row, at);
                    let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
                    let words = kb.b.ins().bitcast(I32X4, le, bytes);
                    for j in 0..4u8 {
                        let wj = kb.b.ins().extractlane(words, j);
                        kb.b.ins().store(flags(), wj, pu, 64 * j as i32);
                    }
                } else {
                    // 16 elements from a multiple of 16 stay adjacent in the step order.
                    let at = if w4.is_some() {
                        let e = kb.addi(c, -(sup as i64));
                        let t = kb.b.ins().ushr_imm_s(e, 7);
                        let t = kb.muli(t, 128);
                        let h = kb.b.ins().ushr_imm_s(e, 4);
                        let h = kb.b.ins().band_imm_s(h, 1);
                        let h = kb.muli(h, 64);
                        let i = kb.b.ins().ushr_imm_s(e, 5);
                        let i = kb.b.ins().band_imm_s(i, 3);
                        let i = kb.muli(i, 16);
                        let th = kb.add(t, h);
                        let at = kb.add(th, i);
                        kb.addi(at, sup as i64)
                    } else {
                        c
                    };
                    let pu = kb.add(u_row, at);
                    kb.b.ins().store(flags(), bytes, pu, 0);
                }
                if w4.is_some() {
                    let s01 = kb.b.ins().iadd(q[0], q[1]);
                    let s23 = kb.b.ins().iadd(q[2], q[3]);
                    let sv = kb.b.ins().iadd(s01, s23);
                    let l: Vec<Value> = (0..4u8).map(|i| kb.b.ins().extractlane(sv, i)).collect();
                    let a01 = kb.b.ins().iadd(l[0], l[1]);
                    let a23 = kb.b.ins().iadd(l[2], l[3]);
                    let t = kb.b.ins().iadd(a01, a23);
                    add_bsum(kb, c, t, super_step);
                }
            };
            let supv = kb.ic(sup as i64);
            kb.for_steps(z, supv, 16, &mut |kb, c| quantize16(kb, c, true));
            let full = kb.ic((k / 16 * 16) as i64);
            kb.for_steps(supv, full, 16, &mut |kb, c| quantize16(kb, c, false));
            // The last `k % 16` elements one by one, at their (constant) places.
            for e in k / 16 * 16..k {
                let c = kb.ic(e as i64);
                let x = kb.ld(F32, ar, c);
                let x = kb.fmul(x, inv);
                let x = kb.b.ins().nearest(x);
                let x = kb.b.ins().fcvt_to_sint_sat(I32, x);
                if w4.is_some() {
                    add_bsum(kb, c, x, false);
                }
                let x = kb.b.ins().iadd_imm_s(x, bias);
                kb.b.ins().istore8(flags(), x, u_row, f.act_at(k, e) as i32);
            }
        });
        // Row `i` of the block: its codes, block terms, scale and output offset.
        let row = |kb: &mut Kb, i: Value| {
            let u = kb.muli(i, xs as i64);
            let u = kb.add(ubase, u);
            let bsum = kb.muli(i, 4 * auxs as i64);
            let bsum = kb.add(bbase, bsum);
            let sa = kb.ld(F32, sbase, i);
            let r = kb.add(r0, i);
            let oi0 = kb.muli(r, n as i64);
            (u, bsum, sa, oi0)
        };
        let generated = &mut |kb: &mut Kb| {
            kb.for_steps(z, rc, 1, &mut |kb, i| {
                let (u, bsum, sa, oi0) = row(kb, i);
                a8_columns(kb, w4, k, n, b, u, bsum, sa, lo, hi, gated, &mut |kb, j, x, up| {
                    let oi = kb.add(oi0, j);
                    let y = epilogue(kb, epi, F32, x, up, j, oi);
                    kb.st(y, o, oi);
                })
            });
        };
        let Some(fv) = qk else {
            generated(kb);
            return;
        };
        // One row at a time through the GEMV.
        let gemv = &mut |kb: &mut Kb| {
            chunks(kb, lo, hi, &mut |kb, c, cnt| {
                kb.for_steps(z, rc, 1, &mut |kb, i| {
                    let (u, bsum, sa, oi0) = row(kb, i);
                    qgemv_chunk(kb, fv, layout, k, n, u, bsum, b, c, cnt, gated, &mut |kb, j, x, up| {
                        let x = kb.fmul(x, sa);
                        let up = up.map(|u| kb.fmul(u, sa));
                        let oi = kb.add(oi0, j);
                        let y = epilogue(kb, epi, F32, x, up, j, oi);
                        kb.st(y, o, oi);
                    })
                });
            })
        };
        let have = kb.b.ins().icmp_imm_s(IntCC::NotEqual, fv, 0);
        let Some(gv) = qg else {
            kb.if_else(have, gemv, generated);
            return;
        };
        // The block's rows together through the multi-row product (both slots are filled on
        // the same CPUs; a block of one row takes the GEMV).
        let many = kb.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, rc, 1);
        let have_g = kb.b.ins().icmp_imm_s(IntCC::NotEqual, gv, 0);
        let tiled = kb.b.ins().band(many, have_g);
        kb.if_else(
            tiled,
            &mut |kb| {
                chunks(kb, lo, hi, &mut |kb, c, cnt| {
                    a8_gemm_chunk(kb, gv, layout, k, n, ubase, bbase, rc, b, c, cnt, gated, &mut |kb, i, j, x, up| {
                        let (_, _, sa, oi0) = row(kb, i);
                        let x = kb.fmul(x, sa);
                        let up = up.map(|u| kb.fmul(u, sa));
                        let oi = kb.add(oi0, j);
                        let y = epilogue(kb, epi, F32, x, up, j, oi);
                        kb.st(y, o, oi);
                    })
                })
            },
            &mut |kb| kb.if_else(have, gemv, generated),
        );
    });
}

/// Columns `c .. c + cnt` for the `rc` quantized activation rows at `x` (block terms at `aux`)
/// through the runtime's multi-row A8 product `f` ([`abi::ukernel::QGemmA8Fn`]), the gated
/// partner rows `N + j` too: `emit(r, j, x, up)` receives each product (before the activation
/// scale).
#[allow(clippy::too_many_arguments)]
fn a8_gemm_chunk(
    kb: &mut Kb,
    f: Value,
    layout: Layout,
    k: usize,
    n: usize,
    x: Value,
    aux: Value,
    rc: Value,
    b: Value,
    c: Value,
    cnt: Value,
    gated: bool,
    emit: &mut TileEmit,
) {
    let rb = row_bytes(layout, k) as i64;
    let sig = kb.microkernel_sig(QGEMM_A8_SIG.params, QGEMM_A8_SIG.returns);
    let fmt = kb.ic(qformat(layout).arg());
    let rbv = kb.ic(rb);
    let kv = kb.ic(k as i64);
    let rows = a8_block_rows(k) as u32;
    let mut outs = Vec::new();
    for g in 0..1 + gated as usize {
        let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 4 * QCH as u32 * rows, 6));
        let out = kb.b.ins().stack_addr(I64, slot, 0);
        let row0 = kb.addi(c, (g * n) as i64);
        let off = kb.muli(row0, rb);
        let pb = kb.add(b, off);
        kb.b.ins().call_indirect(sig, f, &[fmt, x, aux, rc, pb, rbv, kv, cnt, out]);
        outs.push(out);
    }
    let z = kb.ic(0);
    kb.for_steps(z, rc, 1, &mut |kb, r| {
        let t = kb.mul(r, cnt);
        kb.for_steps(z, cnt, 1, &mut |kb, i| {
            let ti = kb.add(t, i);
            let v = kb.ld(F32, outs[0], ti);
            let up = outs.get(1).map(|&p| kb.ld(F32, p, ti));
            let j = kb.add(c, i);
            emit(kb, r, j, v, up);
        });
    });
}

/// Rows of `a` a W8A8 / W4A8 product quantizes per block: their int8 codes fit 64 KiB of stack
/// (16 rows up to `K = 4096`, fewer beyond).
pub(crate) fn a8_block_rows(k: usize) -> usize {
    (65536 / (k.div_ceil(32) * 32)).clamp(1, 16)
}

/// The generated W8A8 / W4A8 column loop over `[lo, hi)` for one quantized activation row `u`
/// (block sums `bsum`, scale `sa`): `emit(j, x, up)` receives each finished product.
#[allow(clippy::too_many_arguments)]
fn a8_columns(
    kb: &mut Kb,
    w4: Option<usize>,
    k: usize,
    n: usize,
    b: Value,
    u: Value,
    bsum: Value,
    sa: Value,
    lo: Value,
    hi: Value,
    gated: bool,
    emit: &mut ColumnEmit,
) {
    let layout = match w4 {
        Some(group) => Layout::W4A8 { group },
        None => Layout::W8A8,
    };
    let rb = row_bytes(layout, k) as i64;
    kb.for_steps(lo, hi, 1, &mut |kb, j| {
        let off = kb.muli(j, rb);
        let prow = kb.add(b, off);
        let col = |kb: &mut Kb, prow: Value| match w4 {
            Some(group) => {
                let d = w4a8_dot(kb, group, k, prow, u, bsum);
                kb.fmul(d, sa)
            }
            None => {
                let d = w8a8_dot(kb, k, prow, u);
                let d = kb.b.ins().fcvt_from_sint(F32, d);
                let sw = kb.b.ins().load(F32, flags(), prow, 0);
                let sc = kb.fmul(sw, sa);
                kb.fmul(d, sc)
            }
        };
        let x = col(kb, prow);
        let up = gated.then(|| {
            let pu = kb.addi(prow, rb * n as i64);
            col(kb, pu)
        });
        emit(kb, j, x, up);
    });
}

/// `out[r, j] = epi(sum_k a[r, k] * w[j, k])` for `r < m`, `j < n` (`n` output columns; the
/// packed weight has `2n` rows when gated).
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_gemm(
    kb: &mut Kb,
    layout: Layout,
    m: Value,
    k: usize,
    n: usize,
    a: Value,
    b: Value,
    o: Value,
    epi: Epi,
    qk: Option<Value>,
    qgemm: Option<Value>,
    qrows: Option<Value>,
) {
    if layout.quantizes_activations() {
        return a8_gemm(kb, layout, m, k, n, a, b, o, &epi, qk, qgemm, qrows);
    }
    let nv = kb.ic(n as i64);
    let (lo, hi) = kb.part_range(nv);
    let Some(f) = qk else {
        return generated_gemm(kb, layout, m, k, n, a, b, o, &epi, lo, hi);
    };
    let gated = matches!(epi, Epi::Gated { .. });
    let have = kb.b.ins().icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::NotEqual, f, 0);
    kb.if_else(
        have,
        &mut |kb| {
            // Column chunks outermost: a chunk's packed rows stay in cache across the rows of `a`.
            let zero = kb.ic(0);
            let gemv = &mut |kb: &mut Kb, c: Value, cnt: Value| {
                kb.for_steps(zero, m, 1, &mut |kb, r| {
                    let ar = kb.muli(r, 4 * k as i64);
                    let ar = kb.add(a, ar);
                    let oi0 = kb.muli(r, n as i64);
                    qgemv_chunk(kb, f, layout, k, n, ar, zero, b, c, cnt, gated, &mut |kb, j, x, up| {
                        let oi = kb.add(oi0, j);
                        let y = epilogue(kb, &epi, F32, x, up, j, oi);
                        kb.st(y, o, oi);
                    });
                });
            };
            let Some(fg) = qgemm else {
                return chunks(kb, lo, hi, gemv);
            };
            // Several activation rows: dequantize a chunk into panels once, one panel GEMM.
            let big = kb.b.ins().icmp_imm_s(
                cranelift_codegen::ir::condcodes::IntCC::SignedGreaterThanOrEqual,
                m,
                QGEMM_MIN_ROWS,
            );
            chunks(kb, lo, hi, &mut |kb, c, cnt| {
                kb.if_else(
                    big,
                    &mut |kb| {
                        qgemm_chunk(kb, fg, layout, m, k, n, a, b, c, cnt, gated, &mut |kb, ty, r, j, x, up| {
                            let oi = kb.muli(r, n as i64);
                            let oi = kb.add(oi, j);
                            let y = epilogue(kb, &epi, ty, x, up, j, oi);
                            kb.st(y, o, oi);
                        })
                    },
                    &mut |kb| gemv(kb, c, cnt),
                )
            });
        },
        &mut |kb| generated_gemm(kb, layout, m, k, n, a, b, o, &epi, lo, hi),
    );
}

/// Receives output column `j`'s product `x` (and its gated partner): `emit(kb, j, x, up)`.
type ColumnEmit<'a> = dyn FnMut(&mut Kb, Value, Value, Option<Value>) + 'a;
/// Receives row `r`, column `j`'s product: `emit(kb, r, j, x, up)`.
type TileEmit<'a> = dyn FnMut(&mut Kb, Value, Value, Value, Option<Value>) + 'a;
/// Receives row `r`, columns `j ..` (one `F32` or four `V4` lanes) of the products: `emit(kb, ty,
/// r, j, x, up)`.
type VTileEmit<'a> = dyn FnMut(&mut Kb, Type, Value, Value, Value, Option<Value>) + 'a;

/// Output columns per microkernel call.
const QCH: i64 = 64;

/// `body(c, cnt)` over `[lo, hi)` in chunks of at most [`QCH`] columns.
fn chunks(kb: &mut Kb, lo: Value, hi: Value, body: &mut dyn FnMut(&mut Kb, Value, Value)) {
    chunks_of(kb, lo, hi, QCH, body)
}

/// `body(c, cnt)` over `[lo, hi)` in chunks of at most `size` columns.
fn chunks_of(kb: &mut Kb, lo: Value, hi: Value, size: i64, body: &mut dyn FnMut(&mut Kb, Value, Value)) {
    let len = kb.sub(hi, lo);
    let nch = kb.div_ceil(len, size);
    let z = kb.ic(0);
    let full = kb.ic(size);
    kb.for_steps(z, nch, 1, &mut |kb, i| {
        let c = kb.muli(i, size);
        let c = kb.add(lo, c);
        let left = kb.sub(hi, c);
        let cnt = kb.min(left, full);
        body(kb, c, cnt);
    });
}

/// Columns `c .. c + cnt` of one activation row `x` (`aux` the W4A8 block sums) through the
/// runtime's quantized GEMV `f` ([`abi::ukernel::QGemvFn`]), the gated partner rows
/// `N + j` too: `emit(j, x, up)` receives each product.
#[allow(clippy::too_many_arguments)]
fn qgemv_chunk(
    kb: &mut Kb,
    f: Value,
    layout: Layout,
    k: usize,
    n: usize,
    x: Value,
    aux: Value,
    b: Value,
    c: Value,
    cnt: Value,
    gated: bool,
    emit: &mut ColumnEmit,
) {
    let rb = row_bytes(layout, k) as i64;
    let sig = kb.microkernel_sig(QGEMV_SIG.params, QGEMV_SIG.returns);
    let fmt = kb.ic(qformat(layout).arg());
    let rbv = kb.ic(rb);
    let kv = kb.ic(k as i64);
    let mut outs = Vec::new();
    for g in 0..1 + gated as usize {
        let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 4 * QCH as u32, 6));
        let out = kb.b.ins().stack_addr(I64, slot, 0);
        let row0 = kb.addi(c, (g * n) as i64);
        let off = kb.muli(row0, rb);
        let pb = kb.add(b, off);
        kb.b.ins().call_indirect(sig, f, &[fmt, x, aux, pb, rbv, kv, cnt, out]);
        outs.push(out);
    }
    let z = kb.ic(0);
    kb.for_steps(z, cnt, 1, &mut |kb, i| {
        let v = kb.ld(F32, outs[0], i);
        let up = outs.get(1).map(|&p| kb.ld(F32, p, i));
        let j = kb.add(c, i);
        emit(kb, j, v, up);
    });
}

/// Columns `c .. c + cnt` for every row of `a` through the runtime's tiled weight-only product
/// `f` ([`abi::ukernel::QGemmFn`]): `emit(r, j, x, up)` receives each product.
#[allow(clippy::too_many_arguments)]
fn qgemm_chunk(
    kb: &mut Kb,
    f: Value,
    layout: Layout,
    m: Value,
    k: usize,
    n: usize,
    a: Value,
    b: Value,
    c: Value,
    cnt: Value,
    gated: bool,
    emit: &mut VTileEmit,
) {
    let rb = row_bytes(layout, k) as i64;
    let sig = kb.microkernel_sig(QGEMM_SIG.params, QGEMM_SIG.returns);
    let fmt = kb.ic(qformat(layout).arg());
    let rbv = kb.ic(rb);
    let kv = kb.ic(k as i64);
    let off = kb.muli(c, rb);
    let pb = kb.add(b, off);
    let up = if gated {
        let row0 = kb.addi(c, n as i64);
        let off = kb.muli(row0, rb);
        kb.add(b, off)
    } else {
        kb.ic(0)
    };
    let call = kb.b.ins().call_indirect(sig, f, &[fmt, a, kv, m, pb, rbv, kv, cnt, up]);
    let t = kb.b.inst_results(call)[0];
    // Tile row stride: `cnt` rounded up to a panel; the up tile is `m` rows on.
    let ldt = kb.addi(cnt, PANEL as i64 - 1);
    let ldt = kb.b.ins().band_imm_s(ldt, !(PANEL as i64 - 1));
    let ldtb = kb.muli(ldt, 4);
    let upoff = kb.mul(m, ldtb);
    let z = kb.ic(0);
    kb.for_steps(z, m, 1, &mut |kb, r| {
        let tr = kb.mul(r, ldtb);
        let pt = kb.add(t, tr);
        kb.vloop(cnt, 1, &mut |kb, ty, i, _| {
            let x = kb.ld(ty, pt, i);
            let u = gated.then(|| {
                let pu = kb.add(pt, upoff);
                kb.ld(ty, pu, i)
            });
            let j = kb.add(c, i);
            emit(kb, ty, r, j, x, u);
        });
    });
}

/// The generated (128-bit) weight-only product over output columns `[lo, hi)`.
#[allow(clippy::too_many_arguments)]
fn generated_gemm(
    kb: &mut Kb,
    layout: Layout,
    m: Value,
    k: usize,
    n: usize,
    a: Value,
    b: Value,
    o: Value,
    epi: &Epi,
    lo: Value,
    hi: Value,
) {
    let rb = row_bytes(layout, k) as i64;
    let kpad = k.div_ceil(32) * 32;
    let gated = matches!(epi, Epi::Gated { .. });
    let mut bufs = Vec::new();
    for _ in 0..(1 + gated as usize) {
        let slot =
            kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (4 * kpad).max(16) as u32, 6));
        bufs.push(kb.b.ins().stack_addr(I64, slot, 0));
    }
    let kbytes = 4 * k as i64;
    let one = kb.b.ins().icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::Equal, m, 1);
    // Decode (M = 1): fused dequantize-and-dot, each packed byte read once from memory.
    kb.if_else(
        one,
        &mut |kb| {
            kb.for_steps(lo, hi, 1, &mut |kb, j| {
                let off = kb.muli(j, rb);
                let prow = kb.add(b, off);
                let x = fused_dot(kb, layout, k, prow, a);
                let up = gated.then(|| {
                    let pu = kb.addi(prow, rb * n as i64);
                    fused_dot(kb, layout, k, pu, a)
                });
                let y = epilogue(kb, epi, F32, x, up, j, j);
                kb.st(y, o, j);
            });
        },
        &mut |kb| {
            // M > 1: each packed row dequantized once into the stack, then reused for every row of `a`.
            kb.for_steps(lo, hi, 1, &mut |kb, j| {
                let off = kb.muli(j, rb);
                let prow = kb.add(b, off);
                dequant_row(kb, layout, k, prow, bufs[0]);
                if gated {
                    let pu = kb.addi(prow, rb * n as i64);
                    dequant_row(kb, layout, k, pu, bufs[1]);
                }
                let z = kb.ic(0);
                kb.for_steps(z, m, 1, &mut |kb, r| {
                    let ar = kb.muli(r, kbytes);
                    let ar = kb.add(a, ar);
                    let kv = kb.ic(k as i64);
                    let x = kb.dot(ar, bufs[0], kv);
                    let up = gated.then(|| kb.dot(ar, bufs[1], kv));
                    let oi = kb.muli(r, n as i64);
                    let oi = kb.add(oi, j);
                    let y = epilogue(kb, epi, F32, x, up, j, oi);
                    kb.st(y, o, oi);
                });
            });
        },
    );
}

/// The packed kernel for node `n` (a product whose right-hand side is stored as `layout`).
/// The packed kernel for node `n` (a product whose right-hand side is stored as `layout`). With
/// `ukernels` the kernel receives the microkernel table after its output buffer and calls the
/// runtime's quantized GEMV where this CPU has one.
pub(crate) fn packed_product(kb: &mut Kb, g: &Graph, n: NodeId, layout: Layout, ukernels: bool) {
    let ins = g.inputs(n);
    let at = g.ty(ins[0]).clone();
    let bt = g.ty(ins[1]).clone();
    let (rows, k) = (bt.shape[0].as_const().unwrap_or(0), bt.shape[1].as_const().unwrap_or(0));
    let m = kb.dims(&at.shape[..at.rank() - 1]);
    let a = kb.buf(0);
    let b = kb.buf(1);
    let (bias, act, residual) = match g.op(n) {
        Op::Linear { bias, act, residual, .. } => (*bias, *act, *residual),
        _ => (false, None, false),
    };
    let mut next = 2;
    let mut take = |kb: &mut Kb, yes: bool| {
        yes.then(|| {
            next += 1;
            kb.buf(next - 1)
        })
    };
    let bias_p = take(kb, bias);
    let res_p = take(kb, residual);
    let o = kb.buf(next);
    let qk = ukernels.then(|| {
        let table = kb.buf(next + 1);
        let slot = if layout.quantizes_activations() { ukernel::QGEMV_A8 } else { ukernel::QGEMV };
        kb.b.ins().load(I64, MemFlagsData::trusted().with_readonly(), table, (8 * slot) as i32)
    });
    let qgemm = ukernels.then(|| {
        let table = kb.buf(next + 1);
        let slot = if layout.quantizes_activations() { ukernel::QGEMM_A8 } else { ukernel::QGEMM };
        kb.b.ins().load(I64, MemFlagsData::trusted().with_readonly(), table, (8 * slot) as i32)
    });
    let (cols, epi) = match g.op(n) {
        Op::Linear { .. } => (rows, Epi::Linear { bias: bias_p, act, res: res_p }),
        Op::GatedLinear { act } => (rows / 2, Epi::Gated { act: *act }),
        _ => (rows, Epi::Plain),
    };
    // The A8 product of f32 rows (quantized by the runtime), where the runtime has one.
    let qrows = (ukernels && layout.quantizes_activations()).then(|| {
        let table = kb.buf(next + 1);
        kb.b.ins().load(I64, MemFlagsData::trusted().with_readonly(), table, (8 * ukernel::QGEMM_A8_ROWS) as i32)
    });
    packed_gemm(kb, layout, m, k, cols, a, b, o, epi, qk, qgemm, qrows);
}
