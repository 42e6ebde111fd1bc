//! Products with a compile-time weight (f32, or bf16/f16 widened exactly in the microkernel)
//! through the runtime's panel GEMM microkernels.
//!
//! A weight (or compile-time concat of weights) whose every use is the right-hand side of
//! `matmul {transpose_b}`, `linear {transpose_b}` or `gated_linear` is stored in the runtime's
//! panel layout ([`abi::panel`]; [`panel_groups`] decides, for the memory plan and for the
//! kernel alike). Its kernels do no arithmetic of their own on the product: for each column chunk
//! of [`NCH`] columns in this part's share they call the table entry of the panels' element type
//! (`abi::ukernel::GEMM_PANELS`, `GEMM_PANELS_BF16` or `GEMM_PANELS_F16`; AVX-512, AVX2 or
//! portable, chosen by the runtime) with every row of `a`,
//! then apply the epilogue (bias, activation, gate x up, residual) to the returned tile, which is
//! still in L1/L2, storing each output element once.
//!
//! ABI: such a kernel receives the microkernel table as its last buffer, `bufs[arity + 1]` (see
//! [`super::KernelCode::ukernels`]). Parts own disjoint column chunks; `M` (all leading dims of
//! `a`) may be symbolic, `N` and `K` are the weight's constant dims.

use cranelift_codegen::ir::types::{F32, I32, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData};
use llmc_ir::{DType, Graph, NodeId, Op, UnaryOp};
use abi::panel::{panel_group_len, PANEL};
use abi::panel::PanelElem;
use abi::ukernel::GEMM_PANELS_SIG;

use super::builder::Kb;
use super::{math, quant, unsupported};
use crate::error::Result;

/// Output columns per microkernel call (a multiple of [`PANEL`]): small enough that a part's
/// share splits evenly at `N = 768` and the tile (`M x NCH` floats) stays in L2 for `M <= 512`.
pub const NCH: i64 = 64;

/// Whether `x` is known at compile time (weights, constants, reshapes and concats of them), as
/// the memory plan decides.
fn is_data(g: &Graph, x: NodeId) -> bool {
    match g.op(x) {
        Op::Weight { .. } | Op::Const { .. } => true,
        Op::Reshape => is_data(g, g.inputs(x)[0]),
        Op::Concat { .. } => g.inputs(x).iter().all(|&i| is_data(g, i)),
        _ => false,
    }
}

/// `Some(groups)` when the data node `x` (a weight or a compile-time concat) is stored in the panel
/// layout: an f32 `[R, K]` value, not quantization-packed, not a graph output, whose every use is
/// operand 1 of a row-wise product (`groups` = 1 for `matmul`/`linear`, 2 for `gated_linear`, all
/// uses agreeing) or, with at least one product, the table of a `gather` (a tied embedding and LM
/// head, stored once: [`gather_panels`] reads its rows).
pub fn panel_groups(g: &Graph, x: NodeId) -> Option<usize> {
    let data = match g.op(x) {
        Op::Weight { .. } => true,
        Op::Concat { .. } => is_data(g, x),
        _ => false,
    };
    let t = g.ty(x);
    if !data || t.dtype != DType::F32 || t.rank() != 2 || g.outputs.contains(&x) || quant::packed_layout(g, x).is_some() {
        return None;
    }
    let (rows, k) = (t.shape[0].as_const()?, t.shape[1].as_const()?);
    let users = g.users(x);
    if rows == 0 || k == 0 || users.is_empty() {
        return None;
    }
    let mut groups = None;
    let mut gathered = false;
    for u in users {
        let gu = match g.op(u) {
            Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } => 1,
            Op::GatedLinear { .. } => 2,
            Op::Gather if g.inputs(u).iter().enumerate().all(|(s, &i)| i != x || s == 0) => {
                gathered = true;
                continue;
            }
            _ => return None,
        };
        if g.inputs(u).iter().enumerate().any(|(s, &i)| i == x && s != 1) || groups.is_some_and(|x| x != gu) {
            return None;
        }
        groups = Some(gu);
    }
    groups.filter(|&gr| rows % gr == 0 && !(gathered && gr != 1))
}

/// `gather` from a table stored in the panel layout (one group; f32, bf16 or f16 elements): row
/// `r` is lane `r % 16` of panel `r / 16`, its element `k` at `16 k` elements into the panel;
/// each element is widened exactly to f32 (bf16: the top half of an f32; f16: rebased exponent,
/// subnormals through an exact multiply, infinities and NaNs kept). Parts split the ids. Ids are
/// in range: the runtime checks them before a step.
pub(crate) fn gather_panels(kb: &mut Kb, g: &Graph, n: NodeId, elem: PanelElem) {
    let ins = g.inputs(n);
    let h = g.ty(ins[0]).shape[1].as_const().unwrap_or(0) as i64;
    let nids = kb.dims(&g.ty(ins[1]).shape);
    let (table, ids, out) = (kb.buf(0), kb.buf(1), kb.buf(2));
    let eb = elem.bytes() as i64;
    let hv = kb.ic(h);
    let one = kb.ic(1);
    kb.rows(&[nids], &[vec![one], vec![hv]], hv, &[one, one], None, &mut |kb, offs, _, len| {
        let ip = kb.addr(ids, offs[0]);
        let id = kb.b.ins().sload32(MemFlagsData::new().with_notrap(), ip, 0);
        let panel = kb.b.ins().ushr_imm_s(id, 4);
        let lane = kb.b.ins().band_imm_s(id, PANEL as i64 - 1);
        let po = kb.muli(panel, PANEL as i64 * h * eb);
        let lo = kb.muli(lane, eb);
        let base = kb.add(table, po);
        let base = kb.add(base, lo);
        let dp = kb.addr(out, offs[1]);
        let z = kb.ic(0);
        kb.for_steps(z, len, 1, &mut |kb, j| {
            let off = kb.muli(j, PANEL as i64 * eb);
            let a = kb.add(base, off);
            let fl = MemFlagsData::new().with_notrap();
            let v = match elem {
                PanelElem::F32 => kb.b.ins().load(F32, fl, a, 0),
                PanelElem::BF16 => {
                    let w = kb.b.ins().uload16(I32, fl, a, 0);
                    let w = kb.b.ins().ishl_imm_s(w, 16);
                    kb.b.ins().bitcast(F32, MemFlagsData::new(), w)
                }
                PanelElem::F16 => {
                    let w = kb.b.ins().uload16(I32, fl, a, 0);
                    kb.f16_to_f32(w)
                }
            };
            kb.st(v, dp, j);
        });
    });
}


/// The kernel of `matmul`, `linear` or `gated_linear` node `n` whose operand 1 is a panel weight in
/// `groups` groups.
pub(crate) fn panel_product(kb: &mut Kb, g: &Graph, n: NodeId, groups: usize, elem: PanelElem) -> Result<()> {
    let ins = g.inputs(n);
    let (bias, act, residual, gate): (bool, Option<UnaryOp>, bool, Option<UnaryOp>) = match g.op(n) {
        Op::Linear { bias, act, residual, .. } => (*bias, *act, *residual, None),
        Op::GatedLinear { act } => (false, None, false, Some(*act)),
        Op::Matmul { .. } => (false, None, false, None),
        other => return Err(unsupported(g, n, format!("{} has no panel kernel", other.name()))),
    };
    if (groups == 2) != gate.is_some() {
        return Err(unsupported(g, n, format!("weight in {groups} panel group(s) for this op")));
    }
    let at = g.ty(ins[0]);
    let wt = g.ty(ins[1]);
    let (Some(rows), Some(k)) = (wt.shape[0].as_const(), wt.shape[1].as_const()) else {
        return Err(unsupported(g, n, "panel weight with symbolic dims"));
    };
    let nn = (rows / groups) as i64;
    let m = kb.dims(&at.shape[..at.rank() - 1]);
    let a = kb.buf(0);
    let bp = kb.buf(1);
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
    let table = kb.buf(next + 1);
    let res = res_p.map(|r| kb.sub(r, o));
    let flags = MemFlagsData::trusted().with_readonly();
    // The f32 and 16-bit panel GEMMs take the same arguments (`GEMM_PANELS16_SIG`).
    let fptr = kb.b.ins().load(I64, flags, table, (8 * elem.slot()) as i32);
    let sig = kb.microkernel_sig(GEMM_PANELS_SIG.params, GEMM_PANELS_SIG.returns);

    let kv = kb.ic(k as i64);
    let up = if gate.is_some() {
        let glen = panel_group_len(nn as usize, k) as i64;
        kb.addi(bp, elem.bytes() as i64 * glen)
    } else {
        kb.ic(0)
    };
    let nnv = kb.ic(nn);
    let nbytes = kb.ic(4 * nn);
    let chunks = kb.ic((nn + NCH - 1) / NCH);
    let (lo, hi) = kb.part_range(chunks);
    let ncw = kb.ic(NCH);
    kb.for_steps(lo, hi, 1, &mut |kb, ch| {
        let c0 = kb.muli(ch, NCH);
        let left = kb.sub(nnv, c0);
        let cols = kb.min(left, ncw);
        let call = kb.b.ins().call_indirect(sig, fptr, &[a, kv, bp, kv, m, c0, cols, up]);
        let t = kb.b.inst_results(call)[0];
        // Tile row stride: `cols` rounded up to a panel, in bytes; the up tile is `m` rows on.
        let ldt = kb.addi(cols, PANEL as i64 - 1);
        let ldt = kb.b.ins().band_imm_s(ldt, !(PANEL as i64 - 1));
        let ldtb = kb.muli(ldt, 4);
        let upoff = kb.mul(m, ldtb);
        let pbias = bias_p.map(|p| kb.addr(p, c0));
        let po0 = kb.addr(o, c0);
        let z = kb.ic(0);
        kb.for_steps(z, m, 1, &mut |kb, r| {
            let tr = kb.mul(r, ldtb);
            let pt = kb.add(t, tr);
            let orow = kb.mul(r, nbytes);
            let po = kb.add(po0, orow);
            kb.vloop(cols, 2, &mut |kb, ty, i, _| {
                let mut y = kb.ld(ty, pt, i);
                if let Some(u) = gate {
                    let pu = kb.add(pt, upoff);
                    let upv = kb.ld(ty, pu, i);
                    let gv = math::unary(kb, ty, u, y);
                    y = kb.fmul(gv, upv);
                }
                if let Some(pb) = pbias {
                    let bv = kb.ld_ro(ty, pb, i);
                    y = kb.fadd(y, bv);
                }
                if let Some(u) = act {
                    y = math::unary(kb, ty, u, y);
                }
                if let Some(d) = res {
                    let pr = kb.add(po, d);
                    let rv = kb.ld_ro(ty, pr, i);
                    y = kb.fadd(y, rv);
                }
                kb.st(y, po, i);
            });
        });
    });
    Ok(())
}
