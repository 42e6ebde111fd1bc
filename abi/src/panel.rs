//! The panel layout: how the compiler stores an f32 weight whose products run through the
//! runtime's panel GEMM microkernel (`crate::ukernel::GEMM_PANELS`), and the packer that writes it.
//!
//! A row-major `[R, K]` weight (`R` output columns of `y = x . w^T`) in `groups` equal row groups
//! (1; 2 for `gated_linear`'s gate and up halves) is stored group after group; a group of `N` rows
//! is `ceil(N / 16)` panels of `16 x K` floats, panel `p` holding `w[16 p + j, k]` at `16 k + j`
//! (rows past `N` are zero). A product streams a panel contiguously whatever `M` is.

/// Columns per panel.
pub const PANEL: usize = 16;

/// The element type a panel weight is stored in: f32, or 16-bit (bf16 or IEEE f16) values that
/// the 16-bit panel GEMMs widen exactly to f32. The layout is the same, with 2-byte elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PanelElem {
    #[default]
    F32,
    BF16,
    F16,
}

impl PanelElem {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            PanelElem::F32 => 4,
            PanelElem::BF16 | PanelElem::F16 => 2,
        }
    }

    /// The microkernel slot of the panel GEMM over this element type.
    pub fn slot(self) -> usize {
        match self {
            PanelElem::F32 => crate::ukernel::GEMM_PANELS,
            PanelElem::BF16 => crate::ukernel::GEMM_PANELS_BF16,
            PanelElem::F16 => crate::ukernel::GEMM_PANELS_F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PanelElem::F32 => "f32",
            PanelElem::BF16 => "bf16",
            PanelElem::F16 => "f16",
        }
    }
}

/// Floats a panel-packed group of `n` rows of length `k` takes.
pub fn panel_group_len(n: usize, k: usize) -> usize {
    n.div_ceil(PANEL) * PANEL * k
}

/// The panel layout of a row-major `[rows, k]` weight in `groups` row groups (see the module
/// docs). `rows` must be a multiple of `groups`.
pub fn pack_panels(w: &[f32], rows: usize, k: usize, groups: usize) -> Vec<f32> {
    pack_panels_with(rows, k, groups, |r| &w[r * k..(r + 1) * k])
}

/// [`pack_panels`] of the `[rows, k]` matrix whose row `r` is `row(r)` (`k` values): packs a
/// concatenation of weights without building it first.
pub fn pack_panels_with<'a>(rows: usize, k: usize, groups: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
    pack_panels_part(rows, k, groups, row, 0..panel_count(rows, k, groups))
}

/// Panels in [`pack_panels_with`]'s result (each `PANEL * k` floats, group after group).
pub fn panel_count(rows: usize, k: usize, groups: usize) -> usize {
    if k == 0 {
        return 0;
    }
    (rows / groups.max(1)).div_ceil(PANEL) * groups
}

/// Panels `range` (of [`panel_count`]) of [`pack_panels_with`]'s result: a contiguous part of
/// it, so that a large weight can be packed and written piece by piece.
pub fn pack_panels_part<'a>(
    rows: usize,
    k: usize,
    groups: usize,
    row: impl Fn(usize) -> &'a [f32] + Sync,
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    let n = rows / groups.max(1);
    let range = range.start.min(range.end)..range.end.min(panel_count(rows, k, groups));
    let mut out = vec![0.0f32; range.len() * PANEL * k];
    let per_group = n.div_ceil(PANEL);
    if out.is_empty() || per_group == 0 {
        return out;
    }
    // Panel `q` (in group `q / per_group`) holds rows PANEL * (q % per_group).. of its group.
    let fill = |q0: usize, panels: &mut [f32]| {
        for (dq, panel) in panels.chunks_mut(PANEL * k).enumerate() {
            let (g, p) = ((q0 + dq) / per_group, (q0 + dq) % per_group);
            for j in 0..PANEL.min(n - p * PANEL) {
                store_panel_column(panel, j, &row(g * n + p * PANEL + j)[..k]);
            }
        }
    };
    // Large weights (a compile packs hundreds of MiB) are split by panels over the cores.
    let threads = if out.len() * 4 >= PACK_PARALLEL_BYTES { std::thread::available_parallelism().map_or(1, |t| t.get().min(8)) } else { 1 };
    let per_thread = range.len().div_ceil(threads);
    if threads <= 1 || per_thread == 0 {
        fill(range.start, &mut out);
        return out;
    }
    std::thread::scope(|sc| {
        let mut chunks = out.chunks_mut(per_thread * PANEL * k).enumerate();
        let first = chunks.next();
        for (i, c) in chunks {
            let fill = &fill;
            sc.spawn(move || fill(range.start + i * per_thread, c));
        }
        if let Some((_, c)) = first {
            fill(range.start, c);
        }
    });
    out
}

/// Stores the `k` values of a weight row as column `j` of a `PANEL x k` panel (`panel[kk * PANEL + j]`).
pub fn store_panel_column(panel: &mut [f32], j: usize, src: &[f32]) {
    for (kk, &v) in src.iter().enumerate() {
        panel[kk * PANEL + j] = v;
    }
}

/// Packed size from which [`pack_panels_with`] splits the work over threads.
const PACK_PARALLEL_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// The panel layout element by element, for packs large enough to be split over threads.
    #[test]
    fn large_pack_is_the_panel_layout() {
        for (rows, k, groups) in [(2 * 1000 + 2, 777, 2), (3000, 512, 1), (3 * 35, 20000, 3)] {
            let w: Vec<f32> = (0..rows * k).map(|i| i as f32).collect();
            let packed = pack_panels(&w, rows, k, groups);
            let n = rows / groups;
            let glen = panel_group_len(n, k);
            assert_eq!(packed.len(), glen * groups);
            assert!(packed.len() * 4 >= PACK_PARALLEL_BYTES);
            let count = panel_count(rows, k, groups);
            let mut parts = Vec::new();
            for q in (0..count).step_by(7) {
                parts.extend(pack_panels_part(rows, k, groups, |r| &w[r * k..(r + 1) * k], q..(q + 7).min(count)));
            }
            assert_eq!(parts, packed, "parts of rows {rows} k {k} groups {groups}");
            for g in 0..groups {
                for p in 0..n.div_ceil(PANEL) {
                    for kk in 0..k {
                        for j in 0..PANEL {
                            let r = p * PANEL + j;
                            let want = if r < n { w[(g * n + r) * k + kk] } else { 0.0 };
                            assert_eq!(packed[g * glen + p * PANEL * k + kk * PANEL + j], want, "rows {rows} k {k} groups {groups}");
                        }
                    }
                }
            }
        }
    }
}
