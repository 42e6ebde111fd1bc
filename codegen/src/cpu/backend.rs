//! The CPU target's hooks for the shared driver ([`crate::driver::drive`]): one Cranelift function
//! per node for the host ISA, each distinct kernel at a [`super::KERNEL_ALIGN`] boundary in the
//! code section (`int3` between kernels).

use std::collections::BTreeMap;

use abi::artifact::{KernelEntry, TARGET_X86_64};
use cranelift_codegen::isa::OwnedTargetIsa;
use ir::{Graph, NodeId};

use super::{compile_kernel, host_isa, KernelCode, KernelCtx, KERNEL_ALIGN};
use crate::driver::{Backend, GraphIo, NodeKernel, Storage, WeightsDtype};
use crate::error::{CodegenError, Result};
use crate::plan::Place;

/// Options of the CPU target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Keep every weight row-major and every product in generated code (no panel layouts, no
    /// runtime microkernel calls): for comparisons and for debugging the microkernel path
    /// (`--no-microkernels`).
    pub no_microkernels: bool,
}

/// The Cranelift x86-64 backend.
pub struct CpuBackend {
    opts: CpuOptions,
    /// The host ISA and the features generated code may use, from [`Backend::begin`].
    isa: Option<(OwnedTargetIsa, Vec<String>)>,
    max_context: usize,
}

impl CpuBackend {
    pub fn new(opts: CpuOptions) -> CpuBackend {
        CpuBackend { opts, isa: None, max_context: 0 }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    /// Weights as the checkpoint stores them: a bf16 or f16 checkpoint's product weights stay
    /// 16-bit (half the bytes a decode step reads), f32 ones f32.
    fn default_weights_dtype(&self) -> WeightsDtype {
        WeightsDtype::Keep
    }

    fn panels(&self) -> bool {
        !self.opts.no_microkernels
    }

    fn begin(&mut self, _g: &Graph, io: &GraphIo, _weights: WeightsDtype) -> Result<()> {
        self.isa = Some(host_isa()?);
        self.max_context = io.max_context;
        Ok(())
    }

    /// 16-bit weights are the panel weights (the right-hand sides of products, read by the
    /// 16-bit panel GEMMs); every other weight (norms, biases, embeddings that are gathered
    /// from, products in generated code) stays f32.
    fn weight_storage(&self, p: &Place, wanted: Storage) -> Storage {
        match (p, wanted) {
            (Place::Weight { .. } | Place::WeightConcat { .. }, Storage::F16 | Storage::BF16) => Storage::F32,
            _ => wanted,
        }
    }

    fn check_storage(&self, p: &Place, s: Storage) -> Result<()> {
        match s {
            Storage::F16 | Storage::BF16 => Err(CodegenError::Target(format!(
                "bug: weight `{}` stored as {} outside a panel layout on the CPU target",
                crate::driver::data_name(p),
                s.name()
            ))),
            _ => Ok(()),
        }
    }

    fn kernel(&mut self, g: &Graph, n: NodeId, operands: &[Storage]) -> Result<Option<NodeKernel>> {
        let Some((isa, _)) = &self.isa else {
            return Err(CodegenError::Target("bug: CpuBackend::kernel before begin".into()));
        };
        // The panel weight's element type: a product's operand 1, a gather's table.
        let panel_operand = if matches!(g.op(n), ir::Op::Gather) { 0 } else { 1 };
        let panel_elem = match operands.get(panel_operand) {
            Some(Storage::Panels { elem, .. }) => *elem,
            _ => Default::default(),
        };
        let ctx = KernelCtx { max_context: self.max_context, panel_weights: self.panels(), panel_elem };
        Ok(compile_kernel(&**isa, &ctx, g, n)?.map(|KernelCode { name, code, phases, tables, ukernels, scratch_bytes }| {
            NodeKernel { name, source: code, phases, tables, microkernels: ukernels, scratch_bytes, launch: None }
        }))
    }

    fn emit_code(&mut self, _index: usize, k: &NodeKernel, code: &mut Vec<u8>) -> Result<KernelEntry> {
        while code.len() % KERNEL_ALIGN != 0 {
            code.push(0xcc); // int3 between kernels
        }
        let entry = KernelEntry { name: k.name.clone(), offset: code.len() as u64, len: k.source.len() as u64, launch: None, variants: Vec::new() };
        code.extend_from_slice(&k.source);
        Ok(entry)
    }

    fn header(&self, _meta: &mut BTreeMap<String, String>) -> (String, Vec<String>) {
        (TARGET_X86_64.into(), self.isa.as_ref().map(|(_, f)| f.clone()).unwrap_or_default())
    }
}
