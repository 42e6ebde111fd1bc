//! The x86-64 backend: one Cranelift function per graph node.
//!
//! Every kernel has the System V signature
//! `fn(bufs: *const *mut u8, s: i64, p: i64, part: i64, nparts: i64)`:
//! `bufs[0..arity]` are the node's operands in operand order, `bufs[arity]` its output and
//! `bufs[arity+1..]` the kernel's [`KernelCode::tables`], in order, then the microkernel table
//! when it calls microkernels, then its scratch when it has one. Tensors are contiguous
//! row-major at their IR shape under `S = s`, `P = p`, `T = s + p`; f32 for float tensors, i32
//! for ids and positions. `kv_concat`'s output pointer is the state buffer itself (`f32[C, ..]`):
//! the kernel writes the `S` new rows at row `p`.
//!
//! A call does only part `part` of `nparts` of the work (its share of the outermost independent
//! loop: rows, row blocks, chunks); the runtime calls every part, possibly concurrently, and the
//! union is the whole result. `nparts = 1` does everything. Most nodes are one kernel; a node
//! with [`KernelCode::phases`] (a split attention) is several, run one after another on the same
//! buffers, every part of one before any part of the next.
//!
//! The code is self-contained and position-independent: no relocations (no libcalls; exp, tanh,
//! erf are inline polynomials, see [`math`]), no stack probes, constants in the function's own
//! constant pool. Place each kernel at a [`KERNEL_ALIGN`]-byte boundary (the constant pool is
//! aligned relative to the function start). Elementwise kernels, softmax, rope and the causal mask
//! are safe to run in place (output aliasing the first operand); the others need distinct buffers.
//!
//! Layout: [`builder`] (loops, work split, typed arithmetic), [`math`], [`elementwise`],
//! [`reduce`] (reductions, softmax), [`matmul`] (matmul and the GEMM driver with epilogues),
//! [`movement`] (transpose, slice, gather, kv_concat, positions), [`rope`] (rope, causal mask),
//! [`concat`]; fused ops: [`attention`] (flash-style, online softmax), [`norm`] (rms_norm,
//! layer_norm), [`linear`] (linear, gated_linear); [`moe`] (mixture of experts, chosen experts only);
//! [`panel`] (products with a compile-time weight through the runtime's GEMM microkernel).

mod attention;
pub mod backend;
mod builder;
mod concat;
mod elementwise;
mod kv8;
mod linear;
mod math;
mod matmul;
mod moe;
pub(crate) mod quant;
mod movement;
mod norm;
pub(crate) mod panel;
mod reduce;
pub(crate) mod rope;
#[cfg(test)]
mod tests;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{AbiParam, Function, Signature, UserFuncName};
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use llmc_ir::{DType, Graph, NodeId, Op};

use crate::error::{CodegenError, Result};
use builder::Kb;

/// Machine code for one node.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCode {
    /// `<op>_<node index>`, for listings and errors.
    pub name: String,
    /// Position-independent x86-64 code, entry at offset 0; load at a [`KERNEL_ALIGN`] boundary.
    pub code: Vec<u8>,
    /// Further kernels of the same node (same buffers), each run after every part of the
    /// previous one has finished: a split attention's merge.
    pub phases: Vec<Vec<u8>>,
    /// Constant f32 arrays passed as `bufs[arity + 1 ..]`, in order.
    pub tables: Vec<Vec<f32>>,
    /// The kernel calls runtime microkernels: it takes the runtime's function table
    /// (`BufferDecl::Microkernels`, the slots of [`abi::ukernel::TABLE`]) as one more buffer,
    /// after the tables.
    pub ukernels: bool,
    /// Bytes of scratch the kernel's phases share, passed as the last buffer (0: none).
    pub scratch_bytes: u64,
}

/// What kernels need to know beyond the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelCtx {
    /// `C`: KV-cache rows, the largest value `T` takes.
    pub max_context: usize,
    /// Store eligible weights in the runtime's panel layout and run their products through the
    /// runtime's GEMM microkernel ([`panel`]), and attention through its attention block
    /// ([`attention`]): the runtime's microkernels are in use (`--no-microkernels` clears it);
    /// the memory plan must be made with the same flag.
    pub panel_weights: bool,
    /// The element type of this node's panel weight (operand 1), when it has one: the kernel
    /// calls the panel GEMM of that type (`abi::panel::PanelElem::slot`).
    pub panel_elem: abi::panel::PanelElem,
}

/// The kernel entry point's type (defined with the artifact format).
pub use abi::KernelFn;

/// Required alignment of a kernel's first byte in memory.
pub const KERNEL_ALIGN: usize = 64;

/// The host ISA with every feature the host has, and the x86 features generated code may use,
/// named as `std::is_x86_feature_detected!` names them.
pub fn host_isa() -> Result<(OwnedTargetIsa, Vec<String>)> {
    let mut flags = settings::builder();
    for (k, v) in [("opt_level", "speed"), ("enable_probestack", "false"), ("unwind_info", "false")] {
        flags.set(k, v).map_err(|e| CodegenError::Isa(format!("setting {k}={v}: {e}")))?;
    }
    let builder = cranelift_native::builder().map_err(|e| CodegenError::Isa(e.to_string()))?;
    let isa = builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| CodegenError::Isa(format!("cannot build the host ISA: {e}")))?;
    if isa.name() != "x64" {
        return Err(CodegenError::Isa(format!("host ISA is {}, only x86-64 is supported", isa.name())));
    }
    let mut features = vec!["sse2".to_string()];
    for f in isa.isa_flags() {
        if f.as_bool() != Some(true) {
            continue;
        }
        let Some(name) = f.name.strip_prefix("has_") else { continue };
        features.push(
            match name {
                "sse41" => "sse4.1",
                "sse42" => "sse4.2",
                "avx_vnni" => "avxvnni",
                other => other,
            }
            .to_string(),
        );
    }
    Ok((isa, features))
}

fn unsupported(g: &Graph, n: NodeId, msg: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported { node: format!("{} (node {})", g.op(n).name(), n.index()), msg: msg.into() }
}

/// Machine code for node `n`, or `None` for ops that need no kernel (input, weight, const,
/// reshape).
pub fn compile_kernel(isa: &dyn TargetIsa, ctx: &KernelCtx, g: &Graph, n: NodeId) -> Result<Option<KernelCode>> {
    if !g.g.contains_node(n) {
        return Err(CodegenError::Unsupported { node: format!("node {}", n.index()), msg: "not in the graph".into() });
    }
    let node = g.node(n);
    if matches!(node.op, Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape) {
        return Ok(None);
    }
    if isa.name() != "x64" {
        return Err(CodegenError::Isa(format!("the cpu backend targets x86-64, not {}", isa.name())));
    }
    // The kernels index with the node's shapes: check them against the op's type rule first.
    let ins = g.inputs(n);
    let tys: Vec<_> = ins.iter().map(|&i| g.ty(i)).collect();
    match node.op.infer_type(&tys, None) {
        Ok(t) if t == node.ty => {}
        Ok(t) => return Err(unsupported(g, n, format!("node type {} but operands give {t}", node.ty))),
        Err(e) => return Err(unsupported(g, n, e.to_string())),
    }
    for t in tys.iter().copied().chain(std::iter::once(&node.ty)) {
        if !matches!(t.dtype, DType::F32 | DType::I32) {
            return Err(unsupported(g, n, format!("tensors must be f32 or i32 in memory, got {t}")));
        }
    }
    let name = format!("{}_{}", node.op.name(), n.index());
    let mut tables = Vec::new();
    let panels = match &node.op {
        Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } | Op::GatedLinear { .. }
            if ctx.panel_weights =>
        {
            panel::panel_groups(g, ins[1])
        }
        _ => None,
    };
    let packed = match &node.op {
        Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } | Op::GatedLinear { .. } => {
            quant::packed_layout(g, ins[1])
        }
        _ => None,
    };
    let split = match &node.op {
        Op::Attention { causal, .. } => attention::split_of(g, n, *causal, ctx.max_context)?,
        _ => None,
    };
    let code = build(isa, &name, &mut |kb| {
        let kb = &mut *kb;
        match &node.op {
            Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape => unreachable!("handled above"),
            _ if packed.is_some() => quant::packed_product(kb, g, n, packed.unwrap_or_default(), ctx.panel_weights),
            _ if panels.is_some() => panel::panel_product(kb, g, n, panels.unwrap_or(1), ctx.panel_elem)?,
            Op::Concat { axis, .. } => concat::concat(kb, g, n, *axis),
            Op::Attention { scale, window, causal } => attention::attention(kb, g, n, *scale, *window, *causal, split, ctx.panel_weights)?,
            Op::RmsNorm { eps } => norm::rms_norm(kb, g, n, *eps),
            Op::LayerNorm { eps } => norm::layer_norm(kb, g, n, *eps),
            Op::Linear { transpose_b, bias, act, residual } => {
                linear::linear(kb, g, n, *transpose_b, *bias, *act, *residual)?
            }
            Op::GatedLinear { act } => linear::gated_linear(kb, g, n, *act)?,
            Op::Moe { top_k, act } => moe::moe(kb, g, n, *top_k, *act)?,
            Op::Positions => movement::positions(kb),
            Op::Gather => match quant::packed_layout(g, ins[0]) {
                Some(layout) => quant::gather_packed(kb, g, n, layout),
                None if ctx.panel_weights && panel::panel_groups(g, ins[0]).is_some() => {
                    panel::gather_panels(kb, g, n, ctx.panel_elem)
                }
                None => movement::gather(kb, g, n),
            },
            Op::Unary(u) => elementwise::unary(kb, g, n, *u),
            Op::Binary(op) => elementwise::binary(kb, g, n, *op),
            Op::Reduce(r) => reduce::reduce(kb, g, n, *r),
            Op::Softmax => reduce::softmax(kb, g, n),
            Op::Matmul { transpose_b } => matmul::matmul(kb, g, n, *transpose_b),
            Op::Transpose { perm } => movement::transpose(kb, g, n, perm),
            Op::Slice { axis, start, end } => movement::slice(kb, g, n, *axis, *start, *end),
            Op::Rope { rotary_dim } => tables = rope::rope(kb, g, n, *rotary_dim, ctx.max_context)?,
            Op::CausalMask { window } => rope::causal_mask(kb, g, n, *window),
            Op::KvConcat { state } => movement::kv_concat(kb, g, n, state)?,
        }
        Ok(())
    })?;
    let (mut code, (mut phases, mut scratch_bytes)) = (code, match split {
        Some(sp) => {
            let merge = build(isa, &format!("{name}.merge"), &mut |kb| {
                attention::attention_merge(kb, sp, ctx.panel_weights);
                Ok(())
            })?;
            (vec![merge], sp.scratch_bytes())
        }
        None => (Vec::new(), 0),
    });
    // Over int8 caches (with the microkernels): a phase before the attention widens the caches
    // once for a large step, into the scratch after the split's partials.
    if matches!(node.op, Op::Attention { .. }) {
        if let Some((off, bytes)) = attention::int8_widen_scratch(g, n, split, ctx.panel_weights)? {
            let widen = build(isa, &format!("{name}.widen"), &mut |kb| attention::int8_widen(kb, g, n, off))?;
            phases.insert(0, std::mem::replace(&mut code, widen));
            scratch_bytes = off + bytes;
        }
    }
    let attention = matches!(node.op, Op::Attention { .. });
    let ukernels = panels.is_some() || (packed.is_some() && ctx.panel_weights) || (attention && ctx.panel_weights);
    Ok(Some(KernelCode { name, code, phases, tables, ukernels, scratch_bytes }))
}

/// One kernel function: `body` emits its code into a fresh function of the kernel ABI, compiled
/// for `isa` and checked to be self-contained.
fn build(isa: &dyn TargetIsa, name: &str, body: &mut dyn FnMut(&mut Kb) -> Result<()>) -> Result<Vec<u8>> {
    let mut sig = Signature::new(CallConv::SystemV);
    for _ in 0..5 {
        sig.params.push(AbiParam::new(I64));
    }
    let mut func = Function::with_name_signature(UserFuncName::testcase(name), sig);
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let ps = b.block_params(entry).to_vec();
        let mut kb =
            Kb { b, has_fma: isa.has_native_fma(), bufs: ps[0], s: ps[1], p: ps[2], part: ps[3], nparts: ps[4] };
        body(&mut kb)?;
        kb.finish(isa.frontend_config());
    }
    let mut cctx = Context::for_function(func);
    let compiled = cctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| CodegenError::Cranelift { kernel: name.to_string(), msg: format!("{:?}", e.inner) })?;
    let relocs = compiled.buffer.relocs();
    if !relocs.is_empty() {
        return Err(CodegenError::Cranelift {
            kernel: name.to_string(),
            msg: format!("{} relocation(s) in generated code (first: {:?})", relocs.len(), relocs[0]),
        });
    }
    if compiled.buffer.alignment as usize > KERNEL_ALIGN {
        return Err(CodegenError::Cranelift {
            kernel: name.to_string(),
            msg: format!("code needs {}-byte alignment, more than {KERNEL_ALIGN}", compiled.buffer.alignment),
        });
    }
    Ok(compiled.code_buffer().to_vec())
}
