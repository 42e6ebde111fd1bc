//! Matmul epilogues: a matmul by a 2-D right operand is a `linear`, and the bias add, the
//! activation and the residual add that follow it move into the `linear` (applied in registers
//! before the store); the SwiGLU/GeGLU product of two projections of one input becomes one
//! `gated_linear` over the concatenated weights (materialized at compile time), and so does the
//! product of the two halves of one projection by an already merged gate-up weight (Phi-3).
//!
//! `linear` computes `act(a x b + bias) + residual` with the same f32 rounding as the primitive
//! sequence, so these rewrites are exact.

use super::{always, rule, Binds, Ctx, RuleDef};
use llmc_ir::{DType, Dim, TensorType};

#[rustfmt::skip]
pub const RULES: &[RuleDef] = &[
    rule("matmul-to-linear", "(matmul ?a ?b ?tb)", "(linear ?a ?b ?tb none none none)", rhs_2d),                          // a x b = linear(a, b)        (b 2-D)
    rule("linear-bias", "(add (linear ?a ?b ?tb none none none) ?c)", "(linear ?a ?b ?tb none ?c none)", bias_row),        // linear(a, b) + c = linear(a, b, bias = c)   (c f32[N])
    rule("linear-silu", "(silu (linear ?a ?b ?tb none ?c none))", "(linear ?a ?b ?tb silu ?c none)", always),              // silu(a x b + c) = linear{act = silu}
    rule("linear-gelu", "(gelu (linear ?a ?b ?tb none ?c none))", "(linear ?a ?b ?tb gelu ?c none)", always),              // gelu(a x b + c) = linear{act = gelu}
    rule("linear-gelu-tanh", "(gelu_tanh (linear ?a ?b ?tb none ?c none))", "(linear ?a ?b ?tb gelu_tanh ?c none)", always), // gelu_tanh(a x b + c) = linear{act = gelu_tanh}
    rule("linear-residual", "(add ?r (linear ?a ?b ?tb ?act ?c none))", "(linear ?a ?b ?tb ?act ?c ?r)", residual),        // r + act(a x b + c) = linear{residual = r}
    rule("linear-residual-rhs", "(add (linear ?a ?b ?tb ?act ?c none) ?r)", "(linear ?a ?b ?tb ?act ?c ?r)", residual),    // act(a x b + c) + r = linear{residual = r}
    rule("swiglu", "(mul (silu (matmul ?a ?g true)) (matmul ?a ?u true))", "(gated_linear ?a (concat 0 ?g ?u) silu)", gate_up),                 // silu(a gᵀ) * (a uᵀ) = gated_linear(a, [g; u])
    rule("geglu", "(mul (gelu (matmul ?a ?g true)) (matmul ?a ?u true))", "(gated_linear ?a (concat 0 ?g ?u) gelu)", gate_up),                  // gelu(a gᵀ) * (a uᵀ) = gated_linear(a, [g; u])
    rule("geglu-tanh", "(mul (gelu_tanh (matmul ?a ?g true)) (matmul ?a ?u true))", "(gated_linear ?a (concat 0 ?g ?u) gelu_tanh)", gate_up),  // gelu_tanh(a gᵀ) * (a uᵀ) = gated_linear(a, [g; u])
    rule("swiglu-split", "(mul (silu (slice (matmul ?a ?w true) ?ax 0 ?n)) (slice (matmul ?a ?w true) ?ax ?n ?n2))", "(gated_linear ?a ?w silu)", halves),                // silu(u[.., :N]) * u[.., N:], u = a wᵀ  (a merged gate_up weight)
    rule("geglu-split", "(mul (gelu (slice (matmul ?a ?w true) ?ax 0 ?n)) (slice (matmul ?a ?w true) ?ax ?n ?n2))", "(gated_linear ?a ?w gelu)", halves),                // gelu(u[.., :N]) * u[.., N:]
    rule("geglu-tanh-split", "(mul (gelu_tanh (slice (matmul ?a ?w true) ?ax 0 ?n)) (slice (matmul ?a ?w true) ?ax ?n ?n2))", "(gated_linear ?a ?w gelu_tanh)", halves), // gelu_tanh(u[.., :N]) * u[.., N:]
];

/// The result type of `linear(?a, ?b, ?tb)` without epilogue, when it type-checks.
fn linear_type(c: &Ctx<'_>) -> Option<TensorType> {
    let (a, b) = (c.ty("?a")?, c.shape("?b")?);
    let tb = c.attr("?tb")?.as_bool()?;
    let (k, n) = match b {
        [r, s] if tb => (*s, *r),
        [r, s] => (*r, *s),
        _ => return None,
    };
    let mut shape = a.shape.clone();
    (shape.last() == Some(&k)).then_some(())?;
    *shape.last_mut()? = n;
    Some(TensorType::f32(shape))
}

fn rhs_2d(c: &Ctx<'_>) -> Option<Binds> {
    // matmul needs a rank >= 2; with a 2-D b there are no batch dims to broadcast.
    (c.shape("?b")?.len() == 2 && linear_type(c).is_some()).then(Vec::new)
}

fn bias_row(c: &Ctx<'_>) -> Option<Binds> {
    let out = linear_type(c)?;
    let bias = c.ty("?c")?;
    (bias.dtype == DType::F32 && bias.shape == [*out.shape.last()?]).then(Vec::new)
}

fn residual(c: &Ctx<'_>) -> Option<Binds> {
    (*c.ty("?r")? == linear_type(c)?).then(Vec::new)
}

fn gate_up(c: &Ctx<'_>) -> Option<Binds> {
    let (g, u, a) = (c.shape("?g")?, c.shape("?u")?, c.shape("?a")?);
    let ok = c.is_weight("?g") && c.is_weight("?u") && g == u && matches!(g, [Dim::N(_), k] if a.last() == Some(k));
    ok.then(Vec::new)
}

fn halves(c: &Ctx<'_>) -> Option<Binds> {
    let (a, w) = (c.shape("?a")?, c.shape("?w")?);
    let (n, n2, ax) = (c.attr("?n")?.as_usize()?, c.attr("?n2")?.as_usize()?, c.attr("?ax")?.as_usize()?);
    let ok = a.len() >= 2
        && ax == a.len() - 1
        && matches!(w, [Dim::N(rows), k] if *rows == n2 && n2 == 2 * n && a.last() == Some(k));
    ok.then(Vec::new)
}
