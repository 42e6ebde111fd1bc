//! One GPU kernel per graph node, as MLIR text.
//!
//! Work decomposition (recorded in the artifact as a [`Launch`], so the runtime computes the
//! grid from `s` and `p`):
//! - elementwise and data movement (unary, binary with NumPy broadcasting, transpose, slice,
//!   concat, gather, positions, causal_mask, rope, kv_concat): one thread per output element;
//! - row ops (rms_norm, layer_norm, reduce, softmax): one warp per row, lanes stride the row,
//!   sums and maxima through `gpu.shuffle xor`;
//! - products (matmul, linear with its bias/activation/residual epilogue, gated_linear, and the
//!   packed int8/int4/W8A8/W4A8/2:4 forms): one warp per output element, lanes stride `K` (consecutive lanes
//!   read consecutive weights of a row: a coalesced GEMV for decode), f32 accumulation;
//! - attention: one warp per (query, head), flash-style: keys streamed with an online softmax,
//!   each lane holding `ceil(D/32)` channels of the accumulator; no `S x T` buffer; GQA by
//!   `kv_head = h / (NH / NKV)`;
//! - moe: one block per row: router logits by warps, top-k and softmax by thread 0 in shared
//!   memory, the chosen experts' gated hidden rows into a global scratch buffer, then the
//!   down projection.
//!
//! Buffers are passed in the CPU kernel ABI's order (operands, output, tables), then the
//! scratch buffer when the kernel has one; floats are read as their [`Elem`] says (f16/bf16
//! weights widened to f32) and written as f32.

use llmc_ir::{Dim, Graph, Layout, NodeId, Op, ReduceOp, UnaryOp};
use abi::artifact::Launch;

use super::text::{Elem, Kt};
use crate::error::{CodegenError, Result};

/// Threads per block of the element and warp kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of the block-per-row kernels (moe).
pub const ROW_BLOCK: u32 = 128;

/// A generated kernel.
pub struct GpuKernel {
    pub name: String,
    pub mlir: String,
    pub launch: Launch,
    /// Bytes of scratch the kernel needs at the largest step (0: none; then no scratch argument).
    pub scratch_bytes: u64,
    /// Constant f32 tables passed after the output (rope's cos/sin).
    pub tables: Vec<Vec<f32>>,
}

fn unsupported(g: &Graph, n: NodeId, msg: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported { node: format!("{} (node {})", g.op(n).name(), n.index()), msg: msg.into() }
}

/// `(coef, s, p, t)` with `numel = coef * S^s * P^p * T^t`.
fn monomial(shape: &[Dim]) -> (u64, u8, u8, u8) {
    let mut m = (1u64, 0u8, 0u8, 0u8);
    for d in shape {
        match d {
            Dim::N(c) => m.0 *= *c as u64,
            Dim::S => m.1 += 1,
            Dim::P => m.2 += 1,
            Dim::T => m.3 += 1,
        }
    }
    m
}

fn launch(shape: &[Dim], divide: u64, per_item: u32, block: u32) -> Launch {
    let (c, s, p, t) = monomial(shape);
    Launch { block, per_item, coef: c / divide.max(1), s_pow: s, p_pow: p, t_pow: t }
}

/// The value of a dimension inside a kernel.
fn dimv(k: &mut Kt, d: Dim) -> String {
    match d {
        Dim::N(c) => k.ci(c as i64),
        Dim::S => "%s".into(),
        Dim::P => "%p".into(),
        Dim::T => "%t".into(),
    }
}

fn numel(k: &mut Kt, shape: &[Dim]) -> String {
    let mut acc = k.ci(1);
    for &d in shape {
        let v = dimv(k, d);
        acc = k.mul(&acc, &v);
    }
    acc
}

/// Row-major coordinates of flat index `i` in `shape`.
fn coords(k: &mut Kt, i: &str, shape: &[Dim]) -> Vec<String> {
    let mut out = vec![String::new(); shape.len()];
    let mut rest = i.to_string();
    for (ax, &d) in shape.iter().enumerate().rev() {
        let dv = dimv(k, d);
        out[ax] = k.rem(&rest, &dv);
        if ax > 0 {
            rest = k.div(&rest, &dv);
        }
    }
    out
}

/// Row-major strides of `shape`.
fn strides(k: &mut Kt, shape: &[Dim]) -> Vec<String> {
    let mut out = vec![String::new(); shape.len()];
    let mut acc = k.ci(1);
    for (ax, &d) in shape.iter().enumerate().rev() {
        out[ax] = acc.clone();
        let dv = dimv(k, d);
        acc = k.mul(&acc, &dv);
    }
    out
}

/// Offset in an operand of shape `ins` broadcast (right-aligned, size-1 dims stretched) to the
/// output coordinates `c` of `out`.
fn broadcast_offset(k: &mut Kt, c: &[String], out: &[Dim], ins: &[Dim]) -> String {
    let st = strides(k, ins);
    let mut off = k.ci(0);
    let lead = out.len() - ins.len();
    for (ax, &d) in ins.iter().enumerate() {
        if d == Dim::N(1) && out[lead + ax] != Dim::N(1) {
            continue;
        }
        let t = k.mul(&c[lead + ax], &st[ax]);
        off = k.add(&off, &t);
    }
    off
}

/// One thread per element of `shape`: `body(k, gid, coords)` under `gid < numel`.
fn per_element(k: &mut Kt, shape: &[Dim], body: impl FnOnce(&mut Kt, &str, &[String])) -> Launch {
    let gid = k.global_id();
    let total = numel(k, shape);
    let ok = k.cmp("slt", &gid, &total);
    let shape = shape.to_vec();
    k.if_(&ok, |k| {
        let c = coords(k, &gid, &shape);
        body(k, &gid, &c)
    });
    launch(&shape, 1, 1, BLOCK)
}

/// One warp per item, `items` of them (`shape` counts them): `body(k, item, lane)`.
fn per_warp(k: &mut Kt, items_shape: &[Dim], body: impl FnOnce(&mut Kt, &str, &str)) -> Launch {
    let gid = k.global_id();
    let w = k.ci(32);
    let item = k.div(&gid, &w);
    let lane = k.rem(&gid, &w);
    let total = numel(k, items_shape);
    let ok = k.cmp("slt", &item, &total);
    k.if_(&ok, |k| body(k, &item, &lane));
    launch(items_shape, 1, 32, BLOCK)
}

/// `sum over j in 0..len` of `term(k, j)`, lanes striding `j`, summed across the warp.
fn warp_sum_over(k: &mut Kt, lane: &str, len: &str, mut term: impl FnMut(&mut Kt, &str, &str) -> String) -> String {
    let st = k.ci(32);
    let z = k.cf(0.0);
    let r = k.for_(lane, len, &st, &[(z, "f32")], |k, j, acc| vec![term(k, j, &acc[0])]);
    k.warp_sum(&r[0])
}

/// Whether dot products over `kdim` with a dense `[N, K]` rhs stored as `e` read 8 elements
/// per lane per step (vector loads): rows then start at multiples of 32 bytes.
fn vec8(e: Elem, kdim: usize) -> bool {
    matches!(e, Elem::F32 | Elem::F16 | Elem::BF16) && kdim % 8 == 0 && kdim > 0
}

/// `sum_j a[ra][j] * b[rb][j]` for every `a` row base in `abases` and `b` row base in `bbases`
/// (results `a`-major), `j < kdim`: lane `l` reads elements `8l .. 8l+8` of each 256-element
/// stretch (coalesced 16-byte loads: the decode GEMV's weight stream; every `b` vector is used
/// for all `a` rows), f32 accumulation, summed over the warp; every lane gets the sums.
#[allow(clippy::too_many_arguments)]
fn warp_dot8(k: &mut Kt, lane: &str, kdim: usize, a: &str, ae: Elem, abases: &[String], b: &str, be: Elem, bbases: &[String]) -> Vec<String> {
    let j0 = k.mulc(lane, 8);
    let kv = k.ci(kdim as i64);
    let st = k.ci(256);
    let z = k.op("arith.constant dense<0.000000e+00> : vector<8xf32>");
    let n = abases.len() * bbases.len();
    let inits: Vec<(String, &str)> = (0..n).map(|_| (z.clone(), "vector<8xf32>")).collect();
    let accs = k.for_(&j0, &kv, &st, &inits, |k, j, acc| {
        let bvs: Vec<String> = bbases
            .iter()
            .map(|bb| {
                let bi = k.add(bb, j);
                k.load8(b, &bi, be)
            })
            .collect();
        let mut next = Vec::new();
        for (ra, ab) in abases.iter().enumerate() {
            let ai = k.add(ab, j);
            let av = k.load8(a, &ai, ae);
            for (rb, bv) in bvs.iter().enumerate() {
                let p = k.op(&format!("arith.mulf {av}, {bv} : vector<8xf32>"));
                next.push(k.op(&format!("arith.addf {}, {p} : vector<8xf32>", acc[ra * bbases.len() + rb])));
            }
        }
        next
    });
    accs.iter()
        .map(|acc| {
            let h = k.hsum8(acc);
            k.warp_sum(&h)
        })
        .collect()
}

/// Rows of `a` one warp of a vectorized `linear` computes (its weight loads serve all of them):
/// the warp of row `r` with `r % LINEAR_ROWS == 0` does rows `r .. r + LINEAR_ROWS`, the
/// others exit at once.
const LINEAR_ROWS: i64 = 4;

/// Element `(n, kk)` of a product's right-hand side, as f32: `[N, K]` rows when `transposed`
/// (dense or packed), else `[K, N]`.
#[allow(clippy::too_many_arguments)]
fn rhs(k: &mut Kt, b: &str, e: Elem, n: &str, kk: &str, kdim: usize, ndim: usize, transposed: bool) -> Result<String, String> {
    match e {
        Elem::Packed(layout) => {
            if !transposed {
                return Err("packed weights must be the [N, K] rhs of a transposed product".into());
            }
            packed_elem(k, b, layout, n, kk, kdim)
        }
        _ => {
            let idx = if transposed {
                let r = k.mulc(n, kdim as i64);
                k.add(&r, kk)
            } else {
                let r = k.mulc(kk, ndim as i64);
                k.add(&r, n)
            };
            Ok(k.loadf(b, &idx, e))
        }
    }
}

/// Element `(n, j)` of a packed `[N, K]` weight (the byte format of [`abi::qformat`]),
/// dequantized as `(q - zero) * scale` in f32 exactly as the interpreter computes it.
fn packed_elem(k: &mut Kt, b: &str, layout: Layout, n: &str, j: &str, kdim: usize) -> Result<String, String> {
    let Some(f) = crate::packed::qformat(layout) else {
        return Err(format!("the CUDA backend cannot read weight layout `{layout}`"));
    };
    let rb = f.row_bytes(kdim) as i64;
    let codes = f.codes_at(kdim) as i64;
    let base = k.mulc(n, rb);
    match layout {
        Layout::Int8 => {
            let s = k.load_f32_at_byte(b, &base);
            let at = k.addc(&base, codes);
            let at = k.add(&at, j);
            let q = k.load_i8(b, &at);
            let qf = k.i64_to_f32(&q);
            Ok(k.fmul(&qf, &s))
        }
        Layout::Int4 { group, asym } => {
            let groups = f.groups(kdim) as i64;
            let gv = k.ci(group as i64);
            let c32 = k.ci(32);
            let c16 = k.ci(16);
            let gidx = k.div(j, &gv);
            let g2 = k.mulc(&gidx, 2);
            let sat = k.add(&base, &g2);
            let s = k.load_f16_at_byte(b, &sat);
            let blk = k.div(j, &c32);
            let i = k.rem(j, &c32);
            let i16 = k.rem(&i, &c16);
            let at = k.addc(&base, codes);
            let bo = k.mulc(&blk, 16);
            let at = k.add(&at, &bo);
            let at = k.add(&at, &i16);
            let byte = k.load_u8(b, &at);
            let lo = k.rem(&byte, &c16);
            let hi = k.div(&byte, &c16);
            let is_lo = k.cmp("slt", &i, &c16);
            let q = k.select(&is_lo, &lo, &hi, "i64");
            let qf = k.i64_to_f32(&q);
            let z = if asym {
                let zo = k.addc(&sat, 2 * groups);
                k.load_f16_at_byte(b, &zo)
            } else {
                k.cf(8.0)
            };
            let d = k.fsub(&qf, &z);
            Ok(k.fmul(&d, &s))
        }
        Layout::W8A8 => {
            // scale, the row's i32 code sum (unused here), then the int8 codes
            let s = k.load_f32_at_byte(b, &base);
            let at = k.addc(&base, codes);
            let at = k.add(&at, j);
            let q = k.load_i8(b, &at);
            let qf = k.i64_to_f32(&q);
            Ok(k.fmul(&qf, &s))
        }
        // Stored exactly as symmetric int4 rows (same record, same offsets).
        Layout::W4A8 { group } => packed_elem(k, b, Layout::Int4 { group, asym: false }, n, j, kdim),
        Layout::Sparse24 { int8 } => {
            if !kdim.is_multiple_of(4) {
                return Err(format!("2:4 sparse weights need K divisible by 4, K = {kdim}"));
            }
            // [scale (int8)] kept values (2 per group of 4, element order: f32, or int8 padded
            // to 4 bytes), then one index byte per two groups: `a | b << 2` (a < b) of group
            // `2i` in the low nibble, of group `2i + 1` in the high nibble.
            let idx_at = abi::QFormat::sparse_idx_at(int8, kdim) as i64;
            let c4 = k.ci(4);
            let c2 = k.ci(2);
            let c16 = k.ci(16);
            let gi = k.div(j, &c4);
            let l = k.rem(j, &c4);
            let half = k.div(&gi, &c2);
            let at = k.addc(&base, codes + idx_at);
            let at = k.add(&at, &half);
            let byte = k.load_u8(b, &at);
            let lo = k.rem(&byte, &c16);
            let hi = k.div(&byte, &c16);
            let odd = k.rem(&gi, &c2);
            let zero = k.ci(0);
            let is_lo = k.cmp("eq", &odd, &zero);
            let nib = k.select(&is_lo, &lo, &hi, "i64");
            let a = k.rem(&nib, &c4);
            let bb = k.div(&nib, &c4);
            let is_a = k.cmp("eq", &l, &a);
            let is_b = k.cmp("eq", &l, &bb);
            let one = k.ci(1);
            let slot = k.select(&is_a, &zero, &one, "i64");
            let vi = k.mul(&gi, &c2);
            let vi = k.add(&vi, &slot);
            let v = if int8 {
                let s = k.load_f32_at_byte(b, &base);
                let at = k.addc(&base, codes);
                let at = k.add(&at, &vi);
                let q = k.load_i8(b, &at);
                let qf = k.i64_to_f32(&q);
                k.fmul(&qf, &s)
            } else {
                let off = k.mulc(&vi, 4);
                let at = k.addc(&base, codes);
                let at = k.add(&at, &off);
                k.load_f32_at_byte(b, &at)
            };
            let kept = k.or(&is_a, &is_b);
            let zf = k.cf(0.0);
            Ok(k.select(&kept, &v, &zf, "f32"))
        }
        other => Err(format!("the CUDA backend cannot read weight layout `{other}`")),
    }
}

/// Per-token activation quantization of one row (`ir::quant::quantize_act`): the row's
/// `amax = max|x|` (NaNs ignored, as `f32::max` does) reduced over the warp, then
/// `(inv, scale, ok)` = `(127 / amax, amax / 127, 0 < amax < inf)`. All 32 lanes must take part.
struct ActQuant {
    inv: String,
    scale: String,
    ok: String,
}

fn act_quant(k: &mut Kt, lane: &str, a: &str, ae: Elem, abase: &str, len: &str) -> ActQuant {
    let st = k.ci(32);
    let z = k.cf(0.0);
    let m = k.for_(lane, len, &st, &[(z, "f32")], |k, j, acc| {
        let ai = k.add(abase, j);
        let x = k.loadf(a, &ai, ae);
        let ax = k.abs(&x);
        let gt = k.fcmp("ogt", &ax, &acc[0]);
        vec![k.select(&gt, &ax, &acc[0], "f32")]
    });
    let amax = k.warp_max(&m[0]);
    let c127 = k.cf(127.0);
    let inv = k.fdiv(&c127, &amax);
    let scale = k.fdiv(&amax, &c127);
    let zero = k.cf(0.0);
    let inf = k.cf(f32::INFINITY);
    let pos = k.fcmp("ogt", &amax, &zero);
    let fin = k.fcmp("olt", &amax, &inf);
    let ok = k.and(&pos, &fin);
    ActQuant { inv, scale, ok }
}

/// `x` quantized to int8 and back under `q`: `round_ties_even(x * inv) * scale` (the clamp to
/// ±127 cannot bind: `|x * inv| <= 127 (1 + 2^-24)^2`), 0 when the row's scale is 0 or `x` is
/// NaN (whose code is 0).
fn fake_quant_x(k: &mut Kt, x: &str, q: &ActQuant) -> String {
    let t = k.fmul(x, &q.inv);
    let r = k.roundeven(&t);
    let lim = k.cf(128.0);
    let inr = k.fcmp("olt", &r, &lim); // false for NaN
    let ok = k.and(&q.ok, &inr);
    let y = k.fmul(&r, &q.scale);
    let zero = k.cf(0.0);
    k.select(&ok, &y, &zero, "f32")
}

/// Generates the kernel for node `n`. `elems[i]` is the storage of operand `i`; the output is
/// f32 (i32 for positions and i32 movement). `max_context` sizes rope's tables.
pub fn kernel(g: &Graph, n: NodeId, elems: &[Elem], max_context: usize, max_chunk: usize) -> Result<Option<GpuKernel>> {
    let node = g.node(n);
    if matches!(node.op, Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape) {
        return Ok(None);
    }
    let ins = g.inputs(n);
    let tys: Vec<_> = ins.iter().map(|&i| g.ty(i)).collect();
    match node.op.infer_type(&tys, None) {
        Ok(t) if t == node.ty => {}
        Ok(t) => return Err(unsupported(g, n, format!("node type {} but operands give {t}", node.ty))),
        Err(e) => return Err(unsupported(g, n, e.to_string())),
    }
    let name = format!("{}_{}", node.op.name(), n.index());
    let shapes: Vec<Vec<Dim>> = ins.iter().map(|&i| g.ty(i).shape.clone()).collect();
    let out = node.ty.shape.clone();
    let arity = ins.len();
    let ob = format!("%b{arity}");
    let mut tables = Vec::new();
    let mut scratch_bytes = 0u64;
    let mut nbufs = arity + 1;
    let err = |m: String| unsupported(g, n, m);
    // Packed operands are only valid as a product's right-hand side.
    for (i, e) in elems.iter().enumerate() {
        let product_rhs = i == 1 && matches!(node.op, Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } | Op::GatedLinear { .. });
        let table = i == 0 && matches!(node.op, Op::Gather);
        if matches!(e, Elem::Packed(_)) && !product_rhs && !table {
            return Err(err(format!("operand {i} is a packed weight, which this op cannot read")));
        }
    }
    // A product whose rhs is a W8A8/W4A8 weight (or a row-wise concat of them) reads its lhs
    // quantized per token to int8, exactly as the interpreter does (the scalar paths only).
    let actq = llmc_ir::interp::acts_quantized(g, n);
    let mut k = Kt::new(&name, 0);
    let mut failure: Option<String> = None;
    let l: Launch = match &node.op {
        Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape => unreachable!("handled above"),
        Op::Unary(u) => {
            let u = *u;
            per_element(&mut k, &out, |k, gid, _| {
                let x = k.loadf("%b0", gid, elems[0]);
                let y = k.unary(u, &x);
                k.storef(&ob, gid, &y);
            })
        }
        Op::Binary(b) => {
            let op = match b {
                llmc_ir::BinaryOp::Add => "arith.addf",
                llmc_ir::BinaryOp::Sub => "arith.subf",
                llmc_ir::BinaryOp::Mul => "arith.mulf",
                llmc_ir::BinaryOp::Div => "arith.divf",
            };
            per_element(&mut k, &out, |k, gid, c| {
                let oa = broadcast_offset(k, c, &out, &shapes[0]);
                let obb = broadcast_offset(k, c, &out, &shapes[1]);
                let a = k.loadf("%b0", &oa, elems[0]);
                let bv = k.loadf("%b1", &obb, elems[1]);
                let y = k.op(&format!("{op} {a}, {bv} : f32"));
                k.storef(&ob, gid, &y);
            })
        }
        Op::Transpose { perm } => {
            let is_i32 = elems[0] == Elem::I32;
            per_element(&mut k, &out, |k, gid, c| {
                let st = strides(k, &shapes[0]);
                let mut off = k.ci(0);
                for (i, &p) in perm.iter().enumerate() {
                    let t = k.mul(&c[i], &st[p]);
                    off = k.add(&off, &t);
                }
                copy_elem(k, "%b0", &off, elems[0], &ob, gid, is_i32);
            })
        }
        Op::Slice { axis, start, .. } => {
            let (axis, start) = (*axis, *start as i64);
            let is_i32 = elems[0] == Elem::I32;
            per_element(&mut k, &out, |k, gid, c| {
                let st = strides(k, &shapes[0]);
                let mut off = k.ci(0);
                for (i, ci) in c.iter().enumerate() {
                    let ci = if i == axis { k.addc(ci, start) } else { ci.clone() };
                    let t = k.mul(&ci, &st[i]);
                    off = k.add(&off, &t);
                }
                copy_elem(k, "%b0", &off, elems[0], &ob, gid, is_i32);
            })
        }
        Op::Concat { axis, .. } => {
            let axis = *axis;
            per_element(&mut k, &out, |k, gid, c| {
                let mut at = 0i64;
                for (j, sh) in shapes.iter().enumerate() {
                    let len = sh[axis].as_const().unwrap_or(0) as i64;
                    let lo = k.ci(at);
                    let hi = k.ci(at + len);
                    let ge = k.cmp("sge", &c[axis], &lo);
                    let lt = k.cmp("slt", &c[axis], &hi);
                    let inside = k.and(&ge, &lt);
                    let cc = c.to_vec();
                    let sh = sh.clone();
                    let e = elems[j];
                    k.if_(&inside, |k| {
                        let st = strides(k, &sh);
                        let mut off = k.ci(0);
                        for (i, ci) in cc.iter().enumerate() {
                            let ci = if i == axis { k.addc(ci, -at) } else { ci.clone() };
                            let t = k.mul(&ci, &st[i]);
                            off = k.add(&off, &t);
                        }
                        copy_elem(k, &format!("%b{j}"), &off, e, &ob, gid, e == Elem::I32);
                    });
                    at += len;
                }
            })
        }
        Op::Gather => {
            let h = shapes[0][1].as_const().unwrap_or(0) as i64;
            let v = shapes[0][0].as_const().unwrap_or(0) as i64;
            per_element(&mut k, &out, |k, gid, _| {
                let hv = k.ci(h);
                let row = k.div(gid, &hv);
                let col = k.rem(gid, &hv);
                let id = k.loadi32("%b1", &row);
                let id = k.i32_to_i64(&id);
                let zero = k.ci(0);
                let vv = k.ci(v);
                let ge = k.cmp("sge", &id, &zero);
                let lt = k.cmp("slt", &id, &vv);
                let ok = k.and(&ge, &lt);
                let safe = k.select(&ok, &id, &zero, "i64");
                let x = match elems[0] {
                    // A packed table (a tied embedding and LM head): the element dequantized.
                    Elem::Packed(layout) => match packed_elem(k, "%b0", layout, &safe, &col, h as usize) {
                        Ok(x) => x,
                        Err(e) => {
                            failure = Some(e);
                            k.cf(0.0)
                        }
                    },
                    e => {
                        let r = k.mul(&safe, &hv);
                        let idx = k.add(&r, &col);
                        k.loadf("%b0", &idx, e)
                    }
                };
                let zf = k.cf(0.0);
                let y = k.select(&ok, &x, &zf, "f32");
                k.storef(&ob, gid, &y);
            })
        }
        Op::Positions => per_element(&mut k, &out, |k, gid, _| {
            let v = k.add("%p", gid);
            let v = k.i64_to_i32(&v);
            k.store(&ob, gid, &v, "i32");
        }),
        Op::CausalMask { window } => {
            let window = *window;
            let r = out.len();
            per_element(&mut k, &out, |k, gid, c| {
                let (si, ti) = (&c[r - 2], &c[r - 1]);
                let q = k.add("%p", si);
                let vis = k.cmp("sle", ti, &q);
                let vis = match window {
                    Some(w) => {
                        let d = k.sub(&q, ti);
                        let wv = k.ci(w as i64);
                        let inw = k.cmp("slt", &d, &wv);
                        k.and(&vis, &inw)
                    }
                    None => vis,
                };
                let x = k.loadf("%b0", gid, elems[0]);
                let ninf = k.cf(f32::NEG_INFINITY);
                let y = k.select(&vis, &x, &ninf, "f32");
                k.storef(&ob, gid, &y);
            })
        }
        Op::Rope { rotary_dim } => {
            let inv_freq = match g.op(ins[1]) {
                Op::Const { values } => values.clone(),
                other => return Err(err(format!("inv_freq (operand 1) must be a const, got `{}`", other.name()))),
            };
            let half = rotary_dim / 2;
            if inv_freq.len() != half || max_context == 0 {
                return Err(err(format!("inv_freq has {} values, rotary_dim {rotary_dim} needs {half}", inv_freq.len())));
            }
            let (cos, sin) = crate::cpu::rope::rope_tables(&inv_freq, max_context);
            tables = vec![cos, sin];
            nbufs += 2;
            let (cb, sb) = (format!("%b{}", arity + 1), format!("%b{}", arity + 2));
            let d = shapes[0][2].as_const().unwrap_or(0) as i64;
            let (r, h) = (*rotary_dim as i64, half as i64);
            per_element(&mut k, &out, |k, gid, c| {
                let (si, di) = (&c[0], &c[2]);
                let x = k.loadf("%b0", gid, elems[0]);
                let rv = k.ci(r);
                let rot = k.cmp("slt", di, &rv);
                let y = k.if_else(
                    &rot,
                    "f32",
                    |k| {
                        let hv = k.ci(h);
                        let i = k.rem(di, &hv);
                        let first = k.cmp("slt", di, &hv);
                        let pos = k.add("%p", si);
                        let ti = k.mul(&pos, &hv);
                        let ti = k.add(&ti, &i);
                        let cs = k.loadf(&cb, &ti, Elem::F32);
                        let sn = k.loadf(&sb, &ti, Elem::F32);
                        // the partner channel: d + R/2 for the first half, d - R/2 for the second
                        let nh = k.ci(-h);
                        let delta = k.select(&first, &hv, &nh, "i64");
                        let po = k.add(gid, &delta);
                        let other = k.loadf("%b0", &po, elems[0]);
                        let nsn = k.fneg(&sn);
                        let sgn = k.select(&first, &nsn, &sn, "f32");
                        let a = k.fmul(&x, &cs);
                        k.fma(&other, &sgn, &a)
                    },
                    |_| x.clone(),
                );
                k.storef(&ob, gid, &y);
            });
            let _ = d;
            launch(&out, 1, 1, BLOCK)
        }
        Op::KvConcat { .. } => {
            // Rows `P..P+S` at `P * row`: a contiguous cache.
            crate::plan::require_contiguous_kv_of(g, n, "the CUDA kv_concat kernel")?;
            let xs = shapes[0].clone();
            let inner: i64 = xs[1..].iter().map(|d| d.as_const().unwrap_or(0) as i64).product();
            per_element(&mut k, &xs, |k, gid, _| {
                let x = k.loadf("%b0", gid, elems[0]);
                let base = k.mulc("%p", inner);
                let o = k.add(&base, gid);
                k.storef(&ob, &o, &x);
            })
        }
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => {
            let eps = *eps;
            let layer = matches!(node.op, Op::LayerNorm { .. });
            let h = out[out.len() - 1].as_const().unwrap_or(0) as i64;
            let rows = &out[..out.len() - 1];
            per_warp(&mut k, rows, |k, row, lane| {
                let hv = k.ci(h);
                let base = k.mul(row, &hv);
                let hf = k.cf(h as f32);
                let mean = if layer {
                    let s = warp_sum_over(k, lane, &hv, |k, j, acc| {
                        let i = k.add(&base, j);
                        let x = k.loadf("%b0", &i, elems[0]);
                        k.fadd(acc, &x)
                    });
                    Some(k.fdiv(&s, &hf))
                } else {
                    None
                };
                let ss = warp_sum_over(k, lane, &hv, |k, j, acc| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    let x = match &mean {
                        Some(m) => k.fsub(&x, m),
                        None => x,
                    };
                    k.fma(&x, &x, acc)
                });
                let var = k.fdiv(&ss, &hf);
                let e = k.cf(eps);
                let ve = k.fadd(&var, &e);
                let r = k.rsqrt(&ve);
                let st = k.ci(32);
                k.for_(lane, &hv, &st, &[], |k, j, _| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    let x = match &mean {
                        Some(m) => k.fsub(&x, m),
                        None => x,
                    };
                    let w = k.loadf("%b1", j, elems[1]);
                    let y = k.fmul(&x, &r);
                    let y = if layer {
                        let b = k.loadf("%b2", j, elems[2]);
                        k.fma(&y, &w, &b)
                    } else {
                        k.fmul(&y, &w)
                    };
                    k.storef(&ob, &i, &y);
                    vec![]
                });
            })
        }
        Op::Reduce(r) => {
            let r = *r;
            let xs = shapes[0].clone();
            let last = xs[xs.len() - 1];
            let rows = xs[..xs.len() - 1].to_vec();
            per_warp(&mut k, &rows, |k, row, lane| {
                let hv = dimv(k, last);
                let base = k.mul(row, &hv);
                let st = k.ci(32);
                let init = if r == ReduceOp::Max { k.cf(f32::NEG_INFINITY) } else { k.cf(0.0) };
                let acc = k.for_(lane, &hv, &st, &[(init, "f32")], |k, j, acc| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    vec![if r == ReduceOp::Max { k.fmax(&acc[0], &x) } else { k.fadd(&acc[0], &x) }]
                });
                let v = if r == ReduceOp::Max { k.warp_max(&acc[0]) } else { k.warp_sum(&acc[0]) };
                let v = if r == ReduceOp::Mean {
                    let hf = k.i64_to_f32(&hv);
                    k.fdiv(&v, &hf)
                } else {
                    v
                };
                let zero = k.ci(0);
                let first = k.cmp("eq", lane, &zero);
                k.if_(&first, |k| k.storef(&ob, row, &v));
            })
        }
        Op::Softmax => {
            let last = out[out.len() - 1];
            let rows = out[..out.len() - 1].to_vec();
            per_warp(&mut k, &rows, |k, row, lane| {
                let hv = dimv(k, last);
                let base = k.mul(row, &hv);
                let st = k.ci(32);
                let ninf = k.cf(f32::NEG_INFINITY);
                let m = k.for_(lane, &hv, &st, &[(ninf, "f32")], |k, j, acc| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    vec![k.fmax(&acc[0], &x)]
                });
                let m = k.warp_max(&m[0]);
                let s = warp_sum_over(k, lane, &hv, |k, j, acc| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    let d = k.fsub(&x, &m);
                    let e = k.exp(&d);
                    k.fadd(acc, &e)
                });
                let one = k.cf(1.0);
                let inv = k.fdiv(&one, &s);
                k.for_(lane, &hv, &st, &[], |k, j, _| {
                    let i = k.add(&base, j);
                    let x = k.loadf("%b0", &i, elems[0]);
                    let d = k.fsub(&x, &m);
                    let e = k.exp(&d);
                    let y = k.fmul(&e, &inv);
                    k.storef(&ob, &i, &y);
                    vec![]
                });
            })
        }
        Op::Matmul { transpose_b } => {
            let tb = *transpose_b;
            let (a, b) = (&shapes[0], &shapes[1]);
            let (ra, rb, ro) = (a.len(), b.len(), out.len());
            let kd = a[ra - 1];
            let (m_d, n_d) = (out[ro - 2], out[ro - 1]);
            let items = out.clone();
            per_warp(&mut k, &items, |k, item, lane| {
                let c = coords(k, item, &items);
                // batch offsets (broadcast) of a and b, in elements
                let ast = strides(k, a);
                let bst = strides(k, b);
                let mut ao = k.ci(0);
                for ax in 0..ra - 2 {
                    let oax = ro - ra + ax;
                    if a[ax] == Dim::N(1) && out[oax] != Dim::N(1) {
                        continue;
                    }
                    let t = k.mul(&c[oax], &ast[ax]);
                    ao = k.add(&ao, &t);
                }
                let mut bo = k.ci(0);
                for ax in 0..rb - 2 {
                    let oax = ro - rb + ax;
                    if b[ax] == Dim::N(1) && out[oax] != Dim::N(1) {
                        continue;
                    }
                    let t = k.mul(&c[oax], &bst[ax]);
                    bo = k.add(&bo, &t);
                }
                let (mi, ni) = (&c[ro - 2], &c[ro - 1]);
                let kv = dimv(k, kd);
                let nv = dimv(k, n_d);
                let _ = m_d;
                let arow = k.mul(mi, &kv);
                let abase = k.add(&ao, &arow);
                let kconst = kd.as_const().unwrap_or(0);
                let aq = actq.then(|| act_quant(k, lane, "%b0", elems[0], &abase, &kv));
                let s = if !actq && tb && vec8(elems[1], kconst) && vec8(elems[0], kconst) {
                    let brow = k.mul(ni, &kv);
                    let bbase = k.add(&bo, &brow);
                    warp_dot8(k, lane, kconst, "%b0", elems[0], &[abase.clone()], "%b1", elems[1], &[bbase]).remove(0)
                } else { warp_sum_over(k, lane, &kv, |k, j, acc| {
                    let ai = k.add(&abase, j);
                    let x = k.loadf("%b0", &ai, elems[0]);
                    let x = match &aq {
                        Some(q) => fake_quant_x(k, &x, q),
                        None => x,
                    };
                    let bi = if tb {
                        let r = k.mul(ni, &kv);
                        let r = k.add(&r, j);
                        k.add(&bo, &r)
                    } else {
                        let r = k.mul(j, &nv);
                        let r = k.add(&r, ni);
                        k.add(&bo, &r)
                    };
                    let w = match elems[1] {
                        Elem::Packed(layout) => {
                            let kc = kd.as_const().unwrap_or(0);
                            packed_elem(k, "%b1", layout, ni, j, kc).unwrap_or_else(|e| {
                                failure = Some(e);
                                x.clone()
                            })
                        }
                        e => k.loadf("%b1", &bi, e),
                    };
                    k.fma(&x, &w, acc)
                }) };
                let zero = k.ci(0);
                let first = k.cmp("eq", lane, &zero);
                k.if_(&first, |k| k.storef(&ob, item, &s));
            })
        }
        Op::Linear { transpose_b, bias, act, residual } => {
            let (tb, bias, act, residual) = (*transpose_b, *bias, *act, *residual);
            let b = &shapes[1];
            let (kd, nd) = if tb { (b[1], b[0]) } else { (b[0], b[1]) };
            let (kc, nc) = (kd.as_const().unwrap_or(0), nd.as_const().unwrap_or(0));
            let items = out.clone();
            let res_i = 2 + bias as usize;
            per_warp(&mut k, &items, |k, item, lane| {
                let nv = k.ci(nc as i64);
                let kv = k.ci(kc as i64);
                let row = k.div(item, &nv);
                let col = k.rem(item, &nv);
                let epilogue = |k: &mut Kt, s: &str, item: &str| {
                    let mut y = s.to_string();
                    if bias {
                        let bv = k.loadf("%b2", &col, elems[2]);
                        y = k.fadd(&y, &bv);
                    }
                    if let Some(u) = act {
                        y = k.unary(u, &y);
                    }
                    if residual {
                        let r = k.loadf(&format!("%b{res_i}"), item, elems[res_i]);
                        y = k.fadd(&y, &r);
                    }
                    k.storef(&ob, item, &y);
                };
                let zero = k.ci(0);
                if !actq && tb && vec8(elems[1], kc) && vec8(elems[0], kc) {
                    let rbv = k.ci(LINEAR_ROWS);
                    let phase = k.rem(&row, &rbv);
                    let lead = k.cmp("eq", &phase, &zero);
                    k.if_(&lead, |k| {
                        let rows_total = numel(k, &out[..out.len() - 1]);
                        let last = k.addc(&rows_total, -1);
                        let mut abases = Vec::new();
                        let mut rows = Vec::new();
                        for i in 0..LINEAR_ROWS {
                            let r = k.addc(&row, i);
                            let rc = k.min(&r, &last);
                            abases.push(k.mul(&rc, &kv));
                            rows.push(r);
                        }
                        let bbase = k.mul(&col, &kv);
                        let sums = warp_dot8(k, lane, kc, "%b0", elems[0], &abases, "%b1", elems[1], &[bbase]);
                        let first = k.cmp("eq", lane, &zero);
                        k.if_(&first, |k| {
                            for (r, s) in rows.iter().zip(&sums) {
                                let valid = k.cmp("slt", r, &rows_total);
                                k.if_(&valid, |k| {
                                    let it = k.mul(r, &nv);
                                    let it = k.add(&it, &col);
                                    epilogue(k, s, &it);
                                });
                            }
                        });
                    });
                } else {
                    let abase = k.mul(&row, &kv);
                    let aq = actq.then(|| act_quant(k, lane, "%b0", elems[0], &abase, &kv));
                    let s = warp_sum_over(k, lane, &kv, |k, j, acc| {
                        let ai = k.add(&abase, j);
                        let x = k.loadf("%b0", &ai, elems[0]);
                        let x = match &aq {
                            Some(q) => fake_quant_x(k, &x, q),
                            None => x,
                        };
                        let w = rhs(k, "%b1", elems[1], &col, j, kc, nc, tb).unwrap_or_else(|e| {
                            failure = Some(e);
                            x.clone()
                        });
                        k.fma(&x, &w, acc)
                    });
                    let first = k.cmp("eq", lane, &zero);
                    k.if_(&first, |k| epilogue(k, &s, item));
                }
            })
        }
        Op::GatedLinear { act } => {
            let act = *act;
            let w = &shapes[1];
            let (n2, kc) = (w[0].as_const().unwrap_or(0), w[1].as_const().unwrap_or(0));
            let nc = n2 / 2;
            let items = out.clone();
            per_warp(&mut k, &items, |k, item, lane| {
                let nv = k.ci(nc as i64);
                let kv = k.ci(kc as i64);
                let row = k.div(item, &nv);
                let col = k.rem(item, &nv);
                let col2 = k.add(&col, &nv);
                let zero = k.ci(0);
                let store = |k: &mut Kt, g: &str, u: &str, item: &str| {
                    let a = k.unary(act, g);
                    let y = k.fmul(&a, u);
                    k.storef(&ob, item, &y);
                };
                if !actq && vec8(elems[1], kc) && vec8(elems[0], kc) {
                    // LINEAR_ROWS rows per warp, as in `linear`
                    let rbv = k.ci(LINEAR_ROWS);
                    let phase = k.rem(&row, &rbv);
                    let lead = k.cmp("eq", &phase, &zero);
                    k.if_(&lead, |k| {
                        let rows_total = numel(k, &out[..out.len() - 1]);
                        let last = k.addc(&rows_total, -1);
                        let mut abases = Vec::new();
                        let mut rows = Vec::new();
                        for i in 0..LINEAR_ROWS {
                            let r = k.addc(&row, i);
                            let rc = k.min(&r, &last);
                            abases.push(k.mul(&rc, &kv));
                            rows.push(r);
                        }
                        let gb = k.mul(&col, &kv);
                        let ub = k.mul(&col2, &kv);
                        let sums = warp_dot8(k, lane, kc, "%b0", elems[0], &abases, "%b1", elems[1], &[gb, ub]);
                        let first = k.cmp("eq", lane, &zero);
                        k.if_(&first, |k| {
                            for (i, r) in rows.iter().enumerate() {
                                let valid = k.cmp("slt", r, &rows_total);
                                k.if_(&valid, |k| {
                                    let it = k.mul(r, &nv);
                                    let it = k.add(&it, &col);
                                    store(k, &sums[2 * i], &sums[2 * i + 1], &it);
                                });
                            }
                        });
                    });
                } else {
                    let abase = k.mul(&row, &kv);
                    let aq = actq.then(|| act_quant(k, lane, "%b0", elems[0], &abase, &kv));
                    let st = k.ci(32);
                    let z = k.cf(0.0);
                    let acc = k.for_(lane, &kv, &st, &[(z.clone(), "f32"), (z, "f32")], |k, j, acc| {
                        let ai = k.add(&abase, j);
                        let x = k.loadf("%b0", &ai, elems[0]);
                        let x = match &aq {
                            Some(q) => fake_quant_x(k, &x, q),
                            None => x,
                        };
                        let mut get = |k: &mut Kt, c: &str| {
                            rhs(k, "%b1", elems[1], c, j, kc, n2, true).unwrap_or_else(|e| {
                                failure = Some(e);
                                x.clone()
                            })
                        };
                        let wg = get(k, &col);
                        let wu = get(k, &col2);
                        vec![k.fma(&x, &wg, &acc[0]), k.fma(&x, &wu, &acc[1])]
                    });
                    let (gsum, usum) = (k.warp_sum(&acc[0]), k.warp_sum(&acc[1]));
                    let first = k.cmp("eq", lane, &zero);
                    k.if_(&first, |k| store(k, &gsum, &usum, item));
                }
            })
        }
        Op::Attention { scale, window, causal } => {
            // Key row `t` at `t * NKV * D`: a contiguous cache (or this step's keys).
            for kv in &g.inputs(n)[1..3] {
                crate::plan::require_contiguous_kv_of(g, *kv, "the CUDA attention kernel")?;
            }
            let causal = *causal;
            let (scale, window) = (*scale, *window);
            let (nh, d) = (shapes[0][1].as_const().unwrap_or(1), shapes[0][2].as_const().unwrap_or(0));
            let nkv = shapes[1][1].as_const().unwrap_or(1);
            let group = (nh / nkv.max(1)).max(1);
            let nc = d.div_ceil(32).max(1);
            let items = vec![Dim::S, Dim::N(nh)];
            per_warp(&mut k, &items, |k, item, lane| {
                let nhv = k.ci(nh as i64);
                let si = k.div(item, &nhv);
                let h = k.rem(item, &nhv);
                let gv = k.ci(group as i64);
                let kvh = k.div(&h, &gv);
                let dv = k.ci(d as i64);
                let qbase = k.mul(item, &dv);
                let sc = k.cf(scale);
                let zf = k.cf(0.0);
                // this lane's channels c = lane + 32 i, i < nc; q pre-scaled, 0 past D
                let mut chans = Vec::new();
                let mut qs = Vec::new();
                for i in 0..nc {
                    let c = k.addc(lane, 32 * i as i64);
                    let inside = k.cmp("slt", &c, &dv);
                    let z = k.ci(0);
                    let cs = k.select(&inside, &c, &z, "i64");
                    let qi = k.add(&qbase, &cs);
                    let q = k.loadf("%b0", &qi, elems[0]);
                    let q = k.fmul(&q, &sc);
                    qs.push(k.select(&inside, &q, &zf, "f32"));
                    chans.push((cs, inside));
                }
                let (lo, hi) = if causal {
                    let qpos = k.add("%p", &si);
                    let hi = k.addc(&qpos, 1);
                    let lo = match window {
                        Some(w) => {
                            let l = k.addc(&qpos, 1 - w as i64);
                            let zero = k.ci(0);
                            k.max(&l, &zero)
                        }
                        None => k.ci(0),
                    };
                    (lo, hi)
                } else {
                    // bidirectional: every key of the step ([S, ..]) or of the cache ([T, ..])
                    (k.ci(0), dimv(&mut *k, shapes[1][0]))
                };
                let one = k.ci(1);
                let ninf = k.cf(f32::NEG_INFINITY);
                let mut inits = vec![(ninf, "f32"), (zf.clone(), "f32")];
                for _ in 0..nc {
                    inits.push((zf.clone(), "f32"));
                }
                let nkvv = k.ci(nkv as i64);
                let r = k.for_(&lo, &hi, &one, &inits, |k, t, acc| {
                    let kr = k.mul(t, &nkvv);
                    let kr = k.add(&kr, &kvh);
                    let kbase = k.mul(&kr, &dv);
                    let mut part = zf.clone();
                    let mut vs = Vec::new();
                    for (i, (cs, inside)) in chans.iter().enumerate() {
                        let ki = k.add(&kbase, cs);
                        let kx = k.loadf("%b1", &ki, elems[1]);
                        part = k.fma(&qs[i], &kx, &part);
                        let vx = k.loadf("%b2", &ki, elems[2]);
                        vs.push(k.select(inside, &vx, &zf, "f32"));
                    }
                    let score = k.warp_sum(&part);
                    let mnew = k.fmax(&acc[0], &score);
                    let dm = k.fsub(&acc[0], &mnew);
                    let corr = k.exp(&dm);
                    let ds = k.fsub(&score, &mnew);
                    let pe = k.exp(&ds);
                    let l = k.fmul(&acc[1], &corr);
                    let l = k.fadd(&l, &pe);
                    let mut next = vec![mnew, l];
                    for (i, v) in vs.iter().enumerate() {
                        let a = k.fmul(&acc[2 + i], &corr);
                        next.push(k.fma(&pe, v, &a));
                    }
                    next
                });
                let one_f = k.cf(1.0);
                let inv = k.fdiv(&one_f, &r[1]);
                for (i, (cs, inside)) in chans.iter().enumerate() {
                    let o = k.add(&qbase, cs);
                    let y = k.fmul(&r[2 + i], &inv);
                    k.if_(inside, |k| k.storef(&ob, &o, &y));
                }
            })
        }
        Op::Moe { top_k, act } => {
            let (top_k, act) = (*top_k, *act);
            let h = out[out.len() - 1].as_const().unwrap_or(0);
            let e = shapes[1][0].as_const().unwrap_or(0);
            let i_dim = shapes[3][2].as_const().unwrap_or(0);
            let rows_shape = out[..out.len() - 1].to_vec();
            let rows_at_max: u64 = rows_shape.iter().map(|d| d.as_const().unwrap_or(max_chunk) as u64).product();
            scratch_bytes = rows_at_max * (top_k * i_dim * 4) as u64;
            nbufs += 1;
            let scr = format!("%b{}", arity + 1);
            moe(&mut k, &rows_shape, &ob, &scr, elems, h, e, i_dim, top_k, act)
        }
    };
    if let Some(f) = failure {
        return Err(err(f));
    }
    k.nbufs = nbufs;
    Ok(Some(GpuKernel { name, mlir: k.finish(), launch: l, scratch_bytes, tables }))
}

/// Copies one element (f32 or i32) from `src[off]` to `dst[gid]`.
fn copy_elem(k: &mut Kt, src: &str, off: &str, e: Elem, dst: &str, gid: &str, is_i32: bool) {
    if is_i32 {
        let v = k.loadi32(src, off);
        k.store(dst, gid, &v, "i32");
    } else {
        let v = k.loadf(src, off, e);
        k.storef(dst, gid, &v);
    }
}

#[allow(clippy::too_many_arguments)]
fn moe(k: &mut Kt, rows_shape: &[Dim], ob: &str, scr: &str, elems: &[Elem], h: usize, e: usize, i_dim: usize, top_k: usize, act: UnaryOp) -> Launch {
    let logits = k.shared("moe_logits", e.max(1), "f32");
    let sel = k.shared("moe_sel", top_k.max(1), "i32");
    let wts = k.shared("moe_w", top_k.max(1), "f32");
    let row = k.block_id();
    let tid = k.thread_id();
    let bdim = k.block_dim();
    let rows = numel(k, rows_shape);
    let ok = k.cmp("slt", &row, &rows);
    let (hv, iv, ev) = (k.ci(h as i64), k.ci(i_dim as i64), k.ci(e as i64));
    let xbase = k.mul(&row, &hv);
    let w32 = k.ci(32);
    let warp = k.div(&tid, &w32);
    let lane = k.rem(&tid, &w32);
    let nwarps = k.div(&bdim, &w32);
    let zero = k.ci(0);
    let one = k.ci(1);
    k.if_(&ok, |k| {
        // router logits, a warp per expert
        k.for_(&warp, &ev, &nwarps, &[], |k, ex, _| {
            let rbase = k.mul(ex, &hv);
            let s = warp_sum_over(k, &lane, &hv, |k, j, acc| {
                let xi = k.add(&xbase, j);
                let x = k.loadf("%b0", &xi, elems[0]);
                let ri = k.add(&rbase, j);
                let w = k.loadf("%b1", &ri, elems[1]);
                k.fma(&x, &w, acc)
            });
            let first = k.cmp("eq", &lane, &zero);
            k.if_(&first, |k| k.storef(&logits, ex, &s));
            vec![]
        });
    });
    k.barrier();
    k.if_(&ok, |k| {
        let first = k.cmp("eq", &tid, &zero);
        k.if_(&first, |k| {
            // top-k, ties to the lower expert index; chosen logits are masked with -inf
            for kk in 0..top_k {
                let ninf = k.cf(f32::NEG_INFINITY);
                let best = k.for_(&zero, &ev, &one, &[(ninf.clone(), "f32"), (zero.clone(), "i64")], |k, ex, acc| {
                    let v = k.loadf(&logits, ex, Elem::F32);
                    let gt = k.fcmp("ogt", &v, &acc[0]);
                    vec![k.select(&gt, &v, &acc[0], "f32"), k.select(&gt, ex, &acc[1], "i64")]
                });
                let kc = k.ci(kk as i64);
                k.storef(&wts, &kc, &best[0]);
                let b32 = k.i64_to_i32(&best[1]);
                k.store(&sel, &kc, &b32, "i32");
                k.storef(&logits, &best[1], &ninf);
            }
            // softmax over the chosen logits (the first is the largest)
            let k0 = k.ci(0);
            let m = k.loadf(&wts, &k0, Elem::F32);
            let mut es = Vec::new();
            let mut sum = k.cf(0.0);
            for kk in 0..top_k {
                let kc = k.ci(kk as i64);
                let v = k.loadf(&wts, &kc, Elem::F32);
                let d = k.fsub(&v, &m);
                let ex = k.exp(&d);
                sum = k.fadd(&sum, &ex);
                es.push(ex);
            }
            for (kk, ex) in es.iter().enumerate() {
                let kc = k.ci(kk as i64);
                let w = k.fdiv(ex, &sum);
                k.storef(&wts, &kc, &w);
            }
        });
    });
    k.barrier();
    // the chosen experts' gated hidden rows: scratch[row, kk, i]
    k.if_(&ok, |k| {
        for kk in 0..top_k {
            let kc = k.ci(kk as i64);
            let ex = k.loadi32(&sel, &kc);
            let ex = k.i32_to_i64(&ex);
            let i2 = k.mulc(&iv, 2);
            let emat = k.mul(&ex, &i2);
            k.for_(&tid, &iv, &bdim, &[], |k, i, _| {
                let grow = k.add(&emat, i);
                let gbase = k.mul(&grow, &hv);
                let urow = k.add(&grow, &iv);
                let ubase = k.mul(&urow, &hv);
                let z = k.cf(0.0);
                let st = k.ci(1);
                let acc = k.for_(&zero, &hv, &st, &[(z.clone(), "f32"), (z, "f32")], |k, j, acc| {
                    let xi = k.add(&xbase, j);
                    let x = k.loadf("%b0", &xi, elems[0]);
                    let gi = k.add(&gbase, j);
                    let gw = k.loadf("%b2", &gi, elems[2]);
                    let ui = k.add(&ubase, j);
                    let uw = k.loadf("%b2", &ui, elems[2]);
                    vec![k.fma(&x, &gw, &acc[0]), k.fma(&x, &uw, &acc[1])]
                });
                let a = k.unary(act, &acc[0]);
                let hval = k.fmul(&a, &acc[1]);
                let tk = k.ci(top_k as i64);
                let so = k.mul(&row, &tk);
                let so = k.add(&so, &kc);
                let so = k.mul(&so, &iv);
                let so = k.add(&so, i);
                k.storef(scr, &so, &hval);
                vec![]
            });
        }
    });
    k.barrier();
    // down projection, weighted sum over the chosen experts
    k.if_(&ok, |k| {
        k.for_(&tid, &hv, &bdim, &[], |k, c, _| {
            let mut total = k.cf(0.0);
            for kk in 0..top_k {
                let kc = k.ci(kk as i64);
                let ex = k.loadi32(&sel, &kc);
                let ex = k.i32_to_i64(&ex);
                let w = k.loadf(&wts, &kc, Elem::F32);
                let er = k.mul(&ex, &hv);
                let er = k.add(&er, c);
                let dbase = k.mul(&er, &iv);
                let tk = k.ci(top_k as i64);
                let so = k.mul(&row, &tk);
                let so = k.add(&so, &kc);
                let sbase = k.mul(&so, &iv);
                let z = k.cf(0.0);
                let st = k.ci(1);
                let acc = k.for_(&zero, &iv, &st, &[(z, "f32")], |k, i, acc| {
                    let di = k.add(&dbase, i);
                    let dw = k.loadf("%b3", &di, elems[3]);
                    let si = k.add(&sbase, i);
                    let hx = k.loadf(scr, &si, Elem::F32);
                    vec![k.fma(&dw, &hx, &acc[0])]
                });
                total = k.fma(&w, &acc[0], &total);
            }
            let oi = k.add(&xbase, c);
            k.storef(ob, &oi, &total);
            vec![]
        });
    });
    launch(rows_shape, 1, ROW_BLOCK, ROW_BLOCK)
}
