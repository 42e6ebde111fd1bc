//! Weights stored packed: the `llmc-abi` row format ([`QFormat`]) of each IR layout the kernels
//! read packed, and the packer from quantized rows (`ir::quant`) to those bytes. The memory plan
//! and both backends use it; the bytes themselves are defined once, in [`abi::qformat`].

use abi::{QFormat, Row};
use ir::{quant, Layout};

use crate::error::Result;

/// The packed row format of `layout`; `None` for layouts stored as f32 (dense, and int4 whose
/// group is not a multiple of 16, which the kernels read as dequantized values).
pub fn qformat(layout: Layout) -> Option<QFormat> {
    let f = match layout {
        Layout::Dense => return None,
        Layout::Int8 => QFormat::Int8,
        Layout::Int4 { group, asym } => QFormat::Int4 { group, asym },
        Layout::Sparse24 { int8 } => QFormat::Sparse24 { int8 },
        Layout::W8A8 => QFormat::W8A8,
        Layout::W4A8 { group } => QFormat::W4A8 { group },
    };
    f.is_valid().then_some(f)
}

/// Whether the kernels can read `layout` packed.
pub fn packable(layout: Layout) -> bool {
    qformat(layout).is_some()
}

/// Bytes of one packed row of `k` elements (0 for a layout that is not [`packable`]).
pub fn row_bytes(layout: Layout, k: usize) -> usize {
    qformat(layout).map_or(0, |f| f.row_bytes(k))
}

/// The packed bytes of a row-major `[n, k]` weight (`data` has `n * k` values), round to nearest.
#[cfg(test)]
pub fn pack(layout: Layout, data: &[f32], k: usize) -> Result<Vec<u8>> {
    let rows: Vec<_> = data.chunks(k.max(1)).map(|r| quant::quantize_row(layout, r)).collect();
    pack_rows(layout, data, &rows, k)
}

/// The packed bytes of `[n, k]` weight `data` whose quantized rows are `rows` (from
/// `ir::quant::rows_of`: calibrated or round-to-nearest); 2:4 keeps the pair
/// `ir::quant::sparse24_pair` picks in each group of 4.
pub fn pack_rows(layout: Layout, data: &[f32], rows: &[quant::QRow], k: usize) -> Result<Vec<u8>> {
    let Some(f) = qformat(layout) else {
        return Err(crate::CodegenError::Target(format!("bug: weight layout `{layout}` has no packed format")));
    };
    let n = data.len().checked_div(k).unwrap_or(0);
    let mut out = Vec::with_capacity(n * f.row_bytes(k));
    let mut kept = Vec::new();
    for (row, r) in data.chunks(k.max(1)).zip(rows) {
        kept.clear();
        if matches!(f, QFormat::Sparse24 { .. }) {
            kept.extend(row.chunks_exact(4).map(quant::sparse24_pair).map(|(a, b)| (a as u8, b as u8)));
        }
        let parts = Row { codes: &r.q, scales: &r.scales, zeros: &r.zeros, kept: &kept, values: row };
        f.encode_row(k, &parts, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_records_have_the_stated_size() {
        for (layout, k) in [
            (Layout::Int8, 13),
            (Layout::Int4 { group: 32, asym: false }, 688),
            (Layout::Int4 { group: 64, asym: true }, 100),
            (Layout::Sparse24 { int8: true }, 44),
            (Layout::W4A8 { group: 64 }, 100),
        ] {
            let data: Vec<f32> = (0..3 * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let p = pack(layout, &data, k).unwrap();
            assert_eq!(p.len(), 3 * row_bytes(layout, k), "{layout}");
        }
        assert_eq!(row_bytes(Layout::Int8, 256), 4 + 256);
    }

    /// Every layout but dense and int4 groups that are not a multiple of 16 is packed, under
    /// the format of the same name.
    #[test]
    fn layouts_map_to_their_formats() {
        for l in [
            Layout::Int8,
            Layout::Int4 { group: 48, asym: true },
            Layout::Sparse24 { int8: false },
            Layout::W8A8,
            Layout::W4A8 { group: 128 },
        ] {
            assert_eq!(qformat(l).map(|f| f.to_string()), Some(l.name()));
        }
        assert_eq!(qformat(Layout::Dense), None);
        assert_eq!(qformat(Layout::Int4 { group: 8, asym: false }), None);
        let e = pack_rows(Layout::Dense, &[0.0; 4], &[], 4).unwrap_err().to_string();
        assert!(e.contains("dense"), "{e}");
    }
}
