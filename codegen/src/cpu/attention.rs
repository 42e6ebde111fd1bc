//! Flash-style attention with grouped KV heads: `(q [S, NH, D], k [K, NKV, D],
//! v [K, NKV, D]) -> [S, NH, D]`, never materializing an `S x K` score matrix. Keys and values
//! come from contiguous KV caches (row `t` at `t * NKV * D`) or this step's values; a state of
//! another layout is refused, naming it. Causal attention
//! reads `K = T` cached keys up to the query's position; bidirectional attention (encoders) reads
//! all `K` keys (`S` of this step, or `T`) for every query.
//!
//! A work item is one query row `s` and one group of up to [`GMAX`] query heads that share a KV
//! head (`G = NH / NKV` heads per KV head; groups of the largest divisor of `G` that is at most
//! `GMAX`). Its visible keys `lo..=P+s` (`lo = P+s+1-w` with a window `w`, else 0; `0..K` when
//! bidirectional) are processed in
//! blocks of `BT` keys (`BT * D` about 4096 floats, so a block of `k` and of `v` stays in L1):
//! 1. scores `scale * q[h] . k[t]` for every head of the group, into a `[heads, BT]` stack buffer;
//!    each loaded `k` vector meets every head's `q` (up to 8 `f32x4` accumulators: 4 keys x 1-2
//!    heads, 2 keys x 3-4 heads), one horizontal sum per score;
//! 2. online softmax per head: block max, `m' = max(m, block max)`, `p = exp(score - m')` stored
//!    over the scores and summed, `l' = l e^{m - m'} + sum p`, the accumulator rescaled by
//!    `e^{m - m'}`;
//! 3. `acc[h] += sum_t p[h, t] v[t]`: the `[heads, D]` accumulator lives on the stack (in L1) and is
//!    updated four keys per load/store of each of its vectors.
//!
//! When the runtime's microkernels are in use (the default; not with `--no-microkernels`), steps
//! 1-3 over all of an item's keys are one call of the table's attention block
//! (`abi::ukernel::ATTN_BLOCK`, AVX-512 in `runtime/src/akernel.rs`) on a stack state of `acc`,
//! `m`, `l` per head; the rest of the kernel (items, chunks, the epilogue, the merge) is the same.
//! A long causal step (no window) then goes in blocks of up to 16 query rows instead
//! ([`blocked_rows`]): one call for the keys every row of the block sees, so each key block is
//! read once per block of rows, then each row's few diagonal keys.
//!
//! **Int8 caches** (`kv<int8>`, `cpu/kv8.rs`): with the microkernels an item's keys go to the
//! table's int8 block (`abi::ukernel::ATTN_BLOCK_I8`), which reads codes and scales and widens 16
//! keys at a time into L1 rows for the f32 block; without them each block of `BT` keys is
//! dequantized into stack rows of `D` floats before steps 1-3 read it.
//!
//! At the end `out = acc / l` (0 when no key is visible, as the reference gives). `D` is a
//! compile-time constant: the dot products loop over it two `f32x4` steps at a time (so every
//! accumulator advances each iteration and the loads stay in order: pure loads would be hoisted
//! by Cranelift and spilled), the other loops over it are unrolled (up to 256); a scalar tail
//! handles `D % 4 != 0`. Items are ordered KV head major, and within a head the query rows
//! alternate from both ends (`0, S-1, 1, S-2, ..`) so that each part's contiguous share of items
//! carries about the same causal work.
//!
//! **Split over the key range (flash-decoding).** A decode step has `S * NKV * (G / heads per
//! item)` items: 3 for a model with 3 KV heads, so 2 threads split it 2:1 and 16 threads leave
//! 13 idle. When a causal node has fewer than [`SPLIT_ITEMS`] items per query row, steps of at
//! most `smax = SPLIT_ITEMS / items per row` rows divide each item's keys into `C = min(ceil(T /
//! BT), CMAX)` chunks of `ceil(T / C)` positions (chunk `c` covers positions `[c L, (c+1) L)`
//! intersected with the row's visible keys, possibly empty) and the node runs as two kernels
//! (phases, with the runtime's barrier between them):
//! 1. [`attention`]: every (item, chunk) computes its partial `m`, `l` and unnormalized `acc`
//!    as above and writes them to the node's scratch (`[smax, NH, CMAX, D + 2]` f32: `acc`, `m`,
//!    `l`);
//! 2. [`attention_merge`]: every (row, head) merges its `C` partials: `M = max m_c`,
//!    `w_c = e^{m_c - M}` (0 for an empty chunk), `out = sum w_c acc_c / sum w_c l_c`.
//!
//! `C` depends only on `S` and `T`, never on `nparts`: the result is the same at any thread count.
//! Outside the split (`S > smax`, or `C = 1`) phase 1 writes the output directly and phase 2 does
//! nothing.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, I64};
use abi::ukernel::{ATTN_BLOCK, ATTN_BLOCK_I8, ATTN_BLOCK_I8_SIG, ATTN_BLOCK_SIG};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Type, Value};
use cranelift_frontend::Variable;
use llmc_ir::{Dim, Graph, NodeId};

use super::builder::{Kb, V4};
use super::kv8::{self, Int8State};
use super::math;
use super::norm::row_sum;
use super::unsupported;
use crate::error::Result;

/// Most query heads one work item handles.
const GMAX: usize = 8;
/// Loops over `D` are unrolled up to this many elements.
const UNROLL_D: usize = 256;
/// A causal node whose query rows have fewer items than this splits small steps over the key
/// range.
const SPLIT_ITEMS: usize = 16;
/// Most key chunks per item in a split step.
pub(crate) const CMAX: usize = 16;
/// With an int8 cache and the microkernels, a step of at least this many query rows reads the
/// cache widened to f32 once, by a phase before the attention ([`int8_widen`]), instead of every
/// row widening every key it sees.
pub(crate) const WIDEN_ROWS: i64 = 8;

/// The scratch an int8-cache attention adds after the split's partials: the whole K and V caches
/// as f32 rows (`(offset, bytes)`), or `None` when the node reads no int8 cache or runs without
/// the microkernels.
pub(crate) fn int8_widen_scratch(g: &Graph, n: NodeId, split: Option<Split>, ukernel: bool) -> Result<Option<(u64, u64)>> {
    let Some(k8) = Int8State::of_value(g, g.inputs(n)[1], "the CPU attention kernel")? else { return Ok(None) };
    if !ukernel {
        return Ok(None);
    }
    let off = split.map_or(0, |sp| sp.scratch_bytes()).div_ceil(64) * 64;
    Ok(Some((off, 2 * (k8.rows * k8.row * 4) as u64)))
}

/// Phase 0 of an attention node over int8 caches (with the microkernels): in a step of at least
/// [`WIDEN_ROWS`] rows, every vector of cache rows `0..T` of K and then V, widened to f32
/// (`code * scale`, the values the reference holds) into the scratch at `off` (K's `C` rows, then
/// V's); nothing in a smaller step.
pub(crate) fn int8_widen(kb: &mut Kb, g: &Graph, n: NodeId, off: u64) -> Result<()> {
    let ins = g.inputs(n);
    let (Some(k8), Some(v8)) = (Int8State::of_value(g, ins[1], "the CPU attention kernel")?, Int8State::of_value(g, ins[2], "the CPU attention kernel")?)
    else {
        return Err(unsupported(g, n, "int8_widen without int8 caches"));
    };
    let (k, v, scratch) = (kb.buf(1), kb.buf(2), kb.buf(5));
    let per_row = k8.per_row() as i64;
    let t = kb.add(kb.s, kb.p);
    let vecs = kb.muli(t, per_row);
    let total = kb.muli(vecs, 2);
    let big = kb.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, kb.s, WIDEN_ROWS);
    let zero = kb.ic(0);
    let total = kb.b.ins().select(big, total, zero);
    let (lo, hi) = kb.part_range(total);
    let d = k8.d;
    kb.for_steps(lo, hi, 1, &mut |kb, i| {
        // Vector `i` of K's rows `0..T`, then of V's (K's `C` rows of f32 first in the scratch).
        let is_v = kb.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, i, vecs);
        let iv = kb.sub(i, vecs);
        let vi = kb.b.ins().select(is_v, iv, i);
        let (kc, ks) = k8.vector(kb, k, vi);
        let (vc, vs) = v8.vector(kb, v, vi);
        let codes = kb.b.ins().select(is_v, vc, kc);
        let scale = kb.b.ins().select(is_v, vs, ks);
        let half = kb.ic((k8.rows * k8.row * 4) as i64);
        let zo = kb.ic(0);
        let base = kb.b.ins().select(is_v, half, zo);
        let base = kb.addi(base, off as i64);
        let dof = kb.muli(vi, (d * 4) as i64);
        let dst = kb.add(base, dof);
        let dst = kb.add(scratch, dst);
        kv8::dequant_vec(kb, d, codes, scale, dst);
    });
    Ok(())
}

/// How an attention node splits over the key range: steps of at most `smax` rows, chunks of at
/// least `bt` keys. `None`: the node never splits (one kernel, no scratch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    smax: usize,
    bt: usize,
    nh: usize,
    d: usize,
}

impl Split {
    /// Scratch bytes of the partials: `[smax, NH, CMAX, D + 2]` f32.
    pub(crate) fn scratch_bytes(&self) -> u64 {
        (self.smax * self.nh * CMAX * (self.d + 2) * 4) as u64
    }
}

/// Head layout `(NH, D, NKV, heads per item, items per query row)`.
fn heads(g: &Graph, n: NodeId) -> Result<(usize, usize, usize, usize, usize)> {
    let ins = g.inputs(n);
    let (qt, kt) = (g.ty(ins[0]), g.ty(ins[1]));
    let (Some(nh), Some(d), Some(nkv)) = (qt.shape[1].as_const(), qt.shape[2].as_const(), kt.shape[1].as_const())
    else {
        return Err(unsupported(g, n, "head counts and head dim must be constants"));
    };
    if d == 0 || nkv == 0 || nh % nkv != 0 {
        return Err(unsupported(g, n, format!("unsupported head layout NH={nh} NKV={nkv} D={d}")));
    }
    let gsz = nh / nkv;
    let gh = (1..=GMAX.min(gsz)).rev().find(|c| gsz % c == 0).unwrap_or(1);
    Ok((nh, d, nkv, gh, nkv * (gsz / gh)))
}

/// The key-range split of causal attention node `n` with a cache of `max_context` rows.
pub(crate) fn split_of(g: &Graph, n: NodeId, causal: bool, max_context: usize) -> Result<Option<Split>> {
    let (nh, d, _, _, items) = heads(g, n)?;
    let bt = block_keys(d);
    let smax = SPLIT_ITEMS / items;
    Ok((causal && smax > 0 && max_context > bt).then_some(Split { smax, bt, nh, d }))
}

/// This step's chunk count: `min(ceil(T / BT), CMAX)` when `S <= smax`, else 1.
fn chunks(kb: &mut Kb, split: Option<Split>) -> Value {
    let Some(sp) = split else { return kb.ic(1) };
    let t = kb.add(kb.s, kb.p);
    let n = kb.div_ceil(t, sp.bt as i64);
    let cmax = kb.ic(CMAX as i64);
    let n = kb.min(n, cmax);
    let one = kb.ic(1);
    let n = kb.max(n, one);
    let ok = kb.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, kb.s, sp.smax as i64);
    kb.b.ins().select(ok, n, one)
}

/// Runs `body(ty, index)` over `0..d` in `f32x4` steps then an `f32` tail, unrolled when small.
fn dsweep(kb: &mut Kb, d: usize, body: &mut dyn FnMut(&mut Kb, Type, Value)) {
    if d <= UNROLL_D {
        for c in 0..d / 4 {
            let i = kb.ic(4 * c as i64);
            body(kb, V4, i);
        }
        for r in d / 4 * 4..d {
            let i = kb.ic(r as i64);
            body(kb, F32, i);
        }
    } else {
        let dv = kb.ic(d as i64);
        kb.vloop(dv, 1, &mut |kb, ty, i, _| body(kb, ty, i));
    }
}

/// Keys per block for head dim `d`.
fn block_keys(d: usize) -> usize {
    ((4096 / d.max(1)) / 4 * 4).clamp(16, 128)
}

fn stack(kb: &mut Kb, bytes: usize) -> Value {
    let slot = kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes.max(16) as u32, 6));
    kb.b.ins().stack_addr(I64, slot, 0)
}

/// Phase 1 (the whole kernel when `split` is `None`): every item's attention over its keys, or
/// over one chunk of them in a split step (partials to the scratch: `bufs[4]`, or `bufs[5]` after
/// the microkernel table when `ukernel`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    kb: &mut Kb,
    g: &Graph,
    n: NodeId,
    scale: f32,
    window: Option<usize>,
    causal: bool,
    split: Option<Split>,
    ukernel: bool,
) -> Result<()> {
    let ins = g.inputs(n);
    let kt = g.ty(ins[1]);
    let (nh, d, nkv, gh, _) = heads(g, n)?;
    // Key row `t` at `t * kstride` below: a contiguous cache (or this step's keys); an int8 cache
    // is read a block of keys at a time, dequantized into stack rows of `D` floats.
    let k8 = Int8State::of_value(g, ins[1], "the CPU attention kernel")?;
    let v8 = Int8State::of_value(g, ins[2], "the CPU attention kernel")?;
    let int8 = match (k8, v8) {
        (None, None) => None,
        (Some(k8), Some(v8)) if k8.row == nkv * d && v8.row == nkv * d && k8.d == d && v8.d == d => Some((k8, v8)),
        _ => return Err(unsupported(g, n, "keys and values must both come from int8 caches of rows [NKV, D], or neither")),
    };
    // A bidirectional attention's keys are this step's (`[S, ..]`) or the whole cache (`[T, ..]`).
    let keys_are_step = kt.shape[0] == Dim::S;
    if causal && keys_are_step {
        return Err(unsupported(g, n, "causal attention reads its keys from the KV cache ([T, ..])"));
    }
    let gsz = nh / nkv;
    let ng = gsz / gh;
    let bt = block_keys(d);
    let (q, k, v, o) = (kb.buf(0), kb.buf(1), kb.buf(2), kb.buf(3));
    // With the runtime's attention block: its table is `bufs[4]`, the scratch after it.
    let attn_fn = ukernel.then(|| {
        let table = kb.buf(4);
        let flags = MemFlagsData::trusted().with_readonly();
        kb.b.ins().load(I64, flags, table, (8 * ATTN_BLOCK) as i32)
    });
    // And its int8 block, for an int8 cache.
    let attn_i8_fn = (ukernel && int8.is_some()).then(|| {
        let table = kb.buf(4);
        let flags = MemFlagsData::trusted().with_readonly();
        kb.b.ins().load(I64, flags, table, (8 * ATTN_BLOCK_I8) as i32)
    });
    let widen = int8_widen_scratch(g, n, split, ukernel)?;
    let scratch = match (split, widen) {
        (None, None) => kb.ic(0),
        _ => kb.buf(4 + ukernel as usize),
    };
    let astride = if ukernel { d + 2 } else { d };
    // Generated code's score block (the attention block keeps its scores itself).
    let scores = if ukernel { kb.ic(0) } else { stack(kb, gh * bt * 4) };
    let accb = stack(kb, gh * astride * 4);
    let kstride = (nkv * d * 4) as i64; // bytes between key rows
    // An int8 cache's dequantized block of keys and of values, and the stride within a block.
    // (The microkernels read an int8 cache themselves: no stack blocks then.)
    let dq = int8.filter(|_| !ukernel).map(|_| (stack(kb, bt * d * 4), stack(kb, bt * d * 4)));
    let bstride = if int8.is_some() { (d * 4) as i64 } else { kstride };
    let s = kb.s;
    // Chunks per item, and positions per chunk.
    let nc = chunks(kb, split);
    let tk = kb.add(kb.s, kb.p);
    let ncm1 = kb.addi(nc, -1);
    let tk1 = kb.add(tk, ncm1);
    let clen = kb.b.ins().udiv(tk1, nc);
    // A long causal step with the runtime's attention block: blocks of query rows share each
    // key block ([`blocked_rows`]); the per-row items below then number 0.
    let qb = block_rows(d, gh);
    let mut rows_total = kb.ic(1);
    if let (Some(f), true) = (attn_fn, causal && window.is_none() && !keys_are_step && qb >= 4 && (int8.is_none() || widen.is_some())) {
        // (Longer than a split step, which writes partials for the merge instead.)
        let least = (2 * qb).max(split.map_or(0, |sp| sp.smax + 1));
        let big = kb.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, s, least as i64);
        kb.if_else(
            big,
            &mut |kb| {
                // With an int8 cache, the rows phase 0 widened (it runs for every step this long).
                let (kr, vr) = match widen {
                    Some((woff, wbytes)) => {
                        let wk = kb.addi(scratch, woff as i64);
                        (wk, kb.addi(wk, (wbytes / 2) as i64))
                    }
                    None => (k, v),
                };
                blocked_rows(kb, &BlockedRows { nh, d, nkv, gh, ng, qb, scale }, f, q, kr, vr, o);
            },
            &mut |_| {},
        );
        let zero = kb.ic(0);
        rows_total = kb.b.ins().select(big, zero, rows_total);
    }
    let total = kb.muli(s, (nkv * ng) as i64);
    let total = kb.mul(total, nc);
    let total = kb.mul(total, rows_total);
    let (lo, hi) = kb.part_range(total);
    kb.for_steps(lo, hi, 1, &mut |kb, i| {
        let ci = kb.b.ins().urem(i, nc);
        let i = kb.b.ins().udiv(i, nc);
        // Item -> (KV head, head group, query row).
        let (kvh, h0, si) = item(kb, i, s, ng, gsz, gh);
        let row = kb.muli(si, nh as i64);
        let row = kb.add(row, h0);
        let qo = kb.muli(row, d as i64);
        let qbase = kb.addr(q, qo);
        let obase = kb.addr(o, qo);
        let kvo = kb.muli(kvh, d as i64);
        // f32 rows: the head's first key and value (an int8 cache's vectors are found by index).
        let (kbase, vbase) = (kb.addr(k, kvo), kb.addr(v, kvo));
        // The key and value rows of keys `t0..t0+bl` with the stride between them: the cache's
        // rows, or, for an int8 cache, those keys dequantized into the stack blocks.
        let block = &mut |kb: &mut Kb, t0: Value, bl: Value| -> (Value, Value) {
            // An f32 cache (with the microkernels an int8 one never comes here: its block reads
            // the codes itself).
            let Some(((k8, v8), (kdq, vdq))) = int8.zip(dq) else {
                let k0o = kb.muli(t0, kstride);
                return (kb.add(kbase, k0o), kb.add(vbase, k0o));
            };
            let z = kb.ic(0);
            kb.for_steps(z, bl, 1, &mut |kb, j| {
                // Key `t0 + j` of this head: vector `(t0 + j) * NKV + kvh`.
                let t = kb.add(t0, j);
                let vi = kb.muli(t, nkv as i64);
                let vi = kb.add(vi, kvh);
                let dof = kb.muli(j, (d * 4) as i64);
                for (cache, st, out) in [(k, k8, kdq), (v, v8, vdq)] {
                    let (codes, sc) = st.vector(kb, cache, vi);
                    let dst = kb.add(out, dof);
                    kv8::dequant_vec(kb, d, codes, sc, dst);
                }
            });
            (kdq, vdq)
        };
        // Visible keys [tlo, thi).
        let thi = if causal {
            let qpos = kb.add(kb.p, si);
            kb.addi(qpos, 1)
        } else if keys_are_step {
            kb.s
        } else {
            kb.add(kb.s, kb.p)
        };
        let tlo = match window {
            Some(w) => {
                let l = kb.addi(thi, -(w as i64));
                let z = kb.ic(0);
                let l = kb.max(l, z);
                kb.min(l, thi)
            }
            None => kb.ic(0),
        };
        // This item's chunk of them (everything when there is one chunk).
        let c0 = kb.mul(ci, clen);
        let c1 = kb.add(c0, clen);
        let tlo = kb.max(tlo, c0);
        let thi = kb.min(thi, c1);
        let thi = kb.max(thi, tlo);
        // The running state of each head: `acc` (row `hgi` at `hgi * astride` floats of `accb`),
        // `m` and `l`.
        let (mv, lv): (Vec<Value>, Vec<Value>) = if let Some(fptr) = attn_fn {
            // The runtime's attention block over all of this item's keys: state rows of `d + 2`
            // floats (`acc`, `m`, `l`) in `accb`.
            let ninf = kb.fc(F32, f32::NEG_INFINITY);
            let zf = kb.fc(F32, 0.0);
            for hgi in 0..gh {
                let ap = kb.addi(accb, (hgi * astride * 4) as i64);
                dsweep(kb, d, &mut |kb, ty, x| {
                    let z = kb.fc(ty, 0.0);
                    kb.st(z, ap, x);
                });
                kb.st_at(ninf, ap, (d * 4) as i32);
                kb.st_at(zf, ap, (d * 4 + 4) as i32);
            }
            let span = kb.sub(thi, tlo);
            let dims = kb.ic(d as i64 | (gh as i64) << 32);
            let sc = kb.ic(scale.to_bits() as i64);
            let sig = kb.microkernel_sig(ATTN_BLOCK_SIG.params, ATTN_BLOCK_SIG.returns);
            if int8.is_none() {
                let (kp, vp) = block(kb, tlo, span);
                let ksv = kb.ic((nkv * d) as i64);
                kb.b.ins().call_indirect(sig, fptr, &[qbase, kp, vp, ksv, span, dims, sc, accb]);
            } else if let (Some((k8, v8)), Some(f8), Some((woff, wbytes))) = (int8, attn_i8_fn, widen) {
                // A large step: the f32 rows phase 0 widened; a small one: the int8 block reads
                // the codes and scales itself.
                let big = kb.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, kb.s, WIDEN_ROWS);
                kb.if_else(
                    big,
                    &mut |kb| {
                        let wk = kb.addi(scratch, woff as i64);
                        let wv = kb.addi(wk, (wbytes / 2) as i64);
                        let ro = kb.muli(tlo, nkv as i64);
                        let ro = kb.add(ro, kvh);
                        let ro = kb.muli(ro, (d * 4) as i64);
                        let kp = kb.add(wk, ro);
                        let vp = kb.add(wv, ro);
                        let ksv = kb.ic((nkv * d) as i64);
                        kb.b.ins().call_indirect(sig, fptr, &[qbase, kp, vp, ksv, span, dims, sc, accb]);
                    },
                    &mut |kb| {
                        let vi = kb.muli(tlo, nkv as i64);
                        let vi = kb.add(vi, kvh);
                        let (kp, ksc) = k8.vector(kb, k, vi);
                        let (vp, vsc) = v8.vector(kb, v, vi);
                        let ksv = kb.ic((nkv * d) as i64);
                        let ssv = kb.ic(nkv as i64);
                        let sig8 = kb.microkernel_sig(ATTN_BLOCK_I8_SIG.params, ATTN_BLOCK_I8_SIG.returns);
                        kb.b.ins().call_indirect(sig8, f8, &[qbase, kp, vp, ksv, ksc, vsc, ssv, span, dims, sc, accb]);
                    },
                );
            }
            (0..gh)
                .map(|hgi| {
                    let ap = kb.addi(accb, (hgi * astride * 4) as i64);
                    (kb.ld_at(F32, ap, (d * 4) as i32), kb.ld_at(F32, ap, (d * 4 + 4) as i32))
                })
                .unzip()
        } else {
            let ninf = kb.fc(F32, f32::NEG_INFINITY);
            let zf = kb.fc(F32, 0.0);
            let m: Vec<Variable> = (0..gh).map(|_| kb.var(F32, ninf)).collect();
            let l: Vec<Variable> = (0..gh).map(|_| kb.var(F32, zf)).collect();
            dsweep(kb, gh * d, &mut |kb, ty, x| {
                let z = kb.fc(ty, 0.0);
                kb.st(z, accb, x);
            });
            let span = kb.sub(thi, tlo);
            let nblk = kb.div_ceil(span, bt as i64);
            let z = kb.ic(0);
            kb.for_steps(z, nblk, 1, &mut |kb, bi| {
                let t0 = kb.muli(bi, bt as i64);
                let t0 = kb.add(tlo, t0);
                let left = kb.sub(thi, t0);
                let btv = kb.ic(bt as i64);
                let bl = kb.min(left, btv);
                let (kblk, vblk) = block(kb, t0, bl);
                // 1. Scores, in head subgroups of at most 4.
                let mut g0 = 0;
                while g0 < gh {
                    let gq = (gh - g0).min(4);
                    let ku = (8 / gq).clamp(1, 4);
                    let heads: Vec<usize> = (g0..g0 + gq).collect();
                    let zi = kb.ic(0);
                    let e = kb.for_steps(zi, bl, ku as i64, &mut |kb, jj| {
                        scores_tile(kb, d, bt, scale, &heads, ku, qbase, kblk, bstride, scores, jj)
                    });
                    if ku > 1 {
                        kb.for_steps(e, bl, 1, &mut |kb, jj| {
                            scores_tile(kb, d, bt, scale, &heads, 1, qbase, kblk, bstride, scores, jj)
                        });
                    }
                    g0 += gq;
                }
                // 2. Online softmax; 3. accumulate p v.
                for hgi in 0..gh {
                    let sp = kb.addi(scores, (hgi * bt * 4) as i64);
                    let ap = kb.addi(accb, (hgi * d * 4) as i64);
                    let bm = row_max(kb, sp, bl);
                    let m_old = kb.get(m[hgi]);
                    let m_new = kb.fmax(F32, bm, m_old);
                    let dm = kb.fsub(m_old, m_new);
                    let corr = math::exp(kb, F32, dm);
                    let sum = row_sum(kb, bl, &mut |kb, ty, i| {
                        let x = kb.ld(ty, sp, i);
                        let mv = kb.splat(ty, m_new);
                        let dx = kb.fsub(x, mv);
                        let e = math::exp(kb, ty, dx);
                        kb.st(e, sp, i);
                        e
                    });
                    let l_old = kb.get(l[hgi]);
                    let l_new = kb.fma(l_old, corr, sum);
                    kb.set(l[hgi], l_new);
                    kb.set(m[hgi], m_new);
                    dsweep(kb, d, &mut |kb, ty, x| {
                        let a = kb.ld(ty, ap, x);
                        let c = kb.splat(ty, corr);
                        let a = kb.fmul(a, c);
                        kb.st(a, ap, x);
                    });
                    let zi = kb.ic(0);
                    let e = kb.for_steps(zi, bl, 4, &mut |kb, jj| pv_tile(kb, d, 4, sp, ap, vblk, bstride, jj));
                    kb.for_steps(e, bl, 1, &mut |kb, jj| pv_tile(kb, d, 1, sp, ap, vblk, bstride, jj));
                }
            });
            (m.iter().map(|&x| kb.get(x)).collect(), l.iter().map(|&x| kb.get(x)).collect())
        };
        // out = acc / l (0 when nothing was visible).
        let write_out = &mut |kb: &mut Kb| {
            for (hgi, &lv) in lv.iter().enumerate() {
                let ap = kb.addi(accb, (hgi * astride * 4) as i64);
                let op = kb.addi(obase, (hgi * d * 4) as i64);
                normalize(kb, d, ap, lv, op);
            }
        };
        if split.is_none() {
            write_out(kb);
            return;
        }
        // A split step: the partials of heads `h0..h0+gh`, chunk `ci`, to the scratch.
        let one = kb.ic(1);
        let is_split = kb.b.ins().icmp(IntCC::SignedGreaterThan, nc, one);
        kb.if_else(
            is_split,
            &mut |kb| {
                for (hgi, (&mv, &lv)) in mv.iter().zip(&lv).enumerate() {
                    let slot = kb.addi(row, hgi as i64);
                    let slot = kb.muli(slot, CMAX as i64);
                    let slot = kb.add(slot, ci);
                    let base = kb.muli(slot, (d + 2) as i64);
                    let sp = kb.addr(scratch, base);
                    let ap = kb.addi(accb, (hgi * astride * 4) as i64);
                    dsweep(kb, d, &mut |kb, ty, x| {
                        let a = kb.ld(ty, ap, x);
                        kb.st(a, sp, x);
                    });
                    kb.st_at(mv, sp, (d * 4) as i32);
                    kb.st_at(lv, sp, (d * 4 + 4) as i32);
                }
            },
            &mut |kb| write_out(kb),
        );
    });
    Ok(())
}

/// `out[0..d] = acc[0..d] / l` at `op` from the accumulator at `ap` (0 when `l` is not positive:
/// no key was visible).
fn normalize(kb: &mut Kb, d: usize, ap: Value, l: Value, op: Value) {
    let one = kb.fc(F32, 1.0);
    let inv = kb.fdiv(one, l);
    let zf = kb.fc(F32, 0.0);
    let inv = kb.fsel(F32, FloatCC::GreaterThan, l, zf, inv, zf);
    dsweep(kb, d, &mut |kb, ty, x| {
        let a = kb.ld(ty, ap, x);
        let iv = kb.splat(ty, inv);
        let y = kb.fmul(a, iv);
        kb.st(y, op, x);
    });
}

/// Work item `i` of `n` per head group: `(KV head, first query head, row)`. Items go KV head
/// major (then head group); within one, rows alternate from both ends (`0, n-1, 1, n-2, ..`) so
/// that a part's contiguous share carries about the same causal work.
fn item(kb: &mut Kb, i: Value, n: Value, ng: usize, gsz: usize, gh: usize) -> (Value, Value, Value) {
    let hh = kb.b.ins().udiv(i, n);
    let hs = kb.mul(hh, n);
    let j = kb.sub(i, hs);
    let half = kb.b.ins().ushr_imm_s(j, 1);
    let odd = kb.b.ins().band_imm_s(j, 1);
    let nm1 = kb.addi(n, -1);
    let back = kb.sub(nm1, half);
    let row = kb.b.ins().select(odd, back, half);
    let (kvh, hg) = if ng == 1 {
        (hh, kb.ic(0))
    } else {
        let ngv = kb.ic(ng as i64);
        let kvh = kb.b.ins().udiv(hh, ngv);
        let t = kb.muli(kvh, ng as i64);
        (kvh, kb.sub(hh, t))
    };
    let h0 = kb.muli(kvh, gsz as i64);
    let hgo = kb.muli(hg, gh as i64);
    (kvh, kb.add(h0, hgo), row)
}

/// Query rows per block of a blocked causal step: the block's queries and states (`rows x gh`
/// rows of `D` and `D + 2` floats) fit 64 KiB of stack each; at most 16.
fn block_rows(d: usize, gh: usize) -> usize {
    (16384 / (gh * (d + 2)).max(1)).min(16)
}

/// The shape of a blocked causal step ([`blocked_rows`]).
struct BlockedRows {
    nh: usize,
    d: usize,
    nkv: usize,
    gh: usize,
    ng: usize,
    qb: usize,
    scale: f32,
}

/// A causal step of at least `2 qb` rows (no window, keys from the cache, the runtime's attention
/// block `f`): a work item is a block of up to `qb` consecutive query rows `r0..r1` and one
/// group of `gh` heads. Their queries are copied to one stack block of `(r1 - r0) gh` rows, and
/// one call of the attention block runs all of them over the keys every row sees, `0..=P+r0`,
/// so each key block is read once for the whole block of rows (from L1) instead of once per
/// row; then row `r0 + i` alone meets the `i` keys after those (the diagonal). Blocks go KV head
/// major, alternating from both ends of the step as the rows do. `k`, `v`: the f32 rows (the
/// cache, or an int8 cache widened by phase 0), row `t` of KV head `h` at `(t NKV + h) D`.
#[allow(clippy::too_many_arguments)]
fn blocked_rows(kb: &mut Kb, b: &BlockedRows, f: Value, q: Value, k: Value, v: Value, o: Value) {
    let BlockedRows { nh, d, nkv, gh, ng, qb, scale } = *b;
    let gsz = nh / nkv;
    let astride = d + 2;
    let qbuf = stack(kb, qb * gh * d * 4);
    let state = stack(kb, qb * gh * astride * 4);
    let nb = kb.div_ceil(kb.s, qb as i64);
    let total = kb.muli(nb, (nkv * ng) as i64);
    let (lo, hi) = kb.part_range(total);
    let sig = kb.microkernel_sig(ATTN_BLOCK_SIG.params, ATTN_BLOCK_SIG.returns);
    let ksv = kb.ic((nkv * d) as i64);
    let sc = kb.ic(scale.to_bits() as i64);
    let kstride = (nkv * d * 4) as i64;
    kb.for_steps(lo, hi, 1, &mut |kb, i| {
        let (kvh, h0, bi) = item(kb, i, nb, ng, gsz, gh);
        let r0 = kb.muli(bi, qb as i64);
        let left = kb.sub(kb.s, r0);
        let qbv = kb.ic(qb as i64);
        let rows = kb.min(left, qbv);
        // Query row (r0 + i, head h0 + hgi) at element ((r0 + i) NH + h0 + hgi) D.
        let head_row = |kb: &mut Kb, i: Value, base: Value| {
            let r = kb.add(r0, i);
            let row = kb.muli(r, nh as i64);
            let row = kb.add(row, h0);
            let e = kb.muli(row, d as i64);
            kb.addr(base, e)
        };
        let z = kb.ic(0);
        let ninf = kb.fc(F32, f32::NEG_INFINITY);
        let zf = kb.fc(F32, 0.0);
        kb.for_steps(z, rows, 1, &mut |kb, i| {
            let src = head_row(kb, i, q);
            let dst = kb.muli(i, (gh * d * 4) as i64);
            let dst = kb.add(qbuf, dst);
            let st = kb.muli(i, (gh * astride * 4) as i64);
            let st = kb.add(state, st);
            for hgi in 0..gh {
                let (sp, dp, ap) = (kb.addi(src, (hgi * d * 4) as i64), kb.addi(dst, (hgi * d * 4) as i64), kb.addi(st, (hgi * astride * 4) as i64));
                dsweep(kb, d, &mut |kb, ty, x| {
                    let y = kb.ld(ty, sp, x);
                    kb.st(y, dp, x);
                    let zv = kb.fc(ty, 0.0);
                    kb.st(zv, ap, x);
                });
                kb.st_at(ninf, ap, (d * 4) as i32);
                kb.st_at(zf, ap, (d * 4 + 4) as i32);
            }
        });
        let kvo = kb.muli(kvh, (d * 4) as i64);
        let (kh, vh) = (kb.add(k, kvo), kb.add(v, kvo));
        // Keys 0..=P+r0: every row of the block.
        let common = kb.add(kb.p, r0);
        let common = kb.addi(common, 1);
        let all = kb.muli(rows, gh as i64);
        let all = kb.b.ins().ishl_imm_s(all, 32);
        let dims = kb.b.ins().bor_imm_s(all, d as i64);
        kb.b.ins().call_indirect(sig, f, &[qbuf, kh, vh, ksv, common, dims, sc, state]);
        // Row r0 + i: the i keys after those.
        let off = kb.muli(common, kstride);
        let (kd, vd) = (kb.add(kh, off), kb.add(vh, off));
        let one = kb.ic(1);
        let dims1 = kb.ic(d as i64 | (gh as i64) << 32);
        kb.for_steps(one, rows, 1, &mut |kb, i| {
            let qo = kb.muli(i, (gh * d * 4) as i64);
            let qi = kb.add(qbuf, qo);
            let so = kb.muli(i, (gh * astride * 4) as i64);
            let si = kb.add(state, so);
            kb.b.ins().call_indirect(sig, f, &[qi, kd, vd, ksv, i, dims1, sc, si]);
        });
        // out = acc / l.
        kb.for_steps(z, rows, 1, &mut |kb, i| {
            let dst = head_row(kb, i, o);
            let so = kb.muli(i, (gh * astride * 4) as i64);
            let st = kb.add(state, so);
            for hgi in 0..gh {
                let ap = kb.addi(st, (hgi * astride * 4) as i64);
                let lv = kb.ld_at(F32, ap, (d * 4 + 4) as i32);
                let op = kb.addi(dst, (hgi * d * 4) as i64);
                normalize(kb, d, ap, lv, op);
            }
        });
    });
}

/// Phase 2 of a split node: each (query row, head) of a split step merges its chunks' partials
/// from the scratch (the same buffer as phase 1's) into the output; nothing when the step did not
/// split.
pub(crate) fn attention_merge(kb: &mut Kb, split: Split, ukernel: bool) {
    let Split { nh, d, .. } = split;
    let (o, scratch) = (kb.buf(3), kb.buf(4 + ukernel as usize));
    let nc = chunks(kb, Some(split));
    let one = kb.ic(1);
    let is_split = kb.b.ins().icmp(IntCC::SignedGreaterThan, nc, one);
    let rows = kb.muli(kb.s, nh as i64);
    let zero = kb.ic(0);
    let total = kb.b.ins().select(is_split, rows, zero);
    let (lo, hi) = kb.part_range(total);
    let wts = stack(kb, CMAX * 4);
    kb.for_steps(lo, hi, 1, &mut |kb, i| {
        // Item `i` is (row, head) `i`: its partials are the `CMAX` slots from `i * CMAX`.
        let slot = kb.muli(i, CMAX as i64);
        let base = kb.muli(slot, (d + 2) as i64);
        let sp = kb.addr(scratch, base);
        let oo = kb.muli(i, d as i64);
        let op = kb.addr(o, oo);
        let cstride = ((d + 2) * 4) as i64;
        let ninf = kb.fc(F32, f32::NEG_INFINITY);
        let mx = kb.var(F32, ninf);
        let z = kb.ic(0);
        kb.for_steps(z, nc, 1, &mut |kb, c| {
            let off = kb.muli(c, cstride);
            let pc = kb.add(sp, off);
            let mc = kb.ld_at(F32, pc, (d * 4) as i32);
            let cur = kb.get(mx);
            let nx = kb.fmax(F32, mc, cur);
            kb.set(mx, nx);
        });
        let mv = kb.get(mx);
        let zf = kb.fc(F32, 0.0);
        let lsum = kb.var(F32, zf);
        kb.for_steps(z, nc, 1, &mut |kb, c| {
            let off = kb.muli(c, cstride);
            let pc = kb.add(sp, off);
            let mc = kb.ld_at(F32, pc, (d * 4) as i32);
            let lc = kb.ld_at(F32, pc, (d * 4 + 4) as i32);
            let dm = kb.fsub(mc, mv);
            let e = math::exp(kb, F32, dm);
            let zf = kb.fc(F32, 0.0);
            let w = kb.fsel(F32, FloatCC::GreaterThan, lc, zf, e, zf);
            kb.st(w, wts, c);
            let cur = kb.get(lsum);
            let nx = kb.fma(w, lc, cur);
            kb.set(lsum, nx);
        });
        dsweep(kb, d, &mut |kb, ty, x| {
            let z = kb.fc(ty, 0.0);
            kb.st(z, op, x);
        });
        kb.for_steps(z, nc, 1, &mut |kb, c| {
            let off = kb.muli(c, cstride);
            let pc = kb.add(sp, off);
            let w = kb.ld(F32, wts, c);
            dsweep(kb, d, &mut |kb, ty, x| {
                let a = kb.ld(ty, pc, x);
                let cur = kb.ld(ty, op, x);
                let wv = kb.splat(ty, w);
                let y = kb.fma(a, wv, cur);
                kb.st(y, op, x);
            });
        });
        let lv = kb.get(lsum);
        normalize(kb, d, op, lv, op);
    });
}

/// Max of `x[0..len]`, `len >= 1`.
fn row_max(kb: &mut Kb, xp: Value, len: Value) -> Value {
    let ninf_v = kb.fc(V4, f32::NEG_INFINITY);
    let ninf = kb.fc(F32, f32::NEG_INFINITY);
    let acc = [kb.var(V4, ninf_v), kb.var(V4, ninf_v)];
    let accs = kb.var(F32, ninf);
    kb.vloop(len, 2, &mut |kb, ty, i, u| {
        let v = if ty == V4 { acc[u] } else { accs };
        let x = kb.ld(ty, xp, i);
        let m = kb.get(v);
        let m = kb.fmax(ty, x, m);
        kb.set(v, m);
    });
    let a = kb.get(acc[0]);
    let b = kb.get(acc[1]);
    let mv = kb.fmax(V4, a, b);
    let mv = kb.hmax(mv);
    let s = kb.get(accs);
    kb.fmax(F32, s, mv)
}

/// Scores of keys `jj..jj+ku` of the block for `heads`: `scores[h, jj+u] = scale * q[h] . k[jj+u]`.
#[allow(clippy::too_many_arguments)]
fn scores_tile(
    kb: &mut Kb,
    d: usize,
    bt: usize,
    scale: f32,
    heads: &[usize],
    ku: usize,
    qbase: Value,
    kblk: Value,
    kstride: i64,
    scores: Value,
    jj: Value,
) {
    let kr = kb.muli(jj, kstride);
    let k0 = kb.add(kblk, kr);
    let kp: Vec<Value> = (0..ku).map(|u| kb.addi(k0, u as i64 * kstride)).collect();
    let qp: Vec<Value> = heads.iter().map(|&h| kb.addi(qbase, (h * d * 4) as i64)).collect();
    let zv = kb.fc(V4, 0.0);
    let zs = kb.fc(F32, 0.0);
    let nacc = ku * heads.len();
    let accv: Vec<Variable> = (0..nacc).map(|_| kb.var(V4, zv)).collect();
    let accs: Vec<Variable> = (0..nacc).map(|_| kb.var(F32, zs)).collect();
    // A real loop over D (two f32x4 steps per iteration): every accumulator advances in every
    // iteration, and the loads stay ordered (plain loads, not pure ones Cranelift would hoist
    // and then spill).
    let dv = kb.ic(d as i64);
    kb.vloop(dv, 2, &mut |kb, ty, x, _| {
        let kv: Vec<Value> = kp.iter().map(|&p| kb.ld(ty, p, x)).collect();
        for (hi, &p) in qp.iter().enumerate() {
            let qv = kb.ld(ty, p, x);
            for (u, &kvu) in kv.iter().enumerate() {
                let a = if ty == V4 { accv[u * heads.len() + hi] } else { accs[u * heads.len() + hi] };
                let cur = kb.get(a);
                let nxt = kb.fma(kvu, qv, cur);
                kb.set(a, nxt);
            }
        }
    });
    let sc = kb.fc(F32, scale);
    for u in 0..ku {
        for (hi, &h) in heads.iter().enumerate() {
            let a = kb.get(accv[u * heads.len() + hi]);
            let t = kb.hsum(a);
            let s = kb.get(accs[u * heads.len() + hi]);
            let t = kb.fadd(t, s);
            let t = kb.fmul(t, sc);
            let idx = kb.addi(jj, (h * bt + u) as i64);
            kb.st(t, scores, idx);
        }
    }
}

/// `acc[0..d] += sum_u p[jj+u] v[jj+u]` for `ku` keys of the block.
#[allow(clippy::too_many_arguments)]
fn pv_tile(kb: &mut Kb, d: usize, ku: usize, sp: Value, ap: Value, vblk: Value, kstride: i64, jj: Value) {
    let vr = kb.muli(jj, kstride);
    let v0 = kb.add(vblk, vr);
    let vp: Vec<Value> = (0..ku).map(|u| kb.addi(v0, u as i64 * kstride)).collect();
    let p: Vec<Value> = (0..ku)
        .map(|u| {
            let idx = kb.addi(jj, u as i64);
            kb.ld(F32, sp, idx)
        })
        .collect();
    let pv: Vec<Value> = p.iter().map(|&x| kb.splat(V4, x)).collect();
    dsweep(kb, d, &mut |kb, ty, x| {
        let mut a = kb.ld(ty, ap, x);
        for u in 0..ku {
            let vv = kb.ld(ty, vp[u], x);
            let pu = if ty == V4 { pv[u] } else { p[u] };
            a = kb.fma(vv, pu, a);
        }
        kb.st(a, ap, x);
    });
}
