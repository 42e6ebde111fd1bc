//! Algebra: layout identities (transpose pairs, reshape chains) and scale folding. These clean up
//! the head split/merge of attention and move one-element scales to where the attention and
//! epilogue patterns expect them. A "scalar" below is a one-element const whose rank does not
//! exceed the other operand's, so multiplying by it never changes a shape. Rules that reassociate
//! a scale (fold, move past a matmul) take only finite scales: with an infinite one, `(a * inf) x b`
//! and `(a x b) * inf` differ (`inf - inf` is NaN in the first).

use super::{always, rule, Bind, Binds, Ctx, RuleDef};
use crate::egraph::lang::Attr;
use llmc_ir::{Dim, TensorType};

#[rustfmt::skip]
pub const RULES: &[RuleDef] = &[
    rule("transpose-identity", "(transpose ?x ?p)", "?x", identity_perm),                                      // transpose(x, [0,1,..]) = x
    rule("transpose-pair", "(transpose (transpose ?x ?p) ?q)", "(transpose ?x ?r)", compose_perms),            // transpose(transpose(x, p), q) = transpose(x, r), r[i] = p[q[i]]
    rule("reshape-identity", "(reshape ?x ?t)", "?x", reshape_to_own_type),                                    // reshape(x : t, t) = x
    rule("reshape-chain", "(reshape (reshape ?x ?a) ?b)", "(reshape ?x ?b)", always),                          // reshape(reshape(x, a), b) = reshape(x, b)
    rule("scalar-to-rhs", "(mul ?c ?x)", "(mul ?x ?c)", scalar_lhs),                                           // c * x = x * c
    rule("mul-one", "(mul ?x ?c)", "?x", scalar_one),                                                          // x * 1 = x
    rule("div-to-mul", "(div ?x ?c)", "(mul ?x ?r)", exact_reciprocal),                                        // x / c = x * (1/c), c a power of two (exact)
    rule("fold-scale-chain", "(mul (mul ?x ?a) ?b)", "(mul ?x ?ab)", fold_scalars),                            // (x * a) * b = x * (a*b)
    rule("scale-out-of-transpose", "(transpose (mul ?x ?c) ?p)", "(mul (transpose ?x ?p) ?c)", scalar_of_x),   // transpose(x * c) = transpose(x) * c
    rule("scale-out-of-reshape", "(reshape (mul ?x ?c) ?t)", "(mul (reshape ?x ?t) ?c)", scalar_of_x_and_t),   // reshape(x * c) = reshape(x) * c
    rule("scale-out-of-matmul", "(matmul (mul ?a ?c) ?b ?tb)", "(mul (matmul ?a ?b ?tb) ?c)", scalar_of_a),    // (a * c) x b = (a x b) * c
];

fn identity_perm(c: &Ctx<'_>) -> Option<Binds> {
    let p = c.perm("?p")?;
    p.iter().enumerate().all(|(i, &x)| i == x).then(Vec::new)
}

fn compose_perms(c: &Ctx<'_>) -> Option<Binds> {
    let (p, q) = (c.perm("?p")?, c.perm("?q")?);
    let r: Option<Vec<usize>> = q.iter().map(|&i| p.get(i).copied()).collect();
    Some(vec![("?r", Bind::Attr(Attr::usizes(&r?)))])
}

fn reshape_to_own_type(c: &Ctx<'_>) -> Option<Binds> {
    (c.type_attr("?t")? == *c.ty("?x")?).then(Vec::new)
}

fn scalar_lhs(c: &Ctx<'_>) -> Option<Binds> {
    let x = c.ty("?x")?;
    c.scalar_within("?c", x.rank())?;
    c.scalar("?x").is_none().then(Vec::new)
}

fn scalar_one(c: &Ctx<'_>) -> Option<Binds> {
    (c.scalar_within("?c", c.ty("?x")?.rank())? == 1.0).then(Vec::new)
}

fn exact_reciprocal(c: &Ctx<'_>) -> Option<Binds> {
    let ct = c.ty("?c")?;
    let v = c.scalar_within("?c", c.ty("?x")?.rank())?;
    // A normal power of two: 1/v is exact and normal too, so x / v == x * (1/v) bit for bit.
    let r = 1.0 / v;
    let pow2 = |x: f32| x.is_normal() && x.to_bits() & 0x007f_ffff == 0;
    (pow2(v) && pow2(r)).then(|| vec![("?r", Bind::Const(vec![r], ct.clone()))])
}

fn fold_scalars(c: &Ctx<'_>) -> Option<Binds> {
    let rank = c.ty("?x")?.rank();
    let (a, b) = (c.scalar_within("?a", rank)?, c.scalar_within("?b", rank)?);
    if !(a * b).is_finite() || !a.is_finite() || !b.is_finite() {
        return None;
    }
    let r = c.ty("?a")?.rank().max(c.ty("?b")?.rank());
    Some(vec![("?ab", Bind::Const(vec![a * b], TensorType::f32(vec![Dim::N(1); r])))])
}

fn scalar_of_x(c: &Ctx<'_>) -> Option<Binds> {
    c.scalar_within("?c", c.ty("?x")?.rank()).map(|_| vec![])
}

fn scalar_of_x_and_t(c: &Ctx<'_>) -> Option<Binds> {
    let rank = c.ty("?x")?.rank().min(c.type_attr("?t")?.rank());
    c.scalar_within("?c", rank).map(|_| vec![])
}

fn scalar_of_a(c: &Ctx<'_>) -> Option<Binds> {
    c.scalar_within("?c", c.ty("?a")?.rank()).filter(|v| v.is_finite()).map(|_| vec![])
}
