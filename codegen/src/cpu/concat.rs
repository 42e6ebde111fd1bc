//! `concat` of activations along any axis, as one strided copy per operand.
//!
//! With `outer = prod(out[..axis])` and `inner = prod(out[axis+1..])`, operand `j` (extent `e_j`
//! on the axis) is `outer` contiguous rows of `e_j * inner` elements, which land at column offset
//! `(e_0 + .. + e_{j-1}) * inner` of the output's rows of `E * inner`. Each operand's rows are cut
//! into chunks and split across parts on their own, so every part writes disjoint elements.
//! Copies move bits (f32 and i32 alike). Concats whose operands are all weights or constants never
//! get here: the memory plan materializes them in the artifact (see [`crate::plan`]).

use llmc_ir::{Dim, Graph, NodeId};

use super::builder::{Kb, Mono};
use super::elementwise::CHUNK;

pub(crate) fn concat(kb: &mut Kb, g: &Graph, n: NodeId, axis: usize) {
    let ins = g.inputs(n);
    let out = g.ty(n).shape.clone();
    let outer = Mono::prod(&out[..axis]);
    let inner = Mono::prod(&out[axis + 1..]);
    let total = out[axis].as_const().expect("concat extents are constant (type rule)");
    let outerv = kb.mono(&outer);
    let orow = kb.mono(&inner.mul(&Mono::of(Dim::N(total))));
    let o = kb.buf(ins.len());
    let one = kb.ic(1);
    let mut start = 0;
    for (j, &x) in ins.iter().enumerate() {
        let e = g.ty(x).shape[axis].as_const().expect("concat extents are constant (type rule)");
        let row = kb.mono(&inner.mul(&Mono::of(Dim::N(e))));
        let off = kb.mono(&inner.mul(&Mono::of(Dim::N(start))));
        start += e;
        let src = kb.buf(j);
        let dst = kb.addr(o, off);
        kb.rows(&[outerv], &[vec![row], vec![orow]], row, &[one, one], Some(CHUNK), &mut |kb, offs, _, len| {
            let sp = kb.addr(src, offs[0]);
            let dp = kb.addr(dst, offs[1]);
            kb.vloop(len, 2, &mut |kb, ty, i, _| {
                let v = kb.ld(ty, sp, i);
                kb.st(v, dp, i);
            });
        });
    }
}
