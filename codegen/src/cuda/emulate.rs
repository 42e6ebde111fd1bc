//! A test-only emulator of the generated kernels' MLIR text, so kernel numerics are checked on a
//! machine without a GPU: warps run in lockstep (32 lanes, an active mask for `scf.if`/`scf.for`
//! divergence), `gpu.shuffle xor` exchanges between lanes, `gpu.barrier` (only at the top level,
//! as the kernels use it) is honoured by running every warp of a block up to it before any goes
//! on, and loads and stores go to byte buffers. It knows exactly the subset `text.rs` emits.
//! `exp` is exact here where the GPU's `ex2.approx` is within 2 ulp.
//! [`run_artifact`] executes a whole CUDA artifact's step list this way (tests/cuda.rs compares
//! the logits with transformers' on the golden fixtures).

use std::collections::HashMap;

const W: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    I(i64),
    F(f32),
    B(bool),
    P(usize, i64),
    V8([f32; 8]),
    U,
}

impl V {
    fn i(self) -> i64 {
        match self {
            V::I(x) => x,
            other => panic!("expected an integer, got {other:?}"),
        }
    }
    fn f(self) -> f32 {
        match self {
            V::F(x) => x,
            other => panic!("expected a float, got {other:?}"),
        }
    }
    fn b(self) -> bool {
        match self {
            V::B(x) => x,
            other => panic!("expected a bool, got {other:?}"),
        }
    }
    fn v8(self) -> [f32; 8] {
        match self {
            V::V8(x) => x,
            other => panic!("expected a vector, got {other:?}"),
        }
    }
}

#[derive(Debug)]
enum Stmt {
    Op(String),
    For { res: Option<String>, iv: String, lb: String, ub: String, st: String, carried: Vec<(String, String)>, body: Vec<Stmt> },
    If { res: Option<String>, cond: String, then: Vec<Stmt>, els: Vec<Stmt> },
    Yield(Vec<String>),
    Barrier,
}

fn parse_block(lines: &[&str], i: &mut usize) -> Vec<Stmt> {
    let mut out = Vec::new();
    while *i < lines.len() {
        let l = lines[*i].trim();
        *i += 1;
        if l == "}" || l == "} else {" {
            *i -= 1;
            return out;
        }
        if l.is_empty() || l == "gpu.return" {
            continue;
        }
        if l == "gpu.barrier" {
            out.push(Stmt::Barrier);
        } else if l.starts_with("scf.yield") {
            let body = l.trim_start_matches("scf.yield").split(':').next().unwrap_or("");
            out.push(Stmt::Yield(body.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()));
        } else if l.contains("scf.for ") {
            let (res, rest) = match l.split_once(" = scf.for ") {
                Some((r, rest)) if !r.starts_with("scf") => (Some(r.split(':').next().unwrap().to_string()), rest),
                _ => (None, l.trim_start_matches("scf.for ")),
            };
            let (iv, rest) = rest.split_once(" = ").unwrap();
            let (lb, rest) = rest.split_once(" to ").unwrap();
            let (ub, rest) = rest.split_once(" step ").unwrap();
            let st = rest.split_whitespace().next().unwrap().to_string();
            let mut carried = Vec::new();
            if let Some(a) = rest.split_once("iter_args(") {
                let inner = a.1.split_once(')').unwrap().0;
                for pair in inner.split(", ") {
                    let (c, init) = pair.split_once(" = ").unwrap();
                    carried.push((c.to_string(), init.to_string()));
                }
            }
            let body = parse_block(lines, i);
            assert_eq!(lines[*i].trim(), "}");
            *i += 1;
            out.push(Stmt::For { res, iv: iv.into(), lb: lb.into(), ub: ub.into(), st, carried, body });
        } else if l.contains("scf.if ") {
            let (res, rest) = match l.split_once(" = scf.if ") {
                Some((r, rest)) => (Some(r.to_string()), rest),
                None => (None, l.trim_start_matches("scf.if ")),
            };
            let cond = rest.split_whitespace().next().unwrap().to_string();
            let then = parse_block(lines, i);
            let mut els = Vec::new();
            if lines[*i].trim() == "} else {" {
                *i += 1;
                els = parse_block(lines, i);
            }
            assert_eq!(lines[*i].trim(), "}");
            *i += 1;
            out.push(Stmt::If { res, cond, then, els });
        } else {
            out.push(Stmt::Op(l.to_string()));
        }
    }
    out
}

/// A parsed kernel.
pub struct Kernel {
    body: Vec<Stmt>,
    params: Vec<String>,
    shared: Vec<(String, usize)>,
}

pub fn parse(text: &str) -> Kernel {
    let lines: Vec<&str> = text.lines().collect();
    let f = lines.iter().position(|l| l.contains("gpu.func @")).expect("a gpu.func");
    let sig = lines[f];
    let inner = &sig[sig.find('(').unwrap() + 1..sig.rfind(')').unwrap()];
    let params = inner.split(", ").map(|p| p.split(':').next().unwrap().trim().to_string()).collect();
    let mut shared = Vec::new();
    for l in &lines[..f] {
        if let Some(r) = l.trim().strip_prefix("llvm.mlir.global internal @") {
            let name = r.split('(').next().unwrap().to_string();
            let arr = l.split("!llvm.array<").nth(1).unwrap();
            let (n, ty) = arr.split_once(" x ").unwrap();
            let size = if ty.starts_with("i32") || ty.starts_with("f32") { 4 } else { panic!("{ty}") };
            shared.push((name, n.parse::<usize>().unwrap() * size));
        }
    }
    let mut i = f + 1;
    let body = parse_block(&lines, &mut i);
    Kernel { body, params, shared }
}

struct Ctx<'a> {
    mem: &'a mut Vec<Vec<u8>>,
    shared_ids: HashMap<String, usize>,
    block: i64,
    bdim: i64,
    warp: i64,
}

type Env = HashMap<String, Vec<V>>;

fn get(env: &Env, name: &str, lane: usize) -> V {
    let name = name.trim();
    env.get(name).unwrap_or_else(|| panic!("undefined value {name}"))[lane]
}

fn set(env: &mut Env, name: &str, lane: usize, v: V) {
    env.entry(name.trim().to_string()).or_insert_with(|| vec![V::U; W])[lane] = v;
}

fn elem_size(ty: &str) -> i64 {
    match ty.trim() {
        "f32" | "i32" => 4,
        "f16" | "bf16" => 2,
        "i8" => 1,
        t if t.starts_with("vector<8x") => 8 * elem_size(&t[9..t.len() - 1]),
        t => panic!("element type {t}"),
    }
}

fn load(mem: &[Vec<u8>], p: V, ty: &str) -> V {
    let V::P(b, off) = p else { panic!("load from {p:?}") };
    let m = &mem[b];
    let at = off as usize;
    let bytes = |n: usize| -> &[u8] { m.get(at..at + n).unwrap_or_else(|| panic!("load {ty} at {at} out of bounds of buffer {b} ({} bytes)", m.len())) };
    match ty {
        "f32" => V::F(f32::from_le_bytes(bytes(4).try_into().unwrap())),
        "i32" => V::I(i32::from_le_bytes(bytes(4).try_into().unwrap()) as i64),
        "i8" => V::I(bytes(1)[0] as i8 as i64),
        "f16" => V::F(half::f16::from_le_bytes(bytes(2).try_into().unwrap()).to_f32()),
        "bf16" => V::F(half::bf16::from_le_bytes(bytes(2).try_into().unwrap()).to_f32()),
        t if t.starts_with("vector<8x") => {
            let e = &t[9..t.len() - 1];
            let s = elem_size(e);
            let mut out = [0f32; 8];
            for (i, o) in out.iter_mut().enumerate() {
                *o = load(mem, V::P(b, off + i as i64 * s), e).f();
            }
            V::V8(out)
        }
        t => panic!("load type {t}"),
    }
}

fn store(mem: &mut [Vec<u8>], p: V, v: V, ty: &str) {
    let V::P(b, off) = p else { panic!("store to {p:?}") };
    let at = off as usize;
    let len = mem[b].len();
    let bytes: Vec<u8> = match ty {
        "f32" => v.f().to_le_bytes().to_vec(),
        "i32" => (v.i() as i32).to_le_bytes().to_vec(),
        t => panic!("store type {t}"),
    };
    assert!(at + bytes.len() <= len, "store {ty} at {at} out of bounds of buffer {b} ({len} bytes)");
    mem[b][at..at + bytes.len()].copy_from_slice(&bytes);
}

fn args_of(s: &str) -> Vec<String> {
    s.split(',').map(|x| x.trim().to_string()).collect()
}

/// Executes one op line for the active lanes.
fn op(c: &mut Ctx, env: &mut Env, line: &str, mask: &[bool; W]) {
    if let Some(rest) = line.strip_prefix("llvm.store ") {
        let (vals, ty) = rest.split_once(" : ").unwrap();
        let a = args_of(vals);
        let ty = ty.split(',').next().unwrap().trim();
        for l in (0..W).filter(|&l| mask[l]) {
            let (v, p) = (get(env, &a[0], l), get(env, &a[1], l));
            store(c.mem, p, v, ty);
        }
        return;
    }
    let (lhs, rhs) = line.split_once(" = ").unwrap_or_else(|| panic!("cannot emulate `{line}`"));
    if rhs.starts_with("gpu.shuffle xor") {
        let (res, _) = lhs.split_once(", ").unwrap();
        let a = args_of(rhs.trim_start_matches("gpu.shuffle xor").split(" : ").next().unwrap());
        let vals: Vec<V> = (0..W).map(|l| if mask[l] { get(env, &a[0], l) } else { V::U }).collect();
        for l in (0..W).filter(|&l| mask[l]) {
            let off = get(env, &a[1], l).i() as usize;
            let src = l ^ off;
            assert!(mask[src], "shuffle from an inactive lane");
            set(env, res, l, vals[src]);
        }
        return;
    }
    let name = rhs.split_whitespace().next().unwrap();
    let after = rhs[name.len()..].trim();
    for l in (0..W).filter(|&l| mask[l]) {
        let g = |n: &str| get(env, n, l);
        let v = match name {
            "arith.constant" => {
                let (lit, ty) = after.split_once(" : ").unwrap();
                if ty.starts_with("vector") {
                    V::V8([0.0; 8])
                } else if ty == "f32" {
                    V::F(f32::from_bits(u32::from_str_radix(lit.trim_start_matches("0x"), 16).unwrap()))
                } else {
                    V::I(lit.parse().unwrap())
                }
            }
            "gpu.thread_id" => V::I(c.warp * W as i64 + l as i64),
            "gpu.block_id" => V::I(c.block),
            "gpu.block_dim" => V::I(c.bdim),
            "arith.index_cast" | "arith.extsi" | "arith.trunci" | "arith.extui" => {
                let x = g(after.split_whitespace().next().unwrap()).i();
                match name {
                    "arith.trunci" => V::I(x as i32 as i64),
                    "arith.extui" => V::I(x as u8 as i64),
                    _ => V::I(x),
                }
            }
            "arith.sitofp" => V::F(g(after.split_whitespace().next().unwrap()).i() as f32),
            "arith.extf" => g(after.split_whitespace().next().unwrap()),
            "arith.negf" => V::F(-g(after.split_whitespace().next().unwrap()).f()),
            "arith.cmpi" | "arith.cmpf" => {
                let (pred, rest) = after.split_once(", ").unwrap();
                let a = args_of(rest.split(" : ").next().unwrap());
                let (x, y) = (g(&a[0]), g(&a[1]));
                V::B(if name == "arith.cmpi" {
                    let (x, y) = (x.i(), y.i());
                    match pred {
                        "slt" => x < y,
                        "sle" => x <= y,
                        "sge" => x >= y,
                        "eq" => x == y,
                        p => panic!("cmpi {p}"),
                    }
                } else {
                    let (x, y) = (x.f(), y.f());
                    match pred {
                        "olt" => x < y,
                        "ogt" => x > y,
                        p => panic!("cmpf {p}"),
                    }
                })
            }
            "arith.select" => {
                let a = args_of(after.split(" : ").next().unwrap());
                if g(&a[0]).b() {
                    g(&a[1])
                } else {
                    g(&a[2])
                }
            }
            "llvm.getelementptr" => {
                let p = after.split('[').next().unwrap();
                let idx = after.split('[').nth(1).unwrap().split(']').next().unwrap();
                let ty = after.rsplit(", ").next().unwrap();
                let V::P(b, off) = g(p) else { panic!("gep on a non-pointer") };
                V::P(b, off + g(idx).i() * elem_size(ty))
            }
            "llvm.load" => {
                let p = after.split_whitespace().next().unwrap();
                let ty = after.rsplit("-> ").next().unwrap();
                load(c.mem, g(p), ty)
            }
            "llvm.mlir.addressof" => {
                let n = after.trim_start_matches('@').split_whitespace().next().unwrap();
                V::P(c.shared_ids[n], 0)
            }
            "llvm.inline_asm" => {
                let x = g(after.split("\" ").nth(2).unwrap_or_else(|| after.rsplit("\" ").next().unwrap()).split(" : ").next().unwrap()).f();
                if after.contains("ex2.approx") {
                    V::F(x.exp2())
                } else if after.contains("cvt.rni") {
                    V::F(x.round_ties_even())
                } else {
                    V::F(x.sqrt())
                }
            }
            "llvm.intr.fma(" | "llvm.intr.fma" => unreachable!(),
            "llvm.extractelement" => {
                let v = after.split('[').next().unwrap();
                let i = after.split('[').nth(1).unwrap().split(" : ").next().unwrap();
                V::F(g(v).v8()[g(i).i() as usize])
            }
            _ if name.starts_with("llvm.intr.fma(") => unreachable!(),
            _ => {
                let (ops, ty) = after.rsplit_once(" : ").unwrap();
                let a = args_of(ops);
                if ty.starts_with("vector") {
                    let (x, y) = (g(&a[0]).v8(), g(&a[1]).v8());
                    let mut o = [0f32; 8];
                    for i in 0..8 {
                        o[i] = match name {
                            "arith.mulf" => x[i] * y[i],
                            "arith.addf" => x[i] + y[i],
                            n => panic!("vector {n}"),
                        };
                    }
                    V::V8(o)
                } else if ty == "f32" {
                    let (x, y) = (g(&a[0]).f(), g(&a[1]).f());
                    V::F(match name {
                        "arith.addf" => x + y,
                        "arith.subf" => x - y,
                        "arith.mulf" => x * y,
                        "arith.divf" => x / y,
                        "arith.maximumf" => {
                            if x.is_nan() || y.is_nan() {
                                f32::NAN
                            } else {
                                x.max(y)
                            }
                        }
                        n => panic!("f32 op {n}"),
                    })
                } else if ty == "i1" {
                    match name {
                        "arith.andi" => V::B(g(&a[0]).b() && g(&a[1]).b()),
                        "arith.ori" => V::B(g(&a[0]).b() || g(&a[1]).b()),
                        n => panic!("i1 op {n}"),
                    }
                } else {
                    let (x, y) = (g(&a[0]).i(), g(&a[1]).i());
                    V::I(match name {
                        "arith.addi" => x + y,
                        "arith.subi" => x - y,
                        "arith.muli" => x * y,
                        "arith.divsi" => x / y,
                        "arith.remsi" => x % y,
                        "arith.minsi" => x.min(y),
                        "arith.maxsi" => x.max(y),
                        n => panic!("i64 op {n}"),
                    })
                }
            }
        };
        set(env, lhs, l, v);
    }
}

fn fma_line(line: &str) -> Option<(String, Vec<String>)> {
    let (lhs, rhs) = line.split_once(" = ")?;
    let inner = rhs.strip_prefix("llvm.intr.fma(")?.split(')').next()?;
    Some((lhs.to_string(), args_of(inner)))
}

/// Runs `stmts` for the lanes in `mask`; returns the yielded value names per lane's last yield.
fn exec(c: &mut Ctx, env: &mut Env, stmts: &[Stmt], mask: &[bool; W]) -> Option<Vec<String>> {
    let mut yielded = None;
    for s in stmts {
        if !mask.iter().any(|&m| m) {
            break;
        }
        match s {
            Stmt::Op(line) => {
                if let Some((lhs, a)) = fma_line(line) {
                    for l in (0..W).filter(|&l| mask[l]) {
                        let v = get(env, &a[0], l).f().mul_add(get(env, &a[1], l).f(), get(env, &a[2], l).f());
                        set(env, &lhs, l, V::F(v));
                    }
                } else {
                    op(c, env, line, mask)
                }
            }
            Stmt::Yield(v) => yielded = Some(v.clone()),
            Stmt::Barrier => panic!("gpu.barrier below the top level"),
            Stmt::If { res, cond, then, els } => {
                let mut tm = [false; W];
                let mut em = [false; W];
                for l in (0..W).filter(|&l| mask[l]) {
                    if get(env, cond, l).b() {
                        tm[l] = true;
                    } else {
                        em[l] = true;
                    }
                }
                let ty = exec(c, env, then, &tm);
                let ey = exec(c, env, els, &em);
                if let Some(r) = res {
                    for l in 0..W {
                        let src = if tm[l] { ty.as_ref() } else if em[l] { ey.as_ref() } else { None };
                        if let Some(y) = src {
                            let v = get(env, &y[0], l);
                            set(env, r, l, v);
                        }
                    }
                }
            }
            Stmt::For { res, iv, lb, ub, st, carried, body } => {
                let mut active = *mask;
                for l in (0..W).filter(|&l| mask[l]) {
                    let v = get(env, lb, l);
                    set(env, iv, l, v);
                    for (cn, init) in carried {
                        let v = get(env, init, l);
                        set(env, cn, l, v);
                    }
                }
                loop {
                    for l in 0..W {
                        if active[l] && get(env, iv, l).i() >= get(env, ub, l).i() {
                            active[l] = false;
                        }
                    }
                    if !active.iter().any(|&a| a) {
                        break;
                    }
                    let y = exec(c, env, body, &active);
                    for l in (0..W).filter(|&l| active[l]) {
                        if let Some(y) = &y {
                            let vals: Vec<V> = y.iter().map(|n| get(env, n, l)).collect();
                            for ((cn, _), v) in carried.iter().zip(vals) {
                                set(env, cn, l, v);
                            }
                        }
                        let next = get(env, iv, l).i() + get(env, st, l).i();
                        set(env, iv, l, V::I(next));
                    }
                }
                if let Some(r) = res {
                    for l in (0..W).filter(|&l| mask[l]) {
                        for (i, (cn, _)) in carried.iter().enumerate() {
                            let v = get(env, cn, l);
                            set(env, &format!("{r}#{i}"), l, v);
                        }
                    }
                }
            }
        }
    }
    yielded
}

/// Launches `k` over `grid` blocks of `block` threads with `bufs` (one byte buffer per buffer
/// parameter, in order) and `s`, `p`.
pub fn launch(k: &Kernel, grid: u64, block: u32, bufs: &mut Vec<Vec<u8>>, s: i64, p: i64) {
    let nbuf = k.params.len() - 2;
    assert_eq!(bufs.len(), nbuf, "buffer count");
    assert_eq!(block as usize % W, 0);
    let nwarps = block as usize / W;
    // Top-level segments between barriers.
    let mut segments: Vec<&[Stmt]> = Vec::new();
    let mut start = 0;
    for (i, st) in k.body.iter().enumerate() {
        if matches!(st, Stmt::Barrier) {
            segments.push(&k.body[start..i]);
            start = i + 1;
        }
    }
    segments.push(&k.body[start..]);
    for b in 0..grid as i64 {
        let base = bufs.len();
        let mut shared_ids = HashMap::new();
        for (name, bytes) in &k.shared {
            shared_ids.insert(name.clone(), bufs.len());
            bufs.push(vec![0u8; *bytes]);
        }
        let mut envs: Vec<Env> = (0..nwarps)
            .map(|_| {
                let mut e = Env::new();
                for (i, pn) in k.params.iter().enumerate().take(nbuf) {
                    e.insert(pn.clone(), vec![V::P(i, 0); W]);
                }
                e.insert("%s".into(), vec![V::I(s); W]);
                e.insert("%p".into(), vec![V::I(p); W]);
                e
            })
            .collect();
        for seg in &segments {
            for (w, env) in envs.iter_mut().enumerate() {
                let mut c = Ctx { mem: bufs, shared_ids: shared_ids.clone(), block: b, bdim: block as i64, warp: w as i64 };
                exec(&mut c, env, seg, &[true; W]);
            }
        }
        bufs.truncate(base);
    }
}

/// Runs a CUDA artifact's step list in the emulator, one chunk of ids after another (each at most
/// `max_chunk`), and returns every chunk's logits (`[len, vocab]`). `mlir[k]` is kernel `k`'s
/// MLIR text (the `.mlir` files `--emit ptx DIR` writes).
pub fn run_artifact(a: &abi::Artifact, mlir: &[String], chunks: &[&[u32]]) -> Vec<Vec<f32>> {
    use abi::BufferDecl;
    let h = &a.header;
    let progs: Vec<Kernel> = mlir.iter().map(|t| parse(t)).collect();
    assert_eq!(progs.len(), h.kernels.len());
    let mut arena = vec![0u8; h.arena_bytes as usize];
    let mut states: Vec<Vec<u8>> = h.states.iter().map(|s| vec![0u8; s.bytes as usize]).collect();
    let data = a.data();
    let region = |b: u32| -> (u8, usize, usize) {
        match &h.buffers[b as usize] {
            BufferDecl::Data { offset, bytes, .. } => (0, *offset as usize, *bytes as usize),
            BufferDecl::Arena { offset, bytes } => (1, *offset as usize, *bytes as usize),
            BufferDecl::State { index } => (2, *index as usize, h.states[*index as usize].bytes as usize),
            BufferDecl::Microkernels { .. } => panic!("a CUDA artifact has no CPU microkernel table"),
        }
    };
    let (_, in_off, _) = region(h.input);
    let (_, out_off, _) = region(h.output);
    let vocab = h.vocab_size as usize;
    let mut past = 0usize;
    let mut out = Vec::new();
    for ids in chunks {
        let s = ids.len();
        for (i, id) in ids.iter().enumerate() {
            arena[in_off + 4 * i..in_off + 4 * i + 4].copy_from_slice(&(*id as i32).to_le_bytes());
        }
        for st in &h.steps {
            let k = st.kernel as usize;
            let regions: Vec<(u8, usize, usize)> = st.args.iter().map(|&b| region(b)).collect();
            let mut bufs: Vec<Vec<u8>> = regions
                .iter()
                .map(|&(kind, off, len)| match kind {
                    0 => data[off..off + len].to_vec(),
                    1 => arena[off..off + len].to_vec(),
                    _ => states[off].clone(),
                })
                .collect();
            let l = h.kernels[k].launch.expect("a launch shape");
            launch(&progs[k], l.grid(s as u64, past as u64), l.block, &mut bufs, s as i64, past as i64);
            for (&(kind, off, len), b) in regions.iter().zip(bufs) {
                match kind {
                    1 => arena[off..off + len].copy_from_slice(&b),
                    2 => states[off] = b,
                    _ => {}
                }
            }
        }
        let logits = arena[out_off..out_off + 4 * s * vocab].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.push(logits);
        past += s;
    }
    out
}
