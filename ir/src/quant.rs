//! Round-to-nearest weight quantization: the reference semantics of [`Layout`]s.
//!
//! [`quantize_row`] gives the integer codes, scales and zero points of one row; [`fake_quant`]
//! maps a whole `[N, K]` weight to its dequantized values. Backends pack the same codes, so a
//! kernel that computes `(q - zero) as f32 * scale` in f32 is exact to the interpreter.

use crate::interp::WeightSource;
use crate::types::Layout;

/// The quantized form of one row of `k` elements (for [`Layout::Sparse24`] with int8, pruned
/// elements have code 0).
#[derive(Clone, Debug, PartialEq)]
pub struct QRow {
    /// One code per element: int8 in -127..=127, int4 symmetric in -8..=7, int4 asym in 0..=15.
    pub q: Vec<i8>,
    /// One scale per group (one per row for int8).
    pub scales: Vec<f32>,
    /// One zero point per group (asymmetric int4 only; 0..=15), else empty.
    pub zeros: Vec<i8>,
}

/// Quantizes one row under `layout` (empty for [`Layout::Dense`] and f32 [`Layout::Sparse24`],
/// which have no codes; see [`sparse24_keep`]).
pub fn quantize_row(layout: Layout, row: &[f32]) -> QRow {
    let layout = layout.weight_format();
    match layout {
        Layout::Dense | Layout::Sparse24 { int8: false } => QRow { q: Vec::new(), scales: Vec::new(), zeros: Vec::new() },
        Layout::Int8 | Layout::W8A8 | Layout::W4A8 { .. } => {
            let (q, s) = sym(row, 127.0, -127.0);
            QRow { q, scales: vec![s], zeros: Vec::new() }
        }
        Layout::Sparse24 { int8: true } => {
            let keep = sparse24_keep(row);
            let kept: Vec<f32> = row.iter().zip(&keep).map(|(&x, &k)| if k { x } else { 0.0 }).collect();
            let (q, s) = sym(&kept, 127.0, -127.0);
            QRow { q, scales: vec![s], zeros: Vec::new() }
        }
        Layout::Int4 { group, .. } => {
            let mut out = QRow { q: Vec::with_capacity(row.len()), scales: Vec::new(), zeros: Vec::new() };
            for g in row.chunks(group.max(1)) {
                let (scale, zero) = group_params(layout, g);
                out.q.extend(g.iter().map(|&x| code(layout, x, scale, zero)));
                out.scales.push(scale);
                if let Some(z) = zero {
                    out.zeros.push(z);
                }
            }
            out
        }
    }
}

/// The round-to-nearest scale (and, asymmetric int4, zero point) of one group (int4) or row
/// (int8) of values: symmetric `max|x| / qmax`; asymmetric `(hi - lo) / 15` over the range
/// widened to hold 0, zero point `round(-lo / scale)`. A zero or non-finite range gives scale 0
/// (every code decodes to 0). GPTQ takes its group parameters from here too.
pub fn group_params(layout: Layout, g: &[f32]) -> (f32, Option<i8>) {
    let layout = layout.weight_format();
    match layout {
        Layout::Int4 { asym: true, .. } => {
            let lo = g.iter().fold(0.0f32, |a, &x| a.min(x));
            let hi = g.iter().fold(0.0f32, |a, &x| a.max(x));
            let scale = half_scale((hi - lo) / 15.0);
            if scale > 0.0 && scale.is_finite() {
                (scale, Some((-lo / scale).round().clamp(0.0, 15.0) as i8))
            } else {
                (0.0, Some(0))
            }
        }
        _ => {
            let int4 = matches!(layout, Layout::Int4 { .. });
            let qmax = if int4 { 7.0 } else { 127.0 };
            let amax = g.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            let scale = if int4 { half_scale(amax / qmax) } else { amax / qmax };
            if scale.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !scale.is_finite() {
                (0.0, None)
            } else {
                (scale, None)
            }
        }
    }
}

/// An int4 group scale as the packed format stores it: rounded to the nearest IEEE half (as
/// GGUF's Q4_0 does), a scale beyond the half range saturating at its largest finite value (the
/// codes then clamp), NaN kept (the caller treats it as no range).
pub fn half_scale(s: f32) -> f32 {
    let h = half::f16::from_f32(s);
    if h.is_infinite() {
        half::f16::MAX.to_f32().copysign(s)
    } else {
        h.to_f32()
    }
}

/// The code of `x` under a group's `scale` and `zero`: round to nearest, clamped to the
/// layout's range (int8 -127..=127, int4 symmetric -8..=7, asymmetric 0..=15).
pub fn code(layout: Layout, x: f32, scale: f32, zero: Option<i8>) -> i8 {
    let layout = layout.weight_format();
    if scale == 0.0 {
        return zero.unwrap_or(0);
    }
    match (layout, zero) {
        (Layout::Int4 { .. }, Some(z)) => ((x / scale).round() + z as f32).clamp(0.0, 15.0) as i8,
        (Layout::Int4 { .. }, None) => (x / scale).round().clamp(-8.0, 7.0) as i8,
        _ => (x / scale).round().clamp(-127.0, 127.0) as i8,
    }
}

/// Symmetric codes: `scale = max|x| / qmax`, `q = clamp(round(x / scale), qmin, qmax)`.
fn sym(x: &[f32], qmax: f32, qmin: f32) -> (Vec<i8>, f32) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let scale = amax / qmax;
    if scale.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !scale.is_finite() {
        return (vec![0; x.len()], 0.0);
    }
    (x.iter().map(|&v| (v / scale).round().clamp(qmin, qmax) as i8).collect(), scale)
}

/// Per-token int8 quantization of an activation row (the left-hand side of a product whose
/// weight is [`Layout::W8A8`]): `inv = 127 / max|x|` and `q = round_ties_even(x * inv)` in f32,
/// clamped to -127..=127, scale `max|x| / 127`. A zero or non-finite maximum gives codes 0 and
/// scale 0. Kernels compute exactly these f32 operations.
pub fn quantize_act(x: &[f32]) -> (Vec<i8>, f32) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    if !(amax > 0.0 && amax.is_finite()) {
        return (vec![0; x.len()], 0.0);
    }
    let inv = 127.0f32 / amax;
    (x.iter().map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8).collect(), amax / 127.0)
}

/// The dequantized activation rows (`k` per row) of [`quantize_act`].
pub fn fake_quant_act(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(k.max(1)) {
        let (q, s) = quantize_act(row);
        out.extend(q.iter().map(|&c| c as f32 * s));
    }
    out
}

/// Which elements of a row 2:4 sparsity keeps: in each aligned group of 4, the two of largest
/// magnitude (ties: the lower index). A trailing group of fewer than 4 is kept whole (the
/// verifier only admits `K` divisible by 4).
pub fn sparse24_keep(row: &[f32]) -> Vec<bool> {
    let mut keep = vec![true; row.len()];
    for (gi, g) in row.chunks(4).enumerate() {
        if g.len() < 4 {
            break;
        }
        let (a, b) = sparse24_pair(g);
        for l in 0..4 {
            keep[4 * gi + l] = l == a || l == b;
        }
    }
    keep
}

/// The kept indices `(a, b)`, `a < b`, of one group of 4.
pub fn sparse24_pair(g: &[f32]) -> (usize, usize) {
    let mut idx = [0usize, 1, 2, 3];
    // Stable sort by descending magnitude: equal magnitudes keep the lower index first.
    idx.sort_by(|&i, &j| g[j].abs().partial_cmp(&g[i].abs()).unwrap_or(std::cmp::Ordering::Equal));
    (idx[0].min(idx[1]), idx[0].max(idx[1]))
}

/// The value of element `j` of a quantized row: `(q - zero) as f32 * scale`.
pub fn dequant(layout: Layout, r: &QRow, j: usize) -> f32 {
    let layout = layout.weight_format();
    match layout {
        Layout::Dense | Layout::Sparse24 { int8: false } => 0.0,
        Layout::Int8 | Layout::W8A8 | Layout::W4A8 { .. } | Layout::Sparse24 { int8: true } => r.q[j] as f32 * r.scales[0],
        Layout::Int4 { group, asym } => {
            let g = j / group;
            let z = if asym { r.zeros[g] } else { 0 };
            (r.q[j] as i32 - z as i32) as f32 * r.scales[g]
        }
    }
}

/// The quantized rows of weight `name` (`data`, row-major `[n, k]`) under `layout`: the
/// source's calibrated rows when it has them for this layout, else round-to-nearest.
pub fn rows_of(src: &dyn WeightSource, name: &str, layout: Layout, data: &[f32], k: usize) -> Vec<QRow> {
    if let Some(rows) = src.quantized(name, layout) {
        if rows.len() * k == data.len() && rows.iter().all(|r| r.q.len() == k) {
            return rows;
        }
    }
    data.chunks(k.max(1)).map(|row| quantize_row(layout, row)).collect()
}

/// The value weight `name` has under `layout`: what the interpreter computes with and what
/// every kernel must be exact to.
pub fn dequant_weight(src: &dyn WeightSource, name: &str, layout: Layout, data: &[f32], k: usize) -> Vec<f32> {
    match layout {
        Layout::Dense => data.to_vec(),
        Layout::Sparse24 { int8: false } => fake_quant(layout, data, k),
        _ if k == 0 => data.to_vec(),
        _ => {
            let rows = rows_of(src, name, layout, data, k);
            let mut out = Vec::with_capacity(data.len());
            for r in &rows {
                out.extend((0..k).map(|j| dequant(layout, r, j)));
            }
            out
        }
    }
}

/// The dequantized values of a row-major `[n, k]` weight (`data` unchanged for `Dense`).
pub fn fake_quant(layout: Layout, data: &[f32], k: usize) -> Vec<f32> {
    if layout == Layout::Dense || k == 0 {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    for row in data.chunks(k) {
        if layout == (Layout::Sparse24 { int8: false }) {
            let keep = sparse24_keep(row);
            out.extend(row.iter().zip(&keep).map(|(&x, &k)| if k { x } else { 0.0 }));
            continue;
        }
        let r = quantize_row(layout, row);
        out.extend((0..row.len()).map(|j| dequant(layout, &r, j)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 5) as f32)).collect()
    }

    #[test]
    fn error_bounded_by_half_step_and_partial_group() {
        let k = 44; // groups of 32: one full, one partial of 12
        let w = data(3 * k);
        for layout in [Layout::Int8, Layout::Int4 { group: 32, asym: false }, Layout::Int4 { group: 32, asym: true }] {
            let fq = fake_quant(layout, &w, k);
            for (row, frow) in w.chunks(k).zip(fq.chunks(k)) {
                let r = quantize_row(layout, row);
                let ngroups = if layout == Layout::Int8 { 1 } else { 2 };
                assert_eq!(r.scales.len(), ngroups, "{layout}");
                if layout != Layout::Int8 {
                    // Stored as IEEE halves: the scales are halves already.
                    assert!(r.scales.iter().all(|&s| half::f16::from_f32(s).to_f32() == s), "{layout}: {:?}", r.scales);
                }
                for (j, (&a, &b)) in row.iter().zip(frow).enumerate() {
                    let s = match layout {
                        Layout::Int8 => r.scales[0],
                        _ => r.scales[j / 32],
                    };
                    assert!((a - b).abs() <= s * 0.501 + 1e-6, "{layout} j={j}: {a} vs {b} (scale {s})");
                }
            }
        }
    }

    #[test]
    fn zero_rows_and_names() {
        assert_eq!(fake_quant(Layout::Int4 { group: 32, asym: true }, &[0.0; 8], 8), vec![0.0; 8]);
        for l in [
            Layout::Dense,
            Layout::Int8,
            Layout::Int4 { group: 64, asym: false },
            Layout::Int4 { group: 128, asym: true },
        ] {
            assert_eq!(Layout::from_name(&l.name()), Some(l));
        }
        assert_eq!(Layout::from_name("int4_g0"), None);
        assert_eq!(Layout::from_name("int4_gx"), None);
    }
}
