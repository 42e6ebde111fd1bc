//! The graph: a petgraph `StableDiGraph` of typed nodes, edges from operand to user carrying the
//! operand index, plus declarations (KV-cache state, metadata) and the ordered outputs.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::cmp::Reverse;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::{IrError, Result};
use crate::op::Op;
use crate::types::TensorType;

pub type NodeId = NodeIndex<u32>;

/// One SSA value: an op and its result type.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
}

/// Explicit persistent state (a KV cache tensor), written by `kv_concat`.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDecl {
    pub name: String,
    pub ty: TensorType,
}

/// A forward step of a model. Cloning is cheap relative to a model (no weight data is held).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    /// Free-form metadata carried to the artifact (`vocab_size`, `max_context`, `eos_token_id`, ...).
    pub meta: BTreeMap<String, String>,
    pub states: Vec<StateDecl>,
    pub g: StableDiGraph<Node, u32>,
    pub outputs: Vec<NodeId>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), ..Default::default() }
    }

    /// Adds a node with an explicit type, without checking it (the verifier does).
    pub fn add_typed(&mut self, op: Op, inputs: &[NodeId], ty: TensorType) -> NodeId {
        let n = self.g.add_node(Node { op, ty });
        for (i, &src) in inputs.iter().enumerate() {
            self.g.add_edge(src, n, i as u32);
        }
        n
    }

    /// Adds a node whose type is inferred from its operands (`declared` for ops that declare it).
    pub fn add(&mut self, op: Op, inputs: &[NodeId], declared: Option<TensorType>) -> Result<NodeId> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.g[i].ty).collect();
        let ty = op.infer_type(&tys, declared.as_ref())?;
        Ok(self.add_typed(op, inputs, ty))
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.g[n]
    }
    pub fn ty(&self, n: NodeId) -> &TensorType {
        &self.g[n].ty
    }
    pub fn op(&self, n: NodeId) -> &Op {
        &self.g[n].op
    }

    /// Operands in operand order.
    pub fn inputs(&self, n: NodeId) -> Vec<NodeId> {
        let mut es: Vec<(u32, NodeId)> =
            self.g.edges_directed(n, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        es.sort();
        es.into_iter().map(|(_, s)| s).collect()
    }

    /// Distinct users of `n`.
    pub fn users(&self, n: NodeId) -> Vec<NodeId> {
        let mut us: Vec<NodeId> = self.g.neighbors_directed(n, Direction::Outgoing).collect();
        us.sort();
        us.dedup();
        us
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Deterministic topological order: among ready nodes, the lowest index first. After
    /// [`parse`](crate::parse), indices follow text order, so printing is stable.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut indeg: HashMap<NodeId, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for n in self.g.node_indices() {
            let d = self.g.edges_directed(n, Direction::Incoming).count();
            indeg.insert(n, d);
            if d == 0 {
                ready.push(Reverse(n));
            }
        }
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != self.g.node_count() {
            return Err(IrError::Verify { node: "graph".into(), msg: "graph has a cycle".into() });
        }
        Ok(order)
    }

    /// Redirects every use of `old` (operand edges and outputs) to `new`.
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        if old == new {
            return;
        }
        let uses: Vec<(NodeId, u32)> =
            self.g.edges_directed(old, Direction::Outgoing).map(|e| (e.target(), *e.weight())).collect();
        let ids: Vec<_> = self.g.edges_directed(old, Direction::Outgoing).map(|e| e.id()).collect();
        for id in ids {
            self.g.remove_edge(id);
        }
        for (user, slot) in uses {
            self.g.add_edge(new, user, slot);
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node and its edges.
    pub fn remove(&mut self, n: NodeId) {
        self.g.remove_node(n);
    }

    /// The declared state named `name`.
    pub fn state(&self, name: &str) -> Option<&StateDecl> {
        self.states.iter().find(|s| s.name == name)
    }

    /// A canonical, index-independent form: nodes in topological order with operands as positions
    /// in that order. Two graphs are equal iff their declarations and canonical forms are equal.
    pub fn canonical(&self) -> Result<Vec<(Op, TensorType, Vec<usize>)>> {
        let order = self.topo_order()?;
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        Ok(order
            .iter()
            .map(|&n| {
                let node = &self.g[n];
                (node.op.clone(), node.ty.clone(), self.inputs(n).iter().map(|i| pos[i]).collect())
            })
            .collect())
    }

    fn output_positions(&self) -> Option<Vec<usize>> {
        let order = self.topo_order().ok()?;
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        self.outputs.iter().map(|o| pos.get(o).copied()).collect()
    }
}

/// Op equality with floats compared by bit pattern (a NaN const equals itself, `-0.0 != 0.0`).
pub fn ops_bitwise_eq(a: &Op, b: &Op) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match (a, b) {
        (Op::Const { values: x }, Op::Const { values: y }) => bits(x) == bits(y),
        (Op::Attention { scale: x, window: wx, causal: cx }, Op::Attention { scale: y, window: wy, causal: cy }) => {
            x.to_bits() == y.to_bits() && wx == wy && cx == cy
        }
        (Op::RmsNorm { eps: x }, Op::RmsNorm { eps: y }) | (Op::LayerNorm { eps: x }, Op::LayerNorm { eps: y }) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.meta == other.meta
            && self.states == other.states
            && self.output_positions() == other.output_positions()
            && match (self.canonical(), other.canonical()) {
                (Ok(a), Ok(b)) => {
                    a.len() == b.len()
                        && a.iter().zip(&b).all(|((oa, ta, ia), (ob, tb, ib))| ta == tb && ia == ib && ops_bitwise_eq(oa, ob))
                }
                _ => false,
            }
    }
}
