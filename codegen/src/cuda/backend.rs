//! The CUDA target's hooks for the shared driver ([`crate::driver::drive`]): one MLIR kernel per
//! node, lowered to PTX for every architecture in [`ARCHS`] (one code variant each, in the code
//! section one after another), with float weights on the GPU in the `--weights-dtype` element
//! type (f16 by default) and quantized weights packed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use abi::artifact::{CodeVariant, KernelEntry, TARGET_CUDA};
use ir::{Graph, Layout, NodeId};

use super::kernels::{kernel, GpuKernel};
use super::lower::{Lowerer, ARCHS};
use super::text::Elem;
use crate::driver::{data_name, Backend, GraphIo, NodeKernel, Storage, WeightsDtype};
use crate::error::{CodegenError, Result};
use crate::CudaOptions;
use crate::plan::Place;

/// The CUDA backend: PTX for sm_80 and sm_90 through MLIR.
pub struct CudaBackend {
    opts: CudaOptions,
    lowerer: Option<Lowerer>,
    max_context: usize,
    max_chunk: usize,
    /// `--weights-dtype` (the header's `gpu_dtype` meta), from [`Backend::begin`].
    dtype: String,
    written: Vec<PathBuf>,
}

impl CudaBackend {
    pub fn new(opts: CudaOptions) -> CudaBackend {
        CudaBackend { opts, lowerer: None, max_context: 0, max_chunk: 0, dtype: String::new(), written: Vec::new() }
    }

    fn write(&mut self, name: String, text: &str) -> Result<()> {
        if let Some(dir) = &self.opts.ptx_dir {
            let f = dir.join(name);
            std::fs::write(&f, text).map_err(|e| CodegenError::Target(format!("{}: {e}", f.display())))?;
            if f.extension().is_some_and(|e| e == "ptx") {
                self.written.push(f);
            }
        }
        Ok(())
    }
}

/// How a buffer stored as `s` is read on the device.
fn elem(s: Storage) -> Result<Elem> {
    Ok(match s {
        Storage::F32 => Elem::F32,
        Storage::F16 => Elem::F16,
        Storage::BF16 => Elem::BF16,
        Storage::I32 => Elem::I32,
        Storage::Packed(l) => Elem::Packed(l),
        Storage::Panels { .. } => return Err(CodegenError::Target("bug: a CPU panel layout reached the CUDA backend".into())),
    })
}

/// `name` with characters that are awkward in file names replaced.
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn default_weights_dtype(&self) -> WeightsDtype {
        WeightsDtype::F16
    }

    fn panels(&self) -> bool {
        false
    }

    fn begin(&mut self, _g: &Graph, io: &GraphIo, weights: WeightsDtype) -> Result<()> {
        if let Some(dir) = &self.opts.ptx_dir {
            std::fs::create_dir_all(dir).map_err(|e| CodegenError::Target(format!("--emit ptx {}: {e}", dir.display())))?;
        }
        self.lowerer = Some(Lowerer::new());
        self.max_context = io.max_context;
        self.max_chunk = io.max_chunk;
        self.dtype = weights.name().into();
        Ok(())
    }

    fn check_storage(&self, p: &Place, s: Storage) -> Result<()> {
        match s {
            Storage::Packed(Layout::Int8 | Layout::Int4 { .. } | Layout::W8A8 | Layout::W4A8 { .. } | Layout::Sparse24 { .. }) => Ok(()),
            Storage::Packed(l) => Err(CodegenError::Unsupported {
                node: data_name(p),
                msg: format!("the CUDA backend cannot store weight layout {l:?} packed"),
            }),
            Storage::Panels { .. } => Err(CodegenError::Unsupported {
                node: data_name(p),
                msg: "CPU panel layouts and microkernels have no CUDA form".into(),
            }),
            _ => Ok(()),
        }
    }

    fn kernel(&mut self, g: &Graph, n: NodeId, operands: &[Storage]) -> Result<Option<NodeKernel>> {
        let elems = operands.iter().map(|&s| elem(s)).collect::<Result<Vec<_>>>()?;
        Ok(kernel(g, n, &elems, self.max_context, self.max_chunk)?.map(|GpuKernel { name, mlir, launch, scratch_bytes, tables }| {
            NodeKernel { name, source: mlir.into_bytes(), phases: Vec::new(), tables, microkernels: false, scratch_bytes, launch: Some(launch) }
        }))
    }

    fn emit_code(&mut self, index: usize, k: &NodeKernel, code: &mut Vec<u8>) -> Result<KernelEntry> {
        let mlir = std::str::from_utf8(&k.source).map_err(|_| CodegenError::Target(format!("bug: kernel {} is not MLIR text", k.name)))?;
        let Some(lowerer) = &self.lowerer else {
            return Err(CodegenError::Target("bug: CudaBackend::emit_code before begin".into()));
        };
        let mut variants = Vec::new();
        let mut ptxs = Vec::new();
        for arch in ARCHS {
            let ptx = lowerer.ptx(&k.name, mlir, arch)?;
            variants.push(CodeVariant { arch: arch.to_string(), offset: code.len() as u64, len: ptx.len() as u64 });
            code.extend_from_slice(ptx.as_bytes());
            code.push(b'\n');
            ptxs.push((arch, ptx));
        }
        for (arch, ptx) in ptxs {
            self.write(format!("{index:03}_{}.{arch}.ptx", file_stem(&k.name)), &ptx)?;
        }
        self.write(format!("{index:03}_{}.mlir", file_stem(&k.name)), mlir)?;
        let launch = k.launch.clone().ok_or_else(|| CodegenError::Target(format!("bug: GPU kernel {} has no launch shape", k.name)))?;
        Ok(KernelEntry { name: k.name.clone(), offset: variants[0].offset, len: variants[0].len, launch: Some(launch), variants })
    }

    fn header(&self, meta: &mut BTreeMap<String, String>) -> (String, Vec<String>) {
        meta.insert("gpu_dtype".into(), self.dtype.clone());
        (TARGET_CUDA.into(), Vec::new())
    }

    fn written_files(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.written)
    }
}
