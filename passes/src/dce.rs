//! `dce`: dead-code elimination. A node is live when an output or a side-effecting op
//! (`Op::has_side_effect`, the KV-cache append) depends on it; everything else is removed.

use llmc_ir as ir;

use crate::error::Result;
use crate::manager::{Pass, PassStats};
use crate::registry::{PassContext, PassOptions, RegisteredPass};

/// Removes nodes no output or side effect depends on.
pub struct Dce;

impl RegisteredPass for Dce {
    const NAME: &'static str = "dce";
    const SUMMARY: &'static str = "remove values that no output or side effect (kv_concat) depends on";
    fn from_options(_: &PassOptions<'_>, _: &PassContext) -> Result<Self> {
        Ok(Dce)
    }
}

impl Pass for Dce {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn summary(&self) -> &'static str {
        Self::SUMMARY
    }
    fn run(&self, g: &mut ir::Graph) -> Result<PassStats> {
        let mut live = std::collections::HashSet::new();
        let mut work: Vec<ir::NodeId> = g.outputs.clone();
        work.extend(g.g.node_indices().filter(|&n| g.op(n).has_side_effect()));
        while let Some(n) = work.pop() {
            if live.insert(n) {
                work.extend(g.inputs(n));
            }
        }
        let dead: Vec<ir::NodeId> = g.g.node_indices().filter(|n| !live.contains(n)).collect();
        for &n in &dead {
            g.remove(n);
        }
        let mut st = PassStats::default();
        st.bump("removed", dead.len() as u64);
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use ir::{BinaryOp, Dim, Op, UnaryOp};

    #[test]
    fn removes_dead_chain_keeps_live_and_kv_concat() {
        let mut g = ir::Graph::new("t");
        g.states.push(ir::StateDecl { name: "k".into(), ty: ir::TensorType::f32(vec![Dim::N(8), Dim::N(4)]) });
        let (ids, x) = embed(&mut g, 8, 4);
        let w = weight(&mut g, "w", &[4, 4]);
        let y = g.add(Op::Matmul { transpose_b: false }, &[x, w], None).unwrap();
        // A dead chain of three nodes.
        let d1 = g.add(Op::Unary(UnaryOp::Exp), &[y], None).unwrap();
        let d2 = g.add(Op::Binary(BinaryOp::Mul), &[d1, x], None).unwrap();
        let d3 = g.add(Op::Softmax, &[d2], None).unwrap();
        // kv_concat whose result is unused: kept, with what it depends on.
        let t = g.add(Op::Unary(UnaryOp::Tanh), &[x], None).unwrap();
        let kv = g.add(Op::KvConcat { state: "k".into() }, &[t], None).unwrap();
        g.outputs = vec![y];
        let before = g.clone();
        let st = Dce.run(&mut g).unwrap();
        ir::verify(&g).unwrap();
        assert_eq!(st.get("removed"), 3);
        assert!(st.changed);
        for n in [d1, d2, d3] {
            assert!(!g.g.contains_node(n));
        }
        for n in [ids, x, w, y, t, kv] {
            assert!(g.g.contains_node(n));
        }
        assert_same_outputs(&before, &g, &[3, 1]);
        // A second run finds nothing.
        let st = Dce.run(&mut g).unwrap();
        assert_eq!(st.get("removed"), 0);
        assert!(!st.changed);
    }

    #[test]
    fn sound_on_random_graphs() {
        for seed in 0..200 {
            let before = random_graph(seed);
            let mut g = before.clone();
            Dce.run(&mut g).unwrap();
            ir::verify(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", ir::print(&g)));
            assert_same_outputs(&before, &g, &[3, 2]);
            // Nothing left is dead.
            let n = g.node_count();
            Dce.run(&mut g).unwrap();
            assert_eq!(n, g.node_count(), "seed {seed}: dce is not idempotent");
        }
    }
}
