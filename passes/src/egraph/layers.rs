//! Regions: the graph is cut into pieces at its *cut values* (the residual stream between
//! transformer blocks), each piece is abstracted into a name-free [`Region`], and identical
//! regions (every layer's attention block, every layer's MLP block) are optimized once and the
//! result replayed into each place ([`instantiate`]), so compile time does not grow with depth.
//!
//! A non-leaf value `v` is a cut when, in topological order, no edge jumps over it (every value
//! computed before `v` is used only up to `v`) and it does not have exactly one user (a value
//! with one user sits inside a chain, such as `x * rsqrt(..)` inside a norm, which a rule may
//! need whole). For a pre-norm decoder the cuts are the embedding and the residual sums after the
//! attention and after the MLP of each layer. A region is the run of values after one cut up to
//! and including the next; regions shorter than [`MIN_REGION`] join the next (so a pattern cut by
//! a short run, such as a final LayerNorm whose input has no other use, stays whole).
//!
//! Leaves (weights, consts, token ids, positions) belong to no region: each region that reads one
//! gets a *leaf slot*, as does a value from an earlier region (a *boundary*). A region's abstract
//! form keeps ops, types, const values and which slot each operand reads, but no weight or state
//! names: two layers have equal forms exactly when they differ only in names, and then one
//! optimized form serves both.

use std::collections::{HashMap, HashSet};

use llmc_ir::{Graph, NodeId, Op, TensorType};

use super::analysis::{LeafInfo, LeafKind};
use crate::error::{PassError, Result};

/// An operand: a leaf slot or an earlier node of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ref {
    Leaf(u32),
    Node(u32),
}

/// One op of a region. A `kv_concat`'s state is its slot number, as a string.
#[derive(Clone, Debug, PartialEq)]
pub struct RNode {
    pub op: Op,
    pub ty: TensorType,
    pub ins: Vec<Ref>,
}

/// A region in abstract (name-free) form; also the form of an optimized result.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub leaves: Vec<LeafInfo>,
    /// Declared types of the states the region writes, by slot.
    pub states: Vec<TensorType>,
    /// In topological order.
    pub nodes: Vec<RNode>,
    /// The values used after the region, in a fixed order.
    pub outputs: Vec<Ref>,
}

impl Region {
    /// The key under which equal regions share one optimization: the whole abstract form.
    pub fn key(&self) -> String {
        format!("{self:?}")
    }

    /// State slots written by `kv_concat`s, sorted.
    pub fn written_states(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::KvConcat { state } => Some(state.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }
}

/// Where one region sits in the graph.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The region's nodes, in the order of [`Region::nodes`].
    pub nodes: Vec<NodeId>,
    /// The graph value of each leaf slot.
    pub leaves: Vec<NodeId>,
    /// State names by slot.
    pub states: Vec<String>,
    /// The graph value of each output, in the order of [`Region::outputs`].
    pub outputs: Vec<NodeId>,
}

/// Regions shorter than this join the region after them (the last one joins the one before).
pub const MIN_REGION: usize = 4;

fn is_leaf(g: &Graph, n: NodeId) -> bool {
    g.op(n).arity() == 0
}

/// Splits `g` into regions (in topological order) with their instances.
pub fn split(g: &Graph) -> Result<Vec<(Region, Instance)>> {
    let order = g.topo_order()?;
    let seq: Vec<NodeId> = order.iter().copied().filter(|&n| !is_leaf(g, n)).collect();
    let spos: HashMap<NodeId, usize> = seq.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let outputs: HashSet<NodeId> = g.outputs.iter().copied().collect();
    let last_use: Vec<usize> = seq
        .iter()
        .map(|&n| {
            if outputs.contains(&n) {
                return usize::MAX;
            }
            g.users(n).iter().filter_map(|u| spos.get(u)).copied().max().unwrap_or(0)
        })
        .collect();
    let mut bounds = Vec::new();
    let (mut start, mut reach) = (0, 0);
    for i in 0..seq.len() {
        let fan_out = g.users(seq[i]).len() + outputs.contains(&seq[i]) as usize;
        if reach <= i && fan_out != 1 {
            // Nothing before `i` is used after it, and it feeds several ops: `i` ends a region.
            bounds.push((start, i));
            start = i + 1;
        }
        reach = reach.max(last_use[i]);
    }
    if start < seq.len() {
        bounds.push((start, seq.len() - 1));
    }
    // A short region joins the next one: a pattern may span a cut (a LayerNorm's centred value
    // `x - mean(x)` is a cut when nothing after the norm reads `x`).
    let mut merged: Vec<(usize, usize)> = Vec::new();
    let mut pending: Option<usize> = None;
    for (a, b) in bounds {
        let a = pending.take().unwrap_or(a);
        if b + 1 - a < MIN_REGION {
            pending = Some(a);
        } else {
            merged.push((a, b));
        }
    }
    if let Some(a) = pending {
        match merged.last_mut() {
            Some(last) => last.1 = seq.len() - 1,
            None => merged.push((a, seq.len() - 1)),
        }
    }
    let bounds = merged;
    Ok(bounds.into_iter().map(|(a, b)| abstract_region(g, &seq[a..=b], &outputs)).collect())
}

fn abstract_region(g: &Graph, nodes: &[NodeId], graph_outputs: &HashSet<NodeId>) -> (Region, Instance) {
    let local: HashMap<NodeId, u32> = nodes.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();
    let mut leaf_slot: HashMap<NodeId, u32> = HashMap::new();
    let mut r = Region { leaves: vec![], states: vec![], nodes: vec![], outputs: vec![] };
    let mut inst = Instance { nodes: nodes.to_vec(), leaves: vec![], states: vec![], outputs: vec![] };
    for &n in nodes {
        let mut ins = Vec::new();
        for x in g.inputs(n) {
            if let Some(&i) = local.get(&x) {
                ins.push(Ref::Node(i));
                continue;
            }
            let slot = *leaf_slot.entry(x).or_insert_with(|| {
                let kind = match g.op(x) {
                    Op::Weight { stored, .. } => LeafKind::Weight { stored: *stored },
                    Op::Const { values } => LeafKind::Const { values: values.clone() },
                    Op::Input { name } => LeafKind::Input { name: name.clone() },
                    Op::Positions => LeafKind::Positions,
                    _ => LeafKind::Boundary,
                };
                r.leaves.push(LeafInfo { kind, ty: g.ty(x).clone() });
                inst.leaves.push(x);
                (r.leaves.len() - 1) as u32
            });
            ins.push(Ref::Leaf(slot));
        }
        let mut op = g.op(n).clone();
        if let Op::KvConcat { state } = &mut op {
            let slot = match inst.states.iter().position(|s| s == state) {
                Some(i) => i,
                None => {
                    inst.states.push(state.clone());
                    // The verifier guarantees the declaration; a missing one keeps the node's own type.
                    r.states.push(g.state(state).map_or_else(|| g.ty(n).clone(), |d| d.ty.clone()));
                    inst.states.len() - 1
                }
            };
            *state = slot.to_string();
        }
        r.nodes.push(RNode { op, ty: g.ty(n).clone(), ins });
    }
    for (i, &n) in nodes.iter().enumerate() {
        if graph_outputs.contains(&n) || g.users(n).iter().any(|u| !local.contains_key(u)) {
            r.outputs.push(Ref::Node(i as u32));
            inst.outputs.push(n);
        }
    }
    (r, inst)
}

/// Adds `t` (an optimized form of the region at `inst`) to `g` and returns the graph value of each
/// of its outputs. Leaf slots beyond the instance's are consts the optimizer created. `moved`
/// maps values already replaced by earlier regions to their replacements.
pub fn instantiate(g: &mut Graph, t: &Region, inst: &Instance, moved: &HashMap<NodeId, NodeId>) -> Result<Vec<NodeId>> {
    let resolve = |mut n: NodeId| {
        while let Some(&m) = moved.get(&n) {
            n = m;
        }
        n
    };
    let mut leaves: Vec<Option<NodeId>> = inst.leaves.iter().map(|&n| Some(resolve(n))).collect();
    leaves.resize(t.leaves.len(), None);
    let mut made: Vec<NodeId> = Vec::with_capacity(t.nodes.len());
    let mut get = |g: &mut Graph, made: &[NodeId], r: Ref| -> Result<NodeId> {
        Ok(match r {
            Ref::Node(i) => made[i as usize],
            Ref::Leaf(i) => {
                let i = i as usize;
                if let Some(n) = leaves[i] {
                    return Ok(n);
                }
                let info = &t.leaves[i];
                let LeafKind::Const { values } = &info.kind else {
                    return Err(PassError::Optimize(format!(
                        "optimized region reads leaf slot {i}, which it has no value for"
                    )));
                };
                let n = g.add_typed(Op::Const { values: values.clone() }, &[], info.ty.clone());
                leaves[i] = Some(n);
                n
            }
        })
    };
    for node in &t.nodes {
        let mut ins = Vec::with_capacity(node.ins.len());
        for &r in &node.ins {
            ins.push(get(g, &made, r)?);
        }
        let mut op = node.op.clone();
        if let Op::KvConcat { state } = &mut op {
            let slot: usize =
                state.parse().map_err(|_| PassError::Optimize(format!("kv_concat state slot `{state}`")))?;
            *state = inst
                .states
                .get(slot)
                .cloned()
                .ok_or_else(|| PassError::Optimize(format!("no state for slot {slot}")))?;
        }
        made.push(g.add_typed(op, &ins, node.ty.clone()));
    }
    let mut outs = Vec::with_capacity(t.outputs.len());
    for &r in &t.outputs {
        outs.push(get(g, &made, r)?);
    }
    Ok(outs)
}

/// A copy of `g` whose node indices follow a readable order: topological, the token-id inputs
/// first, each other leaf right before its first user (as the frontends emit them). Leaves nobody uses are dropped unless
/// they are outputs.
pub fn renumber(g: &Graph) -> Result<Graph> {
    let order = g.topo_order()?;
    let mut out = Graph::new(g.name.clone());
    out.meta = g.meta.clone();
    out.states = g.states.clone();
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    fn copy(g: &Graph, out: &mut Graph, map: &mut HashMap<NodeId, NodeId>, n: NodeId) {
        let ins: Vec<NodeId> = g.inputs(n).iter().map(|i| map[i]).collect();
        let node = g.node(n).clone();
        let m = out.add_typed(node.op, &ins, node.ty);
        map.insert(n, m);
    }
    // Graph inputs first, like a function's parameters.
    for &n in &order {
        if matches!(g.op(n), Op::Input { .. }) {
            copy(g, &mut out, &mut map, n);
        }
    }
    for &n in &order {
        if is_leaf(g, n) {
            continue;
        }
        for x in g.inputs(n) {
            if !map.contains_key(&x) {
                copy(g, &mut out, &mut map, x);
            }
        }
        copy(g, &mut out, &mut map, n);
    }
    for &o in &g.outputs {
        if !map.contains_key(&o) {
            copy(g, &mut out, &mut map, o);
        }
    }
    out.outputs = g.outputs.iter().map(|o| map[o]).collect();
    Ok(out)
}
