//! Kernel tests: every op's kernel runs in executable memory on random data and is compared with
//! the reference interpreter, with `nparts` = 1, 3 and 7 (the split results must be bit-identical
//! to the unsplit one), a guard zone after the output (no out-of-bounds writes) and the inputs
//! checked unchanged. Every case runs on two ISAs: the host's (AVX/FMA/...) and baseline SSE2
//! (no FMA, no SSE4.1), which also proves neither needs a libcall.
//!
//! Operands with symbolic shapes come from the graph itself (a gather of random rows by the input
//! ids, reshapes, transposes, `kv_concat`), so the interpreter produces them; multi-step cases run
//! earlier steps first so that `P > 0` in the measured step.

use std::collections::HashMap;
use std::sync::Arc;

use cranelift_codegen::isa::{OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use llmc_ir::{BinaryOp, DType, Dim, Graph, Interpreter, KvLayout, NodeId, Op, ReduceOp, StateDecl, StateKind, TensorType, UnaryOp};

use super::*;
use llmc_abi::panel::PanelElem;

const VOCAB: usize = 50;
const CTX: usize = 64;
const SENTINEL: u32 = 0x7FC0_DEAD;
const GUARD: usize = 67;

// ---- random numbers ----

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

// ---- ISAs and executable kernels ----

fn isas() -> Vec<(&'static str, OwnedTargetIsa)> {
    let (host, _) = host_isa().expect("host isa");
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").unwrap();
    let base = cranelift_native::builder_with_options(false).unwrap().finish(settings::Flags::new(flags)).unwrap();
    vec![("host", host), ("sse2", base)]
}

/// A kernel in executable memory: its phases (each run for every part before the next) and
/// the scratch they share, filled with NaN before every run (a phase must not read what it did
/// not write).
struct Exec {
    maps: Vec<memmap2::Mmap>,
    tables: Vec<Vec<f32>>,
    ukernels: bool,
    scratch: std::cell::RefCell<Vec<u32>>,
}

impl Exec {
    fn new(k: &KernelCode) -> Exec {
        let maps = std::iter::once(&k.code)
            .chain(&k.phases)
            .map(|code| {
                let mut m = memmap2::MmapMut::map_anon(code.len().max(1)).expect("mmap");
                m[..code.len()].copy_from_slice(code);
                let map = m.make_exec().expect("make_exec");
                assert_eq!(map.as_ptr() as usize % KERNEL_ALIGN, 0);
                map
            })
            .collect();
        let scratch = vec![f32::NAN.to_bits(); (k.scratch_bytes as usize).div_ceil(4)];
        Exec { maps, tables: k.tables.clone(), ukernels: k.ukernels, scratch: scratch.into() }
    }
    fn run(&self, ins: &mut [Vec<u32>], out: &mut [u32], s: usize, p: usize, nparts: usize) {
        self.run_parts(ins, out, s, p, 0..nparts, nparts);
    }
    /// The argument array for `ins` and `out`.
    fn bufs(&self, ins: &mut [Vec<u32>], out: &mut [u32]) -> Vec<*mut u8> {
        let mut bufs: Vec<*mut u8> = ins.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        bufs.push(out.as_mut_ptr() as *mut u8);
        for t in &self.tables {
            bufs.push(t.as_ptr() as *mut u8);
        }
        if self.ukernels {
            bufs.push(llmc_runtime::ukernel::table().as_ptr() as *mut u8);
        }
        if !self.scratch.borrow().is_empty() {
            let mut sc = self.scratch.borrow_mut();
            sc.fill(f32::NAN.to_bits());
            bufs.push(sc.as_mut_ptr() as *mut u8);
        }
        bufs
    }
    /// Parts `parts` of every phase, phase by phase.
    fn run_parts(
        &self,
        ins: &mut [Vec<u32>],
        out: &mut [u32],
        s: usize,
        p: usize,
        parts: std::ops::Range<usize>,
        nparts: usize,
    ) {
        let bufs = self.bufs(ins, out);
        for f in self.entries() {
            for part in parts.clone() {
                unsafe { f(bufs.as_ptr(), s as i64, p as i64, part as i64, nparts as i64) };
            }
        }
    }
    fn entries(&self) -> Vec<KernelFn> {
        self.maps.iter().map(|m| unsafe { std::mem::transmute::<*const u8, KernelFn>(m.as_ptr()) }).collect()
    }
}

// ---- comparison ----

#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f64,
    rtol: f64,
    /// Relative errors are reported for expected values at least this large.
    floor: f64,
}

const EXACT: Tol = Tol { atol: 0.0, rtol: 0.0, floor: 1e-30 };

const fn tol(atol: f64, rtol: f64) -> Tol {
    Tol { atol, rtol, floor: 1e-30 }
}

/// Worst errors seen: absolute, and relative over expected values with `|e| >= floor`.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    max_abs: f64,
    max_rel: f64,
    n: usize,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.max_abs = self.max_abs.max(o.max_abs);
        self.max_rel = self.max_rel.max(o.max_rel);
        self.n += o.n;
    }
}

fn to_bits(dt: DType, v: &[f32]) -> Vec<u32> {
    match dt {
        DType::I32 => v.iter().map(|&x| x as i32 as u32).collect(),
        _ => v.iter().map(|x| x.to_bits()).collect(),
    }
}

fn compare(what: &str, dt: DType, got: &[u32], want: &[f32], tol: Tol) -> Stats {
    assert_eq!(got.len(), want.len());
    let mut st = Stats { n: want.len(), ..Default::default() };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_ne!(g, SENTINEL, "{what}: element {i} was not written");
        if dt == DType::I32 {
            assert_eq!(g as i32, w as i32, "{what}: element {i}");
            continue;
        }
        let gf = f32::from_bits(g);
        if w.is_nan() {
            assert!(gf.is_nan(), "{what}: element {i}: got {gf}, want NaN");
            continue;
        }
        if w.is_infinite() {
            assert_eq!(gf, w, "{what}: element {i}");
            continue;
        }
        let err = (gf as f64 - w as f64).abs();
        assert!(
            err <= tol.atol + tol.rtol * (w as f64).abs(),
            "{what}: element {i}: got {gf:e}, want {w:e} (err {err:e}, tol {tol:?})"
        );
        st.max_abs = st.max_abs.max(err);
        if (w as f64).abs() >= tol.floor {
            st.max_rel = st.max_rel.max(err / (w as f64).abs());
        }
    }
    st
}

// ---- graph building ----

/// A test graph with its weights.
struct Gb {
    g: Graph,
    w: HashMap<String, Vec<f32>>,
    rng: Rng,
    ids: Option<NodeId>,
}

impl Gb {
    fn new(seed: u64) -> Gb {
        Gb { g: Graph::new("t"), w: HashMap::new(), rng: Rng::new(seed), ids: None }
    }
    fn weight_data(&mut self, shape: &[usize], data: Vec<f32>) -> NodeId {
        let name = format!("w{}", self.w.len());
        assert_eq!(shape.iter().product::<usize>(), data.len());
        self.w.insert(name.clone(), data);
        let ty = TensorType::f32(shape.iter().map(|&d| Dim::N(d)).collect());
        self.g.add(Op::Weight { name, stored: DType::F32, layout: Default::default() }, &[], Some(ty)).unwrap()
    }
    /// Uniform random weight in `[lo, hi)`.
    fn weight(&mut self, shape: &[usize], lo: f32, hi: f32) -> NodeId {
        let n = shape.iter().product();
        let d = (0..n).map(|_| self.rng.uniform(lo, hi)).collect();
        self.weight_data(shape, d)
    }
    /// Weight of multiples of 1/8 in [-2, 2]: sums of products are exact in f32.
    fn weight_exact(&mut self, shape: &[usize]) -> NodeId {
        let n = shape.iter().product();
        let d = (0..n).map(|_| (self.rng.below(33) as f32 - 16.0) / 8.0).collect();
        self.weight_data(shape, d)
    }
    fn ids(&mut self) -> NodeId {
        if let Some(i) = self.ids {
            return i;
        }
        let t = TensorType::new(DType::I32, vec![Dim::S]);
        let i = self.g.add(Op::Input { name: "ids".into() }, &[], Some(t)).unwrap();
        self.ids = Some(i);
        i
    }
    fn op(&mut self, op: Op, ins: &[NodeId]) -> NodeId {
        self.g.add(op, ins, None).unwrap()
    }
    /// `f32[S, h]`: rows of a random `[VOCAB, h]` table picked by the ids.
    fn seq(&mut self, h: usize, lo: f32, hi: f32) -> NodeId {
        let t = self.weight(&[VOCAB, h], lo, hi);
        let ids = self.ids();
        self.op(Op::Gather, &[t, ids])
    }
    fn seq_exact(&mut self, h: usize) -> NodeId {
        let t = self.weight_exact(&[VOCAB, h]);
        let ids = self.ids();
        self.op(Op::Gather, &[t, ids])
    }
    fn reshape(&mut self, x: NodeId, shape: Vec<Dim>) -> NodeId {
        let dt = self.g.ty(x).dtype;
        self.g.add(Op::Reshape, &[x], Some(TensorType::new(dt, shape))).unwrap()
    }
    fn kv(&mut self, x: NodeId) -> NodeId {
        self.kv_cap(x, CTX)
    }
    /// `kv_concat` into a new state of `cap` rows.
    fn kv_cap(&mut self, x: NodeId, cap: usize) -> NodeId {
        self.kv_layout(x, cap, KvLayout::Contiguous)
    }
    /// `kv_concat` into a new state of `cap` rows stored as `layout`.
    fn kv_layout(&mut self, x: NodeId, cap: usize, layout: KvLayout) -> NodeId {
        let mut shape = self.g.ty(x).shape.clone();
        shape[0] = Dim::N(cap);
        let name = format!("cache{}", self.g.states.len());
        self.g.states.push(StateDecl::new(name.clone(), TensorType::f32(shape), StateKind::Kv { layout }));
        self.op(Op::KvConcat { state: name }, &[x])
    }
}

thread_local! {
    /// Whether [`check_on`] compiles with `KernelCtx::panel_weights` (and packs operand 1).
    static PANELS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// With [`PANELS`]: the element type the panels are stored in (16-bit: operand 1's weight is
    /// rounded to it for the interpreter too, so both compute with the same weights).
    static PANEL_ELEM: std::cell::Cell<PanelElem> = const { std::cell::Cell::new(PanelElem::F32) };
}

/// The 16-bit panel element types, each test of the panel path runs with.
const PANEL_ELEMS: [PanelElem; 3] = [PanelElem::F32, PanelElem::BF16, PanelElem::F16];

/// `f` with panels stored as `elem`.
fn with_panel_elem<T>(elem: PanelElem, f: impl FnOnce() -> T) -> T {
    PANEL_ELEM.with(|e| e.set(elem));
    let r = f();
    PANEL_ELEM.with(|e| e.set(PanelElem::F32));
    r
}

/// `x` rounded to `elem` (nearest even), as the driver stores it.
fn round_to(elem: PanelElem, x: f32) -> f32 {
    match elem {
        PanelElem::F32 => x,
        PanelElem::BF16 => half::bf16::from_f32(x).to_f32(),
        PanelElem::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// The bits of `v` stored as `elem`: f32 words, or 16-bit values two to a word.
fn panel_words(elem: PanelElem, v: &[f32]) -> Vec<u32> {
    let h: Vec<u16> = match elem {
        PanelElem::F32 => return v.iter().map(|x| x.to_bits()).collect(),
        PanelElem::BF16 => v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
        PanelElem::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect(),
    };
    h.chunks(2).map(|c| c[0] as u32 | (*c.get(1).unwrap_or(&0) as u32) << 16).collect()
}

/// [`check`] with panel weights: the product's weight in the runtime's panel layout, the product
/// run by the runtime's microkernel. Asserts the kernel does use it.
fn check_panels(gb: &Gb, n: NodeId, steps: &[usize], tol: Tol) -> Stats {
    assert!(panel::panel_groups(&gb.g, gb.g.inputs(n)[1]).is_some(), "operand 1 is not a panel weight");
    PANELS.with(|p| p.set(true));
    let st = check(gb, n, steps, tol);
    PANELS.with(|p| p.set(false));
    st
}

/// Runs node `n` of `gb` for the token counts `steps` (the last step is measured) on every ISA and
/// compares with the interpreter. Returns the worst errors.
fn check(gb: &Gb, n: NodeId, steps: &[usize], tol: Tol) -> Stats {
    let mut all = Stats::default();
    for (isa_name, isa) in isas() {
        let st = check_on(&*isa, isa_name, gb, n, steps, tol);
        all.merge(st);
    }
    all
}

fn check_on(isa: &dyn TargetIsa, isa_name: &str, gb: &Gb, n: NodeId, steps: &[usize], tol: Tol) -> Stats {
    let g = &gb.g;
    let pos = g.topo_order().unwrap().iter().position(|&m| m == n).unwrap();
    let text = llmc_ir::print(g);
    let line = text.lines().map(str::trim).find(|l| l.starts_with(&format!("%{pos} = "))).unwrap_or("?");
    let what = format!("`{line}` on {isa_name} (steps {steps:?})");
    let panels = PANELS.with(|p| p.get());
    let panel_elem = if panels { PANEL_ELEM.with(|e| e.get()) } else { PanelElem::F32 };
    let what = format!("{what} panels {}", panel_elem.name());
    // The longest cache of the graph (attention splits over the key range only when the cache
    // holds more than one block of keys).
    let max_context = g.states.iter().filter_map(|st| st.ty.shape[0].as_const()).max().unwrap_or(CTX).max(CTX);
    let ctx = KernelCtx { max_context, panel_weights: panels, panel_elem };
    let kc = compile_kernel(isa, &ctx, g, n).unwrap_or_else(|e| panic!("{what}: {e}")).expect("a kernel");
    assert_eq!(kc.ukernels, panels, "{what}: microkernel use");
    let exec = Exec::new(&kc);
    let ops = g.inputs(n);
    let mut g2 = g.clone();
    g2.outputs = ops.clone();
    g2.outputs.push(n);
    // Operands that are an int8 KV cache (and an int8 `kv_concat`'s own state): the kernel reads
    // and writes codes and scales, encoded here from the raw rows each step gave `kv_concat`.
    let int8_of = |o: NodeId| -> Option<(NodeId, StateDecl)> {
        let decl = g.kv_state_of(o).filter(|d| d.kind == (StateKind::Kv { layout: KvLayout::Int8 }))?;
        let mut x = o;
        while !matches!(g.op(x), Op::KvConcat { .. }) {
            x = g.inputs(x)[0];
        }
        Some((g.inputs(x)[0], decl.clone()))
    };
    let int8_ops: Vec<(usize, NodeId, StateDecl)> =
        ops.iter().enumerate().filter_map(|(i, &o)| int8_of(o).map(|(raw, d)| (i, raw, d))).collect();
    let int8_out = int8_of(n);
    let raws: Vec<NodeId> = int8_ops.iter().map(|x| x.1).chain(int8_out.iter().map(|x| x.0)).collect();
    g2.outputs.extend(&raws);
    let mut raw_rows: Vec<Vec<f32>> = vec![Vec::new(); raws.len()];
    let mut raw_before = raw_rows.clone();
    // A 16-bit panel weight: the interpreter computes with the same rounded values.
    let mut w = gb.w.clone();
    if let (true, Some(Op::Weight { name, .. })) = (panel_elem != PanelElem::F32, ops.get(1).map(|&x| g.op(x))) {
        for x in w.get_mut(name).expect("the weight's data") {
            *x = round_to(panel_elem, *x);
        }
    }
    let mut it = Interpreter::new(&w);
    let mut rng = Rng::new(7);
    let mut prev = None;
    let mut last = None;
    let mut p = 0;
    for (k, &s) in steps.iter().enumerate() {
        let ids: Vec<i32> = (0..s).map(|_| rng.below(VOCAB) as i32).collect();
        let outs = it.run(&g2, &ids).unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
        raw_before.clone_from(&raw_rows);
        for (r, o) in raw_rows.iter_mut().zip(&outs[ops.len() + 1..]) {
            r.extend(&o.data);
        }
        if k + 1 < steps.len() {
            prev = outs.last().cloned();
            p += s;
        } else {
            last = Some(outs);
        }
    }
    let outs = last.expect("at least one step");
    let s = *steps.last().unwrap();
    let mut inputs: Vec<Vec<u32>> = ops.iter().zip(&outs).map(|(&o, t)| to_bits(g.ty(o).dtype, &t.data)).collect();
    let packed = match g.op(n) {
        Op::Matmul { transpose_b: true } | Op::Linear { transpose_b: true, .. } | Op::GatedLinear { .. } => {
            super::quant::packed_layout(g, ops[1])
        }
        _ => None,
    };
    if let Some(layout) = packed {
        // A packed weight: its rows as the compiler writes them (from the source weights; the
        // interpreter quantizes the same way), as words.
        let Op::Weight { name, .. } = g.op(ops[1]) else { panic!("{what}: a packed operand that is not a weight") };
        let k = g.ty(ops[1]).shape[1].as_const().unwrap();
        let mut bytes = crate::packed::pack(layout, &gb.w[name], k).unwrap();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        inputs[1] = bytes.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    } else if panels && !matches!(g.op(n), Op::Attention { .. }) {
        // (Attention uses the microkernels without a panel weight.)
        let groups = panel::panel_groups(g, ops[1]).expect("a panel weight");
        let sh = &g.ty(ops[1]).shape;
        let (rows, k) = (sh[0].as_const().unwrap(), sh[1].as_const().unwrap());
        let packed = llmc_abi::panel::pack_panels(&outs[1].data, rows, k, groups);
        inputs[1] = panel_words(panel_elem, &packed);
    }
    for (j, (i, _, decl)) in int8_ops.iter().enumerate() {
        inputs[*i] = int8_state_words(decl, &raw_rows[j]);
    }
    let want = &outs[ops.len()];
    let dt = g.ty(n).dtype;
    // An int8 `kv_concat`: its state before the step, and exactly what it must hold after.
    let int8_want = int8_out.as_ref().map(|(_, decl)| {
        let j = raws.len() - 1;
        (int8_state_words(decl, &raw_before[j]), int8_state_words(decl, &raw_rows[j]))
    });
    let mut init = match g.op(n) {
        _ if int8_want.is_some() => int8_want.as_ref().map(|w| w.0.clone()).unwrap_or_default(),
        Op::KvConcat { state } => {
            let total = g.state(state).unwrap().ty.static_numel().unwrap();
            let mut v = vec![SENTINEL; total];
            if let Some(pt) = &prev {
                for (d, x) in v.iter_mut().zip(&pt.data) {
                    *d = x.to_bits();
                }
            }
            v
        }
        _ => vec![SENTINEL; want.data.len()],
    };
    let len = int8_want.as_ref().map_or(want.data.len(), |w| w.1.len());
    init.extend(std::iter::repeat_n(SENTINEL, GUARD));
    let mut stats = Stats::default();
    let mut reference: Option<Vec<u32>> = None;
    let init_words = init.clone();
    for nparts in [1, 3, 7] {
        let mut out = init.clone();
        let mut ins = inputs.clone();
        exec.run(&mut ins, &mut out, s, p, nparts);
        assert!(ins == inputs, "{what}: the kernel modified an input");
        assert!(out[len..] == init[len..], "{what}: nparts={nparts}: write past the result");
        match &int8_want {
            // Codes and scales bit for bit, rows past the step untouched.
            Some((_, w)) => assert!(out[..len] == w[..], "{what} nparts={nparts}: int8 cache differs"),
            None => stats.merge(compare(&format!("{what} nparts={nparts}"), dt, &out[..len], &want.data, tol)),
        }
        match &reference {
            None => reference = Some(out),
            Some(r) => assert!(*r == out, "{what}: nparts={nparts} differs from nparts=1"),
        }
        // Each part alone writes a region of its own (so concurrent parts do not race): words,
        // or bytes for an int8 cache (whose vectors of codes need not fill whole words).
        let units = |w: &[u32]| -> Vec<u32> {
            if int8_want.is_some() {
                w.iter().flat_map(|x| x.to_le_bytes()).map(u32::from).collect()
            } else {
                w.to_vec()
            }
        };
        if nparts > 1 {
            let init = units(&init);
            let mut owner = vec![usize::MAX; init.len()];
            for part in 0..nparts {
                let mut out = init_words.clone();
                let mut ins = inputs.clone();
                exec.run_parts(&mut ins, &mut out, s, p, part..part + 1, nparts);
                for (i, (&o, &x)) in units(&out).iter().zip(&init).enumerate() {
                    if o != x {
                        assert!(
                            owner[i] == usize::MAX,
                            "{what}: parts {} and {part} of {nparts} both write {i}",
                            owner[i]
                        );
                        owner[i] = part;
                    }
                }
            }
        }
    }
    stats
}

/// The buffer of int8 KV state `decl` holding `rows` (raw f32 rows, one per token written) as
/// `kv_concat`'s kernel writes them (`ir::quant::quantize_act` per vector of the last
/// dimension), in 32-bit words; the bytes of rows not written are the sentinel's.
fn int8_state_words(decl: &StateDecl, rows: &[f32]) -> Vec<u32> {
    let st = super::kv8::Int8State::of(decl).unwrap();
    let numel = decl.ty.static_numel().unwrap();
    let bytes_len = KvLayout::Int8.state_bytes(numel, st.d);
    let fill = SENTINEL.to_le_bytes();
    let mut b: Vec<u8> = (0..bytes_len.div_ceil(4) * 4).map(|i| fill[i % 4]).collect();
    for (v, x) in rows.chunks(st.d).enumerate() {
        let (q, scale) = llmc_ir::quant::quantize_act(x);
        for (e, c) in q.iter().enumerate() {
            b[v * st.d + e] = *c as u8;
        }
        b[st.scales + 4 * v..st.scales + 4 * v + 4].copy_from_slice(&scale.to_le_bytes());
    }
    b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

// ---- unary ----

/// Inputs spanning everything the unary ops see: a dense grid, tiny and huge magnitudes, specials.
fn unary_inputs() -> Vec<f32> {
    let mut v = Vec::new();
    let mut x = -30.0f32;
    while x < 30.0 {
        v.push(x);
        x += 0.0137;
    }
    let mut m = 1e-30f32;
    while m < 1e4 {
        v.push(m);
        v.push(-m);
        m *= 1.7;
    }
    for e in [
        0.0, -0.0, 0.625, -0.625, 0.6249, 88.0, 88.72, 88.73, 89.0, -87.0, -87.4, -100.0, -103.9, -104.5, 200.0,
        -200.0, 1e30, -1e30,
    ] {
        v.push(e);
    }
    v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    v
}

fn unary_tol(op: UnaryOp) -> Tol {
    match op {
        UnaryOp::Neg | UnaryOp::Sqrt | UnaryOp::Rsqrt => EXACT,
        UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Silu | UnaryOp::Tanh => tol(1e-38, 4e-7),
        // The reference computes 1 + erf(x/sqrt 2) (1 + tanh u) in f64, which cancels to 0 for
        // x below about -8.3 (-5.5) where true values are < 1e-15; relative errors are reported
        // where the reference is accurate.
        UnaryOp::Gelu => Tol { atol: 1e-14, rtol: 1e-6, floor: 1e-7 },
        // e^{-2u} amplifies the f32 rounding of u (|2u| ~ 15 at x = -4.7): ~2.5e-6 relative there,
        // on values below 1e-7.
        UnaryOp::GeluTanh => Tol { atol: 1e-14, rtol: 1e-5, floor: 1e-7 },
    }
}

#[test]
fn unary_ops_over_wide_ranges() {
    let data = unary_inputs();
    for op in UnaryOp::ALL {
        let mut gb = Gb::new(1);
        let x = gb.weight_data(&[data.len()], data.clone());
        let n = gb.op(Op::Unary(op), &[x]);
        let st = check(&gb, n, &[1], unary_tol(op));
        eprintln!(
            "unary {:10} max rel err {:.3e} max abs err {:.3e} over {} values",
            op.name(),
            st.max_rel,
            st.max_abs,
            st.n
        );
    }
}

#[test]
fn unary_ops_in_the_normal_range() {
    // Where activations live: relative error against the interpreter, no subnormals involved.
    for op in UnaryOp::ALL {
        let mut gb = Gb::new(2);
        let x = gb.weight(&[100_003], -12.0, 12.0);
        let n = gb.op(Op::Unary(op), &[x]);
        let st = check(&gb, n, &[1], unary_tol(op));
        eprintln!("unary {:10} on [-12,12): max rel err {:.3e}", op.name(), st.max_rel);
    }
}

#[test]
fn unary_symbolic_shape() {
    for op in [UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Gelu] {
        let mut gb = Gb::new(3);
        let x = gb.seq(37, -5.0, 5.0);
        let n = gb.op(Op::Unary(op), &[x]);
        for steps in [&[1][..], &[7], &[300]] {
            check(&gb, n, steps, unary_tol(op));
        }
    }
}

// ---- binary ----

/// A float operand of `shape`, symbolic dims allowed (via a gather of `[S, rest]` and a reshape).
fn operand(gb: &mut Gb, shape: &[Dim], lo: f32, hi: f32) -> NodeId {
    if shape.iter().all(|d| d.is_const()) {
        let s: Vec<usize> = shape.iter().map(|d| d.as_const().unwrap()).collect();
        return gb.weight(&s, lo, hi);
    }
    let pos = shape.iter().position(|&d| d == Dim::S).expect("only S is supported here");
    let rest: usize = shape.iter().filter_map(|d| d.as_const()).product();
    let x = gb.seq(rest, lo, hi);
    // [S, rest] -> [S, others...] -> move S into place.
    let mut others: Vec<Dim> = shape.iter().copied().filter(|d| *d != Dim::S).collect();
    others.insert(0, Dim::S);
    let x = gb.reshape(x, others);
    if pos == 0 {
        return x;
    }
    let r = shape.len();
    let mut perm: Vec<usize> = (1..r).collect();
    perm.insert(pos, 0);
    gb.op(Op::Transpose { perm }, &[x])
}

#[test]
fn binary_ops_with_broadcasting() {
    use Dim::{N, S};
    let patterns: Vec<(Vec<Dim>, Vec<Dim>)> = vec![
        (vec![S, N(33)], vec![S, N(33)]),
        (vec![S, N(33)], vec![N(33)]),
        (vec![S, N(33)], vec![S, N(1)]),
        (vec![S, N(33)], vec![N(1)]),
        (vec![N(1)], vec![S, N(7)]),
        (vec![N(1), N(33)], vec![S, N(1)]),
        (vec![S, N(1)], vec![N(1), N(35)]),
        (vec![N(4), N(1), N(3), N(5)], vec![N(1), N(6), N(1), N(5)]),
        (vec![N(2), N(3), N(4), N(5)], vec![N(3), N(1), N(5)]),
        (vec![N(2), N(3), S, N(5)], vec![N(2), N(1), S, N(1)]),
        (vec![N(3), S, N(4)], vec![N(3), N(1), N(1)]),
        (vec![N(2), N(1), N(3), N(1), N(2), N(3)], vec![N(2), N(4), N(1), N(5), N(1), N(3)]),
        (vec![N(20000)], vec![N(20000)]),
        (vec![N(1)], vec![N(1)]),
    ];
    for (k, (sa, sb)) in patterns.iter().enumerate() {
        for op in BinaryOp::ALL {
            let mut gb = Gb::new(10 + k as u64);
            let a = operand(&mut gb, sa, -2.0, 2.0);
            let b = operand(&mut gb, sb, 0.5, 2.0);
            let n = gb.op(Op::Binary(op), &[a, b]);
            for steps in [&[1][..], &[5]] {
                check(&gb, n, steps, EXACT);
            }
        }
    }
}

// ---- reductions and softmax ----

#[test]
fn reductions_and_softmax() {
    for len in [1, 3, 4, 8, 17, 130, 1000] {
        for op in [Op::Reduce(ReduceOp::Sum), Op::Reduce(ReduceOp::Mean), Op::Reduce(ReduceOp::Max), Op::Softmax] {
            let tol = match op {
                Op::Reduce(ReduceOp::Max) => EXACT,
                _ => tol(1e-6, 1e-5),
            };
            let mut gb = Gb::new(len as u64);
            let x = gb.weight(&[5, len], -4.0, 4.0);
            let n = gb.op(op.clone(), &[x]);
            check(&gb, n, &[1], tol);
            let mut gb = Gb::new(len as u64 + 100);
            let x = gb.seq(len, -4.0, 4.0);
            let x = gb.reshape(x, vec![Dim::S, Dim::N(1), Dim::N(len)]);
            let n = gb.op(op.clone(), &[x]);
            let st = check(&gb, n, &[9], tol);
            eprintln!("{} len {len}: max rel err {:.3e} max abs {:.3e}", op.name(), st.max_rel, st.max_abs);
        }
    }
}

// ---- attention pieces: kv_concat, causal mask, softmax over T, both matmuls ----

struct Attn {
    gb: Gb,
    k: NodeId,
    scores: NodeId,
    masked: NodeId,
    probs: NodeId,
    out: NodeId,
}

/// `x[S, H*D] -> q, k, v [H, .., D]`; scores `[H, S, T]`, masked, softmax, `probs @ v`.
fn attention(h: usize, d: usize, window: Option<usize>, exact: bool) -> Attn {
    let mut gb = Gb::new(42);
    let x = if exact { gb.seq_exact(h * d) } else { gb.seq(h * d, -1.0, 1.0) };
    let x3 = gb.reshape(x, vec![Dim::S, Dim::N(h), Dim::N(d)]);
    let q = gb.op(Op::Transpose { perm: vec![1, 0, 2] }, &[x3]);
    let kc = gb.kv(x3);
    let k = gb.op(Op::Transpose { perm: vec![1, 0, 2] }, &[kc]);
    let scores = gb.op(Op::Matmul { transpose_b: true }, &[q, k]);
    let masked = gb.op(Op::CausalMask { window }, &[scores]);
    let probs = gb.op(Op::Softmax, &[masked]);
    let out = gb.op(Op::Matmul { transpose_b: false }, &[probs, k]);
    Attn { gb, k: kc, scores, masked, probs, out }
}

#[test]
fn kv_concat_and_causal_mask_with_history() {
    for window in [None, Some(1), Some(3), Some(100)] {
        let a = attention(3, 8, window, false);
        for steps in [&[5][..], &[3, 5], &[20, 1], &[4, 4, 9], &[63, 1]] {
            check(&a.gb, a.k, steps, EXACT);
            check(&a.gb, a.masked, steps, EXACT);
            check(&a.gb, a.probs, steps, tol(1e-6, 1e-5));
        }
    }
}

#[test]
fn kv_concat_past_the_context_writes_nothing() {
    let a = attention(2, 4, None, false);
    let (isa, _) = host_isa().unwrap();
    let kc = compile_kernel(&*isa, &KernelCtx { max_context: CTX, panel_weights: false, panel_elem: Default::default() }, &a.gb.g, a.k).unwrap().unwrap();
    let exec = Exec::new(&kc);
    let mut ins = vec![vec![1.0f32.to_bits(); 3 * 8]];
    let mut state = vec![SENTINEL; CTX * 8];
    exec.run(&mut ins, &mut state, 3, CTX - 2, 1);
    assert!(state.iter().all(|&x| x == SENTINEL));
    exec.run(&mut ins, &mut state, 3, CTX - 3, 1);
    assert!(state[(CTX - 3) * 8..].iter().all(|&x| x == 1.0f32.to_bits()));
}

#[test]
fn attention_matmuls_exact() {
    // Multiples of 1/8: every partial sum is exact, so any summation order must match exactly.
    let a = attention(3, 8, None, true);
    for steps in [&[1][..], &[5], &[3, 5], &[20, 1], &[40, 13]] {
        check(&a.gb, a.scores, steps, EXACT);
    }
    let a = attention(2, 20, None, false);
    for steps in [&[1][..], &[5], &[3, 5], &[20, 1], &[40, 13]] {
        check(&a.gb, a.scores, steps, tol(1e-5, 1e-5));
        check(&a.gb, a.out, steps, tol(1e-6, 1e-5));
    }
}

// ---- matmul ----

fn mm_case(sa: &[Dim], sb: &[Dim], tb: bool, steps: &[usize]) {
    let mut gb = Gb::new(5);
    let mk = |gb: &mut Gb, sh: &[Dim]| {
        if sh.iter().all(|d| d.is_const()) {
            let s: Vec<usize> = sh.iter().map(|d| d.as_const().unwrap()).collect();
            return gb.weight_exact(&s);
        }
        let pos = sh.iter().position(|&d| d == Dim::S).unwrap();
        let rest: usize = sh.iter().filter_map(|d| d.as_const()).product();
        let x = gb.seq_exact(rest);
        let mut others: Vec<Dim> = sh.iter().copied().filter(|d| *d != Dim::S).collect();
        others.insert(0, Dim::S);
        let x = gb.reshape(x, others);
        if pos == 0 {
            return x;
        }
        let mut perm: Vec<usize> = (1..sh.len()).collect();
        perm.insert(pos, 0);
        gb.op(Op::Transpose { perm }, &[x])
    };
    let a = mk(&mut gb, sa);
    let b = mk(&mut gb, sb);
    let n = gb.op(Op::Matmul { transpose_b: tb }, &[a, b]);
    check(&gb, n, steps, EXACT);
}

#[test]
fn matmul_shapes_exact() {
    use Dim::{N, S};
    for tb in [false, true] {
        let bt = |k: usize, n: usize| if tb { vec![N(n), N(k)] } else { vec![N(k), N(n)] };
        // GEMV (decode), odd tails, and full tiles.
        for (k, nn) in [(37, 45), (1, 1), (4, 16), (16, 64), (3, 130), (64, 67), (129, 9)] {
            for steps in [&[1][..], &[2], &[3], &[4], &[9], &[17]] {
                mm_case(&[S, N(k)], &bt(k, nn), tb, steps);
            }
        }
        // Static batched with broadcasting of either side.
        let bb = |pre: &[usize], k: usize, n: usize| {
            let mut v: Vec<Dim> = pre.iter().map(|&d| N(d)).collect();
            v.extend(bt(k, n));
            v
        };
        mm_case(&[N(5), N(8), N(16)], &bt(16, 20), tb, &[1]);
        mm_case(&[N(1), N(7), N(9)], &bb(&[4], 9, 3), tb, &[1]);
        mm_case(&[N(2), N(3), N(6), N(5)], &bb(&[2, 1], 5, 11), tb, &[1]);
        mm_case(&[N(2), N(1), N(6), N(5)], &bb(&[1, 3], 5, 11), tb, &[1]);
        // [2,3,S,K] x [2,1,K,N]
        mm_case(&[N(2), N(3), S, N(12)], &bb(&[2, 1], 12, 19), tb, &[1]);
        mm_case(&[N(2), N(3), S, N(12)], &bb(&[2, 1], 12, 19), tb, &[6]);
        // b symbolic: [S, K] used as the rhs.
        mm_case(&[N(3), N(7)], &if tb { vec![S, N(7)] } else { vec![N(7), S] }, tb, &[5]);
    }
}

#[test]
fn matmul_random_accuracy() {
    // Random data: error relative to sum_k |a_ik b_kj| (the scale f32 accumulation works at).
    for tb in [false, true] {
        for (m, k, nn) in [(1, 300, 130), (17, 300, 130), (4, 1000, 64), (9, 64, 257)] {
            let mut gb = Gb::new(9);
            let a = gb.weight(&[m, k], -1.0, 1.0);
            let b = gb.weight(&if tb { [nn, k] } else { [k, nn] }, -1.0, 1.0);
            let n = gb.op(Op::Matmul { transpose_b: tb }, &[a, b]);
            let (ad, bd) = (&gb.w["w0"], &gb.w["w1"]);
            let mut scale = vec![0.0f64; m * nn];
            for i in 0..m {
                for j in 0..nn {
                    scale[i * nn + j] = (0..k)
                        .map(|l| {
                            let bv = if tb { bd[j * k + l] } else { bd[l * nn + j] };
                            (ad[i * k + l] as f64 * bv as f64).abs()
                        })
                        .sum();
                }
            }
            let smax = scale.iter().cloned().fold(0.0, f64::max);
            let st = check(&gb, n, &[1], tol(2e-6 * smax, 1e-5));
            eprintln!(
                "matmul tb={tb} {m}x{k}x{nn}: max abs err {:.3e} (max sum|ab| {smax:.1}), rel {:.3e}",
                st.max_abs, st.max_rel
            );
        }
    }
}

// ---- movement ----

#[test]
fn transposes() {
    use Dim::{N, S};
    let shapes: Vec<Vec<Dim>> = vec![
        vec![N(3), N(4), N(5)],
        vec![S, N(4), N(6)],
        vec![N(2), S, N(1), N(5)],
        vec![N(2), N(3), N(4), N(5)],
        vec![N(1), N(3), S, N(2)],
    ];
    for sh in &shapes {
        let r = sh.len();
        let perms: Vec<Vec<usize>> = permutations(r);
        for perm in perms {
            let mut gb = Gb::new(3);
            let x = operand(&mut gb, sh, -1.0, 1.0);
            let n = gb.op(Op::Transpose { perm }, &[x]);
            check(&gb, n, &[3], EXACT);
        }
    }
    // Rank 6, and a long contiguous inner dim.
    let mut gb = Gb::new(4);
    let x = gb.weight(&[2, 3, 1, 2, 3, 2], -1.0, 1.0);
    let n = gb.op(Op::Transpose { perm: vec![5, 3, 1, 0, 4, 2] }, &[x]);
    check(&gb, n, &[1], EXACT);
    let x = gb.weight(&[3, 2, 9000], -1.0, 1.0);
    let n = gb.op(Op::Transpose { perm: vec![1, 0, 2] }, &[x]);
    check(&gb, n, &[1], EXACT);
}

fn permutations(r: usize) -> Vec<Vec<usize>> {
    if r == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(r - 1) {
        for i in 0..r {
            let mut q = p.clone();
            q.insert(i, r - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn slices() {
    use Dim::{N, S};
    let cases: Vec<(Vec<Dim>, usize, usize, usize)> = vec![
        (vec![N(10), N(7)], 0, 2, 9),
        (vec![N(10), N(7)], 1, 3, 4),
        (vec![S, N(3), N(9)], 2, 1, 8),
        (vec![S, N(3), N(9)], 1, 0, 2),
        (vec![S, N(96)], 1, 32, 64),
        (vec![N(4), S, N(5)], 0, 1, 4),
    ];
    for (sh, axis, start, end) in cases {
        let mut gb = Gb::new(8);
        let x = operand(&mut gb, &sh, -1.0, 1.0);
        let n = gb.op(Op::Slice { axis, start, end }, &[x]);
        check(&gb, n, &[5], EXACT);
    }
}

#[test]
fn gather_and_positions() {
    for h in [1, 5, 37, 64] {
        let mut gb = Gb::new(h as u64);
        let n = gb.seq(h, -1.0, 1.0);
        for steps in [&[1][..], &[13]] {
            check(&gb, n, steps, EXACT);
        }
    }
    let mut gb = Gb::new(1);
    let n = gb.op(Op::Positions, &[]);
    for steps in [&[1][..], &[13], &[5, 9], &[30, 1]] {
        check(&gb, n, steps, EXACT);
    }
}

#[test]
fn rope_with_history() {
    for (h, d, r) in [(2, 16, 16), (3, 16, 8), (2, 20, 10), (1, 128, 64), (2, 6, 2)] {
        let mut gb = Gb::new(11);
        let x = gb.seq(h * d, -2.0, 2.0);
        let x = gb.reshape(x, vec![Dim::S, Dim::N(h), Dim::N(d)]);
        let half = r / 2;
        let inv: Vec<f32> = (0..half).map(|i| 10000f32.powf(-((2 * i) as f32) / r as f32)).collect();
        let f = gb.g.add(Op::Const { values: inv }, &[], Some(TensorType::f32(vec![Dim::N(half)]))).unwrap();
        let n = gb.op(Op::Rope { rotary_dim: r }, &[x, f]);
        for steps in [&[1][..], &[7], &[5, 9], &[40, 1], &[20, 44]] {
            check(&gb, n, steps, tol(1e-6, 1e-6));
        }
    }
}

#[test]
fn rope_needs_const_freqs() {
    let mut gb = Gb::new(1);
    let x = gb.seq(8, -1.0, 1.0);
    let x = gb.reshape(x, vec![Dim::S, Dim::N(1), Dim::N(8)]);
    let f = gb.weight(&[4], 0.0, 1.0);
    let n = gb.op(Op::Rope { rotary_dim: 8 }, &[x, f]);
    let (isa, _) = host_isa().unwrap();
    let e = compile_kernel(&*isa, &KernelCtx { max_context: CTX, panel_weights: false, panel_elem: Default::default() }, &gb.g, n).unwrap_err();
    assert!(e.to_string().contains("const"), "{e}");
}

#[test]
fn parts_run_concurrently() {
    // Real threads, one per part, against the single-part result.
    let a = attention(4, 16, None, false);
    let mut gb = a.gb;
    let w = gb.weight(&[64, 200], -1.0, 1.0);
    let x = gb.seq(64, -1.0, 1.0);
    let mm = gb.op(Op::Matmul { transpose_b: false }, &[x, w]);
    let q = gb.reshape(x, vec![Dim::S, Dim::N(4), Dim::N(16)]);
    let att = gb.op(Op::Attention { scale: 0.25, window: None, causal: true }, &[q, a.k, a.k]);
    let wt = gb.weight(&[200, 64], -1.0, 1.0);
    let bias = gb.weight(&[100], -1.0, 1.0);
    let gl = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[x, wt]);
    let lin = gb.op(Op::Linear { transpose_b: false, bias: false, act: Some(UnaryOp::Silu), residual: true }, &[x, w, mm]);
    let lin_t = gb.op(Op::Linear { transpose_b: true, bias: false, act: None, residual: false }, &[x, wt]);
    let bn = gb.op(Op::RmsNorm { eps: 1e-5 }, &[gl, bias]);
    let (isa, _) = host_isa().unwrap();
    // A cache of 300 rows: the attention of a 2-row step after 250 splits over the key range.
    let ctx = KernelCtx { max_context: 300, panel_weights: false, panel_elem: Default::default() };
    for (n, (s, p)) in [mm, a.probs, a.out, att, gl, lin, lin_t, bn, att].into_iter().zip(std::iter::repeat((37, 5)).take(8).chain([(2, 250)])) {
        let kc = compile_kernel(&*isa, &ctx, &gb.g, n).unwrap().unwrap();
        let exec = Exec::new(&kc);
        let b = llmc_ir::Bindings { s, p };
        let mut rng = Rng::new(3);
        let inputs: Vec<Vec<u32>> =
            gb.g.inputs(n)
                .iter()
                .map(|&i| (0..gb.g.ty(i).numel(b)).map(|_| rng.uniform(-1.0, 1.0).to_bits()).collect())
                .collect();
        let len = gb.g.ty(n).numel(b);
        let mut want = vec![SENTINEL; len];
        exec.run(&mut inputs.clone(), &mut want, s, p, 1);
        for nparts in [2, 5, 16] {
            let mut got = vec![SENTINEL; len];
            let mut ins = inputs.clone();
            let bufs: Vec<usize> = exec.bufs(&mut ins, &mut got).into_iter().map(|b| b as usize).collect();
            // Each phase on every thread, then the next (the runtime's barrier between steps).
            for f in exec.entries() {
                std::thread::scope(|sc| {
                    for part in 0..nparts {
                        let bufs = bufs.clone();
                        sc.spawn(move || {
                            let ptrs: Vec<*mut u8> = bufs.iter().map(|&a| a as *mut u8).collect();
                            unsafe { f(ptrs.as_ptr(), s as i64, p as i64, part as i64, nparts as i64) };
                        });
                    }
                });
            }
            assert!(got == want, "{}: {nparts} concurrent parts differ from one", kc.name);
        }
    }
}

// ---- fused ops: attention, norms, linear, gated linear, concat ----

/// `attention(q [S, nh, d], k [T, nkv, d], v [T, nkv, d])` with `q`, `k` uniform in `[-amp, amp)`
/// and `v` in `[-1, 1)`, the cache `cap` rows long.
fn attn_graph(nh: usize, nkv: usize, d: usize, window: Option<usize>, cap: usize, amp: f32) -> (Gb, NodeId) {
    attn_graph_kv(nh, nkv, d, window, cap, amp, KvLayout::Contiguous)
}

/// [`attn_graph`] with caches stored as `layout`.
fn attn_graph_kv(nh: usize, nkv: usize, d: usize, window: Option<usize>, cap: usize, amp: f32, layout: KvLayout) -> (Gb, NodeId) {
    use Dim::{N, S};
    let mut gb = Gb::new((nh * 1000 + nkv * 100 + d) as u64);
    let q = gb.seq(nh * d, -amp, amp);
    let q = gb.reshape(q, vec![S, N(nh), N(d)]);
    let k = gb.seq(nkv * d, -amp, amp);
    let k = gb.reshape(k, vec![S, N(nkv), N(d)]);
    let k = gb.kv_layout(k, cap, layout);
    let v = gb.seq(nkv * d, -1.0, 1.0);
    let v = gb.reshape(v, vec![S, N(nkv), N(d)]);
    let v = gb.kv_layout(v, cap, layout);
    let scale = 1.0 / (d as f32).sqrt();
    let n = gb.op(Op::Attention { scale, window, causal: true }, &[q, k, v]);
    (gb, n)
}

/// Outputs are convex combinations of `v` in [-1, 1); relative errors are reported for |out| >= 0.01.
const ATTN_TOL: Tol = Tol { atol: 1e-6, rtol: 1e-5, floor: 1e-2 };

/// [`check`] of an attention node both ways: in generated code alone, and through the runtime's
/// attention block (`panel_weights`: the microkernels in use).
fn check_attn(gb: &Gb, n: NodeId, steps: &[usize], tol: Tol) -> Stats {
    let mut st = check(gb, n, steps, tol);
    PANELS.with(|p| p.set(true));
    st.merge(check(gb, n, steps, tol));
    PANELS.with(|p| p.set(false));
    st
}

#[test]
fn attention_heads_windows_and_history() {
    // (NH, NKV, D): G = 1, 2, 3, 8 (one group), 16 (two groups of 8); D with and without a tail,
    // and past the unrolling limit (264).
    let shapes = [(4, 4, 8), (4, 2, 32), (12, 4, 64), (8, 1, 128), (16, 1, 16), (3, 3, 6), (2, 1, 20), (2, 2, 264)];
    let mut all = Stats::default();
    for (nh, nkv, d) in shapes {
        for window in [None, Some(1), Some(7), Some(40)] {
            let (gb, n) = attn_graph(nh, nkv, d, window, 300, 1.0);
            for steps in [&[1][..], &[7], &[5, 9], &[40, 1], &[150, 1], &[100, 37]] {
                all.merge(check_attn(&gb, n, steps, ATTN_TOL));
            }
        }
    }
    eprintln!("attention: max abs err {:.3e}, max rel err {:.3e} over {} values", all.max_abs, all.max_rel, all.n);
}

/// [`check_attn`] on the host ISA only (int8 KV caches: the rounding of `kv_concat`'s quantizer
/// needs SSE4.1, as the A8 products' does).
fn check_attn_host(gb: &Gb, n: NodeId, steps: &[usize], tol: Tol) -> Stats {
    let (isa, _) = host_isa().unwrap();
    let mut st = Stats::default();
    for panels in [false, true] {
        PANELS.with(|p| p.set(panels));
        st.merge(check_on(&*isa, "host", gb, n, steps, tol));
    }
    PANELS.with(|p| p.set(false));
    st
}

#[test]
fn int8_kv_concat_writes_codes_and_scales_exactly() {
    use Dim::{N, S};
    // D with a 16-wide body and tails; one and several KV heads; rows near the context's end.
    for (nkv, d) in [(1, 16), (3, 6), (2, 20), (4, 64), (1, 264)] {
        let mut gb = Gb::new((nkv * 100 + d) as u64);
        let x = gb.seq(nkv * d, -3.0, 3.0);
        let x = gb.reshape(x, vec![S, N(nkv), N(d)]);
        let k = gb.kv_layout(x, CTX, KvLayout::Int8);
        let (isa, _) = host_isa().unwrap();
        for steps in [&[5][..], &[3, 5], &[20, 1], &[4, 4, 9], &[63, 1]] {
            check_on(&*isa, "host", &gb, k, steps, EXACT);
        }
    }
}

#[test]
fn int8_kv_concat_zero_rows_and_past_the_context() {
    use Dim::{N, S};
    let mut gb = Gb::new(5);
    let x = gb.seq(2 * 8, -1.0, 1.0);
    let x = gb.reshape(x, vec![S, N(2), N(8)]);
    let k = gb.kv_layout(x, CTX, KvLayout::Int8);
    let (isa, _) = host_isa().unwrap();
    let kc = compile_kernel(&*isa, &KernelCtx { max_context: CTX, panel_weights: false, panel_elem: Default::default() }, &gb.g, k).unwrap().unwrap();
    let exec = Exec::new(&kc);
    let words = KvLayout::Int8.state_bytes(CTX * 16, 8).div_ceil(4);
    // A step past the context writes nothing.
    let mut ins = vec![vec![1.0f32.to_bits(); 3 * 16]];
    let mut state = vec![SENTINEL; words];
    exec.run(&mut ins, &mut state, 3, CTX - 2, 1);
    assert!(state.iter().all(|&x| x == SENTINEL));
    // A zero vector: codes 0 and scale 0 (as `quantize_act`); a constant one: codes 127.
    let mut ins = vec![[vec![0f32.to_bits(); 8], vec![1.0f32.to_bits(); 8]].concat()];
    exec.run(&mut ins, &mut state, 1, 0, 1);
    let bytes: Vec<u8> = state.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&bytes[..16], &[[0u8; 8], [127u8; 8]].concat()[..]);
    let scales = (CTX * 16).div_ceil(64) * 64;
    assert_eq!(&bytes[scales..scales + 8], &[0f32.to_le_bytes(), (1.0f32 / 127.0).to_le_bytes()].concat()[..]);
}

#[test]
fn attention_over_int8_caches() {
    // The kernel reads the codes and scales `kv_concat` wrote; the interpreter attends over the
    // values they stand for, so the tolerance is the f32 cache's. Shapes: G = 1, 2, 3, 8; D with
    // and without a tail and past the unrolling limit; steps that split over the key range.
    let mut all = Stats::default();
    for (nh, nkv, d) in [(4, 4, 8), (4, 2, 32), (12, 4, 64), (8, 1, 128), (3, 3, 6), (2, 1, 20), (2, 2, 264)] {
        for window in [None, Some(7)] {
            let (gb, n) = attn_graph_kv(nh, nkv, d, window, 300, 1.0, KvLayout::Int8);
            for steps in [&[1][..], &[5, 9], &[150, 1], &[296, 3], &[100, 37]] {
                all.merge(check_attn_host(&gb, n, steps, ATTN_TOL));
            }
        }
    }
    eprintln!("attention (int8 KV): max abs err {:.3e}, max rel err {:.3e} over {} values", all.max_abs, all.max_rel, all.n);
}

#[test]
fn attention_long_prefill_and_sharp_scores() {
    // T up to 300 (several key blocks), and larger logits (score std ~3, |scores| up to ~12)
    // where the running max moves between blocks.
    let mut all = Stats::default();
    for (nh, nkv, d, amp) in [(12, 4, 64, 1.0), (4, 2, 32, 3.0), (2, 1, 128, 1.5)] {
        for window in [None, Some(100)] {
            let (gb, n) = attn_graph(nh, nkv, d, window, 300, amp);
            // [296, 3]: a 3-row step split over the key range (rows see different key ranges).
            for steps in [&[260][..], &[200, 100], &[299, 1], &[296, 3]] {
                all.merge(check_attn(&gb, n, steps, ATTN_TOL));
            }
        }
    }
    eprintln!("attention (long): max abs err {:.3e}, max rel err {:.3e} over {} values", all.max_abs, all.max_rel, all.n);
}

/// Bidirectional `attention(q [S, nh, d], k [K, nkv, d], v)`: keys of this step (`K = S`) or
/// the whole cache (`K = T`, `cached`).
fn bidir_attn_graph(nh: usize, nkv: usize, d: usize, cached: bool, amp: f32) -> (Gb, NodeId) {
    use Dim::{N, S};
    let mut gb = Gb::new((nh * 1000 + nkv * 100 + d + 7) as u64);
    let q = gb.seq(nh * d, -amp, amp);
    let q = gb.reshape(q, vec![S, N(nh), N(d)]);
    let mut k = gb.seq(nkv * d, -amp, amp);
    k = gb.reshape(k, vec![S, N(nkv), N(d)]);
    let mut v = gb.seq(nkv * d, -1.0, 1.0);
    v = gb.reshape(v, vec![S, N(nkv), N(d)]);
    if cached {
        k = gb.kv_cap(k, 300);
        v = gb.kv_cap(v, 300);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let n = gb.op(Op::Attention { scale, window: None, causal: false }, &[q, k, v]);
    (gb, n)
}

#[test]
fn bidirectional_attention_sees_every_key() {
    // Encoders: every query row attends to all keys of the step (or of the cache), so later keys
    // change earlier rows; several key blocks and a head-dim tail.
    let mut all = Stats::default();
    for (nh, nkv, d) in [(4, 4, 8), (12, 12, 64), (4, 2, 32), (3, 1, 6)] {
        for cached in [false, true] {
            let (gb, n) = bidir_attn_graph(nh, nkv, d, cached, 1.0);
            for steps in [&[1][..], &[7], &[150], &[5, 9], &[40, 1]] {
                all.merge(check_attn(&gb, n, steps, ATTN_TOL));
            }
        }
    }
    eprintln!("bidirectional attention: max abs err {:.3e}, max rel err {:.3e} over {} values", all.max_abs, all.max_rel, all.n);
}

#[test]
fn attention_with_an_empty_window_gives_zeros() {
    // A zero-width window sees no key: the reference gives 0, not NaN.
    let (gb, n) = attn_graph(2, 1, 8, Some(0), CTX, 1.0);
    check_attn(&gb, n, &[3, 4], EXACT);
}

#[test]
fn norms_over_rows() {
    use Dim::{N, S};
    let mut worst = [Stats::default(), Stats::default()];
    for h in [1, 3, 8, 37, 768] {
        for (ln, eps) in [(false, 1e-6), (true, 1e-5)] {
            // Centered data, and an offset row (mean 10, spread 0.5) where a one-pass variance
            // would cancel.
            for (lo, hi) in [(-2.0, 2.0), (10.0, 10.5)] {
                let mut gb = Gb::new(h as u64);
                let x = gb.seq(h, lo, hi);
                let w = gb.weight(&[h], 0.5, 1.5);
                let n = if ln {
                    let b = gb.weight(&[h], -1.0, 1.0);
                    gb.op(Op::LayerNorm { eps }, &[x, w, b])
                } else {
                    gb.op(Op::RmsNorm { eps }, &[x, w])
                };
                // Offset rows: the f32 mean near 10 is off by up to half an ulp (5e-7), which is
                // ~1e-5 of a 0.05 deviation before the normalization scales it up.
                let t = if lo > 0.0 { tol(1e-5, 1e-4) } else { Tol { atol: 1e-6, rtol: 1e-5, floor: 1e-3 } };
                for steps in [&[1][..], &[3, 9]] {
                    let st = check(&gb, n, steps, t);
                    if lo < 0.0 {
                        worst[ln as usize].merge(st);
                    }
                }
            }
        }
    }
    // Rank 3 with a symbolic row count, and a static one.
    let mut gb = Gb::new(5);
    let x = gb.seq(3 * 33, -1.0, 1.0);
    let x = gb.reshape(x, vec![S, N(3), N(33)]);
    let w = gb.weight(&[33], -1.0, 1.0);
    let b = gb.weight(&[33], -1.0, 1.0);
    let n = gb.op(Op::RmsNorm { eps: 1e-5 }, &[x, w]);
    check(&gb, n, &[6], tol(1e-6, 1e-5));
    let n = gb.op(Op::LayerNorm { eps: 1e-5 }, &[x, w, b]);
    check(&gb, n, &[6], tol(1e-6, 1e-5));
    let x = gb.weight(&[5, 64], -3.0, 3.0);
    let w = gb.weight(&[64], -1.0, 1.0);
    let n = gb.op(Op::RmsNorm { eps: 1e-5 }, &[x, w]);
    check(&gb, n, &[1], tol(1e-6, 1e-5));
    eprintln!("centered rows: rms_norm max rel err {:.3e}; layer_norm max rel err {:.3e}", worst[0].max_rel, worst[1].max_rel);
}

/// `linear` on exact data (multiples of 1/8): sums are exact in any order, so without an
/// activation the result must match bit for bit.
#[allow(clippy::too_many_arguments)]
fn linear_case(lead: &[Dim], k: usize, nn: usize, tb: bool, bias: bool, act: Option<UnaryOp>, residual: bool, steps: &[usize]) {
    let mut gb = Gb::new((k * 31 + nn) as u64);
    let rows: usize = lead.iter().filter_map(|d| d.as_const()).product();
    let mut shape = lead.to_vec();
    shape.push(Dim::N(k));
    let a = if lead.contains(&Dim::S) {
        let x = gb.seq_exact(rows * k);
        gb.reshape(x, shape)
    } else {
        let s: Vec<usize> = shape.iter().map(|d| d.as_const().unwrap()).collect();
        gb.weight_exact(&s)
    };
    let b = gb.weight_exact(&if tb { [nn, k] } else { [k, nn] });
    let mut ins = vec![a, b];
    if bias {
        ins.push(gb.weight_exact(&[nn]));
    }
    if residual {
        let mut rs = lead.to_vec();
        rs.push(Dim::N(nn));
        let r = if lead.contains(&Dim::S) {
            let x = gb.seq_exact(rows * nn);
            gb.reshape(x, rs)
        } else {
            let s: Vec<usize> = rs.iter().map(|d| d.as_const().unwrap()).collect();
            gb.weight_exact(&s)
        };
        ins.push(r);
    }
    let n = gb.op(Op::Linear { transpose_b: tb, bias, act, residual }, &ins);
    let t = match act {
        None => EXACT,
        Some(u) => {
            let t = unary_tol(u);
            Tol { atol: t.atol.max(1e-6), rtol: t.rtol + 2e-7, floor: t.floor }
        }
    };
    check(&gb, n, steps, t);
}

#[test]
fn linear_epilogues_exact() {
    use Dim::{N, S};
    for tb in [false, true] {
        for (k, nn) in [(37, 45), (1, 3), (16, 64), (64, 67), (129, 9)] {
            for (bias, act, residual) in [
                (false, None, false),
                (true, None, false),
                (false, None, true),
                (true, Some(UnaryOp::Silu), false),
                (true, Some(UnaryOp::GeluTanh), true),
                (false, Some(UnaryOp::Gelu), true),
            ] {
                for steps in [&[1][..], &[2], &[5], &[9]] {
                    linear_case(&[S], k, nn, tb, bias, act, residual, steps);
                }
            }
        }
        // Other leading shapes: [S, 3, K], a single row [K], a static [5, K].
        linear_case(&[S, N(3)], 20, 30, tb, true, Some(UnaryOp::Tanh), true, &[4]);
        linear_case(&[], 20, 30, tb, true, Some(UnaryOp::Sigmoid), true, &[1]);
        linear_case(&[N(5)], 33, 70, tb, true, None, true, &[1]);
    }
}

#[test]
fn linear_random_accuracy() {
    for tb in [false, true] {
        for (m, k, nn) in [(1, 768, 130), (17, 768, 96), (6, 300, 257)] {
            let mut gb = Gb::new(19);
            let a = gb.weight(&[m, k], -1.0, 1.0);
            let b = gb.weight(&if tb { [nn, k] } else { [k, nn] }, -0.1, 0.1);
            let bias = gb.weight(&[nn], -0.5, 0.5);
            let r = gb.weight(&[m, nn], -1.0, 1.0);
            let n = gb.op(Op::Linear { transpose_b: tb, bias: true, act: Some(UnaryOp::Silu), residual: true }, &[a, b, bias, r]);
            let st = check(&gb, n, &[1], tol(1e-5, 1e-4));
            eprintln!("linear tb={tb} {m}x{k}x{nn} +bias silu +res: max abs err {:.3e}", st.max_abs);
        }
    }
}

#[test]
fn gated_linear_every_activation() {
    use Dim::{N, S};
    for act in UnaryOp::ALL {
        let t = unary_tol(act);
        let t = Tol { atol: t.atol * 64.0, rtol: 2.0 * t.rtol + 2e-7, floor: t.floor };
        for (k, nn) in [(37, 45), (16, 64), (129, 9), (4, 1)] {
            let mut gb = Gb::new((k + nn) as u64);
            let a = gb.seq_exact(k);
            let w = gb.weight_exact(&[2 * nn, k]);
            let n = gb.op(Op::GatedLinear { act }, &[a, w]);
            for steps in [&[1][..], &[3], &[4], &[9]] {
                check(&gb, n, steps, t);
            }
        }
        let mut gb = Gb::new(3);
        let a = gb.seq_exact(2 * 24);
        let a = gb.reshape(a, vec![S, N(2), N(24)]);
        let w = gb.weight_exact(&[2 * 40, 24]);
        let n = gb.op(Op::GatedLinear { act }, &[a, w]);
        check(&gb, n, &[5], t);
    }
}

#[test]
fn gated_linear_random_accuracy() {
    for act in [UnaryOp::Silu, UnaryOp::GeluTanh] {
        for (m, k, nn) in [(1, 768, 200), (9, 512, 130)] {
            let mut gb = Gb::new(23);
            let a = gb.weight(&[m, k], -1.0, 1.0);
            let w = gb.weight(&[2 * nn, k], -0.1, 0.1);
            let n = gb.op(Op::GatedLinear { act }, &[a, w]);
            let st = check(&gb, n, &[1], tol(1e-5, 1e-4));
            eprintln!("gated_linear {} {m}x{k}x{nn}: max abs err {:.3e}", act.name(), st.max_abs);
        }
    }
}

#[test]
fn concat_runtime_any_axis() {
    use Dim::{N, S};
    let cases: Vec<(Vec<Vec<Dim>>, usize)> = vec![
        (vec![vec![S, N(5)], vec![S, N(3)]], 1),
        (vec![vec![S, N(2), N(4)], vec![S, N(3), N(4)], vec![S, N(1), N(4)]], 1),
        (vec![vec![N(2), S, N(3)], vec![N(2), S, N(5)]], 2),
        (vec![vec![N(2), S, N(3)], vec![N(1), S, N(3)]], 0),
        (vec![vec![S, N(9000)], vec![S, N(100)]], 1),
        (vec![vec![N(3), N(5)], vec![N(2), N(5)]], 0),
        (vec![vec![N(3), N(5)], vec![N(3), N(1)]], 1),
        (vec![vec![S, N(7)]], 1),
    ];
    for (shapes, axis) in cases {
        let mut gb = Gb::new(31);
        let xs: Vec<NodeId> = shapes.iter().map(|sh| operand(&mut gb, sh, -1.0, 1.0)).collect();
        let n = gb.op(Op::Concat { axis, n: xs.len() }, &xs);
        for steps in [&[1][..], &[6]] {
            check(&gb, n, steps, EXACT);
        }
    }
    // i32 operands (positions, ids) move as bits.
    let mut gb = Gb::new(1);
    let p = gb.op(Op::Positions, &[]);
    let p = gb.reshape(p, vec![S, N(1)]);
    let ids = gb.ids();
    let ids = gb.reshape(ids, vec![S, N(1)]);
    let n = gb.op(Op::Concat { axis: 1, n: 3 }, &[p, ids, p]);
    for steps in [&[1][..], &[4, 9]] {
        check(&gb, n, steps, EXACT);
    }
}

/// One transformer-like block through the whole pipeline: a graph using every fused op, with
/// Q/K/V and gate/up weights merged by `concat {axis=0}` of weights, a bias concat of a weight
/// and a const, and an axis-1 weight concat. Compiled to an artifact, loaded by the runtime and
/// compared with the interpreter over a chunked prompt and decode steps.
#[test]
fn compiled_model_with_fused_ops_and_weight_concats() {
    use Dim::{N, S};
    let (h, nh, nkv, d, ff, cap) = (32, 4, 2, 8, 48, 40);
    let mut gb = Gb::new(77);
    let x = gb.seq(h, -1.0, 1.0);
    let wn = gb.weight(&[h], 0.5, 1.5);
    let xn = gb.op(Op::RmsNorm { eps: 1e-5 }, &[x, wn]);
    let wq = gb.weight(&[nh * d, h], -0.3, 0.3);
    let wk = gb.weight(&[nkv * d, h], -0.3, 0.3);
    let wv = gb.weight(&[nkv * d, h], -0.3, 0.3);
    let wqkv = gb.op(Op::Concat { axis: 0, n: 3 }, &[wq, wk, wv]);
    let bq = gb.weight(&[nh * d], -0.1, 0.1);
    let kvb: Vec<f32> = (0..2 * nkv * d).map(|i| (i as f32 - 8.0) * 0.01).collect();
    let bkv = gb.g.add(Op::Const { values: kvb }, &[], Some(TensorType::f32(vec![N(2 * nkv * d)]))).unwrap();
    let bqkv = gb.op(Op::Concat { axis: 0, n: 2 }, &[bq, bkv]);
    let qkv = gb.op(Op::Linear { transpose_b: true, bias: true, act: None, residual: false }, &[xn, wqkv, bqkv]);
    let q = gb.op(Op::Slice { axis: 1, start: 0, end: nh * d }, &[qkv]);
    let q = gb.reshape(q, vec![S, N(nh), N(d)]);
    let k = gb.op(Op::Slice { axis: 1, start: nh * d, end: (nh + nkv) * d }, &[qkv]);
    let k = gb.reshape(k, vec![S, N(nkv), N(d)]);
    let k = gb.kv_cap(k, cap);
    let v = gb.op(Op::Slice { axis: 1, start: (nh + nkv) * d, end: (nh + 2 * nkv) * d }, &[qkv]);
    let v = gb.reshape(v, vec![S, N(nkv), N(d)]);
    let v = gb.kv_cap(v, cap);
    let att = gb.op(Op::Attention { scale: 1.0 / (d as f32).sqrt(), window: Some(9), causal: true }, &[q, k, v]);
    let att = gb.reshape(att, vec![S, N(nh * d)]);
    let wo = gb.weight(&[nh * d, h], -0.3, 0.3);
    let x2 = gb.op(Op::Linear { transpose_b: false, bias: false, act: None, residual: true }, &[att, wo, x]);
    let lw = gb.weight(&[h], 0.5, 1.5);
    let lb = gb.weight(&[h], -0.1, 0.1);
    let xl = gb.op(Op::LayerNorm { eps: 1e-5 }, &[x2, lw, lb]);
    let wg = gb.weight(&[ff, h], -0.3, 0.3);
    let wu = gb.weight(&[ff, h], -0.3, 0.3);
    let wgu = gb.op(Op::Concat { axis: 0, n: 2 }, &[wg, wu]);
    let gl = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[xl, wgu]);
    let wda = gb.weight(&[ff, h / 2], -0.3, 0.3);
    let wdb = gb.weight(&[ff, h / 2], -0.3, 0.3);
    let wd = gb.op(Op::Concat { axis: 1, n: 2 }, &[wda, wdb]);
    let x3 = gb.op(Op::Linear { transpose_b: false, bias: false, act: None, residual: true }, &[gl, wd, x2]);
    let wl = gb.weight(&[VOCAB, h], -0.5, 0.5);
    let logits = gb.op(Op::Linear { transpose_b: true, bias: false, act: Some(UnaryOp::Tanh), residual: false }, &[x3, wl]);
    gb.g.outputs = vec![logits];
    llmc_ir::verify(&gb.g).unwrap();
    let name = |n: NodeId| match gb.g.op(n) {
        Op::Weight { name, .. } => name.clone(),
        _ => unreachable!(),
    };
    let merged: Vec<String> = [wq, wk, wv, bq, wg, wu, wda, wdb].iter().map(|&n| name(n)).collect();

    // Row-major products in generated code, then panel weights through the runtime microkernel.
    for no_microkernels in [true, false] {
        let dir = std::env::temp_dir().join(format!("llmc-codegen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fused.llmc");
        let opts = crate::CompileOptions { max_chunk: Some(8), ..Default::default() };
        let report = crate::compile_cpu(&gb.g, &gb.w, &opts, crate::CpuOptions { no_microkernels }, &path).unwrap();
        let model: Arc<llmc_runtime::Model> = llmc_runtime::Model::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        // The merged weights are stored once, inside their concats; no kernel copies them.
        let mut concats = 0;
        for b in &model.header().buffers {
            if let llmc_runtime::artifact::BufferDecl::Data { name, .. } = b {
                assert!(!merged.contains(name), "weight `{name}` is stored although only a concat uses it");
                concats += name.contains("concat{") as usize;
            }
        }
        assert_eq!(concats, 4, "{:?}", model.header().buffers);
        assert!(model.header().steps.iter().all(|s| !s.label.ends_with("= concat")));
        let all_w: u64 = gb.w.values().map(|v| v.len() as u64 * 4).sum();
        // Every weight is in the file exactly once, plus the const inside the bias concat (panel
        // layouts pad each group to a multiple of 16 rows).
        if no_microkernels {
            assert_eq!(report.weight_bytes, all_w + (2 * nkv * d * 4) as u64);
        } else {
            assert!(report.weight_bytes >= all_w + (2 * nkv * d * 4) as u64);
            assert!(model.header().buffers.iter().any(|b| matches!(b, llmc_runtime::BufferDecl::Microkernels { .. })));
        }

        let mut sess = llmc_runtime::Session::new(Arc::clone(&model)).unwrap();
        let mut it = Interpreter::new(&gb.w);
        let mut rng = Rng::new(5);
        let mut worst = 0.0f64;
        for len in [13, 1, 1, 5, 1] {
            let ids: Vec<i32> = (0..len).map(|_| rng.below(VOCAB) as i32).collect();
            let want = it.run(&gb.g, &ids).unwrap().remove(0);
            let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let got = sess.forward(&uids, true).unwrap();
            assert_eq!(got.len(), want.data.len());
            for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
                let err = (g - w).abs() as f64;
                worst = worst.max(err);
                assert!(err <= 1e-5 + 1e-4 * w.abs() as f64, "step of {len}: logit {i}: got {g}, want {w}");
            }
        }
        eprintln!("compiled block vs interpreter (no_microkernels={no_microkernels}): max abs logit err {worst:.3e}");
    }
}

// ---- whole-graph compile: every op kind, no relocations on any ISA ----

#[test]
fn every_kernel_compiles_without_relocations() {
    let mut a = attention(4, 16, Some(8), false);
    let gb = &mut a.gb;
    let x = gb.seq(64, -1.0, 1.0);
    gb.op(Op::Positions, &[]);
    let x3 = gb.reshape(x, vec![Dim::S, Dim::N(4), Dim::N(16)]);
    let f =
        gb.g.add(Op::Const { values: vec![1.0, 0.1, 0.01, 0.001] }, &[], Some(TensorType::f32(vec![Dim::N(4)])))
            .unwrap();
    gb.op(Op::Rope { rotary_dim: 8 }, &[x3, f]);
    for u in UnaryOp::ALL {
        gb.op(Op::Unary(u), &[x]);
    }
    for b in BinaryOp::ALL {
        gb.op(Op::Binary(b), &[x, x]);
    }
    for r in ReduceOp::ALL {
        gb.op(Op::Reduce(r), &[x]);
    }
    gb.op(Op::Slice { axis: 1, start: 3, end: 40 }, &[x]);
    // Fused ops (attention on the [S, 4, 16] view against the cached keys of `a`).
    let w = gb.weight(&[64], -1.0, 1.0);
    let bias = gb.weight(&[64], -1.0, 1.0);
    gb.op(Op::RmsNorm { eps: 1e-5 }, &[x, w]);
    gb.op(Op::LayerNorm { eps: 1e-5 }, &[x, w, bias]);
    gb.op(Op::Attention { scale: 0.25, window: Some(8), causal: true }, &[x3, a.k, a.k]);
    let wl = gb.weight(&[64, 64], -1.0, 1.0);
    for tb in [false, true] {
        gb.op(Op::Linear { transpose_b: tb, bias: true, act: Some(UnaryOp::Gelu), residual: true }, &[x, wl, bias, x]);
    }
    gb.op(Op::GatedLinear { act: UnaryOp::GeluTanh }, &[x, wl]);
    gb.op(Op::Concat { axis: 1, n: 2 }, &[x, x]);
    let ctx = KernelCtx { max_context: CTX, panel_weights: false, panel_elem: Default::default() };
    let mut seen = std::collections::BTreeSet::new();
    let t0 = std::time::Instant::now();
    let mut count = 0;
    for (name, isa) in isas() {
        for n in a.gb.g.topo_order().unwrap() {
            let op = a.gb.g.op(n);
            let k = compile_kernel(&*isa, &ctx, &a.gb.g, n).unwrap_or_else(|e| panic!("{name}: {e}"));
            match op {
                Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape => assert!(k.is_none()),
                _ => {
                    let k = k.expect("kernel");
                    assert!(!k.code.is_empty());
                    seen.insert(op.name());
                    count += 1;
                }
            }
        }
    }
    eprintln!("{count} kernels compiled in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    for want in [
        "positions",
        "gather",
        "exp",
        "gelu",
        "add",
        "div",
        "reduce_sum",
        "reduce_max",
        "softmax",
        "matmul",
        "transpose",
        "slice",
        "rope",
        "causal_mask",
        "kv_concat",
        "rms_norm",
        "layer_norm",
        "attention",
        "linear",
        "gated_linear",
        "concat",
    ] {
        assert!(seen.contains(want), "no {want} kernel compiled");
    }
}

#[test]
fn host_features_are_named_like_std() {
    let (_, feats) = host_isa().unwrap();
    assert!(feats.iter().any(|f| f == "sse2"));
    for f in &feats {
        let known = matches!(
            f.as_str(),
            "sse2"
                | "sse3"
                | "ssse3"
                | "sse4.1"
                | "sse4.2"
                | "popcnt"
                | "avx"
                | "avx2"
                | "fma"
                | "bmi1"
                | "bmi2"
                | "lzcnt"
                | "avx512f"
                | "avx512vl"
                | "avx512dq"
                | "avx512bitalg"
                | "avx512vbmi"
                | "avxvnni"
                | "avx512vnni"
                | "cmpxchg16b"
        );
        assert!(known, "unexpected feature name {f}");
    }
    if std::is_x86_feature_detected!("fma") {
        assert!(feats.iter().any(|f| f == "fma"));
    }
}

// ---- timing (run with `cargo test --release -p llmc-codegen bench -- --ignored --nocapture`) ----

/// Times one kernel of `gb` at `s`, `p = 0`, single-threaded; with `LLMC_DUMP_DIR` set, also
/// writes the code there for `objdump -D -b binary -m i386:x86-64`.
fn time_kernel(gb: &Gb, n: NodeId, s: usize, flops: f64, label: &str) {
    time_kernel_at(gb, n, s, 0, flops, label);
}

/// [`time_kernel`] at `p` cached tokens; inputs are smooth pseudo-random values in [-1, 1].
fn time_kernel_at(gb: &Gb, n: NodeId, s: usize, p: usize, flops: f64, label: &str) {
    time_kernel_with(gb, n, s, p, flops, label, false)
}

/// [`time_kernel_at`], with the runtime's microkernels in use when `ukernels`.
fn time_kernel_with(gb: &Gb, n: NodeId, s: usize, p: usize, flops: f64, label: &str, ukernels: bool) {
    let (isa, _) = host_isa().unwrap();
    let g = &gb.g;
    let ctx = KernelCtx { max_context: CTX.max(s + p), panel_weights: ukernels, panel_elem: Default::default() };
    let kc = compile_kernel(&*isa, &ctx, g, n).unwrap().unwrap();
    if let Ok(dir) = std::env::var("LLMC_DUMP_DIR") {
        let file: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        std::fs::write(format!("{dir}/{file}.bin"), &kc.code).unwrap();
    }
    let exec = Exec::new(&kc);
    let b = llmc_ir::Bindings { s, p };
    let mut ins: Vec<Vec<u32>> = g
        .inputs(n)
        .iter()
        .map(|&i| {
            let t = g.ty(i);
            let v: Vec<f32> = match t.dtype {
                DType::I32 => vec![1.0; t.numel(b)],
                _ => (0..t.numel(b)).map(|j| ((j as f32) * 0.7548).sin()).collect(),
            };
            to_bits(t.dtype, &v)
        })
        .collect();
    let mut out = vec![0u32; g.ty(n).numel(b)];
    exec.run(&mut ins, &mut out, s, p, 1);
    // The best of short batches over ~0.5 s: robust to other load on a shared machine.
    let t0 = std::time::Instant::now();
    let mut dt = f64::INFINITY;
    while t0.elapsed().as_secs_f64() < 0.5 {
        let t1 = std::time::Instant::now();
        let mut iters = 0;
        while iters == 0 || t1.elapsed().as_secs_f64() < 0.01 {
            exec.run(&mut ins, &mut out, s, p, 1);
            iters += 1;
        }
        dt = dt.min(t1.elapsed().as_secs_f64() / iters as f64);
    }
    eprintln!("{label:44} {:10.1} us  {:7.2} GFLOP/s ({} bytes of code)", dt * 1e6, flops / dt / 1e9, kc.code.len());
}

#[test]
#[ignore]
fn bench_kernels() {
    use Dim::{N, S};
    for (m, k, nn) in [(1, 4096, 4096), (64, 768, 3072), (256, 1024, 1024)] {
        for tb in [false, true] {
            let mut gb = Gb::new(1);
            let t = TensorType::f32(vec![S, N(k)]);
            let a = gb.g.add(Op::Input { name: "x".into() }, &[], Some(TensorType::new(DType::I32, vec![S]))).unwrap();
            let a = gb.g.add_typed(Op::Reshape, &[a], t);
            let b = gb.weight(&if tb { [nn, k] } else { [k, nn] }, -1.0, 1.0);
            let n = gb.op(Op::Matmul { transpose_b: tb }, &[a, b]);
            time_kernel(&gb, n, m, 2.0 * (m * k * nn) as f64, &format!("matmul tb={tb} {m}x{k}x{nn}"));
        }
    }
    let mut gb = Gb::new(1);
    let x = gb.weight(&[1 << 20], -1.0, 1.0);
    for u in [UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::GeluTanh, UnaryOp::Tanh] {
        let n = gb.op(Op::Unary(u), &[x]);
        time_kernel(&gb, n, 1, (1 << 20) as f64, &format!("{} 1M (GFLOP/s = Gelem/s)", u.name()));
    }
    let y = gb.weight(&[1 << 20], -1.0, 1.0);
    let n = gb.op(Op::Binary(BinaryOp::Add), &[x, y]);
    time_kernel(&gb, n, 1, (1 << 20) as f64, "add 1M (Gelem/s)");
    let x2 = gb.weight(&[1024, 1024], -1.0, 1.0);
    let n = gb.op(Op::Softmax, &[x2]);
    time_kernel(&gb, n, 1, (1 << 20) as f64, "softmax 1024x1024 (Gelem/s)");
}

#[test]
#[ignore]
fn bench_fused() {
    use Dim::{N, S};
    // Attention, 12 heads / 4 KV heads / D = 64: prefill S = 512 (P = 0) and decode at P = 511.
    let (nh, nkv, d) = (12, 4, 64);
    let (gb, n) = attn_graph(nh, nkv, d, None, 512, 1.0);
    let pairs = |s: usize, p: usize| (0..s).map(|i| p + i + 1).sum::<usize>() as f64;
    let fl = |s: usize, p: usize| pairs(s, p) * (nh * 4 * d) as f64;
    time_kernel_at(&gb, n, 512, 0, fl(512, 0), "attention 12/4x64 prefill S=512 P=0");
    time_kernel_with(&gb, n, 512, 0, fl(512, 0), "attention 12/4x64 prefill S=512 P=0 (ukernel)", true);
    time_kernel_at(&gb, n, 1, 511, fl(1, 511), "attention 12/4x64 decode S=1 P=511");
    time_kernel_with(&gb, n, 1, 511, fl(1, 511), "attention 12/4x64 decode S=1 P=511 (ukernel)", true);
    // SmolLM2-135M's heads (9 / 3 KV heads, D = 64) decoding at depth 2048.
    let (gb9, n9) = attn_graph(9, 3, d, None, 2048, 1.0);
    time_kernel_at(&gb9, n9, 1, 2047, 2048.0 * (9 * 4 * d) as f64, "attention 9/3x64 decode S=1 P=2047");
    let fl9 = |s: usize, p: usize| pairs(s, p) * (9 * 4 * d) as f64;
    time_kernel_with(&gb9, n9, 1, 2047, fl9(1, 2047), "attention 9/3x64 decode S=1 P=2047 (ukernel)", true);
    time_kernel_with(&gb9, n9, 512, 1536, fl9(512, 1536), "attention 9/3x64 prefill S=512 P=1536 (ukernel)", true);
    let (gb, n) = attn_graph(nh, nkv, d, Some(128), 512, 1.0);
    let wfl = (0..512).map(|i: usize| (i + 1).min(128)).sum::<usize>() as f64 * (nh * 4 * d) as f64;
    time_kernel_at(&gb, n, 512, 0, wfl, "attention 12/4x64 window 128 prefill S=512");
    // Linear 128x768x768 with every epilogue, both layouts; gated 128x768 -> 2048.
    for tb in [false, true] {
        for (bias, act, residual) in [(false, None, false), (true, Some(UnaryOp::Silu), true)] {
            let mut gb = Gb::new(1);
            let a = gb.seq(768, -1.0, 1.0);
            let b = gb.weight(&[768, 768], -1.0, 1.0);
            let mut ins = vec![a, b];
            if bias {
                ins.push(gb.weight(&[768], -1.0, 1.0));
            }
            if residual {
                ins.push(gb.seq(768, -1.0, 1.0));
            }
            let n = gb.op(Op::Linear { transpose_b: tb, bias, act, residual }, &ins);
            let label = format!("linear tb={tb} 128x768x768 epi={}", bias as u8 + residual as u8 + act.is_some() as u8);
            time_kernel(&gb, n, 128, 2.0 * 128.0 * 768.0 * 768.0, &label);
            time_kernel(&gb, n, 1, 2.0 * 768.0 * 768.0, &format!("{label} (M=1)"));
        }
    }
    let mut gb = Gb::new(1);
    let a = gb.seq(768, -1.0, 1.0);
    let w = gb.weight(&[4096, 768], -1.0, 1.0);
    let n = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[a, w]);
    time_kernel(&gb, n, 128, 2.0 * 128.0 * 768.0 * 4096.0, "gated_linear silu 128x768 -> 2x2048");
    time_kernel(&gb, n, 1, 2.0 * 768.0 * 4096.0, "gated_linear silu 1x768 -> 2x2048");
    // Norms over 512 x 768 (GFLOP/s column = Gelem/s).
    let mut gb = Gb::new(1);
    let x = gb.seq(768, -1.0, 1.0);
    let x = gb.reshape(x, vec![S, N(768)]);
    let w = gb.weight(&[768], -1.0, 1.0);
    let b = gb.weight(&[768], -1.0, 1.0);
    let n = gb.op(Op::RmsNorm { eps: 1e-5 }, &[x, w]);
    time_kernel(&gb, n, 512, 512.0 * 768.0, "rms_norm 512x768 (Gelem/s)");
    let n = gb.op(Op::LayerNorm { eps: 1e-5 }, &[x, w, b]);
    time_kernel(&gb, n, 512, 512.0 * 768.0, "layer_norm 512x768 (Gelem/s)");
}

// ---- mixture of experts ----

/// A `moe` node over `x` (`lead` dims then `h`): router and tokens are multiples of 1/8 so the
/// logits are exact (and often tie: the lower expert must win, as in the reference), expert
/// weights random; gate/up stacked as a concat of per-expert weights, like the frontend's.
fn moe_case(seed: u64, lead: &[Dim], e: usize, k: usize, h: usize, im: usize, act: UnaryOp, zero_router: bool) -> (Gb, NodeId) {
    let mut gb = Gb::new(seed);
    let rows: usize = lead.iter().map(|d| d.as_const().unwrap_or(1)).product();
    let x = gb.seq_exact(rows * h);
    let mut shape = lead.to_vec();
    shape.push(Dim::N(h));
    let x = gb.reshape(x, shape);
    let router = if zero_router { gb.weight_data(&[e, h], vec![0.0; e * h]) } else { gb.weight_exact(&[e, h]) };
    let parts: Vec<NodeId> = (0..e).map(|_| gb.weight(&[2 * im, h], -0.2, 0.2)).collect();
    let gu = gb.op(Op::Concat { axis: 0, n: e }, &parts);
    let gu = gb.reshape(gu, vec![Dim::N(e), Dim::N(2 * im), Dim::N(h)]);
    let dn = gb.weight(&[e, h, im], -0.2, 0.2);
    let n = gb.op(Op::Moe { top_k: k, act }, &[x, router, gu, dn]);
    (gb, n)
}

#[test]
fn moe_chooses_and_mixes_experts() {
    use Dim::{N, S};
    let t = tol(2e-5, 2e-4);
    for (e, k, h, im, act) in [
        (4, 2, 37, 45, UnaryOp::Silu),
        (8, 2, 16, 300, UnaryOp::Silu), // two blocks of intermediate rows, the second partial
        (3, 3, 9, 5, UnaryOp::GeluTanh),
        (5, 1, 24, 8, UnaryOp::Gelu),
    ] {
        let (gb, n) = moe_case((e * h + im) as u64, &[S], e, k, h, im, act, false);
        for steps in [&[1][..], &[4], &[2, 9]] {
            let st = check(&gb, n, steps, t);
            eprintln!("moe E={e} k={k} H={h} I={im} {} steps {steps:?}: max abs err {:.3e}", act.name(), st.max_abs);
        }
    }
    // All logits equal: experts 0..k chosen with equal weights.
    let (gb, n) = moe_case(5, &[S], 4, 2, 12, 10, UnaryOp::Silu, true);
    check(&gb, n, &[3], t);
    // Leading dims beyond the token axis.
    let (gb, n) = moe_case(6, &[S, N(2)], 4, 2, 8, 6, UnaryOp::Silu, false);
    check(&gb, n, &[3], t);
}

// ---- quantized weight layouts ----

/// A graph whose matmul weights carry int8 / int4 (sym and asym, partial last groups, a row-wise
/// concat of quantized weights) layouts, compiled to an artifact and compared with the
/// interpreter running the same quantized graph, over a prompt and decode steps.
#[test]
fn compiled_quantized_layouts_match_the_interpreter() {
    use llmc_ir::Layout;
    let (h, k2, ff) = (45, 40, 24); // partial int4 blocks of 13 and 8, an int8 tail of 8
    let mut gb = Gb::new(91);
    let x = gb.seq(h, -1.0, 1.0);
    let w1 = gb.weight(&[k2, h], -0.4, 0.4);
    let y = gb.op(Op::Linear { transpose_b: true, bias: false, act: Some(UnaryOp::Tanh), residual: false }, &[x, w1]);
    let wg = gb.weight(&[ff, k2], -0.4, 0.4);
    let wu = gb.weight(&[ff, k2], -0.4, 0.4);
    let wgu = gb.op(Op::Concat { axis: 0, n: 2 }, &[wg, wu]);
    let gl = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[y, wgu]);
    let wl = gb.weight(&[VOCAB, ff], -0.5, 0.5);
    let logits = gb.op(Op::Matmul { transpose_b: true }, &[gl, wl]);
    gb.g.outputs = vec![logits];
    gb.g.meta.insert("max_context".into(), "32".into());
    let set = |g: &mut Graph, n: NodeId, l: Layout| {
        if let Op::Weight { layout, .. } = &mut g.g[n].op {
            *layout = l;
        }
    };
    let dense = gb.g.clone();
    // Per-half scales (group 16) with zero points; block-shared scales (group 32) symmetric.
    set(&mut gb.g, w1, Layout::Int4 { group: 16, asym: true });
    set(&mut gb.g, wg, Layout::Int4 { group: 32, asym: false });
    set(&mut gb.g, wu, Layout::Int4 { group: 32, asym: false });
    set(&mut gb.g, wl, Layout::Int8);
    llmc_ir::verify(&gb.g).unwrap();

    let dir = std::env::temp_dir().join(format!("llmc-codegen-qtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("quant.llmc");
    // Both paths: the runtime's quantized GEMV (where this CPU has one) and generated code only.
    for no_microkernels in [false, true] {
        let opts = crate::CompileOptions { max_chunk: Some(8), ..Default::default() };
        let report = crate::compile_cpu(&gb.g, &gb.w, &opts, crate::CpuOptions { no_microkernels }, &path).unwrap();
        let model = llmc_runtime::Model::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        // Stored packed: the table and the embedding-like `seq` table stay f32, the rest is packed.
        let rb = crate::packed::row_bytes;
        let packed = k2 * rb(Layout::Int4 { group: 16, asym: true }, h)
            + 2 * ff * rb(Layout::Int4 { group: 32, asym: false }, k2)
            + VOCAB * rb(Layout::Int8, ff);
        let dense_rest: usize = gb.w.iter().filter(|(n, _)| ![w1, wg, wu, wl].iter().any(|&x| matches!(gb.g.op(x), Op::Weight { name, .. } if name == *n))).map(|(_, v)| v.len() * 4).sum();
        assert_eq!(report.weight_bytes, (packed + dense_rest) as u64);
        // Three parts per kernel: column splits that do not divide N.
        let mut sess = llmc_runtime::Session::with_threads(model, 3).unwrap();
        let mut it = Interpreter::new(&gb.w);
        let mut it_dense = Interpreter::new(&gb.w);
        let mut rng = Rng::new(6);
        let mut quant_err = 0.0f64;
        for len in [7, 1, 1, 3] {
            let ids: Vec<i32> = (0..len).map(|_| rng.below(VOCAB) as i32).collect();
            let want = it.run(&gb.g, &ids).unwrap().remove(0);
            let exact = it_dense.run(&dense, &ids).unwrap().remove(0);
            let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let got = sess.forward(&uids, true).unwrap();
            assert_eq!(got.len(), want.data.len());
            for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
                assert!((g - w).abs() <= 1e-3, "no_microkernels={no_microkernels}: step of {len}: logit {i}: got {g}, quantized interpreter {w}");
            }
            for (&a, &b) in want.data.iter().zip(&exact.data) {
                quant_err = quant_err.max((a - b).abs() as f64);
            }
        }
        // The layouts really changed the numbers (quantization error is measured, not hidden).
        assert!(quant_err > 1e-4, "quantized graph evaluates like the dense one ({quant_err:e})");    }

}

/// Packed products at kernel level, through the runtime's quantized microkernels and through
/// generated code: W8A8 and W4A8 (groups 32, 64, 96; `K` in the activation layout's super-step
/// and step regions), int8 and int4, as `linear` with bias and activation, `gated_linear` and
/// `matmul`, ragged column counts; a 20-row step (the multi-row A8 product: a block of 16 rows and
/// one of 4) and a decode step after it; 1/3/7-way splits bit-identical, guard zone, against the
/// interpreter on the same quantized graph.
#[test]
fn packed_products_match_the_interpreter_at_every_split() {
    use llmc_ir::Layout;
    let layouts = [
        Layout::W4A8 { group: 32 },
        Layout::W4A8 { group: 64 },
        Layout::W4A8 { group: 96 },
        Layout::W8A8,
        Layout::Int8,
        Layout::Int4 { group: 32, asym: false },
    ];
    for (k, n) in [(600, 37), (1100, 19), (72, 70)] {
        for layout in layouts {
            for form in 0..3 {
                let mut gb = Gb::new(k as u64 + n as u64 + form);
                let x = gb.seq(k, -1.0, 1.0);
                let node = match form {
                    0 => {
                        let w = gb.weight(&[n, k], -0.1, 0.1);
                        let b = gb.weight(&[n], -0.5, 0.5);
                        let lin = Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Gelu), residual: false };
                        gb.op(lin, &[x, w, b])
                    }
                    1 => {
                        let w = gb.weight(&[2 * n, k], -0.1, 0.1);
                        gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[x, w])
                    }
                    _ => {
                        let w = gb.weight(&[n, k], -0.1, 0.1);
                        gb.op(Op::Matmul { transpose_b: true }, &[x, w])
                    }
                };
                let w = gb.g.inputs(node)[1];
                if let Op::Weight { layout: l, .. } = &mut gb.g.g[w].op {
                    *l = layout;
                }
                gb.g.outputs = vec![node];
                llmc_ir::verify(&gb.g).unwrap();
                assert_eq!(super::quant::packed_layout(&gb.g, w), Some(layout));
                let tl = tol(1e-4, 1e-4);
                // The A8 products round activations with `nearest`, an SSE4.1 instruction (a
                // libcall, so no kernel, on the SSE2 baseline): those run on the host ISA only.
                let isas: Vec<_> = isas().into_iter().filter(|(name, _)| *name == "host" || !layout.quantizes_activations()).collect();
                for panels in [true, false] {
                    PANELS.with(|p| p.set(panels));
                    for (name, isa) in &isas {
                        check_on(&**isa, name, &gb, node, &[20], tl);
                        check_on(&**isa, name, &gb, node, &[20, 1], tl);
                    }
                    PANELS.with(|p| p.set(false));
                }
            }
        }
    }
}

/// A tied embedding and LM head stored once, packed: the gather dequantizes the rows it reads
/// (whole int4 blocks into a stack row, `H` values copied out), the head is a packed product.
/// Every packed format, ragged `H`, 3 threads, both product paths, against the interpreter.
#[test]
fn packed_tied_tables_are_gathered_as_the_interpreter_dequantizes_them() {
    use llmc_ir::Layout;
    let cases = [
        (45, Layout::Int8),
        (40, Layout::Int4 { group: 16, asym: true }),
        (75, Layout::Int4 { group: 32, asym: false }),
        (20, Layout::Int4 { group: 32, asym: false }),
        (36, Layout::W8A8),
        (64, Layout::W4A8 { group: 32 }),
        (48, Layout::Sparse24 { int8: true }),
    ];
    let dir = std::env::temp_dir().join(format!("llmc-codegen-tied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tied.llmc");
    for (h, layout) in cases {
        let mut gb = Gb::new(h as u64 + 17);
        let x = gb.seq(h, -1.0, 1.0);
        let table = gb.g.inputs(x)[0];
        let y = gb.op(Op::Unary(UnaryOp::Tanh), &[x]);
        let logits = gb.op(Op::Matmul { transpose_b: true }, &[y, table]);
        gb.g.outputs = vec![logits];
        gb.g.meta.insert("max_context".into(), "32".into());
        if let Op::Weight { layout: l, .. } = &mut gb.g.g[table].op {
            *l = layout;
        }
        llmc_ir::verify(&gb.g).unwrap();
        assert_eq!(crate::cpu::quant::packed_layout(&gb.g, table), Some(layout), "{layout}: stored packed");
        for no_microkernels in [false, true] {
            let what = format!("{layout} H={h} no_microkernels={no_microkernels}");
            let opts = crate::CompileOptions { max_chunk: Some(8), ..Default::default() };
            let report = crate::compile_cpu(&gb.g, &gb.w, &opts, crate::CpuOptions { no_microkernels }, &path).unwrap();
            // Stored once, packed (no f32 copy of the table for the gather).
            assert_eq!(report.weight_bytes, (VOCAB * crate::packed::row_bytes(layout, h)) as u64, "{what}");
            let model = llmc_runtime::Model::load(&path).unwrap();
            std::fs::remove_file(&path).ok();
            let mut sess = llmc_runtime::Session::with_threads(model, 3).unwrap();
            let mut it = Interpreter::new(&gb.w);
            let mut rng = Rng::new(h as u64);
            for len in [7, 1, 8, 2] {
                let ids: Vec<i32> = (0..len).map(|_| rng.below(VOCAB) as i32).collect();
                let want = it.run(&gb.g, &ids).unwrap().remove(0);
                let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                let got = sess.forward(&uids, true).unwrap();
                assert_eq!(got.len(), want.data.len(), "{what}");
                for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
                    assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{what}: step of {len}: logit {i}: got {g}, interpreter {w}");
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A tied embedding and LM head in the panel layout (f32, bf16, f16), stored once: the head runs
/// through the panel GEMM, the gather reads rows across the panels and widens them exactly. Ragged
/// `H` and a vocabulary that is not a multiple of the panel width; 3 threads; against the
/// interpreter on the same rounded table, gathered rows bit-exact.
#[test]
fn panel_tied_tables_are_gathered_exactly() {
    use crate::WeightsDtype;
    for (h, dtype, elem) in [
        (37, WeightsDtype::F32, PanelElem::F32),
        (64, WeightsDtype::BF16, PanelElem::BF16),
        (45, WeightsDtype::F16, PanelElem::F16),
    ] {
        let mut gb = Gb::new(h as u64 + 3);
        let x = gb.seq(h, -1.0, 1.0);
        let table = gb.g.inputs(x)[0];
        let logits = gb.op(Op::Matmul { transpose_b: true }, &[x, table]);
        gb.g.outputs = vec![x, logits];
        gb.g.meta.insert("max_context".into(), "32".into());
        // Tiny and subnormal halves, and values that round, in the table.
        let name = match gb.g.op(table) {
            Op::Weight { name, .. } => name.clone(),
            _ => unreachable!(),
        };
        let w = gb.w.get_mut(&name).unwrap();
        w[3] = 3.0e-7;
        w[4] = -6.0e-8;
        w[5] = 1.0e-5;
        for v in w.iter_mut() {
            *v = round_to(elem, *v);
        }
        assert_eq!(panel::panel_groups(&gb.g, table), Some(1), "a tied table is a panel weight");
        let dir = std::env::temp_dir().join(format!("llmc-codegen-tied-panels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tied.llmc");
        let opts = crate::CompileOptions { max_chunk: Some(8), weights_dtype: Some(dtype), ..Default::default() };
        // The gathered rows are an output too: compile the logits graph, check the rows below.
        let mut lg = gb.g.clone();
        lg.outputs = vec![logits];
        let report = crate::compile_cpu(&lg, &gb.w, &opts, crate::CpuOptions::default(), &path).unwrap();
        let panels = llmc_abi::panel::panel_group_len(VOCAB, h) * elem.bytes();
        assert_eq!(report.weight_bytes, panels as u64, "{dtype:?}: the table stored once, as panels");
        let model = llmc_runtime::Model::load(&path).unwrap();
        let mut sess = llmc_runtime::Session::with_threads(model, 3).unwrap();
        let mut it = Interpreter::new(&gb.w);
        let mut rng = Rng::new(h as u64);
        for len in [7, 1, 8] {
            let mut ids: Vec<i32> = (0..len).map(|_| rng.below(VOCAB) as i32).collect();
            ids[0] = 0; // the row holding the subnormals
            let want = it.run(&gb.g, &ids).unwrap();
            let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let got = sess.forward(&uids, true).unwrap();
            for (i, (&g, &w)) in got.iter().zip(&want[1].data).enumerate() {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{dtype:?}: logit {i}: got {g}, interpreter {w}");
            }
        }
        // The gather alone, bit-exact: a graph whose output is the gathered rows' sum with zero
        // through a product of an identity-like head would hide bits, so compile the gather kernel
        // directly and run it on the panel words.
        let ctx = KernelCtx { max_context: CTX, panel_weights: true, panel_elem: elem };
        for (isa_name, isa) in isas() {
            let kc = compile_kernel(&*isa, &ctx, &gb.g, x).unwrap().expect("a kernel");
            let exec = Exec::new(&kc);
            let packed = llmc_abi::panel::pack_panels(&gb.w[&name], VOCAB, h, 1);
            let ids: Vec<u32> = (0..VOCAB as u32).rev().collect();
            let mut ins = vec![panel_words(elem, &packed), ids.clone()];
            let len = VOCAB * h;
            for nparts in [1, 3, 7] {
                let mut out = vec![SENTINEL; len + GUARD];
                exec.run(&mut ins, &mut out, VOCAB, 0, nparts);
                assert!(out[len..].iter().all(|&v| v == SENTINEL), "{isa_name} {dtype:?}: write past the result");
                for (r, &id) in ids.iter().enumerate() {
                    let want = &gb.w[&name][id as usize * h..(id as usize + 1) * h];
                    let got = &out[r * h..(r + 1) * h];
                    assert!(got.iter().zip(want).all(|(&g, &w)| g == w.to_bits()), "{isa_name} {dtype:?} nparts={nparts}: row {id}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

// ---- products through the runtime's panel microkernel ----

#[test]
fn panel_linear_epilogues_exact() {
    for elem in PANEL_ELEMS {
        with_panel_elem(elem, panel_linear_epilogues_exact_as);
    }
}

fn panel_linear_epilogues_exact_as() {
    use Dim::{N, S};
    PANELS.with(|p| p.set(true));
    for (k, nn) in [(37, 45), (1, 3), (16, 64), (64, 67), (129, 9), (8, 130)] {
        for (bias, act, residual) in [
            (false, None, false),
            (true, None, false),
            (false, None, true),
            (true, Some(UnaryOp::Silu), false),
            (true, Some(UnaryOp::GeluTanh), true),
        ] {
            for steps in [&[1][..], &[2], &[9], &[17]] {
                linear_case(&[S], k, nn, true, bias, act, residual, steps);
            }
        }
    }
    linear_case(&[S, N(3)], 20, 30, true, true, Some(UnaryOp::Tanh), true, &[4]);
    linear_case(&[], 20, 30, true, true, Some(UnaryOp::Sigmoid), true, &[1]);
    linear_case(&[N(5)], 33, 70, true, true, None, true, &[1]);
    PANELS.with(|p| p.set(false));
}

#[test]
fn panel_gated_and_matmul() {
    for elem in PANEL_ELEMS {
        with_panel_elem(elem, panel_gated_and_matmul_as);
    }
}

fn panel_gated_and_matmul_as() {
    use Dim::{N, S};
    for act in [UnaryOp::Silu, UnaryOp::GeluTanh, UnaryOp::Gelu] {
        let t = unary_tol(act);
        let t = Tol { atol: t.atol * 64.0, rtol: 2.0 * t.rtol + 2e-7, floor: t.floor };
        for (k, nn) in [(37, 45), (16, 64), (129, 9), (4, 1), (5, 200)] {
            let mut gb = Gb::new((k + nn) as u64);
            let a = gb.seq_exact(k);
            let w = gb.weight_exact(&[2 * nn, k]);
            let n = gb.op(Op::GatedLinear { act }, &[a, w]);
            for steps in [&[1][..], &[3], &[9], &[20]] {
                check_panels(&gb, n, steps, t);
            }
        }
    }
    // matmul {transpose_b} with a batched left operand and a weight on the right.
    let mut gb = Gb::new(5);
    let a = gb.seq_exact(2 * 24);
    let a = gb.reshape(a, vec![S, N(2), N(24)]);
    let w = gb.weight_exact(&[70, 24]);
    let n = gb.op(Op::Matmul { transpose_b: true }, &[a, w]);
    check_panels(&gb, n, &[5], EXACT);
    check_panels(&gb, n, &[1], EXACT);
}

#[test]
fn panel_random_accuracy() {
    for (m, k, nn) in [(1, 768, 130), (17, 768, 96), (6, 300, 257), (33, 64, 64)] {
        let mut gb = Gb::new(19);
        let a = gb.weight(&[m, k], -1.0, 1.0);
        let b = gb.weight(&[nn, k], -0.1, 0.1);
        let bias = gb.weight(&[nn], -0.5, 0.5);
        let r = gb.weight(&[m, nn], -1.0, 1.0);
        let n = gb.op(Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Silu), residual: true }, &[a, b, bias, r]);
        for elem in PANEL_ELEMS {
            let st = with_panel_elem(elem, || check_panels(&gb, n, &[1], tol(1e-5, 1e-4)));
            eprintln!("panel linear {m}x{k}x{nn} +bias silu +res, {} panels: max abs err {:.3e}", elem.name(), st.max_abs);
        }
    }
}

#[test]
fn panel_weights_only_for_row_wise_products() {
    let mut gb = Gb::new(1);
    let a = gb.weight(&[3, 8], -1.0, 1.0);
    let w = gb.weight(&[4, 8], -1.0, 1.0);
    let y = gb.op(Op::Matmul { transpose_b: true }, &[a, w]);
    assert_eq!(panel::panel_groups(&gb.g, w), Some(1));
    // Also used as a left operand (here: of another product): not a panel weight.
    let _ = gb.op(Op::Matmul { transpose_b: true }, &[w, a]);
    assert_eq!(panel::panel_groups(&gb.g, w), None);
    // `a` is an operand 0 only.
    assert_eq!(panel::panel_groups(&gb.g, a), None);
    let _ = y;
}

/// Compiles `g` from `w` and checks the artifact against the interpreter on the same graph and
/// weight source (logits within 1e-3 over a prompt and decode steps, three parts per kernel);
/// returns the largest difference between the interpreter's quantized and `dense` logits.
fn layouts_match(g: &Graph, dense: &Graph, w: &dyn llmc_ir::WeightSource, tag: &str) -> f64 {
    // Both paths: the runtime's quantized GEMV (where this CPU has one) and generated code only.
    let e = layouts_match_with(g, dense, w, tag, false);
    assert_eq!(e, layouts_match_with(g, dense, w, &format!("{tag}-generated"), true));
    e
}

fn layouts_match_with(g: &Graph, dense: &Graph, w: &dyn llmc_ir::WeightSource, tag: &str, no_microkernels: bool) -> f64 {
    let dir = std::env::temp_dir().join(format!("llmc-codegen-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("q.llmc");
    let opts = crate::CompileOptions { max_chunk: Some(32), ..Default::default() };
    crate::compile_cpu(g, w, &opts, crate::CpuOptions { no_microkernels }, &path).unwrap();
    let model = llmc_runtime::Model::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let mut sess = llmc_runtime::Session::with_threads(model, 3).unwrap();
    let mut it = Interpreter::new(w);
    let mut it_dense = Interpreter::new(w);
    let mut rng = Rng::new(6);
    let mut quant_err = 0.0f64;
    // A 20-token step: W8A8/W4A8 products quantize rows in blocks of 16 (`a8_block_rows`), so
    // a full block and a ragged one; then decode steps.
    assert_eq!(super::quant::a8_block_rows(44), 16);
    for len in [20, 1, 1, 3] {
        let ids: Vec<i32> = (0..len).map(|_| rng.below(VOCAB) as i32).collect();
        let want = it.run(g, &ids).unwrap().remove(0);
        let exact = it_dense.run(dense, &ids).unwrap().remove(0);
        let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let got = sess.forward(&uids, true).unwrap();
        assert_eq!(got.len(), want.data.len());
        for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
            assert!((g - w).abs() <= 1e-3, "{tag}: step of {len}: logit {i}: got {g}, quantized interpreter {w}");
        }
        for (&a, &b) in want.data.iter().zip(&exact.data) {
            quant_err = quant_err.max((a - b).abs() as f64);
        }
    }
    quant_err
}

/// W8A8 and W4A8 products over the regions of the quantized activation layout (`abi::qformat`):
/// `K` = 600 (a super-step of 16 blocks, then a partial step of 3 blocks, the last partial),
/// 1100 (two super-steps and a partial step) and 72 (steps only), so codes and block terms land
/// in super-step and step order; 20-token steps go through the multi-row product (a block of 16
/// rows and one of 4), decode steps through the GEMV, and both through generated code. The
/// quantized products read the exact embedding rows (a `linear` and a `gated_linear` side by
/// side, then a dense head), so the interpreter and the kernels quantize identical activations
/// and only summation order separates them (chained A8 products would also differ by activation
/// codes that round the other way).
#[test]
fn a8_products_over_every_activation_region_match_the_interpreter() {
    use llmc_ir::Layout;
    for (h, k2) in [(600, 40), (1100, 24), (72, 40)] {
        let mut gb = Gb::new(93 + h as u64);
        let x = gb.seq(h, -1.0, 1.0);
        let w1 = gb.weight(&[k2, h], -0.1, 0.1);
        let y1 = gb.op(Op::Linear { transpose_b: true, bias: false, act: Some(UnaryOp::Tanh), residual: false }, &[x, w1]);
        let wg = gb.weight(&[k2, h], -0.1, 0.1);
        let wu = gb.weight(&[k2, h], -0.1, 0.1);
        let wgu = gb.op(Op::Concat { axis: 0, n: 2 }, &[wg, wu]);
        let y2 = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[x, wgu]);
        let y = gb.op(Op::Binary(llmc_ir::BinaryOp::Add), &[y1, y2]);
        let wl = gb.weight(&[VOCAB, k2], -0.5, 0.5);
        let logits = gb.op(Op::Matmul { transpose_b: true }, &[y, wl]);
        gb.g.outputs = vec![logits];
        gb.g.meta.insert("max_context".into(), "32".into());
        let set = |g: &mut Graph, n: NodeId, l: Layout| {
            if let Op::Weight { layout, .. } = &mut g.g[n].op {
                *layout = l;
            }
        };
        let dense = gb.g.clone();
        for (l1, l2) in [
            (Layout::W4A8 { group: 32 }, Layout::W4A8 { group: 64 }),
            (Layout::W4A8 { group: 96 }, Layout::W4A8 { group: 128 }),
            (Layout::W8A8, Layout::W8A8),
        ] {
            let tag = format!("regions-k{h}-{l1}-{l2}");
            let mut g = gb.g.clone();
            set(&mut g, w1, l1);
            set(&mut g, wg, l2);
            set(&mut g, wu, l2);
            llmc_ir::verify(&g).unwrap();
            let e = layouts_match(&g, &dense, &gb.w, &tag);
            assert!(e > 1e-4, "{tag}: graph evaluates like the dense one ({e:e})");
        }
    }
}

/// 2:4 sparse layouts (f32 and int8 kept values; an odd number of groups of 4, so a half-filled
/// index byte), a row-wise concat of sparse weights, `linear` with activation, `gated_linear`,
/// `matmul`; and calibrated rows supplied by the weight source (as GPTQ supplies them) used by
/// both the packer and the interpreter.
#[test]
fn compiled_sparse_and_calibrated_layouts_match_the_interpreter() {
    use llmc_ir::quant::QRow;
    use llmc_ir::Layout;
    let (h, k2, ff) = (44, 40, 28); // 11, 10 and 7 groups of 4
    let mut gb = Gb::new(92);
    let x = gb.seq(h, -1.0, 1.0);
    let w1 = gb.weight(&[k2, h], -0.4, 0.4);
    let y = gb.op(Op::Linear { transpose_b: true, bias: false, act: Some(UnaryOp::Tanh), residual: false }, &[x, w1]);
    let wg = gb.weight(&[ff, k2], -0.4, 0.4);
    let wu = gb.weight(&[ff, k2], -0.4, 0.4);
    let wgu = gb.op(Op::Concat { axis: 0, n: 2 }, &[wg, wu]);
    let gl = gb.op(Op::GatedLinear { act: UnaryOp::Silu }, &[y, wgu]);
    let wl = gb.weight(&[VOCAB, ff], -0.5, 0.5);
    let logits = gb.op(Op::Matmul { transpose_b: true }, &[gl, wl]);
    gb.g.outputs = vec![logits];
    gb.g.meta.insert("max_context".into(), "32".into());
    let set = |g: &mut Graph, n: NodeId, l: Layout| {
        if let Op::Weight { layout, .. } = &mut g.g[n].op {
            *layout = l;
        }
    };
    let dense = gb.g.clone();
    let mut sparse = gb.g.clone();
    set(&mut sparse, w1, Layout::Sparse24 { int8: false });
    set(&mut sparse, wg, Layout::Sparse24 { int8: true });
    set(&mut sparse, wu, Layout::Sparse24 { int8: true });
    set(&mut sparse, wl, Layout::Sparse24 { int8: true });
    llmc_ir::verify(&sparse).unwrap();
    let e = layouts_match(&sparse, &dense, &gb.w, "sparse");
    assert!(e > 1e-3, "2:4 graph evaluates like the dense one ({e:e})");

    // W8A8: activations quantized per token inside the kernels (K = 44: a partial 16-byte
    // step and an f32 tail of the activation quantizer; K = 40, 28: odd step counts).
    let mut w8 = gb.g.clone();
    for n in [w1, wg, wu, wl] {
        set(&mut w8, n, Layout::W8A8);
    }
    llmc_ir::verify(&w8).unwrap();
    let e = layouts_match(&w8, &dense, &gb.w, "w8a8");
    assert!(e > 1e-4, "w8a8 graph evaluates like the dense one ({e:e})");
    // W4A8 groups of 32 (K = 44, 40, 28: partial last blocks) and 64 (shared across blocks).
    let mut w4 = gb.g.clone();
    set(&mut w4, w1, Layout::W4A8 { group: 32 });
    set(&mut w4, wg, Layout::W4A8 { group: 64 });
    set(&mut w4, wu, Layout::W4A8 { group: 64 });
    set(&mut w4, wl, Layout::W4A8 { group: 32 });
    llmc_ir::verify(&w4).unwrap();
    let e = layouts_match(&w4, &dense, &gb.w, "w4a8");
    assert!(e > 1e-3, "w4a8 graph evaluates like the dense one ({e:e})");

    // Calibrated rows: codes that round-to-nearest would not give (every code moved by one
    // toward zero where possible, scales x1.1) for the int4 w1 and the int8 lm weight.
    struct Src<'a> {
        inner: &'a HashMap<String, Vec<f32>>,
        rows: HashMap<String, (Layout, Vec<QRow>)>,
    }
    impl llmc_ir::WeightSource for Src<'_> {
        fn load(&self, name: &str, ty: &llmc_ir::TensorType) -> llmc_ir::Result<Vec<f32>> {
            self.inner.load(name, ty)
        }
        fn quantized(&self, name: &str, layout: Layout) -> Option<Vec<QRow>> {
            self.rows.get(name).filter(|(l, _)| *l == layout).map(|(_, r)| r.clone())
        }
    }
    let mut calib = gb.g.clone();
    let l4 = Layout::Int4 { group: 32, asym: false };
    set(&mut calib, w1, l4);
    set(&mut calib, wl, Layout::Int8);
    let mut rows = HashMap::new();
    for (n, l, k) in [(w1, l4, h), (wl, Layout::Int8, ff)] {
        let Op::Weight { name, .. } = gb.g.op(n) else { unreachable!() };
        let data = &gb.w[name];
        let r: Vec<QRow> = data
            .chunks(k)
            .map(|row| {
                let mut q = llmc_ir::quant::quantize_row(l, row);
                q.q.iter_mut().for_each(|c| *c -= c.signum());
                // (int4 scales are stored as halves: a calibrated source supplies halves.)
                q.scales.iter_mut().for_each(|s| *s = if l == l4 { llmc_ir::quant::half_scale(*s * 1.1) } else { *s * 1.1 });
                q
            })
            .collect();
        rows.insert(name.clone(), (l, r));
    }
    let src = Src { inner: &gb.w, rows };
    layouts_match(&calib, &dense, &src, "calibrated");
    // The supplied rows are what the interpreter computes with (not round-to-nearest).
    let rtn = Interpreter::new(&gb.w).run(&calib, &[1, 2]).unwrap().remove(0);
    let cal = Interpreter::new(&src).run(&calib, &[1, 2]).unwrap().remove(0);
    assert!(rtn.data.iter().zip(&cal.data).any(|(a, b)| (a - b).abs() > 1e-3));
}
