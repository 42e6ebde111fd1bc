//! Batched matmul with NumPy batch broadcasting, both `b` layouts, and the fused epilogues of
//! `linear` and `gated_linear` (see [`super::linear`]).
//!
//! Work items are `(batch, column chunk, row block of MR=4)`, row blocks innermost so a part
//! reuses one `K x chunk` panel of `b` across consecutive row blocks. Chunks are NC=64 columns, or
//! up to NC_SMALL=1024 (`N / nparts` rounded up to 64) when `M < 4` (decode), where the kernel is a
//! memory-bound GEMV and wide chunks keep `b` streaming. Inside an item:
//! - `b` as `[K, N]` (`transpose_b = false`): rows stream in pairs (then a single odd row): the
//!   output row segments are the accumulators (in L1), each pass adds four rows of `b` times the
//!   matching `a` values, broadcast once per pass. Cranelift's x64 FMA always overwrites a
//!   multiplicand, so a register-tiled version pays a copy per FMA plus a move per accumulator per
//!   iteration; this form has neither and runs ~1.5x faster. An epilogue is applied in the pass
//!   over the last row of `b`, in registers, before that pass's store.
//! - `b` as `[N, K]` (`transpose_b = true`): dot-product tiles, 4 rows x 2 columns (1 x 4 for row
//!   remainders), `f32x4` partial sums along K, one horizontal sum per output, scalar K tail; the
//!   epilogue works on the horizontal sums before their store. The gated form computes the gate
//!   row `j` and the up row `N + j` of `b` in the same tile (4 x 1 and 1 x 2 pairs).
//!
//! M, N, K and the batch dims may all be symbolic. Operands are read with pure (`readonly`,
//! `can_move`) loads: the output must not alias them.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use cranelift_frontend::Variable;
use llmc_ir::{Dim, Graph, NodeId, UnaryOp};

use super::builder::{Kb, V4};
use super::math;

/// Rows per row block.
const MR: i64 = 4;
/// Columns per column chunk (a multiple of every tile width).
const NC: i64 = 64;
/// The widest column chunk when `M < MR`.
const NC_SMALL: i64 = 1024;

/// What happens to each finished dot product before it is stored.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue {
    /// `out[i, j] = acc[i, j]`.
    Plain,
    /// `out[i, j] = act(acc[i, j] + bias[j]) + res[i, j]`: `bias` is the base address of `f32[N]`,
    /// `res` the byte distance from the output to the residual (which has the output's layout).
    Linear { bias: Option<Value>, act: Option<UnaryOp>, res: Option<Value> },
    /// `out[i, j] = act(acc[i, j]) * acc[i, N + j]` over the `2N` rows of a transposed `b`; `up`
    /// is the byte distance from row `j` of `b` to row `N + j`.
    Gated { act: UnaryOp, up: Value },
}

/// A (batched) product `out[.., M, N] = a[.., M, K] x b` for [`gemm`].
pub(crate) struct Problem {
    pub m: Value,
    pub k: Value,
    /// Output columns.
    pub n: Value,
    pub a: Value,
    pub b: Value,
    pub o: Value,
    /// Batch extents, outermost first, and per operand (`a`, `b`, `out`) the element stride of each
    /// (0 where broadcast).
    pub batch: Vec<Value>,
    pub strides: [Vec<Value>; 3],
    pub transpose_b: bool,
}

/// Sizes every tile needs.
#[derive(Clone, Copy)]
struct Item {
    k: Value,
    /// `K * 4`, `N * 4`: bytes between rows of `a` (and of `b` when transposed) and of `out`.
    kbytes: Value,
    nbytes: Value,
}

/// The epilogue at one tile: `pbias` is the bias address of the tile's first column.
#[derive(Clone, Copy)]
struct TileEpi {
    epi: Epilogue,
    pbias: Option<Value>,
}

impl TileEpi {
    fn at_col(self, kb: &mut Kb, c: Value) -> TileEpi {
        let pbias = self.pbias.map(|p| kb.addr(p, c));
        TileEpi { pbias, ..self }
    }
    /// `act(y + bias[i]) + res` for the output element at `po + 4 i` (`ty` lanes), for the
    /// `Plain` and `Linear` forms.
    fn apply(self, kb: &mut Kb, ty: Type, y: Value, po: Value, i: Value) -> Value {
        let Epilogue::Linear { act, res, .. } = self.epi else { return y };
        let mut y = y;
        if let Some(pb) = self.pbias {
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
        y
    }
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
    let mut strides: [Vec<Value>; 3] = [Vec::new(), Vec::new(), Vec::new()];
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
    let pr = Problem { m, k, n: nn, a, b, o, batch: sizes, strides, transpose_b };
    gemm(kb, pr, Epilogue::Plain);
}

/// Emits the whole product with epilogue `epi`. `Gated` needs `transpose_b`; `Linear` and
/// `Gated` need `K >= 1` whenever the kernel runs.
pub(crate) fn gemm(kb: &mut Kb, pr: Problem, epi: Epilogue) {
    let Problem { m, k, n: nn, a, b, o, batch, strides, transpose_b } = pr;
    let mut sizes = batch;
    let mut strides = strides;
    let zero = kb.ic(0);
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
    let bias = match epi {
        Epilogue::Linear { bias, .. } => bias,
        _ => None,
    };
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
        let te = TileEpi { epi, pbias: bias.map(|p| kb.addr(p, c0)) };
        if transpose_b {
            let full = kb.b.ins().icmp_imm_s(IntCC::Equal, rows, MR);
            kb.if_else(full, &mut |kb| tile_cols(kb, it, 4, pa, pb, po, cols, te), &mut |kb| {
                let z = kb.ic(0);
                kb.for_steps(z, rows, 1, &mut |kb, r| {
                    let ra = kb.mul(r, it.kbytes);
                    let pa_r = kb.add(pa, ra);
                    let ro = kb.mul(r, it.nbytes);
                    let po_r = kb.add(po, ro);
                    tile_cols(kb, it, 1, pa_r, pb, po_r, cols, te);
                });
            });
        } else {
            let z = kb.ic(0);
            let rows_from = |kb: &mut Kb, r: Value, nr: usize| {
                let ra = kb.mul(r, it.kbytes);
                let pa_r = kb.add(pa, ra);
                let ro = kb.mul(r, it.nbytes);
                let po_r = kb.add(po, ro);
                row_stream(kb, it, nr, pa_r, pb, po_r, cols, te);
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
/// A non-plain epilogue runs in the pass over the last row of `b`.
#[allow(clippy::too_many_arguments)]
fn row_stream(kb: &mut Kb, it: Item, nr: usize, pa: Value, pb: Value, po: Value, cols: Value, te: TileEpi) {
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
    let step = |kb: &mut Kb, kk: Value, u: usize, last: bool| {
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
                let y = if last { te.apply(kb, ty, x, outs[r], i) } else { x };
                kb.st(y, outs[r], i);
            }
        });
        let adv = kb.muli(it.nbytes, u as i64);
        let next = kb.add(pbk, adv);
        kb.set(vb, next);
    };
    if matches!(te.epi, Epilogue::Plain) {
        let e = kb.for_steps(zi, it.k, 4, &mut |kb, kk| step(kb, kk, 4, false));
        kb.for_steps(e, it.k, 1, &mut |kb, kk| step(kb, kk, 1, false));
    } else {
        // All rows of `b` but the last, then the last with the epilogue (K >= 1).
        let km1 = kb.addi(it.k, -1);
        let e = kb.for_steps(zi, km1, 4, &mut |kb, kk| step(kb, kk, 4, false));
        kb.for_steps(e, km1, 1, &mut |kb, kk| step(kb, kk, 1, false));
        step(kb, km1, 1, true);
    }
}

/// All `cols` columns of `mr` rows, `b` as `[N, K]`: `pa` is row 0 of `a`, `pb` row 0 of `b`'s
/// chunk, `po` the output block.
#[allow(clippy::too_many_arguments)]
fn tile_cols(kb: &mut Kb, it: Item, mr: usize, pa: Value, pb: Value, po: Value, cols: Value, te: TileEpi) {
    let z = kb.ic(0);
    // Output columns per tile: the accumulators (mr x nc, twice that when gated) stay at <= 8.
    let nc = match (mr, te.epi) {
        (4, Epilogue::Gated { .. }) => 1,
        (4, _) | (_, Epilogue::Gated { .. }) => 2,
        _ => 4,
    };
    let tile = |kb: &mut Kb, c: Value, nc: usize| {
        let cb = kb.mul(c, it.kbytes);
        let pbc = kb.add(pb, cb);
        let poc = kb.addr(po, c);
        let tec = te.at_col(kb, c);
        tile_t(kb, it, mr, nc, pa, pbc, poc, tec);
    };
    let e = if nc > 1 { kb.for_steps(z, cols, nc as i64, &mut |kb, c| tile(kb, c, nc)) } else { z };
    kb.for_steps(e, cols, 1, &mut |kb, c| tile(kb, c, 1));
}

/// `b` as `[N, K]`: `out[r, c] = epi(sum_k a[r, k] * b[c, k])` for `r < mr`, `c < nc`.
#[allow(clippy::too_many_arguments)]
fn tile_t(kb: &mut Kb, it: Item, mr: usize, nc: usize, pa: Value, pb: Value, po: Value, te: TileEpi) {
    let arow: Vec<Value> = (0..mr)
        .map(|r| {
            let off = kb.muli(it.kbytes, r as i64);
            kb.add(pa, off)
        })
        .collect();
    let mut brow: Vec<Value> = (0..nc)
        .map(|c| {
            let off = kb.muli(it.kbytes, c as i64);
            kb.add(pb, off)
        })
        .collect();
    if let Epilogue::Gated { up, .. } = te.epi {
        for c in 0..nc {
            let u = kb.add(brow[c], up);
            brow.push(u);
        }
    }
    let nb = brow.len();
    let zero = kb.fc(V4, 0.0);
    let acc: Vec<Variable> = (0..mr * nb).map(|_| kb.var(V4, zero)).collect();
    let kvec = kb.b.ins().band_imm_s(it.k, !3i64);
    let zi = kb.ic(0);
    kb.for_steps(zi, kvec, 4, &mut |kb, kk| {
        let av: Vec<Value> = arow.iter().map(|&p| kb.ld_ro(V4, p, kk)).collect();
        for c in 0..nb {
            let bv = kb.ld_ro(V4, brow[c], kk);
            for r in 0..mr {
                let x = kb.get(acc[r * nb + c]);
                let y = kb.fma(av[r], bv, x);
                kb.set(acc[r * nb + c], y);
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
        for c in 0..nb {
            let bv = kb.ld_ro(F32, brow[c], kk);
            for r in 0..mr {
                let x = kb.get(sums[r * nb + c]);
                let y = kb.fma(av[r], bv, x);
                kb.set(sums[r * nb + c], y);
            }
        }
    });
    let pors: Vec<Value> = (0..mr)
        .map(|r| {
            let off = kb.muli(it.nbytes, r as i64);
            kb.add(po, off)
        })
        .collect();
    let costly = matches!(te.epi, Epilogue::Gated { .. } | Epilogue::Linear { act: Some(_), .. });
    if mr == 4 && costly {
        // An activation per output is worth a transpose: one f32x4 of the four rows per column.
        for c in 0..nc {
            let col: Vec<Value> = (0..4).map(|r| kb.get(sums[r * nb + c])).collect();
            let x = pack4(kb, &col);
            let y = match te.epi {
                Epilogue::Gated { act, .. } => {
                    let gate = math::unary(kb, V4, act, x);
                    let ups: Vec<Value> = (0..4).map(|r| kb.get(sums[r * nb + nc + c])).collect();
                    let up = pack4(kb, &ups);
                    kb.fmul(gate, up)
                }
                Epilogue::Linear { act, res, .. } => {
                    let mut y = x;
                    if let Some(pb) = te.pbias {
                        let ci = kb.ic(c as i64);
                        let bv = kb.ld_ro(F32, pb, ci);
                        let bv = kb.splat(V4, bv);
                        y = kb.fadd(y, bv);
                    }
                    if let Some(u) = act {
                        y = math::unary(kb, V4, u, y);
                    }
                    if let Some(d) = res {
                        let rs: Vec<Value> = pors
                            .iter()
                            .map(|&p| {
                                let pr = kb.add(p, d);
                                let ci = kb.ic(c as i64);
                                kb.ld_ro(F32, pr, ci)
                            })
                            .collect();
                        let rv = pack4(kb, &rs);
                        y = kb.fadd(y, rv);
                    }
                    y
                }
                Epilogue::Plain => x,
            };
            for (r, &por) in pors.iter().enumerate() {
                let e = kb.b.ins().extractlane(y, r as u8);
                kb.st_at(e, por, 4 * c as i32);
            }
        }
        return;
    }
    for (r, &por) in pors.iter().enumerate() {
        for c in 0..nc {
            let x = kb.get(sums[r * nb + c]);
            let y = match te.epi {
                Epilogue::Gated { act, .. } => {
                    let gate = math::unary(kb, F32, act, x);
                    let up = kb.get(sums[r * nb + nc + c]);
                    kb.fmul(gate, up)
                }
                _ => {
                    let ci = kb.ic(c as i64);
                    te.apply(kb, F32, x, por, ci)
                }
            };
            kb.st_at(y, por, 4 * c as i32);
        }
    }
}

/// `[x0, x1, x2, x3]` from four scalars.
fn pack4(kb: &mut Kb, x: &[Value]) -> Value {
    let mut v = kb.b.ins().scalar_to_vector(V4, x[0]);
    for (i, &e) in x.iter().enumerate().skip(1) {
        v = kb.b.ins().insertlane(v, e, i as u8);
    }
    v
}
