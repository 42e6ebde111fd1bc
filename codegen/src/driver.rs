//! The one driver every backend runs through ([`drive`]): it plans memory, asks the backend for
//! each node's kernel (once per distinct [`KernelKey`]), deduplicates kernels by their source and
//! constant tables by their bits, builds the header (placeholder offsets as wide as any real one)
//! and streams the data section: this thread loads, converts and packs each buffer while a writer
//! thread appends the previous ones, with the weights read ahead from disk in the order they are
//! written. A [`Backend`] contributes only what differs between targets: the code of a node,
//! how its code is laid out in the code section, which storage forms it can read, and the
//! header's target fields.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use abi::panel::PanelElem;
use abi::artifact::{
    ArtifactWriter, BlobEntry, BufferDecl, EntryPoint, Header, KernelEntry, Launch, LogitsHead, StateEntry, StateLayout, Step,
    FORWARD_ENTRY,
};
use ir::{DType, Graph, Layout, NodeId, Op, TensorType, WeightSource};

use crate::error::{CodegenError, Result};
use crate::plan::{plan, Place};

/// The element type of float weights in the artifact (`llmc compile --weights-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsDtype {
    F32,
    F16,
    BF16,
    /// Each weight as the checkpoint stores it (f32, f16 or bf16).
    Keep,
}

impl WeightsDtype {
    /// The `--weights-dtype` names.
    pub const NAMES: [&'static str; 4] = ["f32", "f16", "bf16", "keep"];

    pub fn parse(name: &str) -> Result<WeightsDtype> {
        Ok(match name {
            "f32" => WeightsDtype::F32,
            "f16" => WeightsDtype::F16,
            "bf16" => WeightsDtype::BF16,
            "keep" => WeightsDtype::Keep,
            other => return Err(CodegenError::Target(format!("--weights-dtype `{other}`: expected f32, f16, bf16 or keep"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightsDtype::F32 => "f32",
            WeightsDtype::F16 => "f16",
            WeightsDtype::BF16 => "bf16",
            WeightsDtype::Keep => "keep",
        }
    }

    /// The storage of a float weight whose checkpoint element type is `stored` (`None`: parts of
    /// a compile-time concat that disagree, kept as f32).
    fn storage(self, stored: Option<DType>) -> Storage {
        match self {
            WeightsDtype::F32 => Storage::F32,
            WeightsDtype::F16 => Storage::F16,
            WeightsDtype::BF16 => Storage::BF16,
            WeightsDtype::Keep => match stored {
                Some(DType::F16) => Storage::F16,
                Some(DType::BF16) => Storage::BF16,
                _ => Storage::F32,
            },
        }
    }
}

/// How a buffer's elements are stored (in the data section, in the arena, on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    F16,
    BF16,
    I32,
    /// Packed quantized rows (`abi::qformat`).
    Packed(Layout),
    /// Rows in the runtime's panel layout, in this many row groups, as `elem` values
    /// (`abi::panel`).
    Panels { groups: usize, elem: PanelElem },
}

impl Storage {
    /// Bytes of a buffer the memory plan sized at `planned` bytes (f32 elements, or packed or
    /// panel bytes) in this storage.
    pub fn stored_bytes(self, planned: u64) -> u64 {
        match self {
            Storage::F16 | Storage::BF16 => planned / 2,
            Storage::Panels { elem, .. } => planned / 4 * elem.bytes() as u64,
            _ => planned,
        }
    }

    pub fn name(self) -> String {
        match self {
            Storage::F32 => "f32".into(),
            Storage::F16 => "f16".into(),
            Storage::BF16 => "bf16".into(),
            Storage::I32 => "i32".into(),
            Storage::Packed(l) => format!("packed {l}"),
            Storage::Panels { groups, elem: PanelElem::F32 } => format!("panels {groups}"),
            Storage::Panels { groups, elem } => format!("panels {groups} {}", elem.name()),
        }
    }
}

/// Options of `llmc compile` that every backend reads. A backend's own options are fields of the
/// backend ([`crate::CpuOptions`], [`crate::CudaOptions`]).
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Largest number of tokens per step (prefill chunk); default `min(512, max_context)`.
    pub max_chunk: Option<usize>,
    /// Element type of float weights; `None`: the backend's [`Backend::default_weights_dtype`].
    pub weights_dtype: Option<WeightsDtype>,
    /// Named non-tensor bytes to carry in the data section (`tokenizer.json`), see `Header::blobs`.
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// What a compilation produced, for the compiler's report.
#[derive(Clone, Debug, Default)]
pub struct CompileReport {
    pub nodes: usize,
    pub steps: usize,
    pub kernels: usize,
    pub code_bytes: u64,
    pub weight_bytes: u64,
    pub arena_bytes: u64,
    pub state_bytes: u64,
    pub file_bytes: u64,
    pub max_chunk: usize,
    pub max_context: usize,
    pub codegen_seconds: f64,
    pub write_seconds: f64,
    /// Files the backend wrote beside the artifact (`--emit ptx DIR`: one per CUDA kernel and
    /// architecture).
    pub ptx_files: Vec<PathBuf>,
}

/// One node's kernel, as a backend generated it.
#[derive(Clone)]
pub struct NodeKernel {
    /// `<op>_<node index>`, for listings and errors.
    pub name: String,
    /// What identifies the kernel's code: nodes whose sources are equal share one kernel (the CPU
    /// backend's machine code, the CUDA backend's MLIR text).
    pub source: Vec<u8>,
    /// Further kernels of the node (CPU: a split attention's merge), in run order, each with the
    /// same arguments as the first and run after all of its parts: one more step each.
    pub phases: Vec<Vec<u8>>,
    /// Constant f32 arrays passed after the output, in order.
    pub tables: Vec<Vec<f32>>,
    /// The kernel takes the runtime's microkernel table as its last argument (CPU).
    pub microkernels: bool,
    /// Bytes of arena scratch the kernel needs at the largest step, passed as its last argument
    /// (0: none). Kernels run one after another, so all share one slot.
    pub scratch_bytes: u64,
    /// The launch shape (GPU kernels).
    pub launch: Option<Launch>,
}

/// What a target contributes to [`drive`].
pub trait Backend {
    /// The `--target` name.
    fn name(&self) -> &'static str;
    /// The element type of float weights when `--weights-dtype` is not given.
    fn default_weights_dtype(&self) -> WeightsDtype;
    /// Whether the memory plan stores eligible weights in the runtime's panel layouts.
    fn panels(&self) -> bool;
    /// Called once, before any kernel, with the graph, its interface and the float weights'
    /// element type.
    fn begin(&mut self, g: &Graph, io: &GraphIo, weights: WeightsDtype) -> Result<()>;
    /// The storage of weight buffer `p`, given the one `--weights-dtype` asks for (`wanted`): a
    /// backend whose kernels read some weights only as f32 says so here (default: `wanted`).
    fn weight_storage(&self, _p: &Place, wanted: Storage) -> Storage {
        wanted
    }
    /// An error when this backend cannot read buffer `p` stored as `s` (naming the buffer).
    fn check_storage(&self, p: &Place, s: Storage) -> Result<()>;
    /// The kernel of node `n` whose operands are stored as `operands`; `None`: the node needs no
    /// code (inputs, weights, constants, reshapes).
    fn kernel(&mut self, g: &Graph, n: NodeId, operands: &[Storage]) -> Result<Option<NodeKernel>>;
    /// Appends the code of a new distinct kernel (the `index`th) to the code section and returns
    /// its table entry.
    fn emit_code(&mut self, index: usize, k: &NodeKernel, code: &mut Vec<u8>) -> Result<KernelEntry>;
    /// The header's target name and CPU features; may add entries to `meta`.
    fn header(&self, meta: &mut BTreeMap<String, String>) -> (String, Vec<String>);
    /// Files written beside the artifact, for the report.
    fn written_files(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Kernels are generated once per distinct key: nodes with equal op, result type, operand types
/// and storage (and, for rope, equal frequencies) get identical code.
#[derive(Clone, Debug, PartialEq)]
struct KernelKey {
    op: Op,
    result: TensorType,
    /// The product's activations are quantized to int8 (a different kernel from the same op on
    /// f32 activations).
    acts_int8: bool,
    operands: Vec<(TensorType, Storage)>,
    /// Rope's frequency table, bit for bit.
    freqs: Option<Vec<u32>>,
}

// `Op`'s float parameters (scales, epsilons) compare by value: a NaN parameter never matches,
// which only costs a second generation of the kernel (deduplicated by its source).
impl Eq for KernelKey {}

impl Hash for KernelKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // The op's kind only (its parameters are floats); equal keys hash equally.
        std::mem::discriminant(&self.op).hash(h);
        self.result.hash(h);
        self.acts_int8.hash(h);
        self.operands.hash(h);
        self.freqs.hash(h);
    }
}

/// The little-endian bytes of `v` without a copy (x86-64 is little-endian).
pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    const _: () = assert!(cfg!(target_endian = "little"));
    // SAFETY: f32 has no padding and alignment 4 >= 1; the slice covers exactly v's memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub(crate) fn meta_usize(g: &Graph, key: &str) -> Option<usize> {
    g.meta.get(key).and_then(|v| v.parse().ok())
}

/// What every backend needs to know about a graph's interface, checked: the KV-cache rows
/// (`max_context`), the tokens per step (`max_chunk`), the one token-id input and the one
/// `f32[S, vocab]` output.
pub struct GraphIo {
    pub max_context: usize,
    pub max_chunk: usize,
    pub input: NodeId,
    pub output: NodeId,
    pub vocab: usize,
}

/// Whether `n` computes each row of its `[S, ..]` result from the same row of its activation
/// operands alone (its other operands compile-time data without an `S` dimension).
fn rowwise(g: &Graph, n: NodeId) -> bool {
    let ok_op = match g.op(n) {
        Op::Unary(_) | Op::Binary(_) | Op::RmsNorm { .. } | Op::LayerNorm { .. } | Op::GatedLinear { .. } => true,
        Op::Linear { transpose_b: true, .. } | Op::Matmul { transpose_b: true } => true,
        _ => false,
    };
    let t = g.ty(n);
    let shape_ok = t.shape.first() == Some(&ir::Dim::S) && t.shape[1..].iter().all(|d| d.as_const().is_some());
    // Products and norms: the weight operands are data.
    let data_ok = match g.op(n) {
        Op::Linear { .. } | Op::Matmul { .. } | Op::GatedLinear { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
            g.inputs(n)[1..].iter().enumerate().all(|(i, &x)| {
                // Linear's residual (its last operand with `residual`) is an activation.
                let residual = matches!(g.op(n), Op::Linear { residual: true, .. }) && i + 2 == g.inputs(n).len();
                residual || is_data(g, x)
            })
        }
        _ => true,
    };
    ok_op && shape_ok && data_ok
}

/// Whether `x` is known at compile time (weights, constants, and reshapes and concats of them).
fn is_data(g: &Graph, x: NodeId) -> bool {
    match g.op(x) {
        Op::Weight { .. } | Op::Const { .. } => true,
        Op::Reshape | Op::Concat { .. } => g.inputs(x).iter().all(|&i| is_data(g, i)),
        _ => false,
    }
}

/// The logits head of the graph: the row-wise nodes between one activation `x` and the output
/// (final norm, LM head, logit scaling), with `x` read by them alone; the deepest such `x` along
/// the output's chain of first activation operands. `None` when the output is not row-wise.
fn logits_head(g: &Graph, output: NodeId) -> Option<(HashSet<NodeId>, NodeId)> {
    // The nodes on a path from `x` to the output (excluding `x`), if they form a valid head.
    let tail_from = |x: NodeId| -> Option<HashSet<NodeId>> {
        let mut below: HashSet<NodeId> = HashSet::new(); // descendants of x
        let mut stack = vec![x];
        while let Some(n) = stack.pop() {
            for u in g.users(n) {
                if below.insert(u) {
                    stack.push(u);
                }
            }
        }
        if !below.contains(&output) {
            return None;
        }
        let mut tail = HashSet::new(); // descendants of x that are ancestors of the output
        let mut stack = vec![output];
        while let Some(n) = stack.pop() {
            if below.contains(&n) && tail.insert(n) {
                stack.extend(g.inputs(n));
            }
        }
        let closed = tail.iter().all(|&n| {
            rowwise(g, n) && g.inputs(n).iter().all(|&i| i == x || tail.contains(&i) || is_data(g, i))
        });
        let users_inside = g.users(x).iter().all(|u| tail.contains(u));
        (closed && users_inside && !g.outputs.contains(&x)).then_some(tail)
    };
    let mut best = None;
    let mut cur = output;
    while rowwise(g, cur) {
        let Some(&x) = g.inputs(cur).iter().find(|&&i| !is_data(g, i)) else { break };
        if matches!(g.op(x), Op::Input { .. }) || g.ty(x).shape.first() != Some(&ir::Dim::S) {
            break;
        }
        if let Some(t) = tail_from(x) {
            best = Some((t, x));
        }
        cur = x;
    }
    best
}

/// The artifact's KV-cache states: one f32 tensor per graph state, with its layout.
pub(crate) fn state_entries(g: &Graph) -> Result<Vec<StateEntry>> {
    g.states
        .iter()
        .map(|s| {
            let layout = crate::plan::kv_layout(s, "the artifact's state table")?;
            let d = s.ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
            let bytes = layout.state_bytes(s.ty.static_numel().unwrap_or(0), d) as u64;
            let layout = match layout {
                ir::KvLayout::Contiguous => StateLayout::Contiguous,
                ir::KvLayout::Int8 => StateLayout::Int8,
                other => {
                    return Err(CodegenError::Unsupported {
                        node: format!("state @{}", s.name),
                        msg: format!("the artifact's state table has no `{other}` layout"),
                    })
                }
            };
            Ok(StateEntry { name: s.name.clone(), bytes, layout })
        })
        .collect()
}

/// The artifact's one entry point, `forward`: every step, the token ids in, the logits out.
pub(crate) fn forward_entry(steps: usize, input: u32, output: u32, head: Option<LogitsHead>) -> Result<EntryPoint> {
    let n = u32::try_from(steps).map_err(|_| CodegenError::Target(format!("{steps} steps do not fit the artifact's step indices")))?;
    Ok(EntryPoint { name: FORWARD_ENTRY.into(), steps: vec![0..n], input, output, head })
}

/// Verifies `g` and reads its [`GraphIo`].
pub(crate) fn graph_io(g: &Graph, opts: &CompileOptions) -> Result<GraphIo> {
    ir::verify(g)?;
    let unsupported = CodegenError::Target;
    let max_context = g
        .states
        .first()
        .and_then(|s| s.ty.shape[0].as_const())
        .or_else(|| meta_usize(g, "max_context"))
        .ok_or_else(|| unsupported("graph declares no KV state and no `max_context` meta".into()))?;
    let max_chunk = opts.max_chunk.unwrap_or(512).min(max_context).max(1);
    let inputs: Vec<_> = g.g.node_indices().filter(|&n| matches!(g.op(n), Op::Input { .. })).collect();
    let [input] = inputs[..] else {
        return Err(unsupported(format!("graph must have exactly one token-id input, has {}", inputs.len())));
    };
    let [output] = g.outputs[..] else {
        return Err(unsupported(format!("graph must return exactly one value (logits), returns {}", g.outputs.len())));
    };
    let out_ty = g.ty(output);
    let vocab = match out_ty.shape[..] {
        [ir::Dim::S, ir::Dim::N(v)] => v,
        _ => return Err(unsupported(format!("graph must return logits f32[S, vocab], returns {out_ty}"))),
    };
    Ok(GraphIo { max_context, max_chunk, input, output, vocab })
}

/// The checkpoint element type of the weights a data place holds (`None`: a constant, or parts
/// that disagree).
fn stored_dtype(p: &Place, stored: &HashMap<&str, DType>) -> Option<DType> {
    match p {
        Place::Weight { name, .. } => stored.get(name.as_str()).copied(),
        Place::WeightConcat { parts, .. } => {
            let mut ds = parts.iter().map(|(q, _)| stored_dtype(q, stored));
            let first = ds.next()??;
            ds.all(|d| d == Some(first)).then_some(first)
        }
        Place::Panels { inner, .. } => stored_dtype(inner, stored),
        _ => None,
    }
}

/// How buffer `p`, holding values of type `value`, is stored, given the float weights' choice.
fn storage_of(p: &Place, value: DType, weights: WeightsDtype, stored: &HashMap<&str, DType>) -> Storage {
    let panel_elem = |s: Storage| match s {
        Storage::F16 => PanelElem::F16,
        Storage::BF16 => PanelElem::BF16,
        _ => PanelElem::F32,
    };
    match p {
        Place::Weight { packed: true, layout, .. } => Storage::Packed(*layout),
        Place::WeightConcat { packed: true, .. } => match layout_of(p) {
            Some(l) => Storage::Packed(l),
            None => Storage::F32,
        },
        Place::Weight { .. } | Place::WeightConcat { .. } => weights.storage(stored_dtype(p, stored)),
        Place::Panels { groups, .. } => Storage::Panels { groups: *groups, elem: panel_elem(weights.storage(stored_dtype(p, stored))) },
        Place::Const { .. } | Place::Microkernels => Storage::F32,
        Place::Arena { .. } | Place::State { .. } => {
            if value == DType::I32 {
                Storage::I32
            } else {
                Storage::F32
            }
        }
    }
}

/// The layout of a packed weight or concat of packed weights.
fn layout_of(p: &Place) -> Option<Layout> {
    match p {
        Place::Weight { layout, .. } => Some(*layout),
        Place::WeightConcat { parts, .. } => parts.first().and_then(|(q, _)| layout_of(q)),
        _ => None,
    }
}

/// Compiles `g` with `backend` and writes the artifact to `out`.
pub fn drive(backend: &mut dyn Backend, g: &Graph, weights: &dyn WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
    let t0 = Instant::now();
    let io = graph_io(g, opts)?;
    let GraphIo { max_context, max_chunk, input, output, vocab } = io;
    let weights_dtype = opts.weights_dtype.unwrap_or_else(|| backend.default_weights_dtype());

    let mp = plan(g, max_chunk, max_context, backend.panels())?;
    // Start reading the weights from disk, in the order they are written below, while the
    // kernels compile (advice; stopped when `_prefetch` is dropped, on every return path).
    let _prefetch = weights.prefetch(&weight_names(&mp.places));
    backend.begin(g, &io, weights_dtype)?;

    // Every buffer's storage: weights as `weights_dtype` says (or packed), values by their type.
    let mut stored_dtypes: HashMap<&str, DType> = HashMap::new();
    for n in g.g.node_indices() {
        if let Op::Weight { name, stored, .. } = g.op(n) {
            stored_dtypes.insert(name, *stored);
        }
    }
    let mut places = mp.places.clone();
    let mut storage: Vec<Storage> = places.iter().map(|p| storage_of(p, DType::F32, weights_dtype, &stored_dtypes)).collect();
    for (&n, &b) in &mp.buffer_of {
        storage[b] = storage_of(&places[b], g.ty(n).dtype, weights_dtype, &stored_dtypes);
    }
    for (p, s) in places.iter().zip(storage.iter_mut()) {
        if matches!(p, Place::Weight { .. } | Place::WeightConcat { .. } | Place::Panels { .. }) {
            *s = backend.weight_storage(p, *s);
        }
    }
    for (p, &s) in places.iter().zip(&storage) {
        if p.is_data() {
            backend.check_storage(p, s)?;
        }
    }

    /// A distinct kernel's index, with the tables and extra arguments its nodes pass.
    #[derive(Clone)]
    struct Made {
        /// The node's kernels, one step each, in run order.
        kernels: Vec<u32>,
        tables: Vec<Vec<f32>>,
        microkernels: bool,
        scratch_bytes: u64,
    }
    let mut kernels: Vec<KernelEntry> = Vec::new();
    let mut code: Vec<u8> = Vec::new();
    let mut by_key: HashMap<KernelKey, Made> = HashMap::new();
    let mut by_source: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut table_buf: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut ukernel_buf: Option<usize> = None;
    let mut needs_scratch = Vec::new();
    let mut steps = Vec::new();
    let mut step_nodes = Vec::new();
    for (i, &n) in mp.order.iter().enumerate() {
        if matches!(mp.places[mp.buffer_of[&n]], Place::WeightConcat { .. } | Place::Panels { .. }) {
            continue; // computed at compile time, written to the data section below
        }
        let ins = g.inputs(n);
        let operands: Vec<Storage> = ins.iter().map(|x| storage[mp.buffer_of[x]]).collect();
        let freqs = match (g.op(n), ins.get(1).map(|&x| g.op(x))) {
            (Op::Rope { .. }, Some(Op::Const { values })) => Some(values.iter().map(|v| v.to_bits()).collect()),
            _ => None,
        };
        let key = KernelKey {
            op: g.op(n).clone(),
            result: g.ty(n).clone(),
            acts_int8: ir::interp::acts_quantized(g, n),
            operands: ins.iter().zip(&operands).map(|(&x, &s)| (g.ty(x).clone(), s)).collect(),
            freqs,
        };
        let made = match by_key.get(&key) {
            Some(m) => m.clone(),
            None => {
                let Some(nk) = backend.kernel(g, n, &operands)? else {
                    continue;
                };
                let mut made_kernels = Vec::new();
                let sources = std::iter::once(nk.source.clone()).chain(nk.phases.iter().cloned());
                for (phase, source) in sources.enumerate() {
                    let k = match by_source.get(&source) {
                        Some(&k) => k,
                        None => {
                            let name = if phase == 0 { nk.name.clone() } else { format!("{}.{phase}", nk.name) };
                            let one = NodeKernel { name, source: source.clone(), phases: Vec::new(), ..nk.clone() };
                            let entry = backend.emit_code(kernels.len(), &one, &mut code)?;
                            kernels.push(entry);
                            let k = (kernels.len() - 1) as u32;
                            by_source.insert(source, k);
                            k
                        }
                    };
                    made_kernels.push(k);
                }
                let m = Made {
                    kernels: made_kernels,
                    tables: nk.tables,
                    microkernels: nk.microkernels,
                    scratch_bytes: nk.scratch_bytes,
                };
                by_key.insert(key, m.clone());
                m
            }
        };
        let mut args: Vec<u32> = ins.iter().map(|x| mp.buffer_of[x] as u32).collect();
        args.push(mp.buffer_of[&n] as u32);
        for t in made.tables {
            let bits: Vec<u32> = t.iter().map(|v| v.to_bits()).collect();
            let b = *table_buf.entry(bits).or_insert_with(|| {
                places.push(Place::Const { values: t });
                storage.push(Storage::F32);
                places.len() - 1
            });
            args.push(b as u32);
        }
        if made.microkernels {
            let b = *ukernel_buf.get_or_insert_with(|| {
                places.push(Place::Microkernels);
                storage.push(Storage::F32);
                places.len() - 1
            });
            args.push(b as u32);
        }
        for (phase, &kernel) in made.kernels.iter().enumerate() {
            if made.scratch_bytes > 0 {
                needs_scratch.push((steps.len(), made.scratch_bytes));
            }
            let label = match phase {
                0 => format!("%{i} = {}", g.op(n).name()),
                _ => format!("%{i} = {} (phase {})", g.op(n).name(), phase + 1),
            };
            steps.push(Step { kernel, args: args.clone(), label });
            step_nodes.push(n);
        }
    }
    // One scratch slot at the end of the arena, shared by every kernel that needs one.
    let mut arena_bytes = mp.arena_bytes;
    if let Some(max) = needs_scratch.iter().map(|&(_, b)| b).max() {
        places.push(Place::Arena { offset: arena_bytes, bytes: max });
        storage.push(Storage::F32);
        arena_bytes += max.div_ceil(64) * 64;
        let b = (places.len() - 1) as u32;
        for (s, _) in needs_scratch {
            steps[s].args.push(b);
        }
    }
    // Keep only the data buffers some step (or the input/output) uses: a weight consumed only by
    // a compile-time concat is stored once, inside the concat.
    let mut input_buf = mp.buffer_of[&input] as u32;
    let mut output_buf = mp.buffer_of[&output] as u32;
    let head = logits_head(g, output).and_then(|(tail, x)| {
        let first = step_nodes.iter().position(|n| tail.contains(n))?;
        let row = g.ty(x).shape[1..].iter().map(|d| d.as_const()).product::<Option<usize>>()? * g.ty(x).dtype.size();
        // The head is exactly the last steps, and its input an arena buffer.
        let suffix = step_nodes[first..].iter().all(|n| tail.contains(n));
        let arena = matches!(places[mp.buffer_of[&x]], Place::Arena { .. });
        (suffix && arena).then_some(LogitsHead { first: first as u32, input: mp.buffer_of[&x] as u32, row_bytes: row as u64 })
    });
    let mut head_input = head.map_or(input_buf, |h| h.input);
    let (places, origin) = retain_used_indexed(places, &mut steps, &mut [&mut input_buf, &mut output_buf, &mut head_input]);
    let head = head.map(|h| LogitsHead { input: head_input, ..h });
    let storage: Vec<Storage> = origin.iter().map(|&i| storage[i]).collect();
    let codegen_seconds = t0.elapsed().as_secs_f64();

    // Header with placeholder offsets as wide as any real one, to bound its size.
    let wide = 1u64 << 60;
    let mut buffers: Vec<BufferDecl> = places
        .iter()
        .zip(&storage)
        .map(|(p, s)| match p {
            Place::Weight { .. } | Place::WeightConcat { .. } | Place::Panels { .. } => {
                BufferDecl::Data { name: data_name(p), offset: wide, bytes: s.stored_bytes(data_bytes(p)) }
            }
            Place::Const { values } => BufferDecl::Data { name: String::new(), offset: wide, bytes: values.len() as u64 * 4 },
            Place::Arena { offset, bytes } => BufferDecl::Arena { offset: *offset, bytes: *bytes },
            Place::State { index } => BufferDecl::State { index: *index as u32 },
            Place::Microkernels => BufferDecl::Microkernels { abi: abi::ukernel::ABI_VERSION },
        })
        .collect();
    let states = state_entries(g)?;
    let entries = vec![forward_entry(steps.len(), input_buf, output_buf, head)?];
    let mut meta = g.meta.clone();
    let (target, cpu_features) = backend.header(&mut meta);
    let mut header = Header {
        target,
        cpu_features,
        meta,
        vocab_size: vocab as u64,
        max_context: max_context as u64,
        max_chunk: max_chunk as u64,
        code_offset: wide,
        code_len: wide,
        data_offset: wide,
        data_len: wide,
        code_checksum: "0".repeat(16),
        data_checksum: "0".repeat(16),
        data_chunk_checksums: vec![],
        kernels,
        buffers: buffers.clone(),
        states,
        steps,
        entries,
        arena_bytes,
        blobs: opts.blobs.iter().map(|(n, b)| BlobEntry { name: n.clone(), offset: wide, bytes: b.len() as u64 }).collect(),
    };
    let reserve = abi::artifact::header_size_bound(&header);

    // Stream: code, then each data buffer (one weight in memory at a time), then the header.
    let t1 = Instant::now();
    let w = ArtifactWriter::create(out, reserve, &code)?;
    // Two threads: this one loads, converts and packs each buffer while a writer thread appends
    // the previous ones (copy into the page cache, checksum). Offsets are computed here with the
    // writer's rule, so nothing waits for them; the writer checks it agrees.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Payload, u64)>(2);
    let mut weight_bytes = 0;
    let (produced, written) = std::thread::scope(|sc| {
        let writer = sc.spawn(move || -> Result<ArtifactWriter> {
            let mut w = w;
            for (bytes, expect) in rx {
                let off = w.push_data(bytes.as_bytes())?;
                if off != expect {
                    return Err(CodegenError::Target(format!("bug: data written at {off}, planned at {expect}")));
                }
            }
            Ok(w)
        });
        let mut sink = Sink { pos: 0, tx };
        let produced = (|| -> Result<()> {
            for (i, (p, &s)) in places.iter().zip(&storage).enumerate() {
                let off = match p {
                    Place::Weight { .. } | Place::WeightConcat { .. } | Place::Panels { .. } => {
                        weight_bytes += s.stored_bytes(data_bytes(p));
                        push_place(&mut sink, p, s, weights)?
                    }
                    Place::Const { values } => sink.push(Payload::F32(values.clone()))?,
                    _ => continue,
                };
                if let BufferDecl::Data { offset, .. } = &mut buffers[i] {
                    *offset = off;
                }
            }
            for ((_, bytes), entry) in opts.blobs.iter().zip(&mut header.blobs) {
                entry.offset = sink.push(Payload::Bytes(bytes.clone()))?;
            }
            Ok(())
        })();
        drop(sink);
        let written = writer.join().unwrap_or_else(|_| Err(CodegenError::Target("bug: the artifact writer thread panicked".into())));
        (produced, written)
    });
    // The writer's error (an I/O error) is the cause when both failed.
    let w = written?;
    produced?;
    header.buffers = buffers;
    let file_bytes = w.finish(header.clone())?;
    Ok(CompileReport {
        nodes: g.node_count(),
        steps: header.steps.len(),
        kernels: header.kernels.len(),
        code_bytes: code.len() as u64,
        weight_bytes,
        arena_bytes,
        state_bytes: header.states.iter().map(|s| s.bytes).sum(),
        file_bytes,
        max_chunk,
        max_context,
        codegen_seconds,
        write_seconds: t1.elapsed().as_secs_f64(),
        ptx_files: backend.written_files(),
    })
}

/// The checkpoint names of the weights `places` load, in the order they are loaded.
pub(crate) fn weight_names(places: &[Place]) -> Vec<&str> {
    fn walk<'a>(p: &'a Place, out: &mut Vec<&'a str>) {
        match p {
            Place::Weight { name, .. } => out.push(name),
            Place::WeightConcat { parts, .. } => parts.iter().for_each(|(q, _)| walk(q, out)),
            Place::Panels { inner, .. } => walk(inner, out),
            _ => {}
        }
    }
    let mut out = Vec::new();
    places.iter().for_each(|p| walk(p, &mut out));
    out
}

/// Drops the data buffers (weights, constants, compile-time concats) that no step and no `roots`
/// entry references, renumbering the rest in `steps` and `roots`. Arena and state buffers stay.
/// Returns the kept places and the original index of each.
pub(crate) fn retain_used_indexed(places: Vec<Place>, steps: &mut [Step], roots: &mut [&mut u32]) -> (Vec<Place>, Vec<usize>) {
    let mut used = vec![false; places.len()];
    for &a in steps.iter().flat_map(|s| &s.args) {
        used[a as usize] = true;
    }
    for r in roots.iter() {
        used[**r as usize] = true;
    }
    let mut new_index = vec![u32::MAX; places.len()];
    let mut kept = Vec::with_capacity(places.len());
    let mut origin = Vec::with_capacity(places.len());
    for (i, p) in places.into_iter().enumerate() {
        if used[i] || !p.is_data() {
            new_index[i] = kept.len() as u32;
            kept.push(p);
            origin.push(i);
        }
    }
    for a in steps.iter_mut().flat_map(|s| &mut s.args) {
        *a = new_index[*a as usize];
    }
    for r in roots.iter_mut() {
        **r = new_index[**r as usize];
    }
    (kept, origin)
}

/// A readable name for a data buffer: the weight's name, `concat(..)` of its parts' names.
pub(crate) fn data_name(p: &Place) -> String {
    match p {
        Place::Weight { name, .. } => name.clone(),
        Place::WeightConcat { parts, axis, .. } => {
            let names: Vec<String> = parts.iter().map(|(q, _)| data_name(q)).collect();
            format!("concat{{axis={axis}}}({})", names.join(", "))
        }
        Place::Panels { inner, groups, .. } => format!("panels{{groups={groups}}}({})", data_name(inner)),
        _ => "const".into(),
    }
}

/// Bytes of a data place.
pub(crate) fn data_bytes(p: &Place) -> u64 {
    match p {
        Place::Weight { bytes, .. } | Place::WeightConcat { bytes, .. } | Place::Panels { bytes, .. } => *bytes,
        Place::Const { values } => values.len() as u64 * 4,
        _ => 0,
    }
}

/// The f32 values of a data place (`Weight`, `Const`, `WeightConcat`), row-major.
pub(crate) fn place_values(p: &Place, weights: &dyn WeightSource) -> Result<Vec<f32>> {
    Ok(match p {
        Place::Weight { name, ty, layout, .. } => {
            let v = weights.load(name, ty)?;
            if *layout == ir::Layout::Dense {
                return Ok(v); // `fake_quant` would copy it unchanged
            }
            let k = ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
            ir::quant::dequant_weight(weights, name, *layout, &v, k)
        }
        Place::Const { values } => values.clone(),
        Place::WeightConcat { parts, axis, bytes, .. } => {
            // outer rows; each part contributes (its extent on `axis`) x (inner) elements per row.
            let outer: usize = parts.first().map_or(1, |(_, sh)| sh[..*axis].iter().product());
            let mut out = Vec::with_capacity(*bytes as usize / 4);
            let datas = parts.iter().map(|(q, _)| place_values(q, weights)).collect::<Result<Vec<_>>>()?;
            for o in 0..outer {
                for ((_, sh), d) in parts.iter().zip(&datas) {
                    let row: usize = sh[*axis..].iter().product();
                    out.extend_from_slice(&d[o * row..(o + 1) * row]);
                }
            }
            out
        }
        Place::Panels { rows, k, groups, .. } => {
            let rows_of = PanelRows::load(p, weights)?;
            abi::panel::pack_panels_with(*rows, *k, *groups, |r| rows_of.row(r))
        }
        Place::Arena { .. } | Place::State { .. } | Place::Microkernels => {
            return Err(CodegenError::Target(format!("bug: {p:?} has no compile-time value")))
        }
    })
}

/// The row-major `[rows, k]` source of a `Place::Panels`: its weight, or the parts of a row-wise
/// concat (merged gate/up or Q/K/V, packed straight from its parts), with each part's first row.
struct PanelRows {
    datas: Vec<Vec<f32>>,
    starts: Vec<usize>,
    k: usize,
}

impl PanelRows {
    fn load(p: &Place, weights: &dyn WeightSource) -> Result<PanelRows> {
        let Place::Panels { inner, rows, k, .. } = p else {
            return Err(CodegenError::Target(format!("bug: {} is not a panel buffer", data_name(p))));
        };
        let datas = match &**inner {
            Place::WeightConcat { parts, axis: 0, .. } => parts.iter().map(|(q, _)| place_values(q, weights)).collect::<Result<Vec<_>>>()?,
            _ => vec![place_values(inner, weights)?],
        };
        let mut starts = Vec::with_capacity(datas.len());
        let mut r0 = 0;
        for d in &datas {
            starts.push(r0);
            r0 += d.len() / (*k).max(1);
        }
        if r0 != *rows {
            return Err(CodegenError::Target(format!("bug: {} has {r0} rows, planned {rows}", data_name(p))));
        }
        Ok(PanelRows { datas, starts, k: *k })
    }

    fn row(&self, r: usize) -> &[f32] {
        let i = self.starts.partition_point(|&s| s <= r) - 1;
        let o = (r - self.starts[i]) * self.k;
        &self.datas[i][o..o + self.k]
    }
}

/// Panel buffers at least this large are packed and handed to the writer in pieces of about
/// this size, so that writing overlaps packing (the last weight, the LM head, would otherwise
/// be written only after all of it is packed).
const PANEL_PIECE_BYTES: u64 = 8 << 20;

/// The packed bytes of a weight, or of a row-wise concat of weights (their rows in order).
pub(crate) fn place_packed(p: &Place, weights: &dyn WeightSource) -> Result<Vec<u8>> {
    Ok(match p {
        Place::Weight { name, ty, layout, .. } => {
            let v = weights.load(name, ty)?;
            let k = ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
            let rows = ir::quant::rows_of(weights, name, *layout, &v, k);
            crate::packed::pack_rows(*layout, &v, &rows, k)?
        }
        Place::WeightConcat { parts, axis: 0, .. } => {
            let mut out = Vec::new();
            for (q, _) in parts {
                out.extend(place_packed(q, weights)?);
            }
            out
        }
        _ => return Err(CodegenError::Target(format!("bug: {} cannot be packed", data_name(p)))),
    })
}

/// Bytes on their way to the artifact's data section.
enum Payload {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Payload {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::F32(v) => f32_bytes(v),
            Payload::Bytes(b) => b,
        }
    }
}

/// The producing end of the writer thread: hands buffers over in order and tracks where each
/// lands (the rule of `ArtifactWriter::push_data`: the next multiple of `DATA_ALIGN`).
struct Sink {
    pos: u64,
    tx: std::sync::mpsc::SyncSender<(Payload, u64)>,
}

impl Sink {
    fn push(&mut self, p: Payload) -> Result<u64> {
        let off = abi::artifact::round_up(self.pos, abi::artifact::DATA_ALIGN);
        self.pos = off + p.as_bytes().len() as u64;
        // A closed channel means the writer stopped on an error, which the caller reports.
        self.tx.send((p, off)).map_err(|_| CodegenError::Target("the artifact writer stopped".into()))?;
        Ok(off)
    }
}

/// One buffer written as consecutive pieces: where it starts, where it ends so far, and the
/// check that each piece lands right after the previous one.
#[derive(Default)]
struct Run {
    start: Option<u64>,
    end: u64,
}

impl Run {
    fn push(&mut self, w: &mut Sink, piece: Payload, what: &str) -> Result<()> {
        let len = piece.as_bytes().len() as u64;
        let off = w.push(piece)?;
        if self.start.is_some() && off != self.end {
            return Err(CodegenError::Target(format!("bug: {what} written at {off}, expected {}", self.end)));
        }
        self.start.get_or_insert(off);
        self.end = off + len;
        Ok(())
    }

    fn start(&self) -> u64 {
        self.start.unwrap_or(0)
    }

    fn len(&self) -> u64 {
        self.end - self.start()
    }
}

/// Writes a weight or compile-time concat, stored as `s`, to the data section and returns its
/// offset. An f32 concat along its outermost non-unit extent whose parts (all but the last) are
/// multiples of the data alignment is streamed part by part, one part in memory at a time, and
/// large panel buffers piece by piece; others are built in memory.
fn push_place(w: &mut Sink, p: &Place, s: Storage, weights: &dyn WeightSource) -> Result<u64> {
    let sixteen = match s {
        Storage::F16 | Storage::Panels { elem: PanelElem::F16, .. } => Some(Storage::F16),
        Storage::BF16 | Storage::Panels { elem: PanelElem::BF16, .. } => Some(Storage::BF16),
        _ => None,
    };
    // A buffer's values (f32, or converted to the 16-bit type).
    let payload = |v: Vec<f32>| -> Result<Payload> {
        Ok(match sixteen {
            Some(t) => Payload::Bytes(encode_16(&v, t, p)?),
            None => Payload::F32(v),
        })
    };
    if let (Some(_), Place::Weight { .. } | Place::WeightConcat { .. }) = (sixteen, p) {
        return w.push(payload(place_values(p, weights)?)?);
    }
    if let Storage::Packed(_) = s {
        let bytes = place_packed(p, weights)?;
        if bytes.len() as u64 != data_bytes(p) {
            return Err(CodegenError::Target(format!("bug: {} packed to {} bytes, planned {}", data_name(p), bytes.len(), data_bytes(p))));
        }
        return w.push(Payload::Bytes(bytes));
    }
    if let Place::Panels { rows, k, groups, .. } = p {
        let bytes = s.stored_bytes(data_bytes(p));
        let count = abi::panel::panel_count(*rows, *k, *groups);
        let panel_bytes = (abi::panel::PANEL * k * sixteen.map_or(4, |_| 2)) as u64;
        // Pieces of whole panels are multiples of 64 bytes (PANEL * 4): laid end to end they
        // are exactly the whole buffer, at the writer's alignment.
        if bytes >= 2 * PANEL_PIECE_BYTES && count > 1 && panel_bytes.is_multiple_of(abi::artifact::DATA_ALIGN) {
            let rows_of = PanelRows::load(p, weights)?;
            let per = (PANEL_PIECE_BYTES / panel_bytes).max(1) as usize;
            let mut run = Run::default();
            for q in (0..count).step_by(per) {
                let piece = abi::panel::pack_panels_part(*rows, *k, *groups, |r| rows_of.row(r), q..(q + per).min(count));
                run.push(w, payload(piece)?, "panel piece")?;
            }
            if run.len() != bytes {
                return Err(CodegenError::Target(format!("bug: {} written as {} bytes, planned {bytes}", data_name(p), run.len())));
            }
            return Ok(run.start());
        }
    }
    if let Place::WeightConcat { parts, axis, .. } = p {
        let outer: usize = parts.first().map_or(1, |(_, sh)| sh[..*axis].iter().product());
        let aligned = parts.iter().rev().skip(1).all(|(q, _)| data_bytes(q).is_multiple_of(64));
        if outer == 1 && aligned && !parts.is_empty() {
            let mut run = Run::default();
            for (q, _) in parts {
                run.push(w, Payload::F32(place_values(q, weights)?), "concat part")?;
            }
            return Ok(run.start());
        }
    }
    w.push(payload(place_values(p, weights)?)?)
}

/// Little-endian bytes of `v` as f16 or bf16 (`s`), rounded to nearest even; a finite value
/// beyond the type's range is an error naming the tensor and the value.
fn encode_16(v: &[f32], s: Storage, p: &Place) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len() * 2);
    for (i, &x) in v.iter().enumerate() {
        let (bytes, finite) = match s {
            Storage::F16 => {
                let h = half::f16::from_f32(x);
                (h.to_le_bytes(), h.is_finite())
            }
            _ => {
                let h = half::bf16::from_f32(x);
                (h.to_le_bytes(), h.is_finite())
            }
        };
        if x.is_finite() && !finite {
            let max = if s == Storage::F16 { f32::from(half::f16::MAX) } else { f32::from(half::bf16::MAX) };
            return Err(CodegenError::Target(format!(
                "--weights-dtype {}: weight `{}` element {i} is {x:e}, beyond {}'s range (±{max:e}); use a wider --weights-dtype (bf16 or f32)",
                s.name(),
                data_name(p),
                s.name()
            )));
        }
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}
