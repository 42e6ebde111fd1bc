//! Data movement: transpose, slice, gather, the KV-cache append, positions.
//!
//! Transpose and slice become one strided copy: output dims (extent-1 dims dropped, dims that stay
//! adjacent in the source merged) with a source stride each; the innermost dim is a vector
//! `memcpy` when its source stride is 1 and a scalar gather otherwise. Copies move bits (f32 and
//! i32 alike).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::F32;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use llmc_ir::{Dim, Graph, NodeId};

use super::builder::{Kb, Mono};
use super::elementwise::CHUNK;
use crate::error::{CodegenError, Result};

/// Copies the view `src[sum_d i_d * sstr[d]]` for `i` in `sizes` (row-major) into contiguous `dst`.
fn strided_copy(kb: &mut Kb, src: Value, dst: Value, sizes: &[Mono], sstr: &[Mono]) {
    let nd = sizes.len();
    let mut dstr = vec![Mono::one(); nd];
    for d in (0..nd.saturating_sub(1)).rev() {
        dstr[d] = dstr[d + 1].mul(&sizes[d + 1]);
    }
    let (inner, inner_src) = match nd {
        0 => (Mono::one(), Mono::one()),
        _ => (sizes[nd - 1].clone(), sstr[nd - 1].clone()),
    };
    let no = nd.saturating_sub(1);
    let outer: Vec<Value> = sizes[..no].iter().map(|m| kb.mono(m)).collect();
    let ss: Vec<Value> = sstr[..no].iter().map(|m| kb.mono(m)).collect();
    let ds: Vec<Value> = dstr[..no].iter().map(|m| kb.mono(m)).collect();
    let innerv = kb.mono(&inner);
    let contiguous = inner_src == Mono::one();
    let istr = kb.mono(&inner_src);
    let one = kb.ic(1);
    kb.rows(&outer, &[ss, ds], innerv, &[istr, one], Some(CHUNK), &mut |kb, offs, _, len| {
        let sp = kb.addr(src, offs[0]);
        let dp = kb.addr(dst, offs[1]);
        if contiguous {
            kb.vloop(len, 2, &mut |kb, ty, i, _| {
                let v = kb.ld(ty, sp, i);
                kb.st(v, dp, i);
            });
        } else {
            let z = kb.ic(0);
            kb.for_steps(z, len, 1, &mut |kb, i| {
                let si = kb.mul(i, istr);
                let v = kb.ld(F32, sp, si);
                kb.st(v, dp, i);
            });
        }
    });
}

pub(crate) fn transpose(kb: &mut Kb, g: &Graph, n: NodeId, perm: &[usize]) {
    let x = g.ty(g.inputs(n)[0]).shape.clone();
    let mut sizes: Vec<Mono> = Vec::new();
    let mut sstr: Vec<Mono> = Vec::new();
    for &p in perm {
        if x[p] == Dim::N(1) {
            continue;
        }
        let size = Mono::of(x[p]);
        let st = Mono::prod(&x[p + 1..]);
        if let Some(last) = sstr.last() {
            if *last == st.mul(&size) {
                let l = sizes.len() - 1;
                sizes[l] = sizes[l].mul(&size);
                sstr[l] = st;
                continue;
            }
        }
        sizes.push(size);
        sstr.push(st);
    }
    let src = kb.buf(0);
    let dst = kb.buf(1);
    strided_copy(kb, src, dst, &sizes, &sstr);
}

pub(crate) fn slice(kb: &mut Kb, g: &Graph, n: NodeId, axis: usize, start: usize, end: usize) {
    let x = g.ty(g.inputs(n)[0]).shape.clone();
    let inner = Mono::prod(&x[axis + 1..]);
    let outer = Mono::prod(&x[..axis]);
    let src = kb.buf(0);
    let dst = kb.buf(1);
    let off = kb.mono(&inner.mul(&Mono::of(Dim::N(start))));
    let src = kb.addr(src, off);
    let row = inner.mul(&Mono::of(Dim::N(end - start)));
    let sstr = inner.mul(&Mono::of(x[axis]));
    strided_copy(kb, src, dst, &[outer, row], &[sstr, Mono::one()]);
}

/// Writes the `S` rows of `x` at row `p` of the state buffer (the output pointer). A step that
/// would overflow the state's `C` rows writes nothing (the runtime never asks for one; this keeps
/// a bug from corrupting memory).
pub(crate) fn kv_concat(kb: &mut Kb, g: &Graph, n: NodeId, state: &str) -> Result<()> {
    // Rows `P..P+S` at `P * row`: a contiguous cache, or int8 codes and scales.
    let int8 = super::kv8::Int8State::of_value(g, n, "the CPU kv_concat kernel")?;
    let cap = g.state(state).and_then(|d| d.ty.shape.first().and_then(|d| d.as_const())).ok_or_else(|| {
        CodegenError::Unsupported {
            node: format!("kv_concat (node {})", n.index()),
            msg: format!("state @{state} is not declared with a constant row count"),
        }
    })?;
    let x = g.ty(g.inputs(n)[0]).shape.clone();
    let row = Mono::prod(&x[1..]);
    let src = kb.buf(0);
    let dst = kb.buf(1);
    let t = kb.dim(Dim::T);
    let capv = kb.ic(cap as i64);
    let fits = kb.b.ins().icmp(IntCC::SignedLessThanOrEqual, t, capv);
    kb.if_else(
        fits,
        &mut |kb| match int8 {
            None => {
                let rowv = kb.mono(&row);
                let off = kb.mul(kb.p, rowv);
                let dst = kb.addr(dst, off);
                strided_copy(kb, src, dst, &[Mono::prod(&x)], &[Mono::one()]);
            }
            // Every vector of this step's rows quantized, the vectors split across the parts.
            Some(st) => {
                let per_row = st.per_row() as i64;
                let total = kb.muli(kb.s, per_row);
                let (lo, hi) = kb.part_range(total);
                kb.for_steps(lo, hi, 1, &mut |kb, i| {
                    // Vector `i` of the step is vector `P * per_row + i` of the cache.
                    let from = kb.muli(i, (st.d * 4) as i64);
                    let from = kb.add(src, from);
                    let pv = kb.muli(kb.p, per_row);
                    let vi = kb.add(pv, i);
                    let (codes, scale) = st.vector(kb, dst, vi);
                    super::kv8::quantize_vec(kb, st.d, from, codes, scale);
                });
            }
        },
        &mut |_| {},
    );
    Ok(())
}

pub(crate) fn gather(kb: &mut Kb, g: &Graph, n: NodeId) {
    let ins = g.inputs(n);
    let h = g.ty(ins[0]).shape[1];
    let nids = kb.dims(&g.ty(ins[1]).shape);
    let hv = kb.dim(h);
    let table = kb.buf(0);
    let ids = kb.buf(1);
    let out = kb.buf(2);
    let one = kb.ic(1);
    kb.rows(&[nids], &[vec![one], vec![hv]], hv, &[one, one], None, &mut |kb, offs, _, len| {
        let ip = kb.addr(ids, offs[0]);
        let id = kb.b.ins().sload32(MemFlagsData::new().with_notrap(), ip, 0);
        let ro = kb.mul(id, hv);
        let sp = kb.addr(table, ro);
        let dp = kb.addr(out, offs[1]);
        kb.vloop(len, 2, &mut |kb, ty, i, _| {
            let v = kb.ld(ty, sp, i);
            kb.st(v, dp, i);
        });
    });
}

pub(crate) fn positions(kb: &mut Kb) {
    let out = kb.buf(0);
    let one = kb.ic(1);
    let s = kb.s;
    kb.rows(&[], &[vec![]], s, &[one], Some(CHUNK), &mut |kb, offs, _, len| {
        let base = kb.add(kb.p, offs[0]);
        let dp = kb.addr(out, offs[0]);
        let z = kb.ic(0);
        kb.for_steps(z, len, 1, &mut |kb, i| {
            let v = kb.add(base, i);
            let a = kb.addr(dp, i);
            kb.b.ins().istore32(MemFlagsData::new().with_notrap(), v, a, 0);
        });
    });
}
