//! llmc's graph IR: a typed dataflow graph on petgraph.
//!
//! Processing order inside this crate mirrors its use: [`types`] (dtypes, symbolic shapes),
//! [`op`] (the op set and its type rules), [`graph`] (the petgraph-backed graph and its builder
//! API), [`verify`], [`print`] / [`parse`] (the text form, `parse(print(g)) == g`), and
//! [`interp`], the reference interpreter that every pass and backend is checked against.

pub mod error;
pub mod graph;
pub mod interp;
pub mod op;
pub mod parse;
pub mod print;
pub mod quant;
pub mod threads;
pub mod types;
pub mod verify;

pub use error::{IrError, Result};
pub use graph::{Graph, KvLayout, Node, NodeId, StateDecl, StateKind};
pub use interp::{Interpreter, Prefetch, Tensor, WeightSource};
pub use op::{BinaryOp, Op, ReduceOp, UnaryOp};
pub use parse::parse;
pub use print::print;
pub use types::{Bindings, DType, Dim, Layout, TensorType};
pub use verify::verify;

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph using every op kind, with awkward attribute values.
    fn every_op() -> Graph {
        use Dim::*;
        let mut g = Graph::new("every-op_1.0");
        g.meta.insert("note".into(), "quotes \" and \\ and\nnewline".into());
        g.states.push(StateDecl::new("cache.0.k", TensorType::f32(vec![N(16), N(2), N(4)]), StateKind::CONTIGUOUS_KV));
        let f = |shape: Vec<Dim>| TensorType::f32(shape);
        let ids = g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![S]))).unwrap();
        let pos = g.add(Op::Positions, &[], None).unwrap();
        let emb = g.add(Op::Weight { name: "emb".into(), stored: DType::BF16, layout: Layout::Dense }, &[], Some(f(vec![N(10), N(8)]))).unwrap();
        let x = g.add(Op::Gather, &[emb, ids], None).unwrap();
        let pe = g.add(Op::Gather, &[emb, pos], None).unwrap();
        let x = g.add(Op::Binary(BinaryOp::Add), &[x, pe], None).unwrap();
        let c = g
            .add(Op::Const { values: vec![-0.0, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0xffc0_0001), 1e-30, 3.5, -2.0, 7e20] }, &[], Some(f(vec![N(8)])))
            .unwrap();
        let x = g.add(Op::Binary(BinaryOp::Mul), &[x, c], None).unwrap();
        let w8 = g.add(Op::Weight { name: "w".into(), stored: DType::F32, layout: Layout::Dense }, &[], Some(f(vec![N(8)]))).unwrap();
        let b8 = g.add(Op::Weight { name: "b".into(), stored: DType::F16, layout: Layout::Dense }, &[], Some(f(vec![N(8)]))).unwrap();
        let n1 = g.add(Op::RmsNorm { eps: 1e-6 }, &[x, w8], None).unwrap();
        let n2 = g.add(Op::LayerNorm { eps: 1e-5 }, &[n1, w8, b8], None).unwrap();
        let m = g.add(Op::Reduce(ReduceOp::Max), &[n2], None).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Sub), &[n2, m], None).unwrap();
        let y = g.add(Op::Unary(UnaryOp::GeluTanh), &[y], None).unwrap();
        let wl = g.add(Op::Weight { name: "wl".into(), stored: DType::F32, layout: Layout::Int4 { group: 4, asym: true } }, &[], Some(f(vec![N(16), N(8)]))).unwrap();
        let bl = g.add(Op::Weight { name: "bl".into(), stored: DType::F32, layout: Layout::Dense }, &[], Some(f(vec![N(16)]))).unwrap();
        let l = g.add(Op::Linear { transpose_b: true, bias: true, act: Some(UnaryOp::Silu), residual: false }, &[y, wl, bl], None).unwrap();
        let gl = g.add(Op::GatedLinear { act: UnaryOp::Silu }, &[y, wl], None).unwrap();
        let cat = g.add(Op::Concat { axis: 1, n: 2 }, &[gl, gl], None).unwrap();
        let l = g.add(Op::Binary(BinaryOp::Add), &[l, cat], None).unwrap();
        let q = g.add(Op::Slice { axis: 1, start: 0, end: 8 }, &[l], None).unwrap();
        let q = g.add(Op::Reshape, &[q], Some(f(vec![S, N(2), N(4)]))).unwrap();
        let fr = g.add(Op::Const { values: vec![1.0, 0.01] }, &[], Some(f(vec![N(2)]))).unwrap();
        let q = g.add(Op::Rope { rotary_dim: 4 }, &[q, fr], None).unwrap();
        let k = g.add(Op::KvConcat { state: "cache.0.k".into() }, &[q], None).unwrap();
        let a = g.add(Op::Attention { scale: 0.5, window: Some(3), causal: true }, &[q, k, k], None).unwrap();
        let a = g.add(Op::Attention { scale: 0.25, window: None, causal: false }, &[a, q, q], None).unwrap();
        let qt = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[a], None).unwrap();
        let kt = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[k], None).unwrap();
        let sc = g.add(Op::Matmul { transpose_b: true }, &[qt, kt], None).unwrap();
        let sc = g.add(Op::CausalMask { window: None }, &[sc], None).unwrap();
        let sc = g.add(Op::Softmax, &[sc], None).unwrap();
        let o = g.add(Op::Matmul { transpose_b: false }, &[sc, kt], None).unwrap();
        let o = g.add(Op::Unary(UnaryOp::Rsqrt), &[o], None).unwrap();
        g.outputs.push(o);
        g.outputs.push(l);
        g
    }

    #[test]
    fn text_roundtrip_is_exact() {
        let g = every_op();
        verify(&g).unwrap();
        let text = print(&g);
        let back = parse(&text).unwrap();
        verify(&back).unwrap();
        assert!(back == g, "parse(print(g)) != g\n{text}");
        assert_eq!(print(&back), text);
        assert!(text.contains("nan_ffc00001"), "NaN keeps its bits: {text}");
    }

    #[test]
    fn equality_sees_const_bits() {
        let g = every_op();
        let mut h = g.clone();
        let c = h.g.node_indices().find(|&n| matches!(h.op(n), Op::Const { values } if values.len() == 8)).unwrap();
        if let Op::Const { values } = &mut h.g[c].op {
            values[0] = 0.0; // was -0.0
        }
        assert!(g != h, "-0.0 and 0.0 consts differ");
        assert!(g == g.clone(), "a graph with a NaN const equals itself");
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = print(&every_op()).replace("rms_norm", "rms_normal");
        match parse(&text) {
            Err(IrError::Parse { line, msg }) => assert!(line > 1 && msg.contains("rms_normal"), "{line}: {msg}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
        assert!(parse("graph @x {\n  %0 = exp %9 : f32[S]\n  return %0\n}\n").is_err(), "undefined value");
    }

    #[test]
    fn verifier_rejects_wrong_types() {
        let mut g = every_op();
        let n = g.g.node_indices().find(|&n| matches!(g.op(n), Op::Softmax)).unwrap();
        g.g[n].ty = TensorType::f32(vec![Dim::S]);
        assert!(matches!(verify(&g), Err(IrError::Verify { .. })));
    }

    #[test]
    fn layouts_print_parse_and_verify() {
        let g = every_op();
        let text = print(&g);
        assert!(text.contains("weight {name = \"wl\", layout = int4_g4_asym}"), "{text}");
        assert!(parse(&text.replace("int4_g4_asym", "int4_g3")).is_err(), "odd group refused");
        assert!(parse(&text.replace("int4_g4_asym", "int7")).is_err(), "unknown layout refused");
        let g8 = parse(&text.replace("int4_g4_asym", "int8")).unwrap();
        assert!(g8.g.node_indices().any(|n| matches!(g8.op(n), Op::Weight { layout: Layout::Int8, .. })));
        // A layout on a 1-D weight is a verifier error.
        let bad = text.replace("weight {name = \"w\"}", "weight {name = \"w\", layout = int8}");
        assert_ne!(bad, text);
        assert!(matches!(parse(&bad).and_then(|g| verify(&g).map(|_| g)), Err(IrError::Verify { .. })), "1-D layout accepted");
    }

    #[test]
    fn state_kinds_print_parse_and_default_to_contiguous() {
        let g = every_op();
        let text = print(&g);
        assert!(text.contains("  state @cache.0.k : kv<contiguous> f32[16,2,4]\n"), "{text}");
        // Text written before states had kinds reads as a contiguous KV cache.
        let old = parse(&text.replace("kv<contiguous> ", "")).unwrap();
        assert_eq!(old.states, g.states);
        assert!(old == g);
        assert_eq!(old.states[0].kind, StateKind::Kv { layout: KvLayout::Contiguous });
        match parse(&text.replace("kv<contiguous>", "kv<paged>")) {
            Err(IrError::Parse { msg, .. }) => assert!(msg.contains("unknown KV-cache layout `paged`") && msg.contains("contiguous"), "{msg}"),
            other => panic!("an unknown layout parsed: {other:?}"),
        }
        for bad in ["kv<contiguous f32", "kv contiguous> f32", "kv<> f32", "ring<contiguous> f32"] {
            assert!(parse(&text.replace("kv<contiguous> f32", bad)).is_err(), "`{bad}` parsed");
        }
    }

    #[test]
    fn kv_state_of_follows_reshapes_to_the_state() {
        let mut g = every_op();
        let k = g.g.node_indices().find(|&n| matches!(g.op(n), Op::KvConcat { .. })).unwrap();
        let r = g.add(Op::Reshape, &[k], Some(TensorType::f32(vec![Dim::T, Dim::N(8)]))).unwrap();
        assert_eq!(g.kv_state_of(k).map(|s| s.name.as_str()), Some("cache.0.k"));
        assert_eq!(g.kv_state_of(r).map(|s| s.name.as_str()), Some("cache.0.k"));
        let q = g.inputs(k)[0];
        assert!(g.kv_state_of(q).is_none());
    }

    #[test]
    fn interpreter_runs_every_op_with_a_cache() {
        let g = every_op();
        let mut w = std::collections::HashMap::new();
        for n in g.g.node_indices() {
            if let Op::Weight { name, .. } = g.op(n) {
                let len = g.ty(n).static_numel().unwrap();
                w.insert(name.clone(), (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect::<Vec<f32>>());
            }
        }
        let mut it = Interpreter::new(&w);
        let a = it.run(&g, &[1, 2, 3]).unwrap();
        assert_eq!(a[0].shape, vec![2, 3, 4]);
        let b = it.run(&g, &[4]).unwrap();
        assert_eq!(b[0].shape, vec![2, 1, 4]);
        assert_eq!(it.past(), 4);
        assert!(it.run(&g, &[0; 13]).is_err(), "context of 16 exceeded");
    }
}
