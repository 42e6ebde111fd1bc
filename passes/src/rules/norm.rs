//! Norms: the primitive RMSNorm and LayerNorm sequences the frontends emit become `rms_norm` and
//! `layer_norm` (one pass over each row instead of five to eight kernels).
//!
//! The residual add before a norm is not fused: the IR's norm ops have no residual operand, and the
//! layer regions of [`crate::egraph::layers`] are cut at the residual stream. The add is fused
//! into the matmul that feeds it instead (`linear-residual` in [`super::epilogue`]).

use super::{rule, Bind, Binds, Ctx, RuleDef};
use crate::egraph::lang::Attr;
use llmc_ir::DType;

#[rustfmt::skip]
pub const RULES: &[RuleDef] = &[
    rule("rms-norm", "(mul (mul ?x (rsqrt (add (reduce_mean (mul ?x ?x)) ?eps))) ?w)", "(rms_norm ?x ?w ?e)", rms),        // x * rsqrt(mean(x²) + eps) * w
    rule("rms-norm-div", "(mul (div ?x (sqrt (add (reduce_mean (mul ?x ?x)) ?eps))) ?w)", "(rms_norm ?x ?w ?e)", rms),     // x / sqrt(mean(x²) + eps) * w
    rule("layer-norm", "(add (mul (mul (sub ?x (reduce_mean ?x)) (rsqrt (add (reduce_mean (mul (sub ?x (reduce_mean ?x)) (sub ?x (reduce_mean ?x)))) ?eps))) ?w) ?b)", "(layer_norm ?x ?w ?b ?e)", layer), // (x - mean(x)) * rsqrt(mean((x - mean x)²) + eps) * w + b
];

/// `x f32[.., H]`, `eps` a one-element const that does not raise the rank, and each of `params`
/// exactly `f32[H]`.
fn norm(c: &Ctx<'_>, params: &[&str]) -> Option<Binds> {
    let x = c.ty("?x")?;
    let h = *x.shape.last()?;
    if x.dtype != DType::F32 {
        return None;
    }
    let eps = c.scalar_within("?eps", x.rank()).filter(|e| e.is_finite())?;
    for p in params {
        if c.shape(p)? != [h] {
            return None;
        }
    }
    Some(vec![("?e", Bind::Attr(Attr::f32(eps)))])
}

fn rms(c: &Ctx<'_>) -> Option<Binds> {
    norm(c, &["?w"])
}

fn layer(c: &Ctx<'_>) -> Option<Binds> {
    norm(c, &["?w", "?b"])
}
