//! Transcendental functions as inline Cranelift IR (no libcalls), generic over `f32` / `f32x4`.
//!
//! - `exp`: `2^n * P(r)` with `n = round(x log2 e)` found by the 1.5*2^23 magic-number trick (no
//!   SSE4.1 rounding needed), Cody-Waite `r = x - n ln2` in two parts, the Cephes `expf`
//!   polynomial, and `2^n` applied in two halves so results down to the subnormal range are right.
//!   Inputs are clamped to [-104, 89] first: overflow to `+inf` and underflow to `0` then happen
//!   in the final scaling; NaN stays NaN.
//! - `tanh`: the Cephes `tanhf` odd polynomial for `|x| < 0.625`, `1 - 2/(e^{2|x|}+1)` above.
//! - `sigmoid`/`silu`: `1/(1+e^{-x})`, `x/(1+e^{-x})` as the reference defines them.
//! - `gelu`: `x * (1 - h)` for `x > 0` and `x * h` otherwise, `h = erfc(|x|/sqrt 2)/2`, with `erfc`
//!   from Numerical Recipes' Chebyshev fit `t exp(-z^2 + P(t))`, `t = 1/(1+z/2)` (fractional error
//!   < 1.2e-7 everywhere), so negative inputs keep their relative accuracy.
//! - `gelu_tanh`: `0.5 x (1 + tanh u) = x / (1 + e^{-2u})`, which has no cancellation for `x < 0`.

// Coefficients are written as published (Cephes, Numerical Recipes), digits beyond f32 included.
#![allow(clippy::excessive_precision)]

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use llmc_ir::UnaryOp;

use super::builder::Kb;

/// Horner evaluation of `c[0] x^(n-1) + ... + c[n-1]`.
fn horner(kb: &mut Kb, ty: Type, x: Value, c: &[f32]) -> Value {
    let mut acc = kb.fc(ty, c[0]);
    for &k in &c[1..] {
        let kv = kb.fc(ty, k);
        acc = kb.fma(acc, x, kv);
    }
    acc
}

/// `e^x`.
pub(crate) fn exp(kb: &mut Kb, ty: Type, x: Value) -> Value {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const MAGIC_BITS: i32 = 0x4B40_0000;
    const LN2_HI: f32 = 0.693359375; // 355/512: n * LN2_HI is exact for |n| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Clamp first (`minps`/`maxps`, NaN passes through): below -104 the result rounds to 0 and
    // above 89 it overflows to +inf on its own.
    let lo = kb.fc(ty, -104.0);
    let x = kb.fsel(ty, FloatCC::LessThan, x, lo, lo, x);
    let hi = kb.fc(ty, 89.0);
    let x = kb.fsel(ty, FloatCC::LessThan, hi, x, hi, x);
    let log2e = kb.fc(ty, LOG2E);
    let magic = kb.fc(ty, MAGIC);
    let t = kb.fma(x, log2e, magic);
    let nf = kb.fsub(t, magic);
    let c1 = kb.fc(ty, -LN2_HI);
    let r = kb.fma(nf, c1, x);
    let c2 = kb.fc(ty, -LN2_LO);
    let r = kb.fma(nf, c2, r);
    // e^r on |r| <= ln2/2: 1 + r + r^2 P(r) (Cephes expf).
    let p = horner(
        kb,
        ty,
        r,
        &[1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1],
    );
    let r2 = kb.fmul(r, r);
    let one = kb.fc(ty, 1.0);
    let r1 = kb.fadd(r, one);
    let y = kb.fma(p, r2, r1);
    // 2^n = 2^(n>>1) * 2^(n - (n>>1)), each factor a normal float for n in [-150, 128].
    let tb = kb.as_int(ty, t);
    let mb = kb.ic32(ty, MAGIC_BITS);
    let n = kb.b.ins().isub(tb, mb);
    let n1 = kb.b.ins().sshr_imm_s(n, 1);
    let n2 = kb.b.ins().isub(n, n1);
    let bias = kb.ic32(ty, 127);
    let e1 = kb.b.ins().iadd(n1, bias);
    let e1 = kb.b.ins().ishl_imm_s(e1, 23);
    let e2 = kb.b.ins().iadd(n2, bias);
    let e2 = kb.b.ins().ishl_imm_s(e2, 23);
    let s1 = kb.as_float(ty, e1);
    let s2 = kb.as_float(ty, e2);
    let y = kb.fmul(y, s1);
    kb.fmul(y, s2)
}

/// `tanh x`.
pub(crate) fn tanh(kb: &mut Kb, ty: Type, x: Value) -> Value {
    let ax = kb.b.ins().fabs(x);
    // Small: x + x^3 P(x^2).
    let z = kb.fmul(x, x);
    let p = horner(kb, ty, z, &[-5.704_988_7e-3, 2.063_908_9e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328_2e-1]);
    let xz = kb.fmul(x, z);
    let small = kb.fma(xz, p, x);
    // Large: 1 - 2 / (e^{2|x|} + 1), sign of x.
    let two = kb.fc(ty, 2.0);
    let a2 = kb.fmul(ax, two);
    let e = exp(kb, ty, a2);
    let one = kb.fc(ty, 1.0);
    let e1 = kb.fadd(e, one);
    let q = kb.fdiv(two, e1);
    let large = kb.fsub(one, q);
    let large = kb.copysign(ty, large, x);
    let th = kb.fc(ty, 0.625);
    kb.fsel(ty, FloatCC::LessThan, ax, th, small, large)
}

/// `x / (1 + e^{-k x})`-style helper: returns `num / (1 + e^{arg})`.
fn over_one_plus_exp(kb: &mut Kb, ty: Type, num: Value, arg: Value) -> Value {
    let e = exp(kb, ty, arg);
    let one = kb.fc(ty, 1.0);
    let d = kb.fadd(one, e);
    kb.fdiv(num, d)
}

/// `erfc(a / sqrt 2) / 2` for `a = |x| >= 0`.
fn half_erfc(kb: &mut Kb, ty: Type, a: Value) -> Value {
    // erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2) (Numerical Recipes' erfcc).
    let r = kb.fc(ty, std::f32::consts::FRAC_1_SQRT_2);
    let z = kb.fmul(a, r);
    let one = kb.fc(ty, 1.0);
    let half = kb.fc(ty, 0.5);
    let d = kb.fma(z, half, one);
    let t = kb.fdiv(one, d);
    let p = horner(
        kb,
        ty,
        t,
        &[
            0.170_872_77,
            -0.822_152_23,
            1.488_515_87,
            -1.135_203_98,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_68,
            -1.265_512_23,
        ],
    );
    // z^2 = a^2 / 2 straight from `a` (rounding z first would cost 2 z^2 ulp relative error), as
    // ah^2/2 + c with ah = a cut to 12 significant bits (so ah^2/2 is exact and c small). TwoSum
    // recovers the rounding error of (P - c) - ah^2/2 as `lo`, applied as
    // exp(s + lo) = exp(s) (1 + lo): the exponent's error is O(ulp(P)), not O(ulp(z^2)).
    let ab = kb.as_int(ty, a);
    let hi_mask = kb.ic32(ty, 0xFFFF_F000u32 as i32);
    let ahb = kb.b.ins().band(ab, hi_mask);
    let ah = kb.as_float(ty, ahb);
    let al = kb.fsub(a, ah);
    let asum = kb.fadd(a, ah);
    let c = kb.fmul(al, asum);
    let c = kb.fmul(c, half);
    let hh = kb.fmul(ah, ah);
    let hh = kb.fmul(hh, half);
    let nhh = kb.b.ins().fneg(hh);
    let q = kb.fsub(p, c);
    let s = kb.fadd(q, nhh);
    let bb = kb.fsub(s, q);
    let sb = kb.fsub(s, bb);
    let e1 = kb.fsub(q, sb);
    let e2 = kb.fsub(nhh, bb);
    let lo = kb.fadd(e1, e2);
    let e = exp(kb, ty, s);
    let e = kb.fma(e, lo, e);
    let te = kb.fmul(t, e);
    kb.fmul(te, half)
}

/// One unary op on `x` of type `ty`.
pub(crate) fn unary(kb: &mut Kb, ty: Type, op: UnaryOp, x: Value) -> Value {
    match op {
        UnaryOp::Neg => kb.b.ins().fneg(x),
        UnaryOp::Exp => exp(kb, ty, x),
        UnaryOp::Sqrt => kb.b.ins().sqrt(x),
        UnaryOp::Rsqrt => {
            let s = kb.b.ins().sqrt(x);
            let one = kb.fc(ty, 1.0);
            kb.fdiv(one, s)
        }
        UnaryOp::Tanh => tanh(kb, ty, x),
        UnaryOp::Sigmoid => {
            let one = kb.fc(ty, 1.0);
            let nx = kb.b.ins().fneg(x);
            over_one_plus_exp(kb, ty, one, nx)
        }
        UnaryOp::Silu => {
            let nx = kb.b.ins().fneg(x);
            over_one_plus_exp(kb, ty, x, nx)
        }
        UnaryOp::Gelu => {
            let ax = kb.b.ins().fabs(x);
            // erfc(16/sqrt 2) underflows f32 already; the clamp keeps a^2 finite (a NaN x
            // becomes 16 here but stays NaN in the product below).
            let amax = kb.fc(ty, 16.0);
            let a = kb.fsel(ty, FloatCC::LessThan, ax, amax, ax, amax);
            let h = half_erfc(kb, ty, a);
            let one = kb.fc(ty, 1.0);
            let h1 = kb.fsub(one, h);
            let zero = kb.fc(ty, 0.0);
            let f = kb.fsel(ty, FloatCC::GreaterThan, x, zero, h1, h);
            kb.fmul(x, f)
        }
        UnaryOp::GeluTanh => {
            // -2u = -2 sqrt(2/pi) x (1 + 0.044715 x^2)
            let xx = kb.fmul(x, x);
            let c = kb.fc(ty, 0.044715);
            let one = kb.fc(ty, 1.0);
            let w = kb.fma(xx, c, one);
            let k = kb.fc(ty, (-2.0 * (2.0 / std::f64::consts::PI).sqrt()) as f32);
            let kx = kb.fmul(x, k);
            let arg = kb.fmul(kx, w);
            over_one_plus_exp(kb, ty, x, arg)
        }
    }
}
