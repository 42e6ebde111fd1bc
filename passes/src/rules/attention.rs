//! Attention: `softmax(causal_mask(scale * q kᵀ)) v` with the head layout around it becomes one
//! `attention` op (grouped KV heads, KV cache, optional sliding window), which backends lower as a
//! flash-style kernel with no `S x T` buffer.
//!
//! Three layouts are recognised, each with and without the scale multiply (`scale = 1`):
//! - `gqa`, the frontend's: `q f32[S,NH,D]` (or any shape with those elements, such as GPT-2's
//!   `[S, NH*D]` slice) reshaped to `[S,NKV,G,D]` and transposed to
//!   `[NKV,G,S,D]`; `k`, `v f32[T,NKV,D]` transposed to `[NKV,T,D]` and reshaped to
//!   `[NKV,1,T,D]` (broadcast over the `G` query heads of a group); the output `[NKV,G,S,D]`
//!   transposed back to `[S,NKV,G,D]`, which is `attention(q, k, v)` reshaped (query head
//!   `h = kv*G + g` reads KV head `kv = h / G`, exactly the op's rule). MHA is `G = 1`.
//! - `heads`: head-major 3-D, `transpose(q, [1,0,2]) x transpose(k, [1,0,2])ᵀ` with `NKV` equal
//!   to `NH` or 1 (batch broadcasting);
//! - `2d`: one head, `q f32[S,D]`, `k`, `v f32[T,D]`.
//!
//! Without a `causal_mask` between the scores and the softmax (encoders), the same `heads` and
//! `2d` layouts become a bidirectional `attention` (every key visible; keys `[S, ..]` of this step
//! or `[T, ..]`).
//!
//! The mask applies to the key position `t` against the query's absolute position `P + s`, as
//! the op's does; softmax over the masked scores is the op's softmax over visible keys.

use super::{rule, Bind, Binds, Ctx, RuleDef};
use crate::egraph::lang::Attr;
use llmc_ir::{Dim, TensorType};

#[rustfmt::skip]
pub const RULES: &[RuleDef] = &[
    // out = transpose(softmax(mask(s * q' k'ᵀ)) v', [2,0,1,3]) = reshape(attention(q, k, v, s), [S,NKV,G,D])
    rule("attention-gqa", "(transpose (matmul (softmax (causal_mask (mul (matmul (transpose (reshape ?q ?sq) [1,2,0,3]) (reshape (transpose ?k [1,0,2]) ?sk) true) ?c) ?w)) (reshape (transpose ?v [1,0,2]) ?sk) false) [2,0,1,3])", "(reshape (attention (reshape ?q ?q3) ?k ?v ?scale ?w true) ?sq)", gqa_scaled),
    rule("attention-gqa-unscaled", "(transpose (matmul (softmax (causal_mask (matmul (transpose (reshape ?q ?sq) [1,2,0,3]) (reshape (transpose ?k [1,0,2]) ?sk) true) ?w)) (reshape (transpose ?v [1,0,2]) ?sk) false) [2,0,1,3])", "(reshape (attention (reshape ?q ?q3) ?k ?v ?scale ?w true) ?sq)", gqa_unscaled),
    // transpose(softmax(mask(s * q' k'ᵀ)) v', [1,0,2]) = attention(q, k, v, s), q' = transpose(q, [1,0,2]) (same for k', v')
    rule("attention-heads", "(transpose (matmul (softmax (causal_mask (mul (matmul (transpose ?q [1,0,2]) (transpose ?k [1,0,2]) true) ?c) ?w)) (transpose ?v [1,0,2]) false) [1,0,2])", "(attention ?q ?k ?v ?scale ?w true)", heads_scaled),
    rule("attention-heads-unscaled", "(transpose (matmul (softmax (causal_mask (matmul (transpose ?q [1,0,2]) (transpose ?k [1,0,2]) true) ?w)) (transpose ?v [1,0,2]) false) [1,0,2])", "(attention ?q ?k ?v ?scale ?w true)", heads_unscaled),
    // softmax(mask(s * q kᵀ)) v = reshape(attention(q as [S,1,D], k, v as [T,1,D], s), [S,D])
    rule("attention-2d", "(matmul (softmax (causal_mask (mul (matmul ?q ?k true) ?c) ?w)) ?v false)", "(reshape (attention (reshape ?q ?q3) (reshape ?k ?k3) (reshape ?v ?k3) ?scale ?w true) ?o2)", single_scaled),
    rule("attention-2d-unscaled", "(matmul (softmax (causal_mask (matmul ?q ?k true) ?w)) ?v false)", "(reshape (attention (reshape ?q ?q3) (reshape ?k ?k3) (reshape ?v ?k3) ?scale ?w true) ?o2)", single_unscaled),
    // Bidirectional (encoders: no mask, keys of this step or of the cache, every key visible):
    // transpose(softmax(s * q' k'ᵀ) v', [1,0,2]) = attention(q, k, v, s, bidirectional)
    rule("attention-bidir-heads", "(transpose (matmul (softmax (mul (matmul (transpose ?q [1,0,2]) (transpose ?k [1,0,2]) true) ?c)) (transpose ?v [1,0,2]) false) [1,0,2])", "(attention ?q ?k ?v ?scale none false)", bidir_heads_scaled),
    rule("attention-bidir-heads-unscaled", "(transpose (matmul (softmax (matmul (transpose ?q [1,0,2]) (transpose ?k [1,0,2]) true)) (transpose ?v [1,0,2]) false) [1,0,2])", "(attention ?q ?k ?v ?scale none false)", bidir_heads_unscaled),
    // softmax(s * q kᵀ) v = reshape(attention(q as [S,1,D], k, v as [K,1,D], s, bidirectional), [S,D])
    rule("attention-bidir-2d", "(matmul (softmax (mul (matmul ?q ?k true) ?c)) ?v false)", "(reshape (attention (reshape ?q ?q3) (reshape ?k ?k3) (reshape ?v ?k3) ?scale none false) ?o2)", bidir_single_scaled),
    rule("attention-bidir-2d-unscaled", "(matmul (softmax (matmul ?q ?k true)) ?v false)", "(reshape (attention (reshape ?q ?q3) (reshape ?k ?k3) (reshape ?v ?k3) ?scale none false) ?o2)", bidir_single_unscaled),
];

/// `(NH, D)` of a `[S, NH, D]` query and `(NKV, D)` of `[K, NKV, D]` keys equal to the values,
/// where `K` is `T` (the KV cache) for causal attention and `S` or `T` for bidirectional.
fn qkv(c: &Ctx<'_>, causal: bool) -> Option<((usize, usize), (usize, usize))> {
    let (q, k, v) = (c.shape("?q")?, c.shape("?k")?, c.shape("?v")?);
    if k != v {
        return None;
    }
    match (q, k) {
        ([Dim::S, Dim::N(nh), Dim::N(d)], [kd, Dim::N(nkv), Dim::N(dk)])
            if keys_ok(kd, causal) && d == dk && *nkv > 0 && nh % nkv == 0 =>
        {
            Some(((*nh, *d), (*nkv, *dk)))
        }
        _ => None,
    }
}

/// Whether `K`, the keys' first axis, suits the attention kind.
fn keys_ok(k: &Dim, causal: bool) -> bool {
    *k == Dim::T || (!causal && *k == Dim::S)
}

/// The scale: the one-element const `?c` (its rank must not grow the 4-D scores), or 1.
fn scale(c: &Ctx<'_>, scaled: bool, scores_rank: usize) -> Option<f32> {
    if scaled {
        c.scalar_within("?c", scores_rank).filter(|s| s.is_finite())
    } else {
        Some(1.0)
    }
}

fn window(c: &Ctx<'_>) -> Option<()> {
    c.attr("?w")?.as_window().map(|_| ())
}

fn gqa(c: &Ctx<'_>, scaled: bool) -> Option<Binds> {
    // q may reach the head split in any shape with the same elements (`[S, NH*D]` when an
    // earlier reshape was folded into the split); it is reshaped to `[S, NH, D]` for the op.
    let (k, v) = (c.shape("?k")?, c.shape("?v")?);
    let sq = c.type_attr("?sq")?;
    let sk = c.type_attr("?sk")?;
    let (nkv, g, d) = match sq.shape.as_slice() {
        [Dim::S, Dim::N(nkv), Dim::N(g), Dim::N(d)] => (*nkv, *g, *d),
        _ => return None,
    };
    let q3 = TensorType::f32(vec![Dim::S, Dim::N(nkv * g), Dim::N(d)]);
    let ok = k == v
        && k == [Dim::T, Dim::N(nkv), Dim::N(d)]
        && sk.shape == [Dim::N(nkv), Dim::N(1), Dim::T, Dim::N(d)]
        && c.ty("?q")?.numel_key() == q3.numel_key();
    window(c)?;
    let s = scale(c, scaled, 4)?;
    ok.then(|| vec![("?scale", Bind::Attr(Attr::f32(s))), ("?q3", Bind::Attr(Attr::ty(&q3)))])
}

fn gqa_scaled(c: &Ctx<'_>) -> Option<Binds> {
    gqa(c, true)
}

fn gqa_unscaled(c: &Ctx<'_>) -> Option<Binds> {
    gqa(c, false)
}

fn heads(c: &Ctx<'_>, scaled: bool) -> Option<Binds> {
    let ((nh, _), (nkv, _)) = qkv(c, true)?;
    window(c)?;
    let s = scale(c, scaled, 3)?;
    (nkv == nh || nkv == 1).then(|| vec![("?scale", Bind::Attr(Attr::f32(s)))])
}

fn heads_scaled(c: &Ctx<'_>) -> Option<Binds> {
    heads(c, true)
}

fn heads_unscaled(c: &Ctx<'_>) -> Option<Binds> {
    heads(c, false)
}

fn single(c: &Ctx<'_>, scaled: bool, causal: bool) -> Option<Binds> {
    let (q, k, v) = (c.shape("?q")?, c.shape("?k")?, c.shape("?v")?);
    let (d, kd) = match (q, k) {
        ([Dim::S, Dim::N(d)], [kd, Dim::N(dk)]) if keys_ok(kd, causal) && d == dk && k == v => (*d, *kd),
        _ => return None,
    };
    if causal {
        window(c)?;
    }
    let s = scale(c, scaled, 2)?;
    let ty = |shape: Vec<Dim>| Bind::Attr(Attr::ty(&TensorType::f32(shape)));
    Some(vec![
        ("?scale", Bind::Attr(Attr::f32(s))),
        ("?q3", ty(vec![Dim::S, Dim::N(1), Dim::N(d)])),
        ("?k3", ty(vec![kd, Dim::N(1), Dim::N(d)])),
        ("?o2", ty(vec![Dim::S, Dim::N(d)])),
    ])
}

fn single_scaled(c: &Ctx<'_>) -> Option<Binds> {
    single(c, true, true)
}

fn single_unscaled(c: &Ctx<'_>) -> Option<Binds> {
    single(c, false, true)
}

fn bidir_heads(c: &Ctx<'_>, scaled: bool) -> Option<Binds> {
    let ((nh, _), (nkv, _)) = qkv(c, false)?;
    let s = scale(c, scaled, 3)?;
    (nkv == nh || nkv == 1).then(|| vec![("?scale", Bind::Attr(Attr::f32(s)))])
}

fn bidir_heads_scaled(c: &Ctx<'_>) -> Option<Binds> {
    bidir_heads(c, true)
}

fn bidir_heads_unscaled(c: &Ctx<'_>) -> Option<Binds> {
    bidir_heads(c, false)
}

fn bidir_single_scaled(c: &Ctx<'_>) -> Option<Binds> {
    single(c, true, false)
}

fn bidir_single_unscaled(c: &Ctx<'_>) -> Option<Binds> {
    single(c, false, false)
}
