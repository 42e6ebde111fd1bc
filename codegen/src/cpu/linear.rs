//! `linear` (matmul + bias + activation + residual) and `gated_linear` (SwiGLU/GeGLU over merged
//! gate/up weights) on the matmul driver of [`super::matmul`]: the epilogue runs on the finished
//! dot products in registers, right before their only store, so neither op costs a second pass.
//!
//! Both flatten `a f32[.., K]` to `M = prod(leading dims)` rows; `b` is 2-D (no batch dims).
//! `gated_linear`'s weight is `[2N, K]`: output column `j` is `act(a . w[j]) * (a . w[N + j])`,
//! both dot products accumulated in the same tile so each row of `a` is loaded once for the pair.

use llmc_ir::{Dim, Graph, NodeId, UnaryOp};

use super::builder::Kb;
use super::matmul::{gemm, Epilogue, Problem};
use super::unsupported;
use crate::error::Result;

/// `M` (leading dims of `a`) and `K` (its last dim); rejects a contraction that can be empty,
/// which the epilogue-in-the-last-pass scheme does not handle.
fn rows_and_k(g: &Graph, n: NodeId) -> Result<(Dim, Vec<Dim>)> {
    let at = g.ty(g.inputs(n)[0]);
    let kd = at.shape[at.rank() - 1];
    if matches!(kd, Dim::N(0) | Dim::P) {
        return Err(unsupported(g, n, format!("contraction dim {kd} may be empty")));
    }
    Ok((kd, at.shape[..at.rank() - 1].to_vec()))
}

pub(crate) fn linear(
    kb: &mut Kb,
    g: &Graph,
    n: NodeId,
    transpose_b: bool,
    bias: bool,
    act: Option<UnaryOp>,
    residual: bool,
) -> Result<()> {
    let (kd, lead) = rows_and_k(g, n)?;
    let ot = g.ty(n);
    let nd = ot.shape[ot.rank() - 1];
    let m = kb.dims(&lead);
    let k = kb.dim(kd);
    let nn = kb.dim(nd);
    let a = kb.buf(0);
    let b = kb.buf(1);
    let mut next = 2;
    let bias_p = if bias {
        next += 1;
        Some(kb.buf(next - 1))
    } else {
        None
    };
    let res_p = if residual {
        next += 1;
        Some(kb.buf(next - 1))
    } else {
        None
    };
    let o = kb.buf(next);
    let res = res_p.map(|r| kb.sub(r, o));
    let pr = Problem { m, k, n: nn, a, b, o, batch: vec![], strides: [vec![], vec![], vec![]], transpose_b };
    let epi =
        if bias || act.is_some() || residual { Epilogue::Linear { bias: bias_p, act, res } } else { Epilogue::Plain };
    gemm(kb, pr, epi);
    Ok(())
}

pub(crate) fn gated_linear(kb: &mut Kb, g: &Graph, n: NodeId, act: UnaryOp) -> Result<()> {
    let (kd, lead) = rows_and_k(g, n)?;
    let ot = g.ty(n);
    let nd = ot.shape[ot.rank() - 1];
    let m = kb.dims(&lead);
    let k = kb.dim(kd);
    let nn = kb.dim(nd);
    let a = kb.buf(0);
    let b = kb.buf(1);
    let o = kb.buf(2);
    let nk = kb.mul(nn, k);
    let up = kb.muli(nk, 4);
    let pr = Problem { m, k, n: nn, a, b, o, batch: vec![], strides: [vec![], vec![], vec![]], transpose_b: true };
    gemm(kb, pr, Epilogue::Gated { act, up });
    Ok(())
}
