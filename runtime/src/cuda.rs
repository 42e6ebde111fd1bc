//! Runs `nvptx-cuda` artifacts on an NVIDIA GPU through the CUDA driver API (cudarc; `libcuda`
//! is loaded at run time, so building needs no CUDA installation).
//!
//! Loading ([`DeviceModel::load`]) picks each kernel's PTX for the device (the newest variant not
//! newer than the GPU: `sm_90` on H100/H200, `sm_80` on A100 and other sm_8x parts), JIT-loads it
//! as a module, and uploads the data section (weights, constants) once. A [`DeviceExecutor`] owns
//! the activation arena in device memory and a [`DeviceCache`] one sequence's KV-cache states;
//! a step is one kernel launch per step of the entry point with the buffers' device addresses
//! (the state arguments pointed at the sequence's cache), then `s` and `p`, on one stream; the
//! grid comes from the kernel's [`Launch`](crate::artifact::Launch). Token ids are copied in
//! before the first step and the requested logit rows out after the last.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::artifact::{Artifact, BufferDecl, Launch, StateLayout};
use crate::error::{Result, RuntimeError};

fn driver_err(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Other(format!("CUDA: {what}: {e}"))
}

/// Why this process cannot run CUDA artifacts, or `None` when a driver and a device are present.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver: libcuda.so could not be loaded (is an NVIDIA driver installed?)".into());
    }
    match cudarc::driver::result::init().and_then(|_| cudarc::driver::result::device::get_count()) {
        Ok(0) => Some("the CUDA driver reports no GPU".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed to initialize: {e}")),
    }
}

/// A loaded artifact on the GPU: its kernels and its data section.
pub struct DeviceModel {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    launches: Vec<Launch>,
    data: CudaSlice<u8>,
    /// The device's name and the PTX architecture chosen for it.
    pub device: String,
    pub arch: String,
}

// SAFETY: cudarc's context, stream, module and memory handles may be used from any thread; the
// model is immutable after loading.
unsafe impl Send for DeviceModel {}
unsafe impl Sync for DeviceModel {}

impl DeviceModel {
    /// Loads `artifact`'s kernels and data on GPU 0 (`LLMC_CUDA_DEVICE` picks another).
    pub fn load(artifact: &Artifact) -> Result<DeviceModel> {
        let path = artifact.path.display().to_string();
        if let Some(why) = unavailable_reason() {
            return Err(RuntimeError::Gpu { path: artifact.path.clone(), msg: why });
        }
        if artifact.header.buffers.iter().any(|b| matches!(b, BufferDecl::Microkernels { .. })) {
            return Err(RuntimeError::Other(format!("{path}: a CUDA artifact cannot use the CPU microkernel table")));
        }
        let ordinal = std::env::var("LLMC_CUDA_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&format!("opening GPU {ordinal}"), e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_err("compute capability", e))?;
        let device = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = (major * 10 + minor) as u32;
        let stream = ctx.default_stream();
        let h = &artifact.header;
        let code = artifact.code();
        let mut functions = Vec::with_capacity(h.kernels.len());
        let mut launches = Vec::with_capacity(h.kernels.len());
        let mut arch = String::new();
        for k in &h.kernels {
            let arch_num = |a: &str| a.strip_prefix("sm_").and_then(|n| n.parse::<u32>().ok()).unwrap_or(u32::MAX);
            let v = k
                .variants
                .iter()
                .filter(|v| arch_num(&v.arch) <= cc)
                .max_by_key(|v| arch_num(&v.arch))
                .ok_or_else(|| {
                    RuntimeError::Other(format!(
                        "{path}: kernel `{}` has PTX for {} only; {device} is sm_{cc}",
                        k.name,
                        k.variants.iter().map(|v| v.arch.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })?;
            arch = v.arch.clone();
            let ptx = std::str::from_utf8(&code[v.offset as usize..(v.offset + v.len) as usize])
                .map_err(|_| RuntimeError::Corrupt { path: artifact.path.clone(), msg: format!("kernel `{}`: PTX is not UTF-8", k.name) })?;
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| driver_err(&format!("loading kernel `{}`", k.name), e))?;
            functions.push(module.load_function(&k.name).map_err(|e| driver_err(&format!("kernel `{}`", k.name), e))?);
            launches.push(k.launch.ok_or_else(|| RuntimeError::Corrupt { path: artifact.path.clone(), msg: format!("kernel `{}` has no launch shape", k.name) })?);
        }
        let data = stream.clone_htod(artifact.data()).map_err(|e| driver_err("uploading weights", e))?;
        Ok(DeviceModel { ctx, stream, functions, launches, data, device, arch })
    }
}

/// One sequence's KV cache in device memory: a zeroed buffer per state of the artifact.
pub struct DeviceCache {
    states: Vec<CudaSlice<u8>>,
}

impl DeviceCache {
    pub fn new(dm: &DeviceModel, artifact: &Artifact) -> Result<DeviceCache> {
        let states = artifact
            .header
            .states
            .iter()
            .map(|s| match s.layout {
                // One buffer of every row, bound whole to the kernels' state arguments.
                StateLayout::Contiguous => {
                    dm.stream.alloc_zeros::<u8>((s.bytes as usize).max(64)).map_err(|e| driver_err("allocating the KV cache", e))
                }
                // The compiler writes no CUDA kernel for it.
                other => Err(RuntimeError::Gpu {
                    path: artifact.path.clone(),
                    msg: format!("state `{}`: the CUDA kernels have no `{}` KV-cache layout", s.name, other.name()),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceCache { states })
    }

    /// Zeroes the buffers.
    pub fn reset(&mut self, dm: &DeviceModel) -> Result<()> {
        for s in &mut self.states {
            dm.stream.memset_zeros(s).map_err(|e| driver_err("clearing the KV cache", e))?;
        }
        Ok(())
    }
}

/// One entry point's launches: per step its kernel and argument addresses.
struct DeviceEntry {
    steps: Vec<(u32, Vec<u64>)>,
    /// `(step, argument, state)` for every argument that is a state buffer, re-pointed at the
    /// cache of the sequence that runs.
    state_args: Vec<(usize, usize, usize)>,
    input_offset: usize,
    output_offset: usize,
}

/// The device side of an [`Executor`](crate::step::Executor): the activation arena and every
/// entry point's precomputed launch arguments. Caches are separate ([`DeviceCache`]).
pub struct DeviceExecutor {
    arena: CudaSlice<u8>,
    entries: Vec<DeviceEntry>,
}

impl DeviceExecutor {
    pub fn new(dm: &DeviceModel, artifact: &Artifact) -> Result<DeviceExecutor> {
        let h = &artifact.header;
        let arena = dm.stream.alloc_zeros::<u8>((h.arena_bytes as usize).max(64)).map_err(|e| driver_err("allocating the arena", e))?;
        let entries = {
            let (data_base, _g1) = dm.data.device_ptr(&dm.stream);
            let (arena_base, _g2) = arena.device_ptr(&dm.stream);
            let addr = |b: u32| -> u64 {
                match &h.buffers[b as usize] {
                    BufferDecl::Data { offset, .. } => data_base + offset,
                    BufferDecl::Arena { offset, .. } => arena_base + offset,
                    BufferDecl::State { .. } => 0,        // bound to a cache before each run
                    BufferDecl::Microkernels { .. } => 0, // refused in `DeviceModel::load`
                }
            };
            let off = |b: u32| match &h.buffers[b as usize] {
                BufferDecl::Arena { offset, .. } => *offset as usize,
                _ => 0, // validated at load: input and output are arena buffers
            };
            h.entries
                .iter()
                .map(|e| {
                    let steps: Vec<(u32, Vec<u64>)> =
                        e.step_indices().map(|i| (h.steps[i].kernel, h.steps[i].args.iter().map(|&a| addr(a)).collect())).collect();
                    let mut state_args = Vec::new();
                    for (c, i) in e.step_indices().enumerate() {
                        for (a, &b) in h.steps[i].args.iter().enumerate() {
                            if let BufferDecl::State { index } = h.buffers[b as usize] {
                                state_args.push((c, a, index as usize));
                            }
                        }
                    }
                    DeviceEntry { steps, state_args, input_offset: off(e.input), output_offset: off(e.output) }
                })
                .collect()
        };
        Ok(DeviceExecutor { arena, entries })
    }

    /// Runs entry point `entry`'s steps for `ids` (at most `max_chunk`) after `past` tokens
    /// cached in `cache`, and returns the logit rows `rows` (indices into `ids`) in that order,
    /// `[rows.len(), vocab]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        dm: &DeviceModel,
        entry: usize,
        cache: &DeviceCache,
        ids: &[u32],
        past: usize,
        vocab: usize,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        let e = &mut self.entries[entry];
        let state_base: Vec<u64> = cache.states.iter().map(|s| s.device_ptr(&dm.stream).0).collect();
        for &(c, a, st) in &e.state_args {
            e.steps[c].1[a] = state_base[st];
        }
        let s = ids.len();
        let ids_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let bytes: Vec<u8> = ids_i32.iter().flat_map(|v| v.to_le_bytes()).collect();
        {
            let mut dst = self.arena.slice_mut(e.input_offset..e.input_offset + bytes.len());
            dm.stream.memcpy_htod(&bytes, &mut dst).map_err(|e| driver_err("copying token ids", e))?;
        }
        let (si, pi) = (s as i64, past as i64);
        for (kernel, args) in &e.steps {
            let l = dm.launches[*kernel as usize];
            let grid = l.grid(s as u64, past as u64);
            if grid == 0 {
                continue;
            }
            let grid = u32::try_from(grid).map_err(|_| RuntimeError::Other(format!("CUDA: grid of {grid} blocks is too large")))?;
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (l.block, 1, 1), shared_mem_bytes: 0 };
            let f = &dm.functions[*kernel as usize];
            let mut b = dm.stream.launch_builder(f);
            for a in args {
                b.arg(a);
            }
            b.arg(&si);
            b.arg(&pi);
            // SAFETY: the kernel was generated for exactly this argument list (its buffers' device
            // addresses, then s and p); every buffer is sized for the largest step, the state
            // arguments point at `cache`'s buffers.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err("kernel launch", e))?;
        }
        // Only the rows asked for come back.
        let row = vocab * 4;
        let mut out = vec![0u8; rows.len() * row];
        for (k, &r) in rows.iter().enumerate() {
            let at = e.output_offset + r * row;
            let src = self.arena.slice(at..at + row);
            dm.stream.memcpy_dtoh(&src, &mut out[k * row..(k + 1) * row]).map_err(|e| driver_err("copying logits", e))?;
        }
        dm.stream.synchronize().map_err(|e| driver_err("running the steps", e))?;
        let _ = &dm.ctx;
        Ok(out.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// The GPU's peak memory bandwidth in bytes/s from the driver's memory clock and bus width
/// (`2 x clock x width / 8`), for the roofline `llmc bench` prints.
pub fn peak_bandwidth(dm: &DeviceModel) -> Option<f64> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let clock_khz = dm.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).ok()? as f64;
    let bus_bits = dm.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).ok()? as f64;
    Some(2.0 * clock_khz * 1e3 * bus_bits / 8.0)
}
