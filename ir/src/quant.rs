//! Round-to-nearest weight quantization: the reference semantics of [`Layout`]s.
//!
//! [`quantize_row`] gives the integer codes, scales and zero points of one row; [`fake_quant`]
//! maps a whole `[N, K]` weight to its dequantized values. Backends pack the same codes, so a
//! kernel that computes `(q - zero) as f32 * scale` in f32 is exact to the interpreter.

use crate::types::Layout;

/// The quantized form of one row of `k` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct QRow {
    /// One code per element: int8 in -127..=127, int4 symmetric in -8..=7, int4 asym in 0..=15.
    pub q: Vec<i8>,
    /// One scale per group (one per row for int8).
    pub scales: Vec<f32>,
    /// One zero point per group (asymmetric int4 only; 0..=15), else empty.
    pub zeros: Vec<i8>,
}

/// Quantizes one row under `layout` (which must not be [`Layout::Dense`]).
pub fn quantize_row(layout: Layout, row: &[f32]) -> QRow {
    match layout {
        Layout::Dense => QRow { q: Vec::new(), scales: Vec::new(), zeros: Vec::new() },
        Layout::Int8 => {
            let (q, s) = sym(row, 127.0, -127.0);
            QRow { q, scales: vec![s], zeros: Vec::new() }
        }
        Layout::Int4 { group, asym } => {
            let mut out = QRow { q: Vec::with_capacity(row.len()), scales: Vec::new(), zeros: Vec::new() };
            for g in row.chunks(group.max(1)) {
                if asym {
                    let lo = g.iter().fold(0.0f32, |a, &x| a.min(x));
                    let hi = g.iter().fold(0.0f32, |a, &x| a.max(x));
                    let scale = (hi - lo) / 15.0;
                    if scale > 0.0 && scale.is_finite() {
                        let zero = (-lo / scale).round().clamp(0.0, 15.0);
                        out.q.extend(g.iter().map(|&x| ((x / scale).round() + zero).clamp(0.0, 15.0) as i8));
                        out.scales.push(scale);
                        out.zeros.push(zero as i8);
                    } else {
                        out.q.extend(g.iter().map(|_| 0i8));
                        out.scales.push(0.0);
                        out.zeros.push(0);
                    }
                } else {
                    let (q, s) = sym(g, 7.0, -8.0);
                    out.q.extend(q);
                    out.scales.push(s);
                }
            }
            out
        }
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

/// The value of element `j` of a quantized row: `(q - zero) as f32 * scale`.
pub fn dequant(layout: Layout, r: &QRow, j: usize) -> f32 {
    match layout {
        Layout::Dense => 0.0,
        Layout::Int8 => r.q[j] as f32 * r.scales[0],
        Layout::Int4 { group, asym } => {
            let g = j / group;
            let z = if asym { r.zeros[g] } else { 0 };
            (r.q[j] as i32 - z as i32) as f32 * r.scales[g]
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
