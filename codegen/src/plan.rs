//! The compile-time memory plan: where every value of a graph lives while the model runs.
//!
//! Weights and constants live in the artifact's data section, KV-cache outputs in their state
//! tensors (one buffer per state, whatever its layout: f32 rows, or int8 rows and their scales),
//! reshapes alias their operand, and every other value gets a slot in one activation arena.
//! A `concat` whose operands are all data (weights, constants, reshapes of them, or such concats:
//! the optimizer's merged Q/K/V and gate/up weights) is itself data, computed at compile time
//! ([`Place::WeightConcat`]); it gets no kernel, and its parts are written to the artifact only if
//! something else uses them.
//! Arena slots are sized for the largest step (`S = max_chunk`, `T = max_context`) and assigned by
//! first-fit over live ranges in execution order, so values whose lifetimes do not overlap share
//! memory; a value's slot never overlaps its operands' slots.

use std::collections::HashMap;

use ir::{Bindings, Graph, KvLayout, NodeId, Op, StateDecl, StateKind};

use crate::error::{CodegenError, Result};

/// Checks that `reader` (a CUDA kernel) can address state `decl`: a contiguous KV cache, the
/// only kind the CUDA kernels read. Any other kind or layout is an error naming the state;
/// nothing is ever read as contiguous by default.
#[cfg(feature = "cuda")]
pub(crate) fn require_contiguous_kv(decl: &StateDecl, reader: &str) -> Result<()> {
    match decl.kind {
        StateKind::Kv { layout: KvLayout::Contiguous } => Ok(()),
        other => Err(CodegenError::Unsupported {
            node: format!("state @{}", decl.name),
            msg: format!("{reader} cannot address a `{other}` state"),
        }),
    }
}

/// The layout of a KV-cache state, for readers that address more than the contiguous one (the
/// memory plan, the artifact's state table, the CPU `kv_concat` and `attention` kernels). Any
/// other kind is an error naming the state.
pub(crate) fn kv_layout(decl: &StateDecl, reader: &str) -> Result<KvLayout> {
    match decl.kind {
        StateKind::Kv { layout } => Ok(layout),
        other => Err(CodegenError::Unsupported {
            node: format!("state @{}", decl.name),
            msg: format!("{reader} cannot address a `{other}` state"),
        }),
    }
}

/// The layout of the state value `n` holds rows of (see [`Graph::kv_state_of`]), if any.
pub(crate) fn kv_layout_of(g: &Graph, n: NodeId, reader: &str) -> Result<Option<KvLayout>> {
    g.kv_state_of(n).map(|decl| kv_layout(decl, reader)).transpose()
}

/// Only a fused `attention` (and the `reshape`s between it and its `kv_concat`) reads an int8
/// state's rows: anything else would read the codes as floats. The `optimize` pass fuses every
/// attention the frontends build.
fn check_int8_state_readers(g: &Graph) -> Result<()> {
    for n in g.g.node_indices() {
        if matches!(g.op(n), Op::Attention { .. } | Op::Reshape) {
            continue;
        }
        for i in g.inputs(n) {
            if let Some(decl) = g.kv_state_of(i).filter(|d| d.kind == StateKind::Kv { layout: KvLayout::Int8 }) {
                return Err(CodegenError::Unsupported {
                    node: format!("{} (node {})", g.op(n).name(), n.index()),
                    msg: format!(
                        "reads the rows of the `kv<int8>` state @{} itself; only a fused attention reads an int8 KV cache \
                         (run the `optimize` pass, or compile with the f32 cache)",
                        decl.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Checks the state that value `n` holds rows of, if any (see [`Graph::kv_state_of`]), with
/// [`require_contiguous_kv`].
#[cfg(feature = "cuda")]
pub(crate) fn require_contiguous_kv_of(g: &Graph, n: NodeId, reader: &str) -> Result<()> {
    match g.kv_state_of(n) {
        Some(decl) => require_contiguous_kv(decl, reader),
        None => Ok(()),
    }
}

/// Where a value lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// A weight loaded from the checkpoint by name, under its layout (the dequantized values of a
    /// packed layout: `ir::quant::fake_quant`).
    /// `packed`: stored in the layout's packed byte format (`abi::QFormat`, see `crate::packed`),
    /// else as f32.
    Weight { name: String, ty: ir::TensorType, layout: ir::Layout, packed: bool, bytes: u64 },
    /// An inline constant.
    Const { values: Vec<f32> },
    /// A constant derived at compile time: `parts` (each a `Weight`, `Const` or `WeightConcat`,
    /// with its shape as the concat's operand) concatenated along `axis`; `bytes` in total.
    /// `packed`: the parts' packed rows concatenated (axis 0, one shared layout).
    WeightConcat { parts: Vec<(Place, Vec<usize>)>, axis: usize, packed: bool, bytes: u64 },
    /// A slot in the arena.
    Arena { offset: u64, bytes: u64 },
    /// A KV-cache state (index into `graph.states`).
    State { index: usize },
    /// A `Weight` or `WeightConcat` (`inner`, row-major `[rows, k]`) stored in the runtime's panel
    /// layout in `groups` row groups (`abi::panel`); `bytes` in all.
    Panels { inner: Box<Place>, rows: usize, k: usize, groups: usize, bytes: u64 },
    /// The runtime's microkernel function table (`BufferDecl::Microkernels`).
    Microkernels,
}

impl Place {
    /// Whether the value is known at compile time (lives in the artifact's data section).
    pub fn is_data(&self) -> bool {
        matches!(self, Place::Weight { .. } | Place::Const { .. } | Place::WeightConcat { .. } | Place::Panels { .. })
    }
}

pub struct MemoryPlan {
    /// One entry per distinct buffer; values that alias share an entry.
    pub places: Vec<Place>,
    /// Buffer of every node.
    pub buffer_of: HashMap<NodeId, usize>,
    pub arena_bytes: u64,
    pub order: Vec<NodeId>,
}

fn align(x: u64) -> u64 {
    x.div_ceil(64) * 64
}

/// First-fit allocator over a growing arena.
#[derive(Default)]
struct Arena {
    free: Vec<(u64, u64)>, // (offset, len), sorted, coalesced
    top: u64,
}

impl Arena {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = align(len.max(1));
        if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
            let (off, l) = self.free[i];
            if l == len {
                self.free.remove(i);
            } else {
                self.free[i] = (off + len, l - len);
            }
            return off;
        }
        // Grow, reusing a free block that ends at the top.
        if let Some(&(off, l)) = self.free.last() {
            if off + l == self.top {
                self.free.pop();
                self.top = off + len;
                return off;
            }
        }
        let off = self.top;
        self.top += len;
        off
    }

    fn release(&mut self, off: u64, len: u64) {
        let len = align(len.max(1));
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        // Coalesce with neighbours.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// Bytes of a `[N, K]` value stored packed as `layout`.
fn packed_bytes(layout: Option<ir::Layout>, ty: &ir::TensorType) -> Option<u64> {
    let (n, k) = (ty.shape.first()?.as_const()?, ty.shape.get(1)?.as_const()?);
    Some((n * crate::packed::qformat(layout?)?.row_bytes(k)) as u64)
}

/// Plans memory for `g` with steps of at most `max_chunk` tokens and a context of `max_context`;
/// with `panels`, weights that [`crate::cpu::panel::panel_groups`] accepts are stored in the panel
/// layout (as [`crate::cpu::KernelCtx::panel_weights`] must then say).
pub fn plan(g: &Graph, max_chunk: usize, max_context: usize, panels: bool) -> Result<MemoryPlan> {
    let order = g.topo_order()?;
    check_int8_state_readers(g)?;
    let at_max = Bindings { s: max_chunk, p: max_context - max_chunk };
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut places: Vec<Place> = Vec::new();
    let mut buffer_of: HashMap<NodeId, usize> = HashMap::new();
    let mut state_buf: HashMap<String, usize> = HashMap::new();
    // First pass: decide each node's buffer (new or aliased).
    for &n in &order {
        let ty = g.ty(n);
        let bytes = (ty.numel(at_max) * ty.dtype.size()) as u64;
        let b = match g.op(n) {
            Op::Reshape => buffer_of[&g.inputs(n)[0]],
            Op::Weight { name, layout, .. } => {
                let packed = crate::cpu::quant::packed_layout(g, n);
                let bytes = packed_bytes(packed, ty).unwrap_or(bytes);
                places.push(Place::Weight { name: name.clone(), ty: ty.clone(), layout: *layout, packed: packed.is_some(), bytes });
                places.len() - 1
            }
            Op::Const { values } => {
                places.push(Place::Const { values: values.clone() });
                places.len() - 1
            }
            Op::Concat { axis, .. } if g.inputs(n).iter().all(|x| places[buffer_of[x]].is_data()) => {
                let parts = g
                    .inputs(n)
                    .iter()
                    .map(|x| {
                        let shape = g.ty(*x).shape.iter().map(|d| d.as_const().unwrap_or(0)).collect();
                        (places[buffer_of[x]].clone(), shape)
                    })
                    .collect();
                let packed = crate::cpu::quant::packed_layout(g, n);
                let bytes = packed_bytes(packed, ty).unwrap_or(bytes);
                places.push(Place::WeightConcat { parts, axis: *axis, packed: packed.is_some(), bytes });
                places.len() - 1
            }
            Op::KvConcat { state } => {
                let index = g
                    .states
                    .iter()
                    .position(|s| &s.name == state)
                    .ok_or_else(|| CodegenError::Target(format!("kv_concat names undeclared state @{state}")))?;
                // A cache is one buffer (of `C` f32 rows, or of int8 rows and their scales): the
                // state place itself.
                kv_layout(&g.states[index], "the memory plan")?;
                *state_buf.entry(state.clone()).or_insert_with(|| {
                    places.push(Place::State { index });
                    places.len() - 1
                })
            }
            _ => {
                places.push(Place::Arena { offset: 0, bytes });
                places.len() - 1
            }
        };
        buffer_of.insert(n, b);
    }
    // Panel layouts: only for the value a product reads (a concat's parts keep their place, and
    // are written only if something else uses them).
    if panels {
        for &n in &order {
            let Some(groups) = crate::cpu::panel::panel_groups(g, n) else { continue };
            let b = buffer_of[&n];
            if !matches!(places[b], Place::Weight { .. } | Place::WeightConcat { .. }) {
                continue;
            }
            let t = g.ty(n);
            let (rows, k) = (t.shape[0].as_const().unwrap_or(0), t.shape[1].as_const().unwrap_or(0));
            let bytes = (groups * abi::panel::panel_group_len(rows / groups, k) * 4) as u64;
            let inner = Box::new(places[b].clone());
            places[b] = Place::Panels { inner, rows, k, groups, bytes };
        }
    }
    // Live ranges of arena buffers: from the first definition to the last use of any alias.
    let end = order.len();
    let mut first: HashMap<usize, usize> = HashMap::new();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for &n in &order {
        let b = buffer_of[&n];
        // Graph inputs are written by the runtime before the first step runs.
        let def = if matches!(g.op(n), Op::Input { .. }) { 0 } else { pos[&n] };
        let f = first.entry(b).or_insert(def);
        *f = (*f).min(def);
        let l = last.entry(b).or_insert(pos[&n]);
        for u in g.users(n) {
            *l = (*l).max(pos[&u]);
        }
    }
    for o in &g.outputs {
        last.insert(buffer_of[o], end);
    }
    let mut arena = Arena::default();
    let mut frees: HashMap<usize, Vec<usize>> = HashMap::new();
    for (&b, &l) in &last {
        frees.entry(l).or_default().push(b);
    }
    let mut starts: HashMap<usize, Vec<usize>> = HashMap::new();
    for (&b, &f) in &first {
        starts.entry(f).or_default().push(b);
    }
    for i in 0..order.len() {
        let mut born = starts.remove(&i).unwrap_or_default();
        born.sort();
        for b in born {
            if let Place::Arena { offset, bytes } = &mut places[b] {
                *offset = arena.alloc(*bytes);
            }
        }
        let mut dying = frees.remove(&i).unwrap_or_default();
        dying.sort();
        for d in dying {
            if let Place::Arena { offset, bytes } = places[d] {
                arena.release(offset, bytes);
            }
        }
    }
    Ok(MemoryPlan { places, buffer_of, arena_bytes: align(arena.top), order })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{Dim, Op, TensorType, UnaryOp};

    /// The runtime writes token ids before step 0, so the input's slot must not be shared with any
    /// value computed before the input node appears in the order.
    #[test]
    fn input_slot_is_live_from_the_start() {
        let mut g = Graph::new("t");
        let pos = g.add(Op::Positions, &[], None).unwrap();
        let table = g.add(Op::Weight { name: "wpe".into(), stored: ir::DType::F32, layout: Default::default() }, &[], Some(TensorType::f32(vec![Dim::N(8), Dim::N(4)]))).unwrap();
        let pe = g.add(Op::Gather, &[table, pos], None).unwrap();
        let pe2 = g.add(Op::Unary(UnaryOp::Exp), &[pe], None).unwrap();
        let ids = g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(ir::DType::I32, vec![Dim::S]))).unwrap();
        let te = g.add(Op::Gather, &[table, ids], None).unwrap();
        let x = g.add(Op::Binary(ir::BinaryOp::Add), &[te, pe2], None).unwrap();
        g.outputs.push(x);
        let p = plan(&g, 4, 8, false).unwrap();
        let span = |n: NodeId| match p.places[p.buffer_of[&n]] {
            Place::Arena { offset, bytes } => offset..offset + bytes,
            ref other => panic!("{other:?}"),
        };
        let input = span(ids);
        for n in [pos, pe, pe2] {
            let o = span(n);
            assert!(o.end <= input.start || input.end <= o.start, "value computed before the input overlaps its slot");
        }
    }

    #[test]
    fn arena_reuses_dead_slots_and_never_overlaps_operands() {
        let mut g = Graph::new("t");
        let ty = TensorType::f32(vec![Dim::N(4), Dim::N(16)]);
        let w = g.add(Op::Weight { name: "w".into(), stored: ir::DType::F32, layout: Default::default() }, &[], Some(ty.clone())).unwrap();
        let mut x = g.add(Op::Unary(UnaryOp::Exp), &[w], None).unwrap();
        let mut chain = vec![x];
        for _ in 0..6 {
            x = g.add(Op::Unary(UnaryOp::Tanh), &[x], None).unwrap();
            chain.push(x);
        }
        g.outputs.push(x);
        let p = plan(&g, 4, 8, false).unwrap();
        // A chain needs two live slots at a time: the arena is two slots big, not seven.
        assert_eq!(p.arena_bytes, 2 * 4 * 16 * 4);
        for pair in chain.windows(2) {
            let (a, b) = (&p.places[p.buffer_of[&pair[0]]], &p.places[p.buffer_of[&pair[1]]]);
            assert_ne!(a, b, "a value's slot must differ from its operand's");
        }
    }

    #[test]
    fn concats_of_data_are_compile_time_constants() {
        use Dim::{N, S};
        let mut g = Graph::new("t");
        let w = |g: &mut Graph, name: &str, shape: Vec<Dim>| {
            g.add(Op::Weight { name: name.into(), stored: ir::DType::F32, layout: Default::default() }, &[], Some(TensorType::f32(shape))).unwrap()
        };
        let wq = w(&mut g, "q", vec![N(4), N(8)]);
        let wk = w(&mut g, "k", vec![N(2), N(8)]);
        let c = g.add(Op::Const { values: vec![0.5; 16] }, &[], Some(TensorType::f32(vec![N(2), N(8)]))).unwrap();
        let cr = g.add(Op::Reshape, &[c], Some(TensorType::f32(vec![N(2), N(8)]))).unwrap();
        let qk = g.add(Op::Concat { axis: 0, n: 3 }, &[wq, wk, cr], None).unwrap();
        let ids = g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(ir::DType::I32, vec![S]))).unwrap();
        let x = g.add(Op::Gather, &[wq, ids], None).unwrap(); // [S, 8]
        let lin = Op::Linear { transpose_b: true, bias: false, act: None, residual: false };
        let y = g.add(lin, &[x, qk], None).unwrap(); // [S, 8]
        let y2 = g.add(Op::Concat { axis: 1, n: 2 }, &[y, x], None).unwrap(); // an activation concat
        g.outputs.push(y2);
        let p = plan(&g, 4, 8, false).unwrap();
        match &p.places[p.buffer_of[&qk]] {
            Place::WeightConcat { parts, axis: 0, bytes, .. } => {
                assert_eq!(*bytes, 8 * 8 * 4);
                assert_eq!(parts.len(), 3);
                assert!(matches!(&parts[0], (Place::Weight { name, .. }, sh) if name == "q" && *sh == vec![4, 8]));
                assert!(matches!(&parts[2], (Place::Const { .. }, sh) if *sh == vec![2, 8]));
            }
            other => panic!("concat of weights planned as {other:?}"),
        }
        // The activation concat is an arena slot, distinct from its operands'.
        assert!(matches!(p.places[p.buffer_of[&y2]], Place::Arena { .. }));
        assert_ne!(p.places[p.buffer_of[&y2]], p.places[p.buffer_of[&y]]);
        assert_ne!(p.places[p.buffer_of[&y2]], p.places[p.buffer_of[&x]]);
        // Only activations take arena memory, none for the weights' concat: the ids (16 bytes,
        // one 64-byte slot), x and y (f32[4, 8]) and y2 (f32[4, 16]), all live when y2 is made.
        assert_eq!(p.arena_bytes, 64 + 2 * (4 * 8 * 4) + 4 * 16 * 4);
    }
}
