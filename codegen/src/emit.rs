//! The CPU backend's driver: compiles every node of a graph to a Cranelift kernel (once per distinct
//! kernel), lays out the step list against the memory plan, and streams the artifact to disk.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use ir::{Graph, Op, WeightSource};
use abi::artifact::{ArtifactWriter, BlobEntry, BufferDecl, Header, KernelEntry, StateEntry, Step, TARGET_X86_64};

use crate::cpu::{compile_kernel, host_isa, KernelCode, KernelCtx};
use crate::error::{CodegenError, Result};
use crate::plan::{plan, Place};

/// Options of `llmc compile` that reach the backend.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Largest number of tokens per step (prefill chunk); default `min(512, max_context)`.
    pub max_chunk: Option<usize>,
    /// CUDA target: element type of float weights on the GPU (`f16` default, `f32`, `bf16`).
    pub gpu_dtype: Option<String>,
    /// CUDA target: also write every kernel's PTX (and MLIR) into this directory.
    pub ptx_dir: Option<std::path::PathBuf>,
    /// Named non-tensor bytes to carry in the data section (`tokenizer.json`), see `Header::blobs`.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Keep every weight row-major and every product in generated code (no panel layouts, no
    /// runtime microkernel calls): for comparisons and for debugging the microkernel path.
    pub no_microkernels: bool,
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
    /// The files `--emit ptx DIR` wrote (CUDA target), one per kernel and architecture.
    pub ptx_files: Vec<std::path::PathBuf>,
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
pub(crate) struct GraphIo {
    pub max_context: usize,
    pub max_chunk: usize,
    pub input: ir::NodeId,
    pub output: ir::NodeId,
    pub vocab: usize,
}

/// The artifact's KV-cache states: one f32 tensor per graph state.
pub(crate) fn state_entries(g: &Graph) -> Vec<StateEntry> {
    g.states.iter().map(|s| StateEntry { name: s.name.clone(), bytes: (s.ty.static_numel().unwrap_or(0) * 4) as u64 }).collect()
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

/// Compiles `g` for the host CPU and writes the artifact to `out`.
pub fn compile_cpu(g: &Graph, weights: &dyn WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
    let t0 = Instant::now();
    let GraphIo { max_context, max_chunk, input, output, vocab } = graph_io(g, opts)?;

    let panels = !opts.no_microkernels;
    let mp = plan(g, max_chunk, max_context, panels)?;
    // Start reading the weights from disk, in the order they are written below, while the
    // kernels compile (advice; stopped when `_prefetch` is dropped, on every return path).
    let _prefetch = weights.prefetch(&weight_names(&mp.places));
    let (isa, features) = host_isa()?;
    let kctx = KernelCtx { max_context, panel_weights: panels };

    // Compile each distinct kernel once: nodes with equal op, operand types and result type (and,
    // for rope, equal frequencies) get identical code.
    let mut kernels: Vec<KernelEntry> = Vec::new();
    let mut code: Vec<u8> = Vec::new();
    let mut by_key: HashMap<String, (u32, Vec<Vec<f32>>, bool)> = HashMap::new();
    let mut ukernel_buf: Option<usize> = None;
    let mut by_code: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut places = mp.places.clone();
    let mut table_buf: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut steps = Vec::new();
    for (i, &n) in mp.order.iter().enumerate() {
        if matches!(mp.places[mp.buffer_of[&n]], Place::WeightConcat { .. } | Place::Panels { .. }) {
            continue; // computed at compile time, written to the data section below
        }
        let ins = g.inputs(n);
        let mut key = format!("{:?}|{}", g.op(n), g.ty(n));
        for &x in &ins {
            key.push_str(&format!("|{}", g.ty(x)));
            if let Some(l) = crate::cpu::quant::packed_layout(g, x) {
                key.push_str(&format!(" packed {l}"));
            }
            if panels {
                if let Some(gr) = crate::cpu::panel::panel_groups(g, x) {
                    key.push_str(&format!(" panels {gr}"));
                }
            }
            if let (Op::Rope { .. }, Op::Const { values }) = (g.op(n), g.op(x)) {
                key.push_str(&format!("{values:?}"));
            }
        }
        let (kernel, tables, ukernels) = match by_key.get(&key) {
            Some(k) => k.clone(),
            None => {
                let Some(KernelCode { name, code: kc, tables, ukernels }) = compile_kernel(&*isa, &kctx, g, n)? else {
                    continue;
                };
                let idx = match by_code.get(&kc) {
                    Some(&k) => k,
                    None => {
                        while code.len() % 64 != 0 {
                            code.push(0xcc); // int3 between kernels
                        }
                        kernels.push(KernelEntry { name, offset: code.len() as u64, len: kc.len() as u64, launch: None, variants: Vec::new() });
                        code.extend_from_slice(&kc);
                        let k = (kernels.len() - 1) as u32;
                        by_code.insert(kc, k);
                        k
                    }
                };
                by_key.insert(key, (idx, tables.clone(), ukernels));
                (idx, tables, ukernels)
            }
        };
        let mut args: Vec<u32> = ins.iter().map(|x| mp.buffer_of[x] as u32).collect();
        args.push(mp.buffer_of[&n] as u32);
        for t in tables {
            let bits: Vec<u32> = t.iter().map(|v| v.to_bits()).collect();
            let b = *table_buf.entry(bits).or_insert_with(|| {
                places.push(Place::Const { values: t });
                places.len() - 1
            });
            args.push(b as u32);
        }
        if ukernels {
            let b = *ukernel_buf.get_or_insert_with(|| {
                places.push(Place::Microkernels);
                places.len() - 1
            });
            args.push(b as u32);
        }
        steps.push(Step { kernel, args, label: format!("%{i} = {}", g.op(n).name()) });
    }
    // Keep only the data buffers some step (or the input/output) uses: a weight consumed only by
    // a compile-time concat is stored once, inside the concat.
    let mut input_buf = mp.buffer_of[&input] as u32;
    let mut output_buf = mp.buffer_of[&output] as u32;
    let places = retain_used(places, &mut steps, &mut [&mut input_buf, &mut output_buf]);
    let codegen_seconds = t0.elapsed().as_secs_f64();

    // Header with placeholder offsets as wide as any real one, to bound its size.
    let wide = 1u64 << 60;
    let mut buffers: Vec<BufferDecl> = places
        .iter()
        .map(|p| match p {
            Place::Weight { name, bytes, .. } => BufferDecl::Data { name: name.clone(), offset: wide, bytes: *bytes },
            Place::Const { values } => BufferDecl::Data { name: String::new(), offset: wide, bytes: values.len() as u64 * 4 },
            Place::WeightConcat { bytes, .. } => BufferDecl::Data { name: data_name(p), offset: wide, bytes: *bytes },
            Place::Arena { offset, bytes } => BufferDecl::Arena { offset: *offset, bytes: *bytes },
            Place::State { index } => BufferDecl::State { index: *index as u32 },
            Place::Panels { bytes, .. } => BufferDecl::Data { name: data_name(p), offset: wide, bytes: *bytes },
            Place::Microkernels => BufferDecl::Microkernels { abi: abi::ukernel::ABI_VERSION },
        })
        .collect();
    let states = state_entries(g);
    let mut header = Header {
        target: TARGET_X86_64.into(),
        cpu_features: features,
        meta: g.meta.clone(),
        vocab_size: vocab as u64,
        max_context: max_context as u64,
        max_chunk: max_chunk as u64,
        code_offset: wide,
        code_len: wide,
        data_offset: wide,
        data_len: wide,
        code_checksum: "0".repeat(16),
        data_checksum: "0".repeat(16),
        kernels,
        buffers: buffers.clone(),
        states,
        steps,
        input: input_buf,
        output: output_buf,
        arena_bytes: mp.arena_bytes,
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
            for (i, p) in places.iter().enumerate() {
                let off = match p {
                    Place::Weight { .. } | Place::WeightConcat { .. } | Place::Panels { .. } => {
                        weight_bytes += data_bytes(p);
                        push_place(&mut sink, p, weights)?
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
        arena_bytes: mp.arena_bytes,
        state_bytes: header.states.iter().map(|s| s.bytes).sum(),
        file_bytes,
        max_chunk,
        max_context,
        codegen_seconds,
        write_seconds: t1.elapsed().as_secs_f64(),
        ptx_files: Vec::new(),
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
pub(crate) fn retain_used(places: Vec<Place>, steps: &mut [Step], roots: &mut [&mut u32]) -> Vec<Place> {
    retain_used_indexed(places, steps, roots).0
}

/// [`retain_used`], also returning the original index of every kept place.
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

/// Writes a weight or compile-time concat to the data section and returns its offset. A concat
/// along its outermost non-unit extent whose parts (all but the last) are multiples of the data
/// alignment is streamed part by part, one part in memory at a time; others are built in memory.
fn push_place(w: &mut Sink, p: &Place, weights: &dyn WeightSource) -> Result<u64> {
    if matches!(p, Place::Weight { packed: true, .. } | Place::WeightConcat { packed: true, .. }) {
        let bytes = place_packed(p, weights)?;
        if bytes.len() as u64 != data_bytes(p) {
            return Err(CodegenError::Target(format!("bug: {} packed to {} bytes, planned {}", data_name(p), bytes.len(), data_bytes(p))));
        }
        return w.push(Payload::Bytes(bytes));
    }
    if let Place::Panels { rows, k, groups, bytes, .. } = p {
        let count = abi::panel::panel_count(*rows, *k, *groups);
        let panel_bytes = (abi::panel::PANEL * k * 4) as u64;
        // Pieces of whole panels are multiples of 64 bytes (PANEL * 4): laid end to end they
        // are exactly the whole buffer, at the writer's alignment.
        if *bytes >= 2 * PANEL_PIECE_BYTES && count > 1 && panel_bytes.is_multiple_of(abi::artifact::DATA_ALIGN) {
            let rows_of = PanelRows::load(p, weights)?;
            let per = (PANEL_PIECE_BYTES / panel_bytes).max(1) as usize;
            let mut start = None;
            let mut end = 0;
            for q in (0..count).step_by(per) {
                let piece = abi::panel::pack_panels_part(*rows, *k, *groups, |r| rows_of.row(r), q..(q + per).min(count));
                let len = piece.len() as u64 * 4;
                let off = w.push(Payload::F32(piece))?;
                if start.is_some() && off != end {
                    return Err(CodegenError::Target(format!("bug: panel piece written at {off}, expected {end}")));
                }
                start.get_or_insert(off);
                end = off + len;
            }
            if end - start.unwrap_or(0) != *bytes {
                return Err(CodegenError::Target(format!("bug: {} written as {} bytes, planned {bytes}", data_name(p), end - start.unwrap_or(0))));
            }
            return Ok(start.unwrap_or(0));
        }
    }
    if let Place::WeightConcat { parts, axis, .. } = p {
        let outer: usize = parts.first().map_or(1, |(_, sh)| sh[..*axis].iter().product());
        let aligned = parts.iter().rev().skip(1).all(|(q, _)| data_bytes(q).is_multiple_of(64));
        if outer == 1 && aligned && !parts.is_empty() {
            let mut start = None;
            let mut end = 0;
            for (q, _) in parts {
                let v = place_values(q, weights)?;
                let len = v.len() as u64 * 4;
                let off = w.push(Payload::F32(v))?;
                if start.is_some() && off != end {
                    return Err(CodegenError::Target(format!("bug: concat part written at {off}, expected {end}")));
                }
                start.get_or_insert(off);
                end = off + len;
            }
            return Ok(start.unwrap_or(0));
        }
    }
    w.push(Payload::F32(place_values(p, weights)?))
}
