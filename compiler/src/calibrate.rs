//! Calibration, a phase of the compile after the `quantize` pass: activations captured on
//! calibration text, GPTQ, Wanda pruning, SmoothQuant and the per-matrix error report. (A phase of
//! this library rather than a pass: it reads the checkpoint's weights and runs the interpreter,
//! and the passes stay pure graph rewrites.)
//!
//! The quantized graph keeps its layouts; calibration changes only what the weights *are*:
//! [`Calibrated`] is a [`ir::WeightSource`] over the checkpoint that supplies GPTQ's codes and
//! scales ([`ir::WeightSource::quantized`]) and Wanda-pruned values (zeros where 2:4 prunes, so
//! the layout's magnitude rule keeps exactly Wanda's choice). The interpreter and the packer both
//! read through it, so a calibrated artifact is still exact to its layout.
//!
//! - [`capture`]: runs the f32 graph (every layout back to dense) in the reference interpreter
//!   over calibration windows and keeps the input rows `X` of every product whose right-hand
//!   side is a quantized weight (one capture per distinct input; a fused QKV shares one).
//! - [`gptq`]: Frantar et al. 2022, act-order off, group parameters taken from the updated
//!   weights at the start of each group (`ir::quant::group_params`), `H = XᵀX` damped by 1% of
//!   its mean diagonal; the inverse Hessian's upper Cholesky factor comes from one Cholesky of
//!   the reversed `H` and a triangular inverse, in f64.
//! - [`wanda`]: Sun et al. 2023: in each group of 4 along `K`, keep the two largest `|w|·‖x_j‖`.
//! - [`report`]: per matrix, the relative Frobenius error of the weight and of `X·Wᵀ` on the
//!   calibration rows (through `H`: `‖XΔᵀ‖² = Σ_r δ_r H δ_rᵀ`).

use std::collections::HashMap;

use llmc_ir as ir;
use ir::quant::QRow;
use ir::{Layout, NodeId, Op};

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Quant(msg.into())
}

/// Input rows captured for the quantized weights.
#[derive(Clone, Debug, Default)]
pub struct Activations {
    /// Per captured input: `K` and its rows (`tokens × K`, row-major).
    pub xs: Vec<(usize, Vec<f32>)>,
    /// Weight name -> index into `xs`.
    pub of: HashMap<String, usize>,
    /// The graph node each entry of `xs` was captured from.
    pub nodes: Vec<NodeId>,
}

impl Activations {
    /// The rows feeding weight `name`, if captured.
    pub fn get(&self, name: &str) -> Option<(usize, &[f32])> {
        self.of.get(name).map(|&i| (self.xs[i].0, self.xs[i].1.as_slice()))
    }
}

/// The products (`matmul`, `linear`, `gated_linear`) that read weight node `w` as their
/// right-hand side, directly or through a row-wise concat.
fn products_of(g: &ir::Graph, w: NodeId) -> Vec<NodeId> {
    let mut out = Vec::new();
    for u in g.users(w) {
        match g.op(u) {
            Op::Matmul { .. } | Op::Linear { .. } | Op::GatedLinear { .. } => out.push(u),
            Op::Concat { axis: 0, .. } => out.extend(products_of(g, u)),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The quantized (non-dense) weights of `g`: node, name, `[N, K]`.
pub fn quantized_weights(g: &ir::Graph) -> Vec<(NodeId, String, Layout, usize, usize)> {
    let mut v = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for n in g.g.node_indices() {
        if let Op::Weight { name, layout, .. } = g.op(n) {
            let sh = &g.ty(n).shape;
            if *layout == Layout::Dense || sh.len() != 2 || !seen.insert(name.clone()) {
                continue;
            }
            if let (Some(rows), Some(k)) = (sh[0].as_const(), sh[1].as_const()) {
                v.push((n, name.clone(), *layout, rows, k));
            }
        }
    }
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v
}

/// Runs the f32 version of `g` over each window of token ids in the reference interpreter and
/// keeps the inputs of the products that read a quantized weight.
pub fn capture(g: &ir::Graph, weights: &dyn ir::WeightSource, windows: &[Vec<i32>]) -> Result<Activations> {
    let mut f32g = g.clone();
    for n in f32g.g.node_indices().collect::<Vec<_>>() {
        if let Op::Weight { layout, .. } = &mut f32g.g[n].op {
            *layout = Layout::Dense;
        }
    }
    let mut acts = Activations::default();
    let mut out_of: HashMap<NodeId, usize> = HashMap::new();
    let base = f32g.outputs.len();
    for (w, name, _, _, k) in quantized_weights(g) {
        let prods = products_of(g, w);
        let Some(&p) = prods.first() else { continue };
        let x = g.inputs(p)[0];
        if g.ty(x).shape.last().and_then(|d| d.as_const()) != Some(k) {
            continue;
        }
        let idx = *out_of.entry(x).or_insert_with(|| {
            f32g.outputs.push(x);
            acts.xs.push((k, Vec::new()));
            acts.nodes.push(x);
            acts.xs.len() - 1
        });
        acts.of.insert(name, idx);
    }
    let mut interp = ir::Interpreter::new(weights);
    for ids in windows {
        interp.reset();
        let outs = interp.run(&f32g, ids)?;
        for (i, t) in outs[base..].iter().enumerate() {
            acts.xs[i].1.extend_from_slice(&t.data);
        }
    }
    Ok(acts)
}

/// `XᵀX` of `t × k` rows `x`, `k × k` row-major, in f64.
pub fn hessian(x: &[f32], k: usize) -> Vec<f64> {
    let mut h = vec![0.0f64; k * k];
    let mut xd = vec![0.0f64; k];
    for row in x.chunks(k) {
        for (d, &s) in xd.iter_mut().zip(row) {
            *d = s as f64;
        }
        for i in 0..k {
            let xi = xd[i];
            if xi == 0.0 {
                continue;
            }
            let hr = &mut h[i * k..(i + 1) * k];
            for j in i..k {
                hr[j] += xi * xd[j];
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            h[i * k + j] = h[j * k + i];
        }
    }
    h
}

/// Lower Cholesky factor of the `k × k` matrix `a` in place; `false` if not positive definite.
fn cholesky(a: &mut [f64], k: usize) -> bool {
    for j in 0..k {
        let mut d = a[j * k + j];
        for m in 0..j {
            d -= a[j * k + m] * a[j * k + m];
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let mut s = a[i * k + j];
            for m in 0..j {
                s -= a[i * k + m] * a[j * k + m];
            }
            a[i * k + j] = s / d;
        }
        for i in 0..j {
            a[i * k + j] = 0.0;
        }
    }
    true
}

/// The upper-triangular `U` with `H⁻¹ = UᵀU` (GPTQ's `cholesky(H⁻¹, upper)`): with `J` the
/// reversal, `JHJ = MMᵀ` gives `H = RRᵀ` for the upper `R = JMJ`, so `H⁻¹ = (R⁻¹)ᵀR⁻¹` and
/// `U = R⁻¹ = J M⁻¹ J`.
pub fn inverse_upper_cholesky(h: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut a = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            a[i * k + j] = h[(k - 1 - i) * k + (k - 1 - j)];
        }
    }
    if !cholesky(&mut a, k) {
        return None;
    }
    // Inverse of the lower-triangular M, column by column.
    let mut inv = vec![0.0; k * k];
    for j in 0..k {
        inv[j * k + j] = 1.0 / a[j * k + j];
        for i in j + 1..k {
            let mut s = 0.0;
            for m in j..i {
                s += a[i * k + m] * inv[m * k + j];
            }
            inv[i * k + j] = -s / a[i * k + i];
        }
    }
    let mut u = vec![0.0; k * k];
    for i in 0..k {
        for j in i..k {
            u[i * k + j] = inv[(k - 1 - i) * k + (k - 1 - j)];
        }
    }
    Some(u)
}

/// Runs `f(row_index, row)` over the rows of `data` on the compile's threads
/// (`ir::threads::available`), results in row order (the same at any thread count).
fn par_rows<T: Send>(data: &[f32], k: usize, f: &(dyn Fn(usize, &[f32]) -> T + Sync)) -> Vec<T> {
    let n = data.len() / k.max(1);
    let threads = ir::threads::available().min(n.max(1));
    let chunk = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|r0| {
                s.spawn(move || (r0..(r0 + chunk).min(n)).map(|r| f(r, &data[r * k..(r + 1) * k])).collect::<Vec<T>>())
            })
            .collect();
        // A panicking `f` is a bug: re-raise it here rather than lose its rows.
        hs.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// GPTQ codes and scales for weight `w` (`[n, k]`, row-major) under `layout` (int8 or int4),
/// given `H = XᵀX` of its calibration inputs.
pub fn gptq(w: &[f32], k: usize, h: &[f64], layout: Layout) -> Result<Vec<QRow>> {
    if !matches!(layout.weight_format(), Layout::Int8 | Layout::Int4 { .. }) || layout == Layout::W8A8 {
        return Err(err(format!("GPTQ does not apply to layout {layout}")));
    }
    let mut h = h.to_vec();
    // Inputs never active on the calibration text: GPTQ's convention (H_ii = 1, weight 0).
    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
    for (i, &d) in dead.iter().enumerate() {
        if d {
            h[i * k + i] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let mut damp = 0.01 * mean_diag;
    let u = loop {
        let mut hd = h.clone();
        for i in 0..k {
            hd[i * k + i] += damp;
        }
        if let Some(u) = inverse_upper_cholesky(&hd, k) {
            break u;
        }
        damp *= 10.0;
        if damp > 1e6 * mean_diag.max(1e-30) {
            return Err(err("GPTQ: the calibration Hessian is not positive definite even when damped"));
        }
    };
    let group = match layout.weight_format() {
        Layout::Int4 { group, .. } => group,
        _ => k,
    };
    let hdiag: Vec<f64> = (0..k).map(|i| h[i * k + i]).collect();
    let rows = par_rows(w, k, &|_, row| {
        let mut wr: Vec<f64> = row.iter().zip(&dead).map(|(&x, &d)| if d { 0.0 } else { x as f64 }).collect();
        let mut out = QRow { q: Vec::with_capacity(k), scales: Vec::new(), zeros: Vec::new() };
        let (mut s, mut z) = (0.0f32, None);
        let mut gbuf = Vec::with_capacity(group);
        for i in 0..k {
            if i % group == 0 {
                gbuf.clear();
                gbuf.extend(wr[i..(i + group).min(k)].iter().map(|&x| x as f32));
                (s, z) = search_params(layout, &gbuf, &hdiag[i..(i + group).min(k)]);
                out.scales.push(s);
                if let Some(z) = z {
                    out.zeros.push(z);
                }
            }
            let c = ir::quant::code(layout, wr[i] as f32, s, z);
            out.q.push(c);
            let deq = (c as i32 - z.unwrap_or(0) as i32) as f32 * s;
            let e = (wr[i] - deq as f64) / u[i * k + i];
            let ur = &u[i * k..(i + 1) * k];
            for j in i + 1..k {
                wr[j] -= e * ur[j];
            }
        }
        out
    });
    Ok(rows)
}

/// Group parameters for GPTQ: the round-to-nearest range shrunk by the factor in
/// `1.0, 0.96, ..., 0.72` whose codes give the least `Σ_j H_jj (w_j − ŵ_j)²` (a clipping search:
/// a slightly smaller scale trades clipped outliers for finer steps). int8 keeps its row scale.
fn search_params(layout: Layout, g: &[f32], hdiag: &[f64]) -> (f32, Option<i8>) {
    let base = ir::quant::group_params(layout, g);
    if !matches!(layout.weight_format(), Layout::Int4 { .. }) {
        return base;
    }
    let err = |(s, z): (f32, Option<i8>)| -> f64 {
        g.iter()
            .zip(hdiag)
            .map(|(&x, &d)| {
                let c = ir::quant::code(layout, x, s, z);
                let e = x as f64 - ((c as i32 - z.unwrap_or(0) as i32) as f32 * s) as f64;
                d * e * e
            })
            .sum()
    };
    let mut best = (err(base), base);
    let mut scaled = g.to_vec();
    for step in 1..8 {
        let f = 1.0 - 0.04 * step as f32;
        for (d, &x) in scaled.iter_mut().zip(g) {
            *d = x * f;
        }
        let p = ir::quant::group_params(layout, &scaled);
        let e = err(p);
        if e < best.0 {
            best = (e, p);
        }
    }
    best.1
}

/// Wanda 2:4 pruning of `w` (`[n, k]`): in each group of 4 along `K`, the two largest
/// `|w_j|·‖x_j‖` stay, the other two become 0. `xnorm[j] = ‖X[:, j]‖`.
pub fn wanda(w: &[f32], k: usize, xnorm: &[f64]) -> Vec<f32> {
    let mut out = w.to_vec();
    for row in out.chunks_mut(k) {
        for (gi, g) in row.chunks_mut(4).enumerate() {
            if g.len() < 4 {
                break;
            }
            let score: Vec<f32> = (0..4).map(|l| (g[l].abs() as f64 * xnorm[4 * gi + l]) as f32).collect();
            let (a, b) = ir::quant::sparse24_pair(&score);
            for (l, x) in g.iter_mut().enumerate() {
                if l != a && l != b {
                    *x = 0.0;
                }
            }
        }
    }
    out
}

/// The checkpoint with calibrated replacements: pruned values and GPTQ rows by weight name.
pub struct Calibrated<'a> {
    pub inner: &'a dyn ir::WeightSource,
    pub values: HashMap<String, Vec<f32>>,
    pub rows: HashMap<String, (Layout, Vec<QRow>)>,
}

impl ir::WeightSource for Calibrated<'_> {
    fn load(&self, name: &str, ty: &ir::TensorType) -> ir::Result<Vec<f32>> {
        match self.values.get(name) {
            Some(v) => Ok(v.clone()),
            None => self.inner.load(name, ty),
        }
    }
    fn quantized(&self, name: &str, layout: Layout) -> Option<Vec<QRow>> {
        match self.rows.get(name) {
            Some((l, r)) if *l == layout => Some(r.clone()),
            _ => self.inner.quantized(name, layout),
        }
    }
    fn prefetch(&self, names: &[&str]) -> ir::Prefetch {
        // Replaced weights are never read from the inner source.
        let read: Vec<&str> = names.iter().copied().filter(|n| !self.values.contains_key(*n)).collect();
        self.inner.prefetch(&read)
    }
}

/// How `--calib` is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GPTQ for int8 / int4 layouts.
    Gptq,
    /// Wanda for 2:4 layouts (magnitude otherwise).
    Wanda,
}

/// SmoothQuant (Xiao et al. 2023) for W8A8: for each captured input that is an `rms_norm`'s
/// output read only by products of W8A8 weights, per input channel
/// `s_j = max|X_j|^α / max|W_·j|^(1−α)` (over all those weights); the norm's weight is divided
/// by `s` and every weight's column `j` multiplied by `s_j`, so the f32 function is unchanged
/// while the activations' outlier channels move into the weights. Returns the replaced values.
pub fn smooth(g: &ir::Graph, inner: &dyn ir::WeightSource, acts: &Activations, alpha: f32) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    let ws = quantized_weights(g);
    for (xi, &x) in acts.nodes.iter().enumerate() {
        let Op::RmsNorm { .. } = g.op(x) else { continue };
        let nw = g.inputs(x)[1];
        let Op::Weight { name: norm_name, .. } = g.op(nw) else { continue };
        // The norm weight must feed only this norm; the norm's output only W8A8 products.
        if g.users(nw).len() != 1 || out.contains_key(norm_name) {
            continue;
        }
        let mine: Vec<_> = ws.iter().filter(|w| acts.of.get(&w.1) == Some(&xi)).collect();
        // A weight read by anything but products (a tied embedding table) cannot take the
        // activations' scales: its gathered rows would change.
        let only_products = |w: NodeId| g.users(w).iter().all(|&u| !products_of(g, w).is_empty() && !matches!(g.op(u), Op::Gather));
        if mine.is_empty() || mine.iter().any(|w| w.2 != Layout::W8A8 || !only_products(w.0)) {
            continue;
        }
        let users_ok = g.users(x).iter().all(|&u| {
            g.inputs(u).first() == Some(&x)
                && !g.inputs(u)[1..].contains(&x)
                && ir::interp::acts_quantized(g, u)
                && g.inputs(u).get(1).is_some_and(|&r| {
                    let names: Vec<String> = match g.op(r) {
                        Op::Weight { name, .. } => vec![name.clone()],
                        Op::Concat { .. } => g
                            .inputs(r)
                            .iter()
                            .filter_map(|&i| match g.op(i) {
                                Op::Weight { name, .. } => Some(name.clone()),
                                _ => None,
                            })
                            .collect(),
                        _ => vec![],
                    };
                    !names.is_empty() && names.iter().all(|n| mine.iter().any(|w| &w.1 == n))
                })
        });
        if !users_ok {
            continue;
        }
        let (k, xs) = (acts.xs[xi].0, &acts.xs[xi].1);
        let mut xmax = vec![0.0f32; k];
        for row in xs.chunks(k) {
            for (m, &v) in xmax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let mut wmax = vec![0.0f32; k];
        let mut datas = Vec::new();
        for w in &mine {
            let d = inner.load(&w.1, g.ty(w.0))?;
            for row in d.chunks(k) {
                for (m, &v) in wmax.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
            datas.push((w.1.clone(), d));
        }
        let s: Vec<f32> = xmax
            .iter()
            .zip(&wmax)
            .map(|(&a, &w)| {
                let v = a.max(1e-5).powf(alpha) / w.max(1e-5).powf(1.0 - alpha);
                if v.is_finite() && v > 0.0 {
                    v.clamp(1e-5, 1e5)
                } else {
                    1.0
                }
            })
            .collect();
        let mut norm = inner.load(norm_name, g.ty(nw))?;
        if norm.len() != k {
            continue;
        }
        norm.iter_mut().zip(&s).for_each(|(v, &f)| *v /= f);
        out.insert(norm_name.clone(), norm);
        for (name, mut d) in datas {
            for row in d.chunks_mut(k) {
                row.iter_mut().zip(&s).for_each(|(v, &f)| *v *= f);
            }
            out.insert(name, d);
        }
    }
    Ok(out)
}

/// Builds the calibrated weight source for the quantized weights of `g`: Wanda-pruned values
/// for 2:4 layouts when `wanda`, GPTQ rows for int8/int4 layouts when `gptq`, SmoothQuant for
/// W8A8 layouts when `smooth_alpha` is set.
pub fn calibrate<'a>(
    g: &ir::Graph,
    inner: &'a dyn ir::WeightSource,
    acts: &Activations,
    gptq_on: bool,
    wanda_on: bool,
    smooth_alpha: Option<f32>,
) -> Result<Calibrated<'a>> {
    let mut c = Calibrated { inner, values: HashMap::new(), rows: HashMap::new() };
    if let Some(alpha) = smooth_alpha {
        c.values = smooth(g, inner, acts, alpha)?;
    }
    for (n, name, layout, _, k) in quantized_weights(g) {
        let Some((kx, x)) = acts.get(&name) else { continue };
        if kx != k || x.is_empty() {
            continue;
        }
        let w = inner.load(&name, g.ty(n))?;
        match layout {
            Layout::Sparse24 { .. } if wanda_on => {
                let mut norm = vec![0.0f64; k];
                for row in x.chunks(k) {
                    for (s, &v) in norm.iter_mut().zip(row) {
                        *s += v as f64 * v as f64;
                    }
                }
                norm.iter_mut().for_each(|s| *s = s.sqrt());
                c.values.insert(name, wanda(&w, k, &norm));
            }
            Layout::Int8 | Layout::Int4 { .. } | Layout::W4A8 { .. } if gptq_on => {
                let h = hessian(x, k);
                let rows = gptq(&w, k, &h, layout)?;
                c.rows.insert(name, (layout, rows));
            }
            _ => {}
        }
    }
    Ok(c)
}

/// `‖X Dᵀ‖_F / ‖X Wᵀ‖_F` for calibration rows `x` (`T × k`): straight from the rows
/// (`T·K` per weight row; `direct`, used when `T < K`) or through `H = XᵀX` (`K²` per row).
pub fn output_error(x: &[f32], k: usize, w: &[f32], d: &[f32], direct: bool) -> f64 {
    let quad: Box<dyn Fn(&[f32]) -> f64> = if direct {
        Box::new(|v: &[f32]| -> f64 {
            par_rows(v, k, &|_, r| {
                x.chunks(k)
                    .map(|xt| {
                        let s: f64 = xt.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum();
                        s * s
                    })
                    .sum::<f64>()
            })
            .iter()
            .sum()
        })
    } else {
        let h = hessian(x, k);
        Box::new(move |v: &[f32]| -> f64 {
            par_rows(v, k, &|_, r| {
                let mut t = 0.0;
                for i in 0..k {
                    let hr = &h[i * k..(i + 1) * k];
                    let mut s = 0.0;
                    for j in 0..k {
                        s += hr[j] * r[j] as f64;
                    }
                    t += s * r[i] as f64;
                }
                t
            })
            .iter()
            .sum()
        })
    };
    (quad(d) / quad(w).max(1e-300)).max(0.0).sqrt()
}

/// One row of the `--report` table.
#[derive(Clone, Debug, PartialEq)]
pub struct MatrixReport {
    pub name: String,
    pub layout: Layout,
    pub shape: [usize; 2],
    pub bits_per_weight: f64,
    /// `‖W − Ŵ‖_F / ‖W‖_F` against the checkpoint's weight.
    pub weight_error: f64,
    /// `‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F` on the calibration rows; `None` without calibration.
    pub output_error: Option<f64>,
}

/// The error of every quantized matrix of `g` as `quant` (the source the artifact is written
/// from) stores it, against the checkpoint `orig`.
pub fn report(
    g: &ir::Graph,
    orig: &dyn ir::WeightSource,
    quant: &dyn ir::WeightSource,
    acts: Option<&Activations>,
) -> Result<Vec<MatrixReport>> {
    let mut out = Vec::new();
    for (n, name, layout, rows, k) in quantized_weights(g) {
        let w = orig.load(&name, g.ty(n))?;
        let src = quant.load(&name, g.ty(n))?;
        let wq = ir::quant::dequant_weight(quant, &name, layout, &src, k);
        let d: Vec<f32> = w.iter().zip(&wq).map(|(a, b)| a - b).collect();
        let sq = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        let weight_error = (sq(&d) / sq(&w).max(1e-300)).sqrt();
        let output_error = match acts.and_then(|a| a.get(&name)) {
            Some((kx, x)) if kx == k && !x.is_empty() => Some(output_error(x, k, &w, &d, x.len() / k < k)),
            _ => None,
        };
        out.push(MatrixReport {
            name,
            layout,
            shape: [rows, k],
            bits_per_weight: layout.bits_per_weight(k),
            weight_error,
            output_error,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn inverse_upper_cholesky_inverts() {
        let k = 9;
        let x = lcg(40 * k, 3);
        let mut h = hessian(&x, k);
        for i in 0..k {
            h[i * k + i] += 0.1;
        }
        let u = inverse_upper_cholesky(&h, k).unwrap();
        // (UᵀU) H = I
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for m in 0..k {
                    let mut hinv = 0.0;
                    for r in 0..k {
                        hinv += u[r * k + i] * u[r * k + m];
                    }
                    s += hinv * h[m * k + j];
                }
                assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "{i},{j}: {s}");
            }
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
        }
    }

    /// GPTQ lowers the output error on its calibration rows below round-to-nearest, with a
    /// partial last group (K = 44, groups of 32) and correlated inputs.
    #[test]
    fn gptq_beats_rtn_on_output_error() {
        let (n, k, t) = (16, 44, 256);
        let w = lcg(n * k, 7);
        let base = lcg(t * 4, 11);
        let noise = lcg(t * k, 13);
        // Correlated activations: 4 latent factors plus a little noise, one channel 5x larger.
        let mut x = vec![0.0f32; t * k];
        for r in 0..t {
            for j in 0..k {
                let f = base[r * 4 + j % 4] * (1.0 + (j % 3) as f32) + 0.1 * noise[r * k + j];
                x[r * k + j] = if j == 5 { 5.0 * f } else { f };
            }
        }
        let h = hessian(&x, k);
        let out_err = |wq: &[f32]| -> f64 {
            let mut e = 0.0;
            for r in 0..t {
                for o in 0..n {
                    let mut s = 0.0f64;
                    for j in 0..k {
                        s += x[r * k + j] as f64 * (w[o * k + j] - wq[o * k + j]) as f64;
                    }
                    e += s * s;
                }
            }
            e
        };
        for layout in [Layout::Int4 { group: 32, asym: false }, Layout::Int4 { group: 32, asym: true }, Layout::Int8] {
            let rows = gptq(&w, k, &h, layout).unwrap();
            assert_eq!(rows.len(), n);
            let g: Vec<f32> = rows.iter().flat_map(|r| (0..k).map(|j| ir::quant::dequant(layout, r, j))).collect();
            let rtn = ir::quant::fake_quant(layout, &w, k);
            let (eg, er) = (out_err(&g), out_err(&rtn));
            assert!(eg < 0.8 * er, "{layout}: gptq {eg} vs rtn {er}");
            // Codes stay in the layout's range, one scale per group.
            for r in &rows {
                assert_eq!(r.scales.len(), if layout == Layout::Int8 { 1 } else { 2 });
                match layout {
                    Layout::Int4 { asym: false, .. } => assert!(r.q.iter().all(|&q| (-8..=7).contains(&q))),
                    Layout::Int4 { asym: true, .. } => assert!(r.q.iter().all(|&q| (0..=15).contains(&q))),
                    _ => assert!(r.q.iter().all(|&q| q >= -127)),
                }
            }
        }
    }

    #[test]
    fn output_error_two_ways_agree() {
        let (n, k, t) = (5, 12, 7);
        let (x, w) = (lcg(t * k, 1), lcg(n * k, 2));
        let wq = ir::quant::fake_quant(Layout::Int4 { group: 4, asym: false }, &w, k);
        let d: Vec<f32> = w.iter().zip(&wq).map(|(a, b)| a - b).collect();
        let (a, b) = (output_error(&x, k, &w, &d, true), output_error(&x, k, &w, &d, false));
        assert!(a > 0.0 && (a - b).abs() < 1e-9 * a.max(1.0), "{a} vs {b}");
        // By definition: ‖XDᵀ‖/‖XWᵀ‖ computed naively.
        let prod = |m: &[f32]| -> f64 {
            let mut e = 0.0;
            for r in 0..t {
                for o in 0..n {
                    let s: f64 = (0..k).map(|j| x[r * k + j] as f64 * m[o * k + j] as f64).sum();
                    e += s * s;
                }
            }
            e
        };
        assert!((a - (prod(&d) / prod(&w)).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn wanda_keeps_two_per_group_by_activation_weighted_magnitude() {
        let w = vec![1.0, -2.0, 3.0, 0.5, /* row 2 */ 4.0, 4.0, 1.0, 1.0];
        let norm = vec![10.0, 0.1, 0.1, 10.0];
        let p = wanda(&w, 4, &norm);
        assert_eq!(p, vec![1.0, 0.0, 0.0, 0.5, 4.0, 0.0, 0.0, 1.0]);
        // Magnitude alone would keep -2 and 3: the layout's rule keeps Wanda's choice once pruned.
        assert_eq!(ir::quant::sparse24_keep(&p[..4]), vec![true, false, false, true]);
    }
}
