//! The int8 KV cache (`kv<int8>`, `ir::KvLayout::Int8`): how `kv_concat` writes a row and how
//! `attention` reads keys and values back.
//!
//! A state of logical type `f32[C, .., D]` is one buffer: the int8 codes of its `C` rows (row `t`
//! at byte `t * row`, `row` the product of the dimensions after the first), then, from the next
//! 64-byte boundary, one f32 scale per `D`-vector (vector `t * row / D + v` at 4 bytes each).
//! Each vector is quantized exactly as `ir::quant::quantize_act` quantizes an activation row, in
//! the same f32 operations: `inv = 127 / max|x|`, `q = round_ties_even(x * inv)`, scale
//! `max|x| / 127` (codes and scale 0 when the maximum is 0 or not finite). Reading back is
//! `q as f32 * scale`, which the interpreter's state holds, so the kernels agree with it exactly
//! on what the cache contains.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};

use super::builder::{Kb, V4};
use ir::{Graph, KvLayout, NodeId, StateDecl};

use crate::error::{CodegenError, Result};

/// Where an int8 state's parts are, from its declaration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int8State {
    /// Rows (the context `C`).
    pub rows: usize,
    /// Elements of one row (one token).
    pub row: usize,
    /// Elements of one quantized vector (the last dimension).
    pub d: usize,
    /// Byte offset of the scales from the buffer's start.
    pub scales: usize,
}

impl Int8State {
    pub(crate) fn of(decl: &StateDecl) -> Result<Int8State> {
        let dims: Option<Vec<usize>> = decl.ty.shape.iter().map(|d| d.as_const()).collect();
        match dims.as_deref() {
            Some([c, rest @ ..]) if !rest.is_empty() => {
                let row: usize = rest.iter().product();
                let d = *rest.last().unwrap_or(&1);
                Ok(Int8State { rows: *c, row, d, scales: KvLayout::int8_scales_at(c * row) })
            }
            _ => Err(CodegenError::Unsupported {
                node: format!("state @{}", decl.name),
                msg: format!("a kv<int8> state needs a static shape of rank 2 or more, got {}", decl.ty),
            }),
        }
    }

    /// Vectors of one row (`row / d`: a token's KV heads).
    pub(crate) fn per_row(&self) -> usize {
        self.row / self.d
    }

    /// The byte addresses of vector `vi`'s codes and of its scale in the state buffer at `buf`
    /// (vector `t * per_row + h` is token `t`'s head `h`).
    pub(crate) fn vector(&self, kb: &mut Kb, buf: Value, vi: Value) -> (Value, Value) {
        let co = kb.muli(vi, self.d as i64);
        let so = kb.muli(vi, 4);
        let so = kb.addi(so, self.scales as i64);
        (kb.add(buf, co), kb.add(buf, so))
    }

    /// The int8 layout of the state value `n` holds rows of, if it has one.
    pub(crate) fn of_value(g: &Graph, n: NodeId, reader: &str) -> Result<Option<Int8State>> {
        match crate::plan::kv_layout_of(g, n, reader)? {
            Some(KvLayout::Int8) => g.kv_state_of(n).map(Int8State::of).transpose(),
            _ => Ok(None),
        }
    }
}

fn flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Quantizes the `d` floats at `src` into codes at `codes` and their scale at `scale` (byte
/// addresses).
pub(crate) fn quantize_vec(kb: &mut Kb, d: usize, src: Value, codes: Value, scale: Value) {
    // max |x|
    let z4 = kb.fc(V4, 0.0);
    let mut acc = z4;
    for c in 0..d / 4 {
        let x = kb.b.ins().load(V4, flags(), src, (16 * c) as i32);
        let a = kb.b.ins().fabs(x);
        acc = kb.fmax(V4, acc, a);
    }
    let mut amax = kb.hmax(acc);
    for e in d / 4 * 4..d {
        let x = kb.b.ins().load(F32, flags(), src, (4 * e) as i32);
        let a = kb.b.ins().fabs(x);
        amax = kb.fmax(F32, amax, a);
    }
    // 0 < max < inf, else codes and scale 0.
    let zs = kb.fc(F32, 0.0);
    let inf = kb.fc(F32, f32::INFINITY);
    let pos = kb.b.ins().fcmp(FloatCC::GreaterThan, amax, zs);
    let fin = kb.b.ins().fcmp(FloatCC::LessThan, amax, inf);
    let ok = kb.b.ins().band(pos, fin);
    let c127 = kb.fc(F32, 127.0);
    let inv = kb.fdiv(c127, amax);
    let inv = kb.b.ins().select(ok, inv, zs);
    let sa = kb.fdiv(amax, c127);
    let sa = kb.b.ins().select(ok, sa, zs);
    kb.b.ins().store(flags(), sa, scale, 0);
    let invv = kb.splat(V4, inv);
    let code4 = |kb: &mut Kb, at: usize| {
        let x = kb.b.ins().load(V4, flags(), src, (4 * at) as i32);
        let x = kb.fmul(x, invv);
        let x = kb.b.ins().nearest(x);
        kb.b.ins().fcvt_to_sint_sat(I32X4, x)
    };
    for c in 0..d / 16 {
        let q: Vec<Value> = (0..4).map(|j| code4(kb, 16 * c + 4 * j)).collect();
        let h0 = kb.b.ins().snarrow(q[0], q[1]);
        let h1 = kb.b.ins().snarrow(q[2], q[3]);
        let bytes = kb.b.ins().snarrow(h0, h1);
        kb.b.ins().store(flags(), bytes, codes, (16 * c) as i32);
    }
    for e in d / 16 * 16..d {
        let x = kb.b.ins().load(F32, flags(), src, (4 * e) as i32);
        let x = kb.fmul(x, inv);
        let x = kb.b.ins().nearest(x);
        let x = kb.b.ins().fcvt_to_sint_sat(I32, x);
        kb.b.ins().istore8(flags(), x, codes, e as i32);
    }
}

/// Writes the `d` values the codes at `codes` with the scale at `scale` stand for, as f32 to
/// `dst` (byte addresses).
pub(crate) fn dequant_vec(kb: &mut Kb, d: usize, codes: Value, scale: Value, dst: Value) {
    let s = kb.b.ins().load(F32, flags(), scale, 0);
    let sv = kb.splat(V4, s);
    for c in 0..d / 8 {
        // 8 codes sign-extended to i16, then each half to i32.
        let h = kb.b.ins().sload8x8(flags(), codes, (8 * c) as i32);
        for (j, half) in [kb.b.ins().swiden_low(h), kb.b.ins().swiden_high(h)].into_iter().enumerate() {
            let f = kb.b.ins().fcvt_from_sint(V4, half);
            let y = kb.fmul(f, sv);
            kb.b.ins().store(flags(), y, dst, (32 * c + 16 * j) as i32);
        }
    }
    for e in d / 8 * 8..d {
        let q = kb.b.ins().sload8(I32, flags(), codes, e as i32);
        let f = kb.b.ins().fcvt_from_sint(F32, q);
        let y = kb.fmul(f, s);
        kb.b.ins().store(flags(), y, dst, (4 * e) as i32);
    }
}
