//! The bridge between a [`Region`] and an e-graph: [`to_egraph`] adds every op of the region
//! (attributes as leaf e-nodes, leaf slots as [`Leaf`] e-nodes); [`to_region`] turns an extracted
//! [`Selection`] back into a region in topological order.

use std::collections::BTreeMap;

use egg::Id;

use super::analysis::{TensorAnalysis, EG};
use super::extract::Selection;
use super::lang::{from_ir, to_ir, Leaf, Tn};
use super::layers::{RNode, Ref, Region};
use crate::error::{PassError, Result};

/// An e-graph of a region.
pub struct Built {
    pub eg: EG,
    /// The class of each region node, in region order.
    pub classes: Vec<Id>,
    /// The classes extraction must cover: the outputs, then every side-effecting node.
    pub roots: Vec<Id>,
    /// How many roots are outputs (the rest are side effects).
    pub n_outputs: usize,
}

/// Builds the e-graph of `r`.
pub fn to_egraph(r: &Region) -> Result<Built> {
    let mut eg = EG::new(TensorAnalysis::new(r.leaves.clone()));
    let leaves: Vec<Id> = (0..r.leaves.len()).map(|i| eg.add(Tn::Leaf(Leaf(i as u32)))).collect();
    let mut classes = Vec::with_capacity(r.nodes.len());
    for (i, n) in r.nodes.iter().enumerate() {
        let ins: Vec<Id> = n
            .ins
            .iter()
            .map(|x| match *x {
                Ref::Leaf(l) => leaves[l as usize],
                Ref::Node(j) => classes[j as usize],
            })
            .collect();
        let node = from_ir(&n.op, &ins, &n.ty, |a| eg.add(Tn::Attr(a)), |s| s.parse().unwrap_or(u32::MAX))
            .ok_or_else(|| PassError::Optimize(format!("region node {i} (`{}`) has no e-graph form", n.op.name())))?;
        classes.push(eg.add(node));
    }
    eg.rebuild();
    let mut roots: Vec<Id> = r
        .outputs
        .iter()
        .map(|x| match *x {
            Ref::Leaf(l) => leaves[l as usize],
            Ref::Node(j) => classes[j as usize],
        })
        .collect();
    let n_outputs = roots.len();
    for (i, n) in r.nodes.iter().enumerate() {
        if n.op.has_side_effect() {
            roots.push(classes[i]);
        }
    }
    Ok(Built { eg, classes, roots, n_outputs })
}

/// The region `sel` chooses in `b`: nodes in post-order from the roots (operands first), leaf
/// table as the e-graph's (the input's leaves plus consts the rules created).
pub fn to_region(b: &Built, sel: &Selection, states: &[llmc_ir::TensorType]) -> Result<Region> {
    let eg = &b.eg;
    let mut r = Region { leaves: eg.analysis.leaves.clone(), states: states.to_vec(), nodes: vec![], outputs: vec![] };
    let mut memo: BTreeMap<Id, Ref> = BTreeMap::new();
    let attr = |id: Id| eg[id].data.attr.clone();
    let missing = |c: Id| PassError::Optimize(format!("extraction chose nothing for e-class {c}"));
    for (k, &root) in b.roots.iter().enumerate() {
        let root = eg.find(root);
        // Iterative post-order over value operands.
        let mut stack = vec![(root, false)];
        while let Some((c, expanded)) = stack.pop() {
            if memo.contains_key(&c) {
                continue;
            }
            let node = &eg[c].nodes[*sel.choice.get(&c).ok_or_else(|| missing(c))?];
            if let Tn::Leaf(Leaf(l)) = node {
                memo.insert(c, Ref::Leaf(*l));
                continue;
            }
            let (op, ins) = to_ir(node, attr)
                .ok_or_else(|| PassError::Optimize(format!("e-node `{node}` of class {c} has malformed attributes")))?;
            let ins: Vec<Id> = ins.iter().map(|&i| eg.find(i)).collect();
            if !expanded {
                stack.push((c, true));
                for &i in ins.iter().rev() {
                    if !memo.contains_key(&i) {
                        stack.push((i, false));
                    }
                }
                continue;
            }
            let refs: Option<Vec<Ref>> = ins.iter().map(|i| memo.get(i).copied()).collect();
            let refs = refs.ok_or_else(|| PassError::Optimize(format!("cyclic extraction at e-class {c}")))?;
            let ty = eg[c].data.ty.clone().ok_or_else(|| PassError::Optimize(format!("e-class {c} has no type")))?;
            r.nodes.push(RNode { op, ty, ins: refs });
            memo.insert(c, Ref::Node((r.nodes.len() - 1) as u32));
        }
        if k < b.n_outputs {
            r.outputs.push(memo[&root]);
        }
    }
    Ok(r)
}
