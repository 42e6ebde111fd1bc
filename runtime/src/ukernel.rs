//! Runtime microkernels: matrix products that generated kernels call through a function table.
//!
//! Cranelift's x86-64 backend has 128-bit vectors only, so a GEMM written in generated code runs
//! at a fraction of an AVX-512 core's peak. Products with a compile-time weight therefore call
//! into the runtime: the compiler stores such a weight in the **panel layout**
//! ([`llmc_abi::panel`]) and the generated kernel calls the table entry [`GEMM_PANELS`], then runs
//! the op's epilogue (bias, activation, gated product, residual) over the returned tile while it
//! is in cache.
//!
//! The table's contract (slots, signatures, [`ABI_VERSION`]) is [`llmc_abi::ukernel`]; this
//! module holds the implementations and fills the table ([`table`]). The table is a buffer like
//! any other ([`crate::BufferDecl::Microkernels`]): generated code stays relocation-free, and the
//! implementation (AVX-512F, AVX2+FMA, or portable Rust) is chosen once per process by run-time
//! feature detection, not at compile time.

use std::cell::UnsafeCell;
use std::sync::OnceLock;

pub use llmc_abi::panel::{panel_group_len, PANEL};
pub use llmc_abi::ukernel::{
    GemmPanels16Fn, GemmPanelsFn, ABI_VERSION, GEMM_PANELS, GEMM_PANELS_BF16, GEMM_PANELS_F16, QGEMM, QGEMM_A8, QGEMM_A8_ROWS, QGEMV, QGEMV_A8, SLOTS,
};

/// The function table, filled for this CPU on first use (the layout of [`llmc_abi::ukernel::Table`]).
pub fn table() -> &'static [usize; SLOTS] {
    static TABLE: OnceLock<[usize; SLOTS]> = OnceLock::new();
    TABLE.get_or_init(|| {
        llmc_abi::ukernel::Table {
            gemm_panels: select_gemm_panels(),
            qgemv: crate::qkernel::select_qgemv(),
            qgemv_a8: crate::qkernel::select_qgemv_a8(),
            qgemm: crate::qkernel::select_qgemm(),
            gemm_panels_bf16: select_gemm_panels16::<BF16>(),
            gemm_panels_f16: select_gemm_panels16::<F16>(),
            attn_block: crate::akernel::select_attn_block(),
            qgemm_a8: crate::qkernel::select_qgemm_a8(),
            attn_block_i8: crate::akernel::select_attn_block_i8(),
            qgemm_a8_rows: crate::qkernel::select_qgemm_a8_rows(),
        }
        .addresses()
    })
}

/// Which implementation [`table`] uses (for reports): `"avx512f"`, `"avx2+fma"` or `"portable"`.
pub fn implementation() -> &'static str {
    if has_avx512() {
        "avx512f"
    } else if has_avx2_fma() && has_f16c() {
        "avx2+fma"
    } else {
        "portable"
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Panel element types, as the `E` parameter of the tiles: how a stored value widens to f32.
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// Bytes of one stored element of type `E`.
const fn elem_bytes(e: u8) -> usize {
    if e == F32 {
        4
    } else {
        2
    }
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn select_gemm_panels() -> GemmPanelsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return avx512::gemm_panels;
        }
        if has_avx2_fma() && has_f16c() {
            return avx2::gemm_panels;
        }
    }
    portable::gemm_panels
}

fn select_gemm_panels16<const E: u8>() -> GemmPanels16Fn {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(target_os = "linux")]
        if E == BF16 && crate::amx::ready() {
            return gemm_panels_bf16_amx;
        }
        if has_avx512() {
            return avx512::gemm_panels16::<E>;
        }
        // The AVX2 tiles also use F16C (for f16 panels; every AVX2 CPU has it).
        if has_avx2_fma() && has_f16c() {
            return avx2::gemm_panels16::<E>;
        }
    }
    portable::gemm_panels16::<E>
}

/// The bf16 panel GEMM where AMX is ready: products of [`crate::amx::MIN_ROWS`] rows or more
/// through AMX tiles (exact up to rounding order, see [`crate::amx`]), fewer through AVX-512.
///
/// # Safety
/// The [`GemmPanels16Fn`] contract; [`crate::amx::ready`] returned true.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "sysv64" fn gemm_panels_bf16_amx(a: *const f32, lda: i64, bp: *const u16, k: i64, m: i64, c0: i64, ncols: i64, up: *const u16) -> *mut f32 {
    if (m as usize) < crate::amx::MIN_ROWS {
        return avx512::gemm_panels16::<BF16>(a, lda, bp, k, m, c0, ncols, up);
    }
    let (m, nc) = (m as usize, ncols as usize);
    let ldt = nc.div_ceil(PANEL) * PANEL;
    let t = scratch(m * ldt * (1 + !up.is_null() as usize));
    crate::amx::gemm_bf16_panels(a, lda as usize, bp, k as usize, m, c0 as usize, nc, up, t, ldt);
    t
}

struct Scratch(UnsafeCell<Vec<f32>>);

thread_local! {
    static SCRATCH: Scratch = const { Scratch(UnsafeCell::new(Vec::new())) };
    /// 16-bit panels widened to f32 for a product of many rows ([`widened`]).
    static WIDE: Scratch = const { Scratch(UnsafeCell::new(Vec::new())) };
}

/// This thread's scratch with room for `len` floats (64-byte aligned start).
pub(crate) fn scratch(len: usize) -> *mut f32 {
    scratch_in(&SCRATCH, len)
}

fn scratch_in(key: &'static std::thread::LocalKey<Scratch>, len: usize) -> *mut f32 {
    key.with(|s| {
        // SAFETY: the vector is only touched here, on its own thread, and callers use the
        // returned pointer only until their next call.
        let v = unsafe { &mut *s.0.get() };
        if v.len() < len + 16 {
            v.resize(len + 16, 0.0);
        }
        let p = v.as_mut_ptr();
        let skew = (p as usize / 4).wrapping_neg() % 16;
        // SAFETY: at most 15 floats in, and `len` more fit.
        unsafe { p.add(skew) }
    })
}

/// The 16-bit panels a call of a 16-bit panel GEMM reads (columns `c0 .. c0 + ncols` of the group
/// at `bp`, and of the one at `up` when not null), widened to f32 by `widen(src, n, dst)` into this
/// thread's scratch: returns the f32 panels' group starts, for the f32 GEMM with `c0 = 0`. A
/// product of more rows than one register tile widens each weight once this way instead of once
/// per row block; the result is the same (widening is exact).
///
/// # Safety
/// The [`GemmPanels16Fn`] contract for `bp`, `up`, `k`, `c0`, `ncols`.
unsafe fn widened(bp: *const u8, up: *const u8, k: usize, c0: usize, ncols: usize, widen: unsafe fn(*const u8, usize, *mut f32)) -> (*const u8, *const u8) {
    let len = ncols.div_ceil(PANEL) * PANEL * k;
    let groups = if up.is_null() { 1 } else { 2 };
    let w = scratch_in(&WIDE, len * groups);
    let from = (c0 / PANEL) * PANEL * k * 2;
    widen(bp.add(from), len, w);
    if groups == 2 {
        widen(up.add(from), len, w.add(len));
        (w as *const u8, w.add(len) as *const u8)
    } else {
        (w as *const u8, std::ptr::null())
    }
}

/// The table's entry points of one implementation module, over its `gemm::<E>(a, lda, bp, k, m,
/// c0, ncols, up)` on byte pointers: `gemm_panels` (f32 panels, a [`GemmPanelsFn`]) and
/// `gemm_panels16::<E>` (bf16 or f16 panels, a [`GemmPanels16Fn`]). `$cpu` names what the CPU must
/// have for the module's code.
macro_rules! entry_points {
    ($cpu:literal) => {
        /// See [`super::GemmPanelsFn`].
        ///
        /// # Safety
        #[doc = concat!("The [`super::GemmPanelsFn`] contract; ", $cpu, ".")]
        pub(super) unsafe extern "sysv64" fn gemm_panels(
            a: *const f32,
            lda: i64,
            bp: *const f32,
            k: i64,
            m: i64,
            c0: i64,
            ncols: i64,
            up: *const f32,
        ) -> *mut f32 {
            gemm::<{ super::F32 }>(a, lda, bp as *const u8, k, m, c0, ncols, up as *const u8)
        }

        /// See [`super::GemmPanels16Fn`]; `E` is bf16 or f16.
        ///
        /// # Safety
        #[doc = concat!("The [`super::GemmPanels16Fn`] contract; ", $cpu, ".")]
        pub(super) unsafe extern "sysv64" fn gemm_panels16<const E: u8>(
            a: *const f32,
            lda: i64,
            bp: *const u16,
            k: i64,
            m: i64,
            c0: i64,
            ncols: i64,
            up: *const u16,
        ) -> *mut f32 {
            gemm::<E>(a, lda, bp as *const u8, k, m, c0, ncols, up as *const u8)
        }
    };
}

/// Rows per register tile for `m > 1` (AVX-512: 12 x 32 columns, 24 of the 32 registers).
const MR: usize = 12;

/// The chunk driver shared by the implementations: `tile(mr, np, a, b, t)` computes an
/// `mr x (16 np)` tile over the whole `k` from the panels at byte address `b`; for `m > 1` tiles
/// are at most `mr_max x (16 np_max)`, for `m = 1` one row by up to 4 panels. `es`: bytes per
/// stored panel element.
///
/// # Safety
/// The [`GemmPanelsFn`] contract.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn drive(
    a: *const f32,
    lda: usize,
    bp: *const u8,
    es: usize,
    k: usize,
    m: usize,
    c0: usize,
    ncols: usize,
    up: *const u8,
    mr_max: usize,
    np_max: usize,
    tile: &dyn Fn(usize, usize, *const f32, *const u8, *mut f32, usize),
) -> *mut f32 {
    let np = ncols.div_ceil(PANEL);
    let ldt = np * PANEL;
    let groups = if up.is_null() { 1 } else { 2 };
    let t = scratch(m * ldt * groups);
    let pstride = PANEL * k * es;
    for g in 0..groups {
        let base = if g == 0 { bp } else { up }.add((c0 / PANEL) * pstride);
        let tg = t.add(g * m * ldt);
        if m == 1 {
            // GEMV: four panels at a time, each streamed once.
            let mut p = 0;
            while p < np {
                let w = (np - p).min(4);
                tile(1, w, a, base.add(p * pstride), tg.add(p * PANEL), ldt);
                p += w;
            }
            continue;
        }
        // Panel pairs outermost: a pair (2 x 16 x K elements) stays in L2 across the row blocks.
        let mut p = 0;
        while p < np {
            let w = (np - p).min(np_max);
            let mut r = 0;
            while r < m {
                let h = (m - r).min(mr_max);
                tile(h, w, a.add(r * lda), base.add(p * pstride), tg.add(r * ldt + p * PANEL), ldt);
                r += h;
            }
            p += w;
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{elem_bytes, BF16, F32, PANEL};

    /// `t[r][16 p + j] = sum_k a[r][k] * b_p[k][j]` for `r < MR`, `p < NP`; panels `k * 16`
    /// elements of type `E` apart, each widened exactly to f32.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const E: u8, const MR: usize, const NP: usize>(
        a: *const f32,
        lda: usize,
        b: *const u8,
        k: usize,
        t: *mut f32,
        ldt: usize,
    ) {
        let es = elem_bytes(E);
        let pstride = PANEL * k * es;
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for kk in 0..k {
            let mut bv = [_mm512_setzero_ps(); NP];
            for (p, v) in bv.iter_mut().enumerate() {
                let at = b.add(p * pstride + kk * PANEL * es);
                *v = if E == F32 {
                    _mm512_loadu_ps(at as *const f32)
                } else {
                    let h = _mm256_loadu_si256(at as *const __m256i);
                    if E == BF16 {
                        // bf16 is the top half of an f32.
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                    } else {
                        _mm512_cvtph_ps(h)
                    }
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for (x, &bw) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, bw, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, &x) in row.iter().enumerate() {
                _mm512_storeu_ps(t.add(r * ldt + p * PANEL), x);
            }
        }
    }

    /// `dst[i] = src[i]` widened to f32 for `i < n` (`n` a multiple of 16), `src` 16-bit.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen<const E: u8>(src: *const u8, n: usize, dst: *mut f32) {
        for i in (0..n).step_by(16) {
            let h = _mm256_loadu_si256(src.add(2 * i) as *const __m256i);
            let v = if E == BF16 { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) } else { _mm512_cvtph_ps(h) };
            _mm512_storeu_ps(dst.add(i), v);
        }
    }

    macro_rules! dispatch {
        ($e:ident, $mr:expr, $np:expr, $args:tt; $($m:literal)*) => {
            match ($mr, $np) {
                $( ($m, 1) => tile::<$e, $m, 1> $args, ($m, 2) => tile::<$e, $m, 2> $args, )*
                (1, 3) => tile::<$e, 1, 3> $args,
                (_, _) => tile::<$e, 1, 4> $args,
            }
        };
    }

    /// The panel GEMM over elements of type `E`.
    ///
    /// # Safety
    /// The [`super::GemmPanelsFn`] contract (with `E`'s element size); the CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm<const E: u8>(a: *const f32, lda: i64, bp: *const u8, k: i64, m: i64, c0: i64, ncols: i64, up: *const u8) -> *mut f32 {
        if E != F32 && m as usize > super::MR {
            let (w, wu) = super::widened(bp, up, k as usize, c0 as usize, ncols as usize, widen::<E>);
            return gemm::<F32>(a, lda, w, k, m, 0, ncols, wu);
        }
        let (lda, k) = (lda as usize, k as usize);
        let tile = |mr: usize, np: usize, a: *const f32, b: *const u8, t: *mut f32, ldt: usize| {
            debug_assert!(mr == 1 || np <= 2);
            // SAFETY: the caller's contract covers every tile the driver asks for; AVX-512F is
            // present (this implementation is only selected then).
            unsafe { dispatch!(E, mr, np, (a, lda, b, k, t, ldt); 1 2 3 4 5 6 7 8 9 10 11 12) }
        };
        super::drive(a, lda, bp, elem_bytes(E), k, m as usize, c0 as usize, ncols as usize, up, super::MR, 2, &tile)
    }

    entry_points!("the CPU has AVX-512F");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{elem_bytes, BF16, F16, F32, PANEL};

    /// Eight stored elements of type `E` at `at`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<const E: u8>(at: *const u8) -> __m256 {
        if E == F32 {
            _mm256_loadu_ps(at as *const f32)
        } else if E == BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(at as *const __m128i))))
        } else {
            debug_assert_eq!(E, F16);
            _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i))
        }
    }

    /// `dst[i] = src[i]` widened to f32 for `i < n` (`n` a multiple of 8), `src` 16-bit.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn widen<const E: u8>(src: *const u8, n: usize, dst: *mut f32) {
        for i in (0..n).step_by(8) {
            _mm256_storeu_ps(dst.add(i), load8::<E>(src.add(2 * i)));
        }
    }

    /// As the AVX-512 tile, with each 16-column panel as two 8-lane halves (16 registers only:
    /// at most 4 rows x 1 panel = 8 accumulators for `m > 1`).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const E: u8, const MR: usize, const NP: usize>(
        a: *const f32,
        lda: usize,
        b: *const u8,
        k: usize,
        t: *mut f32,
        ldt: usize,
    ) {
        let es = elem_bytes(E);
        let pstride = PANEL * k * es;
        let mut acc = [[[_mm256_setzero_ps(); 2]; NP]; MR];
        for kk in 0..k {
            let mut bv = [[_mm256_setzero_ps(); 2]; NP];
            for (p, v) in bv.iter_mut().enumerate() {
                let at = b.add(p * pstride + kk * PANEL * es);
                v[0] = load8::<E>(at);
                v[1] = load8::<E>(at.add(8 * es));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + kk));
                for (x, bw) in row.iter_mut().zip(&bv) {
                    x[0] = _mm256_fmadd_ps(av, bw[0], x[0]);
                    x[1] = _mm256_fmadd_ps(av, bw[1], x[1]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, x) in row.iter().enumerate() {
                _mm256_storeu_ps(t.add(r * ldt + p * PANEL), x[0]);
                _mm256_storeu_ps(t.add(r * ldt + p * PANEL + 8), x[1]);
            }
        }
    }

    /// The panel GEMM over elements of type `E`.
    ///
    /// # Safety
    /// The [`super::GemmPanelsFn`] contract (with `E`'s element size); the CPU has AVX2, FMA and
    /// F16C.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm<const E: u8>(a: *const f32, lda: i64, bp: *const u8, k: i64, m: i64, c0: i64, ncols: i64, up: *const u8) -> *mut f32 {
        if E != F32 && m > 4 {
            let (w, wu) = super::widened(bp, up, k as usize, c0 as usize, ncols as usize, widen::<E>);
            return gemm::<F32>(a, lda, w, k, m, 0, ncols, wu);
        }
        let (lda, k) = (lda as usize, k as usize);
        let tile = |mr: usize, np: usize, a: *const f32, b: *const u8, t: *mut f32, ldt: usize| {
            // SAFETY: the caller's contract covers every tile the driver asks for; AVX2, FMA and
            // F16C are present (this implementation is only selected then).
            unsafe {
                match (mr, np) {
                    (1, 1) => tile::<E, 1, 1>(a, lda, b, k, t, ldt),
                    (2, _) => tile::<E, 2, 1>(a, lda, b, k, t, ldt),
                    (3, _) => tile::<E, 3, 1>(a, lda, b, k, t, ldt),
                    (4, _) => tile::<E, 4, 1>(a, lda, b, k, t, ldt),
                    (1, 2) => tile::<E, 1, 2>(a, lda, b, k, t, ldt),
                    (1, 3) => tile::<E, 1, 3>(a, lda, b, k, t, ldt),
                    _ => tile::<E, 1, 4>(a, lda, b, k, t, ldt),
                }
            }
        };
        super::drive(a, lda, bp, elem_bytes(E), k, m as usize, c0 as usize, ncols as usize, up, 4, 1, &tile)
    }

    entry_points!("the CPU has AVX2, FMA and F16C");
}

pub(crate) mod portable {
    use super::{elem_bytes, BF16, F32, PANEL};

    /// IEEE half-precision bits widened to f32 (exact: every f16 is an f32).
    pub(crate) fn f16_to_f32(h: u16) -> f32 {
        let sign = ((h as u32) & 0x8000) << 16;
        let exp = ((h >> 10) & 0x1f) as u32;
        let man = (h & 0x3ff) as u32;
        let bits = match (exp, man) {
            (0, 0) => sign,
            // Subnormal: m * 2^-24, exact in f32.
            (0, m) => {
                let v = m as f32 * f32::from_bits(0x3380_0000);
                return if sign != 0 { -v } else { v };
            }
            (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
            (e, m) => sign | ((e + 112) << 23) | (m << 13),
        };
        f32::from_bits(bits)
    }

    /// The stored element of type `E` at `at`, widened to f32.
    ///
    /// # Safety
    /// `at` points at an element of type `E`.
    #[inline(always)]
    unsafe fn load<const E: u8>(at: *const u8) -> f32 {
        if E == F32 {
            at.cast::<f32>().read_unaligned()
        } else {
            let h = at.cast::<u16>().read_unaligned();
            if E == BF16 {
                f32::from_bits((h as u32) << 16)
            } else {
                f16_to_f32(h)
            }
        }
    }

    /// `dst[i] = src[i]` widened to f32 for `i < n`, `src` 16-bit.
    unsafe fn widen<const E: u8>(src: *const u8, n: usize, dst: *mut f32) {
        for i in 0..n {
            *dst.add(i) = load::<E>(src.add(2 * i));
        }
    }

    /// The portable tile: `mr x (16 np)` over the whole `k`, `np <= 4`, `mr <= MR`.
    #[allow(clippy::too_many_arguments)]
    fn tile<const E: u8>(mr: usize, np: usize, a: *const f32, lda: usize, b: *const u8, k: usize, t: *mut f32, ldt: usize) {
        let es = elem_bytes(E);
        let pstride = PANEL * k * es;
        let mut acc = [[0.0f32; 4 * PANEL]; super::MR];
        let mut w = [0.0f32; PANEL];
        for kk in 0..k {
            for (r, row) in acc.iter_mut().enumerate().take(mr) {
                // SAFETY (both reads): within the rows and panels the caller passed.
                let x = unsafe { *a.add(r * lda + kk) };
                for p in 0..np {
                    for (j, v) in w.iter_mut().enumerate() {
                        *v = unsafe { load::<E>(b.add(p * pstride + (kk * PANEL + j) * es)) };
                    }
                    // Not `mul_add`: without a hardware FMA that is a libm call per element.
                    for (y, &wj) in row[p * PANEL..(p + 1) * PANEL].iter_mut().zip(&w) {
                        *y += x * wj;
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(mr) {
            // SAFETY: the tile's row lies within the scratch tile.
            let out = unsafe { std::slice::from_raw_parts_mut(t.add(r * ldt), np * PANEL) };
            out.copy_from_slice(&row[..np * PANEL]);
        }
    }

    /// The panel GEMM over elements of type `E`.
    ///
    /// # Safety
    /// The [`super::GemmPanelsFn`] contract (with `E`'s element size).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm<const E: u8>(a: *const f32, lda: i64, bp: *const u8, k: i64, m: i64, c0: i64, ncols: i64, up: *const u8) -> *mut f32 {
        if E != F32 && m as usize > super::MR {
            let (w, wu) = super::widened(bp, up, k as usize, c0 as usize, ncols as usize, widen::<E>);
            return gemm::<F32>(a, lda, w, k, m, 0, ncols, wu);
        }
        let (lda, k) = (lda as usize, k as usize);
        let f = |mr: usize, np: usize, a: *const f32, b: *const u8, t: *mut f32, ldt: usize| tile::<E>(mr, np, a, lda, b, k, t, ldt);
        super::drive(a, lda, bp, elem_bytes(E), k, m as usize, c0 as usize, ncols as usize, up, super::MR, 4, &f)
    }

    entry_points!("any CPU");
}

#[cfg(test)]
mod tests {
    use llmc_abi::panel::pack_panels;

    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Every implementation against a naive product, on shapes that are not multiples of any
    /// tile (M, N, K), M = 1 and K = 1, gated and not, with column chunks starting mid-matrix.
    #[test]
    fn panel_gemm_matches_naive_product() {
        let mut impls: Vec<(&str, GemmPanelsFn)> = vec![("portable", portable::gemm_panels)];
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            impls.push(("avx512f", avx512::gemm_panels));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() && has_f16c() {
            impls.push(("avx2+fma", avx2::gemm_panels));
        }
        let mut seed = 7u64;
        for &(m, n, k) in &[(1, 1, 1), (1, 70, 33), (3, 16, 1), (9, 37, 5), (17, 100, 64), (8, 64, 130), (2, 200, 7), (13, 48, 19)] {
            for groups in [1usize, 2] {
                let rows = n * groups;
                let lda = k + 3;
                let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
                let w: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
                let packed = pack_panels(&w, rows, k, groups);
                assert_eq!(packed.len(), groups * panel_group_len(n, k));
                let naive = |r: usize, c: usize| -> f32 { (0..k).map(|kk| a[r * lda + kk] * w[c * k + kk]).sum() };
                for (name, f) in &impls {
                    // Chunks of 32 columns (the last one partial), as a generated kernel asks.
                    for c0 in (0..n).step_by(32) {
                        let ncols = (n - c0).min(32);
                        let up = if groups == 2 { unsafe { packed.as_ptr().add(panel_group_len(n, k)) } } else { std::ptr::null() };
                        let t = unsafe { f(a.as_ptr(), lda as i64, packed.as_ptr(), k as i64, m as i64, c0 as i64, ncols as i64, up) };
                        let ldt = ncols.div_ceil(PANEL) * PANEL;
                        for g in 0..groups {
                            for r in 0..m {
                                for c in 0..ncols {
                                    let got = unsafe { *t.add(g * m * ldt + r * ldt + c) };
                                    let want = naive(r, g * n + c0 + c);
                                    assert!(
                                        (got - want).abs() <= 1e-5 * (k as f32).sqrt() + 1e-6,
                                        "{name}: m={m} n={n} k={k} groups={groups} at ({r}, {c0}+{c}) group {g}: {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every implementation of the 16-bit panel GEMMs (bf16, f16) gives bit for bit the f32 panel
    /// GEMM's tile over the widened weights: the same shapes as above, gated and not. (The AMX
    /// path sums in another order; `crate::amx`'s tests bound it against the exact product.)
    #[test]
    fn panel_gemm16_equals_the_f32_gemm_over_widened_weights() {
        type Impl = (&'static str, GemmPanelsFn, GemmPanels16Fn, GemmPanels16Fn);
        let mut impls: Vec<Impl> = vec![("portable", portable::gemm_panels, portable::gemm_panels16::<BF16>, portable::gemm_panels16::<F16>)];
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            impls.push(("avx512f", avx512::gemm_panels, avx512::gemm_panels16::<BF16>, avx512::gemm_panels16::<F16>));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() && has_f16c() {
            impls.push(("avx2+fma", avx2::gemm_panels, avx2::gemm_panels16::<BF16>, avx2::gemm_panels16::<F16>));
        }
        let bf16 = |x: f32| -> u16 {
            let b = x.to_bits();
            ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
        };
        let f16 = |x: f32| -> u16 { half::f16::from_f32(x).to_bits() };
        let mut seed = 11u64;
        for &(m, n, k) in &[(1, 1, 1), (1, 70, 33), (3, 16, 1), (9, 37, 5), (17, 100, 64), (2, 200, 7), (13, 48, 19)] {
            for groups in [1usize, 2] {
                let rows = n * groups;
                let lda = k + 3;
                let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
                // Includes f16 subnormals (below 6.1e-5) and values bf16 rounds.
                let w: Vec<f32> = (0..rows * k).map(|i| lcg(&mut seed) * if i % 7 == 0 { 1e-4 } else { 3.0 }).collect();
                for (elem, enc, wide) in [
                    ("bf16", &bf16 as &dyn Fn(f32) -> u16, &(|h: u16| f32::from_bits((h as u32) << 16)) as &dyn Fn(u16) -> f32),
                    ("f16", &f16, &portable::f16_to_f32),
                ] {
                    let packed = pack_panels(&w, rows, k, groups);
                    let p16: Vec<u16> = packed.iter().map(|&x| enc(x)).collect();
                    let p32: Vec<f32> = p16.iter().map(|&h| wide(h)).collect();
                    let glen = panel_group_len(n, k);
                    for (name, f32_fn, bf_fn, h_fn) in &impls {
                        let f = if elem == "bf16" { bf_fn } else { h_fn };
                        for c0 in (0..n).step_by(32) {
                            let ncols = (n - c0).min(32);
                            let ldt = ncols.div_ceil(PANEL) * PANEL;
                            let len = groups * m * ldt;
                            let (up16, up32) = if groups == 2 {
                                unsafe { (p16.as_ptr().add(glen), p32.as_ptr().add(glen)) }
                            } else {
                                (std::ptr::null(), std::ptr::null())
                            };
                            let t = unsafe { f(a.as_ptr(), lda as i64, p16.as_ptr(), k as i64, m as i64, c0 as i64, ncols as i64, up16) };
                            let got: Vec<u32> = (0..len).map(|i| unsafe { *t.add(i) }.to_bits()).collect();
                            let t = unsafe { f32_fn(a.as_ptr(), lda as i64, p32.as_ptr(), k as i64, m as i64, c0 as i64, ncols as i64, up32) };
                            let want: Vec<u32> = (0..len).map(|i| unsafe { *t.add(i) }.to_bits()).collect();
                            assert!(got == want, "{name} {elem}: m={m} n={n} k={k} groups={groups} c0={c0}");
                        }
                    }
                }
            }
        }
    }

    /// The portable f16 widening agrees with `half` on every bit pattern.
    #[test]
    fn f16_widening_is_exact() {
        for h in 0..=u16::MAX {
            let (got, want) = (portable::f16_to_f32(h), f32::from(half::f16::from_bits(h)));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }

    /// Every slot the contract requires is filled, the optional ones where this CPU has them.
    #[test]
    fn table_is_filled() {
        for s in llmc_abi::ukernel::TABLE {
            assert!(s.optional || table()[s.index] != 0, "slot `{}` is empty", s.name);
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert_ne!(table()[QGEMV], 0);
        }
        // The A8 product of f32 rows exactly where its AMX kernel can run.
        assert_eq!(table()[QGEMM_A8_ROWS] != 0, crate::amx::ready());
        assert!(["avx512f", "avx2+fma", "portable"].contains(&implementation()));
    }

    /// Throughput report, not a check: `cargo test --release -p llmc-runtime ukernel -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn panel_gemm_throughput() {
        let mut impls: Vec<(&str, GemmPanelsFn)> = vec![("portable", portable::gemm_panels)];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() && has_f16c() {
            impls.push(("avx2+fma", avx2::gemm_panels));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            impls.push(("avx512f", avx512::gemm_panels));
        }
        for (name, f) in impls {
        for &(m, n, k) in &[(24, 64, 64), (128, 768, 768), (128, 2048, 768), (128, 768, 2048), (1, 2048, 768), (1, 4096, 768), (1, 32000, 768), (1, 2048, 1536)] {
            let mut seed = 1u64;
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let gated = k == 1536;
            let k = if gated { 768 } else { k };
            let a: Vec<f32> = a[..m * k].to_vec();
            let p = pack_panels(&w, n * (1 + gated as usize), k, 1 + gated as usize);
            let up = if gated { unsafe { p.as_ptr().add(panel_group_len(n, k)) } } else { std::ptr::null() };
            let reps = if name == "portable" && k == 64 { 2000 } else if name == "portable" { 3 } else if m == 1 { 50 } else if k == 64 { 20000 } else { 20 };
            // CPU time of this thread (the machine may be shared): schedstat's first field, ns.
            let cpu = || -> f64 {
                let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
                s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) * 1e-9
            };
            let c = cpu();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for c0 in (0..n).step_by(64) {
                    unsafe { f(a.as_ptr(), k as i64, p.as_ptr(), k as i64, m as i64, c0 as i64, (n - c0).min(64) as i64, up) };
                }
            }
            let wall = t.elapsed().as_secs_f64() / reps as f64;
            let dt = (cpu() - c) / reps as f64;
            let (n, k) = if gated { (2 * n, k) } else { (n, k) };
            eprintln!(
                "{name} {m}x{n}x{k}{}: {:.1} GFLOP/s, {:.1} GB/s of weights per CPU second (wall {:.0}% on CPU)",
                if gated { " gated" } else { "" },
                2.0 * (m * n * k) as f64 / dt / 1e9,
                (n * k * 4) as f64 / dt / 1e9,
                100.0 * dt / wall
            );
        }
        }
    }
}
