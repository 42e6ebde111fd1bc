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
    let n = g.add(lin, &[x, w, bias, res], None).unwrap();
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
        let a = g.add(Op::Attention { scale: 0.125, window }, &[q, k, v], None).unwrap();
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
