//! The CPU backend's driver: compiles every node of a graph to a Cranelift kernel (once per distinct
//! kernel), lays out the step list against the memory plan, and streams the artifact to disk.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use ir::{Graph, Op, WeightSource};
use runtime::artifact::{ArtifactWriter, BufferDecl, Header, KernelEntry, StateEntry, Step, TARGET_X86_64};

use crate::cpu::{compile_kernel, host_isa, KernelCode, KernelCtx};
use crate::error::{CodegenError, Result};
use crate::plan::{plan, Place};

/// Options of `llmc compile` that reach the backend.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Largest number of tokens per step (prefill chunk); default `min(512, max_context)`.
    pub max_chunk: Option<usize>,
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
}

fn meta_usize(g: &Graph, key: &str) -> Option<usize> {
    g.meta.get(key).and_then(|v| v.parse().ok())
}

/// Compiles `g` for the host CPU and writes the artifact to `out`.
pub fn compile_cpu(g: &Graph, weights: &dyn WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
    let t0 = Instant::now();
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

    let mp = plan(g, max_chunk, max_context)?;
    let (isa, features) = host_isa()?;
    let kctx = KernelCtx { max_context };

    // Compile each distinct kernel once: nodes with equal op, operand types and result type (and,
    // for rope, equal frequencies) get identical code.
    let mut kernels: Vec<KernelEntry> = Vec::new();
    let mut code: Vec<u8> = Vec::new();
    let mut by_key: HashMap<String, (u32, Vec<Vec<f32>>)> = HashMap::new();
    let mut by_code: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut places = mp.places.clone();
    let mut table_buf: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut steps = Vec::new();
    for (i, &n) in mp.order.iter().enumerate() {
        let ins = g.inputs(n);
        let mut key = format!("{:?}|{}", g.op(n), g.ty(n));
        for &x in &ins {
            key.push_str(&format!("|{}", g.ty(x)));
            if let (Op::Rope { .. }, Op::Const { values }) = (g.op(n), g.op(x)) {
                key.push_str(&format!("{values:?}"));
            }
        }
        let (kernel, tables) = match by_key.get(&key) {
            Some(k) => k.clone(),
            None => {
                let Some(KernelCode { name, code: kc, tables }) = compile_kernel(&*isa, &kctx, g, n)? else {
                    continue;
                };
                let idx = match by_code.get(&kc) {
                    Some(&k) => k,
                    None => {
                        while code.len() % 64 != 0 {
                            code.push(0xcc); // int3 between kernels
                        }
                        kernels.push(KernelEntry { name, offset: code.len() as u64, len: kc.len() as u64 });
                        code.extend_from_slice(&kc);
                        let k = (kernels.len() - 1) as u32;
                        by_code.insert(kc, k);
                        k
                    }
                };
                by_key.insert(key, (idx, tables.clone()));
                (idx, tables)
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
        steps.push(Step { kernel, args, label: format!("%{i} = {}", g.op(n).name()) });
    }
    let codegen_seconds = t0.elapsed().as_secs_f64();

    // Header with placeholder offsets as wide as any real one, to bound its size.
    let wide = 1u64 << 60;
    let mut buffers: Vec<BufferDecl> = places
        .iter()
        .map(|p| match p {
            Place::Weight { name, bytes, .. } => BufferDecl::Data { name: name.clone(), offset: wide, bytes: *bytes },
            Place::Const { values } => BufferDecl::Data { name: String::new(), offset: wide, bytes: values.len() as u64 * 4 },
            Place::Arena { offset, bytes } => BufferDecl::Arena { offset: *offset, bytes: *bytes },
            Place::State { index } => BufferDecl::State { index: *index as u32 },
        })
        .collect();
    let states: Vec<StateEntry> = g
        .states
        .iter()
        .map(|s| StateEntry { name: s.name.clone(), bytes: (s.ty.static_numel().unwrap_or(0) * 4) as u64 })
        .collect();
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
        input: mp.buffer_of[&input] as u32,
        output: mp.buffer_of[&output] as u32,
        arena_bytes: mp.arena_bytes,
    };
    let reserve = runtime::artifact::header_size_bound(&header);

    // Stream: code, then each data buffer (one weight in memory at a time), then the header.
    let t1 = Instant::now();
    let mut w = ArtifactWriter::create(out, reserve, &code)?;
    let mut weight_bytes = 0;
    for (i, p) in places.iter().enumerate() {
        let bytes: Vec<u8> = match p {
            Place::Weight { name, ty, .. } => {
                let v = weights.load(name, ty)?;
                weight_bytes += v.len() as u64 * 4;
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            Place::Const { values } => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => continue,
        };
        let off = w.push_data(&bytes)?;
        if let BufferDecl::Data { offset, .. } = &mut buffers[i] {
            *offset = off;
        }
    }
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
    })
}
