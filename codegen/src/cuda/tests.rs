//! The generated MLIR of every op family parses, verifies and lowers to PTX for every
//! architecture (ptxas itself runs in tests/cuda.rs).

use llmc_ir::{BinaryOp, DType, Dim, Graph, Layout, NodeId, Op, ReduceOp, TensorType, UnaryOp};

use super::kernels::kernel;
use super::lower::{extract_ptx, Lowerer, ARCHS};
use super::text::Elem;
use Dim::{N, S, T};

fn weight(g: &mut Graph, name: &str, shape: Vec<Dim>) -> NodeId {
    g.add(Op::Weight { name: name.into(), stored: DType::F32, layout: Layout::Dense }, &[], Some(TensorType::f32(shape))).unwrap()
}

fn input(g: &mut Graph, shape: Vec<Dim>) -> NodeId {
    // Any f32 activation: a gather from a table by the token ids, reshaped as needed.
    let ids = g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![S]))).unwrap();
    let inner: usize = shape[1..].iter().map(|d| d.as_const().unwrap()).product();
    let table = weight(g, "table", vec![N(10), N(inner)]);
    let x = g.add(Op::Gather, &[table, ids], None).unwrap();
    g.add(Op::Reshape, &[x], Some(TensorType::f32(shape))).unwrap()
}

/// Generates and lowers node `n` with operand storage `elems`; returns the PTX per architecture.
fn lowers(l: &Lowerer, g: &Graph, n: NodeId, elems: &[Elem]) -> Vec<String> {
    let k = kernel(g, n, elems, 16, 8).unwrap_or_else(|e| panic!("{e}")).expect("a kernel");
    l.parse(&k.name, &k.mlir).unwrap_or_else(|e| panic!("{e}\n{}", k.mlir));
    ARCHS
        .iter()
        .map(|arch| {
            let ptx = l.ptx(&k.name, &k.mlir, arch).unwrap_or_else(|e| panic!("{e}\n{}", k.mlir));
            assert!(ptx.contains(&format!(".entry {}", k.name)), "{}: no entry in\n{ptx}", k.name);
            assert!(ptx.contains(&format!(".target {arch}")), "{}: PTX not for {arch}", k.name);
            assert!(!ptx.contains("__nv_"), "{}: libdevice call left in the PTX", k.name);
            ptx
        })
        .collect()
}

fn f32s(n: usize) -> Vec<Elem> {
    vec![Elem::F32; n]
}

#[test]
fn elementwise_and_movement_kernels_lower() {
    let l = Lowerer::new();
    let mut g = Graph::new("t");
    let x = input(&mut g, vec![S, N(4), N(8)]);
    for u in UnaryOp::ALL {
        let n = g.add(Op::Unary(u), &[x], None).unwrap();
        lowers(&l, &g, n, &f32s(1));
    }
    let b = weight(&mut g, "b", vec![N(4), N(1)]);
    for op in BinaryOp::ALL {
        let n = g.add(Op::Binary(op), &[x, b], None).unwrap();
        lowers(&l, &g, n, &[Elem::F32, Elem::F16]);
    }
    let t = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[x], None).unwrap();
    lowers(&l, &g, t, &f32s(1));
    let s = g.add(Op::Slice { axis: 2, start: 2, end: 6 }, &[x], None).unwrap();
    lowers(&l, &g, s, &f32s(1));
    let c = g.add(Op::Concat { axis: 2, n: 2 }, &[x, s], None).unwrap();
    lowers(&l, &g, c, &f32s(2));
    let pos = g.add(Op::Positions, &[], None).unwrap();
    lowers(&l, &g, pos, &[]);
    let f = g.add(Op::Const { values: vec![1.0, 0.1] }, &[], Some(TensorType::f32(vec![N(2)]))).unwrap();
    let r = g.add(Op::Rope { rotary_dim: 4 }, &[x, f], None).unwrap();
    let k = kernel(&g, r, &f32s(2), 16, 8).unwrap().unwrap();
    assert_eq!(k.tables.len(), 2, "rope passes cos and sin tables");
    lowers(&l, &g, r, &f32s(2));
    let kv = g.add(Op::KvConcat { state: "k0".into() }, &[x], None).unwrap();
    lowers(&l, &g, kv, &f32s(1));
}

#[test]
fn row_kernels_lower() {
    let l = Lowerer::new();
    let mut g = Graph::new("t");
    let x = input(&mut g, vec![S, N(40)]);
    let w = weight(&mut g, "w", vec![N(40)]);
    let bb = weight(&mut g, "bb", vec![N(40)]);
    let rn = g.add(Op::RmsNorm { eps: 1e-6 }, &[x, w], None).unwrap();
    lowers(&l, &g, rn, &[Elem::F32, Elem::F16]);
    let ln = g.add(Op::LayerNorm { eps: 1e-5 }, &[x, w, bb], None).unwrap();
    lowers(&l, &g, ln, &[Elem::F32, Elem::BF16, Elem::BF16]);
    for r in ReduceOp::ALL {
        let n = g.add(Op::Reduce(r), &[x], None).unwrap();
        lowers(&l, &g, n, &f32s(1));
    }
    // softmax and the causal mask over a symbolic last axis
    let q = input(&mut g, vec![S, N(2), N(8)]);
    let k = g.add(Op::KvConcat { state: "k0".into() }, &[q], None).unwrap();
    let q2 = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[q], None).unwrap();
    let k2 = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[k], None).unwrap();
    let sc = g.add(Op::Matmul { transpose_b: true }, &[q2, k2], None).unwrap();
    assert_eq!(g.ty(sc).shape, vec![N(2), S, T]);
    lowers(&l, &g, sc, &f32s(2));
    let m = g.add(Op::CausalMask { window: Some(3) }, &[sc], None).unwrap();
    lowers(&l, &g, m, &f32s(1));
    let sm = g.add(Op::Softmax, &[m], None).unwrap();
    lowers(&l, &g, sm, &f32s(1));
    let v2 = g.add(Op::Matmul { transpose_b: false }, &[sm, k2], None).unwrap();
    lowers(&l, &g, v2, &f32s(2));
}

#[test]
fn product_kernels_lower_dense_and_packed() {
    let l = Lowerer::new();
    let mut g = Graph::new("t");
    let x = input(&mut g, vec![S, N(64)]);
    let w = weight(&mut g, "w", vec![N(48), N(64)]);
    let bias = weight(&mut g, "bias", vec![N(48)]);
    let res = input(&mut g, vec![S, N(48)]);
    let lin = Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Gelu), residual: true };
    let n = g.add(lin.clone(), &[x, w, bias, res], None).unwrap();
    for e in [Elem::F32, Elem::F16, Elem::BF16, Elem::Packed(Layout::Int8), Elem::Packed(Layout::Int4 { group: 32, asym: true }), Elem::Packed(Layout::Int4 { group: 64, asym: false })] {
        lowers(&l, &g, n, &[Elem::F32, e, Elem::F16, Elem::F32]);
    }
    let wt = weight(&mut g, "wt", vec![N(64), N(48)]);
    let n2 = g.add(Op::Linear { transpose_b: false, bias: false, act: None, residual: false }, &[x, wt], None).unwrap();
    lowers(&l, &g, n2, &[Elem::F32, Elem::F16]);
    let gu = weight(&mut g, "gu", vec![N(96), N(64)]);
    let gl = g.add(Op::GatedLinear { act: UnaryOp::Silu }, &[x, gu], None).unwrap();
    lowers(&l, &g, gl, &[Elem::F32, Elem::F16]);
    lowers(&l, &g, gl, &[Elem::F32, Elem::Packed(Layout::Int4 { group: 32, asym: false })]);
    let mm = g.add(Op::Matmul { transpose_b: true }, &[x, w], None).unwrap();
    lowers(&l, &g, mm, &[Elem::F32, Elem::Packed(Layout::Int8)]);
    // The 2:4 and activation-quantized layouts: packed and (W8A8/W4A8) as dequantized f32,
    // which takes the scalar path with the per-row activation quantization.
    for layout in [Layout::Sparse24 { int8: false }, Layout::Sparse24 { int8: true }, Layout::W8A8, Layout::W4A8 { group: 32 }] {
        let wq = g.add(Op::Weight { name: format!("wq_{layout}"), stored: DType::F32, layout }, &[], Some(TensorType::f32(vec![N(48), N(64)]))).unwrap();
        let guq = g.add(Op::Weight { name: format!("guq_{layout}"), stored: DType::F32, layout }, &[], Some(TensorType::f32(vec![N(96), N(64)]))).unwrap();
        let lq = g.add(lin.clone(), &[x, wq, bias, res], None).unwrap();
        let glq = g.add(Op::GatedLinear { act: UnaryOp::Silu }, &[x, guq], None).unwrap();
        let mq = g.add(Op::Matmul { transpose_b: true }, &[x, wq], None).unwrap();
        let mut es = vec![Elem::Packed(layout)];
        if layout.quantizes_activations() {
            es.extend([Elem::F32, Elem::F16]);
        }
        for e in es {
            let ptx = lowers(&l, &g, lq, &[Elem::F32, e, Elem::F16, Elem::F32]);
            if layout.quantizes_activations() {
                assert!(ptx[0].contains("cvt.rni.f32.f32"), "{layout}: no activation rounding in\n{}", ptx[0]);
            }
            lowers(&l, &g, glq, &[Elem::F32, e]);
            lowers(&l, &g, mq, &[Elem::F32, e]);
        }
    }
    // A packed operand anywhere else is an error, not a panic.
    let u = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
    let e = kernel(&g, u, &[Elem::Packed(Layout::Int8)], 16, 8).err().expect("packed operand of exp refused");
    assert!(e.to_string().contains("exp"), "{e}");
}

#[test]
fn attention_and_moe_lower() {
    let l = Lowerer::new();
    let mut g = Graph::new("t");
    let q = input(&mut g, vec![S, N(4), N(40)]);
    let kx = input(&mut g, vec![S, N(2), N(40)]);
    let k = g.add(Op::KvConcat { state: "k0".into() }, &[kx], None).unwrap();
    let v = g.add(Op::KvConcat { state: "v0".into() }, &[kx], None).unwrap();
    for window in [None, Some(4)] {
        let a = g.add(Op::Attention { scale: 0.125, window, causal: true }, &[q, k, v], None).unwrap();
        lowers(&l, &g, a, &f32s(3));
    }
    // bidirectional, over the step's keys and over the cache
    for (kk, vv) in [(kx, kx), (k, v)] {
        let a = g.add(Op::Attention { scale: 0.125, window: None, causal: false }, &[q, kk, vv], None).unwrap();
        lowers(&l, &g, a, &f32s(3));
    }
    let x = input(&mut g, vec![S, N(16)]);
    let router = weight(&mut g, "router", vec![N(4), N(16)]);
    let gu = weight(&mut g, "gu", vec![N(4), N(24), N(16)]);
    let dn = weight(&mut g, "dn", vec![N(4), N(16), N(12)]);
    let m = g.add(Op::Moe { top_k: 2, act: UnaryOp::Silu }, &[x, router, gu, dn], None).unwrap();
    let kern = kernel(&g, m, &[Elem::F32, Elem::F16, Elem::F16, Elem::F16], 16, 8).unwrap().unwrap();
    assert_eq!(kern.scratch_bytes, 8 * 2 * 12 * 4, "max_chunk rows x top_k x I floats");
    lowers(&l, &g, m, &[Elem::F32, Elem::F16, Elem::F16, Elem::F16]);
}

#[test]
fn ptx_string_is_unescaped() {
    let printed = r#"gpu.binary @m [#gpu.object<#nvvm.target<chip = "sm_80">, "//\0A.version 8.0\0A.visible .entry k(\22x\22)\09ret;\0A">]"#;
    assert_eq!(extract_ptx(printed).unwrap(), "//\n.version 8.0\n.visible .entry k(\"x\")\tret;\n");
}

#[test]
fn bad_mlir_is_an_error_naming_the_kernel() {
    let l = Lowerer::new();
    let e = l.ptx("broken_7", "module { gpu.module @m { not.an.op } }", "sm_80").unwrap_err();
    assert!(e.to_string().contains("broken_7"), "{e}");
}

// ---- numerics: the emulated kernels against the reference interpreter ----

mod numerics {
    use std::collections::HashMap;

    use llmc_ir::{BinaryOp, DType, Dim, Graph, Interpreter, Layout, NodeId, Op, TensorType, UnaryOp};

    use super::super::emulate;
    use super::super::kernels::kernel;
    use super::super::text::Elem;
    use Dim::{N, S};

    const CTX: usize = 16;
    const CHUNK: usize = 8;

    fn rand_vals(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        g: Graph,
        w: HashMap<String, Vec<f32>>,
        layouts: HashMap<String, Layout>,
        seed: u64,
        /// Quantized weights stored packed (else as their dequantized f32 values).
        packed: bool,
    }

    impl Case {
        fn new() -> Case {
            let mut g = Graph::new("t");
            g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![S]))).unwrap();
            Case { g, w: HashMap::new(), layouts: HashMap::new(), seed: 1, packed: true }
        }
        fn ids(&self) -> NodeId {
            self.g.g.node_indices().find(|&n| matches!(self.g.op(n), Op::Input { .. })).unwrap()
        }
        fn weight(&mut self, name: &str, shape: Vec<usize>, layout: Layout) -> NodeId {
            self.seed += 1;
            self.w.insert(name.into(), rand_vals(shape.iter().product(), self.seed));
            self.layouts.insert(name.into(), layout);
            let ty = TensorType::f32(shape.into_iter().map(N).collect());
            self.g.add(Op::Weight { name: name.into(), stored: DType::F32, layout }, &[], Some(ty)).unwrap()
        }
        /// An activation `[S, inner..]` (a gathered row per token, reshaped).
        fn act(&mut self, name: &str, inner: Vec<usize>) -> NodeId {
            let n: usize = inner.iter().product();
            let t = self.weight(name, vec![20, n], Layout::Dense);
            let ids = self.ids();
            let x = self.g.add(Op::Gather, &[t, ids], None).unwrap();
            let mut shape = vec![S];
            shape.extend(inner.into_iter().map(N));
            self.g.add(Op::Reshape, &[x], Some(TensorType::f32(shape))).unwrap()
        }
        fn state(&mut self, name: &str, inner: Vec<usize>) {
            let mut shape = vec![N(CTX)];
            shape.extend(inner.into_iter().map(N));
            self.g.states.push(llmc_ir::StateDecl::new(name, TensorType::f32(shape), llmc_ir::StateKind::CONTIGUOUS_KV));
        }

        /// Runs the interpreter over `chunks` of ids and the kernel for `n` on the last chunk
        /// (operands as the interpreter computed them; weights stored as `welem`); returns the
        /// max abs difference of the kernel's output from the interpreter's.
        fn check(&mut self, n: NodeId, chunks: &[&[i32]], welem: Elem) -> f32 {
            let ins = self.g.inputs(n);
            let mut outs: Vec<NodeId> = ins.clone();
            outs.push(n);
            self.g.outputs = outs;
            let mut interp = Interpreter::new(&self.w);
            let mut res = Vec::new();
            let mut p = 0;
            for (i, c) in chunks.iter().enumerate() {
                res = interp.run(&self.g, c).unwrap();
                if i + 1 < chunks.len() {
                    p += c.len();
                }
            }
            let s = chunks.last().unwrap().len();
            let elems: Vec<Elem> = ins
                .iter()
                .map(|&x| match self.g.op(x) {
                    Op::Weight { layout, .. } if self.packed && *layout != Layout::Dense => Elem::Packed(*layout),
                    Op::Weight { .. } => welem,
                    _ if self.g.ty(x).dtype == DType::I32 => Elem::I32,
                    _ => Elem::F32,
                })
                .collect();
            let k = kernel(&self.g, n, &elems, CTX, CHUNK).unwrap().unwrap();
            let mut bufs: Vec<Vec<u8>> = Vec::new();
            for (i, &x) in ins.iter().enumerate() {
                let vals = &res[i].data;
                bufs.push(match (self.g.op(x), elems[i]) {
                    (Op::Weight { name, .. }, Elem::Packed(l)) => {
                        let kdim = self.g.ty(x).shape[1].as_const().unwrap();
                        crate::packed::pack(l, &self.w[name], kdim).unwrap()
                    }
                    (_, Elem::F16) => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                    (_, Elem::I32) => vals.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
                    _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                });
            }
            let want = &res[ins.len()].data;
            let kv = matches!(self.g.op(n), Op::KvConcat { .. });
            let out_len = if kv { CTX * want.len() / (p + s) } else { want.len() };
            bufs.push(vec![0u8; out_len * 4]);
            for t in &k.tables {
                bufs.push(t.iter().flat_map(|v| v.to_le_bytes()).collect());
            }
            if k.scratch_bytes > 0 {
                bufs.push(vec![0u8; k.scratch_bytes as usize]);
            }
            let out_i = ins.len();
            let prog = emulate::parse(&k.mlir);
            emulate::launch(&prog, k.launch.grid(s as u64, p as u64), k.launch.block, &mut bufs, s as i64, p as i64);
            let got: Vec<f32> = bufs[out_i].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let (got, want) = if kv {
                let row = want.len() / (p + s);
                (got[p * row..(p + s) * row].to_vec(), want[p * row..].to_vec())
            } else {
                (got, want.clone())
            };
            assert_eq!(got.len(), want.len());
            got.iter().zip(&want).map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() }).fold(0.0, f32::max)
        }
    }

    const IDS: &[i32] = &[3, 1, 4, 1, 5];

    #[test]
    fn elementwise_kernels_match_the_interpreter() {
        let mut c = Case::new();
        let x = c.act("x", vec![3, 8]);
        for u in UnaryOp::ALL {
            let n = c.g.add(Op::Unary(u), &[x], None).unwrap();
            let e = c.check(n, &[IDS], Elem::F32);
            assert!(e < 2e-6, "{}: {e}", u.name());
        }
        let b = c.weight("b", vec![3, 1], Layout::Dense);
        for op in BinaryOp::ALL {
            let n = c.g.add(Op::Binary(op), &[x, b], None).unwrap();
            let e = c.check(n, &[IDS], Elem::F32);
            assert!(e < 1e-6, "{}: {e}", op.name());
        }
        for (name, op) in [
            ("transpose", Op::Transpose { perm: vec![1, 0, 2] }),
            ("slice", Op::Slice { axis: 2, start: 3, end: 7 }),
            ("causal", Op::Softmax),
        ] {
            let n = c.g.add(op, &[x], None).unwrap();
            assert_eq!(c.check(n, &[IDS], Elem::F32).min(1.0) < 1e-6, true, "{name}");
        }
        let y = c.act("y", vec![3, 2]);
        let cat = c.g.add(Op::Concat { axis: 2, n: 2 }, &[x, y], None).unwrap();
        assert_eq!(c.check(cat, &[IDS], Elem::F32), 0.0);
        let pos = c.g.add(Op::Positions, &[], None).unwrap();
        let tbl = c.weight("tbl", vec![CTX, 8], Layout::Dense);
        let pe = c.g.add(Op::Gather, &[tbl, pos], None).unwrap();
        assert_eq!(c.check(pe, &[&[1, 2], IDS], Elem::F32), 0.0, "gather by positions after 2 cached tokens");
        let f = c.g.add(Op::Const { values: vec![1.0, 0.3, 0.01] }, &[], Some(TensorType::f32(vec![N(3)]))).unwrap();
        let r = c.g.add(Op::Rope { rotary_dim: 6 }, &[x, f], None).unwrap();
        assert!(c.check(r, &[&[7], IDS], Elem::F32) < 1e-5);
        c.state("st", vec![3, 8]);
        let kv = c.g.add(Op::KvConcat { state: "st".into() }, &[x], None).unwrap();
        assert_eq!(c.check(kv, &[&[2, 2], IDS], Elem::F32), 0.0);
    }

    #[test]
    fn row_kernels_match_the_interpreter() {
        let mut c = Case::new();
        let x = c.act("x", vec![70]);
        let w = c.weight("w", vec![70], Layout::Dense);
        let b = c.weight("b", vec![70], Layout::Dense);
        let rn = c.g.add(Op::RmsNorm { eps: 1e-5 }, &[x, w], None).unwrap();
        assert!(c.check(rn, &[IDS], Elem::F32) < 1e-5);
        let ln = c.g.add(Op::LayerNorm { eps: 1e-5 }, &[x, w, b], None).unwrap();
        assert!(c.check(ln, &[IDS], Elem::F32) < 1e-5);
        for r in llmc_ir::ReduceOp::ALL {
            let n = c.g.add(Op::Reduce(r), &[x], None).unwrap();
            assert!(c.check(n, &[IDS], Elem::F32) < 1e-5, "{}", r.name());
        }
        let sm = c.g.add(Op::Softmax, &[x], None).unwrap();
        assert!(c.check(sm, &[IDS], Elem::F32) < 1e-6);
        // f16 weights: within f16 rounding of the f32 result
        assert!(c.check(rn, &[IDS], Elem::F16) < 5e-3);
    }

    #[test]
    fn products_match_the_interpreter_dense_f16_and_packed() {
        let mut c = Case::new();
        let x = c.act("x", vec![64]);
        let res = c.act("res", vec![24]);
        let bias = c.weight("bias", vec![24], Layout::Dense);
        for (name, layout) in [
            ("dense", Layout::Dense),
            ("int8", Layout::Int8),
            ("int4", Layout::Int4 { group: 32, asym: false }),
            ("int4a", Layout::Int4 { group: 32, asym: true }),
        ] {
            let w = c.weight(&format!("w_{name}"), vec![24, 64], layout);
            let op = Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Silu), residual: true };
            let n = c.g.add(op, &[x, w, bias, res], None).unwrap();
            let e = c.check(n, &[IDS], Elem::F32);
            assert!(e < 1e-4, "linear {name}: {e}");
            let gu = c.weight(&format!("gu_{name}"), vec![48, 64], layout);
            let gl = c.g.add(Op::GatedLinear { act: UnaryOp::GeluTanh }, &[x, gu], None).unwrap();
            let e = c.check(gl, &[IDS], Elem::F32);
            assert!(e < 1e-4, "gated_linear {name}: {e}");
            let mm = c.g.add(Op::Matmul { transpose_b: true }, &[x, w], None).unwrap();
            let e = c.check(mm, &[IDS], Elem::F32);
            assert!(e < 1e-4, "matmul {name}: {e}");
        }
        let w = c.weight("w16", vec![24, 64], Layout::Dense);
        let lin = c.g.add(Op::Linear { transpose_b: true, bias: false, act: None, residual: false }, &[x, w], None).unwrap();
        let e = c.check(lin, &[IDS], Elem::F16);
        assert!(e > 0.0 && e < 2e-2, "f16 weights round: {e}");
        let wt = c.weight("wt", vec![64, 24], Layout::Dense);
        let lin = c.g.add(Op::Linear { transpose_b: false, bias: false, act: None, residual: false }, &[x, wt], None).unwrap();
        assert!(c.check(lin, &[IDS], Elem::F32) < 1e-4);
        // odd K: the scalar path
        let xo = c.act("xo", vec![13]);
        let wo = c.weight("wo", vec![5, 13], Layout::Dense);
        let mo = c.g.add(Op::Matmul { transpose_b: true }, &[xo, wo], None).unwrap();
        assert!(c.check(mo, &[IDS], Elem::F32) < 1e-5);
    }

    /// A gather from a packed table (a tied embedding and LM head stored once) dequantizes the
    /// rows it reads exactly as the interpreter does, for every packed format and ragged widths.
    #[test]
    fn gather_from_packed_tables_matches_the_interpreter() {
        let mut c = Case::new();
        let ids = c.ids();
        for (name, layout, h) in [
            ("int8", Layout::Int8, 45),
            ("int4", Layout::Int4 { group: 32, asym: false }, 40),
            ("int4a", Layout::Int4 { group: 16, asym: true }, 75),
            ("w8a8", Layout::W8A8, 36),
            ("w4a8", Layout::W4A8 { group: 32 }, 64),
            ("s24", Layout::Sparse24 { int8: true }, 48),
        ] {
            let t = c.weight(&format!("t_{name}"), vec![20, h], layout);
            let x = c.g.add(Op::Gather, &[t, ids], None).unwrap();
            let e = c.check(x, &[IDS], Elem::F32);
            assert_eq!(e, 0.0, "gather from {name}");
        }
    }

    /// The products of one weight layout (linear with its epilogue, gated_linear, matmul) at
    /// reduction length `kd` match the interpreter; returns the largest error seen.
    fn products_of(c: &mut Case, name: &str, layout: Layout, kd: usize) -> f32 {
        let x = c.act(&format!("x_{name}"), vec![kd]);
        let res = c.act(&format!("res_{name}"), vec![24]);
        let bias = c.weight(&format!("bias_{name}"), vec![24], Layout::Dense);
        let w = c.weight(&format!("w_{name}"), vec![24, kd], layout);
        let op = Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Silu), residual: true };
        let n = c.g.add(op, &[x, w, bias, res], None).unwrap();
        let mut worst = 0f32;
        let e = c.check(n, &[IDS], Elem::F32);
        assert!(e < 1e-4, "linear {name} K={kd}: {e}");
        worst = worst.max(e);
        let gu = c.weight(&format!("gu_{name}"), vec![48, kd], layout);
        let gl = c.g.add(Op::GatedLinear { act: UnaryOp::GeluTanh }, &[x, gu], None).unwrap();
        let e = c.check(gl, &[IDS], Elem::F32);
        assert!(e < 1e-4, "gated_linear {name} K={kd}: {e}");
        worst = worst.max(e);
        let mm = c.g.add(Op::Matmul { transpose_b: true }, &[x, w], None).unwrap();
        let e = c.check(mm, &[IDS], Elem::F32);
        assert!(e < 1e-4, "matmul {name} K={kd}: {e}");
        worst.max(e)
    }

    #[test]
    fn sparse_and_activation_quantized_products_match_the_interpreter() {
        for packed in [true, false] {
            let mut c = Case::new();
            c.packed = packed;
            for (name, layout, kd) in [
                ("s24", Layout::Sparse24 { int8: false }, 64),
                ("s24_odd", Layout::Sparse24 { int8: false }, 44), // 11 groups of 4
                ("s24i8", Layout::Sparse24 { int8: true }, 64),
                ("s24i8_odd", Layout::Sparse24 { int8: true }, 36), // 9 groups of 4
                ("w8a8", Layout::W8A8, 64),                         // vec8 path when not packed
                ("w8a8_odd", Layout::W8A8, 44),
                ("w4a8", Layout::W4A8 { group: 32 }, 64),
                ("w4a8_partial", Layout::W4A8 { group: 32 }, 44), // a partial last group
                ("w4a8_g64", Layout::W4A8 { group: 64 }, 40),     // one partial group
            ] {
                let e = products_of(&mut c, &format!("{name}_{packed}"), layout, kd);
                eprintln!("{name} packed={packed}: max abs err {e:e}");
            }
        }
    }

    /// The activation quantization is really there: a W8A8 product differs from the same
    /// product over an int8 weight by more than the tolerance, and an all-zero row gives 0.
    #[test]
    fn activation_quantization_is_applied_and_zero_rows_are_zero() {
        let mut c = Case::new();
        let x = c.act("x", vec![40]);
        let w8 = c.weight("w8", vec![16, 40], Layout::W8A8);
        let data = c.w["w8"].clone();
        let wi = c.weight("wi", vec![16, 40], Layout::Int8);
        c.w.insert("wi".into(), data);
        let a = c.g.add(Op::Matmul { transpose_b: true }, &[x, w8], None).unwrap();
        let b = c.g.add(Op::Matmul { transpose_b: true }, &[x, wi], None).unwrap();
        c.g.outputs = vec![a, b];
        let out = Interpreter::new(&c.w).run(&c.g, IDS).unwrap();
        let d = out[0].data.iter().zip(&out[1].data).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(d > 1e-3, "W8A8 and int8 products agree to {d}: the test would not see a missing activation quantization");
        assert!(c.check(a, &[IDS], Elem::F32) < 1e-4);
        // A zero activation row (amax = 0): codes and scale 0, so the product is exactly 0.
        let z = c.g.add(Op::Binary(BinaryOp::Mul), &[x, x], None).unwrap();
        let zero = c.weight("zero", vec![1], Layout::Dense);
        c.w.insert("zero".into(), vec![0.0]);
        let xz = c.g.add(Op::Binary(BinaryOp::Mul), &[z, zero], None).unwrap();
        let az = c.g.add(Op::Matmul { transpose_b: true }, &[xz, w8], None).unwrap();
        assert_eq!(c.check(az, &[IDS], Elem::F32), 0.0);
    }

    #[test]
    fn attention_matches_the_interpreter_with_cache_gqa_and_window() {
        for window in [None, Some(3)] {
            let mut c = Case::new();
            let q = c.act("q", vec![4, 40]);
            let kx = c.act("k", vec![2, 40]);
            let vx = c.act("v", vec![2, 40]);
            c.state("kc", vec![2, 40]);
            c.state("vc", vec![2, 40]);
            let k = c.g.add(Op::KvConcat { state: "kc".into() }, &[kx], None).unwrap();
            let v = c.g.add(Op::KvConcat { state: "vc".into() }, &[vx], None).unwrap();
            let a = c.g.add(Op::Attention { scale: 0.3, window, causal: true }, &[q, k, v], None).unwrap();
            let e = c.check(a, &[&[2, 9, 6], IDS], Elem::F32);
            assert!(e < 1e-5, "window {window:?}: {e}");
        }
    }

    #[test]
    fn bidirectional_attention_matches_the_interpreter() {
        // Encoders: every key visible, keys of this step ([S, ..]) or of the whole cache.
        for cached in [false, true] {
            let mut c = Case::new();
            let q = c.act("q", vec![4, 40]);
            let mut k = c.act("k", vec![2, 40]);
            let mut v = c.act("v", vec![2, 40]);
            if cached {
                c.state("kc", vec![2, 40]);
                c.state("vc", vec![2, 40]);
                k = c.g.add(Op::KvConcat { state: "kc".into() }, &[k], None).unwrap();
                v = c.g.add(Op::KvConcat { state: "vc".into() }, &[v], None).unwrap();
            }
            let a = c.g.add(Op::Attention { scale: 0.3, window: None, causal: false }, &[q, k, v], None).unwrap();
            let e = c.check(a, &[&[2, 9, 6], IDS], Elem::F32);
            assert!(e < 1e-5, "cached {cached}: {e}");
        }
    }

    #[test]
    fn moe_matches_the_interpreter() {
        let mut c = Case::new();
        let x = c.act("x", vec![16]);
        let router = c.weight("router", vec![4, 16], Layout::Dense);
        let gu = c.weight("gu", vec![4, 24, 16], Layout::Dense);
        let dn = c.weight("dn", vec![4, 16, 12], Layout::Dense);
        let m = c.g.add(Op::Moe { top_k: 2, act: UnaryOp::Silu }, &[x, router, gu, dn], None).unwrap();
        let e = c.check(m, &[IDS], Elem::F32);
        assert!(e < 1e-5, "moe: {e}");
    }
}
