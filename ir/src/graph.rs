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

/// Explicit persistent state, kept between steps: today a KV-cache tensor, written by
/// `kv_concat`. Printed `state @cache.0.k : kv<contiguous> f32[512,2,32]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDecl {
    pub name: String,
    /// The logical tensor: for a KV cache `f32[C, ..]`, row `t` holding token `t`'s keys or
    /// values, `C` the context capacity. Where the rows live is the kind's layout.
    pub ty: TensorType,
    pub kind: StateKind,
}

impl StateDecl {
    pub fn new(name: impl Into<String>, ty: TensorType, kind: StateKind) -> StateDecl {
        StateDecl { name: name.into(), ty, kind }
    }
}

/// What a state is, and how it is stored. Every reader of a state (verifier, interpreter, memory
/// plan, the kernels of `kv_concat` and `attention`, the artifact's state table) matches on it;
/// a reader that meets a kind or layout it cannot address refuses it with an error naming the
/// state (outside this crate the enums are `#[non_exhaustive]`, so every match has that arm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StateKind {
    /// A KV cache: one per layer for the keys and one for the values, appended to by one
    /// `kv_concat` per step and read by `attention`.
    Kv { layout: KvLayout },
}

impl StateKind {
    /// The contiguous KV cache, the only kind before Redesign I (and the default of text that
    /// names no kind).
    pub const CONTIGUOUS_KV: StateKind = StateKind::Kv { layout: KvLayout::Contiguous };
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateKind::Kv { layout } => write!(f, "kv<{}>", layout.name()),
        }
    }
}

/// Where a KV cache's rows live. The state's type is the logical `f32[C, ..]` whatever the
/// layout; the layout tells `kv_concat` where to write token `t`'s row and `attention` where to
/// read it.
///
/// A layout becomes a variant when it is implemented end to end: verifier, interpreter, memory
/// plan, the `kv_concat` and `attention` kernels, the artifact's state table and the runtime's
/// cache handle; a backend whose kernels cannot address it refuses it, naming the state, so no
/// reader can silently treat it as contiguous. Planned layouts:
/// - paged blocks: rows in fixed-size blocks of a pool shared by many sequences, found through
///   a per-sequence block table (serving: a ragged batch over one KV pool);
/// - latent: one compressed latent vector per token that attention expands to keys and values
///   (multi-head latent attention architectures);
/// - sliding-window ring: `W` rows reused modulo the window (layers with a local window: the
///   cache holds `W` rows, not `C`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvLayout {
    /// Row `t` at offset `t * row` of one buffer of `C` rows (`row` = the product of the
    /// state's other dimensions); `kv_concat` writes rows `P..P+S`, `attention` reads `0..T`.
    Contiguous,
    /// Rows of int8 codes (`--kv-dtype int8`, long context: a quarter of the f32 bytes). Each
    /// vector of the state's last dimension `D` (one token's keys or values for one KV head) is
    /// quantized when `kv_concat` writes it, as `quant::quantize_act` quantizes an activation row
    /// (`q = round(x · 127 / max|x|)`, scale `max|x| / 127`), and reads back as `q · scale`. The
    /// buffer holds the codes of `C` rows (row `t` at `t * row` bytes), then, from the next
    /// 64-byte boundary, one f32 scale per vector (`C * row / D` of them, row-major).
    Int8,
}

impl KvLayout {
    /// Every layout, for parsers and error messages.
    pub const ALL: &'static [KvLayout] = &[KvLayout::Contiguous, KvLayout::Int8];

    /// The spelling inside `kv<..>` (and in the artifact's state table).
    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Contiguous => "contiguous",
            KvLayout::Int8 => "int8",
        }
    }

    /// Bytes of a state of this layout with logical type `f32[C, .., D]` (`numel` elements,
    /// last dimension `d`).
    pub fn state_bytes(self, numel: usize, d: usize) -> usize {
        match self {
            KvLayout::Contiguous => numel * 4,
            KvLayout::Int8 => Self::int8_scales_at(numel) + numel / d.max(1) * 4,
        }
    }

    /// Where an int8 state of `numel` elements keeps its scales: the first 64-byte boundary after
    /// its codes.
    pub fn int8_scales_at(numel: usize) -> usize {
        numel.div_ceil(64) * 64
    }

    pub fn from_name(name: &str) -> Option<KvLayout> {
        Self::ALL.iter().copied().find(|l| l.name() == name)
    }
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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

    /// The state whose rows value `n` is: the state of a `kv_concat` result, or of a reshape of
    /// one; `None` for any other value (an encoder attending to the keys of this step).
    pub fn kv_state_of(&self, n: NodeId) -> Option<&StateDecl> {
        let mut n = n;
        loop {
            match self.op(n) {
                Op::KvConcat { state } => return self.state(state),
                Op::Reshape => n = *self.inputs(n).first()?,
                _ => return None,
            }
        }
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
