//! Batched matmul with NumPy batch broadcasting, both `b` layouts.
//!
//! Work items are `(batch, column chunk, row block of MR=4)`, row blocks innermost so a part
//! reuses one `K x chunk` panel of `b` across consecutive row blocks. Chunks are NC=64 columns, or
//! up to NC_SMALL=1024 (`N / nparts` rounded up to 64) when `M < 4` (decode), where the kernel is a
//! memory-bound GEMV and wide chunks keep `b` streaming. Inside an item:
//! - `b` as `[K, N]` (`transpose_b = false`): rows stream in pairs (then a single odd row): the
//!   output row segments are the accumulators (in L1), each pass adds four rows of `b` times the
//!   matching `a` values, broadcast once per pass. Cranelift's x64 FMA always overwrites a
//!   multiplicand, so a register-tiled version pays a copy per FMA plus a move per accumulator per
//!   iteration; this form has neither and runs ~1.5x faster.
//! - `b` as `[N, K]` (`transpose_b = true`): dot-product tiles, 4 rows x 2 columns (1 x 4 for row
//!   remainders), `f32x4` partial sums along K, one horizontal sum per output, scalar K tail.
//!
//! M, N, K and the batch dims may all be symbolic. Operands are read with pure (`readonly`,
//! `can_move`) loads: the output must not alias them.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;
use llmc_ir::{Dim, Graph, NodeId};

use super::builder::{Kb, V4};

/// Rows per row block.
const MR: i64 = 4;
/// Columns per column chunk (a multiple of every tile width).
const NC: i64 = 64;
/// The widest column chunk when `M < MR`.
const NC_SMALL: i64 = 1024;

/// Sizes every tile needs.
#[derive(Clone, Copy)]
struct Item {
    k: Value,
    /// `K * 4`, `N * 4`: bytes between rows of `a` (and of `b` when transposed) and of `out`.
    kbytes: Value,
    nbytes: Value,
}

pub(crate) fn matmul(kb: &mut Kb, g: &Graph, n: NodeId, transpose_b: bool) {
    let ins = g.inputs(n);
    let (at, bt, ot) = (g.ty(ins[0]).clone(), g.ty(ins[1]).clone(), g.ty(n).clone());
    let (ra, rb, ro) = (at.rank(), bt.rank(), ot.rank());
    let (md, kd) = (at.shape[ra - 2], at.shape[ra - 1]);
    let nd = if transpose_b { bt.shape[rb - 2] } else { bt.shape[rb - 1] };
    let m = kb.dim(md);
    let k = kb.dim(kd);
    let nn = kb.dim(nd);
    let a = kb.buf(0);
    let b = kb.buf(1);
    let o = kb.buf(2);

    // Batch dims with per-operand strides (0 where broadcast).
    let ob = &ot.shape[..ro - 2];
    let mut sizes = Vec::new();
    let mut strides: Vec<Vec<Value>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let zero = kb.ic(0);
    for (i, &d) in ob.iter().enumerate() {
        if d == Dim::N(1) {
            continue;
        }
        sizes.push(kb.dim(d));
        for (j, sh) in [&at.shape, &bt.shape].iter().enumerate() {
            let nb = sh.len() - 2;
            let off = ob.len() - nb;
            let s = if i < off || sh[i - off] == Dim::N(1) { zero } else { kb.dims(&sh[i - off + 1..]) };
            strides[j].push(s);
        }
        let s = kb.dims(&ot.shape[i + 1..]);
        strides[2].push(s);
    }
    // Column chunks, then row blocks.
    let mrv = kb.ic(MR);
    let small = kb.lt(m, mrv);
    // Small M: as wide as possible (up to NC_SMALL) while leaving every part a chunk.
    let np1 = kb.addi(kb.nparts, -1);
    let per = kb.add(nn, np1);
    let per = kb.b.ins().udiv(per, kb.nparts);
    let per = kb.addi(per, NC - 1);
    let per = kb.b.ins().band_imm_s(per, !(NC - 1));
    let ncmax = kb.ic(NC_SMALL);
    let ncs = kb.min(per, ncmax);
    let ncn = kb.ic(NC);
    let ncs = kb.max(ncs, ncn);
    let ncw = kb.b.ins().select(small, ncs, ncn);
    let ncw1 = kb.addi(ncw, -1);
    let nnc = kb.add(nn, ncw1);
    let nnc = kb.b.ins().udiv(nnc, ncw);
    let nmb = kb.div_ceil(m, MR);
    sizes.push(nnc);
    sizes.push(nmb);
    let b_chunk = if transpose_b { kb.mul(k, ncw) } else { ncw };
    let a_rows = kb.muli(k, MR);
    let o_rows = kb.muli(nn, MR);
    strides[0].push(zero);
    strides[0].push(a_rows);
    strides[1].push(b_chunk);
    strides[1].push(zero);
    strides[2].push(ncw);
    strides[2].push(o_rows);

    let mut total = kb.ic(1);
    for &s in &sizes {
        total = kb.mul(total, s);
    }
    let kbytes = kb.muli(k, 4);
    let nbytes = kb.muli(nn, 4);
    let it = Item { k, kbytes, nbytes };
    let nsz = sizes.len();
    let (lo, hi) = kb.part_range(total);
    kb.odometer(lo, hi, &sizes, &strides, &mut |kb, offs, idx| {
        let pa = kb.addr(a, offs[0]);
        let pb = kb.addr(b, offs[1]);
        let po = kb.addr(o, offs[2]);
        let r0 = kb.muli(idx[nsz - 1], MR);
        let c0 = kb.mul(idx[nsz - 2], ncw);
        let rl = kb.sub(m, r0);
        let mrv = kb.ic(MR);
        let rows = kb.min(rl, mrv);
        let cl = kb.sub(nn, c0);
        let cols = kb.min(cl, ncw);
        if transpose_b {
            let full = kb.b.ins().icmp_imm_s(IntCC::Equal, rows, MR);
            kb.if_else(full, &mut |kb| tile_cols(kb, it, 4, pa, pb, po, cols), &mut |kb| {
                let z = kb.ic(0);
                kb.for_steps(z, rows, 1, &mut |kb, r| {
                    let ra = kb.mul(r, it.kbytes);
                    let pa_r = kb.add(pa, ra);
                    let ro = kb.mul(r, it.nbytes);
                    let po_r = kb.add(po, ro);
                    tile_cols(kb, it, 1, pa_r, pb, po_r, cols);
                });
            });
        } else {
            let z = kb.ic(0);
            let rows_from = |kb: &mut Kb, r: Value, nr: usize| {
                let ra = kb.mul(r, it.kbytes);
                let pa_r = kb.add(pa, ra);
                let ro = kb.mul(r, it.nbytes);
                let po_r = kb.add(po, ro);
                row_stream(kb, it, nr, pa_r, pb, po_r, cols);
            };
            let e = kb.for_steps(z, rows, 2, &mut |kb, r| rows_from(kb, r, 2));
            kb.for_steps(e, rows, 1, &mut |kb, r| rows_from(kb, r, 1));
        }
    });
}

/// `b` as `[K, N]`, `nr` (1 or 2) rows: `out[r, 0..cols] = sum_k a[r, k] * b[k, 0..cols]`,
/// accumulating in the output rows (a few hundred bytes, in L1) while `b` streams four rows at a
/// time. With Cranelift's FMA forms this beats a register tile: nothing loop-carried lives in
/// registers, so there are no accumulator moves, and the `a` broadcasts are loop invariants.
fn row_stream(kb: &mut Kb, it: Item, nr: usize, pa: Value, pb: Value, po: Value, cols: Value) {
    let po1 = kb.add(po, it.nbytes);
    let pa1 = kb.add(pa, it.kbytes);
    let outs = [po, po1];
    let arows = [pa, pa1];
    for &o in &outs[..nr] {
        kb.vloop(cols, 2, &mut |kb, ty, i, _| {
            let z = kb.fc(ty, 0.0);
            kb.st(z, o, i);
        });
    }
    let zi = kb.ic(0);
    let vb = kb.var(I64, pb);
    let nb: Vec<Value> = (0..4).map(|j| kb.muli(it.nbytes, j)).collect();
    let step = |kb: &mut Kb, kk: Value, u: usize| {
        let pbk = kb.get(vb);
        let brows: Vec<Value> = (0..u).map(|j| if j == 0 { pbk } else { kb.add(pbk, nb[j]) }).collect();
        // a[r, k + j], loaded once per pass.
        let a: Vec<Vec<Value>> = arows[..nr]
            .iter()
            .map(|&pr| {
                (0..u)
                    .map(|j| {
                        let kj = kb.addi(kk, j as i64);
                        kb.ld_ro(F32, pr, kj)
                    })
                    .collect()
            })
            .collect();
        kb.vloop(cols, 2, &mut |kb, ty, i, _| {
            let mut acc: Vec<Value> = outs[..nr].iter().map(|&o| kb.ld(ty, o, i)).collect();
            for (j, &pbj) in brows.iter().enumerate() {
                let bv = kb.ld_ro(ty, pbj, i);
                for (r, x) in acc.iter_mut().enumerate() {
                    let av = kb.splat(ty, a[r][j]);
                    // `b` first: the FMA overwrites its first operand, and this use of b is (one
                    // of) its last, while the broadcast lives on.
                    *x = kb.fma(bv, av, *x);
                }
            }
            for (r, &x) in acc.iter().enumerate() {
                kb.st(x, outs[r], i);
            }
        });
        let adv = kb.muli(it.nbytes, u as i64);
        let next = kb.add(pbk, adv);
        kb.set(vb, next);
    };
    let e = kb.for_steps(zi, it.k, 4, &mut |kb, kk| step(kb, kk, 4));
    kb.for_steps(e, it.k, 1, &mut |kb, kk| step(kb, kk, 1));
}

/// All `cols` columns of `mr` rows, `b` as `[N, K]`: `pa` is row 0 of `a`, `pb` row 0 of `b`'s
/// chunk, `po` the output block.
fn tile_cols(kb: &mut Kb, it: Item, mr: usize, pa: Value, pb: Value, po: Value, cols: Value) {
    let z = kb.ic(0);
    let nc = if mr == 4 { 2 } else { 4 };
    let e = kb.for_steps(z, cols, nc as i64, &mut |kb, c| {
        let cb = kb.mul(c, it.kbytes);
        let pbc = kb.add(pb, cb);
        let poc = kb.addr(po, c);
        tile_t(kb, it, mr, nc, pa, pbc, poc);
    });
    kb.for_steps(e, cols, 1, &mut |kb, c| {
        let cb = kb.mul(c, it.kbytes);
        let pbc = kb.add(pb, cb);
        let poc = kb.addr(po, c);
        tile_t(kb, it, mr, 1, pa, pbc, poc);
    });
}

/// `b` as `[N, K]`: `out[r, c] = sum_k a[r, k] * b[c, k]` for `r < mr`, `c < nc`.
fn tile_t(kb: &mut Kb, it: Item, mr: usize, nc: usize, pa: Value, pb: Value, po: Value) {
    let zero = kb.fc(V4, 0.0);
    let acc: Vec<Variable> = (0..mr * nc).map(|_| kb.var(V4, zero)).collect();
    let arow: Vec<Value> = (0..mr)
        .map(|r| {
            let off = kb.muli(it.kbytes, r as i64);
            kb.add(pa, off)
        })
        .collect();
    let brow: Vec<Value> = (0..nc)
        .map(|c| {
            let off = kb.muli(it.kbytes, c as i64);
            kb.add(pb, off)
        })
        .collect();
    let kvec = kb.b.ins().band_imm_s(it.k, !3i64);
    let zi = kb.ic(0);
    kb.for_steps(zi, kvec, 4, &mut |kb, kk| {
        let av: Vec<Value> = arow.iter().map(|&p| kb.ld_ro(V4, p, kk)).collect();
        for c in 0..nc {
            let bv = kb.ld_ro(V4, brow[c], kk);
            for r in 0..mr {
                let x = kb.get(acc[r * nc + c]);
                let y = kb.fma(av[r], bv, x);
                kb.set(acc[r * nc + c], y);
            }
        }
    });
    let sums: Vec<Variable> = acc
        .iter()
        .map(|&v| {
            let x = kb.get(v);
            let h = kb.hsum(x);
            kb.var(F32, h)
        })
        .collect();
    kb.for_steps(kvec, it.k, 1, &mut |kb, kk| {
        let av: Vec<Value> = arow.iter().map(|&p| kb.ld_ro(F32, p, kk)).collect();
        for c in 0..nc {
            let bv = kb.ld_ro(F32, brow[c], kk);
            for r in 0..mr {
                let x = kb.get(sums[r * nc + c]);
                let y = kb.fma(av[r], bv, x);
                kb.set(sums[r * nc + c], y);
            }
        }
    });
    for r in 0..mr {
        let off = kb.muli(it.nbytes, r as i64);
        let por = kb.add(po, off);
        for c in 0..nc {
            let x = kb.get(sums[r * nc + c]);
            kb.st_at(x, por, 4 * c as i32);
        }
    }
}
