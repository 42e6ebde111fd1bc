//! Test support: a deterministic RNG, small graph builders, a random graph generator over every
//! op kind, and the soundness oracle (outputs before and after a pass agree in the reference
//! interpreter on random token ids and weights, bitwise; NaN equals NaN).

use std::collections::HashMap;

use llmc_ir::{self as ir, BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp};

/// SplitMix64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in `[-1, 1)`.
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

fn dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::N(d)).collect()
}

/// `ids = input` and `x = gather(weight "embed" f32[vocab, h], ids)`.
pub fn embed(g: &mut Graph, vocab: usize, h: usize) -> (NodeId, NodeId) {
    let ids = g.add(Op::Input { name: "ids".into() }, &[], Some(TensorType::new(DType::I32, vec![Dim::S]))).unwrap();
    let table = weight(g, "embed", &[vocab, h]);
    let x = g.add(Op::Gather, &[table, ids], None).unwrap();
    (ids, x)
}

pub fn weight(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.add(Op::Weight { name: name.into(), stored: DType::F32, layout: Default::default() }, &[], Some(TensorType::f32(dims(shape)))).unwrap()
}

pub fn constant(g: &mut Graph, shape: &[usize], values: Vec<f32>) -> NodeId {
    g.add(Op::Const { values }, &[], Some(TensorType::f32(dims(shape)))).unwrap()
}

/// Random weights for every weight the graph names, seeded by the name.
pub fn weights_for(gs: &[&Graph]) -> HashMap<String, Vec<f32>> {
    let mut w = HashMap::new();
    for g in gs {
        for n in g.g.node_indices() {
            if let Op::Weight { name, .. } = g.op(n) {
                let seed = name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                let mut rng = Rng::new(seed);
                let len = g.ty(n).static_numel().unwrap();
                // Mostly uniform values, with signed zeros and other edge values mixed in so that
                // a rewrite that is only approximately right is caught.
                let mut value = || match rng.below(16) {
                    0 => -0.0,
                    1 => 0.0,
                    2 => 1.0,
                    _ => rng.f32(),
                };
                w.entry(name.clone()).or_insert_with(|| (0..len).map(|_| value()).collect());
            }
        }
    }
    w
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Runs both graphs for consecutive steps of `steps[i]` tokens (random ids below 8, the embedding
/// vocabulary of every test graph) and panics unless all outputs agree bitwise.
pub fn assert_same_outputs(before: &Graph, after: &Graph, steps: &[usize]) {
    let w = weights_for(&[before, after]);
    let mut ia = ir::Interpreter::new(&w);
    let mut ib = ir::Interpreter::new(&w);
    let mut rng = Rng::new(42);
    for (step, &s) in steps.iter().enumerate() {
        let ids: Vec<i32> = (0..s).map(|_| rng.below(8) as i32).collect();
        let a = ia.run(before, &ids).unwrap_or_else(|e| panic!("before, step {step}: {e}\n{}", ir::print(before)));
        let b = ib.run(after, &ids).unwrap_or_else(|e| panic!("after, step {step}: {e}\n{}", ir::print(after)));
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.shape, y.shape, "output {i}, step {step}");
            assert!(
                same_bits(&x.data, &y.data),
                "output {i} differs at step {step}:\n{:?}\n{:?}\nbefore:\n{}after:\n{}",
                x.data,
                y.data,
                ir::print(before),
                ir::print(after)
            );
        }
    }
}

/// A random shape-preserving-element-count reshape target for `t`.
fn reshape_target(rng: &mut Rng, t: &TensorType) -> TensorType {
    let mut s = t.shape.clone();
    match rng.below(5) {
        0 => {}
        1 => s.push(Dim::N(1)),
        2 => {
            if let Some(i) = s.iter().position(|d| *d == Dim::N(1)) {
                s.remove(i);
            }
        }
        3 => {
            let r = s.len();
            if r >= 2 {
                if let (Dim::N(a), Dim::N(b)) = (s[r - 2], s[r - 1]) {
                    s.truncate(r - 2);
                    s.push(Dim::N(a * b));
                }
            }
        }
        _ => {
            if let Some(i) = s.iter().position(|d| matches!(d, Dim::N(n) if n % 2 == 0)) {
                let n = s[i].as_const().unwrap();
                s[i] = Dim::N(n / 2);
                s.insert(i, Dim::N(2));
            }
        }
    }
    TensorType::new(t.dtype, s)
}

fn random_values(rng: &mut Rng, n: usize) -> Vec<f32> {
    match rng.below(6) {
        0 => vec![1.0; n],
        1 => vec![-0.0; n],
        2 => vec![0.0; n],
        3 => (0..n).map(|_| [2.0, -1.5, f32::INFINITY, 0.5][rng.below(4)]).collect(),
        _ => (0..n).map(|_| rng.f32()).collect(),
    }
}

/// A random verified graph with embedding, weights (some repeated), consts (some all-one or
/// all-zero), every op kind, duplicated nodes, dead code and up to two KV-cache appends.
pub fn random_graph(seed: u64) -> Graph {
    let mut rng = Rng::new(seed);
    let mut g = Graph::new(format!("rand{seed}"));
    g.states.push(ir::StateDecl::new("kv.0", TensorType::f32(dims(&[8, 4])), ir::StateKind::CONTIGUOUS_KV));
    g.states.push(ir::StateDecl::new("kv.1", TensorType::f32(dims(&[8, 2, 2])), ir::StateKind::CONTIGUOUS_KV));
    let (ids, x) = embed(&mut g, 8, 4);
    let mut pool = vec![x];
    if rng.chance(0.3) {
        let pos = g.add(Op::Positions, &[], None).unwrap();
        let table = weight(&mut g, "embed", &[8, 4]);
        pool.push(g.add(Op::Gather, &[table, pos], None).unwrap());
    }
    let mut written = [false, false];
    let weights: [(&str, &[usize]); 4] = [("w.a", &[4, 4]), ("w.b", &[4]), ("w.c", &[2, 4]), ("w.d", &[1, 4])];
    let const_shapes: [&[usize]; 6] = [&[4], &[1, 4], &[4, 4], &[2, 4], &[1], &[2, 2, 4]];
    let target = 10 + rng.below(30);
    let mut attempts = 0;
    let mut added = 0;
    while added < target && attempts < 2000 {
        attempts += 1;
        let pick = |rng: &mut Rng, pool: &[NodeId]| pool[rng.below(pool.len())];
        let a = pick(&mut rng, &pool);
        let b = pick(&mut rng, &pool);
        let r = match rng.below(21) {
            0 | 1 => g.add(Op::Unary(UnaryOp::ALL[rng.below(UnaryOp::ALL.len())]), &[a], None),
            2..=4 => g.add(Op::Binary(BinaryOp::ALL[rng.below(4)]), &[a, b], None),
            5 => g.add(Op::Reduce(ReduceOp::ALL[rng.below(3)]), &[a], None),
            6 => g.add(Op::Softmax, &[a], None),
            7 => g.add(Op::Matmul { transpose_b: rng.chance(0.5) }, &[a, b], None),
            8 => {
                let r = g.ty(a).rank();
                let mut perm: Vec<usize> = (0..r).collect();
                if !rng.chance(0.25) {
                    for i in (1..r).rev() {
                        perm.swap(i, rng.below(i + 1));
                    }
                }
                g.add(Op::Transpose { perm }, &[a], None)
            }
            9 => {
                let t = reshape_target(&mut rng, g.ty(a));
                g.add(Op::Reshape, &[a], Some(t))
            }
            10 => {
                let t = g.ty(a).clone();
                let axes: Vec<usize> = (0..t.rank()).filter(|&i| t.shape[i].is_const()).collect();
                if axes.is_empty() {
                    continue;
                }
                let axis = axes[rng.below(axes.len())];
                let n = t.shape[axis].as_const().unwrap();
                let start = rng.below(n);
                let end = start + 1 + rng.below(n - start);
                g.add(Op::Slice { axis, start, end }, &[a], None)
            }
            11 => {
                // A duplicate of an existing node (a CSE target).
                let node = g.node(a).clone();
                if matches!(node.op, Op::KvConcat { .. }) {
                    continue;
                }
                let ins = g.inputs(a);
                Ok(g.add_typed(node.op, &ins, node.ty))
            }
            12 => {
                let shape = const_shapes[rng.below(const_shapes.len())];
                let n = shape.iter().product();
                let values = random_values(&mut rng, n);
                Ok(constant(&mut g, shape, values))
            }
            13 => {
                let (name, shape) = weights[rng.below(weights.len())];
                Ok(weight(&mut g, name, shape))
            }
            14 => {
                let t = g.ty(a).clone();
                let which = if t.shape == [Dim::S, Dim::N(4)] {
                    0
                } else if t.shape == [Dim::S, Dim::N(2), Dim::N(2)] {
                    1
                } else {
                    continue;
                };
                if written[which] {
                    continue;
                }
                written[which] = true;
                g.add(Op::KvConcat { state: format!("kv.{which}") }, &[a], None)
            }
            15 => {
                let t = g.ty(a).clone();
                if t.rank() != 3 || t.shape[0] != Dim::S {
                    continue;
                }
                let Some(d) = t.shape[2].as_const() else { continue };
                let rd = if d % 2 == 0 && rng.chance(0.5) { d } else { 2 };
                let f: Vec<f32> = (0..rd / 2).map(|_| rng.f32() * 0.5).collect();
                let fc = constant(&mut g, &[rd / 2], f);
                g.add(Op::Rope { rotary_dim: rd }, &[a, fc], None)
            }
            16 => {
                let window = if rng.chance(0.5) { Some(1 + rng.below(3)) } else { None };
                g.add(Op::CausalMask { window }, &[a], None)
            }
            17 => {
                // Bait for the identities: `a op splat` or `splat op a`, splat in {1, -0, 0}.
                if g.ty(a).dtype != DType::F32 {
                    continue;
                }
                let v = [1.0, -0.0, 0.0][rng.below(3)];
                let c = if rng.chance(0.5) {
                    constant(&mut g, &[1], vec![v])
                } else {
                    let shape = g.ty(a).shape.clone();
                    let Some(n) = g.ty(a).static_numel() else { continue };
                    let t = TensorType::f32(shape);
                    g.add(Op::Const { values: vec![v; n] }, &[], Some(t)).unwrap()
                };
                let op = Op::Binary(BinaryOp::ALL[rng.below(4)]);
                if rng.chance(0.5) {
                    g.add(op, &[a, c], None)
                } else {
                    g.add(op, &[c, a], None)
                }
            }
            19 | 20 => {
                // A chain of two transposes (or reshapes) on a rank >= 3 value when there is one.
                let a = pool.iter().copied().filter(|&n| g.ty(n).rank() >= 3).nth(rng.below(4)).unwrap_or(a);
                let mut t = a;
                for _ in 0..2 {
                    if rng.chance(0.5) {
                        let r = g.ty(t).rank();
                        let mut perm: Vec<usize> = (0..r).collect();
                        for i in (1..r).rev() {
                            perm.swap(i, rng.below(i + 1));
                        }
                        t = g.add(Op::Transpose { perm }, &[t], None).unwrap();
                    } else {
                        let ty = reshape_target(&mut rng, g.ty(t));
                        t = g.add(Op::Reshape, &[t], Some(ty)).unwrap();
                    }
                    pool.push(t);
                }
                Ok(t)
            }
            _ => {
                // Attention over a KV-cache append: softmax(mask(q k^T)) v.
                let Some(&kv) = pool.iter().find(|&&n| g.ty(n).shape == [Dim::T, Dim::N(4)]) else { continue };
                if g.ty(a).shape != [Dim::S, Dim::N(4)] {
                    continue;
                }
                let window = if rng.chance(0.5) { Some(1 + rng.below(3)) } else { None };
                let s = g.add(Op::Matmul { transpose_b: true }, &[a, kv], None).unwrap();
                let m = g.add(Op::CausalMask { window }, &[s], None).unwrap();
                let p = g.add(Op::Softmax, &[m], None).unwrap();
                pool.extend([s, m, p]);
                g.add(Op::Matmul { transpose_b: false }, &[p, kv], None)
            }
        };
        if let Ok(n) = r {
            pool.push(n);
            added += 1;
        }
    }
    let mut outs = vec![*pool.last().unwrap()];
    for _ in 0..rng.below(3) {
        outs.push(pool[rng.below(pool.len())]);
    }
    if rng.chance(0.2) {
        outs.push(ids);
    }
    g.outputs = outs;
    ir::verify(&g).unwrap_or_else(|e| panic!("random_graph({seed}) is invalid: {e}\n{}", ir::print(&g)));
    g
}

#[test]
fn random_graphs_cover_the_op_set() {
    let mut names = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let g = random_graph(seed);
        // The generated graph must run.
        assert_same_outputs(&g, &g, &[3, 2]);
        for n in g.g.node_indices() {
            names.insert(match g.op(n) {
                Op::Unary(_) => "unary",
                Op::Binary(_) => "binary",
                Op::Reduce(_) => "reduce",
                o => o.name(),
            });
        }
    }
    for want in [
        "input",
        "positions",
        "weight",
        "const",
        "gather",
        "unary",
        "binary",
        "reduce",
        "softmax",
        "matmul",
        "transpose",
        "reshape",
        "slice",
        "rope",
        "causal_mask",
        "kv_concat",
    ] {
        assert!(names.contains(want), "random graphs never contain `{want}`: {names:?}");
    }
}
