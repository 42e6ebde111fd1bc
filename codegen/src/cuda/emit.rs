//! The CUDA backend's driver: one MLIR kernel per node (once per distinct kernel), lowered to PTX
//! for every architecture in [`ARCHS`], laid out against the same memory plan as the CPU target,
//! and written as an `nvptx-cuda` artifact (PTX in the code section, weights in the data
//! section in the GPU element type).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use ir::{DType, Graph, Layout, Op, WeightSource};
use abi::artifact::{ArtifactWriter, BlobEntry, BufferDecl, CodeVariant, Header, KernelEntry, Step, TARGET_CUDA};

use super::kernels::{kernel, GpuKernel};
use super::lower::{Lowerer, ARCHS};
use super::text::Elem;
use crate::emit::{data_bytes, data_name, f32_bytes, graph_io, state_entries, place_packed, place_values, retain_used_indexed, CompileOptions, CompileReport, GraphIo};
use crate::error::{CodegenError, Result};
use crate::plan::{plan, Place};

/// The element type of float weights on the GPU, from `--gpu-dtype` (default f16).
pub fn gpu_dtype(name: Option<&str>) -> Result<Elem> {
    match name.unwrap_or("f16") {
        "f16" => Ok(Elem::F16),
        "bf16" => Ok(Elem::BF16),
        "f32" => Ok(Elem::F32),
        other => Err(CodegenError::Target(format!("--gpu-dtype `{other}`: expected f16, bf16 or f32"))),
    }
}

/// A kernel for the artifact: its PTX per architecture and launch shape.
struct Compiled {
    entry: KernelEntry,
    tables: Vec<Vec<f32>>,
    scratch_bytes: u64,
}

fn layout_of(p: &Place) -> Option<Layout> {
    match p {
        Place::Weight { layout, .. } => Some(*layout),
        Place::WeightConcat { parts, .. } => parts.first().and_then(|(q, _)| layout_of(q)),
        _ => None,
    }
}

/// How a buffer is stored on the GPU.
fn place_elem(p: &Place, value_dtype: DType, dtype: Elem) -> Result<Elem> {
    Ok(match p {
        Place::Weight { packed: true, .. } | Place::WeightConcat { packed: true, .. } => match layout_of(p) {
            Some(l @ (Layout::Int8 | Layout::Int4 { .. } | Layout::W8A8 | Layout::W4A8 { .. } | Layout::Sparse24 { .. })) => Elem::Packed(l),
            other => {
                return Err(CodegenError::Unsupported {
                    node: data_name(p),
                    msg: format!("the CUDA backend cannot store weight layout {other:?} packed"),
                })
            }
        },
        Place::Weight { .. } | Place::WeightConcat { .. } => dtype,
        Place::Const { .. } => Elem::F32,
        Place::Panels { .. } | Place::Microkernels => {
            return Err(CodegenError::Unsupported {
                node: data_name(p),
                msg: "CPU panel layouts and microkernels have no CUDA form".into(),
            })
        }
        Place::Arena { .. } | Place::State { .. } => {
            if value_dtype == DType::I32 {
                Elem::I32
            } else {
                Elem::F32
            }
        }
    })
}

fn elem_bytes(e: Elem) -> u64 {
    match e {
        Elem::F16 | Elem::BF16 => 2,
        _ => 4,
    }
}

/// `name` with characters that are awkward in file names replaced.
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// Compiles `g` to PTX and writes a CUDA artifact to `out`.
pub fn compile_cuda(g: &Graph, weights: &dyn WeightSource, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
    let t0 = Instant::now();
    let GraphIo { max_context, max_chunk, input, output, vocab } = graph_io(g, opts)?;
    let dtype = gpu_dtype(opts.gpu_dtype.as_deref())?;
    if let Some(dir) = &opts.ptx_dir {
        std::fs::create_dir_all(dir).map_err(|e| CodegenError::Target(format!("--emit ptx {}: {e}", dir.display())))?;
    }

    let mp = plan(g, max_chunk, max_context, false)?;
    let lowerer = Lowerer::new();
    let mut places = mp.places.clone();
    let mut elems: Vec<Elem> = vec![Elem::F32; places.len()];
    for (&n, &b) in &mp.buffer_of {
        elems[b] = place_elem(&places[b], g.ty(n).dtype, dtype)?;
    }

    let mut kernels: Vec<Compiled> = Vec::new();
    let mut code: Vec<u8> = Vec::new();
    let mut by_key: HashMap<String, u32> = HashMap::new();
    let mut by_text: HashMap<String, u32> = HashMap::new();
    let mut table_buf: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut steps = Vec::new();
    let mut needs_scratch = Vec::new();
    let mut ptx_files = Vec::new();
    for (i, &n) in mp.order.iter().enumerate() {
        if matches!(mp.places[mp.buffer_of[&n]], Place::WeightConcat { .. }) {
            continue; // computed at compile time
        }
        let ins = g.inputs(n);
        let in_elems: Vec<Elem> = ins.iter().map(|x| elems[mp.buffer_of[x]]).collect();
        let mut key = format!("{:?}|{}", g.op(n), g.ty(n));
        if ir::interp::acts_quantized(g, n) {
            key.push_str("|acts int8"); // a different kernel from the same product on f32 lhs
        }
        for (&x, e) in ins.iter().zip(&in_elems) {
            key.push_str(&format!("|{} {}", g.ty(x), e.name()));
            if let (Op::Rope { .. }, Op::Const { values }) = (g.op(n), g.op(x)) {
                key.push_str(&format!("{values:?}"));
            }
        }
        let k = match by_key.get(&key) {
            Some(&k) => k,
            None => {
                let Some(GpuKernel { name, mlir, launch, scratch_bytes, tables }) = kernel(g, n, &in_elems, max_context, max_chunk)? else {
                    continue;
                };
                let k = match by_text.get(&mlir) {
                    Some(&k) => k,
                    None => {
                        let mut variants = Vec::new();
                        for arch in ARCHS {
                            let ptx = lowerer.ptx(&name, &mlir, arch)?;
                            if let Some(dir) = &opts.ptx_dir {
                                let f = dir.join(format!("{:03}_{}.{arch}.ptx", kernels.len(), file_stem(&name)));
                                std::fs::write(&f, &ptx).map_err(|e| CodegenError::Target(format!("{}: {e}", f.display())))?;
                                ptx_files.push(f);
                            }
                            variants.push(CodeVariant { arch: arch.to_string(), offset: code.len() as u64, len: ptx.len() as u64 });
                            code.extend_from_slice(ptx.as_bytes());
                            code.push(b'\n');
                        }
                        if let Some(dir) = &opts.ptx_dir {
                            let f = dir.join(format!("{:03}_{}.mlir", kernels.len(), file_stem(&name)));
                            std::fs::write(&f, &mlir).map_err(|e| CodegenError::Target(format!("{}: {e}", f.display())))?;
                        }
                        let entry = KernelEntry {
                            name: name.clone(),
                            offset: variants[0].offset,
                            len: variants[0].len,
                            launch: Some(launch),
                            variants,
                        };
                        kernels.push(Compiled { entry, tables, scratch_bytes });
                        let k = (kernels.len() - 1) as u32;
                        by_text.insert(mlir, k);
                        k
                    }
                };
                by_key.insert(key, k);
                k
            }
        };
        let c = &kernels[k as usize];
        let mut args: Vec<u32> = ins.iter().map(|x| mp.buffer_of[x] as u32).collect();
        args.push(mp.buffer_of[&n] as u32);
        for t in c.tables.clone() {
            let bits: Vec<u32> = t.iter().map(|v| v.to_bits()).collect();
            let b = *table_buf.entry(bits).or_insert_with(|| {
                places.push(Place::Const { values: t });
                elems.push(Elem::F32);
                places.len() - 1
            });
            args.push(b as u32);
        }
        if c.scratch_bytes > 0 {
            needs_scratch.push((steps.len(), c.scratch_bytes));
        }
        steps.push(Step { kernel: k, args, label: format!("%{i} = {}", g.op(n).name()) });
    }
    // One scratch slot at the end of the arena, shared by every kernel that needs one (they
    // run one after another).
    let mut arena_bytes = mp.arena_bytes;
    if let Some(max) = needs_scratch.iter().map(|&(_, b)| b).max() {
        places.push(Place::Arena { offset: arena_bytes, bytes: max });
        elems.push(Elem::F32);
        arena_bytes += max.div_ceil(64) * 64;
        let b = (places.len() - 1) as u32;
        for (s, _) in needs_scratch {
            steps[s].args.push(b);
        }
    }
    let mut input_buf = mp.buffer_of[&input] as u32;
    let mut output_buf = mp.buffer_of[&output] as u32;
    let (kept, origin) = retain_used_indexed(places, &mut steps, &mut [&mut input_buf, &mut output_buf]);
    let kept_elems: Vec<Elem> = origin.iter().map(|&i| elems[i]).collect();
    let places = kept;
    let codegen_seconds = t0.elapsed().as_secs_f64();

    let wide = 1u64 << 60;
    let stored_bytes = |p: &Place, e: Elem| -> u64 {
        match (p, e) {
            (_, Elem::Packed(_)) => data_bytes(p),
            (Place::Weight { .. } | Place::WeightConcat { .. }, e) => data_bytes(p) / 4 * elem_bytes(e),
            _ => data_bytes(p),
        }
    };
    let mut buffers: Vec<BufferDecl> = places
        .iter()
        .zip(&kept_elems)
        .map(|(p, &e)| match p {
            Place::Weight { name, .. } => BufferDecl::Data { name: name.clone(), offset: wide, bytes: stored_bytes(p, e) },
            Place::Const { values } => BufferDecl::Data { name: String::new(), offset: wide, bytes: values.len() as u64 * 4 },
            Place::WeightConcat { .. } => BufferDecl::Data { name: data_name(p), offset: wide, bytes: stored_bytes(p, e) },
            Place::Arena { offset, bytes } => BufferDecl::Arena { offset: *offset, bytes: *bytes },
            Place::State { index } => BufferDecl::State { index: *index as u32 },
            // `plan(.., panels = false)` makes neither, and `place_elem` refuses them.
            Place::Panels { .. } | Place::Microkernels => BufferDecl::Arena { offset: 0, bytes: 0 },
        })
        .collect();
    let states = state_entries(g);
    let mut meta = g.meta.clone();
    meta.insert("gpu_dtype".into(), dtype.name());
    let mut header = Header {
        target: TARGET_CUDA.into(),
        cpu_features: Vec::new(),
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
        kernels: kernels.iter().map(|c| c.entry.clone()).collect(),
        buffers: buffers.clone(),
        states,
        steps,
        input: input_buf,
        output: output_buf,
        arena_bytes,
        blobs: opts.blobs.iter().map(|(n, b)| BlobEntry { name: n.clone(), offset: wide, bytes: b.len() as u64 }).collect(),
    };
    let reserve = abi::artifact::header_size_bound(&header);

    let t1 = Instant::now();
    // Read the weights from disk ahead of the loads below, in their order (advice).
    let _prefetch = weights.prefetch(&crate::emit::weight_names(&places));
    let mut w = ArtifactWriter::create(out, reserve, &code)?;
    let mut weight_bytes = 0;
    for (i, (p, &e)) in places.iter().zip(&kept_elems).enumerate() {
        let off = match (p, e) {
            (Place::Weight { .. } | Place::WeightConcat { .. }, Elem::Packed(_)) => {
                let bytes = place_packed(p, weights)?;
                weight_bytes += bytes.len() as u64;
                w.push_data(&bytes)?
            }
            (Place::Weight { .. } | Place::WeightConcat { .. }, e) => {
                let v = place_values(p, weights)?;
                let bytes = encode(&v, e);
                weight_bytes += bytes.len() as u64;
                w.push_data(&bytes)?
            }
            (Place::Const { values }, _) => w.push_data(f32_bytes(values))?,
            _ => continue,
        };
        if let BufferDecl::Data { offset, .. } = &mut buffers[i] {
            *offset = off;
        }
    }
    header.buffers = buffers;
    for ((_, bytes), entry) in opts.blobs.iter().zip(&mut header.blobs) {
        entry.offset = w.push_data(bytes)?;
    }
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
        ptx_files,
    })
}

/// Little-endian bytes of `v` as `e` (f32, f16 or bf16, rounded to nearest even).
fn encode(v: &[f32], e: Elem) -> Vec<u8> {
    match e {
        Elem::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        Elem::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        _ => f32_bytes(v).to_vec(),
    }
}
