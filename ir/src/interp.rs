//! The reference interpreter: executes any graph in f32 (with f64 accumulation in reductions and
//! matmuls), one op at a time, straight from the op semantics in [`op`](crate::op). It is the oracle
//! for passes and backends, written for clarity, not speed.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{IrError, Result};
use crate::graph::{Graph, KvLayout, NodeId, StateKind};
use crate::op::{Op, ReduceOp};
use crate::types::{Bindings, Layout, TensorType};

/// Supplies weight data by checkpoint name, converted to f32, row-major, `ty`'s element count.
pub trait WeightSource {
    fn load(&self, name: &str, ty: &TensorType) -> Result<Vec<f32>>;
    /// Calibrated quantized rows of `name` under `layout` (GPTQ codes and scales), when this
    /// source has them; `None` (the default) means round-to-nearest of [`WeightSource::load`]'s
    /// values. Every consumer (interpreter, packer) goes through [`crate::quant::rows_of`].
    fn quantized(&self, _name: &str, _layout: Layout) -> Option<Vec<crate::quant::QRow>> {
        None
    }
    /// Advice that the weights `names` are about to be [`load`](WeightSource::load)ed, in this
    /// order, each about once (the compiler calls it before streaming the weights out). A source
    /// backed by files may start reading them from disk ahead of the loads, so that disk reads
    /// overlap the caller's work instead of stalling each load. Advice only: it changes no result,
    /// and the returned guard stops any background reading when dropped. Default: nothing.
    fn prefetch(&self, _names: &[&str]) -> Prefetch {
        Prefetch::none()
    }
}

/// What [`WeightSource::prefetch`] started: dropping it stops the background reading (and waits
/// for it to stop).
#[must_use = "dropping the guard stops the prefetch"]
pub struct Prefetch {
    _guard: Option<Box<dyn Send>>,
}

impl Prefetch {
    /// No background reading.
    pub fn none() -> Prefetch {
        Prefetch { _guard: None }
    }
    /// Background reading stopped by `guard`'s `Drop`.
    pub fn new(guard: impl Send + 'static) -> Prefetch {
        Prefetch { _guard: Some(Box::new(guard)) }
    }
}

/// Weights from a map (tests, synthetic graphs).
impl WeightSource for HashMap<String, Vec<f32>> {
    fn load(&self, name: &str, ty: &TensorType) -> Result<Vec<f32>> {
        let v = self.get(name).ok_or_else(|| IrError::Weight { name: name.into(), msg: "not found".into() })?;
        if Some(v.len()) != ty.static_numel() {
            return Err(IrError::Weight { name: name.into(), msg: format!("{} elements, type {ty}", v.len()) });
        }
        Ok(v.clone())
    }
}

/// A concrete tensor. Integer tensors (ids, positions) are held in `data` as exact f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides of `in_shape` read as `out_shape` under NumPy broadcasting (0 on stretched dims).
fn bcast_strides(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let st = strides(in_shape);
    let off = out_shape.len() - in_shape.len();
    (0..out_shape.len())
        .map(|i| if i < off || in_shape[i - off] == 1 { 0 } else { st[i - off] })
        .collect()
}

/// Whether product `n` reads a [`Layout::W8A8`] weight (or a row-wise concat of them) as its
/// right-hand side, so its left-hand side is quantized per token.
pub fn acts_quantized(g: &Graph, n: NodeId) -> bool {
    if !matches!(g.op(n), Op::Matmul { .. } | Op::Linear { .. } | Op::GatedLinear { .. }) {
        return false;
    }
    let Some(&w) = g.inputs(n).get(1) else { return false };
    match g.op(w) {
        Op::Weight { layout, .. } => layout.quantizes_activations(),
        Op::Concat { axis: 0, .. } => {
            // Parts of one layout (as the packer requires); mixed concats are stored as f32.
            let ins = g.inputs(w);
            let first = ins.first().and_then(|&i| match g.op(i) {
                Op::Weight { layout, .. } => Some(*layout),
                _ => None,
            });
            first.is_some_and(|l| {
                l.quantizes_activations() && ins.iter().all(|&i| matches!(g.op(i), Op::Weight { layout, .. } if *layout == l))
            })
        }
        _ => false,
    }
}

/// Calls `f(out_index, [offsets into each input])` for every element of `out_shape` in row-major order.
fn for_each_index(out_shape: &[usize], in_strides: &[Vec<usize>], mut f: impl FnMut(usize, &[usize])) {
    let n: usize = out_shape.iter().product();
    let r = out_shape.len();
    let mut idx = vec![0usize; r];
    let mut offs = vec![0usize; in_strides.len()];
    for flat in 0..n {
        f(flat, &offs);
        for d in (0..r).rev() {
            idx[d] += 1;
            for (o, s) in offs.iter_mut().zip(in_strides) {
                *o += s[d];
            }
            if idx[d] < out_shape[d] {
                break;
            }
            for (o, s) in offs.iter_mut().zip(in_strides) {
                *o -= s[d] * out_shape[d];
            }
            idx[d] = 0;
        }
    }
}

/// Executes graphs step by step, keeping the KV-cache state between steps.
pub struct Interpreter<'w> {
    weights: &'w dyn WeightSource,
    cache: HashMap<String, Rc<Vec<f32>>>,
    state: HashMap<String, Vec<f32>>,
    past: usize,
}

impl<'w> Interpreter<'w> {
    pub fn new(weights: &'w dyn WeightSource) -> Self {
        Interpreter { weights, cache: HashMap::new(), state: HashMap::new(), past: 0 }
    }

    /// Tokens in the KV cache.
    pub fn past(&self) -> usize {
        self.past
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.state.clear();
        self.past = 0;
    }

    /// Runs one step over `ids` (the `S` new tokens) and returns the graph's outputs.
    pub fn run(&mut self, g: &Graph, ids: &[i32]) -> Result<Vec<Tensor>> {
        let b = Bindings { s: ids.len(), p: self.past };
        for st in &g.states {
            let cap = st.ty.shape[0].as_const().unwrap_or(0);
            if b.p + b.s > cap {
                return Err(IrError::Interp(format!("{} tokens exceed the context of {cap} (state @{})", b.p + b.s, st.name)));
            }
            let n = st.ty.static_numel().unwrap_or(0);
            self.state.entry(st.name.clone()).or_insert_with(|| vec![0.0; n]);
        }
        let mut vals: HashMap<NodeId, Rc<Tensor>> = HashMap::new();
        for n in g.topo_order()? {
            let ins: Vec<Rc<Tensor>> = g.inputs(n).iter().map(|i| vals[i].clone()).collect();
            let t = self.eval(g, n, &ins, ids, b)?;
            let want = g.ty(n).eval_shape(b);
            if t.shape != want {
                return Err(IrError::Interp(format!("{} produced shape {:?}, its type says {want:?}", g.op(n).name(), t.shape)));
            }
            vals.insert(n, Rc::new(t));
        }
        self.past += ids.len();
        Ok(g.outputs.iter().map(|o| (*vals[o]).clone()).collect())
    }

    fn eval(&mut self, g: &Graph, n: NodeId, ins: &[Rc<Tensor>], ids: &[i32], b: Bindings) -> Result<Tensor> {
        let ty = g.ty(n);
        // A W8A8 right-hand side: the left-hand side is quantized per row to int8 first.
        let act8;
        let ins = if acts_quantized(g, n) {
            let x = &ins[0];
            let k = *x.shape.last().unwrap_or(&1);
            let mut v = ins.to_vec();
            v[0] = Rc::new(Tensor::new(x.shape.clone(), crate::quant::fake_quant_act(&x.data, k)));
            act8 = v;
            &act8[..]
        } else {
            ins
        };
        let out_shape = ty.eval_shape(b);
        Ok(match g.op(n) {
            Op::Input { .. } => Tensor::new(vec![ids.len()], ids.iter().map(|&i| i as f32).collect()),
            Op::Positions => Tensor::new(vec![b.s], (0..b.s).map(|i| (b.p + i) as f32).collect()),
            Op::Weight { name, layout, .. } => {
                let key = if *layout == Layout::Dense { name.clone() } else { format!("{name}#{layout}") };
                let data = match self.cache.get(&key) {
                    Some(d) => d.clone(),
                    None => {
                        let d = self.weights.load(name, ty)?;
                        if Some(d.len()) != ty.static_numel() {
                            return Err(IrError::Weight { name: name.clone(), msg: format!("source gave {} elements for {ty}", d.len()) });
                        }
                        let k = out_shape.last().copied().unwrap_or(1);
                        let d = Rc::new(crate::quant::dequant_weight(self.weights, name, *layout, &d, k));
                        self.cache.insert(key, d.clone());
                        d
                    }
                };
                Tensor::new(out_shape, (*data).clone())
            }
            Op::Const { values } => Tensor::new(out_shape, values.clone()),
            Op::Gather => {
                let (table, idx) = (&ins[0], &ins[1]);
                let (v, h) = (table.shape[0], table.shape[1]);
                let mut out = Vec::with_capacity(idx.data.len() * h);
                for &i in &idx.data {
                    let i = i as i64;
                    if i < 0 || i as usize >= v {
                        return Err(IrError::Interp(format!("gather index {i} out of range for {v} rows")));
                    }
                    out.extend_from_slice(&table.data[i as usize * h..(i as usize + 1) * h]);
                }
                Tensor::new(out_shape, out)
            }
            Op::Unary(u) => Tensor::new(out_shape, ins[0].data.iter().map(|&x| u.eval(x)).collect()),
            Op::Binary(op) => {
                let st = vec![bcast_strides(&ins[0].shape, &out_shape), bcast_strides(&ins[1].shape, &out_shape)];
                let mut out = vec![0.0; out_shape.iter().product()];
                for_each_index(&out_shape, &st, |i, o| out[i] = op.eval(ins[0].data[o[0]], ins[1].data[o[1]]));
                Tensor::new(out_shape, out)
            }
            Op::Reduce(r) => {
                let x = &ins[0];
                let k = *x.shape.last().unwrap_or(&1);
                let out = x
                    .data
                    .chunks(k.max(1))
                    .map(|row| match r {
                        ReduceOp::Sum => row.iter().map(|&v| v as f64).sum::<f64>() as f32,
                        ReduceOp::Mean => (row.iter().map(|&v| v as f64).sum::<f64>() / k as f64) as f32,
                        ReduceOp::Max => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    })
                    .collect();
                Tensor::new(out_shape, out)
            }
            Op::Softmax => {
                let x = &ins[0];
                let k = *x.shape.last().unwrap_or(&1);
                let mut out = Vec::with_capacity(x.data.len());
                for row in x.data.chunks(k.max(1)) {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f64> = row.iter().map(|&v| ((v - m) as f64).exp()).collect();
                    let s: f64 = e.iter().sum();
                    out.extend(e.iter().map(|&v| (v / s) as f32));
                }
                Tensor::new(out_shape, out)
            }
            Op::Matmul { transpose_b } => {
                let (a, bm) = (&ins[0], &ins[1]);
                let (ra, rb) = (a.shape.len(), bm.shape.len());
                let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
                let n = if *transpose_b { bm.shape[rb - 2] } else { bm.shape[rb - 1] };
                let batch_shape = &out_shape[..out_shape.len() - 2];
                let sa = bcast_strides(&a.shape[..ra - 2], batch_shape);
                let sb = bcast_strides(&bm.shape[..rb - 2], batch_shape);
                let mut out = vec![0.0f32; out_shape.iter().product()];
                let (mk, kn) = (m * k, k * n);
                for_each_index(batch_shape, &[sa, sb], |bi, o| {
                    let (ao, bo) = (o[0] * mk, o[1] * kn);
                    for i in 0..m {
                        for j in 0..n {
                            let mut acc = 0.0f64;
                            for l in 0..k {
                                let bv = if *transpose_b { bm.data[bo + j * k + l] } else { bm.data[bo + l * n + j] };
                                acc += a.data[ao + i * k + l] as f64 * bv as f64;
                            }
                            out[bi * m * n + i * n + j] = acc as f32;
                        }
                    }
                });
                Tensor::new(out_shape, out)
            }
            Op::Transpose { perm } => {
                let x = &ins[0];
                let xs = strides(&x.shape);
                let st = vec![perm.iter().map(|&p| xs[p]).collect::<Vec<_>>()];
                let mut out = vec![0.0; x.data.len()];
                for_each_index(&out_shape, &st, |i, o| out[i] = x.data[o[0]]);
                Tensor::new(out_shape, out)
            }
            Op::Reshape => Tensor::new(out_shape, ins[0].data.clone()),
            Op::Slice { axis, start, end } => {
                let x = &ins[0];
                let outer: usize = x.shape[..*axis].iter().product();
                let inner: usize = x.shape[axis + 1..].iter().product();
                let ext = x.shape[*axis];
                let mut out = Vec::with_capacity(outer * (end - start) * inner);
                for o in 0..outer {
                    out.extend_from_slice(&x.data[(o * ext + start) * inner..(o * ext + end) * inner]);
                }
                Tensor::new(out_shape, out)
            }
            Op::Rope { rotary_dim } => {
                let (x, f) = (&ins[0], &ins[1]);
                let (s, h, d) = (x.shape[0], x.shape[1], x.shape[2]);
                let half = rotary_dim / 2;
                let mut out = x.data.clone();
                for si in 0..s {
                    let pos = (b.p + si) as f32;
                    for i in 0..half {
                        let theta = pos * f.data[i];
                        let (sin, cos) = (theta as f64).sin_cos();
                        for hi in 0..h {
                            let base = (si * h + hi) * d;
                            let (x1, x2) = (x.data[base + i] as f64, x.data[base + i + half] as f64);
                            out[base + i] = (x1 * cos - x2 * sin) as f32;
                            out[base + i + half] = (x2 * cos + x1 * sin) as f32;
                        }
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::CausalMask { window } => {
                let x = &ins[0];
                let r = x.shape.len();
                let (s, t) = (x.shape[r - 2], x.shape[r - 1]);
                let mut out = x.data.clone();
                for (blk, chunk) in out.chunks_mut(s * t).enumerate() {
                    let _ = blk;
                    for si in 0..s {
                        let q = b.p + si;
                        for ti in 0..t {
                            let visible = ti <= q && window.is_none_or(|w| q - ti < w);
                            if !visible {
                                chunk[si * t + ti] = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::Concat { axis, .. } => {
                let outer: usize = out_shape[..*axis].iter().product();
                let inner: usize = out_shape[axis + 1..].iter().product();
                let mut out = Vec::with_capacity(out_shape.iter().product());
                for o in 0..outer {
                    for x in ins {
                        let rows = x.shape[*axis] * inner;
                        out.extend_from_slice(&x.data[o * rows..(o + 1) * rows]);
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::Attention { scale, window, causal } => {
                let (q, k, v) = (&ins[0], &ins[1], &ins[2]);
                let (s, nh, d) = (q.shape[0], q.shape[1], q.shape[2]);
                let (t, nkv) = (k.shape[0], k.shape[1]);
                let g = nh / nkv;
                let mut out = vec![0.0f32; s * nh * d];
                for si in 0..s {
                    let qp = b.p + si;
                    for h in 0..nh {
                        let kh = h / g;
                        let qrow = &q.data[(si * nh + h) * d..(si * nh + h + 1) * d];
                        let vis: Vec<usize> =
                            (0..t).filter(|&ti| !causal || (ti <= qp && window.is_none_or(|w| qp - ti < w))).collect();
                        let scores: Vec<f64> = vis
                            .iter()
                            .map(|&ti| {
                                let krow = &k.data[(ti * nkv + kh) * d..(ti * nkv + kh + 1) * d];
                                let dot: f64 = qrow.iter().zip(krow).map(|(&a, &b)| a as f64 * b as f64).sum();
                                dot * *scale as f64
                            })
                            .collect();
                        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        let o = &mut out[(si * nh + h) * d..(si * nh + h + 1) * d];
                        for (j, &ti) in vis.iter().enumerate() {
                            let vrow = &v.data[(ti * nkv + kh) * d..(ti * nkv + kh + 1) * d];
                            for (od, &vv) in o.iter_mut().zip(vrow) {
                                *od += (e[j] / z * vv as f64) as f32;
                            }
                        }
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::RmsNorm { eps } => {
                let (x, w) = (&ins[0], &ins[1]);
                let h = w.data.len();
                let mut out = Vec::with_capacity(x.data.len());
                for row in x.data.chunks(h.max(1)) {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
                    let r = 1.0 / (ms + *eps as f64).sqrt();
                    out.extend(row.iter().zip(&w.data).map(|(&v, &wv)| (v as f64 * r) as f32 * wv));
                }
                Tensor::new(out_shape, out)
            }
            Op::LayerNorm { eps } => {
                let (x, w, bias) = (&ins[0], &ins[1], &ins[2]);
                let h = w.data.len();
                let mut out = Vec::with_capacity(x.data.len());
                for row in x.data.chunks(h.max(1)) {
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
                    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
                    let r = 1.0 / (var + *eps as f64).sqrt();
                    out.extend(row.iter().zip(w.data.iter().zip(&bias.data)).map(|(&v, (&wv, &bv))| ((v as f64 - mean) * r) as f32 * wv + bv));
                }
                Tensor::new(out_shape, out)
            }
            Op::Linear { transpose_b, bias, act, residual } => {
                let (a, bm) = (&ins[0], &ins[1]);
                let k = *a.shape.last().unwrap_or(&1);
                let n = *out_shape.last().unwrap_or(&1);
                let rows = a.data.len() / k.max(1);
                let mut out = vec![0.0f32; rows * n];
                let bias_v = bias.then(|| &ins[2].data);
                let res_v = residual.then(|| &ins[2 + *bias as usize].data);
                for r in 0..rows {
                    for j in 0..n {
                        let mut acc = 0.0f64;
                        for l in 0..k {
                            let bv = if *transpose_b { bm.data[j * k + l] } else { bm.data[l * n + j] };
                            acc += a.data[r * k + l] as f64 * bv as f64;
                        }
                        let mut y = acc as f32;
                        if let Some(bv) = bias_v {
                            y += bv[j];
                        }
                        if let Some(u) = act {
                            y = u.eval(y);
                        }
                        if let Some(rv) = res_v {
                            y += rv[r * n + j];
                        }
                        out[r * n + j] = y;
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::GatedLinear { act } => {
                let (a, w) = (&ins[0], &ins[1]);
                let k = *a.shape.last().unwrap_or(&1);
                let n = w.shape[0] / 2;
                let rows = a.data.len() / k.max(1);
                let dot = |r: usize, j: usize| -> f32 {
                    (0..k).map(|l| a.data[r * k + l] as f64 * w.data[j * k + l] as f64).sum::<f64>() as f32
                };
                let mut out = Vec::with_capacity(rows * n);
                for r in 0..rows {
                    for j in 0..n {
                        out.push(act.eval(dot(r, j)) * dot(r, n + j));
                    }
                }
                Tensor::new(out_shape, out)
            }
            Op::Moe { top_k, act } => {
                let (x, router, gu, dn) = (&ins[0], &ins[1], &ins[2], &ins[3]);
                let (e, h, i) = (router.shape[0], router.shape[1], dn.shape[2]);
                let dot = |a: &[f32], b: &[f32]| -> f32 {
                    a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>() as f32
                };
                let mut out = Vec::with_capacity(x.data.len());
                for row in x.data.chunks(h.max(1)) {
                    let logits: Vec<f32> = (0..e).map(|j| dot(&router.data[j * h..(j + 1) * h], row)).collect();
                    // Stable sort by descending logit: equal logits keep the lower index first.
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                    let chosen = &order[..*top_k];
                    let m = logits[chosen[0]] as f64;
                    let z: f64 = chosen.iter().map(|&j| (logits[j] as f64 - m).exp()).sum();
                    let mut acc = vec![0.0f64; h];
                    for &j in chosen {
                        let w = ((logits[j] as f64 - m).exp() / z) as f32;
                        let g = &gu.data[j * 2 * i * h..(j + 1) * 2 * i * h];
                        let hid: Vec<f32> = (0..i)
                            .map(|r| {
                                act.eval(dot(&g[r * h..(r + 1) * h], row)) * dot(&g[(i + r) * h..(i + r + 1) * h], row)
                            })
                            .collect();
                        let d = &dn.data[j * h * i..(j + 1) * h * i];
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a += w as f64 * dot(&d[c * i..(c + 1) * i], &hid) as f64;
                        }
                    }
                    out.extend(acc.iter().map(|&v| v as f32));
                }
                Tensor::new(out_shape, out)
            }
            Op::KvConcat { state } => {
                let decl = g.state(state).ok_or_else(|| IrError::Interp(format!("state @{state} is not declared")))?;
                let x = &ins[0];
                let row: usize = x.shape[1..].iter().product();
                let st = self
                    .state
                    .get_mut(state)
                    .ok_or_else(|| IrError::Interp(format!("state @{state} is not declared")))?;
                match decl.kind {
                    // Rows `P..P+S` written, rows `0..T` read, in place.
                    StateKind::Kv { layout: KvLayout::Contiguous } => {
                        st[b.p * row..(b.p + b.s) * row].copy_from_slice(&x.data);
                        Tensor::new(out_shape, st[..(b.p + b.s) * row].to_vec())
                    }
                    // Each vector of the last dimension stored as int8 codes and a scale: held
                    // here as the values it reads back as.
                    StateKind::Kv { layout: KvLayout::Int8 } => {
                        let d = *x.shape.last().unwrap_or(&1);
                        let q = crate::quant::fake_quant_act(&x.data, d);
                        st[b.p * row..(b.p + b.s) * row].copy_from_slice(&q);
                        Tensor::new(out_shape, st[..(b.p + b.s) * row].to_vec())
                    }
                }
            }
        })
    }
}
